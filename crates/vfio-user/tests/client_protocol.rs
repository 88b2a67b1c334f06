//! The client against scripted servers: negotiation outcomes, limits and chunking, fd
//! passing, server-initiated commands, mismatched replies, fallbacks and session rules.

use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use vfio_mig_device::{write_all, DeviceIdentity, MigrationDevice, PrecopyInfo, ReadOutcome};
use vfio_mig_uapi::{DeviceState, Errno, MigrationFeatures};
use vfio_mig_vfio_user::client::{Client, ClientError, ClientOptions, RemoteDevice};
use vfio_mig_vfio_user::codec::{
    Body, Capabilities, Command, DeviceFeature, DmaAccess, DmaData, FeatureData, Header, Limits,
    Message, MigDataReadReply, RegionAccess, RegionCap, RegionInfo, RegionInfoReply, Reply,
    Request, SparseMmapArea, Version, FEATURE_MIGRATION, FEATURE_MIG_DATA_SIZE,
    FEATURE_MIG_DEVICE_STATE, HEADER_SIZE, REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ,
};
use vfio_mig_vfio_user::extension::{
    encode_precopy_info, VfioMigCapability, FEATURE_PRECOPY_INFO, LEGACY_MAX_PAYLOAD,
};
use vfio_mig_vfio_user::socket::{Connection, SocketError};

/// How a scripted server announces itself.
enum Flavor {
    /// Like libvfio-user: no extension object, 8 fds, 1 MiB transfers.
    Standard,
    /// A vfio-mig server with whole-message reads, precopy info and an identity.
    VfioMig,
    /// A standard server taking only `max_msg_fds` fds.
    Fds(u32),
}

fn version_reply(flavor: &Flavor) -> Version<'static> {
    let mut caps = Capabilities {
        max_msg_fds: Some(8),
        max_data_xfer_size: Some(1 << 20),
        ..Capabilities::default()
    };
    match flavor {
        Flavor::Standard => Version::new(0, 2, &caps).unwrap(),
        Flavor::Fds(n) => {
            caps.max_msg_fds = Some(*n);
            Version::new(0, 2, &caps).unwrap()
        }
        Flavor::VfioMig => {
            let id = DeviceIdentity {
                kind: "membuf".into(),
                version: "1".into(),
                compat: vec![0xab, 0xcd],
            };
            let ext = VfioMigCapability::server(&id).to_extensions().unwrap();
            Version::with_extensions(0, 2, &caps, &ext).unwrap()
        }
    }
}

/// What a handler sees of one request.
struct Req<'a> {
    header: Header,
    body: Request<'a>,
    fds: Vec<OwnedFd>,
}

/// Runs a server that negotiates as `flavor` and hands every later request to `handle`
/// until the client hangs up; returns the number of requests handled.
fn serve<F>(flavor: Flavor, mut handle: F) -> (UnixStream, JoinHandle<usize>)
where
    F: FnMut(&mut Connection, Req<'_>) + Send + 'static,
{
    let (ours, theirs) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut conn = Connection::new(theirs);
        let limits = Limits::default();
        let hello = conn.recv(&limits).unwrap();
        let header = hello.header();
        assert_eq!(header.cmd, Command::Version.raw());
        let reply = Message::reply(header.msg_id, Reply::Version(version_reply(&flavor)));
        conn.send_message(&reply, &[]).unwrap();
        let mut handled = 0;
        loop {
            let (header, bytes, fds) = match conn.recv(&limits) {
                Ok(r) => (r.header(), r.bytes.to_vec(), r.fds),
                Err(SocketError::Closed) => return handled,
                Err(e) => panic!("after {handled} requests: {e:?}"),
            };
            let Body::Request(body) = Message::decode(&bytes, &limits).unwrap().body else {
                panic!("client sent a non-request {header:?}");
            };
            handle(&mut conn, Req { header, body, fds });
            handled += 1;
        }
    });
    (ours, server)
}

fn client_for(stream: UnixStream) -> Arc<Client> {
    Arc::new(Client::from_stream(stream, ClientOptions::default()).unwrap())
}

fn answer(conn: &mut Connection, req: &Header, reply: Reply<'_>) {
    conn.send_message(&Message::reply(req.msg_id, reply), &[])
        .unwrap();
}

fn refuse(conn: &mut Connection, req: &Header, errno: Errno) {
    conn.send_message(&Message::error_reply(req, errno), &[])
        .unwrap();
}

