//! Little-endian readers and writers that never panic.

use super::CodecError;

/// A destination for encoded bytes: a growable `Vec<u8>` or a fixed [`StackBuf`].
///
/// Encoders write through this trait so that the same code fills a reusable heap buffer for
/// control messages and a small stack buffer for the header of a bulk-data message.
pub trait WireBuf {
    /// Appends `bytes`; fails only if a fixed-capacity buffer is full.
    fn put(&mut self, bytes: &[u8]) -> Result<(), CodecError>;

    /// Appends `n` zero bytes.
    fn put_zeros(&mut self, n: usize) -> Result<(), CodecError> {
        const ZEROS: [u8; 64] = [0; 64];
        let mut left = n;
        while left > 0 {
            let step = left.min(ZEROS.len());
            self.put(&ZEROS[..step])?;
            left -= step;
        }
        Ok(())
    }

    /// Appends a little-endian `u16`.
    fn put_u16(&mut self, v: u16) -> Result<(), CodecError> {
        self.put(&v.to_le_bytes())
    }

    /// Appends a little-endian `u32`.
    fn put_u32(&mut self, v: u32) -> Result<(), CodecError> {
        self.put(&v.to_le_bytes())
    }

    /// Appends a little-endian `u64`.
    fn put_u64(&mut self, v: u64) -> Result<(), CodecError> {
        self.put(&v.to_le_bytes())
    }
}

impl WireBuf for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), CodecError> {
        self.extend_from_slice(bytes);
        Ok(())
    }

    fn put_zeros(&mut self, n: usize) -> Result<(), CodecError> {
        self.resize(self.len() + n, 0);
        Ok(())
    }
}

/// A fixed-capacity buffer on the stack, for the header and fixed part of a message whose
/// bulk data is sent from the caller's memory (`writev`/`sendmsg` with two iovecs).
#[derive(Clone)]
pub struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> StackBuf<N> {
    /// An empty buffer.
    pub const fn new() -> Self {
        StackBuf {
            buf: [0; N],
            len: 0,
        }
    }

    /// The bytes written so far.
    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    /// Number of bytes written so far.
    pub const fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written yet.
    pub const fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets the contents, keeping the capacity.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

impl<const N: usize> Default for StackBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> std::fmt::Debug for StackBuf<N> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StackBuf")
            .field("capacity", &N)
            .field("bytes", &self.as_bytes())
            .finish()
    }
}

impl<const N: usize> WireBuf for StackBuf<N> {
    fn put(&mut self, bytes: &[u8]) -> Result<(), CodecError> {
        let end = self.len.checked_add(bytes.len()).filter(|&e| e <= N);
        let Some(end) = end else {
            return Err(CodecError::BufferFull {
                need: self.len.saturating_add(bytes.len()),
                capacity: N,
            });
        };
        self.buf[self.len..end].copy_from_slice(bytes);
        self.len = end;
        Ok(())
    }
}

/// A cursor over received bytes; every read is bounds-checked.
#[derive(Debug)]
pub(crate) struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(buf: &'a [u8]) -> Self {
        Reader { buf, pos: 0 }
    }

    /// Bytes not yet read.
    pub(crate) fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Current position from the start.
    pub(crate) fn pos(&self) -> usize {
        self.pos
    }

    pub(crate) fn bytes(&mut self, n: usize) -> Result<&'a [u8], CodecError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(CodecError::Truncated {
                need: self.pos.saturating_add(n),
                have: self.buf.len(),
            });
        };
        let out = &self.buf[self.pos..end];
        self.pos = end;
        Ok(out)
    }

    pub(crate) fn array<const N: usize>(&mut self) -> Result<[u8; N], CodecError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.bytes(N)?);
        Ok(out)
    }

    pub(crate) fn u16(&mut self) -> Result<u16, CodecError> {
        self.array().map(u16::from_le_bytes)
    }

    pub(crate) fn u32(&mut self) -> Result<u32, CodecError> {
        self.array().map(u32::from_le_bytes)
    }

    pub(crate) fn u64(&mut self) -> Result<u64, CodecError> {
        self.array().map(u64::from_le_bytes)
    }

    pub(crate) fn i32(&mut self) -> Result<i32, CodecError> {
        self.array().map(i32::from_le_bytes)
    }

    /// All bytes not yet read.
    pub(crate) fn rest(&mut self) -> &'a [u8] {
        let out = &self.buf[self.pos..];
        self.pos = self.buf.len();
        out
    }

    /// Fails unless every byte was consumed.
    pub(crate) fn finish(&self, what: &'static str) -> Result<(), CodecError> {
        if self.pos == self.buf.len() {
            Ok(())
        } else {
            Err(CodecError::LengthMismatch {
                what,
                expected: self.pos,
                actual: self.buf.len(),
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reader_reports_truncation_from_the_start() {
        let mut r = Reader::new(&[1, 2, 3, 4, 5, 6]);
        assert_eq!(r.u32().unwrap(), 0x0403_0201);
        match r.u32() {
            Err(CodecError::Truncated { need: 8, have: 6 }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(r.remaining(), 2);
        assert!(matches!(
            r.finish("x"),
            Err(CodecError::LengthMismatch {
                expected: 4,
                actual: 6,
                ..
            })
        ));
        assert!(matches!(
            r.bytes(usize::MAX),
            Err(CodecError::Truncated { .. })
        ));
    }

    #[test]
    fn stack_buf_refuses_overflow_and_keeps_contents() {
        let mut b = StackBuf::<4>::new();
        b.put_u16(0x0201).unwrap();
        let err = b.put_u32(7).unwrap_err();
        assert!(matches!(
            err,
            CodecError::BufferFull {
                need: 6,
                capacity: 4
            }
        ));
        assert_eq!(b.as_bytes(), &[1, 2]);
        b.put_zeros(2).unwrap();
        assert_eq!(b.len(), 4);
        assert!(b.put_zeros(1).is_err());
    }

    #[test]
    fn vec_put_zeros_in_large_steps() {
        let mut v = vec![9u8];
        v.put_zeros(1000).unwrap();
        assert_eq!(v.len(), 1001);
        assert!(v[1..].iter().all(|&b| b == 0));
    }
}
