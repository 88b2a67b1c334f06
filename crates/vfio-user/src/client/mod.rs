//! A vfio-user client: one connection to any vfio-user server (vfio-mig's or libvfio-user's),
//! with the device operations of the protocol and a [`MigrationDevice`] on top.
//!
//! * [`Client::connect`] opens the socket and negotiates VERSION: it announces its own
//!   limits (`max_msg_fds`, `max_data_xfer_size`) and the `"vfio-mig"` extension object, and
//!   derives the effective limits from the server's reply ([`Negotiated`]).
//! * Every operation is one request and its reply, matched by msg_id and command. An error
//!   reply (with or without payload) becomes [`ClientError::Remote`] with the server's errno.
//!   A server-to-client command (DMA_READ / DMA_WRITE) arriving while a reply is awaited is
//!   answered with an error reply (this client maps all DMA memory with fds) and the wait
//!   goes on, so the stream never loses its place.
//! * [`RemoteDevice`] implements [`MigrationDevice`] over a shared [`Client`];
//!   [`RemoteStream`] carries a data session over MIG_DATA_READ / MIG_DATA_WRITE, reading
//!   straight into the caller's buffer and writing straight from it.
//! * [`DataArena`] is shared memory a client registers with a vfio-mig server
//!   ([`Client::attach_data_arena`]): data streams then move chunks in its buffers without
//!   putting them on the socket, and a client attached to two servers relays a device's
//!   state between them without touching it.
//!
//! `Client` is `Send + Sync`: a mutex serialises request/reply pairs on the one connection.
//! A transport failure (or a reply that does not belong to the request) leaves the byte
//! stream in an unknown place, so the client refuses every later request with
//! [`ClientError::Broken`].
//!
//! [`MigrationDevice`]: vfio_mig_device::MigrationDevice

mod arena;
mod ops;
mod remote;

use std::fmt;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use vfio_mig_device::DeviceError;
use vfio_mig_uapi::Errno;

use crate::codec::{
    Body, Capabilities, CodecError, Command, DeviceFeature, FeatureData, Header, Limits, Message,
    MessageKind, MigDataReadRequest, MigDataWrite, Payload, Reply, Request, Version,
    DEFAULT_MAX_DATA_XFER_SIZE, FEATURE_GET, FEATURE_HEADER, FEATURE_SET, HEADER_SIZE,
    MIG_DATA_PREFIX, VERSION_MAJOR, VERSION_MINOR,
};
use crate::extension::{
    DataBufferRegistration, ExtensionError, SharedTransfer, VfioMigCapability, FEATURE_DATA_BUFFER,
    FEATURE_DATA_READ_SHARED, FEATURE_DATA_WRITE_SHARED, LEGACY_MAX_PAYLOAD, SHARED_DATA_LEN,
};
use crate::socket::{Connection, Incoming, SocketError};

pub use arena::{ArenaBuffer, DataArena};
pub use ops::RegionDescription;
pub use remote::{RemoteDevice, RemoteStream};

/// What the client announces and accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClientOptions {
    /// Largest data transfer the client accepts in one message (announced as
    /// `max_data_xfer_size`; the server sizes its replies and DMA requests by it).
    pub max_data_xfer_size: u32,
    /// Most fds the client accepts with one message (announced as `max_msg_fds`).
    pub max_msg_fds: u32,
    /// Announce the `"vfio-mig"` extension object (a standard server ignores it).
    pub announce_extensions: bool,
    /// Read and write timeout on the socket; `None` waits forever.
    pub timeout: Option<Duration>,
    /// Let migration data streams keep one request outstanding (STOP_COPY read-ahead,
    /// posted MIG_DATA_WRITE) so the server works while the caller does; `false` waits for
    /// every reply before the next request.
    pub pipelining: bool,
}

impl Default for ClientOptions {
    /// 1 MiB transfers, 8 fds, extensions announced, no timeout, pipelining.
    fn default() -> Self {
        ClientOptions {
            max_data_xfer_size: DEFAULT_MAX_DATA_XFER_SIZE,
            max_msg_fds: 8,
            announce_extensions: true,
            timeout: None,
            pipelining: true,
        }
    }
}

