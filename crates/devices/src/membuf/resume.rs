//! The resuming side: parse the stream incrementally and write record data straight into the
//! state buffer. At most one header (48 bytes) is ever buffered; the state is never held twice.

use super::content::{digest, PageBitmap, RunningDigest};
use super::format::{
    RecordHeader, StreamError, StreamHeader, Trailer, HEADER_LEN, PAGE_SIZE, RECORD_DATA,
    RECORD_HEADER_LEN, TRAILER_LEN,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Header,
    RecordHeader,
    Data { pos: u64, end: u64, len: u64 },
    Trailer,
    Done,
}

/// One resuming session (STOP -> RESUMING -> STOP).
#[derive(Debug)]
pub(crate) struct ResumeSession {
    size: u64,
    phase: Phase,
    small: [u8; HEADER_LEN],
    got: usize,
    /// Bytes of stream taken so far.
    stream_pos: u64,
    /// Stream offset of the record being read.
    record_at: u64,
    records: u64,
    data_bytes: u64,
    received: PageBitmap,
    trailer: Option<Trailer>,
    /// The digest of the data so far while it came in order from offset 0 with nothing sent
    /// twice (a stream saved without pre-copy), saving a pass over the state at the end.
    in_order_hash: Option<RunningDigest>,
    /// The first error: once refused, the stream stays refused.
    failed: Option<StreamError>,
}

impl ResumeSession {
    pub(crate) fn new(size: u64) -> Self {
        ResumeSession {
            size,
            phase: Phase::Header,
            small: [0; HEADER_LEN],
            got: 0,
            stream_pos: 0,
            record_at: 0,
            records: 0,
            data_bytes: 0,
            received: PageBitmap::new(size / PAGE_SIZE),
            trailer: None,
            in_order_hash: Some(RunningDigest::new()),
            failed: None,
        }
    }

