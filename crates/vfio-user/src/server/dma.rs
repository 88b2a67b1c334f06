//! The DMA windows one client has mapped (DMA_MAP / DMA_UNMAP), and the immutable snapshots
//! of them ([`GuestMap`]) the device's DMA goes through.
//!
//! The table is copy-on-write: every change builds a new [`GuestMap`] and installs it in the
//! session's [`super::client_dma::ClientDma`], which waits for direct copies through the old
//! one. When a window is removed, the last reference to its mapping goes with the old map,
//! so by the time DMA_UNMAP is answered the server holds no reference to that memory.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use vfio_mig_device::{DeviceError, DmaWindow, IovaRange};
use vfio_mig_uapi::Errno;

use super::memory::MappedRegion;
use crate::codec::{DmaMap, DmaUnmap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};

/// One DMA window.
#[derive(Debug)]
pub(crate) struct DmaRegion {
    pub(crate) iova: u64,
    pub(crate) size: u64,
    /// DMA_MAP_FLAG_READ: the device may read the window.
    pub(crate) readable: bool,
    /// DMA_MAP_FLAG_WRITE: the device may write the window.
    pub(crate) writable: bool,
    /// The client's memory, when DMA_MAP came with an fd. Without one the device reaches the
    /// window through DMA_READ / DMA_WRITE messages.
    pub(crate) mapping: Option<MappedRegion>,
}

impl DmaRegion {
    pub(crate) fn end(&self) -> u64 {
        self.iova + self.size
    }
}

/// The windows of one connection, by IOVA.
#[derive(Debug, Default)]
pub(crate) struct DmaTable {
    regions: BTreeMap<u64, Arc<DmaRegion>>,
}

impl DmaTable {
    /// Adds a window (validated like libvfio-user and the kernel's type1 IOMMU), mapping the fd
    /// if one came with it. `max_maps` bounds the number of windows.
    pub(crate) fn map(
        &mut self,
        req: &DmaMap,
        fd: Option<OwnedFd>,
        max_maps: u32,
    ) -> Result<(), DeviceError> {
        if req.argsz < DmaMap::SIZE as u32 {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!("DMA_MAP argsz {} is below {}", req.argsz, DmaMap::SIZE),
            ));
        }
        let known = DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE;
        if req.flags & !known != 0 || req.flags & known == 0 {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!(
                    "DMA_MAP flags {:#x}: need READ and/or WRITE and nothing else",
                    req.flags
                ),
            ));
        }
        let end = req.addr.checked_add(req.size).filter(|_| req.size > 0);
        let Some(end) = end else {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!(
                    "DMA_MAP window {:#x}+{:#x} is empty or overflows",
                    req.addr, req.size
                ),
            ));
        };
        if let Some(other) = self.overlapping(req.addr, end) {
            return Err(DeviceError::new(
                Errno::EEXIST,
                format!(
                    "DMA_MAP window {:#x}+{:#x} overlaps the mapped {:#x}+{:#x}",
                    req.addr, req.size, other.iova, other.size
                ),
            ));
        }
        if self.regions.len() as u64 >= u64::from(max_maps) {
            return Err(DeviceError::new(
                Errno::ENOSPC,
                format!("already {} DMA windows mapped", self.regions.len()),
            ));
        }
        let mapping = match fd {
            Some(fd) => Some(
                MappedRegion::map(
                    fd,
                    req.offset,
                    req.size,
                    req.flags & DMA_MAP_FLAG_READ != 0,
                    req.flags & DMA_MAP_FLAG_WRITE != 0,
                )
                .map_err(|e| {
                    DeviceError::new(e.errno(), format!("DMA_MAP {:#x}: {e}", req.addr))
                        .with_source(e)
                })?,
            ),
            None => None,
        };
        tracing::debug!(
            iova = req.addr,
            size = req.size,
            mapped = mapping.is_some(),
            shrink_sealed = mapping.as_ref().is_some_and(MappedRegion::is_sealed),
            "DMA window added"
        );
        self.regions.insert(
            req.addr,
            Arc::new(DmaRegion {
                iova: req.addr,
                size: req.size,
                readable: req.flags & DMA_MAP_FLAG_READ != 0,
                writable: req.flags & DMA_MAP_FLAG_WRITE != 0,
                mapping,
            }),
        );
        Ok(())
    }

    /// Removes the window `req` names exactly, or every window with the ALL flag.
    pub(crate) fn unmap(&mut self, req: &DmaUnmap) -> Result<(), DeviceError> {
        if req.argsz < DmaUnmap::SIZE as u32 {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!("DMA_UNMAP argsz {} is below {}", req.argsz, DmaUnmap::SIZE),
            ));
        }
        if req.flags & !crate::codec::DMA_UNMAP_FLAG_ALL != 0 {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!(
                    "DMA_UNMAP flags {:#x}: only ALL (2) is supported",
                    req.flags
                ),
            ));
        }
        if req.all() {
            if req.addr != 0 || req.size != 0 {
                return Err(DeviceError::new(
                    Errno::EINVAL,
                    "DMA_UNMAP with ALL must have addr and size 0",
                ));
            }
            self.regions.clear();
            return Ok(());
        }
        match self.regions.get(&req.addr) {
            Some(r) if r.size == req.size => {
                self.regions.remove(&req.addr);
                Ok(())
            }
            _ => Err(DeviceError::new(
                Errno::ENOENT,
                format!(
                    "DMA_UNMAP {:#x}+{:#x} matches no mapped window",
                    req.addr, req.size
                ),
            )),
        }
    }

    /// Removes every window.
    pub(crate) fn clear(&mut self) {
        self.regions.clear();
    }

    /// Number of windows.
    pub(crate) fn len(&self) -> usize {
        self.regions.len()
    }

    /// The windows as IOVA ranges, adjacent ones merged (what DMA_LOGGING_START with no
    /// ranges logs).
    pub(crate) fn merged_ranges(&self) -> Vec<IovaRange> {
        let mut out: Vec<IovaRange> = Vec::new();
        for r in self.regions.values() {
            match out.last_mut() {
                Some(last) if last.iova + last.length == r.iova => last.length += r.size,
                _ => out.push(IovaRange {
                    iova: r.iova,
                    length: r.size,
                }),
            }
        }
        out
    }

    /// An immutable snapshot of the current windows.
    pub(crate) fn snapshot(&self) -> Arc<GuestMap> {
        Arc::new(GuestMap {
            regions: self.regions.values().cloned().collect(),
        })
    }

    fn overlapping(&self, start: u64, end: u64) -> Option<&DmaRegion> {
        let before = self
            .regions
            .range(..end)
            .next_back()
            .map(|(_, r)| r.as_ref());
        before.filter(|r| r.end() > start)
    }
}

