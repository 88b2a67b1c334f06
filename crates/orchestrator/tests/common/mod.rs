//! Test support: a small migratable device with precopy dirty tracking and fault injection,
//! a workload thread that keeps changing it, and a relay that can cut or corrupt a
//! connection.
#![allow(dead_code)]

use std::collections::{BTreeSet, VecDeque};
use std::io::{Read, Write};
use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vfio_mig_device::{
    Controller, DeviceError, DeviceIdentity, DeviceState, Dma, Errno, Migratable, MigrationDevice,
    MigrationFeatures, PrecopyInfo, RunMode, SaveKind,
};
use vfio_mig_orchestrator::ack::Ack;
use vfio_mig_orchestrator::{NamedDevice, Transport};

/// Bytes per page: the unit of dirty tracking and of the saved stream's records.
pub const PAGE: usize = 256;
/// A record: the page index (u32 LE) and the page.
const REC: usize = 4 + PAGE;
/// The trailer: u32::MAX, the state length (u32) and a digest of the whole state (u64).
const TRAILER: usize = 16;

/// Which hook fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Stop,
    Start,
    P2pQuiesce,
    P2pRelease,
    SaveBegin,
    SaveStopCopy,
    ResumeBegin,
    ResumeFinish,
    /// A read once this many bytes were read in the session.
    Read(usize),
    /// A write once this many bytes were written in the session.
    Write(usize),
}

#[derive(Clone, Copy, Debug)]
pub struct Fault {
    pub hook: Hook,
    /// Fails every time, not once.
    pub persistent: bool,
}

struct Save {
    /// Next page of the initial pass.
    cursor: usize,
    dirty: BTreeSet<usize>,
    out: VecDeque<u8>,
    out_is_initial: bool,
    stop_copy: bool,
    trailer_sent: bool,
    read: usize,
}

/// A device whose state is a byte vector that changes while it runs.
pub struct Blob {
    pub state: Vec<u8>,
    features: MigrationFeatures,
    pub running: bool,
    save: Option<Save>,
    resume: Option<Vec<u8>>,
    pub faults: Vec<Fault>,
    rng: u64,
    pub generation: u64,
    pub resets: u32,
}

pub fn digest(bytes: &[u8]) -> u64 {
    // FNV-1a: enough to detect any difference in tests.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x100_0000_01b3);
    }
    h
}

fn fail(what: &str) -> DeviceError {
    DeviceError::new(Errno::EIO, format!("injected {what} failure"))
}

impl Blob {
    pub fn new(size: usize, features: MigrationFeatures, seed: u64) -> Blob {
        assert_eq!(size % PAGE, 0);
        let mut b = Blob {
            state: vec![0; size],
            features,
            running: true,
            save: None,
            resume: None,
            faults: Vec::new(),
            rng: seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1,
            generation: 0,
            resets: 0,
        };
        if seed != 0 {
            for i in 0..size {
                b.state[i] = b.next() as u8;
            }
        }
        b
    }

    fn next(&mut self) -> u64 {
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        self.rng
    }

    fn pages(&self) -> usize {
        self.state.len() / PAGE
    }

    /// Changes `n` bytes if the device runs, tracking dirty pages of an open precopy.
    pub fn mutate(&mut self, n: usize) {
        if !self.running {
            return;
        }
        for _ in 0..n {
            let i = (self.next() as usize) % self.state.len();
            self.state[i] = self.state[i].wrapping_add(1 + (self.next() % 255) as u8);
            self.generation += 1;
            if let Some(s) = self.save.as_mut() {
                if i / PAGE < s.cursor {
                    s.dirty.insert(i / PAGE);
                }
            }
        }
    }

    fn check(&mut self, hook: Hook) -> Result<(), DeviceError> {
        if let Some(pos) = self.faults.iter().position(|f| f.hook == hook) {
            if !self.faults[pos].persistent {
                self.faults.remove(pos);
            }
            return Err(fail(&format!("{hook:?}")));
        }
        Ok(())
    }

