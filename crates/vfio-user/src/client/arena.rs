//! [`DataArena`]: shared memory the client registers with vfio-mig servers, so that
//! migration data moves between a server and the client's buffers without a socket copy,
//! and between two servers without the client touching it (extension features `0xF002` to
//! `0xF004`, see `docs/vfio-user-extensions.md`).
//!
//! The arena is one memfd, sealed so it can neither shrink nor grow (a server mapping it can
//! never meet `SIGBUS`), mapped shared into this process. [`DataArena::allocate`] carves it
//! into [`ArenaBuffer`]s, ordinary `&mut [u8]` buffers for their owner; a [`RemoteStream`]
//! asked to read into or write from memory inside an arena its client registered names the
//! offset to the server instead of carrying the bytes.
//!
//! Written by hand because no crate offers a sealed memfd carved into owned buffers whose
//! offsets can be recovered from a slice; the `unsafe` here is the mapping and the buffers'
//! views of it.
//!
//! # Trust
//!
//! A server writes into the arena only to answer a read the client asked for, at the range
//! the client named, while the `&mut [u8]` of that read is held by the reader. A server that
//! misbehaves could write anywhere in the arena at any time (it maps all of it): the client
//! would then forward wrong migration data, which the destination device's own validation
//! refuses. That is the trust a client already places in a server it maps DMA memory to.
//!
//! [`RemoteStream`]: super::RemoteStream
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::io;
use std::ops::{Deref, DerefMut};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::{Arc, Mutex};

use rustix::fs::{MemfdFlags, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};

use crate::extension::MAX_DATA_BUFFER;

/// Buffers start on this boundary (a page), so copies in and out are aligned.
const ALIGN: usize = 4096;

/// A sealed memfd mapped shared into this process, carved into [`ArenaBuffer`]s.
pub struct DataArena {
    base: NonNull<u8>,
    len: usize,
    fd: OwnedFd,
    /// Free ranges `(start, len)`, sorted by start, never adjacent (merged on return).
    free: Mutex<Vec<(usize, usize)>>,
}

// SAFETY: the mapping is owned by the arena for its whole life; the arena itself only
// touches it through the free list (no bytes), and each buffer's bytes are reached only by
// the buffer's owner (see `ArenaBuffer`). Sharing or moving the arena between threads is
// therefore sound.
unsafe impl Send for DataArena {}
// SAFETY: as for `Send`: `&DataArena` exposes no bytes of the mapping, only the free list,
// which is behind a mutex.
unsafe impl Sync for DataArena {}

impl std::fmt::Debug for DataArena {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataArena")
            .field("len", &self.len)
            .field("free", &self.free_bytes())
            .finish()
    }
}

impl DataArena {
    /// A new arena of at least `len` bytes (rounded up to whole pages), at most
    /// [`MAX_DATA_BUFFER`], the largest buffer a vfio-mig server accepts.
    pub fn new(len: usize) -> io::Result<Arc<DataArena>> {
        let len = len
            .checked_next_multiple_of(ALIGN)
            .filter(|&l| l > 0 && l as u64 <= MAX_DATA_BUFFER)
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("a data arena is 1 byte to {MAX_DATA_BUFFER} bytes, not {len}"),
                )
            })?;
        let fd = rustix::fs::memfd_create(
            "vfio-mig-data",
            MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
        )?;
        rustix::fs::ftruncate(&fd, len as u64)?;
        // Servers map this file: it must never shrink under them (SIGBUS), and nobody needs
        // it to grow.
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL)?;
        // SAFETY: a new shared mapping at an address the kernel chooses (null hint, no
        // MAP_FIXED), so no existing memory is replaced; the file is exactly `len` bytes and
        // sealed against shrinking, so every byte of the mapping stays backed.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                ProtFlags::READ | ProtFlags::WRITE,
                MapFlags::SHARED,
                &fd,
                0,
            )
        }?;
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| io::Error::other("mmap returned a null mapping"))?;
        Ok(Arc::new(DataArena {
            base,
            len,
            fd,
            free: Mutex::new(vec![(0, len)]),
        }))
    }

    /// The arena's size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always `false`: an arena has at least one page.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The memfd, to pass to a server.
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    /// Bytes not handed out.
    pub fn free_bytes(&self) -> usize {
        self.lock().iter().map(|&(_, l)| l).sum()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(usize, usize)>> {
        // The list is updated in single steps; a panic elsewhere cannot leave it torn.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A buffer of exactly `len` bytes (first fit, page aligned), or `None` when no free
    /// range is large enough (or `len` is 0). Dropping it gives the memory back.
    pub fn allocate(self: &Arc<Self>, len: usize) -> Option<ArenaBuffer> {
        let take = len.checked_next_multiple_of(ALIGN).filter(|&t| t > 0)?;
        let mut free = self.lock();
        let i = free.iter().position(|&(_, l)| l >= take)?;
        let (start, l) = free[i];
        if l == take {
            free.remove(i);
        } else {
            free[i] = (start + take, l - take);
        }
        Some(ArenaBuffer {
            arena: Arc::clone(self),
            offset: start,
            len,
            reserved: take,
        })
    }

    /// Where `bytes` lie in the arena: their offset, if they lie wholly inside it.
    pub fn offset_of(&self, bytes: &[u8]) -> Option<u64> {
        let base = self.base.as_ptr() as usize;
        let start = (bytes.as_ptr() as usize).checked_sub(base)?;
        let end = start.checked_add(bytes.len())?;
        (end <= self.len).then_some(start as u64)
    }

    fn give_back(&self, start: usize, len: usize) {
        let mut free = self.lock();
        let i = free.partition_point(|&(s, _)| s < start);
        free.insert(i, (start, len));
        // Merge with the next range, then with the previous one.
        if i + 1 < free.len() && free[i].0 + free[i].1 == free[i + 1].0 {
            free[i].1 += free[i + 1].1;
            free.remove(i + 1);
        }
        if i > 0 && free[i - 1].0 + free[i - 1].1 == free[i].0 {
            free[i - 1].1 += free[i].1;
            free.remove(i);
        }
    }
}

impl Drop for DataArena {
    fn drop(&mut self) {
        // SAFETY: `base`/`len` are exactly what `mmap` returned and was given; every
        // `ArenaBuffer` holds an `Arc` of the arena, so none is alive now.
        let unmapped = unsafe { rustix::mm::munmap(self.base.as_ptr().cast::<c_void>(), self.len) };
        if let Err(e) = unmapped {
            tracing::warn!(error = %e, "munmap of a data arena failed");
        }
    }
}

/// `len` bytes of a [`DataArena`], owned: plain `[u8]` for its holder. Dropping it returns
/// the memory to the arena.
pub struct ArenaBuffer {
    arena: Arc<DataArena>,
    offset: usize,
    len: usize,
    /// Bytes taken from the arena (`len` rounded up to the alignment).
    reserved: usize,
}

impl ArenaBuffer {
    /// The buffer's offset in its arena.
    pub fn offset(&self) -> u64 {
        self.offset as u64
    }

    /// The arena the buffer belongs to.
    pub fn arena(&self) -> &Arc<DataArena> {
        &self.arena
    }
}

impl std::fmt::Debug for ArenaBuffer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ArenaBuffer")
            .field("offset", &self.offset)
            .field("len", &self.len)
            .finish()
    }
}

