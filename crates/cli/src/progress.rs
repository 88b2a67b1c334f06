//! Showing migrations: the engine's events as JSON lines or as a progress bar while it runs,
//! and the summaries afterwards (human text or one JSON object).
//!
//! The engines call their [`EventSink`] from their own threads; [`run_engine`] runs the
//! engine on a thread of its own and presents every event on the calling thread, so that
//! output goes to the command's writer in order.
//!
//! Units in human output: sizes in powers of 1024 (KiB, MiB, GiB), throughput in MB/s
//! (10^6 bytes per second), times in ms or s.

use std::fmt::Write as _;
use std::io::{self, IsTerminal, Write};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use vfio_mig_orchestrator::{
    DestinationSummary, DeviceReport, DowntimeClock, Event, EventSink, Side, SourceSummary, Stage,
    SwitchoverReason,
};

/// How a command shows its results.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Output {
    /// Text for people; a progress bar on stderr when it is a terminal.
    Human,
    /// One JSON object per line on stdout: every event, then the summary.
    Json,
}

impl Output {
    /// `--json` or not.
    pub fn from_flag(json: bool) -> Output {
        if json {
            Output::Json
        } else {
            Output::Human
        }
    }
}

/// Runs `work` (an engine) on its own thread with an event sink, presenting each event on
/// this thread as it arrives: as a JSON line on `out` ([`Output::Json`]) or on a progress
/// bar following `follow`'s engine ([`Output::Human`], only when stderr is a terminal).
///
/// The engine runs to its end even if `out` fails (a closed pipe); the first write error
/// is returned after it.
pub fn run_engine<T: Send>(
    output: Output,
    follow: Side,
    out: &mut dyn Write,
    work: impl FnOnce(EventSink) -> T + Send,
) -> io::Result<T> {
    let (tx, rx) = mpsc::channel::<Event>();
    let sink: EventSink = Arc::new(move |event: &Event| {
        // The receiver lives until the engine thread has ended.
        let _ = tx.send(event.clone());
    });
    let mut bar = Bar::new(
        output == Output::Human && io::stderr().is_terminal(),
        follow,
    );
    let mut write_error = None;
    let mut present = |event: Event, bar: &mut Bar| match output {
        Output::Json => {
            if write_error.is_none() {
                if let Err(e) = json_line(out, &event) {
                    write_error = Some(e);
                }
            }
        }
        Output::Human => bar.update(&event),
    };
    let result = thread::scope(|s| {
        let engine = thread::Builder::new()
            .name("mig-engine".into())
            .spawn_scoped(s, move || work(sink))?;
        // Senders may outlive the engine call in threads it left behind, so the loop ends
        // on the engine thread's end rather than on the channel's.
        while !engine.is_finished() {
            if let Ok(event) = rx.recv_timeout(Duration::from_millis(50)) {
                present(event, &mut bar);
            }
        }
        let result = match engine.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        };
        while let Ok(event) = rx.try_recv() {
            present(event, &mut bar);
        }
        Ok::<T, io::Error>(result)
    })?;
    bar.finish();
    match write_error {
        Some(e) => Err(e),
        None => Ok(result),
    }
}

/// Writes `value` as one JSON line and flushes (readers act on each line as it comes).
pub fn json_line<T: Serialize + ?Sized>(out: &mut dyn Write, value: &T) -> io::Result<()> {
    let text = serde_json::to_string(value).map_err(io::Error::other)?;
    writeln!(out, "{text}")?;
    out.flush()
}

/// Writes `{"event":"<tag>", ...fields of value}` as one line: `value` must serialize as a
/// JSON object.
pub fn tagged_json_line<T: Serialize + ?Sized>(
    out: &mut dyn Write,
    tag: &str,
    value: &T,
) -> io::Result<()> {
    let line = tagged_json(tag, value)?;
    writeln!(out, "{line}")?;
    out.flush()
}

