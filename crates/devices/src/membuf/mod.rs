//! `membuf`: an emulated device whose state is a large buffer that keeps changing while it
//! runs.
//!
//! * **State**: `size` bytes generated from a seed (splitmix64, one allocation, never held
//!   twice: saving reads straight out of it, resuming writes straight into it).
//! * **Registers** (BAR0, region 0, 4 KiB, little-endian u64; [`MembufRegs`]): `0x00` the
//!   bytes `VFIOMIG1`, `0x08` state size, `0x10` xxh3-64 digest of the state computed when
//!   read, `0x18` generation (state mutations; not migrated, 0 after a resume), `0x20` dirty
//!   rate in bytes per second (writable, takes effect live). Other offsets read 0. Readable in
//!   every state, STOP included. Config space (region 7, 256 bytes) carries a PCI header.
//! * **Worker**: while RUNNING, RUNNING_P2P, PRE_COPY or PRE_COPY_P2P a thread rewrites whole
//!   pseudo-random 4 KiB pages at the dirty rate, every ~5 ms, adding one to the generation per
//!   page. It is stopped, with nothing in flight, when the stop hooks return.
//! * **DMA**: for every page it rewrites, the worker posts a 16-byte completion entry
//!   (generation u64, page index u64) into a completion ring in guest memory through the
//!   device's [`Dma`] handle: the ring is [`MembufConfig::dma_window`] (`length / 16` entries,
//!   written in order, wrapping around). So DMA dirty logging reports the ring pages the device
//!   wrote. Without guest memory, or with an empty window, there is no DMA. The emulation has
//!   no peer-to-peer DMA: entering RUNNING_P2P only records the mode.
//! * **Migration**: the stream format is described in [`format`](mod@format). PRE_COPY first streams the
//!   whole buffer (initial bytes, only falling), then pages dirtied since they were read (dirty
//!   bytes); a read with neither returns "nothing now". STOP_COPY sends what is still unsent
//!   or dirty, then a trailer with the page-hash sum of the final state, kept up to date page
//!   by page as pages are copied, so that making it costs nothing once the device is stopped.
//!   The destination writes record data straight into its buffer, hashing each page as it is
//!   completed, and, when leaving RESUMING, refuses a stream that is truncated, incomplete,
//!   corrupt or for another size, saying what was wrong (no pass over the state either).
//! * **Reset** restores the power-on contents (generated again from the seed) and restarts the
//!   generation at 0, so nothing of a failed resume survives it.
//!
//! ```
//! use vfio_mig_devices::membuf::{self, MembufConfig};
//! use vfio_mig_device::{DeviceState, MigrationDevice, ReadOutcome};
//!
//! let dev = membuf::create(MembufConfig { size: 64 * 1024, ..Default::default() }).unwrap();
//! dev.controller().set_state(DeviceState::Stop).unwrap();
//! let mut stream = dev.controller().set_state(DeviceState::StopCopy).unwrap().unwrap();
//! let mut buf = vec![0u8; 1 << 20];
//! let mut saved = Vec::new();
//! while let ReadOutcome::Data(n) = stream.read(&mut buf).unwrap() {
//!     saved.extend_from_slice(&buf[..n]);
//! }
//! assert_eq!(saved.len() as u64, membuf::format::full_stream_len(64 * 1024));
//! ```

use std::sync::Arc;

use vfio_mig_device::{
    Controller, DeviceError, Dma, IovaRange, MigrationDevice, MigrationFeatures, RegionAccess,
};
use vfio_mig_uapi::Errno;

mod content;
mod device;
pub mod format;
mod regs;
mod resume;
mod save;
mod worker;

pub use content::digest;
pub use device::{MembufDevice, KIND, VERSION};
pub use format::PAGE_SIZE;
pub use regs::{
    MembufRegs, BAR0_INDEX, BAR0_SIZE, CONFIG_INDEX, CONFIG_SIZE, MAGIC, PCI_DEVICE_ID,
    PCI_VENDOR_ID, REG_DIGEST, REG_DIRTY_RATE, REG_GENERATION, REG_MAGIC, REG_SIZE,
};
pub use worker::COMPLETION_LEN;

