//! DMA windows of the client's memory mapped into the server: the crate's only `unsafe` code.
//!
//! A DMA_MAP with a file descriptor asks the server to `mmap` that file (shared) so the
//! device can reach guest memory without a message per access. [`MappedRegion`] owns one
//! such mapping and offers bounds-checked copies in and out of it; it never hands out a
//! reference into the mapping, so the client writing the same memory at the same time
//! (which it may) never aliases a Rust reference.
//!
//! # SIGBUS
//!
//! Touching a shared mapping beyond the current end of its file raises `SIGBUS`, which
//! would kill the whole server. A client could cause that by mapping a window past the end
//! of its file, or by truncating the file afterwards. Mitigations:
//!
//! * at map time the fd must be a regular file (memfd, tmpfs, hugetlbfs files are) and the
//!   window must lie inside its current size, else the map is refused with `EINVAL`;
//! * if the file is a memfd sealed against shrinking (`F_SEAL_SHRINK`), nothing can shrink
//!   it later and every access is safe;
//! * otherwise every access re-checks the file size with `fstat` first and fails with
//!   `EFAULT` when the window no longer fits. That narrows the window for a truncating
//!   client to the microseconds between the check and the copy; it cannot close it. A
//!   client that truncates memory it has mapped for DMA under a running device is broken
//!   or hostile; at worst it takes the server down, it cannot read or corrupt anything.
#![allow(unsafe_code)]

use std::ffi::c_void;
use std::io;
use std::os::fd::OwnedFd;
use std::ptr::NonNull;

use rustix::fs::{FileType, SealFlags};
use rustix::mm::{MapFlags, ProtFlags};
use vfio_mig_uapi::Errno;

/// Why a DMA window could not be mapped.
#[derive(Debug, thiserror::Error)]
pub enum MapError {
    /// The fd is not a regular file, so its size cannot be checked.
    #[error("the DMA_MAP fd is not a regular file (file type {0:?})")]
    NotRegularFile(FileType),
    /// The window does not lie inside the file.
    #[error(
        "DMA window at file offset {offset:#x}, {len:#x} bytes, ends past the end of the \
         file ({file_size:#x} bytes)"
    )]
    PastEndOfFile {
        /// File offset of the window.
        offset: u64,
        /// Window length.
        len: u64,
        /// Current file size.
        file_size: u64,
    },
    /// The window does not fit this process's address space.
    #[error("DMA window of {0:#x} bytes does not fit the address space")]
    TooLarge(u64),
    /// `fstat` of the fd failed.
    #[error("fstat of the DMA_MAP fd failed")]
    Stat(#[source] io::Error),
    /// `mmap` failed.
    #[error("mmap of the DMA_MAP fd failed")]
    Mmap(#[source] io::Error),
}

impl MapError {
    /// The errno to answer the DMA_MAP with.
    pub fn errno(&self) -> Errno {
        match self {
            MapError::NotRegularFile(_) | MapError::PastEndOfFile { .. } => Errno::EINVAL,
            MapError::TooLarge(_) => Errno::ENOMEM,
            MapError::Stat(e) | MapError::Mmap(e) => Errno::from_io(e),
        }
    }
}

/// One client file window mapped shared into this process.
pub struct MappedRegion {
    /// Start of the mapping (page aligned), as `mmap` returned it.
    base: NonNull<u8>,
    /// Length passed to `mmap`.
    map_len: usize,
    /// Offset of the window inside the mapping (the file offset's distance from a page).
    delta: usize,
    /// Window length.
    len: usize,
    /// File offset of the window.
    file_offset: u64,
    /// The file: kept for the size re-checks and so the mapping's file is this one.
    fd: OwnedFd,
    /// The file cannot shrink (memfd with `F_SEAL_SHRINK`): no re-check needed.
    sealed: bool,
    readable: bool,
    writable: bool,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access copies
// through raw pointers after bounds checks, so moving the owner to another thread is sound.
unsafe impl Send for MappedRegion {}
// SAFETY: `&self` methods only copy bytes in and out through raw pointers (no references into
// the mapping are created); concurrent copies may interleave, as concurrent DMA may on real
// hardware, but cannot violate memory safety.
unsafe impl Sync for MappedRegion {}

impl std::fmt::Debug for MappedRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MappedRegion")
            .field("len", &self.len)
            .field("file_offset", &self.file_offset)
            .field("sealed", &self.sealed)
            .field("readable", &self.readable)
            .field("writable", &self.writable)
            .finish()
    }
}