/// Answers MIGRATION GET with `features` and state GET/SET like a device starting in
/// `state`; returns false for anything else.
fn answer_state_machine(
    conn: &mut Connection,
    req: &Req<'_>,
    features: MigrationFeatures,
    state: &mut DeviceState,
) -> bool {
    let Request::DeviceFeature(f) = &req.body else {
        return false;
    };
    let data = match (f.index(), f.is_get()) {
        (FEATURE_MIGRATION, true) => FeatureData::Migration {
            flags: features.bits(),
        },
        (FEATURE_MIG_DEVICE_STATE, true) => FeatureData::MigDeviceState {
            state: *state,
            data_fd: 0,
        },
        (FEATURE_MIG_DEVICE_STATE, false) => {
            let FeatureData::MigDeviceState { state: target, .. } = f.data else {
                panic!("SET without a state");
            };
            *state = target;
            f.data.clone()
        }
        _ => return false,
    };
    answer(
        conn,
        &req.header,
        Reply::DeviceFeature(DeviceFeature::new(f.flags, f.index(), data)),
    );
    true
}

#[test]
fn standard_server_gets_at_most_32k_payloads() {
    let (stream, server) = serve(Flavor::Standard, |conn, req| match req.body {
        Request::RegionWrite(w) => {
            assert!(w.data.len() + RegionAccess::SIZE <= LEGACY_MAX_PAYLOAD as usize);
            answer(
                conn,
                &req.header,
                Reply::RegionWrite(RegionAccess {
                    offset: w.offset,
                    region: w.region,
                    count: w.data.len() as u32,
                }),
            );
        }
        other => panic!("{other:?}"),
    });
    let client = client_for(stream);
    let n = client.negotiated();
    assert_eq!(n.max_payload, Some(LEGACY_MAX_PAYLOAD));
    assert_eq!(n.write_chunk(RegionAccess::SIZE), 32 * 1024 - 16);
    client
        .region_write(0, 0x1000, &vec![7u8; 100 * 1024])
        .unwrap();
    drop(client);
    // 100 KiB in chunks of 32 KiB - 16.
    assert_eq!(server.join().unwrap(), 4);
}

#[test]
fn vfio_mig_server_takes_whole_transfers_and_offers_its_extensions() {
    let (stream, server) = serve(Flavor::VfioMig, |conn, req| match req.body {
        Request::RegionWrite(w) => answer(
            conn,
            &req.header,
            Reply::RegionWrite(RegionAccess {
                offset: w.offset,
                region: w.region,
                count: w.data.len() as u32,
            }),
        ),
        other => panic!("{other:?}"),
    });
    let client = client_for(stream);
    let n = client.negotiated();
    assert_eq!(n.max_payload, None);
    assert!(n.precopy_info());
    assert_eq!(n.write_chunk(RegionAccess::SIZE), 1 << 20);
    client.region_write(0, 0, &vec![1u8; 100 * 1024]).unwrap();
    let device = RemoteDevice::new(Arc::clone(&client));
    assert_eq!(
        device.identity().unwrap(),
        DeviceIdentity {
            kind: "membuf".into(),
            version: "1".into(),
            compat: vec![0xab, 0xcd],
        }
    );
    drop((device, client));
    assert_eq!(server.join().unwrap(), 1);
}

#[test]
fn extensions_can_be_left_unannounced() {
    let (stream, server) = serve(Flavor::Standard, |_, req| panic!("{:?}", req.body));
    let options = ClientOptions {
        announce_extensions: false,
        ..ClientOptions::default()
    };
    let client = Client::from_stream(stream, options).unwrap();
    assert_eq!(client.negotiated().extension, None);
    drop(client);
    assert_eq!(server.join().unwrap(), 0);
}

#[test]
fn standard_identity_comes_from_pci_config_space() {
    let (stream, server) = serve(Flavor::Standard, |conn, req| match req.body {
        Request::RegionRead(a) => {
            assert_eq!((a.region, a.offset, a.count), (7, 0, 4));
            answer(
                conn,
                &req.header,
                Reply::RegionRead(vfio_mig_vfio_user::codec::RegionData {
                    offset: 0,
                    region: 7,
                    data: &[0x4f, 0x49, 0xc8, 0x0d],
                }),
            );
        }
        other => panic!("{other:?}"),
    });
    let device = RemoteDevice::new(client_for(stream));
    let id = device.identity().unwrap();
    assert_eq!(id.kind, "pci:494f:0dc8");
    // Cached: asked once.
    assert_eq!(device.identity().unwrap(), id);
    drop(device);
    assert_eq!(server.join().unwrap(), 1);
}

