//! [`ServerSession`]: one client's conversation with the hosted device, sans-IO.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_mig_device::{
    DeviceError, DeviceIdentity, DeviceState, GuestMemory, IovaRange, ReadOutcome,
};
use vfio_mig_uapi::kernel::{FeatureHeader, FeatureOp};
use vfio_mig_uapi::Errno;

use super::client_dma::{ClientDma, Job, JobOp, SessionServices};
use super::dma::DmaTable;
use super::irq::IrqTable;
use super::memory::MappedRegion;
use super::{DeviceHost, ServerConfig, NUM_IRQ_INDICES, NUM_REGIONS};
use crate::codec::{
    Body, Capabilities, Command, DeviceFeature, DeviceInfo, DmaAccess, DmaData, DmaLoggingReport,
    DmaMap, DmaUnmap, FeatureData, Header, IrqInfo, Limits, Message, MessageKind, MigDataReadReply,
    MigDataReadRequest, MigDataWrite, MigrationCapability, RegionAccess, RegionCap, RegionData,
    RegionInfo, RegionInfoReply, RegionInfoRequest, RegionIoFdsReply, RegionIoFdsRequest, Reply,
    Request, Version, WriteMulti, WriteMultiReply, DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_GET,
    FEATURE_HEADER, FEATURE_MIGRATION, FEATURE_MIG_DATA_SIZE, FEATURE_MIG_DEVICE_STATE,
    FEATURE_SET, HEADER_SIZE, IRQ_INFO_EVENTFD, MIG_DATA_PREFIX, REGION_INFO_FLAG_MMAP,
    REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE, VERSION_MAJOR, VERSION_MINOR,
};
use crate::extension::{
    encode_precopy_info, DataBufferRegistration, SharedTransfer, VfioMigCapability,
    EXTENSION_VERSION, FEATURE_DATA_BUFFER, FEATURE_DATA_READ_SHARED, FEATURE_DATA_WRITE_SHARED,
    FEATURE_PRECOPY_INFO, MAX_DATA_BUFFER, PRECOPY_INFO_LEN, SHARED_DATA_LEN,
};

/// A message to send: `head`, then `data`, then `padding` zero bytes, with `fds` attached.
/// A reply to a request, or one of the server's own DMA_READ / DMA_WRITE requests.
///
/// Everything is borrowed from the session's reusable buffers (migration data is read by
/// the device straight into the buffer `data` points at), so it must be sent before the
/// next message is handled.
#[derive(Debug)]
pub struct Response<'s> {
    /// Header and fixed part of the message.
    pub head: &'s [u8],
    /// Bulk data after the head (REGION_READ data, MIG_DATA_READ data, a dirty bitmap,
    /// DMA_WRITE data).
    pub data: &'s [u8],
    /// Zero bytes after the data: a standard client's MIG_DATA_READ reply is padded to the
    /// size asked for, as libvfio-user's client requires.
    pub padding: usize,
    /// File descriptors to pass with the message (a mappable region's fd with its
    /// GET_REGION_INFO reply).
    pub fds: Vec<BorrowedFd<'s>>,
}

impl Response<'_> {
    /// Total bytes of the message.
    pub fn len(&self) -> usize {
        self.head.len() + self.data.len() + self.padding
    }

    /// Whether the reply is empty (never: every reply has a header).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole message in one vector (for tests and logs; the socket path sends the
    /// parts).
    pub fn to_vec(&self) -> Vec<u8> {
        let mut out = [self.head, self.data].concat();
        out.resize(out.len() + self.padding, 0);
        out
    }
}

/// What the client told us in VERSION.
#[derive(Clone, Copy, Debug)]
struct Peer {
    /// The client's `max_data_xfer_size`: bounds MIG_DATA_READ/WRITE sizes and the chunks
    /// of the server's DMA_READ/WRITE.
    max_data_xfer_size: u32,
    /// The client's `max_msg_fds`: how many fds it takes with one message.
    max_msg_fds: u32,
    /// Both sides announced the vfio-mig extension.
    extension: bool,
}

/// A handled request's reply before encoding; data-carrying replies point into the session's
/// `data` buffer.
#[derive(Debug)]
enum Answer {
    /// A reply that borrows nothing.
    Reply(Reply<'static>),
    /// The request's payload, verbatim (DEVICE_FEATURE SET/PROBE, DMA_UNMAP).
    Echo,
    /// REGION_READ: `data[..len]`.
    RegionRead {
        offset: u64,
        region: u32,
        len: usize,
    },
    /// MIG_DATA_READ: `data[..len]` of the `requested` bytes.
    MigDataRead { len: usize, requested: usize },
    /// GET_REGION_INFO, with the fd of region `fd` when the reply carries its mmap areas.
    RegionInfo {
        reply: RegionInfoReply<'static>,
        fd: Option<u32>,
    },
    /// A DEVICE_FEATURE GET whose data is `data[..len]`.
    FeatureGet { flags: u32, len: usize },
    /// DMA_LOGGING_REPORT: the 24-byte header, then the bitmap in `data[..bitmap_len]`.
    LoggingReport {
        flags: u32,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap_len: usize,
    },
}

type Outcome = Result<Answer, DeviceError>;

/// How a handled request's reply is laid out after its head.
#[derive(Clone, Copy, Debug, Default)]
struct Encoded {
    /// Bytes of `data` that follow the head.
    data_len: usize,
    /// Zero bytes after them.
    padding: usize,
    /// The region whose fd goes with the reply.
    fd: Option<u32>,
}

/// The device's DMA job being carried out by messages, one chunk at a time.
#[derive(Debug)]
struct ActiveJob {
    job: Job,
    /// Bytes transferred so far.
    done: usize,
    /// DMA_READ: the bytes received so far.
    read: Vec<u8>,
    /// The request sent and not yet answered.
    in_flight: Option<InFlight>,
}

/// One DMA_READ / DMA_WRITE request of the server, awaiting its reply.
#[derive(Clone, Copy, Debug)]
struct InFlight {
    msg_id: u16,
    addr: u64,
    len: usize,
}

fn err(errno: Errno, message: impl Into<std::borrow::Cow<'static, str>>) -> DeviceError {
    DeviceError::new(errno, message)
}

/// One client's conversation with the hosted device.
///
/// Created when a client connects; [`ServerSession::handle`] answers its messages one by one.
/// Dropping the session (the client went away, cleanly or not) undoes what the client set
/// up: DMA windows are detached from the device and unmapped, DMA logging it started is
/// stopped, IRQ eventfds are closed. The device's migration state and data stream stay in
/// the [`DeviceHost`].
pub struct ServerSession<'h> {
    host: &'h mut DeviceHost,
    config: ServerConfig,
    limits: Limits,
    peer: Option<Peer>,
    dma: DmaTable,
    /// The windows as the device's guest memory, and DMA by message.
    client: Arc<ClientDma>,
    /// Whether `client` is installed as guest memory on the device's DMA handle now.
    published: bool,
    /// The device's DMA by message being carried out.
    active: Option<ActiveJob>,
    /// msg_id of the server's next request.
    next_msg_id: u16,
    /// Shared with the device's host link, which triggers them.
    irqs: Arc<Mutex<IrqTable>>,
    /// Whether this session started DMA logging (and has not stopped it).
    logging_started: bool,
    /// Encoded head of the current reply.
    head: Vec<u8>,
    /// Bulk data of the current reply; grows to the largest transfer asked for, bounded by
    /// the negotiated limits, and is reused.
    data: Vec<u8>,
    /// DMA_LOGGING_REPORT bitmap words.
    bitmap: Vec<u64>,
    /// The client's shared data buffer (extension feature `0xF002`), mapped.
    shared: Option<MappedRegion>,
}

