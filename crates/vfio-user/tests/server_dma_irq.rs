//! The server's own side of the protocol, over real sockets with a raw codec-level client:
//! interrupts the device raises, DMA_READ / DMA_WRITE the server sends for the device (and
//! commands the client sends meanwhile), mappable regions with their sparse areas and fd,
//! and the lvu-sample device through libvfio-user's sample client's whole flow.
#![allow(unsafe_code)] // one mmap of a region fd, as a client does

mod server_support;

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rustix::event::{eventfd, EventfdFlags};
use server_support::*;
use vfio_mig_device::{DeviceState, Dma, HostLink, IrqInfo, RegionInfo};
use vfio_mig_devices::lvu_sample::{self, LvuSample, LvuSampleConfig};
use vfio_mig_uapi::{Errno, MigrationFeatures};
use vfio_mig_vfio_user::codec::*;
use vfio_mig_vfio_user::server::{DeviceHost, HostedDevice, ServerConfig, ServerSession};
use vfio_mig_vfio_user::socket::Connection;

const KIB: u64 = 1024;

/// Plain regions plus a host link: a device that raises interrupts and asks for DMA.
struct Linked {
    ram: RamRegions,
    link: HostLink,
}

impl vfio_mig_device::RegionAccess for Linked {
    fn regions(&self) -> Vec<RegionInfo> {
        self.ram.regions()
    }
    fn irqs(&self) -> Vec<IrqInfo> {
        self.ram.irqs()
    }
    fn region_read(
        &self,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), vfio_mig_device::DeviceError> {
        self.ram.region_read(index, offset, buf)
    }
    fn region_write(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), vfio_mig_device::DeviceError> {
        self.ram.region_write(index, offset, data)
    }
    fn host_link(&self) -> Option<HostLink> {
        Some(self.link.clone())
    }
}