#[test]
fn server_commands_are_refused_while_a_reply_is_awaited() {
    let (stream, server) = serve(Flavor::Standard, |conn, req| {
        assert!(matches!(req.body, Request::DeviceReset));
        // Before answering, the server asks the client for DMA twice (one without reply).
        let write = Message::request(
            900,
            Request::DmaWrite(DmaData {
                addr: 0x1000,
                data: &[1, 2, 3, 4],
            }),
        );
        conn.send_message(&write, &[]).unwrap();
        let mut quiet = Message::request(
            901,
            Request::DmaRead(DmaAccess {
                addr: 0x2000,
                count: 8,
            }),
        );
        quiet.no_reply = true;
        conn.send_message(&quiet, &[]).unwrap();
        let refusal = conn.recv(&Limits::default()).unwrap();
        let h = refusal.header();
        assert_eq!((h.msg_id, h.cmd), (900, Command::DmaWrite.raw()));
        assert!(h.is_error());
        assert_eq!(h.errno(), Errno::EOPNOTSUPP);
        answer(conn, &req.header, Reply::DeviceReset);
    });
    let client = client_for(stream);
    client.device_reset().unwrap();
    assert!(!client.is_broken());
    drop(client);
    assert_eq!(server.join().unwrap(), 1);
}

#[test]
fn a_reply_to_another_request_breaks_the_connection() {
    let (stream, server) = serve(Flavor::Standard, |conn, req| {
        let wrong = Header {
            msg_id: req.header.msg_id.wrapping_add(5),
            ..req.header
        };
        answer(conn, &wrong, Reply::DeviceReset);
    });
    let client = client_for(stream);
    let err = client.device_reset().unwrap_err();
    assert!(
        matches!(err, ClientError::UnexpectedReply { .. }),
        "{err:?}"
    );
    assert_eq!(err.errno(), Errno::EPROTO);
    assert!(client.is_broken());
    let again = client.device_reset().unwrap_err();
    assert!(matches!(again, ClientError::Broken(_)), "{again:?}");
    drop(client);
    assert_eq!(server.join().unwrap(), 1);
}

#[test]
fn a_server_that_hangs_up_fails_the_call_and_later_ones() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut conn = Connection::new(theirs);
        let hello = conn.recv(&Limits::default()).unwrap().header();
        let reply = Message::reply(
            hello.msg_id,
            Reply::Version(version_reply(&Flavor::Standard)),
        );
        conn.send_message(&reply, &[]).unwrap();
        conn.recv(&Limits::default()).unwrap();
        // Gone without answering.
    });
    let client = client_for(ours);
    let err = client.device_info().unwrap_err();
    assert_eq!(err.errno(), Errno::ECONNRESET, "{err:?}");
    assert!(matches!(client.device_info(), Err(ClientError::Broken(_))));
    server.join().unwrap();
}

#[test]
fn negotiation_refuses_another_major_version() {
    let (ours, theirs) = UnixStream::pair().unwrap();
    let server = thread::spawn(move || {
        let mut conn = Connection::new(theirs);
        let hello = conn.recv(&Limits::default()).unwrap().header();
        let v = Version::without_capabilities(1, 0);
        conn.send_message(&Message::reply(hello.msg_id, Reply::Version(v)), &[])
            .unwrap();
    });
    let err = Client::from_stream(ours, ClientOptions::default()).unwrap_err();
    assert!(matches!(err, ClientError::Negotiation(_)), "{err:?}");
    server.join().unwrap();
}

#[test]
fn region_info_retries_with_the_announced_size_and_passes_the_region_fd() {
    let (stream, server) = serve(Flavor::Standard, |conn, req| {
        let Request::GetRegionInfo(q) = req.body else {
            panic!("{:?}", req.body)
        };
        let full = RegionInfoReply::new(
            RegionInfo {
                flags: REGION_INFO_FLAG_READ | REGION_INFO_FLAG_MMAP,
                index: 1,
                size: 0x4000,
                ..RegionInfo::default()
            },
            vec![RegionCap::SparseMmap(vec![
                SparseMmapArea {
                    offset: 0,
                    size: 0x1000,
                },
                SparseMmapArea {
                    offset: 0x2000,
                    size: 0x1000,
                },
            ])],
        );
        let fitted = full.fit_to(q.info.argsz);
        let mem = rustix::fs::memfd_create("bar1", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&mem, 0x4000).unwrap();
        rustix::io::pwrite(&mem, b"bar1", 0x2000).unwrap();
        let reply = Message::reply(req.header.msg_id, Reply::GetRegionInfo(fitted));
        conn.send_message(&reply, &[mem.as_fd()]).unwrap();
    });
    let client = client_for(stream);
    let region = client.region_info(1).unwrap();
    assert_eq!(region.info.argsz, 80);
    assert_eq!(region.info.size, 0x4000);
    assert_eq!(region.sparse_mmap.as_ref().unwrap().len(), 2);
    let fd = region.fd.expect("region fd");
    let mut magic = [0u8; 4];
    rustix::io::pread(&fd, &mut magic, 0x2000).unwrap();
    assert_eq!(&magic, b"bar1");
    drop(client);
    assert_eq!(server.join().unwrap(), 2);
}

