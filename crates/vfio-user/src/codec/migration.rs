//! MIG_DATA_READ and MIG_DATA_WRITE: the migration data stream over the socket.

use super::wire::{Reader, WireBuf};
use super::{Bulk, CodecError, Limits, Payload};

/// Size of the `{u32 argsz, u32 size}` prefix of every migration-data payload.
pub const MIG_DATA_PREFIX: usize = 8;

/// MIG_DATA_READ request, and the fixed prefix of its reply: `{u32 argsz, u32 size}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MigDataReadRequest {
    /// Largest reply payload accepted (at least 8 + `size`).
    pub argsz: u32,
    /// Bytes wanted.
    pub size: u32,
}

impl MigDataReadRequest {
    /// A request for `size` bytes with the matching `argsz`.
    pub fn new(size: u32) -> Self {
        MigDataReadRequest {
            argsz: size.saturating_add(MIG_DATA_PREFIX as u32),
            size,
        }
    }
}

impl<'a> Payload<'a> for MigDataReadRequest {
    fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let v = MigDataReadRequest {
            argsz: r.u32()?,
            size: r.u32()?,
        };
        r.finish("MIG_DATA_READ request")?;
        limits.check_xfer("MIG_DATA_READ size", v.size.into())?;
        Ok(v)
    }

    fn encoded_len(&self) -> usize {
        MIG_DATA_PREFIX
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u32(self.argsz)?;
        out.put_u32(self.size)?;
        Ok(Bulk::NONE)
    }
}

/// MIG_DATA_READ reply: `{u32 argsz, u32 size}`, `size` bytes of data (borrowed), then
/// `padding` bytes that carry nothing.
///
/// libvfio-user sizes every reply for the *requested* size and zero-fills the rest, so the
/// decoder trusts `size` and counts what follows as padding; the encoder writes that many
/// zeros (0 for replies this project sends).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MigDataReadReply<'a> {
    /// `8 + size` from a well-behaved server.
    pub argsz: u32,
    /// The migration data.
    pub data: &'a [u8],
    /// Bytes after the data.
    pub padding: u32,
}

impl<'a> MigDataReadReply<'a> {
    /// An unpadded reply carrying `data`, with the matching `argsz`.
    pub fn new(data: &'a [u8]) -> Self {
        MigDataReadReply {
            argsz: u32::try_from(data.len() + MIG_DATA_PREFIX).unwrap_or(u32::MAX),
            data,
            padding: 0,
        }
    }
}

impl<'a> Payload<'a> for MigDataReadReply<'a> {
    fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let argsz = r.u32()?;
        let size = r.u32()?;
        limits.check_xfer("MIG_DATA_READ size", size.into())?;
        let data = r.bytes(size as usize)?;
        let padding = r.rest().len();
        Ok(MigDataReadReply {
            argsz,
            data,
            padding: u32::try_from(padding).unwrap_or(u32::MAX),
        })
    }

    fn encoded_len(&self) -> usize {
        MIG_DATA_PREFIX + self.data.len() + self.padding as usize
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u32(self.argsz)?;
        out.put_u32(data_len_u32("MIG_DATA_READ data", self.data)?)?;
        Ok(Bulk {
            data: self.data,
            padding: self.padding as usize,
        })
    }
}

/// MIG_DATA_WRITE request: `{u32 argsz, u32 size}` and `size` bytes (borrowed). The reply
/// has no payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct MigDataWrite<'a> {
    /// `8 + size` from a well-behaved client.
    pub argsz: u32,
    /// The migration data.
    pub data: &'a [u8],
}

impl<'a> MigDataWrite<'a> {
    /// A request carrying `data`, with the matching `argsz`.
    pub fn new(data: &'a [u8]) -> Self {
        MigDataWrite {
            argsz: u32::try_from(data.len() + MIG_DATA_PREFIX).unwrap_or(u32::MAX),
            data,
        }
    }
}

impl<'a> Payload<'a> for MigDataWrite<'a> {
    fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let argsz = r.u32()?;
        let size = r.u32()?;
        limits.check_xfer("MIG_DATA_WRITE size", size.into())?;
        let data = r.rest();
        if data.len() != size as usize {
            return Err(CodecError::LengthMismatch {
                what: "MIG_DATA_WRITE data",
                expected: size as usize,
                actual: data.len(),
            });
        }
        Ok(MigDataWrite { argsz, data })
    }

    fn encoded_len(&self) -> usize {
        MIG_DATA_PREFIX + self.data.len()
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u32(self.argsz)?;
        out.put_u32(data_len_u32("MIG_DATA_WRITE data", self.data)?)?;
        Ok(Bulk::data(self.data))
    }
}

fn data_len_u32(what: &'static str, data: &[u8]) -> Result<u32, CodecError> {
    u32::try_from(data.len()).map_err(|_| CodecError::TooLarge {
        what,
        size: data.len() as u64,
        limit: u32::MAX.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn padded_read_reply_trusts_size() {
        let limits = Limits::default();
        // The gpio sample's end-of-data reply: argsz 8, size 0, then 64 zero bytes.
        let mut bytes = vec![8, 0, 0, 0, 0, 0, 0, 0];
        bytes.resize(8 + 64, 0);
        let r = MigDataReadReply::decode(&bytes, &limits).unwrap();
        assert_eq!((r.argsz, r.data.len(), r.padding), (8, 0, 64));
        let mut out = Vec::new();
        r.encode(&mut out).unwrap();
        assert_eq!(out, bytes);
        let mut short = vec![16, 0, 0, 0, 8, 0, 0, 0];
        short.extend_from_slice(&[1; 7]);
        assert!(matches!(
            MigDataReadReply::decode(&short, &limits),
            Err(CodecError::Truncated { need: 16, have: 15 })
        ));
    }

    #[test]
    fn write_must_carry_exactly_size_bytes() {
        let limits = Limits::default();
        let w = MigDataWrite::new(b"state");
        let mut out = Vec::new();
        w.encode(&mut out).unwrap();
        assert_eq!(&out[..8], &[13, 0, 0, 0, 5, 0, 0, 0]);
        assert_eq!(MigDataWrite::decode(&out, &limits).unwrap(), w);
        out.push(0);
        assert!(matches!(
            MigDataWrite::decode(&out, &limits),
            Err(CodecError::LengthMismatch {
                expected: 5,
                actual: 6,
                ..
            })
        ));
        let small = Limits {
            max_data_xfer_size: 4,
            ..limits
        };
        assert!(matches!(
            MigDataWrite::decode(&out, &small),
            Err(CodecError::TooLarge {
                size: 5,
                limit: 4,
                ..
            })
        ));
        assert!(matches!(
            MigDataReadRequest::decode(
                &MigDataReadRequest::new(5).encode_to_vec().unwrap(),
                &small
            ),
            Err(CodecError::TooLarge { .. })
        ));
    }
}
