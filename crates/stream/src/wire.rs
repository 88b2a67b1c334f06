//! Byte layout of the stream: constants, record types, phases and the fixed-size parts.
//!
//! Everything here is pure layout; the rules about which record may follow which live in
//! the encoder and the decoder.

use std::fmt;

/// The 8 bytes every stream starts with.
pub const MAGIC: [u8; 8] = *b"VFIOMIGS";

/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u16 = 1;

/// Length of the fixed part of the stream header (before the producer string).
pub const HEADER_LEN: usize = 36;

/// Length of every record frame (the fixed part before a record's body).
pub const FRAME_LEN: usize = 20;

/// Longest producer string in the stream header, in bytes.
pub const MAX_PRODUCER_LEN: usize = 256;

/// Most devices one stream may carry.
pub const MAX_DEVICES: u16 = 1024;

/// Longest device name (address) in a DEVICE record, in bytes.
pub const MAX_NAME_LEN: usize = 255;

/// Longest device kind or version string in a DEVICE record, in bytes.
pub const MAX_IDENT_LEN: usize = 255;

/// Longest device compatibility blob in a DEVICE record, in bytes.
pub const MAX_COMPAT_LEN: usize = 4096;

/// Longest ABORT reason, in bytes.
pub const MAX_ABORT_REASON_LEN: usize = 1024;

/// The chunk size limit an encoder states unless told otherwise (1 MiB).
pub const DEFAULT_MAX_CHUNK: u32 = 1 << 20;

/// The largest chunk size limit a decoder accepts in a header unless told otherwise (16 MiB).
///
/// A decoder buffers at most one chunk, so this bounds its memory.
pub const DEFAULT_DECODER_MAX_CHUNK: u32 = 16 << 20;

/// Length of the fixed part of a DEVICE body (before its strings and blob).
pub const DEVICE_FIXED_LEN: usize = 24;

/// Length of a DEVICE_END body.
pub const DEVICE_END_LEN: usize = 32;

/// Length of an END body.
pub const END_LEN: usize = 24;

/// Longest possible DEVICE body.
pub const MAX_DEVICE_BODY_LEN: usize =
    DEVICE_FIXED_LEN + MAX_NAME_LEN + 2 * MAX_IDENT_LEN + MAX_COMPAT_LEN;

/// The CRC used everywhere in the stream: CRC-32 (IEEE 802.3), as `crc32fast` computes it.
pub fn crc32(bytes: &[u8]) -> u32 {
    crc32fast::hash(bytes)
}

/// The checksum a DATA frame must carry for `payload`.
///
/// Exposed so that callers can checksum payloads on their own threads and pass the result to
/// [`crate::Encoder::chunk_frame_with_crc`].
pub fn payload_crc(payload: &[u8]) -> u32 {
    crc32(payload)
}

/// The kind of a record, the first byte of its frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordType {
    /// A device's identity and compatibility data.
    Device = 1,
    /// A chunk of one device's opaque state.
    Data = 2,
    /// The end of one device's data, with its totals.
    DeviceEnd = 3,
    /// The end of the stream, with its totals.
    End = 4,
    /// The source gave up; the destination must discard what it received.
    Abort = 5,
}

impl RecordType {
    /// The record type for a frame's type byte, if it is one.
    pub const fn from_u8(value: u8) -> Option<RecordType> {
        match value {
            1 => Some(RecordType::Device),
            2 => Some(RecordType::Data),
            3 => Some(RecordType::DeviceEnd),
            4 => Some(RecordType::End),
            5 => Some(RecordType::Abort),
            _ => None,
        }
    }

    /// The name used in messages and the format document.
    pub const fn name(self) -> &'static str {
        match self {
            RecordType::Device => "DEVICE",
            RecordType::Data => "DATA",
            RecordType::DeviceEnd => "DEVICE_END",
            RecordType::End => "END",
            RecordType::Abort => "ABORT",
        }
    }
}

impl fmt::Display for RecordType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which part of a migration a DATA chunk belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
#[repr(u8)]
pub enum Phase {
    /// Read while the device was in PRE_COPY or PRE_COPY_P2P (still running).
    PreCopy = 1,
    /// Read while the device was in STOP_COPY.
    StopCopy = 2,
}

impl Phase {
    /// The phase for a frame's phase byte, if it is one.
    pub const fn from_u8(value: u8) -> Option<Phase> {
        match value {
            1 => Some(Phase::PreCopy),
            2 => Some(Phase::StopCopy),
            _ => None,
        }
    }

