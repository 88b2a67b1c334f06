//! The conformance suite: checks any [`MigrationDevice`] against the rules of the VFIO
//! migration uAPI v2, through the user's view only, so it runs the same against a local
//! [`crate::Controller`], a remote vfio-user device or a kernel device.
//!
//! A [`ConformanceTarget`] hands out fresh devices of one kind (a source and a destination)
//! and, optionally, a digest of a device's migratable state; [`Target`] builds one from
//! closures. Each check is a public function returning `Result<(), ConformanceFailure>`
//! ([`CHECK_NAMES`] lists them); [`run_all`] runs every check and returns a serializable
//! [`Report`]:
//!
//! ```no_run
//! use std::sync::Arc;
//! use vfio_mig_device::conformance::{run_all, Role, Target};
//! use vfio_mig_device::{DeviceError, MigrationDevice};
//!
//! /// One long-lived device (e.g. remote): reset it for every check.
//! fn connect() -> Arc<dyn MigrationDevice> {
//!     unimplemented!("open the device")
//! }
//!
//! let device = connect();
//! let target = Target::new("vfio-user:/run/dev.sock", move |_role: Role| {
//!     device.reset()?;
//!     Ok(Arc::clone(&device))
//! });
//! let report = run_all(&target);
//! println!("{report}");
//! std::process::exit(if report.passed() { 0 } else { 1 });
//! ```
//!
//! Checks never use a device after asking the target for another one, so a target may hand
//! out the same long-lived device each time, as above. Factories of in-process devices
//! should give the two [`Role`]s different initial contents, so that digest comparisons
//! mean something.
//!
//! [`crate::migration_conformance_tests!`] stamps one `#[test]` per check into a device's
//! test module; see its documentation.

use std::error::Error as StdError;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::Instant;

use vfio_mig_fsm::{path, session_effect, supported_states, SessionEffect, StreamDirection};
use vfio_mig_uapi::{DeviceState, Errno, Feature, MigrationFeatures};

use crate::dma::MAX_LOGGING_RANGES;
use crate::{
    write_all, DataStream, DeviceError, IovaRange, MigrationDevice, MigrationStream, ReadOutcome,
    TransitionError,
};

/// Which side of a migration a device created for a check plays. Factories should give the
/// two roles different initial contents, so that a destination that ignored the stream
/// cannot match the source's digest by chance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// The device under test, and the one saved from.
    Source,
    /// The device a saved stream is resumed into.
    Destination,
}

impl Role {
    /// A distinct seed per role (1 for the source, 2 for the destination), for factories of
    /// seeded devices.
    pub const fn seed(self) -> u64 {
        match self {
            Role::Source => 1,
            Role::Destination => 2,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Role::Source => "source",
            Role::Destination => "destination",
        })
    }
}

/// What the suite runs against: a source of fresh devices of one kind.
pub trait ConformanceTarget {
    /// The device type handed out.
    type Device: MigrationDevice;

    /// A name for reports.
    fn name(&self) -> String;

    /// A device in RUNNING with its initial contents. Called once or more per check; a
    /// target backed by one long-lived device resets it and hands it out again.
    fn create(&self, role: Role) -> Result<Self::Device, DeviceError>;

    /// The feature set the device must report, if known in advance.
    fn expected_features(&self) -> Option<MigrationFeatures>;

    /// Whether the device must support DMA dirty logging, if known in advance.
    fn expected_dma_logging(&self) -> Option<bool>;

    /// The digest of the device's migratable state, if the target can observe it. Called on
    /// stopped devices only; equal states must give equal digests.
    fn digest(&self, device: &Self::Device) -> Option<Result<Vec<u8>, DeviceError>>;

    /// The most bytes a check reads from one saving session before calling the stream
    /// endless.
    fn max_stream_bytes(&self) -> u64;
}

type Factory<D> = Box<dyn Fn(Role) -> Result<D, DeviceError>>;
type DigestFn<D> = Box<dyn Fn(&D) -> Result<Vec<u8>, DeviceError>>;

/// A [`ConformanceTarget`] built from closures: the usual way to describe a device.
pub struct Target<D> {
    name: String,
    factory: Factory<D>,
    digest: Option<DigestFn<D>>,
    features: Option<MigrationFeatures>,
    dma_logging: Option<bool>,
    max_stream_bytes: u64,
}

impl<D> fmt::Debug for Target<D> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Target")
            .field("name", &self.name)
            .field("digest", &self.digest.is_some())
            .field("features", &self.features)
            .field("dma_logging", &self.dma_logging)
            .field("max_stream_bytes", &self.max_stream_bytes)
            .finish_non_exhaustive()
    }
}

impl<D: MigrationDevice> Target<D> {
    /// The default of [`Target::with_max_stream_bytes`]: 256 MiB.
    pub const DEFAULT_MAX_STREAM_BYTES: u64 = 256 << 20;

    /// A target named `name` whose devices `factory` makes.
    pub fn new(
        name: impl Into<String>,
        factory: impl Fn(Role) -> Result<D, DeviceError> + 'static,
    ) -> Self {
        Target {
            name: name.into(),
            factory: Box::new(factory),
            digest: None,
            features: None,
            dma_logging: None,
            max_stream_bytes: Self::DEFAULT_MAX_STREAM_BYTES,
        }
    }

    /// Compares source and destination states with `digest` after a migration.
    pub fn with_digest(
        mut self,
        digest: impl Fn(&D) -> Result<Vec<u8>, DeviceError> + 'static,
    ) -> Self {
        self.digest = Some(Box::new(digest));
        self
    }

    /// The device must report exactly `features`.
    pub fn expect_features(mut self, features: MigrationFeatures) -> Self {
        self.features = Some(features);
        self
    }

    /// The device must (`true`) or must not (`false`) support DMA dirty logging.
    pub fn expect_dma_logging(mut self, supported: bool) -> Self {
        self.dma_logging = Some(supported);
        self
    }

    /// Reads at most `bytes` from one saving session.
    pub fn with_max_stream_bytes(mut self, bytes: u64) -> Self {
        self.max_stream_bytes = bytes;
        self
    }
}

impl<D: MigrationDevice> ConformanceTarget for Target<D> {
    type Device = D;

    fn name(&self) -> String {
        self.name.clone()
    }

    fn create(&self, role: Role) -> Result<D, DeviceError> {
        (self.factory)(role)
    }

    fn expected_features(&self) -> Option<MigrationFeatures> {
        self.features
    }

    fn expected_dma_logging(&self) -> Option<bool> {
        self.dma_logging
    }

    fn digest(&self, device: &D) -> Option<Result<Vec<u8>, DeviceError>> {
        self.digest.as_ref().map(|digest| digest(device))
    }

    fn max_stream_bytes(&self) -> u64 {
        self.max_stream_bytes
    }
}

type Cause = Box<dyn StdError + Send + Sync + 'static>;

/// A device broke a rule of the uAPI: what was expected and what happened.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct ConformanceFailure {
    message: String,
    #[source]
    cause: Option<Cause>,
}

impl ConformanceFailure {
    /// A failure saying what went wrong.
    pub fn new(message: impl Into<String>) -> Self {
        ConformanceFailure {
            message: message.into(),
            cause: None,
        }
    }

