//! The resuming side: parse the stream incrementally and write record data straight into the
//! state buffer. At most one header (48 bytes) is ever buffered; the state is never held twice.
//!
//! Each page is hashed when a record has written its last byte (records carry whole pages,
//! so the page then holds exactly that record's copy), replacing the term of any earlier
//! copy. Leaving RESUMING compares the sum of the terms with the trailer's
//! [`state_hash`](super::format::state_hash): no pass over the state, however often pages
//! were sent again.

use vfio_mig_device::DeviceError;

use super::content::{page_of, PageBitmap, PageHashes};
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
    /// Pages a record has written completely.
    received: PageBitmap,
    /// The term of each received page's last copy.
    hashes: PageHashes,
    trailer: Option<Trailer>,
    /// The first error: once refused, the stream stays refused.
    failed: Option<StreamError>,
}

impl ResumeSession {
    /// `ENOMEM` when the page hashes (8 bytes per page) cannot be allocated.
    pub(crate) fn new(size: u64) -> Result<Self, DeviceError> {
        Ok(ResumeSession {
            size,
            phase: Phase::Header,
            small: [0; HEADER_LEN],
            got: 0,
            stream_pos: 0,
            record_at: 0,
            records: 0,
            data_bytes: 0,
            received: PageBitmap::new(size / PAGE_SIZE),
            hashes: PageHashes::new(size / PAGE_SIZE)?,
            trailer: None,
            failed: None,
        })
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
                    let stop = pos + k;
                    // Page by page, so a page just written is still in L1 when it is hashed.
                    let mut at = pos;
                    while at < stop {
                        let page = at / PAGE_SIZE;
                        let seg_end = ((page + 1) * PAGE_SIZE).min(stop);
                        let from = (at - pos) as usize;
                        let seg_len = (seg_end - at) as usize;
                        state[at as usize..at as usize + seg_len]
                            .copy_from_slice(&input[from..from + seg_len]);
                        if seg_end % PAGE_SIZE == 0 {
                            // The record began at a page boundary, so all of this page is
                            // its copy now.
                            self.hashes.update(page, page_of(state, page));
                            self.received.set(page);
                        }
                        at = seg_end;
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

    /// Checks that the stream was complete and the state is the one the source saved. Costs
    /// no pass over the state: the page hashes were kept up to date while records came in.
    pub(crate) fn finish(&self) -> Result<(), StreamError> {
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
        let resumed = self.hashes.sum();
        if resumed != trailer.state_hash {
            return Err(StreamError::DigestMismatch {
                stream: trailer.state_hash,
                resumed,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::content::{generate, SplitMix};
    use super::super::format::{state_hash, RECORD_MAX};
    use super::super::save::SaveSession;
    use super::*;

    fn saved(size: u64, seed: u64) -> (Vec<u8>, Vec<u8>) {
        let state = generate(size, seed).unwrap();
        let mut dirty = PageBitmap::new(size / PAGE_SIZE);
        let mut s = SaveSession::new(size, seed, true).unwrap();
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
            let mut r = ResumeSession::new(size).unwrap();
            for piece in stream.chunks(chunk) {
                assert_eq!(r.write(&mut dst, piece).unwrap(), piece.len());
            }
            r.finish().unwrap();
            assert!(dst == src);
        }
    }

    #[test]
    fn records_out_of_order_and_repeated_are_checked_by_the_page_hash_sum() {
        let size = 3 * PAGE_SIZE;
        let src = generate(size, 5).unwrap();
        let mut stream = StreamHeader { size, seed: 5 }.encode().to_vec();
        for page in [2u64, 0, 1, 2] {
            let at = (page * PAGE_SIZE) as usize;
            stream.extend_from_slice(&RecordHeader::data(page * PAGE_SIZE, PAGE_SIZE).encode());
            stream.extend_from_slice(&src[at..at + PAGE_SIZE as usize]);
        }
        let trailer = Trailer {
            state_hash: state_hash(&src),
            data_bytes: 4 * PAGE_SIZE,
        };
        stream.extend_from_slice(&trailer.encode());
        let mut dst = vec![0u8; size as usize];
        let mut r = ResumeSession::new(size).unwrap();
        r.write(&mut dst, &stream).unwrap();
        r.finish().unwrap();
        assert!(dst == src);
        // Same stream, one byte of the last (repeated) record flipped.
        let flip = stream.len() - TRAILER_LEN - 1;
        stream[flip] ^= 1;
        let mut r = ResumeSession::new(size).unwrap();
        r.write(&mut dst, &stream).unwrap();
        assert!(matches!(
            r.finish(),
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
            let mut r = ResumeSession::new(size).unwrap();
            r.write(&mut dst, &stream[..cut]).unwrap();
            let err = r.finish().unwrap_err().to_string();
            assert!(err.contains(want), "cut at {cut}: {err}");
        }
    }

    #[test]
    fn errors_stick_and_trailing_bytes_are_refused() {
        let size = PAGE_SIZE;
        let (_, mut stream) = saved(size, 5);
        let mut dst = vec![0u8; size as usize];
        let mut r = ResumeSession::new(size).unwrap();
        stream.push(0);
        let err = r.write(&mut dst, &stream).unwrap_err();
        assert!(
            matches!(err, StreamError::TrailingBytes { extra: 1, .. }),
            "{err}"
        );
        assert_eq!(r.write(&mut dst, &[1]).unwrap_err(), err);
        assert_eq!(r.finish().unwrap_err(), err);
    }

    /// A stream of a `pages`-page state: one record with all of `first`, then for each
    /// `(page, count, seed)` a record rewriting `count` pages from `page` (clipped to the
    /// state) with contents from `seed`. Returns the final state and the stream.
    fn resent(pages: u64, first: &[u8], resends: &[(u64, u64, u64)]) -> (Vec<u8>, Vec<u8>) {
        let size = pages * PAGE_SIZE;
        let mut state = first.to_vec();
        let mut stream = StreamHeader { size, seed: 0 }.encode().to_vec();
        stream.extend_from_slice(&RecordHeader::data(0, size).encode());
        stream.extend_from_slice(&state);
        let mut data_bytes = size;
        for &(page, count, seed) in resends {
            let page = page % pages;
            let count = count.clamp(1, pages - page);
            let (at, len) = (page * PAGE_SIZE, count * PAGE_SIZE);
            let region = &mut state[at as usize..(at + len) as usize];
            SplitMix::new(seed).fill(region);
            stream.extend_from_slice(&RecordHeader::data(at, len).encode());
            stream.extend_from_slice(region);
            data_bytes += len;
        }
        let trailer = Trailer {
            state_hash: state_hash(&state),
            data_bytes,
        };
        stream.extend_from_slice(&trailer.encode());
        (state, stream)
    }

    proptest! {
        /// With pages sent any number of times and the stream cut into any pieces, the sum
        /// kept while writing equals the state hash computed from scratch over the resumed
        /// state, which is the source's.
        #[test]
        fn the_running_sum_is_the_state_hash_of_the_resumed_state(
            pages in 1u64..20,
            resends in proptest::collection::vec((any::<u64>(), 1u64..6, any::<u64>()), 0..30),
            chunk in 1usize..10_000,
        ) {
            let size = pages * PAGE_SIZE;
            let (src, stream) = resent(pages, &generate(size, 3).unwrap(), &resends);
            let mut dst = generate(size, 4).unwrap();
            let mut r = ResumeSession::new(size).unwrap();
            for piece in stream.chunks(chunk) {
                r.write(&mut dst, piece).unwrap();
            }
            prop_assert_eq!(r.hashes.sum(), state_hash(&dst));
            prop_assert!(dst == src);
            r.finish().unwrap();
        }

        /// Any single flipped bit in the last copy of a page is refused when leaving
        /// RESUMING (a flip in an earlier copy is overwritten, so it changes nothing).
        #[test]
        fn a_flipped_data_bit_in_a_last_copy_is_refused(
            resends in proptest::collection::vec((any::<u64>(), 1u64..4, any::<u64>()), 1..8),
            pick in any::<proptest::sample::Index>(),
            bit in 0u8..8,
        ) {
            let pages = 6;
            let (_, mut stream) = resent(pages, &generate(pages * PAGE_SIZE, 3).unwrap(), &resends);
            // For every state byte, the stream offset of its last copy.
            let mut last_copy = vec![0usize; (pages * PAGE_SIZE) as usize];
            let mut at = HEADER_LEN;
            while at < stream.len() - TRAILER_LEN {
                let header = RecordHeader::decode(stream[at..at + 16].try_into().unwrap());
                let start = at + RECORD_HEADER_LEN;
                let offset = header.offset as usize;
                for i in 0..header.length as usize {
                    last_copy[offset + i] = start + i;
                }
                at = start + header.length as usize;
            }
            let data = last_copy;
            stream[*pick.get(&data)] ^= 1 << bit;
            let mut dst = vec![0u8; (pages * PAGE_SIZE) as usize];
            let mut r = ResumeSession::new(pages * PAGE_SIZE).unwrap();
            r.write(&mut dst, &stream).unwrap();
            prop_assert!(
                matches!(r.finish(), Err(StreamError::DigestMismatch { .. })),
                "{:?}",
                r.finish()
            );
        }
    }

    #[test]
    fn a_stale_copy_replayed_after_the_fresh_one_is_refused() {
        let pages = 4;
        let first = generate(pages * PAGE_SIZE, 3).unwrap();
        // Page 2 sent three times: initial, then two fresh copies.
        let (state, stream) = resent(pages, &first, &[(2, 1, 10), (2, 1, 11)]);
        let record = RECORD_HEADER_LEN + PAGE_SIZE as usize;
        let second = HEADER_LEN + RECORD_HEADER_LEN + (pages * PAGE_SIZE) as usize;
        let third = second + record;
        assert_ne!(stream[second..third], stream[third..third + record]);
        let resume = |stream: &[u8]| {
            let mut dst = vec![0u8; state.len()];
            let mut r = ResumeSession::new(pages * PAGE_SIZE).unwrap();
            r.write(&mut dst, stream).unwrap();
            r.finish()
        };
        resume(&stream).unwrap();
        // The two re-sends swapped: same records, same byte count, the stale copy last.
        let mut swapped = stream.clone();
        swapped[second..third + record].rotate_left(record);
        assert!(matches!(
            resume(&swapped),
            Err(StreamError::DigestMismatch { .. })
        ));
        // The second copy's contents replayed in the third record.
        let mut replayed = stream.clone();
        replayed.copy_within(second + RECORD_HEADER_LEN..third, third + RECORD_HEADER_LEN);
        assert!(matches!(
            resume(&replayed),
            Err(StreamError::DigestMismatch { .. })
        ));
    }
}
