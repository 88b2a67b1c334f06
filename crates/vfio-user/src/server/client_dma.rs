//! The device's DMA through one client: direct copies into windows mapped with an fd, and
//! DMA_READ / DMA_WRITE messages to the client for every other access (windows mapped
//! without an fd, and accesses the device asks to go by message).
//!
//! # Hand-off between the device's threads and the session
//!
//! The socket belongs to the session's thread; a device does DMA on threads of its own. A
//! device thread that needs a message queues a [`Job`] and waits for its answer on a channel
//! of its own; an eventfd wakes the session, which sends the job's requests one chunk at a
//! time (at most the client's `max_data_xfer_size` each) and reads messages until each
//! matching reply arrives. Commands the client sends meanwhile are held by the socket layer
//! and handled after the job (see `listener.rs`), so a command never runs while a device
//! thread waits for a reply only the session can read.
//!
//! A job is queued under the read lock of the window snapshot it was checked against, so a
//! DMA_UNMAP (which swaps the snapshot under the write lock) either sees the job in the queue
//! or is seen by it. When the last window goes, queued jobs fail before the device's guest
//! memory is detached ([`vfio_mig_device::Dma::set_memory`] waits for DMA in flight).
//!
//! No device thread waits for the server forever: a job fails with `EFAULT` when its window
//! is gone by the time it starts, when the client goes away or the server stops; a device
//! thread calling while no client is connected fails at once, and so does the session's own
//! thread (a device hook doing DMA by message would otherwise wait for itself).

use std::collections::VecDeque;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::thread::ThreadId;

use rustix::event::{eventfd, EventfdFlags};
use vfio_mig_device::{DeviceError, Dma, DmaWindow, GuestMemory, HostServices};
use vfio_mig_uapi::Errno;

use super::dma::GuestMap;
use super::irq::IrqTable;

/// What a job answers: the bytes read (empty for a write), or why it failed.
pub(crate) type JobResult = Result<Vec<u8>, DeviceError>;

/// The transfer a job asks for.
#[derive(Debug)]
pub(crate) enum JobOp {
    /// DMA_WRITE of these bytes.
    Write(Vec<u8>),
    /// DMA_READ of this many bytes.
    Read(usize),
}

/// One DMA access by message, inside one window, waiting to be carried out by the session.
#[derive(Debug)]
pub(crate) struct Job {
    /// First client address.
    pub(crate) iova: u64,
    /// What to transfer.
    pub(crate) op: JobOp,
    /// Where the waiting device thread hears the outcome; dropping the job fails it.
    done: mpsc::Sender<JobResult>,
}

impl Job {
    /// Bytes to transfer.
    pub(crate) fn len(&self) -> usize {
        match &self.op {
            JobOp::Write(data) => data.len(),
            JobOp::Read(len) => *len,
        }
    }

    /// Whether it writes client memory.
    pub(crate) fn is_write(&self) -> bool {
        matches!(self.op, JobOp::Write(_))
    }

    /// Tells the waiting device thread how it went.
    pub(crate) fn finish(self, result: JobResult) {
        // The waiter may have given up (its thread ended): nothing to tell then.
        let _ = self.done.send(result);
    }
}

#[derive(Debug)]
struct Queue {
    jobs: VecDeque<Job>,
    /// False once the session ended: nothing more is queued.
    open: bool,
    /// Whether the eventfd was written since the session last drained it. Changed together
    /// with the eventfd under the queue's lock, so the session reads the eventfd only when
    /// something was queued (no syscall per message when the device does no DMA by message)
    /// and never leaves it readable with nothing to do.
    signalled: bool,
}

/// The device's view of one client's memory, shared by the session (which changes the
/// windows and carries out jobs) and the device's threads (which do DMA).
#[derive(Debug)]
pub(crate) struct ClientDma {
    windows: RwLock<Arc<GuestMap>>,
    queue: Mutex<Queue>,
    /// Readable while jobs are queued (an eventfd); `None` if one could not be made, and then
    /// DMA by message fails with `ENOMEM`.
    wake: Option<OwnedFd>,
    /// The session's thread, which must never wait for a job.
    session_thread: ThreadId,
}

