//! Every failure path: the source runs again with its state unchanged, and nothing
//! half-loaded runs on the destination.

mod common;

use std::io::Read;
use std::thread;
use std::time::Duration;

use common::*;
use vfio_mig_device::DeviceState;
use vfio_mig_orchestrator::{
    migrate_in, migrate_local, migrate_out, DestinationOptions, Failure, MigrationError,
    RecoveryAction, RecoveryOutcome, SourceOptions, Stage, Transport,
};

const KIB: usize = 1024;

fn src_opts() -> SourceOptions {
    SourceOptions {
        chunk_size: 4096,
        buffers_per_device: 2,
        ack_timeout: Duration::from_secs(10),
        io_timeout: Some(Duration::from_secs(10)),
        downtime_limit: Duration::from_secs(1),
        ..SourceOptions::default()
    }
}

fn dst_opts() -> DestinationOptions {
    DestinationOptions {
        buffers_per_device: 2,
        io_timeout: Some(Duration::from_secs(10)),
        drain_timeout: Duration::from_secs(2),
        ..DestinationOptions::default()
    }
}

/// A still source (its state must come back unchanged) and a destination with other
/// contents (which must never be replaced by a half-loaded state).
struct Pair {
    src: BlobDev,
    dst: BlobDev,
    src_before: Vec<u8>,
    dst_before: Vec<u8>,
}

impl Pair {
    fn new(size: usize, features: u64) -> Pair {
        let src = blob(size, features, 31);
        let dst = blob(size, features, 32);
        Pair {
            src_before: contents(&src),
            dst_before: contents(&dst),
            src,
            dst,
        }
    }

    fn migrate(&self) -> Result<(), MigrationError> {
        migrate_local(
            &[named("s", &self.src)],
            &[named("d", &self.dst)],
            &src_opts(),
            &dst_opts(),
        )
        .map(|_| ())
    }

    /// The source runs its original state again; the destination runs its own old state.
    fn assert_rolled_back(&self, what: &str) {
        assert_eq!(
            state(&self.src),
            DeviceState::Running,
            "{what}: source state"
        );
        assert!(
            self.src.with_device(|b| b.running),
            "{what}: source not running"
        );
        assert_eq!(
            contents(&self.src),
            self.src_before,
            "{what}: source state changed"
        );
        assert_eq!(
            state(&self.dst),
            DeviceState::Running,
            "{what}: destination state"
        );
        assert_eq!(
            contents(&self.dst),
            self.dst_before,
            "{what}: destination half-loaded"
        );
    }
}

#[test]
fn a_failing_source_arc_rolls_back_in_every_phase() {
    for (features, hook, stage) in [
        (0x7, Hook::SaveBegin, Stage::Precopy),
        (0x7, Hook::P2pQuiesce, Stage::Switchover),
        (0x7, Hook::SaveStopCopy, Stage::Switchover),
        (0x5, Hook::SaveStopCopy, Stage::Switchover),
        (0x1, Hook::Stop, Stage::Switchover),
        (0x3, Hook::SaveBegin, Stage::Switchover),
    ] {
        let what = format!("{features:#x} {hook:?}");
        let p = Pair::new(32 * KIB, features);
        inject(&p.src, hook, false);
        let err = p.migrate().unwrap_err();
        assert!(
            matches!(*err.failure, Failure::Transition { index: 0, .. }),
            "{what}: {}",
            err.report()
        );
        assert_eq!(err.stage, stage, "{what}");
        assert_eq!(err.recovery.outcome, RecoveryOutcome::RolledBack, "{what}");
        assert_eq!(
            err.recovery.devices[0].action,
            RecoveryAction::Restored,
            "{what}"
        );
        assert!(err.recovery.peer_notified, "{what}: no ABORT");
        assert_eq!(
            err.peer_recovery.as_ref().unwrap().outcome,
            RecoveryOutcome::Reset,
            "{what}"
        );
        // The report names the device, the arc and what was done.
        let report = err.report();
        assert!(report.contains("device 0 (s)"), "{report}");
        assert!(report.contains("arc"), "{report}");
        assert!(report.contains("back in its original state"), "{report}");
        p.assert_rolled_back(&what);
    }
}

