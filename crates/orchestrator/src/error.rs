//! Why a migration failed, where, and what was done about it.

use std::fmt;
use std::io;
use std::time::Duration;

use vfio_mig_device::{DeviceError, DeviceState, TransitionError};
use vfio_mig_stream::{DecodeError, EncodeError, Incompatible};

use crate::ack::AckError;
use crate::event::{Side, Stage};

/// A device operation that can fail.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DeviceOp {
    /// `features()`.
    Features,
    /// `identity()`.
    Identity,
    /// `state()`.
    State,
    /// `data_size()`.
    DataSize,
    /// A read of the saving stream.
    Read,
    /// A write of the resuming stream.
    Write,
    /// `precopy_info()`.
    PrecopyInfo,
}

impl fmt::Display for DeviceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceOp::Features => "querying its migration features",
            DeviceOp::Identity => "reading its identity",
            DeviceOp::State => "reading its state",
            DeviceOp::DataSize => "querying its data size",
            DeviceOp::Read => "reading its saving stream",
            DeviceOp::Write => "writing its resuming stream",
            DeviceOp::PrecopyInfo => "querying its precopy info",
        })
    }
}

/// What failed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The options or arguments cannot work.
    #[error("invalid options: {0}")]
    Options(String),
    /// A device cannot take part in a migration at all.
    #[error("device {index} ({name}) cannot migrate: {reason}")]
    NotMigratable {
        /// Index in the stream.
        index: u16,
        /// The device's name.
        name: String,
        /// Why.
        reason: String,
    },
    /// Several devices, not all with P2P, and the user did not accept the risk.
    #[error(
        "{side} devices without P2P support: {}; several devices can migrate together only \
         when all support P2P (allow non-P2P devices to accept the risk)",
        .devices.join(", ")
    )]
    P2pRequired {
        /// Which side's devices.
        side: Side,
        /// The devices lacking P2P.
        devices: Vec<String>,
    },
    /// A device operation failed.
    #[error("device {index} ({name}): {op} failed")]
    Device {
        /// Index in the stream.
        index: u16,
        /// The device's name.
        name: String,
        /// What was being done.
        op: DeviceOp,
        /// The device's error.
        #[source]
        cause: DeviceError,
    },
    /// A device state change failed (the cause names the arc and where the device stopped).
    #[error("device {index} ({name}): moving to {target} failed")]
    Transition {
        /// Index in the stream.
        index: u16,
        /// The device's name.
        name: String,
        /// The state asked for.
        target: DeviceState,
        /// Which arc failed, and where the device is.
        #[source]
        cause: TransitionError,
    },
    /// A device broke the uAPI's rules (e.g. no stream where one must open).
    #[error("device {index} ({name}): {problem}")]
    DeviceProtocol {
        /// Index in the stream.
        index: u16,
        /// The device's name.
        name: String,
        /// What it did wrong.
        problem: String,
    },
    /// The transport failed.
    #[error("{what} on {transport} failed")]
    Transport {
        /// What was being done (e.g. `writing the stream`).
        what: String,
        /// The transport's description.
        transport: String,
        /// The I/O error.
        #[source]
        cause: io::Error,
    },
    /// The stream encoder refused a record (an engine bug or a device too large to describe).
    #[error("the stream encoder refused a record")]
    Encode(#[source] EncodeError),
    /// The incoming stream is corrupt, truncated or not a stream.
    #[error("the incoming stream is invalid")]
    Decode(#[source] DecodeError),
    /// The back channel carried something unreadable.
    #[error("the back channel from the destination failed")]
    BackChannel(#[source] AckError),
    /// The destination refused the stream before touching its devices.
    #[error("the destination refused the migration: {reason}")]
    Refused {
        /// The destination's reason.
        reason: String,
    },
    /// The destination failed after accepting the stream.
    #[error("the destination failed: {reason}")]
    DestinationFailed {
        /// The destination's reason.
        reason: String,
    },
    /// The destination closed the back channel without a final answer.
    #[error("the destination closed the connection while the source was in {stage}")]
    DestinationVanished {
        /// Where the source was.
        stage: Stage,
    },
    /// The destination did not answer in time.
    #[error("no '{waiting_for}' acknowledgement from the destination within {timeout:?}")]
    AckTimeout {
        /// The acknowledgement awaited.
        waiting_for: &'static str,
        /// How long the source waited.
        timeout: Duration,
    },
    /// An acknowledgement that makes no sense at this point.
    #[error("unexpected '{ack}' acknowledgement from the destination")]
    UnexpectedAck {
        /// The acknowledgement's tag.
        ack: String,
    },
    /// Precopy did not converge and the user chose to abort.
    #[error(
        "precopy did not converge in {rounds} round(s): predicted downtime {}, limit {limit:?}",
        .predicted.map_or_else(|| "unknown".to_owned(), |d| format!("{d:?}"))
    )]
    NotConverged {
        /// Rounds run.
        rounds: u32,
        /// The last predicted downtime.
        predicted: Option<Duration>,
        /// The limit.
        limit: Duration,
    },
    /// The stream and the destination have different numbers of devices.
    #[error("the stream carries {stream} device(s) but {local} destination device(s) were given")]
    DeviceCount {
        /// Devices in the stream.
        stream: u16,
        /// Destination devices given.
        local: usize,
    },
    /// A destination device cannot take the stream's device state.
    #[error("device {index}: destination device {name} cannot take the stream's state")]
    Incompatible {
        /// Index in the stream.
        index: u16,
        /// The destination device's name.
        name: String,
        /// The mismatch.
        #[source]
        cause: Incompatible,
    },
    /// The source sent ABORT.
    #[error("the source aborted the migration: {reason}")]
    SourceAborted {
        /// The source's reason.
        reason: String,
    },
    /// The user cancelled the migration (e.g. with Ctrl-C) through a [`crate::Cancel`].
    #[error("the migration was cancelled")]
    Cancelled,
    /// An engine thread panicked (a bug).
    #[error("an engine thread panicked")]
    Panicked,
}

