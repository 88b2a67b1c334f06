//! What the engines report while they run ([`Event`]) and when they finish (summaries).

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vfio_mig_device::{DeviceState, MigrationFeatures};
use vfio_mig_stream::PhaseTotals;

use crate::ack::Ack;
use crate::error::RecoveryAction;
use crate::policy::SwitchoverReason;

/// Which end of a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Side {
    /// The devices whose state is saved.
    Source,
    /// The devices that take the state in.
    Destination,
}

impl fmt::Display for Side {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Side::Source => "source",
            Side::Destination => "destination",
        })
    }
}

/// Where an engine is in a migration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stage {
    /// Querying the devices (source), or reading the stream's header and device records
    /// and checking compatibility (destination).
    Discovery,
    /// Source: stream header sent, waiting for the destination's `ready`. Destination:
    /// devices entering RESUMING.
    Handshake,
    /// Source: precopy rounds while the devices run.
    Precopy,
    /// Source: devices quiescing P2P and entering STOP_COPY (downtime has begun).
    Switchover,
    /// Source: reading the final state of every device.
    StopCopy,
    /// Source: stream complete, waiting for the destination to run.
    Completion,
    /// Destination: writing the devices' state as it arrives.
    Receiving,
    /// Destination: validating (RESUMING -> STOP) and starting the devices.
    Resume,
    /// Finished successfully.
    Done,
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Stage::Discovery => "discovery",
            Stage::Handshake => "handshake",
            Stage::Precopy => "precopy",
            Stage::Switchover => "switchover",
            Stage::StopCopy => "stop-copy",
            Stage::Completion => "completion",
            Stage::Receiving => "receiving",
            Stage::Resume => "resume",
            Stage::Done => "done",
        })
    }
}

/// Something an engine did or measured; serialized as one JSON object tagged by `"event"`.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
#[serde(tag = "event", rename_all = "kebab-case")]
pub enum Event {
    /// The engine entered a stage.
    Stage {
        /// Which engine.
        side: Side,
        /// The stage entered.
        stage: Stage,
        /// Milliseconds since the engine started.
        elapsed_ms: f64,
    },
    /// A device as discovered (source) or as offered for the stream's device (destination).
    Device {
        /// Which engine.
        side: Side,
        /// Index in the stream.
        device: u16,
        /// The name given to the engine (e.g. its address).
        name: String,
        /// Device kind.
        kind: String,
        /// State format version.
        version: String,
        /// Migration capabilities.
        features: MigrationFeatures,
        /// Current state.
        state: DeviceState,
        /// Stop-copy size estimate, if the device gave one.
        data_size: Option<u64>,
    },
    /// Destination: a device passed the compatibility check.
    Compatible {
        /// Index in the stream.
        device: u16,
        /// The destination device's name.
        name: String,
        /// `compatible`, with feature differences if any.
        detail: String,
    },
    /// A device moved to another state (one `set_state`, possibly several arcs).
    Transition {
        /// Which engine.
        side: Side,
        /// Index in the stream.
        device: u16,
        /// The device's name.
        name: String,
        /// State before.
        from: DeviceState,
        /// State after.
        to: DeviceState,
        /// How long the call took, in µs.
        duration_us: u64,
    },
    /// A message arrived on (source) or was sent over (destination) the back channel.
    Acknowledgement {
        /// Which engine.
        side: Side,
        /// The message.
        ack: Ack,
    },
    /// Source: one precopy round finished.
    PrecopyRound {
        /// Round number, from 1.
        round: u32,
        /// Bytes read from the devices in this round.
        bytes: u64,
        /// Bytes read in all precopy rounds so far.
        total_bytes: u64,
        /// Initial bytes still unread, over all devices.
        initial_bytes: u64,
        /// Dirty bytes pending, over all devices.
        dirty_bytes: u64,
        /// Bytes the switchover is predicted to move.
        remaining_bytes: u64,
        /// Measured transfer rate, bytes per second.
        bandwidth_bps: Option<f64>,
        /// Predicted downtime in ms (remaining / bandwidth).
        predicted_downtime_ms: Option<f64>,
        /// Whether the policy found the state converged.
        converged: bool,
    },
    /// Source: precopy ended; downtime begins.
    Switchover {
        /// Why now.
        reason: SwitchoverReason,
        /// Precopy rounds run.
        rounds: u32,
    },
    /// Bytes moved so far (about every 100 ms while data flows).
    Progress {
        /// Which engine.
        side: Side,
        /// The stage.
        stage: Stage,
        /// Stream bytes written (source) or read (destination) so far.
        bytes: u64,
        /// Milliseconds since the engine started.
        elapsed_ms: f64,
        /// Average rate since the previous progress event, bytes per second.
        rate_bps: f64,
    },
    /// All of one device's data has been sent (source) or written into it (destination).
    DeviceDone {
        /// Which engine.
        side: Side,
        /// Index in the stream.
        device: u16,
        /// The device's name.
        name: String,
        /// Bytes read/written during precopy.
        pre_copy_bytes: u64,
        /// Bytes read/written during stop-copy.
        stop_copy_bytes: u64,
    },
    /// What a failure made the engine do to a device.
    Recovery {
        /// Which engine.
        side: Side,
        /// Index in the stream.
        device: u16,
        /// The device's name.
        name: String,
        /// What was done.
        action: RecoveryAction,
        /// The device's state afterwards, if it could be read.
        state: Option<DeviceState>,
    },
    /// Something went wrong that did not fail the migration.
    Warning {
        /// Which engine.
        side: Side,
        /// What.
        message: String,
    },
}

