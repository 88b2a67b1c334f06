//! The encoder: turns a migration's events into stream bytes.

use crate::error::EncodeError;
use crate::record::{DeviceInfo, DeviceTotals, StreamTotals};
use crate::wire::{
    crc32, payload_crc, Frame, HeaderFixed, Phase, RecordType, DEFAULT_DECODER_MAX_CHUNK,
    DEFAULT_MAX_CHUNK, FRAME_LEN, MAX_ABORT_REASON_LEN, MAX_DEVICES, MAX_PRODUCER_LEN,
};

/// The stream-wide choices a source makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamConfig {
    /// Who writes the stream, e.g. `vfio-mig 0.1.0` (at most [`crate::MAX_PRODUCER_LEN`]
    /// bytes).
    pub producer: String,
    /// The largest DATA payload the encoder will accept, stated in the header (1 byte to
    /// [`DEFAULT_DECODER_MAX_CHUNK`]).
    pub max_chunk: u32,
    /// Creation time in milliseconds since the Unix epoch, or 0 to leave it out. The encoder
    /// reads no clock, so the caller supplies it.
    pub created_unix_ms: u64,
}

impl Default for StreamConfig {
    /// Producer `vfio-mig <version>`, 1 MiB chunks, no creation time.
    fn default() -> Self {
        StreamConfig {
            producer: concat!("vfio-mig ", env!("CARGO_PKG_VERSION")).to_owned(),
            max_chunk: DEFAULT_MAX_CHUNK,
            created_unix_ms: 0,
        }
    }
}

#[derive(Clone, Debug, Default)]
struct DeviceProgress {
    /// Next sequence number; a `u64` so that exhausting the `u32` space is detectable.
    next_sequence: u64,
    stop_copy_started: bool,
    ended: bool,
    totals: DeviceTotals,
}

/// Writes a stream, one record at a time, refusing anything the decoder would reject.
///
/// Sans-IO: every method appends bytes to a caller's `Vec<u8>` or returns a small byte array;
/// the caller sends them (to a file, a socket, ...) in the order it received them. For DATA,
/// [`Encoder::chunk_frame`] returns only the 20-byte frame, so the payload can be written from
/// where it already lies (e.g. with a vectored write) without being copied.
#[derive(Debug)]
pub struct Encoder {
    max_chunk: u32,
    devices: Vec<DeviceProgress>,
    bytes: u64,
    chunks: u64,
    /// The END record's chain CRC so far: header and frames, each without its own CRC.
    chain: crc32fast::Hasher,
    finished: bool,
}

impl Encoder {
    /// Starts a stream carrying `devices` (indices are positions in the slice): appends the
    /// header and every DEVICE record to `out`.
    pub fn new(
        config: &StreamConfig,
        devices: &[DeviceInfo],
        out: &mut Vec<u8>,
    ) -> Result<Encoder, EncodeError> {
        let device_count = match u16::try_from(devices.len()) {
            Ok(n) if (1..=MAX_DEVICES).contains(&n) => n,
            _ => {
                return Err(EncodeError::DeviceCount {
                    count: devices.len(),
                    max: MAX_DEVICES,
                })
            }
        };
        if config.producer.len() > MAX_PRODUCER_LEN {
            return Err(EncodeError::ProducerTooLong {
                len: config.producer.len(),
                limit: MAX_PRODUCER_LEN,
            });
        }
        if config.max_chunk == 0 || config.max_chunk > DEFAULT_DECODER_MAX_CHUNK {
            return Err(EncodeError::MaxChunk(config.max_chunk));
        }
        for (index, info) in (0u16..).zip(devices) {
            info.validate().map_err(|source| EncodeError::Device {
                device: index,
                source,
            })?;
        }

        let header = HeaderFixed {
            flags: 0,
            max_chunk: config.max_chunk,
            device_count,
            // Bounded by MAX_PRODUCER_LEN above.
            producer_len: config.producer.len() as u16,
            created_unix_ms: config.created_unix_ms,
            producer_crc: crc32(config.producer.as_bytes()),
        }
        .encode();
        // The chain leaves out each part's own CRC: a message followed by its own CRC leaves
        // a CRC register in a state that does not depend on the message.
        let mut chain = crc32fast::Hasher::new();
        chain.update(&header[..32]);
        out.extend_from_slice(&header);
        out.extend_from_slice(config.producer.as_bytes());

        for (index, info) in (0u16..).zip(devices) {
            out.reserve(FRAME_LEN + info.body_len());
            let body_start = out.len() + FRAME_LEN;
            out.resize(body_start, 0);
            info.encode_body(out);
            let body = &out[body_start..];
            let frame = Frame {
                record_type: RecordType::Device as u8,
                phase: 0,
                device: index,
                sequence: 0,
                // A DEVICE body is at most MAX_DEVICE_BODY_LEN bytes.
                body_len: body.len() as u32,
                body_crc: crc32(body),
            }
            .encode();
            chain.update(&frame[..16]);
            out[body_start - FRAME_LEN..body_start].copy_from_slice(&frame);
        }

        Ok(Encoder {
            max_chunk: config.max_chunk,
            devices: vec![DeviceProgress::default(); devices.len()],
            bytes: 0,
            chunks: 0,
            chain,
            finished: false,
        })
    }

