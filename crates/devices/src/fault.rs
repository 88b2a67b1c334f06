//! Fault injection for reliability tests: make any device fail, break, stall, panic, lie or
//! corrupt its stream at a chosen point, and change the plan while a migration runs.
//!
//! * [`Faulty`] wraps a device author's [`Migratable`]; put it inside a
//!   [`vfio_mig_device::Controller`] and the controller's rules apply to the injected faults
//!   exactly as to real ones (a failed arc leaves the last state reached, a broken hook
//!   moves the device to ERROR, a panic poisons the state lock into ERROR).
//! * [`FaultyMigrationDevice`] wraps any [`MigrationDevice`] (a controller, a remote
//!   vfio-user device, a kernel device) and its streams, at the user's view.
//!
//! Both take their faults from a [`FaultPlan`], a cheap-to-clone shared handle: a test keeps a
//! clone and arms or clears faults at any time, also while a hook is stalled (the plan is
//! never locked across a device call).
//!
//! ```
//! use vfio_mig_device::{Controller, DeviceState, Dma, Errno, MigrationDevice};
//! use vfio_mig_devices::fault::{Fault, FaultAction, FaultPlan, FaultPoint, Faulty};
//! use vfio_mig_devices::register::{RegisterConfig, RegisterDevice};
//!
//! let plan = FaultPlan::new();
//! let device = Faulty::new(RegisterDevice::new(RegisterConfig::default()), plan.clone());
//! let device = Controller::new(device, Dma::new())?;
//! let fault = plan.arm(Fault::new(
//!     FaultPoint::Arc(DeviceState::Stop, DeviceState::StopCopy),
//!     FaultAction::Fail(Errno::ENOMEM),
//! ));
//! let err = device.set_state(DeviceState::StopCopy).unwrap_err();
//! assert_eq!(err.failed_arc, Some((DeviceState::Stop, DeviceState::StopCopy)));
//! assert_eq!(device.state()?, DeviceState::Stop);
//! assert_eq!(plan.fired(fault), 1);
//! plan.clear();
//! assert!(device.set_state(DeviceState::StopCopy)?.is_some());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::Duration;

use vfio_mig_device::{
    DataStream, DeviceError, DeviceIdentity, DeviceState, Errno, IovaRange, Migratable,
    MigrationDevice, MigrationFeatures, MigrationStream, PrecopyInfo, ReadOutcome, RunMode,
    SaveKind, StreamDirection, TransitionError,
};

/// A hook of the device author's trait, as [`Faulty`] sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Hook {
    /// [`Migratable::stop`].
    Stop,
    /// [`Migratable::start`].
    Start,
    /// [`Migratable::set_p2p_quiesced`].
    SetP2pQuiesced,
    /// [`Migratable::save_begin`].
    SaveBegin,
    /// [`Migratable::save_stop_copy`].
    SaveStopCopy,
    /// [`Migratable::save_read`].
    SaveRead,
    /// [`Migratable::save_pending`].
    SavePending,
    /// [`Migratable::save_end`] (cannot fail: only stalls, panics and pretending apply).
    SaveEnd,
    /// [`Migratable::resume_begin`].
    ResumeBegin,
    /// [`Migratable::resume_write`].
    ResumeWrite,
    /// [`Migratable::resume_finish`].
    ResumeFinish,
    /// [`Migratable::stop_copy_size`].
    StopCopySize,
    /// [`Migratable::reset`] (cannot fail: only stalls, panics and pretending apply).
    Reset,
}

/// Where a fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum FaultPoint {
    /// [`Faulty`]: every call of this hook.
    Hook(Hook),
    /// [`Faulty`]: the hook call that implements this direct arc (e.g. `Stop -> StopCopy`
    /// is `save_begin`). The wrapper follows the device's state from the hooks that
    /// succeed, starting in RUNNING, as a controller drives them.
    Arc(DeviceState, DeviceState),
    /// [`FaultyMigrationDevice`]: `set_state` to this target.
    SetState(DeviceState),
    /// [`FaultyMigrationDevice`]: a read of any stream it handed out.
    StreamRead,
    /// [`FaultyMigrationDevice`]: a write to any stream it handed out.
    StreamWrite,
    /// [`FaultyMigrationDevice`]: precopy info on any stream it handed out.
    PrecopyInfo,
    /// [`FaultyMigrationDevice`]: `data_size`.
    DataSize,
    /// [`FaultyMigrationDevice`]: `reset`.
    Reset,
    /// [`FaultyMigrationDevice`]: `dma_logging_start`.
    DmaLoggingStart,
    /// [`FaultyMigrationDevice`]: `dma_logging_report`.
    DmaLoggingReport,
    /// [`FaultyMigrationDevice`]: `dma_logging_stop`.
    DmaLoggingStop,
}

