//! Raw kernel definitions: capability bits, feature indices, ioctl numbers and structs.
//!
//! Structs are re-exported from `vfio-bindings` (bindgen output of the kernel header, with
//! its own layout asserts); constants are defined here and pinned by tests.

/// `VFIO_MIGRATION_STOP_COPY`: the mandatory base capability.
pub const VFIO_MIGRATION_STOP_COPY: u64 = 1 << 0;
/// `VFIO_MIGRATION_P2P`.
pub const VFIO_MIGRATION_P2P: u64 = 1 << 1;
/// `VFIO_MIGRATION_PRE_COPY`.
pub const VFIO_MIGRATION_PRE_COPY: u64 = 1 << 2;
