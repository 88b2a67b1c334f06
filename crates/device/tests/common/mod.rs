//! A small configurable device for the controller and conformance tests: its state is a
//! seeded byte buffer, it supports any feature set, tracks what changed while pre-copying,
//! and can be told to fail, break or panic in a chosen hook, or to break a uAPI rule.
// Each test file uses a different part of this module.
#![allow(dead_code)]

use std::collections::BTreeSet;

use vfio_mig_device::{
    conformance::Role, Controller, DeviceError, DeviceIdentity, Dma, Errno, Migratable,
    MigrationFeatures, PrecopyInfo, RunMode, SaveKind,
};

/// Bytes of state.
pub const STATE_LEN: usize = 1024;
/// Bytes per tracked chunk.
pub const CHUNK: usize = 64;

const KIND_DATA: u8 = 1;
const KIND_END: u8 = 2;
/// A data record: kind, chunk index (u32 LE), CHUNK bytes.
const DATA_RECORD: usize = 1 + 4 + CHUNK;
/// The end record: kind, FNV-1a 64 of the whole state (u64 LE).
const END_RECORD: usize = 1 + 8;

/// A deliberate violation of the uAPI, for proving the conformance suite catches it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bug {
    /// initial_bytes goes up while it is read.
    RisingInitialBytes,
    /// initial_bytes never reaches 0.
    InitialBytesStuck,
    /// resume_finish accepts whatever was written, even a truncated stream.
    AcceptsTruncated,
    /// resume_finish checks the stream but does not apply it.
    IgnoresResumedState,
    /// After the end of a STOP_COPY stream, one more read returns data.
    DataAfterEnd,
}

/// Which hook a test fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Hook {
    Stop,
    Start,
    SetP2p,
    SaveBegin,
    SaveStopCopy,
    SaveRead,
    SavePending,
    ResumeBegin,
    ResumeWrite,
    ResumeFinish,
    StopCopySize,
}

/// What happens when the hook is called.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehave {
    /// The hook fails with this errno; the arc does not happen.
    Fail(Errno),
    /// The hook reports the device broken.
    Break(Errno),
    /// The hook panics.
    Panic,
}

/// An open saving session.
#[derive(Debug)]
struct Save {
    /// Serialized records not yet read, from `at`.
    pending: Vec<u8>,
    at: usize,
    /// Bytes of the initial copy still unread (they come first).
    initial_left: u64,
    stop_copy: bool,
    /// The end record was queued.
    ended: bool,
    /// A read returned the end (0 bytes) after the end record.
    end_reported: bool,
    extra_sent: bool,
}

/// The test device.
#[derive(Debug)]
pub struct TestDevice {
    features: MigrationFeatures,
    logging: bool,
    seed: u64,
    state: Vec<u8>,
    running: bool,
    dirty: BTreeSet<usize>,
    save: Option<Save>,
    resume: Option<Vec<u8>>,
    dma: Dma,
    /// A fault to inject in one hook.
    pub fault: Option<(Hook, Misbehave)>,
    /// A rule to break.
    pub bug: Option<Bug>,
    /// Hook calls so far, in order.
    pub calls: Vec<Hook>,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

fn seeded(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..STATE_LEN)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

impl TestDevice {
    pub fn new(features: MigrationFeatures, logging: bool, seed: u64, dma: Dma) -> Self {
        TestDevice {
            features,
            logging,
            seed,
            state: seeded(seed),
            running: true,
            dirty: BTreeSet::new(),
            save: None,
            resume: None,
            dma,
            fault: None,
            bug: None,
            calls: Vec::new(),
        }
    }

    /// The device's whole state.
    pub fn state_bytes(&self) -> Vec<u8> {
        self.state.clone()
    }

    /// Guest activity: changes one byte (only while running) and does a DMA write of it.
    pub fn poke(&mut self, offset: usize, value: u8) -> Result<(), DeviceError> {
        if !self.running {
            return Err(DeviceError::new(Errno::EBUSY, "stopped"));
        }
        self.state[offset % STATE_LEN] = value;
        self.dirty.insert(offset % STATE_LEN / CHUNK);
        if self.dma.has_memory() {
            self.dma.write(offset as u64, &[value])?;
        }
        Ok(())
    }

