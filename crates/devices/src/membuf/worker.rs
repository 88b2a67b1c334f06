//! The shared state of one membuf, and the background worker that keeps changing it.
//!
//! Everything the worker touches is under one mutex ([`Shared::core`]). The worker checks
//! `running` and mutates with that mutex held, so once a hook has cleared `running` under the
//! mutex, no mutation and no DMA is in flight or can start: that is what makes `stop` hooks
//! honest. The worker sleeps on a condition variable between ticks (mutex released), makes
//! the new page contents with the mutex released, and holds it only to copy in at most
//! [`BATCH_PAGES`] pages and post their completions, so the controller's hooks (a stop is
//! inside a migration's downtime) and register reads wait for at most one such batch
//! (microseconds), however high the dirty rate or however far behind the worker is.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vfio_mig_device::{Dma, IovaRange};

use super::content::{PageBitmap, SplitMix};
use super::format::PAGE_SIZE;
use super::resume::ResumeSession;
use super::save::SaveSession;

/// How often the worker wakes while running.
pub(crate) const TICK: Duration = Duration::from_millis(5);
/// Longest stretch of time one tick makes up for (after the worker was held up).
const MAX_CATCH_UP: Duration = Duration::from_millis(100);
/// Most pages rewritten under one hold of the state lock (64 KiB of copying).
const BATCH_PAGES: usize = 16;
/// Bytes of one completion-ring entry in guest memory: generation (u64) and page index (u64).
pub const COMPLETION_LEN: u64 = 16;

/// What the worker and the hooks share, under [`Shared::core`].
#[derive(Debug)]
pub(crate) struct Core {
    pub(crate) state: Vec<u8>,
    /// The worker may mutate (RUNNING, RUNNING_P2P, PRE_COPY, PRE_COPY_P2P).
    pub(crate) running: bool,
    /// The device is gone: the worker ends.
    pub(crate) exit: bool,
    /// RUNNING_P2P / PRE_COPY_P2P. The emulation has no peer-to-peer DMA, so this is only
    /// recorded: there is nothing to quiesce.
    pub(crate) p2p_quiesced: bool,
    pub(crate) save: Option<SaveSession>,
    pub(crate) resume: Option<ResumeSession>,
    /// Pages to send again in the open saving session.
    pub(crate) dirty: PageBitmap,
}

/// One membuf's state, shared by the device (hooks), its registers and its worker.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) core: Mutex<Core>,
    pub(crate) wake: Condvar,
    pub(crate) size: u64,
    pub(crate) seed: u64,
    pub(crate) generation: AtomicU64,
    pub(crate) dirty_rate: AtomicU64,
    pub(crate) dma_window: IovaRange,
    pub(crate) dma_completions: AtomicU64,
    pub(crate) dma_errors: AtomicU64,
}

impl Shared {
    pub(crate) fn lock(&self) -> MutexGuard<'_, Core> {
        // A panic while holding the lock leaves plain bytes behind; nothing to repair.
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The worker thread's body: until `exit`, while `running`, every [`TICK`] rewrite whole
/// pseudo-random pages at `dirty_rate` bytes per second and post one completion per rewrite
/// into the guest's completion ring by DMA.
pub(crate) fn run(shared: Arc<Shared>, dma: Dma) {
    let mut rng = SplitMix::new(shared.seed ^ 0x6d65_6d62_7566_2d77);
    let pages = shared.size / PAGE_SIZE;
    let page_len = PAGE_SIZE as usize;
    let mut ring = Ring::new(shared.dma_window);
    let mut pace = Pace::new();
    // Pages owed and not yet rewritten.
    let mut due: u64 = 0;
    // The next batch: which pages, and their new contents.
    let mut targets = [0u64; BATCH_PAGES];
    let mut fresh = vec![0u8; BATCH_PAGES * page_len];
    loop {
        // Between batches the lock is taken only once, to copy in: a waiting hook gets it
        // while the next batch is being made.
        if due == 0 {
            match pace.wait(&shared, pages) {
                Some(owed_pages) => due = owed_pages,
                None => return,
            }
        }
        let batch = due.min(BATCH_PAGES as u64) as usize;
        for target in &mut targets[..batch] {
            *target = rng.next_u64() % pages;
        }
        rng.fill(&mut fresh[..batch * page_len]);

        let mut core = shared.lock();
        if core.exit || !core.running {
            // Stopped meanwhile: nothing of this batch may happen any more.
            due = 0;
            continue;
        }
        for (&page, contents) in targets[..batch].iter().zip(fresh.chunks_exact(page_len)) {
            let at = (page * PAGE_SIZE) as usize;
            core.state[at..at + page_len].copy_from_slice(contents);
            let generation = shared.generation.fetch_add(1, Ordering::Relaxed) + 1;
            if let Some(save) = &core.save {
                if save.needs_resend(page) {
                    core.dirty.set(page);
                }
            }
            ring.push(generation, page);
        }
        ring.post(&shared, &dma);
        due -= batch as u64;
    }
}

/// Turns time into pages owed at the dirty rate.
struct Pace {
    /// Owed work in byte-nanoseconds, so that low rates still make progress.
    owed: u128,
    last: Instant,
}

impl Pace {
    fn new() -> Self {
        Pace {
            owed: 0,
            last: Instant::now(),
        }
    }

