//! Raw kernel definitions: capability bits, feature indices, ioctl numbers and structs.
//!
//! Structs are re-exported from `vfio-bindings` (bindgen output of the kernel header, with
//! its own layout asserts); constants are defined here and pinned by tests, both as literals
//! (`tests/layout.rs`) and against the system's `<linux/vfio.h>` (`tests/system_header.rs`).
//!
//! [`FeatureHeader`] and [`check_feature_request`] validate a `VFIO_DEVICE_FEATURE` request
//! exactly as the kernel core does, so that a vfio-user server and the kernel backend answer
//! malformed requests with the same errno as a real kernel.

use std::fmt;
use std::mem::size_of;

use crate::Errno;

/// The whole bindgen output of `<linux/vfio.h>`, for definitions not re-exported below.
pub use vfio_bindings::bindings::vfio as bindings;

pub use vfio_bindings::bindings::vfio::{
    vfio_device_feature, vfio_device_feature_dma_logging_control,
    vfio_device_feature_dma_logging_range, vfio_device_feature_dma_logging_report,
    vfio_device_feature_mig_data_size, vfio_device_feature_mig_state,
    vfio_device_feature_migration, vfio_device_info, vfio_group_status, vfio_irq_info,
    vfio_irq_set, vfio_precopy_info, vfio_region_info,
};

// ---- Capability bits of `vfio_device_feature_migration.flags` (a u64) ----

/// `VFIO_MIGRATION_STOP_COPY`: the mandatory base capability.
pub const VFIO_MIGRATION_STOP_COPY: u64 = 1 << 0;
/// `VFIO_MIGRATION_P2P`.
pub const VFIO_MIGRATION_P2P: u64 = 1 << 1;
/// `VFIO_MIGRATION_PRE_COPY`.
pub const VFIO_MIGRATION_PRE_COPY: u64 = 1 << 2;

// ---- The `vfio_device_feature.flags` word ----

/// `VFIO_DEVICE_FEATURE_MASK`: bits 0-15 of the flags word hold the feature index.
pub const VFIO_DEVICE_FEATURE_MASK: u32 = 0xffff;
/// `VFIO_DEVICE_FEATURE_GET`: read the feature into the payload.
pub const VFIO_DEVICE_FEATURE_GET: u32 = 1 << 16;
/// `VFIO_DEVICE_FEATURE_SET`: write the feature from the payload.
pub const VFIO_DEVICE_FEATURE_SET: u32 = 1 << 17;
/// `VFIO_DEVICE_FEATURE_PROBE`: only ask whether the feature (and the GET/SET bits) is supported.
pub const VFIO_DEVICE_FEATURE_PROBE: u32 = 1 << 18;

/// Every flag bit the kernel defines; any other bit makes a request fail with `EINVAL`.
const FEATURE_KNOWN_BITS: u32 = VFIO_DEVICE_FEATURE_MASK
    | VFIO_DEVICE_FEATURE_GET
    | VFIO_DEVICE_FEATURE_SET
    | VFIO_DEVICE_FEATURE_PROBE;

/// The GET and SET bits together: the operations a feature may allow.
pub const VFIO_DEVICE_FEATURE_OPS: u32 = VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET;

// ---- Feature indices ----

