//! End-to-end migrations between in-process devices over real sockets and files.

mod common;

use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use common::*;
use vfio_mig_device::DeviceState;
use vfio_mig_orchestrator::{
    load, migrate_in, migrate_local, migrate_out, save, Address, DestinationOptions, DowntimeClock,
    Event, EventSink, Failure, Listener, NonConvergence, RecoveryOutcome, SourceOptions, Stage,
    SwitchoverReason, Transport,
};
use vfio_mig_stream::{Decoder, Event as StreamEvent};

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

fn recorder() -> (EventSink, Arc<Mutex<Vec<Event>>>) {
    let events = Arc::new(Mutex::new(Vec::new()));
    let sink_events = Arc::clone(&events);
    let sink: EventSink = Arc::new(move |e: &Event| sink_events.lock().unwrap().push(e.clone()));
    (sink, events)
}

#[test]
fn every_feature_set_migrates_a_changing_device() {
    for features in [0x1, 0x3, 0x5, 0x7] {
        let src = blob(64 * KIB, features, 1);
        let dst = blob(64 * KIB, features, 0);
        let work = Workload::start(&src, 16);
        let (sink, events) = recorder();
        let opts = SourceOptions {
            events: Some(sink),
            ..src_opts()
        };
        let summary = migrate_local(
            &[named("src", &src)],
            &[named("dst", &dst)],
            &opts,
            &dst_opts(),
        )
        .unwrap_or_else(|e| panic!("{features:#x}: {}", e.report()));
        drop(work);
        assert_eq!(state(&src), DeviceState::Stop, "{features:#x}");
        assert_eq!(state(&dst), DeviceState::Running, "{features:#x}");
        assert_eq!(
            contents(&src),
            contents(&dst),
            "{features:#x}: state differs"
        );
        let s = &summary.source;
        let precopy = features & 0x4 != 0;
        assert_eq!(s.precopy_rounds > 0, precopy, "{features:#x}");
        assert_eq!(s.switchover == SwitchoverReason::NoPrecopy, !precopy);
        assert_eq!(s.devices[0].pre_copy.bytes > 0, precopy);
        assert!(s.devices[0].stop_copy.bytes > 0);
        assert_eq!(s.bytes, summary.destination.bytes);
        assert_eq!(s.stream_bytes, summary.destination.stream_bytes);
        let downtime = s.downtime.unwrap();
        assert_eq!(downtime.clock, DowntimeClock::SharedClock);
        assert!(downtime.duration < Duration::from_secs(5));
        // The device went through the P2P states exactly when it has them.
        let events = events.lock().unwrap();
        let via_p2p = events.iter().any(|e| {
            matches!(e, Event::Transition { to, .. } if matches!(to, DeviceState::RunningP2p | DeviceState::PreCopyP2p))
        });
        assert_eq!(via_p2p, features & 0x2 != 0, "{features:#x}");
        // Every event serializes to one JSON object.
        for e in events.iter() {
            let json = serde_json::to_string(e).unwrap();
            assert!(json.starts_with("{\"event\":"), "{json}");
        }
    }
}

#[test]
fn several_devices_migrate_in_parallel() {
    let sizes = [64 * KIB, 128 * KIB, 32 * KIB];
    let features = [0x7, 0x3, 0x7];
    let srcs: Vec<_> = (0..3)
        .map(|i| blob(sizes[i], features[i], 10 + i as u64))
        .collect();
    let dsts: Vec<_> = (0..3).map(|i| blob(sizes[i], features[i], 0)).collect();
    let works: Vec<_> = srcs.iter().map(|s| Workload::start(s, 8)).collect();
    let src_named: Vec<_> = srcs
        .iter()
        .enumerate()
        .map(|(i, d)| named(&format!("s{i}"), d))
        .collect();
    let dst_named: Vec<_> = dsts
        .iter()
        .enumerate()
        .map(|(i, d)| named(&format!("d{i}"), d))
        .collect();
    let summary = migrate_local(&src_named, &dst_named, &src_opts(), &dst_opts())
        .unwrap_or_else(|e| panic!("{}", e.report()));
    drop(works);
    for i in 0..3 {
        assert_eq!(contents(&srcs[i]), contents(&dsts[i]), "device {i}");
        assert_eq!(state(&srcs[i]), DeviceState::Stop);
        assert_eq!(state(&dsts[i]), DeviceState::Running);
    }
    assert_eq!(summary.source.devices.len(), 3);
    assert_eq!(summary.destination.devices.len(), 3);
}

/// The chunks of several devices interleave in the stream: they are read in parallel.
#[test]
fn saved_stream_interleaves_devices() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("two.mig");
    let srcs: Vec<_> = (0..2).map(|i| blob(512 * KIB, 0x3, 20 + i)).collect();
    let src_named: Vec<_> = srcs
        .iter()
        .enumerate()
        .map(|(i, d)| named(&format!("s{i}"), d))
        .collect();
    save(&src_named, &path, &src_opts()).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    let mut decoder = Decoder::new();
    let mut order = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let (n, event) = decoder.feed(&bytes[at..]).unwrap();
        at += n;
        if let Some(StreamEvent::Data(c)) = event {
            order.push(c.device);
        }
    }
    let switches = order.windows(2).filter(|w| w[0] != w[1]).count();
    assert!(
        switches > 2,
        "devices were streamed one after another: {switches} switches"
    );
}

