//! The socket layer: whole vfio-user messages over a UNIX stream socket, with file
//! descriptors as `SCM_RIGHTS` ancillary data.
//!
//! [`Connection::recv`] reads exactly one message: the 16-byte header first (validated with
//! [`codec::message_len`] against the caller's [`Limits`] *before* anything is allocated), then
//! exactly the rest, however the peer's bytes were split. It never reads past the end of the
//! message, so file descriptors always stay with the message they came with.
//!
//! [`Connection::recv_into`] does the same, except that the bulk data of a data-carrying
//! message (REGION_READ reply, REGION_WRITE, DMA_READ reply, DMA_WRITE, MIG_DATA_READ reply,
//! MIG_DATA_WRITE) goes straight into a buffer the caller provides: the migration data path
//! copies nothing.
//!
//! [`Connection::send`] writes one message with one `sendmsg` of up to three iovecs (head,
//! borrowed data, zero padding), looping on partial writes; fds ride on the first call.
//!
//! After any error other than [`SocketError::TooManyFds`] the byte stream may be out of step
//! with message boundaries: drop the connection.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use rustix::net::{
    recvmsg, sendmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags,
};

use crate::codec::{self, data_prefix_len, CodecError, Header, Limits, Message, HEADER_SIZE};

/// Most file descriptors Linux passes in one `SCM_RIGHTS` message (`SCM_MAX_FD`); the receive
/// control buffer is sized for this many so that an excess is seen and refused, not silently
/// truncated.
pub const SCM_MAX_FDS: usize = 253;

const CMSG_SPACE: usize = rustix::cmsg_space!(ScmRights(SCM_MAX_FDS));

/// Zero bytes sent as padding, a slice of this at a time.
static ZEROS: [u8; 16 * 1024] = [0; 16 * 1024];

/// Why a message could not be received or sent.
#[derive(Debug, thiserror::Error)]
pub enum SocketError {
    /// The socket failed.
    #[error("socket I/O failed")]
    Io(#[source] io::Error),
    /// The peer closed the connection at a message boundary.
    #[error("connection closed by the peer")]
    Closed,
    /// The peer closed the connection in the middle of a message.
    #[error("connection closed in the middle of a message: have {have} of {need} bytes")]
    Truncated {
        /// Bytes of the message received.
        have: usize,
        /// Bytes the message has.
        need: usize,
    },
    /// The header is invalid or the message exceeds the limits; nothing was allocated for it.
    #[error("invalid message framing")]
    Codec(#[source] CodecError),
    /// The message came with more file descriptors than the limits allow. The whole message
    /// was consumed (the connection stays in step) and every fd it carried was closed.
    #[error("message {} (command {}) carried {received} file descriptors, more than the limit {limit}", header.msg_id, header.cmd)]
    TooManyFds {
        /// Header of the refused message, to answer it with an error reply.
        header: Header,
        /// File descriptors received (at least this many: the kernel drops any beyond
        /// [`SCM_MAX_FDS`]).
        received: usize,
        /// The limit.
        limit: u32,
    },
}

impl SocketError {
    /// Whether the peer went away (cleanly or mid-message).
    pub fn is_disconnect(&self) -> bool {
        match self {
            SocketError::Closed | SocketError::Truncated { .. } => true,
            SocketError::Io(e) => matches!(
                e.kind(),
                io::ErrorKind::BrokenPipe
                    | io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
            ),
            _ => false,
        }
    }
}

impl From<CodecError> for SocketError {
    fn from(e: CodecError) -> Self {
        SocketError::Codec(e)
    }
}

/// One whole message received by [`Connection::recv`].
#[derive(Debug)]
pub struct Received<'a> {
    /// The whole message, header included; borrowed from the connection's receive buffer.
    pub bytes: &'a [u8],
    /// File descriptors that came with it, in order.
    pub fds: Vec<OwnedFd>,
}

impl Received<'_> {
    /// The message's header (already validated against the limits).
    pub fn header(&self) -> Header {
        // The receive path only returns messages of at least HEADER_SIZE bytes.
        Header::decode(self.bytes).unwrap_or_default()
    }
}

