//! The device framework of vfio-mig: the two traits every transport and tool is built on, and
//! the controller that makes a device author's hooks obey every rule of the VFIO migration
//! uAPI v2.
//!
//! * [`MigrationDevice`] is the **user's view** of one migratable device (what a VMM sees):
//!   one query for the capabilities, one call to move through the state machine (possibly
//!   several arcs), a [`DataStream`] on the four session-opening arcs, precopy info, the
//!   stop-copy size estimate, DMA dirty logging and reset. It is implemented by
//!   [`Controller`] (a local device), by the vfio-user client (a remote one) and by the kernel
//!   backend (a device under `/dev/vfio`).
//! * [`Migratable`] is the **device author's** trait: one required hook per kind of arc. No hook
//!   has a default, so a device that forgets one does not compile.
//! * [`Controller`] wraps a [`Migratable`] and enforces the uAPI: multi-arc transitions are
//!   walked one arc at a time with `vfio-mig-fsm`; a failed arc leaves the device at the last
//!   state reached and the error names the arc; streams are handed out only by the four
//!   session-opening arcs, one saving session spans PRE_COPY -> PRE_COPY_P2P -> STOP_COPY,
//!   reads are valid only while saving and writes only while resuming, streams of an ended
//!   session fail with `ENODEV`; precopy info only in PRE_COPY states; DMA logging is validated
//!   exactly as the kernel does; ERROR is entered only when a hook reports the device broken,
//!   and only [`MigrationDevice::reset`] leaves it.
#![forbid(unsafe_code)]

pub mod conformance;
mod controller;
mod dma;
mod error;
mod regions;
mod types;

pub use controller::Controller;
pub use dma::{
    check_logging_ranges, DirtyLog, Dma, GuestMemory, VecGuestMemory, MAX_LOGGING_RANGES,
};
pub use error::{DeviceError, TransitionError};
pub use regions::{
    DmaWindow, HostLink, HostServices, IrqInfo, MmapArea, RegionAccess, RegionInfo, RegionMmap,
};
pub use types::{
    write_all, DataStream, DeviceIdentity, IovaRange, MigrationStream, PrecopyInfo, ReadOutcome,
    RunMode, SaveKind,
};
pub use vfio_mig_fsm::StreamDirection;
pub use vfio_mig_uapi::{DeviceState, Errno, MigrationFeatures};

/// The user's view of one migratable device: what a VMM, the orchestrator, the conformance
/// checker and the CLI speak to, whatever the device is behind it.
///
/// Errors carry the errno the kernel would return ([`DeviceError::errno`]) so that transports
/// can pass them on faithfully. Implementations are safe to share between threads.
pub trait MigrationDevice: Send + Sync {
    /// The migration capabilities, all at once (`VFIO_DEVICE_FEATURE_MIGRATION`).
    fn features(&self) -> Result<MigrationFeatures, DeviceError>;

    /// What the device is, for compatibility checks before anything is written into it.
    fn identity(&self) -> Result<DeviceIdentity, DeviceError>;

    /// The current state (`MIG_DEVICE_STATE` GET).
    fn state(&self) -> Result<DeviceState, DeviceError>;

    /// Moves the device to `target`, over as many arcs as needed (`MIG_DEVICE_STATE` SET).
    ///
    /// Returns a stream when the last arc opens a data session (RUNNING -> PRE_COPY,
    /// RUNNING_P2P -> PRE_COPY_P2P, STOP -> STOP_COPY, STOP -> RESUMING), `None` otherwise.
    /// On failure the error says which arc failed and where the device was left.
    fn set_state(&self, target: DeviceState) -> Result<Option<DataStream>, TransitionError>;

    /// The estimated number of bytes STOP_COPY will produce (`MIG_DATA_SIZE`); any state.
    fn data_size(&self) -> Result<u64, DeviceError>;

    /// Starts DMA dirty logging of `ranges` with `page_size` as a hint; returns the page size
    /// the device uses (`DMA_LOGGING_START`).
    fn dma_logging_start(&self, page_size: u64, ranges: &[IovaRange]) -> Result<u64, DeviceError>;

    /// Reads and clears the dirty log of `[iova, iova + length)` into `bitmap`, one bit per
    /// `page_size` page, page k at bit k % 64 of word k / 64; bits are only ever set, so zero
    /// the bitmap first (`DMA_LOGGING_REPORT`).
    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError>;

    /// Stops DMA dirty logging (`DMA_LOGGING_STOP`).
    fn dma_logging_stop(&self) -> Result<(), DeviceError>;

    /// Resets the device (`VFIO_DEVICE_RESET`): back to RUNNING from any state, ERROR
    /// included; every open stream is disabled (later reads and writes fail with `ENODEV`).
    fn reset(&self) -> Result<(), DeviceError>;
}

