//! `vfio-mig migrate`: live-migrate devices, into local devices (both engines in this
//! process) or to a `vfio-mig receive` over the network.
//!
//! ```text
//! vfio-mig migrate SRC DST                       one device into another
//! vfio-mig migrate --pair SRC=DST --pair ...     several devices at once
//! vfio-mig migrate SRC... tcp:HOST:PORT          to a `vfio-mig receive` (also unix:PATH)
//! ```
//!
//! Output: a progress bar on stderr (only on a terminal), then a summary on stdout; with
//! `--json`, every engine event as one JSON object per line, then `{"event":"summary",...}`
//! (or `{"event":"error",...}` on failure). For pairs of membuf devices the digests are
//! compared after the migration (the source frozen in STOP, the destination unchanged since
//! it resumed): a mismatch fails the command. To a remote receiver, the source digests are
//! printed for comparison with the ones `vfio-mig receive` prints.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::io::Write;
use std::str::FromStr;
use std::time::Duration;

use anyhow::Context as _;
use clap::{Args, ValueEnum};
use vfio_mig_orchestrator::{
    migrate_local, migrate_out, DestinationOptions, EventSink, LocalSummary, MigrationError,
    NamedDevice, NonConvergence, Recovery, Side, SourceOptions, Stage, Transport,
};

use crate::address::{
    open_all, AddressError, AnyAddress, Destination, DeviceAddress, DigestReading, OpenDevice,
    RemoteAddress,
};
use crate::app::Context;
use crate::data_path::{self, DataPathArg, DataPathTotals};
use crate::exit::UsageError;
use crate::progress::{describe_source, duration, run_engine, tagged_json_line, Output};

/// What to do when precopy does not converge within `--max-rounds`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum OnNoConvergence {
    /// Switch over anyway (a longer downtime).
    Switch,
    /// Abort the migration; the source devices run on.
    Abort,
}

/// How the source engine migrates (shared by `migrate` and, partly, `save`).
#[derive(Clone, Copy, Debug, Args)]
pub struct Tuning {
    /// Longest acceptable predicted downtime in milliseconds: precopy goes on until the
    /// remaining state can move within it.
    #[arg(long, value_name = "MS", default_value_t = 300)]
    pub downtime_limit: u64,
    /// Most precopy rounds before --on-no-convergence applies.
    #[arg(long, value_name = "N", default_value_t = 30,
          value_parser = clap::value_parser!(u32).range(1..))]
    pub max_rounds: u32,
    /// After --max-rounds without converging: switch over anyway, or abort.
    #[arg(long, value_enum, value_name = "WHAT", default_value_t = OnNoConvergence::Switch)]
    pub on_no_convergence: OnNoConvergence,
    /// Do not precopy: stop the devices and move their whole state at once.
    #[arg(long)]
    pub no_precopy: bool,
}

/// A source device and its destination, `SRC=DST`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pair {
    /// The device to migrate.
    pub source: DeviceAddress,
    /// Where to.
    pub destination: Destination,
}

impl FromStr for Pair {
    type Err = AddressError;

