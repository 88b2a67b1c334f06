//! `register`: the smallest complete migratable device, written as the one to copy.
//!
//! Its whole state is [`STATE_LEN`] bytes of little-endian 32-bit registers, which the guest
//! (or anyone with a [`RegisterBar`]) reads and writes through BAR0. It supports STOP_COPY
//! only: the state is so small that copying it while stopped costs nothing, so pre-copy
//! would gain nothing, and it does no DMA, so it has no peer-to-peer traffic to quiesce and
//! nothing to dirty-log.
//!
//! BAR0 (region index 0, [`BAR0_SIZE`] bytes):
//!
//! | offset | register | access |
//! |---|---|---|
//! | 0x000..0x100 | 64 data registers | read/write |
//! | 0x100 | [`CONTROL`] | read/write |
//! | 0x104 | [`IRQ_MASK`] | read/write |
//! | 0x108 | [`WRITE_COUNT`]: accepted BAR writes so far (migrated) | read |
//! | 0x10c | [`ID`]: `REG1` in ASCII | read |
//! | 0x110 | [`DIGEST`]: 64-bit digest of bytes 0x000..0x110, computed at read time (not state) | read |
//!
//! Writes while the device is stopped fail with `EBUSY`: a stopped device's state is frozen,
//! which is what makes the saved state final.
//!
//! The migration stream ([`STREAM_LEN`] bytes, little-endian): the magic [`STREAM_MAGIC`],
//! the version (u32, [`STREAM_VERSION`]), the state length (u32, [`STATE_LEN`]), the state
//! bytes, and an xxh3-64 checksum of everything before it (u64). Leaving RESUMING refuses a
//! stream with the wrong magic, version or length, a truncated one or a corrupted one, with
//! `EINVAL` and a message saying which.
//!
//! ```
//! use vfio_mig_device::{write_all, Controller, DeviceState, Dma, MigrationDevice, ReadOutcome};
//! use vfio_mig_devices::register::{RegisterConfig, RegisterDevice};
//!
//! let source = RegisterDevice::new(RegisterConfig { seed: 1 });
//! let source_bar = source.bar();
//! let source = Controller::new(source, Dma::new())?;
//! let destination = RegisterDevice::new(RegisterConfig { seed: 2 });
//! let destination_bar = destination.bar();
//! let destination = Controller::new(destination, Dma::new())?;
//!
//! let mut saving = source.set_state(DeviceState::StopCopy)?.expect("stop -> stop-copy opens");
//! let mut bytes = Vec::new();
//! let mut buf = [0; 128];
//! while let ReadOutcome::Data(n) = saving.read(&mut buf)? {
//!     bytes.extend_from_slice(&buf[..n]);
//! }
//! let mut resuming = destination.set_state(DeviceState::Resuming)?.expect("opens");
//! write_all(&mut *resuming, &bytes)?;
//! destination.set_state(DeviceState::Running)?; // validates and installs the state
//! assert_eq!(destination_bar.digest(), source_bar.digest());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_mig_device::{
    DeviceError, DeviceIdentity, Errno, IrqInfo, Migratable, MigrationFeatures, PrecopyInfo,
    RegionAccess, RegionInfo, RunMode, SaveKind,
};
use xxhash_rust::xxh3::xxh3_64;

/// The region index of BAR0, the register block.
pub const BAR0: u32 = 0;
/// Offset of the control register.
pub const CONTROL: u64 = 0x100;
/// Offset of the interrupt mask register.
pub const IRQ_MASK: u64 = 0x104;
/// Offset of the count of accepted BAR writes (read-only, part of the state).
pub const WRITE_COUNT: u64 = 0x108;
/// Offset of the identification register (read-only).
pub const ID: u64 = 0x10c;
/// The value of [`ID`]: `REG1` in ASCII.
pub const ID_VALUE: u32 = u32::from_le_bytes(*b"REG1");
/// Offset of the state digest (read-only, 8 bytes, not part of the state).
pub const DIGEST: u64 = 0x110;
/// Bytes of device state: the 64 data registers and the control block.
pub const STATE_LEN: usize = 0x110;
/// Size of BAR0: the state and the digest.
pub const BAR0_SIZE: u64 = DIGEST + 8;
/// BAR0 is writable below this offset.
const WRITABLE_END: u64 = WRITE_COUNT;

