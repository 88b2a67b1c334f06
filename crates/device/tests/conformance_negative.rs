//! The conformance suite catches broken devices: each test builds a device that breaks one
//! rule (in its hooks, or in a user-view wrapper around a correct controller) and asserts
//! that the check guarding that rule fails, with a message that says what was wrong.

mod common;

use common::{buggy_factory, controller, digest, Bug, TestDevice};
use vfio_mig_device::conformance::{self, run_check, ConformanceFailure, Role, Target};
use vfio_mig_device::{
    Controller, DataStream, DeviceError, DeviceIdentity, DeviceState, Errno, IovaRange,
    MigrationDevice, MigrationFeatures, MigrationStream, PrecopyInfo, ReadOutcome, StreamDirection,
    TransitionError,
};

fn failure(target: &Target<impl MigrationDevice>, check: &str) -> ConformanceFailure {
    match run_check(target, check) {
        Ok(()) => panic!("{check} passed a device that breaks it"),
        Err(f) => f,
    }
}

fn assert_fails(target: &Target<impl MigrationDevice>, check: &str, needle: &str) {
    let f = failure(target, check);
    assert!(f.detail().contains(needle), "{check}: {}", f.detail());
}

#[test]
fn rising_initial_bytes_fail_initial_bytes_never_rise() {
    let t = Target::new(
        "bug",
        buggy_factory(MigrationFeatures::PRE_COPY, Bug::RisingInitialBytes),
    );
    assert_fails(&t, "initial_bytes_never_rise", "initial_bytes rose");
}

#[test]
fn stuck_initial_bytes_fail_initial_bytes_never_rise() {
    let t = Target::new(
        "bug",
        buggy_factory(MigrationFeatures::ALL, Bug::InitialBytesStuck),
    );
    assert_fails(&t, "initial_bytes_never_rise", "initial_bytes is 1");
}

#[test]
fn accepting_truncated_streams_fails_truncated_stream_rejected() {
    let t = Target::new(
        "bug",
        buggy_factory(MigrationFeatures::STOP_COPY, Bug::AcceptsTruncated),
    );
    assert_fails(&t, "truncated_stream_rejected", "accepted the first");
    // The same device passes the checks that do not involve truncation.
    run_check(&t, "save_resume_round_trip").unwrap();
}

#[test]
fn ignoring_the_resumed_state_fails_the_round_trips_with_a_digest() {
    let t = Target::new(
        "bug",
        buggy_factory(MigrationFeatures::ALL, Bug::IgnoresResumedState),
    )
    .with_digest(digest);
    assert_fails(&t, "save_resume_round_trip", "differs from the source's");
    assert_fails(
        &t,
        "precopy_session_round_trip",
        "differs from the source's",
    );
}

#[test]
fn data_after_end_fails_stop_copy_stream_ends() {
    let t = Target::new(
        "bug",
        buggy_factory(MigrationFeatures::P2P, Bug::DataAfterEnd),
    );
    assert_fails(&t, "stop_copy_stream_ends", "after End");
}

#[test]
fn an_unexpected_feature_set_fails() {
    let t = Target::new(
        "bug",
        buggy_factory(MigrationFeatures::P2P, Bug::DataAfterEnd),
    )
    .expect_features(MigrationFeatures::STOP_COPY);
    assert_fails(&t, "features_contain_stop_copy", "expected stop-copy");
}

/// How a [`Liar`] breaks the user's view of a correct controller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Lie {
    /// PRE_COPY reads report End where the device has nothing now.
    EndInPrecopy,
    /// Refused transitions fail with EIO instead of EINVAL.
    WrongRefusalErrno,
    /// A refused transition is reported as a success (the device does not move).
    RefusalAsSuccess,
    /// Reset does nothing.
    ResetIgnored,
    /// Every non-opening transition also returns a (dead) stream.
    StreamOnEveryArc,
    /// Precopy info succeeds in any state.
    PrecopyInfoAnywhere,
    /// DMA-logging start accepts no ranges.
    LoggingWithoutRanges,
    /// Streams stay usable after their session ended.
    StreamsNeverEnd,
    /// data_size fails in STOP_COPY.
    NoDataSizeInStopCopy,
    /// Writes to a saving stream are accepted.
    SavingStreamTakesWrites,
}