#[test]
fn a_failing_source_read_rolls_back() {
    for (features, after, stage) in [
        (0x7, 10 * KIB, Stage::Precopy),
        (0x3, 10 * KIB, Stage::StopCopy),
    ] {
        let p = Pair::new(32 * KIB, features);
        inject(&p.src, Hook::Read(after), false);
        let err = p.migrate().unwrap_err();
        assert!(
            matches!(*err.failure, Failure::Device { index: 0, .. }),
            "{features:#x}: {}",
            err.report()
        );
        assert_eq!(err.stage, stage);
        p.assert_rolled_back(&format!("{features:#x} read"));
    }
}

#[test]
fn a_source_that_cannot_go_back_is_reset() {
    let p = Pair::new(32 * KIB, 0x7);
    inject(&p.src, Hook::SaveStopCopy, false);
    inject(&p.src, Hook::P2pRelease, true);
    let err = p.migrate().unwrap_err();
    assert_eq!(err.recovery.devices[0].action, RecoveryAction::Reset);
    assert_eq!(err.recovery.outcome, RecoveryOutcome::RolledBack);
    assert_eq!(p.src.with_device(|b| b.resets), 1);
    clear_faults(&p.src);
    p.assert_rolled_back("reset");
}

#[test]
fn a_failing_destination_rolls_the_source_back() {
    for (hook, src_stage, src_outcome) in [
        // Before the source touched anything: it stays untouched.
        (
            Hook::ResumeBegin,
            Stage::Handshake,
            RecoveryOutcome::Untouched,
        ),
        (
            Hook::Write(8 * KIB),
            Stage::Precopy,
            RecoveryOutcome::RolledBack,
        ),
        // Validation fails after the whole stream arrived.
        (
            Hook::ResumeFinish,
            Stage::Completion,
            RecoveryOutcome::RolledBack,
        ),
    ] {
        // Big enough that the socket buffers cannot hold it: the source is still
        // precopying when the destination's write fails.
        let p = Pair::new(1024 * KIB, 0x7);
        inject(&p.dst, hook, false);
        let err = p.migrate().unwrap_err();
        let what = format!("{hook:?}");
        assert!(
            matches!(&*err.failure, Failure::DestinationFailed { reason } if reason.contains("injected")),
            "{what}: {}",
            err.report()
        );
        // After END the source may not yet have seen its writer finish: stop-copy or
        // completion are both where it was.
        if src_stage == Stage::Completion {
            assert!(
                matches!(err.stage, Stage::StopCopy | Stage::Completion),
                "{what}: {:?}",
                err.stage
            );
        } else {
            assert_eq!(err.stage, src_stage, "{what}");
        }
        assert_eq!(err.recovery.outcome, src_outcome, "{what}");
        let dst = err.peer_recovery.as_ref().unwrap();
        assert_eq!(dst.outcome, RecoveryOutcome::Reset, "{what}");
        assert!(dst.peer_notified, "{what}");
        assert_eq!(p.dst.with_device(|b| b.resets), 1, "{what}");
        p.assert_rolled_back(&what);
    }
}

#[test]
fn a_destination_that_fails_to_start_after_validation_is_reset_and_the_source_runs() {
    let p = Pair::new(32 * KIB, 0x3);
    // STOP -> RUNNING_P2P after the state was validated.
    inject(&p.dst, Hook::Start, false);
    let err = p.migrate().unwrap_err();
    assert!(
        matches!(*err.failure, Failure::DestinationFailed { .. }),
        "{}",
        err.report()
    );
    assert!(matches!(err.stage, Stage::StopCopy | Stage::Completion));
    assert_eq!(err.recovery.outcome, RecoveryOutcome::RolledBack);
    assert_eq!(p.dst.with_device(|b| b.resets), 1);
    assert_eq!(state(&p.src), DeviceState::Running);
    assert_eq!(contents(&p.src), p.src_before);
}

