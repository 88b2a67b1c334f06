//! Errors of the encoder and the decoder.

use std::fmt;

use crate::record::DeviceInfoError;
use crate::wire::{Phase, RecordType};

/// Why the decoder rejected a stream, and where.
///
/// `offset` is the absolute stream offset of the first byte of the header or record in which
/// the problem was found; for truncation it is where the stream ended, and for data after
/// the last record it is the first extra byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError {
    /// Absolute offset in the stream.
    pub offset: u64,
    /// What was wrong.
    pub kind: DecodeErrorKind,
}

impl DecodeError {
    /// Whether the stream simply ended too early (as opposed to containing wrong bytes).
    pub fn is_truncation(&self) -> bool {
        matches!(self.kind, DecodeErrorKind::Truncated { .. })
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.kind {
            DecodeErrorKind::Truncated { expected } => {
                write!(
                    f,
                    "truncated at offset {}: expected {expected}",
                    self.offset
                )
            }
            kind => write!(f, "at offset {}: {kind}", self.offset),
        }
    }
}

impl std::error::Error for DecodeError {}

/// What the decoder found wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeErrorKind {
    /// The stream does not start with [`crate::MAGIC`].
    #[error("bad magic {}: not a vfio-mig stream (expected \"VFIOMIGS\")", show_bytes(.found))]
    BadMagic {
        /// The first bytes of the stream (up to 8).
        found: Vec<u8>,
    },
    /// The header's format version is not one this decoder reads.
    #[error("unsupported stream format version {found}; this decoder reads version {supported}")]
    UnsupportedVersion {
        /// The version in the stream.
        found: u16,
        /// The version this decoder reads.
        supported: u16,
    },
    /// A checksum did not match the bytes it covers.
    #[error("{what} checksum mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    Checksum {
        /// What the checksum covers, e.g. `stream header`, `record frame`, `DATA payload of
        /// device 0 chunk 7`.
        what: String,
        /// The checksum in the stream.
        stored: u32,
        /// The checksum of the bytes received.
        computed: u32,
    },
    /// A length in the stream exceeds the limit that applies to it.
    #[error("{what} length {len} exceeds the limit of {limit} bytes")]
    LengthOverLimit {
        /// What the length is of.
        what: String,
        /// The length in the stream.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// A fixed-size record's body has the wrong length.
    #[error("{record} record body is {len} bytes; it must be {expected}")]
    BadRecordLength {
        /// The record type.
        record: RecordType,
        /// The length in the frame.
        len: u32,
        /// The only valid length.
        expected: u32,
    },
    /// A header field holds a value the format does not allow.
    #[error("stream header field {field} is {value}: {reason}")]
    BadHeaderField {
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
        /// What is required.
        reason: &'static str,
    },
    /// A field that must be zero for this record type is not.
    #[error("{record} record has {field} {value:#x}; it must be 0 for this record type")]
    NonZeroField {
        /// The record type.
        record: RecordType,
        /// The field.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The frame's type byte is not a known record type.
    #[error("unknown record type {0:#04x}")]
    UnknownRecordType(u8),
    /// A DEVICE record's body is malformed.
    #[error("DEVICE record for device {device}: {problem}")]
    BadDeviceRecord {
        /// The device index in the frame.
        device: u16,
        /// What is wrong.
        problem: String,
    },
    /// A DEVICE record where the next device in order, or no more devices, were due.
    #[error("DEVICE record for device {found} where {}", expected_device(*.expected))]
    UnexpectedDeviceRecord {
        /// The device index in the frame.
        found: u16,
        /// The index that was due, or `None` when all devices had been declared.
        expected: Option<u16>,
    },
    /// A record other than DEVICE (or ABORT) before every device was declared.
    #[error("{record} record before all devices were declared ({declared} of {count})")]
    DevicesNotDeclared {
        /// The record type.
        record: RecordType,
        /// DEVICE records seen.
        declared: u16,
        /// Devices the header announced.
        count: u16,
    },
    /// A record names a device index the header did not declare.
    #[error("{record} record for device {device}, but the stream declares {count} device(s)")]
    UndeclaredDevice {
        /// The record type.
        record: RecordType,
        /// The device index in the frame.
        device: u16,
        /// Devices the header announced.
        count: u16,
    },
    /// A DATA record's phase byte is not a known phase.
    #[error("DATA record for device {device} has unknown phase {phase}")]
    UnknownPhase {
        /// The device.
        device: u16,
        /// The phase byte.
        phase: u8,
    },
    /// A pre-copy chunk after the device's stop-copy data began.
    #[error("{phase} chunk for device {device} after its stop-copy data began")]
    PhaseRegression {
        /// The device.
        device: u16,
        /// The chunk's phase.
        phase: Phase,
    },
    /// A chunk's sequence number is not the next one for its device.
    #[error("DATA chunk for device {device} has sequence {found}; expected {expected}")]
    OutOfOrderSequence {
        /// The device.
        device: u16,
        /// The sequence number that was due.
        expected: u32,
        /// The sequence number in the frame.
        found: u32,
    },
    /// A DATA record with an empty payload.
    #[error("DATA chunk for device {device} is empty")]
    EmptyChunk {
        /// The device.
        device: u16,
    },
    /// A record for a device after that device's DEVICE_END.
    #[error("{record} record for device {device} after its DEVICE_END")]
    AfterDeviceEnd {
        /// The record type.
        record: RecordType,
        /// The device.
        device: u16,
    },
    /// A DEVICE_END total differs from what the stream carried.
    #[error(
        "DEVICE_END of device {device} states {field} {stored}, but the stream carried {counted}"
    )]
    DeviceTotalsMismatch {
        /// The device.
        device: u16,
        /// Which total, e.g. `pre-copy bytes`.
        field: &'static str,
        /// The value in the record.
        stored: u64,
        /// The value counted.
        counted: u64,
    },
    /// END while a device had no DEVICE_END yet.
    #[error("END record while device {device} has not ended")]
    DeviceNotEnded {
        /// The first device without DEVICE_END.
        device: u16,
    },
    /// An END total differs from what the stream carried.
    #[error("END record states {field} {stored}, but the stream carried {counted}")]
    EndTotalsMismatch {
        /// Which total, e.g. `bytes`.
        field: &'static str,
        /// The value in the record.
        stored: u64,
        /// The value counted.
        counted: u64,
    },
    /// A string that must be UTF-8 is not.
    #[error("{what} is not valid UTF-8")]
    NotUtf8 {
        /// Which string.
        what: &'static str,
    },
    /// Bytes after the END or ABORT record.
    #[error("data after the {last} record, which ends the stream")]
    DataAfterEnd {
        /// The record that ended the stream.
        last: RecordType,
    },
    /// The stream ended before its END (or ABORT) record was complete.
    #[error("{expected}")]
    Truncated {
        /// What the decoder was waiting for.
        expected: String,
    },
}

