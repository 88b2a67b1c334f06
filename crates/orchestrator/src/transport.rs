//! Byte transports: the forward stream (source to destination) and the optional back channel
//! (destination to source) for acknowledgements.
//!
//! A [`Transport`] is one *end* of a connection: what this side can read and what it can
//! write. The source writes the migration stream and, when it can read, reads the
//! destination's acknowledgements; the destination does the reverse. A file has only one
//! direction (no back channel); a UNIX or TCP socket has both.

use std::fmt;
use std::fs::File;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vfio_mig_stream::DecoderLimits;

use crate::frames::{
    AckSink, AckSource, ByteAckSink, ByteAckSource, ByteSink, ByteSource, FrameSink, FrameSource,
};
use crate::Address;

/// Reads ahead this much on the receiving end, so that 20-byte frames cost no syscall each.
const READ_BUFFER: usize = 256 * 1024;

/// Socket-level control of a connection, shared by both halves of a [`Transport`] (or of
/// an in-process link end).
pub(crate) trait SocketControl: Send + Sync {
    fn shutdown(&self, how: Shutdown);
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()>;
}

impl SocketControl for UnixStream {
    fn shutdown(&self, how: Shutdown) {
        // Shutting down an already closed socket fails harmlessly.
        let _ = UnixStream::shutdown(self, how);
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, timeout)
    }
}

impl SocketControl for TcpStream {
    fn shutdown(&self, how: Shutdown) {
        let _ = TcpStream::shutdown(self, how);
    }
    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, timeout)
    }
    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, timeout)
    }
}

/// A handle that can shut a connection down from another thread (to unblock a reader or
/// writer stuck on a peer that stopped answering). Does nothing for files.
#[derive(Clone, Default)]
pub(crate) struct Control(Option<Arc<dyn SocketControl>>);

impl fmt::Debug for Control {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_some() {
            "Control(socket)"
        } else {
            "Control(none)"
        })
    }
}

impl Control {
    pub(crate) fn new(control: Arc<dyn SocketControl>) -> Control {
        Control(Some(control))
    }

    pub(crate) fn shutdown(&self, how: Shutdown) {
        if let Some(c) = &self.0 {
            c.shutdown(how);
        }
    }

    pub(crate) fn set_read_timeout(&self, timeout: Option<Duration>) {
        if let Some(c) = &self.0 {
            // A socket that refuses a timeout is already broken; the next read says so.
            let _ = c.set_read_timeout(timeout);
        }
    }

    pub(crate) fn set_write_timeout(&self, timeout: Option<Duration>) {
        if let Some(c) = &self.0 {
            let _ = c.set_write_timeout(timeout);
        }
    }
}

/// A file writer whose `flush` also makes the data durable, so that a completed `save` is
/// on disk when the engine reports success.
struct DurableFile(File);

impl Write for DurableFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.0.flush()?;
        self.0.sync_data()
    }
}

/// One end of a migration connection: what this side reads, what it writes.
///
/// The source engine needs a writer (the stream) and uses a reader, if present, as the back
/// channel; the destination engine needs a reader (the stream) and uses a writer, if present,
/// as the back channel.
pub struct Transport {
    pub(crate) reader: Option<Box<dyn Read + Send>>,
    pub(crate) writer: Option<Box<dyn Write + Send>>,
    pub(crate) control: Control,
    description: String,
}

impl fmt::Debug for Transport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Transport")
            .field("description", &self.description)
            .field("readable", &self.reader.is_some())
            .field("writable", &self.writer.is_some())
            .finish()
    }
}

impl Transport {
    /// Creates (or truncates) `path` to save a stream into: write-only, no back channel.
    pub fn create_file(path: &Path) -> io::Result<Transport> {
        let file = File::create(path)?;
        Ok(Transport {
            reader: None,
            writer: Some(Box::new(DurableFile(file))),
            control: Control::default(),
            description: format!("file:{}", path.display()),
        })
    }

    /// Opens a saved stream at `path`: read-only, no back channel.
    pub fn open_file(path: &Path) -> io::Result<Transport> {
        let file = File::open(path)?;
        Ok(Transport {
            reader: Some(Box::new(BufReader::with_capacity(READ_BUFFER, file))),
            writer: None,
            control: Control::default(),
            description: format!("file:{}", path.display()),
        })
    }

