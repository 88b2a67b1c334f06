//! The precopy convergence policy: when to stop precopying and switch over. Pure.

use std::time::Duration;

/// What to do when precopy has not converged after the allowed number of rounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum NonConvergence {
    /// Switch over anyway and accept a longer downtime (QEMU's behaviour with a fixed
    /// downtime limit is to keep trying; bounded here).
    #[default]
    SwitchOver,
    /// Abort the migration; the source devices run on.
    Abort,
}

/// Why precopy ended and the switchover began.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum SwitchoverReason {
    /// The initial data is sent and the predicted downtime is within the limit.
    Converged,
    /// The round limit was reached without converging ([`NonConvergence::SwitchOver`]).
    MaxRounds,
    /// No device precopies (none supports PRE_COPY, or precopy was disabled).
    NoPrecopy,
}

/// What the engine measured after one precopy round, summed over the devices.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundStats {
    /// The round just finished, from 1.
    pub round: u32,
    /// Rounds finished (this one included) with every device's initial data sent.
    pub settled_rounds: u32,
    /// Initial bytes not yet read, summed over the precopying devices.
    pub initial_bytes: u64,
    /// Bytes the switchover is predicted to move (for each device, the larger of its
    /// stop-copy size estimate and its pending precopy bytes).
    pub remaining_bytes: u64,
    /// Measured transfer rate in bytes per second, if anything has been transferred.
    pub bandwidth: Option<f64>,
}

/// The policy's verdict after a round.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Run another round.
    Continue,
    /// Switch over now.
    SwitchOver(SwitchoverReason),
    /// Give up: abort the migration ([`NonConvergence::Abort`]).
    GiveUp,
}

/// Switch over when every device's initial data has been read and the predicted downtime
/// (remaining bytes / measured bandwidth) is at most `downtime_limit`; after `max_rounds`
/// rounds past the initial data without that, do what `on_limit` says.
///
/// The switchover never happens while initial data is unread (the uAPI's rule: going to
/// STOP_COPY earlier may slow the device down). A device whose initial data does not drain
/// within [`MAX_INITIAL_ROUNDS`] rounds makes the policy give up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvergencePolicy {
    /// The longest acceptable predicted downtime.
    pub downtime_limit: Duration,
    /// The most precopy rounds (at least 1).
    pub max_rounds: u32,
    /// What to do after `max_rounds` rounds without converging.
    pub on_limit: NonConvergence,
}

/// Rounds allowed for the initial data to drain before the policy gives up.
pub const MAX_INITIAL_ROUNDS: u32 = 1000;

impl ConvergencePolicy {
    /// How long moving `remaining` bytes at `bandwidth` bytes/s takes; `None` when no rate
    /// is known yet (and something remains).
    pub fn predicted_downtime(remaining: u64, bandwidth: Option<f64>) -> Option<Duration> {
        if remaining == 0 {
            return Some(Duration::ZERO);
        }
        let bw = bandwidth.filter(|b| b.is_finite() && *b > 0.0)?;
        Some(Duration::from_secs_f64(remaining as f64 / bw))
    }

    /// Whether the state after a round allows switching over.
    pub fn converged(&self, stats: &RoundStats) -> bool {
        stats.initial_bytes == 0
            && Self::predicted_downtime(stats.remaining_bytes, stats.bandwidth)
                .is_some_and(|d| d <= self.downtime_limit)
    }