/// `VFIO_DEVICE_FEATURE_PCI_VF_TOKEN` (SET, 16-byte UUID).
pub const VFIO_DEVICE_FEATURE_PCI_VF_TOKEN: u32 = 0;
/// `VFIO_DEVICE_FEATURE_MIGRATION` (GET [`vfio_device_feature_migration`]).
pub const VFIO_DEVICE_FEATURE_MIGRATION: u32 = 1;
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE` (GET/SET [`vfio_device_feature_mig_state`]).
pub const VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE: u32 = 2;
/// `VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY` (SET).
pub const VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY: u32 = 3;
/// `VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP` (SET).
pub const VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP: u32 = 4;
/// `VFIO_DEVICE_FEATURE_LOW_POWER_EXIT` (SET).
pub const VFIO_DEVICE_FEATURE_LOW_POWER_EXIT: u32 = 5;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START` (SET [`vfio_device_feature_dma_logging_control`]).
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_START: u32 = 6;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP` (SET, no payload).
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP: u32 = 7;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT` (GET [`vfio_device_feature_dma_logging_report`]).
pub const VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT: u32 = 8;
/// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE` (GET [`vfio_device_feature_mig_data_size`]).
pub const VFIO_DEVICE_FEATURE_MIG_DATA_SIZE: u32 = 9;
/// `VFIO_DEVICE_FEATURE_BUS_MASTER` (SET; CDX devices only).
pub const VFIO_DEVICE_FEATURE_BUS_MASTER: u32 = 10;
/// `VFIO_DEVICE_FEATURE_DMA_BUF` (GET).
pub const VFIO_DEVICE_FEATURE_DMA_BUF: u32 = 11;
/// `VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2` (SET): opts in to [`VFIO_PRECOPY_INFO_REINIT`].
pub const VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2: u32 = 12;

/// `VFIO_PRECOPY_INFO_REINIT`: output bit of [`vfio_precopy_info`]`.flags` after opting in
/// with [`VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2`]: new initial data entered the stream.
pub const VFIO_PRECOPY_INFO_REINIT: u32 = 1 << 0;

// ---- ioctl numbers ----

/// `VFIO_TYPE`: the ioctl type byte, `';'`.
pub const VFIO_TYPE: u8 = b';';
/// `VFIO_BASE`: the first VFIO ioctl number.
pub const VFIO_BASE: u32 = 100;
/// `VFIO_API_VERSION`: what [`VFIO_GET_API_VERSION`] returns.
pub const VFIO_API_VERSION: u32 = 0;

/// `_IO(VFIO_TYPE, nr)`: VFIO encodes neither direction nor size in its ioctl numbers.
///
/// Panics (a compile error in a `const`) if `nr` does not fit the 8-bit number field.
pub const fn vfio_io(nr: u32) -> u32 {
    assert!(nr <= 0xff, "ioctl number does not fit in 8 bits");
    ((VFIO_TYPE as u32) << 8) | nr
}

