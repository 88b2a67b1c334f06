//! `vfio-mig receive --listen tcp:ADDR DEVICE...`: the destination side of a migration over
//! the network. Opens the devices, listens, prints where (first line on stdout, flushed:
//! `listening on tcp:127.0.0.1:43211`, the actual port when 0 was asked for), accepts one
//! source connection and migrates its stream into the devices (paired by order).
//!
//! Exits 0 when the devices run the migrated state. For membuf devices the digests after
//! the migration are printed, to compare with the source digests `vfio-mig migrate` prints.
//! With `--json` every line is a JSON object: `{"event":"listening","address":...}`, the
//! engine's events, then `{"event":"summary",...}` or `{"event":"error",...}`.

use std::io::Write;

use anyhow::Context as _;
use clap::Args;
use vfio_mig_orchestrator::{migrate_in, Listener, NamedDevice, Side};

use crate::address::{open_all, DeviceAddress, OpenDevice, RemoteAddress};
use crate::app::Context;
use crate::commands::migrate::{
    destination_buffers, destination_options, membuf_digests, migration_failed,
    print_destination_result,
};
use crate::progress::{duration, run_engine, tagged_json_line, Output};

/// Arguments of `receive`.
#[derive(Clone, Debug, Args)]
pub struct ReceiveArgs {
    /// Where to listen: tcp:HOST:PORT (port 0 picks a free port) or unix:PATH.
    #[arg(long, value_name = "ADDRESS")]
    pub listen: RemoteAddress,
    /// The destination devices, in the order of the source's devices.
    #[arg(value_name = "DEVICE", required = true)]
    pub devices: Vec<DeviceAddress>,
    /// Accept several devices even if some lack P2P.
    #[arg(long)]
    pub allow_non_p2p: bool,
    /// How device data travels.
    #[command(flatten)]
    pub data_path: crate::data_path::DataPathArg,
    /// One JSON object per line on stdout.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Listening {
    address: String,
}

/// Runs `receive`.
pub fn run(args: ReceiveArgs, _ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let output = Output::from_flag(args.json);
    let devices = open_all(&args.devices)?;
    let named: Vec<NamedDevice> = devices.iter().map(OpenDevice::named).collect();
    let listener = Listener::bind(&args.listen.0)
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener
        .local_address()
        .context("reading the address listened on failed")?;
    match output {
        Output::Json => tagged_json_line(
            out,
            "listening",
            &Listening {
                address: bound.to_string(),
            },
        )?,
        Output::Human => {
            writeln!(out, "listening on {bound}")?;
            out.flush()?;
        }
    }
    let transport = listener
        .accept()
        .with_context(|| format!("accepting a connection on {bound} failed"))?;
    let memory = destination_buffers(&devices, args.data_path)?;
    let result = run_engine(output, Side::Destination, out, |sink| {
        migrate_in(
            &named,
            transport,
            &destination_options(args.allow_non_p2p, sink, memory),
        )
    })?;
    let summary = result.map_err(|e| migration_failed(e, output, out))?;
    let digests = membuf_digests(&devices)?;
    print_destination_result(
        output,
        out,
        &summary,
        &digests,
        crate::data_path::DataPathTotals::of(&devices),
        format!(
            "received {} device(s) from {} in {}",
            summary.devices.len(),
            summary.transport,
            duration(summary.total)
        ),
        "after resume",
    )
}
