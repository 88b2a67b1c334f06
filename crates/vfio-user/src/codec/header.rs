//! The 16-byte message header, command numbers, limits and framing.

use std::fmt;

use vfio_mig_uapi::Errno;

use super::wire::{Reader, WireBuf};
use super::CodecError;

/// Size of the header that starts every message.
pub const HEADER_SIZE: usize = 16;

/// Mask of the type bits (0-3) of the header flags.
pub const FLAGS_TYPE_MASK: u32 = 0xf;
/// Type value of a command message.
pub const FLAGS_TYPE_COMMAND: u32 = 0;
/// Type value of a reply message.
pub const FLAGS_TYPE_REPLY: u32 = 1;
/// Bit 4: the sender of a command wants no reply.
pub const FLAGS_NO_REPLY: u32 = 1 << 4;
/// Bit 5: the reply reports an error; the header's `error` field holds the errno.
pub const FLAGS_ERROR: u32 = 1 << 5;
/// Every flag bit the protocol defines.
const FLAGS_KNOWN: u32 = FLAGS_TYPE_MASK | FLAGS_NO_REPLY | FLAGS_ERROR;

/// Default `max_data_xfer_size` of the protocol (1 MiB).
pub const DEFAULT_MAX_DATA_XFER_SIZE: u32 = 1 << 20;
/// Largest fixed part before the bulk data of any data-carrying message (REGION_READ/WRITE,
/// DMA_READ/WRITE: 16 bytes).
pub const MAX_DATA_PREFIX: usize = 16;
/// Default largest message: the default transfer size plus the header and the largest fixed
/// part (1 MiB + 32, what libvfio-user's server accepts).
pub const DEFAULT_MAX_MSG_SIZE: u32 =
    DEFAULT_MAX_DATA_XFER_SIZE + (HEADER_SIZE + MAX_DATA_PREFIX) as u32;

/// A vfio-user command number.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u16)]
pub enum Command {
    /// `VFIO_USER_VERSION`: version and capability negotiation.
    Version = 1,
    /// `VFIO_USER_DMA_MAP`: add a DMA window of client memory.
    DmaMap = 2,
    /// `VFIO_USER_DMA_UNMAP`: remove a DMA window (or all).
    DmaUnmap = 3,
    /// `VFIO_USER_DEVICE_GET_INFO`.
    DeviceGetInfo = 4,
    /// `VFIO_USER_DEVICE_GET_REGION_INFO`.
    DeviceGetRegionInfo = 5,
    /// `VFIO_USER_DEVICE_GET_REGION_IO_FDS`.
    DeviceGetRegionIoFds = 6,
    /// `VFIO_USER_DEVICE_GET_IRQ_INFO`.
    DeviceGetIrqInfo = 7,
    /// `VFIO_USER_DEVICE_SET_IRQS`.
    DeviceSetIrqs = 8,
    /// `VFIO_USER_REGION_READ`.
    RegionRead = 9,
    /// `VFIO_USER_REGION_WRITE`.
    RegionWrite = 10,
    /// `VFIO_USER_DMA_READ` (server to client).
    DmaRead = 11,
    /// `VFIO_USER_DMA_WRITE` (server to client).
    DmaWrite = 12,
    /// `VFIO_USER_DEVICE_RESET`.
    DeviceReset = 13,
    /// Number 14, migration v1's `VFIO_USER_DIRTY_PAGES`: removed from the protocol. Known so
    /// that a server can answer it with an error; its payload is never decoded.
    DirtyPages = 14,
    /// `VFIO_USER_REGION_WRITE_MULTI`.
    RegionWriteMulti = 15,
    /// `VFIO_USER_DEVICE_FEATURE`.
    DeviceFeature = 16,
    /// `VFIO_USER_MIG_DATA_READ`.
    MigDataRead = 17,
    /// `VFIO_USER_MIG_DATA_WRITE`.
    MigDataWrite = 18,
}

impl Command {
    /// Every command, in numeric order.
    pub const ALL: [Command; 18] = [
        Command::Version,
        Command::DmaMap,
        Command::DmaUnmap,
        Command::DeviceGetInfo,
        Command::DeviceGetRegionInfo,
        Command::DeviceGetRegionIoFds,
        Command::DeviceGetIrqInfo,
        Command::DeviceSetIrqs,
        Command::RegionRead,
        Command::RegionWrite,
        Command::DmaRead,
        Command::DmaWrite,
        Command::DeviceReset,
        Command::DirtyPages,
        Command::RegionWriteMulti,
        Command::DeviceFeature,
        Command::MigDataRead,
        Command::MigDataWrite,
    ];