/// `VFIO_GET_API_VERSION` (container fd).
pub const VFIO_GET_API_VERSION: u32 = vfio_io(VFIO_BASE);
/// `VFIO_CHECK_EXTENSION` (container fd).
pub const VFIO_CHECK_EXTENSION: u32 = vfio_io(VFIO_BASE + 1);
/// `VFIO_SET_IOMMU` (container fd).
pub const VFIO_SET_IOMMU: u32 = vfio_io(VFIO_BASE + 2);
/// `VFIO_GROUP_GET_STATUS` (group fd, [`vfio_group_status`]).
pub const VFIO_GROUP_GET_STATUS: u32 = vfio_io(VFIO_BASE + 3);
/// `VFIO_GROUP_SET_CONTAINER` (group fd).
pub const VFIO_GROUP_SET_CONTAINER: u32 = vfio_io(VFIO_BASE + 4);
/// `VFIO_GROUP_UNSET_CONTAINER` (group fd).
pub const VFIO_GROUP_UNSET_CONTAINER: u32 = vfio_io(VFIO_BASE + 5);
/// `VFIO_GROUP_GET_DEVICE_FD` (group fd; the argument is the device name string).
pub const VFIO_GROUP_GET_DEVICE_FD: u32 = vfio_io(VFIO_BASE + 6);
/// `VFIO_DEVICE_GET_INFO` (device fd, [`vfio_device_info`]).
pub const VFIO_DEVICE_GET_INFO: u32 = vfio_io(VFIO_BASE + 7);
/// `VFIO_DEVICE_GET_REGION_INFO` (device fd, [`vfio_region_info`]).
pub const VFIO_DEVICE_GET_REGION_INFO: u32 = vfio_io(VFIO_BASE + 8);
/// `VFIO_DEVICE_GET_IRQ_INFO` (device fd, [`vfio_irq_info`]).
pub const VFIO_DEVICE_GET_IRQ_INFO: u32 = vfio_io(VFIO_BASE + 9);
/// `VFIO_DEVICE_SET_IRQS` (device fd, [`vfio_irq_set`]).
pub const VFIO_DEVICE_SET_IRQS: u32 = vfio_io(VFIO_BASE + 10);
/// `VFIO_DEVICE_RESET` (device fd): returns a migratable device to RUNNING.
pub const VFIO_DEVICE_RESET: u32 = vfio_io(VFIO_BASE + 11);
/// `VFIO_DEVICE_FEATURE` (device fd, [`vfio_device_feature`] plus payload).
pub const VFIO_DEVICE_FEATURE: u32 = vfio_io(VFIO_BASE + 17);
/// `VFIO_DEVICE_BIND_IOMMUFD` (cdev device fd).
pub const VFIO_DEVICE_BIND_IOMMUFD: u32 = vfio_io(VFIO_BASE + 18);
/// `VFIO_DEVICE_ATTACH_IOMMUFD_PT` (cdev device fd).
pub const VFIO_DEVICE_ATTACH_IOMMUFD_PT: u32 = vfio_io(VFIO_BASE + 19);
/// `VFIO_DEVICE_DETACH_IOMMUFD_PT` (cdev device fd).
pub const VFIO_DEVICE_DETACH_IOMMUFD_PT: u32 = vfio_io(VFIO_BASE + 20);
/// `VFIO_MIG_GET_PRECOPY_INFO`: issued on the **data_fd**, not the device fd
/// ([`vfio_precopy_info`]).
pub const VFIO_MIG_GET_PRECOPY_INFO: u32 = vfio_io(VFIO_BASE + 21);

// ---- Typed feature indices ----

/// A device-feature index the kernel defines (bits 0-15 of `vfio_device_feature.flags`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum FeatureIndex {
    /// [`VFIO_DEVICE_FEATURE_PCI_VF_TOKEN`].
    PciVfToken = VFIO_DEVICE_FEATURE_PCI_VF_TOKEN,
    /// [`VFIO_DEVICE_FEATURE_MIGRATION`].
    Migration = VFIO_DEVICE_FEATURE_MIGRATION,
    /// [`VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`].
    MigDeviceState = VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
    /// [`VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY`].
    LowPowerEntry = VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY,
    /// [`VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP`].
    LowPowerEntryWithWakeup = VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP,
    /// [`VFIO_DEVICE_FEATURE_LOW_POWER_EXIT`].
    LowPowerExit = VFIO_DEVICE_FEATURE_LOW_POWER_EXIT,
    /// [`VFIO_DEVICE_FEATURE_DMA_LOGGING_START`].
    DmaLoggingStart = VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
    /// [`VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`].
    DmaLoggingStop = VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
    /// [`VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`].
    DmaLoggingReport = VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
    /// [`VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`].
    MigDataSize = VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
    /// [`VFIO_DEVICE_FEATURE_BUS_MASTER`].
    BusMaster = VFIO_DEVICE_FEATURE_BUS_MASTER,
    /// [`VFIO_DEVICE_FEATURE_DMA_BUF`].
    DmaBuf = VFIO_DEVICE_FEATURE_DMA_BUF,
    /// [`VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2`].
    MigPrecopyInfoV2 = VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2,
}

/// A feature index the kernel does not define (or one wider than 16 bits).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown device feature index {0}; defined indices are 0..=12")]
pub struct UnknownFeature(pub u32);

