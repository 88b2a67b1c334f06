//! The controller's error rules: a failed arc mid-path, broken hooks and ERROR, panicking
//! hooks, and use from several threads at once.

mod common;

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use common::{controller, Hook, Misbehave};
use vfio_mig_device::{
    write_all, DataStream, DeviceState, Errno, MigrationDevice, MigrationFeatures, ReadOutcome,
    StreamDirection,
};
use DeviceState::*;

#[test]
fn a_failed_arc_mid_path_leaves_the_last_state_reached_and_names_the_arc() {
    let device = controller(MigrationFeatures::ALL, false, 1);
    device.with_device(|d| d.fault = Some((Hook::Stop, Misbehave::Fail(Errno::EIO))));

    // RUNNING -> STOP_COPY is RUNNING -> RUNNING_P2P -> STOP -> STOP_COPY; the second arc fails.
    let err = device.set_state(StopCopy).unwrap_err();

    assert_eq!(err.failed_arc, Some((RunningP2p, Stop)));
    assert_eq!(err.reached, Some(RunningP2p));
    assert_eq!(err.requested, StopCopy);
    assert_eq!(err.errno(), Errno::EIO);
    assert_eq!(
        err.to_string(),
        "transition to stop-copy failed on arc running-p2p -> stop; device is in running-p2p"
    );
    assert_eq!(device.state().unwrap(), RunningP2p);
    assert_eq!(
        device.with_device(|d| d.calls.clone()),
        [Hook::SetP2p, Hook::Stop]
    );
}

#[test]
fn after_a_failed_arc_the_device_can_go_on() {
    let device = controller(MigrationFeatures::STOP_COPY, false, 1);
    device.with_device(|d| d.fault = Some((Hook::SaveBegin, Misbehave::Fail(Errno::ENOMEM))));
    let err = device.set_state(StopCopy).unwrap_err();
    assert_eq!(err.failed_arc, Some((Stop, StopCopy)));
    assert_eq!(device.state().unwrap(), Stop);

    device.with_device(|d| d.fault = None);
    let mut stream = device
        .set_state(StopCopy)
        .unwrap()
        .expect("stop -> stop-copy opens");
    let mut buf = [0; 4096];
    assert!(matches!(
        stream.read(&mut buf).unwrap(),
        ReadOutcome::Data(_)
    ));
}

#[test]
fn a_failed_resume_finish_stays_resuming_with_the_stream_open() {
    let device = controller(MigrationFeatures::STOP_COPY, false, 1);
    let mut stream = device.set_state(Resuming).unwrap().unwrap();
    write_all(&mut *stream, &[1, 2, 3]).unwrap();

    let err = device.set_state(Running).unwrap_err();

    assert_eq!(err.failed_arc, Some((Resuming, Stop)));
    assert_eq!(err.errno(), Errno::EINVAL);
    assert_eq!(device.state().unwrap(), Resuming);
    write_all(&mut *stream, &[4]).expect("the resuming session is still open");
}

#[test]
fn a_broken_hook_moves_to_error_and_only_reset_leaves_it() {
    let device = controller(MigrationFeatures::PRE_COPY, false, 1);
    let mut stream = device.set_state(PreCopy).unwrap().unwrap();
    device.with_device(|d| d.fault = Some((Hook::SaveStopCopy, Misbehave::Break(Errno::EIO))));

    let err = device.set_state(StopCopy).unwrap_err();

    assert_eq!(err.failed_arc, Some((PreCopy, StopCopy)));
    assert_eq!(err.reached, Some(Error));
    assert_eq!(device.state().unwrap(), Error);
    let mut buf = [0; 64];
    assert_eq!(stream.read(&mut buf).unwrap_err().errno(), Errno::ENODEV);
    for target in [Running, Stop, PreCopy, Error] {
        let refused = device.set_state(target).unwrap_err();
        assert_eq!(refused.errno(), Errno::EINVAL, "{target}");
        assert_eq!(refused.failed_arc, None);
        assert_eq!(device.state().unwrap(), Error);
    }
    device.data_size().expect("data size works in any state");

    device.with_device(|d| d.fault = None);
    device.reset().unwrap();
    assert_eq!(device.state().unwrap(), Running);
    assert_eq!(stream.read(&mut buf).unwrap_err().errno(), Errno::ENODEV);
    device
        .set_state(StopCopy)
        .unwrap()
        .expect("a new session after reset");
}

#[test]
fn a_broken_stream_read_moves_to_error() {
    let device = controller(MigrationFeatures::STOP_COPY, false, 1);
    let mut stream = device.set_state(StopCopy).unwrap().unwrap();
    device.with_device(|d| d.fault = Some((Hook::SaveRead, Misbehave::Break(Errno::EIO))));
    let mut buf = [0; 64];

    assert_eq!(stream.read(&mut buf).unwrap_err().errno(), Errno::EIO);

    assert_eq!(device.state().unwrap(), Error);
    assert_eq!(stream.read(&mut buf).unwrap_err().errno(), Errno::ENODEV);
}

#[test]
fn a_broken_precopy_info_moves_to_error() {
    let device = controller(MigrationFeatures::PRE_COPY, false, 1);
    let mut stream = device.set_state(PreCopy).unwrap().unwrap();
    device.with_device(|d| d.fault = Some((Hook::SavePending, Misbehave::Break(Errno::EIO))));

    assert_eq!(stream.precopy_info().unwrap_err().errno(), Errno::EIO);

    assert_eq!(device.state().unwrap(), Error);
}