#[test]
fn an_incompatible_destination_refuses_before_touching_anything() {
    let src = blob(32 * KIB, 0x7, 41);
    let dst = blob(16 * KIB, 0x7, 42);
    let (sb, db) = (contents(&src), contents(&dst));
    let err = migrate_local(
        &[named("s", &src)],
        &[named("d", &dst)],
        &src_opts(),
        &dst_opts(),
    )
    .unwrap_err();
    let Failure::Refused { reason } = &*err.failure else {
        panic!("{}", err.report())
    };
    assert!(reason.contains("compatibility data differs"), "{reason}");
    assert_eq!(err.stage, Stage::Handshake);
    assert_eq!(err.recovery.outcome, RecoveryOutcome::Untouched);
    assert_eq!(
        err.peer_recovery.as_ref().unwrap().outcome,
        RecoveryOutcome::Untouched
    );
    assert_eq!((state(&src), contents(&src)), (DeviceState::Running, sb));
    assert_eq!((state(&dst), contents(&dst)), (DeviceState::Running, db));
    assert_eq!(dst.with_device(|b| b.resets), 0);

    // A different number of devices is refused too.
    let dst2 = blob(32 * KIB, 0x7, 43);
    let err = migrate_local(
        &[named("s", &src)],
        &[named("d", &dst2), named("d2", &dst2)],
        &src_opts(),
        &DestinationOptions {
            allow_non_p2p: true,
            ..dst_opts()
        },
    )
    .unwrap_err();
    assert!(
        matches!(&*err.failure, Failure::Refused { reason } if reason.contains("1 device(s) but 2")),
        "{}",
        err.report()
    );
}

/// Runs one migration through a relay applying `plan`.
fn through_relay(
    p: &Pair,
    plan: RelayPlan,
) -> (Result<(), MigrationError>, Result<(), MigrationError>) {
    let (src_end, dst_end, relay) = relay(plan);
    let dst = p.dst.clone();
    let receiver =
        thread::spawn(move || migrate_in(&[named("d", &dst)], dst_end, &dst_opts()).map(|_| ()));
    let src = migrate_out(&[named("s", &p.src)], src_end, &src_opts()).map(|_| ());
    let dst = receiver.join().unwrap();
    relay.join().unwrap();
    (src, dst)
}

#[test]
fn a_connection_dropped_in_each_phase_rolls_back() {
    // 256 KiB of state is about 263 KiB of records: cut at 30 bytes (inside the header),
    // mid precopy (0x7) and mid stop-copy (0x3).
    // Where the source notices a cut mid-stream depends on socket buffering and scheduling
    // (its writes may land in buffers before the cut is seen), so any stage from the cut's
    // phase up to the end of stop-copy is right; rolling back is what must hold.
    const PRECOPY_ON: &[Stage] = &[Stage::Precopy, Stage::Switchover, Stage::StopCopy];
    const STOP_COPY_ON: &[Stage] = &[Stage::Switchover, Stage::StopCopy];
    for (features, cut, src_stages, src_outcome) in [
        (0x7, 30, &[Stage::Handshake][..], RecoveryOutcome::Untouched),
        (0x7, 100_000, PRECOPY_ON, RecoveryOutcome::RolledBack),
        (0x3, 100_000, STOP_COPY_ON, RecoveryOutcome::RolledBack),
    ] {
        let what = format!("{features:#x} cut at {cut}");
        let p = Pair::new(256 * KIB, features);
        let (src, dst) = through_relay(
            &p,
            RelayPlan {
                cut_at: Some(cut),
                ..RelayPlan::default()
            },
        );
        let src = src.unwrap_err();
        let dst = dst.unwrap_err();
        assert!(src_stages.contains(&src.stage), "{what}: {}", src.report());
        assert_eq!(src.recovery.outcome, src_outcome, "{what}");
        assert!(
            matches!(
                *src.failure,
                Failure::Transport { .. } | Failure::DestinationVanished { .. }
            ),
            "{what}: {}",
            src.report()
        );
        assert!(
            matches!(&*dst.failure, Failure::Decode(e) if e.is_truncation())
                || matches!(*dst.failure, Failure::Transport { .. }),
            "{what}: {}",
            dst.report()
        );
        p.assert_rolled_back(&what);
    }
}