    /// Splits at the first `=` after which both sides parse (paths may contain `=`).
    fn from_str(s: &str) -> Result<Pair, AddressError> {
        let mut first_error = None;
        for (at, _) in s.match_indices('=') {
            let parsed = s[..at].parse::<DeviceAddress>().and_then(|source| {
                s[at + 1..].parse::<Destination>().map(|destination| Pair {
                    source,
                    destination,
                })
            });
            match parsed {
                Ok(pair) => return Ok(pair),
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        Err(first_error.unwrap_or_else(|| {
            // No `=` at all: report it as an address problem of the whole.
            AddressError::new(s, "a pair is SRC=DST", "SRC=DST with device addresses")
        }))
    }
}

/// Arguments of `migrate`.
#[derive(Clone, Debug, Args)]
pub struct MigrateArgs {
    /// SRC DST: the device to migrate and its destination, a device or tcp:HOST:PORT (or
    /// unix:PATH) of a `vfio-mig receive`. Before a tcp:/unix: destination, several SRC
    /// devices may be given.
    #[arg(value_name = "ADDRESS")]
    pub addresses: Vec<AnyAddress>,
    /// A source device and its destination, SRC=DST; repeat for several devices (all P2P
    /// capable unless --allow-non-p2p).
    #[arg(long = "pair", value_name = "SRC=DST")]
    pub pairs: Vec<Pair>,
    /// How the source migrates.
    #[command(flatten)]
    pub tuning: Tuning,
    /// Migrate several devices together even if some lack P2P (a device still able to do
    /// P2P DMA may change a peer already saved).
    #[arg(long)]
    pub allow_non_p2p: bool,
    /// How device data travels.
    #[command(flatten)]
    pub data_path: DataPathArg,
    /// One JSON object per line on stdout: every event, then the summary.
    #[arg(long)]
    pub json: bool,
}

/// What to migrate where.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Plan {
    /// Both engines here: pairs of devices.
    Local(Vec<(DeviceAddress, DeviceAddress)>),
    /// Source engine here, destination at a `vfio-mig receive`.
    Remote {
        sources: Vec<DeviceAddress>,
        to: RemoteAddress,
    },
}

fn usage(message: impl Into<String>) -> anyhow::Error {
    anyhow::Error::new(UsageError::new(message))
}

fn plan(args: &MigrateArgs) -> anyhow::Result<Plan> {
    let plan = match (args.addresses.as_slice(), args.pairs.as_slice()) {
        ([], []) => {
            return Err(usage(
                "nothing to migrate: give SRC DST, or --pair SRC=DST for each device",
            ))
        }
        ([_, ..], [_, ..]) => return Err(usage("give either SRC DST or --pair, not both")),
        ([_], []) => return Err(usage("migrate needs a destination after the source")),
        (addresses, []) => {
            let (last, sources) = addresses.split_last().unwrap_or_else(|| unreachable!());
            let sources = sources
                .iter()
                .map(|a| match a {
                    AnyAddress::Device(d) => Ok(d.clone()),
                    AnyAddress::Transport(t) => Err(usage(format!(
                        "{t} is not a device; the sources must be devices"
                    ))),
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            match last {
                AnyAddress::Device(d) if sources.len() == 1 => {
                    Plan::Local(vec![(sources[0].clone(), d.clone())])
                }
                AnyAddress::Device(_) => {
                    return Err(usage(
                        "several devices migrate into local devices with --pair SRC=DST each",
                    ))
                }
                AnyAddress::Transport(t) => match t.to_string().parse::<RemoteAddress>() {
                    Ok(to) => Plan::Remote { sources, to },
                    Err(_) => {
                        return Err(usage(format!(
                            "migrate does not write {t} (use save); the destination is a \
                             device or tcp:HOST:PORT"
                        )))
                    }
                },
            }
        }
        ([], pairs) => {
            let remote: Vec<&RemoteAddress> = pairs
                .iter()
                .filter_map(|p| match &p.destination {
                    Destination::Remote(r) => Some(r),
                    Destination::Device(_) => None,
                })
                .collect();
            if remote.is_empty() {
                Plan::Local(
                    pairs
                        .iter()
                        .map(|p| match &p.destination {
                            Destination::Device(d) => (p.source.clone(), d.clone()),
                            Destination::Remote(_) => unreachable!(),
                        })
                        .collect(),
                )
            } else if remote.len() == pairs.len() && remote.iter().all(|r| *r == remote[0]) {
                Plan::Remote {
                    sources: pairs.iter().map(|p| p.source.clone()).collect(),
                    to: remote[0].clone(),
                }
            } else {
                return Err(usage(
                    "all pairs go to local devices, or all to the same receiver",
                ));
            }
        }
    };
    // A device is one connection: it can take part only once.
    let mut seen = HashSet::new();
    let devices: Vec<&DeviceAddress> = match &plan {
        Plan::Local(pairs) => pairs.iter().flat_map(|(s, d)| [s, d]).collect(),
        Plan::Remote { sources, .. } => sources.iter().collect(),
    };
    for d in devices {
        if !seen.insert(d) {
            return Err(usage(format!("device {d} is given more than once")));
        }
    }
    Ok(plan)
}

/// The source engine's options from the command line.
pub(crate) fn source_options(
    tuning: &Tuning,
    allow_non_p2p: bool,
    events: EventSink,
) -> SourceOptions {
    SourceOptions {
        downtime_limit: Duration::from_millis(tuning.downtime_limit),
        max_precopy_rounds: tuning.max_rounds,
        on_no_convergence: match tuning.on_no_convergence {
            OnNoConvergence::Switch => NonConvergence::SwitchOver,
            OnNoConvergence::Abort => NonConvergence::Abort,
        },
        precopy: !tuning.no_precopy,
        allow_non_p2p,
        events: Some(events),
        cancel: crate::interrupt::interrupt_token(),
        ..SourceOptions::default()
    }
}

/// The destination engine's options from the command line, its buffers in `memory`.
pub(crate) fn destination_options(
    allow_non_p2p: bool,
    events: EventSink,
    buffer_memory: Option<std::sync::Arc<dyn vfio_mig_orchestrator::BufferMemory>>,
) -> DestinationOptions {
    DestinationOptions {
        allow_non_p2p,
        events: Some(events),
        cancel: crate::interrupt::interrupt_token(),
        buffer_memory,
        ..DestinationOptions::default()
    }
}

/// The destination engine's buffer memory: an arena shared with the servers of `devices`
/// that offer it, sized for its pools of the largest chunks accepted.
pub(crate) fn destination_buffers(
    devices: &[OpenDevice],
    path: DataPathArg,
) -> anyhow::Result<Option<std::sync::Arc<dyn vfio_mig_orchestrator::BufferMemory>>> {
    let defaults = DestinationOptions::default();
    data_path::attach(
        &data_path::clients_of(devices),
        devices.len() * defaults.buffers_per_device,
        defaults.max_chunk as usize,
        path.data_path,
    )
}

/// A failed migration as JSON.
#[derive(serde::Serialize)]
struct ErrorReport<'a> {
    message: &'a str,
    side: Side,
    stage: Stage,
    recovery: &'a Recovery,
    peer_recovery: Option<&'a Recovery>,
}

/// Turns an engine's failure into the command's error: its one-line report on top (the
/// whole chain of causes with `-v`), and in JSON mode an `{"event":"error",...}` line.
pub(crate) fn migration_failed(
    err: MigrationError,
    output: Output,
    out: &mut dyn Write,
) -> anyhow::Error {
    let report = err.report();
    if output == Output::Json {
        let line = ErrorReport {
            message: &report,
            side: err.side,
            stage: err.stage,
            recovery: &err.recovery,
            peer_recovery: err.peer_recovery.as_ref(),
        };
        // The command fails either way; a lost JSON line must not hide the reason.
        let _ = tagged_json_line(out, "error", &line);
    }
    anyhow::Error::new(err).context(report)
}

/// One device's digest, as JSON.
#[derive(Debug, serde::Serialize)]
pub(crate) struct DeviceDigest {
    /// Index in the stream.
    pub device: u16,
    /// The device's address.
    pub name: String,
    /// The reading.
    #[serde(flatten)]
    pub reading: DigestReading,
}

/// The digests of the membuf devices among `devices` (others are skipped).
pub(crate) fn membuf_digests(devices: &[OpenDevice]) -> anyhow::Result<Vec<DeviceDigest>> {
    let mut digests = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        if d.is_membuf() {
            digests.push(DeviceDigest {
                device: i as u16,
                name: d.address.to_string(),
                reading: d.digest()?,
            });
        }
    }
    Ok(digests)
}

/// Human lines for digests: `  digest of device 0 (NAME): 0x... (WHAT)`.
/// What a destination-side command (`receive`, `load`) prints as JSON: the engine's summary
/// and the membuf digests after the devices run.
#[derive(serde::Serialize)]
struct DestinationOutput<'a> {
    #[serde(flatten)]
    summary: &'a vfio_mig_orchestrator::DestinationSummary,
    /// Digests of the membuf destinations after they started.
    destination_digests: &'a [DeviceDigest],
    /// How the destination devices' data travelled.
    data_path: DataPathTotals,
}