/// What VERSION negotiation settled.
#[derive(Clone, Debug, PartialEq)]
pub struct Negotiated {
    /// The protocol version the server agreed to (major, minor).
    pub version: (u16, u16),
    /// The server's capabilities as it sent them.
    pub server: Capabilities,
    /// The server's `"vfio-mig"` object, if both sides announced the extension.
    pub extension: Option<VfioMigCapability>,
    /// What this client accepts from the server (its own announced limits).
    pub incoming: Limits,
    /// Largest data asked for in one REGION_READ or MIG_DATA_READ: the smaller of both
    /// sides' `max_data_xfer_size`.
    pub max_read: u32,
    /// Largest payload of one client-to-server message, if capped: [`LEGACY_MAX_PAYLOAD`]
    /// unless the server announced whole-message reads.
    pub max_payload: Option<u32>,
    /// Largest data of one REGION_WRITE or MIG_DATA_WRITE before the payload cap: the
    /// server's `max_data_xfer_size`.
    pub max_write: u32,
    /// Most fds sent with one message: the server's `max_msg_fds`.
    pub max_fds: u32,
    /// Whether data streams may keep one request outstanding ([`ClientOptions::pipelining`]).
    pub pipelining: bool,
}

impl Negotiated {
    /// Data bytes one write message may carry after a fixed part of `prefix` bytes.
    pub fn write_chunk(&self, prefix: usize) -> usize {
        let by_xfer = self.max_write as usize;
        match self.max_payload {
            Some(cap) => by_xfer.min((cap as usize).saturating_sub(prefix)).max(1),
            None => by_xfer.max(1),
        }
    }

    /// Whether the server takes a shared data buffer (extension features `0xF002`-`0xF004`)
    /// and can be sent its fd.
    pub fn shared_data(&self) -> bool {
        self.max_fds >= 1
            && self
                .extension
                .as_ref()
                .is_some_and(VfioMigCapability::offers_shared_data)
    }

    /// Whether the server answers precopy info (extension feature `0xF001`).
    pub fn precopy_info(&self) -> bool {
        self.extension
            .as_ref()
            .is_some_and(VfioMigCapability::offers_precopy_info)
    }
}