fn fault(message: String) -> DeviceError {
    DeviceError::new(Errno::EFAULT, message)
}

impl ClientDma {
    /// An empty view for a session running on the calling thread.
    pub(crate) fn new() -> Self {
        let wake = match eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK) {
            Ok(fd) => Some(fd),
            Err(e) => {
                tracing::warn!("no eventfd for DMA by message, which will fail: {e}");
                None
            }
        };
        ClientDma {
            windows: RwLock::new(Arc::new(GuestMap::default())),
            queue: Mutex::new(Queue {
                jobs: VecDeque::new(),
                open: true,
                signalled: false,
            }),
            wake,
            session_thread: std::thread::current().id(),
        }
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The fd that is readable while jobs wait (to poll beside the socket).
    pub(crate) fn wake_fd(&self) -> Option<BorrowedFd<'_>> {
        self.wake.as_ref().map(|fd| fd.as_fd())
    }

    /// The current windows.
    pub(crate) fn windows(&self) -> Arc<GuestMap> {
        Arc::clone(&self.windows.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Installs a new snapshot of the windows; waits for direct copies through the old one.
    pub(crate) fn set_windows(&self, map: Arc<GuestMap>) {
        *self.windows.write().unwrap_or_else(|p| p.into_inner()) = map;
    }

    /// Takes the next queued job, clearing the wakeup if it was given.
    pub(crate) fn take_job(&self) -> Option<Job> {
        let mut queue = self.queue();
        if queue.signalled {
            queue.signalled = false;
            if let Some(wake) = &self.wake {
                let mut counter = [0u8; 8];
                // Written under this lock when `signalled` was set, so it is readable.
                let _ = rustix::io::read(wake, &mut counter);
            }
        }
        queue.jobs.pop_front()
    }

    /// Fails every queued job with `EFAULT` saying `why`.
    pub(crate) fn fail_queued(&self, why: &str) {
        let jobs: Vec<Job> = self.queue().jobs.drain(..).collect();
        for job in jobs {
            let message = format!("DMA of {} bytes at {:#x}: {why}", job.len(), job.iova);
            job.finish(Err(fault(message)));
        }
    }

    /// The session ended: queued jobs fail and no new one is accepted.
    pub(crate) fn close(&self) {
        self.queue().open = false;
        self.fail_queued("the client went away");
    }

    /// Queues a job for the session and returns where its outcome will arrive. Called with
    /// the windows' read lock held (see the module docs).
    fn submit(&self, iova: u64, op: JobOp) -> Result<mpsc::Receiver<JobResult>, DeviceError> {
        if std::thread::current().id() == self.session_thread {
            return Err(fault(format!(
                "DMA by message at {iova:#x} from the session's own thread would wait for itself"
            )));
        }
        let wake = self.wake.as_ref().ok_or_else(|| {
            DeviceError::new(
                Errno::ENOMEM,
                "no eventfd to hand DMA messages to the session",
            )
        })?;
        let (done, outcome) = mpsc::channel();
        let mut queue = self.queue();
        if !queue.open {
            return Err(fault(format!(
                "DMA by message at {iova:#x}: the client went away"
            )));
        }
        if !queue.signalled {
            rustix::io::write(wake, &1u64.to_ne_bytes())
                .map_err(|e| DeviceError::from_io("waking the session for DMA", e.into()))?;
            queue.signalled = true;
        }
        queue.jobs.push_back(Job { iova, op, done });
        Ok(outcome)
    }

    /// Writes `data` at `iova`: directly into windows mapped with an fd (unless
    /// `by_message`), by DMA_WRITE messages elsewhere.
    pub(crate) fn write(
        &self,
        iova: u64,
        data: &[u8],
        by_message: bool,
    ) -> Result<(), DeviceError> {
        let mut done = 0;
        while done < data.len() {
            let at = next_address(iova, done, data.len())?;
            let (outcome, n) = {
                let map = self.windows.read().unwrap_or_else(|p| p.into_inner());
                let region = map
                    .find(at)
                    .filter(|r| r.writable)
                    .ok_or_else(|| unmapped(data.len(), iova, at, "writable"))?;
                let n = (data.len() - done).min(piece(region.end() - at));
                let bytes = &data[done..done + n];
                match (&region.mapping, by_message) {
                    (Some(mapping), false) => {
                        mapping
                            .write(at - region.iova, bytes)
                            .map_err(|e| DeviceError::new(e, format!("DMA write at {at:#x}")))?;
                        done += n;
                        continue;
                    }
                    _ => (self.submit(at, JobOp::Write(bytes.to_vec()))?, n),
                }
            };
            wait(outcome)?;
            done += n;
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes at `iova`: directly from windows mapped with an fd (unless
    /// `by_message`), by DMA_READ messages elsewhere.
    pub(crate) fn read(
        &self,
        iova: u64,
        buf: &mut [u8],
        by_message: bool,
    ) -> Result<(), DeviceError> {
        let len = buf.len();
        let mut done = 0;
        while done < len {
            let at = next_address(iova, done, len)?;
            let (outcome, n) = {
                let map = self.windows.read().unwrap_or_else(|p| p.into_inner());
                let region = map
                    .find(at)
                    .filter(|r| r.readable)
                    .ok_or_else(|| unmapped(len, iova, at, "readable"))?;
                let n = (len - done).min(piece(region.end() - at));
                match (&region.mapping, by_message) {
                    (Some(mapping), false) => {
                        mapping
                            .read(at - region.iova, &mut buf[done..done + n])
                            .map_err(|e| DeviceError::new(e, format!("DMA read at {at:#x}")))?;
                        done += n;
                        continue;
                    }
                    _ => (self.submit(at, JobOp::Read(n))?, n),
                }
            };
            let bytes = wait(outcome)?;
            if bytes.len() != n {
                return Err(DeviceError::new(
                    Errno::EIO,
                    format!("DMA read at {at:#x}: {} bytes came for {n}", bytes.len()),
                ));
            }
            buf[done..done + n].copy_from_slice(&bytes);
            done += n;
        }
        Ok(())
    }
}

/// The address `done` bytes into an access of `len` bytes at `iova`.
fn next_address(iova: u64, done: usize, len: usize) -> Result<u64, DeviceError> {
    iova.checked_add(done as u64)
        .ok_or_else(|| fault(format!("DMA of {len} bytes at {iova:#x} wraps around")))
}

/// Bytes left in a window, as a length this process can hold.
fn piece(left: u64) -> usize {
    usize::try_from(left).unwrap_or(usize::MAX)
}

fn unmapped(len: usize, iova: u64, at: u64, what: &str) -> DeviceError {
    fault(format!(
        "DMA of {len} bytes at {iova:#x}: no {what} window at {at:#x}"
    ))
}

/// Waits for a job's outcome; a job dropped unanswered means the session ended.
fn wait(outcome: mpsc::Receiver<JobResult>) -> JobResult {
    outcome
        .recv()
        .unwrap_or_else(|_| Err(fault("the client went away before answering DMA".into())))
}

impl GuestMemory for ClientDma {
    fn write(&self, iova: u64, data: &[u8]) -> Result<(), DeviceError> {
        ClientDma::write(self, iova, data, false)
    }

    fn read(&self, iova: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        ClientDma::read(self, iova, buf, false)
    }
}

/// What a session offers the device on its [`vfio_mig_device::HostLink`]: the client's
/// interrupts and DMA by message.
#[derive(Debug)]
pub(crate) struct SessionServices {
    pub(crate) client: Arc<ClientDma>,
    pub(crate) irqs: Arc<Mutex<IrqTable>>,
    /// The device's DMA handle, whose dirty log records writes by message too.
    pub(crate) dma: Option<Dma>,
}

impl HostServices for SessionServices {
    fn trigger_irq(&self, index: u32, vector: u32) -> Result<bool, DeviceError> {
        self.irqs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .trigger(index, vector)
    }

    fn dma_windows(&self) -> Vec<DmaWindow> {
        self.client.windows().windows()
    }

    fn dma_write_by_message(&self, iova: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.client.write(iova, data, true)?;
        if let Some(dma) = &self.dma {
            dma.log().record(iova, data.len() as u64);
        }
        Ok(())
    }

    fn dma_read_by_message(&self, iova: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.client.read(iova, buf, true)
    }
}