    /// Takes all of `input`, writing record data into `state`.
    pub(crate) fn write(&mut self, state: &mut [u8], input: &[u8]) -> Result<usize, StreamError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        self.take(state, input)
            .inspect_err(|e| self.failed = Some(e.clone()))?;
        Ok(input.len())
    }

    /// Fills the small buffer up to `want` bytes; true when it is full.
    fn gather(&mut self, input: &mut &[u8], want: usize) -> bool {
        let k = (want - self.got).min(input.len());
        self.small[self.got..self.got + k].copy_from_slice(&input[..k]);
        self.got += k;
        self.stream_pos += k as u64;
        *input = &input[k..];
        self.got == want
    }

    fn take(&mut self, state: &mut [u8], mut input: &[u8]) -> Result<(), StreamError> {
        while !input.is_empty() {
            match self.phase {
                Phase::Header => {
                    if self.gather(&mut input, HEADER_LEN) {
                        let header = StreamHeader::decode(&self.small)?;
                        if header.size != self.size {
                            return Err(StreamError::SizeMismatch {
                                stream: header.size,
                                device: self.size,
                            });
                        }
                        self.got = 0;
                        self.record_at = self.stream_pos;
                        self.phase = Phase::RecordHeader;
                    }
                }
                Phase::RecordHeader => {
                    if self.gather(&mut input, RECORD_HEADER_LEN) {
                        let mut b = [0u8; RECORD_HEADER_LEN];
                        b.copy_from_slice(&self.small[..RECORD_HEADER_LEN]);
                        let header = RecordHeader::decode(&b);
                        header.check(self.size, self.records, self.record_at)?;
                        self.got = 0;
                        self.phase = if header.kind == RECORD_DATA {
                            let len = u64::from(header.length);
                            Phase::Data {
                                pos: header.offset,
                                end: header.offset + len,
                                len,
                            }
                        } else {
                            Phase::Trailer
                        };
                    }
                }
                Phase::Data { pos, end, len } => {
                    let k = (end - pos).min(input.len() as u64);
                    let at = pos as usize;
                    state[at..at + k as usize].copy_from_slice(&input[..k as usize]);
                    if self.data_bytes != pos {
                        self.in_order_hash = None;
                    } else if let Some(hash) = self.in_order_hash.as_mut() {
                        hash.update(&input[..k as usize]);
                    }
                    for page in pos / PAGE_SIZE..(pos + k).div_ceil(PAGE_SIZE) {
                        self.received.set(page);
                    }
                    input = &input[k as usize..];
                    self.stream_pos += k;
                    self.data_bytes += k;
                    if pos + k == end {
                        self.records += 1;
                        self.record_at = self.stream_pos;
                        self.phase = Phase::RecordHeader;
                    } else {
                        self.phase = Phase::Data {
                            pos: pos + k,
                            end,
                            len,
                        };
                    }
                }
                Phase::Trailer => {
                    let want = TRAILER_LEN - RECORD_HEADER_LEN;
                    if self.gather(&mut input, want) {
                        let mut b = [0u8; TRAILER_LEN - RECORD_HEADER_LEN];
                        b.copy_from_slice(&self.small[..want]);
                        self.trailer = Some(Trailer::decode(&b));
                        self.phase = Phase::Done;
                    }
                }
                Phase::Done => {
                    return Err(StreamError::TrailingBytes {
                        extra: input.len(),
                        at: self.stream_pos,
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks that the stream was complete and the state is the one the source saved.
    pub(crate) fn finish(&self, state: &[u8]) -> Result<(), StreamError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let truncated = |part, total: usize| StreamError::Truncated {
            part,
            total: total as u64,
            missing: (total - self.got) as u64,
        };
        let trailer = match self.phase {
            Phase::Header => return Err(truncated("header", HEADER_LEN)),
            Phase::RecordHeader if self.got == 0 => {
                return Err(StreamError::NoTrailer {
                    records: self.records,
                    data_bytes: self.data_bytes,
                })
            }
            Phase::RecordHeader => return Err(truncated("record header", RECORD_HEADER_LEN)),
            Phase::Data { pos, end, len } => {
                return Err(StreamError::Truncated {
                    part: "record",
                    total: len,
                    missing: end - pos,
                })
            }
            Phase::Trailer => return Err(truncated("trailer", TRAILER_LEN - RECORD_HEADER_LEN)),
            Phase::Done => self.trailer.ok_or(StreamError::NoTrailer {
                records: self.records,
                data_bytes: self.data_bytes,
            })?,
        };
        if let Some(first) = self.received.first_unset() {
            return Err(StreamError::Incomplete {
                missing: self.received.pages() - self.received.count(),
                pages: self.received.pages(),
                first: first * PAGE_SIZE,
            });
        }
        if trailer.data_bytes != self.data_bytes {
            return Err(StreamError::DataBytes {
                received: self.data_bytes,
                sent: trailer.data_bytes,
            });
        }
        let resumed = match &self.in_order_hash {
            Some(hash) if self.data_bytes == self.size => hash.digest(),
            _ => digest(state),
        };
        if resumed != trailer.digest {
            return Err(StreamError::DigestMismatch {
                stream: trailer.digest,
                resumed,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::content::generate;
    use super::super::format::RECORD_MAX;
    use super::super::save::SaveSession;
    use super::*;

    fn saved(size: u64, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let state = generate(size, seed).unwrap();
        let mut dirty = PageBitmap::new(size / PAGE_SIZE);
        let mut s = SaveSession::new(size, seed, true);
        let mut out = vec![0u8; super::super::format::full_stream_len(size) as usize];
        let n = s.read(&state, &mut dirty, &mut out);
        assert_eq!(n, out.len());
        (state, out)
    }

    #[test]
    fn resumes_byte_by_byte_and_in_one_piece() {
        let size = RECORD_MAX + 2 * PAGE_SIZE;
        let (src, stream) = saved(size, 5);
        for chunk in [1usize, 13, 4096, stream.len()] {
            let mut dst = generate(size, 6).unwrap();
            let mut r = ResumeSession::new(size);
            for piece in stream.chunks(chunk) {
                assert_eq!(r.write(&mut dst, piece).unwrap(), piece.len());
            }
            r.finish(&dst).unwrap();
            assert!(dst == src);
        }
    }

    #[test]
    fn records_out_of_order_are_checked_by_a_full_digest() {
        let size = 3 * PAGE_SIZE;
        let src = generate(size, 5).unwrap();
        let mut stream = StreamHeader { size, seed: 5 }.encode().to_vec();
        for page in [2u64, 0, 1, 2] {
            let at = (page * PAGE_SIZE) as usize;
            stream.extend_from_slice(&RecordHeader::data(page * PAGE_SIZE, PAGE_SIZE).encode());
            stream.extend_from_slice(&src[at..at + PAGE_SIZE as usize]);
        }
        let trailer = Trailer {
            digest: digest(&src),
            data_bytes: 4 * PAGE_SIZE,
        };
        stream.extend_from_slice(&trailer.encode());
        let mut dst = vec![0u8; size as usize];
        let mut r = ResumeSession::new(size);
        r.write(&mut dst, &stream).unwrap();
        r.finish(&dst).unwrap();
        assert!(dst == src);
        // Same stream, one byte of the last (repeated) record flipped.
        let flip = stream.len() - TRAILER_LEN - 1;
        stream[flip] ^= 1;
        let mut r = ResumeSession::new(size);
        r.write(&mut dst, &stream).unwrap();
        assert!(matches!(
            r.finish(&dst),
            Err(StreamError::DigestMismatch { .. })
        ));
    }

    #[test]
    fn every_truncation_is_named() {
        let size = 2 * PAGE_SIZE;
        let (_, stream) = saved(size, 5);
        let cases: [(usize, &str); 5] = [
            (20, "truncated: 28 bytes of a 48-byte header missing"),
            (
                48 + 4,
                "truncated: 12 bytes of a 16-byte record header missing",
            ),
            (
                48 + 16 + 100,
                "truncated: 8092 bytes of a 8192-byte record missing",
            ),
            (
                48 + 16 + 8192,
                "it ends after 1 records and 8192 data bytes without a trailer",
            ),
            (
                48 + 16 + 8192 + 16 + 3,
                "truncated: 13 bytes of a 16-byte trailer missing",
            ),
        ];
        for (cut, want) in cases {
            let mut dst = vec![0u8; size as usize];
            let mut r = ResumeSession::new(size);
            r.write(&mut dst, &stream[..cut]).unwrap();
            let err = r.finish(&dst).unwrap_err().to_string();
            assert!(err.contains(want), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn errors_stick_and_trailing_bytes_are_refused() {
        let size = PAGE_SIZE;
        let (_, mut stream) = saved(size, 5);
        let mut dst = vec![0u8; size as usize];
        let mut r = ResumeSession::new(size);
        stream.push(0);
        let err = r.write(&mut dst, &stream).unwrap_err();
        assert!(
            matches!(err, StreamError::TrailingBytes { extra: 1, .. }),
            "{err}"
        );
        assert_eq!(r.write(&mut dst, &[1]).unwrap_err(), err);
        assert_eq!(r.finish(&dst).unwrap_err(), err);
    }
}