/// A still membuf's migration and DMA handle behind [`Linked`] regions (BAR0 of 64 bytes;
/// INTx and two MSI vectors), served; returns the DMA handle and the link.
fn linked_server() -> (Running, Dma, HostLink) {
    let (m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let link = HostLink::new();
    let regions = Linked {
        ram: RamRegions::new(&[(0, 64)], &[(0, 1), (1, 2)]),
        link: link.clone(),
    };
    let hosted = HostedDevice {
        regions: Arc::new(regions),
        ..hosted
    };
    (Running::start(hosted), m.dma().clone(), link)
}

/// A codec-level client that also answers the server's DMA requests.
struct Raw {
    conn: Connection,
    next_id: u16,
}

/// What the server asked for in one DMA request.
#[derive(Debug, PartialEq, Eq)]
enum Asked {
    Write { addr: u64, data: Vec<u8> },
    Read { addr: u64, count: u64 },
}

impl Raw {
    fn connect(path: &Path, max_data_xfer_size: u32) -> Raw {
        let mut raw = Raw {
            conn: Connection::connect(path).unwrap(),
            next_id: 1,
        };
        let r = raw.call(version_request(max_data_xfer_size));
        assert_eq!(errno(&r), None);
        raw
    }

    fn send(&mut self, request: Request<'_>, fds: &[BorrowedFd<'_>]) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        self.conn
            .send_message(&Message::request(id, request), fds)
            .unwrap();
        id
    }

    fn recv(&mut self) -> (Vec<u8>, Vec<OwnedFd>) {
        let got = self.conn.recv(&Limits::default()).unwrap();
        (got.bytes.to_vec(), got.fds)
    }

    fn call_fds(
        &mut self,
        request: Request<'_>,
        fds: &[BorrowedFd<'_>],
    ) -> (Vec<u8>, Vec<OwnedFd>) {
        let id = self.send(request, fds);
        let (bytes, fds) = self.recv();
        let h = Header::decode(&bytes).unwrap();
        assert_eq!(h.flags & 0xf, 1, "a reply, not a request of the server");
        assert_eq!(h.msg_id, id);
        (bytes, fds)
    }

    fn call(&mut self, request: Request<'_>) -> Vec<u8> {
        let (bytes, fds) = self.call_fds(request, &[]);
        assert!(fds.is_empty());
        bytes
    }

    fn ok(&mut self, request: Request<'_>) {
        let r = self.call(request);
        assert_eq!(errno(&r), None, "{}", hex::encode(&r));
    }

    fn map(&mut self, addr: u64, size: u64, fd: Option<&OwnedFd>, offset: u64) {
        let request = Request::DmaMap(DmaMap {
            argsz: 32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset,
            addr,
            size,
        });
        let fds: Vec<BorrowedFd<'_>> = fd.map(|f| f.as_fd()).into_iter().collect();
        let (r, _) = self.call_fds(request, &fds);
        assert_eq!(errno(&r), None);
    }

    fn set_irq_eventfd(&mut self, index: u32) -> OwnedFd {
        let efd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap();
        let request = Request::SetIrqs(IrqSet {
            argsz: 20,
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index,
            start: 0,
            count: 1,
            data: &[],
        });
        let (r, _) = self.call_fds(request, &[efd.as_fd()]);
        assert_eq!(errno(&r), None);
        efd
    }

    fn logging_start(&mut self) {
        self.ok(set(
            FEATURE_DMA_LOGGING_START,
            FeatureData::DmaLogging(DmaLoggingControl {
                page_size: 4096,
                ranges: vec![],
            }),
        ));
    }

    /// The first bitmap word of a DMA_LOGGING_REPORT of `[iova, iova + length)`.
    fn report(&mut self, iova: u64, length: u64) -> u64 {
        let r = self.call(Request::DeviceFeature(DeviceFeature {
            argsz: 8 + 24 + 8,
            flags: FEATURE_GET | u32::from(FEATURE_DMA_LOGGING_REPORT),
            data: FeatureData::DmaLoggingReport(DmaLoggingReport {
                iova,
                length,
                page_size: 4096,
                bitmap: &[],
            }),
        }));
        match feature(&r).data {
            FeatureData::DmaLoggingReport(rep) => rep.bitmap_words().next().unwrap(),
            other => panic!("{other:?}"),
        }
    }

    /// The server's next message, which must be a DMA request: what it asks, and its header.
    fn dma_request(&mut self) -> (Header, Asked) {
        let (bytes, fds) = self.recv();
        assert!(fds.is_empty());
        let h = Header::decode(&bytes).unwrap();
        assert_eq!(
            h.flags & 0xf,
            0,
            "a request of the server: {}",
            hex::encode(&bytes)
        );
        let asked = match Message::decode(&bytes, &Limits::default()).unwrap().body {
            Body::Request(Request::DmaWrite(d)) => Asked::Write {
                addr: d.addr,
                data: d.data.to_vec(),
            },
            Body::Request(Request::DmaRead(a)) => Asked::Read {
                addr: a.addr,
                count: a.count,
            },
            other => panic!("not a DMA request: {other:?}"),
        };
        (h, asked)
    }

    /// Answers a DMA request from `ram`, guest memory at IOVA `base`.
    fn answer(&mut self, h: &Header, asked: &Asked, ram: &mut [u8], base: u64) {
        let message = match asked {
            Asked::Write { addr, data } => {
                let at = (addr - base) as usize;
                ram[at..at + data.len()].copy_from_slice(data);
                Message::reply(
                    h.msg_id,
                    Reply::DmaWrite(DmaAccess {
                        addr: *addr,
                        count: data.len() as u64,
                    }),
                )
            }
            Asked::Read { addr, count } => {
                let at = (addr - base) as usize;
                Message::reply(
                    h.msg_id,
                    Reply::DmaRead(DmaData {
                        addr: *addr,
                        data: &ram[at..at + *count as usize],
                    }),
                )
            }
        };
        self.conn.send_message(&message, &[]).unwrap();
    }

    /// Whether a message from the server is waiting to be read within `wait`.
    fn pending(&self, wait: Duration) -> bool {
        let stream = self.conn.stream();
        let mut fds = [rustix::event::PollFd::new(
            stream,
            rustix::event::PollFlags::IN,
        )];
        let timeout = rustix::event::Timespec {
            tv_sec: wait.as_secs() as _,
            tv_nsec: wait.subsec_nanos() as _,
        };
        rustix::event::poll(&mut fds, Some(&timeout)).unwrap() > 0
    }
}