/// A message received by [`Connection::recv_into`].
#[derive(Debug)]
pub enum Incoming<'a> {
    /// The whole message is in the receive buffer: a message without bulk data, an error
    /// reply, or one whose data did not fit the destination (or disagreed with its length).
    Whole(Received<'a>),
    /// A data-carrying message whose data went into the destination buffer.
    Data {
        /// The header.
        header: Header,
        /// The fixed part between the header and the data (`RegionAccess`, `DmaAccess` or the
        /// `{argsz, size}` of migration data: decode it with that type).
        prefix: &'a [u8],
        /// Bytes of data placed at the start of the destination.
        len: usize,
        /// Bytes after the data in the message: the zero padding of libvfio-user's
        /// MIG_DATA_READ replies; empty for every other well-formed message.
        trailing: &'a [u8],
        /// File descriptors that came with it.
        fds: Vec<OwnedFd>,
    },
}

/// A vfio-user connection over a UNIX stream socket, with a reusable receive buffer.
#[derive(Debug)]
pub struct Connection {
    stream: UnixStream,
    recv_buf: Vec<u8>,
    send_buf: Vec<u8>,
}

impl Connection {
    /// Wraps a connected stream socket (blocking).
    pub fn new(stream: UnixStream) -> Self {
        Connection {
            stream,
            recv_buf: Vec::new(),
            send_buf: Vec::new(),
        }
    }