impl MappedRegion {
    /// Maps `len` bytes of `fd` at file offset `offset`, shared, with the access given.
    ///
    /// Refuses fds that are not regular files and windows that do not lie inside the file
    /// (see the module docs on SIGBUS). `len` must be non-zero and at least one of
    /// `readable`/`writable` set; the caller validates both.
    pub fn map(
        fd: OwnedFd,
        offset: u64,
        len: u64,
        readable: bool,
        writable: bool,
    ) -> Result<MappedRegion, MapError> {
        let stat = rustix::fs::fstat(&fd).map_err(|e| MapError::Stat(e.into()))?;
        let file_type = FileType::from_raw_mode(stat.st_mode);
        if file_type != FileType::RegularFile {
            return Err(MapError::NotRegularFile(file_type));
        }
        let file_size = u64::try_from(stat.st_size).unwrap_or(0);
        if offset.checked_add(len).is_none_or(|end| end > file_size) {
            return Err(MapError::PastEndOfFile {
                offset,
                len,
                file_size,
            });
        }
        let sealed = rustix::fs::fcntl_get_seals(&fd)
            .map(|seals| seals.contains(SealFlags::SHRINK))
            .unwrap_or(false);
        let page = rustix::param::page_size() as u64;
        let delta = offset % page;
        let map_offset = offset - delta;
        let map_len = len
            .checked_add(delta)
            .and_then(|n| usize::try_from(n).ok())
            .ok_or(MapError::TooLarge(len))?;
        let len = usize::try_from(len).map_err(|_| MapError::TooLarge(len))?;
        let mut prot = ProtFlags::empty();
        if readable {
            prot |= ProtFlags::READ;
        }
        if writable {
            prot |= ProtFlags::WRITE;
        }
        // SAFETY: a new mapping at an address the kernel chooses (null hint, no MAP_FIXED), so
        // no existing memory is replaced; the file offset is page aligned and the window was
        // checked to lie inside the file.
        let ptr = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                map_len,
                prot,
                MapFlags::SHARED,
                &fd,
                map_offset,
            )
        }
        .map_err(|e| MapError::Mmap(e.into()))?;
        let base = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| MapError::Mmap(io::Error::other("mmap returned a null mapping")))?;
        Ok(MappedRegion {
            base,
            map_len,
            delta: delta as usize,
            len,
            file_offset: offset,
            fd,
            sealed,
            readable,
            writable,
        })
    }

    /// Window length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the file is sealed against shrinking.
    pub fn is_sealed(&self) -> bool {
        self.sealed
    }

    /// Copies `data` into the window at `offset`.
    pub fn write(&self, offset: u64, data: &[u8]) -> Result<(), Errno> {
        if !self.writable {
            return Err(Errno::EFAULT);
        }
        let at = self.check(offset, data.len())?;
        // SAFETY: `check` proved `at + data.len() <= self.len`, and `delta + len <= map_len`,
        // so the destination lies inside the live mapping (unmapped only in `drop`, which
        // cannot run while `&self` exists) and is writable; it cannot overlap `data`, which is
        // ordinary memory of this process, not part of the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(
                data.as_ptr(),
                self.base.as_ptr().add(self.delta + at),
                data.len(),
            );
        }
        Ok(())
    }

    /// Copies `buf.len()` bytes of the window at `offset` into `buf`.
    pub fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), Errno> {
        if !self.readable {
            return Err(Errno::EFAULT);
        }
        let at = self.check(offset, buf.len())?;
        // SAFETY: as in `write`: the source lies inside the live, readable mapping, and
        // `buf` is a distinct exclusive buffer of this process.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.base.as_ptr().add(self.delta + at),
                buf.as_mut_ptr(),
                buf.len(),
            );
        }
        Ok(())
    }

    /// Bounds check of `len` bytes at `offset`, and the file-size re-check of an unsealed
    /// file (see the module docs). Returns the offset as `usize`.
    fn check(&self, offset: u64, len: usize) -> Result<usize, Errno> {
        let at = usize::try_from(offset)
            .ok()
            .filter(|&at| at.checked_add(len).is_some_and(|end| end <= self.len))
            .ok_or(Errno::EFAULT)?;
        if !self.sealed && len > 0 {
            let stat = rustix::fs::fstat(&self.fd).map_err(|_| Errno::EFAULT)?;
            let file_size = u64::try_from(stat.st_size).unwrap_or(0);
            let end = self.file_offset + offset + len as u64;
            if end > file_size {
                return Err(Errno::EFAULT);
            }
        }
        Ok(at)
    }
}