impl std::fmt::Debug for ServerSession<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerSession")
            .field("config", &self.config)
            .field("peer", &self.peer)
            .field("dma", &self.dma)
            .field("logging_started", &self.logging_started)
            .finish_non_exhaustive()
    }
}

impl<'h> ServerSession<'h> {
    /// A session for a newly connected client.
    ///
    /// The session is bound to the calling thread: DMA by message the device starts from this
    /// thread fails at once (it would wait for this thread), so handle messages here.
    pub fn new(host: &'h mut DeviceHost, config: ServerConfig) -> Self {
        let irqs = Arc::new(Mutex::new(IrqTable::new(&host.irqs)));
        let client = Arc::new(ClientDma::new());
        if let Some(link) = &host.link {
            link.attach(Some(Arc::new(SessionServices {
                client: Arc::clone(&client),
                irqs: Arc::clone(&irqs),
                dma: host.device.dma.clone(),
            })));
        }
        ServerSession {
            host,
            limits: config.limits(),
            config,
            peer: None,
            dma: DmaTable::default(),
            client,
            published: false,
            active: None,
            next_msg_id: 1,
            irqs,
            logging_started: false,
            head: Vec::with_capacity(256),
            data: Vec::new(),
            bitmap: Vec::new(),
            shared: None,
        }
    }

    /// The limits incoming messages must satisfy (for the socket layer's framing).
    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Whether VERSION was negotiated.
    pub fn is_negotiated(&self) -> bool {
        self.peer.is_some()
    }

    /// Whether the client announced the vfio-mig extension (and so it is in use).
    pub fn extension_negotiated(&self) -> bool {
        self.peer.is_some_and(|p| p.extension)
    }

    /// Whether vector `vector` of IRQ index `index` has a trigger eventfd (DEVICE_SET_IRQS).
    pub fn irq_eventfd_set(&self, index: u32, vector: u32) -> bool {
        self.irqs().has_trigger(index, vector)
    }

    fn irqs(&self) -> MutexGuard<'_, IrqTable> {
        self.irqs.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Number of DMA windows the client has mapped.
    pub fn dma_windows(&self) -> usize {
        self.dma.len()
    }

    // ---- The server's own requests: the device's DMA by message ----

