//! `vfio-mig inspect file:PATH [--json]`: describe a saved stream (header, devices,
//! compatibility data, chunks per phase, totals) and check it whole. Exits 1 when the
//! stream is not intact (truncated, corrupt, or aborted by its source), naming the offset.

use std::fs::File;
use std::io::Write;

use anyhow::Context as _;
use clap::Args;
use vfio_mig_stream::{inspect, Integrity};

use crate::address::FileAddress;
use crate::app::Context;
use crate::progress::json_line;

/// Arguments of `inspect`.
#[derive(Clone, Debug, Args)]
pub struct InspectArgs {
    /// The saved stream, file:PATH.
    #[arg(value_name = "FILE")]
    pub file: FileAddress,
    /// Print one JSON object (the description, integrity included).
    #[arg(long)]
    pub json: bool,
}

/// Runs `inspect`.
pub fn run(args: InspectArgs, _ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let file = File::open(&args.file.0).with_context(|| format!("cannot open {}", args.file))?;
    let inspection = inspect(file).with_context(|| format!("reading {} failed", args.file))?;
    if args.json {
        json_line(out, &inspection)?;
    } else {
        let text = inspection.to_string();
        out.write_all(text.as_bytes())?;
        if !text.ends_with('\n') {
            writeln!(out)?;
        }
    }
    match &inspection.integrity {
        Integrity::Ok => Ok(()),
        Integrity::Aborted { reason } => {
            anyhow::bail!("{}: the source aborted this stream: {reason}", args.file)
        }
        // The messages name the offset ("truncated at offset N: ...", "at offset N: ...").
        Integrity::Truncated { message, .. } => anyhow::bail!("{}: {message}", args.file),
        Integrity::Corrupt { message, .. } => {
            anyhow::bail!("{} is corrupt: {message}", args.file)
        }
    }
}