impl FeatureIndex {
    /// Every defined index, in numeric order.
    pub const ALL: [FeatureIndex; 13] = [
        FeatureIndex::PciVfToken,
        FeatureIndex::Migration,
        FeatureIndex::MigDeviceState,
        FeatureIndex::LowPowerEntry,
        FeatureIndex::LowPowerEntryWithWakeup,
        FeatureIndex::LowPowerExit,
        FeatureIndex::DmaLoggingStart,
        FeatureIndex::DmaLoggingStop,
        FeatureIndex::DmaLoggingReport,
        FeatureIndex::MigDataSize,
        FeatureIndex::BusMaster,
        FeatureIndex::DmaBuf,
        FeatureIndex::MigPrecopyInfoV2,
    ];

    /// The raw index.
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// A short lower-case name (`mig-device-state`), for logs and JSON.
    pub const fn name(self) -> &'static str {
        match self {
            FeatureIndex::PciVfToken => "pci-vf-token",
            FeatureIndex::Migration => "migration",
            FeatureIndex::MigDeviceState => "mig-device-state",
            FeatureIndex::LowPowerEntry => "low-power-entry",
            FeatureIndex::LowPowerEntryWithWakeup => "low-power-entry-with-wakeup",
            FeatureIndex::LowPowerExit => "low-power-exit",
            FeatureIndex::DmaLoggingStart => "dma-logging-start",
            FeatureIndex::DmaLoggingStop => "dma-logging-stop",
            FeatureIndex::DmaLoggingReport => "dma-logging-report",
            FeatureIndex::MigDataSize => "mig-data-size",
            FeatureIndex::BusMaster => "bus-master",
            FeatureIndex::DmaBuf => "dma-buf",
            FeatureIndex::MigPrecopyInfoV2 => "mig-precopy-info-v2",
        }
    }

    /// The kernel header's macro name (`VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`).
    pub const fn kernel_name(self) -> &'static str {
        match self {
            FeatureIndex::PciVfToken => "VFIO_DEVICE_FEATURE_PCI_VF_TOKEN",
            FeatureIndex::Migration => "VFIO_DEVICE_FEATURE_MIGRATION",
            FeatureIndex::MigDeviceState => "VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE",
            FeatureIndex::LowPowerEntry => "VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY",
            FeatureIndex::LowPowerEntryWithWakeup => {
                "VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP"
            }
            FeatureIndex::LowPowerExit => "VFIO_DEVICE_FEATURE_LOW_POWER_EXIT",
            FeatureIndex::DmaLoggingStart => "VFIO_DEVICE_FEATURE_DMA_LOGGING_START",
            FeatureIndex::DmaLoggingStop => "VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP",
            FeatureIndex::DmaLoggingReport => "VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT",
            FeatureIndex::MigDataSize => "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE",
            FeatureIndex::BusMaster => "VFIO_DEVICE_FEATURE_BUS_MASTER",
            FeatureIndex::DmaBuf => "VFIO_DEVICE_FEATURE_DMA_BUF",
            FeatureIndex::MigPrecopyInfoV2 => "VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2",
        }
    }

    /// The operations the kernel allows on this feature: a subset of
    /// [`VFIO_DEVICE_FEATURE_GET`] | [`VFIO_DEVICE_FEATURE_SET`].
    pub const fn ops(self) -> u32 {
        match self {
            FeatureIndex::MigDeviceState => VFIO_DEVICE_FEATURE_GET | VFIO_DEVICE_FEATURE_SET,
            FeatureIndex::Migration
            | FeatureIndex::DmaLoggingReport
            | FeatureIndex::MigDataSize
            | FeatureIndex::DmaBuf => VFIO_DEVICE_FEATURE_GET,
            FeatureIndex::PciVfToken
            | FeatureIndex::LowPowerEntry
            | FeatureIndex::LowPowerEntryWithWakeup
            | FeatureIndex::LowPowerExit
            | FeatureIndex::DmaLoggingStart
            | FeatureIndex::DmaLoggingStop
            | FeatureIndex::BusMaster
            | FeatureIndex::MigPrecopyInfoV2 => VFIO_DEVICE_FEATURE_SET,
        }
    }

    /// The smallest payload (bytes after the 8-byte header) a GET or SET of this feature
    /// needs, for the features whose payload vfio-mig knows; `None` for the others.
    pub const fn min_payload(self) -> Option<usize> {
        match self {
            FeatureIndex::PciVfToken => Some(16),
            FeatureIndex::Migration => Some(size_of::<vfio_device_feature_migration>()),
            FeatureIndex::MigDeviceState => Some(size_of::<vfio_device_feature_mig_state>()),
            FeatureIndex::DmaLoggingStart => {
                Some(size_of::<vfio_device_feature_dma_logging_control>())
            }
            FeatureIndex::DmaLoggingStop => Some(0),
            FeatureIndex::DmaLoggingReport => {
                Some(size_of::<vfio_device_feature_dma_logging_report>())
            }
            FeatureIndex::MigDataSize => Some(size_of::<vfio_device_feature_mig_data_size>()),
            FeatureIndex::LowPowerEntry
            | FeatureIndex::LowPowerEntryWithWakeup
            | FeatureIndex::LowPowerExit
            | FeatureIndex::BusMaster
            | FeatureIndex::DmaBuf
            | FeatureIndex::MigPrecopyInfoV2 => None,
        }
    }

    /// The `vfio_device_feature.flags` word for this feature with `ops` (any of GET, SET,
    /// PROBE) set; other bits of `ops` are dropped.
    pub const fn flags(self, ops: u32) -> u32 {
        self.raw() | (ops & !VFIO_DEVICE_FEATURE_MASK & FEATURE_KNOWN_BITS)
    }
}

