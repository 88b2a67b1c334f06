//! DMA into guest memory, and the device-side dirty log that records it.
//!
//! A device author never marks pages by hand: every DMA write goes through the [`Dma`] handle
//! the device was built with, which writes guest memory and records the pages in the
//! [`DirtyLog`] while logging is on. The controller answers the user's DMA-logging requests
//! from the same log, after validating them as the kernel does.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, RwLock};

use vfio_mig_uapi::Errno;

use crate::{DeviceError, IovaRange};

/// Most ranges one DMA_LOGGING_START takes (one 4 KiB page of 16-byte ranges, as the kernel).
pub const MAX_LOGGING_RANGES: usize = 4096 / 16;

/// Guest memory as a device sees it through its IOMMU: byte access by I/O virtual address.
pub trait GuestMemory: Send + Sync {
    /// Writes `data` at `iova`; fails with `EFAULT` when any byte is not mapped writable.
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DeviceError>;
    /// Reads `buf.len()` bytes at `iova`; fails with `EFAULT` when any byte is not mapped.
    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DeviceError>;
}

/// Guest memory held in a vector at a base address: for in-process devices and tests.
#[derive(Debug)]
pub struct VecGuestMemory {
    base: u64,
    bytes: Mutex<Vec<u8>>,
}

impl VecGuestMemory {
    /// `size` zeroed bytes starting at I/O virtual address `base`.
    pub fn new(base: u64, size: usize) -> Self {
        VecGuestMemory {
            base,
            bytes: Mutex::new(vec![0; size]),
        }
    }

    fn span(
        &self,
        iova: u64,
        len: usize,
        have: usize,
    ) -> Result<std::ops::Range<usize>, DeviceError> {
        let start = iova
            .checked_sub(self.base)
            .and_then(|o| usize::try_from(o).ok())
            .filter(|&o| o.checked_add(len).is_some_and(|end| end <= have));
        start.map(|s| s..s + len).ok_or_else(|| {
            DeviceError::new(
                Errno::EFAULT,
                format!("DMA to unmapped {len} bytes at {iova:#x}"),
            )
        })
    }
}

impl GuestMemory for VecGuestMemory {
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DeviceError> {
        let mut bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let span = self.span(iova, data.len(), bytes.len())?;
        bytes[span].copy_from_slice(data);
        Ok(())
    }

    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let bytes = self.bytes.lock().unwrap_or_else(|p| p.into_inner());
        let span = self.span(iova, buf.len(), bytes.len())?;
        buf.copy_from_slice(&bytes[span]);
        Ok(())
    }
}

fn check_page_size(page_size: u64) -> Result<(), DeviceError> {
    if page_size < 4096 || !page_size.is_power_of_two() {
        return Err(DeviceError::new(
            Errno::EINVAL,
            format!("DMA-logging page size {page_size} is not a power of two of at least 4096"),
        ));
    }
    Ok(())
}

/// Validates a DMA_LOGGING_START request exactly as the kernel core does, returning the ranges
/// sorted by address.
///
/// `EINVAL`: no ranges, a page size below 4096 or not a power of two, a range not aligned to
/// the page size, an empty range, overlapping ranges. `E2BIG`: more than
/// [`MAX_LOGGING_RANGES`]. `EOVERFLOW`: a range whose end overflows 64 bits.
pub fn check_logging_ranges(
    page_size: u64,
    ranges: &[IovaRange],
) -> Result<Vec<IovaRange>, DeviceError> {
    if ranges.is_empty() {
        return Err(DeviceError::new(
            Errno::EINVAL,
            "DMA-logging start with no ranges",
        ));
    }
    if ranges.len() > MAX_LOGGING_RANGES {
        return Err(DeviceError::new(
            Errno::E2BIG,
            format!(
                "{} DMA-logging ranges; at most {MAX_LOGGING_RANGES}",
                ranges.len()
            ),
        ));
    }
    check_page_size(page_size)?;
    let mut sorted = Vec::with_capacity(ranges.len());
    for r in ranges {
        if r.iova % page_size != 0 || r.length % page_size != 0 || r.length == 0 {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!(
                    "DMA-logging range {:#x}+{:#x} is empty or not aligned to page size {page_size:#x}",
                    r.iova, r.length
                ),
            ));
        }
        if r.end().is_none() {
            return Err(DeviceError::new(
                Errno::EOVERFLOW,
                format!("DMA-logging range {:#x}+{:#x} overflows", r.iova, r.length),
            ));
        }
        sorted.push(*r);
    }
    sorted.sort_by_key(|r| r.iova);
    for pair in sorted.windows(2) {
        if pair[0].iova + pair[0].length > pair[1].iova {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!(
                    "DMA-logging ranges {:#x}+{:#x} and {:#x}+{:#x} overlap",
                    pair[0].iova, pair[0].length, pair[1].iova, pair[1].length
                ),
            ));
        }
    }
    Ok(sorted)
}

