//! DEVICE_FEATURE: migration capabilities, device state, DMA logging and data size.

use vfio_mig_uapi::DeviceState;

use super::wire::{Reader, WireBuf};
use super::{Bulk, CodecError, Limits, Payload};

/// Bits 0-15 of the flags word: the feature index.
pub const FEATURE_INDEX_MASK: u32 = 0xffff;
/// Read the feature.
pub const FEATURE_GET: u32 = 1 << 16;
/// Write the feature.
pub const FEATURE_SET: u32 = 1 << 17;
/// Only ask whether the feature (with the GET/SET bits given) is supported.
pub const FEATURE_PROBE: u32 = 1 << 18;
const FEATURE_KNOWN_BITS: u32 = FEATURE_INDEX_MASK | FEATURE_GET | FEATURE_SET | FEATURE_PROBE;

/// `VFIO_DEVICE_FEATURE_MIGRATION`: GET the migration capability flags (u64).
pub const FEATURE_MIGRATION: u16 = 1;
/// `VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE`: GET/SET `{u32 device_state, i32 data_fd}`.
pub const FEATURE_MIG_DEVICE_STATE: u16 = 2;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_START`: SET page size and IOVA ranges.
pub const FEATURE_DMA_LOGGING_START: u16 = 6;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP`: SET (libvfio-user's client sends START's layout).
pub const FEATURE_DMA_LOGGING_STOP: u16 = 7;
/// `VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT`: GET the dirty bitmap of one IOVA range.
pub const FEATURE_DMA_LOGGING_REPORT: u16 = 8;
/// `VFIO_DEVICE_FEATURE_MIG_DATA_SIZE`: GET the estimated STOP_COPY data length (u64).
pub const FEATURE_MIG_DATA_SIZE: u16 = 9;

/// Size of `{u32 argsz, u32 flags}`.
pub const FEATURE_HEADER: usize = 8;

/// DEVICE_FEATURE request or reply: `{u32 argsz, u32 flags}` and feature data.
///
/// SET and PROBE replies echo the request; a GET reply carries the data and sets `argsz` to
/// the full reply size. The data is interpreted by feature index: empty data is
/// [`FeatureData::None`] whatever the index, an index this codec does not know is
/// [`FeatureData::Raw`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceFeature<'a> {
    /// Request: largest reply accepted; GET reply: full reply size.
    pub argsz: u32,
    /// Feature index | [`FEATURE_GET`] / [`FEATURE_SET`] / [`FEATURE_PROBE`].
    pub flags: u32,
    /// The feature data.
    pub data: FeatureData<'a>,
}

impl<'a> DeviceFeature<'a> {
    /// A message with `argsz` set to its own payload size.
    pub fn new(ops: u32, index: u16, data: FeatureData<'a>) -> Self {
        let argsz = u32::try_from(FEATURE_HEADER + data.encoded_len()).unwrap_or(u32::MAX);
        DeviceFeature {
            argsz,
            flags: (ops & !FEATURE_INDEX_MASK) | u32::from(index),
            data,
        }
    }

    /// The feature index.
    pub const fn index(&self) -> u16 {
        (self.flags & FEATURE_INDEX_MASK) as u16
    }

    /// Whether GET is set.
    pub const fn is_get(&self) -> bool {
        self.flags & FEATURE_GET != 0
    }

    /// Whether SET is set.
    pub const fn is_set(&self) -> bool {
        self.flags & FEATURE_SET != 0
    }

    /// Whether PROBE is set.
    pub const fn is_probe(&self) -> bool {
        self.flags & FEATURE_PROBE != 0
    }
}

impl<'a> Payload<'a> for DeviceFeature<'a> {
    fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let argsz = r.u32()?;
        let flags = r.u32()?;
        if flags & !FEATURE_KNOWN_BITS != 0 {
            return Err(CodecError::BadField {
                field: "DEVICE_FEATURE flags",
                value: flags.into(),
                reason: "undefined bits set",
            });
        }
        let index = (flags & FEATURE_INDEX_MASK) as u16;
        let data = FeatureData::decode(index, r.rest(), limits)?;
        Ok(DeviceFeature { argsz, flags, data })
    }

    fn encoded_len(&self) -> usize {
        FEATURE_HEADER + self.data.encoded_len()
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u32(self.argsz)?;
        out.put_u32(self.flags)?;
        self.data.encode_head(out)
    }
}

