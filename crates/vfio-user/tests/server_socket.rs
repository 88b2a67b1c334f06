//! The server over real UNIX sockets, driven by a raw codec-level client: fd passing for
//! DMA_MAP, the device's DMA in the client's memory and in the dirty report, BAR0 in STOP,
//! clients that vanish mid-migration, messages written in pieces, stopping.

mod server_support;

use std::io::Write;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use server_support::*;
use vfio_mig_device::{DeviceState, MigrationDevice};
use vfio_mig_devices::membuf::{self, MembufConfig, REG_DIGEST};
use vfio_mig_uapi::{Errno, MigrationFeatures};
use vfio_mig_vfio_user::codec::*;
use vfio_mig_vfio_user::server::{ServeError, Server};
use vfio_mig_vfio_user::socket::Connection;

const KIB: u64 = 1024;

/// A raw client: codec messages over [`Connection`].
struct Raw {
    conn: Connection,
    next_id: u16,
}

impl Raw {
    fn connect(path: &Path) -> Raw {
        Raw {
            conn: Connection::connect(path).unwrap(),
            next_id: 1,
        }
    }

    fn call_fds(&mut self, request: Request<'_>, fds: &[BorrowedFd<'_>]) -> Vec<u8> {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.conn
            .send_message(&Message::request(id, request), fds)
            .unwrap();
        let got = self.conn.recv(&Limits::default()).unwrap();
        assert_eq!(got.header().msg_id, id);
        got.bytes.to_vec()
    }

    fn call(&mut self, request: Request<'_>) -> Vec<u8> {
        self.call_fds(request, &[])
    }

    fn negotiate(path: &Path) -> Raw {
        let mut raw = Raw::connect(path);
        let r = raw.call(version_request(1 << 20));
        assert_eq!(errno(&r), None);
        raw
    }

    fn state(&mut self) -> DeviceState {
        let r = self.call(get(FEATURE_MIG_DEVICE_STATE, 8));
        match feature(&r).data {
            FeatureData::MigDeviceState { state, .. } => state,
            other => panic!("{other:?}"),
        }
    }

    fn set_state(&mut self, state: DeviceState) {
        let r = self.call(set_state(state));
        assert_eq!(errno(&r), None, "to {state}");
    }

    fn read_u64(&mut self, offset: u64) -> u64 {
        let r = self.call(Request::RegionRead(RegionAccess {
            offset,
            region: 0,
            count: 8,
        }));
        match reply(&r) {
            Reply::RegionRead(d) => u64::from_le_bytes(d.data.try_into().unwrap()),
            other => panic!("{other:?}"),
        }
    }

    /// One MIG_DATA_READ; the bytes it returned.
    fn read_chunk(&mut self, size: u32) -> Vec<u8> {
        let r = self.call(Request::MigDataRead(MigDataReadRequest::new(size)));
        match reply(&r) {
            Reply::MigDataRead(d) => d.data.to_vec(),
            other => panic!("{other:?}"),
        }
    }

    fn read_to_end(&mut self, size: u32) -> Vec<u8> {
        let mut out = Vec::new();
        loop {
            let chunk = self.read_chunk(size);
            if chunk.is_empty() {
                return out;
            }
            out.extend_from_slice(&chunk);
        }
    }

    fn write_all(&mut self, stream: &[u8], chunk: usize) {
        for part in stream.chunks(chunk) {
            let r = self.call(Request::MigDataWrite(MigDataWrite::new(part)));
            assert_eq!(errno(&r), None);
        }
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

fn dma_map(addr: u64, size: u64, offset: u64) -> Request<'static> {
    Request::DmaMap(DmaMap {
        argsz: 32,
        flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
        offset,
        addr,
        size,
    })
}

