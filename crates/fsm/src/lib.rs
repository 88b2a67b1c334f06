//! The VFIO migration finite-state machine, exactly as the kernel runs it.
//!
//! A device implements only the *direct arcs* of its feature set ([`direct_arcs`]); any other
//! request is reached by chaining arcs, one [`next_step`] at a time, along the shortest path
//! whose interior never passes through a saving state (PRE_COPY, PRE_COPY_P2P, STOP_COPY).
//! [`path`] gives the whole chain; [`session_effect`] says what each arc does to the data
//! session (opens a new stream, keeps the current one, ends it).
//!
//! Everything here is pure and allocation-free: tables are `const`, paths are fixed-size.
//!
//! ```
//! use vfio_mig_fsm::{next_step, path};
//! use vfio_mig_uapi::{DeviceState::*, MigrationFeatures};
//!
//! let all = MigrationFeatures::ALL;
//! assert_eq!(next_step(Running, StopCopy, all), Ok(RunningP2p));
//! let p = path(Resuming, PreCopy, all).unwrap();
//! assert_eq!(p.states(), [Resuming, Stop, RunningP2p, Running, PreCopy]);
//! ```
#![forbid(unsafe_code)]

use std::fmt;

use vfio_mig_uapi::{DeviceState, MigrationFeatures};

use DeviceState::{
    Error as ERR, PreCopy as PC, PreCopyP2p as PCP2P, Resuming as RES, Running as RUN,
    RunningP2p as RP2P, Stop as STOP, StopCopy as SC,
};

/// The kernel's next-hop table for the full feature set: `FULL_TABLE[cur][target]`.
///
/// Indexed by raw state value (ERROR, STOP, RUNNING, STOP_COPY, RESUMING, RUNNING_P2P,
/// PRE_COPY, PRE_COPY_P2P). For fewer features, unsupported hops are skipped by looking the
/// hop up again as if it were the current state (see [`next_step`]).
const FULL_TABLE: [[DeviceState; 8]; 8] = [
    //        ERR  STOP  RUN  SC     RES  RP2P  PC    PCP2P   <- target
    /* ERR */
    [ERR, ERR, ERR, ERR, ERR, ERR, ERR, ERR],
    /* STOP */ [ERR, STOP, RP2P, SC, RES, RP2P, RP2P, RP2P],
    /* RUN */ [ERR, RP2P, RUN, RP2P, RP2P, RP2P, PC, RP2P],
    /* SC */ [ERR, STOP, STOP, SC, STOP, STOP, ERR, ERR],
    /* RES */ [ERR, STOP, STOP, STOP, RES, STOP, STOP, STOP],
    /* RP2P */ [ERR, STOP, RUN, STOP, STOP, RP2P, RUN, PCP2P],
    /* PC */ [ERR, RUN, RUN, PCP2P, RUN, RUN, PC, PCP2P],
    /* PCP2P */ [ERR, RP2P, RP2P, SC, RP2P, RP2P, PC, PCP2P],
];

/// Why a transition is refused. Every refusal is `EINVAL` in the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// ERROR is never a valid target.
    #[error("error is never a valid target state")]
    ErrorTarget,
    /// A device in ERROR must be reset; no transition leaves it.
    #[error("the device is in the error state; only a reset leaves it")]
    ErrorSource,
    /// The target needs a capability the device does not have.
    #[error("state {state} needs feature {needs}, which the device does not have ({features})")]
    UnsupportedTarget {
        /// The requested target.
        state: DeviceState,
        /// The missing capability's name.
        needs: &'static str,
        /// The device's feature set.
        features: MigrationFeatures,
    },
    /// The current state needs a capability the device does not have (a corrupted state).
    #[error(
        "current state {state} needs feature {needs}, which the device does not have ({features})"
    )]
    UnsupportedSource {
        /// The current state.
        state: DeviceState,
        /// The missing capability's name.
        needs: &'static str,
        /// The device's feature set.
        features: MigrationFeatures,
    },
    /// No chain of arcs leads there: STOP_COPY -> PRE_COPY or PRE_COPY_P2P (the saving
    /// stream cannot go back to precopy).
    #[error("{from} -> {to} is not allowed: a stop-copy session cannot return to pre-copy")]
    Blocked {
        /// The current state.
        from: DeviceState,
        /// The requested target.
        to: DeviceState,
    },
}