    /// The raw number on the wire.
    pub const fn raw(self) -> u16 {
        self as u16
    }

    /// The protocol's name without the `VFIO_USER_` prefix (`DEVICE_GET_REGION_INFO`).
    pub const fn name(self) -> &'static str {
        match self {
            Command::Version => "VERSION",
            Command::DmaMap => "DMA_MAP",
            Command::DmaUnmap => "DMA_UNMAP",
            Command::DeviceGetInfo => "DEVICE_GET_INFO",
            Command::DeviceGetRegionInfo => "DEVICE_GET_REGION_INFO",
            Command::DeviceGetRegionIoFds => "DEVICE_GET_REGION_IO_FDS",
            Command::DeviceGetIrqInfo => "DEVICE_GET_IRQ_INFO",
            Command::DeviceSetIrqs => "DEVICE_SET_IRQS",
            Command::RegionRead => "REGION_READ",
            Command::RegionWrite => "REGION_WRITE",
            Command::DmaRead => "DMA_READ",
            Command::DmaWrite => "DMA_WRITE",
            Command::DeviceReset => "DEVICE_RESET",
            Command::DirtyPages => "DIRTY_PAGES",
            Command::RegionWriteMulti => "REGION_WRITE_MULTI",
            Command::DeviceFeature => "DEVICE_FEATURE",
            Command::MigDataRead => "MIG_DATA_READ",
            Command::MigDataWrite => "MIG_DATA_WRITE",
        }
    }

    /// Whether the server sends this command to the client (DMA_READ and DMA_WRITE).
    pub const fn is_server_initiated(self) -> bool {
        matches!(self, Command::DmaRead | Command::DmaWrite)
    }
}

impl TryFrom<u16> for Command {
    type Error = CodecError;

    fn try_from(raw: u16) -> Result<Self, CodecError> {
        usize::from(raw)
            .checked_sub(1)
            .and_then(|i| Command::ALL.get(i))
            .copied()
            .ok_or(CodecError::UnknownCommand(raw))
    }
}

impl fmt::Display for Command {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether a message is a command or a reply (the type bits of the header flags).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// A command (request).
    Command,
    /// A reply to a command with the same msg_id and command number.
    Reply,
}

/// The 16-byte header of every message, fields as on the wire.
///
/// Decoding a header never fails on its values; [`Header::check`] validates them. The
/// command stays a raw number so that a server can answer a message with an unknown command
/// using the same msg_id and command.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Header {
    /// Chosen by the sender and echoed in the reply; not unique.
    pub msg_id: u16,
    /// Raw command number; see [`Header::command`].
    pub cmd: u16,
    /// Size of the whole message, header included.
    pub msg_size: u32,
    /// Type bits, [`FLAGS_NO_REPLY`], [`FLAGS_ERROR`].
    pub flags: u32,
    /// errno of an error reply; reserved otherwise.
    pub error: u32,
}

