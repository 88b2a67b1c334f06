//! `vfio-mig load file:PATH DEVICE...`: cold migration out of a file. The stream is checked
//! against the devices before any of them is touched; they run the loaded state on success
//! and are reset on failure (nothing half-loaded runs). A corrupt or truncated file fails
//! with the offset of the problem.

use std::io::Write;

use clap::Args;
use vfio_mig_orchestrator::{load, DestinationSummary, NamedDevice, Side};

use crate::address::{open_all, DeviceAddress, FileAddress, OpenDevice};
use crate::app::Context;
use crate::commands::migrate::{
    describe_digests, destination_options, membuf_digests, migration_failed, DeviceDigest,
};
use crate::progress::{describe_destination, duration, run_engine, tagged_json_line, Output};

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
    /// One JSON object per line on stdout: every event, then the summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct LoadOutput<'a> {
    #[serde(flatten)]
    summary: &'a DestinationSummary,
    /// Digests of the membuf devices after the load.
    destination_digests: &'a [DeviceDigest],
}

/// Runs `load`.
pub fn run(args: LoadArgs, _ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let output = Output::from_flag(args.json);
    let devices = open_all(&args.devices)?;
    let named: Vec<NamedDevice> = devices.iter().map(OpenDevice::named).collect();
    let result = run_engine(output, Side::Destination, out, |sink| {
        load(
            &args.file.0,
            &named,
            &destination_options(args.allow_non_p2p, sink),
        )
    })?;
    let summary = result.map_err(|e| migration_failed(e, output, out))?;
    let digests = membuf_digests(&devices)?;
    if output == Output::Json {
        tagged_json_line(
            out,
            "summary",
            &LoadOutput {
                summary: &summary,
                destination_digests: &digests,
            },
        )?;
    } else {
        let mut text = format!(
            "loaded {} device(s) from {} in {}\n",
            summary.devices.len(),
            args.file,
            duration(summary.total)
        );
        text.push_str(&describe_destination(&summary));
        text.push_str(&describe_digests(&digests, "after load"));
        out.write_all(text.as_bytes())?;
    }
    Ok(())
}
