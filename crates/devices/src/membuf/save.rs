//! The saving side: produce the stream straight from the state buffer, no staging copy.
//!
//! The stream is an initial pass over the whole buffer in [`RECORD_MAX`] records, then (while
//! the device runs in PRE_COPY, and once more after it stops) records for the pages dirtied
//! after they were copied, then, only once the device is stopped and nothing is left, the
//! trailer with the [`state_hash`](super::format::state_hash) of the final state.
//!
//! Dirty tracking is exact with respect to copying: the worker marks page `p` dirty when it
//! rewrites it after the first byte of `p` was copied out (for the initial pass: when
//! `p * PAGE_SIZE < initial_pos`), and the bit of a dirty page is cleared when its first byte
//! is copied. Both happen under the state lock, so a page is never both stale and clean.
//!
//! The trailer's value is kept up to date the same way: when the first byte of a page is
//! copied, the whole page is hashed (it is about to be read anyway, so this costs no extra
//! pass over memory) and replaces that page's term. A page rewritten afterwards is dirty and
//! is hashed again when it is sent again, so once the device is stopped and nothing is dirty,
//! every term is that of the page's final contents and the trailer costs nothing to make:
//! the work done while the device is stopped is proportional to the data sent then.

use vfio_mig_device::{DeviceError, PrecopyInfo};

use super::content::{page_of, PageBitmap, PageHashes};
use super::format::{
    record_headers, RecordHeader, StreamHeader, Trailer, HEADER_LEN, PAGE_SIZE, RECORD_HEADER_LEN,
    RECORD_MAX, TRAILER_LEN,
};

const PAGES_PER_RECORD: u64 = RECORD_MAX / PAGE_SIZE;

/// What the pending small piece of framing belongs to, for precopy accounting.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    Initial,
    Dirty,
    Trailer,
}

/// A run of state bytes being copied out.
#[derive(Clone, Copy, Debug)]
struct Run {
    pos: u64,
    end: u64,
    initial: bool,
}

/// One saving session (PRE_COPY -> ... -> STOP_COPY, or STOP_COPY alone).
#[derive(Debug)]
pub(crate) struct SaveSession {
    size: u64,
    seed: u64,
    /// Framing bytes (header, record header or trailer) being emitted.
    small: [u8; HEADER_LEN],
    small_len: usize,
    small_sent: usize,
    small_kind: Framing,
    header_done: bool,
    run: Option<Run>,
    /// State bytes of the initial pass copied out so far.
    initial_pos: u64,
    /// Header and record-header bytes of the initial pass not yet emitted.
    initial_framing_left: u64,
    /// Where the next dirty scan starts (round-robin, so no region starves).
    scan_page: u64,
    /// The device is stopped: once everything is sent, the trailer follows.
    stopped: bool,
    trailer_done: bool,
    data_bytes: u64,
    /// Every page whose copy has begun, hashed when it began (see the module comment).
    hashes: PageHashes,
}

impl SaveSession {
    /// `ENOMEM` when the page hashes (8 bytes per page) cannot be allocated.
    pub(crate) fn new(size: u64, seed: u64, stopped: bool) -> Result<Self, DeviceError> {
        Ok(SaveSession {
            size,
            seed,
            small: [0; HEADER_LEN],
            small_len: 0,
            small_sent: 0,
            small_kind: Framing::Initial,
            header_done: false,
            run: None,
            initial_pos: 0,
            initial_framing_left: HEADER_LEN as u64 + record_headers(size),
            scan_page: 0,
            stopped,
            trailer_done: false,
            data_bytes: 0,
            hashes: PageHashes::new(size / PAGE_SIZE)?,
        })
    }

    /// The device stopped (PRE_COPY -> STOP_COPY): the stream will end with a trailer.
    pub(crate) fn mark_stopped(&mut self) {
        self.stopped = true;
    }

    /// Whether a rewrite of `page` now must be sent again.
    pub(crate) fn needs_resend(&self, page: u64) -> bool {
        page * PAGE_SIZE < self.initial_pos
    }