    /// Connects to a server listening at `path`.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self, SocketError> {
        UnixStream::connect(path)
            .map(Connection::new)
            .map_err(SocketError::Io)
    }

    /// The socket (for timeouts, shutdown, polling).
    pub fn stream(&self) -> &UnixStream {
        &self.stream
    }

    /// The socket, giving up the connection's buffers.
    pub fn into_stream(self) -> UnixStream {
        self.stream
    }

    /// Receives exactly one whole message, checked against `limits` (size before any
    /// allocation, fds after).
    pub fn recv(&mut self, limits: &Limits) -> Result<Received<'_>, SocketError> {
        let mut fds = Fds::default();
        let header = self.recv_header(limits, &mut fds)?;
        let size = header.msg_size as usize;
        read_exact(
            &self.stream,
            &mut self.recv_buf[HEADER_SIZE..size],
            &mut fds,
            HEADER_SIZE,
            size,
        )?;
        check_fds(&header, &fds, limits)?;
        Ok(Received {
            bytes: &self.recv_buf[..size],
            fds: fds.fds,
        })
    }

    /// Receives exactly one whole message like [`Connection::recv`], placing the bulk data of
    /// a data-carrying message at the start of `dest` when it fits there.
    ///
    /// The data length comes from the message's fixed prefix and is checked against the
    /// message size and `limits.max_data_xfer_size` before anything is read into `dest`.
    pub fn recv_into(
        &mut self,
        limits: &Limits,
        dest: &mut [u8],
    ) -> Result<Incoming<'_>, SocketError> {
        let mut fds = Fds::default();
        let header = self.recv_header(limits, &mut fds)?;
        let size = header.msg_size as usize;
        let prefix_len = direct_prefix_len(&header).filter(|&p| HEADER_SIZE + p <= size);
        let Some(prefix_len) = prefix_len else {
            read_exact(
                &self.stream,
                &mut self.recv_buf[HEADER_SIZE..size],
                &mut fds,
                HEADER_SIZE,
                size,
            )?;
            check_fds(&header, &fds, limits)?;
            return Ok(Incoming::Whole(Received {
                bytes: &self.recv_buf[..size],
                fds: fds.fds,
            }));
        };
        let head_end = HEADER_SIZE + prefix_len;
        read_exact(
            &self.stream,
            &mut self.recv_buf[HEADER_SIZE..head_end],
            &mut fds,
            HEADER_SIZE,
            size,
        )?;
        let room = size - head_end;
        let declared = declared_data_len(&header, &self.recv_buf[HEADER_SIZE..head_end]);
        let fits = declared.filter(|&n| {
            n <= room as u64 && n <= u64::from(limits.max_data_xfer_size) && n <= dest.len() as u64
        });
        let Some(len) = fits else {
            // Keep the message whole; the caller's decoder reports what is wrong with it.
            read_exact(
                &self.stream,
                &mut self.recv_buf[head_end..size],
                &mut fds,
                head_end,
                size,
            )?;
            check_fds(&header, &fds, limits)?;
            return Ok(Incoming::Whole(Received {
                bytes: &self.recv_buf[..size],
                fds: fds.fds,
            }));
        };
        let len = len as usize;
        read_exact(&self.stream, &mut dest[..len], &mut fds, head_end, size)?;
        let trailing = room - len;
        read_exact(
            &self.stream,
            &mut self.recv_buf[head_end..head_end + trailing],
            &mut fds,
            head_end + len,
            size,
        )?;
        check_fds(&header, &fds, limits)?;
        Ok(Incoming::Data {
            header,
            prefix: &self.recv_buf[HEADER_SIZE..head_end],
            len,
            trailing: &self.recv_buf[head_end..head_end + trailing],
            fds: fds.fds,
        })
    }

    /// Reads and validates the header into `recv_buf[..16]` and makes room for the message.
    fn recv_header(&mut self, limits: &Limits, fds: &mut Fds) -> Result<Header, SocketError> {
        if self.recv_buf.len() < HEADER_SIZE {
            self.recv_buf.resize(HEADER_SIZE, 0);
        }
        match read_exact(
            &self.stream,
            &mut self.recv_buf[..HEADER_SIZE],
            fds,
            0,
            HEADER_SIZE,
        ) {
            Err(SocketError::Truncated { have: 0, .. }) => return Err(SocketError::Closed),
            other => other?,
        }
        // Validated before the buffer grows: a peer cannot make us allocate past the limit.
        let size = codec::message_len(&self.recv_buf[..HEADER_SIZE], limits)?.ok_or(
            SocketError::Truncated {
                have: 0,
                need: HEADER_SIZE,
            },
        )?;
        let header = Header::decode(&self.recv_buf[..HEADER_SIZE])?;
        if self.recv_buf.len() < size {
            // The length is a high-water mark, so later messages are not zero-filled again.
            self.recv_buf.resize(size, 0);
        }
        Ok(header)
    }

    /// Sends one message: `head`, then `data`, then `padding` zero bytes, with `fds` attached
    /// to the first `sendmsg`. Loops until everything is written.
    pub fn send(
        &mut self,
        head: &[u8],
        data: &[u8],
        padding: usize,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), SocketError> {
        send_parts(&self.stream, head, data, padding, fds)
    }

    /// Encodes `message` (its head into a reusable buffer, its bulk data borrowed) and sends
    /// it with `fds`.
    pub fn send_message(
        &mut self,
        message: &Message<'_>,
        fds: &[BorrowedFd<'_>],
    ) -> Result<(), SocketError> {
        self.send_buf.clear();
        let bulk = message.encode_head(&mut self.send_buf)?;
        send_parts(&self.stream, &self.send_buf, bulk.data, bulk.padding, fds)
    }
}

/// The prefix length of a message whose data may be received directly.
fn direct_prefix_len(header: &Header) -> Option<usize> {
    if header.is_error() {
        return None;
    }
    let cmd = header.command().ok()?;
    let kind = header.kind().ok()?;
    data_prefix_len(cmd, kind)
}

/// The data length a prefix declares (same offsets as the codec's prefix types).
fn declared_data_len(header: &Header, prefix: &[u8]) -> Option<u64> {
    use codec::Command::*;
    let u32_at = |at: usize| -> Option<u64> {
        let b = prefix.get(at..at + 4)?;
        Some(u64::from(u32::from_le_bytes([b[0], b[1], b[2], b[3]])))
    };
    match header.command().ok()? {
        // {u64 offset, u32 region, u32 count}
        RegionRead | RegionWrite => u32_at(12),
        // {u64 addr, u64 count}
        DmaRead | DmaWrite => {
            let b: [u8; 8] = prefix.get(8..16)?.try_into().ok()?;
            Some(u64::from_le_bytes(b))
        }
        // {u32 argsz, u32 size}
        MigDataRead | MigDataWrite => u32_at(4),
        _ => None,
    }
}