impl Drop for MappedRegion {
    fn drop(&mut self) {
        let (base, len) = (self.base.as_ptr().cast::<c_void>(), self.map_len);
        // SAFETY: `base`/`len` are exactly what `mmap` returned and was given; no reference
        // into the mapping exists (only copies are made, under `&self`, which cannot coexist
        // with this `&mut self`).
        let unmapped = unsafe { rustix::mm::munmap(base, len) };
        if let Err(e) = unmapped {
            tracing::warn!(error = %e, "munmap of a DMA window failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::fs::{memfd_create, MemfdFlags};

    fn memfd(size: u64) -> OwnedFd {
        let fd = memfd_create("dma-test", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
        rustix::fs::ftruncate(&fd, size).unwrap();
        fd
    }

    #[test]
    fn copies_in_and_out_and_the_file_sees_them() {
        let fd = memfd(3 * 4096);
        let probe = fd.try_clone().unwrap();
        // Unaligned file offset: the mapping starts a page below it.
        let region = MappedRegion::map(fd, 4096 + 100, 8000, true, true).unwrap();
        region.write(10, b"hello").unwrap();
        let mut back = [0u8; 5];
        region.read(10, &mut back).unwrap();
        assert_eq!(&back, b"hello");
        let mut file = [0u8; 5];
        rustix::io::pread(&probe, &mut file, 4096 + 110).unwrap();
        assert_eq!(&file, b"hello");
        assert!(!region.is_sealed());
    }

    #[test]
    fn bounds_and_permissions_are_enforced() {
        let region = MappedRegion::map(memfd(4096), 0, 4096, true, false).unwrap();
        assert_eq!(region.write(0, b"x"), Err(Errno::EFAULT));
        let mut buf = [0u8; 2];
        assert_eq!(region.read(4095, &mut buf), Err(Errno::EFAULT));
        assert_eq!(region.read(u64::MAX, &mut buf), Err(Errno::EFAULT));
        region.read(4094, &mut buf).unwrap();
        let wo = MappedRegion::map(memfd(4096), 0, 4096, false, true).unwrap();
        assert_eq!(wo.read(0, &mut buf), Err(Errno::EFAULT));
        wo.write(4094, b"ok").unwrap();
    }

    #[test]
    fn windows_past_the_end_and_non_files_are_refused() {
        let e = MappedRegion::map(memfd(4096), 0, 8192, true, true).unwrap_err();
        assert!(matches!(e, MapError::PastEndOfFile { .. }), "{e}");
        assert_eq!(e.errno(), Errno::EINVAL);
        let e = MappedRegion::map(memfd(4096), u64::MAX, 2, true, true).unwrap_err();
        assert!(matches!(e, MapError::PastEndOfFile { .. }), "{e}");
        let (r, _w) = rustix::pipe::pipe().unwrap();
        let e = MappedRegion::map(r, 0, 4096, true, true).unwrap_err();
        assert!(matches!(e, MapError::NotRegularFile(_)), "{e}");
        assert_eq!(e.errno(), Errno::EINVAL);
    }

    #[test]
    fn a_truncated_file_gives_efault_not_sigbus() {
        let fd = memfd(2 * 4096);
        let client = fd.try_clone().unwrap();
        let region = MappedRegion::map(fd, 0, 2 * 4096, true, true).unwrap();
        region.write(4096, b"before").unwrap();
        rustix::fs::ftruncate(&client, 4096).unwrap();
        assert_eq!(region.write(4096, b"after"), Err(Errno::EFAULT));
        let mut buf = [0u8; 4];
        assert_eq!(region.read(8000, &mut buf), Err(Errno::EFAULT));
        region.write(0, b"still fine").unwrap();
    }

    #[test]
    fn a_shrink_sealed_memfd_skips_the_recheck() {
        let fd = memfd(4096);
        rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK).unwrap();
        let region = MappedRegion::map(fd, 0, 4096, true, true).unwrap();
        assert!(region.is_sealed());
        region.write(0, b"x").unwrap();
    }
}