    /// Copies the next bytes of the stream into `out`; 0 when there is nothing (more).
    pub(crate) fn read(&mut self, state: &[u8], dirty: &mut PageBitmap, out: &mut [u8]) -> usize {
        let mut n = 0;
        while n < out.len() {
            if self.small_sent < self.small_len {
                let k = (self.small_len - self.small_sent).min(out.len() - n);
                out[n..n + k].copy_from_slice(&self.small[self.small_sent..self.small_sent + k]);
                self.small_sent += k;
                n += k;
                if self.small_kind == Framing::Initial {
                    self.initial_framing_left -= k as u64;
                }
                continue;
            }
            if let Some(run) = self.run.as_mut().filter(|r| r.pos < r.end) {
                let k = (run.end - run.pos).min((out.len() - n) as u64);
                let stop = run.pos + k;
                // Page by page, so the page just hashed is still in L1 when it is copied.
                let mut pos = run.pos;
                while pos < stop {
                    let page = pos / PAGE_SIZE;
                    if pos % PAGE_SIZE == 0 {
                        // The copy of this page begins: its term is its contents from now
                        // on, and a re-sent page is clean from now on.
                        self.hashes.update(page, page_of(state, page));
                        if !run.initial {
                            dirty.clear(page);
                        }
                    }
                    let seg_end = ((page + 1) * PAGE_SIZE).min(stop);
                    let len = (seg_end - pos) as usize;
                    let to = n + (pos - run.pos) as usize;
                    out[to..to + len].copy_from_slice(&state[pos as usize..pos as usize + len]);
                    pos = seg_end;
                }
                if run.initial {
                    self.initial_pos = stop;
                }
                run.pos = stop;
                n += k as usize;
                self.data_bytes += k;
                continue;
            }
            self.run = None;
            if !self.next_piece(dirty) {
                break;
            }
        }
        n
    }

    fn load_small(&mut self, bytes: &[u8], kind: Framing) {
        self.small[..bytes.len()].copy_from_slice(bytes);
        self.small_len = bytes.len();
        self.small_sent = 0;
        self.small_kind = kind;
    }

    /// Queues the next piece of the stream; false when there is none now.
    fn next_piece(&mut self, dirty: &PageBitmap) -> bool {
        if !self.header_done {
            let header = StreamHeader {
                size: self.size,
                seed: self.seed,
            };
            self.load_small(&header.encode(), Framing::Initial);
            self.header_done = true;
            return true;
        }
        if self.initial_pos < self.size {
            let end = (self.initial_pos + RECORD_MAX).min(self.size);
            let header = RecordHeader::data(self.initial_pos, end - self.initial_pos);
            self.load_small(&header.encode(), Framing::Initial);
            self.run = Some(Run {
                pos: self.initial_pos,
                end,
                initial: true,
            });
            return true;
        }
        if let Some(first) = dirty.next_set(self.scan_page) {
            let mut last = first + 1;
            while last < dirty.pages() && last - first < PAGES_PER_RECORD && dirty.is_set(last) {
                last += 1;
            }
            self.scan_page = last;
            let header = RecordHeader::data(first * PAGE_SIZE, (last - first) * PAGE_SIZE);
            self.load_small(&header.encode(), Framing::Dirty);
            self.run = Some(Run {
                pos: first * PAGE_SIZE,
                end: last * PAGE_SIZE,
                initial: false,
            });
            return true;
        }
        if self.stopped && !self.trailer_done {
            // Every page was hashed when its last copy began, and none changed after that
            // (it would be dirty): the sum is the final state's.
            let trailer = Trailer {
                state_hash: self.hashes.sum(),
                data_bytes: self.data_bytes,
            };
            self.load_small(&trailer.encode(), Framing::Trailer);
            self.trailer_done = true;
            return true;
        }
        false
    }