/// An immutable snapshot of the windows: the guest memory a device does DMA into.
#[derive(Debug, Default)]
pub(crate) struct GuestMap {
    /// Sorted by IOVA, not overlapping.
    regions: Vec<Arc<DmaRegion>>,
}

impl GuestMap {
    /// The window holding `iova`.
    pub(crate) fn find(&self, iova: u64) -> Option<&DmaRegion> {
        let i = self.regions.partition_point(|r| r.iova <= iova);
        let r = self.regions.get(i.checked_sub(1)?)?;
        (iova < r.end()).then_some(r.as_ref())
    }

    /// Whether no window is mapped.
    pub(crate) fn is_empty(&self) -> bool {
        self.regions.is_empty()
    }

    /// Whether every byte of `[iova, iova + len)` lies in windows the device may write
    /// (`write`) or read.
    pub(crate) fn covers(&self, iova: u64, len: usize, write: bool) -> bool {
        let Some(end) = iova.checked_add(len as u64) else {
            return false;
        };
        let mut at = iova;
        while at < end {
            match self.find(at) {
                Some(r) if (if write { r.writable } else { r.readable }) => at = r.end(),
                _ => return false,
            }
        }
        true
    }

    /// The windows, as the device may learn them.
    pub(crate) fn windows(&self) -> Vec<DmaWindow> {
        self.regions
            .iter()
            .map(|r| DmaWindow {
                iova: r.iova,
                size: r.size,
                readable: r.readable,
                writable: r.writable,
                direct: r.mapping.is_some(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{memfd_create, MemfdFlags};

    fn memfd(size: u64) -> OwnedFd {
        let fd = memfd_create("dma-table", MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&fd, size).unwrap();
        fd
    }

    fn map_req(addr: u64, size: u64, offset: u64) -> DmaMap {
        DmaMap {
            argsz: 32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset,
            addr,
            size,
        }
    }

    #[test]
    fn overlaps_and_bad_requests_are_refused() {
        let mut t = DmaTable::default();
        t.map(&map_req(0x1000, 0x1000, 0), None, 8).unwrap();
        for (addr, size) in [
            (0x1000, 0x1000),
            (0x800, 0x1000),
            (0x1800, 0x10),
            (0, 0x2000),
        ] {
            let e = t.map(&map_req(addr, size, 0), None, 8).unwrap_err();
            assert_eq!(e.errno(), Errno::EEXIST, "{addr:#x}+{size:#x}");
        }
        t.map(&map_req(0x2000, 0x1000, 0), None, 8).unwrap();
        t.map(&map_req(0, 0x1000, 0), None, 8).unwrap();
        assert_eq!(
            t.map(&map_req(0x9000, 0, 0), None, 8).unwrap_err().errno(),
            Errno::EINVAL
        );
        assert_eq!(
            t.map(&map_req(u64::MAX, 2, 0), None, 8)
                .unwrap_err()
                .errno(),
            Errno::EINVAL
        );
        let mut bad = map_req(0x9000, 0x1000, 0);
        bad.flags = 4 | DMA_MAP_FLAG_READ;
        assert_eq!(t.map(&bad, None, 8).unwrap_err().errno(), Errno::EINVAL);
        bad.flags = 0;
        assert_eq!(t.map(&bad, None, 8).unwrap_err().errno(), Errno::EINVAL);
        bad = map_req(0x9000, 0x1000, 0);
        bad.argsz = 31;
        assert_eq!(t.map(&bad, None, 8).unwrap_err().errno(), Errno::EINVAL);
        assert_eq!(
            t.map(&map_req(0x9000, 0x1000, 0), None, 3)
                .unwrap_err()
                .errno(),
            Errno::ENOSPC
        );
        assert_eq!(
            t.merged_ranges(),
            vec![IovaRange {
                iova: 0,
                length: 0x3000
            }]
        );
    }

    #[test]
    fn unmap_needs_an_exact_match_or_all() {
        let mut t = DmaTable::default();
        t.map(&map_req(0x1000, 0x2000, 0), None, 8).unwrap();
        t.map(&map_req(0x8000, 0x1000, 0), None, 8).unwrap();
        let un = |addr, size, flags| DmaUnmap {
            argsz: 24,
            flags,
            addr,
            size,
        };
        assert_eq!(
            t.unmap(&un(0x1000, 0x1000, 0)).unwrap_err().errno(),
            Errno::ENOENT
        );
        assert_eq!(
            t.unmap(&un(0x2000, 0x1000, 0)).unwrap_err().errno(),
            Errno::ENOENT
        );
        assert_eq!(
            t.unmap(&un(0x1000, 0x2000, 1)).unwrap_err().errno(),
            Errno::EINVAL
        );
        assert_eq!(
            t.unmap(&un(0x1000, 0, 2)).unwrap_err().errno(),
            Errno::EINVAL
        );
        t.unmap(&un(0x1000, 0x2000, 0)).unwrap();
        assert_eq!(t.len(), 1);
        t.unmap(&un(0, 0, 2)).unwrap();
        assert_eq!(t.len(), 0);
    }

    #[test]
    fn snapshots_find_windows_and_check_permissions() {
        let mut t = DmaTable::default();
        t.map(&map_req(0x1000, 0x1000, 0), None, 8).unwrap();
        t.map(&map_req(0x2000, 0x1000, 0), Some(memfd(0x1000)), 8)
            .unwrap();
        let mut read_only = map_req(0x8000, 0x1000, 0);
        read_only.flags = DMA_MAP_FLAG_READ;
        t.map(&read_only, None, 8).unwrap();
        let map = t.snapshot();
        assert_eq!(map.find(0x1fff).map(|r| r.iova), Some(0x1000));
        assert_eq!(map.find(0x2000).map(|r| r.iova), Some(0x2000));
        assert!(map.find(0x3000).is_none() && map.find(0).is_none());
        assert!(map.covers(0x1800, 0x1000, true), "spans adjacent windows");
        assert!(!map.covers(0x2800, 0x1000, true), "runs into a hole");
        assert!(map.covers(0x8000, 0x1000, false));
        assert!(!map.covers(0x8000, 1, true), "read-only window");
        assert!(!map.covers(u64::MAX, 2, false));
        let windows = map.windows();
        assert_eq!(windows.len(), 3);
        assert!(!windows[0].direct && windows[1].direct);
        assert!(windows[2].readable && !windows[2].writable);
        t.clear();
        assert!(t.snapshot().is_empty());
    }
}
