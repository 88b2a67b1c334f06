//! The vfio-user server: hosts any [`MigrationDevice`] with its regions and DMA over a UNIX
//! socket.
//!
//! Two layers:
//!
//! * [`ServerSession`], sans-IO: one connected client. [`ServerSession::handle`] takes one
//!   whole received message (and the fds that came with it), validates it, calls into the
//!   hosted device and returns the [`Response`] to send: the head bytes, the bulk data
//!   borrowed from the session's buffers, and fds. Every request is checked (sizes, offsets,
//!   region bounds, device states) and refused with the errno libvfio-user or the kernel
//!   gives; a refused or unknown command never ends the session.
//! * [`Server`]: binds a socket path and serves clients one after another with
//!   [`crate::socket::Connection`], until [`StopHandle::stop`].
//!
//! The server also speaks first: a device raises interrupts through its
//! [`vfio_mig_device::HostLink`] (the session signals the client's eventfds), and its DMA to a
//! window the client mapped without an fd (or that it asks to go by message) becomes
//! DMA_READ / DMA_WRITE requests, which the session sends one at a time while holding the
//! client's commands until each reply came ([`ServerSession::next_request`]). A region the
//! device offers for mapping is announced with its sparse-mmap capability and fd.
//!
//! What outlives a connection lives in [`DeviceHost`]: the device and its migration data
//! stream. What a connection sets up (DMA windows, DMA logging, IRQ eventfds) is undone when
//! the client goes away, however it goes; the device's migration state is left as it is, so a
//! reconnecting orchestrator can continue a migration or roll it back. See
//! `docs/vfio-user-extensions.md` ("Server behaviour").
//!
//! ```no_run
//! use std::sync::Arc;
//! use vfio_mig_vfio_user::server::{HostedDevice, Server};
//! # fn device() -> (Arc<dyn vfio_mig_device::MigrationDevice>, Arc<dyn vfio_mig_device::RegionAccess>) { unimplemented!() }
//!
//! let (migration, regions) = device();
//! let mut server = Server::bind("/tmp/dev.sock", HostedDevice::new(migration, regions))?;
//! let stop = server.stop_handle();
//! std::thread::spawn(move || { /* later: */ stop.stop(); });
//! server.serve_forever()?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::sync::Arc;

use vfio_mig_device::{
    DataStream, DeviceError, Dma, HostLink, IrqInfo, MigrationDevice, MigrationFeatures, MmapArea,
    RegionAccess, RegionInfo, RegionMmap,
};

use crate::codec::{Limits, DEFAULT_MAX_DATA_XFER_SIZE, DEFAULT_MAX_DMA_MAPS};

mod client_dma;
mod dma;
mod irq;
mod listener;
mod memory;
mod session;

pub use irq::NUM_IRQ_INDICES;
pub use listener::{ServeError, Served, Server, StopHandle};
pub use memory::MapError;
pub use session::{Response, ServerSession};

/// Region indices of a PCI device: BAR0-5, ROM, config space, VGA.
pub const NUM_REGIONS: u32 = 9;

/// The handles a server needs to host one device.
#[derive(Clone)]
pub struct HostedDevice {
    /// The device's migration interface.
    pub migration: Arc<dyn MigrationDevice>,
    /// Its regions (BARs, config space) and IRQ indices, accessible in every state.
    pub regions: Arc<dyn RegionAccess>,
    /// The device's DMA handle: DMA_MAP windows become its guest memory. `None` for a device
    /// that does no DMA (windows are still tracked).
    pub dma: Option<Dma>,
    /// Whether the device offers DMA dirty logging; without it the DMA_LOGGING features
    /// answer `ENOTTY`, as the kernel does for a driver without log ops.
    pub dma_logging: bool,
}

impl HostedDevice {
    /// A device without DMA.
    pub fn new(migration: Arc<dyn MigrationDevice>, regions: Arc<dyn RegionAccess>) -> Self {
        HostedDevice {
            migration,
            regions,
            dma: None,
            dma_logging: false,
        }
    }

    /// The device does DMA through `dma`; `logging` says whether it offers dirty logging.
    pub fn with_dma(mut self, dma: Dma, logging: bool) -> Self {
        self.dma = Some(dma);
        self.dma_logging = logging;
        self
    }
}

impl fmt::Debug for HostedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostedDevice")
            .field("dma", &self.dma)
            .field("dma_logging", &self.dma_logging)
            .finish_non_exhaustive()
    }
}

/// What the server keeps for its device across connections: the device, its (fixed) region
/// and IRQ layout, and the migration data stream of the session in progress.
///
/// The stream belongs to the server, not to a connection: a client that disconnects in the
/// middle of STOP_COPY leaves it here, and the next client continues reading where the last
/// one stopped.
pub struct DeviceHost {
    device: HostedDevice,
    features: MigrationFeatures,
    regions: Vec<RegionInfo>,
    /// Regions the client may mmap: their fd and sparse areas (checked to lie inside).
    mmaps: Vec<(u32, RegionMmap)>,
    irqs: Vec<IrqInfo>,
    /// The device's handle for interrupts and DMA by message, if it uses them.
    link: Option<HostLink>,
    stream: Option<DataStream>,
    /// A device error met after a MIG_DATA_READ had already read some bytes: those bytes were
    /// answered, the error is answered on the next read.
    deferred_read_error: Option<DeviceError>,
    /// A MIG_DATA_WRITE failed: some of its bytes may be in the device and some not, so the
    /// resuming session cannot go on; later writes get this errno until the session ends.
    failed_write: Option<vfio_mig_uapi::Errno>,
}