    fn check_counted(&mut self, done: usize, read: bool) -> Result<(), DeviceError> {
        let pos = self.faults.iter().position(|f| match f.hook {
            Hook::Read(after) if read => done >= after,
            Hook::Write(after) if !read => done >= after,
            _ => false,
        });
        if let Some(pos) = pos {
            if !self.faults[pos].persistent {
                self.faults.remove(pos);
            }
            return Err(fail(if read { "read" } else { "write" }));
        }
        Ok(())
    }

    fn record(&self, page: usize) -> Vec<u8> {
        let mut r = Vec::with_capacity(REC);
        r.extend_from_slice(&(page as u32).to_le_bytes());
        r.extend_from_slice(&self.state[page * PAGE..(page + 1) * PAGE]);
        r
    }

    fn trailer(&self) -> Vec<u8> {
        let mut t = Vec::with_capacity(TRAILER);
        t.extend_from_slice(&u32::MAX.to_le_bytes());
        t.extend_from_slice(&(self.state.len() as u32).to_le_bytes());
        t.extend_from_slice(&digest(&self.state).to_le_bytes());
        t
    }

    /// Refills the output queue with the next record; false when there is nothing now.
    fn refill(&mut self) -> bool {
        let pages = self.pages();
        let Some(s) = self.save.as_ref() else {
            return false;
        };
        let (bytes, initial) = if s.cursor < pages {
            let page = s.cursor;
            (self.record(page), true)
        } else if let Some(&page) = s.dirty.iter().next() {
            (self.record(page), false)
        } else if s.stop_copy && !s.trailer_sent {
            (self.trailer(), false)
        } else {
            return false;
        };
        let s = self.save.as_mut().unwrap();
        if initial {
            s.cursor += 1;
        } else if s.stop_copy && s.dirty.is_empty() {
            s.trailer_sent = true;
        } else {
            let page = u32::from_le_bytes(bytes[..4].try_into().unwrap()) as usize;
            s.dirty.remove(&page);
        }
        s.out_is_initial = initial;
        s.out.extend(bytes);
        true
    }
}