    /// A failure caused by a device error.
    pub fn caused_by(message: impl Into<String>, cause: impl Into<Cause>) -> Self {
        ConformanceFailure {
            message: message.into(),
            cause: Some(cause.into()),
        }
    }

    /// The message, without the cause.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The message followed by every cause in the chain, `: `-separated.
    pub fn detail(&self) -> String {
        let mut out = self.message.clone();
        let mut next = StdError::source(self);
        while let Some(cause) = next {
            out.push_str(": ");
            out.push_str(&cause.to_string());
            next = cause.source();
        }
        out
    }
}

/// What one check returns.
pub type CheckResult = Result<(), ConformanceFailure>;

/// One named check of the suite.
pub struct Check<T: ?Sized> {
    /// The check's name, as stamped by the macro and shown in reports.
    pub name: &'static str,
    /// What the check verifies, in one line.
    pub description: &'static str,
    /// Runs the check.
    pub run: fn(&T) -> CheckResult,
}

impl<T: ?Sized> fmt::Debug for Check<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Check").field("name", &self.name).finish()
    }
}

/// The names of every check, in the order [`run_all`] runs them.
pub const CHECK_NAMES: &[&str] = &[
    "features_contain_stop_copy",
    "fresh_device_is_running",
    "direct_arcs",
    "combination_paths",
    "refused_transitions",
    "streams_only_from_opening_arcs",
    "stream_direction_rules",
    "ended_sessions_fail_enodev",
    "stop_copy_stream_ends",
    "precopy_nothing_now_is_not_end",
    "precopy_info_only_in_precopy",
    "initial_bytes_never_rise",
    "precopy_session_round_trip",
    "save_resume_round_trip",
    "truncated_stream_rejected",
    "reset_from_every_state",
    "dma_logging",
    "data_size_in_every_state",
];

/// Every check, in the order of [`CHECK_NAMES`].
pub fn checks<T: ConformanceTarget + ?Sized>() -> Vec<Check<T>> {
    macro_rules! check {
        ($name:ident, $description:literal) => {
            Check {
                name: stringify!($name),
                description: $description,
                run: $name::<T>,
            }
        };
    }
    vec![
        check!(
            features_contain_stop_copy,
            "features include STOP_COPY, match the expected set and do not change"
        ),
        check!(
            fresh_device_is_running,
            "fresh source and destination devices start in RUNNING with the same identity"
        ),
        check!(
            direct_arcs,
            "every direct arc of the feature set succeeds and lands in its target state"
        ),
        check!(
            combination_paths,
            "every (from, to) pair of supported states ends in `to`, or is refused as the FSM says"
        ),
        check!(
            refused_transitions,
            "ERROR, unsupported states and STOP_COPY -> PRE_COPY* give EINVAL and do not move the device"
        ),
        check!(
            streams_only_from_opening_arcs,
            "a stream comes back only when the last arc opens a session; no-op requests keep the stream"
        ),
        check!(
            stream_direction_rules,
            "saving streams cannot be written, resuming streams cannot be read"
        ),
        check!(
            ended_sessions_fail_enodev,
            "once a transition ends a session, its stream fails with ENODEV"
        ),
        check!(
            stop_copy_stream_ends,
            "a STOP_COPY stream reads to End and keeps returning End"
        ),
        check!(
            precopy_nothing_now_is_not_end,
            "PRE_COPY reads say 'nothing now', never End; without PRE_COPY the state is refused"
        ),
        check!(
            precopy_info_only_in_precopy,
            "precopy info works in PRE_COPY states and fails with EINVAL in STOP_COPY"
        ),
        check!(
            initial_bytes_never_rise,
            "initial_bytes only falls while reading and is 0 once reads say 'nothing now'"
        ),
        check!(
            precopy_session_round_trip,
            "one session across PRE_COPY(_P2P) and STOP_COPY resumes into an equal destination"
        ),
        check!(
            save_resume_round_trip,
            "a STOP_COPY stream written in odd-sized pieces resumes into an equal destination"
        ),
        check!(
            truncated_stream_rejected,
            "a stream missing its last bytes is refused at RESUMING -> STOP"
        ),
        check!(
            reset_from_every_state,
            "reset returns every state to RUNNING, disables open streams, and the device still saves"
        ),
        check!(
            dma_logging,
            "DMA-logging requests are validated as the kernel does, or all give ENOTTY"
        ),
        check!(
            data_size_in_every_state,
            "the STOP_COPY size estimate is available in every supported state"
        ),
    ]
}

/// Runs the check called `name`; an unknown name is a failure.
pub fn run_check<T: ConformanceTarget + ?Sized>(target: &T, name: &str) -> CheckResult {
    let check = checks::<T>()
        .into_iter()
        .find(|c| c.name == name)
        .ok_or_else(|| ConformanceFailure::new(format!("no conformance check is named {name}")))?;
    (check.run)(target)
}

/// Runs the check called `name` and panics with the whole failure if it fails: the body of
/// every test [`crate::migration_conformance_tests!`] stamps.
#[track_caller]
pub fn assert_check<T: ConformanceTarget + ?Sized>(target: &T, name: &str) {
    if let Err(failure) = run_check(target, name) {
        panic!(
            "conformance check {name} failed on {}: {}",
            target.name(),
            failure.detail()
        );
    }
}

/// The outcome of one check in a [`Report`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct CheckReport {
    /// The check's name.
    pub name: &'static str,
    /// What it verifies.
    pub description: &'static str,
    /// Whether the device passed.
    pub passed: bool,
    /// Why it failed, with the device's errors.
    pub message: Option<String>,
    /// How long the check took, in seconds.
    pub duration_secs: f64,
}

/// The outcome of [`run_all`].
#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    /// The target's name.
    pub target: String,
    /// The features a fresh device reported, if it answered.
    pub features: Option<MigrationFeatures>,
    /// One entry per check, in order.
    pub checks: Vec<CheckReport>,
}

impl Report {
    /// Whether every check passed.
    pub fn passed(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    /// The checks that failed.
    pub fn failures(&self) -> impl Iterator<Item = &CheckReport> {
        self.checks.iter().filter(|c| !c.passed)
    }
}

impl fmt::Display for Report {
    /// One line per check, then a summary line.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for c in &self.checks {
            let verdict = if c.passed { "pass" } else { "FAIL" };
            write!(f, "{verdict}  {:<32} {:>8.3}s", c.name, c.duration_secs)?;
            if let Some(message) = &c.message {
                write!(f, "  {message}")?;
            }
            writeln!(f)?;
        }
        let failed = self.failures().count();
        write!(
            f,
            "{}: {} of {} checks passed",
            self.target,
            self.checks.len() - failed,
            self.checks.len()
        )
    }
}

/// Runs every check against `target`. A check that panics (a local device's hook, say) is
/// reported as failed; the suite goes on.
pub fn run_all<T: ConformanceTarget + ?Sized>(target: &T) -> Report {
    let features = target
        .create(Role::Source)
        .ok()
        .and_then(|d| d.features().ok());
    let checks = checks::<T>()
        .into_iter()
        .map(|check| {
            let started = Instant::now();
            let outcome = catch_unwind(AssertUnwindSafe(|| (check.run)(target)));
            let message = match outcome {
                Ok(Ok(())) => None,
                Ok(Err(failure)) => Some(failure.detail()),
                Err(panic) => Some(format!("the check panicked: {}", panic_text(&*panic))),
            };
            CheckReport {
                name: check.name,
                description: check.description,
                passed: message.is_none(),
                message,
                duration_secs: started.elapsed().as_secs_f64(),
            }
        })
        .collect();
    Report {
        target: target.name(),
        features,
        checks,
    }
}

fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

// ---- helpers ------------------------------------------------------------------------------

fn fail(message: impl Into<String>) -> ConformanceFailure {
    ConformanceFailure::new(message)
}

/// Wraps a device error in a failure saying what was being done.
trait Context<T> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T, ConformanceFailure>;
}

impl<T, E: Into<Cause>> Context<T> for Result<T, E> {
    fn during(self, what: impl FnOnce() -> String) -> Result<T, ConformanceFailure> {
        self.map_err(|e| ConformanceFailure::caused_by(format!("{} failed", what()), e))
    }
}

/// An error that carries an errno.
trait HasErrno: Into<Cause> {
    fn errno(&self) -> Errno;
}

impl HasErrno for DeviceError {
    fn errno(&self) -> Errno {
        DeviceError::errno(self)
    }
}

impl HasErrno for TransitionError {
    fn errno(&self) -> Errno {
        TransitionError::errno(self)
    }
}

/// `result` must be an error with errno `want`.
fn expect_errno<T, E: HasErrno>(
    result: Result<T, E>,
    want: Errno,
    what: impl FnOnce() -> String,
) -> CheckResult {
    match result {
        Ok(_) => Err(fail(format!("{} succeeded; expected {want}", what()))),
        Err(e) if e.errno() == want => Ok(()),
        Err(e) => {
            let got = e.errno();
            Err(ConformanceFailure::caused_by(
                format!("{} failed with {got}; expected {want}", what()),
                e,
            ))
        }
    }
}

/// `result` must be an error (any errno).
fn expect_err<T, E>(result: Result<T, E>, what: impl FnOnce() -> String) -> CheckResult {
    match result {
        Ok(_) => Err(fail(format!("{} succeeded; it must fail", what()))),
        Err(_) => Ok(()),
    }
}

fn expect_state<D: MigrationDevice + ?Sized>(
    device: &D,
    want: DeviceState,
    when: impl FnOnce() -> String,
) -> CheckResult {
    let when = when();
    let got = device
        .state()
        .during(|| format!("reading the state {when}"))?;
    if got != want {
        return Err(fail(format!(
            "{when} the device is in {got}, expected {want}"
        )));
    }
    Ok(())
}

/// A fresh device for `role` and its features; it must be in RUNNING.
fn fresh<T: ConformanceTarget + ?Sized>(
    target: &T,
    role: Role,
) -> Result<(T::Device, MigrationFeatures), ConformanceFailure> {
    let device = target
        .create(role)
        .during(|| format!("creating a {role} device"))?;
    expect_state(&device, DeviceState::Running, || {
        format!("when freshly created, the {role}")
    })?;
    let features = device.features().during(|| "reading the features".into())?;
    Ok((device, features))
}

/// Moves a fresh (RUNNING) device to `to`, returning the stream that transition opened.
fn reach<D: MigrationDevice + ?Sized>(
    device: &D,
    to: DeviceState,
) -> Result<Option<DataStream>, ConformanceFailure> {
    let stream = device
        .set_state(to)
        .during(|| format!("moving a fresh device from running to {to}"))?;
    expect_state(device, to, || format!("after moving from running to {to},"))?;
    Ok(stream)
}

fn require_stream(
    stream: Option<DataStream>,
    direction: StreamDirection,
    what: impl FnOnce() -> String,
) -> Result<DataStream, ConformanceFailure> {
    let Some(stream) = stream else {
        return Err(fail(format!("{} returned no stream", what())));
    };
    if stream.direction() != direction {
        return Err(fail(format!(
            "{} returned a {:?} stream, expected {direction:?}",
            what(),
            stream.direction()
        )));
    }
    Ok(stream)
}

const READ_CHUNK: usize = 64 * 1024;

/// Reads a STOP_COPY stream to its End.
fn read_to_end(
    stream: &mut dyn MigrationStream,
    limit: u64,
) -> Result<Vec<u8>, ConformanceFailure> {
    let mut out = Vec::new();
    let mut buf = vec![0; READ_CHUNK];
    loop {
        match stream
            .read(&mut buf)
            .during(|| format!("reading the stop-copy stream at byte {}", out.len()))?
        {
            ReadOutcome::Data(n) => take(&mut out, &buf, n, limit)?,
            ReadOutcome::End => return Ok(out),
            ReadOutcome::NothingNow => {
                return Err(fail(format!(
                    "a stop-copy read at byte {} said 'nothing now'; only pre-copy may",
                    out.len()
                )))
            }
        }
    }
}

/// Reads a PRE_COPY stream until it has nothing now.
fn drain_precopy(
    stream: &mut dyn MigrationStream,
    limit: u64,
) -> Result<Vec<u8>, ConformanceFailure> {
    let mut out = Vec::new();
    let mut buf = vec![0; READ_CHUNK];
    loop {
        match stream
            .read(&mut buf)
            .during(|| format!("reading the pre-copy stream at byte {}", out.len()))?
        {
            ReadOutcome::Data(n) => take(&mut out, &buf, n, limit)?,
            ReadOutcome::NothingNow => return Ok(out),
            ReadOutcome::End => {
                return Err(fail(format!(
                    "a pre-copy read at byte {} returned End; only stop-copy ends a stream",
                    out.len()
                )))
            }
        }
    }
}

fn take(out: &mut Vec<u8>, buf: &[u8], n: usize, limit: u64) -> CheckResult {
    if n == 0 || n > buf.len() {
        return Err(fail(format!(
            "a read returned Data({n}) for a {}-byte buffer",
            buf.len()
        )));
    }
    out.extend_from_slice(&buf[..n]);
    if out.len() as u64 > limit {
        return Err(fail(format!(
            "the saving stream goes on past {limit} bytes"
        )));
    }
    Ok(())
}

/// Writes `bytes` in pieces of varying odd sizes: segmentation is not part of the protocol.
fn write_in_pieces(stream: &mut dyn MigrationStream, bytes: &[u8]) -> CheckResult {
    const PIECES: [usize; 5] = [1, 7, 4093, 13, 65537];
    let mut offset = 0;
    for &piece in PIECES.iter().cycle() {
        if offset == bytes.len() {
            return Ok(());
        }
        let end = bytes.len().min(offset + piece);
        write_all(stream, &bytes[offset..end])
            .during(|| format!("writing bytes {offset}..{end} of the resuming stream"))?;
        offset = end;
    }
    Ok(())
}

/// A stream saved from a fresh source through STOP_COPY, and the source's digest at STOP.
struct Saved {
    bytes: Vec<u8>,
    digest: Option<Vec<u8>>,
}

fn digest_of<T: ConformanceTarget + ?Sized>(
    target: &T,
    device: &T::Device,
    which: &str,
) -> Result<Option<Vec<u8>>, ConformanceFailure> {
    target
        .digest(device)
        .transpose()
        .during(|| format!("computing the {which} digest"))
}

