//! DMA_MAP, DMA_UNMAP, and the server's DMA_READ / DMA_WRITE of client memory.

use super::wire::{Reader, WireBuf};
use super::{Bulk, CodecError, Limits, Payload};

/// DMA_MAP flag: the server may read the window.
pub const DMA_MAP_FLAG_READ: u32 = 1 << 0;
/// DMA_MAP flag: the server may write the window.
pub const DMA_MAP_FLAG_WRITE: u32 = 1 << 1;
/// DMA_UNMAP flag: drop every window (address and size 0).
pub const DMA_UNMAP_FLAG_ALL: u32 = 1 << 1;

/// DMA_MAP request (32 bytes); the file descriptor, if any, travels beside the message.
/// The reply has no payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DmaMap {
    /// Size of this structure (32).
    pub argsz: u32,
    /// [`DMA_MAP_FLAG_READ`] | [`DMA_MAP_FLAG_WRITE`].
    pub flags: u32,
    /// Offset of the window in the passed fd (0 without one).
    pub offset: u64,
    /// IOVA of the window.
    pub addr: u64,
    /// Length of the window.
    pub size: u64,
}

impl DmaMap {
    /// Encoded size.
    pub const SIZE: usize = 32;
}

impl<'a> Payload<'a> for DmaMap {
    fn decode(bytes: &'a [u8], _limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let v = DmaMap {
            argsz: r.u32()?,
            flags: r.u32()?,
            offset: r.u64()?,
            addr: r.u64()?,
            size: r.u64()?,
        };
        r.finish("DMA_MAP")?;
        Ok(v)
    }

    fn encoded_len(&self) -> usize {
        Self::SIZE
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u32(self.argsz)?;
        out.put_u32(self.flags)?;
        out.put_u64(self.offset)?;
        out.put_u64(self.addr)?;
        out.put_u64(self.size)?;
        Ok(Bulk::NONE)
    }
}

/// DMA_UNMAP request (24 bytes); the reply echoes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DmaUnmap {
    /// Largest reply payload accepted (24).
    pub argsz: u32,
    /// [`DMA_UNMAP_FLAG_ALL`] or 0.
    pub flags: u32,
    /// IOVA of the window (0 with [`DMA_UNMAP_FLAG_ALL`]).
    pub addr: u64,
    /// Length of the window (0 with [`DMA_UNMAP_FLAG_ALL`]).
    pub size: u64,
}

impl DmaUnmap {
    /// Encoded size.
    pub const SIZE: usize = 24;

    /// Whether this unmaps every window.
    pub const fn all(&self) -> bool {
        self.flags & DMA_UNMAP_FLAG_ALL != 0
    }
}

impl<'a> Payload<'a> for DmaUnmap {
    fn decode(bytes: &'a [u8], _limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let v = DmaUnmap {
            argsz: r.u32()?,
            flags: r.u32()?,
            addr: r.u64()?,
            size: r.u64()?,
        };
        r.finish("DMA_UNMAP")?;
        Ok(v)
    }

    fn encoded_len(&self) -> usize {
        Self::SIZE
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u32(self.argsz)?;
        out.put_u32(self.flags)?;
        out.put_u64(self.addr)?;
        out.put_u64(self.size)?;
        Ok(Bulk::NONE)
    }
}

/// The 16-byte `{u64 addr, u64 count}` without data: a DMA_READ request, a DMA_WRITE reply,
/// and the fixed prefix of a DMA_WRITE request or DMA_READ reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DmaAccess {
    /// Client address (IOVA).
    pub addr: u64,
    /// Bytes to transfer (request) or transferred (reply).
    pub count: u64,
}

impl DmaAccess {
    /// Encoded size.
    pub const SIZE: usize = 16;
}

impl<'a> Payload<'a> for DmaAccess {
    fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let v = DmaAccess {
            addr: r.u64()?,
            count: r.u64()?,
        };
        r.finish("DMA access")?;
        limits.check_xfer("DMA count", v.count)?;
        Ok(v)
    }

    fn encoded_len(&self) -> usize {
        Self::SIZE
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u64(self.addr)?;
        out.put_u64(self.count)?;
        Ok(Bulk::NONE)
    }
}

/// `{u64 addr, u64 count}` plus `count` bytes, borrowed: a DMA_WRITE request or a DMA_READ
/// reply. `count` is the data's length.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DmaData<'a> {
    /// Client address (IOVA).
    pub addr: u64,
    /// The bytes.
    pub data: &'a [u8],
}

impl<'a> Payload<'a> for DmaData<'a> {
    fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let addr = r.u64()?;
        let count = r.u64()?;
        limits.check_xfer("DMA count", count)?;
        let data = r.rest();
        if data.len() as u64 != count {
            return Err(CodecError::LengthMismatch {
                what: "DMA data",
                expected: usize::try_from(count).unwrap_or(usize::MAX),
                actual: data.len(),
            });
        }
        Ok(DmaData { addr, data })
    }

    fn encoded_len(&self) -> usize {
        DmaAccess::SIZE + self.data.len()
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u64(self.addr)?;
        out.put_u64(self.data.len() as u64)?;
        Ok(Bulk::data(self.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::StackBuf;

    #[test]
    fn dma_map_layout() {
        let m = DmaMap {
            argsz: 32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset: 0,
            addr: 0x1000,
            size: 0x1000,
        };
        let mut out = Vec::new();
        m.encode(&mut out).unwrap();
        let mut expected = vec![32, 0, 0, 0, 3, 0, 0, 0];
        expected.extend_from_slice(&0u64.to_le_bytes());
        expected.extend_from_slice(&0x1000u64.to_le_bytes());
        expected.extend_from_slice(&0x1000u64.to_le_bytes());
        assert_eq!(out, expected);
        assert_eq!(DmaMap::decode(&out, &Limits::default()).unwrap(), m);
        out.push(0);
        assert!(matches!(
            DmaMap::decode(&out, &Limits::default()),
            Err(CodecError::LengthMismatch {
                expected: 32,
                actual: 33,
                ..
            })
        ));
    }

    #[test]
    fn dma_data_borrows_and_checks_count() {
        let limits = Limits::default();
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&0x2000u64.to_le_bytes());
        bytes.extend_from_slice(&3u64.to_le_bytes());
        bytes.extend_from_slice(b"abc");
        let d = DmaData::decode(&bytes, &limits).unwrap();
        assert_eq!(d.addr, 0x2000);
        assert!(std::ptr::eq(d.data.as_ptr(), bytes[16..].as_ptr()));
        let mut head = StackBuf::<16>::new();
        let bulk = d.encode_head(&mut head).unwrap();
        assert_eq!(head.as_bytes(), &bytes[..16]);
        assert_eq!(bulk.data, b"abc");
        assert!(matches!(
            DmaData::decode(&bytes[..18], &limits),
            Err(CodecError::LengthMismatch {
                expected: 3,
                actual: 2,
                ..
            })
        ));
        let small = Limits {
            max_data_xfer_size: 2,
            ..limits
        };
        assert!(matches!(
            DmaData::decode(&bytes, &small),
            Err(CodecError::TooLarge {
                size: 3,
                limit: 2,
                ..
            })
        ));
        assert!(matches!(
            DmaAccess::decode(&bytes[..16], &small),
            Err(CodecError::TooLarge { .. })
        ));
    }
}