    /// The fd that becomes readable when the device queued DMA to carry out by message:
    /// poll it beside the socket and call [`ServerSession::next_request`] when it fires.
    pub fn dma_wakeup_fd(&self) -> Option<BorrowedFd<'_>> {
        self.client.wake_fd()
    }

    /// Whether a DMA_READ / DMA_WRITE request of the server awaits the client's reply.
    pub fn awaiting_reply(&self) -> bool {
        self.active.as_ref().is_some_and(|a| a.in_flight.is_some())
    }

    /// The next request to send to the client for the device's DMA by message: a DMA_WRITE
    /// or DMA_READ of at most the client's `max_data_xfer_size`, or `None` when a request
    /// awaits its reply or nothing is queued. Send it, then pass the client's messages to
    /// [`ServerSession::handle`] until the reply came, and call this again.
    pub fn next_request(&mut self) -> Option<Response<'_>> {
        if self.awaiting_reply() {
            return None;
        }
        let chunk = self.dma_chunk();
        loop {
            let active = match self.active.take() {
                Some(a) => a,
                None => {
                    let job = self.client.take_job()?;
                    let read = match job.op {
                        JobOp::Read(len) => Vec::with_capacity(len),
                        JobOp::Write(_) => Vec::new(),
                    };
                    ActiveJob {
                        job,
                        done: 0,
                        read,
                        in_flight: None,
                    }
                }
            };
            // Checked again before every chunk: a window may have gone since the job was
            // queued (or, for a sans-IO caller, between chunks).
            let map = self.client.windows();
            let addr = active.job.iova + active.done as u64;
            let left = active.job.len() - active.done;
            if self.peer.is_none() || !map.covers(addr, left, active.job.is_write()) {
                let message = format!(
                    "DMA of {} bytes at {:#x}: the window was unmapped before {addr:#x} was reached",
                    active.job.len(),
                    active.job.iova
                );
                active.job.finish(Err(err(Errno::EFAULT, message)));
                continue;
            }
            let id = self.next_msg_id;
            self.next_msg_id = self.next_msg_id.wrapping_add(1);
            let len = left.min(chunk);
            self.active = Some(ActiveJob {
                in_flight: Some(InFlight {
                    msg_id: id,
                    addr,
                    len,
                }),
                ..active
            });
            break;
        }
        let active = self.active.as_ref()?;
        let flight = active.in_flight?;
        let chunk = active.done..active.done + flight.len;
        let message = match &active.job.op {
            JobOp::Write(data) => Message::request(
                flight.msg_id,
                Request::DmaWrite(DmaData {
                    addr: flight.addr,
                    data: &data[chunk.clone()],
                }),
            ),
            JobOp::Read(_) => Message::request(
                flight.msg_id,
                Request::DmaRead(DmaAccess {
                    addr: flight.addr,
                    count: flight.len as u64,
                }),
            ),
        };
        self.head.clear();
        let encoded = message
            .encode_head(&mut self.head)
            .map(|bulk| bulk.padding)
            .map_err(|e| err(e.errno(), format!("encoding a DMA request: {e}")));
        match encoded {
            Ok(padding) => {
                let active = self.active.as_ref()?;
                let data = match &active.job.op {
                    JobOp::Write(data) => &data[chunk],
                    JobOp::Read(_) => &[],
                };
                Some(Response {
                    head: &self.head,
                    data,
                    padding,
                    fds: Vec::new(),
                })
            }
            Err(e) => {
                // Cannot happen for chunks within the negotiated limits; fail the job
                // rather than send something malformed.
                if let Some(a) = self.active.take() {
                    a.job.finish(Err(e));
                }
                None
            }
        }
    }

    /// The largest chunk of one DMA_READ / DMA_WRITE: the client's `max_data_xfer_size`
    /// (and never more than ours, which bounds the replies we accept).
    fn dma_chunk(&self) -> usize {
        let limit = self
            .peer()
            .max_data_xfer_size
            .min(self.config.max_data_xfer_size)
            .max(1);
        usize::try_from(limit).unwrap_or(usize::MAX)
    }

    /// A reply from the client: the answer to the request in flight, or ignored.
    fn take_reply(&mut self, header: &Header, payload: &[u8]) {
        let expected = self.active.as_ref().and_then(|a| {
            let cmd = if a.job.is_write() {
                Command::DmaWrite
            } else {
                Command::DmaRead
            };
            a.in_flight.map(|f| (f, cmd))
        });
        let Some((flight, cmd)) =
            expected.filter(|(f, cmd)| f.msg_id == header.msg_id && cmd.raw() == header.cmd)
        else {
            tracing::warn!(
                msg_id = header.msg_id,
                cmd = header.cmd,
                "unexpected reply from the client, ignored"
            );
            return;
        };
        let Some(active) = self.active.as_mut() else {
            return;
        };
        active.in_flight = None;
        let outcome = match Body::decode(header, payload, &self.limits) {
            Ok(Body::Error(e)) => {
                let errno = match e.error {
                    1..=4095 => e.errno(),
                    _ => Errno::EIO,
                };
                Err(err(
                    errno,
                    format!(
                        "the client refused {cmd} of {} bytes at {:#x}",
                        flight.len, flight.addr
                    ),
                ))
            }
            Ok(Body::Reply(Reply::DmaWrite(a)))
                if a.addr == flight.addr && a.count == flight.len as u64 =>
            {
                Ok(())
            }
            Ok(Body::Reply(Reply::DmaRead(d)))
                if d.addr == flight.addr && d.data.len() == flight.len =>
            {
                active.read.extend_from_slice(d.data);
                Ok(())
            }
            Ok(_) => Err(err(
                Errno::EIO,
                format!(
                    "the client's {cmd} reply does not answer {} bytes at {:#x}",
                    flight.len, flight.addr
                ),
            )),
            Err(e) => Err(err(Errno::EIO, format!("malformed {cmd} reply: {e}"))),
        };
        match outcome {
            Ok(()) => {
                active.done += flight.len;
                if active.done == active.job.len() {
                    if let Some(a) = self.active.take() {
                        a.job.finish(Ok(a.read));
                    }
                }
            }
            Err(e) => {
                tracing::debug!("device DMA by message failed: {e}");
                if let Some(a) = self.active.take() {
                    a.job.finish(Err(e));
                }
            }
        }
    }

    /// Fails the DMA job being carried out (its reply, if one comes, is then ignored).
    fn fail_active(&mut self, why: &str) {
        if let Some(a) = self.active.take() {
            let message = format!("DMA of {} bytes at {:#x}: {why}", a.job.len(), a.job.iova);
            a.job.finish(Err(err(Errno::EFAULT, message)));
        }
    }

    /// Handles one whole message (`message` is exactly `msg_size` bytes) with the fds that
    /// came with it, and returns the reply to send: `None` for commands sent with NO_REPLY,
    /// for replies (the answer to the server's own DMA request in flight is taken; any other
    /// is ignored) and for fewer than 16 bytes. Every other message is answered, failures
    /// with an error reply carrying the errno; fds a request has no use for are closed.
    ///
    /// While [`ServerSession::awaiting_reply`], an I/O layer should hold back the client's
    /// commands and pass only replies, handling the commands once the reply came: a command
    /// may wait for the device, which may be waiting for that reply.
    pub fn handle(&mut self, message: &[u8], fds: Vec<OwnedFd>) -> Option<Response<'_>> {
        let header = Header::decode(message).ok()?;
        let payload = message.get(HEADER_SIZE..).unwrap_or(&[]);
        if matches!(header.kind(), Ok(MessageKind::Reply)) {
            self.take_reply(&header, payload);
            return None;
        }
        let outcome = match Body::decode(&header, payload, &self.limits) {
            Ok(Body::Request(request)) => self.dispatch(request, fds),
            Ok(Body::Reply(_) | Body::Error(_)) => {
                tracing::warn!(
                    msg_id = header.msg_id,
                    cmd = header.cmd,
                    "unexpected reply from the client, ignored"
                );
                return None;
            }
            Err(e) => Err(err(e.errno(), e.to_string())),
        };
        if let Err(e) = &outcome {
            tracing::debug!(msg_id = header.msg_id, cmd = header.cmd, errno = %e.errno(), "refused: {e}");
        }
        if header.no_reply() {
            return None;
        }
        Some(self.respond(&header, payload, outcome))
    }

    fn dispatch(&mut self, request: Request<'_>, fds: Vec<OwnedFd>) -> Outcome {
        let takes_fds = match &request {
            Request::DmaMap(_) | Request::SetIrqs(_) => true,
            Request::DeviceFeature(f) => f.index() == FEATURE_DATA_BUFFER,
            _ => false,
        };
        if !takes_fds && !fds.is_empty() {
            return Err(err(
                Errno::EINVAL,
                format!(
                    "{} carries no file descriptors; got {}",
                    request.command(),
                    fds.len()
                ),
            ));
        }
        if self.peer.is_none() && !matches!(request, Request::Version(_)) {
            return Err(err(
                Errno::EINVAL,
                format!("{} before VERSION: negotiate first", request.command()),
            ));
        }
        match request {
            Request::Version(v) => self.version(&v),
            Request::DmaMap(m) => self.dma_map(&m, fds),
            Request::DmaUnmap(u) => self.dma_unmap(&u),
            Request::DeviceGetInfo(i) => device_info(&i),
            Request::GetRegionInfo(r) => self.region_info(&r),
            Request::GetRegionIoFds(r) => self.region_io_fds(&r),
            Request::GetIrqInfo(i) => self.irq_info(&i),
            Request::SetIrqs(s) => self
                .irqs()
                .set(&s, fds)
                .map(|()| Answer::Reply(Reply::SetIrqs)),
            Request::RegionRead(a) => self.region_read(&a),
            Request::RegionWrite(d) => self.region_write(&d),
            Request::DmaRead(_) | Request::DmaWrite(_) => Err(err(
                Errno::EINVAL,
                "DMA_READ and DMA_WRITE go from server to client",
            )),
            Request::DeviceReset => self.reset(),
            Request::RegionWriteMulti(w) => self.write_multi(&w),
            Request::DeviceFeature(f) => self.device_feature(&f, fds),
            Request::MigDataRead(r) => self.mig_data_read(&r),
            Request::MigDataWrite(w) => self.mig_data_write(&w),
        }
    }

    /// Encodes the reply into the session's buffers.
    fn respond(&mut self, request: &Header, payload: &[u8], outcome: Outcome) -> Response<'_> {
        self.head.clear();
        let encoded = match outcome {
            Err(e) => Err(e.errno()),
            Ok(answer) => self.encode(request, payload, answer),
        };
        let encoded = match encoded {
            Ok(e) => e,
            Err(errno) => {
                self.head.clear();
                self.head
                    .extend_from_slice(&Header::error_reply_to(request, errno).to_bytes());
                Encoded::default()
            }
        };
        let fds = encoded
            .fd
            .and_then(|index| self.host.mmap(index))
            .map(|m| m.fd.as_fd())
            .into_iter()
            .collect();
        Response {
            head: &self.head,
            data: &self.data[..encoded.data_len],
            padding: encoded.padding,
            fds,
        }
    }

    /// Writes the head of `answer` into `self.head`; says what follows it.
    fn encode(
        &mut self,
        request: &Header,
        payload: &[u8],
        answer: Answer,
    ) -> Result<Encoded, Errno> {
        let id = request.msg_id;
        let mut fd = None;
        let (message, data_len) = match answer {
            Answer::Reply(reply) => (Message::reply(id, reply), 0),
            Answer::RegionInfo { reply, fd: region } => {
                fd = region;
                (Message::reply(id, Reply::GetRegionInfo(reply)), 0)
            }
            Answer::Echo => {
                let header = Header::reply_to(request, payload.len()).map_err(|e| e.errno())?;
                self.head.extend_from_slice(&header.to_bytes());
                self.head.extend_from_slice(payload);
                return Ok(Encoded::default());
            }
            Answer::RegionRead {
                offset,
                region,
                len,
            } => (
                Message::reply(
                    id,
                    Reply::RegionRead(RegionData {
                        offset,
                        region,
                        data: &self.data[..len],
                    }),
                ),
                len,
            ),
            Answer::MigDataRead { len, requested } => {
                let mut reply = MigDataReadReply::new(&self.data[..len]);
                if !self.peer().extension {
                    reply.padding = u32::try_from(requested.saturating_sub(len)).unwrap_or(0);
                }
                (Message::reply(id, Reply::MigDataRead(reply)), len)
            }
            Answer::FeatureGet { flags, len } => {
                let data = FeatureData::Raw(&self.data[..len]);
                (
                    Message::reply(id, Reply::DeviceFeature(feature_reply(flags, data))),
                    len,
                )
            }
            Answer::LoggingReport {
                flags,
                iova,
                length,
                page_size,
                bitmap_len,
            } => {
                let data = FeatureData::DmaLoggingReport(DmaLoggingReport {
                    iova,
                    length,
                    page_size,
                    bitmap: &self.data[..bitmap_len],
                });
                (
                    Message::reply(id, Reply::DeviceFeature(feature_reply(flags, data))),
                    bitmap_len,
                )
            }
        };
        let bulk = message.encode_head(&mut self.head).map_err(|e| e.errno())?;
        debug_assert_eq!(bulk.data.len(), data_len);
        Ok(Encoded {
            data_len,
            padding: bulk.padding,
            fd,
        })
    }

    fn peer(&self) -> Peer {
        // dispatch() answers every command but VERSION with EINVAL before negotiation.
        self.peer.unwrap_or(Peer {
            max_data_xfer_size: 0,
            max_msg_fds: 0,
            extension: false,
        })
    }

    /// Grows the data buffer to `len` bytes (bounded by the caller against the limits).
    fn data_buf(&mut self, len: usize) -> &mut [u8] {
        if self.data.len() < len {
            self.data.resize(len, 0);
        }
        &mut self.data[..len]
    }

    // ---- VERSION ----

    fn version(&mut self, v: &Version<'_>) -> Outcome {
        if self.peer.is_some() {
            return Err(err(Errno::EINVAL, "VERSION was already negotiated"));
        }
        if v.major != VERSION_MAJOR {
            return Err(err(
                Errno::EINVAL,
                format!("protocol major version {} is not {VERSION_MAJOR}", v.major),
            ));
        }
        let client = v.capabilities();
        let extension = match VfioMigCapability::from_version(v) {
            Ok(Some(ext)) => ext.version >= EXTENSION_VERSION,
            Ok(None) => false,
            Err(e) => {
                tracing::warn!("client's vfio-mig capability ignored: {e}");
                false
            }
        };
        let ours = Capabilities {
            max_msg_fds: Some(self.config.max_msg_fds),
            max_data_xfer_size: Some(self.config.max_data_xfer_size),
            migration: Some(MigrationCapability {
                pgsize: Some(self.config.dirty_page_size),
            }),
            write_multiple: Some(true),
            ..Capabilities::default()
        };
        let minor = v.minor.min(VERSION_MINOR);
        let reply = if extension {
            let identity = self.host.device.migration.identity();
            let ext = match &identity {
                Ok(id) => VfioMigCapability::server(id),
                Err(e) => {
                    tracing::warn!("device identity unavailable, not announced: {e}");
                    VfioMigCapability {
                        identity: None,
                        ..VfioMigCapability::server(&DeviceIdentity::default())
                    }
                }
            };
            let map = ext
                .to_extensions()
                .map_err(|e| err(e.errno(), e.to_string()))?;
            Version::with_extensions(VERSION_MAJOR, minor, &ours, &map)
        } else {
            Version::new(VERSION_MAJOR, minor, &ours)
        }
        .map_err(|e| err(e.errno(), e.to_string()))?;
        self.peer = Some(Peer {
            max_data_xfer_size: client.max_data_xfer_size(),
            max_msg_fds: client.max_msg_fds(),
            extension,
        });
        tracing::info!(
            minor,
            client_max_data_xfer_size = client.max_data_xfer_size(),
            extension,
            "VERSION negotiated"
        );
        Ok(Answer::Reply(Reply::Version(reply)))
    }

    // ---- DMA windows ----

    fn dma_map(&mut self, req: &DmaMap, fds: Vec<OwnedFd>) -> Outcome {
        if fds.len() > 1 {
            return Err(err(
                Errno::EINVAL,
                format!("DMA_MAP takes at most one fd, got {}", fds.len()),
            ));
        }
        let fd = fds.into_iter().next();
        self.dma.map(req, fd, self.config.max_dma_maps)?;
        self.publish();
        Ok(Answer::Reply(Reply::DmaMap))
    }

    fn dma_unmap(&mut self, req: &DmaUnmap) -> Outcome {
        self.dma.unmap(req)?;
        // The old guest map goes with this: no reference to the window survives the reply.
        self.publish();
        Ok(Answer::Echo)
    }

    /// Installs the current windows. The device's guest memory is attached while windows
    /// exist; when the last one goes, DMA by message waiting for it fails first (attaching
    /// waits for DMA in flight, which would otherwise wait for this thread).
    fn publish(&mut self) {
        let map = self.dma.snapshot();
        let empty = map.is_empty();
        self.client.set_windows(map);
        if empty {
            self.client.fail_queued("its window was unmapped");
            self.fail_active("its window was unmapped");
        }
        let Some(dma) = &self.host.device.dma else {
            return;
        };
        if empty && self.published {
            dma.set_memory(None);
            self.published = false;
        } else if !empty && !self.published {
            let memory: Arc<dyn GuestMemory> = self.client.clone();
            dma.set_memory(Some(memory));
            self.published = true;
        }
    }

    // ---- Device, region and IRQ queries ----

    fn region_info(&mut self, req: &RegionInfoRequest) -> Outcome {
        let index = req.info.index;
        if req.info.argsz < RegionInfo::SIZE as u32 {
            return Err(err(
                Errno::EINVAL,
                format!("GET_REGION_INFO argsz {} is below 32", req.info.argsz),
            ));
        }
        if index >= NUM_REGIONS {
            return Err(err(
                Errno::EINVAL,
                format!("region {index}: a PCI device has regions 0..{NUM_REGIONS}"),
            ));
        }
        let mut info = match self.host.region(index) {
            Some(r) => RegionInfo {
                flags: if r.readable { REGION_INFO_FLAG_READ } else { 0 }
                    | if r.writable {
                        REGION_INFO_FLAG_WRITE
                    } else {
                        0
                    },
                index,
                size: r.size,
                ..RegionInfo::default()
            },
            None => RegionInfo {
                index,
                ..RegionInfo::default()
            },
        };
        // A mappable region: its areas as a sparse-mmap capability, with the region's fd
        // beside the reply when the capability fits the client's argsz (as libvfio-user,
        // which sends fds only with the capability). A client that takes no fds gets a
        // region reachable by message only.
        let mut caps = Vec::new();
        if let Some(m) = self
            .host
            .mmap(index)
            .filter(|_| self.peer().max_msg_fds >= 1)
        {
            info.flags |= REGION_INFO_FLAG_MMAP;
            info.offset = m.file_offset;
            caps.push(RegionCap::SparseMmap(
                m.areas
                    .iter()
                    .map(|a| crate::codec::SparseMmapArea {
                        offset: a.offset,
                        size: a.size,
                    })
                    .collect(),
            ));
        }
        let reply = RegionInfoReply::new(info, caps).fit_to(req.info.argsz);
        let fd = (!reply.caps.is_empty()).then_some(index);
        Ok(Answer::RegionInfo { reply, fd })
    }

    fn region_io_fds(&mut self, req: &RegionIoFdsRequest) -> Outcome {
        if req.argsz < RegionIoFdsRequest::SIZE as u32 || req.flags != 0 || req.count != 0 {
            return Err(err(
                Errno::EINVAL,
                "GET_REGION_IO_FDS needs argsz >= 16, flags 0 and count 0",
            ));
        }
        if req.index >= NUM_REGIONS || self.host.region(req.index).is_none() {
            return Err(err(
                Errno::EINVAL,
                format!("GET_REGION_IO_FDS: no region {}", req.index),
            ));
        }
        // No region of ours has ioeventfds: an empty list.
        Ok(Answer::Reply(Reply::GetRegionIoFds(RegionIoFdsReply {
            head: RegionIoFdsRequest {
                argsz: RegionIoFdsRequest::SIZE as u32,
                flags: 0,
                index: req.index,
                count: 0,
            },
            subregions: Vec::new(),
        })))
    }

    fn irq_info(&mut self, req: &IrqInfo) -> Outcome {
        if req.argsz < IrqInfo::SIZE as u32 {
            return Err(err(
                Errno::EINVAL,
                format!("GET_IRQ_INFO argsz {} is below 16", req.argsz),
            ));
        }
        let Some(count) = self.irqs().count(req.index) else {
            return Err(err(
                Errno::EINVAL,
                format!(
                    "IRQ index {}: a PCI device has 0..{NUM_IRQ_INDICES}",
                    req.index
                ),
            ));
        };
        Ok(Answer::Reply(Reply::GetIrqInfo(IrqInfo {
            argsz: IrqInfo::SIZE as u32,
            flags: IRQ_INFO_EVENTFD,
            index: req.index,
            count,
        })))
    }

    // ---- Region access ----

    /// Checks an access of `len` bytes at `offset` of `region`.
    fn check_access(
        &self,
        region: u32,
        offset: u64,
        len: usize,
        write: bool,
    ) -> Result<(), DeviceError> {
        let info = self
            .host
            .region(region)
            .ok_or_else(|| err(Errno::EINVAL, format!("no region {region}")))?;
        let allowed = if write { info.writable } else { info.readable };
        if !allowed {
            return Err(err(
                Errno::EINVAL,
                format!(
                    "region {region} is not {}",
                    if write { "writable" } else { "readable" }
                ),
            ));
        }
        let fits = offset
            .checked_add(len as u64)
            .is_some_and(|end| end <= info.size);
        if !fits {
            return Err(err(
                Errno::EINVAL,
                format!(
                    "{len} bytes at {offset:#x} cross the end of region {region} ({:#x} bytes)",
                    info.size
                ),
            ));
        }
        Ok(())
    }

    fn region_read(&mut self, req: &RegionAccess) -> Outcome {
        let len = req.count as usize;
        self.check_access(req.region, req.offset, len, false)?;
        let regions = std::sync::Arc::clone(&self.host.device.regions);
        regions.region_read(req.region, req.offset, self.data_buf(len))?;
        Ok(Answer::RegionRead {
            offset: req.offset,
            region: req.region,
            len,
        })
    }

    fn region_write(&mut self, req: &RegionData<'_>) -> Outcome {
        self.check_access(req.region, req.offset, req.data.len(), true)?;
        self.host
            .device
            .regions
            .region_write(req.region, req.offset, req.data)?;
        Ok(Answer::Reply(Reply::RegionWrite(RegionAccess {
            offset: req.offset,
            region: req.region,
            count: req.data.len() as u32,
        })))
    }

    fn write_multi(&mut self, req: &WriteMulti) -> Outcome {
        for w in &req.writes {
            self.check_access(w.region, w.offset, w.bytes().len(), true)?;
            self.host
                .device
                .regions
                .region_write(w.region, w.offset, w.bytes())?;
        }
        Ok(Answer::Reply(Reply::RegionWriteMulti(WriteMultiReply {
            count: req.writes.len() as u64,
        })))
    }

    fn reset(&mut self) -> Outcome {
        self.host.device.migration.reset()?;
        self.drop_stream();
        Ok(Answer::Reply(Reply::DeviceReset))
    }

    // ---- DEVICE_FEATURE ----

    /// Validates as the kernel does: the core checks ([`FeatureHeader::parse`]), `ENOTTY` for
    /// a feature this device does not have, then the feature's own checks with vfio-user's
    /// payload sizes (ranges and bitmaps travel inline, so START needs 16 bytes and REPORT 24,
    /// not the kernel's structs with pointers).
    fn device_feature(&mut self, f: &DeviceFeature<'_>, fds: Vec<OwnedFd>) -> Outcome {
        let header = FeatureHeader::parse(f.argsz, f.flags).map_err(|e| {
            err(
                e,
                format!("DEVICE_FEATURE argsz {} flags {:#x}", f.argsz, f.flags),
            )
        })?;
        let index = f.index();
        let logging = self.host.device.dma_logging;
        let (ops, min_payload) = match index {
            FEATURE_MIGRATION => (FEATURE_GET, 8),
            FEATURE_MIG_DEVICE_STATE => (FEATURE_GET | FEATURE_SET, 8),
            FEATURE_MIG_DATA_SIZE => (FEATURE_GET, 8),
            FEATURE_DMA_LOGGING_START if logging => (FEATURE_SET, 16),
            FEATURE_DMA_LOGGING_STOP if logging => (FEATURE_SET, 0),
            FEATURE_DMA_LOGGING_REPORT if logging => (FEATURE_GET, 24),
            FEATURE_PRECOPY_INFO if self.peer().extension && self.host.features.pre_copy() => {
                (FEATURE_GET, PRECOPY_INFO_LEN)
            }
            FEATURE_DATA_BUFFER if self.peer().extension => (FEATURE_SET, SHARED_DATA_LEN),
            FEATURE_DATA_READ_SHARED if self.peer().extension => (FEATURE_GET, SHARED_DATA_LEN),
            FEATURE_DATA_WRITE_SHARED if self.peer().extension => (FEATURE_SET, SHARED_DATA_LEN),
            _ => {
                return Err(err(
                    Errno::ENOTTY,
                    format!("the device has no feature {index:#x}"),
                ))
            }
        };
        let request = header.check(ops, min_payload).map_err(|e| {
            err(
                e,
                format!("DEVICE_FEATURE {index:#x} with flags {:#x}", f.flags),
            )
        })?;
        if !fds.is_empty() && request.op() != FeatureOp::Set {
            return Err(err(
                Errno::EINVAL,
                "only a shared data buffer SET carries a file descriptor",
            ));
        }
        match (index, request.op()) {
            (_, FeatureOp::Probe) => Ok(Answer::Echo),
            (FEATURE_MIGRATION, _) => Ok(Answer::Reply(Reply::DeviceFeature(feature_reply(
                f.flags,
                FeatureData::Migration {
                    flags: self.host.features.bits(),
                },
            )))),
            (FEATURE_MIG_DEVICE_STATE, FeatureOp::Get) => {
                let state = self.host.device.migration.state()?;
                Ok(Answer::Reply(Reply::DeviceFeature(feature_reply(
                    f.flags,
                    FeatureData::MigDeviceState { state, data_fd: -1 },
                ))))
            }
            (FEATURE_MIG_DEVICE_STATE, _) => match f.data {
                FeatureData::MigDeviceState { state, .. } => {
                    self.set_state(state)?;
                    Ok(Answer::Echo)
                }
                _ => Err(err(Errno::EINVAL, "MIG_DEVICE_STATE SET without a state")),
            },
            (FEATURE_MIG_DATA_SIZE, _) => {
                let stop_copy_length = self.host.device.migration.data_size()?;
                Ok(Answer::Reply(Reply::DeviceFeature(feature_reply(
                    f.flags,
                    FeatureData::MigDataSize { stop_copy_length },
                ))))
            }
            (FEATURE_DMA_LOGGING_START, _) => match &f.data {
                FeatureData::DmaLogging(control) => {
                    self.logging_start(control.page_size, &control.ranges)?;
                    Ok(Answer::Echo)
                }
                _ => Err(err(
                    Errno::EINVAL,
                    "DMA_LOGGING_START without its control data",
                )),
            },
            (FEATURE_DMA_LOGGING_STOP, _) => {
                self.host.device.migration.dma_logging_stop()?;
                self.logging_started = false;
                Ok(Answer::Echo)
            }
            (FEATURE_DMA_LOGGING_REPORT, _) => match f.data {
                FeatureData::DmaLoggingReport(report) => self.logging_report(f, &report),
                _ => Err(err(Errno::EINVAL, "DMA_LOGGING_REPORT without its range")),
            },
            (FEATURE_PRECOPY_INFO, _) => self.precopy_info(f.flags),
            (FEATURE_DATA_BUFFER, _) => {
                let reg = decode_raw(f, DataBufferRegistration::decode)?;
                self.register_shared(&reg, fds)?;
                Ok(Answer::Echo)
            }
            (FEATURE_DATA_READ_SHARED, _) => {
                let t = decode_raw(f, SharedTransfer::decode)?;
                self.shared_read(f.flags, &t)
            }
            (FEATURE_DATA_WRITE_SHARED, _) => {
                let t = decode_raw(f, SharedTransfer::decode)?;
                self.shared_write(&t)?;
                Ok(Answer::Echo)
            }
            _ => Err(err(Errno::ENOTTY, format!("feature {index:#x}"))),
        }
    }

    /// MIG_DEVICE_STATE SET; keeps the server's stream slot in step with the session.
    fn set_state(&mut self, target: DeviceState) -> Result<(), DeviceError> {
        let result = self.host.device.migration.set_state(target);
        let now = match &result {
            Ok(_) => Some(target),
            Err(e) => e
                .reached
                .or_else(|| self.host.device.migration.state().ok()),
        };
        match result {
            Ok(opened) => {
                if let Some(stream) = opened {
                    self.host.stream = Some(stream);
                    self.host.deferred_read_error = None;
                    self.host.failed_write = None;
                } else if !in_session(target) {
                    self.drop_stream();
                }
                tracing::debug!(state = %target, "device state set");
                Ok(())
            }
            Err(e) => {
                if !now.is_some_and(in_session) {
                    self.drop_stream();
                }
                Err(err(e.errno(), e.to_string()))
            }
        }
    }

    fn drop_stream(&mut self) {
        self.host.stream = None;
        self.host.deferred_read_error = None;
        self.host.failed_write = None;
    }

    fn logging_start(
        &mut self,
        page_size: u64,
        ranges: &[crate::codec::IovaRange],
    ) -> Result<(), DeviceError> {
        // vfio-user: no ranges means every DMA window mapped now.
        let ranges: Vec<IovaRange> = if ranges.is_empty() {
            let all = self.dma.merged_ranges();
            if all.is_empty() {
                return Err(err(
                    Errno::EINVAL,
                    "DMA_LOGGING_START with no ranges and no DMA windows mapped",
                ));
            }
            all
        } else {
            ranges
                .iter()
                .map(|r| IovaRange {
                    iova: r.iova,
                    length: r.length,
                })
                .collect()
        };
        self.host
            .device
            .migration
            .dma_logging_start(page_size, &ranges)?;
        self.logging_started = true;
        Ok(())
    }

    fn logging_report(&mut self, f: &DeviceFeature<'_>, report: &DmaLoggingReport<'_>) -> Outcome {
        let bitmap_len = report
            .bitmap_len(&self.limits)
            .map_err(|e| err(e.errno(), e.to_string()))?;
        let need = (FEATURE_HEADER + 24 + bitmap_len) as u64;
        if u64::from(f.argsz) < need {
            return Err(err(
                Errno::EINVAL,
                format!(
                    "DMA_LOGGING_REPORT argsz {} is below the {need} bytes of the reply",
                    f.argsz
                ),
            ));
        }
        let words = bitmap_len / 8;
        self.bitmap.clear();
        self.bitmap.resize(words, 0);
        self.host.device.migration.dma_logging_report(
            report.iova,
            report.length,
            report.page_size,
            &mut self.bitmap,
        )?;
        let bitmap = std::mem::take(&mut self.bitmap);
        let out = self.data_buf(bitmap_len);
        for (chunk, word) in out.chunks_exact_mut(8).zip(&bitmap) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        self.bitmap = bitmap;
        Ok(Answer::LoggingReport {
            flags: f.flags,
            iova: report.iova,
            length: report.length,
            page_size: report.page_size,
            bitmap_len,
        })
    }

    fn precopy_info(&mut self, flags: u32) -> Outcome {
        let state = self.host.device.migration.state()?;
        if !state.is_precopy() {
            return Err(err(
                Errno::EINVAL,
                format!("precopy info in {state}: only in pre-copy states"),
            ));
        }
        let stream = self
            .host
            .stream
            .as_mut()
            .ok_or_else(|| err(Errno::EINVAL, "no saving session is open"))?;
        let info = stream.precopy_info()?;
        self.data_buf(PRECOPY_INFO_LEN)
            .copy_from_slice(&encode_precopy_info(&info));
        Ok(Answer::FeatureGet {
            flags,
            len: PRECOPY_INFO_LEN,
        })
    }

    // ---- Migration data ----

    /// The largest MIG_DATA transfer: the client's `max_data_xfer_size`, and never more than
    /// ours (the codec already refused larger ones).
    fn mig_data_limit(&self) -> u32 {
        self.peer()
            .max_data_xfer_size
            .min(self.config.max_data_xfer_size)
    }

    fn mig_data_read(&mut self, req: &MigDataReadRequest) -> Outcome {
        let state = self.host.device.migration.state()?;
        if !state.is_saving() {
            return Err(err(
                Errno::EINVAL,
                format!("MIG_DATA_READ in {state}: only in pre-copy and stop-copy states"),
            ));
        }
        if req.size > self.mig_data_limit() {
            return Err(err(
                Errno::EINVAL,
                format!(
                    "MIG_DATA_READ of {} bytes exceeds max_data_xfer_size {}",
                    req.size,
                    self.mig_data_limit()
                ),
            ));
        }
        if u64::from(req.argsz) < MIG_DATA_PREFIX as u64 + u64::from(req.size) {
            return Err(err(
                Errno::EINVAL,
                format!(
                    "MIG_DATA_READ argsz {} is below 8 + size {}",
                    req.argsz, req.size
                ),
            ));
        }
        let size = req.size as usize;
        let filled = self.read_device(size)?;
        Ok(Answer::MigDataRead {
            len: filled,
            requested: size,
        })
    }

    /// Reads up to `size` bytes of migration data into `data[..size]` (the caller checked
    /// the state and `size` against the limits); returns how many.
    fn read_device(&mut self, size: usize) -> Result<usize, DeviceError> {
        if let Some(e) = self.host.deferred_read_error.take() {
            return Err(e);
        }
        if self.data.len() < size {
            self.data.resize(size, 0);
        }
        let stream = self
            .host
            .stream
            .as_mut()
            .ok_or_else(|| err(Errno::EINVAL, "no saving session is open"))?;
        // Fill the request as far as the device has data now, so that a short reply means
        // "nothing more now" (and 0 bytes in STOP_COPY the end).
        let mut filled = 0;
        while filled < size {
            match stream.read(&mut self.data[filled..size]) {
                Ok(ReadOutcome::Data(n)) => filled += n.min(size - filled),
                Ok(ReadOutcome::NothingNow | ReadOutcome::End) => break,
                Err(e) if filled == 0 => return Err(e),
                Err(e) => {
                    self.host.deferred_read_error = Some(e);
                    break;
                }
            }
        }
        Ok(filled)
    }

    fn mig_data_write(&mut self, req: &MigDataWrite<'_>) -> Outcome {
        let state = self.host.device.migration.state()?;
        if state != DeviceState::Resuming {
            return Err(err(
                Errno::EINVAL,
                format!("MIG_DATA_WRITE in {state}: only in resuming"),
            ));
        }
        let size = req.data.len() as u64;
        if size > u64::from(self.mig_data_limit()) {
            return Err(err(
                Errno::EINVAL,
                format!(
                    "MIG_DATA_WRITE of {size} bytes exceeds max_data_xfer_size {}",
                    self.mig_data_limit()
                ),
            ));
        }
        if u64::from(req.argsz) < MIG_DATA_PREFIX as u64 + size {
            return Err(err(
                Errno::EINVAL,
                format!(
                    "MIG_DATA_WRITE argsz {} is below 8 + size {size}",
                    req.argsz
                ),
            ));
        }
        write_device(self.host, req.data)?;
        Ok(Answer::Reply(Reply::MigDataWrite))
    }

    // ---- The shared data buffer (extension) ----

    /// Maps the client's buffer (replacing an earlier one) or, for size 0 without an fd,
    /// forgets it.
    fn register_shared(
        &mut self,
        reg: &DataBufferRegistration,
        fds: Vec<OwnedFd>,
    ) -> Result<(), DeviceError> {
        let mut fds = fds.into_iter();
        let (fd, extra) = (fds.next(), fds.next());
        if extra.is_some() {
            return Err(err(
                Errno::EINVAL,
                "a shared data buffer comes with exactly one fd",
            ));
        }
        match fd {
            None if reg.size == 0 => {
                self.shared = None;
                tracing::debug!("shared data buffer forgotten");
                Ok(())
            }
            None => Err(err(
                Errno::EINVAL,
                "a shared data buffer of non-zero size needs its fd",
            )),
            Some(_) if reg.size == 0 || reg.size > MAX_DATA_BUFFER => Err(err(
                Errno::EINVAL,
                format!(
                    "shared data buffer of {} bytes: from 1 byte to {MAX_DATA_BUFFER}",
                    reg.size
                ),
            )),
            Some(fd) => {
                let region = MappedRegion::map(fd, reg.file_offset, reg.size, true, true)
                    .map_err(|e| err(e.errno(), e.to_string()))?;
                tracing::debug!(
                    size = reg.size,
                    sealed = region.is_sealed(),
                    "shared data buffer mapped"
                );
                self.shared = Some(region);
                Ok(())
            }
        }
    }

    /// Checks that a buffer is registered and `t` lies inside it, within the transfer limit.
    fn check_shared(&self, t: &SharedTransfer, what: &str) -> Result<(), DeviceError> {
        let region = self.shared.as_ref().ok_or_else(|| {
            err(
                Errno::EINVAL,
                format!("{what}: no shared data buffer is registered"),
            )
        })?;
        if t.size > self.mig_data_limit() {
            return Err(err(
                Errno::EINVAL,
                format!(
                    "{what} of {} bytes exceeds max_data_xfer_size {}",
                    t.size,
                    self.mig_data_limit()
                ),
            ));
        }
        if t.count != 0 {
            return Err(err(Errno::EINVAL, format!("{what}: count must be 0")));
        }
        let inside = t
            .offset
            .checked_add(u64::from(t.size))
            .is_some_and(|end| end <= region.len() as u64);
        if !inside {
            return Err(err(
                Errno::EINVAL,
                format!(
                    "{what}: {} bytes at {:#x} lie outside the {}-byte buffer",
                    t.size,
                    t.offset,
                    region.len()
                ),
            ));
        }
        Ok(())
    }

    /// MIG_DATA_READ into the shared buffer: as many bytes as the device has now, up to
    /// `t.size`, at `t.offset`; the reply's `count` says how many.
    fn shared_read(&mut self, flags: u32, t: &SharedTransfer) -> Outcome {
        const WHAT: &str = "shared MIG_DATA_READ";
        let state = self.host.device.migration.state()?;
        if !state.is_saving() {
            return Err(err(
                Errno::EINVAL,
                format!("{WHAT} in {state}: only in pre-copy and stop-copy states"),
            ));
        }
        self.check_shared(t, WHAT)?;
        let filled = self.read_device(t.size as usize)?;
        if let Some(region) = &self.shared {
            if let Err(errno) = region.write(t.offset, &self.data[..filled]) {
                // The client shrank its file under us: the bytes read are lost with it (a
                // device error deferred by the read still comes with the next one).
                return Err(err(errno, format!("{WHAT}: the shared buffer is gone")));
            }
        }
        let reply = SharedTransfer {
            count: filled as u32,
            ..*t
        };
        self.data_buf(SHARED_DATA_LEN)
            .copy_from_slice(&reply.encode());
        Ok(Answer::FeatureGet {
            flags,
            len: SHARED_DATA_LEN,
        })
    }

    /// MIG_DATA_WRITE from the shared buffer: `t.size` bytes at `t.offset` into the device.
    fn shared_write(&mut self, t: &SharedTransfer) -> Result<(), DeviceError> {
        const WHAT: &str = "shared MIG_DATA_WRITE";
        let state = self.host.device.migration.state()?;
        if state != DeviceState::Resuming {
            return Err(err(
                Errno::EINVAL,
                format!("{WHAT} in {state}: only in resuming"),
            ));
        }
        self.check_shared(t, WHAT)?;
        let size = t.size as usize;
        if self.data.len() < size {
            self.data.resize(size, 0);
        }
        let Some(region) = &self.shared else {
            return Err(err(Errno::EINVAL, "no shared data buffer"));
        };
        // Copied out first: the client may change its buffer at any time, the device must
        // see one consistent chunk.
        region
            .read(t.offset, &mut self.data[..size])
            .map_err(|errno| err(errno, format!("{WHAT}: the shared buffer is gone")))?;
        write_device(self.host, &self.data[..size])
    }
}