impl fmt::Debug for DeviceHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeviceHost")
            .field("device", &self.device)
            .field("features", &self.features)
            .field("regions", &self.regions)
            .field("mmaps", &self.mmaps)
            .field("irqs", &self.irqs)
            .field("link", &self.link)
            .field("stream", &self.stream)
            .finish()
    }
}

impl DeviceHost {
    /// Takes charge of `device`, reading its capabilities, regions and IRQs once (they do not
    /// change over a device's life).
    pub fn new(device: HostedDevice) -> Result<Self, DeviceError> {
        let features = device.migration.features()?;
        let regions: Vec<RegionInfo> = device
            .regions
            .regions()
            .into_iter()
            .filter(|r| r.index < NUM_REGIONS)
            .collect();
        let mmaps = regions
            .iter()
            .filter(|r| r.size > 0)
            .filter_map(|r| {
                Some((
                    r.index,
                    checked_mmap(r, device.regions.region_mmap(r.index)?)?,
                ))
            })
            .collect();
        let link = device.regions.host_link();
        let irqs = device
            .regions
            .irqs()
            .into_iter()
            .filter(|i| i.index < NUM_IRQ_INDICES)
            .collect();
        Ok(DeviceHost {
            device,
            features,
            regions,
            mmaps,
            irqs,
            link,
            stream: None,
            deferred_read_error: None,
            failed_write: None,
        })
    }

    /// The hosted device.
    pub fn device(&self) -> &HostedDevice {
        &self.device
    }

    /// The device's migration capabilities.
    pub fn features(&self) -> MigrationFeatures {
        self.features
    }

    /// Whether a migration data stream is held (a saving or resuming session in progress).
    pub fn has_stream(&self) -> bool {
        self.stream.is_some()
    }

    fn region(&self, index: u32) -> Option<&RegionInfo> {
        self.regions.iter().find(|r| r.index == index && r.size > 0)
    }

    fn mmap(&self, index: u32) -> Option<&RegionMmap> {
        self.mmaps.iter().find(|(i, _)| *i == index).map(|(_, m)| m)
    }
}

/// The device's mmap offer for `region`, if it makes sense: no areas means the whole region;
/// areas must be non-empty and lie inside the region, else the region is offered by message
/// only (and the device's mistake is logged).
fn checked_mmap(region: &RegionInfo, mut mmap: RegionMmap) -> Option<RegionMmap> {
    if mmap.areas.is_empty() {
        mmap.areas.push(MmapArea {
            offset: 0,
            size: region.size,
        });
    }
    let inside = |a: &MmapArea| {
        a.size > 0
            && a.offset
                .checked_add(a.size)
                .is_some_and(|end| end <= region.size)
    };
    let fits_file = mmap.file_offset.checked_add(region.size).is_some();
    if !fits_file || !mmap.areas.iter().all(inside) {
        tracing::warn!(
            region = region.index,
            "the device's mmap areas do not fit the region; offered by message only"
        );
        return None;
    }
    Some(mmap)
}

/// What this server offers a client in VERSION and enforces on its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerConfig {
    /// Largest data transfer of one message this server accepts (`max_data_xfer_size`).
    pub max_data_xfer_size: u32,
    /// Most fds accepted with one message (`max_msg_fds`).
    pub max_msg_fds: u32,
    /// Dirty-bitmap page size announced as `migration.pgsize`.
    pub dirty_page_size: u64,
    /// Most DMA windows one client may map at once (`ENOSPC` beyond).
    pub max_dma_maps: u32,
}

impl Default for ServerConfig {
    /// libvfio-user's server values: 1 MiB transfers, 8 fds, 4 KiB dirty pages; 65535 DMA
    /// windows (the protocol's default `max_dma_maps`).
    fn default() -> Self {
        ServerConfig {
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            max_msg_fds: 8,
            dirty_page_size: 4096,
            max_dma_maps: DEFAULT_MAX_DMA_MAPS,
        }
    }
}

impl ServerConfig {
    /// The limits incoming messages are checked against (pass them to the socket layer).
    ///
    /// Arrays (DMA-logging ranges, coalesced writes) are bounded only by the message size,
    /// so that the device, not the decoder, refuses too many ranges, with the kernel's
    /// `E2BIG`; the decoder checks that the bytes are there before it allocates.
    pub fn limits(&self) -> Limits {
        let limits = Limits::for_data_xfer_size(self.max_data_xfer_size);
        Limits {
            max_fds: self.max_msg_fds,
            max_ranges: limits.max_msg_size / 16,
            ..limits
        }
    }
}
