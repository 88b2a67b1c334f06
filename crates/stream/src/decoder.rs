//! The decoder: turns stream bytes, in pieces of any size, into checked events.

use crate::error::{DecodeError, DecodeErrorKind};
use crate::record::{
    Chunk, DeviceBodyError, DeviceInfo, DeviceTotals, Event, StreamHeader, StreamTotals,
};
use crate::wire::{
    crc32, le_u16, le_u32, le_u64, Frame, HeaderFixed, Phase, RecordType,
    DEFAULT_DECODER_MAX_CHUNK, DEVICE_END_LEN, END_LEN, FORMAT_VERSION, FRAME_LEN, HEADER_LEN,
    MAGIC, MAX_ABORT_REASON_LEN, MAX_DEVICES, MAX_DEVICE_BODY_LEN, MAX_PRODUCER_LEN,
};

/// Limits a decoder applies on top of the format's own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecoderLimits {
    /// The largest chunk size a stream header may state. The decoder buffers at most one
    /// record, so this bounds its memory.
    pub max_chunk: u32,
}

impl Default for DecoderLimits {
    /// [`DEFAULT_DECODER_MAX_CHUNK`] (16 MiB).
    fn default() -> Self {
        DecoderLimits {
            max_chunk: DEFAULT_DECODER_MAX_CHUNK,
        }
    }
}

/// How a complete stream ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// With an END record: every device's data is complete and checked.
    Complete(StreamTotals),
    /// With an ABORT record: the source gave up, for this reason.
    Aborted(String),
}

impl Outcome {
    fn last_record(&self) -> RecordType {
        match self {
            Outcome::Complete(_) => RecordType::End,
            Outcome::Aborted(_) => RecordType::Abort,
        }
    }
}

/// The piece of the stream the decoder is waiting for.
#[derive(Clone, Debug)]
enum Unit {
    /// The fixed stream header.
    Header,
    /// The producer string after it.
    Producer(HeaderFixed),
    /// A record frame.
    Frame,
    /// The body of a record whose frame was accepted.
    Body(Frame, RecordType),
    /// END or ABORT was decoded; nothing may follow.
    Done(Outcome),
    /// The stream was rejected; every later call reports the same error.
    Failed(DecodeError),
}

#[derive(Clone, Debug, Default)]
struct DeviceProgress {
    /// Next sequence number; a `u64` so that the one after `u32::MAX` is representable.
    next_sequence: u64,
    stop_copy_started: bool,
    ended: bool,
    totals: DeviceTotals,
}

/// What the decoder knows once the header is in.
#[derive(Debug)]
struct StreamState {
    header: StreamHeader,
    declared: u16,
    devices: Vec<DeviceProgress>,
    bytes: u64,
    chunks: u64,
}

/// Everything but the reassembly buffer, so that a unit can be processed while it is
/// borrowed from that buffer.
#[derive(Debug)]
struct Core {
    limits: DecoderLimits,
    /// Bytes consumed so far: the absolute offset of the next byte.
    offset: u64,
    /// Offset of the current unit's first byte.
    unit_start: u64,
    /// Offset of the current record's frame.
    record_start: u64,
    unit: Unit,
    stream: Option<StreamState>,
    /// The chain CRC: header and frames before END, each without its own CRC.
    chain: crc32fast::Hasher,
}

/// Reads a stream incrementally, checking everything, and yields [`Event`]s.
///
/// Sans-IO: give it bytes as they arrive, in pieces of any size, with [`Decoder::feed`], or
/// let it tell you where to put them with [`Decoder::demand`] and [`Decoder::commit`] (no
/// copy). Each call yields at most one event; a DATA payload is borrowed from the input when
/// the whole record is in it, and from the decoder's buffer (at most one record, bounded by
/// [`DecoderLimits`]) otherwise. At the end of the input, [`Decoder::finish`] tells whether
/// the stream was complete. After the first error every call returns that error.
#[derive(Debug)]
pub struct Decoder {
    buf: Vec<u8>,
    filled: usize,
    core: Core,
}

impl Default for Decoder {
    fn default() -> Self {
        Decoder::new()
    }
}

impl Decoder {
    /// A decoder with the default limits.
    pub fn new() -> Decoder {
        Decoder::with_limits(DecoderLimits::default())
    }

