//! `vfio-mig save DEVICE... file:PATH`: cold migration into a file. Every device is stopped
//! and its whole state written (no precopy); the devices are left stopped with their state
//! intact (`vfio-mig state DEVICE running` restarts one). On failure the devices are back
//! in their original state and no file is left.

use std::io::Write;

use clap::Args;
use vfio_mig_orchestrator::{save, NamedDevice, Side, SourceOptions, SourceSummary};

use crate::address::{open_all, AnyAddress, DeviceAddress, FileAddress, OpenDevice};
use crate::app::Context;
use crate::commands::migrate::{
    describe_digests, membuf_digests, migration_failed, source_buffers, DeviceDigest,
};
use crate::data_path::DataPathTotals;
use crate::exit::UsageError;
use crate::progress::{describe_source, duration, run_engine, tagged_json_line, Output};
use vfio_mig_orchestrator::Address as TransportAddress;

/// Arguments of `save`.
#[derive(Clone, Debug, Args)]
pub struct SaveArgs {
    /// DEVICE... file:PATH: the devices to save, then the file to create (replaced if it
    /// exists).
    #[arg(value_name = "ADDRESS", num_args = 2.., required = true)]
    pub addresses: Vec<AnyAddress>,
    /// Save several devices together even if some lack P2P.
    #[arg(long)]
    pub allow_non_p2p: bool,
    /// How device data travels.
    #[command(flatten)]
    pub data_path: crate::data_path::DataPathArg,
    /// One JSON object per line on stdout: every event, then the summary.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct SaveOutput<'a> {
    #[serde(flatten)]
    summary: &'a SourceSummary,
    file: String,
    /// Digests of the membuf devices' saved (and kept) state.
    source_digests: &'a [DeviceDigest],
    /// How the devices' data travelled.
    data_path: DataPathTotals,
}

/// Splits `DEVICE... file:PATH`.
fn split(addresses: &[AnyAddress]) -> anyhow::Result<(Vec<DeviceAddress>, FileAddress)> {
    let usage = |m: String| anyhow::Error::new(UsageError::new(m));
    let Some((AnyAddress::Transport(TransportAddress::File(path)), devices)) =
        addresses.split_last()
    else {
        return Err(usage(
            "save writes into a file: the last address must be file:PATH".into(),
        ));
    };
    let devices = devices
        .iter()
        .map(|a| match a {
            AnyAddress::Device(d) => Ok(d.clone()),
            AnyAddress::Transport(t) => Err(usage(format!(
                "{t} is not a device; save takes DEVICE... file:PATH"
            ))),
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok((devices, FileAddress(path.clone())))
}

/// Runs `save`.
pub fn run(args: SaveArgs, _ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let output = Output::from_flag(args.json);
    let (addresses, file) = split(&args.addresses)?;
    let devices = open_all(&addresses)?;
    let named: Vec<NamedDevice> = devices.iter().map(OpenDevice::named).collect();
    let memory = source_buffers(&devices, devices.len(), args.data_path)?;
    let result = run_engine(output, Side::Source, out, |sink| {
        // save() moves the whole state in stop-copy, whatever the precopy options say.
        let opts = SourceOptions {
            allow_non_p2p: args.allow_non_p2p,
            events: Some(sink),
            buffer_memory: memory,
            ..SourceOptions::default()
        };
        save(&named, &file.0, &opts)
    })?;
    let summary = result.map_err(|e| migration_failed(e, output, out))?;
    let digests = membuf_digests(&devices)?;
    if output == Output::Json {
        tagged_json_line(
            out,
            "summary",
            &SaveOutput {
                summary: &summary,
                file: file.to_string(),
                source_digests: &digests,
                data_path: DataPathTotals::of(&devices),
            },
        )?;
    } else {
        let mut text = format!(
            "saved {} device(s) to {file} in {}\n",
            devices.len(),
            duration(summary.total)
        );
        text.push_str(&describe_source(&summary, None));
        text.push_str(&DataPathTotals::of(&devices).describe("source"));
        text.push_str(&describe_digests(&digests, "as saved"));
        text.push_str(
            "  the devices stay stopped with their state; `vfio-mig state DEVICE running` \
             restarts one\n",
        );
        out.write_all(text.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exit::Exit;

    fn any(s: &str) -> AnyAddress {
        s.parse().unwrap()
    }

    #[test]
    fn the_file_comes_last_and_only_devices_before_it() {
        let (devices, file) =
            split(&[any("vfio-user:/a"), any("vfio-user:/b"), any("file:/x")]).unwrap();
        assert_eq!(devices.len(), 2);
        assert_eq!(file, FileAddress("/x".into()));
        for bad in [
            vec![any("vfio-user:/a"), any("vfio-user:/b")],
            vec![any("file:/x"), any("vfio-user:/a")],
            vec![any("tcp:h:1"), any("file:/x")],
            vec![any("vfio-user:/a"), any("tcp:h:1")],
        ] {
            let err = split(&bad).unwrap_err();
            assert_eq!(Exit::of(&err), Exit::Usage, "{bad:?}");
        }
    }
}