/// Prints a destination's result: one `summary` JSON line, or `headline` then the summary
/// and the digests (`after` says when they were read).
pub(crate) fn print_destination_result(
    output: Output,
    out: &mut dyn Write,
    summary: &vfio_mig_orchestrator::DestinationSummary,
    digests: &[DeviceDigest],
    data_path: DataPathTotals,
    headline: String,
    after: &str,
) -> anyhow::Result<()> {
    if output == Output::Json {
        crate::progress::tagged_json_line(
            out,
            "summary",
            &DestinationOutput {
                summary,
                destination_digests: digests,
                data_path,
            },
        )?;
    } else {
        let mut text = headline;
        text.push('\n');
        text.push_str(&crate::progress::describe_destination(summary));
        text.push_str(&data_path.describe("destination"));
        text.push_str(&describe_digests(digests, after));
        out.write_all(text.as_bytes())?;
    }
    Ok(())
}

pub(crate) fn describe_digests(digests: &[DeviceDigest], what: &str) -> String {
    let mut text = String::new();
    for d in digests {
        let _ = write!(
            text,
            "  digest of device {} ({}) {what}: {:#018x}",
            d.device, d.name, d.reading.digest
        );
        if d.reading.generation_before != d.reading.generation_after {
            let _ = write!(text, " (changed while read: the device is running)");
        }
        let _ = writeln!(text);
    }
    text
}

