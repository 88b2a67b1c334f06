//! `lvu-sample`: an emulated device shaped like libvfio-user's sample server (`samples/server`),
//! so that libvfio-user's sample client runs its whole flow against a vfio-mig server. It is
//! an interoperability test device; it exercises every server capability that client
//! relies on: interrupts, server-initiated DMA by message, direct DMA, a mappable region
//! with a sparse-mmap capability, DMA dirty logging and migration with PRE_COPY.
//!
//! # Layout (a PCI device)
//!
//! | region | size | contents |
//! |---|---|---|
//! | BAR0 (0) | 8 bytes | the timer: a time in seconds since the epoch, little-endian `i64` |
//! | BAR1 (1) | [`LvuSampleConfig::bar1_size`] (16 KiB) | plain read/write memory, the device state; mappable: sparse areas [`BAR1_MMAP_AREAS`] of a sealed memfd |
//! | config (7) | 256 bytes | PCI header: vendor/device [`VENDOR_ID`]/[`DEVICE_ID`], subsystem [`SUBSYSTEM_VENDOR_ID`]/[`SUBSYSTEM_ID`], interrupt pin INTA |
//!
//! IRQ indices: INTx 1 vector, MSI 0, MSI-X 0, ERR 1, REQ 1.
//!
//! * **BAR0** takes only 8-byte accesses at offset 0 (else `EINVAL`). Writing a time stores
//!   it and, while the device runs (RUNNING or PRE_COPY), arms the timer for that time;
//!   reading gives the seconds elapsed since the stored time (negative before it). When the
//!   timer fires (at or after its time, only while the device runs), the device raises INTx
//!   and does its DMA round (below). An armed timer waits while the device is stopped.
//! * **BAR1** is kept in a memfd sealed against resizing: message accesses use `pread` and
//!   `pwrite` on it and the user's mapping of the sparse areas sees the same bytes. Its
//!   accesses are accepted in every state (the user could write its mapping anyway).
//! * **DMA round**, on the first two DMA windows by IOVA (as the sample, which uses the
//!   first two it was given): on window 1, 4 KiB of `'A'`, `'B'`, `'C'`, `'D'` (1 KiB each)
//!   written through [`Dma`] (directly into the user's memory when the window was mapped with
//!   an fd) then read back in 2 KiB pieces; then the same on window 0 **by message**
//!   (DMA_WRITE of each 1 KiB, DMA_READ of each 2 KiB; the host splits them at the user's
//!   `max_data_xfer_size`). A round whose read-back differs counts as a DMA error. Windows
//!   shorter than 4 KiB get as much as fits.
//! * **Migration** (STOP_COPY and PRE_COPY, the sample's stream layout): PRE_COPY streams
//!   BAR1 as it is when read, then nothing more; STOP_COPY (from STOP, or from PRE_COPY,
//!   where it starts again) streams BAR1 then the 8-byte BAR0 time. A saving session's data
//!   is thus at most a BAR1 image (PRE_COPY) followed by BAR1's size plus 8 bytes (STOP_COPY):
//!   libvfio-user's sample client sends a destination only the STOP_COPY part, a user that
//!   sends everything (as the kernel's uAPI has it, and vfio-mig's orchestrator does) also
//!   the PRE_COPY part. Resuming takes up to twice BAR1's size plus 8 bytes (more is refused
//!   at once) and, when leaving RESUMING, installs the last BAR1's size plus 8 bytes (fewer is
//!   refused), then arms the timer for the migrated time, to fire once the device runs.
//! * **Reset**: BAR1 zeroed, BAR0 0, timer disarmed, running.
//!
//! ```
//! use vfio_mig_device::{DeviceState, MigrationDevice, ReadOutcome};
//! use vfio_mig_devices::lvu_sample::{self, LvuSampleConfig};
//!
//! let dev = lvu_sample::create(LvuSampleConfig::default())?;
//! dev.regions().region_write(1, 0, b"state")?;
//! dev.migration().set_state(DeviceState::Stop)?;
//! let mut stream = dev.migration().set_state(DeviceState::StopCopy)?.expect("opens");
//! let mut saved = Vec::new();
//! let mut buf = [0u8; 1024];
//! while let ReadOutcome::Data(n) = stream.read(&mut buf)? {
//!     saved.extend_from_slice(&buf[..n]);
//! }
//! assert_eq!(saved.len(), 16 * 1024 + 8);
//! assert_eq!(&saved[..5], b"state");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustix::fs::{MemfdFlags, SealFlags};
use vfio_mig_device::{
    Controller, DeviceError, DeviceIdentity, Dma, DmaWindow, HostLink, IrqInfo, Migratable,
    MigrationDevice, MigrationFeatures, MmapArea, PrecopyInfo, RegionAccess, RegionInfo,
    RegionMmap, RunMode, SaveKind,
};
use vfio_mig_uapi::Errno;