impl Deref for ArenaBuffer {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        // SAFETY: `offset + len <= arena.len` (allocate carved it from a free range), the
        // mapping lives as long as the `Arc` held here, and no other `ArenaBuffer` covers
        // these bytes (ranges are handed out once until returned by `Drop`). Servers write
        // here only while a read into this buffer is in progress (module docs).
        unsafe { std::slice::from_raw_parts(self.arena.base.as_ptr().add(self.offset), self.len) }
    }
}

impl DerefMut for ArenaBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in `deref`; `&mut self` makes this the only view of the bytes.
        unsafe {
            std::slice::from_raw_parts_mut(self.arena.base.as_ptr().add(self.offset), self.len)
        }
    }
}

impl Drop for ArenaBuffer {
    fn drop(&mut self) {
        self.arena.give_back(self.offset, self.reserved);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_disjoint_aligned_and_come_back() {
        let arena = DataArena::new(5 * ALIGN).unwrap();
        assert_eq!(arena.len(), 5 * ALIGN);
        let mut a = arena.allocate(100).unwrap();
        let mut b = arena.allocate(2 * ALIGN).unwrap();
        assert_eq!((a.offset(), b.offset()), (0, ALIGN as u64));
        assert_eq!((a.len(), b.len()), (100, 2 * ALIGN));
        a.fill(1);
        b.fill(2);
        assert!(a.iter().all(|&x| x == 1) && b.iter().all(|&x| x == 2));
        assert_eq!(arena.offset_of(&b[10..20]), Some(ALIGN as u64 + 10));
        assert_eq!(arena.offset_of(&[0u8; 4]), None);
        assert!(arena.allocate(3 * ALIGN).is_none(), "only 2 pages are left");
        let c = arena.allocate(2 * ALIGN).unwrap();
        drop(a);
        drop(c);
        assert_eq!(arena.free_bytes(), 3 * ALIGN);
        drop(b);
        assert_eq!(*arena.lock(), vec![(0, 5 * ALIGN)], "ranges merge back");
        assert!(arena.allocate(5 * ALIGN).is_some());
    }

    #[test]
    fn the_file_is_sealed_and_shared() {
        let arena = DataArena::new(1).unwrap();
        assert_eq!(arena.len(), ALIGN);
        let seals = rustix::fs::fcntl_get_seals(arena.fd()).unwrap();
        assert!(seals.contains(SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL));
        assert!(rustix::fs::ftruncate(arena.fd(), 0).is_err());
        let mut buf = arena.allocate(16).unwrap();
        buf.copy_from_slice(b"0123456789abcdef");
        let mut back = [0u8; 16];
        rustix::io::pread(arena.fd(), &mut back, 0).unwrap();
        assert_eq!(
            &back, b"0123456789abcdef",
            "the file sees the buffer's bytes"
        );
    }

    #[test]
    fn sizes_are_bounded() {
        assert!(DataArena::new(0).is_err());
        assert!(DataArena::new(MAX_DATA_BUFFER as usize + 1).is_err());
        let arena = DataArena::new(ALIGN).unwrap();
        assert!(arena.allocate(0).is_none());
        assert!(arena.allocate(usize::MAX).is_none());
    }
}