#[test]
fn dma_map_passes_the_memory_fd_and_irqs_are_split_by_the_servers_fd_limit() {
    let (stream, server) = serve(Flavor::Fds(4), |conn, req| match req.body {
        Request::DmaMap(m) => {
            assert_eq!((m.addr, m.size, m.offset), (0x10000, 0x1000, 0x1000));
            assert_eq!(req.fds.len(), 1);
            rustix::io::pwrite(&req.fds[0], b"dma!", 0x1000).unwrap();
            answer(conn, &req.header, Reply::DmaMap);
        }
        Request::SetIrqs(s) => {
            assert_eq!(s.count as usize, req.fds.len());
            assert!(req.fds.len() <= 4);
            // Fire the last vector of this message.
            let last = req.fds.last().unwrap();
            rustix::io::write(last, &u64::from(s.start + s.count).to_ne_bytes()).unwrap();
            answer(conn, &req.header, Reply::SetIrqs);
        }
        Request::DmaUnmap(u) => answer(conn, &req.header, Reply::DmaUnmap(Some(u))),
        other => panic!("{other:?}"),
    });
    let client = client_for(stream);
    let mem = rustix::fs::memfd_create("guest", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&mem, 0x2000).unwrap();
    client
        .dma_map(0x10000, 0x1000, 3, 0x1000, Some(mem.as_fd()))
        .unwrap();
    let mut seen = [0u8; 4];
    rustix::io::pread(&mem, &mut seen, 0x1000).unwrap();
    assert_eq!(&seen, b"dma!");
    let events: Vec<OwnedFd> = (0..10)
        .map(|_| rustix::event::eventfd(0, rustix::event::EventfdFlags::NONBLOCK).unwrap())
        .collect();
    let borrowed: Vec<_> = events.iter().map(|e| e.as_fd()).collect();
    client.set_irq_eventfds(2, 0, &borrowed).unwrap();
    for (i, e) in events.iter().enumerate() {
        let mut v = [0u8; 8];
        let fired = rustix::io::read(e, &mut v).is_ok();
        assert_eq!(fired, [3, 7, 9].contains(&i), "vector {i}");
        if fired {
            assert_eq!(u64::from_ne_bytes(v), i as u64 + 1);
        }
    }
    client.dma_unmap(0x10000, 0x1000).unwrap();
    drop(client);
    assert_eq!(server.join().unwrap(), 5);
}

#[test]
fn data_size_falls_back_to_enotty_for_servers_without_it() {
    let mut answers = vec![
        Err(Errno::ENOTTY),
        Err(Errno::EINVAL),
        Ok(4096u64),
        Err(Errno::EIO),
    ];
    answers.reverse();
    let (stream, server) = serve(Flavor::Standard, move |conn, req| {
        let Request::DeviceFeature(f) = &req.body else {
            panic!()
        };
        assert_eq!(f.index(), FEATURE_MIG_DATA_SIZE);
        match answers.pop().unwrap() {
            Err(errno) => refuse(conn, &req.header, errno),
            Ok(n) => answer(
                conn,
                &req.header,
                Reply::DeviceFeature(DeviceFeature::new(
                    f.flags,
                    f.index(),
                    FeatureData::MigDataSize {
                        stop_copy_length: n,
                    },
                )),
            ),
        }
    });
    let device = RemoteDevice::new(client_for(stream));
    assert_eq!(device.data_size().unwrap_err().errno(), Errno::ENOTTY);
    assert_eq!(device.data_size().unwrap_err().errno(), Errno::ENOTTY);
    assert_eq!(device.data_size().unwrap(), 4096);
    assert_eq!(device.data_size().unwrap_err().errno(), Errno::EIO);
    drop(device);
    assert_eq!(server.join().unwrap(), 4);
}

