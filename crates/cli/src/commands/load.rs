//! `vfio-mig load file:PATH DEVICE...`: cold migration out of a file. The stream is checked
//! against the devices before any of them is touched; they run the loaded state on success
//! and are reset on failure (nothing half-loaded runs). A corrupt or truncated file fails
//! with the offset of the problem.

use std::io::Write;

use clap::Args;
use vfio_mig_orchestrator::{load, NamedDevice, Side};

use crate::address::{open_all, DeviceAddress, FileAddress, OpenDevice};
use crate::app::Context;
use crate::commands::migrate::{
    destination_buffers, destination_options, membuf_digests, migration_failed,
    print_destination_result,
};
use crate::progress::{duration, run_engine, Output};

/// Arguments of `load`.
#[derive(Clone, Debug, Args)]
pub struct LoadArgs {
    /// The saved stream, file:PATH.
    #[arg(value_name = "FILE")]
    pub file: FileAddress,
    /// The devices to load into, in the order of the stream's devices.
    #[arg(value_name = "DEVICE", required = true)]
    pub devices: Vec<DeviceAddress>,
    /// Accept several devices even if some lack P2P.
    #[arg(long)]
    pub allow_non_p2p: bool,
    /// How device data travels.
    #[command(flatten)]
    pub data_path: crate::data_path::DataPathArg,
    /// One JSON object per line on stdout: every event, then the summary.
    #[arg(long)]
    pub json: bool,
}

/// Runs `load`.
pub fn run(args: LoadArgs, _ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let output = Output::from_flag(args.json);
    let devices = open_all(&args.devices)?;
    let named: Vec<NamedDevice> = devices.iter().map(OpenDevice::named).collect();
    let memory = destination_buffers(&devices, args.data_path)?;
    let result = run_engine(output, Side::Destination, out, |sink| {
        load(
            &args.file.0,
            &named,
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
            "loaded {} device(s) from {} in {}",
            summary.devices.len(),
            args.file,
            duration(summary.total)
        ),
        "after load",
    )
}
