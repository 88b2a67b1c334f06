//! The source engine: discovery, handshake, precopy, switchover, stop-copy, completion, and
//! rollback on any failure before the destination runs.
//!
//! Threads: the caller's thread coordinates (device state changes, the convergence policy,
//! rollback); one reader thread per device reads its saving stream into a small pool of
//! reusable buffers; one writer thread owns the frame sink (the stream encoder on a
//! transport, or the in-process link of a local migration) and passes on whatever chunks
//! arrive, so devices stream in parallel; one thread reads the back channel. Every thread
//! reports to the coordinator over one channel.

use std::fmt;
use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vfio_mig_device::{
    DataStream, DeviceIdentity, DeviceState, MigrationDevice, MigrationFeatures, PrecopyInfo,
    ReadOutcome,
};
use vfio_mig_stream::{
    payload_crc, DeviceInfo, DeviceTotals, Phase, StreamConfig, DEFAULT_DECODER_MAX_CHUNK,
    DEFAULT_MAX_CHUNK, FRAME_LEN, MAX_DEVICES, MAX_NAME_LEN,
};

use crate::ack::{Ack, AckError};
use crate::buffers::{BufferMemory, PoolBuffer};
use crate::error::{
    chain, DeviceOp, DeviceRecovery, Failure, MigrationError, Recovery, RecoveryAction,
    RecoveryOutcome,
};
use crate::event::{
    unix_us, DeviceReport, Downtime, DowntimeClock, Emitter, Event, EventSink, ProgressMeter, Side,
    SourceSummary, Stage,
};
use crate::frames::{AckSource, FrameSink, Payload, SinkError};
use crate::policy::{ConvergencePolicy, Decision, NonConvergence, RoundStats, SwitchoverReason};
use crate::tracked::Tracked;
use crate::transport::{Control, SourceEnd, Transport};

/// A device taking part in a migration, with the name used in messages and the stream
/// (e.g. its address).
#[derive(Clone)]
pub struct NamedDevice {
    /// For people and the stream's DEVICE record (cut to 255 bytes there).
    pub name: String,
    /// The device.
    pub device: Arc<dyn MigrationDevice>,
}

impl NamedDevice {
    /// Names `device`.
    pub fn new(name: impl Into<String>, device: Arc<dyn MigrationDevice>) -> NamedDevice {
        NamedDevice {
            name: name.into(),
            device,
        }
    }
}

impl fmt::Debug for NamedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NamedDevice")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// How the source engine migrates.
#[derive(Clone)]
pub struct SourceOptions {
    /// The longest acceptable predicted downtime: precopy continues until the remaining
    /// state can move within it. Default 300 ms.
    pub downtime_limit: Duration,
    /// The most precopy rounds before [`SourceOptions::on_no_convergence`] applies.
    /// Default 30 (at least 1 is run).
    pub max_precopy_rounds: u32,
    /// Switch over anyway or abort after `max_precopy_rounds`. Default: switch over.
    pub on_no_convergence: NonConvergence,
    /// Precopy with devices that support PRE_COPY (default). `false` stops every device
    /// and moves its whole state in stop-copy (a cold migration).
    pub precopy: bool,
    /// Migrate several devices even if some lack P2P (QEMU refuses: a device that can
    /// still issue P2P DMA may change a peer already saved). Default false.
    pub allow_non_p2p: bool,
    /// Largest chunk read from a device and sent as one DATA record. Default 1 MiB.
    pub chunk_size: u32,
    /// Chunk buffers per device in flight between its reader and the transport writer; the
    /// engine's buffer memory is about devices x buffers x chunk size. Default 4.
    pub buffers_per_device: usize,
    /// How long to wait for each acknowledgement of the destination. Default 60 s.
    pub ack_timeout: Duration,
    /// Socket write timeout, so that a destination that stops reading fails the migration
    /// instead of hanging it. Default 60 s; `None` waits forever.
    pub io_timeout: Option<Duration>,
    /// Both engines run in this process and read the same clock: measure the downtime
    /// exactly from the destination's timestamps (set by [`crate::migrate_local`]).
    pub shared_clock: bool,
    /// The stream header's producer string.
    pub producer: String,
    /// Where events go.
    pub events: Option<EventSink>,
    /// Cancels the migration from another thread (a signal handler, a UI): the source
    /// rolls back as after any failure, unless the stream was already complete.
    pub cancel: Option<Cancel>,
    /// Where the chunk buffers come from instead of the heap. Each device's
    /// `buffers_per_device` buffers, of `chunk_size` bytes plus room for a record frame in
    /// front ([`vfio_mig_stream::FRAME_LEN`] bytes, where a byte stream writes the frame so
    /// that frame and chunk go out in one write), are taken from it once, when the device's
    /// reader starts, and dropped once the migration is done with them; the device reads its
    /// data straight into them, and over [`crate::migrate_local`] the destination device is
    /// written from them too. A buffer it has no room for comes from the heap. Default
    /// `None`: all from the heap.
    pub buffer_memory: Option<Arc<dyn BufferMemory>>,
}

/// A cancellation request shared between the engine and whoever may cancel it. Cheap to
/// clone; cancelling is permanent.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<AtomicBool>);

impl Cancel {
    /// A token not cancelled yet.
    pub fn new() -> Cancel {
        Cancel::default()
    }

