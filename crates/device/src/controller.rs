//! [`Controller`]: any [`Migratable`] made into a [`MigrationDevice`] that obeys the uAPI.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_mig_fsm::{path, session_effect, SessionEffect, StreamDirection};
use vfio_mig_uapi::{DeviceState, Errno, MigrationFeatures};

use crate::{
    DataStream, DeviceError, DeviceIdentity, Dma, IovaRange, Migratable, MigrationDevice,
    MigrationStream, PrecopyInfo, ReadOutcome, RunMode, SaveKind, TransitionError,
};

/// Wraps a device author's [`Migratable`] and implements [`MigrationDevice`] with every rule
/// of the VFIO migration uAPI enforced. Cheap to clone (clones share the device).
///
/// A device starts in RUNNING. All calls serialize on one state lock, as the kernel drivers'
/// state mutex does, so a controller may be used from several threads.
pub struct Controller<D: Migratable> {
    shared: Arc<Shared<D>>,
}

impl<D: Migratable> Clone for Controller<D> {
    fn clone(&self) -> Self {
        Controller {
            shared: Arc::clone(&self.shared),
        }
    }
}

struct Shared<D> {
    inner: Mutex<Inner<D>>,
    features: MigrationFeatures,
    logging_supported: bool,
    dma: Dma,
}

struct Inner<D> {
    device: D,
    state: DeviceState,
    /// The open data session, if any; streams of any other id are disabled.
    session: Option<u64>,
    next_session: u64,
}

impl<D: Migratable> fmt::Debug for Controller<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("Controller")
            .field("features", &self.shared.features)
            .field("state", &inner.state)
            .field("session", &inner.session)
            .finish_non_exhaustive()
    }
}

impl<D: Migratable> Controller<D> {
    /// Takes charge of `device`, whose DMA goes through `dma`. The device starts in RUNNING.
    ///
    /// Fails with `EINVAL` if the device's features lack STOP_COPY (a device that cannot be
    /// saved is not migratable; the kernel refuses to register such a driver too).
    pub fn new(device: D, dma: Dma) -> Result<Self, DeviceError> {
        let features = device.features();
        if MigrationFeatures::from_bits(features.bits()).is_err() {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!("device features {:#x} lack STOP_COPY", features.bits()),
            ));
        }
        let logging_supported = device.dma_logging_supported();
        Ok(Controller {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    device,
                    state: DeviceState::Running,
                    session: None,
                    next_session: 1,
                }),
                features,
                logging_supported,
                dma,
            }),
        })
    }

    /// The DMA handle of the device (the host sets guest memory on it).
    pub fn dma(&self) -> &Dma {
        &self.shared.dma
    }

    /// Runs `f` on the device with the state lock held (for inspection and tests).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut D) -> R) -> R {
        f(&mut self.lock().device)
    }

    fn lock(&self) -> MutexGuard<'_, Inner<D>> {
        lock_shared(&self.shared)
    }
}

/// A hook that panicked leaves the device in no known state: treat it as ERROR.
///
/// The poison is cleared once the ERROR is recorded: a mutex stays poisoned until told
/// otherwise, and every later lock would otherwise force ERROR again, even after a reset.
fn lock_shared<D>(shared: &Shared<D>) -> MutexGuard<'_, Inner<D>> {
    shared.inner.lock().unwrap_or_else(|poisoned| {
        let mut guard = poisoned.into_inner();
        guard.state = DeviceState::Error;
        guard.session = None;
        shared.inner.clear_poison();
        guard
    })
}

/// Calls the hook for one direct arc.
fn run_arc<D: Migratable>(
    device: &mut D,
    from: DeviceState,
    to: DeviceState,
) -> Result<(), DeviceError> {
    use DeviceState::*;
    match (from, to) {
        (Running, Stop) | (RunningP2p, Stop) => device.stop(),
        (Stop, Running) => device.start(RunMode::Full),
        (Stop, RunningP2p) => device.start(RunMode::P2pQuiesced),
        (Running, RunningP2p) | (PreCopy, PreCopyP2p) => device.set_p2p_quiesced(true),
        (RunningP2p, Running) | (PreCopyP2p, PreCopy) => device.set_p2p_quiesced(false),
        (Running, PreCopy) | (RunningP2p, PreCopyP2p) => device.save_begin(SaveKind::PreCopy),
        (Stop, StopCopy) => device.save_begin(SaveKind::StopCopy),
        (PreCopy, StopCopy) | (PreCopyP2p, StopCopy) => device.save_stop_copy(),
        (PreCopy, Running) | (PreCopyP2p, RunningP2p) | (StopCopy, Stop) => {
            device.save_end();
            Ok(())
        }
        (Stop, Resuming) => device.resume_begin(),
        (Resuming, Stop) => device.resume_finish(),
        _ => Err(DeviceError::new(
            Errno::EINVAL,
            format!("{from} -> {to} is not a direct arc"),
        )),
    }
}

impl<D: Migratable> MigrationDevice for Controller<D> {
    fn features(&self) -> Result<MigrationFeatures, DeviceError> {
        Ok(self.shared.features)
    }

    fn identity(&self) -> Result<DeviceIdentity, DeviceError> {
        Ok(self.lock().device.identity())
    }

    fn state(&self) -> Result<DeviceState, DeviceError> {
        Ok(self.lock().state)
    }