impl<T: MigrationDevice + ?Sized> MigrationDevice for std::sync::Arc<T> {
    fn features(&self) -> Result<MigrationFeatures, DeviceError> {
        (**self).features()
    }
    fn identity(&self) -> Result<DeviceIdentity, DeviceError> {
        (**self).identity()
    }
    fn state(&self) -> Result<DeviceState, DeviceError> {
        (**self).state()
    }
    fn set_state(&self, target: DeviceState) -> Result<Option<DataStream>, TransitionError> {
        (**self).set_state(target)
    }
    fn data_size(&self) -> Result<u64, DeviceError> {
        (**self).data_size()
    }
    fn dma_logging_start(&self, page_size: u64, ranges: &[IovaRange]) -> Result<u64, DeviceError> {
        (**self).dma_logging_start(page_size, ranges)
    }
    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        (**self).dma_logging_report(iova, length, page_size, bitmap)
    }
    fn dma_logging_stop(&self) -> Result<(), DeviceError> {
        (**self).dma_logging_stop()
    }
    fn reset(&self) -> Result<(), DeviceError> {
        (**self).reset()
    }
}

/// The device author's trait: one hook per kind of arc, called by [`Controller`] with the
/// device's state lock held, one arc at a time, only on arcs the device's feature set has.
///
/// A hook that returns an error means the arc did not happen: the device must still be in the
/// state the arc started from. Return [`DeviceError::broken`] when that is impossible; the
/// controller then moves the device to ERROR, from which only [`Migratable::reset`] brings it
/// back. No hook has a default body.
pub trait Migratable: Send + 'static {
    /// The capability set; must contain STOP_COPY and must not change over the device's life.
    fn features(&self) -> MigrationFeatures;

    /// What the device is (kind, version, compatibility data).
    fn identity(&self) -> DeviceIdentity;

    /// RUNNING -> STOP or RUNNING_P2P -> STOP: stop all DMA and freeze the internal state.
    fn stop(&mut self) -> Result<(), DeviceError>;

    /// STOP -> RUNNING (`RunMode::Full`) or STOP -> RUNNING_P2P (`RunMode::P2pQuiesced`).
    fn start(&mut self, mode: RunMode) -> Result<(), DeviceError>;

    /// Quiesce (`true`: RUNNING -> RUNNING_P2P, PRE_COPY -> PRE_COPY_P2P) or release
    /// (`false`: the reverse arcs) peer-to-peer DMA; an active saving session continues.
    fn set_p2p_quiesced(&mut self, quiesced: bool) -> Result<(), DeviceError>;

    /// Opens a saving session: RUNNING(_P2P) -> PRE_COPY(_P2P) with [`SaveKind::PreCopy`] (the
    /// device keeps running and tracks what changes), STOP -> STOP_COPY with
    /// [`SaveKind::StopCopy`] (the device is stopped; the session carries the final state).
    fn save_begin(&mut self, kind: SaveKind) -> Result<(), DeviceError>;

    /// PRE_COPY(_P2P) -> STOP_COPY: stop the device (as [`Migratable::stop`]) and continue
    /// the same session with whatever is still needed to reproduce the final state.
    fn save_stop_copy(&mut self) -> Result<(), DeviceError>;

    /// Produces the next bytes of the saving session into `buf`; `Ok(0)` means nothing now
    /// (in PRE_COPY) or the end of the state (in STOP_COPY).
    fn save_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError>;

    /// In PRE_COPY states: the initial bytes still unread and the bytes dirtied since read.
    fn save_pending(&mut self) -> Result<PrecopyInfo, DeviceError>;

    /// The saving session ends (STOP_COPY -> STOP, PRE_COPY(_P2P) -> RUNNING(_P2P), or a
    /// reset): drop its bookkeeping. The device's run state does not change.
    fn save_end(&mut self);

    /// STOP -> RESUMING: get ready to take in a new state.
    fn resume_begin(&mut self) -> Result<(), DeviceError>;

    /// Takes the next bytes of the resuming session; returns how many were consumed (at least
    /// one for a non-empty `buf`). Reject bytes that cannot be right as early as possible.
    fn resume_write(&mut self, buf: &[u8]) -> Result<usize, DeviceError>;

    /// RESUMING -> STOP: validate everything written and make it the device's state. An error
    /// refuses the arc (the device stays in RESUMING) and should say what was wrong.
    fn resume_finish(&mut self) -> Result<(), DeviceError>;

    /// The estimated size of the STOP_COPY stream in bytes, in any state.
    fn stop_copy_size(&mut self) -> Result<u64, DeviceError>;

    /// Whether the device records its DMA writes through the [`Dma`] handle it was given, so
    /// that DMA dirty logging is meaningful. `false` makes logging requests fail with ENOTTY.
    fn dma_logging_supported(&self) -> bool;

    /// Device reset: any session is gone, the device runs again (RUNNING).
    fn reset(&mut self);
}
