//! [`MembufDevice`]: the author's hooks of membuf.

use std::fmt;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use vfio_mig_device::{
    DeviceError, DeviceIdentity, Dma, Migratable, MigrationFeatures, PrecopyInfo, RunMode, SaveKind,
};
use vfio_mig_uapi::Errno;

use super::content::{generate, pages_of, PageBitmap, SplitMix};
use super::format::{full_stream_len, StreamError};
use super::regs::MembufRegs;
use super::resume::ResumeSession;
use super::save::SaveSession;
use super::worker::{self, Core, Shared};
use super::MembufConfig;

/// The `kind` of a membuf's [`DeviceIdentity`].
pub const KIND: &str = "membuf";
/// The `version` of a membuf's [`DeviceIdentity`]: the stream format version
/// ([`super::format::STREAM_VERSION`]), so that a destination reading another format is refused
/// before any state is sent.
pub const VERSION: &str = "2";

/// The membuf device as a [`Migratable`]: wrap it in a [`vfio_mig_device::Controller`] (as
/// [`super::create`] does) to get a `MigrationDevice`.
///
/// Dropping it stops and joins its worker thread.
pub struct MembufDevice {
    shared: Arc<Shared>,
    features: MigrationFeatures,
    dma_logging: bool,
    worker: Option<JoinHandle<()>>,
}

impl fmt::Debug for MembufDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MembufDevice")
            .field("size", &self.shared.size)
            .field("features", &self.features)
            .field("mutating", &self.is_mutating())
            .finish_non_exhaustive()
    }
}

impl MembufDevice {
    /// Generates the state from `config.seed` (one allocation of `config.size` bytes), starts
    /// the worker (the device is RUNNING) and returns the device with its register view.
    /// All DMA goes through `dma`.
    pub fn new(
        config: &MembufConfig,
        dma: Dma,
    ) -> Result<(MembufDevice, Arc<MembufRegs>), DeviceError> {
        config.validate()?;
        let state = generate(config.size, config.seed)?;
        let shared = Arc::new(Shared {
            core: Mutex::new(Core {
                state,
                running: true,
                exit: false,
                p2p_quiesced: false,
                save: None,
                resume: None,
                dirty: PageBitmap::new(pages_of(config.size)),
            }),
            wake: Condvar::new(),
            size: config.size,
            seed: config.seed,
            generation: Default::default(),
            dirty_rate: config.dirty_rate.into(),
            dma_window: config.dma_window,
            dma_completions: Default::default(),
            dma_errors: Default::default(),
        });
        let for_worker = Arc::clone(&shared);
        let worker = std::thread::Builder::new()
            .name("membuf-worker".into())
            .spawn(move || worker::run(for_worker, dma))
            .map_err(|e| DeviceError::from_io("cannot start the membuf worker thread", e))?;
        let regs = Arc::new(MembufRegs::new(Arc::clone(&shared)));
        Ok((
            MembufDevice {
                shared,
                features: config.features,
                dma_logging: config.dma_logging,
                worker: Some(worker),
            },
            regs,
        ))
    }

    /// State size in bytes.
    pub fn size(&self) -> u64 {
        self.shared.size
    }

    /// The digest of the current state (the digest register's value).
    pub fn digest(&self) -> u64 {
        super::digest(&self.shared.lock().state)
    }

    /// Whether the worker is allowed to change the state now (the device runs).
    pub fn is_mutating(&self) -> bool {
        self.shared.lock().running
    }

    /// Whether peer-to-peer DMA is quiesced (RUNNING_P2P, PRE_COPY_P2P). Only recorded: the
    /// emulation performs no peer-to-peer DMA.
    pub fn p2p_quiesced(&self) -> bool {
        self.shared.lock().p2p_quiesced
    }

    fn set_running(&self, running: bool) {
        let mut core = self.shared.lock();
        core.running = running;
        drop(core);
        self.shared.wake.notify_all();
    }
}

impl Drop for MembufDevice {
    fn drop(&mut self) {
        self.shared.lock().exit = true;
        self.shared.wake.notify_all();
        if let Some(worker) = self.worker.take() {
            // A worker that panicked has nothing left to clean up.
            let _ = worker.join();
        }
    }
}

fn no_session(what: &str) -> DeviceError {
    DeviceError::new(Errno::EINVAL, format!("membuf has no {what} session open"))
}

