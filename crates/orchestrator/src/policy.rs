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
/// rounds without that, do what `on_limit` says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvergencePolicy {
    /// The longest acceptable predicted downtime.
    pub downtime_limit: Duration,
    /// The most precopy rounds (at least 1).
    pub max_rounds: u32,
    /// What to do after `max_rounds` rounds without converging.
    pub on_limit: NonConvergence,
}

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
        } else if stats.round >= self.max_rounds.max(1) {
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
