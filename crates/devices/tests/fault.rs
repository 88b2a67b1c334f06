//! The fault injectors drive the controller's error rules, can be steered mid-migration,
//! and make the conformance suite fail exactly the checks that guard the rule they break.

use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use vfio_mig_device::conformance::{run_all, run_check, Role, Target};
use vfio_mig_device::{
    write_all, Controller, DataStream, DeviceError, DeviceState, Dma, Errno, MigrationDevice,
    ReadOutcome,
};
use vfio_mig_devices::fault::{
    Fault, FaultAction, FaultPlan, FaultPoint, Faulty, FaultyMigrationDevice, Hook,
};
use vfio_mig_devices::register::{RegisterConfig, RegisterDevice, STREAM_LEN};
use DeviceState::*;

type FaultyRegister = Controller<Faulty<RegisterDevice>>;

fn faulty_register(seed: u64, plan: &FaultPlan) -> FaultyRegister {
    let device = RegisterDevice::new(RegisterConfig { seed });
    Controller::new(Faulty::new(device, plan.clone()), Dma::new()).unwrap()
}

fn read_to_end(stream: &mut DataStream) -> Result<Vec<u8>, DeviceError> {
    let mut bytes = Vec::new();
    let mut buf = [0; 64];
    while let ReadOutcome::Data(n) = stream.read(&mut buf)? {
        bytes.extend_from_slice(&buf[..n]);
    }
    Ok(bytes)
}

fn digest(device: &FaultyRegister) -> Result<Vec<u8>, DeviceError> {
    Ok(device.with_device(|d| d.inner().bar().state().to_vec()))
}

/// A conformance target whose every device carries `fault`.
fn target_with(fault: Fault) -> Target<FaultyRegister> {
    Target::new(format!("{fault:?}"), move |role: Role| {
        let plan = FaultPlan::new();
        plan.arm(fault);
        Ok(faulty_register(role.seed(), &plan))
    })
    .with_digest(digest)
}

/// A conformance target whose every device is wrapped at the user's view with `fault`.
fn user_view_target_with(fault: Fault) -> Target<FaultyMigrationDevice<FaultyRegister>> {
    Target::new(format!("{fault:?}"), move |role: Role| {
        let plan = FaultPlan::new();
        plan.arm(fault);
        Ok(FaultyMigrationDevice::new(
            faulty_register(role.seed(), &FaultPlan::new()),
            plan,
        ))
    })
}

fn assert_check_fails<D: MigrationDevice>(target: &Target<D>, check: &str, needle: &str) {
    let failure = run_check(target, check).expect_err(check);
    assert!(
        failure.detail().contains(needle),
        "{check}: {}",
        failure.detail()
    );
}

#[test]
fn a_faultless_wrapper_passes_the_whole_suite() {
    let report = run_all(&target_with(Fault::new(
        FaultPoint::Hook(Hook::Stop),
        FaultAction::Stall(Duration::ZERO),
    )));
    assert!(report.passed(), "{report}");
}

#[test]
fn a_failed_read_mid_migration_loses_nothing() {
    let plan = FaultPlan::new();
    let source = faulty_register(1, &plan);
    let destination = faulty_register(2, &FaultPlan::new());
    let mut saving = source.set_state(StopCopy).unwrap().unwrap();
    let mut buf = [0; 100];
    let mut bytes = Vec::new();
    let ReadOutcome::Data(n) = saving.read(&mut buf).unwrap() else {
        panic!("the stream starts with data")
    };
    bytes.extend_from_slice(&buf[..n]);

    // Armed mid-migration: the next read fails, then reads go on where they were.
    let fault = plan.arm(
        Fault::new(
            FaultPoint::Hook(Hook::SaveRead),
            FaultAction::Fail(Errno::EINTR),
        )
        .nth(1),
    );
    assert_eq!(saving.read(&mut buf).unwrap_err().errno(), Errno::EINTR);
    bytes.extend(read_to_end(&mut saving).unwrap());

    assert_eq!(plan.fired(fault), 1);
    assert_eq!(bytes.len(), STREAM_LEN);
    let mut resuming = destination.set_state(Resuming).unwrap().unwrap();
    write_all(&mut *resuming, &bytes).unwrap();
    destination.set_state(Running).unwrap();
    assert_eq!(digest(&destination).unwrap(), digest(&source).unwrap());
}