/// What happens when a fault strikes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultAction {
    /// The call fails with this errno and is not passed on (an arc does not happen).
    Fail(Errno),
    /// As `Fail`, with the error marked broken ([`DeviceError::broken`]): a controller
    /// around a [`Faulty`] moves the device to ERROR.
    Break(Errno),
    /// Sleeps this long, then makes the call.
    Stall(Duration),
    /// Panics instead of making the call.
    Panic,
    /// Skips the call and reports success with nothing done: an arc "happens" without the
    /// device, a write takes every byte, a resume is accepted unchecked, a reset or
    /// `set_state` does nothing (and returns no stream), a read returns 0 bytes (End).
    Pretend,
    /// Reads: flips bit `n % (8 * bytes returned)` of the bytes returned. Writes: flips it
    /// in the bytes passed on.
    FlipBit(u32),
    /// Reads: from now on the session reports its end (0 bytes / End) without reading.
    /// Writes: from now on bytes are taken but dropped.
    Truncate,
    /// Reads: when the device reaches its end, this many extra `0xa5` bytes come first,
    /// once per session.
    ExtraBytes(usize),
}

/// One fault: where, what, and which matching call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Where it strikes.
    pub point: FaultPoint,
    /// What happens.
    pub action: FaultAction,
    /// Only the n-th matching call after arming (1-based) fires; `None`: every one does.
    pub nth: Option<u64>,
}

impl Fault {
    /// A fault firing on every call at `point`.
    pub fn new(point: FaultPoint, action: FaultAction) -> Self {
        Fault {
            point,
            action,
            nth: None,
        }
    }

    /// Fires only on the `n`-th matching call (1-based) after arming.
    pub fn nth(mut self, n: u64) -> Self {
        self.nth = Some(n);
        self
    }
}

/// Which armed fault, for [`FaultPlan::fired`] and [`FaultPlan::disarm`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FaultId(usize);

#[derive(Debug)]
struct Armed {
    fault: Fault,
    seen: u64,
    fired: u64,
    active: bool,
}

/// The faults to inject, shared between the wrappers and the test that steers them. Cheap
/// to clone; clones share the plan.
#[derive(Clone, Debug, Default)]
pub struct FaultPlan {
    faults: Arc<Mutex<Vec<Armed>>>,
}