impl Header {
    /// Reads a header from the first [`HEADER_SIZE`] bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Header, CodecError> {
        let mut r = Reader::new(bytes);
        Ok(Header {
            msg_id: r.u16()?,
            cmd: r.u16()?,
            msg_size: r.u32()?,
            flags: r.u32()?,
            error: r.u32()?,
        })
    }

    /// The header as bytes.
    pub fn to_bytes(&self) -> [u8; HEADER_SIZE] {
        let mut out = [0u8; HEADER_SIZE];
        out[0..2].copy_from_slice(&self.msg_id.to_le_bytes());
        out[2..4].copy_from_slice(&self.cmd.to_le_bytes());
        out[4..8].copy_from_slice(&self.msg_size.to_le_bytes());
        out[8..12].copy_from_slice(&self.flags.to_le_bytes());
        out[12..16].copy_from_slice(&self.error.to_le_bytes());
        out
    }

    /// Writes the header.
    pub fn encode<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<(), CodecError> {
        out.put(&self.to_bytes())
    }

    /// Header of a command with `payload_len` bytes of payload.
    pub fn for_command(
        msg_id: u16,
        cmd: Command,
        payload_len: usize,
    ) -> Result<Header, CodecError> {
        Ok(Header {
            msg_id,
            cmd: cmd.raw(),
            msg_size: msg_size_for(payload_len)?,
            flags: FLAGS_TYPE_COMMAND,
            error: 0,
        })
    }

    /// Header of a successful reply to `request` with `payload_len` bytes of payload.
    pub fn reply_to(request: &Header, payload_len: usize) -> Result<Header, CodecError> {
        Ok(Header {
            msg_id: request.msg_id,
            cmd: request.cmd,
            msg_size: msg_size_for(payload_len)?,
            flags: FLAGS_TYPE_REPLY,
            error: 0,
        })
    }

    /// Header of a header-only error reply to `request`.
    pub fn error_reply_to(request: &Header, errno: Errno) -> Header {
        Header {
            msg_id: request.msg_id,
            cmd: request.cmd,
            msg_size: HEADER_SIZE as u32,
            flags: FLAGS_TYPE_REPLY | FLAGS_ERROR,
            error: errno.raw().unsigned_abs(),
        }
    }

    /// The command, or [`CodecError::UnknownCommand`].
    pub fn command(&self) -> Result<Command, CodecError> {
        Command::try_from(self.cmd)
    }

    /// Command or reply, or [`CodecError::BadField`] for the undefined type values 2-15.
    pub fn kind(&self) -> Result<MessageKind, CodecError> {
        match self.flags & FLAGS_TYPE_MASK {
            FLAGS_TYPE_COMMAND => Ok(MessageKind::Command),
            FLAGS_TYPE_REPLY => Ok(MessageKind::Reply),
            t => Err(CodecError::BadField {
                field: "header flags type",
                value: t.into(),
                reason: "neither command (0) nor reply (1)",
            }),
        }
    }

    /// Whether the NO_REPLY bit is set.
    pub const fn no_reply(&self) -> bool {
        self.flags & FLAGS_NO_REPLY != 0
    }

    /// Whether the ERROR bit is set.
    pub const fn is_error(&self) -> bool {
        self.flags & FLAGS_ERROR != 0
    }

    /// The errno of an error reply (the raw `error` field; 0 is allowed by the protocol).
    pub fn errno(&self) -> Errno {
        Errno::new(i32::try_from(self.error).unwrap_or(i32::MAX))
    }

    /// Payload length implied by `msg_size` (0 if `msg_size` is below the header size).
    pub const fn payload_len(&self) -> usize {
        (self.msg_size as usize).saturating_sub(HEADER_SIZE)
    }

    /// Validates everything the header alone can tell: size against the header size and
    /// `limits`, defined flag bits and type, ERROR only on replies, NO_REPLY only on commands.
    /// Returns the kind of message. The command number is checked separately, so that a
    /// server can reply to an unknown command.
    pub fn check(&self, limits: &Limits) -> Result<MessageKind, CodecError> {
        if (self.msg_size as usize) < HEADER_SIZE {
            return Err(CodecError::BadField {
                field: "msg_size",
                value: self.msg_size.into(),
                reason: "smaller than the 16-byte header",
            });
        }
        if self.msg_size > limits.max_msg_size {
            return Err(CodecError::TooLarge {
                what: "msg_size",
                size: self.msg_size.into(),
                limit: limits.max_msg_size.into(),
            });
        }
        if self.flags & !FLAGS_KNOWN != 0 {
            return Err(CodecError::BadField {
                field: "header flags",
                value: self.flags.into(),
                reason: "undefined bits set",
            });
        }
        let kind = self.kind()?;
        match kind {
            MessageKind::Command if self.is_error() => Err(CodecError::BadField {
                field: "header flags",
                value: self.flags.into(),
                reason: "ERROR set on a command",
            }),
            MessageKind::Reply if self.no_reply() => Err(CodecError::BadField {
                field: "header flags",
                value: self.flags.into(),
                reason: "NO_REPLY set on a reply",
            }),
            _ => Ok(kind),
        }
    }
}

