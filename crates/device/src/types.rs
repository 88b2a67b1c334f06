//! Plain data types shared by the two traits.

use std::fmt;

use vfio_mig_fsm::StreamDirection;

use crate::DeviceError;

/// What a device is, for checking a destination before anything is written into it.
#[derive(Clone, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceIdentity {
    /// The device kind, e.g. `membuf`, or `pci:8086:1521` for a kernel device.
    pub kind: String,
    /// The version of the device's state format.
    pub version: String,
    /// Opaque compatibility data the device defines (e.g. membuf: its state size). A
    /// destination must present the same bytes to accept a stream.
    pub compat: Vec<u8>,
}

/// A window of guest I/O virtual addresses (`vfio_device_feature_dma_logging_range`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct IovaRange {
    /// First address.
    pub iova: u64,
    /// Length in bytes.
    pub length: u64,
}

impl IovaRange {
    /// The first address past the range, or `None` if it overflows.
    pub fn end(&self) -> Option<u64> {
        self.iova.checked_add(self.length)
    }
}

/// `vfio_precopy_info`: what is still to be read in PRE_COPY states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct PrecopyInfo {
    /// The mandatory initial chunk still unread; only falls. Do not go to STOP_COPY before
    /// it reaches 0.
    pub initial_bytes: u64,
    /// State changed since it was last read; rises and falls.
    pub dirty_bytes: u64,
}

/// What one read of a saving stream gave.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReadOutcome {
    /// This many bytes (more than 0) were placed at the start of the buffer.
    Data(usize),
    /// PRE_COPY states: nothing to read now (the kernel's `ENOMSG`); more may come.
    NothingNow,
    /// STOP_COPY: the device's state is complete (the kernel's read of 0).
    End,
}

/// Which kind of saving session [`crate::Migratable::save_begin`] opens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SaveKind {
    /// From RUNNING or RUNNING_P2P into PRE_COPY(_P2P): the device keeps running.
    PreCopy,
    /// From STOP into STOP_COPY: the device is stopped.
    StopCopy,
}

/// How [`crate::Migratable::start`] starts the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunMode {
    /// RUNNING: fully operational.
    Full,
    /// RUNNING_P2P: running, but starting no peer-to-peer DMA.
    P2pQuiesced,
}

/// One data session of a device: the saving stream (readable) or the resuming stream
/// (writable). The kernel's `data_fd`; a vfio-user session's MIG_DATA_READ/WRITE.
///
/// A stream stays valid while its session lasts: PRE_COPY -> PRE_COPY_P2P -> STOP_COPY is one
/// session. Once the device leaves it (or is reset), every call fails with `ENODEV`.
pub trait MigrationStream: Send + fmt::Debug {
    /// Saving or resuming.
    fn direction(&self) -> StreamDirection;

    /// Reads the next bytes of a saving session. Fails with `EINVAL`-like errors on a
    /// resuming stream and `ENODEV` once the session ended.
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, DeviceError>;

    /// Writes bytes of a resuming session; returns how many were taken (at least one for a
    /// non-empty `buf`).
    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError>;

    /// `VFIO_MIG_GET_PRECOPY_INFO`: valid only in PRE_COPY and PRE_COPY_P2P.
    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError>;
}

/// A data session handed out by [`crate::MigrationDevice::set_state`].
pub type DataStream = Box<dyn MigrationStream>;

/// Writes all of `buf` into a resuming stream.
pub fn write_all(stream: &mut dyn MigrationStream, mut buf: &[u8]) -> Result<(), DeviceError> {
    while !buf.is_empty() {
        let n = stream.write(buf)?;
        if n == 0 || n > buf.len() {
            return Err(DeviceError::new(
                vfio_mig_uapi::Errno::EIO,
                format!("resuming stream took {n} of {} bytes", buf.len()),
            ));
        }
        buf = &buf[n..];
    }
    Ok(())
}
