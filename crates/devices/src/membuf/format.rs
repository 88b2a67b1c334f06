//! The membuf migration stream, version 2.
//!
//! All integers are little-endian. A stream is
//!
//! ```text
//! header   48 bytes   magic "MBUFSTRM" | version u32 = 2 | page size u32 = 4096
//!                     | state size u64 | seed u64 | flags u32 = 0 | reserved u32 = 0
//!                     | xxh3-64 of the 40 bytes before it
//! record*  16 bytes   kind u32 = 1 (data) | length u32 | state offset u64
//!          + length bytes of state
//! trailer  16 bytes   kind u32 = 2 (end) | length u32 = 16 | offset u64 = 0
//!          + 16 bytes page-hash sum of the final state u64 | total record data bytes u64
//! ```
//!
//! Data records are page-aligned, whole pages, at most [`RECORD_MAX`] bytes long, and may
//! repeat a region (a page dirtied during pre-copy is sent again); the last copy wins. The
//! destination needs every page at least once. The seed is informational: a destination takes
//! bytes, it never regenerates contents from the seed.
//!
//! The trailer's integrity value is the [`state_hash`] of the final state: the wrapping sum
//! over pages `p` of [`page_hash`]`(p, page p)` (xxh3-64 of the page's 4096 bytes seeded with
//! `p`). Unlike a hash of the whole state it can be kept up to date page by page: the source
//! hashes a page when it copies it into the stream, the destination when a record has written
//! it, each replacing the page's earlier term. So neither side hashes the whole state while
//! the device is stopped, yet a stale, corrupt, misplaced or missing page still changes the
//! sum. (Version 1 carried an xxh3-64 of the whole state instead, which costs a full pass
//! over the state on each side inside the downtime once pages were sent again.)
//!
//! The digest register (BAR0 0x10) is not this value: it is [`super::digest`], xxh3-64 over
//! the whole state.

use std::fmt;

use xxhash_rust::xxh3::{xxh3_64, xxh3_64_with_seed};

/// The 8 bytes that start every membuf stream.
pub const STREAM_MAGIC: [u8; 8] = *b"MBUFSTRM";
/// The stream format version this module writes and reads.
pub const STREAM_VERSION: u32 = 2;
/// Granularity of dirty tracking, records and state sizes.
pub const PAGE_SIZE: u64 = 4096;
/// Longest data record (1 MiB).
pub const RECORD_MAX: u64 = 1 << 20;
/// Length of the stream header.
pub const HEADER_LEN: usize = 48;
/// Length of a record header.
pub const RECORD_HEADER_LEN: usize = 16;
/// Length of the whole trailer (record header and payload).
pub const TRAILER_LEN: usize = RECORD_HEADER_LEN + 16;
/// Record kind: state bytes.
pub const RECORD_DATA: u32 = 1;
/// Record kind: the trailer, last in the stream.
pub const RECORD_END: u32 = 2;

/// The stream header: what the destination checks before taking any state byte.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StreamHeader {
    /// Size of the state in bytes.
    pub size: u64,
    /// The seed the source's contents were first generated from (informational).
    pub seed: u64,
}

impl StreamHeader {
    /// The header's bytes.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..8].copy_from_slice(&STREAM_MAGIC);
        b[8..12].copy_from_slice(&STREAM_VERSION.to_le_bytes());
        b[12..16].copy_from_slice(&(PAGE_SIZE as u32).to_le_bytes());
        b[16..24].copy_from_slice(&self.size.to_le_bytes());
        b[24..32].copy_from_slice(&self.seed.to_le_bytes());
        // 32..40: flags and reserved, zero in this version.
        let check = xxh3_64(&b[..40]);
        b[40..48].copy_from_slice(&check.to_le_bytes());
        b
    }

    /// Parses and checks a header (magic, version, page size, flags, checksum). The size is
    /// returned, not checked: the caller compares it with its own.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<StreamHeader, StreamError> {
        if b[0..8] != STREAM_MAGIC {
            return Err(StreamError::NotMembuf {
                magic: b[0..8].try_into().unwrap_or_default(),
            });
        }
        let version = u32_at(b, 8);
        if version != STREAM_VERSION {
            return Err(StreamError::Version { found: version });
        }
        let check = u64_at(b, 40);
        let computed = xxh3_64(&b[..40]);
        if check != computed {
            return Err(StreamError::HeaderChecksum {
                stream: check,
                computed,
            });
        }
        let page_size = u32_at(b, 12);
        if u64::from(page_size) != PAGE_SIZE {
            return Err(StreamError::PageSize { found: page_size });
        }
        let flags = u64_at(b, 32);
        if flags != 0 {
            return Err(StreamError::Flags { found: flags });
        }
        Ok(StreamHeader {
            size: u64_at(b, 16),
            seed: u64_at(b, 24),
        })
    }
}