    /// A decoder with the given limits.
    pub fn with_limits(limits: DecoderLimits) -> Decoder {
        Decoder {
            buf: Vec::new(),
            filled: 0,
            core: Core {
                limits,
                offset: 0,
                unit_start: 0,
                record_start: 0,
                unit: Unit::Header,
                stream: None,
                chain: crc32fast::Hasher::new(),
            },
        }
    }

    /// Bytes consumed so far (the absolute offset of the next byte).
    pub fn offset(&self) -> u64 {
        self.core.offset
    }

    /// The stream header, once decoded.
    pub fn header(&self) -> Option<&StreamHeader> {
        self.core.stream.as_ref().map(|s| &s.header)
    }

    /// Whether the header and every DEVICE record have been decoded: from here on only
    /// DATA, DEVICE_END, END and ABORT can follow, so this is the moment for a destination
    /// to check every device's compatibility, before it writes anything into any device.
    pub fn devices_complete(&self) -> bool {
        self.core
            .stream
            .as_ref()
            .is_some_and(|s| s.declared == s.header.device_count)
    }

    /// The chunks and bytes decoded so far for `device`, or `None` before the header or for
    /// an index the stream does not declare.
    pub fn device_progress(&self, device: u16) -> Option<DeviceTotals> {
        let stream = self.core.stream.as_ref()?;
        stream.devices.get(usize::from(device)).map(|d| d.totals)
    }

    /// How the stream ended, once its END or ABORT record has been decoded.
    pub fn outcome(&self) -> Option<&Outcome> {
        match &self.core.unit {
            Unit::Done(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// Takes bytes from `input` and returns how many it consumed and the event they
    /// completed, if any.
    ///
    /// It consumes at most up to the end of the current header part or record, so call it
    /// again with the rest of `input` until everything is consumed. Bytes after the END or
    /// ABORT record are an error.
    pub fn feed<'a>(
        &'a mut self,
        input: &'a [u8],
    ) -> Result<(usize, Option<Event<'a>>), DecodeError> {
        self.check_active(input.len())?;
        if input.is_empty() {
            return Ok((0, None));
        }
        let need = self.core.unit_len();
        if self.filled == 0 && input.len() >= need {
            // The whole unit is in the input: decode it in place.
            self.core.offset += need as u64;
            let event = self.core.process(&input[..need])?;
            return Ok((need, event));
        }
        let take = (need - self.filled).min(input.len());
        self.reserve(need);
        self.buf[self.filled..self.filled + take].copy_from_slice(&input[..take]);
        let event = self.commit_unchecked(take, need)?;
        Ok((take, event))
    }

    /// The buffer the next bytes of the stream should be read into: exactly what the
    /// current header part or record still lacks, so a read into it never takes bytes of
    /// the next record. Empty once the stream has ended or failed.
    ///
    /// Read into it (e.g. `reader.read(decoder.demand())`), then call [`Decoder::commit`]
    /// with the number of bytes read.
    pub fn demand(&mut self) -> &mut [u8] {
        if matches!(self.core.unit, Unit::Done(_) | Unit::Failed(_)) {
            return &mut [];
        }
        let need = self.core.unit_len();
        self.reserve(need);
        &mut self.buf[self.filled..need]
    }

    /// Takes `n` bytes written to the start of the last [`Decoder::demand`] buffer and
    /// returns the event they completed, if any.
    ///
    /// # Panics
    ///
    /// If `n` exceeds the length of that buffer (a bug in the caller, not in the stream).
    pub fn commit(&mut self, n: usize) -> Result<Option<Event<'_>>, DecodeError> {
        self.check_active(n)?;
        if n == 0 {
            return Ok(None);
        }
        let need = self.core.unit_len();
        assert!(
            self.filled + n <= need,
            "Decoder::commit({n}) exceeds the {} bytes demand() offered",
            need - self.filled
        );
        self.commit_unchecked(n, need)
    }

    /// Declares the end of the input: `Ok` with how the stream ended if it was complete,
    /// otherwise the error (a truncation error naming the offset and what was missing).
    pub fn finish(&mut self) -> Result<Outcome, DecodeError> {
        self.check_active(0)?;
        if let Unit::Done(outcome) = &self.core.unit {
            return Ok(outcome.clone());
        }
        let (offset, kind) = self.truncation();
        Err(self.core.fail(offset, kind))
    }

    /// Fails for a decoder that has failed, and for `n > 0` new bytes after the end.
    fn check_active(&mut self, n: usize) -> Result<(), DecodeError> {
        match &self.core.unit {
            Unit::Failed(e) => Err(e.clone()),
            Unit::Done(outcome) if n > 0 => {
                let kind = DecodeErrorKind::DataAfterEnd {
                    last: outcome.last_record(),
                };
                Err(self.core.fail(self.core.offset, kind))
            }
            _ => Ok(()),
        }
    }

    fn reserve(&mut self, need: usize) {
        // `need` was checked against the format's and the decoder's limits before the unit
        // began.
        if self.buf.len() < need {
            self.buf.resize(need, 0);
        }
    }

    /// Accounts for `n` new bytes in the buffer and processes the unit once complete.
    fn commit_unchecked(
        &mut self,
        n: usize,
        need: usize,
    ) -> Result<Option<Event<'_>>, DecodeError> {
        self.filled += n;
        self.core.offset += n as u64;
        if self.filled < need {
            return Ok(None);
        }
        self.filled = 0;
        self.core.process(&self.buf[..need])
    }