fn refused(err: StreamError) -> DeviceError {
    DeviceError::new(Errno::EINVAL, err.to_string())
}

impl Migratable for MembufDevice {
    fn features(&self) -> MigrationFeatures {
        self.features
    }

    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            kind: KIND.into(),
            version: VERSION.into(),
            compat: self.shared.size.to_le_bytes().to_vec(),
        }
    }

    fn stop(&mut self) -> Result<(), DeviceError> {
        // With `running` cleared under the state lock, no rewrite or DMA can follow.
        self.set_running(false);
        Ok(())
    }

    fn start(&mut self, mode: RunMode) -> Result<(), DeviceError> {
        self.shared.lock().p2p_quiesced = mode == RunMode::P2pQuiesced;
        self.set_running(true);
        Ok(())
    }

    fn set_p2p_quiesced(&mut self, quiesced: bool) -> Result<(), DeviceError> {
        self.shared.lock().p2p_quiesced = quiesced;
        Ok(())
    }

    fn save_begin(&mut self, kind: SaveKind) -> Result<(), DeviceError> {
        // Allocated before taking the lock: the worker need not wait for it.
        let session = SaveSession::new(
            self.shared.size,
            self.shared.seed,
            kind == SaveKind::StopCopy,
        )?;
        let mut core = self.shared.lock();
        core.dirty.clear_all();
        core.save = Some(session);
        Ok(())
    }

    fn save_stop_copy(&mut self) -> Result<(), DeviceError> {
        let mut core = self.shared.lock();
        let save = core.save.as_mut().ok_or_else(|| no_session("saving"))?;
        save.mark_stopped();
        core.running = false;
        Ok(())
    }

    fn save_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let mut core = self.shared.lock();
        let Core {
            state, save, dirty, ..
        } = &mut *core;
        let save = save.as_mut().ok_or_else(|| no_session("saving"))?;
        Ok(save.read(state, dirty, buf))
    }

    fn save_pending(&mut self) -> Result<PrecopyInfo, DeviceError> {
        let core = self.shared.lock();
        let save = core.save.as_ref().ok_or_else(|| no_session("saving"))?;
        Ok(save.pending(&core.dirty))
    }

    fn save_end(&mut self) {
        let mut core = self.shared.lock();
        let session = core.save.take();
        core.dirty.clear_all();
        drop(core);
        // Freeing the page hashes is not worth holding the lock for.
        drop(session);
    }

    fn resume_begin(&mut self) -> Result<(), DeviceError> {
        let session = ResumeSession::new(self.shared.size)?;
        self.shared.lock().resume = Some(session);
        Ok(())
    }

    fn resume_write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let mut core = self.shared.lock();
        let Core { state, resume, .. } = &mut *core;
        let resume = resume.as_mut().ok_or_else(|| no_session("resuming"))?;
        resume.write(state, buf).map_err(refused)
    }

    fn resume_finish(&mut self) -> Result<(), DeviceError> {
        let mut core = self.shared.lock();
        let resume = core.resume.as_ref().ok_or_else(|| no_session("resuming"))?;
        resume.finish().map_err(refused)?;
        let session = core.resume.take();
        drop(core);
        // Freeing the page hashes is not worth holding the lock for.
        drop(session);
        // The generation counts mutations of this device's own run, so it starts again.
        self.shared.generation.store(0, Ordering::Relaxed);
        Ok(())
    }

    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        let core = self.shared.lock();
        Ok(match &core.save {
            Some(save) => save.remaining(&core.dirty),
            None => full_stream_len(self.shared.size),
        })
    }

    fn dma_logging_supported(&self) -> bool {
        self.dma_logging
    }

    /// Sessions are dropped and the device runs again from its power-on state: the contents
    /// are generated again from the seed and the generation restarts at 0. A reset is how a
    /// destination abandons a failed or aborted resume, so nothing half-loaded may survive it.
    fn reset(&mut self) {
        let mut core = self.shared.lock();
        core.save = None;
        core.resume = None;
        SplitMix::new(self.shared.seed).fill(&mut core.state);
        self.shared.generation.store(0, Ordering::Relaxed);
        core.dirty.clear_all();
        core.p2p_quiesced = false;
        core.running = true;
        drop(core);
        self.shared.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::super::format::STREAM_VERSION;
    use super::*;

    #[test]
    fn the_identity_version_is_the_stream_version() {
        assert_eq!(VERSION, STREAM_VERSION.to_string());
    }
}