impl TryFrom<u32> for FeatureIndex {
    type Error = UnknownFeature;

    fn try_from(raw: u32) -> Result<Self, UnknownFeature> {
        FeatureIndex::ALL
            .get(raw as usize)
            .copied()
            .ok_or(UnknownFeature(raw))
    }
}

impl From<FeatureIndex> for u32 {
    fn from(feature: FeatureIndex) -> u32 {
        feature.raw()
    }
}

impl fmt::Display for FeatureIndex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

// ---- Validation of VFIO_DEVICE_FEATURE requests ----

/// Size of the `vfio_device_feature` header that precedes the payload.
pub const FEATURE_HEADER_LEN: usize = size_of::<vfio_device_feature>();

/// A `VFIO_DEVICE_FEATURE` request that passed the kernel core's checks, split into its parts.
///
/// This is the first of the two validation steps, the one that does not depend on the
/// feature: build it with [`FeatureHeader::parse`], decide from [`FeatureHeader::index`]
/// whether the device has the feature at all (the kernel answers `ENOTTY` when it does not),
/// then finish with [`FeatureHeader::check`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureHeader {
    flags: u32,
    payload_len: usize,
}

impl FeatureHeader {
    /// Applies the core checks, in the kernel's order:
    /// `argsz` below 8 → `EINVAL`; a flag bit outside index/GET/SET/PROBE → `EINVAL`;
    /// GET and SET together without PROBE → `EINVAL`.
    ///
    /// `argsz` is the caller's claim (header plus payload); checking it against the bytes
    /// actually received is the transport's job.
    pub fn parse(argsz: u32, flags: u32) -> Result<FeatureHeader, Errno> {
        let payload_len = (argsz as usize)
            .checked_sub(FEATURE_HEADER_LEN)
            .ok_or(Errno::EINVAL)?;
        if flags & !FEATURE_KNOWN_BITS != 0 {
            return Err(Errno::EINVAL);
        }
        if flags & VFIO_DEVICE_FEATURE_OPS == VFIO_DEVICE_FEATURE_OPS
            && flags & VFIO_DEVICE_FEATURE_PROBE == 0
        {
            return Err(Errno::EINVAL);
        }
        Ok(FeatureHeader { flags, payload_len })
    }