/// The first bytes of every register-device stream.
pub const STREAM_MAGIC: [u8; 8] = *b"VFMIGREG";
/// The stream format this device writes and reads.
pub const STREAM_VERSION: u32 = 1;
const HEADER_LEN: usize = 16;
/// Bytes in a complete stream: header, state, checksum.
pub const STREAM_LEN: usize = HEADER_LEN + STATE_LEN + 8;

/// How to build a register device (the `register` device specification maps to it).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegisterConfig {
    /// Picks the data registers' power-on contents.
    pub seed: u64,
}

/// The register file and whether the device runs: shared by the device (which the
/// controller owns) and the BAR handle (which whoever serves region accesses holds).
#[derive(Debug)]
struct Registers {
    bytes: [u8; STATE_LEN],
    running: bool,
}

impl Registers {
    fn power_on(seed: u64) -> Self {
        let mut bytes = [0; STATE_LEN];
        let mut x = seed;
        for reg in bytes[..CONTROL as usize].chunks_exact_mut(4) {
            reg.copy_from_slice(&(splitmix64(&mut x) as u32).to_le_bytes());
        }
        bytes[ID as usize..STATE_LEN].copy_from_slice(&ID_VALUE.to_le_bytes());
        Registers {
            bytes,
            running: true,
        }
    }
}

/// A well-mixed 64-bit sequence from a seed (SplitMix64).
fn splitmix64(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Register-level access to a [`RegisterDevice`]'s BAR0, valid in every migration state.
/// Cheap to clone.
#[derive(Clone, Debug)]
pub struct RegisterBar {
    regs: Arc<Mutex<Registers>>,
}

impl RegisterBar {
    /// The register file is plain bytes, so a panic elsewhere cannot leave it inconsistent.
    fn lock(&self) -> MutexGuard<'_, Registers> {
        self.regs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A copy of the device state (BAR0 bytes 0x000..0x110).
    pub fn state(&self) -> [u8; STATE_LEN] {
        self.lock().bytes
    }

    /// The digest register's value: xxh3-64 of the state.
    pub fn digest(&self) -> u64 {
        xxh3_64(&self.lock().bytes)
    }
}

/// Checks that `[offset, offset + len)` lies inside BAR0.
fn bar_span(index: u32, offset: u64, len: usize) -> Result<Range<usize>, DeviceError> {
    if index != BAR0 {
        return Err(DeviceError::new(
            Errno::EINVAL,
            format!("region {index} does not exist; the register device has BAR0 only"),
        ));
    }
    match offset.checked_add(len as u64) {
        Some(end) if end <= BAR0_SIZE => Ok(offset as usize..end as usize),
        _ => Err(DeviceError::new(
            Errno::EINVAL,
            format!("{len} bytes at {offset:#x} run past the end of BAR0 ({BAR0_SIZE:#x} bytes)"),
        )),
    }
}

impl RegionAccess for RegisterBar {
    fn regions(&self) -> Vec<RegionInfo> {
        vec![RegionInfo {
            index: BAR0,
            size: BAR0_SIZE,
            readable: true,
            writable: true,
        }]
    }

    fn irqs(&self) -> Vec<IrqInfo> {
        Vec::new()
    }

    fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        let span = bar_span(index, offset, buf.len())?;
        let mut window = [0; BAR0_SIZE as usize];
        let state = self.state();
        window[..STATE_LEN].copy_from_slice(&state);
        window[STATE_LEN..].copy_from_slice(&xxh3_64(&state).to_le_bytes());
        buf.copy_from_slice(&window[span]);
        Ok(())
    }

    fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), DeviceError> {
        let span = bar_span(index, offset, data.len())?;
        if span.end as u64 > WRITABLE_END {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!(
                    "BAR0 {:#x}..{:#x} is read-only (only 0x0..{WRITABLE_END:#x} is writable)",
                    span.start.max(WRITABLE_END as usize),
                    span.end
                ),
            ));
        }
        let mut regs = self.lock();
        if !regs.running {
            return Err(DeviceError::new(
                Errno::EBUSY,
                "the device is stopped: its registers are frozen until it runs again",
            ));
        }
        regs.bytes[span].copy_from_slice(data);
        let count = WRITE_COUNT as usize..ID as usize;
        let writes = u32::from_le_bytes(le4(&regs.bytes[count.clone()])).wrapping_add(1);
        regs.bytes[count].copy_from_slice(&writes.to_le_bytes());
        Ok(())
    }
}