impl FaultPlan {
    /// A plan with no faults.
    pub fn new() -> Self {
        FaultPlan::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<Armed>> {
        // Counters only: a panic elsewhere cannot leave them inconsistent.
        self.faults.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Arms `fault`; its call count starts now.
    pub fn arm(&self, fault: Fault) -> FaultId {
        let mut faults = self.lock();
        faults.push(Armed {
            fault,
            seen: 0,
            fired: 0,
            active: true,
        });
        FaultId(faults.len() - 1)
    }

    /// Disarms one fault (its counts stay readable).
    pub fn disarm(&self, id: FaultId) {
        if let Some(armed) = self.lock().get_mut(id.0) {
            armed.active = false;
        }
    }

    /// Disarms every fault.
    pub fn clear(&self) {
        for armed in self.lock().iter_mut() {
            armed.active = false;
        }
    }

    /// How many times the fault fired.
    pub fn fired(&self, id: FaultId) -> u64 {
        self.lock().get(id.0).map_or(0, |a| a.fired)
    }

    /// How many calls matched the fault's point while it was armed.
    pub fn seen(&self, id: FaultId) -> u64 {
        self.lock().get(id.0).map_or(0, |a| a.seen)
    }

    /// Counts a call at any of `points` against every armed fault there and returns the
    /// action of the first one that fires.
    fn strike(&self, points: &[FaultPoint]) -> Option<FaultAction> {
        let mut action = None;
        for armed in self
            .lock()
            .iter_mut()
            .filter(|a| a.active && points.contains(&a.fault.point))
        {
            armed.seen += 1;
            if action.is_none() && armed.fault.nth.is_none_or(|n| n == armed.seen) {
                armed.fired += 1;
                action = Some(armed.fault.action);
            }
        }
        action
    }
}

fn injected(action: &str, at: impl fmt::Debug) -> String {
    format!("injected {action} at {at:?}")
}

/// The stream-shaping faults of one session: sticky truncation and the extra bytes.
#[derive(Debug, Default)]
struct SessionFaults {
    truncated: bool,
    extra: Option<usize>,
}

impl SessionFaults {
    /// Applies a read-side action to a read of `n` bytes the device produced into `buf`
    /// (0: its end); returns the bytes to report.
    fn shape_read(&mut self, action: Option<FaultAction>, buf: &mut [u8], n: usize) -> usize {
        if n == 0 {
            if let Some(left) = self.extra.as_mut().filter(|left| **left > 0) {
                let extra = (*left).min(buf.len());
                buf[..extra].fill(0xa5);
                *left -= extra;
                return extra;
            }
        }
        if let (Some(FaultAction::FlipBit(bit)), true) = (action, n > 0) {
            let bit = bit as usize % (8 * n);
            buf[bit / 8] ^= 1 << (bit % 8);
        }
        n
    }

    /// Records the sticky read-side actions.
    fn arm(&mut self, action: Option<FaultAction>) {
        match action {
            Some(FaultAction::Truncate) => self.truncated = true,
            Some(FaultAction::ExtraBytes(n)) if self.extra.is_none() => self.extra = Some(n),
            _ => {}
        }
    }
}

/// A device author's device with faults injected from a [`FaultPlan`]. Put it in a
/// [`vfio_mig_device::Controller`] like the device it wraps.
#[derive(Debug)]
pub struct Faulty<D> {
    inner: D,
    plan: FaultPlan,
    /// The state the controller has the device in, followed from the hooks that succeed.
    state: DeviceState,
    reads: SessionFaults,
    writes_dropped: bool,
}

impl<D: Migratable> Faulty<D> {
    /// Wraps `inner` (which must be in RUNNING, as a new device is).
    pub fn new(inner: D, plan: FaultPlan) -> Self {
        Faulty {
            inner,
            plan,
            state: DeviceState::Running,
            reads: SessionFaults::default(),
            writes_dropped: false,
        }
    }

    /// The plan this device takes its faults from.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// The wrapped device.
    pub fn inner(&self) -> &D {
        &self.inner
    }

    /// The wrapped device, mutably.
    pub fn inner_mut(&mut self) -> &mut D {
        &mut self.inner
    }

    /// Applies the control actions of a strike: `Err` to return at once, `Ok(true)` to
    /// pretend (skip the call), `Ok(false)` to make the call.
    fn control(
        &mut self,
        hook: Hook,
        action: Option<FaultAction>,
        to: Option<DeviceState>,
    ) -> Result<bool, DeviceError> {
        match action {
            Some(FaultAction::Fail(errno)) => {
                Err(DeviceError::new(errno, injected("failure", hook)))
            }
            Some(FaultAction::Break(errno)) => {
                self.state = DeviceState::Error;
                Err(DeviceError::broken(errno, injected("breakage", hook)))
            }
            Some(FaultAction::Stall(duration)) => {
                thread::sleep(duration);
                Ok(false)
            }
            Some(FaultAction::Panic) => panic!("{}", injected("panic", hook)),
            Some(FaultAction::Pretend) => {
                if let Some(to) = to {
                    self.state = to;
                }
                Ok(true)
            }
            Some(FaultAction::FlipBit(_) | FaultAction::Truncate | FaultAction::ExtraBytes(_))
            | None => Ok(false),
        }
    }

    /// A hook implementing the arc to `to` (if any): strike, then call it, then follow the
    /// state if it succeeded.
    fn arc<T>(
        &mut self,
        hook: Hook,
        to: Option<DeviceState>,
        call: impl FnOnce(&mut D) -> Result<T, DeviceError>,
        pretend: T,
    ) -> Result<T, DeviceError> {
        let action = match to {
            Some(to) => self
                .plan
                .strike(&[FaultPoint::Hook(hook), FaultPoint::Arc(self.state, to)]),
            None => self.plan.strike(&[FaultPoint::Hook(hook)]),
        };
        if self.control(hook, action, to)? {
            return Ok(pretend);
        }
        let result = call(&mut self.inner);
        if let (Ok(_), Some(to)) = (&result, to) {
            self.state = to;
        }
        result
    }

    /// Infallible hooks: only stalls, panics and pretending apply.
    fn infallible(&mut self, hook: Hook, to: Option<DeviceState>) -> bool {
        let action = match to {
            Some(to) => self
                .plan
                .strike(&[FaultPoint::Hook(hook), FaultPoint::Arc(self.state, to)]),
            None => self.plan.strike(&[FaultPoint::Hook(hook)]),
        };
        match action {
            Some(FaultAction::Fail(_) | FaultAction::Break(_)) => false,
            other => self.control(hook, other, to).unwrap_or(false),
        }
    }

    fn new_session(&mut self) {
        self.reads = SessionFaults::default();
        self.writes_dropped = false;
    }
}

impl<D: Migratable> Migratable for Faulty<D> {
    fn features(&self) -> MigrationFeatures {
        self.inner.features()
    }

    fn identity(&self) -> DeviceIdentity {
        self.inner.identity()
    }

    fn stop(&mut self) -> Result<(), DeviceError> {
        self.arc(Hook::Stop, Some(DeviceState::Stop), D::stop, ())
    }

    fn start(&mut self, mode: RunMode) -> Result<(), DeviceError> {
        let to = match mode {
            RunMode::Full => DeviceState::Running,
            RunMode::P2pQuiesced => DeviceState::RunningP2p,
        };
        self.arc(Hook::Start, Some(to), |d| d.start(mode), ())
    }

    fn set_p2p_quiesced(&mut self, quiesced: bool) -> Result<(), DeviceError> {
        use DeviceState::*;
        let to = match (self.state, quiesced) {
            (PreCopy, true) => Some(PreCopyP2p),
            (PreCopyP2p, false) => Some(PreCopy),
            (_, true) => Some(RunningP2p),
            (_, false) => Some(Running),
        };
        self.arc(
            Hook::SetP2pQuiesced,
            to,
            |d| d.set_p2p_quiesced(quiesced),
            (),
        )
    }

    fn save_begin(&mut self, kind: SaveKind) -> Result<(), DeviceError> {
        use DeviceState::*;
        let to = match (kind, self.state) {
            (SaveKind::StopCopy, _) => StopCopy,
            (SaveKind::PreCopy, RunningP2p) => PreCopyP2p,
            (SaveKind::PreCopy, _) => PreCopy,
        };
        self.new_session();
        self.arc(Hook::SaveBegin, Some(to), |d| d.save_begin(kind), ())
    }

    fn save_stop_copy(&mut self) -> Result<(), DeviceError> {
        self.arc(
            Hook::SaveStopCopy,
            Some(DeviceState::StopCopy),
            D::save_stop_copy,
            (),
        )
    }

    fn save_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let action = self.plan.strike(&[FaultPoint::Hook(Hook::SaveRead)]);
        if self.control(Hook::SaveRead, action, None)? {
            return Ok(0);
        }
        self.reads.arm(action);
        if self.reads.truncated {
            return Ok(0);
        }
        let n = self.inner.save_read(buf)?;
        Ok(self.reads.shape_read(action, buf, n))
    }

    fn save_pending(&mut self) -> Result<PrecopyInfo, DeviceError> {
        self.arc(
            Hook::SavePending,
            None,
            D::save_pending,
            PrecopyInfo::default(),
        )
    }

    fn save_end(&mut self) {
        use DeviceState::*;
        let to = match self.state {
            PreCopy => Running,
            PreCopyP2p => RunningP2p,
            _ => Stop,
        };
        if !self.infallible(Hook::SaveEnd, Some(to)) {
            self.inner.save_end();
        }
        // The controller moves on whatever the hook did.
        self.state = to;
    }

    fn resume_begin(&mut self) -> Result<(), DeviceError> {
        self.new_session();
        self.arc(
            Hook::ResumeBegin,
            Some(DeviceState::Resuming),
            D::resume_begin,
            (),
        )
    }

    fn resume_write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let action = self.plan.strike(&[FaultPoint::Hook(Hook::ResumeWrite)]);
        if self.control(Hook::ResumeWrite, action, None)? {
            return Ok(buf.len());
        }
        match action {
            Some(FaultAction::Truncate) => self.writes_dropped = true,
            Some(FaultAction::FlipBit(bit)) if !buf.is_empty() => {
                let mut flipped = buf.to_vec();
                let bit = bit as usize % (8 * buf.len());
                flipped[bit / 8] ^= 1 << (bit % 8);
                return self.inner.resume_write(&flipped);
            }
            _ => {}
        }
        if self.writes_dropped {
            return Ok(buf.len());
        }
        self.inner.resume_write(buf)
    }

