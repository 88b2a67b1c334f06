//! Linux errno values, as the kernel and vfio-user carry them.

use std::fmt;

/// A Linux errno value (positive), as returned by VFIO ioctls and carried in vfio-user error
/// replies.
///
/// vfio-user puts Linux numbers on the wire whatever the host, so these are the Linux values,
/// not the host's `libc` ones.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Errno(i32);

macro_rules! errnos {
    ($($(#[$doc:meta])* $name:ident = $val:expr;)*) => {
        impl Errno {
            $($(#[$doc])* pub const $name: Errno = Errno($val);)*

            /// The symbolic name (`EINVAL`), if this is a value vfio-mig knows by name.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($val => Some(stringify!($name)),)*
                    _ => None,
                }
            }
        }
    };
}

errnos! {
    /// Operation not permitted.
    EPERM = 1;
    /// No such file or directory.
    ENOENT = 2;
    /// Interrupted system call.
    EINTR = 4;
    /// I/O error.
    EIO = 5;
    /// Argument list too long (too many DMA-logging ranges).
    E2BIG = 7;
    /// Bad file descriptor (QEMU: data_fd out of sync).
    EBADF = 9;
    /// Try again (non-blocking read with nothing ready).
    EAGAIN = 11;
    /// Out of memory.
    ENOMEM = 12;
    /// Permission denied.
    EACCES = 13;
    /// Bad address.
    EFAULT = 14;
    /// Device or resource busy.
    EBUSY = 16;
    /// Exists (overlapping DMA map).
    EEXIST = 17;
    /// No such device (a disabled data session).
    ENODEV = 19;
    /// Invalid argument.
    EINVAL = 22;
    /// Too many open files in system.
    ENFILE = 23;
    /// Too many open files.
    EMFILE = 24;
    /// Inappropriate ioctl (feature not supported).
    ENOTTY = 25;
    /// No space left.
    ENOSPC = 28;
    /// Illegal seek (positional I/O on a data stream).
    ESPIPE = 29;
    /// Broken pipe.
    EPIPE = 32;
    /// Result out of range.
    ERANGE = 34;
    /// Function not implemented.
    ENOSYS = 38;
    /// No message of the desired type (PRE_COPY: nothing to read now).
    ENOMSG = 42;
    /// Protocol error.
    EPROTO = 71;
    /// Bad message.
    EBADMSG = 74;
    /// Value too large (DMA-logging range overflow).
    EOVERFLOW = 75;
    /// Message too long.
    EMSGSIZE = 90;
    /// Operation not supported.
    EOPNOTSUPP = 95;
    /// Connection reset by peer.
    ECONNRESET = 104;
    /// Not connected.
    ENOTCONN = 107;
    /// Timed out.
    ETIMEDOUT = 110;
}

impl Errno {
    /// Wraps a raw errno value; negative values (the kernel's `-EINVAL` style) are negated.
    pub const fn new(raw: i32) -> Errno {
        Errno(raw.wrapping_abs())
    }

    /// The positive raw value.
    pub const fn raw(self) -> i32 {
        self.0
    }

    /// The errno of an I/O error from the OS, or `EIO` when it carries none.
    pub fn from_io(err: &std::io::Error) -> Errno {
        err.raw_os_error().map_or(Errno::EIO, Errno::new)
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name() {
            Some(name) => write!(f, "{name}"),
            None => write!(f, "errno {}", self.0),
        }
    }
}

impl fmt::Debug for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Errno({self}={})", self.0)
    }
}

impl From<Errno> for std::io::Error {
    fn from(e: Errno) -> Self {
        std::io::Error::from_raw_os_error(e.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_linux_values() {
        assert_eq!(Errno::EINVAL.raw(), 22);
        assert_eq!(Errno::ENOMSG.raw(), 42);
        assert_eq!(Errno::ENODEV.raw(), 19);
        assert_eq!(Errno::E2BIG.raw(), 7);
        assert_eq!(Errno::EOVERFLOW.raw(), 75);
        assert_eq!(Errno::ENOTTY.raw(), 25);
        assert_eq!(Errno::new(-22), Errno::EINVAL);
        assert_eq!(Errno::EINVAL.to_string(), "EINVAL");
        assert_eq!(Errno::new(4000).to_string(), "errno 4000");
    }
}
