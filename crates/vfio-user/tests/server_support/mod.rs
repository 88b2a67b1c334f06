//! Helpers shared by the server tests: devices to host, requests to send, replies to read.
#![allow(dead_code)]

use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread::{self, JoinHandle};

use rustix::fs::{memfd_create, MemfdFlags};
use vfio_mig_device::{IrqInfo, RegionAccess, RegionInfo};
use vfio_mig_devices::membuf::{self, Membuf, MembufConfig};
use vfio_mig_uapi::MigrationFeatures;
use vfio_mig_vfio_user::codec::{
    Body, Capabilities, DeviceFeature, FeatureData, Header, Limits, Message, Reply, Request,
    Version, FEATURE_GET, FEATURE_SET, HEADER_SIZE,
};
use vfio_mig_vfio_user::extension::VfioMigCapability;
use vfio_mig_vfio_user::server::{HostedDevice, ServeError, Server, ServerSession, StopHandle};

/// A still membuf of `size` bytes with `features`, and the handles to host it.
pub fn membuf(size: u64, features: MigrationFeatures, seed: u64) -> (Membuf, HostedDevice) {
    membuf_with(MembufConfig {
        size,
        features,
        seed,
        ..MembufConfig::default()
    })
}

/// A membuf config of `size` bytes changing at `dirty_rate` bytes/s, from `seed`.
pub fn membuf_config(size: u64, dirty_rate: u64, seed: u64) -> MembufConfig {
    MembufConfig {
        size,
        dirty_rate,
        seed,
        ..MembufConfig::default()
    }
}

/// A membuf from a full config, and the handles to host it.
pub fn membuf_with(config: MembufConfig) -> (Membuf, HostedDevice) {
    let logging = config.dma_logging;
    let m = membuf::create(config).expect("membuf");
    let hosted = HostedDevice::new(m.migration(), m.regions()).with_dma(m.dma().clone(), logging);
    (m, hosted)
}

/// The register device from its spec.
pub fn register() -> HostedDevice {
    let d = "register:seed=3"
        .parse::<vfio_mig_devices::spec::DeviceSpec>()
        .unwrap()
        .build()
        .unwrap();
    HostedDevice::new(d.migration, d.regions).with_dma(d.dma, false)
}

/// Region access that adds IRQs to another device's regions.
pub struct WithIrqs(pub Arc<dyn RegionAccess>, pub Vec<IrqInfo>);

impl RegionAccess for WithIrqs {
    fn regions(&self) -> Vec<RegionInfo> {
        self.0.regions()
    }
    fn irqs(&self) -> Vec<IrqInfo> {
        self.1.clone()
    }
    fn region_read(
        &self,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), vfio_mig_device::DeviceError> {
        self.0.region_read(index, offset, buf)
    }
    fn region_write(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), vfio_mig_device::DeviceError> {
        self.0.region_write(index, offset, data)
    }
}

/// A memfd of `size` bytes (guest memory a client would pass with DMA_MAP).
pub fn memfd(size: u64) -> OwnedFd {
    let fd = memfd_create("guest-ram", MemfdFlags::CLOEXEC).unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    fd
}

/// Reads `len` bytes of a file at `offset`.
pub fn pread(fd: &OwnedFd, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    let n = rustix::io::pread(fd, &mut buf, offset).unwrap();
    buf.truncate(n);
    buf
}

/// Client capabilities: 8 fds, `max_data_xfer_size`.
pub fn client_caps(max_data_xfer_size: u32) -> Capabilities {
    Capabilities {
        max_msg_fds: Some(8),
        max_data_xfer_size: Some(max_data_xfer_size),
        ..Capabilities::default()
    }
}

/// A VERSION request of a standard client.
pub fn version_request(max_data_xfer_size: u32) -> Request<'static> {
    Request::Version(Version::new(0, 2, &client_caps(max_data_xfer_size)).unwrap())
}

/// A VERSION request of a vfio-mig client (with the extension object).
pub fn version_request_ext(max_data_xfer_size: u32) -> Request<'static> {
    let ext = VfioMigCapability::client().to_extensions().unwrap();
    Request::Version(
        Version::with_extensions(0, 2, &client_caps(max_data_xfer_size), &ext).unwrap(),
    )
}

/// Encodes a request.
pub fn encode(msg_id: u16, request: Request<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    Message::request(msg_id, request).encode(&mut out).unwrap();
    out
}

/// Sends a request through a session; returns the whole reply.
pub fn call(session: &mut ServerSession<'_>, request: Request<'_>) -> Vec<u8> {
    call_fds(session, request, Vec::new())
}