fn counter(fd: &OwnedFd) -> u64 {
    let mut b = [0u8; 8];
    match rustix::io::read(fd, &mut b) {
        Ok(_) => u64::from_ne_bytes(b),
        Err(_) => 0,
    }
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn device_interrupts_reach_the_eventfd_the_client_set() {
    let (server, _dma, link) = linked_server();
    assert!(!link.is_attached());
    assert!(
        !link.trigger_irq(0, 0).unwrap(),
        "no client: nobody listens"
    );
    let mut c = Raw::connect(&server.path, 1 << 20);
    wait_until("the session to attach", || link.is_attached());
    assert!(!link.trigger_irq(0, 0).unwrap(), "no eventfd yet");
    let intx = c.set_irq_eventfd(0);
    assert!(link.trigger_irq(0, 0).unwrap());
    assert!(link.trigger_irq(0, 0).unwrap());
    assert_eq!(counter(&intx), 2);
    assert!(
        !link.trigger_irq(1, 1).unwrap(),
        "an MSI vector without eventfd"
    );
    assert_eq!(link.trigger_irq(1, 2).unwrap_err().errno(), Errno::EINVAL);
    assert_eq!(link.trigger_irq(5, 0).unwrap_err().errno(), Errno::EINVAL);
    // Masked: not signalled.
    c.ok(Request::SetIrqs(IrqSet {
        argsz: 20,
        flags: IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK,
        index: 0,
        start: 0,
        count: 1,
        data: &[],
    }));
    assert!(!link.trigger_irq(0, 0).unwrap());
    assert_eq!(counter(&intx), 0);
    drop(c);
    wait_until("the session to detach", || !link.is_attached());
    assert!(!link.trigger_irq(0, 0).unwrap());
}

#[test]
fn dma_by_message_round_trips_in_chunks_that_stay_inside_windows() {
    let (server, dma, _link) = linked_server();
    let mut c = Raw::connect(&server.path, 1024);
    // Two adjacent windows without an fd: the device reaches them only by message.
    c.map(0x10000, 0x1000, None, 0);
    c.map(0x11000, 0x1000, None, 0);
    c.logging_start();
    let mut ram = vec![0u8; 0x2000];
    let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
    let device = {
        let dma = dma.clone();
        let data = data.clone();
        thread::spawn(move || {
            dma.write(0x10f00, &data).unwrap();
            let mut back = vec![0u8; data.len()];
            dma.read(0x10f00, &mut back).unwrap();
            back
        })
    };
    let mut asked = Vec::new();
    for _ in 0..8 {
        let (h, a) = c.dma_request();
        c.answer(&h, &a, &mut ram, 0x10000);
        asked.push(match a {
            Asked::Write { addr, data } => (Command::DmaWrite, addr, data.len() as u64),
            Asked::Read { addr, count } => (Command::DmaRead, addr, count),
        });
    }
    // Split where the first window ends, then at the client's 1 KiB limit.
    let expected_chunks = [
        (0x10f00, 0x100),
        (0x11000, 1024),
        (0x11400, 1024),
        (0x11800, 696),
    ];
    let expected: Vec<(Command, u64, u64)> = [Command::DmaWrite, Command::DmaRead]
        .into_iter()
        .flat_map(|cmd| expected_chunks.iter().map(move |&(a, n)| (cmd, a, n)))
        .collect();
    assert_eq!(asked, expected);
    assert_eq!(device.join().unwrap(), data);
    assert_eq!(ram[0xf00..0xf00 + 3000], data[..]);
    assert!(
        !c.pending(Duration::from_millis(50)),
        "nothing more was asked"
    );
    // Writes by message are logged like any device write.
    assert_eq!(c.report(0x10000, 0x2000), 0b11);
}

#[test]
fn the_clients_refusal_fails_the_devices_dma_with_its_errno() {
    let (server, dma, _link) = linked_server();
    let mut c = Raw::connect(&server.path, 1 << 20);
    c.map(0x10000, 0x1000, None, 0);
    let device = thread::spawn(move || dma.write(0x10000, b"refused").unwrap_err().errno());
    let (h, _) = c.dma_request();
    let refusal = Header::error_reply_to(&h, Errno::EOPNOTSUPP);
    c.conn.send(&refusal.to_bytes(), &[], 0, &[]).unwrap();
    assert_eq!(device.join().unwrap(), Errno::EOPNOTSUPP);
    // The session goes on.
    c.ok(Request::DeviceGetInfo(DeviceInfo {
        argsz: 16,
        ..DeviceInfo::default()
    }));
}

#[test]
fn commands_sent_while_a_request_awaits_its_reply_are_answered_after_it() {
    let (server, dma, _link) = linked_server();
    let mut c = Raw::connect(&server.path, 1 << 20);
    c.map(0x10000, 0x1000, None, 0);
    let mut ram = vec![0u8; 0x1000];
    let device = {
        let dma = dma.clone();
        thread::spawn(move || dma.write(0x10010, b"first"))
    };
    let (h, asked) = c.dma_request();
    // Two commands before answering: a read of BAR0 and the unmap of the very window.
    let read_id = c.send(
        Request::RegionRead(RegionAccess {
            offset: 0,
            region: 0,
            count: 8,
        }),
        &[],
    );
    let unmap_id = c.send(
        Request::DmaUnmap(DmaUnmap {
            argsz: 24,
            flags: 0,
            addr: 0x10000,
            size: 0x1000,
        }),
        &[],
    );
    assert!(
        !c.pending(Duration::from_millis(200)),
        "held until the request is answered"
    );
    c.answer(&h, &asked, &mut ram, 0x10000);
    device.join().unwrap().unwrap();
    assert_eq!(&ram[0x10..0x15], b"first");
    for id in [read_id, unmap_id] {
        let (r, _) = c.recv();
        let h = Header::decode(&r).unwrap();
        assert_eq!((h.msg_id, h.flags & 0xf), (id, 1));
        assert_eq!(errno(&r), None);
    }
    // The window is gone: the device's next DMA fails at once, and asks nothing.
    let started = Instant::now();
    assert_eq!(dma.write(0x10010, b"x").unwrap_err().errno(), Errno::EFAULT);
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!c.pending(Duration::from_millis(50)));
}