    /// What was missing when the input ended before the stream did, and where (a partial
    /// header that already differs from the magic is reported as bad magic at offset 0).
    fn truncation(&self) -> (u64, DecodeErrorKind) {
        let have = self.filled;
        let expected = match &self.core.unit {
            Unit::Header => {
                let prefix = &self.buf[..have.min(MAGIC.len())];
                if prefix != &MAGIC[..prefix.len()] {
                    let found = prefix.to_vec();
                    return (0, DecodeErrorKind::BadMagic { found });
                }
                if have == 0 {
                    format!("the {HEADER_LEN}-byte stream header, but the stream is empty")
                } else {
                    format!("the {HEADER_LEN}-byte stream header ({have} bytes present)")
                }
            }
            Unit::Producer(fixed) => format!(
                "the stream header's producer string ({have} of {} bytes present)",
                fixed.producer_len
            ),
            Unit::Frame if have == 0 => match &self.core.stream {
                Some(s) if s.declared < s.header.device_count => {
                    format!("the DEVICE record of device {}", s.declared)
                }
                Some(s) => {
                    let open = s.devices.iter().filter(|d| !d.ended).count();
                    format!(
                        "another record: the stream ended before its END record \
                         ({open} device(s) without DEVICE_END)"
                    )
                }
                None => "a record".to_owned(),
            },
            Unit::Frame => {
                format!("the rest of a {FRAME_LEN}-byte record frame ({have} bytes present)")
            }
            Unit::Body(frame, RecordType::Data) => format!(
                "the rest of DATA chunk {} of device {} ({have} of {} payload bytes present)",
                frame.sequence, frame.device, frame.body_len
            ),
            Unit::Body(frame, record) => format!(
                "the rest of a {record} record ({have} of {} body bytes present)",
                frame.body_len
            ),
            // Handled by the callers.
            Unit::Done(_) | Unit::Failed(_) => String::new(),
        };
        (self.core.offset, DecodeErrorKind::Truncated { expected })
    }
}

impl Core {
    /// Length of the unit being waited for (never 0 for a unit being waited for: empty
    /// units are processed as soon as they begin).
    fn unit_len(&self) -> usize {
        match &self.unit {
            Unit::Header => HEADER_LEN,
            Unit::Producer(fixed) => usize::from(fixed.producer_len),
            Unit::Frame => FRAME_LEN,
            Unit::Body(frame, _) => frame.body_len as usize,
            Unit::Done(_) | Unit::Failed(_) => 0,
        }
    }

    /// Records the error so that every later call returns it.
    fn fail(&mut self, offset: u64, kind: DecodeErrorKind) -> DecodeError {
        let err = DecodeError { offset, kind };
        self.unit = Unit::Failed(err.clone());
        err
    }