#[test]
fn several_devices_need_p2p_unless_the_risk_is_accepted() {
    let srcs = [blob(16 * KIB, 0x7, 1), blob(16 * KIB, 0x5, 2)];
    let dsts = [blob(16 * KIB, 0x7, 0), blob(16 * KIB, 0x5, 0)];
    let before: Vec<_> = srcs.iter().map(contents).collect();
    let sn: Vec<_> = srcs.iter().map(|d| named("s", d)).collect();
    let dn: Vec<_> = dsts.iter().map(|d| named("d", d)).collect();
    let err = migrate_local(&sn, &dn, &src_opts(), &dst_opts()).unwrap_err();
    assert!(
        matches!(*err.failure, Failure::P2pRequired { .. }),
        "{}",
        err.report()
    );
    assert_eq!(err.stage, Stage::Discovery);
    assert_eq!(err.recovery.outcome, RecoveryOutcome::Untouched);
    for (s, b) in srcs.iter().zip(&before) {
        assert_eq!(state(s), DeviceState::Running);
        assert_eq!(&contents(s), b);
    }
    // The destination applies the rule too, before touching its devices.
    let dst_only = DestinationOptions {
        allow_non_p2p: false,
        ..dst_opts()
    };
    let src_ok = SourceOptions {
        allow_non_p2p: true,
        ..src_opts()
    };
    let err = migrate_local(&sn, &dn, &src_ok, &dst_only).unwrap_err();
    assert!(
        matches!(*err.failure, Failure::Refused { .. }),
        "{}",
        err.report()
    );
    assert_eq!(err.recovery.outcome, RecoveryOutcome::Untouched);
    assert_eq!(
        err.peer_recovery.unwrap().outcome,
        RecoveryOutcome::Untouched
    );
    for d in &dsts {
        assert_eq!(state(d), DeviceState::Running);
        assert_eq!(d.with_device(|b| b.resets), 0);
    }
    // Accepted on both sides: it migrates.
    let dst_ok = DestinationOptions {
        allow_non_p2p: true,
        ..dst_opts()
    };
    migrate_local(&sn, &dn, &src_ok, &dst_ok).unwrap();
    for (s, d) in srcs.iter().zip(&dsts) {
        assert_eq!(contents(s), contents(d));
    }
}

#[test]
fn precopy_converges_with_a_device_that_keeps_dirtying() {
    let src = blob(256 * KIB, 0x7, 3);
    let dst = blob(256 * KIB, 0x7, 0);
    let work = Workload::start(&src, 64);
    let (sink, events) = recorder();
    let opts = SourceOptions {
        events: Some(sink),
        downtime_limit: Duration::from_millis(500),
        ..src_opts()
    };
    let summary = migrate_local(&[named("s", &src)], &[named("d", &dst)], &opts, &dst_opts())
        .unwrap_or_else(|e| panic!("{}", e.report()));
    drop(work);
    assert_eq!(summary.source.switchover, SwitchoverReason::Converged);
    assert_eq!(contents(&src), contents(&dst));
    let events = events.lock().unwrap();
    let rounds: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::PrecopyRound {
                initial_bytes,
                converged,
                ..
            } => Some((*initial_bytes, *converged)),
            _ => None,
        })
        .collect();
    assert_eq!(rounds.len() as u32, summary.source.precopy_rounds);
    // Converged only in the last round, and never with initial data unread.
    assert!(rounds.last().unwrap().1);
    assert!(rounds
        .iter()
        .all(|(initial, converged)| !converged || *initial == 0));
}

#[test]
fn precopy_that_cannot_converge_switches_over_or_aborts_as_chosen() {
    // A zero downtime limit is never met by a device that always has a trailer to send.
    let src = blob(64 * KIB, 0x7, 4);
    let dst = blob(64 * KIB, 0x7, 0);
    let work = Workload::start(&src, 16);
    let opts = SourceOptions {
        downtime_limit: Duration::ZERO,
        max_precopy_rounds: 3,
        on_no_convergence: NonConvergence::SwitchOver,
        ..src_opts()
    };
    let summary =
        migrate_local(&[named("s", &src)], &[named("d", &dst)], &opts, &dst_opts()).unwrap();
    drop(work);
    assert_eq!(summary.source.switchover, SwitchoverReason::MaxRounds);
    assert_eq!(summary.source.precopy_rounds, 3);
    assert_eq!(contents(&src), contents(&dst));

    let src = blob(64 * KIB, 0x7, 5);
    let dst = blob(64 * KIB, 0x7, 6);
    let dst_before = contents(&dst);
    let work = Workload::start(&src, 16);
    let opts = SourceOptions {
        on_no_convergence: NonConvergence::Abort,
        ..opts
    };
    let err =
        migrate_local(&[named("s", &src)], &[named("d", &dst)], &opts, &dst_opts()).unwrap_err();
    assert!(
        matches!(*err.failure, Failure::NotConverged { rounds: 3, .. }),
        "{}",
        err.report()
    );
    assert_eq!(err.stage, Stage::Precopy);
    assert_eq!(err.recovery.outcome, RecoveryOutcome::RolledBack);
    assert!(err.recovery.peer_notified, "ABORT was sent");
    assert_eq!(
        err.peer_recovery.as_ref().unwrap().outcome,
        RecoveryOutcome::Reset
    );
    // The source runs again and keeps changing.
    assert_eq!(state(&src), DeviceState::Running);
    let g = src.with_device(|d| d.generation);
    thread::sleep(Duration::from_millis(20));
    assert!(src.with_device(|d| d.generation) > g);
    drop(work);
    // Nothing half-loaded on the destination.
    assert_eq!(state(&dst), DeviceState::Running);
    assert_eq!(contents(&dst), dst_before);
}