#[test]
fn a_lost_final_answer_leaves_the_source_stopped_not_running_twice() {
    let p = Pair::new(32 * KIB, 0x7);
    // Forward `ready`, then close the back channel instead of forwarding `running`.
    let (src, dst) = through_relay(
        &p,
        RelayPlan {
            drop_ack: Some(1),
            ..RelayPlan::default()
        },
    );
    let err = src.unwrap_err();
    assert!(
        matches!(
            *err.failure,
            Failure::DestinationVanished {
                stage: Stage::StopCopy | Stage::Completion
            }
        ),
        "{}",
        err.report()
    );
    assert_eq!(err.recovery.outcome, RecoveryOutcome::LeftStopped);
    assert!(err.report().contains("outcome is unknown"));
    assert_eq!(err.recovery.devices[0].action, RecoveryAction::Stopped);
    // The destination validated and runs the migrated state; the source is stopped with its
    // state intact.
    dst.unwrap();
    assert_eq!(state(&p.src), DeviceState::Stop);
    assert_eq!(contents(&p.src), p.src_before);
    assert_eq!(state(&p.dst), DeviceState::Running);
    assert_eq!(contents(&p.dst), p.src_before);
}

#[test]
fn a_vanished_back_channel_before_ready_aborts_both_sides() {
    let p = Pair::new(32 * KIB, 0x7);
    let (src, dst) = through_relay(
        &p,
        RelayPlan {
            drop_ack: Some(0),
            ..RelayPlan::default()
        },
    );
    let src = src.unwrap_err();
    assert!(
        matches!(
            *src.failure,
            Failure::DestinationVanished {
                stage: Stage::Handshake
            }
        ),
        "{}",
        src.report()
    );
    assert_eq!(src.recovery.outcome, RecoveryOutcome::Untouched);
    assert!(src.recovery.peer_notified, "ABORT sent on the forward path");
    let dst = dst.unwrap_err();
    assert!(
        matches!(*dst.failure, Failure::SourceAborted { .. }),
        "{}",
        dst.report()
    );
    assert_eq!(dst.recovery.outcome, RecoveryOutcome::Reset);
    p.assert_rolled_back("back channel lost");
}

#[test]
fn a_stream_corrupted_in_flight_is_caught_and_rolled_back() {
    for (features, at) in [(0x7, 50_000), (0x3, 200_000), (0x1, 60)] {
        let what = format!("{features:#x} corrupt at {at}");
        let p = Pair::new(256 * KIB, features);
        let (src, dst) = through_relay(
            &p,
            RelayPlan {
                corrupt_at: Some(at),
                ..RelayPlan::default()
            },
        );
        let dst = dst.unwrap_err();
        let Failure::Decode(e) = &*dst.failure else {
            panic!("{what}: {}", dst.report())
        };
        assert!(e.offset <= at, "{what}: offset {}", e.offset);
        let src = src.unwrap_err();
        assert!(
            matches!(
                &*src.failure,
                Failure::DestinationFailed { reason } | Failure::Refused { reason }
                    if reason.contains("offset")
            ),
            "{what}: {}",
            src.report()
        );
        p.assert_rolled_back(&what);
    }
}

#[test]
fn a_silent_destination_times_out_without_touching_the_source() {
    let (a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let sink = thread::spawn(move || {
        let mut all = Vec::new();
        let _ = b.read_to_end(&mut all);
    });
    let src = blob(16 * KIB, 0x7, 51);
    let before = contents(&src);
    let opts = SourceOptions {
        ack_timeout: Duration::from_millis(200),
        ..src_opts()
    };
    let err = migrate_out(&[named("s", &src)], Transport::unix(a).unwrap(), &opts).unwrap_err();
    assert!(
        matches!(
            *err.failure,
            Failure::AckTimeout {
                waiting_for: "ready",
                ..
            }
        ),
        "{}",
        err.report()
    );
    assert_eq!(err.stage, Stage::Handshake);
    assert_eq!(err.recovery.outcome, RecoveryOutcome::Untouched);
    assert_eq!(
        (state(&src), contents(&src)),
        (DeviceState::Running, before)
    );
    sink.join().unwrap();
}

/// A device that answers the features query like a kernel device without migration.
struct NoMigration(BlobDev);

impl vfio_mig_device::MigrationDevice for NoMigration {
    fn features(&self) -> Result<vfio_mig_device::MigrationFeatures, vfio_mig_device::DeviceError> {
        Err(vfio_mig_device::DeviceError::new(
            vfio_mig_device::Errno::ENOTTY,
            "no migration support",
        ))
    }
    fn identity(&self) -> Result<vfio_mig_device::DeviceIdentity, vfio_mig_device::DeviceError> {
        self.0.identity()
    }
    fn state(&self) -> Result<DeviceState, vfio_mig_device::DeviceError> {
        self.0.state()
    }
    fn set_state(
        &self,
        target: DeviceState,
    ) -> Result<Option<vfio_mig_device::DataStream>, vfio_mig_device::TransitionError> {
        self.0.set_state(target)
    }
    fn data_size(&self) -> Result<u64, vfio_mig_device::DeviceError> {
        self.0.data_size()
    }
    fn dma_logging_start(
        &self,
        page_size: u64,
        ranges: &[vfio_mig_device::IovaRange],
    ) -> Result<u64, vfio_mig_device::DeviceError> {
        self.0.dma_logging_start(page_size, ranges)
    }
    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), vfio_mig_device::DeviceError> {
        self.0.dma_logging_report(iova, length, page_size, bitmap)
    }
    fn dma_logging_stop(&self) -> Result<(), vfio_mig_device::DeviceError> {
        self.0.dma_logging_stop()
    }
    fn reset(&self) -> Result<(), vfio_mig_device::DeviceError> {
        self.0.reset()
    }
}