#[test]
fn device_dma_fails_promptly_without_a_client_or_when_it_leaves() {
    let (server, dma, link) = linked_server();
    let quick = |f: &dyn Fn() -> Errno| {
        let started = Instant::now();
        let errno = f();
        assert!(started.elapsed() < Duration::from_secs(1));
        errno
    };
    assert_eq!(
        quick(&|| dma.write(0, b"x").unwrap_err().errno()),
        Errno::EFAULT
    );
    assert_eq!(
        quick(&|| link.dma_write_by_message(0, b"x").unwrap_err().errno()),
        Errno::EFAULT
    );
    {
        let mut c = Raw::connect(&server.path, 1 << 20);
        c.map(0x10000, 0x1000, None, 0);
        let device = {
            let dma = dma.clone();
            thread::spawn(move || {
                let mut buf = [0u8; 16];
                dma.read(0x10000, &mut buf).unwrap_err().errno()
            })
        };
        let (_h, asked) = c.dma_request();
        assert_eq!(
            asked,
            Asked::Read {
                addr: 0x10000,
                count: 16
            }
        );
        // The client leaves without answering.
        drop(c);
        let started = Instant::now();
        assert_eq!(device.join().unwrap(), Errno::EFAULT);
        assert!(started.elapsed() < Duration::from_secs(2));
    }
    // The server serves the next client.
    let mut c = Raw::connect(&server.path, 1 << 20);
    c.ok(Request::DeviceGetInfo(DeviceInfo {
        argsz: 16,
        ..DeviceInfo::default()
    }));
    assert_eq!(dma.write(0, b"x").unwrap_err().errno(), Errno::EFAULT);
}