#[test]
fn save_and_load_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob.mig");
    let src = blob(96 * KIB, 0x7, 7);
    let work = Workload::start(&src, 16);
    let summary = save(&[named("s", &src)], &path, &src_opts()).unwrap();
    drop(work);
    // Saved cold and left stopped: the file holds exactly the state the device keeps.
    assert_eq!(state(&src), DeviceState::Stop);
    assert_eq!(summary.precopy_rounds, 0);
    assert_eq!(summary.downtime, None);
    assert_eq!(summary.source_state, DeviceState::Stop);
    assert_eq!(
        std::fs::metadata(&path).unwrap().len(),
        summary.stream_bytes
    );
    let dst = blob(96 * KIB, 0x7, 0);
    let loaded = load(&path, &[named("d", &dst)], &dst_opts()).unwrap();
    assert_eq!(contents(&dst), contents(&src));
    assert_eq!(state(&dst), DeviceState::Running);
    assert_eq!(loaded.bytes, summary.bytes);
}

#[test]
fn load_refuses_corrupt_and_truncated_files_and_leaves_nothing_half_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("blob.mig");
    let src = blob(32 * KIB, 0x3, 8);
    save(&[named("s", &src)], &path, &src_opts()).unwrap();
    let good = std::fs::read(&path).unwrap();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("corrupt", {
            let mut b = good.clone();
            let mid = b.len() / 2;
            b[mid] ^= 1;
            b
        }),
        ("truncated", good[..good.len() - 10].to_vec()),
        ("truncated in the header", good[..20].to_vec()),
    ];
    for (what, bytes) in cases {
        std::fs::write(&path, &bytes).unwrap();
        let dst = blob(32 * KIB, 0x3, 9);
        let before = contents(&dst);
        let err = load(&path, &[named("d", &dst)], &dst_opts()).unwrap_err();
        let Failure::Decode(decode) = &*err.failure else {
            panic!("{what}: {}", err.report())
        };
        assert!(err.report().contains("offset"), "{what}: {}", err.report());
        if what.starts_with("truncated") {
            assert!(decode.is_truncation(), "{what}");
        }
        assert_eq!(state(&dst), DeviceState::Running, "{what}");
        assert_eq!(contents(&dst), before, "{what}: half-loaded");
        let expected = if what.ends_with("header") {
            RecoveryOutcome::Untouched
        } else {
            RecoveryOutcome::Reset
        };
        assert_eq!(err.recovery.outcome, expected, "{what}");
    }
}

#[test]
fn a_failed_save_restores_the_device_and_removes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.mig");
    let src = blob(32 * KIB, 0x7, 11);
    let before = contents(&src);
    inject(&src, Hook::Read(8 * KIB), false);
    let err = save(&[named("s", &src)], &path, &src_opts()).unwrap_err();
    assert!(
        matches!(*err.failure, Failure::Device { .. }),
        "{}",
        err.report()
    );
    assert_eq!(err.recovery.outcome, RecoveryOutcome::RolledBack);
    assert_eq!(state(&src), DeviceState::Running);
    assert_eq!(contents(&src), before);
    assert!(!path.exists());
}

#[test]
fn migrates_over_tcp_between_two_threads() {
    let listener = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
    let address: Address = listener.local_address().unwrap();
    let src = blob(128 * KIB, 0x7, 12);
    let dst = blob(128 * KIB, 0x7, 0);
    let dst2 = dst.clone();
    let receiver = thread::spawn(move || {
        let transport = listener.accept().unwrap();
        migrate_in(&[named("d", &dst2)], transport, &dst_opts())
    });
    let work = Workload::start(&src, 16);
    let transport = Transport::connect(&address).unwrap();
    let summary = migrate_out(&[named("s", &src)], transport, &src_opts())
        .unwrap_or_else(|e| panic!("{}", e.report()));
    drop(work);
    let dsum = receiver.join().unwrap().unwrap();
    assert_eq!(contents(&src), contents(&dst));
    assert_eq!(summary.downtime.unwrap().clock, DowntimeClock::AckReceipt);
    assert!(summary.transport.starts_with("tcp:127.0.0.1:"));
    assert_eq!(dsum.bytes, summary.bytes);
}