#[derive(Debug)]
struct Liar {
    inner: Controller<TestDevice>,
    lie: Lie,
}

#[derive(Debug)]
struct LyingStream {
    inner: Option<DataStream>,
    lie: Lie,
    direction: StreamDirection,
    state: Controller<TestDevice>,
}

impl MigrationStream for LyingStream {
    fn direction(&self) -> StreamDirection {
        self.direction
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, DeviceError> {
        let Some(inner) = self.inner.as_mut() else {
            return Ok(ReadOutcome::End);
        };
        match inner.read(buf) {
            Ok(ReadOutcome::NothingNow) if self.lie == Lie::EndInPrecopy => Ok(ReadOutcome::End),
            Err(e) if e.errno() == Errno::ENODEV && self.lie == Lie::StreamsNeverEnd => {
                Ok(ReadOutcome::End)
            }
            other => other,
        }
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        if self.lie == Lie::SavingStreamTakesWrites && self.direction == StreamDirection::Saving {
            return Ok(buf.len());
        }
        let inner = self
            .inner
            .as_mut()
            .ok_or_else(|| DeviceError::new(Errno::ENODEV, "dead"))?;
        match inner.write(buf) {
            Err(e) if e.errno() == Errno::ENODEV && self.lie == Lie::StreamsNeverEnd => {
                Ok(buf.len())
            }
            other => other,
        }
    }

    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError> {
        if self.lie == Lie::PrecopyInfoAnywhere {
            let _ = self.state.state();
            return Ok(PrecopyInfo::default());
        }
        let inner = self
            .inner
            .as_mut()
            .ok_or_else(|| DeviceError::new(Errno::ENODEV, "dead"))?;
        match inner.precopy_info() {
            Err(e) if e.errno() == Errno::ENODEV && self.lie == Lie::StreamsNeverEnd => {
                Ok(PrecopyInfo::default())
            }
            other => other,
        }
    }
}

impl MigrationDevice for Liar {
    fn features(&self) -> Result<MigrationFeatures, DeviceError> {
        self.inner.features()
    }
    fn identity(&self) -> Result<DeviceIdentity, DeviceError> {
        self.inner.identity()
    }
    fn state(&self) -> Result<DeviceState, DeviceError> {
        self.inner.state()
    }
    fn set_state(&self, target: DeviceState) -> Result<Option<DataStream>, TransitionError> {
        let wrap = |s: DataStream| -> DataStream {
            Box::new(LyingStream {
                direction: s.direction(),
                inner: Some(s),
                lie: self.lie,
                state: self.inner.clone(),
            })
        };
        match self.inner.set_state(target) {
            Err(mut e) if e.errno() == Errno::EINVAL && e.failed_arc.is_none() => match self.lie {
                Lie::WrongRefusalErrno => {
                    e.cause = DeviceError::new(Errno::EIO, "refused");
                    Err(e)
                }
                Lie::RefusalAsSuccess => Ok(None),
                _ => Err(e),
            },
            Ok(None) if self.lie == Lie::StreamOnEveryArc => Ok(Some(Box::new(LyingStream {
                inner: None,
                lie: self.lie,
                direction: StreamDirection::Saving,
                state: self.inner.clone(),
            }))),
            other => other.map(|s| s.map(wrap)),
        }
    }
    fn data_size(&self) -> Result<u64, DeviceError> {
        if self.lie == Lie::NoDataSizeInStopCopy && self.inner.state()? == DeviceState::StopCopy {
            return Err(DeviceError::new(Errno::EIO, "busy"));
        }
        self.inner.data_size()
    }
    fn dma_logging_start(&self, page_size: u64, ranges: &[IovaRange]) -> Result<u64, DeviceError> {
        if self.lie == Lie::LoggingWithoutRanges && ranges.is_empty() {
            return Ok(page_size);
        }
        self.inner.dma_logging_start(page_size, ranges)
    }
    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        self.inner
            .dma_logging_report(iova, length, page_size, bitmap)
    }
    fn dma_logging_stop(&self) -> Result<(), DeviceError> {
        self.inner.dma_logging_stop()
    }
    fn reset(&self) -> Result<(), DeviceError> {
        if self.lie == Lie::ResetIgnored {
            return Ok(());
        }
        self.inner.reset()
    }
}

