//! What the two engines exchange, whatever carries it: the source hands records to a
//! [`FrameSink`], the destination takes them from a [`FrameSource`], and acknowledgements go
//! back through an [`AckSink`] / [`AckSource`].
//!
//! Each has two implementations: the byte stream here (the stream format's encoder and
//! decoder over a [`crate::Transport`]: file, UNIX socket, TCP; every payload checksummed),
//! and the in-process link of [`crate::link`], which hands records and their payload
//! buffers to the other engine by ownership (no copy, no syscall, no checksum: the bytes
//! never leave this process's memory). The engines' logic is the same over both.

use std::io::{self, Read, Write};
use std::sync::mpsc::SyncSender;
use std::time::{Duration, Instant};

use vfio_mig_stream::{
    Decoder, DecoderLimits, DeviceInfo, DeviceTotals, EncodeError, Encoder, Event, Phase,
    StreamConfig, StreamHeader, FRAME_LEN,
};

use crate::ack::{Ack, AckError};
use crate::buffers::PoolBuffer;
use crate::error::Failure;
use crate::transport::Control;

/// A chunk's bytes in a pooled buffer, `buf[start..start + len]`. Dropping it returns the
/// buffer to its pool (or frees it once the pool is gone), so a buffer goes back to the
/// thread that fills it from whoever consumes the chunk last, possibly the other engine.
pub(crate) struct Payload {
    buf: PoolBuffer,
    start: usize,
    len: usize,
    home: Option<SyncSender<PoolBuffer>>,
}

impl Payload {
    /// `buf[start..start + len]`, going back to `home` when dropped.
    pub(crate) fn new(
        buf: PoolBuffer,
        start: usize,
        len: usize,
        home: Option<SyncSender<PoolBuffer>>,
    ) -> Payload {
        debug_assert!(start + len <= buf.len());
        Payload {
            buf,
            start,
            len,
            home,
        }
    }

    /// The chunk's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        &self.buf[self.start..self.start + self.len]
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// The buffer from its start, grown to at least `len` bytes, to read a payload into
    /// (then [`Payload::set_len`]). A heap buffer grows only the first time it is used; a
    /// provided buffer holds the largest chunk the stream announced, and one that ever
    /// holds less is replaced by a heap buffer (see [`PoolBuffer::ensure_len`]).
    pub(crate) fn space(&mut self, len: usize) -> &mut [u8] {
        self.buf.ensure_len(len);
        self.start = 0;
        self.len = 0;
        &mut self.buf[..len]
    }

    /// The payload is the first `len` bytes of the buffer (written through
    /// [`Payload::space`]).
    pub(crate) fn set_len(&mut self, len: usize) {
        debug_assert!(len <= self.buf.len());
        self.start = 0;
        self.len = len;
    }

    /// Replaces the payload with a copy of `bytes` (a record too small to read directly).
    pub(crate) fn fill_from(&mut self, bytes: &[u8]) {
        self.space(bytes.len()).copy_from_slice(bytes);
        self.len = bytes.len();
    }

    /// The payload preceded by `frame`, written into the room the producer left before it,
    /// so that the whole record goes out in one write; `None` without that room.
    fn framed(&mut self, frame: &[u8; FRAME_LEN]) -> Option<&[u8]> {
        let at = self.start.checked_sub(FRAME_LEN)?;
        self.buf[at..self.start].copy_from_slice(frame);
        Some(&self.buf[at..self.start + self.len])
    }
}

impl Drop for Payload {
    fn drop(&mut self) {
        if let Some(home) = self.home.take() {
            // A pool has room for every buffer it owns; a closed pool lets the buffer go
            // (a provided one back to its provider).
            let _ = home.try_send(std::mem::take(&mut self.buf));
        }
    }
}

/// One record of a migration stream, owned.
pub(crate) enum Record {
    /// The stream header.
    Header(StreamHeader),
    /// A device's description (all come, in index order, before anything else).
    Device { index: u16, info: DeviceInfo },
    /// A chunk of a device's state.
    Data { device: u16, payload: Payload },
    /// A device's data is complete.
    DeviceEnd { device: u16, totals: DeviceTotals },
    /// The stream is complete.
    End,
    /// The source gave up.
    Abort { reason: String },
}

/// Why a sink could not take a record.
#[derive(Debug)]
pub(crate) enum SinkError {
    /// The encoder refused it (an engine bug, or a device that cannot be described).
    Encode(EncodeError),
    /// The transport failed.
    Io(io::Error),
    /// A record before [`FrameSink::start`] (an engine bug).
    NotStarted,
}

impl SinkError {
    /// The engine's failure for this error while `what` on `transport`.
    pub(crate) fn failure(self, what: &str, transport: &str) -> Failure {
        match self {
            SinkError::Encode(e) => Failure::Encode(e),
            SinkError::Io(e) => Failure::transport(what, transport, e),
            SinkError::NotStarted => Failure::Panicked,
        }
    }
}