    /// The largest payload [`Encoder::chunk_frame`] accepts.
    pub fn max_chunk(&self) -> u32 {
        self.max_chunk
    }

    /// How many devices the stream carries.
    pub fn device_count(&self) -> u16 {
        // At most MAX_DEVICES, checked in `new`.
        self.devices.len() as u16
    }

    /// What has been written for `device` so far, or `None` for an unknown index.
    pub fn device_totals(&self, device: u16) -> Option<DeviceTotals> {
        self.devices.get(usize::from(device)).map(|d| d.totals)
    }

    /// Whether END or ABORT has been written.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// The frame of a DATA record carrying `payload` for `device`; the caller writes these
    /// 20 bytes and then `payload` itself.
    ///
    /// Chunks of one device must be written in the order they were read from it; chunks of
    /// different devices may interleave. All of a device's pre-copy chunks come before its
    /// stop-copy chunks.
    pub fn chunk_frame(
        &mut self,
        device: u16,
        phase: Phase,
        payload: &[u8],
    ) -> Result<[u8; FRAME_LEN], EncodeError> {
        self.check_chunk(device, phase, payload.len())?;
        Ok(self.commit_chunk(device, phase, payload.len(), payload_crc(payload)))
    }

    /// [`Encoder::chunk_frame`] for a payload whose checksum the caller computed with
    /// [`crate::payload_crc`] (e.g. on the thread that read it from the device), so that the
    /// encoder need not see the bytes.
    ///
    /// A wrong `crc` makes the decoder reject the stream; it cannot corrupt it silently.
    pub fn chunk_frame_with_crc(
        &mut self,
        device: u16,
        phase: Phase,
        len: usize,
        crc: u32,
    ) -> Result<[u8; FRAME_LEN], EncodeError> {
        self.check_chunk(device, phase, len)?;
        Ok(self.commit_chunk(device, phase, len, crc))
    }

    /// Appends a whole DATA record (frame and `payload`) to `out`.
    pub fn write_chunk(
        &mut self,
        device: u16,
        phase: Phase,
        payload: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), EncodeError> {
        let frame = self.chunk_frame(device, phase, payload)?;
        out.reserve(FRAME_LEN + payload.len());
        out.extend_from_slice(&frame);
        out.extend_from_slice(payload);
        Ok(())
    }

    /// Appends the DEVICE_END record of `device` and returns what it states.
    pub fn end_device(
        &mut self,
        device: u16,
        out: &mut Vec<u8>,
    ) -> Result<DeviceTotals, EncodeError> {
        self.check_open()?;
        let progress = self.device(device)?;
        if progress.ended {
            return Err(EncodeError::DeviceEnded { device });
        }
        progress.ended = true;
        let totals = progress.totals;
        self.write_record(RecordType::DeviceEnd, device, &totals.encode(), out);
        Ok(totals)
    }

    /// Appends the END record; every device must have ended.
    pub fn end(&mut self, out: &mut Vec<u8>) -> Result<StreamTotals, EncodeError> {
        self.check_open()?;
        if let Some(device) = self.devices.iter().position(|d| !d.ended) {
            // Positions are below MAX_DEVICES.
            return Err(EncodeError::DeviceNotEnded {
                device: device as u16,
            });
        }
        let totals = StreamTotals {
            bytes: self.bytes,
            chunks: self.chunks,
            devices: self.devices.len() as u32,
            chain_crc: self.chain.clone().finalize(),
        };
        self.write_record(RecordType::End, 0, &totals.encode(), out);
        self.finished = true;
        Ok(totals)
    }