/// The data of an extension feature, decoded with `decode`.
fn decode_raw<T>(
    f: &DeviceFeature<'_>,
    decode: fn(&[u8]) -> Result<T, crate::codec::CodecError>,
) -> Result<T, DeviceError> {
    match f.data {
        FeatureData::Raw(bytes) => decode(bytes).map_err(|e| err(e.errno(), e.to_string())),
        _ => Err(err(
            Errno::EINVAL,
            format!("DEVICE_FEATURE {:#x} without its data", f.index()),
        )),
    }
}

/// Passes `data` to the resuming session's device; a failure ends the session's writes
/// (part of the data may be in, so a later write would land at the wrong place).
fn write_device(host: &mut DeviceHost, data: &[u8]) -> Result<(), DeviceError> {
    if let Some(errno) = host.failed_write {
        return Err(err(
            errno,
            "an earlier MIG_DATA_WRITE of this resuming session failed; leave RESUMING or reset",
        ));
    }
    let stream = host
        .stream
        .as_mut()
        .ok_or_else(|| err(Errno::EINVAL, "no resuming session is open"))?;
    if let Err(e) = vfio_mig_device::write_all(stream.as_mut(), data) {
        host.failed_write = Some(e.errno());
        return Err(e);
    }
    Ok(())
}