/// The outcome of comparing a pair's digests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
enum Verdict {
    /// Equal, and neither device changed its state around the reads.
    Verified,
    /// Different: the destination's state is not the source's.
    Mismatch,
    /// The destination changed its state since it resumed (its dirty rate is not 0), or
    /// the source changed while read: the digests cannot be compared.
    Unverifiable,
}

/// Source and destination digests of one pair of membufs.
#[derive(Debug, serde::Serialize)]
struct DigestCheck {
    device: u16,
    source: String,
    destination: String,
    source_digest: DigestReading,
    destination_digest: DigestReading,
    verdict: Verdict,
}

fn verdict(source: &DigestReading, destination: &DigestReading) -> Verdict {
    if source.generation_before != source.generation_after || !destination.untouched_since_resume()
    {
        Verdict::Unverifiable
    } else if source.digest == destination.digest {
        Verdict::Verified
    } else {
        Verdict::Mismatch
    }
}

/// The summary of a local migration, as JSON.
#[derive(serde::Serialize)]
struct LocalOutput<'a> {
    #[serde(flatten)]
    summary: &'a LocalSummary,
    digests: &'a [DigestCheck],
    data_path: LocalDataPath,
}

/// How the data travelled on each side of a local migration.
#[derive(serde::Serialize)]
struct LocalDataPath {
    source: DataPathTotals,
    destination: DataPathTotals,
}

/// The source engine's buffer memory: an arena shared with the servers of `devices` that
/// offer it, sized for the source's buffer pools.
pub(crate) fn source_buffers<'a>(
    devices: impl IntoIterator<Item = &'a OpenDevice>,
    source_devices: usize,
    path: DataPathArg,
) -> anyhow::Result<Option<std::sync::Arc<dyn vfio_mig_orchestrator::BufferMemory>>> {
    let defaults = SourceOptions::default();
    data_path::attach(
        &data_path::clients_of(devices),
        source_devices * defaults.buffers_per_device,
        defaults.chunk_size as usize,
        path.data_path,
    )
}

/// The summary of a migration to a receiver, as JSON.
#[derive(serde::Serialize)]
struct RemoteOutput<'a> {
    #[serde(flatten)]
    summary: &'a vfio_mig_orchestrator::SourceSummary,
    /// Digests of the membuf sources after the migration (frozen in STOP).
    source_digests: &'a [DeviceDigest],
    /// How the source devices' data travelled.
    data_path: DataPathTotals,
}

/// Runs `migrate`.
pub fn run(args: MigrateArgs, _ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let output = Output::from_flag(args.json);
    match plan(&args)? {
        Plan::Local(pairs) => run_local(&args, &pairs, output, out),
        Plan::Remote { sources, to } => run_remote(&args, &sources, &to, output, out),
    }
}

