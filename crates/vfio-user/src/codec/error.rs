//! The one error type of the codec.

use vfio_mig_uapi::{Errno, UnknownState};

use super::header::Command;

/// Why bytes could not be decoded as a vfio-user message, or a message could not be encoded.
///
/// Every decoding failure is one of these; none is a panic. [`CodecError::errno`] gives the
/// errno a server answers with when a request fails to decode.
#[derive(Debug, thiserror::Error)]
pub enum CodecError {
    /// The bytes end before a structure does.
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated {
        /// Bytes the structure needs (counted from its start).
        need: usize,
        /// Bytes that are there.
        have: usize,
    },
    /// A structure is followed by bytes its layout has no place for, or its length disagrees
    /// with a length field.
    #[error("{what}: expected {expected} bytes, found {actual}")]
    LengthMismatch {
        /// The structure or field.
        what: &'static str,
        /// Length the layout implies.
        expected: usize,
        /// Length found.
        actual: usize,
    },
    /// A size or count exceeds a limit of [`super::Limits`] or of the protocol.
    #[error("{what} {size} exceeds the limit {limit}")]
    TooLarge {
        /// What is too large.
        what: &'static str,
        /// The size or count found.
        size: u64,
        /// The largest accepted.
        limit: u64,
    },
    /// A field holds a value the protocol does not allow.
    #[error("bad {field} {value:#x}: {reason}")]
    BadField {
        /// The field.
        field: &'static str,
        /// Its raw value.
        value: u64,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The header names a command number the protocol does not define.
    #[error("unknown command {0}")]
    UnknownCommand(u16),
    /// The command is defined but not supported (the removed migration-v1 DIRTY_PAGES).
    #[error("unsupported command {0}")]
    UnsupportedCommand(Command),
    /// A device-state field holds a value outside the eight states.
    #[error("bad device state")]
    BadDeviceState(#[source] UnknownState),
    /// The VERSION capabilities are not valid UTF-8.
    #[error("VERSION capabilities are not UTF-8")]
    BadUtf8(#[source] std::str::Utf8Error),
    /// The VERSION capabilities are not valid JSON of the expected shape.
    #[error("bad VERSION capabilities JSON")]
    BadJson(#[source] serde_json::Error),
    /// A reply does not fit the request it answers.
    #[error("reply {field} {reply:#x} does not match the request's {request:#x}")]
    ReplyMismatch {
        /// The field compared.
        field: &'static str,
        /// Its value in the request (or the bound the request sets).
        request: u64,
        /// Its value in the reply.
        reply: u64,
    },
    /// Encoding into a fixed-size buffer would overflow it.
    #[error("encode buffer full: need {need} bytes, capacity {capacity}")]
    BufferFull {
        /// Bytes the encoding needs in total.
        need: usize,
        /// Capacity of the buffer.
        capacity: usize,
    },
}

impl CodecError {
    /// The errno a server replies with when a request fails to decode with this error.
    ///
    /// `ENOSYS` for a known but unsupported command, `EINVAL` for everything else (what
    /// libvfio-user answers to malformed requests and unknown commands alike).
    pub fn errno(&self) -> Errno {
        match self {
            CodecError::UnsupportedCommand(_) => Errno::ENOSYS,
            _ => Errno::EINVAL,
        }
    }
}

impl From<UnknownState> for CodecError {
    fn from(e: UnknownState) -> Self {
        CodecError::BadDeviceState(e)
    }
}