#[test]
fn a_broken_size_estimate_moves_to_error() {
    let device = controller(MigrationFeatures::STOP_COPY, false, 1);
    let mut stream = device.set_state(StopCopy).unwrap().unwrap();
    device.with_device(|d| d.fault = Some((Hook::StopCopySize, Misbehave::Break(Errno::EIO))));

    assert_eq!(device.data_size().unwrap_err().errno(), Errno::EIO);

    assert_eq!(device.state().unwrap(), Error);
    let mut buf = [0; 64];
    assert_eq!(stream.read(&mut buf).unwrap_err().errno(), Errno::ENODEV);
}

#[test]
fn a_failed_size_estimate_changes_nothing() {
    let device = controller(MigrationFeatures::STOP_COPY, false, 1);
    device.with_device(|d| d.fault = Some((Hook::StopCopySize, Misbehave::Fail(Errno::EAGAIN))));

    assert_eq!(device.data_size().unwrap_err().errno(), Errno::EAGAIN);

    assert_eq!(device.state().unwrap(), Running);
}

#[test]
fn a_panicking_hook_leaves_error_until_reset() {
    let device = controller(MigrationFeatures::STOP_COPY, false, 1);
    device.with_device(|d| d.fault = Some((Hook::Stop, Misbehave::Panic)));

    let panicked = catch_unwind(AssertUnwindSafe(|| device.set_state(Stop)));

    assert!(panicked.is_err());
    assert_eq!(device.state().unwrap(), Error);
    assert_eq!(
        device.set_state(Running).unwrap_err().errno(),
        Errno::EINVAL
    );
    device.with_device(|d| d.fault = None);
    device.reset().unwrap();
    // The poison must not force ERROR again on the next lock.
    assert_eq!(device.state().unwrap(), Running);
    assert_eq!(device.state().unwrap(), Running);
    device
        .set_state(StopCopy)
        .unwrap()
        .expect("stop-copy after recovery");
    assert_eq!(device.state().unwrap(), StopCopy);
}

#[test]
fn a_panicking_stream_read_disables_the_stream() {
    let device = controller(MigrationFeatures::STOP_COPY, false, 1);
    let mut stream = device.set_state(StopCopy).unwrap().unwrap();
    device.with_device(|d| d.fault = Some((Hook::SaveRead, Misbehave::Panic)));
    let mut buf = [0; 64];

    assert!(catch_unwind(AssertUnwindSafe(|| stream.read(&mut buf))).is_err());

    assert_eq!(device.state().unwrap(), Error);
    assert_eq!(stream.read(&mut buf).unwrap_err().errno(), Errno::ENODEV);
}

#[test]
fn threads_hammering_one_device_keep_its_invariants() {
    let device = Arc::new(controller(MigrationFeatures::ALL, true, 1));
    let stop = Arc::new(AtomicBool::new(false));
    let (streams_tx, streams_rx) = mpsc::channel::<DataStream>();
    let targets = [
        Running, RunningP2p, Stop, StopCopy, PreCopy, PreCopyP2p, Resuming,
    ];

    // Moves the device around every state and hands each new stream to the reader.
    let mover = {
        let (device, stop) = (Arc::clone(&device), Arc::clone(&stop));
        thread::spawn(move || {
            let mut moves = 0u64;
            for target in targets.iter().cycle() {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let before = device.state().unwrap();
                match device.set_state(*target) {
                    Ok(Some(stream)) => streams_tx.send(stream).unwrap(),
                    Ok(None) => {}
                    // Only a refusal (STOP_COPY -> PRE_COPY*) or leaving RESUMING with no data.
                    Err(e) => {
                        let refusal = e.failed_arc.is_none()
                            && before == StopCopy
                            && matches!(target, PreCopy | PreCopyP2p);
                        let bad_resume = e.failed_arc == Some((Resuming, Stop));
                        assert!(refusal || bad_resume, "{before} -> {target}: {e}");
                        device.reset().unwrap();
                    }
                }
                moves += 1;
            }
            moves
        })
    };
    // Uses the streams while the device moves, and checks what it can see of the state.
    let reader = {
        let device = Arc::clone(&device);
        thread::spawn(move || {
            let mut buf = [0; 256];
            let mut ops = 0u64;
            let mut live = Vec::new();
            loop {
                match streams_rx.try_recv() {
                    Ok(stream) => live.push(stream),
                    Err(mpsc::TryRecvError::Empty) => {}
                    Err(mpsc::TryRecvError::Disconnected) => break,
                }
                let state = device.state().unwrap();
                assert!(state != Error && state.is_supported_by(MigrationFeatures::ALL));
                device.data_size().unwrap();
                device.with_device(|d| {
                    let _ = d.poke(ops as usize, ops as u8);
                });
                for stream in &mut live {
                    // An ended session gives ENODEV; the device refuses a stream of zeros
                    // that grows too long with EINVAL.
                    match stream.direction() {
                        StreamDirection::Saving => {
                            if let Err(e) = stream.read(&mut buf) {
                                assert_eq!(e.errno(), Errno::ENODEV, "{e}");
                            }
                        }
                        StreamDirection::Resuming => {
                            if let Err(e) = stream.write(&[0]) {
                                assert!([Errno::ENODEV, Errno::EINVAL].contains(&e.errno()), "{e}");
                            }
                        }
                    }
                }
                live.retain_mut(|s| {
                    s.precopy_info()
                        .map_or_else(|e| e.errno() != Errno::ENODEV, |_| true)
                });
                ops += 1;
            }
            ops
        })
    };
    thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let moves = mover.join().expect("mover thread");
    let ops = reader.join().expect("reader thread");
    assert!(moves > 10 && ops > 10, "moves {moves}, reader ops {ops}");
    assert_ne!(device.state().unwrap(), Error);
}