/// Where the source engine's records go. Each method returns how many bytes the record
/// takes in the stream format, so that both ends count the same stream bytes whatever
/// carries them.
pub(crate) trait FrameSink: Send {
    /// Whether DATA payloads need their CRC ([`vfio_mig_stream::payload_crc`], computed by
    /// the device reader threads in parallel) for [`FrameSink::data`].
    fn checksums(&self) -> bool;

    /// Whether payload buffers stay with the receiver until it has written them to its
    /// device (so a stalled receiver shows as buffers not coming back, not as a blocked
    /// write).
    fn lends_buffers(&self) -> bool;

    /// The header and every DEVICE record.
    fn start(&mut self, config: &StreamConfig, devices: &[DeviceInfo]) -> Result<u64, SinkError>;

    /// A DATA record; `crc` is the payload's CRC when [`FrameSink::checksums`], else 0.
    fn data(
        &mut self,
        device: u16,
        phase: Phase,
        payload: Payload,
        crc: u32,
    ) -> Result<u64, SinkError>;

    /// The DEVICE_END record of `device`, and the totals it states.
    fn end_device(&mut self, device: u16) -> Result<(DeviceTotals, u64), SinkError>;

    /// The END record. An [`SinkError::Io`] means that END may have partly gone out; any
    /// other error, that nothing did.
    fn end(&mut self) -> Result<u64, SinkError>;

    /// Pushes out whatever is buffered.
    fn flush(&mut self) -> io::Result<()>;

    /// An ABORT record, flushed; whether it went out.
    fn abort(&mut self, reason: &str) -> bool;
}

/// Free payload buffers for a [`FrameSource`] that reads payloads into memory.
pub(crate) trait Buffers {
    /// Whether pooled buffers exist yet (they do once the devices were accepted).
    fn ready(&self) -> bool;
    /// A free buffer (empty payload), waiting while all are in use.
    fn take(&mut self) -> Result<Payload, Failure>;
}

/// Where the destination engine's records come from.
pub(crate) trait FrameSource: Send {
    /// The next record, checked; large payloads land in buffers from `buffers`.
    fn next(&mut self, buffers: &mut dyn Buffers) -> Result<Record, Failure>;

    /// Stream bytes taken so far.
    fn bytes(&self) -> u64;

    /// After a failure: takes and discards records until the source closes the stream or
    /// `deadline` passes, so that the source reads the destination's answer rather than a
    /// closed connection.
    fn drain(&mut self, control: &Control, deadline: Instant);
}

/// Where the destination's acknowledgements go.
pub(crate) trait AckSink: Send {
    fn send(&mut self, ack: &Ack) -> io::Result<()>;
}

/// Where the source reads the destination's acknowledgements.
pub(crate) trait AckSource: Send {
    /// The next acknowledgement; `Ok(None)` when the back channel closed between messages.
    fn next(&mut self) -> Result<Option<Ack>, AckError>;
}

/// The source's records as stream bytes on a writer.
pub(crate) struct ByteSink {
    out: Box<dyn Write + Send>,
    encoder: Option<Encoder>,
    /// Small records are encoded here.
    small: Vec<u8>,
}

impl ByteSink {
    pub(crate) fn new(out: Box<dyn Write + Send>) -> ByteSink {
        ByteSink {
            out,
            encoder: None,
            small: Vec::with_capacity(64),
        }
    }
}

impl FrameSink for ByteSink {
    fn checksums(&self) -> bool {
        true
    }

    fn lends_buffers(&self) -> bool {
        false
    }

    fn start(&mut self, config: &StreamConfig, devices: &[DeviceInfo]) -> Result<u64, SinkError> {
        let mut bytes = Vec::new();
        let encoder = Encoder::new(config, devices, &mut bytes).map_err(SinkError::Encode)?;
        self.encoder = Some(encoder);
        self.out
            .write_all(&bytes)
            .and_then(|_| self.out.flush())
            .map_err(SinkError::Io)?;
        Ok(bytes.len() as u64)
    }

    fn data(
        &mut self,
        device: u16,
        phase: Phase,
        mut payload: Payload,
        crc: u32,
    ) -> Result<u64, SinkError> {
        let encoder = self.encoder.as_mut().ok_or(SinkError::NotStarted)?;
        let len = payload.len();
        let frame = encoder
            .chunk_frame_with_crc(device, phase, len, crc)
            .map_err(SinkError::Encode)?;
        let written = match payload.framed(&frame) {
            Some(record) => self.out.write_all(record),
            None => self
                .out
                .write_all(&frame)
                .and_then(|_| self.out.write_all(payload.bytes())),
        };
        written.map_err(SinkError::Io)?;
        Ok((FRAME_LEN + len) as u64)
    }

