//! The in-process link between a source and a destination engine in one process: the
//! records themselves, with their payload buffers, move from one engine to the other by
//! ownership through a bounded queue, and acknowledgements come back through another.
//!
//! Nothing is encoded, copied, checksummed or sent through the kernel: the bytes a device
//! reader put into a pooled buffer are the bytes the destination's device writer takes out
//! of it, and the buffer then goes back to the reader's pool. The source still runs the
//! stream [`Encoder`] on every record for its checks and totals (sequence, phase order,
//! chunk limit, DEVICE_END totals), so the stream the destination sees is exactly the one a
//! socket would have carried, minus the checksums.
//!
//! The link behaves like a socket pair where the engines can tell: a closed (shut down)
//! direction fails the writer at once, while its reader still gets what was queued, then
//! the end of the stream; read and write timeouts apply; dropping every handle of one end
//! closes both directions and frees whatever that end had not read.

use std::collections::VecDeque;
use std::io;
use std::net::Shutdown;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vfio_mig_stream::{
    DecodeError, DecodeErrorKind, DeviceInfo, DeviceTotals, Encoder, Phase, StreamConfig,
    StreamHeader, FORMAT_VERSION, FRAME_LEN, MAX_ABORT_REASON_LEN,
};

use crate::ack::{Ack, AckError};
use crate::error::Failure;
use crate::frames::{
    AckSink, AckSource, Buffers, FrameSink, FrameSource, Payload, Record, SinkError,
};
use crate::transport::{Control, DestinationEnd, SocketControl, SourceEnd};

/// What the link calls itself in messages and summaries.
pub(crate) const DESCRIPTION: &str = "in-process link";

/// Acknowledgements in flight at most (a migration sends two).
const ACK_CAPACITY: usize = 4;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // The state stays consistent whatever panicked while holding it: every update is one
    // push, pop or flag.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A bounded queue that either side can close, with timeouts on both operations.
struct Pipe<T> {
    state: Mutex<PipeState<T>>,
    readable: Condvar,
    writable: Condvar,
    capacity: usize,
}

struct PipeState<T> {
    queue: VecDeque<T>,
    closed: bool,
}

impl<T> Pipe<T> {
    fn new(capacity: usize) -> Pipe<T> {
        Pipe {
            state: Mutex::new(PipeState {
                queue: VecDeque::with_capacity(capacity),
                closed: false,
            }),
            readable: Condvar::new(),
            writable: Condvar::new(),
            capacity: capacity.max(1),
        }
    }

    /// Queues `item`, waiting for room at most `timeout`; fails once the pipe is closed
    /// (the item is dropped).
    fn send(&self, item: T, timeout: Option<Duration>) -> io::Result<()> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = lock(&self.state);
        loop {
            if state.closed {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the other engine closed the in-process link",
                ));
            }
            if state.queue.len() < self.capacity {
                state.queue.push_back(item);
                drop(state);
                self.readable.notify_one();
                return Ok(());
            }
            state = wait(&self.writable, state, deadline)?;
        }
    }

    /// The next item, waiting at most `timeout`; `None` once the pipe is closed and empty.
    fn recv(&self, timeout: Option<Duration>) -> io::Result<Option<T>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        let mut state = lock(&self.state);
        loop {
            if let Some(item) = state.queue.pop_front() {
                drop(state);
                self.writable.notify_one();
                return Ok(Some(item));
            }
            if state.closed {
                return Ok(None);
            }
            state = wait(&self.readable, state, deadline)?;
        }
    }

    /// No more items: senders fail, receivers get what is queued, then the end.
    fn close(&self) {
        lock(&self.state).closed = true;
        self.readable.notify_all();
        self.writable.notify_all();
    }

    /// Closes the pipe and drops what is queued (outside the lock: dropping a payload
    /// returns its buffer to a pool).
    fn discard(&self) {
        let queued = {
            let mut state = lock(&self.state);
            state.closed = true;
            std::mem::take(&mut state.queue)
        };
        self.readable.notify_all();
        self.writable.notify_all();
        drop(queued);
    }
}

