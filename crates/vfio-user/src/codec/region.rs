//! REGION_READ, REGION_WRITE and REGION_WRITE_MULTI.

use super::wire::{Reader, WireBuf};
use super::{Bulk, CodecError, Limits, Payload};

/// The 16-byte `{u64 offset, u32 region, u32 count}` without data: a REGION_READ request, a
/// REGION_WRITE reply, and the fixed prefix of a REGION_WRITE request or REGION_READ reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RegionAccess {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes to transfer (request) or transferred (reply).
    pub count: u32,
}

impl RegionAccess {
    /// Encoded size.
    pub const SIZE: usize = 16;
}

impl<'a> Payload<'a> for RegionAccess {
    fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let v = RegionAccess {
            offset: r.u64()?,
            region: r.u32()?,
            count: r.u32()?,
        };
        r.finish("region access")?;
        limits.check_xfer("region access count", v.count.into())?;
        Ok(v)
    }

    fn encoded_len(&self) -> usize {
        Self::SIZE
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u64(self.offset)?;
        out.put_u32(self.region)?;
        out.put_u32(self.count)?;
        Ok(Bulk::NONE)
    }
}

/// `{u64 offset, u32 region, u32 count}` plus `count` bytes, borrowed: a REGION_WRITE request
/// or a REGION_READ reply. `count` is the data's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RegionData<'a> {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// The bytes.
    pub data: &'a [u8],
}

impl<'a> Payload<'a> for RegionData<'a> {
    fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let offset = r.u64()?;
        let region = r.u32()?;
        let count = r.u32()?;
        limits.check_xfer("region access count", count.into())?;
        let data = r.rest();
        if data.len() != count as usize {
            return Err(CodecError::LengthMismatch {
                what: "region data",
                expected: count as usize,
                actual: data.len(),
            });
        }
        Ok(RegionData {
            offset,
            region,
            data,
        })
    }

    fn encoded_len(&self) -> usize {
        RegionAccess::SIZE + self.data.len()
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        let count = u32::try_from(self.data.len()).map_err(|_| CodecError::TooLarge {
            what: "region data",
            size: self.data.len() as u64,
            limit: u32::MAX.into(),
        })?;
        out.put_u64(self.offset)?;
        out.put_u32(self.region)?;
        out.put_u32(count)?;
        Ok(Bulk::data(self.data))
    }
}

/// One write of REGION_WRITE_MULTI: at most 8 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MultiWrite {
    /// Offset in the region.
    pub offset: u64,
    /// Region index.
    pub region: u32,
    /// Bytes of `data` to write (at most 8).
    pub count: u32,
    /// The bytes; those past `count` are carried but unused.
    pub data: [u8; 8],
}

impl MultiWrite {
    /// Encoded size of one write.
    pub const SIZE: usize = 24;

    /// The bytes to write.
    pub fn bytes(&self) -> &[u8] {
        &self.data[..(self.count as usize).min(8)]
    }
}

/// REGION_WRITE_MULTI request: `u64 wr_cnt` then that many 24-byte writes.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct WriteMulti {
    /// The writes, in order.
    pub writes: Vec<MultiWrite>,
}

impl<'a> Payload<'a> for WriteMulti {
    fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let n = r.u64()?;
        limits.check_ranges("REGION_WRITE_MULTI writes", n)?;
        let n = n as usize;
        let need = 8 + n * MultiWrite::SIZE;
        if bytes.len() != need {
            return Err(CodecError::LengthMismatch {
                what: "REGION_WRITE_MULTI",
                expected: need,
                actual: bytes.len(),
            });
        }
        let mut writes = Vec::with_capacity(n);
        for _ in 0..n {
            let w = MultiWrite {
                offset: r.u64()?,
                region: r.u32()?,
                count: r.u32()?,
                data: r.array()?,
            };
            if w.count > 8 {
                return Err(CodecError::BadField {
                    field: "REGION_WRITE_MULTI count",
                    value: w.count.into(),
                    reason: "a coalesced write carries at most 8 bytes",
                });
            }
            writes.push(w);
        }
        Ok(WriteMulti { writes })
    }

    fn encoded_len(&self) -> usize {
        8 + self.writes.len() * MultiWrite::SIZE
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u64(self.writes.len() as u64)?;
        for w in &self.writes {
            out.put_u64(w.offset)?;
            out.put_u32(w.region)?;
            out.put_u32(w.count)?;
            out.put(&w.data)?;
        }
        Ok(Bulk::NONE)
    }
}

/// REGION_WRITE_MULTI reply: number of writes completed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct WriteMultiReply {
    /// Writes completed.
    pub count: u64,
}

impl<'a> Payload<'a> for WriteMultiReply {
    fn decode(bytes: &'a [u8], _limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let count = r.u64()?;
        r.finish("REGION_WRITE_MULTI reply")?;
        Ok(WriteMultiReply { count })
    }

    fn encoded_len(&self) -> usize {
        8
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u64(self.count)?;
        Ok(Bulk::NONE)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_data_length_must_match_count() {
        let limits = Limits::default();
        let mut b = Vec::new();
        RegionData {
            offset: 1,
            region: 2,
            data: &[0xf0],
        }
        .encode(&mut b)
        .unwrap();
        assert_eq!(b, [1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 1, 0, 0, 0, 0xf0]);
        assert!(RegionData::decode(&b, &limits).is_ok());
        b.push(0);
        assert!(matches!(
            RegionData::decode(&b, &limits),
            Err(CodecError::LengthMismatch {
                expected: 1,
                actual: 2,
                ..
            })
        ));
        assert!(matches!(
            RegionAccess::decode(&b[..15], &limits),
            Err(CodecError::Truncated { need: 16, have: 15 })
        ));
    }

    #[test]
    fn write_multi_bounds() {
        let limits = Limits::default();
        let w = WriteMulti {
            writes: vec![
                MultiWrite {
                    offset: 8,
                    region: 0,
                    count: 4,
                    data: [1, 2, 3, 4, 0, 0, 0, 0],
                };
                3
            ],
        };
        let mut b = Vec::new();
        w.encode(&mut b).unwrap();
        assert_eq!(b.len(), 8 + 3 * 24);
        assert_eq!(WriteMulti::decode(&b, &limits).unwrap(), w);
        assert_eq!(w.writes[0].bytes(), &[1, 2, 3, 4]);
        let mut bad = b.clone();
        bad[8 + 12] = 9;
        assert!(matches!(
            WriteMulti::decode(&bad, &limits),
            Err(CodecError::BadField { .. })
        ));
        let mut huge = b.clone();
        huge[..8].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            WriteMulti::decode(&huge, &limits),
            Err(CodecError::TooLarge { .. })
        ));
        let mut short = b;
        short.pop();
        assert!(matches!(
            WriteMulti::decode(&short, &limits),
            Err(CodecError::LengthMismatch { .. })
        ));
    }
}
