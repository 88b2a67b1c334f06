//! `vfio-mig demo`: the project's main job on the embedded default.
//!
//! Two `membuf` devices (different seeds, so different contents) are each hosted by a
//! vfio-user server on a UNIX socket in a temporary directory, served by threads of this
//! process. The migration reaches both only as vfio-user clients, so every byte crosses the
//! protocol. The source keeps rewriting its state at the dirty rate while precopy runs; the
//! destination is built with dirty rate 0 (a register, not migrated state), so once it runs
//! its state stays what it resumed with and its digest can be read at leisure. The proof is
//! that the destination's digest register equals the digest of the stopped source's state,
//! which differed from the destination's before.
//!
//! Progress goes to stderr (one line per precopy round and stage; a live byte counter only
//! on a terminal); the summary goes to stdout. With `--json`, stdout carries the engines'
//! events and a final `summary` object, one JSON object per line, and stderr stays quiet.

use std::fmt;
use std::io::{self, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _};
use clap::Args;
use serde::Serialize;
use vfio_mig_device::{DeviceState, MigrationDevice};
use vfio_mig_devices::membuf::{self, MembufConfig, MAGIC, REG_DIGEST, REG_MAGIC, REG_SIZE};
use vfio_mig_devices::spec::DeviceSpec;
use vfio_mig_orchestrator::{
    migrate_local, DestinationOptions, Event, EventSink, LocalSummary, NamedDevice, SourceOptions,
    Stage,
};
use vfio_mig_uapi::MigrationFeatures;
use vfio_mig_vfio_user::client::{Client, RemoteDevice};

use crate::data_path::DataPathTotals;
use vfio_mig_vfio_user::server::{HostedDevice, Server, StopHandle};

use crate::app::Context;

/// Seed of the source device's initial contents.
pub const SOURCE_SEED: u64 = 1;
/// Seed of the destination device's initial contents (differs, so that equal digests after
/// the migration mean something).
pub const DESTINATION_SEED: u64 = 2;

/// Arguments of `vfio-mig demo`.
#[derive(Clone, Debug, Args)]
pub struct DemoArgs {
    /// State size of each device: a multiple of 4 KiB, with an optional K, M or G suffix
    /// (powers of 1024).
    #[arg(long, value_name = "SIZE", default_value = "256M", value_parser = parse_size)]
    pub size: u64,

    /// Bytes per second the source rewrites while it runs (K, M, G suffixes); 0 keeps it
    /// still.
    #[arg(long, value_name = "RATE", default_value = "32M", value_parser = parse_rate)]
    pub dirty_rate: u64,

    /// Migration features of both devices, comma-separated: stop-copy (always implied),
    /// p2p, pre-copy. Default: all.
    #[arg(long, value_name = "LIST", default_value_t = MigrationFeatures::ALL)]
    pub features: MigrationFeatures,

    /// Longest acceptable predicted downtime in milliseconds: precopy goes on until the
    /// remaining state can move within it.
    #[arg(long, value_name = "MS", default_value_t = 50)]
    pub downtime_limit: u64,

    /// How device data travels.
    #[command(flatten)]
    pub data_path: crate::data_path::DataPathArg,

    /// Print the engines' events and the summary as JSON, one object per line.
    #[arg(long)]
    pub json: bool,
}