/// `value` as a JSON object with `"event": tag` first.
pub fn tagged_json<T: Serialize + ?Sized>(tag: &str, value: &T) -> io::Result<String> {
    let body = serde_json::to_string(value).map_err(io::Error::other)?;
    let tag = serde_json::to_string(tag).map_err(io::Error::other)?;
    let Some(fields) = body.strip_prefix('{') else {
        return Err(io::Error::other("summary is not a JSON object"));
    };
    Ok(if fields == "}" {
        format!("{{\"event\":{tag}}}")
    } else {
        format!("{{\"event\":{tag},{fields}")
    })
}

/// The live view of one engine: stage, bytes and rate, precopy round.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct LiveState {
    /// The stage the followed engine is in.
    pub stage: Option<Stage>,
    /// Stream bytes moved so far.
    pub bytes: u64,
    /// The engine's last measured rate, bytes per second.
    pub rate_bps: f64,
    /// The last precopy round and its predicted downtime.
    pub round: Option<(u32, Option<f64>)>,
}

impl LiveState {
    /// Takes in one event of the engine on `follow`'s side; returns a warning to print, if
    /// the event is one (from either side).
    pub fn update(&mut self, follow: Side, event: &Event) -> Option<String> {
        match event {
            Event::Stage { side, stage, .. } if *side == follow => self.stage = Some(*stage),
            Event::Progress {
                side,
                stage,
                bytes,
                rate_bps,
                ..
            } if *side == follow => {
                self.stage = Some(*stage);
                self.bytes = *bytes;
                self.rate_bps = *rate_bps;
            }
            Event::PrecopyRound {
                round,
                predicted_downtime_ms,
                ..
            } => self.round = Some((*round, *predicted_downtime_ms)),
            Event::Warning { side, message } => return Some(format!("{side}: {message}")),
            _ => {}
        }
        None
    }

    /// The bar's message: stage, rate, precopy round.
    pub fn message(&self) -> String {
        let mut msg = match self.stage {
            Some(s) => s.to_string(),
            None => "starting".to_owned(),
        };
        // A rate only means something while state data flows.
        let moving = matches!(
            self.stage,
            Some(Stage::Precopy | Stage::StopCopy | Stage::Receiving)
        );
        if moving && self.rate_bps > 0.0 {
            let _ = write!(msg, "  {}", rate(self.rate_bps));
        }
        if let (Some(Stage::Precopy), Some((round, predicted))) = (self.stage, self.round) {
            let _ = write!(msg, "  round {round}");
            if let Some(ms) = predicted {
                let _ = write!(msg, ", predicted downtime {ms:.1} ms");
            }
        }
        msg
    }
}

/// A progress bar on stderr, or nothing.
struct Bar {
    bar: ProgressBar,
    follow: Side,
    state: LiveState,
}

impl Bar {
    fn new(visible: bool, follow: Side) -> Bar {
        let bar = if visible {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
            let style = ProgressStyle::with_template(
                "{spinner} [{elapsed_precise}] {bytes:>11} {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(100));
            bar
        } else {
            ProgressBar::hidden()
        };
        Bar {
            bar,
            follow,
            state: LiveState::default(),
        }
    }

    fn update(&mut self, event: &Event) {
        if let Some(warning) = self.state.update(self.follow, event) {
            self.bar.suspend(|| eprintln!("warning: {warning}"));
        }
        self.bar.set_position(self.state.bytes);
        self.bar.set_message(self.state.message());
    }

    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// `n` bytes for people: `512 B`, `4.0 KiB`, `64.0 MiB`, `1.00 GiB`.
pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// A rate in MB/s (10^6 bytes per second).
pub fn rate(bps: f64) -> String {
    format!("{:.1} MB/s", bps / 1e6)
}

/// A duration in ms below 10 s, else in s.
pub fn duration(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    } else {
        format!("{:.2} s", d.as_secs_f64())
    }
}

fn switchover_reason(reason: SwitchoverReason) -> &'static str {
    match reason {
        SwitchoverReason::Converged => "converged (predicted downtime within the limit)",
        SwitchoverReason::MaxRounds => "round limit reached without converging",
        SwitchoverReason::NoPrecopy => "no precopy (not supported or disabled)",
    }
}