    fn resume_finish(&mut self) -> Result<(), DeviceError> {
        self.arc(
            Hook::ResumeFinish,
            Some(DeviceState::Stop),
            D::resume_finish,
            (),
        )
    }

    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        self.arc(Hook::StopCopySize, None, D::stop_copy_size, 0)
    }

    fn dma_logging_supported(&self) -> bool {
        self.inner.dma_logging_supported()
    }

    fn reset(&mut self) {
        if !self.infallible(Hook::Reset, None) {
            self.inner.reset();
        }
        self.state = DeviceState::Running;
        self.new_session();
    }
}

/// Any [`MigrationDevice`] with faults injected at the user's view, in its calls and in the
/// streams it hands out.
#[derive(Debug)]
pub struct FaultyMigrationDevice<M> {
    inner: M,
    plan: FaultPlan,
}

impl<M: MigrationDevice> FaultyMigrationDevice<M> {
    /// Wraps `inner`.
    pub fn new(inner: M, plan: FaultPlan) -> Self {
        FaultyMigrationDevice { inner, plan }
    }

    /// The plan this device takes its faults from.
    pub fn plan(&self) -> &FaultPlan {
        &self.plan
    }

    /// The wrapped device.
    pub fn inner(&self) -> &M {
        &self.inner
    }
}