fn save_stop_copy<T: ConformanceTarget + ?Sized>(target: &T) -> Result<Saved, ConformanceFailure> {
    let (source, _) = fresh(target, Role::Source)?;
    let opened = source
        .set_state(DeviceState::StopCopy)
        .during(|| "running -> stop-copy on the source".into())?;
    let mut stream = require_stream(opened, StreamDirection::Saving, || {
        "running -> stop-copy".into()
    })?;
    let bytes = read_to_end(&mut *stream, target.max_stream_bytes())?;
    source
        .set_state(DeviceState::Stop)
        .during(|| "stop-copy -> stop on the source".into())?;
    let digest = digest_of(target, &source, "source")?;
    Ok(Saved { bytes, digest })
}

/// Writes `bytes` into `device` (RUNNING) and completes RESUMING -> STOP.
fn resume<D: MigrationDevice + ?Sized>(device: &D, bytes: &[u8]) -> CheckResult {
    let mut stream = require_stream(
        reach(device, DeviceState::Resuming)?,
        StreamDirection::Resuming,
        || "running -> resuming".into(),
    )?;
    write_in_pieces(&mut *stream, bytes)?;
    device.set_state(DeviceState::Stop).during(|| {
        format!(
            "resuming -> stop after writing a valid {}-byte stream",
            bytes.len()
        )
    })?;
    expect_state(device, DeviceState::Stop, || {
        "after resuming -> stop,".into()
    })
}

fn compare_digests(source: Option<Vec<u8>>, destination: Option<Vec<u8>>) -> CheckResult {
    match (source, destination) {
        (Some(s), Some(d)) if s != d => Err(fail(format!(
            "the destination's state digest {} differs from the source's {}",
            short_hex(&d),
            short_hex(&s)
        ))),
        _ => Ok(()),
    }
}

fn short_hex(bytes: &[u8]) -> String {
    let mut s: String = bytes.iter().take(16).map(|b| format!("{b:02x}")).collect();
    if bytes.len() > 16 {
        s.push_str(&format!("... ({} bytes)", bytes.len()));
    }
    s
}

/// The saving stream must still answer (any outcome but an error).
fn expect_alive(stream: &mut dyn MigrationStream, when: impl FnOnce() -> String) -> CheckResult {
    let mut buf = [0; 64];
    stream
        .read(&mut buf)
        .map(|_| ())
        .during(|| format!("reading the saving stream {}", when()))
}

/// Every use of a stream whose session ended must fail with ENODEV.
fn expect_ended(stream: &mut dyn MigrationStream, when: impl Fn() -> String) -> CheckResult {
    match stream.direction() {
        StreamDirection::Saving => {
            let mut buf = [0; 64];
            expect_errno(stream.read(&mut buf), Errno::ENODEV, || {
                format!("reading the saving stream {}", when())
            })?;
            expect_errno(stream.precopy_info(), Errno::ENODEV, || {
                format!("precopy info on the saving stream {}", when())
            })
        }
        StreamDirection::Resuming => expect_errno(stream.write(&[0]), Errno::ENODEV, || {
            format!("writing the resuming stream {}", when())
        }),
    }
}

/// Without PRE_COPY, both pre-copy states must be refused with EINVAL.
fn precopy_refused<D: MigrationDevice + ?Sized>(device: &D) -> CheckResult {
    for state in [DeviceState::PreCopy, DeviceState::PreCopyP2p] {
        expect_errno(device.set_state(state), Errno::EINVAL, || {
            format!("running -> {state} on a device without pre-copy")
        })?;
        expect_state(device, DeviceState::Running, || {
            format!("after the refused transition to {state},")
        })?;
    }
    Ok(())
}

fn states(features: MigrationFeatures) -> Vec<DeviceState> {
    supported_states(features).collect()
}

// ---- the checks ---------------------------------------------------------------------------

/// Features include STOP_COPY, match the expected set (if given) and do not change.
pub fn features_contain_stop_copy<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let device = target
        .create(Role::Source)
        .during(|| "creating a source device".into())?;
    let features = device.features().during(|| "reading the features".into())?;
    if !features.contains(Feature::StopCopy) {
        return Err(fail(format!(
            "features {features} lack the mandatory stop-copy"
        )));
    }
    if let Some(expected) = target.expected_features() {
        if features.known() != expected.known() {
            return Err(fail(format!(
                "the device reports features {features}, expected {expected}"
            )));
        }
    }
    let again = device
        .features()
        .during(|| "reading the features again".into())?;
    if again != features {
        return Err(fail(format!(
            "features changed from {features} to {again} between two reads"
        )));
    }
    Ok(())
}

/// Fresh source and destination devices start in RUNNING and have the same identity.
pub fn fresh_device_is_running<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let (source, features) = fresh(target, Role::Source)?;
    let source_identity = source
        .identity()
        .during(|| "reading the source's identity".into())?;
    drop(source);
    let (destination, dest_features) = fresh(target, Role::Destination)?;
    let dest_identity = destination
        .identity()
        .during(|| "reading the destination's identity".into())?;
    if dest_features != features {
        return Err(fail(format!(
            "source features {features} differ from destination features {dest_features}"
        )));
    }
    if dest_identity != source_identity {
        return Err(fail(format!(
            "source identity {source_identity:?} differs from destination identity {dest_identity:?}"
        )));
    }
    Ok(())
}

/// Every direct arc of the feature set: reach its start state, take it, land in its end.
pub fn direct_arcs<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let valid = save_stop_copy(target)?.bytes;
    let (_, features) = fresh(target, Role::Source)?;
    for (from, to) in vfio_mig_fsm::direct_arcs(features) {
        let (device, _) = fresh(target, Role::Source)?;
        let mut stream = reach(&device, from)?;
        if from == DeviceState::Resuming {
            if let Some(s) = stream.as_mut() {
                write_in_pieces(&mut **s, &valid)?;
            }
        }
        device
            .set_state(to)
            .during(|| format!("the direct arc {from} -> {to}"))?;
        expect_state(&device, to, || {
            format!("after the direct arc {from} -> {to},")
        })?;
    }
    Ok(())
}

/// Every (from, to) pair of supported states: reach `from`, request `to`; the device ends in
/// `to`, or, where the FSM refuses the pair, the request fails with EINVAL and the device
/// stays in `from`.
pub fn combination_paths<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let valid = save_stop_copy(target)?.bytes;
    let (_, features) = fresh(target, Role::Source)?;
    for from in states(features) {
        for to in states(features) {
            let (device, _) = fresh(target, Role::Source)?;
            let mut stream = reach(&device, from)?;
            if from == DeviceState::Resuming && to != DeviceState::Resuming {
                if let Some(s) = stream.as_mut() {
                    write_in_pieces(&mut **s, &valid)?;
                }
            }
            match path(from, to, features) {
                Ok(_) => {
                    device
                        .set_state(to)
                        .during(|| format!("the transition {from} -> {to}"))?;
                    expect_state(&device, to, || {
                        format!("after the transition {from} -> {to},")
                    })?;
                }
                Err(_) => {
                    expect_errno(device.set_state(to), Errno::EINVAL, || {
                        format!("the refused transition {from} -> {to}")
                    })?;
                    expect_state(&device, from, || {
                        format!("after the refused transition {from} -> {to},")
                    })?;
                }
            }
        }
    }
    Ok(())
}