fn liar(lie: Lie) -> Target<Liar> {
    Target::new(format!("{lie:?}"), move |role: Role| {
        Ok(Liar {
            inner: controller(MigrationFeatures::ALL, true, role.seed()),
            lie,
        })
    })
}

#[test]
fn end_in_precopy_fails_the_precopy_checks() {
    let t = liar(Lie::EndInPrecopy);
    assert_fails(&t, "precopy_nothing_now_is_not_end", "returned End");
    assert_fails(&t, "precopy_session_round_trip", "returned End");
}

#[test]
fn a_wrong_refusal_errno_fails_refused_transitions() {
    let t = liar(Lie::WrongRefusalErrno);
    assert_fails(
        &t,
        "refused_transitions",
        "failed with EIO; expected EINVAL",
    );
    assert_fails(
        &t,
        "combination_paths",
        "stop-copy -> pre-copy failed with EIO",
    );
}

#[test]
fn a_refusal_reported_as_success_fails() {
    let t = liar(Lie::RefusalAsSuccess);
    assert_fails(&t, "refused_transitions", "succeeded; expected EINVAL");
    assert_fails(&t, "combination_paths", "succeeded; expected EINVAL");
}

#[test]
fn an_ignored_reset_fails_reset_from_every_state() {
    let t = liar(Lie::ResetIgnored);
    assert_fails(&t, "reset_from_every_state", "after a reset in stop,");
    assert_fails(&t, "truncated_stream_rejected", "after a reset");
}

#[test]
fn a_stream_from_a_non_opening_arc_fails() {
    let t = liar(Lie::StreamOnEveryArc);
    assert_fails(
        &t,
        "streams_only_from_opening_arcs",
        "only session-opening arcs may",
    );
    assert_fails(
        &t,
        "precopy_nothing_now_is_not_end",
        "returned a new stream",
    );
}

#[test]
fn precopy_info_outside_precopy_fails() {
    let t = liar(Lie::PrecopyInfoAnywhere);
    assert_fails(
        &t,
        "precopy_info_only_in_precopy",
        "precopy info in stop-copy succeeded",
    );
}

#[test]
fn accepting_no_logging_ranges_fails_dma_logging() {
    let t = liar(Lie::LoggingWithoutRanges);
    assert_fails(
        &t,
        "dma_logging",
        "with no ranges succeeded; expected EINVAL",
    );
}

#[test]
fn streams_outliving_their_session_fail() {
    let t = liar(Lie::StreamsNeverEnd);
    assert_fails(&t, "ended_sessions_fail_enodev", "expected ENODEV");
    assert_fails(&t, "reset_from_every_state", "expected ENODEV");
}

#[test]
fn data_size_missing_in_a_state_fails() {
    let t = liar(Lie::NoDataSizeInStopCopy);
    assert_fails(
        &t,
        "data_size_in_every_state",
        "estimate in stop-copy failed",
    );
}

#[test]
fn a_writable_saving_stream_fails_stream_direction_rules() {
    let t = liar(Lie::SavingStreamTakesWrites);
    assert_fails(&t, "stream_direction_rules", "must fail");
}

#[test]
fn run_all_reports_only_the_broken_checks() {
    let report = conformance::run_all(&liar(Lie::PrecopyInfoAnywhere));
    let failed: Vec<&str> = report.failures().map(|c| c.name).collect();
    // Answering precopy info on an ended session also breaks the ENODEV rules.
    assert_eq!(
        failed,
        [
            "ended_sessions_fail_enodev",
            "precopy_info_only_in_precopy",
            "reset_from_every_state"
        ],
        "{report}"
    );
}
