//! Sans-IO codec of the vfio-user protocol: every message of commands 1-18, both directions.
//!
//! # Receiving
//!
//! 1. Read [`HEADER_SIZE`] bytes; [`message_len`] (or [`Header::decode`] then
//!    [`Header::check`]) validates them against [`Limits`] and says how long the whole
//!    message is. Read exactly the rest: messages are always read whole.
//! 2. [`Body::decode`] (or [`Message::decode`] on the whole buffer) turns the payload into a
//!    typed [`Request`], [`Reply`] or [`ErrorReply`]. Bulk data (REGION_READ replies,
//!    REGION_WRITE, DMA_READ replies, DMA_WRITE, MIG_DATA_READ replies, MIG_DATA_WRITE) is
//!    borrowed from the receive buffer, never copied.
//! 3. If decoding a command fails, the header still has the msg_id and command number:
//!    answer with [`Header::error_reply_to`] and [`CodecError::errno`].
//!
//! Decoding is total: any bytes give a message or a [`CodecError`], never a panic, and no
//! allocation exceeds what [`Limits`] allows (only control messages allocate at all: the
//! VERSION JSON parse and bounded arrays).
//!
//! Replies are self-describing; [`Reply::check_answers`] checks one against its request.
//!
//! # Sending
//!
//! Build a [`Message`] and either [`Message::encode`] it into a reusable `Vec<u8>`, or
//! [`Message::encode_head`] it into a [`HeadBuf`] on the stack and send the returned
//! [`Bulk`] data after it (e.g. one `sendmsg` with two iovecs), so migration data is never
//! copied into a staging buffer.
//!
//! File descriptors never appear in the bytes; they travel beside the message (DMA_MAP,
//! SET_IRQS, GET_REGION_INFO, GET_REGION_IO_FDS, VERSION with twin sockets).

mod device;
mod dma;
mod error;
mod feature;
mod header;
mod message;
mod migration;
mod region;
mod version;
mod wire;

pub use device::{
    DeviceInfo, IoFdSubRegion, IrqInfo, IrqSet, RegionCap, RegionInfo, RegionInfoReply,
    RegionInfoRequest, RegionIoFdsReply, RegionIoFdsRequest, SparseMmapArea, DEVICE_FLAGS_PCI,
    DEVICE_FLAGS_RESET, IO_FD_TYPE_IOEVENTFD, IO_FD_TYPE_IOREGIONFD, IRQ_INFO_AUTOMASKED,
    IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE, IRQ_SET_ACTION_MASK,
    IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_BOOL, IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE, REGION_INFO_CAP_SPARSE_MMAP, REGION_INFO_CAP_TYPE, REGION_INFO_FLAG_CAPS,
    REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};
pub use dma::{
    DmaAccess, DmaData, DmaMap, DmaUnmap, DMA_MAP_FLAG_READ, DMA_MAP_FLAG_WRITE, DMA_UNMAP_FLAG_ALL,
};
pub use error::CodecError;
pub use feature::{
    DeviceFeature, DmaLoggingControl, DmaLoggingReport, FeatureData, IovaRange,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_GET,
    FEATURE_HEADER, FEATURE_INDEX_MASK, FEATURE_MIGRATION, FEATURE_MIG_DATA_SIZE,
    FEATURE_MIG_DEVICE_STATE, FEATURE_PROBE, FEATURE_SET,
};
pub use header::{
    message_len, Command, Header, Limits, MessageKind, DEFAULT_MAX_DATA_XFER_SIZE,
    DEFAULT_MAX_MSG_SIZE, FLAGS_ERROR, FLAGS_NO_REPLY, FLAGS_TYPE_COMMAND, FLAGS_TYPE_MASK,
    FLAGS_TYPE_REPLY, HEADER_SIZE, MAX_DATA_PREFIX,
};
pub use message::{Body, ErrorReply, Message, Reply, Request};
pub use migration::{MigDataReadReply, MigDataReadRequest, MigDataWrite, MIG_DATA_PREFIX};
pub use region::{MultiWrite, RegionAccess, RegionData, WriteMulti, WriteMultiReply};
pub use version::{
    Capabilities, MigrationCapability, TwinSocket, Version, DEFAULT_MAX_DMA_MAPS,
    DEFAULT_MAX_MSG_FDS, DEFAULT_PGSIZES, VERSION_MAJOR, VERSION_MINOR,
};
pub use wire::{StackBuf, WireBuf};

/// Capacity of [`HeadBuf`]: the header plus the largest fixed part that precedes bulk data
/// (DEVICE_FEATURE DMA_LOGGING_REPORT: 8 + 24 bytes).
pub const MAX_HEAD_LEN: usize = 64;

/// A stack buffer large enough for the head of any data-carrying message.
pub type HeadBuf = StackBuf<MAX_HEAD_LEN>;

/// The part of a message an encoder does not copy: borrowed bulk data, then `padding` zero
/// bytes (only MIG_DATA_READ replies mimicking libvfio-user have padding).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Bulk<'a> {
    /// Data to send after the head.
    pub data: &'a [u8],
    /// Zero bytes to send after the data.
    pub padding: usize,
}

impl<'a> Bulk<'a> {
    /// Nothing after the head.
    pub const NONE: Bulk<'static> = Bulk {
        data: &[],
        padding: 0,
    };

    /// Just `data`.
    pub const fn data(data: &'a [u8]) -> Self {
        Bulk { data, padding: 0 }
    }

    /// Total bytes.
    pub const fn len(&self) -> usize {
        self.data.len() + self.padding
    }

    /// Whether there is nothing.
    pub const fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A payload structure: decoded from bytes it may borrow from, encoded into a [`WireBuf`].
pub trait Payload<'a>: Sized {
    /// Decodes exactly `bytes` (the whole payload), within `limits`.
    fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError>;

    /// Encoded size, bulk data and padding included.
    fn encoded_len(&self) -> usize;

    /// Writes everything up to the bulk data and returns the bulk data.
    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError>;

    /// Writes the whole payload.
    fn encode<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<(), CodecError> {
        let bulk = self.encode_head(out)?;
        out.put(bulk.data)?;
        out.put_zeros(bulk.padding)
    }

    /// The whole payload in a new vector.
    fn encode_to_vec(&self) -> Result<Vec<u8>, CodecError> {
        let mut out = Vec::with_capacity(self.encoded_len());
        self.encode(&mut out)?;
        Ok(out)
    }
}

/// Length of the fixed part before the bulk data of a data-carrying message, so that a
/// reader can receive that part, decode it ([`RegionAccess`], [`DmaAccess`] or
/// [`MigDataReadRequest`] have exactly that layout) and receive the data straight into its
/// destination. `None` for messages without bulk data.
pub const fn data_prefix_len(cmd: Command, kind: MessageKind) -> Option<usize> {
    match (cmd, kind) {
        (Command::RegionRead, MessageKind::Reply)
        | (Command::RegionWrite, MessageKind::Command) => Some(RegionAccess::SIZE),
        (Command::DmaRead, MessageKind::Reply) | (Command::DmaWrite, MessageKind::Command) => {
            Some(DmaAccess::SIZE)
        }
        (Command::MigDataRead, MessageKind::Reply)
        | (Command::MigDataWrite, MessageKind::Command) => Some(MIG_DATA_PREFIX),
        _ => None,
    }
}