    /// The raw 16-bit feature index.
    pub const fn index(self) -> u32 {
        self.flags & VFIO_DEVICE_FEATURE_MASK
    }

    /// The feature, if the index is one the kernel defines.
    pub fn feature(self) -> Result<FeatureIndex, UnknownFeature> {
        FeatureIndex::try_from(self.index())
    }

    /// Whether the GET bit is set.
    pub const fn get(self) -> bool {
        self.flags & VFIO_DEVICE_FEATURE_GET != 0
    }

    /// Whether the SET bit is set.
    pub const fn set(self) -> bool {
        self.flags & VFIO_DEVICE_FEATURE_SET != 0
    }

    /// Whether the PROBE bit is set.
    pub const fn probe(self) -> bool {
        self.flags & VFIO_DEVICE_FEATURE_PROBE != 0
    }

    /// Payload length the caller claims: `argsz - 8`.
    pub const fn payload_len(self) -> usize {
        self.payload_len
    }

    /// Applies the per-feature checks (`vfio_check_feature`), in the kernel's order:
    /// a GET or SET bit not in `allowed_ops` → `EINVAL`; PROBE (with only allowed bits) →
    /// [`FeatureOp::Probe`], whatever the payload; neither GET nor SET → `EINVAL`;
    /// a payload shorter than `min_payload` → `EINVAL`.
    ///
    /// `allowed_ops` is a subset of [`VFIO_DEVICE_FEATURE_OPS`], e.g. [`FeatureIndex::ops`];
    /// `min_payload` is e.g. [`FeatureIndex::min_payload`].
    pub fn check(self, allowed_ops: u32, min_payload: usize) -> Result<FeatureRequest, Errno> {
        let requested = self.flags & VFIO_DEVICE_FEATURE_OPS;
        if requested & !allowed_ops != 0 {
            return Err(Errno::EINVAL);
        }
        let op = if self.probe() {
            FeatureOp::Probe
        } else if self.get() {
            FeatureOp::Get
        } else if self.set() {
            FeatureOp::Set
        } else {
            return Err(Errno::EINVAL);
        };
        if op != FeatureOp::Probe && self.payload_len < min_payload {
            return Err(Errno::EINVAL);
        }
        Ok(FeatureRequest {
            index: self.index(),
            op,
            payload_len: self.payload_len,
        })
    }
}

/// What a fully checked feature request asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FeatureOp {
    /// Only a support query: answer success and touch no payload.
    Probe,
    /// Read the feature into the payload.
    Get,
    /// Write the feature from the payload.
    Set,
}

/// A `VFIO_DEVICE_FEATURE` request that passed every kernel check; the handler may act on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FeatureRequest {
    index: u32,
    op: FeatureOp,
    payload_len: usize,
}

impl FeatureRequest {
    /// The raw 16-bit feature index.
    pub const fn index(self) -> u32 {
        self.index
    }

    /// The feature, if the index is one the kernel defines.
    pub fn feature(self) -> Result<FeatureIndex, UnknownFeature> {
        FeatureIndex::try_from(self.index)
    }

    /// The operation to perform.
    pub const fn op(self) -> FeatureOp {
        self.op
    }

    /// Payload length the caller claims (`argsz - 8`); at least the minimum unless PROBE.
    pub const fn payload_len(self) -> usize {
        self.payload_len
    }
}