#[test]
fn a_broken_arc_moves_to_error_until_reset() {
    let plan = FaultPlan::new();
    let device = faulty_register(1, &plan);
    plan.arm(Fault::new(
        FaultPoint::Arc(Stop, Resuming),
        FaultAction::Break(Errno::EIO),
    ));

    let err = device.set_state(Resuming).unwrap_err();

    assert_eq!(err.failed_arc, Some((Stop, Resuming)));
    assert!(err.cause.is_broken());
    assert_eq!(device.state().unwrap(), Error);
    assert_eq!(
        device.set_state(Running).unwrap_err().errno(),
        Errno::EINVAL
    );
    plan.clear();
    device.reset().unwrap();
    assert_eq!(device.state().unwrap(), Running);
    device
        .set_state(Resuming)
        .unwrap()
        .expect("resuming after reset");
}

#[test]
fn a_panicking_hook_moves_to_error() {
    let plan = FaultPlan::new();
    let device = faulty_register(1, &plan);
    plan.arm(Fault::new(
        FaultPoint::Hook(Hook::SaveBegin),
        FaultAction::Panic,
    ));

    let outcome =
        std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| device.set_state(StopCopy)));

    assert!(outcome.is_err());
    assert_eq!(device.state().unwrap(), Error);
    plan.clear();
    device.reset().unwrap();
    assert_eq!(device.state().unwrap(), Running);
}

#[test]
fn a_stalled_hook_delays_the_transition_and_the_plan_stays_usable() {
    let plan = FaultPlan::new();
    let device = Arc::new(faulty_register(1, &plan));
    let stall = plan.arm(Fault::new(
        FaultPoint::Hook(Hook::Stop),
        FaultAction::Stall(Duration::from_millis(300)),
    ));
    let started = Instant::now();
    let mover = {
        let device = Arc::clone(&device);
        thread::spawn(move || device.set_state(Stop).map(|_| ()))
    };
    while plan.fired(stall) == 0 {
        thread::sleep(Duration::from_millis(1));
    }

    // While the hook sleeps, the plan can be changed at once.
    let changed = Instant::now();
    plan.disarm(stall);
    plan.arm(Fault::new(
        FaultPoint::Hook(Hook::Start),
        FaultAction::Fail(Errno::EBUSY),
    ));
    assert!(changed.elapsed() < Duration::from_millis(100));

    mover.join().unwrap().unwrap();
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(device.state().unwrap(), Stop);
    assert_eq!(device.set_state(Running).unwrap_err().errno(), Errno::EBUSY);
}

#[test]
fn a_bit_flipped_on_the_way_in_is_refused_at_resume() {
    let source = faulty_register(1, &FaultPlan::new());
    let plan = FaultPlan::new();
    let destination = faulty_register(2, &plan);
    let bytes = read_to_end(&mut source.set_state(StopCopy).unwrap().unwrap()).unwrap();
    plan.arm(Fault::new(
        FaultPoint::Hook(Hook::ResumeWrite),
        FaultAction::FlipBit(8 * 100 + 3),
    ));
    let mut resuming = destination.set_state(Resuming).unwrap().unwrap();
    write_all(&mut *resuming, &bytes).unwrap();

    let err = destination.set_state(Stop).unwrap_err();

    assert!(err.cause.message().contains("checksum"), "{}", err.cause);
}

#[test]
fn user_view_faults_fail_transitions_and_stream_calls() {
    let plan = FaultPlan::new();
    let device = FaultyMigrationDevice::new(faulty_register(1, &FaultPlan::new()), plan.clone());
    plan.arm(Fault::new(
        FaultPoint::SetState(Resuming),
        FaultAction::Fail(Errno::ENOMEM),
    ));
    plan.arm(Fault::new(FaultPoint::StreamRead, FaultAction::Fail(Errno::EIO)).nth(2));

    let err = device.set_state(Resuming).unwrap_err();
    assert_eq!((err.errno(), err.reached), (Errno::ENOMEM, Some(Running)));
    let mut saving = device.set_state(StopCopy).unwrap().unwrap();
    let mut buf = [0; 16];
    assert!(saving.read(&mut buf).is_ok());
    assert_eq!(saving.read(&mut buf).unwrap_err().errno(), Errno::EIO);
    assert!(saving.read(&mut buf).is_ok());
}

