//! Generating, digesting and tracking the state buffer.

use vfio_mig_device::DeviceError;
use vfio_mig_uapi::Errno;
use xxhash_rust::xxh3::xxh3_64;

use super::format::{page_hash, Size, PAGE_SIZE};

const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// The splitmix64 finalizer: a bijective mix of one 64-bit word.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A splitmix64 generator: fast, and good enough for contents nobody needs to guess.
#[derive(Clone, Debug)]
pub(crate) struct SplitMix(u64);

impl SplitMix {
    pub(crate) fn new(seed: u64) -> Self {
        SplitMix(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(GAMMA);
        mix(self.0)
    }

    /// Overwrites `out` (a multiple of 8 bytes long) with fresh words.
    pub(crate) fn fill(&mut self, out: &mut [u8]) {
        for word in out.chunks_exact_mut(8) {
            word.copy_from_slice(&self.next_u64().to_le_bytes());
        }
    }
}

/// Allocates the `size`-byte state once and fills it from `seed`: word `k` is the `k + 1`-th
/// output of splitmix64 started at `seed`, so the contents are a pure function of the seed.
///
/// Fails with `ENOMEM` (instead of aborting) when the memory cannot be had.
pub(crate) fn generate(size: u64, seed: u64) -> Result<Vec<u8>, DeviceError> {
    let len = usize::try_from(size).map_err(|_| {
        DeviceError::new(
            Errno::ENOMEM,
            format!("a {} state does not fit in memory", Size(size)),
        )
    })?;
    let mut buf = Vec::new();
    buf.try_reserve_exact(len).map_err(|e| {
        DeviceError::new(
            Errno::ENOMEM,
            format!("cannot allocate a {} state", Size(size)),
        )
        .with_source(e)
    })?;
    // Generate into a small cache-resident block and append it: one pass over the big buffer,
    // no unsafe, and no zero-fill pass first.
    const BLOCK: usize = 64 * 1024;
    let mut block = vec![0u8; BLOCK];
    let mut rng = SplitMix::new(seed);
    while buf.len() < len {
        let n = BLOCK.min(len - buf.len());
        rng.fill(&mut block[..n]);
        buf.extend_from_slice(&block[..n]);
    }
    Ok(buf)
}

/// The digest of a state: xxh3-64 of exactly the bytes migration carries.
pub fn digest(state: &[u8]) -> u64 {
    xxh3_64(state)
}

/// The terms of [`state_hash`](super::format::state_hash) page by page, and their wrapping sum, kept up to date as pages
/// are (re)hashed: replacing a page's term costs one page hash, so the sum for the whole state
/// is there at any moment without a pass over it. Pages never hashed contribute 0.
pub(crate) struct PageHashes {
    terms: Vec<u64>,
    sum: u64,
}

impl PageHashes {
    /// Room for `pages` terms (8 bytes per 4 KiB page); `ENOMEM` when it cannot be had.
    pub(crate) fn new(pages: u64) -> Result<Self, DeviceError> {
        let no_memory = || {
            DeviceError::new(
                Errno::ENOMEM,
                format!("cannot allocate page hashes for {pages} pages"),
            )
        };
        let len = usize::try_from(pages).map_err(|_| no_memory())?;
        let mut terms = Vec::new();
        terms
            .try_reserve_exact(len)
            .map_err(|e| no_memory().with_source(e))?;
        terms.resize(len, 0);
        Ok(PageHashes { terms, sum: 0 })
    }

    /// Hashes `bytes` (the whole of page `page`) and makes it that page's term.
    pub(crate) fn update(&mut self, page: u64, bytes: &[u8]) {
        let term = page_hash(page, bytes);
        let old = std::mem::replace(&mut self.terms[page as usize], term);
        self.sum = self.sum.wrapping_sub(old).wrapping_add(term);
    }

    /// The sum of the current terms: [`state_hash`](super::format::state_hash) of the state once every page's term is
    /// that of its current contents.
    pub(crate) fn sum(&self) -> u64 {
        self.sum
    }
}

impl std::fmt::Debug for PageHashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PageHashes")
            .field("pages", &self.terms.len())
            .field("sum", &format_args!("{:#018x}", self.sum))
            .finish()
    }
}

/// The bytes of page `page` of `state`.
pub(crate) fn page_of(state: &[u8], page: u64) -> &[u8] {
    let at = (page * PAGE_SIZE) as usize;
    &state[at..at + PAGE_SIZE as usize]
}

/// One bit per page, with a count of set bits.
#[derive(Clone, Debug)]
pub(crate) struct PageBitmap {
    words: Vec<u64>,
    pages: u64,
    count: u64,
}

impl PageBitmap {
    pub(crate) fn new(pages: u64) -> Self {
        PageBitmap {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
            count: 0,
        }
    }

    /// Pages tracked.
    pub(crate) fn pages(&self) -> u64 {
        self.pages
    }

    /// Set bits.
    pub(crate) fn count(&self) -> u64 {
        self.count
    }