    fn enter(&mut self, hook: Hook) -> Result<(), DeviceError> {
        self.calls.push(hook);
        match self.fault {
            Some((h, Misbehave::Fail(errno))) if h == hook => Err(DeviceError::new(
                errno,
                format!("injected failure in {hook:?}"),
            )),
            Some((h, Misbehave::Break(errno))) if h == hook => Err(DeviceError::broken(
                errno,
                format!("injected breakage in {hook:?}"),
            )),
            Some((h, Misbehave::Panic)) if h == hook => panic!("injected panic in {hook:?}"),
            _ => Ok(()),
        }
    }

    fn record(&self, chunk: usize, out: &mut Vec<u8>) {
        out.push(KIND_DATA);
        out.extend_from_slice(&(chunk as u32).to_le_bytes());
        out.extend_from_slice(&self.state[chunk * CHUNK..(chunk + 1) * CHUNK]);
    }

    fn all_records(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STATE_LEN / CHUNK * DATA_RECORD);
        for chunk in 0..STATE_LEN / CHUNK {
            self.record(chunk, &mut out);
        }
        out
    }

    fn apply(&self, stream: &[u8]) -> Result<Vec<u8>, DeviceError> {
        let bad = |m: String| DeviceError::new(Errno::EINVAL, m);
        let mut state = self.state.clone();
        let mut rest = stream;
        loop {
            match rest.first() {
                Some(&KIND_DATA) if rest.len() >= DATA_RECORD => {
                    let chunk = u32::from_le_bytes(rest[1..5].try_into().unwrap()) as usize;
                    if chunk >= STATE_LEN / CHUNK {
                        return Err(bad(format!("chunk {chunk} out of range")));
                    }
                    state[chunk * CHUNK..(chunk + 1) * CHUNK]
                        .copy_from_slice(&rest[5..DATA_RECORD]);
                    rest = &rest[DATA_RECORD..];
                }
                Some(&KIND_END) if rest.len() == END_RECORD => {
                    let sum = u64::from_le_bytes(rest[1..9].try_into().unwrap());
                    if sum != fnv1a(&state) {
                        return Err(bad("checksum mismatch".into()));
                    }
                    return Ok(state);
                }
                Some(_) => {
                    return Err(bad(format!(
                        "bad or truncated record, {} bytes left",
                        rest.len()
                    )))
                }
                None => return Err(bad("the stream has no end record".into())),
            }
        }
    }
}