/// Validates a `VFIO_DEVICE_FEATURE` request exactly as the kernel does, for a handler that
/// has already decided it serves this feature: [`FeatureHeader::parse`] then
/// [`FeatureHeader::check`].
///
/// Every failure is `EINVAL`. A handler serving several features, some of which a device may
/// lack, should call the two steps itself and answer `ENOTTY` between them for a feature the
/// device does not have, which is where the kernel does it.
pub fn check_feature_request(
    argsz: u32,
    flags: u32,
    allowed_ops: u32,
    min_payload: usize,
) -> Result<FeatureRequest, Errno> {
    FeatureHeader::parse(argsz, flags)?.check(allowed_ops, min_payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GET: u32 = VFIO_DEVICE_FEATURE_GET;
    const SET: u32 = VFIO_DEVICE_FEATURE_SET;
    const PROBE: u32 = VFIO_DEVICE_FEATURE_PROBE;
    const STATE: u32 = VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE;

    fn op(argsz: u32, flags: u32, allowed: u32, min: usize) -> Result<FeatureOp, Errno> {
        check_feature_request(argsz, flags, allowed, min).map(FeatureRequest::op)
    }

    #[test]
    fn feature_index_conversion_is_total() {
        for (raw, feature) in FeatureIndex::ALL.into_iter().enumerate() {
            assert_eq!(feature.raw(), raw as u32);
            assert_eq!(FeatureIndex::try_from(raw as u32), Ok(feature));
        }
        for raw in [13, 0xffff, 0x1_0000, u32::MAX] {
            assert_eq!(FeatureIndex::try_from(raw), Err(UnknownFeature(raw)));
        }
    }

    #[test]
    fn feature_names_are_distinct_and_kernel_names_carry_the_prefix() {
        let mut names: Vec<_> = FeatureIndex::ALL.map(FeatureIndex::name).to_vec();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FeatureIndex::ALL.len());
        for f in FeatureIndex::ALL {
            assert!(f.kernel_name().starts_with("VFIO_DEVICE_FEATURE_"), "{f}");
            assert_eq!(f.to_string(), f.name());
        }
    }

    #[test]
    fn flags_builder_keeps_only_op_bits() {
        assert_eq!(FeatureIndex::MigDeviceState.flags(SET), 0x2_0002);
        assert_eq!(FeatureIndex::DmaLoggingStart.flags(PROBE), 0x4_0006);
        assert_eq!(FeatureIndex::Migration.flags(GET | 0x8000_ffff), 0x1_0001);
    }

    #[test]
    fn core_checks_come_first_and_in_order() {
        // argsz < 8 wins over everything else.
        for argsz in 0..8 {
            assert_eq!(op(argsz, STATE | GET, GET | SET, 0), Err(Errno::EINVAL));
            assert_eq!(FeatureHeader::parse(argsz, 0x8000_0000), Err(Errno::EINVAL));
        }
        // Each undefined bit alone is refused, whatever the feature allows.
        for bit in 19..32 {
            assert_eq!(
                op(16, STATE | GET | (1 << bit), GET | SET, 0),
                Err(Errno::EINVAL)
            );
        }
        assert_eq!(op(16, STATE | GET | SET, GET | SET, 0), Err(Errno::EINVAL));
        // PROBE may ask about GET and SET together.
        assert_eq!(
            op(8, STATE | GET | SET | PROBE, GET | SET, 8),
            Ok(FeatureOp::Probe)
        );
    }

    #[test]
    fn header_splits_the_flags_word() {
        let h = FeatureHeader::parse(24, 0x0001_0009).unwrap();
        assert_eq!(h.index(), 9);
        assert_eq!(h.feature(), Ok(FeatureIndex::MigDataSize));
        assert!(h.get() && !h.set() && !h.probe());
        assert_eq!(h.payload_len(), 16);
        let h = FeatureHeader::parse(8, 0x0004_ffff).unwrap();
        assert_eq!(h.index(), 0xffff);
        assert_eq!(h.feature(), Err(UnknownFeature(0xffff)));
        assert!(h.probe() && !h.get() && !h.set());
    }

    #[test]
    fn per_feature_checks_follow_the_kernel_order() {
        // A disallowed op is refused even when probing.
        assert_eq!(op(8, 1 | SET | PROBE, GET, 8), Err(Errno::EINVAL));
        assert_eq!(op(16, 1 | SET, GET, 8), Err(Errno::EINVAL));
        // PROBE with allowed (or no) op bits succeeds without any payload.
        assert_eq!(op(8, 6 | PROBE, SET, 24), Ok(FeatureOp::Probe));
        assert_eq!(op(8, 6 | SET | PROBE, SET, 24), Ok(FeatureOp::Probe));
        // Neither GET nor SET.
        assert_eq!(op(64, 1, GET, 8), Err(Errno::EINVAL));
        // Payload minimum, inclusive.
        assert_eq!(op(15, STATE | SET, GET | SET, 8), Err(Errno::EINVAL));
        assert_eq!(op(16, STATE | SET, GET | SET, 8), Ok(FeatureOp::Set));
        assert_eq!(op(16, STATE | GET, GET | SET, 8), Ok(FeatureOp::Get));
        // A feature without payload accepts the bare header.
        assert_eq!(op(8, 7 | SET, SET, 0), Ok(FeatureOp::Set));
    }

    #[test]
    fn checked_request_reports_index_and_payload() {
        let req = check_feature_request(40, 8 | GET, GET, 32).unwrap();
        assert_eq!(req.index(), 8);
        assert_eq!(req.feature(), Ok(FeatureIndex::DmaLoggingReport));
        assert_eq!(req.op(), FeatureOp::Get);
        assert_eq!(req.payload_len(), 32);
    }

    #[test]
    fn per_feature_table_matches_the_uapi() {
        use FeatureIndex::*;
        for f in [Migration, DmaLoggingReport, MigDataSize, DmaBuf] {
            assert_eq!(f.ops(), GET, "{f}");
        }
        assert_eq!(MigDeviceState.ops(), GET | SET);
        for f in [
            PciVfToken,
            LowPowerEntry,
            LowPowerEntryWithWakeup,
            LowPowerExit,
            DmaLoggingStart,
            DmaLoggingStop,
            BusMaster,
            MigPrecopyInfoV2,
        ] {
            assert_eq!(f.ops(), SET, "{f}");
        }
        let mins: Vec<_> = FeatureIndex::ALL.map(FeatureIndex::min_payload).to_vec();
        let expected = [
            Some(16),
            Some(8),
            Some(8),
            None,
            None,
            None,
            Some(24),
            Some(0),
            Some(32),
            Some(8),
            None,
            None,
            None,
        ];
        assert_eq!(mins, expected);
    }

    proptest::proptest! {
        #[test]
        fn validation_is_total_and_sound(
            argsz in proptest::prelude::any::<u32>(),
            flags in proptest::prelude::any::<u32>(),
            allowed in 0u32..4,
            min in 0usize..64,
        ) {
            let allowed = allowed << 16;
            match check_feature_request(argsz, flags, allowed, min) {
                Err(e) => proptest::prop_assert_eq!(e, Errno::EINVAL),
                Ok(req) => {
                    let requested = flags & (GET | SET);
                    proptest::prop_assert!(argsz >= 8);
                    proptest::prop_assert_eq!(flags & !0x7_ffff, 0);
                    proptest::prop_assert_eq!(requested & !allowed, 0);
                    proptest::prop_assert_eq!(req.index(), flags & 0xffff);
                    proptest::prop_assert_eq!(req.payload_len(), argsz as usize - 8);
                    match req.op() {
                        FeatureOp::Probe => proptest::prop_assert!(flags & PROBE != 0),
                        FeatureOp::Get => {
                            proptest::prop_assert_eq!(flags & (SET | PROBE), 0);
                            proptest::prop_assert!(req.payload_len() >= min);
                        }
                        FeatureOp::Set => {
                            proptest::prop_assert_eq!(flags & (GET | PROBE), 0);
                            proptest::prop_assert!(req.payload_len() >= min);
                        }
                    }
                }
            }
        }
    }
}