/// `msg_size` for a payload, or [`CodecError::TooLarge`] if it does not fit the u32 field.
pub(crate) fn msg_size_for(payload_len: usize) -> Result<u32, CodecError> {
    payload_len
        .checked_add(HEADER_SIZE)
        .and_then(|n| u32::try_from(n).ok())
        .ok_or(CodecError::TooLarge {
            what: "message size",
            size: payload_len as u64,
            limit: u64::from(u32::MAX) - HEADER_SIZE as u64,
        })
}

/// Bounds on what a decoder accepts and allocates: what *this* endpoint takes from its peer.
///
/// Decoding never allocates more than these allow: bulk data is borrowed, and every array
/// (DMA-logging ranges, sparse-mmap areas, I/O-fd sub-regions, coalesced writes, capability
/// chain) is counted against its limit before anything is collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole message (header included) accepted by framing.
    pub max_msg_size: u32,
    /// Largest data transfer (`count`/`size`) of REGION_READ/WRITE, DMA_READ/WRITE and
    /// MIG_DATA_READ/WRITE: the `max_data_xfer_size` this endpoint advertised.
    pub max_data_xfer_size: u32,
    /// Most file descriptors accepted with one message (what this endpoint advertises as
    /// `max_msg_fds`); checked by [`Limits::check_fds`] and against `twin_socket.fd_index`.
    pub max_fds: u32,
    /// Most entries of any array in a message (DMA-logging ranges, sparse-mmap areas,
    /// I/O-fd sub-regions, REGION_WRITE_MULTI writes).
    pub max_ranges: u32,
    /// Most capabilities in a region-info capability chain.
    pub max_caps: u32,
}

impl Limits {
    /// Limits for a given transfer size: messages may carry that much data plus headers.
    pub fn for_data_xfer_size(max_data_xfer_size: u32) -> Limits {
        let headroom = (HEADER_SIZE + MAX_DATA_PREFIX) as u32;
        Limits {
            max_data_xfer_size,
            max_msg_size: max_data_xfer_size
                .saturating_add(headroom)
                .max(DEFAULT_MAX_MSG_SIZE),
            ..Limits::default()
        }
    }

    /// Fails with [`CodecError::TooLarge`] if a message came with more fds than allowed.
    pub fn check_fds(&self, nfds: usize) -> Result<(), CodecError> {
        if nfds as u64 > u64::from(self.max_fds) {
            return Err(CodecError::TooLarge {
                what: "file descriptors in one message",
                size: nfds as u64,
                limit: self.max_fds.into(),
            });
        }
        Ok(())
    }

    pub(crate) fn check_xfer(&self, what: &'static str, size: u64) -> Result<(), CodecError> {
        if size > u64::from(self.max_data_xfer_size) {
            return Err(CodecError::TooLarge {
                what,
                size,
                limit: self.max_data_xfer_size.into(),
            });
        }
        Ok(())
    }

    pub(crate) fn check_ranges(&self, what: &'static str, n: u64) -> Result<(), CodecError> {
        if n > u64::from(self.max_ranges) {
            return Err(CodecError::TooLarge {
                what,
                size: n,
                limit: self.max_ranges.into(),
            });
        }
        Ok(())
    }
}

impl Default for Limits {
    /// The protocol defaults: 1 MiB transfers, 1 MiB + 32 messages, 8 fds (libvfio-user's
    /// server), 256 array entries (the kernel's DMA-logging range limit), 16 capabilities.
    fn default() -> Self {
        Limits {
            max_msg_size: DEFAULT_MAX_MSG_SIZE,
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            max_fds: 8,
            max_ranges: 256,
            max_caps: 16,
        }
    }
}