/// The first four bytes of `bytes` (callers pass at least four).
fn le4(bytes: &[u8]) -> [u8; 4] {
    [bytes[0], bytes[1], bytes[2], bytes[3]]
}

/// The complete stream for `state`.
fn encode(state: &[u8; STATE_LEN]) -> Vec<u8> {
    let mut stream = Vec::with_capacity(STREAM_LEN);
    stream.extend_from_slice(&STREAM_MAGIC);
    stream.extend_from_slice(&STREAM_VERSION.to_le_bytes());
    stream.extend_from_slice(&(STATE_LEN as u32).to_le_bytes());
    stream.extend_from_slice(state);
    let checksum = xxh3_64(&stream);
    stream.extend_from_slice(&checksum.to_le_bytes());
    stream
}

/// Validates a complete stream and returns the state it carries.
fn decode(stream: &[u8]) -> Result<[u8; STATE_LEN], DeviceError> {
    let invalid = |message: String| Err(DeviceError::new(Errno::EINVAL, message));
    if stream.len() < HEADER_LEN {
        return invalid(format!(
            "register stream truncated: {} bytes, less than its {HEADER_LEN}-byte header",
            stream.len()
        ));
    }
    if stream[..8] != STREAM_MAGIC {
        return invalid(format!(
            "not a register-device stream: magic {:02x?}",
            &stream[..8]
        ));
    }
    let version = u32::from_le_bytes(le4(&stream[8..]));
    if version != STREAM_VERSION {
        return invalid(format!(
            "register stream version {version}; this device reads version {STREAM_VERSION}"
        ));
    }
    let length = u32::from_le_bytes(le4(&stream[12..]));
    if length as usize != STATE_LEN {
        return invalid(format!(
            "register stream carries {length} state bytes; this device has {STATE_LEN}"
        ));
    }
    if stream.len() != STREAM_LEN {
        return invalid(format!(
            "register stream truncated: {} of {STREAM_LEN} bytes",
            stream.len()
        ));
    }
    let (body, tail) = stream.split_at(STREAM_LEN - 8);
    let (computed, carried) = (
        xxh3_64(body),
        u64::from_le_bytes(tail.try_into().unwrap_or_default()),
    );
    if computed != carried {
        return invalid(format!(
            "register stream corrupted: checksum {carried:#018x}, contents give {computed:#018x}"
        ));
    }
    let mut state = [0; STATE_LEN];
    state.copy_from_slice(&body[HEADER_LEN..]);
    Ok(state)
}

fn not_in_feature_set(what: &str) -> DeviceError {
    DeviceError::new(
        Errno::EINVAL,
        format!("the register device has no {what} (its feature set is stop-copy only)"),
    )
}