impl Refusal {
    /// The errno the kernel returns for this refusal.
    pub const fn errno(self) -> vfio_mig_uapi::Errno {
        vfio_mig_uapi::Errno::EINVAL
    }
}

fn missing_feature(state: DeviceState, features: MigrationFeatures) -> &'static str {
    let missing = state.required_flags() & !features.bits();
    if missing & vfio_mig_uapi::kernel::VFIO_MIGRATION_P2P != 0 {
        "p2p"
    } else if missing & vfio_mig_uapi::kernel::VFIO_MIGRATION_PRE_COPY != 0 {
        "pre-copy"
    } else {
        "stop-copy"
    }
}

/// The single next arc from `from` toward `to`, with the kernel's semantics.
///
/// Returns `to` itself when `from == to` (a no-op) or when `from -> to` is a direct arc.
/// Terminates for every input: the skip over unsupported hops stops at ERROR (the kernel
/// before June 2026 spun forever there) and is bounded by the number of states besides.
pub fn next_step(
    from: DeviceState,
    to: DeviceState,
    features: MigrationFeatures,
) -> Result<DeviceState, Refusal> {
    if to == ERR {
        return Err(Refusal::ErrorTarget);
    }
    if from == ERR {
        return Err(Refusal::ErrorSource);
    }
    if !from.is_supported_by(features) {
        return Err(Refusal::UnsupportedSource {
            state: from,
            needs: missing_feature(from, features),
            features,
        });
    }
    if !to.is_supported_by(features) {
        return Err(Refusal::UnsupportedTarget {
            state: to,
            needs: missing_feature(to, features),
            features,
        });
    }
    let mut next = FULL_TABLE[from.index()][to.index()];
    // Each skip moves to a different row; more than COUNT skips would mean a cycle.
    let mut skips = 0;
    while next != ERR && !next.is_supported_by(features) {
        next = FULL_TABLE[next.index()][to.index()];
        skips += 1;
        if skips > DeviceState::COUNT {
            next = ERR;
        }
    }
    if next == ERR {
        return Err(Refusal::Blocked { from, to });
    }
    Ok(next)
}

/// Whether `from -> to` is an arc a device with `features` must implement itself.
pub fn is_direct_arc(from: DeviceState, to: DeviceState, features: MigrationFeatures) -> bool {
    from != to && next_step(from, to, features) == Ok(to)
}

/// Every direct arc of a feature set, in (from, to) numeric order.
pub fn direct_arcs(
    features: MigrationFeatures,
) -> impl Iterator<Item = (DeviceState, DeviceState)> {
    DeviceState::ALL.into_iter().flat_map(move |from| {
        DeviceState::ALL
            .into_iter()
            .filter(move |&to| is_direct_arc(from, to, features))
            .map(move |to| (from, to))
    })
}

/// The states of a feature set, in numeric order (ERROR excluded).
pub fn supported_states(features: MigrationFeatures) -> impl Iterator<Item = DeviceState> {
    DeviceState::ALL
        .into_iter()
        .filter(move |s| s.is_supported_by(features))
}

/// The longest chain any feature set needs, in arcs (e.g. RESUMING -> PRE_COPY).
pub const MAX_PATH_ARCS: usize = 4;

/// A whole transition: the start state followed by each state reached, one arc per step.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Path {
    states: [DeviceState; MAX_PATH_ARCS + 1],
    len: u8,
}

impl Path {
    /// Start state, then every state reached; a no-op path has just the start state.
    pub fn states(&self) -> &[DeviceState] {
        &self.states[..usize::from(self.len)]
    }