/// A record header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    /// [`RECORD_DATA`] or [`RECORD_END`].
    pub kind: u32,
    /// Bytes following the header.
    pub length: u32,
    /// Where the data goes in the state (0 for the trailer).
    pub offset: u64,
}

impl RecordHeader {
    /// A data record of `length` bytes for state offset `offset`.
    pub fn data(offset: u64, length: u64) -> RecordHeader {
        debug_assert!(length <= RECORD_MAX);
        RecordHeader {
            kind: RECORD_DATA,
            length: length as u32,
            offset,
        }
    }

    /// The header's bytes.
    pub fn encode(&self) -> [u8; RECORD_HEADER_LEN] {
        let mut b = [0u8; RECORD_HEADER_LEN];
        b[0..4].copy_from_slice(&self.kind.to_le_bytes());
        b[4..8].copy_from_slice(&self.length.to_le_bytes());
        b[8..16].copy_from_slice(&self.offset.to_le_bytes());
        b
    }

    /// Parses a record header (no checks: see [`RecordHeader::check`]).
    pub fn decode(b: &[u8; RECORD_HEADER_LEN]) -> RecordHeader {
        RecordHeader {
            kind: u32_at(b, 0),
            length: u32_at(b, 4),
            offset: u64_at(b, 8),
        }
    }

    /// Checks the header against a state of `size` bytes; `index` and `at` (the record's
    /// number and stream offset) go into the error.
    pub fn check(&self, size: u64, index: u64, at: u64) -> Result<(), StreamError> {
        let bad = |reason: String| StreamError::BadRecord { index, at, reason };
        match self.kind {
            RECORD_DATA => {
                let len = u64::from(self.length);
                if len == 0 || len > RECORD_MAX || len % PAGE_SIZE != 0 {
                    return Err(bad(format!(
                        "length {len} is not a non-zero multiple of {PAGE_SIZE} up to {RECORD_MAX}"
                    )));
                }
                if self.offset % PAGE_SIZE != 0 {
                    return Err(bad(format!(
                        "offset {:#x} is not page-aligned",
                        self.offset
                    )));
                }
                if self.offset.checked_add(len).is_none_or(|end| end > size) {
                    return Err(bad(format!(
                        "{len} bytes at offset {:#x} reach past the end of the {} state",
                        self.offset,
                        Size(size)
                    )));
                }
                Ok(())
            }
            RECORD_END => {
                if self.length as usize != TRAILER_LEN - RECORD_HEADER_LEN || self.offset != 0 {
                    return Err(bad(format!(
                        "trailer with length {} and offset {:#x} (expected 16 and 0)",
                        self.length, self.offset
                    )));
                }
                Ok(())
            }
            kind => Err(bad(format!("unknown record kind {kind:#x}"))),
        }
    }
}

/// The trailer's payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Trailer {
    /// [`state_hash`] of the final state.
    pub state_hash: u64,
    /// Sum of the lengths of all data records.
    pub data_bytes: u64,
}

