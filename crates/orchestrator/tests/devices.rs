//! Migrations of the real emulated devices (`membuf`, `register`) and faults injected at the
//! user's view with `vfio_mig_devices::fault`.

use std::sync::Arc;
use std::time::Duration;

use vfio_mig_device::{Controller, DeviceState, Dma, Errno, MigrationDevice, MigrationFeatures};
use vfio_mig_devices::fault::{Fault, FaultAction, FaultPlan, FaultPoint, FaultyMigrationDevice};
use vfio_mig_devices::membuf::{self, Membuf, MembufConfig};
use vfio_mig_devices::register::{RegisterConfig, RegisterDevice};
use vfio_mig_orchestrator::{
    migrate_local, DestinationOptions, Failure, NamedDevice, RecoveryOutcome, SourceOptions,
    SwitchoverReason,
};

const MIB: u64 = 1 << 20;

fn src_opts() -> SourceOptions {
    SourceOptions {
        chunk_size: 64 * 1024,
        buffers_per_device: 2,
        ack_timeout: Duration::from_secs(20),
        io_timeout: Some(Duration::from_secs(20)),
        downtime_limit: Duration::from_millis(500),
        ..SourceOptions::default()
    }
}

fn dst_opts() -> DestinationOptions {
    DestinationOptions {
        buffers_per_device: 2,
        io_timeout: Some(Duration::from_secs(20)),
        drain_timeout: Duration::from_secs(2),
        ..DestinationOptions::default()
    }
}

fn membuf(size: u64, dirty_rate: u64, features: u64, seed: u64) -> Membuf {
    membuf::create(MembufConfig {
        size,
        dirty_rate,
        features: MigrationFeatures::from_bits(features).unwrap(),
        seed,
        ..MembufConfig::default()
    })
    .unwrap()
}

fn named(name: &str, dev: Arc<dyn MigrationDevice>) -> NamedDevice {
    NamedDevice::new(name, dev)
}

#[test]
fn membuf_migrates_live_under_every_feature_set() {
    for features in [0x1, 0x3, 0x5, 0x7] {
        let src = membuf(2 * MIB, 16 * MIB, features, 5);
        let dst = membuf(2 * MIB, 0, features, 6);
        let summary = migrate_local(
            &[named("src", src.migration())],
            &[named("dst", dst.migration())],
            &src_opts(),
            &dst_opts(),
        )
        .unwrap_or_else(|e| panic!("{features:#x}: {}", e.report()));
        assert_eq!(src.controller().state().unwrap(), DeviceState::Stop);
        assert_eq!(dst.controller().state().unwrap(), DeviceState::Running);
        // The frozen source state arrived whole.
        assert_eq!(src.regs().digest(), dst.regs().digest(), "{features:#x}");
        assert_eq!(summary.source.precopy_rounds > 0, features & 0x4 != 0);
    }
}

#[test]
fn membuf_precopy_converges_while_dirtying() {
    let src = membuf(8 * MIB, 32 * MIB, 0x7, 7);
    let dst = membuf(8 * MIB, 0, 0x7, 8);
    let summary = migrate_local(
        &[named("src", src.migration())],
        &[named("dst", dst.migration())],
        &SourceOptions {
            downtime_limit: Duration::from_millis(200),
            ..src_opts()
        },
        &dst_opts(),
    )
    .unwrap_or_else(|e| panic!("{}", e.report()));
    assert_eq!(summary.source.switchover, SwitchoverReason::Converged);
    assert!(summary.source.devices[0].pre_copy.bytes >= 8 * MIB);
    assert_eq!(src.regs().digest(), dst.regs().digest());
}

#[test]
fn membufs_and_a_register_device_migrate_together() {
    let srcs = [
        membuf(MIB, 8 * MIB, 0x7, 1),
        membuf(2 * MIB, 8 * MIB, 0x3, 2),
    ];
    let dsts = [membuf(MIB, 0, 0x7, 3), membuf(2 * MIB, 0, 0x3, 4)];
    let reg_src = RegisterDevice::new(RegisterConfig { seed: 9 });
    let reg_src_bar = reg_src.bar();
    let reg_src = Controller::new(reg_src, Dma::new()).unwrap();
    let reg_dst = RegisterDevice::new(RegisterConfig { seed: 10 });
    let reg_dst_bar = reg_dst.bar();
    let reg_dst = Controller::new(reg_dst, Dma::new()).unwrap();
    let mut sn: Vec<_> = srcs
        .iter()
        .enumerate()
        .map(|(i, m)| named(&format!("m{i}"), m.migration()))
        .collect();
    let mut dn: Vec<_> = dsts
        .iter()
        .enumerate()
        .map(|(i, m)| named(&format!("m{i}"), m.migration()))
        .collect();
    sn.push(named("reg", Arc::new(reg_src)));
    dn.push(named("reg", Arc::new(reg_dst)));
    // The register device has no P2P: refused unless the risk is accepted on both sides.
    let err = migrate_local(&sn, &dn, &src_opts(), &dst_opts()).unwrap_err();
    assert!(
        matches!(*err.failure, Failure::P2pRequired { .. }),
        "{}",
        err.report()
    );
    let summary = migrate_local(
        &sn,
        &dn,
        &SourceOptions {
            allow_non_p2p: true,
            ..src_opts()
        },
        &DestinationOptions {
            allow_non_p2p: true,
            ..dst_opts()
        },
    )
    .unwrap_or_else(|e| panic!("{}", e.report()));
    for (s, d) in srcs.iter().zip(&dsts) {
        assert_eq!(s.regs().digest(), d.regs().digest());
    }
    assert_eq!(reg_src_bar.digest(), reg_dst_bar.digest());
    assert_eq!(summary.destination.devices.len(), 3);
}