    fn set_state(&self, target: DeviceState) -> Result<Option<DataStream>, TransitionError> {
        let mut inner = self.lock();
        let start = inner.state;
        let walk = path(start, target, self.shared.features).map_err(|refusal| {
            TransitionError::refused(
                target,
                start,
                DeviceError::new(refusal.errno(), refusal.to_string()),
            )
        })?;
        let mut opened = None;
        for (from, to) in walk.arcs() {
            if let Err(cause) = run_arc(&mut inner.device, from, to) {
                if cause.is_broken() {
                    inner.state = DeviceState::Error;
                    inner.session = None;
                }
                return Err(TransitionError {
                    requested: target,
                    failed_arc: Some((from, to)),
                    reached: Some(inner.state),
                    cause,
                });
            }
            inner.state = to;
            match session_effect(from, to) {
                SessionEffect::Opens(direction) => {
                    let id = inner.next_session;
                    inner.next_session += 1;
                    inner.session = Some(id);
                    opened = Some((id, direction));
                }
                SessionEffect::Ends(_) => {
                    inner.session = None;
                    opened = None;
                }
                SessionEffect::Keeps | SessionEffect::None => {}
            }
        }
        // The FSM lets only the last arc of a path open a session (tested in vfio-mig-fsm).
        Ok(opened.map(|(id, direction)| {
            Box::new(ControllerStream {
                shared: Arc::clone(&self.shared),
                session: id,
                direction,
            }) as DataStream
        }))
    }

    fn data_size(&self) -> Result<u64, DeviceError> {
        let mut inner = self.lock();
        let size = inner.device.stop_copy_size();
        if let Err(e) = &size {
            note_broken(&mut inner, e);
        }
        size
    }

    fn dma_logging_start(&self, page_size: u64, ranges: &[IovaRange]) -> Result<u64, DeviceError> {
        self.check_logging()?;
        self.shared.dma.log().start(page_size, ranges)
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        self.check_logging()?;
        self.shared
            .dma
            .log()
            .report(iova, length, page_size, bitmap)
    }

    fn dma_logging_stop(&self) -> Result<(), DeviceError> {
        self.check_logging()?;
        self.shared.dma.log().stop()
    }

    fn reset(&self) -> Result<(), DeviceError> {
        let mut inner = self.lock();
        inner.device.reset();
        inner.state = DeviceState::Running;
        inner.session = None;
        Ok(())
    }
}

impl<D: Migratable> Controller<D> {
    fn check_logging(&self) -> Result<(), DeviceError> {
        if self.shared.logging_supported {
            Ok(())
        } else {
            Err(DeviceError::new(
                Errno::ENOTTY,
                "the device does not support DMA dirty logging",
            ))
        }
    }
}

/// The stream of one data session of a [`Controller`].
struct ControllerStream<D: Migratable> {
    shared: Arc<Shared<D>>,
    session: u64,
    direction: StreamDirection,
}

impl<D: Migratable> fmt::Debug for ControllerStream<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ControllerStream")
            .field("session", &self.session)
            .field("direction", &self.direction)
            .finish()
    }
}

impl<D: Migratable> ControllerStream<D> {
    /// Locks the device if this stream's session is still the open one.
    fn live(&self, want: StreamDirection) -> Result<MutexGuard<'_, Inner<D>>, DeviceError> {
        let inner = lock_shared(&self.shared);
        if inner.session != Some(self.session) {
            return Err(DeviceError::new(
                Errno::ENODEV,
                "the data session has ended",
            ));
        }
        if self.direction != want {
            return Err(DeviceError::new(
                Errno::EBADF,
                match self.direction {
                    StreamDirection::Saving => "a saving stream cannot be written",
                    StreamDirection::Resuming => "a resuming stream cannot be read",
                },
            ));
        }
        Ok(inner)
    }
}

/// A hook error that leaves the device broken moves it to ERROR and ends the session.
fn note_broken<D>(inner: &mut Inner<D>, err: &DeviceError) {
    if err.is_broken() {
        inner.state = DeviceState::Error;
        inner.session = None;
    }
}

impl<D: Migratable> MigrationStream for ControllerStream<D> {
    fn direction(&self) -> StreamDirection {
        self.direction
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, DeviceError> {
        let mut inner = self.live(StreamDirection::Saving)?;
        if buf.is_empty() {
            return Err(DeviceError::new(Errno::EINVAL, "read into an empty buffer"));
        }
        let n = match inner.device.save_read(buf) {
            Ok(n) => n,
            Err(e) => {
                note_broken(&mut inner, &e);
                return Err(e);
            }
        };
        if n > buf.len() {
            return Err(DeviceError::new(
                Errno::EIO,
                format!("device produced {n} bytes into a {}-byte buffer", buf.len()),
            ));
        }
        Ok(match (n, inner.state) {
            (0, DeviceState::StopCopy) => ReadOutcome::End,
            (0, _) => ReadOutcome::NothingNow,
            (n, _) => ReadOutcome::Data(n),
        })
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let mut inner = self.live(StreamDirection::Resuming)?;
        if buf.is_empty() {
            return Ok(0);
        }
        match inner.device.resume_write(buf) {
            Ok(n) if n == 0 || n > buf.len() => Err(DeviceError::new(
                Errno::EIO,
                format!("device took {n} of {} bytes", buf.len()),
            )),
            Ok(n) => Ok(n),
            Err(e) => {
                note_broken(&mut inner, &e);
                Err(e)
            }
        }
    }

    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError> {
        let mut inner = self.live(StreamDirection::Saving)?;
        if !inner.state.is_precopy() {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!(
                    "precopy info is valid only in pre-copy states, not {}",
                    inner.state
                ),
            ));
        }
        inner
            .device
            .save_pending()
            .inspect_err(|e| note_broken(&mut inner, e))
    }
}