impl Trailer {
    /// The whole trailer: record header and payload.
    pub fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        let header = RecordHeader {
            kind: RECORD_END,
            length: (TRAILER_LEN - RECORD_HEADER_LEN) as u32,
            offset: 0,
        };
        b[..RECORD_HEADER_LEN].copy_from_slice(&header.encode());
        b[16..24].copy_from_slice(&self.state_hash.to_le_bytes());
        b[24..32].copy_from_slice(&self.data_bytes.to_le_bytes());
        b
    }

    /// Parses the 16-byte payload.
    pub fn decode(b: &[u8; TRAILER_LEN - RECORD_HEADER_LEN]) -> Trailer {
        Trailer {
            state_hash: u64_at(b, 0),
            data_bytes: u64_at(b, 8),
        }
    }
}

/// One page's term of [`state_hash`]: xxh3-64 of its bytes, seeded with its index, so that the
/// same bytes at another page give another term.
pub fn page_hash(page: u64, bytes: &[u8]) -> u64 {
    xxh3_64_with_seed(bytes, page)
}

/// The trailer's integrity value of a state, computed from scratch: the wrapping sum of
/// [`page_hash`] over its pages. The save and resume sessions keep it up to date page by page
/// instead; this is the reference they must agree with.
pub fn state_hash(state: &[u8]) -> u64 {
    state
        .chunks(PAGE_SIZE as usize)
        .zip(0u64..)
        .fold(0u64, |sum, (bytes, page)| {
            sum.wrapping_add(page_hash(page, bytes))
        })
}

/// The length of a complete STOP_COPY stream of a `size`-byte state sent without pre-copy.
pub fn full_stream_len(size: u64) -> u64 {
    HEADER_LEN as u64 + size + record_headers(size) + TRAILER_LEN as u64
}

/// Bytes of record headers needed to send `data` bytes in full-length records.
pub(crate) fn record_headers(data: u64) -> u64 {
    data.div_ceil(RECORD_MAX) * RECORD_HEADER_LEN as u64
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut w = [0u8; 4];
    w.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(w)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

/// A byte count printed the way people read it: `256 MiB` when exact, else `4097 bytes`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [(u64, &str); 4] = [
            (1 << 40, "TiB"),
            (1 << 30, "GiB"),
            (1 << 20, "MiB"),
            (1 << 10, "KiB"),
        ];
        for (unit, name) in UNITS {
            if self.0 >= unit && self.0 % unit == 0 {
                return write!(f, "{} {name}", self.0 / unit);
            }
        }
        write!(f, "{} bytes", self.0)
    }
}