/// Framing: how many bytes the whole message starting at `bytes[0]` has.
///
/// Returns `Ok(None)` while fewer than [`HEADER_SIZE`] bytes are available, then the
/// validated `msg_size` (see [`Header::check`]). A socket reader reads the header, calls this,
/// then reads exactly the rest, so every message is read whole.
pub fn message_len(bytes: &[u8], limits: &Limits) -> Result<Option<usize>, CodecError> {
    if bytes.len() < HEADER_SIZE {
        return Ok(None);
    }
    let header = Header::decode(bytes)?;
    header.check(limits)?;
    Ok(Some(header.msg_size as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_numbers_are_the_protocols() {
        for (i, cmd) in Command::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(cmd.raw()), i + 1);
            assert_eq!(Command::try_from(cmd.raw()).unwrap(), cmd);
        }
        assert_eq!(Command::MigDataWrite.raw(), 18);
        assert_eq!(Command::DirtyPages.raw(), 14);
        for raw in [0u16, 19, 99, u16::MAX] {
            assert!(
                matches!(Command::try_from(raw), Err(CodecError::UnknownCommand(r)) if r == raw)
            );
        }
    }

    #[test]
    fn header_round_trips_and_is_little_endian() {
        let h = Header {
            msg_id: 0x0102,
            cmd: 9,
            msg_size: 0x20,
            flags: FLAGS_TYPE_REPLY | FLAGS_ERROR,
            error: 22,
        };
        let b = h.to_bytes();
        assert_eq!(b, [2, 1, 9, 0, 0x20, 0, 0, 0, 0x21, 0, 0, 0, 22, 0, 0, 0]);
        assert_eq!(Header::decode(&b).unwrap(), h);
        assert_eq!(h.errno(), Errno::EINVAL);
    }

    #[test]
    fn check_rejects_bad_sizes_and_flags() {
        let limits = Limits::default();
        let ok = Header::for_command(1, Command::Version, 4).unwrap();
        assert_eq!(ok.check(&limits).unwrap(), MessageKind::Command);
        let small = Header { msg_size: 15, ..ok };
        assert!(matches!(
            small.check(&limits),
            Err(CodecError::BadField {
                field: "msg_size",
                ..
            })
        ));
        let big = Header {
            msg_size: DEFAULT_MAX_MSG_SIZE + 1,
            ..ok
        };
        assert!(matches!(
            big.check(&limits),
            Err(CodecError::TooLarge { .. })
        ));
        let max = Header {
            msg_size: DEFAULT_MAX_MSG_SIZE,
            ..ok
        };
        assert!(max.check(&limits).is_ok());
        let typ = Header { flags: 2, ..ok };
        assert!(matches!(
            typ.check(&limits),
            Err(CodecError::BadField { .. })
        ));
        let reserved = Header {
            flags: 1 << 6,
            ..ok
        };
        assert!(matches!(
            reserved.check(&limits),
            Err(CodecError::BadField { .. })
        ));
        let err_cmd = Header {
            flags: FLAGS_ERROR,
            ..ok
        };
        assert!(err_cmd.check(&limits).is_err());
        let noreply_reply = Header {
            flags: FLAGS_TYPE_REPLY | FLAGS_NO_REPLY,
            ..ok
        };
        assert!(noreply_reply.check(&limits).is_err());
        let noreply_cmd = Header {
            flags: FLAGS_NO_REPLY,
            ..ok
        };
        assert!(noreply_cmd.check(&limits).is_ok());
    }

    #[test]
    fn framing_waits_for_a_header_then_gives_msg_size() {
        let limits = Limits::default();
        let h = Header::for_command(3, Command::DmaMap, 32)
            .unwrap()
            .to_bytes();
        for n in 0..HEADER_SIZE {
            assert_eq!(message_len(&h[..n], &limits).unwrap(), None);
        }
        assert_eq!(message_len(&h, &limits).unwrap(), Some(48));
        let mut huge = h;
        huge[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            message_len(&huge, &limits),
            Err(CodecError::TooLarge { .. })
        ));
    }

    #[test]
    fn error_reply_keeps_msg_id_and_unknown_command() {
        let req = Header {
            msg_id: 283,
            cmd: 99,
            msg_size: 16,
            flags: 0,
            error: 0,
        };
        assert!(matches!(req.command(), Err(CodecError::UnknownCommand(99))));
        let rep = Header::error_reply_to(&req, Errno::EINVAL);
        assert_eq!(
            rep.to_bytes(),
            [0x1b, 1, 99, 0, 16, 0, 0, 0, 0x21, 0, 0, 0, 22, 0, 0, 0]
        );
    }

    #[test]
    fn limits_scale_with_transfer_size() {
        let l = Limits::for_data_xfer_size(4 << 20);
        assert_eq!(l.max_msg_size, (4 << 20) + 32);
        assert_eq!(
            Limits::for_data_xfer_size(1024).max_msg_size,
            DEFAULT_MAX_MSG_SIZE
        );
        assert_eq!(Limits::default().max_msg_size, 1_048_608);
        assert!(Limits::default().check_fds(8).is_ok());
        assert!(Limits::default().check_fds(9).is_err());
    }
}