impl Failure {
    pub(crate) fn transport(what: impl Into<String>, transport: &str, cause: io::Error) -> Failure {
        Failure::Transport {
            what: what.into(),
            transport: transport.to_owned(),
            cause,
        }
    }
}

/// What a recovery did to one device.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "action", rename_all = "kebab-case")]
pub enum RecoveryAction {
    /// The device was never moved.
    Untouched,
    /// The device went back to its state before the migration (`set_state`).
    Restored,
    /// `set_state` back failed, so the device was reset (and returned to its original state
    /// if that was not RUNNING). A reset keeps no half-loaded state.
    Reset,
    /// Left stopped with its state intact (the outcome of the migration is unknown).
    Stopped,
    /// Recovery failed; the device needs attention.
    Failed {
        /// Why.
        error: String,
    },
}

/// One device's recovery.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceRecovery {
    /// Index in the stream.
    pub device: u16,
    /// The device's name.
    pub name: String,
    /// What was done.
    pub action: RecoveryAction,
    /// Its state afterwards, if it could be read.
    pub state: Option<DeviceState>,
}

/// The overall result of a recovery.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum RecoveryOutcome {
    /// No device had been touched.
    Untouched,
    /// Source: every device is back in the state it had before (running again).
    RolledBack,
    /// Destination: every touched device was reset; nothing half-loaded runs.
    Reset,
    /// Source: the stream was complete but the destination's answer never came; the
    /// destination may be running, so the source devices stay stopped (state intact).
    LeftStopped,
    /// Some device could not be recovered (see its action).
    Incomplete,
}

/// What an engine did after a failure.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Recovery {
    /// Which side's devices.
    pub side: Side,
    /// The overall result.
    pub outcome: RecoveryOutcome,
    /// Per device.
    pub devices: Vec<DeviceRecovery>,
    /// Whether the peer was told: ABORT written (source) or a failure acknowledgement sent
    /// (destination).
    pub peer_notified: bool,
}

impl fmt::Display for Recovery {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let count = |pred: fn(&RecoveryAction) -> bool| {
            self.devices.iter().filter(|d| pred(&d.action)).count()
        };
        match self.outcome {
            RecoveryOutcome::Untouched => write!(f, "no {} device was touched", self.side)?,
            RecoveryOutcome::RolledBack => write!(
                f,
                "every source device is back in its original state ({} restored, {} reset, {} untouched)",
                count(|a| *a == RecoveryAction::Restored),
                count(|a| *a == RecoveryAction::Reset),
                count(|a| *a == RecoveryAction::Untouched),
            )?,
            RecoveryOutcome::Reset => write!(
                f,
                "{} destination device(s) reset, nothing half-loaded runs",
                count(|a| *a == RecoveryAction::Reset)
            )?,
            RecoveryOutcome::LeftStopped => f.write_str(
                "the outcome is unknown (the destination may be running): source devices left \
                 stopped with their state intact",
            )?,
            RecoveryOutcome::Incomplete => {
                f.write_str("recovery incomplete:")?;
                for d in &self.devices {
                    if let RecoveryAction::Failed { error } = &d.action {
                        write!(f, " device {} ({}): {error};", d.device, d.name)?;
                    }
                }
            }
        }
        if self.peer_notified {
            f.write_str(match self.side {
                Side::Source => "; ABORT sent to the destination",
                Side::Destination => "; the source was told",
            })?;
        }
        Ok(())
    }
}

/// A failed migration: what failed ([`Failure`], the error's source), on which side and in
/// which stage, and what was done about it.
#[derive(Debug, thiserror::Error)]
#[error("migration failed on the {side} during {stage}; {recovery}{}", .peer_recovery.as_ref().map(|r| format!("; {r}")).unwrap_or_default())]
pub struct MigrationError {
    /// The engine that failed.
    pub side: Side,
    /// Where it was.
    pub stage: Stage,
    /// What failed (boxed: errors stay small on the success path).
    #[source]
    pub failure: Box<Failure>,
    /// What this engine did about it.
    pub recovery: Recovery,
    /// Local migrations: what the other engine did.
    pub peer_recovery: Option<Recovery>,
}

impl MigrationError {
    /// One line for people: what failed (with every cause), where, and what was done.
    pub fn report(&self) -> String {
        let mut line = chain(&*self.failure);
        line.push_str(&format!(
            " [{} {}]; {}",
            self.side, self.stage, self.recovery
        ));
        if let Some(peer) = &self.peer_recovery {
            line.push_str(&format!("; {peer}"));
        }
        line
    }
}

/// `err` and all its causes, joined with `: `.
pub(crate) fn chain(err: &dyn std::error::Error) -> String {
    let mut s = err.to_string();
    let mut cause = err.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}