/// Waits on `cv` until notified or `deadline`; fails with `TimedOut` at the deadline.
fn wait<'a, S>(
    cv: &Condvar,
    guard: MutexGuard<'a, S>,
    deadline: Option<Instant>,
) -> io::Result<MutexGuard<'a, S>> {
    match deadline {
        None => Ok(cv.wait(guard).unwrap_or_else(|p| p.into_inner())),
        Some(d) => {
            let left = d.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the in-process link timed out",
                ));
            }
            Ok(cv
                .wait_timeout(guard, left)
                .unwrap_or_else(|p| p.into_inner())
                .0)
        }
    }
}

/// Both directions of a link.
struct Link {
    /// Records from the source, each with its size in the stream format.
    forward: Pipe<(Record, u64)>,
    back: Pipe<Ack>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

/// One end of a link, shared by its sink or source, its acknowledgement half and its
/// control handle; when the last of them is dropped the link closes.
struct LinkEnd {
    link: Arc<Link>,
    side: Side,
    read_timeout: Mutex<Option<Duration>>,
    write_timeout: Mutex<Option<Duration>>,
}

impl LinkEnd {
    fn new(link: Arc<Link>, side: Side) -> Arc<LinkEnd> {
        Arc::new(LinkEnd {
            link,
            side,
            read_timeout: Mutex::new(None),
            write_timeout: Mutex::new(None),
        })
    }

    fn read_timeout(&self) -> Option<Duration> {
        *lock(&self.read_timeout)
    }

    fn write_timeout(&self) -> Option<Duration> {
        *lock(&self.write_timeout)
    }

    /// Closes the direction this end writes.
    fn close_writing(&self) {
        match self.side {
            Side::Source => self.link.forward.close(),
            Side::Destination => self.link.back.close(),
        }
    }

    /// Closes the direction this end reads; what is queued stays readable.
    fn close_reading(&self) {
        match self.side {
            Side::Source => self.link.back.close(),
            Side::Destination => self.link.forward.close(),
        }
    }
}

impl SocketControl for LinkEnd {
    fn shutdown(&self, how: Shutdown) {
        match how {
            Shutdown::Write => self.close_writing(),
            Shutdown::Read => self.close_reading(),
            Shutdown::Both => {
                self.close_writing();
                self.close_reading();
            }
        }
    }

    fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        *lock(&self.read_timeout) = timeout;
        Ok(())
    }

    fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        *lock(&self.write_timeout) = timeout;
        Ok(())
    }
}

impl Drop for LinkEnd {
    fn drop(&mut self) {
        self.close_writing();
        // Nobody will read these any more: give their buffers back now.
        match self.side {
            Side::Source => self.link.back.discard(),
            Side::Destination => self.link.forward.discard(),
        }
    }
}

/// A connected pair of ends: the source's and the destination's. `capacity` bounds the
/// records in flight; the payload memory is bounded by the source's buffer pools whatever
/// it is.
/// `max_chunk` is the destination's chunk limit (its decoder's, for a byte stream).
pub(crate) fn pair(capacity: usize, max_chunk: u32) -> (SourceEnd, DestinationEnd) {
    let link = Arc::new(Link {
        forward: Pipe::new(capacity),
        back: Pipe::new(ACK_CAPACITY),
    });
    let src = LinkEnd::new(Arc::clone(&link), Side::Source);
    let dst = LinkEnd::new(link, Side::Destination);
    let source = SourceEnd {
        sink: Some(Box::new(LinkSink {
            end: Arc::clone(&src),
            encoder: None,
            scratch: Vec::with_capacity(64),
        })),
        acks: Some(Box::new(LinkAckSource(Arc::clone(&src)))),
        control: Control::new(src),
        description: DESCRIPTION.to_owned(),
    };
    let destination = DestinationEnd {
        source: Some(Box::new(LinkSource {
            end: Arc::clone(&dst),
            bytes: 0,
            max_chunk,
        })),
        acks: Some(Box::new(LinkAckSink(Arc::clone(&dst)))),
        control: Control::new(dst),
        description: DESCRIPTION.to_owned(),
    };
    (source, destination)
}