#[test]
fn precopy_session_reads_info_and_data_and_ends_with_reset() {
    let mut state = DeviceState::Running;
    let mut left = 3u32;
    let (stream, server) = serve(Flavor::VfioMig, move |conn, req| {
        if answer_state_machine(conn, &req, MigrationFeatures::ALL, &mut state) {
            return;
        }
        match &req.body {
            Request::DeviceFeature(f) if f.index() == FEATURE_PRECOPY_INFO => {
                assert!(f.is_get());
                assert_eq!(f.argsz, 24);
                let info = encode_precopy_info(&PrecopyInfo {
                    initial_bytes: u64::from(left) * 100,
                    dirty_bytes: 7,
                });
                let reply = DeviceFeature {
                    argsz: 24,
                    flags: f.flags,
                    data: FeatureData::Raw(&info),
                };
                answer(conn, &req.header, Reply::DeviceFeature(reply));
            }
            Request::MigDataRead(r) => {
                let data = vec![left as u8; if left > 0 { 100 } else { 0 }];
                left = left.saturating_sub(1);
                // Padded like libvfio-user.
                let reply = MigDataReadReply {
                    padding: r.size - data.len() as u32,
                    ..MigDataReadReply::new(&data)
                };
                answer(conn, &req.header, Reply::MigDataRead(reply));
            }
            Request::DeviceReset => {
                state = DeviceState::Running;
                answer(conn, &req.header, Reply::DeviceReset);
            }
            other => panic!("{other:?}"),
        }
    });
    let device = RemoteDevice::new(client_for(stream));
    let mut stream = device.set_state(DeviceState::PreCopy).unwrap().unwrap();
    assert_eq!(
        stream.precopy_info().unwrap(),
        PrecopyInfo {
            initial_bytes: 300,
            dirty_bytes: 7
        }
    );
    let mut buf = vec![0u8; 512];
    for k in (1..=3u8).rev() {
        assert_eq!(stream.read(&mut buf).unwrap(), ReadOutcome::Data(100));
        assert!(buf[..100].iter().all(|&b| b == k));
    }
    // PRE_COPY: nothing now, not the end.
    assert_eq!(stream.read(&mut buf).unwrap(), ReadOutcome::NothingNow);
    // PRE_COPY -> PRE_COPY_P2P keeps the session.
    assert!(device.set_state(DeviceState::PreCopyP2p).unwrap().is_none());
    assert_eq!(stream.precopy_info().unwrap().initial_bytes, 0);
    assert!(device.set_state(DeviceState::StopCopy).unwrap().is_none());
    assert_eq!(stream.read(&mut buf).unwrap(), ReadOutcome::End);
    // Only PRE_COPY states have precopy info; answered locally.
    assert_eq!(stream.precopy_info().unwrap_err().errno(), Errno::EINVAL);
    assert_eq!(stream.write(&buf).unwrap_err().errno(), Errno::EINVAL);
    device.reset().unwrap();
    assert_eq!(stream.read(&mut buf).unwrap_err().errno(), Errno::ENODEV);
    drop((stream, device));
    // MIGRATION, state GET, SET PRE_COPY, info, 4 reads, SET P2P, info, SET STOP_COPY, read,
    // reset.
    assert_eq!(server.join().unwrap(), 13);
}

#[test]
fn resuming_stream_writes_in_chunks_straight_from_the_buffer() {
    let mut state = DeviceState::Running;
    let received = Arc::new(std::sync::Mutex::new(Vec::new()));
    let sink = Arc::clone(&received);
    let (stream, server) = serve(Flavor::Standard, move |conn, req| {
        if answer_state_machine(conn, &req, MigrationFeatures::STOP_COPY, &mut state) {
            return;
        }
        let Request::MigDataWrite(w) = req.body else {
            panic!("{:?}", req.body)
        };
        assert!(w.data.len() + 8 <= LEGACY_MAX_PAYLOAD as usize);
        sink.lock().unwrap().extend_from_slice(w.data);
        answer(conn, &req.header, Reply::MigDataWrite);
    });
    let device = RemoteDevice::new(client_for(stream));
    let mut resume = device.set_state(DeviceState::Resuming).unwrap().unwrap();
    let blob: Vec<u8> = (0..200_000u32).map(|i| (i * 31 % 251) as u8).collect();
    assert_eq!(resume.write(&blob).unwrap(), 32 * 1024 - 8);
    write_all(resume.as_mut(), &blob[32 * 1024 - 8..]).unwrap();
    let mut out = [0u8; 8];
    assert_eq!(resume.read(&mut out).unwrap_err().errno(), Errno::EINVAL);
    assert!(device.set_state(DeviceState::Stop).unwrap().is_none());
    assert_eq!(resume.write(&blob).unwrap_err().errno(), Errno::ENODEV);
    drop((resume, device));
    // MIGRATION, GET, SET RESUMING, 7 writes, SET STOP.
    assert_eq!(server.join().unwrap(), 3 + 7 + 1);
    assert_eq!(*received.lock().unwrap(), blob);
}

