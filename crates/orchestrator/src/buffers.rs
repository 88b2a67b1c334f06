//! Where the engines' chunk buffers come from: the heap, or memory the caller provides
//! ([`BufferMemory`]), e.g. memory shared with the processes that serve the devices, so that
//! a device's data is read into, and written from, memory those processes can reach.
//!
//! The engines allocate every pooled buffer once, when the pool is created, and keep it
//! for the whole migration; a provider is asked for at most as many buffers as the pools
//! hold. A buffer goes back to its provider when it is dropped.

use std::fmt;
use std::ops::{Deref, DerefMut};

/// Memory that the engines' chunk buffer pools take their buffers from instead of the heap
/// ([`crate::SourceOptions::buffer_memory`], [`crate::DestinationOptions::buffer_memory`]).
///
/// The engines ask for every buffer of a pool when they create it and drop each one when
/// the pool goes away, so the buffers asked for at once are bounded by the pools' sizes.
pub trait BufferMemory: Send + Sync + fmt::Debug {
    /// A buffer of exactly `len` bytes, the caller's until it drops it (dropping it gives
    /// the memory back); `None` when this memory has no room left, and the engine then
    /// takes that buffer from the heap. A buffer shorter than `len` is dropped at once and
    /// the heap used instead.
    fn allocate(&self, len: usize) -> Option<Box<dyn ChunkBuffer>>;
}

/// One buffer from a [`BufferMemory`]: bytes the engines read chunks into and write chunks
/// from. Any `DerefMut<Target = [u8]> + Send` type is one.
pub trait ChunkBuffer: DerefMut<Target = [u8]> + Send {}

impl<T: DerefMut<Target = [u8]> + Send> ChunkBuffer for T {}

/// A pooled chunk buffer: from the heap, or from the caller's [`BufferMemory`].
pub(crate) enum PoolBuffer {
    Heap(Vec<u8>),
    Provided(Box<dyn ChunkBuffer>),
}

impl PoolBuffer {
    /// A buffer of at least `len` bytes from `memory`; `None` without memory, or when it
    /// has no room (or hands out a buffer too short, which goes straight back).
    pub(crate) fn provided(memory: Option<&dyn BufferMemory>, len: usize) -> Option<PoolBuffer> {
        let buf = memory?.allocate(len)?;
        (buf.len() >= len).then_some(PoolBuffer::Provided(buf))
    }

    /// Whether the buffer came from a [`BufferMemory`].
    pub(crate) fn is_provided(&self) -> bool {
        matches!(self, PoolBuffer::Provided(_))
    }

    /// Makes the buffer at least `len` bytes long. A heap buffer grows (keeping its bytes);
    /// a provided buffer too short is replaced by `len` zero bytes from the heap, so the
    /// provided one goes back to its provider: correct, only no longer in its memory.
    pub(crate) fn ensure_len(&mut self, len: usize) {
        if self.len() >= len {
            return;
        }
        match self {
            PoolBuffer::Heap(v) => v.resize(len, 0),
            PoolBuffer::Provided(_) => *self = PoolBuffer::Heap(vec![0; len]),
        }
    }
}

impl Default for PoolBuffer {
    fn default() -> Self {
        PoolBuffer::Heap(Vec::new())
    }
}

impl From<Vec<u8>> for PoolBuffer {
    fn from(v: Vec<u8>) -> Self {
        PoolBuffer::Heap(v)
    }
}

impl Deref for PoolBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            PoolBuffer::Heap(v) => v,
            PoolBuffer::Provided(b) => b,
        }
    }
}

impl DerefMut for PoolBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        match self {
            PoolBuffer::Heap(v) => v,
            PoolBuffer::Provided(b) => b,
        }
    }
}

impl fmt::Debug for PoolBuffer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = if self.is_provided() {
            "Provided"
        } else {
            "Heap"
        };
        f.debug_struct(kind).field("len", &self.len()).finish()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// Hands out `Vec`s of the asked length (or `short` bytes less), up to `room` of them,
    /// counting what it gave and what came back.
    #[derive(Debug, Default)]
    pub(crate) struct Counted {
        pub(crate) room: usize,
        pub(crate) short: usize,
        pub(crate) given: AtomicUsize,
        pub(crate) back: Arc<AtomicUsize>,
    }

    #[derive(Debug)]
    struct Counting {
        bytes: Vec<u8>,
        back: Arc<AtomicUsize>,
    }

    impl Deref for Counting {
        type Target = [u8];
        fn deref(&self) -> &[u8] {
            &self.bytes
        }
    }

    impl DerefMut for Counting {
        fn deref_mut(&mut self) -> &mut [u8] {
            &mut self.bytes
        }
    }

    impl Drop for Counting {
        fn drop(&mut self) {
            self.back.fetch_add(1, Ordering::SeqCst);
        }
    }

    impl BufferMemory for Counted {
        fn allocate(&self, len: usize) -> Option<Box<dyn ChunkBuffer>> {
            if self.given.load(Ordering::SeqCst) >= self.room {
                return None;
            }
            self.given.fetch_add(1, Ordering::SeqCst);
            Some(Box::new(Counting {
                bytes: vec![0; len.saturating_sub(self.short)],
                back: Arc::clone(&self.back),
            }))
        }
    }

    #[test]
    fn a_provider_without_room_or_with_short_buffers_leaves_the_heap() {
        assert!(PoolBuffer::provided(None, 8).is_none());
        let memory = Counted {
            room: 1,
            ..Counted::default()
        };
        let buf = PoolBuffer::provided(Some(&memory), 8).unwrap();
        assert!(buf.is_provided());
        assert_eq!(buf.len(), 8);
        assert!(PoolBuffer::provided(Some(&memory), 8).is_none());
        drop(buf);
        assert_eq!(memory.back.load(Ordering::SeqCst), 1);

        let short = Counted {
            room: 1,
            short: 1,
            ..Counted::default()
        };
        assert!(PoolBuffer::provided(Some(&short), 8).is_none());
        assert_eq!(short.given.load(Ordering::SeqCst), 1);
        assert_eq!(
            short.back.load(Ordering::SeqCst),
            1,
            "the short one went back"
        );
    }

    #[test]
    fn a_provided_buffer_too_short_becomes_a_heap_buffer_and_goes_back() {
        let memory = Counted {
            room: 1,
            ..Counted::default()
        };
        let mut buf = PoolBuffer::provided(Some(&memory), 8).unwrap();
        buf.ensure_len(8);
        assert!(buf.is_provided());
        buf.ensure_len(9);
        assert!(!buf.is_provided());
        assert_eq!(buf.len(), 9);
        assert_eq!(memory.back.load(Ordering::SeqCst), 1);
        let mut heap = PoolBuffer::from(vec![1, 2]);
        heap.ensure_len(4);
        assert_eq!(&heap[..], &[1, 2, 0, 0]);
    }
}