/// The source's records, handed over as they are.
struct LinkSink {
    end: Arc<LinkEnd>,
    /// Checks every record and keeps the totals, as for a byte stream; its bytes are
    /// thrown away.
    encoder: Option<Encoder>,
    scratch: Vec<u8>,
}

impl LinkSink {
    fn send(&self, record: Record, stream_len: u64) -> Result<u64, SinkError> {
        self.end
            .link
            .forward
            .send((record, stream_len), self.end.write_timeout())
            .map_err(SinkError::Io)?;
        Ok(stream_len)
    }
}

impl FrameSink for LinkSink {
    fn checksums(&self) -> bool {
        false
    }

    fn lends_buffers(&self) -> bool {
        true
    }

    fn start(&mut self, config: &StreamConfig, devices: &[DeviceInfo]) -> Result<u64, SinkError> {
        self.scratch.clear();
        let encoder =
            Encoder::new(config, devices, &mut self.scratch).map_err(SinkError::Encode)?;
        self.encoder = Some(encoder);
        let header = StreamHeader {
            version: FORMAT_VERSION,
            flags: 0,
            max_chunk: config.max_chunk,
            // The encoder accepted the count: 1 to MAX_DEVICES.
            device_count: devices.len() as u16,
            created_unix_ms: config.created_unix_ms,
            producer: config.producer.clone(),
        };
        // The header carries the stream size of itself and every DEVICE record.
        let total = self.send(Record::Header(header), self.scratch.len() as u64)?;
        for (index, info) in (0u16..).zip(devices) {
            let info = info.clone();
            self.send(Record::Device { index, info }, 0)?;
        }
        Ok(total)
    }

    fn data(
        &mut self,
        device: u16,
        phase: Phase,
        payload: Payload,
        _crc: u32,
    ) -> Result<u64, SinkError> {
        let encoder = self.encoder.as_mut().ok_or(SinkError::NotStarted)?;
        let len = payload.len();
        // Only for the checks and totals: the frame, and so its (absent) checksum, is
        // never used.
        encoder
            .chunk_frame_with_crc(device, phase, len, 0)
            .map_err(SinkError::Encode)?;
        self.send(Record::Data { device, payload }, (FRAME_LEN + len) as u64)
    }

    fn end_device(&mut self, device: u16) -> Result<(DeviceTotals, u64), SinkError> {
        let encoder = self.encoder.as_mut().ok_or(SinkError::NotStarted)?;
        self.scratch.clear();
        let totals = encoder
            .end_device(device, &mut self.scratch)
            .map_err(SinkError::Encode)?;
        let n = self.send(
            Record::DeviceEnd { device, totals },
            self.scratch.len() as u64,
        )?;
        Ok((totals, n))
    }