#[test]
fn membuf_dma_lands_in_client_memory_and_in_the_dirty_report() {
    let (m, hosted) = membuf_with(MembufConfig {
        size: 1 << 20,
        dirty_rate: 8 << 20,
        ..MembufConfig::default()
    });
    let server = Running::start(hosted);
    let mut c = Raw::negotiate(&server.path);
    // Guest RAM: 128 KiB, the device's completion ring is its first 64 KiB (IOVA 0).
    let ram = memfd(128 * KIB);
    let r = c.call_fds(dma_map(0, 128 * KIB, 0), &[ram.as_fd()]);
    assert_eq!(errno(&r), None);
    let start = set(
        FEATURE_DMA_LOGGING_START,
        FeatureData::DmaLogging(DmaLoggingControl {
            page_size: 4096,
            ranges: vec![],
        }),
    );
    assert_eq!(errno(&c.call(start)), None);
    wait_until("DMA completions", || m.regs().dma_completions() >= 300);
    // Freeze the device so the report and the memory agree.
    c.set_state(DeviceState::Stop);
    assert_eq!(m.regs().dma_errors(), 0);
    let report = Request::DeviceFeature(DeviceFeature {
        argsz: 8 + 24 + 8,
        flags: FEATURE_GET | u32::from(FEATURE_DMA_LOGGING_REPORT),
        data: FeatureData::DmaLoggingReport(DmaLoggingReport {
            iova: 0,
            length: 128 * KIB,
            page_size: 4096,
            bitmap: &[],
        }),
    });
    let r = c.call(report);
    let FeatureData::DmaLoggingReport(rep) = feature(&r).data else {
        panic!()
    };
    let bits = rep.bitmap_words().next().unwrap();
    assert_ne!(bits, 0, "the device's DMA writes are logged");
    assert_eq!(bits >> 16, 0, "only the 64 KiB completion ring is written");
    for page in 0..32u64 {
        let content = pread(&ram, page * 4096, 4096);
        let written = content.iter().any(|&b| b != 0);
        if bits & (1 << page) != 0 {
            assert!(written, "page {page} reported dirty but untouched");
        } else if page >= 16 {
            assert!(!written, "page {page} outside the ring was written");
        }
    }
    // The first completion entry: generation 1 (the first rewrite).
    let first = pread(&ram, 0, 16);
    assert_eq!(u64::from_le_bytes(first[..8].try_into().unwrap()), 1);
    drop(c);
    wait_until("the departed client's memory to be detached", || {
        !m.dma().has_memory()
    });
    assert_eq!(m.migration().state().unwrap(), DeviceState::Stop);
}

#[test]
fn bar0_digest_is_readable_in_stop_and_stop_copy() {
    let (m, hosted) = membuf_with(MembufConfig {
        size: 256 * KIB,
        dirty_rate: 16 << 20,
        ..MembufConfig::default()
    });
    let server = Running::start(hosted);
    let mut c = Raw::negotiate(&server.path);
    c.set_state(DeviceState::Stop);
    let digest = c.read_u64(REG_DIGEST);
    assert_eq!(digest, m.regs().digest());
    thread::sleep(Duration::from_millis(30));
    assert_eq!(
        c.read_u64(REG_DIGEST),
        digest,
        "a stopped device does not change"
    );
    c.set_state(DeviceState::StopCopy);
    assert_eq!(c.read_u64(REG_DIGEST), digest);
    assert_eq!(c.read_u64(0x08), 256 * KIB);
    drop(server);
}

#[test]
fn a_client_lost_mid_stop_copy_leaves_the_stream_for_the_next_one() {
    let size = 2 << 20;
    let (src, hosted) = membuf(size, MigrationFeatures::ALL, 21);
    let server = Running::start(hosted);
    let mut first = Raw::negotiate(&server.path);
    first.set_state(DeviceState::StopCopy);
    let mut stream = Vec::new();
    for _ in 0..3 {
        stream.extend(first.read_chunk(64 * 1024));
    }
    assert_eq!(stream.len(), 3 * 64 * 1024);
    // Vanish in the middle of the next request.
    let mut sock = first.conn.into_stream();
    let next = encode(9, Request::MigDataRead(MigDataReadRequest::new(4096)));
    sock.write_all(&next[..10]).unwrap();
    drop(sock);

    let mut second = Raw::negotiate(&server.path);
    assert_eq!(second.state(), DeviceState::StopCopy);
    stream.extend(second.read_to_end(1 << 20));
    assert_eq!(stream.len() as u64, membuf::format::full_stream_len(size));
    second.set_state(DeviceState::Stop);
    let digest = second.read_u64(REG_DIGEST);
    drop(second);

    let (dst, hosted) = membuf(size, MigrationFeatures::ALL, 5);
    let dst_server = Running::start(hosted);
    let mut d = Raw::negotiate(&dst_server.path);
    d.set_state(DeviceState::Resuming);
    d.write_all(&stream, 1 << 20);
    d.set_state(DeviceState::Stop);
    assert_eq!(d.read_u64(REG_DIGEST), digest);
    assert_eq!(dst.regs().digest(), src.regs().digest());
    drop(server);
}

