//! The vfio-mig migration stream: the bytes that carry device migration state from a source
//! host to a destination host, through a file, a UNIX socket or TCP.
//!
//! Sans-IO: an [`Encoder`] turns a migration's events into bytes, a [`Decoder`] turns bytes,
//! fed in pieces of any size, into checked [`Event`]s; neither does I/O. [`inspect`] walks a
//! whole stream from any [`std::io::Read`] and describes it, and [`check_compatibility`]
//! decides whether a destination device can take a device's state.
//!
//! # Example
//!
//! ```
//! use vfio_mig_stream::{check_compatibility, Decoder, DeviceInfo, Encoder, Event, Outcome, Phase, StreamConfig};
//! use vfio_mig_uapi::MigrationFeatures;
//!
//! let device = DeviceInfo {
//!     name: "vfio-user:/run/src.sock".into(),
//!     kind: "membuf".into(),
//!     version: "1".into(),
//!     compat: 4096u64.to_le_bytes().to_vec(),
//!     features: MigrationFeatures::ALL,
//!     data_size_estimate: 4096,
//! };
//!
//! // Source: header and DEVICE records, then chunks as the device produces them.
//! let mut wire = Vec::new();
//! let mut enc = Encoder::new(&StreamConfig::default(), &[device.clone()], &mut wire)?;
//! let state = vec![7u8; 4096];
//! let frame = enc.chunk_frame(0, Phase::StopCopy, &state)?; // write the frame, then the payload
//! wire.extend_from_slice(&frame);
//! wire.extend_from_slice(&state);
//! enc.end_device(0, &mut wire)?;
//! enc.end(&mut wire)?;
//!
//! // Destination: bytes in any pieces; check every device before writing into any.
//! let mut dec = Decoder::new();
//! let mut received = Vec::new();
//! let mut input = &wire[..];
//! while !input.is_empty() {
//!     let (n, event) = dec.feed(&input[..input.len().min(1000)])?;
//!     match event {
//!         Some(Event::Device { info, .. }) => {
//!             check_compatibility(&info, &device)?;
//!         }
//!         Some(Event::Data(chunk)) => received.extend_from_slice(chunk.payload),
//!         _ => {}
//!     }
//!     input = &input[n..];
//! }
//! assert!(matches!(dec.finish()?, Outcome::Complete(_)));
//! assert_eq!(received, state);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Format, version 1
//!
//! All integers are little-endian. Every checksum is CRC-32 (IEEE 802.3, the zlib/PNG
//! CRC). `docs/stream-format.md` has the same description with byte tables.
//!
//! A stream is a **header**, then exactly `device_count` **DEVICE** records in index order,
//! then **DATA** and **DEVICE_END** records in any interleaving, then one **END** record.
//! An **ABORT** record may replace the rest of the stream at any point after the header.
//! Nothing may follow END or ABORT.
//!
//! ## Header (36 bytes + producer string)
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 8 | magic `VFIOMIGS` |
//! | 8 | 2 | format version, 1 |
//! | 10 | 2 | flags, 0 (none defined) |
//! | 12 | 4 | `max_chunk`: largest DATA payload in this stream (1 to the decoder's limit, 16 MiB by default) |
//! | 16 | 2 | `device_count`: 1 to 1024 |
//! | 18 | 2 | producer string length P, at most 256 |
//! | 20 | 8 | creation time, ms since the Unix epoch (0: not recorded) |
//! | 28 | 4 | CRC of the producer string |
//! | 32 | 4 | CRC of bytes 0..32 |
//! | 36 | P | producer string, UTF-8 (e.g. `vfio-mig 0.1.0`) |
//!
//! ## Records: a 20-byte frame, then a body
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 1 | record type: 1 DEVICE, 2 DATA, 3 DEVICE_END, 4 END, 5 ABORT |
//! | 1 | 1 | phase (DATA: 1 pre-copy, 2 stop-copy; otherwise 0) |
//! | 2 | 2 | device index (DEVICE, DATA, DEVICE_END; otherwise 0) |
//! | 4 | 4 | sequence number (DATA: the device's chunk number from 0, across both phases; otherwise 0) |
//! | 8 | 4 | body length |
//! | 12 | 4 | CRC of the body |
//! | 16 | 4 | CRC of frame bytes 0..16 |
//!
//! Bodies:
//!
//! * **DEVICE** (24 bytes + strings): features `u64` (the uAPI's migration flags, STOP_COPY
//!   bit required), data-size estimate `u64`, name length `u8`, kind length `u8`, version
//!   length `u8`, reserved `u8` (0), compatibility data length `u16` (at most 4096),
//!   reserved `u16` (0), then the name, kind and version (UTF-8; kind and version not empty)
//!   and the compatibility data. The body length must equal the sum.
//! * **DATA**: 1 to `max_chunk` bytes of the device's opaque state. A device's chunks come
//!   in sequence order, all pre-copy chunks before any stop-copy chunk; chunks of different
//!   devices may interleave.
//! * **DEVICE_END** (32 bytes): pre-copy bytes, pre-copy chunks, stop-copy bytes, stop-copy
//!   chunks (`u64` each); they must equal what the stream carried for the device. Nothing
//!   for the device may follow.
//! * **END** (24 bytes): total DATA bytes `u64`, total chunks `u64`, device count `u32`, and
//!   the *chain CRC* `u32`: the CRC of header bytes 0..32 followed by bytes 0..16 of every
//!   record frame before the END record, in stream order. (Each part's own CRC is left
//!   out: a message followed by its own CRC leaves a CRC register in a state independent
//!   of the message, so including it would make the chain blind to the frames' contents.)
//!   Every device must have ended.
//! * **ABORT** (0 to 1024 bytes): the source's reason, UTF-8. The destination must discard
//!   everything it received.
//!
//! ## Why every corruption is caught
//!
//! Every byte of a stream lies in a range covered by a CRC, and every length that says where
//! such a range ends is itself covered by a CRC checked *before* the length is used: the
//! fixed header and the fixed frames have their own CRC, and bodies and the producer string
//! are covered by a CRC stored in that fixed part. CRC-32 detects every error burst of up to
//! 32 bits, so any change of a single byte (and any change within 4 consecutive bytes) is
//! detected. Records that are dropped, repeated or reordered are caught by the device order,
//! the sequence numbers, the totals and the chain CRC; a stream cut anywhere lacks its END
//! record, which [`Decoder::finish`] reports. The decoder never allocates more than one
//! record, and only after checking the record's length against its limit.
//!
//! ## Compatibility
//!
//! See [`check_compatibility`]: kind, version and compatibility data must be equal; feature
//! differences are reported, not refused.
#![forbid(unsafe_code)]

mod compat;
mod decoder;
mod encoder;
mod error;
mod inspect;
mod record;
mod wire;

pub use compat::{check_compatibility, Compatible, Incompatible};
pub use decoder::{Decoder, DecoderLimits, Outcome};
pub use encoder::{Encoder, StreamConfig};
pub use error::{DecodeError, DecodeErrorKind, EncodeError};
pub use inspect::{inspect, DeviceSummary, Inspection, Integrity};
pub use record::{
    Chunk, DeviceInfo, DeviceInfoError, DeviceTotals, Event, PhaseTotals, StreamHeader,
    StreamTotals,
};
pub use wire::{
    payload_crc, Phase, RecordType, DEFAULT_DECODER_MAX_CHUNK, DEFAULT_MAX_CHUNK, DEVICE_END_LEN,
    END_LEN, FORMAT_VERSION, FRAME_LEN, HEADER_LEN, MAGIC, MAX_ABORT_REASON_LEN, MAX_COMPAT_LEN,
    MAX_DEVICES, MAX_IDENT_LEN, MAX_NAME_LEN, MAX_PRODUCER_LEN,
};