/// The register device: what the controller drives. See the [module docs](self).
#[derive(Debug)]
pub struct RegisterDevice {
    config: RegisterConfig,
    bar: RegisterBar,
    /// STOP_COPY: the complete stream, taken on entry, and how much of it was read.
    save: Option<(Vec<u8>, usize)>,
    /// RESUMING: the bytes written so far.
    resume: Option<Vec<u8>>,
}

impl RegisterDevice {
    /// A running device with its power-on registers.
    pub fn new(config: RegisterConfig) -> Self {
        RegisterDevice {
            config,
            bar: RegisterBar {
                regs: Arc::new(Mutex::new(Registers::power_on(config.seed))),
            },
            save: None,
            resume: None,
        }
    }

    /// A handle on BAR0, for whoever serves region accesses; take it before handing the
    /// device to a controller.
    pub fn bar(&self) -> RegisterBar {
        self.bar.clone()
    }
}

impl Migratable for RegisterDevice {
    /// STOP_COPY only (see the module docs for why).
    fn features(&self) -> MigrationFeatures {
        MigrationFeatures::STOP_COPY
    }

    /// The stream's version is the identity's: every register device has the same layout,
    /// so there is no further compatibility data.
    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            kind: "register".into(),
            version: STREAM_VERSION.to_string(),
            compat: Vec::new(),
        }
    }

    /// RUNNING -> STOP: freeze the registers, so that the state saved next is final.
    fn stop(&mut self) -> Result<(), DeviceError> {
        self.bar.lock().running = false;
        Ok(())
    }

    /// STOP -> RUNNING: accept register writes again. Only `RunMode::Full` can come (no
    /// P2P), and with no DMA the two modes would be the same anyway.
    fn start(&mut self, _mode: RunMode) -> Result<(), DeviceError> {
        self.bar.lock().running = true;
        Ok(())
    }

    /// Not in the feature set, so the controller never calls it; refusing rather than
    /// pretending makes a mistake visible.
    fn set_p2p_quiesced(&mut self, _quiesced: bool) -> Result<(), DeviceError> {
        Err(not_in_feature_set("p2p states"))
    }

    /// STOP -> STOP_COPY: the registers are frozen, so encode the whole stream now; reads
    /// then only copy it out.
    fn save_begin(&mut self, kind: SaveKind) -> Result<(), DeviceError> {
        match kind {
            SaveKind::StopCopy => {
                self.save = Some((encode(&self.bar.state()), 0));
                Ok(())
            }
            SaveKind::PreCopy => Err(not_in_feature_set("pre-copy")),
        }
    }

    /// Not in the feature set (no pre-copy).
    fn save_stop_copy(&mut self) -> Result<(), DeviceError> {
        Err(not_in_feature_set("pre-copy"))
    }

    /// The next bytes of the stream; 0 at its end and on every read after (the controller
    /// reports that as the end of the state).
    fn save_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let (stream, read) = self
            .save
            .as_mut()
            .ok_or_else(|| DeviceError::new(Errno::EINVAL, "no saving session is open"))?;
        let n = buf.len().min(stream.len() - *read);
        buf[..n].copy_from_slice(&stream[*read..*read + n]);
        *read += n;
        Ok(n)
    }

    /// Not in the feature set (no pre-copy).
    fn save_pending(&mut self) -> Result<PrecopyInfo, DeviceError> {
        Err(not_in_feature_set("pre-copy"))
    }

    /// STOP_COPY -> STOP (or a reset): the stream is no longer needed.
    fn save_end(&mut self) {
        self.save = None;
    }

    /// STOP -> RESUMING: start collecting; the registers change only once everything
    /// written has been validated, so a bad stream leaves them as they were.
    fn resume_begin(&mut self) -> Result<(), DeviceError> {
        self.resume = Some(Vec::with_capacity(STREAM_LEN));
        Ok(())
    }

    /// Takes bytes, refusing at once anything past [`STREAM_LEN`]: the buffer never grows
    /// by an amount the sender chooses.
    fn resume_write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let written = self
            .resume
            .as_mut()
            .ok_or_else(|| DeviceError::new(Errno::EINVAL, "no resuming session is open"))?;
        if written.len() + buf.len() > STREAM_LEN {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!(
                    "register stream longer than {STREAM_LEN} bytes: {} written, {} more offered",
                    written.len(),
                    buf.len()
                ),
            ));
        }
        written.extend_from_slice(buf);
        Ok(buf.len())
    }

    /// RESUMING -> STOP: validate the whole stream, then install the state. On an error
    /// the device stays in RESUMING with what was written, as the controller expects.
    fn resume_finish(&mut self) -> Result<(), DeviceError> {
        let written = self
            .resume
            .as_deref()
            .ok_or_else(|| DeviceError::new(Errno::EINVAL, "no resuming session is open"))?;
        let state = decode(written)?;
        self.bar.lock().bytes = state;
        self.resume = None;
        Ok(())
    }

    /// The stream always has the same size.
    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        Ok(STREAM_LEN as u64)
    }

    /// The device does no DMA, so there is nothing to log; the controller answers ENOTTY.
    fn dma_logging_supported(&self) -> bool {
        false
    }

    /// Device reset: power-on registers, running, no session.
    fn reset(&mut self) {
        *self.bar.lock() = Registers::power_on(self.config.seed);
        self.save = None;
        self.resume = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read_u32(bar: &RegisterBar, offset: u64) -> u32 {
        let mut b = [0; 4];
        bar.region_read(BAR0, offset, &mut b).unwrap();
        u32::from_le_bytes(b)
    }

    fn err_of(stream: &[u8]) -> String {
        let e = decode(stream).unwrap_err();
        assert_eq!(e.errno(), Errno::EINVAL);
        e.message().to_owned()
    }

    #[test]
    fn streams_round_trip() {
        let state = RegisterDevice::new(RegisterConfig { seed: 9 })
            .bar()
            .state();
        let stream = encode(&state);
        assert_eq!(stream.len(), STREAM_LEN);
        assert_eq!(decode(&stream).unwrap(), state);
    }

    #[test]
    fn bad_streams_say_what_is_wrong() {
        let good = encode(&[7; STATE_LEN]);
        let mut magic = good.clone();
        magic[0] ^= 1;
        assert!(err_of(&magic).contains("magic"));
        let mut version = good.clone();
        version[8] = 2;
        assert!(err_of(&version).contains("version 2"));
        let mut length = good.clone();
        length[12..16].copy_from_slice(&256u32.to_le_bytes());
        assert!(err_of(&length).contains("carries 256 state bytes"));
        assert!(err_of(&good[..STREAM_LEN - 1]).contains("truncated: 295 of 296"));
        assert!(err_of(&good[..3]).contains("truncated: 3 bytes"));
        let mut corrupt = good.clone();
        corrupt[100] ^= 0x10;
        assert!(err_of(&corrupt).contains("checksum"));
        let mut long = good;
        long.push(0);
        assert!(err_of(&long).contains("297 of 296"));
    }

    #[test]
    fn power_on_depends_on_the_seed_only() {
        let a = RegisterDevice::new(RegisterConfig { seed: 1 }).bar();
        let b = RegisterDevice::new(RegisterConfig { seed: 1 }).bar();
        let c = RegisterDevice::new(RegisterConfig { seed: 2 }).bar();
        assert_eq!(a.state(), b.state());
        assert_ne!(a.state(), c.state());
        assert_eq!(read_u32(&a, ID), ID_VALUE);
        assert_eq!(read_u32(&a, CONTROL), 0);
    }

    #[test]
    fn bar_writes_count_and_respect_read_only_registers() {
        let bar = RegisterDevice::new(RegisterConfig::default()).bar();
        bar.region_write(BAR0, 0x10, &0xdead_beef_u32.to_le_bytes())
            .unwrap();
        bar.region_write(BAR0, CONTROL, &1u32.to_le_bytes())
            .unwrap();
        assert_eq!(read_u32(&bar, 0x10), 0xdead_beef);
        assert_eq!(read_u32(&bar, WRITE_COUNT), 2);
        let e = bar.region_write(BAR0, WRITE_COUNT, &[0; 4]).unwrap_err();
        assert_eq!(e.errno(), Errno::EINVAL);
        assert!(e.message().contains("read-only"), "{e}");
        assert_eq!(
            bar.region_write(BAR0, IRQ_MASK, &[0; 8])
                .unwrap_err()
                .errno(),
            Errno::EINVAL
        );
        assert_eq!(
            bar.region_write(1, 0, &[0]).unwrap_err().errno(),
            Errno::EINVAL
        );
        let mut past = [0; 2];
        assert_eq!(
            bar.region_read(BAR0, BAR0_SIZE - 1, &mut past)
                .unwrap_err()
                .errno(),
            Errno::EINVAL
        );
        assert_eq!(
            bar.region_read(BAR0, u64::MAX, &mut past)
                .unwrap_err()
                .errno(),
            Errno::EINVAL
        );
        let mut digest = [0; 8];
        bar.region_read(BAR0, DIGEST, &mut digest).unwrap();
        assert_eq!(u64::from_le_bytes(digest), bar.digest());
    }

    #[test]
    fn a_stopped_device_refuses_writes_until_started() {
        let mut device = RegisterDevice::new(RegisterConfig::default());
        let bar = device.bar();
        device.stop().unwrap();
        let e = bar.region_write(BAR0, 0, &[1]).unwrap_err();
        assert_eq!(e.errno(), Errno::EBUSY);
        device.start(RunMode::Full).unwrap();
        bar.region_write(BAR0, 0, &[1]).unwrap();
    }

    #[test]
    fn a_refused_resume_keeps_the_registers_and_the_session() {
        let mut device = RegisterDevice::new(RegisterConfig { seed: 3 });
        let before = device.bar().state();
        device.resume_begin().unwrap();
        let stream = encode(&[0x55; STATE_LEN]);
        device.resume_write(&stream[..100]).unwrap();
        assert!(device.resume_finish().is_err());
        assert_eq!(device.bar().state(), before);
        device.resume_write(&stream[100..]).unwrap();
        device.resume_finish().unwrap();
        assert_eq!(device.bar().state(), [0x55; STATE_LEN]);
    }

    #[test]
    fn overlong_writes_are_refused_early() {
        let mut device = RegisterDevice::new(RegisterConfig::default());
        device.resume_begin().unwrap();
        device.resume_write(&[0; STREAM_LEN]).unwrap();
        let e = device.resume_write(&[0]).unwrap_err();
        assert_eq!(e.errno(), Errno::EINVAL);
        assert!(e.message().contains("longer than 296"), "{e}");
    }

    #[test]
    fn reset_restores_power_on_registers() {
        let mut device = RegisterDevice::new(RegisterConfig { seed: 4 });
        let bar = device.bar();
        let power_on = bar.state();
        bar.region_write(BAR0, 0, &[9; 16]).unwrap();
        device.stop().unwrap();
        device.reset();
        assert_eq!(bar.state(), power_on);
        bar.region_write(BAR0, 0, &[1])
            .expect("running after reset");
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_accepts_only_what_encode_makes(
            bytes in proptest::collection::vec(any::<u8>(), 0..400)
        ) {
            if let Ok(state) = decode(&bytes) {
                prop_assert_eq!(encode(&state), bytes);
            }
        }

        #[test]
        fn any_single_bit_flip_is_refused(bit in 0..STREAM_LEN * 8) {
            let mut stream = encode(&RegisterDevice::new(RegisterConfig { seed: 5 }).bar().state());
            stream[bit / 8] ^= 1 << (bit % 8);
            prop_assert!(decode(&stream).is_err());
        }
    }
}