    /// The name used in messages and JSON (`pre-copy`, `stop-copy`).
    pub const fn name(self) -> &'static str {
        match self {
            Phase::PreCopy => "pre-copy",
            Phase::StopCopy => "stop-copy",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The fixed part of a record, as it lies in the stream (checksum already verified).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Frame {
    pub record_type: u8,
    pub phase: u8,
    pub device: u16,
    pub sequence: u32,
    pub body_len: u32,
    pub body_crc: u32,
}

impl Frame {
    /// The 20 frame bytes, with the frame checksum.
    pub fn encode(&self) -> [u8; FRAME_LEN] {
        let mut b = [0u8; FRAME_LEN];
        b[0] = self.record_type;
        b[1] = self.phase;
        b[2..4].copy_from_slice(&self.device.to_le_bytes());
        b[4..8].copy_from_slice(&self.sequence.to_le_bytes());
        b[8..12].copy_from_slice(&self.body_len.to_le_bytes());
        b[12..16].copy_from_slice(&self.body_crc.to_le_bytes());
        let crc = crc32(&b[..16]);
        b[16..20].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Splits 20 frame bytes into fields; returns the stored and computed checksums when
    /// they differ.
    pub fn decode(b: &[u8; FRAME_LEN]) -> Result<Frame, (u32, u32)> {
        let stored = le_u32(b, 16);
        let computed = crc32(&b[..16]);
        if stored != computed {
            return Err((stored, computed));
        }
        Ok(Frame {
            record_type: b[0],
            phase: b[1],
            device: le_u16(b, 2),
            sequence: le_u32(b, 4),
            body_len: le_u32(b, 8),
            body_crc: le_u32(b, 12),
        })
    }
}

/// The fixed part of the stream header, as it lies in the stream.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct HeaderFixed {
    pub flags: u16,
    pub max_chunk: u32,
    pub device_count: u16,
    pub producer_len: u16,
    pub created_unix_ms: u64,
    pub producer_crc: u32,
}

impl HeaderFixed {
    /// The 36 header bytes, with the header checksum.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&MAGIC);
        b[8..10].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[10..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.max_chunk.to_le_bytes());
        b[16..18].copy_from_slice(&self.device_count.to_le_bytes());
        b[18..20].copy_from_slice(&self.producer_len.to_le_bytes());
        b[20..28].copy_from_slice(&self.created_unix_ms.to_le_bytes());
        b[28..32].copy_from_slice(&self.producer_crc.to_le_bytes());
        let crc = crc32(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }
}

/// Reads a little-endian `u16` at `at`; the caller guarantees the bounds.
pub(crate) fn le_u16(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}

/// Reads a little-endian `u32` at `at`; the caller guarantees the bounds.
pub(crate) fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// Reads a little-endian `u64` at `at`; the caller guarantees the bounds.
pub(crate) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut v = [0u8; 8];
    v.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trips_and_any_bit_flip_is_caught() {
        let frame = Frame {
            record_type: RecordType::Data as u8,
            phase: Phase::StopCopy as u8,
            device: 3,
            sequence: 0x0102_0304,
            body_len: 4096,
            body_crc: 0xdead_beef,
        };
        let bytes = frame.encode();
        assert_eq!(Frame::decode(&bytes), Ok(frame));
        for i in 0..FRAME_LEN * 8 {
            let mut b = bytes;
            b[i / 8] ^= 1 << (i % 8);
            assert!(Frame::decode(&b).is_err(), "bit {i}");
        }
    }

    #[test]
    fn crc_is_the_standard_crc32_and_limits_are_as_documented() {
        // The check value of CRC-32 (IEEE), as docs/stream-format.md states it.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(MAX_DEVICE_BODY_LEN, 4885);
    }

    #[test]
    fn codes_are_stable() {
        for (t, v) in [
            (RecordType::Device, 1),
            (RecordType::Data, 2),
            (RecordType::DeviceEnd, 3),
            (RecordType::End, 4),
            (RecordType::Abort, 5),
        ] {
            assert_eq!(t as u8, v);
            assert_eq!(RecordType::from_u8(v), Some(t));
        }
        assert_eq!(RecordType::from_u8(0), None);
        assert_eq!(RecordType::from_u8(6), None);
        assert_eq!(Phase::from_u8(1), Some(Phase::PreCopy));
        assert_eq!(Phase::from_u8(2), Some(Phase::StopCopy));
        assert_eq!(Phase::from_u8(0), None);
        assert_eq!(Phase::from_u8(3), None);
    }

    #[test]
    fn header_layout() {
        let h = HeaderFixed {
            flags: 0,
            max_chunk: DEFAULT_MAX_CHUNK,
            device_count: 2,
            producer_len: 14,
            created_unix_ms: 0x1122_3344_5566_7788,
            producer_crc: 0xaabb_ccdd,
        };
        let b = h.encode();
        assert_eq!(&b[0..8], b"VFIOMIGS");
        assert_eq!(le_u16(&b, 8), 1);
        assert_eq!(le_u32(&b, 12), 1 << 20);
        assert_eq!(le_u16(&b, 16), 2);
        assert_eq!(le_u16(&b, 18), 14);
        assert_eq!(le_u64(&b, 20), 0x1122_3344_5566_7788);
        assert_eq!(le_u32(&b, 28), 0xaabb_ccdd);
        assert_eq!(le_u32(&b, 32), crc32(&b[..32]));
    }
}