/// Sends a request with fds through a session; returns the whole reply.
pub fn call_fds(
    session: &mut ServerSession<'_>,
    request: Request<'_>,
    fds: Vec<OwnedFd>,
) -> Vec<u8> {
    let bytes = encode(0x1234, request);
    let reply = session.handle(&bytes, fds).expect("a reply");
    let out = reply.to_vec();
    let header = Header::decode(&out).unwrap();
    assert_eq!(header.msg_id, 0x1234);
    assert_eq!(
        header.msg_size as usize,
        out.len(),
        "msg_size is the reply's length"
    );
    out
}

/// A session negotiated as a standard client with 1 MiB transfers.
pub fn negotiate(session: &mut ServerSession<'_>) {
    let reply = call(session, version_request(1 << 20));
    assert_eq!(errno(&reply), None);
}

/// The errno of an error reply, `None` for a successful one.
pub fn errno(reply: &[u8]) -> Option<i32> {
    let h = Header::decode(reply).unwrap();
    h.is_error().then_some(h.error as i32)
}

/// Asserts an error reply with `expected` errno and no payload.
#[track_caller]
pub fn assert_errno(reply: &[u8], expected: vfio_mig_uapi::Errno) {
    assert_eq!(
        errno(reply),
        Some(expected.raw()),
        "reply {}",
        hex::encode(reply)
    );
    assert_eq!(reply.len(), HEADER_SIZE, "error replies are header-only");
}

/// Decodes a successful reply.
#[track_caller]
pub fn reply(bytes: &[u8]) -> Reply<'_> {
    match Message::decode(bytes, &Limits::default()).unwrap().body {
        Body::Reply(r) => r,
        other => panic!("not a successful reply: {other:?} ({})", hex::encode(bytes)),
    }
}

/// The DEVICE_FEATURE of a successful reply.
#[track_caller]
pub fn feature(bytes: &[u8]) -> DeviceFeature<'_> {
    match reply(bytes) {
        Reply::DeviceFeature(f) => f,
        other => panic!("not a DEVICE_FEATURE reply: {other:?}"),
    }
}

/// A DEVICE_FEATURE GET of `index` with room for `reply_len` bytes of data.
pub fn get(index: u16, reply_len: u32) -> Request<'static> {
    Request::DeviceFeature(DeviceFeature {
        argsz: 8 + reply_len,
        flags: FEATURE_GET | u32::from(index),
        data: FeatureData::None,
    })
}

/// A DEVICE_FEATURE SET of `index` with `data`.
pub fn set(index: u16, data: FeatureData<'_>) -> Request<'_> {
    Request::DeviceFeature(DeviceFeature::new(FEATURE_SET, index, data))
}

/// A MIG_DEVICE_STATE SET.
pub fn set_state(state: vfio_mig_device::DeviceState) -> Request<'static> {
    set(
        vfio_mig_vfio_user::codec::FEATURE_MIG_DEVICE_STATE,
        FeatureData::MigDeviceState { state, data_fd: -1 },
    )
}

/// Regions that are plain memory (read/write, zero-filled), with the IRQs given: a stand-in
/// for another device's register layout.
pub struct RamRegions {
    sizes: Vec<(u32, u64)>,
    irqs: Vec<IrqInfo>,
    mem: std::sync::Mutex<std::collections::HashMap<u32, Vec<u8>>>,
}

impl RamRegions {
    /// Regions `(index, size)` and IRQs `(index, count)`.
    pub fn new(sizes: &[(u32, u64)], irqs: &[(u32, u32)]) -> Self {
        RamRegions {
            sizes: sizes.to_vec(),
            irqs: irqs
                .iter()
                .map(|&(index, count)| IrqInfo { index, count })
                .collect(),
            mem: std::sync::Mutex::new(
                sizes
                    .iter()
                    .map(|&(i, s)| (i, vec![0u8; s as usize]))
                    .collect(),
            ),
        }
    }

    fn span(
        &self,
        index: u32,
        offset: u64,
        len: usize,
    ) -> Result<std::ops::Range<usize>, vfio_mig_device::DeviceError> {
        let size = self
            .sizes
            .iter()
            .find(|(i, _)| *i == index)
            .map(|(_, s)| *s)
            .unwrap_or(0);
        if offset.checked_add(len as u64).is_none_or(|end| end > size) {
            return Err(vfio_mig_device::DeviceError::new(
                vfio_mig_uapi::Errno::EINVAL,
                "out of region",
            ));
        }
        Ok(offset as usize..offset as usize + len)
    }
}