#[test]
fn a_device_may_ask_for_messages_on_a_window_mapped_with_an_fd() {
    let (server, dma, link) = linked_server();
    let mut c = Raw::connect(&server.path, 1 << 20);
    let ram = memfd(0x2000);
    c.map(0x20000, 0x2000, Some(&ram), 0);
    wait_until("the window", || link.dma_windows().len() == 1);
    let windows = link.dma_windows();
    assert_eq!((windows[0].iova, windows[0].size), (0x20000, 0x2000));
    assert!(windows[0].direct && windows[0].readable && windows[0].writable);
    // Directly: into the file, no message.
    dma.write(0x20100, b"direct").unwrap();
    assert_eq!(pread(&ram, 0x100, 6), b"direct");
    assert!(!c.pending(Duration::from_millis(50)));
    // By message, as the device asked: the client does the write.
    let device = {
        let link = link.clone();
        thread::spawn(move || link.dma_write_by_message(0x20200, b"by message"))
    };
    let (h, asked) = c.dma_request();
    assert_eq!(
        asked,
        Asked::Write {
            addr: 0x20200,
            data: b"by message".to_vec()
        }
    );
    let Asked::Write { data, .. } = &asked else {
        unreachable!()
    };
    rustix::io::pwrite(&ram, data, 0x200).unwrap();
    let ack = Message::reply(
        h.msg_id,
        Reply::DmaWrite(DmaAccess {
            addr: 0x20200,
            count: 10,
        }),
    );
    c.conn.send_message(&ack, &[]).unwrap();
    device.join().unwrap().unwrap();
    let mut back = [0u8; 10];
    dma.read(0x20200, &mut back).unwrap();
    assert_eq!(&back, b"by message");
    // Outside every window: refused without asking.
    assert_eq!(
        link.dma_write_by_message(0x30000, b"x")
            .unwrap_err()
            .errno(),
        Errno::EFAULT
    );
}