/// Why a membuf stream was refused. Every message says what was wrong and where.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum StreamError {
    /// The stream does not start with [`STREAM_MAGIC`]: another kind of device saved it.
    #[error("not a membuf stream: it starts with {magic:02x?}, not \"MBUFSTRM\"")]
    NotMembuf {
        /// The first 8 bytes.
        magic: [u8; 8],
    },
    /// A stream format version this device cannot read.
    #[error("membuf stream version {found} is not supported (this device reads version {STREAM_VERSION})")]
    Version {
        /// The version in the stream.
        found: u32,
    },
    /// The header's checksum does not match its bytes.
    #[error("membuf stream header is corrupt: checksum {stream:#018x}, computed {computed:#018x}")]
    HeaderChecksum {
        /// The checksum in the stream.
        stream: u64,
        /// The checksum of the received header bytes.
        computed: u64,
    },
    /// A page size other than [`PAGE_SIZE`].
    #[error("membuf stream page size {found} is not supported (expected 4096)")]
    PageSize {
        /// The page size in the stream.
        found: u32,
    },
    /// Flags this version does not define.
    #[error("membuf stream has unknown flags {found:#x}")]
    Flags {
        /// The flags and reserved word.
        found: u64,
    },
    /// The source's state has another size than the destination's.
    #[error("size mismatch: stream {}, device {}", Size(*stream), Size(*device))]
    SizeMismatch {
        /// The state size in the stream.
        stream: u64,
        /// This device's state size.
        device: u64,
    },
    /// A record header that cannot be right.
    #[error("membuf stream record {index} at stream offset {at}: {reason}")]
    BadRecord {
        /// The record's number (0 is the first after the header).
        index: u64,
        /// The stream offset of the record header.
        at: u64,
        /// What is wrong with it.
        reason: String,
    },
    /// Bytes after the trailer.
    #[error("membuf stream has {extra} bytes after its trailer (at stream offset {at})")]
    TrailingBytes {
        /// How many bytes were offered past the end.
        extra: usize,
        /// The stream offset where the stream had ended.
        at: u64,
    },
    /// The stream ended early.
    #[error("membuf stream truncated: {missing} bytes of a {total}-byte {part} missing")]
    Truncated {
        /// What was being read: `header`, `record header`, `record`, `trailer`.
        part: &'static str,
        /// The length of that part.
        total: u64,
        /// How many of its bytes never came.
        missing: u64,
    },
    /// The stream ended cleanly between records but without its trailer.
    #[error("membuf stream truncated: it ends after {records} records and {data_bytes} data bytes without a trailer")]
    NoTrailer {
        /// Data records received.
        records: u64,
        /// Data bytes received.
        data_bytes: u64,
    },
    /// Some pages of the state never came.
    #[error("membuf stream incomplete: {missing} of {pages} pages never sent (first at offset {first:#x})")]
    Incomplete {
        /// Pages missing.
        missing: u64,
        /// Pages in the state.
        pages: u64,
        /// Offset of the first missing page.
        first: u64,
    },
    /// The trailer counts another amount of data than the records carried.
    #[error(
        "membuf stream lost data: its records carried {received} bytes, its trailer says {sent}"
    )]
    DataBytes {
        /// Data bytes received.
        received: u64,
        /// Data bytes the source says it sent.
        sent: u64,
    },
    /// The resumed state is not the state the source saved.
    #[error("digest mismatch: the source's state has digest {stream:#018x}, the resumed state {resumed:#018x} (page-hash sums)")]
    DigestMismatch {
        /// The [`state_hash`] in the trailer.
        stream: u64,
        /// The [`state_hash`] of the resumed state.
        resumed: u64,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips_and_rejects_every_corruption() {
        let h = StreamHeader {
            size: 1 << 20,
            seed: 7,
        };
        let bytes = h.encode();
        assert_eq!(StreamHeader::decode(&bytes).unwrap(), h);
        for i in 0..HEADER_LEN {
            let mut bad = bytes;
            bad[i] ^= 0x10;
            assert!(
                StreamHeader::decode(&bad).is_err(),
                "flip in byte {i} accepted"
            );
        }
    }

    #[test]
    fn record_checks() {
        let size = 1 << 20;
        assert!(RecordHeader::data(0, RECORD_MAX).check(size, 0, 48).is_ok());
        let msg = |r: RecordHeader| r.check(size, 3, 100).unwrap_err().to_string();
        assert!(
            msg(RecordHeader::data(4096, RECORD_MAX)).contains("past the end of the 1 MiB state")
        );
        assert!(msg(RecordHeader::data(1, 4096)).contains("not page-aligned"));
        assert!(msg(RecordHeader::data(0, 100)).contains("multiple of 4096"));
        let m = msg(RecordHeader {
            kind: 9,
            length: 4096,
            offset: 0,
        });
        assert_eq!(
            m,
            "membuf stream record 3 at stream offset 100: unknown record kind 0x9"
        );
        let t = Trailer {
            state_hash: 1,
            data_bytes: 2,
        };
        let enc = t.encode();
        let rh = RecordHeader::decode(enc[..16].try_into().unwrap());
        assert!(rh.check(size, 0, 0).is_ok());
        assert_eq!(Trailer::decode(enc[16..].try_into().unwrap()), t);
    }

    #[test]
    fn sizes_print_readably() {
        assert_eq!(Size(256 << 20).to_string(), "256 MiB");
        assert_eq!(Size(4096).to_string(), "4 KiB");
        assert_eq!(Size(3 << 30).to_string(), "3 GiB");
        assert_eq!(Size(4097).to_string(), "4097 bytes");
        assert_eq!(
            StreamError::SizeMismatch {
                stream: 256 << 20,
                device: 128 << 20
            }
            .to_string(),
            "size mismatch: stream 256 MiB, device 128 MiB"
        );
    }
}