/// ERROR as a target, states outside the feature set and STOP_COPY -> PRE_COPY(_P2P) give
/// EINVAL from every state and leave the device (and its open stream) where it was.
pub fn refused_transitions<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let (_, features) = fresh(target, Role::Source)?;
    for from in states(features) {
        let (device, _) = fresh(target, Role::Source)?;
        let mut stream = reach(&device, from)?;
        let mut refused: Vec<DeviceState> = DeviceState::ALL
            .into_iter()
            .filter(|s| !s.is_supported_by(features))
            .collect();
        if from == DeviceState::StopCopy {
            refused.extend(
                [DeviceState::PreCopy, DeviceState::PreCopyP2p]
                    .into_iter()
                    .filter(|s| s.is_supported_by(features)),
            );
        }
        for to in refused {
            let result = device.set_state(to);
            if let Err(e) = &result {
                if let Some(at) = e.reached.filter(|&at| at != from) {
                    return Err(fail(format!(
                        "the refused transition {from} -> {to} reports the device in {at}"
                    )));
                }
            }
            expect_errno(result, Errno::EINVAL, || {
                format!("the transition {from} -> {to}")
            })?;
            expect_state(&device, from, || {
                format!("after the refused transition {from} -> {to},")
            })?;
        }
        if let Some(s) = stream
            .as_mut()
            .filter(|s| s.direction() == StreamDirection::Saving)
        {
            expect_alive(&mut **s, || format!("in {from} after refused transitions"))?;
        }
    }
    Ok(())
}

/// For every (from, to) pair: a stream comes back exactly when the path's last arc opens a
/// session, in that session's direction; a no-op request returns none and keeps the stream.
pub fn streams_only_from_opening_arcs<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let valid = save_stop_copy(target)?.bytes;
    let (_, features) = fresh(target, Role::Source)?;
    for from in states(features) {
        for to in states(features) {
            let Ok(walk) = path(from, to, features) else {
                continue;
            };
            let (device, _) = fresh(target, Role::Source)?;
            let mut stream = reach(&device, from)?;
            if from == DeviceState::Resuming && to != DeviceState::Resuming {
                if let Some(s) = stream.as_mut() {
                    write_in_pieces(&mut **s, &valid)?;
                }
            }
            let opened = device
                .set_state(to)
                .during(|| format!("the transition {from} -> {to}"))?;
            let opens = walk
                .arcs()
                .last()
                .map(|(a, b)| session_effect(a, b))
                .and_then(|effect| match effect {
                    SessionEffect::Opens(direction) => Some(direction),
                    _ => None,
                });
            match (opens, opened) {
                (Some(direction), opened) => {
                    require_stream(opened, direction, || {
                        format!("the transition {from} -> {to} ({walk})")
                    })?;
                }
                (None, Some(_)) => {
                    return Err(fail(format!(
                        "the transition {from} -> {to} ({walk}) returned a stream; only session-opening arcs may"
                    )))
                }
                (None, None) => {}
            }
            if from == to && from.is_saving() {
                if let Some(s) = stream.as_mut() {
                    expect_alive(&mut **s, || {
                        format!("after the no-op request {from} -> {to}")
                    })?;
                }
            }
        }
    }
    Ok(())
}

/// A saving stream refuses writes, a resuming stream refuses reads, and both keep working
/// for their own direction afterwards.
pub fn stream_direction_rules<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let saved = save_stop_copy(target)?;
    let (device, _) = fresh(target, Role::Source)?;
    let mut saving = require_stream(
        reach(&device, DeviceState::StopCopy)?,
        StreamDirection::Saving,
        || "running -> stop-copy".into(),
    )?;
    expect_err(saving.write(&[0; 8]), || {
        "writing 8 bytes into a stop-copy (saving) stream".into()
    })?;
    read_to_end(&mut *saving, target.max_stream_bytes())?;
    drop(device);

    let (device, _) = fresh(target, Role::Destination)?;
    let mut resuming = require_stream(
        reach(&device, DeviceState::Resuming)?,
        StreamDirection::Resuming,
        || "running -> resuming".into(),
    )?;
    let mut buf = [0; 64];
    expect_err(resuming.read(&mut buf), || {
        "reading a resuming stream".into()
    })?;
    write_in_pieces(&mut *resuming, &saved.bytes)?;
    device
        .set_state(DeviceState::Stop)
        .during(|| "resuming -> stop after a refused read".into())?;
    Ok(())
}

/// For every session and every transition that ends it (directly, over several arcs or by
/// opening another session), later reads, writes and precopy info fail with ENODEV.
pub fn ended_sessions_fail_enodev<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let valid = save_stop_copy(target)?.bytes;
    let (_, features) = fresh(target, Role::Source)?;
    for from in states(features)
        .into_iter()
        .filter(|s| vfio_mig_fsm::session_in(*s).is_some())
    {
        for to in states(features) {
            let Ok(walk) = path(from, to, features) else {
                continue;
            };
            let ends = walk
                .arcs()
                .any(|(a, b)| matches!(session_effect(a, b), SessionEffect::Ends(_)));
            if !ends {
                continue;
            }
            let (device, _) = fresh(target, Role::Source)?;
            let mut stream = reach(&device, from)?
                .ok_or_else(|| fail(format!("running -> {from} returned no stream")))?;
            if from == DeviceState::Resuming {
                write_in_pieces(&mut *stream, &valid)?;
            }
            device
                .set_state(to)
                .during(|| format!("the transition {from} -> {to}"))?;
            expect_ended(&mut *stream, || format!("after {walk}"))?;
        }
    }
    Ok(())
}

/// A STOP_COPY stream reads to End, and every later read returns End again.
pub fn stop_copy_stream_ends<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let (device, _) = fresh(target, Role::Source)?;
    let mut stream = require_stream(
        reach(&device, DeviceState::StopCopy)?,
        StreamDirection::Saving,
        || "running -> stop-copy".into(),
    )?;
    let bytes = read_to_end(&mut *stream, target.max_stream_bytes())?;
    let mut buf = vec![0; READ_CHUNK];
    for attempt in 1..=3 {
        match stream
            .read(&mut buf)
            .during(|| format!("read {attempt} after the end of the stop-copy stream"))?
        {
            ReadOutcome::End => {}
            other => {
                return Err(fail(format!(
                "read {attempt} after End (at byte {}) returned {other:?}; the end is permanent",
                bytes.len()
            )))
            }
        }
    }
    Ok(())
}

/// In PRE_COPY, reads run out with "nothing now" and never End; the same stream then ends
/// in STOP_COPY. Without PRE_COPY, the pre-copy states are refused.
pub fn precopy_nothing_now_is_not_end<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let (device, features) = fresh(target, Role::Source)?;
    if !features.pre_copy() {
        return precopy_refused(&device);
    }
    let mut stream = require_stream(
        reach(&device, DeviceState::PreCopy)?,
        StreamDirection::Saving,
        || "running -> pre-copy".into(),
    )?;
    drain_precopy(&mut *stream, target.max_stream_bytes())?;
    let mut buf = vec![0; READ_CHUNK];
    for attempt in 1..=3 {
        if let ReadOutcome::End = stream
            .read(&mut buf)
            .during(|| format!("pre-copy read {attempt} after 'nothing now'"))?
        {
            return Err(fail(format!(
                "pre-copy read {attempt} after 'nothing now' returned End"
            )));
        }
    }
    let opened = device
        .set_state(DeviceState::StopCopy)
        .during(|| "pre-copy -> stop-copy".into())?;
    if opened.is_some() {
        return Err(fail(
            "pre-copy -> stop-copy returned a new stream; the session continues",
        ));
    }
    read_to_end(&mut *stream, target.max_stream_bytes())?;
    Ok(())
}