/// The device kind, as specs and identities name it.
pub const KIND: &str = "lvu-sample";
/// The version of the stream format (the sample server's layout).
pub const VERSION: &str = "1";
/// PCI vendor id.
pub const VENDOR_ID: u16 = 0xdead;
/// PCI device id.
pub const DEVICE_ID: u16 = 0xbeef;
/// PCI subsystem vendor id.
pub const SUBSYSTEM_VENDOR_ID: u16 = 0xcafe;
/// PCI subsystem id.
pub const SUBSYSTEM_ID: u16 = 0xbabe;
/// Region index of the timer.
pub const BAR0: u32 = 0;
/// Region index of the state memory.
pub const BAR1: u32 = 1;
/// Region index of PCI config space.
pub const CONFIG: u32 = 7;
/// Size of BAR0.
pub const BAR0_SIZE: u64 = 8;
/// Size of config space.
pub const CONFIG_SIZE: u64 = 256;
/// Default size of BAR1 (the sample's, made a power of two).
pub const DEFAULT_BAR1_SIZE: u64 = 16 * 1024;
/// Smallest BAR1: the mappable areas must fit.
pub const MIN_BAR1_SIZE: u64 = 16 * 1024;
/// Largest BAR1.
pub const MAX_BAR1_SIZE: u64 = 1 << 30;
/// The mappable areas of BAR1 (the sample's).
pub const BAR1_MMAP_AREAS: [MmapArea; 2] = [
    MmapArea {
        offset: 0,
        size: 0x1000,
    },
    MmapArea {
        offset: 0x2000,
        size: 0x1000,
    },
];
/// IRQ index of INTx, which the timer raises.
pub const IRQ_INTX: u32 = 0;
/// Bytes of one DMA round per window.
pub const DMA_ROUND_LEN: usize = 4096;
/// Each write of a round.
pub const DMA_WRITE_CHUNK: usize = 1024;
/// Each read of a round.
pub const DMA_READ_CHUNK: usize = 2048;

/// How to build the device (the `lvu-sample` spec maps to it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LvuSampleConfig {
    /// Size of BAR1, the migrated state: a power of two from [`MIN_BAR1_SIZE`] to
    /// [`MAX_BAR1_SIZE`].
    pub bar1_size: u64,
}

impl Default for LvuSampleConfig {
    fn default() -> Self {
        LvuSampleConfig {
            bar1_size: DEFAULT_BAR1_SIZE,
        }
    }
}

impl LvuSampleConfig {
    /// Checks the sizes.
    pub fn validate(&self) -> Result<(), DeviceError> {
        let s = self.bar1_size;
        if !s.is_power_of_two() || !(MIN_BAR1_SIZE..=MAX_BAR1_SIZE).contains(&s) {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!(
                    "BAR1 size {s:#x} must be a power of two from {MIN_BAR1_SIZE:#x} to {MAX_BAR1_SIZE:#x}"
                ),
            ));
        }
        Ok(())
    }

    /// Bytes of the STOP_COPY stream: BAR1 and the 8-byte BAR0 time.
    pub fn stop_copy_len(&self) -> u64 {
        self.bar1_size + BAR0_SIZE
    }
}

/// What the device has done, for tests and logs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LvuStats {
    /// Times the timer fired.
    pub timer_fired: u64,
    /// Interrupts delivered to the user (INTx with an eventfd set).
    pub interrupts: u64,
    /// DMA rounds completed with the data read back as written.
    pub dma_rounds: u64,
    /// DMA rounds that failed or read back something else.
    pub dma_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    timer_fired: AtomicU64,
    interrupts: AtomicU64,
    dma_rounds: AtomicU64,
    dma_errors: AtomicU64,
}