    /// The verdict after a round.
    pub fn decide(&self, stats: &RoundStats) -> Decision {
        if self.converged(stats) {
            Decision::SwitchOver(SwitchoverReason::Converged)
        } else if stats.initial_bytes > 0 {
            if stats.round >= MAX_INITIAL_ROUNDS {
                Decision::GiveUp
            } else {
                Decision::Continue
            }
        } else if stats.settled_rounds >= self.max_rounds.max(1) {
            match self.on_limit {
                NonConvergence::SwitchOver => Decision::SwitchOver(SwitchoverReason::MaxRounds),
                NonConvergence::Abort => Decision::GiveUp,
            }
        } else {
            Decision::Continue
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn policy(on_limit: NonConvergence) -> ConvergencePolicy {
        ConvergencePolicy {
            downtime_limit: Duration::from_millis(50),
            max_rounds: 5,
            on_limit,
        }
    }

    fn stats(round: u32, initial: u64, remaining: u64, bw: Option<f64>) -> RoundStats {
        RoundStats {
            round,
            settled_rounds: if initial == 0 { round } else { 0 },
            initial_bytes: initial,
            remaining_bytes: remaining,
            bandwidth: bw,
        }
    }

    #[test]
    fn switches_over_only_when_initial_is_sent_and_downtime_fits() {
        let p = policy(NonConvergence::SwitchOver);
        let gib_s = Some((1u64 << 30) as f64);
        // 10 MiB at 1 GiB/s is ~9.8 ms: fits, but not while initial data is unread.
        assert_eq!(p.decide(&stats(1, 1, 10 * MIB, gib_s)), Decision::Continue);
        assert_eq!(
            p.decide(&stats(1, 0, 10 * MIB, gib_s)),
            Decision::SwitchOver(SwitchoverReason::Converged)
        );
        // 100 MiB at 1 GiB/s is ~98 ms: over the limit.
        assert_eq!(p.decide(&stats(2, 0, 100 * MIB, gib_s)), Decision::Continue);
        // Nothing remaining converges even with no rate measured.
        assert_eq!(
            p.decide(&stats(1, 0, 0, None)),
            Decision::SwitchOver(SwitchoverReason::Converged)
        );
        // Something remaining with no rate known does not.
        assert_eq!(p.decide(&stats(1, 0, 1, None)), Decision::Continue);
        assert_eq!(p.decide(&stats(1, 0, 1, Some(0.0))), Decision::Continue);
    }

    #[test]
    fn the_round_limit_switches_over_or_gives_up_as_chosen() {
        let gib_s = Some((1u64 << 30) as f64);
        let slow = stats(5, 0, 100 * MIB, gib_s);
        assert_eq!(
            policy(NonConvergence::SwitchOver).decide(&slow),
            Decision::SwitchOver(SwitchoverReason::MaxRounds)
        );
        assert_eq!(
            policy(NonConvergence::Abort).decide(&slow),
            Decision::GiveUp
        );
        assert_eq!(
            policy(NonConvergence::Abort).decide(&stats(4, 0, 100 * MIB, gib_s)),
            Decision::Continue
        );
        // A limit of 0 rounds means 1.
        let p = ConvergencePolicy {
            max_rounds: 0,
            ..policy(NonConvergence::Abort)
        };
        assert_eq!(p.decide(&stats(1, 0, 100 * MIB, gib_s)), Decision::GiveUp);
    }

    #[test]
    fn the_round_limit_never_switches_over_with_initial_data_unread() {
        let gib_s = Some((1u64 << 30) as f64);
        let p = policy(NonConvergence::SwitchOver);
        // Five rounds in, still initial data: keep going rather than switch over early.
        assert_eq!(
            p.decide(&stats(5, MIB, 100 * MIB, gib_s)),
            Decision::Continue
        );
        // The limit counts rounds after the initial data was sent.
        let late = RoundStats {
            round: 9,
            settled_rounds: 4,
            initial_bytes: 0,
            remaining_bytes: 100 * MIB,
            bandwidth: gib_s,
        };
        assert_eq!(p.decide(&late), Decision::Continue);
        let limit = RoundStats {
            settled_rounds: 5,
            ..late
        };
        assert_eq!(
            p.decide(&limit),
            Decision::SwitchOver(SwitchoverReason::MaxRounds)
        );
        // Initial data that never drains: give up, whatever `on_limit` says.
        let stuck = stats(MAX_INITIAL_ROUNDS, MIB, 100 * MIB, gib_s);
        assert_eq!(p.decide(&stuck), Decision::GiveUp);
    }

    #[test]
    fn predicted_downtime_is_bytes_over_rate() {
        assert_eq!(
            ConvergencePolicy::predicted_downtime(MIB, Some(MIB as f64 * 10.0)),
            Some(Duration::from_millis(100))
        );
        assert_eq!(ConvergencePolicy::predicted_downtime(1, None), None);
        assert_eq!(
            ConvergencePolicy::predicted_downtime(1, Some(f64::NAN)),
            None
        );
    }
}