fn check_fds(header: &Header, fds: &Fds, limits: &Limits) -> Result<(), SocketError> {
    if fds.truncated || limits.check_fds(fds.fds.len()).is_err() {
        return Err(SocketError::TooManyFds {
            header: *header,
            received: fds.fds.len(),
            limit: limits.max_fds,
        });
    }
    Ok(())
}

/// File descriptors collected while reading one message.
#[derive(Default)]
struct Fds {
    fds: Vec<OwnedFd>,
    /// The kernel dropped fds that did not fit the control buffer.
    truncated: bool,
}

/// Fills `buf` completely with `recvmsg` calls, collecting fds; `have` bytes of the
/// `need`-byte message came before it. End of file before `buf` is full is
/// [`SocketError::Truncated`].
fn read_exact(
    stream: &UnixStream,
    mut buf: &mut [u8],
    fds: &mut Fds,
    mut have: usize,
    need: usize,
) -> Result<(), SocketError> {
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
    while !buf.is_empty() {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(buf)];
        let msg = match recvmsg(
            stream,
            &mut iov,
            &mut control,
            RecvFlags::CMSG_CLOEXEC | RecvFlags::WAITALL,
        ) {
            Ok(m) => m,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(SocketError::Io(e.into())),
        };
        for cmsg in control.drain() {
            if let RecvAncillaryMessage::ScmRights(rights) = cmsg {
                fds.fds.extend(rights);
            }
        }
        if msg.flags.contains(ReturnFlags::CTRUNC) {
            fds.truncated = true;
        }
        if msg.bytes == 0 {
            return Err(SocketError::Truncated { have, need });
        }
        have += msg.bytes;
        buf = &mut buf[msg.bytes..];
    }
    Ok(())
}