    /// Both directions over a connected UNIX stream socket.
    pub fn unix(stream: UnixStream) -> io::Result<Transport> {
        let description = match stream
            .peer_addr()
            .ok()
            .and_then(|a| a.as_pathname().map(|p| p.display().to_string()))
        {
            Some(p) => format!("unix:{p}"),
            None => "unix socket".to_owned(),
        };
        let reader = stream.try_clone()?;
        let control = stream.try_clone()?;
        Ok(Transport {
            reader: Some(Box::new(BufReader::with_capacity(READ_BUFFER, reader))),
            writer: Some(Box::new(stream)),
            control: Control(Some(Arc::new(control))),
            description,
        })
    }

    /// Both directions over a connected TCP socket (Nagle off: acknowledgements are small
    /// and urgent).
    pub fn tcp(stream: TcpStream) -> io::Result<Transport> {
        stream.set_nodelay(true)?;
        let description = match stream.peer_addr() {
            Ok(a) => format!("tcp:{a}"),
            Err(_) => "tcp socket".to_owned(),
        };
        let reader = stream.try_clone()?;
        let control = stream.try_clone()?;
        Ok(Transport {
            reader: Some(Box::new(BufReader::with_capacity(READ_BUFFER, reader))),
            writer: Some(Box::new(stream)),
            control: Control(Some(Arc::new(control))),
            description,
        })
    }

    /// Any reader and/or writer, e.g. a pipe or a test double. Without a socket behind it,
    /// the engines cannot unblock a stuck read or write from another thread, and timeouts do
    /// not apply.
    pub fn from_io(
        reader: Option<Box<dyn Read + Send>>,
        writer: Option<Box<dyn Write + Send>>,
        description: impl Into<String>,
    ) -> Transport {
        Transport {
            reader,
            writer,
            control: Control::default(),
            description: description.into(),
        }
    }

    /// The source's end for `address`: creates the file, or connects to the socket.
    pub fn connect(address: &Address) -> io::Result<Transport> {
        match address {
            Address::File(path) => Transport::create_file(path),
            Address::Unix(path) => Transport::unix(UnixStream::connect(path)?),
            Address::Tcp { host, port } => {
                Transport::tcp(TcpStream::connect((host.as_str(), *port))?)
            }
        }
    }

    /// Whether this end can read (the stream on a destination, acknowledgements on a source).
    pub fn is_readable(&self) -> bool {
        self.reader.is_some()
    }

    /// Whether this end can write (the stream on a source, acknowledgements on a destination).
    pub fn is_writable(&self) -> bool {
        self.writer.is_some()
    }

    /// What the transport is, for messages (e.g. `tcp:10.0.0.2:4444`, `file:/tmp/x`).
    pub fn description(&self) -> &str {
        &self.description
    }
}

/// What the source engine works with: where its records go, where acknowledgements come
/// from (if anywhere), and the handle that shuts the connection down.
pub(crate) struct SourceEnd {
    pub(crate) sink: Option<Box<dyn FrameSink>>,
    pub(crate) acks: Option<Box<dyn AckSource>>,
    pub(crate) control: Control,
    pub(crate) description: String,
}

/// What the destination engine works with: where its records come from, where its
/// acknowledgements go (if anywhere), and the handle that shuts the connection down.
pub(crate) struct DestinationEnd {
    pub(crate) source: Option<Box<dyn FrameSource>>,
    pub(crate) acks: Option<Box<dyn AckSink>>,
    pub(crate) control: Control,
    pub(crate) description: String,
}

impl Transport {
    /// The source's view: the stream encoded onto the writer, acknowledgements read from
    /// the reader.
    pub(crate) fn into_source_end(self) -> SourceEnd {
        SourceEnd {
            sink: self
                .writer
                .map(|w| Box::new(ByteSink::new(w)) as Box<dyn FrameSink>),
            acks: self
                .reader
                .map(|r| Box::new(ByteAckSource(r)) as Box<dyn AckSource>),
            control: self.control,
            description: self.description,
        }
    }

    /// The destination's view: the stream decoded from the reader within `limits`,
    /// acknowledgements written to the writer.
    pub(crate) fn into_destination_end(self, limits: DecoderLimits) -> DestinationEnd {
        let description = self.description;
        DestinationEnd {
            source: self.reader.map(|r| {
                Box::new(ByteSource::new(r, limits, description.clone())) as Box<dyn FrameSource>
            }),
            acks: self
                .writer
                .map(|w| Box::new(ByteAckSink(w)) as Box<dyn AckSink>),
            control: self.control,
            description,
        }
    }
}