    /// Initial bytes still unread, and bytes dirtied since read (with their framing).
    pub(crate) fn pending(&self, dirty: &PageBitmap) -> PrecopyInfo {
        let small_left = (self.small_len - self.small_sent) as u64;
        let initial_bytes = self.initial_framing_left + (self.size - self.initial_pos);
        let mut dirty_bytes = dirty.count() * PAGE_SIZE;
        let mut in_flight = 0..0;
        if let Some(run) = self.run.filter(|r| !r.initial && r.pos < r.end) {
            // Pages of the record being sent have their header already: they need no other.
            in_flight = run.pos.div_ceil(PAGE_SIZE)..run.end / PAGE_SIZE;
            // The rest of a page whose bit was cleared when its copy began.
            if run.pos % PAGE_SIZE != 0 {
                dirty_bytes += (PAGE_SIZE - run.pos % PAGE_SIZE).min(run.end - run.pos);
            }
        }
        if self.small_kind == Framing::Dirty {
            dirty_bytes += small_left;
        }
        if dirty.count() > 0 {
            // The records the dirty scan will make from here (it goes on from `scan_page`
            // and wraps around): exact once the device is stopped, a snapshot while it runs.
            let pages = dirty.pages();
            let scan = self.scan_page.min(pages);
            let records = dirty.records_in(scan, pages, PAGES_PER_RECORD, in_flight.clone())
                + dirty.records_in(0, scan, PAGES_PER_RECORD, in_flight);
            dirty_bytes += records * RECORD_HEADER_LEN as u64;
        }
        PrecopyInfo {
            initial_bytes,
            dirty_bytes,
        }
    }