    /// Asks the engine to stop; it notices within [`CANCEL_POLL`].
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether [`Cancel::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How often a waiting engine looks at its [`Cancel`] token.
pub const CANCEL_POLL: Duration = Duration::from_millis(50);

impl Default for SourceOptions {
    fn default() -> Self {
        SourceOptions {
            downtime_limit: Duration::from_millis(300),
            max_precopy_rounds: 30,
            on_no_convergence: NonConvergence::SwitchOver,
            precopy: true,
            allow_non_p2p: false,
            chunk_size: DEFAULT_MAX_CHUNK,
            buffers_per_device: 4,
            ack_timeout: Duration::from_secs(60),
            io_timeout: Some(Duration::from_secs(60)),
            shared_clock: false,
            producer: StreamConfig::default().producer,
            events: None,
            cancel: None,
            buffer_memory: None,
        }
    }
}

impl fmt::Debug for SourceOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceOptions")
            .field("downtime_limit", &self.downtime_limit)
            .field("max_precopy_rounds", &self.max_precopy_rounds)
            .field("on_no_convergence", &self.on_no_convergence)
            .field("precopy", &self.precopy)
            .field("allow_non_p2p", &self.allow_non_p2p)
            .field("chunk_size", &self.chunk_size)
            .field("buffers_per_device", &self.buffers_per_device)
            .field("ack_timeout", &self.ack_timeout)
            .field("io_timeout", &self.io_timeout)
            .field("shared_clock", &self.shared_clock)
            .field("producer", &self.producer)
            .field("events", &self.events.is_some())
            .field("cancel", &self.cancel)
            .field("buffer_memory", &self.buffer_memory)
            .finish()
    }
}

/// Migrates `devices` out through `transport`: the source side of a live migration (or of
/// a `save` when the transport is a file).
///
/// On success every source device is left in STOP: the destination runs the state, or the
/// file holds it. On failure before the destination validated and started its devices,
/// every source device is returned to the state it had before (RUNNING, normally), with
/// `reset` as the last resort, and an ABORT record is sent if the transport still works;
/// the error says what failed, where, and what was done. When the stream was complete but
/// the destination's final answer never came, the outcome is unknown: the source devices
/// are left stopped with their state intact, never restarted (two running copies would be
/// worse).
pub fn migrate_out(
    devices: &[NamedDevice],
    transport: Transport,
    opts: &SourceOptions,
) -> Result<SourceSummary, MigrationError> {
    run_source(devices, transport.into_source_end(), opts)
}

/// [`migrate_out`] over any end: a byte transport's or an in-process link's.
pub(crate) fn run_source(
    devices: &[NamedDevice],
    end: SourceEnd,
    opts: &SourceOptions,
) -> Result<SourceSummary, MigrationError> {
    let mut engine = SourceEngine::new(devices, end, opts);
    match engine.run() {
        Ok(summary) => Ok(summary),
        Err(failure) => Err(engine.fail(failure)),
    }
}

/// How far the writer got with the END record: whether the destination can have the
/// whole stream decides between rollback and "outcome unknown".
const END_NOT_SENT: u8 = 0;
const END_WRITING: u8 = 1;
const END_WRITTEN: u8 = 2;
const END_FAILED: u8 = 3;

/// Messages to the writer thread.
enum WriterMsg {
    /// A chunk read from a device, with room for its frame before it; the buffer goes
    /// back to the reader's pool once the chunk is written (or, over an in-process link,
    /// once the destination has written it to its device). `crc` is 0 unless the sink
    /// wants checksums.
    Chunk {
        device: u16,
        phase: Phase,
        payload: Payload,
        crc: u32,
    },
    /// The device's data is complete: write its DEVICE_END.
    DeviceEnd { device: u16 },
    /// Write END and finish.
    End,
}

/// Commands to a reader thread.
enum ReaderCmd {
    /// Run one precopy round.
    Round,
    /// Read the stop-copy data to its end (the device is in STOP_COPY now).
    StopCopy,
}

/// What the threads tell the coordinator.
enum Report {
    RoundDone {
        device: u16,
        bytes: u64,
        info: PrecopyInfo,
    },
    ReaderFailed(Failure),
    DeviceEnded {
        device: u16,
        totals: DeviceTotals,
    },
    WriterDone,
    WriterFailed(Failure),
    AbortWritten(bool),
    WriterExited,
    Ack(Ack),
    BackChannelEnded(Option<AckError>),
}

/// The writer before and after it gets its own thread.
enum WriterSlot {
    /// Header not yet sent, or sent while waiting for the destination.
    Idle {
        sink: Box<dyn FrameSink>,
    },
    Running {
        tx: SyncSender<WriterMsg>,
        abort: Arc<Mutex<Option<String>>>,
        join: JoinHandle<()>,
    },
    Gone,
}

struct Reader {
    cmd: Sender<ReaderCmd>,
    join: JoinHandle<()>,
}

struct Dev<'a> {
    index: u16,
    named: &'a NamedDevice,
    features: MigrationFeatures,
    identity: DeviceIdentity,
    /// The state before the migration: where a rollback returns the device.
    original: DeviceState,
    state: DeviceState,
    estimate: u64,
    /// Whether the engine asked the device to change state.
    touched: bool,
    reader: Option<Reader>,
    /// Pending precopy bytes after the last round.
    last_info: PrecopyInfo,
    totals: Option<DeviceTotals>,
}

struct SourceEngine<'a> {
    devices: &'a [NamedDevice],
    devs: Vec<Dev<'a>>,
    opts: &'a SourceOptions,
    em: Emitter,
    stage: Stage,
    transport_name: String,
    control: Control,
    ack_reader: Option<Box<dyn AckSource>>,
    ack_thread: Option<JoinHandle<()>>,
    back_channel: bool,
    back_closed: bool,
    writer: WriterSlot,
    /// The sink until the header went out (then the writer has it).
    pending_sink: Option<Box<dyn FrameSink>>,
    /// Whether the sink wants payload checksums.
    checksums: bool,
    /// Whether the sink keeps payload buffers until the destination wrote them.
    lends_buffers: bool,
    reports_tx: Sender<Report>,
    reports: Receiver<Report>,
    cancel: Arc<AtomicBool>,
    stream_bytes: Arc<AtomicU64>,
    /// The coordinator has seen END written (reports after it are expected).
    end_written: bool,
    /// The writer's progress with END (`END_*`), set by the writer itself.
    end_state: Arc<AtomicU8>,
    switch_start: Option<(Instant, u64)>,
    /// The destination's `running` and when it arrived: it may come before the writer has
    /// reported END written.
    running_ack: Option<(Ack, Instant)>,
    precopy_time: Duration,
    warnings: Vec<String>,
}

impl<'a> SourceEngine<'a> {
    fn new(devices: &'a [NamedDevice], end: SourceEnd, opts: &'a SourceOptions) -> Self {
        let (reports_tx, reports) = mpsc::channel();
        let SourceEnd {
            sink,
            acks,
            control,
            description: transport_name,
        } = end;
        SourceEngine {
            devices,
            devs: Vec::new(),
            opts,
            em: Emitter::new(Side::Source, opts.events.clone()),
            stage: Stage::Discovery,
            transport_name,
            control,
            back_channel: acks.is_some(),
            ack_reader: acks,
            ack_thread: None,
            back_closed: false,
            writer: WriterSlot::Gone,
            checksums: sink.as_ref().is_none_or(|s| s.checksums()),
            lends_buffers: sink.as_ref().is_some_and(|s| s.lends_buffers()),
            pending_sink: sink,
            reports_tx,
            reports,
            cancel: Arc::new(AtomicBool::new(false)),
            stream_bytes: Arc::new(AtomicU64::new(0)),
            end_written: false,
            end_state: Arc::new(AtomicU8::new(END_NOT_SENT)),
            switch_start: None,
            running_ack: None,
            precopy_time: Duration::ZERO,
            warnings: Vec::new(),
        }
    }

    fn enter(&mut self, stage: Stage) {
        self.stage = stage;
        self.em.stage(stage);
    }

    fn warn(&mut self, message: String) {
        self.em.warn(message.clone());
        self.warnings.push(message);
    }

    fn run(&mut self) -> Result<SourceSummary, Failure> {
        self.em.stage(Stage::Discovery);
        self.check_options()?;
        self.discover()?;
        self.enter(Stage::Handshake);
        self.send_header()?;
        self.handshake()?;
        self.start_writer();
        self.enter(Stage::Precopy);
        let precopy_start = Instant::now();
        let (reason, rounds) = self.precopy()?;
        let precopy_elapsed = precopy_start.elapsed();
        self.em.emit(Event::Switchover { reason, rounds });
        self.enter(Stage::Switchover);
        self.switchover()?;
        self.enter(Stage::StopCopy);
        self.stop_copy()?;
        let stop_copy_elapsed = self
            .switch_start
            .map_or(Duration::ZERO, |(t, _)| t.elapsed());
        let downtime = self.completion()?;
        self.finish_devices();
        self.close_transport();
        self.enter(Stage::Done);
        let total = self.em.start.elapsed();
        let stream_bytes = self.stream_bytes.load(Ordering::Relaxed);
        let devices: Vec<DeviceReport> = self
            .devs
            .iter()
            .map(|d| {
                let totals = d.totals.unwrap_or_default();
                DeviceReport {
                    index: d.index,
                    name: d.named.name.clone(),
                    kind: d.identity.kind.clone(),
                    features: d.features,
                    data_size_estimate: d.estimate,
                    pre_copy: totals.pre_copy,
                    stop_copy: totals.stop_copy,
                }
            })
            .collect();
        Ok(SourceSummary {
            transport: self.transport_name.clone(),
            bytes: devices
                .iter()
                .map(|d| d.pre_copy.bytes + d.stop_copy.bytes)
                .sum(),
            devices,
            precopy_rounds: rounds,
            switchover: reason,
            stream_bytes,
            total,
            precopy: if rounds == 0 {
                Duration::ZERO
            } else {
                precopy_elapsed
            },
            stop_copy: stop_copy_elapsed,
            downtime,
            throughput_bps: stream_bytes as f64 / total.as_secs_f64().max(1e-9),
            source_state: DeviceState::Stop,
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    fn check_options(&self) -> Result<(), Failure> {
        let o = self.opts;
        if self.devices.is_empty() || self.devices.len() > usize::from(MAX_DEVICES) {
            return Err(Failure::Options(format!(
                "a migration takes 1 to {MAX_DEVICES} devices, not {}",
                self.devices.len()
            )));
        }
        if o.chunk_size == 0 || o.chunk_size > DEFAULT_DECODER_MAX_CHUNK {
            return Err(Failure::Options(format!(
                "chunk size {} is not between 1 and {DEFAULT_DECODER_MAX_CHUNK} bytes",
                o.chunk_size
            )));
        }
        if o.buffers_per_device == 0 {
            return Err(Failure::Options(
                "buffers per device must be at least 1".into(),
            ));
        }
        if self.pending_sink.is_none() {
            return Err(Failure::Options(format!(
                "the source needs a writable transport; {} is not",
                self.transport_name
            )));
        }
        Ok(())
    }

    /// Every device's features, identity, state and size estimate; refuses devices that
    /// cannot migrate and (QEMU's rule) several devices unless all have P2P.
    fn discover(&mut self) -> Result<(), Failure> {
        for (i, named) in self.devices.iter().enumerate() {
            // Bounded by MAX_DEVICES in check_options.
            let index = i as u16;
            let dev_err = |op, cause| Failure::Device {
                index,
                name: named.name.clone(),
                op,
                cause,
            };
            let features = named
                .device
                .features()
                .map_err(|c| features_failure(index, &named.name, c))?;
            let identity = named
                .device
                .identity()
                .map_err(|c| dev_err(DeviceOp::Identity, c))?;
            let state = named
                .device
                .state()
                .map_err(|c| dev_err(DeviceOp::State, c))?;
            if !matches!(
                state,
                DeviceState::Running | DeviceState::RunningP2p | DeviceState::Stop
            ) {
                return Err(Failure::NotMigratable {
                    index,
                    name: named.name.clone(),
                    reason: format!(
                        "it is in {state}; a migration starts from running, running-p2p or stop"
                    ),
                });
            }
            let estimate = match named.device.data_size() {
                Ok(n) => Some(n),
                Err(e) => {
                    self.warn(format!(
                        "device {index} ({}): no data size estimate: {}",
                        named.name,
                        chain(&e)
                    ));
                    None
                }
            };
            self.em.emit(Event::Device {
                side: Side::Source,
                device: index,
                name: named.name.clone(),
                kind: identity.kind.clone(),
                version: identity.version.clone(),
                features,
                state,
                data_size: estimate,
            });
            self.devs.push(Dev {
                index,
                named,
                features,
                identity,
                original: state,
                state,
                estimate: estimate.unwrap_or(0),
                touched: false,
                reader: None,
                last_info: PrecopyInfo::default(),
                totals: None,
            });
        }
        if self.devs.len() > 1 && !self.opts.allow_non_p2p {
            let lacking: Vec<String> = self
                .devs
                .iter()
                .filter(|d| !d.features.p2p())
                .map(|d| format!("{} ({})", d.index, d.named.name))
                .collect();
            if !lacking.is_empty() {
                return Err(Failure::P2pRequired {
                    side: Side::Source,
                    devices: lacking,
                });
            }
        }
        Ok(())
    }

    fn send_header(&mut self) -> Result<(), Failure> {
        let infos: Vec<DeviceInfo> = self
            .devs
            .iter()
            .map(|d| DeviceInfo {
                name: cut(&d.named.name, MAX_NAME_LEN),
                kind: d.identity.kind.clone(),
                version: d.identity.version.clone(),
                compat: d.identity.compat.clone(),
                features: d.features,
                data_size_estimate: d.estimate,
            })
            .collect();
        let config = StreamConfig {
            producer: self.opts.producer.clone(),
            max_chunk: self.opts.chunk_size,
            created_unix_ms: unix_us() / 1000,
        };
        let Some(mut sink) = self.pending_sink.take() else {
            unreachable!("check_options requires a writer")
        };
        self.control.set_write_timeout(self.opts.io_timeout);
        match sink.start(&config, &infos) {
            Ok(n) => {
                self.writer = WriterSlot::Idle { sink };
                self.stream_bytes.fetch_add(n, Ordering::Relaxed);
                Ok(())
            }
            // Nothing went out: no stream to abort.
            Err(e @ (SinkError::Encode(_) | SinkError::NotStarted)) => {
                self.pending_sink = Some(sink);
                Err(e.failure("writing the stream header", &self.transport_name))
            }
            Err(e) => {
                self.writer = WriterSlot::Idle { sink };
                Err(e.failure("writing the stream header", &self.transport_name))
            }
        }
    }

    /// With a back channel: waits for the destination's `ready` (compatible, devices in
    /// RESUMING) before touching any source device.
    fn handshake(&mut self) -> Result<(), Failure> {
        let Some(reader) = self.ack_reader.take() else {
            return Ok(());
        };
        let tx = self.reports_tx.clone();
        self.ack_thread = Some(
            thread::Builder::new()
                .name("mig-src-acks".into())
                .spawn(move || ack_thread(reader, tx))
                .expect("spawning a thread"),
        );
        let deadline = Instant::now() + self.opts.ack_timeout;
        loop {
            match self.next(Some(deadline), "ready")? {
                Report::Ack(Ack::Ready) => return Ok(()),
                Report::Ack(other) => {
                    return Err(Failure::UnexpectedAck {
                        ack: ack_name(&other).into(),
                    })
                }
                _ => {}
            }
        }
    }

    fn start_writer(&mut self) {
        let WriterSlot::Idle { sink } = std::mem::replace(&mut self.writer, WriterSlot::Gone)
        else {
            return;
        };
        let n = self.devs.len();
        // Room for every buffer of every device plus the control messages, so that a send
        // never blocks: the pools are what bound memory.
        let (tx, rx) = mpsc::sync_channel(n * self.opts.buffers_per_device + n + 2);
        let abort = Arc::new(Mutex::new(None));
        let ctx = WriterCtx {
            sink,
            rx,
            abort: Arc::clone(&abort),
            reports: self.reports_tx.clone(),
            em: self.em.clone(),
            bytes: Arc::clone(&self.stream_bytes),
            transport: self.transport_name.clone(),
            end_state: Arc::clone(&self.end_state),
        };
        let join = thread::Builder::new()
            .name("mig-src-writer".into())
            .spawn(move || writer_thread(ctx))
            .expect("spawning a thread");
        self.writer = WriterSlot::Running { tx, abort, join };
    }

    fn writer_tx(&self) -> Option<SyncSender<WriterMsg>> {
        match &self.writer {
            WriterSlot::Running { tx, .. } => Some(tx.clone()),
            _ => None,
        }
    }

    fn spawn_reader(&mut self, i: usize, stream: DataStream) {
        let Some(tx) = self.writer_tx() else { return };
        let (cmd_tx, cmd_rx) = mpsc::channel();
        let k = self.opts.buffers_per_device;
        let chunk = self.opts.chunk_size as usize;
        let (home, pool) = mpsc::sync_channel(k);
        let memory = self.opts.buffer_memory.as_deref();
        let mut provided = 0;
        for _ in 0..k {
            let buf = PoolBuffer::provided(memory, FRAME_LEN + chunk)
                .unwrap_or_else(|| PoolBuffer::Heap(vec![0u8; FRAME_LEN + chunk]));
            provided += usize::from(buf.is_provided());
            // Cannot fail: the pool has room for k buffers and its receiver is alive.
            let _ = home.send(buf);
        }
        if memory.is_some() && provided < k {
            tracing::debug!(
                "device {i}: {} of its {k} chunk buffers come from the heap: the buffer \
                 memory had no room for them",
                k - provided
            );
        }
        let d = &self.devs[i];
        let ctx = ReaderCtx {
            index: d.index,
            name: d.named.name.clone(),
            chunk,
            checksums: self.checksums,
            // Over a link that lends the buffers to the destination, a destination that
            // stops taking data shows as buffers not coming back: fail after the time a
            // blocked socket write would have taken to fail.
            stall_timeout: if self.lends_buffers {
                self.opts.io_timeout
            } else {
                None
            },
            transport: self.transport_name.clone(),
            tx,
            home,
            pool,
            spare: None,
            reports: self.reports_tx.clone(),
            cancel: Arc::clone(&self.cancel),
        };
        let join = thread::Builder::new()
            .name(format!("mig-src-read{}", d.index))
            .spawn(move || reader_thread(ctx, stream, cmd_rx))
            .expect("spawning a thread");
        self.devs[i].reader = Some(Reader { cmd: cmd_tx, join });
    }

    fn command(&self, i: usize, cmd: ReaderCmd) -> Result<(), Failure> {
        let d = &self.devs[i];
        match &d.reader {
            Some(r) if r.cmd.send(cmd).is_ok() => Ok(()),
            _ => Err(Failure::Panicked),
        }
    }

    /// Moves device `i` to `target`, recording where it is and emitting the transition.
    fn transition(&mut self, i: usize, target: DeviceState) -> Result<Option<DataStream>, Failure> {
        let d = &mut self.devs[i];
        let mut tracked = Tracked {
            index: d.index,
            named: d.named,
            state: &mut d.state,
            touched: &mut d.touched,
        };
        tracked.transition(Side::Source, &self.em, target)
    }

    /// The next report the current stage handles; failures of any thread, the destination's
    /// `failed`/`refused` and the end of the back channel become errors.
    fn next(
        &mut self,
        deadline: Option<Instant>,
        waiting_for: &'static str,
    ) -> Result<Report, Failure> {
        loop {
            if let Some(report) = self.next_one(deadline, waiting_for)? {
                return Ok(report);
            }
        }
    }

    /// One report: `None` for reports no stage waits for.
    fn next_one(
        &mut self,
        deadline: Option<Instant>,
        waiting_for: &'static str,
    ) -> Result<Option<Report>, Failure> {
        // Wait in slices so that a cancellation is noticed while nothing else happens.
        let report = loop {
            if self.opts.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
                return Err(Failure::Cancelled);
            }
            let slice = match deadline {
                Some(d) => {
                    let left = d.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(Failure::AckTimeout {
                            waiting_for,
                            timeout: self.opts.ack_timeout,
                        });
                    }
                    left.min(CANCEL_POLL)
                }
                None => CANCEL_POLL,
            };
            match self.reports.recv_timeout(slice) {
                Ok(r) => break r,
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return Err(Failure::Panicked),
            }
        };
        match report {
            Report::ReaderFailed(f) => Err(f),
            Report::WriterFailed(f) => Err(self.prefer_destination_reason(f)),
            // After END the writer is done; before, it exits only after reporting why.
            Report::WriterExited if self.end_written => Ok(None),
            Report::WriterExited => Err(Failure::Panicked),
            Report::AbortWritten(_) => Ok(None),
            Report::Ack(ack) => {
                self.em.emit(Event::Acknowledgement {
                    side: Side::Source,
                    ack: ack.clone(),
                });
                match ack {
                    Ack::Refused { reason } => Err(Failure::Refused { reason }),
                    Ack::Failed { reason } => Err(Failure::DestinationFailed { reason }),
                    Ack::Running { .. } => {
                        self.running_ack = Some((ack.clone(), Instant::now()));
                        Ok(Some(Report::Ack(ack)))
                    }
                    Ack::Ready => Ok(Some(Report::Ack(ack))),
                }
            }
            // The destination closes the connection once it runs: the normal end.
            Report::BackChannelEnded(_) if self.running_ack.is_some() => {
                self.back_closed = true;
                Ok(None)
            }
            Report::BackChannelEnded(err) => {
                self.back_closed = true;
                Err(match err {
                    None | Some(AckError::Io(_)) => {
                        Failure::DestinationVanished { stage: self.stage }
                    }
                    Some(e) => Failure::BackChannel(e),
                })
            }
            other => Ok(Some(other)),
        }
    }

    /// A transport error is often the echo of a destination failure: if the destination's
    /// reason arrives shortly, report that instead.
    fn prefer_destination_reason(&mut self, failure: Failure) -> Failure {
        if !self.back_channel || self.back_closed || self.ack_thread.is_none() {
            return failure;
        }
        let deadline = Instant::now() + Duration::from_secs(1);
        while let Ok(report) = self
            .reports
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
        {
            match report {
                Report::Ack(Ack::Failed { reason }) => {
                    return Failure::DestinationFailed { reason }
                }
                Report::Ack(Ack::Refused { reason }) => return Failure::Refused { reason },
                Report::BackChannelEnded(_) => {
                    self.back_closed = true;
                    break;
                }
                _ => {}
            }
        }
        failure
    }

    /// Precopy rounds until the policy switches over (or gives up).
    fn precopy(&mut self) -> Result<(SwitchoverReason, u32), Failure> {
        let candidates: Vec<usize> = if self.opts.precopy {
            (0..self.devs.len())
                .filter(|&i| {
                    let d = &self.devs[i];
                    d.features.pre_copy()
                        && matches!(d.state, DeviceState::Running | DeviceState::RunningP2p)
                })
                .collect()
        } else {
            Vec::new()
        };
        if candidates.is_empty() {
            return Ok((SwitchoverReason::NoPrecopy, 0));
        }
        for &i in &candidates {
            let target = if self.devs[i].state == DeviceState::RunningP2p {
                DeviceState::PreCopyP2p
            } else {
                DeviceState::PreCopy
            };
            let stream = self.transition(i, target)?;
            let Some(stream) = stream else {
                let d = &self.devs[i];
                return Err(Failure::DeviceProtocol {
                    index: d.index,
                    name: d.named.name.clone(),
                    problem: format!("entering {target} opened no saving stream"),
                });
            };
            self.spawn_reader(i, stream);
        }
        let policy = ConvergencePolicy {
            downtime_limit: self.opts.downtime_limit,
            max_rounds: self.opts.max_precopy_rounds.max(1),
            on_limit: self.opts.on_no_convergence,
        };
        let mut total_bytes = 0u64;
        let mut busy = Duration::ZERO;
        let mut round = 0u32;
        // Rounds finished with every device's initial data sent: only these count toward
        // the round limit, since switching over earlier is what the uAPI warns against.
        let mut settled_rounds = 0u32;
        loop {
            round += 1;
            let started = Instant::now();
            for &i in &candidates {
                self.command(i, ReaderCmd::Round)?;
            }
            let mut round_bytes = 0u64;
            let mut waiting = candidates.len();
            while waiting > 0 {
                if let Report::RoundDone {
                    device,
                    bytes,
                    info,
                } = self.next(None, "")?
                {
                    self.devs[usize::from(device)].last_info = info;
                    round_bytes += bytes;
                    waiting -= 1;
                }
            }
            busy += started.elapsed();
            self.precopy_time = busy;
            total_bytes += round_bytes;
            let bandwidth = (total_bytes > 0 && !busy.is_zero())
                .then(|| total_bytes as f64 / busy.as_secs_f64());
            let (initial, dirty, remaining) = self.pending();
            if initial == 0 {
                settled_rounds += 1;
            }
            let stats = RoundStats {
                round,
                settled_rounds,
                initial_bytes: initial,
                remaining_bytes: remaining,
                bandwidth,
            };
            let decision = policy.decide(&stats);
            let predicted = ConvergencePolicy::predicted_downtime(remaining, bandwidth);
            self.em.emit(Event::PrecopyRound {
                round,
                bytes: round_bytes,
                total_bytes,
                initial_bytes: initial,
                dirty_bytes: dirty,
                remaining_bytes: remaining,
                bandwidth_bps: bandwidth,
                predicted_downtime_ms: predicted.map(crate::event::ms_f64),
                converged: policy.converged(&stats),
            });
            match decision {
                Decision::Continue => {}
                Decision::SwitchOver(reason) => return Ok((reason, round)),
                Decision::GiveUp => {
                    return Err(Failure::NotConverged {
                        rounds: round,
                        predicted,
                        limit: self.opts.downtime_limit,
                    })
                }
            }
        }
    }

    /// Sums of pending initial and dirty bytes, and the bytes the switchover is predicted to
    /// move: per device the larger of its stop-copy estimate and its pending precopy bytes.
    fn pending(&mut self) -> (u64, u64, u64) {
        let (mut initial, mut dirty, mut remaining) = (0u64, 0u64, 0u64);
        let mut warnings = Vec::new();
        for d in &self.devs {
            let info = if d.state.is_precopy() {
                d.last_info
            } else {
                PrecopyInfo::default()
            };
            initial += info.initial_bytes;
            dirty += info.dirty_bytes;
            let pending = info.initial_bytes.saturating_add(info.dirty_bytes);
            let size = match d.named.device.data_size() {
                Ok(n) => n,
                Err(e) => {
                    warnings.push(format!(
                        "device {} ({}): data size query failed, using its pending bytes: {}",
                        d.index,
                        d.named.name,
                        chain(&e)
                    ));
                    pending
                }
            };
            remaining = remaining.saturating_add(size.max(pending));
        }
        for w in warnings {
            self.warn(w);
        }
        (initial, dirty, remaining)
    }

    /// Downtime begins: every device quiesces P2P first, then each enters STOP_COPY and
    /// its final data starts flowing at once.
    fn switchover(&mut self) -> Result<(), Failure> {
        self.switch_start = Some((Instant::now(), unix_us()));
        for i in 0..self.devs.len() {
            let d = &self.devs[i];
            if !d.features.p2p() {
                continue;
            }
            let target = match d.state {
                DeviceState::Running => DeviceState::RunningP2p,
                DeviceState::PreCopy => DeviceState::PreCopyP2p,
                _ => continue,
            };
            self.transition(i, target)?;
        }
        for i in 0..self.devs.len() {
            let was_precopy = self.devs[i].state.is_precopy();
            let stream = self.transition(i, DeviceState::StopCopy)?;
            let problem = match (was_precopy, stream) {
                (true, None) => None,
                (false, Some(stream)) => {
                    self.spawn_reader(i, stream);
                    None
                }
                (true, Some(_)) => Some("pre-copy -> stop-copy opened a second saving stream"),
                (false, None) => Some("entering stop-copy opened no saving stream"),
            };
            if let Some(problem) = problem {
                let d = &self.devs[i];
                return Err(Failure::DeviceProtocol {
                    index: d.index,
                    name: d.named.name.clone(),
                    problem: problem.into(),
                });
            }
            self.command(i, ReaderCmd::StopCopy)?;
        }
        Ok(())
    }

    /// Waits for every device's data to end, then writes END.
    fn stop_copy(&mut self) -> Result<(), Failure> {
        let mut waiting = self.devs.len();
        while waiting > 0 {
            if let Report::DeviceEnded { device, totals } = self.next(None, "")? {
                let d = &mut self.devs[usize::from(device)];
                d.totals = Some(totals);
                waiting -= 1;
                self.em.emit(Event::DeviceDone {
                    side: Side::Source,
                    device,
                    name: d.named.name.clone(),
                    pre_copy_bytes: totals.pre_copy.bytes,
                    stop_copy_bytes: totals.stop_copy.bytes,
                });
            }
        }
        for d in &mut self.devs {
            if let Some(r) = d.reader.take() {
                drop(r.cmd);
                let _ = r.join.join();
            }
        }
        match &self.writer {
            WriterSlot::Running { tx, .. } => {
                tx.send(WriterMsg::End).map_err(|_| Failure::Panicked)?
            }
            _ => return Err(Failure::Panicked),
        }
        loop {
            if let Report::WriterDone = self.next(None, "")? {
                self.end_written = true;
                return Ok(());
            }
        }
    }

    /// With a back channel: waits for the destination to run its devices.
    fn completion(&mut self) -> Result<Option<Downtime>, Failure> {
        if !self.back_channel {
            return Ok(None);
        }
        self.enter(Stage::Completion);
        let deadline = Instant::now() + self.opts.ack_timeout;
        while self.running_ack.is_none() {
            if let Report::Ack(other @ Ack::Ready) = self.next(Some(deadline), "running")? {
                return Err(Failure::UnexpectedAck {
                    ack: ack_name(&other).into(),
                });
            }
        }
        let (
            Some((
                Ack::Running {
                    running_unix_us, ..
                },
                arrived,
            )),
            Some((t0, t0_unix)),
        ) = (&self.running_ack, self.switch_start)
        else {
            return Ok(None);
        };
        Ok(Some(if self.opts.shared_clock {
            Downtime {
                duration: Duration::from_micros(running_unix_us.saturating_sub(t0_unix)),
                clock: DowntimeClock::SharedClock,
            }
        } else {
            Downtime {
                duration: arrived.duration_since(t0),
                clock: DowntimeClock::AckReceipt,
            }
        }))
    }

    /// Success: the source devices leave STOP_COPY for STOP. A failure here is only a
    /// warning: the destination runs, so the source must not be restarted or reset.
    fn finish_devices(&mut self) {
        for i in 0..self.devs.len() {
            if self.devs[i].state == DeviceState::Stop {
                continue;
            }
            if let Err(f) = self.transition(i, DeviceState::Stop) {
                self.warn(format!("leaving the source stopped: {}", chain(&f)));
            }
        }
    }

    fn close_transport(&mut self) {
        self.control.shutdown(Shutdown::Both);
        if let WriterSlot::Running { join, .. } =
            std::mem::replace(&mut self.writer, WriterSlot::Gone)
        {
            let _ = join.join();
        }
        if let Some(t) = self.ack_thread.take() {
            let _ = t.join();
        }
    }

    /// Rollback: stops the threads, returns every touched device to its original state (or
    /// leaves it stopped when the outcome is unknown), and tells the destination.
    fn fail(&mut self, failure: Failure) -> MigrationError {
        tracing::debug!("source failed in {}: {}", self.stage, chain(&failure));
        self.cancel.store(true, Ordering::SeqCst);
        let outcome_unknown = self.end_reached_transport()
            && self.back_channel
            && matches!(
                failure,
                Failure::DestinationVanished { .. }
                    | Failure::AckTimeout { .. }
                    | Failure::BackChannel(_)
            );
        let mut devices = Vec::new();
        for i in 0..self.devs.len() {
            let rec = if outcome_unknown {
                self.leave_stopped(i)
            } else {
                self.restore(i)
            };
            self.em.emit(Event::Recovery {
                side: Side::Source,
                device: rec.device,
                name: rec.name.clone(),
                action: rec.action.clone(),
                state: rec.state,
            });
            devices.push(rec);
        }
        let peer_notified = if outcome_unknown {
            false
        } else {
            self.abort_stream(&chain(&failure))
        };
        self.stop_threads();
        let outcome = if devices
            .iter()
            .any(|d| matches!(d.action, RecoveryAction::Failed { .. }))
        {
            RecoveryOutcome::Incomplete
        } else if outcome_unknown {
            RecoveryOutcome::LeftStopped
        } else if devices
            .iter()
            .all(|d| d.action == RecoveryAction::Untouched)
        {
            RecoveryOutcome::Untouched
        } else {
            RecoveryOutcome::RolledBack
        };
        MigrationError {
            side: Side::Source,
            stage: self.stage,
            failure: Box::new(failure),
            recovery: Recovery {
                side: Side::Source,
                outcome,
                devices,
                peer_notified,
            },
            peer_recovery: None,
        }
    }

    /// Whether all of END reached the transport (so the destination may have completed and
    /// be running), waiting out a write of END in progress.
    fn end_reached_transport(&self) -> bool {
        let deadline = Instant::now() + self.opts.io_timeout.unwrap_or(Duration::from_secs(60));
        loop {
            match self.end_state.load(Ordering::SeqCst) {
                END_WRITING if Instant::now() < deadline => {
                    thread::sleep(Duration::from_millis(1));
                }
                // Still writing at the deadline: assume the worst, never run twice.
                END_WRITING | END_WRITTEN => return true,
                _ => return false,
            }
        }
    }

    /// Returns device `i` to its original state; resets it if that fails.
    fn restore(&mut self, i: usize) -> DeviceRecovery {
        let d = &mut self.devs[i];
        let dev = &d.named.device;
        let action = if !d.touched {
            RecoveryAction::Untouched
        } else {
            match dev.set_state(d.original) {
                Ok(_) => RecoveryAction::Restored,
                Err(e) => {
                    tracing::warn!("device {}: {}; resetting it", d.index, chain(&e));
                    match dev.reset() {
                        Err(e) => RecoveryAction::Failed {
                            error: format!("reset failed: {}", chain(&e)),
                        },
                        Ok(()) if d.original == DeviceState::Running => RecoveryAction::Reset,
                        Ok(()) => match dev.set_state(d.original) {
                            Ok(_) => RecoveryAction::Reset,
                            Err(e) => RecoveryAction::Failed {
                                error: format!("reset, but {}", chain(&e)),
                            },
                        },
                    }
                }
            }
        };
        let state = dev.state().ok();
        if let Some(s) = state {
            d.state = s;
        }
        DeviceRecovery {
            device: d.index,
            name: d.named.name.clone(),
            action,
            state,
        }
    }

    /// The destination may be running: stop the source device, keep its state, never
    /// restart it.
    fn leave_stopped(&mut self, i: usize) -> DeviceRecovery {
        let d = &mut self.devs[i];
        let action = match d.named.device.set_state(DeviceState::Stop) {
            Ok(_) => RecoveryAction::Stopped,
            Err(e) => RecoveryAction::Failed {
                error: format!("could not stop it: {}", chain(&e)),
            },
        };
        let state = d.named.device.state().ok();
        DeviceRecovery {
            device: d.index,
            name: d.named.name.clone(),
            action,
            state,
        }
    }

    /// Writes ABORT if the stream is still open and the transport works; returns whether it
    /// was written.
    fn abort_stream(&mut self, reason: &str) -> bool {
        match &mut self.writer {
            WriterSlot::Idle { sink } => sink.abort(reason),
            // After END nothing may follow; a finished writer cannot write anyway.
            WriterSlot::Running { join, .. }
                if self.end_state.load(Ordering::SeqCst) != END_NOT_SENT || join.is_finished() =>
            {
                false
            }
            WriterSlot::Running { abort, .. } => {
                *abort.lock().unwrap_or_else(|p| p.into_inner()) = Some(reason.to_owned());
                let deadline = Instant::now() + Duration::from_secs(2);
                loop {
                    match self
                        .reports
                        .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    {
                        Ok(Report::AbortWritten(ok)) => return ok,
                        Ok(Report::WriterExited) => return false,
                        Ok(_) => {}
                        Err(_) => return false,
                    }
                }
            }
            WriterSlot::Gone => false,
        }
    }

    /// Ends every thread; a writer stuck on a peer that stopped reading is unblocked by
    /// shutting the socket down.
    fn stop_threads(&mut self) {
        for d in &mut self.devs {
            if let Some(r) = d.reader.take() {
                drop(r.cmd);
                let _ = r.join.join();
            }
        }
        match std::mem::replace(&mut self.writer, WriterSlot::Gone) {
            WriterSlot::Running { tx, join, .. } => {
                drop(tx);
                if !join.is_finished() {
                    // The writer ends within its poll interval unless blocked in a write.
                    thread::sleep(Duration::from_millis(50));
                }
                if !join.is_finished() {
                    self.control.shutdown(Shutdown::Both);
                }
                let _ = join.join();
            }
            WriterSlot::Idle { sink } => drop(sink),
            WriterSlot::Gone => {}
        }
        // The destination reads our ABORT, then sees the end of the stream.
        self.control.shutdown(Shutdown::Both);
        if let Some(t) = self.ack_thread.take() {
            let _ = t.join();
        }
    }
}

/// A failed features query: "not supported" answers (the kernel's ENOTTY for a device
/// without migration, EOPNOTSUPP) mean the device cannot migrate at all.
pub(crate) fn features_failure(
    index: u16,
    name: &str,
    cause: vfio_mig_device::DeviceError,
) -> Failure {
    use vfio_mig_device::Errno;
    if matches!(cause.errno(), Errno::ENOTTY | Errno::EOPNOTSUPP) {
        Failure::NotMigratable {
            index,
            name: name.to_owned(),
            reason: format!("it does not support migration ({})", chain(&cause)),
        }
    } else {
        Failure::Device {
            index,
            name: name.to_owned(),
            op: DeviceOp::Features,
            cause,
        }
    }
}

/// `s` cut to at most `max` bytes at a character boundary.
fn cut(s: &str, max: usize) -> String {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_owned()
}

fn ack_name(ack: &Ack) -> &'static str {
    match ack {
        Ack::Ready => "ready",
        Ack::Refused { .. } => "refused",
        Ack::Running { .. } => "running",
        Ack::Failed { .. } => "failed",
    }
}

fn ack_thread(mut acks: Box<dyn AckSource>, tx: Sender<Report>) {
    loop {
        match acks.next() {
            Ok(Some(ack)) => {
                if tx.send(Report::Ack(ack)).is_err() {
                    return;
                }
            }
            Ok(None) => {
                let _ = tx.send(Report::BackChannelEnded(None));
                return;
            }
            Err(e) => {
                let _ = tx.send(Report::BackChannelEnded(Some(e)));
                return;
            }
        }
    }
}

struct WriterCtx {
    sink: Box<dyn FrameSink>,
    rx: Receiver<WriterMsg>,
    abort: Arc<Mutex<Option<String>>>,
    reports: Sender<Report>,
    em: Emitter,
    bytes: Arc<AtomicU64>,
    transport: String,
    end_state: Arc<AtomicU8>,
}

fn writer_thread(mut w: WriterCtx) {
    let result = writer_loop(&mut w);
    match result {
        Ok(()) => {}
        Err(f) => {
            let _ = w.reports.send(Report::WriterFailed(f));
        }
    }
    let _ = w.reports.send(Report::WriterExited);
}

fn writer_loop(w: &mut WriterCtx) -> Result<(), Failure> {
    let mut meter = ProgressMeter::new();
    let mut stage = Stage::Precopy;
    loop {
        let abort = w.abort.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(reason) = abort {
            let ok = w.sink.abort(&reason);
            let _ = w.reports.send(Report::AbortWritten(ok));
            return Ok(());
        }
        let msg = match w.rx.recv_timeout(Duration::from_millis(20)) {
            Ok(m) => m,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        };
        let failure = |e: SinkError| e.failure("writing the stream", &w.transport);
        match msg {
            WriterMsg::Chunk {
                device,
                phase,
                payload,
                crc,
            } => {
                let n = w.sink.data(device, phase, payload, crc).map_err(failure)?;
                let total = w.bytes.fetch_add(n, Ordering::Relaxed) + n;
                stage = match phase {
                    Phase::PreCopy => Stage::Precopy,
                    Phase::StopCopy => Stage::StopCopy,
                };
                meter.update(&w.em, stage, total, false);
            }
            WriterMsg::DeviceEnd { device } => {
                let (totals, n) = w.sink.end_device(device).map_err(failure)?;
                w.bytes.fetch_add(n, Ordering::Relaxed);
                let _ = w.reports.send(Report::DeviceEnded { device, totals });
            }
            WriterMsg::End => {
                w.end_state.store(END_WRITING, Ordering::SeqCst);
                let n = match w.sink.end() {
                    Ok(n) => n,
                    Err(e) => {
                        // An I/O error may have let part of END through, never all of it:
                        // the destination cannot complete either way.
                        let state = match e {
                            SinkError::Io(_) => END_FAILED,
                            _ => END_NOT_SENT,
                        };
                        w.end_state.store(state, Ordering::SeqCst);
                        return Err(failure(e));
                    }
                };
                w.end_state.store(END_WRITTEN, Ordering::SeqCst);
                w.sink
                    .flush()
                    .map_err(|e| Failure::transport("writing the stream", &w.transport, e))?;
                let total = w.bytes.fetch_add(n, Ordering::Relaxed) + n;
                meter.update(&w.em, stage, total, true);
                let _ = w.reports.send(Report::WriterDone);
                return Ok(());
            }
        }
    }
}

struct ReaderCtx {
    index: u16,
    name: String,
    chunk: usize,
    /// Compute each payload's CRC (for a byte stream; an in-process link needs none).
    checksums: bool,
    /// How long to wait for a free buffer before the destination counts as stalled.
    stall_timeout: Option<Duration>,
    transport: String,
    tx: SyncSender<WriterMsg>,
    home: SyncSender<PoolBuffer>,
    pool: Receiver<PoolBuffer>,
    spare: Option<PoolBuffer>,
    reports: Sender<Report>,
    cancel: Arc<AtomicBool>,
}

/// Why a reader stopped early.
enum Stop {
    /// The migration is being torn down; nothing to report.
    Cancelled,
    Failed(Box<Failure>),
}

impl ReaderCtx {
    fn device_failure(&self, op: DeviceOp, cause: vfio_mig_device::DeviceError) -> Stop {
        Stop::Failed(Box::new(Failure::Device {
            index: self.index,
            name: self.name.clone(),
            op,
            cause,
        }))
    }

    fn protocol(&self, problem: &str) -> Stop {
        Stop::Failed(Box::new(Failure::DeviceProtocol {
            index: self.index,
            name: self.name.clone(),
            problem: problem.to_owned(),
        }))
    }

    /// A free buffer, waiting while all are in flight.
    fn buffer(&mut self) -> Result<PoolBuffer, Stop> {
        if let Some(b) = self.spare.take() {
            return Ok(b);
        }
        let started = Instant::now();
        loop {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(Stop::Cancelled);
            }
            match self.pool.recv_timeout(Duration::from_millis(50)) {
                Ok(b) => return Ok(b),
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Err(Stop::Cancelled),
            }
            if let Some(limit) = self.stall_timeout.filter(|&l| started.elapsed() >= l) {
                let cause = io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("the destination took no data for {} s", limit.as_secs_f64()),
                );
                return Err(Stop::Failed(Box::new(Failure::transport(
                    "writing the stream",
                    &self.transport,
                    cause,
                ))));
            }
        }
    }

    /// One read into a buffer; data is sent to the writer.
    fn read_once(&mut self, stream: &mut DataStream, phase: Phase) -> Result<ReadOutcome, Stop> {
        if self.cancel.load(Ordering::Relaxed) {
            return Err(Stop::Cancelled);
        }
        let mut buf = self.buffer()?;
        let outcome = match stream.read(&mut buf[FRAME_LEN..FRAME_LEN + self.chunk]) {
            Ok(o) => o,
            Err(e) => {
                self.spare = Some(buf);
                return Err(self.device_failure(DeviceOp::Read, e));
            }
        };
        match outcome {
            ReadOutcome::Data(n) => {
                let crc = if self.checksums {
                    payload_crc(&buf[FRAME_LEN..FRAME_LEN + n])
                } else {
                    0
                };
                let msg = WriterMsg::Chunk {
                    device: self.index,
                    phase,
                    payload: Payload::new(buf, FRAME_LEN, n, Some(self.home.clone())),
                    crc,
                };
                self.tx.send(msg).map_err(|_| Stop::Cancelled)?;
            }
            ReadOutcome::NothingNow | ReadOutcome::End => self.spare = Some(buf),
        }
        Ok(outcome)
    }

    /// A precopy round: reads until the device has nothing now, or until as many bytes as
    /// it had pending at the start (so a device dirtying faster than we read still ends
    /// its round), then reports the pending bytes left.
    fn round(&mut self, stream: &mut DataStream) -> Result<Report, Stop> {
        let before = stream
            .precopy_info()
            .map_err(|e| self.device_failure(DeviceOp::PrecopyInfo, e))?;
        let cap = before
            .initial_bytes
            .saturating_add(before.dirty_bytes)
            .max(self.chunk as u64);
        let mut bytes = 0u64;
        while bytes < cap {
            match self.read_once(stream, Phase::PreCopy)? {
                ReadOutcome::Data(n) => bytes += n as u64,
                ReadOutcome::NothingNow => break,
                ReadOutcome::End => {
                    return Err(self.protocol("its saving stream ended during pre-copy"))
                }
            }
        }
        let info = stream
            .precopy_info()
            .map_err(|e| self.device_failure(DeviceOp::PrecopyInfo, e))?;
        Ok(Report::RoundDone {
            device: self.index,
            bytes,
            info,
        })
    }

    /// Reads the stop-copy data to its end and has the writer close the device's data.
    fn drain(&mut self, stream: &mut DataStream) -> Result<(), Stop> {
        loop {
            match self.read_once(stream, Phase::StopCopy)? {
                ReadOutcome::Data(_) => {}
                ReadOutcome::End => break,
                ReadOutcome::NothingNow => {
                    return Err(self.protocol("its saving stream reported nothing-now in stop-copy"))
                }
            }
        }
        self.tx
            .send(WriterMsg::DeviceEnd { device: self.index })
            .map_err(|_| Stop::Cancelled)
    }
}

fn reader_thread(mut ctx: ReaderCtx, mut stream: DataStream, cmds: Receiver<ReaderCmd>) {
    for cmd in cmds {
        let result = match cmd {
            ReaderCmd::Round => ctx
                .round(&mut stream)
                .and_then(|r| ctx.reports.send(r).map_err(|_| Stop::Cancelled)),
            ReaderCmd::StopCopy => ctx.drain(&mut stream),
        };
        match result {
            Ok(()) => {}
            Err(Stop::Cancelled) => return,
            Err(Stop::Failed(f)) => {
                if !ctx.cancel.load(Ordering::Relaxed) {
                    let _ = ctx.reports.send(Report::ReaderFailed(*f));
                }
                return;
            }
        }
    }
}