/// The timer and run state, guarded together so the timer thread sees them change.
#[derive(Debug)]
struct Core {
    /// The time last written to BAR0 (or migrated in): what BAR0 reads relative to and what
    /// STOP_COPY carries.
    bar0: i64,
    /// The time the timer fires at, if armed.
    armed: Option<i64>,
    running: bool,
    shutdown: bool,
}

#[derive(Debug)]
struct Shared {
    core: Mutex<Core>,
    /// Signalled when `core` changes.
    changed: Condvar,
    bar1: Arc<OwnedFd>,
    bar1_size: u64,
    config: Mutex<[u8; CONFIG_SIZE as usize]>,
    link: HostLink,
    dma: Dma,
    counters: Counters,
}

impl Shared {
    fn core(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn update(&self, f: impl FnOnce(&mut Core)) {
        f(&mut self.core());
        self.changed.notify_all();
    }

    fn running(&self) -> bool {
        self.core().running
    }

    /// Reads BAR1 at `offset`; bytes past the file's end (it cannot shrink) read as zero.
    fn bar1_read(&self, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let mut done = 0;
        while done < buf.len() {
            let n = rustix::io::pread(&*self.bar1, &mut buf[done..], offset + done as u64)
                .map_err(|e| DeviceError::from_io("reading BAR1", e.into()))?;
            if n == 0 {
                buf[done..].fill(0);
                break;
            }
            done += n;
        }
        Ok(())
    }

    fn bar1_write(&self, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let mut done = 0;
        while done < data.len() {
            let n = rustix::io::pwrite(&*self.bar1, &data[done..], offset + done as u64)
                .map_err(|e| DeviceError::from_io("writing BAR1", e.into()))?;
            if n == 0 {
                return Err(DeviceError::new(Errno::EIO, "BAR1 write made no progress"));
            }
            done += n;
        }
        Ok(())
    }
}

/// Seconds since the epoch now (negative before 1970, which no clock here shows).
fn now_secs() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => -i64::try_from(e.duration().as_secs()).unwrap_or(i64::MAX),
    }
}

/// How long until the wall clock reaches second `at` (zero if it has).
fn until(at: i64) -> Duration {
    let Ok(at) = u64::try_from(at) else {
        return Duration::ZERO;
    };
    let target = UNIX_EPOCH + Duration::from_secs(at);
    target
        .duration_since(SystemTime::now())
        .unwrap_or(Duration::ZERO)
}

fn einval(message: String) -> DeviceError {
    DeviceError::new(Errno::EINVAL, message)
}

/// The device's regions, valid in every migration state. Cheap to clone.
#[derive(Clone, Debug)]
pub struct LvuRegions {
    shared: Arc<Shared>,
}

impl LvuRegions {
    fn span(&self, index: u32, offset: u64, len: usize) -> Result<u64, DeviceError> {
        let size = match index {
            BAR0 => BAR0_SIZE,
            BAR1 => self.shared.bar1_size,
            CONFIG => CONFIG_SIZE,
            _ => return Err(einval(format!("region {index} does not exist"))),
        };
        match offset.checked_add(len as u64) {
            Some(end) if end <= size => Ok(offset),
            _ => Err(einval(format!(
                "{len} bytes at {offset:#x} run past the end of region {index} ({size:#x} bytes)"
            ))),
        }
    }

    fn check_bar0(offset: u64, len: usize) -> Result<(), DeviceError> {
        if offset != 0 || len as u64 != BAR0_SIZE {
            return Err(einval(format!(
                "BAR0 takes 8-byte accesses at offset 0, not {len} bytes at {offset:#x}"
            )));
        }
        Ok(())
    }
}

/// The power-on config space.
fn config_space() -> [u8; CONFIG_SIZE as usize] {
    let mut c = [0u8; CONFIG_SIZE as usize];
    c[0..2].copy_from_slice(&VENDOR_ID.to_le_bytes());
    c[2..4].copy_from_slice(&DEVICE_ID.to_le_bytes());
    c[0x2c..0x2e].copy_from_slice(&SUBSYSTEM_VENDOR_ID.to_le_bytes());
    c[0x2e..0x30].copy_from_slice(&SUBSYSTEM_ID.to_le_bytes());
    // Interrupt pin: INTA.
    c[0x3d] = 1;
    c
}