/// Precopy info works in PRE_COPY and PRE_COPY_P2P and fails with EINVAL on the same session
/// in STOP_COPY and on a STOP -> STOP_COPY session; a resuming stream refuses it.
pub fn precopy_info_only_in_precopy<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let (device, features) = fresh(target, Role::Source)?;
    let mut stream = require_stream(
        reach(&device, DeviceState::StopCopy)?,
        StreamDirection::Saving,
        || "running -> stop-copy".into(),
    )?;
    expect_errno(stream.precopy_info(), Errno::EINVAL, || {
        "precopy info in stop-copy".into()
    })?;
    drop((stream, device));

    let (device, _) = fresh(target, Role::Destination)?;
    let mut resuming = require_stream(
        reach(&device, DeviceState::Resuming)?,
        StreamDirection::Resuming,
        || "running -> resuming".into(),
    )?;
    expect_err(resuming.precopy_info(), || {
        "precopy info on a resuming stream".into()
    })?;
    drop((resuming, device));

    if !features.pre_copy() {
        let (device, _) = fresh(target, Role::Source)?;
        return precopy_refused(&device);
    }
    let (device, _) = fresh(target, Role::Source)?;
    let mut stream = require_stream(
        reach(&device, DeviceState::PreCopy)?,
        StreamDirection::Saving,
        || "running -> pre-copy".into(),
    )?;
    stream
        .precopy_info()
        .during(|| "precopy info in pre-copy".into())?;
    if features.p2p() {
        device
            .set_state(DeviceState::PreCopyP2p)
            .during(|| "pre-copy -> pre-copy-p2p".into())?;
        stream
            .precopy_info()
            .during(|| "precopy info in pre-copy-p2p".into())?;
    }
    device
        .set_state(DeviceState::StopCopy)
        .during(|| "pre-copy -> stop-copy".into())?;
    expect_errno(stream.precopy_info(), Errno::EINVAL, || {
        "precopy info after the session moved to stop-copy".into()
    })
}

/// While a PRE_COPY stream is read, initial_bytes never rises, and once reads say "nothing
/// now" it is 0 (there can be no unread initial data then).
pub fn initial_bytes_never_rise<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let (device, features) = fresh(target, Role::Source)?;
    if !features.pre_copy() {
        return precopy_refused(&device);
    }
    let mut stream = require_stream(
        reach(&device, DeviceState::PreCopy)?,
        StreamDirection::Saving,
        || "running -> pre-copy".into(),
    )?;
    let mut last = stream
        .precopy_info()
        .during(|| "precopy info on entering pre-copy".into())?
        .initial_bytes;
    let mut read = 0u64;
    let mut buf = vec![0; 4096];
    loop {
        match stream
            .read(&mut buf)
            .during(|| format!("reading the pre-copy stream at byte {read}"))?
        {
            ReadOutcome::Data(n) => {
                read += n as u64;
                if read > target.max_stream_bytes() {
                    return Err(fail(format!(
                        "the pre-copy stream goes on past {} bytes",
                        target.max_stream_bytes()
                    )));
                }
                let now = stream
                    .precopy_info()
                    .during(|| format!("precopy info after reading {read} bytes"))?
                    .initial_bytes;
                if now > last {
                    return Err(fail(format!(
                        "initial_bytes rose from {last} to {now} after reading {read} bytes"
                    )));
                }
                last = now;
            }
            ReadOutcome::NothingNow => break,
            ReadOutcome::End => {
                return Err(fail(format!("a pre-copy read at byte {read} returned End")))
            }
        }
    }
    let info = stream
        .precopy_info()
        .during(|| "precopy info after 'nothing now'".into())?;
    if info.initial_bytes != 0 {
        return Err(fail(format!(
            "reads say 'nothing now' after {read} bytes but initial_bytes is {}",
            info.initial_bytes
        )));
    }
    if features.p2p() {
        device
            .set_state(DeviceState::PreCopyP2p)
            .during(|| "pre-copy -> pre-copy-p2p".into())?;
        let info = stream
            .precopy_info()
            .during(|| "precopy info in pre-copy-p2p".into())?;
        if info.initial_bytes != 0 {
            return Err(fail(format!(
                "initial_bytes rose from 0 to {} on pre-copy -> pre-copy-p2p",
                info.initial_bytes
            )));
        }
    }
    Ok(())
}

/// One session across PRE_COPY, PRE_COPY_P2P (if supported) and STOP_COPY, on one stream,
/// resumes into a destination whose digest equals the stopped source's.
pub fn precopy_session_round_trip<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let (source, features) = fresh(target, Role::Source)?;
    if !features.pre_copy() {
        return precopy_refused(&source);
    }
    let limit = target.max_stream_bytes();
    let mut stream = require_stream(
        reach(&source, DeviceState::PreCopy)?,
        StreamDirection::Saving,
        || "running -> pre-copy".into(),
    )?;
    let mut bytes = drain_precopy(&mut *stream, limit)?;
    if features.p2p() {
        let opened = source
            .set_state(DeviceState::PreCopyP2p)
            .during(|| "pre-copy -> pre-copy-p2p".into())?;
        if opened.is_some() {
            return Err(fail(
                "pre-copy -> pre-copy-p2p returned a new stream; the session continues",
            ));
        }
        bytes.extend(drain_precopy(&mut *stream, limit)?);
    }
    let opened = source
        .set_state(DeviceState::StopCopy)
        .during(|| "pre-copy -> stop-copy".into())?;
    if opened.is_some() {
        return Err(fail(
            "pre-copy -> stop-copy returned a new stream; the session continues",
        ));
    }
    bytes.extend(read_to_end(&mut *stream, limit)?);
    source
        .set_state(DeviceState::Stop)
        .during(|| "stop-copy -> stop on the source".into())?;
    let source_digest = digest_of(target, &source, "source")?;
    drop((stream, source));

    let (destination, _) = fresh(target, Role::Destination)?;
    resume(&destination, &bytes)?;
    let dest_digest = digest_of(target, &destination, "destination")?;
    compare_digests(source_digest, dest_digest)
}

/// A STOP_COPY stream written into a destination in odd-sized pieces resumes, the
/// destination's digest equals the stopped source's, and the destination runs again.
pub fn save_resume_round_trip<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let saved = save_stop_copy(target)?;
    let (destination, _) = fresh(target, Role::Destination)?;
    resume(&destination, &saved.bytes)?;
    let dest_digest = digest_of(target, &destination, "destination")?;
    compare_digests(saved.digest, dest_digest)?;
    destination
        .set_state(DeviceState::Running)
        .during(|| "stop -> running on the resumed destination".into())?;
    expect_state(&destination, DeviceState::Running, || {
        "after resuming and starting,".into()
    })
}

