//! Our client against our server: a live migration of a changing membuf from one served
//! device into another, P2P states, the precopy-info extension, and a client that does not
//! announce the extension (a standard peer) seeing none of it.

mod server_support;

use std::time::Duration;

use server_support::*;
use vfio_mig_device::{write_all, DeviceState, MigrationDevice, ReadOutcome};
use vfio_mig_devices::membuf::{self, MembufConfig};
use vfio_mig_uapi::{Errno, MigrationFeatures};
use vfio_mig_vfio_user::client::ClientOptions;

const MIB: u64 = 1 << 20;

use server_support::membuf_config as config;

#[test]
fn live_migration_of_a_changing_membuf_through_two_servers() {
    let src = Served::membuf(config(4 * MIB, 16 * MIB, 7));
    let dst = Served::membuf(config(4 * MIB, 0, 8));
    assert!(src.remote.client().negotiated().precopy_info());
    assert_eq!(src.identity().unwrap(), dst.identity().unwrap());
    let estimate = src.data_size().unwrap();
    assert!(estimate >= 4 * MIB);

    let mut save = src
        .set_state(DeviceState::PreCopy)
        .unwrap()
        .expect("a stream");
    let mut restore = dst
        .set_state(DeviceState::Resuming)
        .unwrap()
        .expect("a stream");
    let mut buf = vec![0u8; MIB as usize];
    let mut moved = 0u64;
    let mut rounds = 0;
    // Pre-copy while the source keeps changing: drain the initial bytes, then a few rounds
    // of dirty pages.
    loop {
        match save.read(&mut buf).unwrap() {
            ReadOutcome::Data(n) => {
                write_all(restore.as_mut(), &buf[..n]).unwrap();
                moved += n as u64;
            }
            ReadOutcome::NothingNow => {
                let info = save.precopy_info().unwrap();
                rounds += 1;
                if info.initial_bytes == 0 && rounds >= 3 {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            ReadOutcome::End => panic!("End in PRE_COPY"),
        }
    }
    assert!(moved >= 4 * MIB);
    // Quiesce P2P, then stop-copy on the same stream.
    assert!(src.set_state(DeviceState::PreCopyP2p).unwrap().is_none());
    assert!(src.set_state(DeviceState::StopCopy).unwrap().is_none());
    let frozen = src.membuf.regs().digest();
    assert_eq!(src.digest().unwrap(), frozen);
    loop {
        match save.read(&mut buf).unwrap() {
            ReadOutcome::Data(n) => write_all(restore.as_mut(), &buf[..n]).unwrap(),
            ReadOutcome::End => break,
            ReadOutcome::NothingNow => panic!("NothingNow in STOP_COPY"),
        }
    }
    src.set_state(DeviceState::Stop).unwrap();
    assert_eq!(save.read(&mut buf).unwrap_err().errno(), Errno::ENODEV);
    dst.set_state(DeviceState::Stop).unwrap();
    assert_eq!(
        dst.digest().unwrap(),
        frozen,
        "the destination holds the frozen state"
    );
    dst.set_state(DeviceState::Running).unwrap();
    assert_eq!(dst.state().unwrap(), DeviceState::Running);
}

#[test]
fn cold_save_of_a_still_membuf_and_resume() {
    let src = Served::membuf(config(2 * MIB, 0, 1));
    let dst = Served::membuf(config(2 * MIB, 0, 2));
    assert_ne!(src.digest().unwrap(), dst.digest().unwrap());
    // RUNNING -> STOP_COPY walks through STOP; the stream opens on the last arc.
    let estimate = src.data_size().unwrap();
    let mut save = src.set_state(DeviceState::StopCopy).unwrap().unwrap();
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 300_000];
    while let ReadOutcome::Data(n) = save.read(&mut buf).unwrap() {
        stream.extend_from_slice(&buf[..n]);
    }
    assert_eq!(
        stream.len() as u64,
        membuf::format::full_stream_len(2 * MIB)
    );
    assert_eq!(estimate, stream.len() as u64);
    let mut restore = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
    write_all(restore.as_mut(), &stream).unwrap();
    dst.set_state(DeviceState::Running).unwrap();
    src.set_state(DeviceState::Stop).unwrap();
    assert_eq!(dst.membuf.regs().digest(), src.digest().unwrap());
}

#[test]
fn p2p_states_work_when_the_device_has_them_and_not_otherwise() {
    let dev = Served::membuf(config(256 * 1024, 0, 1));
    assert_eq!(dev.features().unwrap(), MigrationFeatures::ALL);
    assert!(dev.set_state(DeviceState::RunningP2p).unwrap().is_none());
    assert!(dev.membuf.controller().with_device(|d| d.p2p_quiesced()));
    let mut save = dev.set_state(DeviceState::PreCopyP2p).unwrap().unwrap();
    let info = save.precopy_info().unwrap();
    assert!(info.initial_bytes > 0);
    dev.set_state(DeviceState::RunningP2p).unwrap();
    dev.set_state(DeviceState::Running).unwrap();

    let plain = Served::membuf(MembufConfig {
        features: MigrationFeatures::PRE_COPY,
        ..config(256 * 1024, 0, 1)
    });
    assert_eq!(plain.features().unwrap(), MigrationFeatures::PRE_COPY);
    let e = plain.set_state(DeviceState::RunningP2p).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
    assert_eq!(plain.state().unwrap(), DeviceState::Running);
}

#[test]
fn a_standard_peer_sees_no_extension() {
    let options = ClientOptions {
        announce_extensions: false,
        ..ClientOptions::default()
    };
    let dev = Served::membuf_with(config(256 * 1024, 0, 3), options);
    let negotiated = dev.remote.client().negotiated();
    assert!(negotiated.extension.is_none());
    assert!(!negotiated.precopy_info());
    // Only what libvfio-user's server announces, plus write_multiple.
    let caps = &negotiated.server;
    assert_eq!(caps.max_msg_fds, Some(8));
    assert_eq!(caps.max_data_xfer_size, Some(1 << 20));
    assert_eq!(caps.migration_pgsize(), Some(4096));
    // The extension feature is an unknown feature to it; plain uAPI still works.
    let raw = dev.remote.client().feature_get_raw(0xF001, 16).unwrap_err();
    assert_eq!(raw.errno(), Errno::ENOTTY);
    let mut save = dev.set_state(DeviceState::PreCopy).unwrap().unwrap();
    assert_eq!(save.precopy_info().unwrap_err().errno(), Errno::ENOTTY);
    assert!(dev.data_size().unwrap() > 0);
    // Identity falls back to the PCI ids in config space.
    assert_eq!(
        dev.identity().unwrap().kind,
        format!(
            "pci:{:04x}:{:04x}",
            membuf::PCI_VENDOR_ID,
            membuf::PCI_DEVICE_ID
        )
    );
}

#[test]
fn a_reconnecting_orchestrator_continues_or_rolls_back() {
    let size = MIB;
    let dev = Served::membuf(config(size, 0, 4));
    let save = dev.set_state(DeviceState::StopCopy).unwrap().unwrap();
    drop(save);
    // One plain MIG_DATA_READ (the stream's reads pipeline the next request in STOP_COPY,
    // and a request in flight when the connection dies is lost with it).
    let mut buf = vec![0u8; 100_000];
    let first = dev.remote.client().mig_data_read(&mut buf).unwrap();
    assert_eq!(first, buf.len());
    // The orchestrator's connection goes away in the middle of STOP_COPY; it reconnects.
    let path = dev.path().to_path_buf();
    let Served {
        remote,
        membuf: m,
        server,
    } = dev;
    drop(remote);
    let again = vfio_mig_vfio_user::client::RemoteDevice::connect(&path).unwrap();
    assert_eq!(again.state().unwrap(), DeviceState::StopCopy);
    // Continue reading over raw MIG_DATA_READ, then roll back to RUNNING.
    let mut rest = 0u64;
    loop {
        let n = again.client().mig_data_read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        rest += n as u64;
    }
    assert_eq!(first as u64 + rest, membuf::format::full_stream_len(size));
    again.set_state(DeviceState::Running).unwrap();
    assert_eq!(m.controller().state().unwrap(), DeviceState::Running);
    drop(again);
    drop(server);
}

/// Regression: reply prefixes were once checked against the protocol's default 1 MiB
/// instead of the negotiated limits, so transfers above 1 MiB failed with EPROTO.
#[test]
fn transfers_above_the_default_size_use_the_negotiated_limits() {
    use vfio_mig_vfio_user::client::{Client, RemoteDevice};
    use vfio_mig_vfio_user::server::{Server, ServerConfig};

    const XFER: u32 = 4 << 20;
    let (membuf, hosted) = membuf_with(config(8 * MIB, 0, 3));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.sock");
    let config = ServerConfig {
        max_data_xfer_size: XFER,
        ..ServerConfig::default()
    };
    let mut server = Server::bind_with(&path, hosted, config).unwrap();
    let stop = server.stop_handle();
    let thread = std::thread::spawn(move || server.serve_forever());
    let options = ClientOptions {
        max_data_xfer_size: XFER,
        ..ClientOptions::default()
    };
    let remote = RemoteDevice::new(std::sync::Arc::new(
        Client::connect_with(&path, options).unwrap(),
    ));
    assert_eq!(remote.client().negotiated().max_read, XFER);

    let mut save = remote.set_state(DeviceState::StopCopy).unwrap().unwrap();
    let mut buf = vec![0u8; XFER as usize];
    let mut total = 0u64;
    let mut largest = 0;
    while let ReadOutcome::Data(n) = save.read(&mut buf).unwrap() {
        total += n as u64;
        largest = largest.max(n);
    }
    assert_eq!(total, membuf::format::full_stream_len(8 * MIB));
    assert!(largest > 1 << 20, "reads of more than 1 MiB: {largest}");
    drop(save);
    drop(remote);
    drop(membuf);
    stop.stop();
    thread.join().unwrap().unwrap();
}