/// Applies the control actions of a strike at the user's view: `Err` to return at once,
/// `Ok(true)` to pretend, `Ok(false)` to make the call.
fn control(point: FaultPoint, action: Option<FaultAction>) -> Result<bool, DeviceError> {
    match action {
        Some(FaultAction::Fail(errno)) => Err(DeviceError::new(errno, injected("failure", point))),
        Some(FaultAction::Break(errno)) => {
            Err(DeviceError::broken(errno, injected("breakage", point)))
        }
        Some(FaultAction::Stall(duration)) => {
            thread::sleep(duration);
            Ok(false)
        }
        Some(FaultAction::Panic) => panic!("{}", injected("panic", point)),
        Some(FaultAction::Pretend) => Ok(true),
        Some(FaultAction::FlipBit(_) | FaultAction::Truncate | FaultAction::ExtraBytes(_))
        | None => Ok(false),
    }
}

impl<M: MigrationDevice> FaultyMigrationDevice<M> {
    fn strike(&self, point: FaultPoint) -> Result<bool, DeviceError> {
        control(point, self.plan.strike(&[point]))
    }
}

impl<M: MigrationDevice> MigrationDevice for FaultyMigrationDevice<M> {
    fn features(&self) -> Result<MigrationFeatures, DeviceError> {
        self.inner.features()
    }

    fn identity(&self) -> Result<DeviceIdentity, DeviceError> {
        self.inner.identity()
    }

    fn state(&self) -> Result<DeviceState, DeviceError> {
        self.inner.state()
    }

    fn set_state(&self, target: DeviceState) -> Result<Option<DataStream>, TransitionError> {
        match self.strike(FaultPoint::SetState(target)) {
            Err(cause) => Err(TransitionError {
                requested: target,
                failed_arc: None,
                reached: self.inner.state().ok(),
                cause,
            }),
            Ok(true) => Ok(None),
            Ok(false) => Ok(self.inner.set_state(target)?.map(|stream| {
                Box::new(FaultyStream {
                    inner: stream,
                    plan: self.plan.clone(),
                    faults: SessionFaults::default(),
                    writes_dropped: false,
                }) as DataStream
            })),
        }
    }

    fn data_size(&self) -> Result<u64, DeviceError> {
        if self.strike(FaultPoint::DataSize)? {
            return Ok(0);
        }
        self.inner.data_size()
    }

    fn dma_logging_start(&self, page_size: u64, ranges: &[IovaRange]) -> Result<u64, DeviceError> {
        if self.strike(FaultPoint::DmaLoggingStart)? {
            return Ok(page_size);
        }
        self.inner.dma_logging_start(page_size, ranges)
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        if self.strike(FaultPoint::DmaLoggingReport)? {
            return Ok(());
        }
        self.inner
            .dma_logging_report(iova, length, page_size, bitmap)
    }