    fn end_device(&mut self, device: u16) -> Result<(DeviceTotals, u64), SinkError> {
        let encoder = self.encoder.as_mut().ok_or(SinkError::NotStarted)?;
        self.small.clear();
        let totals = encoder
            .end_device(device, &mut self.small)
            .map_err(SinkError::Encode)?;
        self.out.write_all(&self.small).map_err(SinkError::Io)?;
        Ok((totals, self.small.len() as u64))
    }

    fn end(&mut self) -> Result<u64, SinkError> {
        let encoder = self.encoder.as_mut().ok_or(SinkError::NotStarted)?;
        self.small.clear();
        encoder.end(&mut self.small).map_err(SinkError::Encode)?;
        self.out.write_all(&self.small).map_err(SinkError::Io)?;
        Ok(self.small.len() as u64)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }

    fn abort(&mut self, reason: &str) -> bool {
        let Some(encoder) = self.encoder.as_mut() else {
            return false;
        };
        self.small.clear();
        encoder.abort(reason, &mut self.small).is_ok()
            && self
                .out
                .write_all(&self.small)
                .and_then(|_| self.out.flush())
                .is_ok()
    }
}

/// Record bodies at least this long are read straight into a pooled buffer.
const DIRECT_MIN: usize = 4096;

/// The destination's records decoded (and checked) from stream bytes on a reader.
pub(crate) struct ByteSource {
    reader: Box<dyn Read + Send>,
    decoder: Decoder,
    bytes: u64,
    transport: String,
}

impl ByteSource {
    pub(crate) fn new(
        reader: Box<dyn Read + Send>,
        limits: DecoderLimits,
        transport: String,
    ) -> ByteSource {
        ByteSource {
            reader,
            decoder: Decoder::with_limits(limits),
            bytes: 0,
            transport,
        }
    }

    fn read_failure(&self, e: io::Error) -> Failure {
        Failure::transport("reading the stream", &self.transport, e)
    }

    /// One read into the decoder's own buffer (headers, frames, small records).
    fn read_small(&mut self, buffers: &mut dyn Buffers) -> Result<Option<Record>, Failure> {
        let n = read_retrying(&mut *self.reader, self.decoder.demand())
            .map_err(|e| self.read_failure(e))?;
        self.bytes += n as u64;
        if n == 0 {
            return Err(truncated(&mut self.decoder));
        }
        match self.decoder.commit(n).map_err(Failure::Decode)? {
            Some(Event::Data(chunk)) => {
                let mut payload = buffers.take()?;
                payload.fill_from(chunk.payload);
                Ok(Some(Record::Data {
                    device: chunk.device,
                    payload,
                }))
            }
            Some(event) => Ok(Some(owned(event))),
            None => Ok(None),
        }
    }

    /// A large record body (a DATA payload) read straight into a pooled buffer and
    /// decoded in place there: the payload is never copied.
    fn read_direct(
        &mut self,
        buffers: &mut dyn Buffers,
        want: usize,
    ) -> Result<Option<Record>, Failure> {
        let mut payload = buffers.take()?;
        let space = payload.space(want);
        let mut got = 0;
        while got < want {
            let n = read_retrying(&mut *self.reader, &mut space[got..])
                .map_err(|e| Failure::transport("reading the stream", &self.transport, e))?;
            self.bytes += n as u64;
            if n == 0 {
                // Let the decoder see what arrived, so its error names the right offset.
                let _ = self.decoder.feed(&space[..got]);
                return Err(truncated(&mut self.decoder));
            }
            got += n;
        }
        let (_, event) = self.decoder.feed(space).map_err(Failure::Decode)?;
        match event {
            Some(Event::Data(chunk)) => {
                // The whole record was in the input, so the payload is the buffer's start.
                let (device, len) = (chunk.device, chunk.payload.len());
                debug_assert_eq!(len, want);
                payload.set_len(len);
                Ok(Some(Record::Data { device, payload }))
            }
            // The buffer goes back to its pool.
            Some(event) => Ok(Some(owned(event))),
            None => Ok(None),
        }
    }
}