fn show_bytes(bytes: &[u8]) -> String {
    format!("\"{}\"", bytes.escape_ascii())
}

fn expected_device(expected: Option<u16>) -> String {
    match expected {
        Some(d) => format!("device {d} was due"),
        None => "all devices were already declared".to_owned(),
    }
}

/// Why the encoder refused a request (it never writes a stream the decoder would reject).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// A stream must carry 1 to [`crate::MAX_DEVICES`] devices.
    #[error("a stream carries 1 to {max} devices, not {count}")]
    DeviceCount {
        /// Devices given.
        count: usize,
        /// The limit.
        max: u16,
    },
    /// A device description does not fit the format.
    #[error("device {device} cannot be described in the stream")]
    Device {
        /// The device index.
        device: u16,
        /// What is wrong with its description.
        #[source]
        source: DeviceInfoError,
    },
    /// The producer string is longer than [`crate::MAX_PRODUCER_LEN`].
    #[error("producer string is {len} bytes; the limit is {limit}")]
    ProducerTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The chunk size limit must be from 1 byte to [`crate::DEFAULT_DECODER_MAX_CHUNK`], so
    /// that every decoder with default limits accepts the stream.
    #[error("chunk size limit {0} is invalid: it must be between 1 and {max} bytes", max = crate::DEFAULT_DECODER_MAX_CHUNK)]
    MaxChunk(u32),
    /// A record for a device index the stream does not carry.
    #[error("device {device} is not in the stream ({count} device(s))")]
    UnknownDevice {
        /// The index given.
        device: u16,
        /// Devices in the stream.
        count: u16,
    },
    /// A payload longer than the stream's chunk size limit.
    #[error("chunk of {len} bytes exceeds the stream's chunk size limit of {limit} bytes")]
    ChunkTooLarge {
        /// The payload length.
        len: usize,
        /// The limit.
        limit: u32,
    },
    /// An empty payload (the format has no empty chunks).
    #[error("chunk for device {device} is empty")]
    EmptyChunk {
        /// The device.
        device: u16,
    },
    /// A pre-copy chunk after the device's stop-copy data began.
    #[error("pre-copy chunk for device {device} after its stop-copy data began")]
    PhaseRegression {
        /// The device.
        device: u16,
    },
    /// A device has used every sequence number.
    #[error("device {device} has used all {} chunk sequence numbers", u64::from(u32::MAX) + 1)]
    SequenceExhausted {
        /// The device.
        device: u16,
    },
    /// A record for a device whose data has ended.
    #[error("device {device} has already ended")]
    DeviceEnded {
        /// The device.
        device: u16,
    },
    /// END while a device's data has not ended.
    #[error("cannot end the stream: device {device} has not ended")]
    DeviceNotEnded {
        /// The first device not ended.
        device: u16,
    },
    /// Any record after END or ABORT.
    #[error("the stream has already ended")]
    StreamEnded,
}