/// The data part of DEVICE_FEATURE, by feature index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FeatureData<'a> {
    /// No data (PROBE, GET requests that send no placeholder, header-only echoes).
    None,
    /// [`FEATURE_MIGRATION`]: capability flags, raw (a GET request's placeholder is 0).
    Migration {
        /// `VFIO_MIGRATION_*` bits.
        flags: u64,
    },
    /// [`FEATURE_MIG_DEVICE_STATE`].
    MigDeviceState {
        /// Target (SET) or current (GET) state.
        state: DeviceState,
        /// Unused by vfio-user and kept raw: libvfio-user's GET replies carry 0, its SET
        /// replies echo the client's -1.
        data_fd: i32,
    },
    /// [`FEATURE_DMA_LOGGING_START`] or [`FEATURE_DMA_LOGGING_STOP`].
    DmaLogging(DmaLoggingControl),
    /// [`FEATURE_DMA_LOGGING_REPORT`]: request (empty bitmap) or reply.
    DmaLoggingReport(DmaLoggingReport<'a>),
    /// [`FEATURE_MIG_DATA_SIZE`].
    MigDataSize {
        /// Estimated bytes the STOP_COPY stream will carry.
        stop_copy_length: u64,
    },
    /// A feature this codec does not interpret: the bytes after the flags, borrowed.
    Raw(&'a [u8]),
}

impl<'a> FeatureData<'a> {
    /// Decodes the data of feature `index`.
    pub fn decode(index: u16, bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        if bytes.is_empty() {
            return Ok(FeatureData::None);
        }
        let mut r = Reader::new(bytes);
        let data = match index {
            FEATURE_MIGRATION => FeatureData::Migration { flags: r.u64()? },
            FEATURE_MIG_DEVICE_STATE => {
                let raw = r.u32()?;
                let data_fd = r.i32()?;
                FeatureData::MigDeviceState {
                    state: DeviceState::try_from(raw)?,
                    data_fd,
                }
            }
            FEATURE_DMA_LOGGING_START | FEATURE_DMA_LOGGING_STOP => {
                let page_size = r.u64()?;
                let num_ranges = r.u32()?;
                let _reserved = r.u32()?;
                limits.check_ranges("DMA logging ranges", num_ranges.into())?;
                let need = 16 + 16 * num_ranges as usize;
                if bytes.len() != need {
                    return Err(CodecError::LengthMismatch {
                        what: "DMA logging ranges",
                        expected: need,
                        actual: bytes.len(),
                    });
                }
                let mut ranges = Vec::with_capacity(num_ranges as usize);
                for _ in 0..num_ranges {
                    ranges.push(IovaRange {
                        iova: r.u64()?,
                        length: r.u64()?,
                    });
                }
                FeatureData::DmaLogging(DmaLoggingControl { page_size, ranges })
            }
            FEATURE_DMA_LOGGING_REPORT => {
                let iova = r.u64()?;
                let length = r.u64()?;
                let page_size = r.u64()?;
                let bitmap = r.rest();
                if bitmap.len() % 8 != 0 {
                    return Err(CodecError::LengthMismatch {
                        what: "DMA logging bitmap (whole u64s)",
                        expected: bitmap.len() / 8 * 8,
                        actual: bitmap.len(),
                    });
                }
                FeatureData::DmaLoggingReport(DmaLoggingReport {
                    iova,
                    length,
                    page_size,
                    bitmap,
                })
            }
            FEATURE_MIG_DATA_SIZE => FeatureData::MigDataSize {
                stop_copy_length: r.u64()?,
            },
            _ => FeatureData::Raw(r.rest()),
        };
        r.finish("DEVICE_FEATURE data")?;
        Ok(data)
    }

    /// Encoded size.
    pub fn encoded_len(&self) -> usize {
        match self {
            FeatureData::None => 0,
            FeatureData::Migration { .. }
            | FeatureData::MigDeviceState { .. }
            | FeatureData::MigDataSize { .. } => 8,
            FeatureData::DmaLogging(c) => 16 + 16 * c.ranges.len(),
            FeatureData::DmaLoggingReport(r) => 24 + r.bitmap.len(),
            FeatureData::Raw(b) => b.len(),
        }
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        match self {
            FeatureData::None => {}
            FeatureData::Migration { flags } => out.put_u64(*flags)?,
            FeatureData::MigDeviceState { state, data_fd } => {
                out.put_u32(state.raw())?;
                out.put(&data_fd.to_le_bytes())?;
            }
            FeatureData::DmaLogging(c) => {
                let n = u32::try_from(c.ranges.len()).map_err(|_| CodecError::TooLarge {
                    what: "DMA logging ranges",
                    size: c.ranges.len() as u64,
                    limit: u32::MAX.into(),
                })?;
                out.put_u64(c.page_size)?;
                out.put_u32(n)?;
                out.put_u32(0)?;
                for range in &c.ranges {
                    out.put_u64(range.iova)?;
                    out.put_u64(range.length)?;
                }
            }
            FeatureData::DmaLoggingReport(r) => {
                if r.bitmap.len() % 8 != 0 {
                    return Err(CodecError::LengthMismatch {
                        what: "DMA logging bitmap (whole u64s)",
                        expected: r.bitmap.len() / 8 * 8,
                        actual: r.bitmap.len(),
                    });
                }
                out.put_u64(r.iova)?;
                out.put_u64(r.length)?;
                out.put_u64(r.page_size)?;
                return Ok(Bulk::data(r.bitmap));
            }
            FeatureData::MigDataSize { stop_copy_length } => out.put_u64(*stop_copy_length)?,
            FeatureData::Raw(b) => return Ok(Bulk::data(b)),
        }
        Ok(Bulk::NONE)
    }
}

/// One IOVA range of DMA_LOGGING_START.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IovaRange {
    /// Start address.
    pub iova: u64,
    /// Length.
    pub length: u64,
}