    /// Decodes the complete current unit; `self.offset` is already past it.
    fn process<'b>(&mut self, bytes: &'b [u8]) -> Result<Option<Event<'b>>, DecodeError> {
        let unit = std::mem::replace(&mut self.unit, Unit::Frame);
        let result = match unit {
            Unit::Header => self.header(bytes).map_err(|k| (self.unit_start, k)),
            Unit::Producer(fixed) => self.producer(&fixed, bytes).map_err(|k| (0, k)),
            Unit::Frame => {
                self.record_start = self.unit_start;
                self.frame(bytes).map_err(|k| (self.record_start, k))
            }
            Unit::Body(frame, record) => self
                .body(&frame, record, bytes)
                .map_err(|k| (self.record_start, k)),
            Unit::Done(_) | Unit::Failed(_) => unreachable!("no unit is processed after the end"),
        };
        self.unit_start = self.offset;
        match result {
            Ok(event) => Ok(event),
            Err((offset, kind)) => Err(self.fail(offset, kind)),
        }
    }

    fn header(&mut self, b: &[u8]) -> Result<Option<Event<'static>>, DecodeErrorKind> {
        if b[..8] != MAGIC {
            return Err(DecodeErrorKind::BadMagic {
                found: b[..8].to_vec(),
            });
        }
        let version = le_u16(b, 8);
        if version != FORMAT_VERSION {
            return Err(DecodeErrorKind::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let (stored, computed) = (le_u32(b, 32), crc32(&b[..32]));
        if stored != computed {
            return Err(checksum("stream header", stored, computed));
        }
        let fixed = HeaderFixed {
            flags: le_u16(b, 10),
            max_chunk: le_u32(b, 12),
            device_count: le_u16(b, 16),
            producer_len: le_u16(b, 18),
            created_unix_ms: le_u64(b, 20),
            producer_crc: le_u32(b, 28),
        };
        if fixed.flags != 0 {
            return Err(DecodeErrorKind::BadHeaderField {
                field: "flags",
                value: fixed.flags.into(),
                reason: "no flags are defined in format version 1",
            });
        }
        if fixed.max_chunk == 0 {
            return Err(DecodeErrorKind::BadHeaderField {
                field: "max_chunk",
                value: 0,
                reason: "chunks must be allowed at least 1 byte",
            });
        }
        if fixed.max_chunk > self.limits.max_chunk {
            return Err(DecodeErrorKind::LengthOverLimit {
                what: "the header's maximum chunk".to_owned(),
                len: fixed.max_chunk.into(),
                limit: self.limits.max_chunk.into(),
            });
        }
        if fixed.device_count == 0 || fixed.device_count > MAX_DEVICES {
            return Err(DecodeErrorKind::BadHeaderField {
                field: "device_count",
                value: fixed.device_count.into(),
                reason: "a stream carries 1 to 1024 devices",
            });
        }
        if usize::from(fixed.producer_len) > MAX_PRODUCER_LEN {
            return Err(DecodeErrorKind::LengthOverLimit {
                what: "producer string".to_owned(),
                len: fixed.producer_len.into(),
                limit: MAX_PRODUCER_LEN as u64,
            });
        }
        // Not the header's own CRC: a message followed by its own CRC leaves a CRC register
        // in a state that does not depend on the message, so it would add nothing.
        self.chain.update(&b[..32]);
        if fixed.producer_len == 0 {
            return self.producer(&fixed, &[]);
        }
        self.unit = Unit::Producer(fixed);
        Ok(None)
    }

    fn producer(
        &mut self,
        fixed: &HeaderFixed,
        b: &[u8],
    ) -> Result<Option<Event<'static>>, DecodeErrorKind> {
        let computed = crc32(b);
        if computed != fixed.producer_crc {
            return Err(checksum("producer string", fixed.producer_crc, computed));
        }
        let producer = std::str::from_utf8(b)
            .map_err(|_| DecodeErrorKind::NotUtf8 {
                what: "producer string",
            })?
            .to_owned();
        let header = StreamHeader {
            version: FORMAT_VERSION,
            flags: fixed.flags,
            max_chunk: fixed.max_chunk,
            device_count: fixed.device_count,
            created_unix_ms: fixed.created_unix_ms,
            producer,
        };
        self.stream = Some(StreamState {
            devices: vec![DeviceProgress::default(); usize::from(fixed.device_count)],
            header: header.clone(),
            declared: 0,
            bytes: 0,
            chunks: 0,
        });
        self.unit = Unit::Frame;
        Ok(Some(Event::Header(header)))
    }

    /// Checks a frame against everything known before its body arrives.
    fn frame(&mut self, b: &[u8]) -> Result<Option<Event<'static>>, DecodeErrorKind> {
        let bytes: &[u8; FRAME_LEN] = b.try_into().expect("a frame unit is FRAME_LEN bytes");
        let frame = Frame::decode(bytes)
            .map_err(|(stored, computed)| checksum("record frame", stored, computed))?;
        let record = RecordType::from_u8(frame.record_type)
            .ok_or(DecodeErrorKind::UnknownRecordType(frame.record_type))?;
        let Some(stream) = self.stream.as_mut() else {
            unreachable!("frames are read only after the header")
        };
        let count = stream.header.device_count;
        let device = frame.device;
        let zero = |field: &'static str, value: u64| {
            if value == 0 {
                Ok(())
            } else {
                Err(DecodeErrorKind::NonZeroField {
                    record,
                    field,
                    value,
                })
            }
        };
        if record != RecordType::Data {
            zero("phase", frame.phase.into())?;
            zero("sequence", frame.sequence.into())?;
        }
        if matches!(record, RecordType::End | RecordType::Abort) {
            zero("device index", device.into())?;
        }
        let all_declared = stream.declared == count;
        if !all_declared && !matches!(record, RecordType::Device | RecordType::Abort) {
            return Err(DecodeErrorKind::DevicesNotDeclared {
                record,
                declared: stream.declared,
                count,
            });
        }
        let max_body = match record {
            RecordType::Device => {
                if all_declared || device != stream.declared {
                    return Err(DecodeErrorKind::UnexpectedDeviceRecord {
                        found: device,
                        expected: (!all_declared).then_some(stream.declared),
                    });
                }
                MAX_DEVICE_BODY_LEN as u32
            }
            RecordType::Data | RecordType::DeviceEnd => {
                let progress = stream.devices.get(usize::from(device)).ok_or(
                    DecodeErrorKind::UndeclaredDevice {
                        record,
                        device,
                        count,
                    },
                )?;
                if progress.ended {
                    return Err(DecodeErrorKind::AfterDeviceEnd { record, device });
                }
                if record == RecordType::Data {
                    let phase =
                        Phase::from_u8(frame.phase).ok_or(DecodeErrorKind::UnknownPhase {
                            device,
                            phase: frame.phase,
                        })?;
                    if phase == Phase::PreCopy && progress.stop_copy_started {
                        return Err(DecodeErrorKind::PhaseRegression { device, phase });
                    }
                    if u64::from(frame.sequence) != progress.next_sequence {
                        return Err(DecodeErrorKind::OutOfOrderSequence {
                            device,
                            // Only below 2^32 can it equal a u32 read from the frame; past
                            // that every sequence number is out of order.
                            expected: progress.next_sequence.min(u32::MAX.into()) as u32,
                            found: frame.sequence,
                        });
                    }
                    if frame.body_len == 0 {
                        return Err(DecodeErrorKind::EmptyChunk { device });
                    }
                    if frame.body_len > stream.header.max_chunk {
                        return Err(DecodeErrorKind::LengthOverLimit {
                            what: format!("DATA payload of device {device}"),
                            len: frame.body_len.into(),
                            limit: stream.header.max_chunk.into(),
                        });
                    }
                    stream.header.max_chunk
                } else {
                    exact_len(record, frame.body_len, DEVICE_END_LEN)?;
                    DEVICE_END_LEN as u32
                }
            }
            RecordType::End => {
                if let Some(open) = stream.devices.iter().position(|d| !d.ended) {
                    return Err(DecodeErrorKind::DeviceNotEnded {
                        // Positions are below MAX_DEVICES.
                        device: open as u16,
                    });
                }
                exact_len(record, frame.body_len, END_LEN)?;
                END_LEN as u32
            }
            RecordType::Abort => MAX_ABORT_REASON_LEN as u32,
        };
        if frame.body_len > max_body {
            return Err(DecodeErrorKind::LengthOverLimit {
                what: format!("{record} body"),
                len: frame.body_len.into(),
                limit: max_body.into(),
            });
        }
        if record != RecordType::End {
            self.chain.update(&b[..16]);
        }
        if frame.body_len == 0 {
            return self.body(&frame, record, &[]);
        }
        self.unit = Unit::Body(frame, record);
        Ok(None)
    }

    /// Checks and decodes a body whose frame `frame` accepted.
    fn body<'b>(
        &mut self,
        frame: &Frame,
        record: RecordType,
        b: &'b [u8],
    ) -> Result<Option<Event<'b>>, DecodeErrorKind> {
        let computed = crc32(b);
        if computed != frame.body_crc {
            let what = match record {
                RecordType::Data => format!(
                    "DATA payload of device {} chunk {}",
                    frame.device, frame.sequence
                ),
                _ => format!("{record} body"),
            };
            return Err(checksum(&what, frame.body_crc, computed));
        }
        let Some(stream) = self.stream.as_mut() else {
            unreachable!("bodies are read only after the header")
        };
        let device = frame.device;
        self.unit = Unit::Frame;
        let event = match record {
            RecordType::Device => {
                let info =
                    DeviceInfo::decode_body(b).map_err(|e| DecodeErrorKind::BadDeviceRecord {
                        device,
                        problem: device_problem(e),
                    })?;
                stream.declared += 1;
                Event::Device {
                    index: device,
                    info,
                }
            }
            RecordType::Data => {
                // The frame check accepted the phase already; this only avoids a panic path.
                let phase = Phase::from_u8(frame.phase).ok_or(DecodeErrorKind::UnknownPhase {
                    device,
                    phase: frame.phase,
                })?;
                let progress = &mut stream.devices[usize::from(device)];
                progress.next_sequence += 1;
                progress.stop_copy_started |= phase == Phase::StopCopy;
                progress.totals.phase_mut(phase).add(b.len());
                stream.bytes += b.len() as u64;
                stream.chunks += 1;
                Event::Data(Chunk {
                    device,
                    phase,
                    sequence: frame.sequence,
                    payload: b,
                })
            }
            RecordType::DeviceEnd => {
                let stated = DeviceTotals::decode(b);
                let progress = &mut stream.devices[usize::from(device)];
                let counted = progress.totals;
                for (field, s, c) in [
                    (
                        "pre-copy bytes",
                        stated.pre_copy.bytes,
                        counted.pre_copy.bytes,
                    ),
                    (
                        "pre-copy chunks",
                        stated.pre_copy.chunks,
                        counted.pre_copy.chunks,
                    ),
                    (
                        "stop-copy bytes",
                        stated.stop_copy.bytes,
                        counted.stop_copy.bytes,
                    ),
                    (
                        "stop-copy chunks",
                        stated.stop_copy.chunks,
                        counted.stop_copy.chunks,
                    ),
                ] {
                    if s != c {
                        return Err(DecodeErrorKind::DeviceTotalsMismatch {
                            device,
                            field,
                            stored: s,
                            counted: c,
                        });
                    }
                }
                progress.ended = true;
                Event::DeviceEnd {
                    device,
                    totals: counted,
                }
            }
            RecordType::End => {
                let stated = StreamTotals::decode(b);
                for (field, s, c) in [
                    (
                        "devices",
                        u64::from(stated.devices),
                        u64::from(stream.header.device_count),
                    ),
                    ("chunks", stated.chunks, stream.chunks),
                    ("bytes", stated.bytes, stream.bytes),
                ] {
                    if s != c {
                        return Err(DecodeErrorKind::EndTotalsMismatch {
                            field,
                            stored: s,
                            counted: c,
                        });
                    }
                }
                let chain = self.chain.clone().finalize();
                if stated.chain_crc != chain {
                    return Err(checksum(
                        "chain (header and record frames)",
                        stated.chain_crc,
                        chain,
                    ));
                }
                self.unit = Unit::Done(Outcome::Complete(stated));
                Event::End(stated)
            }
            RecordType::Abort => {
                let reason = std::str::from_utf8(b)
                    .map_err(|_| DecodeErrorKind::NotUtf8 {
                        what: "ABORT reason",
                    })?
                    .to_owned();
                self.unit = Unit::Done(Outcome::Aborted(reason.clone()));
                Event::Abort { reason }
            }
        };
        Ok(Some(event))
    }
}

fn checksum(what: &str, stored: u32, computed: u32) -> DecodeErrorKind {
    DecodeErrorKind::Checksum {
        what: what.to_owned(),
        stored,
        computed,
    }
}

fn exact_len(record: RecordType, len: u32, expected: usize) -> Result<(), DecodeErrorKind> {
    if len as usize == expected {
        Ok(())
    } else {
        Err(DecodeErrorKind::BadRecordLength {
            record,
            len,
            expected: expected as u32,
        })
    }
}

fn device_problem(e: DeviceBodyError) -> String {
    match e {
        DeviceBodyError::Length { len, expected } => {
            format!("body is {len} bytes but its fields need {expected}")
        }
        DeviceBodyError::Reserved => "reserved bytes are not zero".to_owned(),
        DeviceBodyError::CompatTooLong { len } => format!(
            "compatibility data is {len} bytes; the limit is {}",
            crate::MAX_COMPAT_LEN
        ),
        DeviceBodyError::Features(bits) => {
            format!("migration features {bits:#x} lack the mandatory STOP_COPY bit (0x1)")
        }
        DeviceBodyError::Utf8 { field } => format!("{field} is not valid UTF-8"),
        DeviceBodyError::Invalid(e) => e.to_string(),
    }
}