    fn dma_logging_stop(&self) -> Result<(), DeviceError> {
        if self.strike(FaultPoint::DmaLoggingStop)? {
            return Ok(());
        }
        self.inner.dma_logging_stop()
    }

    fn reset(&self) -> Result<(), DeviceError> {
        if self.strike(FaultPoint::Reset)? {
            return Ok(());
        }
        self.inner.reset()
    }
}

/// A stream of a [`FaultyMigrationDevice`].
#[derive(Debug)]
struct FaultyStream {
    inner: DataStream,
    plan: FaultPlan,
    faults: SessionFaults,
    writes_dropped: bool,
}

impl MigrationStream for FaultyStream {
    fn direction(&self) -> StreamDirection {
        self.inner.direction()
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, DeviceError> {
        let action = self.plan.strike(&[FaultPoint::StreamRead]);
        if control(FaultPoint::StreamRead, action)? {
            return Ok(ReadOutcome::End);
        }
        self.faults.arm(action);
        if self.faults.truncated {
            return Ok(ReadOutcome::End);
        }
        let outcome = self.inner.read(buf)?;
        let n = match outcome {
            ReadOutcome::Data(n) => n,
            ReadOutcome::End => 0,
            ReadOutcome::NothingNow => return Ok(outcome),
        };
        Ok(match self.faults.shape_read(action, buf, n) {
            0 => ReadOutcome::End,
            n => ReadOutcome::Data(n),
        })
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let action = self.plan.strike(&[FaultPoint::StreamWrite]);
        if control(FaultPoint::StreamWrite, action)? {
            return Ok(buf.len());
        }
        match action {
            Some(FaultAction::Truncate) => self.writes_dropped = true,
            Some(FaultAction::FlipBit(bit)) if !buf.is_empty() => {
                let mut flipped = buf.to_vec();
                let bit = bit as usize % (8 * buf.len());
                flipped[bit / 8] ^= 1 << (bit % 8);
                return self.inner.write(&flipped);
            }
            _ => {}
        }
        if self.writes_dropped {
            return Ok(buf.len());
        }
        self.inner.write(buf)
    }

    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError> {
        if control(
            FaultPoint::PrecopyInfo,
            self.plan.strike(&[FaultPoint::PrecopyInfo]),
        )? {
            return Ok(PrecopyInfo::default());
        }
        self.inner.precopy_info()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_mig_device::{Controller, Dma};
    use DeviceState::*;

    /// A device with every feature whose hooks all succeed and are recorded.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: Vec<Hook>,
        left: usize,
    }

    impl Migratable for Recorder {
        fn features(&self) -> MigrationFeatures {
            MigrationFeatures::ALL
        }
        fn identity(&self) -> DeviceIdentity {
            DeviceIdentity::default()
        }
        fn stop(&mut self) -> Result<(), DeviceError> {
            self.calls.push(Hook::Stop);
            Ok(())
        }
        fn start(&mut self, _: RunMode) -> Result<(), DeviceError> {
            self.calls.push(Hook::Start);
            Ok(())
        }
        fn set_p2p_quiesced(&mut self, _: bool) -> Result<(), DeviceError> {
            self.calls.push(Hook::SetP2pQuiesced);
            Ok(())
        }
        fn save_begin(&mut self, _: SaveKind) -> Result<(), DeviceError> {
            self.calls.push(Hook::SaveBegin);
            self.left = 10;
            Ok(())
        }
        fn save_stop_copy(&mut self) -> Result<(), DeviceError> {
            self.calls.push(Hook::SaveStopCopy);
            Ok(())
        }
        fn save_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
            let n = self.left.min(buf.len());
            buf[..n].fill(0);
            self.left -= n;
            Ok(n)
        }
        fn save_pending(&mut self) -> Result<PrecopyInfo, DeviceError> {
            Ok(PrecopyInfo::default())
        }
        fn save_end(&mut self) {
            self.calls.push(Hook::SaveEnd);
        }
        fn resume_begin(&mut self) -> Result<(), DeviceError> {
            self.calls.push(Hook::ResumeBegin);
            Ok(())
        }
        fn resume_write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
            Ok(buf.len())
        }
        fn resume_finish(&mut self) -> Result<(), DeviceError> {
            self.calls.push(Hook::ResumeFinish);
            Ok(())
        }
        fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
            Ok(10)
        }
        fn dma_logging_supported(&self) -> bool {
            false
        }
        fn reset(&mut self) {
            self.calls.push(Hook::Reset);
        }
    }

    fn device(plan: &FaultPlan) -> Controller<Faulty<Recorder>> {
        Controller::new(Faulty::new(Recorder::default(), plan.clone()), Dma::new()).unwrap()
    }

    #[test]
    fn arc_points_tell_apart_arcs_sharing_a_hook() {
        let plan = FaultPlan::new();
        let device = device(&plan);
        let id = plan.arm(Fault::new(
            FaultPoint::Arc(PreCopy, PreCopyP2p),
            FaultAction::Fail(Errno::EIO),
        ));
        device.set_state(RunningP2p).unwrap(); // set_p2p_quiesced(true), another arc
        device.set_state(Running).unwrap();
        device.set_state(PreCopy).unwrap();
        let err = device.set_state(PreCopyP2p).unwrap_err();
        assert_eq!(err.failed_arc, Some((PreCopy, PreCopyP2p)));
        assert_eq!(device.state().unwrap(), PreCopy);
        assert_eq!((plan.seen(id), plan.fired(id)), (1, 1));
    }

    #[test]
    fn the_followed_state_stays_right_over_every_arc() {
        let plan = FaultPlan::new();
        let device = device(&plan);
        let path = [
            PreCopy, PreCopyP2p, StopCopy, Resuming, RunningP2p, PreCopyP2p, PreCopy, Running,
            StopCopy, Running,
        ];
        for target in path {
            device.set_state(target).unwrap();
            assert_eq!(device.with_device(|d| d.state), target);
        }
        device.reset().unwrap();
        assert_eq!(device.with_device(|d| d.state), Running);
    }

    #[test]
    fn nth_fires_once_and_counts_from_arming() {
        let plan = FaultPlan::new();
        let device = device(&plan);
        device.set_state(Stop).unwrap();
        device.set_state(Running).unwrap();
        let id = plan
            .arm(Fault::new(FaultPoint::Hook(Hook::Stop), FaultAction::Fail(Errno::EIO)).nth(2));
        device.set_state(Stop).unwrap();
        device.set_state(Running).unwrap();
        assert!(device.set_state(Stop).is_err());
        device.set_state(Stop).unwrap();
        assert_eq!((plan.seen(id), plan.fired(id)), (3, 1));
    }

    #[test]
    fn pretend_skips_the_hook_but_follows_the_arc() {
        let plan = FaultPlan::new();
        let device = device(&plan);
        plan.arm(Fault::new(
            FaultPoint::Hook(Hook::Stop),
            FaultAction::Pretend,
        ));
        device.set_state(Stop).unwrap(); // running -> running-p2p -> stop
        assert_eq!(
            device.with_device(|d| (d.state, d.inner.calls.clone())),
            (Stop, vec![Hook::SetP2pQuiesced])
        );
    }

    #[test]
    fn infallible_hooks_ignore_failures_but_can_be_skipped() {
        let plan = FaultPlan::new();
        let device = device(&plan);
        plan.arm(Fault::new(
            FaultPoint::Hook(Hook::Reset),
            FaultAction::Fail(Errno::EIO),
        ));
        device.reset().unwrap();
        assert_eq!(device.with_device(|d| d.inner.calls.clone()), [Hook::Reset]);
        plan.clear();
        plan.arm(Fault::new(
            FaultPoint::Hook(Hook::Reset),
            FaultAction::Pretend,
        ));
        device.reset().unwrap();
        assert_eq!(device.with_device(|d| d.inner.calls.len()), 1);
    }

    #[test]
    fn read_shaping_flips_truncates_and_extends() {
        let mut faults = SessionFaults::default();
        let mut buf = [0u8; 4];
        assert_eq!(
            faults.shape_read(Some(FaultAction::FlipBit(9)), &mut buf, 2),
            2
        );
        assert_eq!(buf, [0, 2, 0, 0]);
        faults.arm(Some(FaultAction::ExtraBytes(6)));
        faults.arm(Some(FaultAction::ExtraBytes(100))); // once per session
        assert_eq!(faults.shape_read(None, &mut buf, 0), 4);
        assert_eq!(buf, [0xa5; 4]);
        assert_eq!(faults.shape_read(None, &mut buf, 0), 2);
        assert_eq!(faults.shape_read(None, &mut buf, 0), 0);
        faults.arm(Some(FaultAction::Truncate));
        assert!(faults.truncated);
    }
}