/// Sends head, data and padding with fds on the first `sendmsg`; loops on partial writes.
fn send_parts(
    stream: &UnixStream,
    head: &[u8],
    data: &[u8],
    padding: usize,
    fds: &[BorrowedFd<'_>],
) -> Result<(), SocketError> {
    let total = head.len() + data.len() + padding;
    let mut sent = 0usize;
    let mut space = [MaybeUninit::<u8>::uninit(); CMSG_SPACE];
    let mut fds_pending = !fds.is_empty();
    // Every message has at least its 16-byte header, so the fds always ride on real bytes.
    while sent < total {
        let mut iov = [IoSlice::new(&[]), IoSlice::new(&[]), IoSlice::new(&[])];
        let mut n_iov = 0;
        if sent < head.len() {
            iov[n_iov] = IoSlice::new(&head[sent..]);
            n_iov += 1;
        }
        let data_from = sent.saturating_sub(head.len());
        if data_from < data.len() {
            iov[n_iov] = IoSlice::new(&data[data_from..]);
            n_iov += 1;
        }
        let pad_done = sent.saturating_sub(head.len() + data.len());
        let pad_left = padding - pad_done;
        if pad_left > 0 {
            iov[n_iov] = IoSlice::new(&ZEROS[..pad_left.min(ZEROS.len())]);
            n_iov += 1;
        }
        let mut control = SendAncillaryBuffer::new(&mut space);
        if fds_pending && !control.push(SendAncillaryMessage::ScmRights(fds)) {
            return Err(SocketError::Io(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cannot send {} fds in one message", fds.len()),
            )));
        }
        match sendmsg(stream, &iov[..n_iov], &mut control, SendFlags::NOSIGNAL) {
            Ok(0) => return Err(SocketError::Io(io::Error::from(io::ErrorKind::WriteZero))),
            Ok(n) => {
                sent += n;
                fds_pending = false;
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(SocketError::Io(e.into())),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::os::fd::AsFd;
    use std::thread;

    use super::*;
    use crate::codec::{
        Body, Command, MigDataReadReply, MigDataWrite, Reply, Request, DEFAULT_MAX_MSG_SIZE,
    };

    fn pair() -> (Connection, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Connection::new(a), b)
    }

    fn encode(msg: &Message<'_>) -> Vec<u8> {
        let mut v = Vec::new();
        msg.encode(&mut v).unwrap();
        v
    }

    fn mig_write(msg_id: u16, data: &[u8]) -> Vec<u8> {
        encode(&Message::request(
            msg_id,
            Request::MigDataWrite(MigDataWrite::new(data)),
        ))
    }

    #[test]
    fn whole_messages_arrive_from_one_byte_writes() {
        let (mut conn, mut peer) = pair();
        let data: Vec<u8> = (0..3000u32).map(|i| (i * 7) as u8).collect();
        let first = mig_write(1, &data);
        let second = encode(&Message::request(2, Request::DeviceReset));
        let bytes = [first.clone(), second.clone()].concat();
        let writer = thread::spawn(move || {
            for b in bytes {
                peer.write_all(&[b]).unwrap();
                thread::yield_now();
            }
            peer
        });
        let limits = Limits::default();
        let got = conn.recv(&limits).unwrap();
        assert_eq!(got.bytes, &first[..]);
        assert!(got.fds.is_empty());
        let Body::Request(Request::MigDataWrite(w)) =
            Message::decode(got.bytes, &limits).unwrap().body
        else {
            panic!("not a MIG_DATA_WRITE");
        };
        assert_eq!(w.data, &data[..]);
        assert_eq!(conn.recv(&limits).unwrap().bytes, &second[..]);
        drop(writer.join().unwrap());
        assert!(matches!(conn.recv(&limits), Err(SocketError::Closed)));
    }

    #[test]
    fn recv_into_places_data_in_the_callers_buffer_under_fragmentation() {
        let (mut conn, mut peer) = pair();
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        // A libvfio-user style padded reply: 5000 bytes of data sized for 6000 asked.
        let reply = MigDataReadReply {
            padding: 1000,
            ..MigDataReadReply::new(&data)
        };
        let bytes = encode(&Message::reply(9, Reply::MigDataRead(reply)));
        let writer = thread::spawn(move || {
            for chunk in bytes.chunks(3) {
                peer.write_all(chunk).unwrap();
            }
            peer
        });
        let mut dest = vec![0xeeu8; 6000];
        match conn.recv_into(&Limits::default(), &mut dest).unwrap() {
            Incoming::Data {
                header,
                prefix,
                len,
                trailing,
                fds,
            } => {
                assert_eq!((header.msg_id, header.cmd), (9, Command::MigDataRead.raw()));
                assert_eq!(prefix[..4], 5008u32.to_le_bytes());
                assert_eq!(prefix[4..], 5000u32.to_le_bytes());
                assert_eq!(len, 5000);
                assert_eq!(trailing.len(), 1000);
                assert!(trailing.iter().all(|&b| b == 0));
                assert!(fds.is_empty());
            }
            other => panic!("expected direct data, got {other:?}"),
        }
        assert_eq!(&dest[..5000], &data[..]);
        assert!(dest[5000..].iter().all(|&b| b == 0xee));
        drop(writer.join().unwrap());
    }

    #[test]
    fn recv_into_keeps_the_message_whole_when_data_does_not_fit() {
        let (mut conn, mut peer) = pair();
        let data = [7u8; 100];
        let big = mig_write(3, &data);
        let control = encode(&Message::request(4, Request::DeviceReset));
        peer.write_all(&big).unwrap();
        peer.write_all(&control).unwrap();
        let mut small = [0u8; 99];
        match conn.recv_into(&Limits::default(), &mut small).unwrap() {
            Incoming::Whole(r) => assert_eq!(r.bytes, &big[..]),
            other => panic!("{other:?}"),
        }
        assert_eq!(small, [0u8; 99]);
        match conn.recv_into(&Limits::default(), &mut small).unwrap() {
            Incoming::Whole(r) => assert_eq!(r.bytes, &control[..]),
            other => panic!("{other:?}"),
        }
        // A declared size larger than the message stays whole too (the decoder rejects it).
        let mut lying = mig_write(5, &data);
        lying[16 + 4..16 + 8].copy_from_slice(&200u32.to_le_bytes());
        peer.write_all(&lying).unwrap();
        let mut dest = [0u8; 300];
        match conn.recv_into(&Limits::default(), &mut dest).unwrap() {
            Incoming::Whole(r) => assert_eq!(r.bytes, &lying[..]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn fds_travel_with_their_message_and_work_on_the_other_side() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut sender, mut receiver) = (Connection::new(a), Connection::new(b));
        let event = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        let mem = rustix::fs::memfd_create("socket-test", rustix::fs::MemfdFlags::CLOEXEC).unwrap();
        rustix::fs::ftruncate(&mem, 4096).unwrap();
        let irq = encode(&Message::request(1, Request::DeviceReset));
        sender
            .send(&irq, &[], 0, &[event.as_fd(), mem.as_fd()])
            .unwrap();
        // A message without fds right after must not pick any up.
        sender.send(&irq, &[], 0, &[]).unwrap();
        let limits = Limits::default();
        let got = receiver.recv(&limits).unwrap();
        assert_eq!(got.fds.len(), 2);
        let [their_event, their_mem]: [OwnedFd; 2] = got.fds.try_into().unwrap();
        rustix::io::write(&their_event, &5u64.to_ne_bytes()).unwrap();
        let mut count = [0u8; 8];
        rustix::io::read(&event, &mut count).unwrap();
        assert_eq!(u64::from_ne_bytes(count), 5);
        rustix::io::pwrite(&their_mem, b"shared", 100).unwrap();
        let mut back = [0u8; 6];
        rustix::io::pread(&mem, &mut back, 100).unwrap();
        assert_eq!(&back, b"shared");
        assert!(receiver.recv(&limits).unwrap().fds.is_empty());
    }

    #[test]
    fn too_many_fds_are_closed_and_the_stream_stays_in_step() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut sender, mut receiver) = (Connection::new(a), Connection::new(b));
        let e1 = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        let e2 = rustix::event::eventfd(0, rustix::event::EventfdFlags::CLOEXEC).unwrap();
        let msg = encode(&Message::request(7, Request::DeviceReset));
        sender
            .send(&msg, &[], 0, &[e1.as_fd(), e2.as_fd()])
            .unwrap();
        sender.send(&msg, &[], 0, &[e1.as_fd()]).unwrap();
        let one_fd = Limits {
            max_fds: 1,
            ..Limits::default()
        };
        match receiver.recv(&one_fd) {
            Err(SocketError::TooManyFds {
                header,
                received: 2,
                limit: 1,
            }) => assert_eq!(header.msg_id, 7),
            other => panic!("{other:?}"),
        }
        assert_eq!(receiver.recv(&one_fd).unwrap().fds.len(), 1);
    }

    #[test]
    fn closed_at_a_boundary_versus_truncated_inside() {
        let limits = Limits::default();
        let msg = mig_write(1, &[1, 2, 3, 4]);
        // Inside the payload.
        let (mut conn, mut peer) = pair();
        peer.write_all(&msg[..msg.len() - 1]).unwrap();
        drop(peer);
        match conn.recv(&limits) {
            Err(SocketError::Truncated { have, need }) => {
                assert_eq!((have, need), (msg.len() - 1, msg.len()))
            }
            other => panic!("{other:?}"),
        }
        // Inside the header.
        let (mut conn, mut peer) = pair();
        peer.write_all(&msg[..5]).unwrap();
        drop(peer);
        assert!(matches!(
            conn.recv(&limits),
            Err(SocketError::Truncated { have: 5, need: 16 })
        ));
        // Inside the data of a direct read.
        let (mut conn, mut peer) = pair();
        peer.write_all(&msg[..msg.len() - 2]).unwrap();
        drop(peer);
        let mut dest = [0u8; 16];
        let err = conn.recv_into(&limits, &mut dest).unwrap_err();
        assert!(err.is_disconnect());
        assert!(matches!(err, SocketError::Truncated { .. }), "{err:?}");
        // At a boundary.
        let (mut conn, peer) = pair();
        drop(peer);
        assert!(matches!(conn.recv(&limits), Err(SocketError::Closed)));
    }

    #[test]
    fn over_limit_message_is_refused_before_allocating() {
        let (mut conn, mut peer) = pair();
        let mut header = Header::for_command(1, Command::MigDataWrite, 8).unwrap();
        header.msg_size = DEFAULT_MAX_MSG_SIZE + 1;
        peer.write_all(&header.to_bytes()).unwrap();
        let err = conn.recv(&Limits::default()).unwrap_err();
        assert!(
            matches!(err, SocketError::Codec(CodecError::TooLarge { .. })),
            "{err:?}"
        );
        assert!(
            conn.recv_buf.capacity() < 4096,
            "{}",
            conn.recv_buf.capacity()
        );
        // A smaller limit refuses what the default accepts.
        let (mut conn, mut peer) = pair();
        peer.write_all(&mig_write(2, &[0; 2000])).unwrap();
        let tight = Limits {
            max_msg_size: 1024,
            ..Limits::default()
        };
        assert!(matches!(
            conn.recv(&tight),
            Err(SocketError::Codec(CodecError::TooLarge { .. }))
        ));
        assert!(conn.recv_buf.capacity() < 1024);
    }

    #[test]
    fn send_writes_head_data_and_padding_whole_despite_a_slow_reader() {
        let (mut conn, mut peer) = pair();
        // Larger than the socket buffer, so sendmsg writes it in several parts.
        let data: Vec<u8> = (0..3 << 20).map(|i: u32| (i >> 3) as u8).collect();
        let padding = 40_000;
        let header = Header::reply_to(
            &Header::for_command(5, Command::MigDataRead, 8).unwrap(),
            8 + data.len() + padding,
        )
        .unwrap();
        let mut head = header.to_bytes().to_vec();
        head.extend_from_slice(&((8 + data.len()) as u32).to_le_bytes());
        head.extend_from_slice(&(data.len() as u32).to_le_bytes());
        let expected_len = head.len() + data.len() + padding;
        let reader = thread::spawn(move || {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).unwrap();
            all
        });
        conn.send(&head, &data, padding, &[]).unwrap();
        drop(conn);
        let all = reader.join().unwrap();
        assert_eq!(all.len(), expected_len);
        assert_eq!(&all[..head.len()], &head[..]);
        assert_eq!(&all[head.len()..head.len() + data.len()], &data[..]);
        assert!(all[head.len() + data.len()..].iter().all(|&b| b == 0));
    }

    #[test]
    fn send_message_round_trips_through_recv() {
        let (a, b) = UnixStream::pair().unwrap();
        let (mut sender, mut receiver) = (Connection::new(a), Connection::new(b));
        let data = vec![0x5a; 70_000];
        let expected = encode(&Message::request(
            11,
            Request::MigDataWrite(MigDataWrite::new(&data)),
        ));
        let t = thread::spawn(move || {
            let msg = Message::request(11, Request::MigDataWrite(MigDataWrite::new(&data)));
            sender.send_message(&msg, &[]).unwrap();
            sender
        });
        let got = receiver.recv(&Limits::default()).unwrap();
        assert_eq!(got.bytes, &expected[..]);
        drop(t.join().unwrap());
        assert!(matches!(
            receiver.recv(&Limits::default()),
            Err(SocketError::Closed)
        ));
    }

    #[test]
    fn peer_gone_while_sending_is_a_disconnect_not_a_signal() {
        let (mut conn, peer) = pair();
        drop(peer);
        let err = conn.send(&[0; 16], &[], 0, &[]).unwrap_err();
        assert!(err.is_disconnect(), "{err:?}");
    }
}