fn device_line(text: &mut String, d: &DeviceReport, peer: Option<&str>) {
    let _ = write!(text, "  device {}: {}", d.index, d.name);
    if let Some(peer) = peer {
        let _ = write!(text, " -> {peer}");
    }
    let _ = writeln!(
        text,
        " ({}, {}): pre-copy {} in {} chunk(s), stop-copy {} in {} chunk(s)",
        d.kind,
        d.features,
        bytes(d.pre_copy.bytes),
        d.pre_copy.chunks,
        bytes(d.stop_copy.bytes),
        d.stop_copy.chunks
    );
}

/// The human summary of a source engine; `destinations` names each device's peer, when
/// known.
pub fn describe_source(s: &SourceSummary, destinations: Option<&[String]>) -> String {
    let mut text = String::new();
    for (i, d) in s.devices.iter().enumerate() {
        device_line(
            &mut text,
            d,
            destinations
                .and_then(|names| names.get(i))
                .map(String::as_str),
        );
    }
    let pre: u64 = s.devices.iter().map(|d| d.pre_copy.bytes).sum();
    let stop: u64 = s.devices.iter().map(|d| d.stop_copy.bytes).sum();
    let _ = writeln!(
        text,
        "  state: {} (pre-copy {}, stop-copy {}); stream {} over {}",
        bytes(s.bytes),
        bytes(pre),
        bytes(stop),
        bytes(s.stream_bytes),
        s.transport
    );
    let _ = writeln!(
        text,
        "  precopy: {} round(s); switchover: {}",
        s.precopy_rounds,
        switchover_reason(s.switchover)
    );
    let _ = writeln!(text, "  throughput: {}", rate(s.throughput_bps));
    match &s.downtime {
        Some(d) => {
            let clock = match d.clock {
                DowntimeClock::SharedClock => {
                    "one clock: from the switchover start to the last destination device running"
                }
                DowntimeClock::AckReceipt => {
                    "source clock: from the switchover start to the destination's running \
                     acknowledgement, an upper bound"
                }
            };
            let _ = writeln!(text, "  downtime: {} ({clock})", duration(d.duration));
        }
        None => {
            let _ = writeln!(text, "  downtime: not measured (no destination)");
        }
    }
    let _ = writeln!(
        text,
        "  time: {} total (precopy {}, switchover to end of stream {})",
        duration(s.total),
        duration(s.precopy),
        duration(s.stop_copy)
    );
    let _ = writeln!(text, "  source devices left in {}", s.source_state);
    for w in &s.warnings {
        let _ = writeln!(text, "  warning: {w}");
    }
    text
}