    /// The start state.
    pub fn from(&self) -> DeviceState {
        self.states[0]
    }

    /// The final state.
    pub fn to(&self) -> DeviceState {
        self.states[usize::from(self.len) - 1]
    }

    /// Number of arcs (0 for a no-op).
    pub fn arc_count(&self) -> usize {
        usize::from(self.len) - 1
    }

    /// The arcs, in order.
    pub fn arcs(&self) -> impl Iterator<Item = (DeviceState, DeviceState)> + '_ {
        self.states().windows(2).map(|w| (w[0], w[1]))
    }
}

impl fmt::Display for Path {
    /// `running -> running-p2p -> stop`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, s) in self.states().iter().enumerate() {
            if i > 0 {
                f.write_str(" -> ")?;
            }
            f.write_str(s.name())?;
        }
        Ok(())
    }
}

impl fmt::Debug for Path {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Path({self})")
    }
}

/// The whole sequence of arcs from `from` to `to`, as [`next_step`] walks it.
pub fn path(
    from: DeviceState,
    to: DeviceState,
    features: MigrationFeatures,
) -> Result<Path, Refusal> {
    let mut p = Path {
        states: [from; MAX_PATH_ARCS + 1],
        len: 1,
    };
    let mut cur = from;
    // Validates from/to even for a no-op request.
    next_step(from, to, features)?;
    while cur != to {
        let next = next_step(cur, to, features)?;
        let i = usize::from(p.len);
        if i > MAX_PATH_ARCS {
            // Unreachable with the kernel table (proven by tests); refuse rather than loop.
            return Err(Refusal::Blocked { from, to });
        }
        p.states[i] = next;
        p.len += 1;
        cur = next;
    }
    Ok(p)
}

/// What an arc does to the data session (the kernel's `data_fd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SessionEffect {
    /// The arc opens a new session and returns a new stream: RUNNING -> PRE_COPY,
    /// RUNNING_P2P -> PRE_COPY_P2P, STOP -> STOP_COPY (saving) and STOP -> RESUMING.
    Opens(StreamDirection),
    /// The arc moves within the saving group and keeps the same stream: PRE_COPY <->
    /// PRE_COPY_P2P, PRE_COPY(_P2P) -> STOP_COPY. No new stream is returned.
    Keeps,
    /// The arc ends the session; the stream is disabled afterwards: STOP_COPY -> STOP,
    /// PRE_COPY -> RUNNING, PRE_COPY_P2P -> RUNNING_P2P, RESUMING -> STOP (which also
    /// validates the resumed state).
    Ends(StreamDirection),
    /// The arc has nothing to do with a data session.
    None,
}

/// Which way a data session's bytes flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum StreamDirection {
    /// The device produces its state (read from the stream).
    Saving,
    /// The device takes in state (written to the stream).
    Resuming,
}

/// What the arc `from -> to` does to the data session. Meaningful for direct arcs.
pub const fn session_effect(from: DeviceState, to: DeviceState) -> SessionEffect {
    match (from, to) {
        (RUN, PC) | (RP2P, PCP2P) | (STOP, SC) => SessionEffect::Opens(StreamDirection::Saving),
        (STOP, RES) => SessionEffect::Opens(StreamDirection::Resuming),
        (PC, PCP2P) | (PCP2P, PC) | (PC, SC) | (PCP2P, SC) => SessionEffect::Keeps,
        (SC, STOP) | (PC, RUN) | (PCP2P, RP2P) => SessionEffect::Ends(StreamDirection::Saving),
        (RES, STOP) => SessionEffect::Ends(StreamDirection::Resuming),
        _ => SessionEffect::None,
    }
}

/// The data-session direction open while a device is in `state`, if any.
pub const fn session_in(state: DeviceState) -> Option<StreamDirection> {
    match state {
        PC | PCP2P | SC => Some(StreamDirection::Saving),
        RES => Some(StreamDirection::Resuming),
        _ => None,
    }
}