/// Smallest state.
pub const MIN_SIZE: u64 = PAGE_SIZE;
/// The default state size (64 MiB).
pub const DEFAULT_SIZE: u64 = 64 << 20;
/// The default seed.
pub const DEFAULT_SEED: u64 = 1;
/// The default completion ring: 64 KiB (4096 entries) at I/O virtual address 0.
pub const DEFAULT_DMA_WINDOW: IovaRange = IovaRange {
    iova: 0,
    length: 64 * 1024,
};

/// How to build a membuf.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembufConfig {
    /// State size in bytes: a multiple of 4096, at least 4096, at most what memory allows.
    pub size: u64,
    /// Bytes per second the worker rewrites while the device runs; 0 is a still device.
    pub dirty_rate: u64,
    /// Migration capabilities (any valid set; STOP_COPY is always there).
    pub features: MigrationFeatures,
    /// The initial contents are a function of this seed.
    pub seed: u64,
    /// Whether the device offers DMA dirty logging (all its DMA goes through its [`Dma`]
    /// handle, so the log is exact). `false` makes logging requests fail with `ENOTTY`.
    pub dma_logging: bool,
    /// Where in guest I/O virtual address space the completion ring is (empty: no DMA).
    pub dma_window: IovaRange,
}

impl Default for MembufConfig {
    /// 64 MiB, still, every feature, seed 1, DMA logging on, [`DEFAULT_DMA_WINDOW`].
    fn default() -> Self {
        MembufConfig {
            size: DEFAULT_SIZE,
            dirty_rate: 0,
            features: MigrationFeatures::ALL,
            seed: DEFAULT_SEED,
            dma_logging: true,
            dma_window: DEFAULT_DMA_WINDOW,
        }
    }
}

impl MembufConfig {
    /// Checks the size and the DMA window (`EINVAL` with what is wrong).
    pub fn validate(&self) -> Result<(), DeviceError> {
        if self.size < MIN_SIZE || self.size % PAGE_SIZE != 0 {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!(
                    "membuf size {} is not a multiple of 4 KiB of at least 4 KiB",
                    format::Size(self.size)
                ),
            ));
        }
        if MigrationFeatures::from_bits(self.features.bits()).is_err() {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!("membuf features {:#x} lack STOP_COPY", self.features.bits()),
            ));
        }
        if self.dma_window.end().is_none() {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!(
                    "membuf DMA window {:#x}+{:#x} overflows",
                    self.dma_window.iova, self.dma_window.length
                ),
            ));
        }
        Ok(())
    }
}

/// A hosted membuf: its migration interface, its registers and its DMA handle.
#[derive(Debug, Clone)]
pub struct Membuf {
    controller: Controller<MembufDevice>,
    regs: Arc<MembufRegs>,
}

impl Membuf {
    /// The controller: the device's [`MigrationDevice`], with typed access to the hooks.
    pub fn controller(&self) -> &Controller<MembufDevice> {
        &self.controller
    }

    /// The device's [`MigrationDevice`], shareable between threads.
    pub fn migration(&self) -> Arc<dyn MigrationDevice> {
        Arc::new(self.controller.clone())
    }

    /// The register view (BAR0, config space) with typed accessors.
    pub fn regs(&self) -> &Arc<MembufRegs> {
        &self.regs
    }

    /// The register view as a [`RegionAccess`], for a transport to serve in every state.
    pub fn regions(&self) -> Arc<dyn RegionAccess> {
        Arc::clone(&self.regs) as Arc<dyn RegionAccess>
    }

    /// The DMA handle: attach guest memory with [`Dma::set_memory`].
    pub fn dma(&self) -> &Dma {
        self.controller.dma()
    }
}

/// Builds a membuf with a fresh [`Dma`] handle (no guest memory attached yet). It starts
/// RUNNING.
pub fn create(config: MembufConfig) -> Result<Membuf, DeviceError> {
    create_with_dma(config, Dma::new())
}

/// Builds a membuf whose DMA goes through `dma`.
pub fn create_with_dma(config: MembufConfig, dma: Dma) -> Result<Membuf, DeviceError> {
    let (device, regs) = MembufDevice::new(&config, dma.clone())?;
    let controller = Controller::new(device, dma)?;
    Ok(Membuf { controller, regs })
}