/// A stream missing its last byte, its second half, or everything is refused when leaving
/// RESUMING: the request fails and the device stays in RESUMING (or ERROR), until a reset.
pub fn truncated_stream_rejected<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let saved = save_stop_copy(target)?;
    let len = saved.bytes.len();
    let mut cuts = vec![len.saturating_sub(1), len / 2, 0];
    cuts.dedup();
    for keep in cuts.into_iter().filter(|&keep| keep < len) {
        let (device, _) = fresh(target, Role::Destination)?;
        let mut stream = require_stream(
            reach(&device, DeviceState::Resuming)?,
            StreamDirection::Resuming,
            || "running -> resuming".into(),
        )?;
        write_in_pieces(&mut *stream, &saved.bytes[..keep])?;
        if device.set_state(DeviceState::Stop).is_ok() {
            return Err(fail(format!(
                "resuming -> stop accepted the first {keep} of {len} stream bytes"
            )));
        }
        let at = device
            .state()
            .during(|| "reading the state after a refused resume".into())?;
        if at != DeviceState::Resuming && at != DeviceState::Error {
            return Err(fail(format!(
                "after refusing a {keep}-byte stream the device is in {at}, expected resuming or error"
            )));
        }
        device
            .reset()
            .during(|| "resetting after a refused resume".into())?;
        expect_state(&device, DeviceState::Running, || {
            "after a reset that follows a refused resume,".into()
        })?;
    }
    Ok(())
}

/// From every supported state (with its stream open), reset returns the device to RUNNING,
/// the stream fails with ENODEV, and the device saves a full STOP_COPY stream afterwards.
pub fn reset_from_every_state<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let (_, features) = fresh(target, Role::Source)?;
    for from in states(features) {
        let (device, _) = fresh(target, Role::Source)?;
        let mut stream = reach(&device, from)?;
        device.reset().during(|| format!("reset in {from}"))?;
        expect_state(&device, DeviceState::Running, || {
            format!("after a reset in {from},")
        })?;
        if let Some(s) = stream.as_mut() {
            expect_ended(&mut **s, || format!("after a reset in {from}"))?;
        }
        let mut saving = require_stream(
            device
                .set_state(DeviceState::StopCopy)
                .during(|| format!("running -> stop-copy after a reset in {from}"))?,
            StreamDirection::Saving,
            || format!("running -> stop-copy after a reset in {from}"),
        )?;
        read_to_end(&mut *saving, target.max_stream_bytes())?;
        device
            .set_state(DeviceState::Running)
            .during(|| format!("stop-copy -> running after a reset in {from}"))?;
    }
    Ok(())
}

fn range(iova: u64, length: u64) -> IovaRange {
    IovaRange { iova, length }
}

/// DMA logging: if supported, START is validated as the kernel does (no ranges, too many,
/// unaligned, overlapping, overflowing, bad page size, a second start), REPORT checks its
/// page size, and STOP ends it; if not, START, REPORT and STOP all give ENOTTY.
pub fn dma_logging<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let (device, _) = fresh(target, Role::Source)?;
    const PAGE: u64 = 4096;
    let probe = device.dma_logging_start(PAGE, &[range(0, PAGE)]);
    let supported = match &probe {
        Ok(_) => true,
        Err(e) if e.errno() == Errno::ENOTTY => false,
        Err(_) => {
            return probe
                .map(|_| ())
                .during(|| "a valid DMA-logging start (one 4 KiB range at 0)".into())
        }
    };
    if let Some(expected) = target.expected_dma_logging() {
        if expected != supported {
            return Err(fail(format!(
                "DMA logging is {}supported, expected {}supported",
                if supported { "" } else { "not " },
                if expected { "" } else { "not " }
            )));
        }
    }
    let mut bitmap = [0u64; 4];
    if !supported {
        expect_errno(
            device.dma_logging_report(0, PAGE, PAGE, &mut bitmap),
            Errno::ENOTTY,
            || "a DMA-logging report on a device without logging".into(),
        )?;
        return expect_errno(device.dma_logging_stop(), Errno::ENOTTY, || {
            "a DMA-logging stop on a device without logging".into()
        });
    }
    device
        .dma_logging_stop()
        .during(|| "stopping the probing DMA log".into())?;

    let too_many: Vec<IovaRange> = (0..=MAX_LOGGING_RANGES as u64)
        .map(|i| range(i * 2 * PAGE, PAGE))
        .collect();
    let top = u64::MAX - (PAGE - 1);
    let invalid: [(&str, u64, Vec<IovaRange>, Errno); 8] = [
        ("no ranges", PAGE, vec![], Errno::EINVAL),
        ("257 ranges", PAGE, too_many.clone(), Errno::E2BIG),
        (
            "an unaligned iova",
            PAGE,
            vec![range(1, PAGE)],
            Errno::EINVAL,
        ),
        (
            "an unaligned length",
            PAGE,
            vec![range(0, 100)],
            Errno::EINVAL,
        ),
        (
            "overlapping ranges",
            PAGE,
            vec![range(0, 2 * PAGE), range(PAGE, PAGE)],
            Errno::EINVAL,
        ),
        (
            "a range past the end of the address space",
            PAGE,
            vec![range(top, 2 * PAGE)],
            Errno::EOVERFLOW,
        ),
        ("page size 2048", 2048, vec![range(0, PAGE)], Errno::EINVAL),
        (
            "page size 12288",
            12288,
            vec![range(0, 12288)],
            Errno::EINVAL,
        ),
    ];
    for (what, page_size, ranges, errno) in invalid {
        expect_errno(device.dma_logging_start(page_size, &ranges), errno, || {
            format!("a DMA-logging start with {what}")
        })?;
    }
    // None of the refused starts may have started logging: the most ranges allowed work.
    device
        .dma_logging_start(PAGE, &too_many[..MAX_LOGGING_RANGES])
        .during(|| format!("a DMA-logging start with {MAX_LOGGING_RANGES} ranges"))?;
    device
        .dma_logging_stop()
        .during(|| "a DMA-logging stop".into())?;

    let used = device
        .dma_logging_start(PAGE, &[range(0, 64 * PAGE)])
        .during(|| "a DMA-logging start of 256 KiB at 0".into())?;
    if used < 4096 || !used.is_power_of_two() {
        return Err(fail(format!(
            "DMA-logging start says it uses page size {used}, not a power of two of at least 4096"
        )));
    }
    expect_errno(
        device.dma_logging_start(PAGE, &[range(0, PAGE)]),
        Errno::EINVAL,
        || "a second DMA-logging start before stop".into(),
    )?;
    expect_errno(
        device.dma_logging_report(0, 64 * PAGE, 4000, &mut bitmap),
        Errno::EINVAL,
        || "a DMA-logging report with page size 4000".into(),
    )?;
    expect_errno(
        device.dma_logging_report(top, 2 * PAGE, PAGE, &mut bitmap),
        Errno::EOVERFLOW,
        || "a DMA-logging report of a window past the end of the address space".into(),
    )?;
    device
        .dma_logging_report(0, 64 * PAGE, PAGE, &mut bitmap)
        .during(|| "a DMA-logging report of the logged range".into())?;
    device
        .dma_logging_stop()
        .during(|| "a DMA-logging stop".into())?;
    expect_err(
        device.dma_logging_report(0, 64 * PAGE, PAGE, &mut bitmap),
        || "a DMA-logging report after stop".into(),
    )
}