/// Where events go: called from the engine's threads, so it must be cheap and thread-safe.
pub type EventSink = Arc<dyn Fn(&Event) + Send + Sync>;

/// The engines' event emitter and clock.
#[derive(Clone)]
pub(crate) struct Emitter {
    sink: Option<EventSink>,
    pub(crate) side: Side,
    pub(crate) start: Instant,
}

impl Emitter {
    pub(crate) fn new(side: Side, sink: Option<EventSink>) -> Emitter {
        Emitter {
            sink,
            side,
            start: Instant::now(),
        }
    }

    pub(crate) fn emit(&self, event: Event) {
        if let Some(sink) = &self.sink {
            sink(&event);
        }
    }

    pub(crate) fn elapsed_ms(&self) -> f64 {
        ms_f64(self.start.elapsed())
    }

    pub(crate) fn stage(&self, stage: Stage) {
        self.emit(Event::Stage {
            side: self.side,
            stage,
            elapsed_ms: self.elapsed_ms(),
        });
    }

    pub(crate) fn warn(&self, message: String) {
        tracing::warn!(side = %self.side, "{message}");
        self.emit(Event::Warning {
            side: self.side,
            message,
        });
    }
}

/// Rate-limits [`Event::Progress`] to one per interval.
pub(crate) struct ProgressMeter {
    last: Instant,
    last_bytes: u64,
}

impl ProgressMeter {
    const INTERVAL: Duration = Duration::from_millis(100);

    pub(crate) fn new() -> ProgressMeter {
        ProgressMeter {
            last: Instant::now(),
            last_bytes: 0,
        }
    }

    /// Emits a progress event if the interval has passed (or `force`).
    pub(crate) fn update(&mut self, emitter: &Emitter, stage: Stage, bytes: u64, force: bool) {
        let now = Instant::now();
        let dt = now.duration_since(self.last);
        if !force && dt < Self::INTERVAL {
            return;
        }
        let rate = if dt.is_zero() {
            0.0
        } else {
            bytes.saturating_sub(self.last_bytes) as f64 / dt.as_secs_f64()
        };
        self.last = now;
        self.last_bytes = bytes;
        emitter.emit(Event::Progress {
            side: emitter.side,
            stage,
            bytes,
            elapsed_ms: emitter.elapsed_ms(),
            rate_bps: rate,
        });
    }
}