/// A listening socket on the destination: accepts one source connection at a time.
#[derive(Debug)]
pub struct Listener {
    inner: ListenerInner,
}

#[derive(Debug)]
enum ListenerInner {
    Unix(UnixListener, PathBuf),
    Tcp(TcpListener),
}

impl Listener {
    /// Listens on `address` (`unix:PATH` or `tcp:HOST:PORT`; port 0 picks a free port).
    pub fn bind(address: &Address) -> io::Result<Listener> {
        let inner = match address {
            Address::File(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                    "cannot listen on {address}: only unix: and tcp: addresses accept connections"
                ),
                ))
            }
            Address::Unix(path) => ListenerInner::Unix(UnixListener::bind(path)?, path.clone()),
            Address::Tcp { host, port } => {
                ListenerInner::Tcp(TcpListener::bind((host.as_str(), *port))?)
            }
        };
        Ok(Listener { inner })
    }

    /// The address a source connects to (with the actual port for a TCP port 0).
    pub fn local_address(&self) -> io::Result<Address> {
        Ok(match &self.inner {
            ListenerInner::Unix(_, path) => Address::Unix(path.clone()),
            ListenerInner::Tcp(l) => {
                let a = l.local_addr()?;
                Address::Tcp {
                    host: a.ip().to_string(),
                    port: a.port(),
                }
            }
        })
    }

    /// Waits for the next source to connect.
    pub fn accept(&self) -> io::Result<Transport> {
        match &self.inner {
            ListenerInner::Unix(l, _) => Transport::unix(l.accept()?.0),
            ListenerInner::Tcp(l) => Transport::tcp(l.accept()?.0),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenerInner::Unix(_, path) = &self.inner {
            // We created the socket file; leave no stale one behind.
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn socketpair_carries_both_directions() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut src = Transport::unix(a).unwrap();
        let mut dst = Transport::unix(b).unwrap();
        assert!(src.is_readable() && src.is_writable());
        src.writer.as_mut().unwrap().write_all(b"stream").unwrap();
        let mut buf = [0u8; 6];
        dst.reader.as_mut().unwrap().read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"stream");
        dst.writer.as_mut().unwrap().write_all(b"ack").unwrap();
        let mut buf = [0u8; 3];
        src.reader.as_mut().unwrap().read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"ack");
        // Shutting down through the control handle unblocks the peer's reader with EOF.
        src.control.shutdown(Shutdown::Both);
        let mut rest = Vec::new();
        dst.reader.as_mut().unwrap().read_to_end(&mut rest).unwrap();
        assert!(rest.is_empty());
    }

    #[test]
    fn files_are_one_way_and_listeners_refuse_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.mig");
        let mut w = Transport::create_file(&path).unwrap();
        assert!(w.is_writable() && !w.is_readable());
        w.writer.as_mut().unwrap().write_all(b"abc").unwrap();
        w.writer.as_mut().unwrap().flush().unwrap();
        drop(w);
        let mut r = Transport::open_file(&path).unwrap();
        assert!(r.is_readable() && !r.is_writable());
        let mut s = String::new();
        r.reader.as_mut().unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "abc");
        assert_eq!(r.description(), format!("file:{}", path.display()));
        let err = Listener::bind(&Address::File(path)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    }

    #[test]
    fn tcp_and_unix_listeners_accept_connections() {
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = l.local_address().unwrap();
        assert!(matches!(&addr, Address::Tcp { port, .. } if *port != 0));
        let t = std::thread::spawn(move || Transport::connect(&addr).unwrap());
        let mut dst = l.accept().unwrap();
        let mut src = t.join().unwrap();
        src.writer.as_mut().unwrap().write_all(b"x").unwrap();
        let mut b = [0u8; 1];
        dst.reader.as_mut().unwrap().read_exact(&mut b).unwrap();
        assert_eq!(&b, b"x");

        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("l.sock");
        let addr = Address::Unix(sock.clone());
        let l = Listener::bind(&addr).unwrap();
        assert_eq!(l.local_address().unwrap(), addr);
        let t = std::thread::spawn(move || Transport::connect(&addr).unwrap());
        let _dst = l.accept().unwrap();
        let src = t.join().unwrap();
        assert!(src.description().starts_with("unix:"));
        drop(l);
        assert!(!sock.exists(), "the listener removes its socket file");
    }
}