fn run_local(
    args: &MigrateArgs,
    pairs: &[(DeviceAddress, DeviceAddress)],
    output: Output,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let sources: Vec<DeviceAddress> = pairs.iter().map(|(s, _)| s.clone()).collect();
    let dests: Vec<DeviceAddress> = pairs.iter().map(|(_, d)| d.clone()).collect();
    let sources = open_all(&sources)?;
    let dests = open_all(&dests)?;
    let membuf_pairs: Vec<bool> = sources
        .iter()
        .zip(&dests)
        .map(|(s, d)| s.is_membuf() && d.is_membuf())
        .collect();
    let src_named: Vec<NamedDevice> = sources.iter().map(OpenDevice::named).collect();
    let dst_named: Vec<NamedDevice> = dests.iter().map(OpenDevice::named).collect();
    // One arena for both sides: the destination takes its chunks in the source's buffers.
    let memory = source_buffers(sources.iter().chain(&dests), sources.len(), args.data_path)?;
    let result = run_engine(output, Side::Source, out, |sink| {
        let sopts = SourceOptions {
            buffer_memory: memory,
            ..source_options(&args.tuning, args.allow_non_p2p, sink.clone())
        };
        // migrate_local ignores the destination's buffer memory: the source's buffers cross.
        let dopts = destination_options(args.allow_non_p2p, sink, None);
        migrate_local(&src_named, &dst_named, &sopts, &dopts)
    })?;
    let summary = result.map_err(|e| migration_failed(e, output, out))?;

    let mut checks = Vec::new();
    for (i, ((s, d), membuf)) in sources.iter().zip(&dests).zip(membuf_pairs).enumerate() {
        if !membuf {
            continue;
        }
        let source_digest = s.digest().context("reading the source digest failed")?;
        let destination_digest = d
            .digest()
            .context("reading the destination digest failed")?;
        checks.push(DigestCheck {
            device: i as u16,
            source: s.address.to_string(),
            destination: d.address.to_string(),
            verdict: verdict(&source_digest, &destination_digest),
            source_digest,
            destination_digest,
        });
    }

    if output == Output::Json {
        tagged_json_line(
            out,
            "summary",
            &LocalOutput {
                summary: &summary,
                digests: &checks,
                data_path: LocalDataPath {
                    source: DataPathTotals::of(&sources),
                    destination: DataPathTotals::of(&dests),
                },
            },
        )?;
    } else {
        let names: Vec<String> = dests.iter().map(|d| d.address.to_string()).collect();
        let mut text = format!(
            "migrated {} device(s) in {}\n",
            pairs.len(),
            duration(summary.source.total)
        );
        text.push_str(&describe_source(&summary.source, Some(&names)));
        let _ = writeln!(
            text,
            "  destination: validated {} and running {} after the end of the stream",
            duration(summary.destination.validation),
            duration(summary.destination.resume)
        );
        for w in &summary.destination.warnings {
            let _ = writeln!(text, "  warning: destination: {w}");
        }
        text.push_str(&DataPathTotals::of(&sources).describe("source"));
        text.push_str(&DataPathTotals::of(&dests).describe("destination"));
        for c in &checks {
            let _ = write!(
                text,
                "  digest of device {}: source {:#018x} (stopped), destination {:#018x}: ",
                c.device, c.source_digest.digest, c.destination_digest.digest
            );
            let _ = writeln!(
                text,
                "{}",
                match c.verdict {
                    Verdict::Verified => "verified".to_owned(),
                    Verdict::Mismatch => "MISMATCH".to_owned(),
                    Verdict::Unverifiable => format!(
                        "not verifiable (the destination changed its state since it resumed: \
                         generation {})",
                        c.destination_digest.generation_after
                    ),
                }
            );
        }
        out.write_all(text.as_bytes())?;
    }
    let mismatched: Vec<String> = checks
        .iter()
        .filter(|c| c.verdict == Verdict::Mismatch)
        .map(|c| {
            format!(
                "{} {:#018x} != {} {:#018x}",
                c.source, c.source_digest.digest, c.destination, c.destination_digest.digest
            )
        })
        .collect();
    if !mismatched.is_empty() {
        anyhow::bail!(
            "the destination state differs from the source's: {}",
            mismatched.join("; ")
        );
    }
    Ok(())
}