    /// Appends an ABORT record telling the destination that the source gave up and why.
    ///
    /// Allowed at any point before END; `reason` is cut (at a character boundary) to
    /// [`crate::MAX_ABORT_REASON_LEN`] bytes.
    pub fn abort(&mut self, reason: &str, out: &mut Vec<u8>) -> Result<(), EncodeError> {
        self.check_open()?;
        let mut cut = reason.len().min(MAX_ABORT_REASON_LEN);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        self.write_record(RecordType::Abort, 0, &reason.as_bytes()[..cut], out);
        self.finished = true;
        Ok(())
    }

    fn check_open(&self) -> Result<(), EncodeError> {
        if self.finished {
            Err(EncodeError::StreamEnded)
        } else {
            Ok(())
        }
    }

    fn device(&mut self, device: u16) -> Result<&mut DeviceProgress, EncodeError> {
        let count = self.device_count();
        self.devices
            .get_mut(usize::from(device))
            .ok_or(EncodeError::UnknownDevice { device, count })
    }

    fn check_chunk(&mut self, device: u16, phase: Phase, len: usize) -> Result<(), EncodeError> {
        self.check_open()?;
        let limit = self.max_chunk;
        let progress = self.device(device)?;
        if progress.ended {
            return Err(EncodeError::DeviceEnded { device });
        }
        if len == 0 {
            return Err(EncodeError::EmptyChunk { device });
        }
        if len > limit as usize {
            return Err(EncodeError::ChunkTooLarge { len, limit });
        }
        if phase == Phase::PreCopy && progress.stop_copy_started {
            return Err(EncodeError::PhaseRegression { device });
        }
        if progress.next_sequence > u64::from(u32::MAX) {
            return Err(EncodeError::SequenceExhausted { device });
        }
        Ok(())
    }

    /// Records a chunk that `check_chunk` accepted and builds its frame.
    fn commit_chunk(&mut self, device: u16, phase: Phase, len: usize, crc: u32) -> [u8; FRAME_LEN] {
        let progress = &mut self.devices[usize::from(device)];
        // `check_chunk` bounded the sequence number and the length.
        let sequence = progress.next_sequence as u32;
        progress.next_sequence += 1;
        progress.stop_copy_started |= phase == Phase::StopCopy;
        progress.totals.phase_mut(phase).add(len);
        self.bytes += len as u64;
        self.chunks += 1;
        let frame = Frame {
            record_type: RecordType::Data as u8,
            phase: phase as u8,
            device,
            sequence,
            body_len: len as u32,
            body_crc: crc,
        }
        .encode();
        self.chain.update(&frame[..16]);
        frame
    }