/// Config-space bytes a write may change: the command register and the interrupt line;
/// writes elsewhere are ignored, as on read-only PCI registers.
fn config_writable(offset: usize) -> bool {
    matches!(offset, 0x04 | 0x05 | 0x3c)
}

impl RegionAccess for LvuRegions {
    fn regions(&self) -> Vec<RegionInfo> {
        [
            (BAR0, BAR0_SIZE),
            (BAR1, self.shared.bar1_size),
            (CONFIG, CONFIG_SIZE),
        ]
        .into_iter()
        .map(|(index, size)| RegionInfo {
            index,
            size,
            readable: true,
            writable: true,
        })
        .collect()
    }

    fn irqs(&self) -> Vec<IrqInfo> {
        [(0, 1), (1, 0), (2, 0), (3, 1), (4, 1)]
            .into_iter()
            .map(|(index, count)| IrqInfo { index, count })
            .collect()
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let offset = self.span(index, offset, buf.len())?;
        match index {
            BAR0 => {
                Self::check_bar0(offset, buf.len())?;
                let since = now_secs().saturating_sub(self.shared.core().bar0);
                buf.copy_from_slice(&since.to_le_bytes());
                Ok(())
            }
            BAR1 => self.shared.bar1_read(offset, buf),
            _ => {
                let config = self.shared.config.lock().unwrap_or_else(|p| p.into_inner());
                let at = offset as usize;
                buf.copy_from_slice(&config[at..at + buf.len()]);
                Ok(())
            }
        }
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let offset = self.span(index, offset, data.len())?;
        match index {
            BAR0 => {
                Self::check_bar0(offset, data.len())?;
                let mut time = [0u8; 8];
                time.copy_from_slice(data);
                let time = i64::from_le_bytes(time);
                self.shared.update(|core| {
                    core.bar0 = time;
                    if core.running {
                        core.armed = Some(time);
                    }
                });
                tracing::debug!(time, "lvu-sample: BAR0 written");
                Ok(())
            }
            BAR1 => self.shared.bar1_write(offset, data),
            _ => {
                let mut config = self.shared.config.lock().unwrap_or_else(|p| p.into_inner());
                for (i, &b) in data.iter().enumerate() {
                    let at = offset as usize + i;
                    if config_writable(at) {
                        config[at] = b;
                    }
                }
                Ok(())
            }
        }
    }

    fn region_mmap(&self, index: u32) -> Option<RegionMmap> {
        (index == BAR1).then(|| RegionMmap {
            fd: Arc::clone(&self.shared.bar1),
            file_offset: 0,
            areas: BAR1_MMAP_AREAS.to_vec(),
        })
    }

    fn host_link(&self) -> Option<HostLink> {
        Some(self.shared.link.clone())
    }
}

/// The saving session: what it carries and how far it was read.
#[derive(Debug)]
struct Save {
    /// BAR1 only (PRE_COPY) or BAR1 and BAR0 (STOP_COPY).
    len: u64,
    read: u64,
    precopy: bool,
}

/// The device the controller drives. See the [module docs](self).
#[derive(Debug)]
struct LvuDevice {
    shared: Arc<Shared>,
    save: Option<Save>,
    resume: Option<Vec<u8>>,
    timer: Option<JoinHandle<()>>,
}

impl LvuDevice {
    fn stop_copy(&self) -> Save {
        Save {
            len: self.shared.bar1_size + BAR0_SIZE,
            read: 0,
            precopy: false,
        }
    }
}

impl Drop for LvuDevice {
    fn drop(&mut self) {
        self.shared.update(|core| core.shutdown = true);
        if let Some(timer) = self.timer.take() {
            // The timer thread checks `shutdown` between steps; DMA it has in flight ends
            // when its host answers or detaches.
            let _ = timer.join();
        }
    }
}

fn not_in_feature_set(what: &str) -> DeviceError {
    einval(format!(
        "the lvu-sample device has no {what} (stop-copy and pre-copy only)"
    ))
}

impl Migratable for LvuDevice {
    fn features(&self) -> MigrationFeatures {
        MigrationFeatures::PRE_COPY
    }