impl Drop for ServerSession<'_> {
    /// The client is gone: undo what it set up, leave the device's state and stream alone.
    fn drop(&mut self) {
        // First the device's DMA by message: nothing new is accepted and whatever waits
        // fails, so that nothing below waits for a device thread that waits for us.
        if let Some(link) = &self.host.link {
            link.attach(None);
        }
        self.client.close();
        self.fail_active("the client went away");
        if self.logging_started {
            if let Err(e) = self.host.device.migration.dma_logging_stop() {
                tracing::warn!("stopping the departed client's DMA logging failed: {e}");
            }
        }
        self.dma.clear();
        self.client.set_windows(self.dma.snapshot());
        if self.published {
            if let Some(dma) = &self.host.device.dma {
                // Waits for DMA in flight; the windows are unmapped when this returns.
                dma.set_memory(None);
            }
        }
        self.irqs().clear();
    }
}

/// States in which a data session is open.
fn in_session(state: DeviceState) -> bool {
    state.is_saving() || state == DeviceState::Resuming
}

fn device_info(req: &DeviceInfo) -> Outcome {
    if req.argsz < DeviceInfo::SIZE as u32 {
        return Err(err(
            Errno::EINVAL,
            format!("DEVICE_GET_INFO argsz {} is below 16", req.argsz),
        ));
    }
    Ok(Answer::Reply(Reply::DeviceGetInfo(DeviceInfo {
        argsz: DeviceInfo::SIZE as u32,
        flags: DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI,
        num_regions: NUM_REGIONS,
        num_irqs: NUM_IRQ_INDICES,
    })))
}

/// A DEVICE_FEATURE GET reply: the request's flags, `argsz` the reply's own size.
fn feature_reply(flags: u32, data: FeatureData<'_>) -> DeviceFeature<'_> {
    let argsz = u32::try_from(FEATURE_HEADER + data.encoded_len()).unwrap_or(u32::MAX);
    DeviceFeature { argsz, flags, data }
}