    fn write_record(&mut self, record: RecordType, device: u16, body: &[u8], out: &mut Vec<u8>) {
        let frame = Frame {
            record_type: record as u8,
            phase: 0,
            device,
            sequence: 0,
            // Bodies written here are at most MAX_ABORT_REASON_LEN bytes.
            body_len: body.len() as u32,
            body_crc: crc32(body),
        }
        .encode();
        // The END frame itself is not part of the chain it carries.
        if record != RecordType::End {
            self.chain.update(&frame[..16]);
        }
        out.extend_from_slice(&frame);
        out.extend_from_slice(body);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_mig_uapi::MigrationFeatures;

    fn dev(kind: &str) -> DeviceInfo {
        DeviceInfo {
            name: format!("{kind}0"),
            kind: kind.into(),
            version: "1".into(),
            compat: vec![],
            features: MigrationFeatures::ALL,
            data_size_estimate: 0,
        }
    }

    fn config(max_chunk: u32) -> StreamConfig {
        StreamConfig {
            max_chunk,
            ..StreamConfig::default()
        }
    }

    #[test]
    fn refuses_what_the_decoder_would_reject() {
        let mut out = Vec::new();
        assert!(matches!(
            Encoder::new(&config(16), &[], &mut out),
            Err(EncodeError::DeviceCount { count: 0, .. })
        ));
        assert_eq!(
            Encoder::new(&config(0), &[dev("a")], &mut out).unwrap_err(),
            EncodeError::MaxChunk(0)
        );
        assert_eq!(
            Encoder::new(
                &config(DEFAULT_DECODER_MAX_CHUNK + 1),
                &[dev("a")],
                &mut out
            )
            .unwrap_err(),
            EncodeError::MaxChunk(DEFAULT_DECODER_MAX_CHUNK + 1)
        );
        let long = StreamConfig {
            producer: "x".repeat(MAX_PRODUCER_LEN + 1),
            ..config(16)
        };
        assert!(matches!(
            Encoder::new(&long, &[dev("a")], &mut out),
            Err(EncodeError::ProducerTooLong { .. })
        ));
        assert!(matches!(
            Encoder::new(&config(16), &[dev("a"), dev("")], &mut out),
            Err(EncodeError::Device { device: 1, .. })
        ));
        assert!(out.is_empty(), "nothing is written for a refused stream");

        let mut enc = Encoder::new(&config(16), &[dev("a"), dev("b")], &mut out).unwrap();
        assert_eq!(
            enc.chunk_frame(2, Phase::PreCopy, b"x").unwrap_err(),
            EncodeError::UnknownDevice {
                device: 2,
                count: 2
            }
        );
        assert_eq!(
            enc.chunk_frame(0, Phase::PreCopy, &[0; 17]).unwrap_err(),
            EncodeError::ChunkTooLarge { len: 17, limit: 16 }
        );
        assert_eq!(
            enc.chunk_frame(0, Phase::PreCopy, &[]).unwrap_err(),
            EncodeError::EmptyChunk { device: 0 }
        );
        enc.chunk_frame(0, Phase::StopCopy, b"x").unwrap();
        assert_eq!(
            enc.chunk_frame(0, Phase::PreCopy, b"x").unwrap_err(),
            EncodeError::PhaseRegression { device: 0 }
        );
        assert_eq!(
            enc.end(&mut out).unwrap_err(),
            EncodeError::DeviceNotEnded { device: 0 }
        );
        enc.end_device(0, &mut out).unwrap();
        assert_eq!(
            enc.end_device(0, &mut out).unwrap_err(),
            EncodeError::DeviceEnded { device: 0 }
        );
        assert_eq!(
            enc.chunk_frame(0, Phase::StopCopy, b"x").unwrap_err(),
            EncodeError::DeviceEnded { device: 0 }
        );
        assert_eq!(
            enc.end(&mut out).unwrap_err(),
            EncodeError::DeviceNotEnded { device: 1 }
        );
        enc.end_device(1, &mut out).unwrap();
        let totals = enc.end(&mut out).unwrap();
        assert_eq!((totals.bytes, totals.chunks, totals.devices), (1, 1, 2));
        assert_eq!(
            enc.abort("late", &mut out).unwrap_err(),
            EncodeError::StreamEnded
        );
        assert!(enc.is_finished());
    }

    #[test]
    fn abort_reason_is_cut_at_a_char_boundary() {
        let mut out = Vec::new();
        let mut enc = Encoder::new(&config(16), &[dev("a")], &mut out).unwrap();
        let start = out.len();
        let reason = "é".repeat(MAX_ABORT_REASON_LEN); // 2 bytes each
        enc.abort(&reason, &mut out).unwrap();
        let body = &out[start + FRAME_LEN..];
        assert_eq!(body.len(), MAX_ABORT_REASON_LEN);
        assert!(std::str::from_utf8(body).is_ok());
    }

    #[test]
    fn totals_follow_the_chunks() {
        let mut out = Vec::new();
        let mut enc = Encoder::new(&config(8), &[dev("a")], &mut out).unwrap();
        enc.write_chunk(0, Phase::PreCopy, b"12345678", &mut out)
            .unwrap();
        enc.write_chunk(0, Phase::PreCopy, b"123", &mut out)
            .unwrap();
        let crc = payload_crc(b"ab");
        enc.chunk_frame_with_crc(0, Phase::StopCopy, 2, crc)
            .unwrap();
        let t = enc.device_totals(0).unwrap();
        assert_eq!((t.pre_copy.chunks, t.pre_copy.bytes), (2, 11));
        assert_eq!((t.stop_copy.chunks, t.stop_copy.bytes), (1, 2));
        assert_eq!(enc.device_totals(1), None);
    }
}