/// DMA_LOGGING_START / STOP data: `{u64 page_size, u32 num_ranges, u32 reserved}` and the
/// ranges (none: log everything). The reserved word is ignored and written as 0.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct DmaLoggingControl {
    /// Tracking granularity asked for.
    pub page_size: u64,
    /// Ranges to log.
    pub ranges: Vec<IovaRange>,
}

/// DMA_LOGGING_REPORT data: `{u64 iova, u64 length, u64 page_size}` and, in a reply, the
/// dirty bitmap (u64 words, LSB first, one bit per page), borrowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DmaLoggingReport<'a> {
    /// Start of the range.
    pub iova: u64,
    /// Length of the range.
    pub length: u64,
    /// Bytes per bitmap bit; a power of two.
    pub page_size: u64,
    /// The bitmap (empty in a request).
    pub bitmap: &'a [u8],
}

impl DmaLoggingReport<'_> {
    /// Bytes of bitmap a reply to this request carries: one bit per page of `length`,
    /// rounded up to whole u64s. Fails if `page_size` is not a power of two, or if the
    /// reply (header, feature header, 24 bytes and bitmap) would exceed
    /// `limits.max_msg_size`.
    pub fn bitmap_len(&self, limits: &Limits) -> Result<usize, CodecError> {
        if !self.page_size.is_power_of_two() {
            return Err(CodecError::BadField {
                field: "DMA logging page_size",
                value: self.page_size,
                reason: "not a power of two",
            });
        }
        let pages = self.length.div_ceil(self.page_size);
        let bytes = pages.div_ceil(64) * 8;
        let overhead = (super::HEADER_SIZE + FEATURE_HEADER + 24) as u64;
        let limit = u64::from(limits.max_msg_size).saturating_sub(overhead);
        if bytes > limit {
            return Err(CodecError::TooLarge {
                what: "DMA logging bitmap",
                size: bytes,
                limit,
            });
        }
        Ok(bytes as usize)
    }

    /// The bitmap as u64 words.
    pub fn bitmap_words(&self) -> impl Iterator<Item = u64> + '_ {
        self.bitmap.chunks_exact(8).map(|c| {
            let mut w = [0u8; 8];
            w.copy_from_slice(c);
            u64::from_le_bytes(w)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(bytes: &[u8]) -> Result<DeviceFeature<'_>, CodecError> {
        DeviceFeature::decode(bytes, &Limits::default())
    }

    /// Test bytes from hex, leaked so decoded values may borrow them freely.
    fn unhex(s: &str) -> &'static [u8] {
        let v: Vec<u8> = (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect();
        v.leak()
    }

    #[test]
    fn libvfio_user_payloads_decode() {
        // GET MIGRATION reply: STOP_COPY | PRE_COPY.
        let f = decode(unhex("10000000010001000500000000000000")).unwrap();
        assert!(f.is_get() && !f.is_set() && f.index() == FEATURE_MIGRATION);
        assert_eq!(f.data, FeatureData::Migration { flags: 5 });
        // PROBE of MIG_DEVICE_STATE, no data.
        let f = decode(unhex("0800000002000400")).unwrap();
        assert!(f.is_probe());
        assert_eq!(f.data, FeatureData::None);
        // SET STOP with data_fd -1; GET reply with data_fd 0.
        let f = decode(unhex("100000000200020001000000ffffffff")).unwrap();
        assert_eq!(
            f.data,
            FeatureData::MigDeviceState {
                state: DeviceState::Stop,
                data_fd: -1
            }
        );
        let f = decode(unhex("10000000020001000300000000000000")).unwrap();
        assert_eq!(
            f.data,
            FeatureData::MigDeviceState {
                state: DeviceState::StopCopy,
                data_fd: 0
            }
        );
        // DMA_LOGGING_START page 4096, no ranges; STOP with the same layout.
        for idx in ["06", "07"] {
            let f = decode(unhex(&format!(
                "18000000{idx}00020000100000000000000000000000000000"
            )))
            .unwrap();
            assert_eq!(
                f.data,
                FeatureData::DmaLogging(DmaLoggingControl {
                    page_size: 4096,
                    ranges: vec![]
                })
            );
        }
        // DMA_LOGGING_REPORT reply with one bitmap word.
        let f = decode(unhex(
            "28000000080001000010000000000000001000000000000000100000000000000100000000000000",
        ))
        .unwrap();
        let FeatureData::DmaLoggingReport(r) = f.data else {
            panic!("{f:?}")
        };
        assert_eq!((r.iova, r.length, r.page_size), (0x1000, 0x1000, 0x1000));
        assert_eq!(r.bitmap_words().collect::<Vec<_>>(), [1]);
        assert_eq!(r.bitmap_len(&Limits::default()).unwrap(), 8);
    }

    #[test]
    fn bad_data_is_rejected() {
        // Unknown device state 8.
        assert!(matches!(
            decode(unhex("100000000200020008000000ffffffff")),
            Err(CodecError::BadDeviceState(_))
        ));
        // MIGRATION data of 4 bytes.
        assert!(matches!(
            decode(unhex("0c00000001000100aaaaaaaa")),
            Err(CodecError::Truncated { .. })
        ));
        // MIG_DATA_SIZE with trailing bytes.
        assert!(matches!(
            decode(unhex("110000000900010000000000000000000000")),
            Err(CodecError::LengthMismatch { .. })
        ));
        // Undefined flag bit 19.
        assert!(matches!(
            decode(unhex("0800000001000800")),
            Err(CodecError::BadField { .. })
        ));
        // Ranges count beyond the limit, and disagreeing with the length.
        assert!(matches!(
            decode(unhex("180000000600020000100000000000000002000000000000")),
            Err(CodecError::TooLarge { .. })
        ));
        assert!(matches!(
            decode(unhex("180000000600020000100000000000000100000000000000")),
            Err(CodecError::LengthMismatch { .. })
        ));
        // A bitmap that is not whole u64s.
        assert!(matches!(
            decode(unhex(
                "2000000008000100000000000000000000100000000000000010000000000000ff"
            )),
            Err(CodecError::LengthMismatch { .. })
        ));
        assert!(matches!(
            decode(&[8, 0, 0]),
            Err(CodecError::Truncated { need: 4, have: 3 })
        ));
    }

    #[test]
    fn unknown_features_stay_raw_and_round_trip() {
        let f = DeviceFeature::new(FEATURE_GET, 0x100, FeatureData::Raw(&[1, 2, 3]));
        assert_eq!(f.argsz, 11);
        let bytes = f.encode_to_vec().unwrap();
        assert_eq!(decode(&bytes).unwrap(), f);
    }

    #[test]
    fn bitmap_len_checks_page_size_and_size() {
        let limits = Limits::default();
        let r = DmaLoggingReport {
            iova: 0,
            length: 65 * 4096,
            page_size: 4096,
            bitmap: &[],
        };
        assert_eq!(r.bitmap_len(&limits).unwrap(), 16);
        let odd = DmaLoggingReport {
            page_size: 3000,
            ..r
        };
        assert!(matches!(
            odd.bitmap_len(&limits),
            Err(CodecError::BadField { .. })
        ));
        let zero = DmaLoggingReport { page_size: 0, ..r };
        assert!(zero.bitmap_len(&limits).is_err());
        let huge = DmaLoggingReport {
            length: u64::MAX,
            page_size: 1,
            ..r
        };
        assert!(matches!(
            huge.bitmap_len(&limits),
            Err(CodecError::TooLarge { .. })
        ));
    }
}