#[test]
fn a_failed_arc_is_reported_where_the_device_stopped() {
    let mut state = DeviceState::Running;
    let (stream, server) = serve(Flavor::Standard, move |conn, req| {
        if let Request::DeviceFeature(f) = &req.body {
            if f.is_set() {
                // RUNNING -> STOP works, STOP -> STOP_COPY fails: the device stays in STOP.
                state = DeviceState::Stop;
                return refuse(conn, &req.header, Errno::EIO);
            }
        }
        assert!(answer_state_machine(
            conn,
            &req,
            MigrationFeatures::STOP_COPY,
            &mut state
        ));
    });
    let device = RemoteDevice::new(client_for(stream));
    let err = device.set_state(DeviceState::StopCopy).unwrap_err();
    assert_eq!(err.errno(), Errno::EIO);
    assert_eq!(err.reached, Some(DeviceState::Stop));
    assert_eq!(
        err.failed_arc,
        Some((DeviceState::Stop, DeviceState::StopCopy))
    );
    drop(device);
    assert_eq!(server.join().unwrap(), 4);
}

#[test]
fn oversized_data_reply_is_a_protocol_error_that_keeps_the_connection() {
    let (stream, server) = serve(Flavor::Standard, |conn, req| match req.body {
        Request::MigDataRead(r) => {
            let data = vec![0u8; r.size as usize + 1];
            answer(
                conn,
                &req.header,
                Reply::MigDataRead(MigDataReadReply::new(&data)),
            );
        }
        Request::DeviceReset => answer(conn, &req.header, Reply::DeviceReset),
        other => panic!("{other:?}"),
    });
    let client = client_for(stream);
    let mut buf = [0u8; 16];
    let err = client.mig_data_read(&mut buf).unwrap_err();
    assert_eq!(err.errno(), Errno::EPROTO, "{err:?}");
    assert!(!client.is_broken());
    client.device_reset().unwrap();
    drop(client);
    assert_eq!(server.join().unwrap(), 2);
}

#[test]
fn dirty_report_is_split_when_the_bitmap_exceeds_a_message() {
    let (stream, server) = serve(Flavor::Standard, |conn, req| {
        let Request::DeviceFeature(f) = &req.body else {
            panic!()
        };
        let FeatureData::DmaLoggingReport(q) = f.data else {
            panic!("{f:?}")
        };
        let len = q.bitmap_len(&Limits::default()).unwrap();
        // Mark the first page of every piece dirty.
        let mut bitmap = vec![0u8; len];
        bitmap[0] = 1;
        let reply = DeviceFeature {
            argsz: f.argsz,
            flags: f.flags,
            data: FeatureData::DmaLoggingReport(vfio_mig_vfio_user::codec::DmaLoggingReport {
                bitmap: &bitmap,
                ..q
            }),
        };
        answer(conn, &req.header, Reply::DeviceFeature(reply));
    });
    let client = client_for(stream);
    // 1 TiB at 4 KiB pages: a 32 MiB bitmap, far beyond one 1 MiB message.
    let length = 1u64 << 40;
    let words = (length / 4096 / 64) as usize;
    let mut bitmap = vec![0u64; words];
    client
        .dma_logging_report(0, length, 4096, &mut bitmap)
        .unwrap();
    let dirty: Vec<usize> = bitmap
        .iter()
        .enumerate()
        .filter(|(_, &w)| w != 0)
        .map(|(i, _)| i)
        .collect();
    let per_piece = ((1 << 20) + 32 - HEADER_SIZE - 8 - 24) / 8;
    assert_eq!(dirty.len(), words.div_ceil(per_piece));
    assert!(dirty.iter().enumerate().all(|(k, &i)| i == k * per_piece));
    let mut short = vec![0u64; 3];
    assert_eq!(
        client
            .dma_logging_report(0, 64 * 4 * 4096, 4096, &mut short)
            .unwrap_err()
            .errno(),
        Errno::EINVAL
    );
    drop(client);
    assert_eq!(server.join().unwrap(), dirty.len());
}