#[test]
fn the_sessions_own_thread_never_waits_for_itself() {
    let (m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let mut host = DeviceHost::new(hosted).unwrap();
    let mut s = ServerSession::new(&mut host, ServerConfig::default());
    negotiate(&mut s);
    let r = call(
        &mut s,
        Request::DmaMap(DmaMap {
            argsz: 32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset: 0,
            addr: 0x10000,
            size: 0x1000,
        }),
    );
    assert_eq!(errno(&r), None);
    // A device hook doing DMA by message on the session's thread would wait for itself.
    let started = Instant::now();
    assert_eq!(
        m.dma().write(0x10000, b"x").unwrap_err().errno(),
        Errno::EFAULT
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(s.next_request().is_none() && !s.awaiting_reply());
}

#[test]
fn sans_io_sessions_hand_out_requests_and_take_their_replies() {
    let (m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let mut host = DeviceHost::new(hosted).unwrap();
    let mut s = ServerSession::new(&mut host, ServerConfig::default());
    let r = call(&mut s, version_request(2048));
    assert_eq!(errno(&r), None);
    let r = call(
        &mut s,
        Request::DmaMap(DmaMap {
            argsz: 32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset: 0,
            addr: 0,
            size: 0x4000,
        }),
    );
    assert_eq!(errno(&r), None);
    let dma = m.dma().clone();
    let device = thread::spawn(move || {
        let mut buf = vec![0u8; 5000];
        dma.read(0x100, &mut buf).map(|()| buf)
    });
    let wake = s
        .dma_wakeup_fd()
        .expect("an eventfd")
        .try_clone_to_owned()
        .unwrap();
    let mut got = Vec::new();
    while got.len() < 5000 {
        let mut fds = [rustix::event::PollFd::new(
            &wake,
            rustix::event::PollFlags::IN,
        )];
        if !s.awaiting_reply() && got.is_empty() {
            rustix::event::poll(&mut fds, None).unwrap();
        }
        let request = s.next_request().expect("a DMA_READ").to_vec();
        assert!(s.awaiting_reply());
        assert!(s.next_request().is_none(), "one at a time");
        let Body::Request(Request::DmaRead(a)) =
            Message::decode(&request, &Limits::default()).unwrap().body
        else {
            panic!("{}", hex::encode(&request))
        };
        assert_eq!(a.addr, 0x100 + got.len() as u64);
        assert!(a.count <= 2048, "chunks of the client's max_data_xfer_size");
        // A stray reply is ignored; the matching one completes the chunk.
        let id = Header::decode(&request).unwrap().msg_id;
        let data: Vec<u8> = (0..a.count).map(|i| (a.addr + i) as u8).collect();
        let mut stray = Vec::new();
        Message::reply(
            id.wrapping_add(9),
            Reply::DmaRead(DmaData {
                addr: a.addr,
                data: &data,
            }),
        )
        .encode(&mut stray)
        .unwrap();
        assert!(s.handle(&stray, Vec::new()).is_none());
        assert!(s.awaiting_reply());
        let mut reply = Vec::new();
        Message::reply(
            id,
            Reply::DmaRead(DmaData {
                addr: a.addr,
                data: &data,
            }),
        )
        .encode(&mut reply)
        .unwrap();
        assert!(s.handle(&reply, Vec::new()).is_none());
        got.extend_from_slice(&data);
    }
    assert!(!s.awaiting_reply());
    assert_eq!(device.join().unwrap().unwrap(), got);
}

// ---- Mappable regions (the lvu-sample device's BAR1) ----

fn lvu_server(dev: &LvuSample) -> Running {
    let hosted =
        HostedDevice::new(dev.migration(), dev.regions()).with_dma(dev.dma().clone(), true);
    Running::start(hosted)
}

fn region_info(c: &mut Raw, index: u32, argsz: u32) -> (RegionInfoReply<'static>, Vec<OwnedFd>) {
    let (bytes, fds) = c.call_fds(
        Request::GetRegionInfo(RegionInfoRequest::new(index, argsz)),
        &[],
    );
    let reply = match Message::decode(&bytes, &Limits::default()).unwrap().body {
        Body::Reply(Reply::GetRegionInfo(r)) => RegionInfoReply {
            info: r.info,
            caps: r
                .caps
                .iter()
                .map(|c| match c {
                    RegionCap::SparseMmap(a) => RegionCap::SparseMmap(a.clone()),
                    other => panic!("{other:?}"),
                })
                .collect(),
        },
        other => panic!("{other:?}"),
    };
    (reply, fds)
}

/// A shared mapping of `len` bytes of `fd` at `offset`, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn new(fd: &OwnedFd, offset: u64, len: usize) -> Mapping {
        // SAFETY: a new shared mapping at an address the kernel picks (no MAP_FIXED), of a
        // sealed memfd that cannot shrink under it.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                fd,
                offset,
            )
        }
        .unwrap();
        Mapping {
            ptr: ptr.cast(),
            len,
        }
    }

    fn read(&self, at: usize, len: usize) -> Vec<u8> {
        assert!(at + len <= self.len);
        let mut out = vec![0u8; len];
        // SAFETY: inside the live mapping (checked above); `out` is a separate buffer.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(at), out.as_mut_ptr(), len) };
        out
    }

    fn write(&self, at: usize, data: &[u8]) {
        assert!(at + data.len() <= self.len);
        // SAFETY: inside the live, writable mapping (checked above); `data` is separate.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.add(at), data.len()) };
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`; no reference into it outlives this.
        unsafe { rustix::mm::munmap(self.ptr.cast(), self.len) }.unwrap();
    }
}

#[test]
fn a_mappable_region_offers_sparse_areas_and_its_fd() {
    let dev = lvu_sample::create(LvuSampleConfig::default()).unwrap();
    let server = lvu_server(&dev);
    let mut c = Raw::connect(&server.path, 1024);
    // Asked with room for the bare structure: the size needed, MMAP, no capability, no fd.
    let (first, fds) = region_info(&mut c, 1, 32);
    assert!(fds.is_empty());
    assert_eq!(
        (
            first.info.argsz,
            first.info.flags,
            first.info.cap_offset,
            first.info.size
        ),
        (80, 0x7, 0, 16 * KIB)
    );
    // Asked again with that much: the sparse-mmap capability and the fd.
    let (full, mut fds) = region_info(&mut c, 1, 80);
    assert_eq!(
        (full.info.argsz, full.info.flags, full.info.cap_offset),
        (80, 0xf, 32)
    );
    let areas = full.sparse_areas().unwrap().to_vec();
    assert_eq!(
        areas,
        [
            SparseMmapArea {
                offset: 0,
                size: 0x1000
            },
            SparseMmapArea {
                offset: 0x2000,
                size: 0x1000
            }
        ]
    );
    assert_eq!(fds.len(), 1);
    let fd = fds.pop().unwrap();
    // Other regions: no fd, no MMAP.
    for index in [0, 7] {
        let (r, fds) = region_info(&mut c, index, 80);
        assert!(fds.is_empty() && r.caps.is_empty());
        assert_eq!(r.info.flags & REGION_INFO_FLAG_MMAP, 0);
    }
    let maps: Vec<Mapping> = areas
        .iter()
        .map(|a| Mapping::new(&fd, full.info.offset + a.offset, a.size as usize))
        .collect();
    // Written by message, seen in the mapping.
    let data: Vec<u8> = (0..16 * KIB).map(|i| (i % 251) as u8).collect();
    c.ok(Request::RegionWrite(RegionData {
        offset: 0,
        region: 1,
        data: &data,
    }));
    assert_eq!(maps[0].read(0, 0x1000), data[..0x1000]);
    assert_eq!(maps[1].read(0, 0x1000), data[0x2000..0x3000]);
    // Written through the mapping, read by message and by the device.
    maps[1].write(0x10, b"through the mapping");
    let r = c.call(Request::RegionRead(RegionAccess {
        offset: 0x2010,
        region: 1,
        count: 19,
    }));
    match reply(&r) {
        Reply::RegionRead(d) => assert_eq!(d.data, b"through the mapping"),
        other => panic!("{other:?}"),
    }
    assert_eq!(&dev.bar1().unwrap()[0x2010..0x2023], b"through the mapping");
}

// ---- libvfio-user's sample client's flow, against the lvu-sample device ----

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn wait_for_irq(efd: &OwnedFd) {
    wait_until("INTx", || counter(efd) > 0);
}

/// After INTx: the sample client takes exactly 4 DMA_WRITEs then 4 DMA_READs of 1 KiB
/// (its `max_data_xfer_size`), served from its memory.
fn handle_dma_io(c: &mut Raw, file: &OwnedFd, window: u64) {
    let mut ram = pread(file, window, 4096);
    let mut asked = Vec::new();
    for _ in 0..8 {
        let (h, a) = c.dma_request();
        c.answer(&h, &a, &mut ram, window);
        asked.push(match a {
            Asked::Write { addr, data } => (true, addr, data.len() as u64, data[0]),
            Asked::Read { addr, count } => (false, addr, count, 0),
        });
    }
    let expected: Vec<(bool, u64, u64, u8)> = (0..4)
        .map(|i| (true, window + i * 1024, 1024, b'A' + i as u8))
        .chain((0..4).map(|i| (false, window + i * 1024, 1024, 0)))
        .collect();
    assert_eq!(asked, expected);
    rustix::io::pwrite(file, &ram, window).unwrap();
}

fn set_state_raw(c: &mut Raw, state: DeviceState) {
    let r = c.call(set_state(state));
    assert_eq!(errno(&r), None, "to {state}");
}

fn mig_read(c: &mut Raw, size: u32) -> Vec<u8> {
    let r = c.call(Request::MigDataRead(MigDataReadRequest::new(size)));
    // libvfio-user's client needs every reply sized for what it asked.
    assert_eq!(r.len(), 16 + 8 + size as usize, "padded to the size asked");
    match reply(&r) {
        Reply::MigDataRead(d) => d.data.to_vec(),
        other => panic!("{other:?}"),
    }
}

#[test]
fn lvu_sample_runs_the_sample_clients_whole_flow() {
    let src = lvu_sample::create(LvuSampleConfig::default()).unwrap();
    let src_server = lvu_server(&src);
    let mut c = Raw::connect(&src_server.path, 1024);
    // A bogus region, then the device's shape.
    let r = c.call(Request::RegionRead(RegionAccess {
        offset: 0,
        region: 0xdead_beef,
        count: 4,
    }));
    assert_eq!(errno(&r), Some(Errno::EINVAL.raw()));
    let r = c.call(Request::DeviceGetInfo(DeviceInfo {
        argsz: 16,
        ..DeviceInfo::default()
    }));
    match reply(&r) {
        Reply::DeviceGetInfo(i) => assert_eq!((i.num_regions, i.num_irqs), (9, 5)),
        other => panic!("{other:?}"),
    }
    let r = c.call(Request::RegionRead(RegionAccess {
        offset: 0,
        region: 7,
        count: 64,
    }));
    let Reply::RegionRead(config) = reply(&r) else {
        panic!()
    };
    let ids: Vec<u16> = [0, 2, 0x2c, 0x2e]
        .iter()
        .map(|&o| u16::from_le_bytes([config.data[o], config.data[o + 1]]))
        .collect();
    assert_eq!(ids, [0xdead, 0xbeef, 0xcafe, 0xbabe]);
    c.ok(Request::DeviceReset);
    // 16 one-page windows of one file, each with its fd.
    let guest = memfd(16 * 4096);
    for i in 0..16 {
        c.map(i * 4096, 4096, Some(&guest), i * 4096);
    }
    for index in 0..5 {
        let r = c.call(Request::GetIrqInfo(vfio_mig_vfio_user::codec::IrqInfo {
            argsz: 16,
            flags: 0,
            index,
            count: 0,
        }));
        assert_eq!(errno(&r), None);
    }
    let intx = c.set_irq_eventfd(0);
    c.logging_start();
    // The timer: due now.
    c.ok(Request::RegionWrite(RegionData {
        offset: 0,
        region: 0,
        data: &now().to_le_bytes(),
    }));
    wait_for_irq(&intx);
    handle_dma_io(&mut c, &guest, 0);
    // Window 1 was written directly, window 0 by message: both dirty in our report.
    assert_eq!(c.report(0, 4096) & 1, 1);
    assert_eq!(c.report(4096, 4096) & 1, 1);
    assert_eq!(pread(&guest, 4096, 1024), vec![b'A'; 1024]);
    c.ok(set(FEATURE_DMA_LOGGING_STOP, FeatureData::None));
    for i in 0..8 {
        c.ok(Request::DmaUnmap(DmaUnmap {
            argsz: 24,
            flags: 0,
            addr: i * 4096,
            size: 4096,
        }));
    }
    // The timer for after the migration: due in 2-3 s.
    let due = now() + 3;
    c.ok(Request::RegionWrite(RegionData {
        offset: 0,
        region: 0,
        data: &due.to_le_bytes(),
    }));
    let guest_bar1: Vec<u8> = (0..16 * KIB).map(|i| (i * 13 % 256) as u8).collect();
    c.ok(Request::RegionWrite(RegionData {
        offset: 0,
        region: 1,
        data: &guest_bar1,
    }));
    set_state_raw(&mut c, DeviceState::PreCopy);
    let pre: Vec<Vec<u8>> = (0..16).map(|_| mig_read(&mut c, 1024)).collect();
    assert!(pre.iter().all(|p| p.len() == 1024));
    set_state_raw(&mut c, DeviceState::StopCopy);
    let stop: Vec<Vec<u8>> = (0..17).map(|_| mig_read(&mut c, 1024)).collect();
    assert!(stop[..16].iter().all(|p| p.len() == 1024));
    assert_eq!(stop[16], due.to_le_bytes());
    set_state_raw(&mut c, DeviceState::Stop);

    // The destination: resume, check BAR1, run, map, and the migrated timer fires.
    let dst = lvu_sample::create(LvuSampleConfig::default()).unwrap();
    let dst_server = lvu_server(&dst);
    let mut d = Raw::connect(&dst_server.path, 1024);
    set_state_raw(&mut d, DeviceState::Resuming);
    for chunk in &stop {
        d.ok(Request::MigDataWrite(MigDataWrite::new(chunk)));
    }
    set_state_raw(&mut d, DeviceState::Stop);
    let r = d.call(Request::RegionRead(RegionAccess {
        offset: 0,
        region: 1,
        count: 16 * 1024,
    }));
    let Reply::RegionRead(bar1) = reply(&r) else {
        panic!()
    };
    assert_eq!(bar1.data, guest_bar1, "BAR1 migrated exactly");
    set_state_raw(&mut d, DeviceState::Running);
    for i in 8..16 {
        d.map(i * 4096, 4096, Some(&guest), i * 4096);
    }
    let intx = d.set_irq_eventfd(0);
    wait_for_irq(&intx);
    handle_dma_io(&mut d, &guest, 8 * 4096);
    d.ok(Request::DmaUnmap(DmaUnmap {
        argsz: 24,
        flags: DMA_UNMAP_FLAG_ALL,
        addr: 0,
        size: 0,
    }));
    assert_eq!(dst.stats().dma_errors, 0);
    assert_eq!(dst.stats().interrupts, 1);
    assert_eq!(src.stats().dma_rounds, 2);
    // The source, stopped, never fires the deadline it handed over.
    assert_eq!(src.stats().timer_fired, 1);
}