    /// The compatibility data is BAR1's size: the stream is BAR1 and 8 bytes.
    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            kind: KIND.into(),
            version: VERSION.into(),
            compat: self.shared.bar1_size.to_le_bytes().to_vec(),
        }
    }

    fn stop(&mut self) -> Result<(), DeviceError> {
        self.shared.update(|core| core.running = false);
        Ok(())
    }

    fn start(&mut self, _mode: RunMode) -> Result<(), DeviceError> {
        self.shared.update(|core| core.running = true);
        Ok(())
    }

    fn set_p2p_quiesced(&mut self, _quiesced: bool) -> Result<(), DeviceError> {
        Err(not_in_feature_set("p2p states"))
    }

    fn save_begin(&mut self, kind: SaveKind) -> Result<(), DeviceError> {
        self.save = Some(match kind {
            SaveKind::PreCopy => Save {
                len: self.shared.bar1_size,
                read: 0,
                precopy: true,
            },
            SaveKind::StopCopy => self.stop_copy(),
        });
        Ok(())
    }

    /// PRE_COPY -> STOP_COPY: stops, and streams everything again (the pre-copy data is
    /// the same BAR1, possibly changed since).
    fn save_stop_copy(&mut self) -> Result<(), DeviceError> {
        self.shared.update(|core| core.running = false);
        self.save = Some(self.stop_copy());
        Ok(())
    }

    fn save_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let bar1_size = self.shared.bar1_size;
        let save = self
            .save
            .as_mut()
            .ok_or_else(|| einval("no saving session is open".into()))?;
        let n = usize::try_from(save.len - save.read)
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let mut filled = 0;
        if save.read < bar1_size {
            let from_bar1 = usize::try_from(bar1_size - save.read)
                .unwrap_or(usize::MAX)
                .min(n);
            self.shared.bar1_read(save.read, &mut buf[..from_bar1])?;
            filled = from_bar1;
        }
        if filled < n {
            let time = self.shared.core().bar0.to_le_bytes();
            let at = (save.read + filled as u64 - bar1_size) as usize;
            let more = n - filled;
            buf[filled..n].copy_from_slice(&time[at..at + more]);
        }
        save.read += n as u64;
        Ok(n)
    }

    fn save_pending(&mut self) -> Result<PrecopyInfo, DeviceError> {
        let save = self
            .save
            .as_ref()
            .filter(|s| s.precopy)
            .ok_or_else(|| einval("no pre-copy session is open".into()))?;
        Ok(PrecopyInfo {
            initial_bytes: save.len - save.read,
            dirty_bytes: 0,
        })
    }

    fn save_end(&mut self) {
        self.save = None;
    }

    fn resume_begin(&mut self) -> Result<(), DeviceError> {
        let len = usize::try_from(self.shared.bar1_size + BAR0_SIZE).unwrap_or(usize::MAX);
        self.resume = Some(Vec::with_capacity(len));
        Ok(())
    }

    /// Takes bytes up to a PRE_COPY image and a STOP_COPY stream; refuses more at once, so
    /// the buffer never grows by an amount the sender chooses.
    fn resume_write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let total = 2 * self.shared.bar1_size + BAR0_SIZE;
        let written = self
            .resume
            .as_mut()
            .ok_or_else(|| einval("no resuming session is open".into()))?;
        if written.len() as u64 + buf.len() as u64 > total {
            return Err(einval(format!(
                "lvu-sample stream longer than {total} bytes: {} written, {} more offered",
                written.len(),
                buf.len()
            )));
        }
        written.extend_from_slice(buf);
        Ok(buf.len())
    }

    /// RESUMING -> STOP: BAR1 and the time take the values of the STOP_COPY stream (the last
    /// BAR1's size plus 8 bytes; any PRE_COPY image before it is superseded); the timer is
    /// armed for the time, to fire once the device runs.
    fn resume_finish(&mut self) -> Result<(), DeviceError> {
        let total = self.shared.bar1_size + BAR0_SIZE;
        let written = self
            .resume
            .as_deref()
            .ok_or_else(|| einval("no resuming session is open".into()))?;
        if (written.len() as u64) < total {
            return Err(einval(format!(
                "lvu-sample stream truncated: {} of {total} bytes",
                written.len()
            )));
        }
        let stop_copy = &written[written.len() - total as usize..];
        let (bar1, time) = stop_copy.split_at(stop_copy.len() - BAR0_SIZE as usize);
        self.shared.bar1_write(0, bar1)?;
        let mut t = [0u8; 8];
        t.copy_from_slice(time);
        let time = i64::from_le_bytes(t);
        self.shared.update(|core| {
            core.bar0 = time;
            core.armed = Some(time);
        });
        self.resume = None;
        Ok(())
    }

    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        Ok(self.shared.bar1_size + BAR0_SIZE)
    }

    fn dma_logging_supported(&self) -> bool {
        true
    }

    fn reset(&mut self) {
        self.save = None;
        self.resume = None;
        // The memfd is sealed against resizing, so it is zeroed by writes.
        let zeros = [0u8; 4096];
        let mut at = 0;
        while at < self.shared.bar1_size {
            let n = (self.shared.bar1_size - at).min(zeros.len() as u64) as usize;
            if let Err(e) = self.shared.bar1_write(at, &zeros[..n]) {
                tracing::warn!("lvu-sample reset could not zero BAR1: {e}");
                break;
            }
            at += n as u64;
        }
        *self.shared.config.lock().unwrap_or_else(|p| p.into_inner()) = config_space();
        self.shared.update(|core| {
            core.bar0 = 0;
            core.armed = None;
            core.running = true;
        });
    }
}