#[test]
fn a_large_message_written_in_pieces_is_reassembled() {
    let size = 1 << 20;
    let (src, _) = membuf(size, MigrationFeatures::ALL, 8);
    src.controller().set_state(DeviceState::Stop).unwrap();
    let mut save = src
        .controller()
        .set_state(DeviceState::StopCopy)
        .unwrap()
        .unwrap();
    let mut stream = Vec::new();
    let mut buf = vec![0u8; 1 << 20];
    while let vfio_mig_device::ReadOutcome::Data(n) = save.read(&mut buf).unwrap() {
        stream.extend_from_slice(&buf[..n]);
    }

    let (dst, hosted) = membuf(size, MigrationFeatures::ALL, 2);
    let server = Running::start(hosted);
    let mut sock = UnixStream::connect(&server.path).unwrap();
    let mut replies = Connection::new(sock.try_clone().unwrap());
    let mut bytes = encode(1, version_request(1 << 20));
    bytes.extend(encode(2, set_state(DeviceState::Resuming)));
    // Messages of up to 1 MiB of data, each one dribbled out in uneven pieces.
    let mut msgs = 0u16;
    for (i, part) in stream.chunks(1 << 20).enumerate() {
        bytes.extend(encode(
            3 + i as u16,
            Request::MigDataWrite(MigDataWrite::new(part)),
        ));
        msgs += 1;
    }
    bytes.extend(encode(100, set_state(DeviceState::Stop)));
    let mut at = 0;
    let mut step = 1;
    while at < bytes.len() {
        let n = step.min(bytes.len() - at);
        sock.write_all(&bytes[at..at + n]).unwrap();
        sock.flush().unwrap();
        at += n;
        step = step * 3 + 7;
        thread::sleep(Duration::from_millis(2));
    }
    for _ in 0..(3 + msgs) {
        let got = replies.recv(&Limits::default()).unwrap();
        assert_eq!(errno(got.bytes), None, "reply to {}", got.header().msg_id);
    }
    assert_eq!(dst.regs().digest(), src.regs().digest());
    drop(server);
}

#[test]
fn too_many_fds_are_refused_and_the_connection_goes_on() {
    let (_m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let server = Running::start(hosted);
    let mut c = Raw::negotiate(&server.path);
    let ram = memfd(64 * KIB);
    let fds: Vec<BorrowedFd<'_>> = (0..9).map(|_| ram.as_fd()).collect();
    let r = c.call_fds(dma_map(0, 4096, 0), &fds);
    assert_eq!(errno(&r), Some(Errno::EINVAL.raw()));
    let r = c.call_fds(dma_map(0, 4096, 0), &fds[..1]);
    assert_eq!(errno(&r), None);
    assert_eq!(c.state(), DeviceState::Running);
    drop(server);
}

#[test]
fn clients_are_served_one_at_a_time() {
    let (_m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let server = Running::start(hosted);
    let mut a = Raw::negotiate(&server.path);
    let b = UnixStream::connect(&server.path).unwrap();
    let mut b_conn = Connection::new(b.try_clone().unwrap());
    (&b).write_all(&encode(1, version_request(4096))).unwrap();
    b.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut probe = [0u8; 1];
    let waited = std::io::Read::read(&mut &b, &mut probe);
    assert!(
        waited.is_err(),
        "the second client is not served while the first is"
    );
    assert_eq!(a.state(), DeviceState::Running);
    drop(a);
    b.set_read_timeout(None).unwrap();
    let got = b_conn.recv(&Limits::default()).unwrap();
    assert_eq!(errno(got.bytes), None);
    drop(server);
}

#[test]
fn stop_ends_the_server_even_with_a_stalled_client() {
    let (_m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let mut server = Running::start(hosted);
    let path = server.path.clone();
    let mut c = Raw::negotiate(&path);
    let mut sock = c.conn.stream().try_clone().unwrap();
    let half = encode(5, get(FEATURE_MIG_DEVICE_STATE, 8));
    sock.write_all(&half[..20]).unwrap();
    thread::sleep(Duration::from_millis(50));
    let t = Instant::now();
    server.finish().unwrap();
    assert!(t.elapsed() < Duration::from_secs(2));
    assert!(!path.exists(), "the socket file is removed");
    assert!(c.conn.recv(&Limits::default()).is_err());
}

#[test]
fn bind_refuses_an_existing_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("taken");
    std::fs::write(&path, b"x").unwrap();
    let (_m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let e = Server::bind(&path, hosted).unwrap_err();
    assert!(matches!(e, ServeError::Bind { .. }), "{e}");
    assert_eq!(std::fs::read(&path).unwrap(), b"x", "nothing removed");
}