#[test]
fn a_device_without_migration_is_refused_clearly() {
    let src = blob(16 * KIB, 0x7, 61);
    let dst = blob(16 * KIB, 0x7, 62);
    let no_mig = vfio_mig_orchestrator::NamedDevice::new(
        "plain",
        std::sync::Arc::new(NoMigration(src.clone())),
    );
    let err = migrate_local(&[no_mig], &[named("d", &dst)], &src_opts(), &dst_opts()).unwrap_err();
    assert!(
        matches!(&*err.failure, Failure::NotMigratable { index: 0, reason, .. } if reason.contains("does not support migration")),
        "{}",
        err.report()
    );
    assert_eq!(err.stage, Stage::Discovery);
    assert_eq!(err.recovery.outcome, RecoveryOutcome::Untouched);
    assert_eq!(state(&src), DeviceState::Running);
    assert_eq!(state(&dst), DeviceState::Running);
}

#[test]
fn a_cancelled_migration_rolls_back() {
    use std::sync::Arc;
    use vfio_mig_orchestrator::{Cancel, Event};

    let p = Pair::new(64 * KIB, 0x7);
    let cancel = Cancel::new();
    let on_round = cancel.clone();
    let opts = SourceOptions {
        // Never converges, so only the cancellation ends the precopy phase.
        downtime_limit: Duration::ZERO,
        max_precopy_rounds: u32::MAX,
        cancel: Some(cancel),
        events: Some(Arc::new(move |e: &Event| {
            if matches!(e, Event::PrecopyRound { .. }) {
                on_round.cancel();
            }
        })),
        ..src_opts()
    };
    let err = migrate_local(
        &[named("s", &p.src)],
        &[named("d", &p.dst)],
        &opts,
        &dst_opts(),
    )
    .unwrap_err();
    assert!(
        matches!(*err.failure, Failure::Cancelled),
        "{}",
        err.report()
    );
    assert_eq!(
        err.recovery.outcome,
        RecoveryOutcome::RolledBack,
        "{}",
        err.report()
    );
    p.assert_rolled_back("cancelled");
}

#[test]
fn a_cancelled_destination_stops_waiting_and_touches_nothing() {
    use std::os::unix::net::UnixStream;
    use vfio_mig_orchestrator::Cancel;

    let p = Pair::new(16 * KIB, 0x7);
    // A source that connected and then says nothing: the destination blocks reading.
    let (dst_end, _silent_source) = UnixStream::pair().unwrap();
    let cancel = Cancel::new();
    let opts = DestinationOptions {
        cancel: Some(cancel.clone()),
        ..dst_opts()
    };
    let canceller = thread::spawn(move || {
        thread::sleep(Duration::from_millis(200));
        cancel.cancel();
    });
    let err = migrate_in(
        &[named("d", &p.dst)],
        Transport::unix(dst_end).unwrap(),
        &opts,
    )
    .unwrap_err();
    canceller.join().unwrap();
    assert!(
        matches!(*err.failure, Failure::Cancelled),
        "{}",
        err.report()
    );
    assert_eq!(state(&p.dst), DeviceState::Running);
    assert_eq!(
        contents(&p.dst),
        p.dst_before,
        "nothing was written into the destination"
    );
}