/// The timer thread: waits for the armed time while the device runs, then raises INTx and
/// does a DMA round.
fn timer_loop(shared: Arc<Shared>) {
    loop {
        {
            let mut core = shared.core();
            loop {
                if core.shutdown {
                    return;
                }
                match core.armed {
                    Some(at) if core.running => {
                        if now_secs() >= at {
                            core.armed = None;
                            break;
                        }
                        let wait = until(at).max(Duration::from_millis(1));
                        core = shared
                            .changed
                            .wait_timeout(core, wait)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                    }
                    _ => {
                        core = shared.changed.wait(core).unwrap_or_else(|p| p.into_inner());
                    }
                }
            }
        }
        fire(&shared);
    }
}

/// The timer fired: INTx, then the DMA round on the first two windows.
fn fire(shared: &Shared) {
    shared.counters.timer_fired.fetch_add(1, Ordering::Relaxed);
    match shared.link.trigger_irq(IRQ_INTX, 0) {
        Ok(true) => {
            shared.counters.interrupts.fetch_add(1, Ordering::Relaxed);
        }
        Ok(false) => tracing::debug!("lvu-sample: INTx raised, nobody listens"),
        Err(e) => tracing::warn!("lvu-sample: raising INTx failed: {e}"),
    }
    let windows = shared.link.dma_windows();
    // As the sample: the direct round on the second window, then the round by message on
    // the first.
    let rounds = [(windows.get(1), false), (windows.first(), true)];
    for (window, by_message) in rounds {
        let Some(window) = window else {
            continue;
        };
        if !shared.running() {
            tracing::debug!("lvu-sample: stopped, no more DMA");
            return;
        }
        match dma_round(shared, window, by_message) {
            Ok(()) => {
                shared.counters.dma_rounds.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                shared.counters.dma_errors.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(
                    iova = window.iova,
                    by_message,
                    "lvu-sample: DMA round failed: {e}"
                );
            }
        }
    }
}

/// The pattern one round writes: 1 KiB of `'A'`, then `'B'`, ...
fn pattern(len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| b'A' + (i / DMA_WRITE_CHUNK) as u8)
        .collect()
}

/// Writes the pattern into `window` and reads it back (by message, or through [`Dma`]).
fn dma_round(shared: &Shared, window: &DmaWindow, by_message: bool) -> Result<(), DeviceError> {
    let len = usize::try_from(window.size)
        .unwrap_or(usize::MAX)
        .min(DMA_ROUND_LEN);
    let written = pattern(len);
    for (i, chunk) in written.chunks(DMA_WRITE_CHUNK).enumerate() {
        let iova = window.iova + (i * DMA_WRITE_CHUNK) as u64;
        if by_message {
            shared.link.dma_write_by_message(iova, chunk)?;
        } else {
            shared.dma.write(iova, chunk)?;
        }
    }
    let mut read = vec![0u8; len];
    for (i, chunk) in read.chunks_mut(DMA_READ_CHUNK).enumerate() {
        let iova = window.iova + (i * DMA_READ_CHUNK) as u64;
        if by_message {
            shared.link.dma_read_by_message(iova, chunk)?;
        } else {
            shared.dma.read(iova, chunk)?;
        }
    }
    if read != written {
        return Err(DeviceError::new(
            Errno::EIO,
            format!(
                "DMA at {:#x} read back other bytes than written",
                window.iova
            ),
        ));
    }
    Ok(())
}

