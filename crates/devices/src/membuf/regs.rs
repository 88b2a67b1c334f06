//! BAR0 and config space of a membuf: [`RegionAccess`] that works in every migration state.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use vfio_mig_device::{DeviceError, IrqInfo, RegionAccess, RegionInfo};
use vfio_mig_uapi::Errno;

use super::content::digest;
use super::worker::Shared;

/// BAR0's region index.
pub const BAR0_INDEX: u32 = 0;
/// BAR0's size.
pub const BAR0_SIZE: u64 = 4096;
/// PCI config space's region index (`VFIO_PCI_CONFIG_REGION_INDEX`).
pub const CONFIG_INDEX: u32 = 7;
/// Config space size (conventional PCI).
pub const CONFIG_SIZE: u64 = 256;

/// Register 0x00: the 8 ASCII bytes `VFIOMIG1`.
pub const REG_MAGIC: u64 = 0x00;
/// Register 0x08: state size in bytes.
pub const REG_SIZE: u64 = 0x08;
/// Register 0x10: digest of the whole state, computed when read.
pub const REG_DIGEST: u64 = 0x10;
/// Register 0x18: state mutations since creation or the last resume.
pub const REG_GENERATION: u64 = 0x18;
/// Register 0x20: dirty rate in bytes per second (read/write).
pub const REG_DIRTY_RATE: u64 = 0x20;
/// The value of [`REG_MAGIC`].
pub const MAGIC: [u8; 8] = *b"VFIOMIG1";

/// PCI vendor ID in config space (the one QEMU uses for its emulated devices).
pub const PCI_VENDOR_ID: u16 = 0x1b36;
/// PCI device ID in config space, chosen by vfio-mig for membuf.
pub const PCI_DEVICE_ID: u16 = 0x11f0;

const REGS_END: u64 = REG_DIRTY_RATE + 8;

/// The register view of one membuf. Register reads never take the controller's lock; the
/// digest register briefly takes the state lock to hash a consistent state (the worker waits
/// meanwhile).
pub struct MembufRegs {
    shared: Arc<Shared>,
    config: Mutex<[u8; CONFIG_SIZE as usize]>,
}

impl fmt::Debug for MembufRegs {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MembufRegs")
            .field("size", &self.shared.size)
            .field("generation", &self.generation())
            .field("dirty_rate", &self.dirty_rate())
            .finish_non_exhaustive()
    }
}

impl MembufRegs {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        MembufRegs {
            shared,
            config: Mutex::new(initial_config()),
        }
    }

    /// State size in bytes (register 0x08).
    pub fn size(&self) -> u64 {
        self.shared.size
    }

    /// Digest of the current state (register 0x10): xxh3-64 of exactly the bytes a migration
    /// carries.
    pub fn digest(&self) -> u64 {
        digest(&self.shared.lock().state)
    }

    /// State mutations since creation or the last resume (register 0x18).
    pub fn generation(&self) -> u64 {
        self.shared.generation.load(Ordering::Relaxed)
    }

    /// Dirty rate in bytes per second (register 0x20).
    pub fn dirty_rate(&self) -> u64 {
        self.shared.dirty_rate.load(Ordering::Relaxed)
    }

    /// Changes the dirty rate, live (a write of register 0x20).
    pub fn set_dirty_rate(&self, bytes_per_second: u64) {
        self.shared
            .dirty_rate
            .store(bytes_per_second, Ordering::Relaxed);
    }

    /// Completion entries written into guest memory by DMA so far.
    pub fn dma_completions(&self) -> u64 {
        self.shared.dma_completions.load(Ordering::Relaxed)
    }

    /// DMA writes that failed (e.g. the completion window is not mapped).
    pub fn dma_errors(&self) -> u64 {
        self.shared.dma_errors.load(Ordering::Relaxed)
    }

    /// The 64-bit register at `offset` (8-aligned, inside BAR0); other offsets read 0.
    fn register(&self, offset: u64) -> u64 {
        match offset {
            REG_MAGIC => u64::from_le_bytes(MAGIC),
            REG_SIZE => self.size(),
            REG_DIGEST => self.digest(),
            REG_GENERATION => self.generation(),
            REG_DIRTY_RATE => self.dirty_rate(),
            _ => 0,
        }
    }

    fn read_bar0(&self, offset: u64, buf: &mut [u8]) {
        // Compose the bytes of each 64-bit register the access overlaps; the digest is
        // computed only when asked for.
        let end = offset + buf.len() as u64;
        let mut reg = offset / 8 * 8;
        while reg < end.min(REGS_END) {
            let bytes = self.register(reg).to_le_bytes();
            let lo = reg.max(offset);
            let hi = (reg + 8).min(end);
            buf[(lo - offset) as usize..(hi - offset) as usize]
                .copy_from_slice(&bytes[(lo - reg) as usize..(hi - reg) as usize]);
            reg += 8;
        }
        if end > REGS_END {
            let from = REGS_END.max(offset);
            buf[(from - offset) as usize..].fill(0);
        }
    }
}