impl Migratable for TestDevice {
    fn features(&self) -> MigrationFeatures {
        self.features
    }

    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            kind: "test".into(),
            version: "1".into(),
            compat: (STATE_LEN as u32).to_le_bytes().to_vec(),
        }
    }

    fn stop(&mut self) -> Result<(), DeviceError> {
        self.enter(Hook::Stop)?;
        self.running = false;
        Ok(())
    }

    fn start(&mut self, _mode: RunMode) -> Result<(), DeviceError> {
        self.enter(Hook::Start)?;
        self.running = true;
        Ok(())
    }

    fn set_p2p_quiesced(&mut self, _quiesced: bool) -> Result<(), DeviceError> {
        self.enter(Hook::SetP2p)
    }

    fn save_begin(&mut self, kind: SaveKind) -> Result<(), DeviceError> {
        self.enter(Hook::SaveBegin)?;
        let pending = self.all_records();
        self.dirty.clear();
        self.save = Some(Save {
            initial_left: pending.len() as u64,
            pending,
            at: 0,
            stop_copy: kind == SaveKind::StopCopy,
            ended: false,
            end_reported: false,
            extra_sent: false,
        });
        Ok(())
    }

    fn save_stop_copy(&mut self) -> Result<(), DeviceError> {
        self.enter(Hook::SaveStopCopy)?;
        let save = self
            .save
            .as_mut()
            .ok_or_else(|| DeviceError::new(Errno::EINVAL, "no session"))?;
        save.stop_copy = true;
        self.running = false;
        Ok(())
    }

    fn save_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        self.enter(Hook::SaveRead)?;
        let mut save = self
            .save
            .take()
            .ok_or_else(|| DeviceError::new(Errno::EINVAL, "no session"))?;
        if save.at == save.pending.len() {
            // Refill: chunks dirtied since they were read, then (stop-copy) the end record.
            save.pending.clear();
            save.at = 0;
            for chunk in std::mem::take(&mut self.dirty) {
                self.record(chunk, &mut save.pending);
            }
            if save.pending.is_empty() && save.stop_copy {
                if !save.ended {
                    save.ended = true;
                    save.pending.push(KIND_END);
                    save.pending
                        .extend_from_slice(&fnv1a(&self.state).to_le_bytes());
                } else if self.bug == Some(Bug::DataAfterEnd)
                    && save.end_reported
                    && !save.extra_sent
                {
                    save.extra_sent = true;
                    save.pending.push(0xee);
                }
            }
        }
        let n = buf.len().min(save.pending.len() - save.at);
        buf[..n].copy_from_slice(&save.pending[save.at..save.at + n]);
        save.at += n;
        save.end_reported |= n == 0 && save.ended;
        save.initial_left = save.initial_left.saturating_sub(n as u64);
        self.save = Some(save);
        Ok(n)
    }

    fn save_pending(&mut self) -> Result<PrecopyInfo, DeviceError> {
        self.enter(Hook::SavePending)?;
        let dirty_bytes = (self.dirty.len() * DATA_RECORD) as u64;
        let save = self
            .save
            .as_ref()
            .ok_or_else(|| DeviceError::new(Errno::EINVAL, "no session"))?;
        let initial_bytes = match self.bug {
            Some(Bug::RisingInitialBytes) => save.initial_left + 2 * save.at as u64,
            Some(Bug::InitialBytesStuck) => save.initial_left.max(1),
            _ => save.initial_left,
        };
        Ok(PrecopyInfo {
            initial_bytes,
            dirty_bytes,
        })
    }

    fn save_end(&mut self) {
        self.save = None;
    }

    fn resume_begin(&mut self) -> Result<(), DeviceError> {
        self.enter(Hook::ResumeBegin)?;
        self.resume = Some(Vec::new());
        Ok(())
    }

    fn resume_write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        self.enter(Hook::ResumeWrite)?;
        let written = self
            .resume
            .as_mut()
            .ok_or_else(|| DeviceError::new(Errno::EINVAL, "not resuming"))?;
        if written.len() + buf.len() > 2 * STATE_LEN / CHUNK * DATA_RECORD + END_RECORD {
            return Err(DeviceError::new(Errno::EINVAL, "stream too long"));
        }
        written.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn resume_finish(&mut self) -> Result<(), DeviceError> {
        self.enter(Hook::ResumeFinish)?;
        let written = self.resume.take().unwrap_or_default();
        match self.bug {
            Some(Bug::AcceptsTruncated) => {
                if let Ok(state) = self.apply(&written) {
                    self.state = state;
                }
                Ok(())
            }
            Some(Bug::IgnoresResumedState) => self.apply(&written).map(drop),
            _ => match self.apply(&written) {
                Ok(state) => {
                    self.state = state;
                    Ok(())
                }
                Err(e) => {
                    self.resume = Some(written);
                    Err(e)
                }
            },
        }
    }

    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        self.enter(Hook::StopCopySize)?;
        Ok((STATE_LEN / CHUNK * DATA_RECORD + END_RECORD) as u64)
    }

    fn dma_logging_supported(&self) -> bool {
        self.logging
    }

    fn reset(&mut self) {
        self.state = seeded(self.seed);
        self.running = true;
        self.dirty.clear();
        self.save = None;
        self.resume = None;
    }
}

/// A controller over a fresh test device.
pub fn controller(features: MigrationFeatures, logging: bool, seed: u64) -> Controller<TestDevice> {
    let dma = Dma::new();
    Controller::new(TestDevice::new(features, logging, seed, dma.clone()), dma)
        .expect("test device features include stop-copy")
}

/// A conformance factory for `features`.
pub fn factory(
    features: MigrationFeatures,
    logging: bool,
) -> impl Fn(Role) -> Result<Controller<TestDevice>, DeviceError> {
    move |role| Ok(controller(features, logging, role.seed()))
}

/// A conformance factory whose devices break `bug`.
pub fn buggy_factory(
    features: MigrationFeatures,
    bug: Bug,
) -> impl Fn(Role) -> Result<Controller<TestDevice>, DeviceError> {
    move |role| {
        let c = controller(features, false, role.seed());
        c.with_device(|d| d.bug = Some(bug));
        Ok(c)
    }
}

/// The digest for conformance checks: the whole state.
pub fn digest(c: &Controller<TestDevice>) -> Result<Vec<u8>, DeviceError> {
    Ok(c.with_device(|d| d.state_bytes()))
}