/// STOP_COPY reads ask for the next chunk before the caller does; anything exchanged in
/// between keeps that chunk for the next read, and a session that ends drops it.
#[test]
fn stop_copy_read_ahead_loses_nothing_and_leaks_nothing() {
    const LEN: usize = 10 * 1024;
    let pattern: Vec<u8> = (0..LEN).map(|i| (i % 253) as u8).collect();
    let served = pattern.clone();
    let mut state = DeviceState::Running;
    let mut pos = 0usize;
    let log = Arc::new(std::sync::Mutex::new(Vec::<&'static str>::new()));
    let seen = Arc::clone(&log);
    let (stream, server) = serve(Flavor::Standard, move |conn, req| {
        let before = state;
        if answer_state_machine(conn, &req, MigrationFeatures::STOP_COPY, &mut state) {
            if state == DeviceState::StopCopy && before != DeviceState::StopCopy {
                pos = 0;
            }
            return;
        }
        match req.body {
            Request::MigDataRead(r) => {
                seen.lock().unwrap().push("read");
                assert_eq!(state, DeviceState::StopCopy, "read outside STOP_COPY");
                let n = (r.size as usize).min(LEN - pos);
                let data = &served[pos..pos + n];
                pos += n;
                answer(
                    conn,
                    &req.header,
                    Reply::MigDataRead(MigDataReadReply::new(data)),
                );
            }
            Request::RegionRead(a) => {
                seen.lock().unwrap().push("region");
                let data = vec![0xee; a.count as usize];
                answer(
                    conn,
                    &req.header,
                    Reply::RegionRead(vfio_mig_vfio_user::codec::RegionData {
                        offset: a.offset,
                        region: a.region,
                        data: &data,
                    }),
                );
            }
            other => panic!("{other:?}"),
        }
    });
    let device = RemoteDevice::new(client_for(stream));
    let client = Arc::clone(device.client());

    let mut s = device.set_state(DeviceState::StopCopy).unwrap().unwrap();
    let mut got = Vec::new();
    let mut buf = vec![0u8; 4096];
    assert_eq!(s.read(&mut buf).unwrap(), ReadOutcome::Data(4096));
    got.extend_from_slice(&buf);
    // The next 4 KiB were asked for already; this exchange receives them first.
    let mut reg = [0u8; 8];
    client.region_read(0, 0, &mut reg).unwrap();
    assert_eq!(reg, [0xee; 8]);
    assert_eq!(*log.lock().unwrap(), ["read", "read", "region"]);
    // Served from the stash, in pieces smaller than the chunk.
    let mut small = vec![0u8; 1000];
    assert_eq!(s.read(&mut small).unwrap(), ReadOutcome::Data(1000));
    got.extend_from_slice(&small);
    assert_eq!(s.read(&mut buf).unwrap(), ReadOutcome::Data(3096));
    got.extend_from_slice(&buf[..3096]);
    // 2 KiB left: a short reply, after which nothing is asked ahead.
    assert_eq!(s.read(&mut buf).unwrap(), ReadOutcome::Data(2048));
    got.extend_from_slice(&buf[..2048]);
    assert_eq!(s.read(&mut buf).unwrap(), ReadOutcome::End);
    assert_eq!(got, pattern);
    assert_eq!(log.lock().unwrap().len(), 5);

    // A session left mid-stream: the chunk read ahead is dropped with it.
    assert!(device.set_state(DeviceState::Stop).unwrap().is_none());
    drop(s);
    let mut s = device.set_state(DeviceState::StopCopy).unwrap().unwrap();
    assert_eq!(s.read(&mut buf).unwrap(), ReadOutcome::Data(4096));
    assert_eq!(buf[..], pattern[..4096]);
    assert!(device.set_state(DeviceState::Stop).unwrap().is_none());
    let mut s2 = device.set_state(DeviceState::StopCopy).unwrap().unwrap();
    assert_eq!(s.read(&mut buf).unwrap_err().errno(), Errno::ENODEV);
    assert_eq!(s2.read(&mut buf).unwrap(), ReadOutcome::Data(4096));
    assert_eq!(
        buf[..],
        pattern[..4096],
        "a new session starts at its own beginning"
    );
    // Dropping the client with a read outstanding collects it first: the server sees a
    // clean close, not a reset.
    drop((s, s2, device, client));
    server.join().unwrap();
}

/// Writes are posted one deep: a refusal is reported by the next write, or by the next state
/// change (which then does not happen), and a reset forgets it.
#[test]
fn posted_write_refusals_are_never_lost() {
    let mut state = DeviceState::Running;
    let log = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let seen = Arc::clone(&log);
    let (stream, server) = serve(Flavor::Standard, move |conn, req| {
        match &req.body {
            Request::DeviceFeature(f) if f.is_set() => {
                if let FeatureData::MigDeviceState { state: s, .. } = f.data {
                    seen.lock().unwrap().push(format!("set {s}"));
                }
            }
            Request::MigDataWrite(w) => {
                seen.lock().unwrap().push(format!("write {:#x}", w.data[0]));
                // Bytes starting with 0xee cannot be right.
                if w.data[0] == 0xee {
                    return refuse(conn, &req.header, Errno::EINVAL);
                }
                return answer(conn, &req.header, Reply::MigDataWrite);
            }
            Request::DeviceReset => {
                seen.lock().unwrap().push("reset".into());
                state = DeviceState::Running;
                return answer(conn, &req.header, Reply::DeviceReset);
            }
            _ => {}
        }
        assert!(answer_state_machine(
            conn,
            &req,
            MigrationFeatures::STOP_COPY,
            &mut state
        ));
    });
    let device = RemoteDevice::new(client_for(stream));
    let taken =
        |log: &Arc<std::sync::Mutex<Vec<String>>>| std::mem::take(&mut *log.lock().unwrap());

    // Refused third chunk: reported by the fourth write, which is collected too.
    let mut resume = device.set_state(DeviceState::Resuming).unwrap().unwrap();
    assert_eq!(resume.write(&[1; 100]).unwrap(), 100);
    assert_eq!(resume.write(&[2; 100]).unwrap(), 100);
    assert_eq!(resume.write(&[0xee; 100]).unwrap(), 100);
    assert_eq!(resume.write(&[4; 100]).unwrap_err().errno(), Errno::EINVAL);
    assert!(device.set_state(DeviceState::Stop).unwrap().is_none());
    assert_eq!(
        taken(&log),
        [
            "set resuming",
            "write 0x1",
            "write 0x2",
            "write 0xee",
            "write 0x4",
            "set stop"
        ]
    );

    drop(resume);
    // Refused last chunk: the state change reports it and is not sent; asked again, it is.
    let mut resume = device.set_state(DeviceState::Resuming).unwrap().unwrap();
    assert_eq!(resume.write(&[0xee; 10]).unwrap(), 10);
    let err = device.set_state(DeviceState::Stop).unwrap_err();
    assert_eq!(err.errno(), Errno::EINVAL);
    assert_eq!(err.reached, Some(DeviceState::Resuming));
    assert_eq!(taken(&log), ["set resuming", "write 0xee"]);
    assert!(device.set_state(DeviceState::Stop).unwrap().is_none());
    assert_eq!(taken(&log), ["set stop"]);

    drop(resume);
    // A reset forgets a refusal of the session it ends.
    let mut resume = device.set_state(DeviceState::Resuming).unwrap().unwrap();
    assert_eq!(resume.write(&[0xee; 10]).unwrap(), 10);
    device.reset().unwrap();
    assert_eq!(resume.write(&[5; 10]).unwrap_err().errno(), Errno::ENODEV);
    drop(resume);
    let mut resume = device.set_state(DeviceState::Resuming).unwrap().unwrap();
    assert_eq!(resume.write(&[6; 10]).unwrap(), 10);
    assert!(device.set_state(DeviceState::Stop).unwrap().is_none());
    assert_eq!(
        taken(&log),
        [
            "set resuming",
            "write 0xee",
            "reset",
            "set resuming",
            "write 0x6",
            "set stop"
        ]
    );
    drop((resume, device));
    server.join().unwrap();
}

/// Without pipelining every reply is awaited: refusals come with their own write and nothing
/// is read ahead.
#[test]
fn without_pipelining_each_request_waits_for_its_reply() {
    let mut state = DeviceState::Running;
    let reads = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = Arc::clone(&reads);
    let (stream, server) = serve(Flavor::Standard, move |conn, req| match &req.body {
        Request::MigDataWrite(w) if w.data[0] == 0xee => refuse(conn, &req.header, Errno::EINVAL),
        Request::MigDataWrite(_) => answer(conn, &req.header, Reply::MigDataWrite),
        Request::MigDataRead(r) => {
            counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let data = vec![9u8; r.size as usize];
            answer(
                conn,
                &req.header,
                Reply::MigDataRead(MigDataReadReply::new(&data)),
            );
        }
        _ => assert!(answer_state_machine(
            conn,
            &req,
            MigrationFeatures::STOP_COPY,
            &mut state
        )),
    });
    let options = ClientOptions {
        pipelining: false,
        ..ClientOptions::default()
    };
    let client = Arc::new(Client::from_stream(stream, options).unwrap());
    assert!(!client.negotiated().pipelining);
    let device = RemoteDevice::new(Arc::clone(&client));
    let mut resume = device.set_state(DeviceState::Resuming).unwrap().unwrap();
    assert_eq!(resume.write(&[1; 10]).unwrap(), 10);
    assert_eq!(
        resume.write(&[0xee; 10]).unwrap_err().errno(),
        Errno::EINVAL
    );
    assert!(device.set_state(DeviceState::Stop).unwrap().is_none());
    let mut save = device.set_state(DeviceState::StopCopy).unwrap().unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(save.read(&mut buf).unwrap(), ReadOutcome::Data(64));
    assert_eq!(save.read(&mut buf).unwrap(), ReadOutcome::Data(64));
    assert_eq!(reads.load(std::sync::atomic::Ordering::SeqCst), 2);
    drop((resume, save, device, client));
    server.join().unwrap();
}