/// Pages written by a device's DMA while logging is on.
///
/// Dirty pages are kept as a sorted set of page numbers, so memory grows with what was
/// written, not with the size of the logged ranges.
#[derive(Debug, Default)]
pub struct DirtyLog {
    active: Option<ActiveLog>,
}

#[derive(Debug)]
struct ActiveLog {
    page_size: u64,
    ranges: Vec<IovaRange>,
    dirty: BTreeSet<u64>,
}

impl DirtyLog {
    /// Starts logging (validated by [`check_logging_ranges`]); a second start before stop
    /// fails with `EINVAL`. Returns the page size in use.
    pub fn start(&mut self, page_size: u64, ranges: &[IovaRange]) -> Result<u64, DeviceError> {
        if self.active.is_some() {
            return Err(DeviceError::new(
                Errno::EINVAL,
                "DMA logging is already started; stop it first",
            ));
        }
        let ranges = check_logging_ranges(page_size, ranges)?;
        self.active = Some(ActiveLog {
            page_size,
            ranges,
            dirty: BTreeSet::new(),
        });
        Ok(page_size)
    }

    /// Stops logging and forgets what was logged. Stopping when not started fails with
    /// `EINVAL`.
    pub fn stop(&mut self) -> Result<(), DeviceError> {
        match self.active.take() {
            Some(_) => Ok(()),
            None => Err(DeviceError::new(
                Errno::EINVAL,
                "DMA logging is not started",
            )),
        }
    }

    /// Whether logging is on.
    pub fn is_active(&self) -> bool {
        self.active.is_some()
    }

    /// Records a DMA write of `len` bytes at `iova`: pages inside the logged ranges.
    pub fn record(&mut self, iova: u64, len: u64) {
        let Some(log) = self.active.as_mut() else {
            return;
        };
        if len == 0 {
            return;
        }
        let end = iova.saturating_add(len);
        for r in &log.ranges {
            let (lo, hi) = (iova.max(r.iova), end.min(r.iova + r.length));
            if lo < hi {
                for page in lo / log.page_size..=(hi - 1) / log.page_size {
                    log.dirty.insert(page);
                }
            }
        }
    }

    /// Reads and clears the log of `[iova, iova + length)` into `bitmap` at `page_size`
    /// granularity (bits are only set). Pages outside the logged ranges read as clean.
    pub fn report(
        &mut self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        check_page_size(page_size)?;
        let end = iova.checked_add(length).ok_or_else(|| {
            DeviceError::new(
                Errno::EOVERFLOW,
                format!("report window {iova:#x}+{length:#x} overflows"),
            )
        })?;
        let log = self
            .active
            .as_mut()
            .ok_or_else(|| DeviceError::new(Errno::EINVAL, "DMA logging is not started"))?;
        if iova % page_size != 0 || length % page_size != 0 {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!("report window {iova:#x}+{length:#x} not aligned to {page_size:#x}"),
            ));
        }
        let pages = length / page_size;
        if (bitmap.len() as u64).saturating_mul(64) < pages {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!(
                    "bitmap of {} words is too small for {pages} pages",
                    bitmap.len()
                ),
            ));
        }
        // As in the kernel core, the window need not match the logged ranges: pages outside
        // them were never logged, so they read as clean.
        if length == 0 {
            return Ok(());
        }
        let first = iova / log.page_size;
        let last = (end - 1) / log.page_size;
        let hits: Vec<u64> = log.dirty.range(first..=last).copied().collect();
        for page in hits {
            log.dirty.remove(&page);
            // The logged page covers [a, b); set every report page it overlaps.
            let a = (page * log.page_size).max(iova);
            let b = ((page + 1) * log.page_size).min(end);
            for k in (a - iova) / page_size..=(b - 1 - iova) / page_size {
                bitmap[(k / 64) as usize] |= 1 << (k % 64);
            }
        }
        Ok(())
    }
}

/// A device's handle for DMA: guest memory (set by whoever hosts the device) plus the dirty
/// log that records every write made through it. Cheap to clone.
#[derive(Clone, Default)]
pub struct Dma {
    inner: Arc<DmaInner>,
}

#[derive(Default)]
struct DmaInner {
    memory: RwLock<Option<Arc<dyn GuestMemory>>>,
    log: Mutex<DirtyLog>,
}

impl std::fmt::Debug for Dma {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mapped = self
            .inner
            .memory
            .read()
            .map(|m| m.is_some())
            .unwrap_or(false);
        f.debug_struct("Dma")
            .field("memory_mapped", &mapped)
            .finish()
    }
}

impl Dma {
    /// A handle with no guest memory yet.
    pub fn new() -> Self {
        Dma::default()
    }

