//! [`Server`]: a listening UNIX socket serving one client at a time, one after another.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use rustix::event::{PollFd, PollFlags};
use rustix::pipe::PipeFlags;
use vfio_mig_device::DeviceError;

use super::{DeviceHost, HostedDevice, Response, ServerConfig, ServerSession};
use crate::codec::{Header, MessageKind};
use crate::socket::{Connection, Received, SocketError};

/// Why the server could not start or go on (a failing client only ends that client).
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// The socket could not be bound.
    #[error("cannot listen on {}", path.display())]
    Bind {
        /// The socket path.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The device's capabilities could not be read.
    #[error("the hosted device cannot be queried")]
    Device(#[source] DeviceError),
    /// The stop pipe could not be created.
    #[error("cannot create the stop pipe")]
    Pipe(#[source] io::Error),
    /// Waiting on the socket failed.
    #[error("waiting for the socket failed")]
    Poll(#[source] io::Error),
    /// Accepting a connection failed.
    #[error("accepting a client failed")]
    Accept(#[source] io::Error),
}

/// How [`Server::serve_one`] ended.
#[derive(Debug)]
pub enum Served {
    /// The client went away (or broke the protocol's framing and was dropped).
    ClientLeft {
        /// Messages received from it.
        messages: u64,
        /// Why the connection ended, if not by a clean close at a message boundary.
        error: Option<SocketError>,
    },
    /// [`StopHandle::stop`] was called.
    Stopped,
}

/// Shared between a server and its stop handles.
#[derive(Debug)]
struct Control {
    stopped: AtomicBool,
    wake_rx: OwnedFd,
    wake_tx: OwnedFd,
    /// A second handle on the connection being served, to shut it down on stop.
    active: Mutex<Option<UnixStream>>,
}

impl Control {
    fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }

    fn active(&self) -> std::sync::MutexGuard<'_, Option<UnixStream>> {
        self.active.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Stops a [`Server`] from any thread: `serve_one`/`serve_forever` return
/// [`Served::Stopped`] / `Ok(())` promptly, even while a client is connected or stalled in
/// the middle of a message (its connection is shut down).
#[derive(Clone, Debug)]
pub struct StopHandle {
    control: Arc<Control>,
}

impl StopHandle {
    /// Asks the server to stop. Idempotent.
    pub fn stop(&self) {
        self.control.stopped.store(true, Ordering::SeqCst);
        // The pipe is non-blocking: if it is full the server is already being woken.
        let _ = rustix::io::write(&self.control.wake_tx, &[1]);
        if let Some(stream) = self.control.active().as_ref() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Whether [`StopHandle::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.control.is_stopped()
    }
}

/// A vfio-user server for one device, listening on a UNIX socket path.
///
/// It serves one client at a time; the next one is accepted when the previous one has gone.
/// The device and its migration data stream persist across clients (see [`DeviceHost`]);
/// each client's DMA windows, DMA logging and IRQ eventfds end with it. Dropping the server
/// removes its socket file (if it is still the one it created).
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file bound, so that drop removes only that file.
    file_id: Option<(u64, u64)>,
    host: DeviceHost,
    config: ServerConfig,
    control: Arc<Control>,
}

impl Server {
    /// Listens at `path` (which must not exist) for clients of `device`, with the default
    /// [`ServerConfig`].
    pub fn bind(path: impl AsRef<Path>, device: HostedDevice) -> Result<Server, ServeError> {
        Server::bind_with(path, device, ServerConfig::default())
    }

    /// Listens at `path` (which must not exist) for clients of `device`.
    pub fn bind_with(
        path: impl AsRef<Path>,
        device: HostedDevice,
        config: ServerConfig,
    ) -> Result<Server, ServeError> {
        let path = path.as_ref().to_path_buf();
        let host = DeviceHost::new(device).map_err(ServeError::Device)?;
        let (wake_rx, wake_tx) = rustix::pipe::pipe_with(PipeFlags::CLOEXEC | PipeFlags::NONBLOCK)
            .map_err(|e| ServeError::Pipe(e.into()))?;
        let listener = listen_at(&path).map_err(|source| ServeError::Bind {
            path: path.clone(),
            source,
        })?;
        let file_id = std::fs::symlink_metadata(&path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        tracing::info!(path = %path.display(), "vfio-user server listening");
        Ok(Server {
            listener,
            path,
            file_id,
            host,
            config,
            control: Arc::new(Control {
                stopped: AtomicBool::new(false),
                wake_rx,
                wake_tx,
                active: Mutex::new(None),
            }),
        })
    }

    /// The socket path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The device and its server-side state.
    pub fn host(&self) -> &DeviceHost {
        &self.host
    }

    /// The configuration.
    pub fn config(&self) -> &ServerConfig {
        &self.config
    }

    /// A handle that stops the server from another thread.
    pub fn stop_handle(&self) -> StopHandle {
        StopHandle {
            control: Arc::clone(&self.control),
        }
    }

    /// Serves clients one after another until stopped.
    pub fn serve_forever(&mut self) -> Result<(), ServeError> {
        loop {
            match self.serve_one()? {
                Served::Stopped => return Ok(()),
                Served::ClientLeft { messages, error } => match error {
                    None => tracing::info!(messages, "client left"),
                    Some(e) => tracing::warn!(messages, "client dropped: {}", error_chain(&e)),
                },
            }
        }
    }

    /// Waits for one client and serves it until it goes away (or the server is stopped).
    pub fn serve_one(&mut self) -> Result<Served, ServeError> {
        let stream = loop {
            if self.control.is_stopped() {
                return Ok(Served::Stopped);
            }
            wait_readable(self.listener.as_fd(), self.control.wake_rx.as_fd())
                .map_err(ServeError::Poll)?;
            if self.control.is_stopped() {
                return Ok(Served::Stopped);
            }
            match self.listener.accept() {
                Ok((stream, _)) => break stream,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(ServeError::Accept(e)),
            }
        };
        tracing::info!("client connected");
        // Room for two whole MIG_DATA_READ replies: a reply the client has not taken yet
        // does not hold up the next, so a read-ahead client overlaps this server's work on
        // the next chunk with its own on the last. The kernel caps it at net.core.wmem_max.
        let reply = self.config.limits().max_msg_size as usize;
        if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(&stream, 2 * reply) {
            tracing::debug!(error = %e, "socket send buffer left as it is");
        }
        *self.control.active() = stream.try_clone().ok();
        let served = if self.control.is_stopped() {
            Served::Stopped
        } else {
            self.serve_connection(Connection::new(stream))
        };
        *self.control.active() = None;
        Ok(served)
    }

    /// Serves one connection: the client's messages, and the server's own DMA requests
    /// for the device.
    ///
    /// Without a twin socket both directions share the socket. While a DMA_READ / DMA_WRITE
    /// of the server awaits its reply, the client's commands are held in arrival order
    /// and handled after it (a command may wait for the device, whose DMA waits for that
    /// reply); replies are handled at once. Queued device DMA goes out before held
    /// commands, one request at a time.
    fn serve_connection(&mut self, mut conn: Connection) -> Served {
        let control = Arc::clone(&self.control);
        let mut session = ServerSession::new(&mut self.host, self.config);
        let limits = *session.limits();
        let mut messages = 0u64;
        let mut held: VecDeque<Held> = VecDeque::new();
        loop {
            if !session.awaiting_reply() {
                if let Some(request) = session.next_request() {
                    if let Err(e) = send(&mut conn, &request) {
                        return stopped_or_left(&control, messages, e);
                    }
                    continue;
                }
                match held.pop_front() {
                    Some(Held::Message(bytes, fds)) => {
                        if let Some(response) = session.handle(&bytes, fds) {
                            if let Err(e) = send(&mut conn, &response) {
                                return stopped_or_left(&control, messages, e);
                            }
                        }
                        continue;
                    }
                    Some(Held::Refused(header)) => {
                        let reply = Header::error_reply_to(&header, vfio_mig_uapi::Errno::EINVAL);
                        if let Err(e) = conn.send(&reply.to_bytes(), &[], 0, &[]) {
                            return stopped_or_left(&control, messages, e);
                        }
                        continue;
                    }
                    None => {}
                }
            }
            // The device's DMA wakeup matters only when a new request may go out.
            let dma_fd = session
                .dma_wakeup_fd()
                .filter(|_| !session.awaiting_reply());
            let ready = match wait_ready(conn.stream().as_fd(), control.wake_rx.as_fd(), dma_fd) {
                Ok(ready) => ready,
                Err(e) => return left(messages, Some(SocketError::Io(e))),
            };
            if control.is_stopped() {
                return Served::Stopped;
            }
            if !ready {
                continue;
            }
            let (bytes, fds) = match conn.recv(&limits) {
                Ok(Received { bytes, fds }) => (bytes, fds),
                Err(SocketError::TooManyFds { header, .. }) => {
                    // The message was consumed and its fds closed: refuse it and go on.
                    messages += 1;
                    if header.no_reply() || header.kind().is_ok_and(|k| k == MessageKind::Reply) {
                        continue;
                    }
                    if session.awaiting_reply() || !held.is_empty() {
                        // Answered in its turn, after the commands held before it.
                        held.push_back(Held::Refused(header));
                        continue;
                    }
                    let reply = Header::error_reply_to(&header, vfio_mig_uapi::Errno::EINVAL);
                    match conn.send(&reply.to_bytes(), &[], 0, &[]) {
                        Ok(()) => continue,
                        Err(e) => return left(messages, Some(e)),
                    }
                }
                Err(_) if control.is_stopped() => return Served::Stopped,
                Err(SocketError::Closed) => return left(messages, None),
                Err(e) => return left(messages, Some(e)),
            };
            messages += 1;
            let is_command = Header::decode(bytes)
                .ok()
                .and_then(|h| h.kind().ok())
                .is_some_and(|k| k == MessageKind::Command);
            if is_command && (session.awaiting_reply() || !held.is_empty()) {
                if held.len() >= MAX_HELD_COMMANDS {
                    // A client that keeps sending without reading our request: refuse
                    // rather than hold without bound.
                    let header = Header::decode(bytes).unwrap_or_default();
                    if header.no_reply() {
                        continue;
                    }
                    let reply = Header::error_reply_to(&header, vfio_mig_uapi::Errno::EBUSY);
                    match conn.send(&reply.to_bytes(), &[], 0, &[]) {
                        Ok(()) => continue,
                        Err(e) => return left(messages, Some(e)),
                    }
                }
                held.push_back(Held::Message(bytes.to_vec(), fds));
                continue;
            }
            // The session drops with its borrow of the host when this returns.
            if let Some(response) = session.handle(bytes, fds) {
                if let Err(e) = send(&mut conn, &response) {
                    return stopped_or_left(&control, messages, e);
                }
            }
        }
    }
}

/// Most client commands held while a server request awaits its reply (at most 64 messages
/// of the negotiated size); beyond, commands are refused at once with `EBUSY`.
const MAX_HELD_COMMANDS: usize = 64;

/// A client command held until the server's request in flight is answered.
enum Held {
    /// A whole message and its fds, to handle.
    Message(Vec<u8>, Vec<OwnedFd>),
    /// A message refused for its fds (already consumed and closed): answered `EINVAL`.
    Refused(Header),
}

fn send(conn: &mut Connection, message: &Response<'_>) -> Result<(), SocketError> {
    conn.send(message.head, message.data, message.padding, &message.fds)
}

fn stopped_or_left(control: &Control, messages: u64, e: SocketError) -> Served {
    if control.is_stopped() {
        Served::Stopped
    } else {
        left(messages, Some(e))
    }
}

/// Binds and listens at `path`, which must not exist.
///
/// The socket is bound under a temporary name in the same directory and renamed into place
/// once it listens: a client that polls for the file (libvfio-user's sample client spins on
/// `stat`) never finds a socket that refuses connections. Where that cannot be done (a name
/// too long for a socket address, a file system without `RENAME_NOREPLACE`), the socket is
/// bound at `path` directly.
fn listen_at(path: &Path) -> io::Result<UnixListener> {
    if std::fs::symlink_metadata(path).is_ok() {
        // Let bind report it as it always does (EADDRINUSE).
        return UnixListener::bind(path);
    }
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let temporary =
        name.map(|n| path.with_file_name(format!(".{n}.{}.binding", std::process::id())));
    if let Some(temporary) = temporary {
        let _ = std::fs::remove_file(&temporary);
        if let Ok(listener) = UnixListener::bind(&temporary) {
            let renamed = rustix::fs::renameat_with(
                rustix::fs::CWD,
                &temporary,
                rustix::fs::CWD,
                path,
                rustix::fs::RenameFlags::NOREPLACE,
            );
            match renamed {
                Ok(()) => return Ok(listener),
                Err(e) => {
                    let _ = std::fs::remove_file(&temporary);
                    if e == rustix::io::Errno::EXIST {
                        return Err(io::Error::from(io::ErrorKind::AddrInUse));
                    }
                }
            }
        }
    }
    UnixListener::bind(path)
}

fn left(messages: u64, error: Option<SocketError>) -> Served {
    Served::ClientLeft { messages, error }
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cause = c.source();
    }
    s
}

impl Drop for Server {
    fn drop(&mut self) {
        let same = std::fs::symlink_metadata(&self.path)
            .ok()
            .map(|m| (m.dev(), m.ino()));
        if same.is_some() && same == self.file_id {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// Blocks until the socket, the stop pipe or the device's DMA wakeup is readable (or hung
/// up); returns whether the socket is.
fn wait_ready(
    socket: BorrowedFd<'_>,
    wake: BorrowedFd<'_>,
    dma: Option<BorrowedFd<'_>>,
) -> io::Result<bool> {
    // A fixed array (no allocation per message); without a DMA wakeup the third entry
    // repeats the stop pipe.
    let third = dma.unwrap_or(wake);
    let mut fds = [
        PollFd::new(&socket, PollFlags::IN),
        PollFd::new(&wake, PollFlags::IN),
        PollFd::new(&third, PollFlags::IN),
    ];
    loop {
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => return Ok(!fds[0].revents().is_empty()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Blocks until `fd` or the stop pipe is readable (or hung up).
fn wait_readable(fd: BorrowedFd<'_>, wake: BorrowedFd<'_>) -> io::Result<()> {
    let mut fds = [
        PollFd::new(&fd, PollFlags::IN),
        PollFd::new(&wake, PollFlags::IN),
    ];
    loop {
        match rustix::event::poll(&mut fds, None) {
            Ok(_) => return Ok(()),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}