/// `SIZE` as a membuf spec reads it, with the spec's own checks and messages.
fn parse_size(value: &str) -> Result<u64, String> {
    match format!("membuf:size={value}").parse::<DeviceSpec>() {
        Ok(DeviceSpec::Membuf(config)) => Ok(config.size),
        Ok(_) => Err("not a membuf size".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// `RATE` as a membuf spec reads it.
fn parse_rate(value: &str) -> Result<u64, String> {
    match format!("membuf:dirty-rate={value}").parse::<DeviceSpec>() {
        Ok(DeviceSpec::Membuf(config)) => Ok(config.dirty_rate),
        Ok(_) => Err("not a membuf dirty rate".into()),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs the demo; fails (exit 1) unless the migration succeeded and was verified.
pub fn run(args: DemoArgs, _ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let started = Instant::now();
    let mut progress = Progress::new(!args.json);
    let dir = tempfile::Builder::new()
        .prefix("vfio-mig-demo-")
        .tempdir()
        .context("creating a directory for the vfio-user sockets")?;

    let config = |seed, dirty_rate| MembufConfig {
        size: args.size,
        dirty_rate,
        features: args.features,
        seed,
        ..MembufConfig::default()
    };
    progress.line(format_args!(
        "creating two {} membuf devices (source seed {SOURCE_SEED}, destination seed \
         {DESTINATION_SEED})",
        Bytes(args.size)
    ));
    // Declared after `dir`, so dropped first: servers remove their sockets, then the
    // directory goes.
    let source_server = ServedMembuf::start(
        &dir.path().join("source.sock"),
        config(SOURCE_SEED, args.dirty_rate),
    )
    .context("starting the source device")?;
    let destination_server = ServedMembuf::start(
        &dir.path().join("destination.sock"),
        config(DESTINATION_SEED, 0),
    )
    .context("starting the destination device")?;

    let source = Endpoint::connect(&source_server.path).context("connecting to the source")?;
    let destination =
        Endpoint::connect(&destination_server.path).context("connecting to the destination")?;
    for end in [&source, &destination] {
        end.check_membuf(args.size)?;
    }
    let destination_digest_before = destination.register(REG_DIGEST)?;
    progress.line(format_args!(
        "source {} and destination {} connected over vfio-user; destination digest {}",
        source.address,
        destination.address,
        Digest(destination_digest_before)
    ));

    let migration = migrate(&args, &source, &destination, out, &mut progress)?;

    let observation = Observation::read(&source, &destination, destination_digest_before)?;
    let verdict = verify(&observation);
    let report = DemoReport {
        event: "summary",
        verified: verdict.is_ok(),
        problems: verdict.clone().err().unwrap_or_default(),
        size: args.size,
        dirty_rate: args.dirty_rate,
        features: args.features,
        downtime_limit_ms: args.downtime_limit,
        source: Side {
            address: source.address.clone(),
            seed: SOURCE_SEED,
            state: observation.source_state,
            digest: Digest(observation.source_digest),
            digest_before: None,
        },
        destination: Side {
            address: destination.address.clone(),
            seed: DESTINATION_SEED,
            state: observation.destination_state,
            digest: Digest(observation.destination_digest),
            digest_before: Some(Digest(destination_digest_before)),
        },
        migration,
        data_path: DemoDataPath {
            source: DataPathTotals::of_clients(std::iter::once(source.client())),
            destination: DataPathTotals::of_clients(std::iter::once(destination.client())),
        },
        total_ms: started.elapsed().as_secs_f64() * 1000.0,
    };
    if args.json {
        serde_json::to_writer(&mut *out, &report)?;
        writeln!(out)?;
    } else {
        progress.clear();
        write!(out, "{}", report.text())?;
    }
    out.flush()?;

    drop(source);
    drop(destination);
    source_server.stop()?;
    destination_server.stop()?;
    drop(dir);

    match verdict {
        Ok(()) => Ok(()),
        Err(problems) => bail!("verification failed: {}", problems.join("; ")),
    }
}

/// Runs the migration on its own thread while this one reports its events.
fn migrate(
    args: &DemoArgs,
    source: &Endpoint,
    destination: &Endpoint,
    out: &mut dyn Write,
    progress: &mut Progress,
) -> anyhow::Result<LocalSummary> {
    let (tx, rx) = mpsc::channel::<Event>();
    let sink: EventSink = Arc::new(move |event: &Event| {
        // The receiver lives until the migration has returned; a send cannot fail earlier.
        let _ = tx.send(event.clone());
    });
    let clients = [
        (source.address.clone(), source.client()),
        (destination.address.clone(), destination.client()),
    ];
    let defaults = SourceOptions::default();
    let buffer_memory = crate::data_path::attach(
        &clients,
        defaults.buffers_per_device,
        defaults.chunk_size as usize,
        args.data_path.data_path,
    )?;
    let source_opts = SourceOptions {
        downtime_limit: Duration::from_millis(args.downtime_limit),
        shared_clock: true,
        buffer_memory,
        events: Some(Arc::clone(&sink)),
        ..SourceOptions::default()
    };
    let destination_opts = DestinationOptions {
        events: Some(sink),
        ..DestinationOptions::default()
    };
    let sources = [source.named()];
    let destinations = [destination.named()];
    progress.line(format_args!(
        "migrating with precopy while the source dirties {}/s (downtime limit {} ms)",
        Bytes(args.dirty_rate),
        args.downtime_limit
    ));
    let (result, written) = thread::scope(|s| {
        let engines = thread::Builder::new()
            .name("demo-migration".into())
            .spawn_scoped(s, move || {
                // The options (and the event sender in them) drop when the engines return.
                migrate_local(&sources, &destinations, &source_opts, &destination_opts)
                    .map_err(|e| e.report())
            })
            .expect("spawning a thread");
        // Report events until the engines have returned and every event is out; a failed
        // write to stdout is kept and returned after the migration has finished.
        let mut written: io::Result<()> = Ok(());
        loop {
            let event = match rx.recv_timeout(Duration::from_millis(50)) {
                Ok(event) => event,
                Err(RecvTimeoutError::Timeout) if !engines.is_finished() => continue,
                Err(RecvTimeoutError::Timeout) => match rx.try_recv() {
                    Ok(event) => event,
                    Err(_) => break,
                },
                Err(RecvTimeoutError::Disconnected) => break,
            };
            if args.json {
                if written.is_ok() {
                    written = write_json_line(out, &event);
                }
            } else {
                progress.event(&event);
            }
        }
        let result = engines
            .join()
            .unwrap_or_else(|_| Err("the migration thread panicked".to_owned()));
        (result, written)
    });
    progress.clear();
    written?;
    result.map_err(|e| anyhow!("the demo migration failed: {e}"))
}

fn write_json_line(out: &mut dyn Write, event: &Event) -> io::Result<()> {
    serde_json::to_writer(&mut *out, event)?;
    writeln!(out)
}

/// A membuf hosted by a vfio-user server on a thread of this process.
struct ServedMembuf {
    path: PathBuf,
    stop: StopHandle,
    thread: JoinHandle<Result<(), vfio_mig_vfio_user::server::ServeError>>,
}

impl ServedMembuf {
    fn start(path: &Path, config: MembufConfig) -> anyhow::Result<ServedMembuf> {
        let dma_logging = config.dma_logging;
        let device = membuf::create(config).context("creating the membuf device")?;
        let hosted = HostedDevice::new(device.migration(), device.regions())
            .with_dma(device.dma().clone(), dma_logging);
        let mut server = Server::bind(path, hosted)
            .with_context(|| format!("serving vfio-user:{}", path.display()))?;
        let stop = server.stop_handle();
        let thread = thread::Builder::new()
            .name("demo-vfio-user-server".into())
            .spawn(move || server.serve_forever())
            .context("starting a server thread")?;
        Ok(ServedMembuf {
            path: path.to_owned(),
            stop,
            thread,
        })
    }

    /// Stops the server and reports how it ended.
    fn stop(self) -> anyhow::Result<()> {
        self.stop.stop();
        match self.thread.join() {
            Ok(served) => served
                .with_context(|| format!("the vfio-user server at {} failed", self.path.display())),
            Err(_) => bail!("the vfio-user server at {} panicked", self.path.display()),
        }
    }
}

/// One side as the migration sees it: a vfio-user client of a served device.
struct Endpoint {
    address: String,
    device: Arc<RemoteDevice>,
}

impl Endpoint {
    fn connect(path: &Path) -> anyhow::Result<Endpoint> {
        let address = format!("vfio-user:{}", path.display());
        let device =
            RemoteDevice::connect(path).with_context(|| format!("connecting to {address}"))?;
        Ok(Endpoint {
            address,
            device: Arc::new(device),
        })
    }

    fn named(&self) -> NamedDevice {
        NamedDevice::new(
            self.address.clone(),
            Arc::clone(&self.device) as Arc<dyn MigrationDevice>,
        )
    }

    fn client(&self) -> &Client {
        self.device.client()
    }

    /// A 64-bit membuf register read over vfio-user REGION_READ.
    fn register(&self, offset: u64) -> anyhow::Result<u64> {
        let mut bytes = [0u8; 8];
        self.client()
            .region_read(membuf::BAR0_INDEX, offset, &mut bytes)
            .with_context(|| format!("reading BAR0 register {offset:#x} of {}", self.address))?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// The device is a membuf of `size` bytes (its magic and size registers say so).
    fn check_membuf(&self, size: u64) -> anyhow::Result<()> {
        let magic = self.register(REG_MAGIC)?.to_le_bytes();
        if magic != MAGIC {
            bail!("{} is not a membuf (BAR0 magic {magic:02x?})", self.address);
        }
        let reported = self.register(REG_SIZE)?;
        if reported != size {
            bail!(
                "{} reports a state of {reported} bytes, not {size}",
                self.address
            );
        }
        Ok(())
    }

    fn state(&self) -> anyhow::Result<DeviceState> {
        self.device
            .state()
            .with_context(|| format!("reading the migration state of {}", self.address))
    }
}

/// What the devices say after the migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Observation {
    /// The source's migration state.
    pub source_state: DeviceState,
    /// The source's digest register.
    pub source_digest: u64,
    /// The source's digest register read again after the destination's: equal when the
    /// source's state is frozen.
    pub source_digest_again: u64,
    /// The destination's migration state.
    pub destination_state: DeviceState,
    /// The destination's digest register.
    pub destination_digest: u64,
    /// The destination's digest register before the migration.
    pub destination_digest_before: u64,
}

impl Observation {
    fn read(
        source: &Endpoint,
        destination: &Endpoint,
        destination_digest_before: u64,
    ) -> anyhow::Result<Observation> {
        let source_state = source.state()?;
        let source_digest = source.register(REG_DIGEST)?;
        let destination_state = destination.state()?;
        let destination_digest = destination.register(REG_DIGEST)?;
        let source_digest_again = source.register(REG_DIGEST)?;
        Ok(Observation {
            source_state,
            source_digest,
            source_digest_again,
            destination_state,
            destination_digest,
            destination_digest_before,
        })
    }
}

/// Whether the observation proves the migration: the source is stopped with a state that
/// no longer changes, the destination runs, its digest equals the source's, and it was
/// different before (else equality would prove nothing). `Err` lists every problem.
pub fn verify(o: &Observation) -> Result<(), Vec<String>> {
    let mut problems = Vec::new();
    if o.source_state != DeviceState::Stop {
        problems.push(format!("the source is {}, not stopped", o.source_state));
    }
    if o.source_digest != o.source_digest_again {
        problems.push(format!(
            "the source's state still changes (digest {} then {})",
            Digest(o.source_digest),
            Digest(o.source_digest_again)
        ));
    }
    if o.destination_state != DeviceState::Running {
        problems.push(format!(
            "the destination is {}, not running",
            o.destination_state
        ));
    }
    if o.destination_digest != o.source_digest {
        problems.push(format!(
            "the destination's digest {} differs from the source's {}",
            Digest(o.destination_digest),
            Digest(o.source_digest)
        ));
    }
    if o.destination_digest_before == o.source_digest {
        problems.push(format!(
            "the destination already had the source's digest {} before the migration",
            Digest(o.source_digest)
        ));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// One device in the summary.
#[derive(Debug, Serialize)]
struct Side {
    address: String,
    seed: u64,
    state: DeviceState,
    digest: Digest,
    #[serde(skip_serializing_if = "Option::is_none")]
    digest_before: Option<Digest>,
}

/// The final `summary` object.
#[derive(Debug, Serialize)]
struct DemoReport {
    event: &'static str,
    verified: bool,
    problems: Vec<String>,
    size: u64,
    dirty_rate: u64,
    features: MigrationFeatures,
    downtime_limit_ms: u64,
    source: Side,
    destination: Side,
    migration: LocalSummary,
    data_path: DemoDataPath,
    total_ms: f64,
}

/// How the data travelled on each side.
#[derive(Debug, Serialize)]
struct DemoDataPath {
    source: DataPathTotals,
    destination: DataPathTotals,
}

impl DemoReport {
    fn text(&self) -> String {
        let src = &self.migration.source;
        let pre_copy: u64 = src.devices.iter().map(|d| d.pre_copy.bytes).sum();
        let stop_copy: u64 = src.devices.iter().map(|d| d.stop_copy.bytes).sum();
        let seconds = src.total.as_secs_f64();
        let mut t = String::new();
        let mut row = |label: &str, value: String| {
            t.push_str(&format!("  {label:<20}{value}\n"));
        };
        row(
            "devices",
            format!(
                "2 x membuf, {} each, features {}",
                Bytes(self.size),
                self.features
            ),
        );
        row(
            "source",
            format!(
                "{} (seed {}, dirtying {}/s)",
                self.source.address,
                self.source.seed,
                Bytes(self.dirty_rate)
            ),
        );
        row(
            "destination",
            format!(
                "{} (seed {}, held still)",
                self.destination.address, self.destination.seed
            ),
        );
        row(
            "precopy",
            format!(
                "{} in {} round{} ({}, {:.1} ms)",
                Bytes(pre_copy),
                src.precopy_rounds,
                if src.precopy_rounds == 1 { "" } else { "s" },
                serde_json::to_value(src.switchover)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default(),
                src.precopy.as_secs_f64() * 1000.0
            ),
        );
        row(
            "stop-copy",
            format!(
                "{} ({:.1} ms)",
                Bytes(stop_copy),
                src.stop_copy.as_secs_f64() * 1000.0
            ),
        );
        row(
            "stream",
            format!(
                "{} in {:.3} s: {:.1} MiB/s",
                Bytes(src.stream_bytes),
                seconds,
                src.throughput_bps / f64::from(1u32 << 20)
            ),
        );
        row(
            "downtime",
            match src.downtime {
                Some(d) => format!(
                    "{:.2} ms (limit {} ms)",
                    d.duration.as_secs_f64() * 1000.0,
                    self.downtime_limit_ms
                ),
                None => "not measured".into(),
            },
        );
        row(
            "data path",
            format!(
                "{} through shared memory, {} in messages (source and destination)",
                Bytes(self.data_path.source.shared_bytes + self.data_path.destination.shared_bytes),
                Bytes(
                    self.data_path.source.message_bytes + self.data_path.destination.message_bytes
                )
            ),
        );
        row("total time", format!("{:.2} s", self.total_ms / 1000.0));
        row(
            "source digest",
            format!("{} ({})", self.source.digest, self.source.state),
        );
        row(
            "destination digest",
            format!(
                "{} ({}; {} before)",
                self.destination.digest,
                self.destination.state,
                self.destination
                    .digest_before
                    .map(|d| d.to_string())
                    .unwrap_or_default()
            ),
        );
        if self.verified {
            t.push_str(
                "verified: the destination runs exactly the state the source stopped with\n",
            );
        } else {
            t.push_str("NOT verified:\n");
            for p in &self.problems {
                t.push_str(&format!("  {p}\n"));
            }
        }
        t
    }
}

/// A digest as 16 hex digits (a JSON string: 64-bit numbers do not survive every parser).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Digest(u64);

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#018x}", self.0)
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A byte count for people: `256 MiB`, `1.5 GiB`, `4 KiB`, `812 B`.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
        if self.0 < 1024 {
            return write!(f, "{} B", self.0);
        }
        let mut value = self.0 as f64;
        let mut unit = "B";
        for u in UNITS {
            if value < 1024.0 {
                break;
            }
            value /= 1024.0;
            unit = u;
        }
        if value.fract() == 0.0 {
            write!(f, "{value:.0} {unit}")
        } else {
            write!(f, "{value:.1} {unit}")
        }
    }
}

/// Progress lines on stderr; a live byte counter only when stderr is a terminal.
struct Progress {
    enabled: bool,
    terminal: bool,
    /// A counter line is on screen and must be cleared before the next line.
    counter_shown: bool,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            terminal: io::stderr().is_terminal(),
            counter_shown: false,
        }
    }

    fn line(&mut self, args: fmt::Arguments<'_>) {
        if !self.enabled {
            return;
        }
        self.clear();
        let _ = writeln!(io::stderr().lock(), "demo: {args}");
    }

    fn clear(&mut self) {
        if self.counter_shown {
            let _ = write!(io::stderr().lock(), "\r\x1b[K");
            self.counter_shown = false;
        }
    }

    fn event(&mut self, event: &Event) {
        match event {
            Event::PrecopyRound {
                round,
                bytes,
                initial_bytes,
                dirty_bytes,
                predicted_downtime_ms,
                ..
            } => self.line(format_args!(
                "precopy round {round}: {} read, {} initial and {} dirty left, predicted \
                 downtime {}",
                Bytes(*bytes),
                Bytes(*initial_bytes),
                Bytes(*dirty_bytes),
                predicted_downtime_ms.map_or("unknown".to_owned(), |ms| format!("{ms:.1} ms"))
            )),
            Event::Switchover { reason, rounds } => self.line(format_args!(
                "switchover after {rounds} precopy round(s) ({})",
                serde_json::to_value(reason)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_owned))
                    .unwrap_or_default()
            )),
            Event::Stage {
                side,
                stage,
                elapsed_ms,
            } if matches!(
                stage,
                Stage::Precopy | Stage::StopCopy | Stage::Resume | Stage::Done
            ) =>
            {
                self.line(format_args!("{side}: {stage} at {elapsed_ms:.1} ms"))
            }
            Event::Warning { side, message } => {
                self.line(format_args!("warning from the {side}: {message}"))
            }
            Event::Progress {
                side: vfio_mig_orchestrator::Side::Source,
                stage,
                bytes,
                rate_bps,
                ..
            } if self.enabled && self.terminal => {
                let _ = write!(
                    io::stderr().lock(),
                    "\r\x1b[Kdemo: {stage}: {} sent, {}/s",
                    Bytes(*bytes),
                    Bytes(*rate_bps as u64)
                );
                self.counter_shown = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn good() -> Observation {
        Observation {
            source_state: DeviceState::Stop,
            source_digest: 0xfeed,
            source_digest_again: 0xfeed,
            destination_state: DeviceState::Running,
            destination_digest: 0xfeed,
            destination_digest_before: 0xbeef,
        }
    }

    #[test]
    fn verified_when_digests_match_and_states_are_right() {
        assert_eq!(verify(&good()), Ok(()));
    }

    #[test]
    fn mismatched_digests_fail() {
        let o = Observation {
            destination_digest: 0xfeee,
            ..good()
        };
        let problems = verify(&o).unwrap_err();
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("differs"), "{problems:?}");
        assert!(problems[0].contains("0x000000000000feee"), "{problems:?}");
    }

    #[test]
    fn a_changing_or_running_source_fails() {
        let o = Observation {
            source_state: DeviceState::Running,
            source_digest_again: 0x1,
            ..good()
        };
        let problems = verify(&o).unwrap_err();
        assert_eq!(problems.len(), 2, "{problems:?}");
        assert!(problems[0].contains("not stopped"));
        assert!(problems[1].contains("still changes"));
    }

    #[test]
    fn a_destination_not_running_fails() {
        let o = Observation {
            destination_state: DeviceState::Stop,
            ..good()
        };
        assert!(verify(&o).unwrap_err()[0].contains("not running"));
    }

    #[test]
    fn equality_that_held_before_proves_nothing() {
        let o = Observation {
            destination_digest_before: 0xfeed,
            ..good()
        };
        assert!(verify(&o).unwrap_err()[0].contains("before the migration"));
    }

    #[test]
    fn sizes_and_rates_parse_like_device_specs() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("1G"), Ok(1 << 30));
        assert!(parse_size("1000").unwrap_err().contains("4 KiB"));
        assert!(parse_size("lots").is_err());
        assert_eq!(parse_rate("32M"), Ok(32 << 20));
        assert_eq!(parse_rate("0"), Ok(0));
    }

    #[test]
    fn bytes_print_with_binary_units() {
        assert_eq!(Bytes(812).to_string(), "812 B");
        assert_eq!(Bytes(4096).to_string(), "4 KiB");
        assert_eq!(Bytes(256 << 20).to_string(), "256 MiB");
        assert_eq!(Bytes(3 << 29).to_string(), "1.5 GiB");
    }

    #[test]
    fn digests_print_as_16_hex_digits() {
        assert_eq!(Digest(0xab).to_string(), "0x00000000000000ab");
        assert_eq!(
            serde_json::to_string(&Digest(u64::MAX)).unwrap(),
            "\"0xffffffffffffffff\""
        );
    }
}