// ---- the conformance suite catches what the faults break ---------------------------------

#[test]
fn a_device_accepting_truncated_streams_fails_conformance() {
    let t = target_with(Fault::new(
        FaultPoint::Hook(Hook::ResumeFinish),
        FaultAction::Pretend,
    ));
    assert_check_fails(&t, "truncated_stream_rejected", "accepted the first");
}

#[test]
fn extra_bytes_at_the_end_fail_the_round_trip() {
    let t = target_with(Fault::new(
        FaultPoint::Hook(Hook::SaveRead),
        FaultAction::ExtraBytes(3),
    ));
    assert_check_fails(&t, "save_resume_round_trip", "longer than 296 bytes");
}

#[test]
fn a_flipped_bit_fails_the_round_trip() {
    let t = target_with(
        Fault::new(
            FaultPoint::Hook(Hook::SaveRead),
            FaultAction::FlipBit(8 * 100 + 3),
        )
        .nth(1),
    );
    assert_check_fails(&t, "save_resume_round_trip", "checksum");
}

#[test]
fn a_truncated_save_fails_the_round_trip() {
    let t = target_with(Fault::new(FaultPoint::Hook(Hook::SaveRead), FaultAction::Truncate).nth(1));
    assert_check_fails(&t, "save_resume_round_trip", "truncated");
}

#[test]
fn a_resume_that_ignores_the_stream_fails_the_digest_comparison() {
    // Validation runs, but a pretended finish never installs the state.
    let t = target_with(Fault::new(
        FaultPoint::Arc(Resuming, Stop),
        FaultAction::Pretend,
    ));
    assert_check_fails(&t, "save_resume_round_trip", "differs from the source's");
}

#[test]
fn a_failing_arc_fails_the_arc_checks_and_names_it() {
    let t = target_with(Fault::new(
        FaultPoint::Arc(Stop, Running),
        FaultAction::Fail(Errno::EIO),
    ));
    assert_check_fails(&t, "direct_arcs", "arc stop -> running");
    assert_check_fails(&t, "combination_paths", "arc stop -> running");
}

#[test]
fn an_ignored_reset_fails_reset_from_every_state() {
    let t = user_view_target_with(Fault::new(FaultPoint::Reset, FaultAction::Pretend));
    assert_check_fails(&t, "reset_from_every_state", "after a reset in stop,");
}

#[test]
fn a_transition_that_does_nothing_fails_combination_paths() {
    let t = user_view_target_with(Fault::new(FaultPoint::SetState(Stop), FaultAction::Pretend));
    assert_check_fails(&t, "combination_paths", "expected stop");
}

#[test]
fn a_wrong_errno_for_refusals_fails_refused_transitions() {
    let t = user_view_target_with(Fault::new(
        FaultPoint::SetState(Error),
        FaultAction::Fail(Errno::EIO),
    ));
    assert_check_fails(
        &t,
        "refused_transitions",
        "failed with EIO; expected EINVAL",
    );
}

#[test]
fn data_after_the_end_fails_stop_copy_stream_ends() {
    // Reads of a 296-byte stream into 64 KiB buffers: read 1 gives everything, read 2 gives
    // End, read 3 (the first after End) is where the extra byte comes.
    let t = user_view_target_with(
        Fault::new(FaultPoint::StreamRead, FaultAction::ExtraBytes(1)).nth(3),
    );
    assert_check_fails(&t, "stop_copy_stream_ends", "after End");
}

#[test]
fn logging_that_pretends_to_start_fails_dma_logging() {
    let t = user_view_target_with(Fault::new(
        FaultPoint::DmaLoggingStart,
        FaultAction::Pretend,
    ))
    .expect_dma_logging(false);
    assert_check_fails(&t, "dma_logging", "expected not supported");
}