/// Why a client operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The socket failed or the server went away.
    #[error("vfio-user connection failed")]
    Socket(#[source] SocketError),
    /// The server answered the command with an error reply.
    #[error("server refused {}: {errno}", command_name(*command))]
    Remote {
        /// The command (raw number; it may be one this codec does not know).
        command: u16,
        /// The errno of the error reply.
        errno: Errno,
    },
    /// A message could not be encoded, or a reply could not be decoded.
    #[error("bad vfio-user message")]
    Codec(#[source] CodecError),
    /// A reply decoded but does not answer the request the way the protocol says.
    #[error("bad reply to {command}: {reason}")]
    BadReply {
        /// The command answered.
        command: Command,
        /// What is wrong.
        reason: String,
    },
    /// The server sent a reply to a different request: the stream is out of step.
    #[error("expected the reply to message {expected_id} ({expected_cmd}), got message {got_id} command {got_cmd}")]
    UnexpectedReply {
        /// msg_id of the request.
        expected_id: u16,
        /// Command of the request.
        expected_cmd: Command,
        /// msg_id received.
        got_id: u16,
        /// Command number received.
        got_cmd: u16,
    },
    /// VERSION negotiation failed.
    #[error("version negotiation failed: {0}")]
    Negotiation(String),
    /// The server's `"vfio-mig"` object is malformed.
    #[error("bad vfio-mig extension announcement")]
    Extension(#[source] ExtensionError),
    /// An argument is out of the protocol's or the negotiated range.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The server did less than asked (a short region read or write).
    #[error("{command} did {done} of {asked} bytes")]
    Short {
        /// The command.
        command: Command,
        /// Bytes done.
        done: usize,
        /// Bytes asked for.
        asked: usize,
    },
    /// An earlier failure left the connection out of step; reconnect.
    #[error("connection unusable after an earlier failure: {0}")]
    Broken(String),
}

impl ClientError {
    /// The errno this failure maps to: the server's for an error reply, `EINVAL` for a bad
    /// argument, `ECONNRESET` / the OS errno for transport failures, `EPROTO` for protocol
    /// violations.
    pub fn errno(&self) -> Errno {
        match self {
            ClientError::Remote { errno, .. } => *errno,
            ClientError::InvalidArgument(_) => Errno::EINVAL,
            ClientError::Short { .. } => Errno::EIO,
            ClientError::Socket(e) if e.is_disconnect() => Errno::ECONNRESET,
            ClientError::Socket(SocketError::Io(e)) => Errno::from_io(e),
            ClientError::Broken(_) => Errno::ENOTCONN,
            ClientError::Socket(_)
            | ClientError::Codec(_)
            | ClientError::BadReply { .. }
            | ClientError::UnexpectedReply { .. }
            | ClientError::Negotiation(_)
            | ClientError::Extension(_) => Errno::EPROTO,
        }
    }

    /// A [`DeviceError`] with this failure's errno, `context` as its message and this error
    /// as its source.
    pub fn into_device_error(self, context: impl Into<String>) -> DeviceError {
        let context = context.into();
        DeviceError::new(self.errno(), format!("{context}: {self}")).with_source(self)
    }
}

impl From<CodecError> for ClientError {
    fn from(e: CodecError) -> Self {
        ClientError::Codec(e)
    }
}

/// The connection and its msg_id counter, behind the client's mutex.
struct Wire {
    conn: Connection,
    next_id: u16,
    broken: Option<String>,
    ahead: Pipeline,
    /// The shared data buffer registered with the server.
    arena: Option<Arc<DataArena>>,
}

/// Requests sent before their reply is needed, so that the server works while the caller
/// does: a MIG_DATA_READ asked ahead in STOP_COPY, or a MIG_DATA_WRITE whose reply is
/// collected after the next write went out. At most one is outstanding.
#[derive(Default)]
struct Pipeline {
    /// The outstanding request.
    pending: Option<Outstanding>,
    /// What a read-ahead's reply brought when another exchange had to receive it first.
    stash: Option<Stashed>,
    /// Where stashed data lives (reused).
    buf: Vec<u8>,
    /// The errno of a posted write the server refused, not yet reported.
    write_error: Option<Errno>,
}

/// A request whose reply has not been received.
#[derive(Clone, Copy, Debug)]
enum Outstanding {
    /// MIG_DATA_READ: msg_id and size asked for.
    Read(u16, u32),
    /// MIG_DATA_WRITE: msg_id.
    Write(u16),
}

/// A read-ahead reply waiting for the next read.
#[derive(Clone, Copy)]
enum Stashed {
    /// `buf[start..end]`.
    Data { start: usize, end: usize },
    /// The server refused the read.
    Error(Errno),
}

impl Wire {
    fn take_id(&mut self) -> u16 {
        let id = self.next_id;
        self.next_id = self.next_id.wrapping_add(1);
        id
    }

    fn fail(&mut self, err: ClientError) -> ClientError {
        if self.broken.is_none() {
            self.broken = Some(err.to_string());
        }
        err
    }
}

/// A reply handed to an exchange's handler.
enum Answer<'a> {
    /// A decoded successful reply, with the fds that came with it.
    Reply(Reply<'a>, Vec<OwnedFd>),
    /// A data reply whose data went into the destination buffer.
    Direct {
        prefix: &'a [u8],
        len: usize,
        trailing: &'a [u8],
    },
}

/// A connection to a vfio-user server.
pub struct Client {
    wire: Mutex<Wire>,
    negotiated: Negotiated,
    counters: Mutex<DataCounters>,
}

/// Migration data moved over a connection so far, by path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DataCounters {
    /// Bytes carried in MIG_DATA_READ / MIG_DATA_WRITE messages.
    pub by_message: u64,
    /// Bytes moved through the shared data buffer.
    pub shared: u64,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("negotiated", &self.negotiated)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the server at `path` and negotiates with default options.
    pub fn connect(path: impl AsRef<Path>) -> Result<Client, ClientError> {
        Client::connect_with(path, ClientOptions::default())
    }

    /// Connects to the server at `path` and negotiates with `options`.
    pub fn connect_with(
        path: impl AsRef<Path>,
        options: ClientOptions,
    ) -> Result<Client, ClientError> {
        let stream =
            UnixStream::connect(path).map_err(|e| ClientError::Socket(SocketError::Io(e)))?;
        Client::from_stream(stream, options)
    }

    /// Negotiates over an already connected socket.
    pub fn from_stream(stream: UnixStream, options: ClientOptions) -> Result<Client, ClientError> {
        if options.max_data_xfer_size == 0 {
            return Err(ClientError::InvalidArgument(
                "max_data_xfer_size must be at least 1".into(),
            ));
        }
        stream
            .set_read_timeout(options.timeout)
            .and_then(|()| stream.set_write_timeout(options.timeout))
            .map_err(|e| ClientError::Socket(SocketError::Io(e)))?;
        if options.pipelining {
            // Room for a whole posted write beside the one being sent, so the copy into the
            // socket overlaps the server's work on the previous chunk. The kernel caps it at
            // net.core.wmem_max; a smaller buffer only means less overlap.
            let want = 2 * options.max_data_xfer_size.max(DEFAULT_MAX_DATA_XFER_SIZE) as usize;
            if let Err(e) = rustix::net::sockopt::set_socket_send_buffer_size(&stream, want) {
                tracing::debug!(error = %e, "socket send buffer left as it is");
            }
        }
        let mut conn = Connection::new(stream);
        let negotiated = negotiate(&mut conn, &options)?;
        tracing::debug!(?negotiated, "vfio-user version negotiated");
        Ok(Client {
            wire: Mutex::new(Wire {
                conn,
                next_id: 1,
                broken: None,
                ahead: Pipeline::default(),
                arena: None,
            }),
            negotiated,
            counters: Mutex::default(),
        })
    }

    /// What negotiation settled.
    pub fn negotiated(&self) -> &Negotiated {
        &self.negotiated
    }

    /// Migration data moved so far, by path.
    pub fn data_counters(&self) -> DataCounters {
        *self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn count(&self, bytes: usize, shared: bool) {
        let mut c = self.counters.lock().unwrap_or_else(|p| p.into_inner());
        if shared {
            c.shared += bytes as u64;
        } else {
            c.by_message += bytes as u64;
        }
    }

    /// Whether an earlier failure made the connection unusable.
    pub fn is_broken(&self) -> bool {
        self.lock_wire().broken.is_some()
    }

    fn lock_wire(&self) -> MutexGuard<'_, Wire> {
        // A panic while holding the lock cannot leave the Wire half-updated in a way the
        // `broken` flag does not cover: every step that can desync sets it first.
        self.wire.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends `request` with `fds` and waits for its reply; `handle` gets the reply and `dest`
    /// back. When `dest` is given, a reply's bulk data is received straight into it
    /// ([`Answer::Direct`]) if it fits; otherwise the handler copies it from the reply.
    fn exchange<T>(
        &self,
        request: Request<'_>,
        fds: &[BorrowedFd<'_>],
        dest: Option<&mut [u8]>,
        handle: impl FnOnce(Answer<'_>, Option<&mut [u8]>) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let mut wire = self.usable_wire()?;
        self.drain_pipeline(&mut wire)?;
        self.exchange_on(&mut wire, request, fds, dest, handle)
    }

    /// [`Client::exchange`] on a wire already locked, with nothing outstanding.
    fn exchange_on<T>(
        &self,
        wire: &mut Wire,
        request: Request<'_>,
        fds: &[BorrowedFd<'_>],
        dest: Option<&mut [u8]>,
        handle: impl FnOnce(Answer<'_>, Option<&mut [u8]>) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let command = request.command();
        let message = Message::request(wire.take_id(), request);
        send(wire, &message, fds)?;
        let Body::Request(request) = &message.body else {
            unreachable!("Message::request builds a request body");
        };
        self.await_reply(wire, message.msg_id, command, request, dest, handle)
    }

    /// Registers `arena` as the server's shared data buffer, so that data streams move
    /// chunks in [`ArenaBuffer`]s of it through shared memory instead of messages.
    /// `Ok(false)` (nothing sent) when the server does not offer the extension; registering
    /// replaces an earlier arena. Other buffers still go by message.
    pub fn attach_data_arena(&self, arena: &Arc<DataArena>) -> Result<bool, ClientError> {
        if !self.negotiated.shared_data() {
            return Ok(false);
        }
        let reg = DataBufferRegistration {
            file_offset: 0,
            size: arena.len() as u64,
        }
        .encode();
        let request = DeviceFeature::new(FEATURE_SET, FEATURE_DATA_BUFFER, FeatureData::Raw(&reg));
        let mut wire = self.usable_wire()?;
        self.drain_pipeline(&mut wire)?;
        self.exchange_on(
            &mut wire,
            Request::DeviceFeature(request),
            &[arena.fd()],
            None,
            feature_echo,
        )?;
        wire.arena = Some(Arc::clone(arena));
        Ok(true)
    }

    /// Unregisters the shared data buffer, if one is registered; data goes by message again.
    pub fn detach_data_arena(&self) -> Result<(), ClientError> {
        let mut wire = self.usable_wire()?;
        if wire.arena.is_none() {
            return Ok(());
        }
        self.drain_pipeline(&mut wire)?;
        let reg = DataBufferRegistration {
            file_offset: 0,
            size: 0,
        }
        .encode();
        let request = DeviceFeature::new(FEATURE_SET, FEATURE_DATA_BUFFER, FeatureData::Raw(&reg));
        wire.arena = None;
        self.exchange_on(
            &mut wire,
            Request::DeviceFeature(request),
            &[],
            None,
            feature_echo,
        )
    }

    /// The arena registered with the server, if any.
    pub fn data_arena(&self) -> Option<Arc<DataArena>> {
        self.lock_wire().arena.clone()
    }

    /// One shared-buffer transfer (`index`: read or write) of `size` bytes at `offset` of
    /// the arena; returns the reply's count for a read.
    fn shared_transfer(
        &self,
        wire: &mut Wire,
        index: u16,
        offset: u64,
        size: u32,
    ) -> Result<usize, ClientError> {
        let ask = SharedTransfer {
            offset,
            size,
            count: 0,
        };
        let bytes = ask.encode();
        let read = index == FEATURE_DATA_READ_SHARED;
        let ops = if read { FEATURE_GET } else { FEATURE_SET };
        let request = DeviceFeature::new(ops, index, FeatureData::Raw(&bytes));
        debug_assert_eq!(request.argsz as usize, FEATURE_HEADER + SHARED_DATA_LEN);
        self.exchange_on(
            wire,
            Request::DeviceFeature(request),
            &[],
            None,
            |answer, _| {
                let Answer::Reply(Reply::DeviceFeature(reply), _) = answer else {
                    return Err(bad_reply(
                        Command::DeviceFeature,
                        "not a DEVICE_FEATURE reply",
                    ));
                };
                let FeatureData::Raw(data) = reply.data else {
                    return Err(bad_reply(
                        Command::DeviceFeature,
                        "shared data transfer reply without its data",
                    ));
                };
                let got = SharedTransfer::decode(data)?;
                if got.offset != offset || got.size != size {
                    return Err(bad_reply(
                        Command::DeviceFeature,
                        "shared data transfer reply names another range",
                    ));
                }
                if !read {
                    return Ok(size as usize);
                }
                if got.count > size {
                    return Err(bad_reply(
                        Command::DeviceFeature,
                        format!("shared read placed {} bytes of {size} asked", got.count),
                    ));
                }
                Ok(got.count as usize)
            },
        )
    }

    /// The wire, unless an earlier failure broke it.
    fn usable_wire(&self) -> Result<MutexGuard<'_, Wire>, ClientError> {
        let wire = self.lock_wire();
        match &wire.broken {
            Some(why) => Err(ClientError::Broken(why.clone())),
            None => Ok(wire),
        }
    }

    /// Waits for the reply to message `id` (`command`, sent as `request`), refusing any
    /// server command that comes first.
    fn await_reply<T>(
        &self,
        wire: &mut Wire,
        id: u16,
        command: Command,
        request: &Request<'_>,
        mut dest: Option<&mut [u8]>,
        handle: impl FnOnce(Answer<'_>, Option<&mut [u8]>) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        let limits = self.negotiated.incoming;
        loop {
            let received = match dest.as_deref_mut() {
                Some(d) => wire.conn.recv_into(&limits, d),
                None => wire.conn.recv(&limits).map(Incoming::Whole),
            };
            let incoming = match received {
                Ok(i) => i,
                Err(SocketError::TooManyFds { header, .. })
                    if header.kind().ok() == Some(MessageKind::Command) =>
                {
                    // Consumed whole; refuse it and keep waiting for our reply.
                    let reply = Message::error_reply(&header, Errno::EINVAL);
                    if let Err(e) = wire.conn.send_message(&reply, &[]) {
                        return Err(wire.fail(ClientError::Socket(e)));
                    }
                    continue;
                }
                Err(e @ SocketError::TooManyFds { header, .. })
                    if header.msg_id == id && header.cmd == command.raw() =>
                {
                    return Err(ClientError::Socket(e));
                }
                Err(e) => return Err(wire.fail(ClientError::Socket(e))),
            };
            let header = match &incoming {
                Incoming::Whole(r) => r.header(),
                Incoming::Data { header, .. } => *header,
            };
            if header.kind().ok() == Some(MessageKind::Command) {
                let no_reply = header.no_reply();
                drop(incoming);
                refuse_server_command(wire, &header, no_reply)?;
                continue;
            }
            if header.msg_id != id || header.cmd != command.raw() {
                return Err(wire.fail(ClientError::UnexpectedReply {
                    expected_id: id,
                    expected_cmd: command,
                    got_id: header.msg_id,
                    got_cmd: header.cmd,
                }));
            }
            if header.is_error() {
                return Err(ClientError::Remote {
                    command: header.cmd,
                    errno: header.errno(),
                });
            }
            let answer = match incoming {
                Incoming::Whole(r) => {
                    let payload = &r.bytes[HEADER_SIZE..];
                    let reply = Reply::decode(command, payload, &limits)?;
                    reply.check_answers(request)?;
                    Answer::Reply(reply, r.fds)
                }
                Incoming::Data {
                    prefix,
                    len,
                    trailing,
                    ..
                } => Answer::Direct {
                    prefix,
                    len,
                    trailing,
                },
            };
            return handle(answer, dest);
        }
    }

    /// Receives the reply of the outstanding request, if any: a read-ahead's into the stash
    /// (where the next read finds it), a posted write's refusal into `write_error` (which the
    /// next write or state change reports).
    fn drain_pipeline(&self, wire: &mut Wire) -> Result<(), ClientError> {
        match wire.ahead.pending.take() {
            None => return Ok(()),
            Some(Outstanding::Write(id)) => {
                if let Err(e) = self.await_write(wire, id) {
                    wire.ahead.write_error = Some(e.errno());
                }
            }
            Some(Outstanding::Read(id, size)) => {
                let mut buf = std::mem::take(&mut wire.ahead.buf);
                if buf.len() < size as usize {
                    // At most the negotiated read size: bounded by our own limits.
                    buf.resize(size as usize, 0);
                }
                let got = self.await_read(wire, id, size, &mut buf[..size as usize]);
                wire.ahead.buf = buf;
                wire.ahead.stash = Some(match got {
                    Ok(n) => Stashed::Data { start: 0, end: n },
                    Err(e) => Stashed::Error(e.errno()),
                });
            }
        }
        match &wire.broken {
            Some(why) => Err(ClientError::Broken(why.clone())),
            None => Ok(()),
        }
    }

    /// Waits for the reply to MIG_DATA_READ `id` of `size` bytes, its data into `dest`.
    fn await_read(
        &self,
        wire: &mut Wire,
        id: u16,
        size: u32,
        dest: &mut [u8],
    ) -> Result<usize, ClientError> {
        let request = Request::MigDataRead(MigDataReadRequest::new(size));
        let limits = self.negotiated.incoming;
        self.await_reply(
            wire,
            id,
            Command::MigDataRead,
            &request,
            Some(dest),
            |answer, dest| {
                ops::check_mig_data_read(size, &limits, answer, dest.unwrap_or_default())
            },
        )
    }

    /// Waits for the (header-only) reply to MIG_DATA_WRITE `id`.
    fn await_write(&self, wire: &mut Wire, id: u16) -> Result<(), ClientError> {
        let request = Request::MigDataWrite(MigDataWrite::new(&[]));
        self.await_reply(
            wire,
            id,
            Command::MigDataWrite,
            &request,
            None,
            |answer, _| match answer {
                Answer::Reply(Reply::MigDataWrite, _) => Ok(()),
                _ => Err(bad_reply(
                    Command::MigDataWrite,
                    "not a MIG_DATA_WRITE reply",
                )),
            },
        )
    }

    /// One MIG_DATA_WRITE of the first bytes of `data` (as many as one message may carry),
    /// sent straight from `data`; returns how many were sent. With `posted`, the reply is
    /// collected only after the next write went out (or before any other exchange): a
    /// refusal is then reported by that next write, or by [`Client::flush_writes`].
    fn write_mig_data(&self, data: &[u8], posted: bool) -> Result<usize, ClientError> {
        let mut wire = self.usable_wire()?;
        if let Some(errno) = wire.ahead.write_error.take() {
            return Err(ClientError::Remote {
                command: Command::MigDataWrite.raw(),
                errno,
            });
        }
        if matches!(wire.ahead.pending, Some(Outstanding::Read(..))) {
            self.drain_pipeline(&mut wire)?;
        }
        // A shared transfer carries no data in the message: the only limit is the server's
        // bounce buffer, sized by both sides' max_data_xfer_size (`max_read`).
        let shared_n = data.len().min(self.negotiated.max_read as usize);
        let shared = wire
            .arena
            .as_ref()
            .and_then(|a| a.offset_of(&data[..shared_n]));
        if let Some(offset) = shared {
            // Never posted: the caller may reuse the buffer as soon as this returns, and the
            // server reads it only while handling the request.
            if let Some(Outstanding::Write(previous)) = wire.ahead.pending.take() {
                self.await_write(&mut wire, previous)?;
            }
            let n = self.shared_transfer(
                &mut wire,
                FEATURE_DATA_WRITE_SHARED,
                offset,
                shared_n as u32,
            )?;
            self.count(n, true);
            return Ok(n);
        }
        let n = data.len().min(self.negotiated.write_chunk(MIG_DATA_PREFIX));
        let id = wire.take_id();
        let message = Message::request(id, Request::MigDataWrite(MigDataWrite::new(&data[..n])));
        send(&mut wire, &message, &[])?;
        if let Some(Outstanding::Write(previous)) = wire.ahead.pending.take() {
            if let Err(e) = self.await_write(&mut wire, previous) {
                // Collect this one too: nothing stays outstanding after a refusal.
                if wire.broken.is_none() {
                    let _ = self.await_write(&mut wire, id);
                }
                return Err(e);
            }
        }
        if posted {
            wire.ahead.pending = Some(Outstanding::Write(id));
        } else {
            self.await_write(&mut wire, id)?;
        }
        self.count(n, false);
        Ok(n)
    }

    /// Collects an outstanding posted write and reports a refused one not reported yet.
    pub fn flush_writes(&self) -> Result<(), ClientError> {
        let mut wire = self.usable_wire()?;
        self.drain_pipeline(&mut wire)?;
        match wire.ahead.write_error.take() {
            Some(errno) => Err(ClientError::Remote {
                command: Command::MigDataWrite.raw(),
                errno,
            }),
            None => Ok(()),
        }
    }

    /// One MIG_DATA_READ into `buf` (a stashed or outstanding read-ahead first); with
    /// `ahead`, a full reply is followed at once by the next request of the same size, so
    /// the server produces the next chunk while this one is consumed.
    fn read_mig_data(&self, buf: &mut [u8], ahead: bool) -> Result<usize, ClientError> {
        let mut wire = self.usable_wire()?;
        loop {
            if let Some(stashed) = wire.ahead.stash.take() {
                return match stashed {
                    Stashed::Data { start, end } => {
                        let n = (end - start).min(buf.len());
                        buf[..n].copy_from_slice(&wire.ahead.buf[start..start + n]);
                        if start + n < end {
                            wire.ahead.stash = Some(Stashed::Data {
                                start: start + n,
                                end,
                            });
                        }
                        self.count(n, false);
                        Ok(n)
                    }
                    Stashed::Error(errno) => Err(ClientError::Remote {
                        command: Command::MigDataRead.raw(),
                        errno,
                    }),
                };
            }
            match wire.ahead.pending {
                Some(Outstanding::Read(_, size)) if size as usize <= buf.len() => break,
                // Sent for a larger buffer than this one: take it through the stash. A
                // posted write is collected first (its refusal waits for the next write).
                Some(_) => self.drain_pipeline(&mut wire)?,
                None => break,
            }
        }
        let (id, size) = match wire.ahead.pending.take() {
            Some(Outstanding::Read(id, size)) => (id, size),
            _ => {
                let size = buf.len().min(self.negotiated.max_read as usize) as u32;
                let shared = wire
                    .arena
                    .as_ref()
                    .and_then(|a| a.offset_of(&buf[..size as usize]));
                if let Some(offset) = shared {
                    // The server writes the bytes into `buf` itself; no read-ahead (the next
                    // buffer is not known yet).
                    let n =
                        self.shared_transfer(&mut wire, FEATURE_DATA_READ_SHARED, offset, size)?;
                    self.count(n, true);
                    return Ok(n);
                }
                let id = wire.take_id();
                let message =
                    Message::request(id, Request::MigDataRead(MigDataReadRequest::new(size)));
                send(&mut wire, &message, &[])?;
                (id, size)
            }
        };
        let n = self.await_read(&mut wire, id, size, buf)?;
        if ahead && n == size as usize && size > 0 {
            let next = wire.take_id();
            let message =
                Message::request(next, Request::MigDataRead(MigDataReadRequest::new(size)));
            // A failure here breaks the wire; the bytes just read are still good.
            if send(&mut wire, &message, &[]).is_ok() {
                wire.ahead.pending = Some(Outstanding::Read(next, size));
            }
        }
        self.count(n, false);
        Ok(n)
    }

    /// Forgets what the pipeline holds for a session that ended: read-ahead data, a
    /// posted write's refusal.
    fn discard_pipeline(&self) {
        let mut wire = self.lock_wire();
        if wire.broken.is_none() {
            // An error here has broken the wire already; nothing more to undo.
            let _ = self.drain_pipeline(&mut wire);
        }
        wire.ahead.pending = None;
        wire.ahead.stash = None;
        wire.ahead.write_error = None;
    }
}

/// The handler of a DEVICE_FEATURE SET whose reply echoes the request.
fn feature_echo(answer: Answer<'_>, _: Option<&mut [u8]>) -> Result<(), ClientError> {
    match answer {
        Answer::Reply(Reply::DeviceFeature(_), _) => Ok(()),
        _ => Err(bad_reply(
            Command::DeviceFeature,
            "not a DEVICE_FEATURE reply",
        )),
    }
}

/// Sends one message; a transport failure breaks the wire.
fn send(wire: &mut Wire, message: &Message<'_>, fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
    wire.conn.send_message(message, fds).map_err(|e| match e {
        // Encoding failed before anything was written: the stream is still in step.
        SocketError::Codec(c) => ClientError::Codec(c),
        e => wire.fail(ClientError::Socket(e)),
    })
}

impl Drop for Client {
    /// Collects an outstanding read-ahead or posted write so the server is not left
    /// writing to a closed socket; waits at most a second for it.
    fn drop(&mut self) {
        let wire = self.wire.get_mut().unwrap_or_else(|p| p.into_inner());
        if wire.ahead.pending.is_some() && wire.broken.is_none() {
            let _ = wire
                .conn
                .stream()
                .set_read_timeout(Some(Duration::from_secs(1)));
            let mut wire = self.lock_wire();
            // Errors here only mean the server went first.
            let _ = self.drain_pipeline(&mut wire);
        }
    }
}

/// Answers a server-to-client command this client does not serve.
fn refuse_server_command(
    wire: &mut Wire,
    header: &Header,
    no_reply: bool,
) -> Result<(), ClientError> {
    let command = header.command();
    tracing::warn!(
        msg_id = header.msg_id,
        cmd = header.cmd,
        "server sent a command the client does not serve; refusing it"
    );
    if no_reply {
        return Ok(());
    }
    // DMA by message is not offered: every window this client maps comes with an fd.
    let errno = match command {
        Ok(Command::DmaRead | Command::DmaWrite) => Errno::EOPNOTSUPP,
        _ => Errno::EINVAL,
    };
    let reply = Message::error_reply(header, errno);
    wire.conn
        .send_message(&reply, &[])
        .map_err(|e| wire.fail(ClientError::Socket(e)))
}

/// VERSION exchange: announce, check the answer, settle the limits.
fn negotiate(conn: &mut Connection, options: &ClientOptions) -> Result<Negotiated, ClientError> {
    let ours = Capabilities {
        max_msg_fds: Some(options.max_msg_fds),
        max_data_xfer_size: Some(options.max_data_xfer_size),
        ..Capabilities::default()
    };
    let version = if options.announce_extensions {
        let ext = VfioMigCapability::client().to_extensions()?;
        Version::with_extensions(VERSION_MAJOR, VERSION_MINOR, &ours, &ext)?
    } else {
        Version::new(VERSION_MAJOR, VERSION_MINOR, &ours)?
    };
    let request = Request::Version(version);
    let message = Message::request(0, request);
    conn.send_message(&message, &[])
        .map_err(ClientError::Socket)?;
    let mut incoming = Limits::for_data_xfer_size(options.max_data_xfer_size);
    incoming.max_fds = options.max_msg_fds;
    let received = conn.recv(&incoming).map_err(ClientError::Socket)?;
    let header = received.header();
    if header.kind().ok() != Some(MessageKind::Reply)
        || header.msg_id != 0
        || header.cmd != Command::Version.raw()
    {
        return Err(ClientError::Negotiation(format!(
            "expected the VERSION reply, got message {} command {} flags {:#x}",
            header.msg_id, header.cmd, header.flags
        )));
    }
    if header.is_error() {
        return Err(ClientError::Remote {
            command: header.cmd,
            errno: header.errno(),
        });
    }
    let reply = Version::decode(&received.bytes[HEADER_SIZE..], &incoming)?;
    if reply.major != VERSION_MAJOR || reply.minor > VERSION_MINOR {
        return Err(ClientError::Negotiation(format!(
            "server answered version {}.{}, this client speaks {VERSION_MAJOR}.{VERSION_MINOR}",
            reply.major, reply.minor
        )));
    }
    let extension = if options.announce_extensions {
        VfioMigCapability::from_version(&reply).map_err(ClientError::Extension)?
    } else {
        None
    };
    let server = reply.capabilities().clone();
    if server.max_data_xfer_size() == 0 {
        return Err(ClientError::Negotiation(
            "server announced max_data_xfer_size 0".into(),
        ));
    }
    let whole = extension
        .as_ref()
        .is_some_and(VfioMigCapability::offers_whole_messages);
    Ok(Negotiated {
        version: (reply.major, reply.minor),
        max_read: options.max_data_xfer_size.min(server.max_data_xfer_size()),
        max_payload: (!whole).then_some(LEGACY_MAX_PAYLOAD),
        max_write: server.max_data_xfer_size(),
        max_fds: server.max_msg_fds(),
        pipelining: options.pipelining,
        server,
        extension,
        incoming,
    })
}

/// A command's protocol name, or its number when unknown.
fn command_name(raw: u16) -> String {
    Command::try_from(raw).map_or_else(|_| format!("command {raw}"), |c| c.name().to_owned())
}

/// A [`ClientError::BadReply`].
fn bad_reply(command: Command, reason: impl Into<String>) -> ClientError {
    ClientError::BadReply {
        command,
        reason: reason.into(),
    }
}