impl Migratable for Blob {
    fn features(&self) -> MigrationFeatures {
        self.features
    }

    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            kind: "blob".into(),
            version: "1".into(),
            compat: (self.state.len() as u64).to_le_bytes().to_vec(),
        }
    }

    fn stop(&mut self) -> Result<(), DeviceError> {
        self.check(Hook::Stop)?;
        self.running = false;
        Ok(())
    }

    fn start(&mut self, _mode: RunMode) -> Result<(), DeviceError> {
        self.check(Hook::Start)?;
        self.running = true;
        Ok(())
    }

    fn set_p2p_quiesced(&mut self, quiesced: bool) -> Result<(), DeviceError> {
        self.check(if quiesced {
            Hook::P2pQuiesce
        } else {
            Hook::P2pRelease
        })
    }

    fn save_begin(&mut self, kind: SaveKind) -> Result<(), DeviceError> {
        self.check(Hook::SaveBegin)?;
        self.save = Some(Save {
            cursor: 0,
            dirty: BTreeSet::new(),
            out: VecDeque::new(),
            out_is_initial: false,
            stop_copy: kind == SaveKind::StopCopy,
            trailer_sent: false,
            read: 0,
        });
        Ok(())
    }

    fn save_stop_copy(&mut self) -> Result<(), DeviceError> {
        self.check(Hook::SaveStopCopy)?;
        self.running = false;
        if let Some(s) = self.save.as_mut() {
            s.stop_copy = true;
        }
        Ok(())
    }

    fn save_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let read = self.save.as_ref().map_or(0, |s| s.read);
        self.check_counted(read, true)?;
        let mut n = 0;
        while n < buf.len() {
            if self.save.as_ref().is_some_and(|s| s.out.is_empty()) && !self.refill() {
                break;
            }
            let s = self.save.as_mut().unwrap();
            let take = (buf.len() - n).min(s.out.len());
            for (dst, src) in buf[n..n + take].iter_mut().zip(s.out.drain(..take)) {
                *dst = src;
            }
            n += take;
        }
        if let Some(s) = self.save.as_mut() {
            s.read += n;
        }
        Ok(n)
    }

    fn save_pending(&mut self) -> Result<PrecopyInfo, DeviceError> {
        let pages = self.pages();
        let s = self.save.as_ref().unwrap();
        let out = s.out.len() as u64;
        let initial = ((pages - s.cursor) * REC) as u64 + if s.out_is_initial { out } else { 0 };
        let dirty = (s.dirty.len() * REC) as u64 + if s.out_is_initial { 0 } else { out };
        Ok(PrecopyInfo {
            initial_bytes: initial,
            dirty_bytes: dirty,
        })
    }

    fn save_end(&mut self) {
        self.save = None;
    }

    fn resume_begin(&mut self) -> Result<(), DeviceError> {
        self.check(Hook::ResumeBegin)?;
        self.resume = Some(Vec::new());
        Ok(())
    }

    fn resume_write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let done = self.resume.as_ref().map_or(0, Vec::len);
        self.check_counted(done, false)?;
        let r = self.resume.as_mut().unwrap();
        if r.len() + buf.len() > 64 * self.state.len() + 4096 {
            return Err(DeviceError::new(
                Errno::ENOMEM,
                "more state than a blob can have",
            ));
        }
        r.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn resume_finish(&mut self) -> Result<(), DeviceError> {
        self.check(Hook::ResumeFinish)?;
        let data = self.resume.take().unwrap_or_default();
        let bad = |why: &str| DeviceError::new(Errno::EINVAL, format!("invalid blob state: {why}"));
        let mut state = self.state.clone();
        let mut seen = vec![false; self.pages()];
        let mut at = 0;
        loop {
            if data.len() < at + 4 {
                return Err(bad("truncated"));
            }
            let page = u32::from_le_bytes(data[at..at + 4].try_into().unwrap());
            if page == u32::MAX {
                if data.len() != at + TRAILER {
                    return Err(bad("bytes after the trailer, or a short trailer"));
                }
                let len = u32::from_le_bytes(data[at + 4..at + 8].try_into().unwrap()) as usize;
                let d = u64::from_le_bytes(data[at + 8..at + 16].try_into().unwrap());
                if len != state.len() || seen.contains(&false) || digest(&state) != d {
                    return Err(bad("digest mismatch or missing pages"));
                }
                break;
            }
            let page = page as usize;
            if page >= seen.len() || data.len() < at + REC {
                return Err(bad("bad record"));
            }
            state[page * PAGE..(page + 1) * PAGE].copy_from_slice(&data[at + 4..at + REC]);
            seen[page] = true;
            at += REC;
        }
        // Only a validated state replaces the old one: nothing half-loaded ever runs.
        self.state = state;
        Ok(())
    }

    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        let pages = self.pages();
        Ok(match &self.save {
            Some(s) => ((pages - s.cursor + s.dirty.len()) * REC + s.out.len() + TRAILER) as u64,
            None => (pages * REC + TRAILER) as u64,
        })
    }

    fn dma_logging_supported(&self) -> bool {
        false
    }

    fn reset(&mut self) {
        // Like a device reset that keeps its memory: sessions end, the device runs.
        self.save = None;
        self.resume = None;
        self.running = true;
        self.resets += 1;
    }
}

pub type BlobDev = Controller<Blob>;

pub fn blob(size: usize, features: u64, seed: u64) -> BlobDev {
    let f = MigrationFeatures::from_bits(features).unwrap();
    Controller::new(Blob::new(size, f, seed), Dma::new()).unwrap()
}

pub fn named(name: &str, dev: &BlobDev) -> NamedDevice {
    NamedDevice::new(name, Arc::new(dev.clone()) as Arc<dyn MigrationDevice>)
}

pub fn contents(dev: &BlobDev) -> Vec<u8> {
    dev.with_device(|d| d.state.clone())
}

pub fn state(dev: &BlobDev) -> DeviceState {
    dev.state().unwrap()
}

pub fn inject(dev: &BlobDev, hook: Hook, persistent: bool) {
    dev.with_device(|d| d.faults.push(Fault { hook, persistent }));
}

