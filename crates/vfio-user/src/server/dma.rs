//! The DMA windows one client has mapped (DMA_MAP / DMA_UNMAP), and the guest memory view
//! the hosted device's [`Dma`] handle gets from them.
//!
//! The table is copy-on-write: every change builds a new immutable [`GuestMap`] and installs
//! it with [`Dma::set_memory`], which waits for DMA in flight through the old one. When a
//! window is removed, the last reference to its mapping goes with the old map, so by the time
//! DMA_UNMAP is answered the server holds no reference to that memory.

use std::collections::BTreeMap;
use std::os::fd::OwnedFd;
use std::sync::Arc;

use vfio_mig_device::{DeviceError, Dma, GuestMemory, IovaRange};
use vfio_mig_uapi::Errno;

use super::memory::MappedRegion;
use crate::codec::{DmaMap, DmaUnmap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE};

/// One DMA window.
#[derive(Debug)]
pub(crate) struct DmaRegion {
    iova: u64,
    size: u64,
    /// The client's memory, when DMA_MAP came with an fd. Without one the device cannot
    /// reach the window (the server does not send DMA_READ/DMA_WRITE messages).
    mapping: Option<MappedRegion>,
}

impl DmaRegion {
    fn end(&self) -> u64 {
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

    /// Installs the current windows as the device's guest memory (none: no memory).
    pub(crate) fn publish(&self, dma: &Dma) {
        if self.regions.is_empty() {
            dma.set_memory(None);
        } else {
            let map = GuestMap {
                regions: self.regions.values().cloned().collect(),
            };
            dma.set_memory(Some(Arc::new(map)));
        }
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
#[derive(Debug)]
struct GuestMap {
    /// Sorted by IOVA, not overlapping.
    regions: Vec<Arc<DmaRegion>>,
}

impl GuestMap {
    fn find(&self, iova: u64) -> Option<&DmaRegion> {
        let i = self.regions.partition_point(|r| r.iova <= iova);
        let r = self.regions.get(i.checked_sub(1)?)?;
        (iova < r.end()).then_some(r.as_ref())
    }

    /// Runs `op(region, offset, start, len)` over the windows covering `[iova, iova + len)`;
    /// an access may span adjacent windows.
    fn each(
        &self,
        iova: u64,
        len: usize,
        mut op: impl FnMut(&MappedRegion, u64, usize, usize) -> Result<(), Errno>,
    ) -> Result<(), DeviceError> {
        let fault = |errno: Errno, at: u64| {
            DeviceError::new(
                errno,
                format!("DMA of {len} bytes at {iova:#x}: no usable mapping at {at:#x}"),
            )
        };
        let mut done = 0usize;
        while done < len {
            let at = iova
                .checked_add(done as u64)
                .ok_or_else(|| fault(Errno::EFAULT, u64::MAX))?;
            let region = self.find(at).ok_or_else(|| fault(Errno::EFAULT, at))?;
            let mapping = region
                .mapping
                .as_ref()
                .ok_or_else(|| fault(Errno::EFAULT, at))?;
            let offset = at - region.iova;
            let n = (len - done).min(usize::try_from(region.end() - at).unwrap_or(usize::MAX));
            op(mapping, offset, done, n).map_err(|e| fault(e, at))?;
            done += n;
        }
        Ok(())
    }
}

impl GuestMemory for GuestMap {
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.each(iova, data.len(), |m, offset, start, n| {
            m.write(offset, &data[start..start + n])
        })
    }

    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let len = buf.len();
        self.each(iova, len, |m, offset, start, n| {
            m.read(offset, &mut buf[start..start + n])
        })
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
    fn device_dma_lands_in_the_client_file_across_adjacent_windows() {
        let mut t = DmaTable::default();
        let fd = memfd(0x3000);
        let probe = fd.try_clone().unwrap();
        t.map(
            &map_req(0x10000, 0x1000, 0),
            Some(fd.try_clone().unwrap()),
            8,
        )
        .unwrap();
        t.map(&map_req(0x11000, 0x2000, 0x1000), Some(fd), 8)
            .unwrap();
        t.map(&map_req(0x20000, 0x1000, 0), None, 8).unwrap();
        let dma = Dma::new();
        t.publish(&dma);
        dma.write(0x10ffe, b"span").unwrap();
        let mut back = [0u8; 4];
        rustix::io::pread(&probe, &mut back, 0xffe).unwrap();
        assert_eq!(&back, b"span");
        dma.read(0x10ffe, &mut back).unwrap();
        assert_eq!(&back, b"span");
        // A window without an fd, and a hole, are unreachable.
        assert_eq!(dma.write(0x20000, b"x").unwrap_err().errno(), Errno::EFAULT);
        assert_eq!(
            dma.write(0x13fff, b"xy").unwrap_err().errno(),
            Errno::EFAULT
        );
        t.clear();
        t.publish(&dma);
        assert!(!dma.has_memory());
    }
}
