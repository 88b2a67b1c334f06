//! Region and interrupt access: what a transport needs besides migration to host a device.

use crate::DeviceError;

/// One device region (a PCI BAR, config space, ...), as `vfio_region_info` describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegionInfo {
    /// Region index (BAR0..5 = 0..5, ROM = 6, config space = 7, VGA = 8).
    pub index: u32,
    /// Size in bytes.
    pub size: u64,
    /// Readable.
    pub readable: bool,
    /// Writable.
    pub writable: bool,
}

/// One interrupt index, as `vfio_irq_info` describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IrqInfo {
    /// IRQ index (INTx = 0, MSI = 1, MSI-X = 2, ERR = 3, REQ = 4).
    pub index: u32,
    /// Number of vectors.
    pub count: u32,
}

/// Register-level access to a device, valid in every migration state (reading a stopped
/// device's registers is how its state is verified from outside).
pub trait RegionAccess: Send + Sync {
    /// The device's regions, indexed by their `index`.
    fn regions(&self) -> Vec<RegionInfo>;

    /// The device's interrupt indices.
    fn irqs(&self) -> Vec<IrqInfo>;

    /// Reads `buf.len()` bytes at `offset` of region `index`; accesses past the region's end
    /// fail with `EINVAL`.
    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError>;

    /// Writes `data` at `offset` of region `index`.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError>;

    /// How the user may map region `index`, if it may: by default no region is mappable.
    fn region_mmap(&self, _index: u32) -> Option<RegionMmap> {
        None
    }

    /// The handle through which the host offers the device its services (interrupts, DMA
    /// by message), if the device uses them: by default it does not.
    fn host_link(&self) -> Option<HostLink> {
        None
    }
}

/// One area of a region the user may `mmap`, relative to the region's start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmapArea {
    /// Offset within the region.
    pub offset: u64,
    /// Length in bytes.
    pub size: u64,
}

/// How the user may map a region into its own address space (vfio-user: the region fd and
/// the sparse-mmap capability of GET_REGION_INFO; the kernel: `VFIO_REGION_INFO_FLAG_MMAP`).
///
/// The device keeps the region's bytes in `fd` (e.g. a memfd) starting at file offset
/// `file_offset`, and must read and write them there too, so that accesses by message and
/// through the user's mapping see the same bytes.
#[derive(Clone, Debug)]
pub struct RegionMmap {
    /// The file holding the region; passed to the user.
    pub fd: std::sync::Arc<std::os::fd::OwnedFd>,
    /// File offset of the region's first byte.
    pub file_offset: u64,
    /// The areas that may be mapped (each inside the region); the rest is reached by message
    /// only.
    pub areas: Vec<MmapArea>,
}

/// A DMA window the user mapped for the device, as the host reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaWindow {
    /// First I/O virtual address.
    pub iova: u64,
    /// Length in bytes.
    pub size: u64,
    /// The device may read it.
    pub readable: bool,
    /// The device may write it.
    pub writable: bool,
    /// The host maps the user's memory itself, so [`crate::Dma`] reaches the window without
    /// a message per access; otherwise each access is a message to the user.
    pub direct: bool,
}

/// What the host of a device (e.g. a vfio-user server session) does for it on request:
/// raise its interrupts and carry DMA as messages to the user. Installed on the device's
/// [`HostLink`] by the host while a user is connected.
pub trait HostServices: Send + Sync {
    /// Signals vector `vector` of IRQ index `index`. `Ok(true)` if the user was signalled,
    /// `Ok(false)` if it has no trigger for that vector (none set, or masked); `EINVAL` for
    /// a vector the device does not have.
    fn trigger_irq(&self, index: u32, vector: u32) -> Result<bool, DeviceError>;

    /// The DMA windows mapped now, by IOVA.
    fn dma_windows(&self) -> Vec<DmaWindow>;

    /// Writes `data` at `iova` by messages to the user (vfio-user DMA_WRITE), whether or not
    /// the window is also mapped directly; waits until the user has answered. `EFAULT` when
    /// a byte is not in a writable window or the user goes away.
    fn dma_write_by_message(&self, iova: u64, data: &[u8]) -> Result<(), DeviceError>;

    /// Reads `buf.len()` bytes at `iova` by messages to the user (vfio-user DMA_READ);
    /// waits for the answers. `EFAULT` as for writes.
    fn dma_read_by_message(&self, iova: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
}

/// A device's handle on its host's services ([`HostServices`]): set by whoever hosts the
/// device while a user is connected, used by the device from any thread. Cheap to clone.
///
/// Calls never hold a lock while the host works, so the host can detach at any time; a
/// device calling while nothing is attached gets `Ok(false)` for interrupts and `EFAULT`
/// for DMA at once.
#[derive(Clone, Default)]
pub struct HostLink {
    services: std::sync::Arc<std::sync::Mutex<Option<std::sync::Arc<dyn HostServices>>>>,
}

impl std::fmt::Debug for HostLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HostLink")
            .field("attached", &self.is_attached())
            .finish()
    }
}

impl HostLink {
    /// A link with no host attached.
    pub fn new() -> Self {
        HostLink::default()
    }

    /// Attaches (or with `None` detaches) the host's services.
    pub fn attach(&self, services: Option<std::sync::Arc<dyn HostServices>>) {
        *self.lock() = services;
    }