impl RegionAccess for RamRegions {
    fn regions(&self) -> Vec<RegionInfo> {
        self.sizes
            .iter()
            .map(|&(index, size)| RegionInfo {
                index,
                size,
                readable: true,
                writable: true,
            })
            .collect()
    }
    fn irqs(&self) -> Vec<IrqInfo> {
        self.irqs.clone()
    }
    fn region_read(
        &self,
        index: u32,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), vfio_mig_device::DeviceError> {
        let span = self.span(index, offset, buf.len())?;
        buf.copy_from_slice(&self.mem.lock().unwrap()[&index][span]);
        Ok(())
    }
    fn region_write(
        &self,
        index: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), vfio_mig_device::DeviceError> {
        let span = self.span(index, offset, data.len())?;
        self.mem.lock().unwrap().get_mut(&index).unwrap()[span].copy_from_slice(data);
        Ok(())
    }
}

/// A server running on its own thread; stopped and joined on drop.
pub struct Running {
    pub path: PathBuf,
    pub stop: StopHandle,
    thread: Option<JoinHandle<Result<(), ServeError>>>,
    _dir: tempfile::TempDir,
}

impl Running {
    pub fn start(hosted: HostedDevice) -> Running {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dev.sock");
        let mut server = Server::bind(&path, hosted).unwrap();
        let stop = server.stop_handle();
        let thread = thread::spawn(move || server.serve_forever());
        Running {
            path,
            stop,
            thread: Some(thread),
            _dir: dir,
        }
    }

    pub fn finish(&mut self) -> Result<(), ServeError> {
        self.stop.stop();
        self.thread.take().map_or(Ok(()), |t| t.join().unwrap())
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if !thread::panicking() {
            self.finish().unwrap();
        }
    }
}

/// A membuf behind our server, reached through our client: a [`MigrationDevice`] that keeps
/// its server running as long as it lives.
pub struct Served {
    /// The client side.
    pub remote: vfio_mig_vfio_user::client::RemoteDevice,
    /// The device, in-process (for checks from outside the protocol).
    pub membuf: Membuf,
    /// The server thread.
    pub server: Running,
}

impl Served {
    /// Serves a membuf made from `config` and connects our client (default options).
    pub fn membuf(config: MembufConfig) -> Served {
        Served::membuf_with(config, vfio_mig_vfio_user::client::ClientOptions::default())
    }

    /// Serves a membuf made from `config` and connects a client with `options`.
    pub fn membuf_with(
        config: MembufConfig,
        options: vfio_mig_vfio_user::client::ClientOptions,
    ) -> Served {
        let (membuf, hosted) = membuf_with(config);
        let server = Running::start(hosted);
        let client =
            vfio_mig_vfio_user::client::Client::connect_with(&server.path, options).unwrap();
        let remote = vfio_mig_vfio_user::client::RemoteDevice::new(Arc::new(client));
        Served {
            remote,
            membuf,
            server,
        }
    }

    /// The socket path.
    pub fn path(&self) -> &std::path::Path {
        &self.server.path
    }

    /// The state digest, read over vfio-user (BAR0 register 0x10).
    pub fn digest(&self) -> Result<u64, vfio_mig_device::DeviceError> {
        let mut b = [0u8; 8];
        self.remote
            .client()
            .region_read(0, membuf::REG_DIGEST, &mut b)
            .map_err(|e| e.into_device_error("REGION_READ of the digest"))?;
        Ok(u64::from_le_bytes(b))
    }
}

impl vfio_mig_device::MigrationDevice for Served {
    fn features(&self) -> Result<MigrationFeatures, vfio_mig_device::DeviceError> {
        self.remote.features()
    }
    fn identity(&self) -> Result<vfio_mig_device::DeviceIdentity, vfio_mig_device::DeviceError> {
        self.remote.identity()
    }
    fn state(&self) -> Result<vfio_mig_device::DeviceState, vfio_mig_device::DeviceError> {
        self.remote.state()
    }
    fn set_state(
        &self,
        target: vfio_mig_device::DeviceState,
    ) -> Result<Option<vfio_mig_device::DataStream>, vfio_mig_device::TransitionError> {
        self.remote.set_state(target)
    }
    fn data_size(&self) -> Result<u64, vfio_mig_device::DeviceError> {
        self.remote.data_size()
    }
    fn dma_logging_start(
        &self,
        page_size: u64,
        ranges: &[vfio_mig_device::IovaRange],
    ) -> Result<u64, vfio_mig_device::DeviceError> {
        self.remote.dma_logging_start(page_size, ranges)
    }
    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), vfio_mig_device::DeviceError> {
        self.remote
            .dma_logging_report(iova, length, page_size, bitmap)
    }
    fn dma_logging_stop(&self) -> Result<(), vfio_mig_device::DeviceError> {
        self.remote.dma_logging_stop()
    }
    fn reset(&self) -> Result<(), vfio_mig_device::DeviceError> {
        self.remote.reset()
    }
}