pub(crate) fn ms_f64(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Microseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// Serializes a [`Duration`] as milliseconds (a float).
pub(crate) mod as_ms {
    use std::time::Duration;

    pub(crate) fn serialize<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_f64(super::ms_f64(*d))
    }
}

/// What moved for one device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceReport {
    /// Index in the stream.
    pub index: u16,
    /// The name given to the engine.
    pub name: String,
    /// Device kind.
    pub kind: String,
    /// The device's migration capabilities.
    pub features: MigrationFeatures,
    /// The stop-copy size estimate at discovery (source) or in the stream (destination).
    pub data_size_estimate: u64,
    /// Chunks and bytes of the precopy phase.
    pub pre_copy: PhaseTotals,
    /// Chunks and bytes of the stop-copy phase.
    pub stop_copy: PhaseTotals,
}

/// How a downtime was measured.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DowntimeClock {
    /// Both engines read the same clock (one process): from the source's switchover start
    /// to the destination's last device running, exactly.
    SharedClock,
    /// Separate hosts: from the switchover start to the arrival of the destination's
    /// `running` acknowledgement (an upper bound, by the acknowledgement's one-way delay).
    AckReceipt,
}

/// The time the devices did not run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Downtime {
    /// From the first source device leaving its running state (the switchover start) to the
    /// last destination device running.
    #[serde(rename = "ms", with = "as_ms")]
    pub duration: Duration,
    /// How it was measured.
    pub clock: DowntimeClock,
}

/// What a successful source engine did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct SourceSummary {
    /// The transport, e.g. `tcp:10.0.0.2:4444`.
    pub transport: String,
    /// Per device, in stream order.
    pub devices: Vec<DeviceReport>,
    /// Precopy rounds run.
    pub precopy_rounds: u32,
    /// Why precopy ended.
    pub switchover: SwitchoverReason,
    /// Device state bytes sent (all phases, all devices).
    pub bytes: u64,
    /// Bytes written to the transport (state plus framing).
    pub stream_bytes: u64,
    /// From start to finish.
    #[serde(rename = "total_ms", with = "as_ms")]
    pub total: Duration,
    /// Time spent in precopy rounds.
    #[serde(rename = "precopy_ms", with = "as_ms")]
    pub precopy: Duration,
    /// From the switchover start to the END record written.
    #[serde(rename = "stop_copy_ms", with = "as_ms")]
    pub stop_copy: Duration,
    /// The downtime, when a destination reported its devices running (not for `save`).
    pub downtime: Option<Downtime>,
    /// `stream_bytes` over `total`, bytes per second.
    pub throughput_bps: f64,
    /// The state the source devices were left in (STOP: the destination runs, or the state
    /// is saved).
    pub source_state: DeviceState,
    /// Problems that did not fail the migration.
    pub warnings: Vec<String>,
}

/// What a successful destination engine did.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct DestinationSummary {
    /// The transport.
    pub transport: String,
    /// Who wrote the stream (its header's producer string).
    pub producer: String,
    /// Per device, in stream order.
    pub devices: Vec<DeviceReport>,
    /// Device state bytes written into the devices.
    pub bytes: u64,
    /// Bytes read from the transport.
    pub stream_bytes: u64,
    /// From start to finish.
    #[serde(rename = "total_ms", with = "as_ms")]
    pub total: Duration,
    /// From the END record to every device validated (RESUMING -> STOP).
    #[serde(rename = "validation_ms", with = "as_ms")]
    pub validation: Duration,
    /// From the END record to the last device running.
    #[serde(rename = "resume_ms", with = "as_ms")]
    pub resume: Duration,
    /// Problems that did not fail the migration.
    pub warnings: Vec<String>,
}

/// Both ends of a migration run in one process.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct LocalSummary {
    /// The source engine's summary.
    pub source: SourceSummary,
    /// The destination engine's summary.
    pub destination: DestinationSummary,
}