    /// Whether a host is attached.
    pub fn is_attached(&self) -> bool {
        self.lock().is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<std::sync::Arc<dyn HostServices>>> {
        self.services.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The attached services, taken out of the lock so that no call holds it.
    fn current(&self) -> Option<std::sync::Arc<dyn HostServices>> {
        self.lock().clone()
    }

    /// Raises vector `vector` of IRQ index `index` (see [`HostServices::trigger_irq`]);
    /// `Ok(false)` when no host is attached.
    pub fn trigger_irq(&self, index: u32, vector: u32) -> Result<bool, DeviceError> {
        match self.current() {
            Some(s) => s.trigger_irq(index, vector),
            None => Ok(false),
        }
    }

    /// The DMA windows mapped now (none when no host is attached).
    pub fn dma_windows(&self) -> Vec<DmaWindow> {
        self.current().map(|s| s.dma_windows()).unwrap_or_default()
    }

    /// DMA write by message (see [`HostServices::dma_write_by_message`]); `EFAULT` when no
    /// host is attached.
    pub fn dma_write_by_message(&self, iova: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.current()
            .ok_or_else(no_host)?
            .dma_write_by_message(iova, data)
    }

    /// DMA read by message (see [`HostServices::dma_read_by_message`]); `EFAULT` when no
    /// host is attached.
    pub fn dma_read_by_message(&self, iova: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.current()
            .ok_or_else(no_host)?
            .dma_read_by_message(iova, buf)
    }
}

fn no_host() -> DeviceError {
    DeviceError::new(
        vfio_mig_uapi::Errno::EFAULT,
        "no user is connected: DMA by message has nobody to go to",
    )
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vfio_mig_uapi::Errno;

    use super::*;

    /// Services that record what the device asked for.
    #[derive(Default)]
    struct Recorder {
        triggered: Mutex<Vec<(u32, u32)>>,
        written: Mutex<Vec<(u64, Vec<u8>)>>,
    }

    impl HostServices for Recorder {
        fn trigger_irq(&self, index: u32, vector: u32) -> Result<bool, DeviceError> {
            if index > 4 {
                return Err(DeviceError::new(Errno::EINVAL, "no such index"));
            }
            self.triggered.lock().unwrap().push((index, vector));
            Ok(true)
        }
        fn dma_windows(&self) -> Vec<DmaWindow> {
            vec![DmaWindow {
                iova: 0x1000,
                size: 0x1000,
                readable: true,
                writable: true,
                direct: false,
            }]
        }
        fn dma_write_by_message(&self, iova: u64, data: &[u8]) -> Result<(), DeviceError> {
            self.written.lock().unwrap().push((iova, data.to_vec()));
            Ok(())
        }
        fn dma_read_by_message(&self, _iova: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
            buf.fill(7);
            Ok(())
        }
    }

    #[test]
    fn a_detached_link_refuses_dma_and_drops_interrupts() {
        let link = HostLink::new();
        assert!(!link.is_attached());
        assert!(!link.trigger_irq(0, 0).unwrap());
        assert!(link.dma_windows().is_empty());
        let e = link.dma_write_by_message(0, b"x").unwrap_err();
        assert_eq!(e.errno(), Errno::EFAULT);
        let e = link.dma_read_by_message(0, &mut [0; 4]).unwrap_err();
        assert_eq!(e.errno(), Errno::EFAULT);
    }

    #[test]
    fn an_attached_link_reaches_the_host_from_every_clone() {
        let link = HostLink::new();
        let device_side = link.clone();
        let host = Arc::new(Recorder::default());
        link.attach(Some(host.clone()));
        assert!(device_side.is_attached());
        assert!(device_side.trigger_irq(0, 0).unwrap());
        assert_eq!(
            device_side.trigger_irq(9, 0).unwrap_err().errno(),
            Errno::EINVAL
        );
        device_side.dma_write_by_message(0x1000, b"abc").unwrap();
        let mut buf = [0u8; 3];
        device_side.dma_read_by_message(0x1000, &mut buf).unwrap();
        assert_eq!(buf, [7; 3]);
        assert_eq!(device_side.dma_windows().len(), 1);
        assert_eq!(*host.triggered.lock().unwrap(), [(0, 0)]);
        assert_eq!(*host.written.lock().unwrap(), [(0x1000, b"abc".to_vec())]);
        link.attach(None);
        assert_eq!(
            device_side
                .dma_write_by_message(0x1000, b"x")
                .unwrap_err()
                .errno(),
            Errno::EFAULT
        );
    }

    struct Plain;

    impl RegionAccess for Plain {
        fn regions(&self) -> Vec<RegionInfo> {
            Vec::new()
        }
        fn irqs(&self) -> Vec<IrqInfo> {
            Vec::new()
        }
        fn region_read(&self, _: u32, _: u64, _: &mut [u8]) -> Result<(), DeviceError> {
            Ok(())
        }
        fn region_write(&self, _: u32, _: u64, _: &[u8]) -> Result<(), DeviceError> {
            Ok(())
        }
    }

    #[test]
    fn regions_are_not_mappable_and_need_no_host_by_default() {
        assert!(Plain.region_mmap(0).is_none());
        assert!(Plain.host_link().is_none());
    }
}
