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
}