/// A still membuf behind a fault plan at the user's view.
struct Faulty {
    dev: Membuf,
    plan: FaultPlan,
    digest: u64,
}

impl Faulty {
    fn new(features: u64, seed: u64) -> Faulty {
        let dev = membuf(MIB, 0, features, seed);
        let digest = dev.regs().digest();
        Faulty {
            dev,
            plan: FaultPlan::new(),
            digest,
        }
    }

    fn migration(&self) -> Arc<dyn MigrationDevice> {
        Arc::new(FaultyMigrationDevice::new(
            self.dev.controller().clone(),
            self.plan.clone(),
        ))
    }
}

#[test]
fn faults_at_the_users_view_roll_back() {
    use FaultPoint::*;
    let fail = FaultAction::Fail(Errno::EIO);
    // (source fault, destination fault, features, the destination took any bytes)
    let cases: Vec<(Option<Fault>, Option<Fault>, u64)> = vec![
        (Some(Fault::new(StreamRead, fail).nth(3)), None, 0x7),
        (Some(Fault::new(StreamRead, fail).nth(3)), None, 0x3),
        (Some(Fault::new(PrecopyInfo, fail).nth(2)), None, 0x5),
        (
            Some(Fault::new(SetState(DeviceState::StopCopy), fail)),
            None,
            0x7,
        ),
        (
            Some(Fault::new(SetState(DeviceState::PreCopyP2p), fail)),
            None,
            0x7,
        ),
        // Corrupted or truncated device data: the destination's validation refuses it.
        (
            Some(Fault::new(StreamRead, FaultAction::FlipBit(12345)).nth(4)),
            None,
            0x3,
        ),
        (
            Some(Fault::new(StreamRead, FaultAction::Truncate).nth(4)),
            None,
            0x1,
        ),
        (None, Some(Fault::new(StreamWrite, fail).nth(3)), 0x7),
        (
            None,
            Some(Fault::new(SetState(DeviceState::Resuming), fail)),
            0x7,
        ),
        (
            None,
            Some(Fault::new(SetState(DeviceState::Stop), fail)),
            0x3,
        ),
        (
            None,
            Some(Fault::new(SetState(DeviceState::RunningP2p), fail)),
            0x3,
        ),
        (
            None,
            Some(Fault::new(SetState(DeviceState::Running), fail)),
            0x1,
        ),
    ];
    for (src_fault, dst_fault, features) in cases {
        let what = format!("{features:#x} src {src_fault:?} dst {dst_fault:?}");
        let src = Faulty::new(features, 21);
        let dst = Faulty::new(features, 22);
        if let Some(f) = src_fault {
            src.plan.arm(f);
        }
        if let Some(f) = dst_fault {
            dst.plan.arm(f);
        }
        let err = migrate_local(
            &[named("src", src.migration())],
            &[named("dst", dst.migration())],
            &src_opts(),
            &dst_opts(),
        )
        .unwrap_err();
        let report = err.report();
        assert!(report.contains("device 0 ("), "{what}: {report}");
        // The source runs its unchanged state again.
        assert_eq!(
            src.dev.controller().state().unwrap(),
            DeviceState::Running,
            "{what}"
        );
        assert_eq!(src.dev.regs().digest(), src.digest, "{what}: {report}");
        assert!(
            matches!(
                err.recovery.outcome,
                RecoveryOutcome::RolledBack | RecoveryOutcome::Untouched
            ),
            "{what}: {report}"
        );
        // The destination is out of RESUMING: reset, or never touched.
        assert_eq!(
            dst.dev.controller().state().unwrap(),
            DeviceState::Running,
            "{what}"
        );
        let peer = err.peer_recovery.as_ref().unwrap().outcome;
        assert!(
            matches!(peer, RecoveryOutcome::Reset | RecoveryOutcome::Untouched),
            "{what}: {report}"
        );
        if peer == RecoveryOutcome::Untouched {
            assert_eq!(dst.dev.regs().digest(), dst.digest, "{what}");
        }
    }
}

#[test]
fn a_failing_size_estimate_is_only_a_warning() {
    let src = Faulty::new(0x7, 31);
    let dst = membuf(MIB, 0, 0x7, 32);
    src.plan.arm(Fault::new(
        FaultPoint::DataSize,
        FaultAction::Fail(Errno::EIO),
    ));
    let summary = migrate_local(
        &[named("src", src.migration())],
        &[named("dst", dst.migration())],
        &src_opts(),
        &dst_opts(),
    )
    .unwrap_or_else(|e| panic!("{}", e.report()));
    assert!(!summary.source.warnings.is_empty());
    assert_eq!(src.dev.regs().digest(), dst.regs().digest());
}