    /// Sets (or with `None` removes) the guest memory DMA goes to.
    pub fn set_memory(&self, memory: Option<Arc<dyn GuestMemory>>) {
        *self.inner.memory.write().unwrap_or_else(|p| p.into_inner()) = memory;
    }

    /// Whether guest memory is attached.
    pub fn has_memory(&self) -> bool {
        self.inner
            .memory
            .read()
            .map(|m| m.is_some())
            .unwrap_or(false)
    }

    /// Writes guest memory at `iova` and logs the pages; `EFAULT` without memory.
    pub fn write(&self, iova: u64, data: &[u8]) -> Result<(), DeviceError> {
        let memory = self.inner.memory.read().unwrap_or_else(|p| p.into_inner());
        let memory = memory
            .as_ref()
            .ok_or_else(|| DeviceError::new(Errno::EFAULT, "no guest memory is mapped"))?;
        memory.write(iova, data)?;
        self.log().record(iova, data.len() as u64);
        Ok(())
    }

    /// Reads guest memory at `iova`; `EFAULT` without memory.
    pub fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let memory = self.inner.memory.read().unwrap_or_else(|p| p.into_inner());
        let memory = memory
            .as_ref()
            .ok_or_else(|| DeviceError::new(Errno::EFAULT, "no guest memory is mapped"))?;
        memory.read(iova, buf)
    }

    /// The dirty log, locked.
    pub fn log(&self) -> std::sync::MutexGuard<'_, DirtyLog> {
        self.inner.log.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(iova: u64, length: u64) -> IovaRange {
        IovaRange { iova, length }
    }

    #[test]
    fn start_validation_matches_the_kernel() {
        let e = |res: Result<Vec<IovaRange>, DeviceError>| res.unwrap_err().errno();
        assert_eq!(e(check_logging_ranges(4096, &[])), Errno::EINVAL);
        assert_eq!(
            e(check_logging_ranges(4096, &vec![r(0, 4096); 257])),
            Errno::E2BIG
        );
        assert_eq!(e(check_logging_ranges(4096, &[r(1, 4096)])), Errno::EINVAL);
        assert_eq!(e(check_logging_ranges(4096, &[r(0, 100)])), Errno::EINVAL);
        assert_eq!(e(check_logging_ranges(2048, &[r(0, 4096)])), Errno::EINVAL);
        assert_eq!(
            e(check_logging_ranges(12288, &[r(0, 12288)])),
            Errno::EINVAL
        );
        assert_eq!(
            e(check_logging_ranges(4096, &[r(0, 8192), r(4096, 4096)])),
            Errno::EINVAL
        );
        assert_eq!(
            e(check_logging_ranges(4096, &[r(u64::MAX - 4095, 8192)])),
            Errno::EOVERFLOW
        );
        let ok = check_logging_ranges(4096, &[r(8192, 4096), r(0, 4096)]).unwrap();
        assert_eq!(ok, [r(0, 4096), r(8192, 4096)]);
    }

    #[test]
    fn writes_are_logged_and_reports_clear() {
        let dma = Dma::new();
        dma.set_memory(Some(Arc::new(VecGuestMemory::new(0x10000, 64 * 1024))));
        dma.write(0x10000, &[1; 10]).unwrap(); // before logging: not recorded
        dma.log().start(4096, &[r(0x10000, 0x10000)]).unwrap();
        assert_eq!(
            dma.log().start(4096, &[r(0, 4096)]).unwrap_err().errno(),
            Errno::EINVAL
        );
        dma.write(0x11000 + 4000, &[2; 200]).unwrap(); // pages 1 and 2
        let mut bitmap = [0u64; 1];
        dma.log()
            .report(0x10000, 0x10000, 4096, &mut bitmap)
            .unwrap();
        assert_eq!(bitmap[0], 0b110);
        let mut again = [0u64; 1];
        dma.log()
            .report(0x10000, 0x10000, 4096, &mut again)
            .unwrap();
        assert_eq!(again[0], 0, "report clears");
        // A coarser report page merges: page 1 of 8 KiB covers logged pages 2 and 3.
        dma.write(0x13000, &[3; 1]).unwrap();
        let mut coarse = [0u64; 1];
        dma.log()
            .report(0x10000, 0x10000, 8192, &mut coarse)
            .unwrap();
        assert_eq!(coarse[0], 0b10);
        let err = dma
            .log()
            .report(0x10000, 0x10000, 4000, &mut coarse)
            .unwrap_err();
        assert_eq!(err.errno(), Errno::EINVAL);
        let err = dma
            .log()
            .report(u64::MAX - 4095, 8192, 4096, &mut coarse)
            .unwrap_err();
        assert_eq!(err.errno(), Errno::EOVERFLOW);
        dma.log().stop().unwrap();
        assert_eq!(dma.log().stop().unwrap_err().errno(), Errno::EINVAL);
        assert_eq!(dma.write(0x0, &[0]).unwrap_err().errno(), Errno::EFAULT);
    }
}