/// One read, retried when interrupted.
fn read_retrying(reader: &mut dyn Read, into: &mut [u8]) -> io::Result<usize> {
    loop {
        match reader.read(into) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// A decoder event other than DATA, owned.
fn owned(event: Event<'_>) -> Record {
    match event {
        Event::Header(h) => Record::Header(h),
        Event::Device { index, info } => Record::Device { index, info },
        Event::DeviceEnd { device, totals } => Record::DeviceEnd { device, totals },
        Event::End(_) => Record::End,
        Event::Abort { reason } => Record::Abort { reason },
        Event::Data(_) => unreachable!("DATA is taken into a buffer by the callers"),
    }
}

fn truncated(decoder: &mut Decoder) -> Failure {
    match decoder.finish() {
        Err(e) => Failure::Decode(e),
        // A stream that ended properly demands no more bytes, so is never read past.
        Ok(_) => Failure::Panicked,
    }
}

impl FrameSource for ByteSource {
    fn next(&mut self, buffers: &mut dyn Buffers) -> Result<Record, Failure> {
        loop {
            let want = self.decoder.demand().len();
            if want == 0 {
                // Only after END or ABORT, which end the engine's loop, or a failed
                // decoder, which returned its error already.
                return Err(Failure::Panicked);
            }
            let record = if want >= DIRECT_MIN && buffers.ready() {
                self.read_direct(buffers, want)?
            } else {
                self.read_small(buffers)?
            };
            if let Some(record) = record {
                return Ok(record);
            }
        }
    }

    fn bytes(&self) -> u64 {
        self.bytes
    }

    fn drain(&mut self, control: &Control, deadline: Instant) {
        control.set_read_timeout(Some(Duration::from_millis(100)));
        let mut scratch = vec![0u8; 64 * 1024];
        while Instant::now() < deadline {
            match self.reader.read(&mut scratch) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                    ) => {}
                Err(_) => return,
            }
        }
    }
}

/// Acknowledgements as frames on a writer.
pub(crate) struct ByteAckSink(pub(crate) Box<dyn Write + Send>);

impl AckSink for ByteAckSink {
    fn send(&mut self, ack: &Ack) -> io::Result<()> {
        self.0.write_all(&ack.encode())?;
        self.0.flush()
    }
}

/// Acknowledgements read as frames from a reader.
pub(crate) struct ByteAckSource(pub(crate) Box<dyn Read + Send>);

impl AckSource for ByteAckSource {
    fn next(&mut self) -> Result<Option<Ack>, AckError> {
        Ack::read_from(&mut *self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    #[test]
    fn a_dropped_payload_goes_back_to_its_pool() {
        let (home, pool) = mpsc::sync_channel(1);
        let mut p = Payload::new(vec![0u8; 8].into(), 2, 0, Some(home));
        p.fill_from(b"abc");
        assert_eq!(p.bytes(), b"abc");
        drop(p);
        let buf = pool.try_recv().unwrap();
        assert_eq!(&buf[..3], b"abc");
        // Without a pool the buffer is simply freed.
        drop(pool);
        let (home, pool) = mpsc::sync_channel::<PoolBuffer>(1);
        drop(pool);
        drop(Payload::new(vec![1].into(), 0, 1, Some(home)));
    }

    #[test]
    fn a_provided_buffer_goes_to_its_pool_then_back_to_its_provider() {
        use crate::buffers::tests::Counted;
        use std::sync::atomic::Ordering;
        let memory = Counted {
            room: 2,
            ..Counted::default()
        };
        let buf = PoolBuffer::provided(Some(&memory), 8).unwrap();
        let at = buf.as_ptr();
        let (home, pool) = mpsc::sync_channel(1);
        let mut p = Payload::new(buf, 0, 0, Some(home.clone()));
        p.fill_from(b"abcdefgh");
        assert_eq!(p.bytes().as_ptr(), at, "read in place");
        drop(p);
        let buf = pool.try_recv().unwrap();
        assert!(buf.is_provided());
        assert_eq!(memory.back.load(Ordering::SeqCst), 0, "the pool keeps it");
        // A payload larger than the provided buffer moves to the heap, whole.
        let mut p = Payload::new(buf, 0, 0, Some(home));
        p.fill_from(b"0123456789");
        assert_eq!(p.bytes(), b"0123456789");
        assert_eq!(memory.back.load(Ordering::SeqCst), 1);
        drop(p);
        assert!(!pool.try_recv().unwrap().is_provided());
        // With the pool gone, a provided buffer goes straight back to its provider.
        let (home, pool) = mpsc::sync_channel(1);
        drop(pool);
        let buf = PoolBuffer::provided(Some(&memory), 8).unwrap();
        drop(Payload::new(buf, 0, 8, Some(home)));
        assert_eq!(memory.back.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn the_frame_goes_into_the_room_before_the_payload() {
        let mut p = Payload::new(vec![9u8; FRAME_LEN + 4].into(), FRAME_LEN, 3, None);
        let frame = [1u8; FRAME_LEN];
        let record = p.framed(&frame).unwrap().to_vec();
        assert_eq!(record.len(), FRAME_LEN + 3);
        assert_eq!(&record[..FRAME_LEN], &frame);
        assert_eq!(&record[FRAME_LEN..], &[9, 9, 9]);
        let mut tight = Payload::new(vec![9u8; 4].into(), 0, 4, None);
        assert!(tight.framed(&frame).is_none());
    }
}