    /// Bytes still to come before the stream ends, if the device stopped now.
    pub(crate) fn remaining(&self, dirty: &PageBitmap) -> u64 {
        let info = self.pending(dirty);
        let trailer = match (self.trailer_done, self.small_kind) {
            (false, _) => TRAILER_LEN as u64,
            (true, Framing::Trailer) => (self.small_len - self.small_sent) as u64,
            (true, _) => 0,
        };
        info.initial_bytes + info.dirty_bytes + trailer
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::super::content::{generate, SplitMix};
    use super::super::format::{full_stream_len, state_hash};
    use super::super::resume::ResumeSession;
    use super::*;

    fn drain(s: &mut SaveSession, state: &[u8], dirty: &mut PageBitmap, chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; chunk];
        loop {
            let n = s.read(state, dirty, &mut buf);
            if n == 0 {
                return out;
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    #[test]
    fn stop_copy_stream_has_the_announced_length_whatever_the_read_size() {
        let size = 3 * RECORD_MAX + 8 * PAGE_SIZE;
        let state = generate(size, 3).unwrap();
        let mut reference = None;
        for chunk in [1, 7, 4096, 1 << 20, 3 << 20] {
            let mut dirty = PageBitmap::new(size / PAGE_SIZE);
            let mut s = SaveSession::new(size, 3, true).unwrap();
            assert_eq!(s.remaining(&dirty), full_stream_len(size));
            let out = drain(&mut s, &state, &mut dirty, chunk);
            assert_eq!(out.len() as u64, full_stream_len(size), "chunk {chunk}");
            assert_eq!(s.remaining(&dirty), 0);
            let trailer = Trailer::decode(out[out.len() - 16..].try_into().unwrap());
            assert_eq!(
                trailer.state_hash,
                state_hash(&state),
                "the in-copy hashes make the state hash"
            );
            match &reference {
                None => reference = Some(out),
                Some(r) => assert!(r == &out, "chunk {chunk} changed the bytes"),
            }
        }
    }

    #[test]
    fn precopy_accounting_falls_and_dirty_pages_are_resent() {
        let size = 2 * RECORD_MAX;
        let mut state = generate(size, 9).unwrap();
        let mut dirty = PageBitmap::new(size / PAGE_SIZE);
        let mut s = SaveSession::new(size, 9, false).unwrap();
        let start = s.pending(&dirty);
        assert_eq!(
            start.initial_bytes,
            HEADER_LEN as u64 + size + 2 * RECORD_HEADER_LEN as u64
        );
        assert_eq!(start.dirty_bytes, 0);
        let mut buf = vec![0u8; 1000];
        let mut last = start.initial_bytes;
        let mut total = 0u64;
        loop {
            let n = s.read(&state, &mut dirty, &mut buf) as u64;
            if n == 0 {
                break;
            }
            total += n;
            let now = s.pending(&dirty).initial_bytes;
            assert_eq!(last - now, n, "initial bytes fall by exactly what was read");
            last = now;
        }
        assert_eq!(total, start.initial_bytes);
        assert_eq!(s.pending(&dirty), PrecopyInfo::default(), "nothing now");
        // A rewrite of an already-sent page is tracked and re-sent, in one record.
        for page in [3u64, 4] {
            assert!(s.needs_resend(page));
            state[(page * PAGE_SIZE) as usize] ^= 0xff;
            dirty.set(page);
        }
        let info = s.pending(&dirty);
        assert_eq!(info.dirty_bytes, 2 * PAGE_SIZE + RECORD_HEADER_LEN as u64);
        let out = drain(&mut s, &state, &mut dirty, 5000);
        assert_eq!(out.len() as u64, info.dirty_bytes);
        assert_eq!(
            RecordHeader::decode(out[..16].try_into().unwrap()),
            RecordHeader::data(3 * PAGE_SIZE, 2 * PAGE_SIZE)
        );
        assert_eq!(out[16..], state[3 * 4096..5 * 4096]);
        s.mark_stopped();
        assert_eq!(s.remaining(&dirty), TRAILER_LEN as u64);
        let tail = drain(&mut s, &state, &mut dirty, 5);
        let trailer = Trailer::decode(tail[16..].try_into().unwrap());
        assert_eq!(trailer.state_hash, state_hash(&state));
        assert_eq!(trailer.data_bytes, size + 2 * PAGE_SIZE);
    }

    #[test]
    fn a_page_rewritten_while_its_copy_is_under_way_is_resent() {
        let size = 4 * PAGE_SIZE;
        let state = generate(size, 1).unwrap();
        let mut dirty = PageBitmap::new(4);
        let mut s = SaveSession::new(size, 1, false).unwrap();
        let mut buf = vec![0u8; HEADER_LEN + RECORD_HEADER_LEN + 100];
        assert_eq!(s.read(&state, &mut dirty, &mut buf), buf.len());
        assert!(s.needs_resend(0), "page 0 has begun to be copied");
        assert!(
            !s.needs_resend(1),
            "page 1 will be copied by the initial pass anyway"
        );
    }

    /// What happens to a saving session between two reads of the stream.
    #[derive(Clone, Debug)]
    enum Step {
        /// Read up to this many bytes.
        Read(usize),
        /// The worker rewrites this page (modulo the page count) with contents from this seed.
        Rewrite(u64, u64),
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            (1usize..20_000).prop_map(Step::Read),
            (any::<u64>(), any::<u64>()).prop_map(|(p, seed)| Step::Rewrite(p, seed)),
        ]
    }

    proptest! {
        /// However reads split pages and rewrites fall between them (also in the middle of a
        /// page's copy), the trailer carries the state hash of the final state, and the stream
        /// resumes to exactly that state.
        #[test]
        fn the_trailer_is_the_final_state_hash_whatever_the_interleaving(
            pages in 1u64..24,
            steps in proptest::collection::vec(step(), 0..80),
            tail_read in 1usize..9000,
        ) {
            let size = pages * PAGE_SIZE;
            let mut state = generate(size, 2).unwrap();
            let mut dirty = PageBitmap::new(pages);
            let mut s = SaveSession::new(size, 2, false).unwrap();
            let mut stream = Vec::new();
            for step in steps {
                match step {
                    Step::Read(n) => {
                        let mut buf = vec![0u8; n];
                        let got = s.read(&state, &mut dirty, &mut buf);
                        stream.extend_from_slice(&buf[..got]);
                    }
                    Step::Rewrite(page, seed) => {
                        let page = page % pages;
                        let at = (page * PAGE_SIZE) as usize;
                        SplitMix::new(seed).fill(&mut state[at..at + PAGE_SIZE as usize]);
                        if s.needs_resend(page) {
                            dirty.set(page);
                        }
                    }
                }
            }
            s.mark_stopped();
            stream.extend(drain(&mut s, &state, &mut dirty, tail_read));
            let trailer = Trailer::decode(stream[stream.len() - 16..].try_into().unwrap());
            prop_assert_eq!(trailer.state_hash, state_hash(&state));
            let mut resumed = vec![0u8; size as usize];
            let mut r = ResumeSession::new(size).unwrap();
            r.write(&mut resumed, &stream).unwrap();
            r.finish().unwrap();
            prop_assert!(resumed == state);
        }
    }
}