/// A built lvu-sample device: the controller and the handles a host needs.
#[derive(Clone)]
pub struct LvuSample {
    controller: Arc<Controller<LvuDevice>>,
    regions: LvuRegions,
    dma: Dma,
    config: LvuSampleConfig,
}

impl std::fmt::Debug for LvuSample {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LvuSample")
            .field("config", &self.config)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// Builds the device: BAR1 in a new sealed memfd, the timer thread started, running.
pub fn create(config: LvuSampleConfig) -> Result<LvuSample, DeviceError> {
    config.validate()?;
    let memfd = rustix::fs::memfd_create(
        "lvu-sample-bar1",
        MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING,
    )
    .map_err(|e| DeviceError::from_io("creating the BAR1 memfd", e.into()))?;
    rustix::fs::ftruncate(&memfd, config.bar1_size)
        .map_err(|e| DeviceError::from_io("sizing the BAR1 memfd", e.into()))?;
    // The user gets this fd: it must not be able to shrink or grow the device's memory.
    rustix::fs::fcntl_add_seals(
        &memfd,
        SealFlags::SHRINK | SealFlags::GROW | SealFlags::SEAL,
    )
    .map_err(|e| DeviceError::from_io("sealing the BAR1 memfd", e.into()))?;
    let dma = Dma::new();
    let shared = Arc::new(Shared {
        core: Mutex::new(Core {
            bar0: 0,
            armed: None,
            running: true,
            shutdown: false,
        }),
        changed: Condvar::new(),
        bar1: Arc::new(memfd),
        bar1_size: config.bar1_size,
        config: Mutex::new(config_space()),
        link: HostLink::new(),
        dma: dma.clone(),
        counters: Counters::default(),
    });
    let timer = {
        let shared = Arc::clone(&shared);
        std::thread::Builder::new()
            .name("lvu-sample-timer".into())
            .spawn(move || timer_loop(shared))
            .map_err(|e| DeviceError::from_io("starting the timer thread", e))?
    };
    let device = LvuDevice {
        shared: Arc::clone(&shared),
        save: None,
        resume: None,
        timer: Some(timer),
    };
    let controller = Controller::new(device, dma.clone())?;
    Ok(LvuSample {
        controller: Arc::new(controller),
        regions: LvuRegions { shared },
        dma,
        config,
    })
}

impl LvuSample {
    /// The migration interface.
    pub fn migration(&self) -> Arc<dyn MigrationDevice> {
        self.controller.clone()
    }

    /// Region access (BAR0, BAR1, config space), with BAR1's mmap offer and the host link.
    pub fn regions(&self) -> Arc<dyn RegionAccess> {
        Arc::new(self.regions.clone())
    }

    /// The DMA handle: the host attaches guest memory to it.
    pub fn dma(&self) -> &Dma {
        &self.dma
    }

    /// The handle the host attaches its services (interrupts, DMA by message) to.
    pub fn link(&self) -> &HostLink {
        &self.regions.shared.link
    }

    /// The configuration it was built with.
    pub fn config(&self) -> LvuSampleConfig {
        self.config
    }

    /// A copy of BAR1.
    pub fn bar1(&self) -> Result<Vec<u8>, DeviceError> {
        let mut out = vec![0u8; usize::try_from(self.config.bar1_size).unwrap_or(0)];
        self.regions.shared.bar1_read(0, &mut out)?;
        Ok(out)
    }

    /// The time BAR0 holds, and the time the timer is armed for (if it is).
    pub fn timer(&self) -> (i64, Option<i64>) {
        let core = self.regions.shared.core();
        (core.bar0, core.armed)
    }

    /// What the device has done so far.
    pub fn stats(&self) -> LvuStats {
        let c = &self.regions.shared.counters;
        LvuStats {
            timer_fired: c.timer_fired.load(Ordering::Relaxed),
            interrupts: c.interrupts.load(Ordering::Relaxed),
            dma_rounds: c.dma_rounds.load(Ordering::Relaxed),
            dma_errors: c.dma_errors.load(Ordering::Relaxed),
        }
    }
}