/// The human summary of a destination engine.
pub fn describe_destination(d: &DestinationSummary) -> String {
    let mut text = String::new();
    for dev in &d.devices {
        device_line(&mut text, dev, None);
    }
    let _ = writeln!(
        text,
        "  state: {} written; stream {} from {} (written by \"{}\")",
        bytes(d.bytes),
        bytes(d.stream_bytes),
        d.transport,
        d.producer
    );
    let _ = writeln!(
        text,
        "  time: {} total; validation {} and resume {} after the end of the stream",
        duration(d.total),
        duration(d.validation),
        duration(d.resume)
    );
    let throughput = if d.total.is_zero() {
        0.0
    } else {
        d.stream_bytes as f64 / d.total.as_secs_f64()
    };
    let _ = writeln!(text, "  throughput: {}", rate(throughput));
    for w in &d.warnings {
        let _ = writeln!(text, "  warning: {w}");
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_rates_and_durations_read_well() {
        assert_eq!(bytes(0), "0 B");
        assert_eq!(bytes(1023), "1023 B");
        assert_eq!(bytes(4096), "4.0 KiB");
        assert_eq!(bytes(64 << 20), "64.0 MiB");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
        assert_eq!(rate(512.0e6), "512.0 MB/s");
        assert_eq!(duration(Duration::from_micros(12_340)), "12.3 ms");
        assert_eq!(duration(Duration::from_secs(12)), "12.00 s");
    }

    #[test]
    fn tagged_json_puts_the_tag_first_and_keeps_the_fields() {
        #[derive(Serialize)]
        struct S {
            a: u32,
            b: &'static str,
        }
        let line = tagged_json("summary", &S { a: 1, b: "x" }).unwrap();
        assert!(line.starts_with("{\"event\":\"summary\","), "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["a"], 1);
        assert_eq!(v["b"], "x");
        #[derive(Serialize)]
        struct Empty {}
        assert_eq!(tagged_json("x", &Empty {}).unwrap(), "{\"event\":\"x\"}");
        assert!(tagged_json("x", &3u32).is_err());
    }

    #[test]
    fn live_state_follows_one_side_and_reports_warnings() {
        let mut live = LiveState::default();
        assert_eq!(live.message(), "starting");
        live.update(
            Side::Source,
            &Event::Stage {
                side: Side::Source,
                stage: Stage::Precopy,
                elapsed_ms: 1.0,
            },
        );
        // The other engine's progress does not move the bar.
        live.update(
            Side::Source,
            &Event::Progress {
                side: Side::Destination,
                stage: Stage::Receiving,
                bytes: 7,
                elapsed_ms: 2.0,
                rate_bps: 1.0,
            },
        );
        assert_eq!(live.bytes, 0);
        assert_eq!(live.stage, Some(Stage::Precopy));
        live.update(
            Side::Source,
            &Event::Progress {
                side: Side::Source,
                stage: Stage::Precopy,
                bytes: 4 << 20,
                elapsed_ms: 3.0,
                rate_bps: 2.5e8,
            },
        );
        live.update(
            Side::Source,
            &Event::PrecopyRound {
                round: 2,
                bytes: 1,
                total_bytes: 1,
                initial_bytes: 0,
                dirty_bytes: 0,
                remaining_bytes: 0,
                bandwidth_bps: None,
                predicted_downtime_ms: Some(3.25),
                converged: false,
            },
        );
        assert_eq!(live.bytes, 4 << 20);
        assert_eq!(
            live.message(),
            "precopy  250.0 MB/s  round 2, predicted downtime 3.2 ms"
        );
        live.update(
            Side::Source,
            &Event::Stage {
                side: Side::Source,
                stage: Stage::Completion,
                elapsed_ms: 4.0,
            },
        );
        assert_eq!(live.message(), "completion", "no stale rate");
        let warning = live.update(
            Side::Source,
            &Event::Warning {
                side: Side::Destination,
                message: "slow".into(),
            },
        );
        assert_eq!(warning.as_deref(), Some("destination: slow"));
    }

    #[test]
    fn run_engine_presents_every_event_as_json_in_order() {
        let mut out = Vec::new();
        let result = run_engine(Output::Json, Side::Source, &mut out, |sink| {
            for i in 0..3 {
                sink(&Event::Warning {
                    side: Side::Source,
                    message: format!("w{i}"),
                });
            }
            42
        })
        .unwrap();
        assert_eq!(result, 42);
        let text = String::from_utf8(out).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{text}");
        for (i, l) in lines.iter().enumerate() {
            assert_eq!(l["event"], "warning");
            assert_eq!(l["message"], format!("w{i}"));
        }
    }

    #[test]
    fn run_engine_in_human_mode_writes_nothing_to_out() {
        let mut out = Vec::new();
        run_engine(Output::Human, Side::Source, &mut out, |sink| {
            sink(&Event::Stage {
                side: Side::Source,
                stage: Stage::Done,
                elapsed_ms: 0.0,
            })
        })
        .unwrap();
        assert!(out.is_empty());
    }

    #[test]
    fn run_engine_returns_a_write_error_after_the_engine_finished() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> io::Result<usize> {
                Err(io::Error::from(io::ErrorKind::BrokenPipe))
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let finished = std::sync::atomic::AtomicBool::new(false);
        let err = run_engine(Output::Json, Side::Source, &mut Closed, |sink| {
            sink(&Event::Warning {
                side: Side::Source,
                message: "x".into(),
            });
            finished.store(true, std::sync::atomic::Ordering::SeqCst);
        })
        .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
        assert!(finished.load(std::sync::atomic::Ordering::SeqCst));
    }
}