    fn end(&mut self) -> Result<u64, SinkError> {
        let encoder = self.encoder.as_mut().ok_or(SinkError::NotStarted)?;
        self.scratch.clear();
        encoder.end(&mut self.scratch).map_err(SinkError::Encode)?;
        self.send(Record::End, self.scratch.len() as u64)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn abort(&mut self, reason: &str) -> bool {
        let Some(encoder) = self.encoder.as_mut() else {
            return false;
        };
        self.scratch.clear();
        if encoder.abort(reason, &mut self.scratch).is_err() {
            return false;
        }
        // Cut as the encoder cuts it, so the destination reads what a stream would carry.
        let mut cut = reason.len().min(MAX_ABORT_REASON_LEN);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let record = Record::Abort {
            reason: reason[..cut].to_owned(),
        };
        self.send(record, self.scratch.len() as u64).is_ok()
    }
}

/// The destination's end: records as the source made them.
struct LinkSource {
    end: Arc<LinkEnd>,
    bytes: u64,
    /// The destination's chunk limit.
    max_chunk: u32,
}

impl FrameSource for LinkSource {
    fn next(&mut self, _buffers: &mut dyn Buffers) -> Result<Record, Failure> {
        match self.end.link.forward.recv(self.end.read_timeout()) {
            Ok(Some((record, stream_len))) => {
                self.bytes += stream_len;
                match &record {
                    // The limit a decoder applies, with the error it gives.
                    Record::Header(h) if h.max_chunk > self.max_chunk => {
                        Err(Failure::Decode(DecodeError {
                            offset: 0,
                            kind: DecodeErrorKind::LengthOverLimit {
                                what: "the header's maximum chunk".to_owned(),
                                len: h.max_chunk.into(),
                                limit: self.max_chunk.into(),
                            },
                        }))
                    }
                    _ => Ok(record),
                }
            }
            Ok(None) => Err(Failure::Decode(DecodeError {
                offset: self.bytes,
                kind: DecodeErrorKind::Truncated {
                    expected: "another record: the source closed the in-process link \
                               before its END record"
                        .to_owned(),
                },
            })),
            Err(e) => Err(Failure::transport("reading the stream", DESCRIPTION, e)),
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn drain(&mut self, _control: &Control, deadline: Instant) {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            match self
                .end
                .link
                .forward
                .recv(Some(left.min(Duration::from_millis(100))))
            {
                // Dropping the record gives its buffer back to the source.
                Ok(Some(_)) => {}
                Ok(None) => return,
                Err(_) => {}
            }
        }
    }
}

struct LinkAckSink(Arc<LinkEnd>);

impl AckSink for LinkAckSink {
    fn send(&mut self, ack: &Ack) -> io::Result<()> {
        self.0.link.back.send(ack.clone(), self.0.write_timeout())
    }
}

struct LinkAckSource(Arc<LinkEnd>);

impl AckSource for LinkAckSource {
    fn next(&mut self) -> Result<Option<Ack>, AckError> {
        self.0
            .link
            .back
            .recv(self.0.read_timeout())
            .map_err(AckError::Io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    struct NoBuffers;

    impl Buffers for NoBuffers {
        fn ready(&self) -> bool {
            false
        }
        fn take(&mut self) -> Result<Payload, Failure> {
            Err(Failure::Panicked)
        }
    }

    #[test]
    fn a_closed_pipe_still_yields_what_was_queued() {
        let pipe = Pipe::new(2);
        pipe.send(1, None).unwrap();
        pipe.send(2, None).unwrap();
        let full = pipe.send(3, Some(Duration::from_millis(10))).unwrap_err();
        assert_eq!(full.kind(), io::ErrorKind::TimedOut);
        pipe.close();
        let closed = pipe.send(4, None).unwrap_err();
        assert_eq!(closed.kind(), io::ErrorKind::BrokenPipe);
        assert_eq!(pipe.recv(None).unwrap(), Some(1));
        assert_eq!(pipe.recv(None).unwrap(), Some(2));
        assert_eq!(pipe.recv(None).unwrap(), None);
        let empty = Pipe::<u8>::new(1);
        let idle = empty.recv(Some(Duration::from_millis(10))).unwrap_err();
        assert_eq!(idle.kind(), io::ErrorKind::TimedOut);
    }

    #[test]
    fn a_blocked_sender_wakes_when_the_reader_takes_or_closes() {
        let pipe = Arc::new(Pipe::new(1));
        pipe.send(1, None).unwrap();
        let sender = {
            let pipe = Arc::clone(&pipe);
            std::thread::spawn(move || pipe.send(2, None))
        };
        assert_eq!(pipe.recv(None).unwrap(), Some(1));
        sender.join().unwrap().unwrap();
        let sender = {
            let pipe = Arc::clone(&pipe);
            std::thread::spawn(move || pipe.send(3, None))
        };
        std::thread::sleep(Duration::from_millis(20));
        pipe.close();
        let err = sender.join().unwrap().unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::BrokenPipe);
    }

    fn config() -> (StreamConfig, Vec<DeviceInfo>) {
        let info = DeviceInfo {
            name: "d".into(),
            kind: "k".into(),
            version: "1".into(),
            compat: Vec::new(),
            features: vfio_mig_device::MigrationFeatures::STOP_COPY,
            data_size_estimate: 0,
        };
        (StreamConfig::default(), vec![info])
    }

    #[test]
    fn records_cross_by_ownership_and_a_shutdown_ends_the_stream() {
        let (mut src, mut dst) = pair(8, 1 << 20);
        let sink = src.sink.as_mut().unwrap();
        assert!(!sink.checksums());
        let (config, devices) = config();
        let header_len = sink.start(&config, &devices).unwrap();
        let (home, pool) = mpsc::sync_channel(1);
        let buf = vec![7u8; FRAME_LEN + 4];
        let at = buf.as_ptr() as usize;
        let payload = Payload::new(buf.into(), FRAME_LEN, 4, Some(home));
        let n = sink.data(0, Phase::StopCopy, payload, 0).unwrap();
        assert_eq!(n, (FRAME_LEN + 4) as u64);
        src.control.shutdown(Shutdown::Both);

        let source = dst.source.as_mut().unwrap();
        assert!(
            matches!(source.next(&mut NoBuffers), Ok(Record::Header(h)) if h.device_count == 1)
        );
        assert!(matches!(
            source.next(&mut NoBuffers),
            Ok(Record::Device { index: 0, .. })
        ));
        let Ok(Record::Data { device: 0, payload }) = source.next(&mut NoBuffers) else {
            panic!("no DATA record");
        };
        assert_eq!(payload.bytes(), &[7u8; 4]);
        assert!(pool.try_recv().is_err(), "the destination holds the buffer");
        drop(payload);
        let back = pool.try_recv().unwrap();
        assert_eq!(back.as_ptr() as usize, at);
        assert_eq!(source.bytes(), header_len + n);
        let Err(Failure::Decode(e)) = source.next(&mut NoBuffers) else {
            panic!("the stream did not end");
        };
        assert!(e.is_truncation());
        assert_eq!(e.offset, header_len + n);
        // The destination can no longer answer.
        let ack = dst.acks.as_mut().unwrap().send(&Ack::Ready).unwrap_err();
        assert_eq!(ack.kind(), io::ErrorKind::BrokenPipe);
    }

    #[test]
    fn dropping_the_destination_gives_queued_buffers_back() {
        let (mut src, dst) = pair(8, 1 << 20);
        let sink = src.sink.as_mut().unwrap();
        let (config, devices) = config();
        sink.start(&config, &devices).unwrap();
        let (home, pool) = mpsc::sync_channel(1);
        let payload = Payload::new(vec![0u8; FRAME_LEN + 1].into(), FRAME_LEN, 1, Some(home));
        sink.data(0, Phase::StopCopy, payload, 0).unwrap();
        assert!(pool.try_recv().is_err());
        drop(dst);
        assert!(pool.try_recv().is_ok());
        let (home, _pool) = mpsc::sync_channel(1);
        let payload = Payload::new(vec![0u8; FRAME_LEN + 1].into(), FRAME_LEN, 1, Some(home));
        assert!(matches!(
            sink.data(0, Phase::StopCopy, payload, 0),
            Err(SinkError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe
        ));
        // Nobody reads the ABORT either.
        assert!(!sink.abort("gone"));
    }

    #[test]
    fn a_header_over_the_destination_chunk_limit_is_refused_as_a_decoder_would() {
        let (mut src, mut dst) = pair(8, 4096);
        let (config, devices) = config();
        src.sink.as_mut().unwrap().start(&config, &devices).unwrap();
        let Err(Failure::Decode(e)) = dst.source.as_mut().unwrap().next(&mut NoBuffers) else {
            panic!("a 1 MiB chunk size passed a 4 KiB limit");
        };
        assert_eq!(e.offset, 0);
        assert!(e.to_string().contains("exceeds the limit of 4096"), "{e}");
    }
}