fn run_remote(
    args: &MigrateArgs,
    sources: &[DeviceAddress],
    to: &RemoteAddress,
    output: Output,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let sources = open_all(sources)?;
    let membuf: Vec<bool> = sources.iter().map(OpenDevice::is_membuf).collect();
    let named: Vec<NamedDevice> = sources.iter().map(OpenDevice::named).collect();
    let transport = Transport::connect(&to.0).with_context(|| format!("cannot connect to {to}"))?;
    let memory = source_buffers(&sources, sources.len(), args.data_path)?;
    let result = run_engine(output, Side::Source, out, |sink| {
        let opts = SourceOptions {
            buffer_memory: memory,
            ..source_options(&args.tuning, args.allow_non_p2p, sink)
        };
        migrate_out(&named, transport, &opts)
    })?;
    let summary = result.map_err(|e| migration_failed(e, output, out))?;
    let membuf_sources: Vec<OpenDevice> = sources
        .iter()
        .zip(&membuf)
        .filter(|(_, m)| **m)
        .map(|(s, _)| s.clone())
        .collect();
    let mut digests = membuf_digests(&membuf_sources)?;
    // Indices in the stream, not among the membufs.
    for (d, index) in digests.iter_mut().zip(
        membuf
            .iter()
            .enumerate()
            .filter(|(_, m)| **m)
            .map(|(i, _)| i as u16),
    ) {
        d.device = index;
    }
    if output == Output::Json {
        tagged_json_line(
            out,
            "summary",
            &RemoteOutput {
                summary: &summary,
                source_digests: &digests,
                data_path: DataPathTotals::of(&sources),
            },
        )?;
    } else {
        let mut text = format!(
            "migrated {} device(s) to {to} in {}\n",
            sources.len(),
            duration(summary.total)
        );
        text.push_str(&describe_source(&summary, None));
        text.push_str(&DataPathTotals::of(&sources).describe("source"));
        text.push_str(&describe_digests(
            &digests,
            "after stop (compare with the destination's from `vfio-mig receive`)",
        ));
        out.write_all(text.as_bytes())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::Cli;
    use crate::exit::Exit;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<MigrateArgs, clap::Error> {
        let argv = ["vfio-mig", "migrate"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            crate::commands::Command::Migrate(a) => Ok(a),
            other => panic!("not migrate: {other:?}"),
        }
    }

    fn dev(s: &str) -> DeviceAddress {
        s.parse().unwrap()
    }

    #[test]
    fn options_default_as_documented_and_map_to_the_engine() {
        let a = parse(&["vfio-user:/a", "vfio-user:/b"]).unwrap();
        assert_eq!(a.tuning.downtime_limit, 300);
        assert_eq!(a.tuning.max_rounds, 30);
        assert_eq!(a.tuning.on_no_convergence, OnNoConvergence::Switch);
        assert!(!a.tuning.no_precopy && !a.allow_non_p2p && !a.json);
        let a = parse(&[
            "vfio-user:/a",
            "vfio-user:/b",
            "--downtime-limit",
            "50",
            "--max-rounds",
            "3",
            "--on-no-convergence",
            "abort",
            "--no-precopy",
            "--allow-non-p2p",
        ])
        .unwrap();
        let sink: EventSink = std::sync::Arc::new(|_| {});
        let o = source_options(&a.tuning, a.allow_non_p2p, sink);
        assert_eq!(o.downtime_limit, Duration::from_millis(50));
        assert_eq!(o.max_precopy_rounds, 3);
        assert_eq!(o.on_no_convergence, NonConvergence::Abort);
        assert!(!o.precopy && o.allow_non_p2p && o.events.is_some());
        assert_eq!(
            parse(&["vfio-user:/a", "vfio-user:/b", "--max-rounds", "0"])
                .unwrap_err()
                .exit_code(),
            2
        );
        assert_eq!(
            parse(&[
                "vfio-user:/a",
                "vfio-user:/b",
                "--on-no-convergence",
                "wait"
            ])
            .unwrap_err()
            .exit_code(),
            2
        );
    }

    #[test]
    fn plans_local_pairs_and_remote_targets() {
        let a = parse(&["vfio-user:/a", "vfio-user:/b"]).unwrap();
        assert_eq!(
            plan(&a).unwrap(),
            Plan::Local(vec![(dev("vfio-user:/a"), dev("vfio-user:/b"))])
        );
        let a = parse(&[
            "--pair",
            "vfio-user:/a=vfio-user:/b",
            "--pair",
            "vfio-user:/c=vfio-user:/d",
        ])
        .unwrap();
        assert_eq!(
            plan(&a).unwrap(),
            Plan::Local(vec![
                (dev("vfio-user:/a"), dev("vfio-user:/b")),
                (dev("vfio-user:/c"), dev("vfio-user:/d")),
            ])
        );
        let a = parse(&["vfio-user:/a", "vfio-user:/c", "tcp:127.0.0.1:4444"]).unwrap();
        assert_eq!(
            plan(&a).unwrap(),
            Plan::Remote {
                sources: vec![dev("vfio-user:/a"), dev("vfio-user:/c")],
                to: "tcp:127.0.0.1:4444".parse().unwrap(),
            }
        );
        let a = parse(&[
            "--pair",
            "vfio-user:/a=tcp:h:1",
            "--pair",
            "vfio-user:/c=tcp:h:1",
        ])
        .unwrap();
        assert!(matches!(plan(&a).unwrap(), Plan::Remote { .. }));
    }

    #[test]
    fn contradictory_plans_are_usage_errors() {
        for argv in [
            &[][..],
            &["vfio-user:/a"],
            &["vfio-user:/a", "vfio-user:/b", "vfio-user:/c"],
            &["vfio-user:/a", "file:/tmp/x"],
            &["file:/tmp/x", "tcp:h:1"],
            &["vfio-user:/a", "vfio-user:/a"],
            &[
                "vfio-user:/a",
                "vfio-user:/b",
                "--pair",
                "vfio-user:/c=vfio-user:/d",
            ],
            &[
                "--pair",
                "vfio-user:/a=vfio-user:/b",
                "--pair",
                "vfio-user:/c=tcp:h:1",
            ],
            &[
                "--pair",
                "vfio-user:/a=tcp:h:1",
                "--pair",
                "vfio-user:/c=tcp:h:2",
            ],
            &[
                "--pair",
                "vfio-user:/a=vfio-user:/b",
                "--pair",
                "vfio-user:/b=vfio-user:/c",
            ],
        ] {
            let a = parse(argv).unwrap();
            let err = plan(&a).unwrap_err();
            assert_eq!(Exit::of(&err), Exit::Usage, "{argv:?}: {err}");
        }
    }

    #[test]
    fn malformed_addresses_and_pairs_are_rejected_by_the_parser() {
        for argv in [
            &["vfio-usr:/a", "vfio-user:/b"][..],
            &["vfio-user:/a", "vfio:0000:01:00"],
            &["--pair", "vfio-user:/a"],
            &["--pair", "vfio-user:/a=file:/x"],
            &["--pair", "tcp:h:1=vfio-user:/b"],
        ] {
            let err = parse(argv).unwrap_err();
            assert_eq!(err.exit_code(), 2, "{argv:?}");
        }
    }

    #[test]
    fn pairs_split_where_both_sides_parse() {
        let p: Pair = "vfio-user:/tmp/a=b.sock=vfio-user:/tmp/c".parse().unwrap();
        assert_eq!(p.source, dev("vfio-user:/tmp/a=b.sock"));
        assert_eq!(p.destination, Destination::Device(dev("vfio-user:/tmp/c")));
        let err = "vfio-user:/a".parse::<Pair>().unwrap_err().to_string();
        assert!(err.contains("SRC=DST"), "{err}");
    }

    #[test]
    fn verdicts() {
        let r = |digest, before, after| DigestReading {
            digest,
            generation_before: before,
            generation_after: after,
        };
        assert_eq!(verdict(&r(7, 90, 90), &r(7, 0, 0)), Verdict::Verified);
        assert_eq!(verdict(&r(7, 90, 90), &r(8, 0, 0)), Verdict::Mismatch);
        assert_eq!(verdict(&r(7, 90, 90), &r(8, 0, 4)), Verdict::Unverifiable);
        assert_eq!(verdict(&r(7, 90, 90), &r(8, 3, 4)), Verdict::Unverifiable);
        assert_eq!(verdict(&r(7, 90, 91), &r(7, 0, 0)), Verdict::Unverifiable);
    }
}