pub fn clear_faults(dev: &BlobDev) {
    dev.with_device(|d| d.faults.clear());
}

/// Keeps changing a device (while it runs) from another thread until dropped.
pub struct Workload {
    stop: Arc<AtomicBool>,
    join: Option<JoinHandle<()>>,
}

impl Workload {
    /// `bytes_per_ms` changed bytes per millisecond.
    pub fn start(dev: &BlobDev, bytes_per_ms: usize) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        let dev = dev.clone();
        let join = thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                dev.with_device(|d| d.mutate(bytes_per_ms));
                thread::sleep(Duration::from_millis(1));
            }
        });
        Workload {
            stop,
            join: Some(join),
        }
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(j) = self.join.take() {
            let _ = j.join();
        }
    }
}

/// What a [`relay`] does to the connection.
#[derive(Clone, Copy, Debug, Default)]
pub struct RelayPlan {
    /// Cut the whole connection once this many stream bytes went through.
    pub cut_at: Option<u64>,
    /// Flip one bit of the stream byte at this offset.
    pub corrupt_at: Option<u64>,
    /// Instead of forwarding the acknowledgement with this index (0 = the first), close the
    /// back channel.
    pub drop_ack: Option<usize>,
}

/// A source end and a destination end joined through a relay thread that applies `plan`.
pub fn relay(plan: RelayPlan) -> (Transport, Transport, JoinHandle<()>) {
    let (src, relay_src) = UnixStream::pair().unwrap();
    let (relay_dst, dst) = UnixStream::pair().unwrap();
    let forward_in = relay_src.try_clone().unwrap();
    let forward_out = relay_dst.try_clone().unwrap();
    let back_in = relay_dst;
    let back_out = relay_src;
    let (a, b) = (
        forward_in.try_clone().unwrap(),
        forward_out.try_clone().unwrap(),
    );
    let forward = thread::spawn(move || {
        let (mut input, mut output) = (forward_in, forward_out);
        let mut buf = vec![0u8; 8192];
        let mut done = 0u64;
        loop {
            let n = match input.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let mut n = n;
            if let Some(c) = plan.cut_at {
                if done + n as u64 >= c {
                    n = (c - done) as usize;
                    let _ = output.write_all(&buf[..n]);
                    let _ = a.shutdown(Shutdown::Both);
                    let _ = b.shutdown(Shutdown::Both);
                    return;
                }
            }
            if let Some(at) = plan.corrupt_at {
                if at >= done && at < done + n as u64 {
                    buf[(at - done) as usize] ^= 0x10;
                }
            }
            done += n as u64;
            if output.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = output.shutdown(Shutdown::Write);
    });
    let back = thread::spawn(move || {
        let (mut input, mut output) = (back_in, back_out);
        let mut index = 0;
        while let Ok(Some(ack)) = Ack::read_from(&mut input) {
            if plan.drop_ack == Some(index) {
                let _ = output.shutdown(Shutdown::Write);
                // Swallow the rest.
                let mut sink = Vec::new();
                let _ = input.read_to_end(&mut sink);
                return;
            }
            index += 1;
            if output.write_all(&ack.encode()).is_err() {
                break;
            }
        }
        let _ = output.shutdown(Shutdown::Write);
    });
    let join = thread::spawn(move || {
        let _ = forward.join();
        let _ = back.join();
    });
    (
        Transport::unix(src).unwrap(),
        Transport::unix(dst).unwrap(),
        join,
    )
}

/// A destination end fed by one thread with `bytes` then closed (a saved or doctored stream
/// arriving over a socket), and a source end that reads the acknowledgements.
pub fn canned_source(bytes: Vec<u8>) -> (Transport, UnixStream) {
    let (a, b) = UnixStream::pair().unwrap();
    let mut w = a.try_clone().unwrap();
    thread::spawn(move || {
        let _ = w.write_all(&bytes);
        let _ = w.shutdown(Shutdown::Write);
    });
    (Transport::unix(b).unwrap(), a)
}
