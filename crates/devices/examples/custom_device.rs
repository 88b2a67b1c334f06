//! A new migratable device in under 100 lines, migrated between two instances in-process.
//!
//! `EventRing` keeps the last 16 events it saw and a count of all of them. It implements the
//! device author's trait ([`Migratable`]); a [`Controller`] turns it into a
//! [`MigrationDevice`] that enforces every rule of the VFIO migration uAPI. `main` saves a
//! source through STOP_COPY, resumes the bytes into a destination, and exits 0 only when the
//! destination's state equals the source's.
//!
//! Run it with `cargo run -p vfio-mig-devices --example custom_device`.

use std::error::Error;
use std::process::ExitCode;

use vfio_mig_device::{
    write_all, Controller, DeviceError, DeviceIdentity, DeviceState, Dma, Errno, Migratable,
    MigrationDevice, MigrationFeatures, PrecopyInfo, ReadOutcome, RunMode, SaveKind,
};

const SLOTS: usize = 16;
/// The state on the wire: its words, u32 little-endian.
const STATE_LEN: usize = 4 * (1 + SLOTS);

/// The device: how many events there were (word 0) and the last 16 of them (words 1..=16).
#[derive(Debug, Default)]
pub struct EventRing {
    words: [u32; 1 + SLOTS],
    stopped: bool,
    saving: Option<(Vec<u8>, usize)>,
    resuming: Option<Vec<u8>>,
}

impl EventRing {
    /// Guest activity; a stopped device's state is frozen.
    pub fn record(&mut self, event: u32) {
        if !self.stopped {
            self.words[1 + self.words[0] as usize % SLOTS] = event;
            self.words[0] = self.words[0].wrapping_add(1);
        }
    }

    /// The whole state, as the stream carries it.
    pub fn state(&self) -> Vec<u8> {
        self.words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }
}

fn invalid(message: String) -> DeviceError {
    DeviceError::new(Errno::EINVAL, message)
}

/// For the hooks of arcs outside the feature set: never called, refused rather than faked.
fn unsupported() -> DeviceError {
    invalid("not in this device's feature set (stop-copy only)".into())
}

impl Migratable for EventRing {
    fn features(&self) -> MigrationFeatures {
        MigrationFeatures::STOP_COPY // small state: nothing to gain from pre-copy
    }
    fn identity(&self) -> DeviceIdentity {
        let (kind, version, compat) = ("event-ring".into(), "1".into(), Vec::new());
        DeviceIdentity {
            kind,
            version,
            compat,
        }
    }
    fn stop(&mut self) -> Result<(), DeviceError> {
        self.stopped = true;
        Ok(())
    }
    fn start(&mut self, _mode: RunMode) -> Result<(), DeviceError> {
        self.stopped = false;
        Ok(())
    }
    fn set_p2p_quiesced(&mut self, _: bool) -> Result<(), DeviceError> {
        Err(unsupported())
    }
    fn save_begin(&mut self, kind: SaveKind) -> Result<(), DeviceError> {
        if kind == SaveKind::PreCopy {
            return Err(unsupported());
        }
        self.saving = Some((self.state(), 0)); // the device is stopped: copy its state now
        Ok(())
    }
    fn save_stop_copy(&mut self) -> Result<(), DeviceError> {
        Err(unsupported())
    }
    fn save_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let (bytes, at) = self
            .saving
            .as_mut()
            .ok_or_else(|| invalid("not saving".into()))?;
        let n = buf.len().min(bytes.len() - *at);
        buf[..n].copy_from_slice(&bytes[*at..*at + n]);
        *at += n;
        Ok(n) // 0 at the end: the controller reports End
    }
    fn save_pending(&mut self) -> Result<PrecopyInfo, DeviceError> {
        Err(unsupported())
    }
    fn save_end(&mut self) {
        self.saving = None;
    }
    fn resume_begin(&mut self) -> Result<(), DeviceError> {
        self.resuming = Some(Vec::with_capacity(STATE_LEN));
        Ok(())
    }
    fn resume_write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let got = self
            .resuming
            .as_mut()
            .ok_or_else(|| invalid("not resuming".into()))?;
        if got.len() + buf.len() > STATE_LEN {
            return Err(invalid(format!("stream longer than {STATE_LEN} bytes")));
        }
        got.extend_from_slice(buf);
        Ok(buf.len())
    }
    fn resume_finish(&mut self) -> Result<(), DeviceError> {
        let got = self.resuming.as_deref().unwrap_or_default();
        if got.len() != STATE_LEN {
            return Err(invalid(format!(
                "truncated: {} of {STATE_LEN} bytes",
                got.len()
            )));
        }
        for (word, bytes) in self.words.iter_mut().zip(got.chunks_exact(4)) {
            *word = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        }
        self.resuming = None;
        Ok(())
    }
    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        Ok(STATE_LEN as u64)
    }
    fn dma_logging_supported(&self) -> bool {
        false // no DMA: the controller answers logging requests with ENOTTY
    }
    fn reset(&mut self) {
        *self = EventRing::default();
    }
}

/// Migrates a busy source into a fresh destination; returns the state both ended with.
pub fn migrate() -> Result<Vec<u8>, Box<dyn Error>> {
    let source = Controller::new(EventRing::default(), Dma::new())?;
    let destination = Controller::new(EventRing::default(), Dma::new())?;
    source.with_device(|ring| (1..=21).for_each(|e| ring.record(e * 7)));

    let mut saving = source
        .set_state(DeviceState::StopCopy)?
        .ok_or("no saving stream")?;
    let (mut bytes, mut buf) = (Vec::new(), [0; 16]);
    while let ReadOutcome::Data(n) = saving.read(&mut buf)? {
        bytes.extend_from_slice(&buf[..n]);
    }
    let mut resuming = destination
        .set_state(DeviceState::Resuming)?
        .ok_or("no resuming stream")?;
    write_all(&mut *resuming, &bytes)?;
    destination.set_state(DeviceState::Stop)?; // RESUMING -> STOP validates and installs
    destination.set_state(DeviceState::Running)?;

    let (before, after) = (
        source.with_device(|r| r.state()),
        destination.with_device(|r| r.state()),
    );
    if before != after {
        return Err(
            format!("destination state {after:02x?} differs from source {before:02x?}").into(),
        );
    }
    println!(
        "migrated {} bytes over arcs running -> stop -> stop-copy / running -> stop -> resuming -> stop -> running",
        bytes.len()
    );
    Ok(after)
}

fn main() -> ExitCode {
    match migrate() {
        Ok(state) => {
            println!(
                "verified: destination state equals source state ({} bytes)",
                state.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("custom_device: migration failed: {e}");
            ExitCode::FAILURE
        }
    }
}