/// The STOP_COPY size estimate is available in every supported state.
pub fn data_size_in_every_state<T: ConformanceTarget + ?Sized>(target: &T) -> CheckResult {
    let (_, features) = fresh(target, Role::Source)?;
    for state in states(features) {
        let (device, _) = fresh(target, Role::Source)?;
        let _stream = reach(&device, state)?;
        device
            .data_size()
            .during(|| format!("the stop-copy size estimate in {state}"))?;
    }
    Ok(())
}

/// Stamps one `#[test]` per conformance check into a new module, plus a test that the
/// stamped list is the suite's whole list. Three forms:
///
/// ```no_run
/// use std::sync::Arc;
/// use vfio_mig_device::conformance::{Role, Target};
/// use vfio_mig_device::{migration_conformance_tests, DeviceError, MigrationDevice, MigrationFeatures};
///
/// type Device = Arc<dyn MigrationDevice>;
/// fn make(role: Role) -> Result<Device, DeviceError> {
///     unimplemented!("a fresh device, seeded by role.seed()")
/// }
/// fn state_of(device: &Device) -> Result<Vec<u8>, DeviceError> {
///     unimplemented!("the device's migratable state, or a digest of it")
/// }
///
/// // A factory `Fn(Role) -> Result<D, DeviceError>` (D: MigrationDevice).
/// migration_conformance_tests!(plain, make);
/// // The same, with a digest `Fn(&D) -> Result<Vec<u8>, DeviceError>` compared across
/// // every migration the suite makes.
/// migration_conformance_tests!(with_digest, make, state_of);
/// // Any ConformanceTarget, e.g. a Target with expectations.
/// migration_conformance_tests!(
///     expecting,
///     target = Target::new("mine", make)
///         .with_digest(state_of)
///         .expect_features(MigrationFeatures::ALL)
///         .expect_dma_logging(true)
/// );
/// # fn main() {}
/// ```
///
/// The expressions are evaluated inside the new module, which imports everything of the
/// module the macro is invoked in (`use super::*`); each test evaluates them afresh. A
/// failing test panics with the check's message and the device's errors.
#[macro_export]
macro_rules! migration_conformance_tests {
    (@stamp $module:ident, $target:expr; $($check:ident),* $(,)?) => {
        mod $module {
            #[allow(unused_imports)]
            use super::*;

            fn conformance_target() -> impl $crate::conformance::ConformanceTarget {
                $target
            }

            $(
                #[test]
                fn $check() {
                    $crate::conformance::assert_check(&conformance_target(), stringify!($check));
                }
            )*

            #[test]
            fn every_check_is_stamped() {
                let stamped: &[&str] = &[$(stringify!($check)),*];
                assert_eq!(stamped, $crate::conformance::CHECK_NAMES);
            }
        }
    };
    ($module:ident, target = $target:expr $(,)?) => {
        $crate::migration_conformance_tests!(@stamp $module, $target;
            features_contain_stop_copy,
            fresh_device_is_running,
            direct_arcs,
            combination_paths,
            refused_transitions,
            streams_only_from_opening_arcs,
            stream_direction_rules,
            ended_sessions_fail_enodev,
            stop_copy_stream_ends,
            precopy_nothing_now_is_not_end,
            precopy_info_only_in_precopy,
            initial_bytes_never_rise,
            precopy_session_round_trip,
            save_resume_round_trip,
            truncated_stream_rejected,
            reset_from_every_state,
            dma_logging,
            data_size_in_every_state,
        );
    };
    ($module:ident, $factory:expr $(,)?) => {
        $crate::migration_conformance_tests!($module,
            target = $crate::conformance::Target::new(stringify!($module), $factory));
    };
    ($module:ident, $factory:expr, $digest:expr $(,)?) => {
        $crate::migration_conformance_tests!($module,
            target = $crate::conformance::Target::new(stringify!($module), $factory)
                .with_digest($digest));
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;

    impl ConformanceTarget for Nothing {
        type Device = crate::Controller<NeverMade>;
        fn name(&self) -> String {
            "nothing".into()
        }
        fn create(&self, _: Role) -> Result<Self::Device, DeviceError> {
            Err(DeviceError::new(Errno::ENODEV, "no device here"))
        }
        fn expected_features(&self) -> Option<MigrationFeatures> {
            None
        }
        fn expected_dma_logging(&self) -> Option<bool> {
            None
        }
        fn digest(&self, _: &Self::Device) -> Option<Result<Vec<u8>, DeviceError>> {
            None
        }
        fn max_stream_bytes(&self) -> u64 {
            1
        }
    }

    /// A device type that is never constructed (the target above fails to create one).
    struct NeverMade;

    impl crate::Migratable for NeverMade {
        fn features(&self) -> MigrationFeatures {
            unreachable!()
        }
        fn identity(&self) -> crate::DeviceIdentity {
            unreachable!()
        }
        fn stop(&mut self) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn start(&mut self, _: crate::RunMode) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn set_p2p_quiesced(&mut self, _: bool) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn save_begin(&mut self, _: crate::SaveKind) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn save_stop_copy(&mut self) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn save_read(&mut self, _: &mut [u8]) -> Result<usize, DeviceError> {
            unreachable!()
        }
        fn save_pending(&mut self) -> Result<crate::PrecopyInfo, DeviceError> {
            unreachable!()
        }
        fn save_end(&mut self) {
            unreachable!()
        }
        fn resume_begin(&mut self) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn resume_write(&mut self, _: &[u8]) -> Result<usize, DeviceError> {
            unreachable!()
        }
        fn resume_finish(&mut self) -> Result<(), DeviceError> {
            unreachable!()
        }
        fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
            unreachable!()
        }
        fn dma_logging_supported(&self) -> bool {
            unreachable!()
        }
        fn reset(&mut self) {
            unreachable!()
        }
    }

    #[test]
    fn check_list_matches_names() {
        let names: Vec<&str> = checks::<Nothing>().iter().map(|c| c.name).collect();
        assert_eq!(names, CHECK_NAMES);
    }

    #[test]
    fn a_target_without_devices_fails_every_check_with_the_cause() {
        let report = run_all(&Nothing);
        assert_eq!(report.checks.len(), CHECK_NAMES.len());
        assert!(report.features.is_none());
        for check in &report.checks {
            assert!(!check.passed, "{} passed without a device", check.name);
            let message = check.message.as_deref().unwrap_or_default();
            assert!(
                message.contains("no device here"),
                "{}: {message}",
                check.name
            );
        }
        assert!(report
            .to_string()
            .ends_with("nothing: 0 of 18 checks passed"));
    }

    #[test]
    fn unknown_check_names_fail() {
        let err = run_check(&Nothing, "no_such_check").unwrap_err();
        assert!(err.message().contains("no_such_check"));
    }

    #[test]
    fn failure_detail_walks_the_cause_chain() {
        let f = ConformanceFailure::caused_by(
            "stop failed",
            DeviceError::new(Errno::EIO, "device said no"),
        );
        assert_eq!(f.to_string(), "stop failed");
        assert_eq!(f.detail(), "stop failed: device said no (EIO)");
    }
}