    pub(crate) fn is_set(&self, page: u64) -> bool {
        self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    pub(crate) fn set(&mut self, page: u64) {
        let w = &mut self.words[(page / 64) as usize];
        let bit = 1 << (page % 64);
        if *w & bit == 0 {
            *w |= bit;
            self.count += 1;
        }
    }

    pub(crate) fn clear(&mut self, page: u64) {
        let w = &mut self.words[(page / 64) as usize];
        let bit = 1 << (page % 64);
        if *w & bit != 0 {
            *w &= !bit;
            self.count -= 1;
        }
    }

    pub(crate) fn clear_all(&mut self) {
        if self.count != 0 {
            self.words.fill(0);
            self.count = 0;
        }
    }

    /// The first set page at or after `from`, wrapping around once.
    pub(crate) fn next_set(&self, from: u64) -> Option<u64> {
        if self.count == 0 {
            return None;
        }
        let from = if from >= self.pages { 0 } else { from };
        self.first_set_in(from, self.pages)
            .or_else(|| self.first_set_in(0, from))
    }

    /// The first unset page, if any.
    pub(crate) fn first_unset(&self) -> Option<u64> {
        self.words.iter().enumerate().find_map(|(i, &w)| {
            let page = i as u64 * 64 + u64::from((!w).trailing_zeros());
            (w != u64::MAX && page < self.pages).then_some(page)
        })
    }

    /// How many records of at most `max_len` pages the set pages of `[lo, hi)` make when each
    /// maximal run is cut greedily from its start; pages in `skip` count as unset.
    pub(crate) fn records_in(
        &self,
        lo: u64,
        hi: u64,
        max_len: u64,
        skip: std::ops::Range<u64>,
    ) -> u64 {
        let mut records = 0;
        let mut from = lo;
        while let Some(first) = self.first_set_in(from, hi) {
            if skip.contains(&first) {
                from = skip.end;
                continue;
            }
            let mut end = first + 1;
            while end < hi && !skip.contains(&end) && self.is_set(end) {
                end += 1;
            }
            records += (end - first).div_ceil(max_len);
            from = end;
        }
        records
    }

    fn first_set_in(&self, lo: u64, hi: u64) -> Option<u64> {
        let mut page = lo;
        while page < hi {
            let word = self.words[(page / 64) as usize] >> (page % 64);
            if word != 0 {
                let found = page + u64::from(word.trailing_zeros());
                return (found < hi).then_some(found);
            }
            page = (page / 64 + 1) * 64;
        }
        None
    }
}

/// Pages in a state of `size` bytes.
pub(crate) fn pages_of(size: u64) -> u64 {
    size / PAGE_SIZE
}

#[cfg(test)]
mod tests {
    use super::super::format::state_hash;
    use super::*;

    #[test]
    fn generation_is_a_function_of_the_seed() {
        let a = generate(64 * 1024 + 4096, 1).unwrap();
        let b = generate(64 * 1024 + 4096, 1).unwrap();
        let c = generate(64 * 1024 + 4096, 2).unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.len(), 69632);
        // Blocks continue the sequence: the 64 KiB boundary is not a restart.
        assert_ne!(a[..4096], a[65536..]);
        let mut rng = SplitMix::new(1);
        assert_eq!(a[..8], rng.next_u64().to_le_bytes());
        assert_eq!(digest(&a), digest(&b));
        assert_ne!(digest(&a), digest(&c));
    }

    #[test]
    fn page_hashes_track_the_state_hash_as_pages_change() {
        let mut state = generate(8 * PAGE_SIZE, 4).unwrap();
        let mut hashes = PageHashes::new(8).unwrap();
        // In any order, each page once: the sum is the state hash.
        for page in [5, 0, 7, 1, 6, 2, 4, 3] {
            hashes.update(page, page_of(&state, page));
        }
        assert_eq!(hashes.sum(), state_hash(&state));
        // A page changed and hashed again replaces its own term, however often.
        for round in 0..3u8 {
            state[3 * PAGE_SIZE as usize + 17] = round;
            hashes.update(3, page_of(&state, 3));
            hashes.update(3, page_of(&state, 3));
            assert_eq!(hashes.sum(), state_hash(&state), "round {round}");
        }
        // A changed page not hashed again leaves the sum behind.
        state[0] ^= 1;
        assert_ne!(hashes.sum(), state_hash(&state));
        // The index is part of the term: the same bytes at another page hash differently.
        assert_ne!(
            page_hash(0, page_of(&state, 1)),
            page_hash(1, page_of(&state, 1))
        );
    }

    #[test]
    fn bitmap_counts_and_searches_with_wraparound() {
        let mut m = PageBitmap::new(200);
        assert_eq!(m.next_set(0), None);
        assert_eq!(m.first_unset(), Some(0));
        m.set(5);
        m.set(5);
        m.set(130);
        assert_eq!(m.count(), 2);
        assert_eq!(m.next_set(0), Some(5));
        assert_eq!(m.next_set(6), Some(130));
        assert_eq!(m.next_set(131), Some(5), "wraps around");
        m.clear(5);
        m.clear(5);
        assert_eq!(m.count(), 1);
        assert_eq!(m.next_set(131), Some(130));
        for p in 0..200 {
            m.set(p);
        }
        assert_eq!(m.first_unset(), None);
        m.clear(199);
        assert_eq!(m.first_unset(), Some(199));
        m.clear_all();
        assert_eq!((m.count(), m.next_set(0)), (0, None));
        for p in (10..20).chain(30..31).chain(63..70) {
            m.set(p);
        }
        assert_eq!(m.records_in(0, 200, 4, 0..0), 3 + 1 + 2);
        assert_eq!(m.records_in(15, 200, 4, 0..0), 2 + 1 + 2);
        assert_eq!(m.records_in(0, 200, 100, 12..16), 2 + 1 + 1);
        assert_eq!(m.records_in(0, 64, 100, 0..0), 3);
    }
}