    /// Sleeps (lock released) until the device runs and at least one page is owed; returns
    /// how many (at most `pages`), or `None` when the device is gone.
    fn wait(&mut self, shared: &Shared, pages: u64) -> Option<u64> {
        let mut core = shared.lock();
        loop {
            if core.exit {
                return None;
            }
            if !core.running {
                core = shared.wake.wait(core).unwrap_or_else(|p| p.into_inner());
                self.last = Instant::now();
                self.owed = 0;
                continue;
            }
            core = shared
                .wake
                .wait_timeout(core, TICK)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            if core.exit || !core.running {
                continue;
            }
            let now = Instant::now();
            let elapsed = now.duration_since(self.last).min(MAX_CATCH_UP);
            self.last = now;
            let rate = shared.dirty_rate.load(Ordering::Relaxed);
            self.owed += u128::from(rate) * elapsed.as_nanos();
            let per_page = u128::from(PAGE_SIZE) * 1_000_000_000;
            let whole = self.owed / per_page;
            self.owed -= whole * per_page;
            if whole > 0 {
                // More than the whole state per tick changes nothing more.
                return Some((whole as u64).min(pages));
            }
        }
    }
}

/// The guest-side completion ring: `window.length / 16` entries of (generation, page), written
/// in order and wrapping around, like a NIC's completion queue.
struct Ring {
    window: IovaRange,
    entries: u64,
    next: u64,
    batch: Vec<u8>,
    batch_start: u64,
}

impl Ring {
    fn new(window: IovaRange) -> Self {
        Ring {
            window,
            entries: window.length / COMPLETION_LEN,
            next: 0,
            batch: Vec::new(),
            batch_start: 0,
        }
    }

    fn push(&mut self, generation: u64, page: u64) {
        if self.entries == 0 {
            return;
        }
        if self.batch.is_empty() {
            self.batch_start = self.next;
        }
        self.batch.extend_from_slice(&generation.to_le_bytes());
        self.batch.extend_from_slice(&page.to_le_bytes());
        self.next += 1;
    }

    /// Writes the batched entries (one DMA per contiguous stretch of the ring).
    fn post(&mut self, shared: &Shared, dma: &Dma) {
        if self.batch.is_empty() {
            return;
        }
        if dma.has_memory() {
            // Only the last lap matters when a tick wraps the ring more than once.
            let count = self.batch.len() as u64 / COMPLETION_LEN;
            let keep = count.min(self.entries);
            let mut slot = (self.batch_start + count - keep) % self.entries;
            let mut bytes = &self.batch[((count - keep) * COMPLETION_LEN) as usize..];
            while !bytes.is_empty() {
                let fit = ((self.entries - slot) * COMPLETION_LEN).min(bytes.len() as u64);
                let (now, rest) = bytes.split_at(fit as usize);
                let iova = self.window.iova + slot * COMPLETION_LEN;
                match dma.write(iova, now) {
                    Ok(()) => {
                        shared
                            .dma_completions
                            .fetch_add(fit / COMPLETION_LEN, Ordering::Relaxed);
                    }
                    Err(err) => {
                        if shared.dma_errors.fetch_add(1, Ordering::Relaxed) == 0 {
                            tracing::warn!(%err, iova, "membuf completion DMA failed");
                        }
                    }
                }
                bytes = rest;
                slot = (slot + fit / COMPLETION_LEN) % self.entries;
            }
        }
        self.batch.clear();
    }
}