fn check_access(index: u32, size: u64, offset: u64, len: usize) -> Result<(), DeviceError> {
    if len == 0 || offset.checked_add(len as u64).is_none_or(|end| end > size) {
        return Err(DeviceError::new(
            Errno::EINVAL,
            format!(
                "access of {len} bytes at {offset:#x} is outside region {index} ({size} bytes)"
            ),
        ));
    }
    Ok(())
}

/// Config space: type-0 header, unclassified device, one 4 KiB 32-bit memory BAR.
fn initial_config() -> [u8; CONFIG_SIZE as usize] {
    let mut c = [0u8; CONFIG_SIZE as usize];
    c[0x00..0x02].copy_from_slice(&PCI_VENDOR_ID.to_le_bytes());
    c[0x02..0x04].copy_from_slice(&PCI_DEVICE_ID.to_le_bytes());
    c[0x08] = 1; // revision
    c[0x0b] = 0xff; // class: device does not fit any defined class
    c[0x2c..0x2e].copy_from_slice(&PCI_VENDOR_ID.to_le_bytes()); // subsystem vendor
    c[0x2e..0x30].copy_from_slice(&PCI_DEVICE_ID.to_le_bytes()); // subsystem
    c
}

impl RegionAccess for MembufRegs {
    fn regions(&self) -> Vec<RegionInfo> {
        vec![
            RegionInfo {
                index: BAR0_INDEX,
                size: BAR0_SIZE,
                readable: true,
                writable: true,
            },
            RegionInfo {
                index: CONFIG_INDEX,
                size: CONFIG_SIZE,
                readable: true,
                writable: true,
            },
        ]
    }

    /// membuf raises no interrupts.
    fn irqs(&self) -> Vec<IrqInfo> {
        Vec::new()
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        match index {
            BAR0_INDEX => {
                check_access(index, BAR0_SIZE, offset, buf.len())?;
                self.read_bar0(offset, buf);
            }
            CONFIG_INDEX => {
                check_access(index, CONFIG_SIZE, offset, buf.len())?;
                let config = self.config.lock().unwrap_or_else(|p| p.into_inner());
                let at = offset as usize;
                buf.copy_from_slice(&config[at..at + buf.len()]);
            }
            _ => return Err(no_region(index)),
        }
        Ok(())
    }

    /// BAR0: only the dirty-rate register is writable, as a whole 8-byte write; any other
    /// write fails with `EINVAL` so that a mistaken tool learns of it. Config space: the
    /// command register and BAR0 (masked to its 4 KiB size, so sizing works) take writes;
    /// writes to read-only fields are dropped, as PCI hardware does.
    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        match index {
            BAR0_INDEX => {
                check_access(index, BAR0_SIZE, offset, data.len())?;
                if offset != REG_DIRTY_RATE || data.len() != 8 {
                    return Err(DeviceError::new(
                        Errno::EINVAL,
                        format!(
                            "membuf BAR0: {}-byte write at {offset:#x}; only the 8-byte dirty-rate register at 0x20 is writable",
                            data.len()
                        ),
                    ));
                }
                let mut w = [0u8; 8];
                w.copy_from_slice(data);
                self.set_dirty_rate(u64::from_le_bytes(w));
                Ok(())
            }
            CONFIG_INDEX => {
                check_access(index, CONFIG_SIZE, offset, data.len())?;
                let mut config = self.config.lock().unwrap_or_else(|p| p.into_inner());
                for (i, &byte) in data.iter().enumerate() {
                    let at = offset as usize + i;
                    match at {
                        0x04 => config[at] = byte & 0x06, // memory space, bus master
                        0x10 => config[at] = 0, // BAR0 bits 0..11: size 4 KiB, 32-bit memory
                        0x11 => config[at] = byte & 0xf0,
                        0x12 | 0x13 => config[at] = byte,
                        _ => {}
                    }
                }
                Ok(())
            }
            _ => Err(no_region(index)),
        }
    }
}

fn no_region(index: u32) -> DeviceError {
    DeviceError::new(
        Errno::EINVAL,
        format!("membuf has no region {index} (it has BAR0 = 0 and config space = 7)"),
    )
}
