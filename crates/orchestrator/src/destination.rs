//! The destination engine: reads the stream, refuses incompatible devices before touching
//! them, writes each device's state through its own writer thread, then validates and starts
//! the devices; on any failure resets every device it touched and tells the source.

use std::fmt;
use std::net::Shutdown;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use vfio_mig_device::{write_all, DataStream, DeviceState, MigrationFeatures};
use vfio_mig_stream::{check_compatibility, DecoderLimits, DeviceInfo, DeviceTotals};

use crate::ack::Ack;
use crate::buffers::{BufferMemory, PoolBuffer};
use crate::error::{
    chain, DeviceOp, DeviceRecovery, Failure, MigrationError, Recovery, RecoveryAction,
    RecoveryOutcome,
};
use crate::event::{
    unix_us, DestinationSummary, DeviceReport, Emitter, Event, EventSink, ProgressMeter, Side,
    Stage,
};
use crate::frames::{AckSink, Buffers, FrameSource, Payload, Record};
use crate::source::{Cancel, NamedDevice, CANCEL_POLL};
use crate::tracked::Tracked;
use crate::transport::{Control, DestinationEnd, Transport};

/// How the destination engine receives.
#[derive(Clone)]
pub struct DestinationOptions {
    /// Accept several devices even if some lack P2P (see
    /// [`crate::SourceOptions::allow_non_p2p`]). Default false.
    pub allow_non_p2p: bool,
    /// The largest chunk size a stream header may announce; the engine buffers at most one
    /// record plus `buffers_per_device` chunks per device, so this bounds its memory.
    /// Default 4 MiB (vfio-mig sources send 1 MiB chunks).
    pub max_chunk: u32,
    /// Chunk buffers per device between the stream reader and the device's writer.
    /// Default 4.
    pub buffers_per_device: usize,
    /// Socket read and write timeout: a source that goes silent this long fails the
    /// migration. Default 60 s; `None` waits forever.
    pub io_timeout: Option<Duration>,
    /// After a failure, how long to keep reading (and discarding) the stream so that the
    /// source reads our answer rather than a connection reset. Default 5 s.
    pub drain_timeout: Duration,
    /// Where events go.
    pub events: Option<EventSink>,
    /// Cancels the migration from another thread (a signal handler): the connection is shut
    /// down and the destination devices are reset, as after any failure.
    pub cancel: Option<Cancel>,
    /// Where the chunk buffers come from instead of the heap. Once the devices are accepted,
    /// `devices x buffers_per_device` buffers of the stream's chunk size (its header's,
    /// at most `max_chunk`) are taken from it, payloads are read into them and the devices
    /// written from them; they are dropped when the migration ends. A buffer it has no room
    /// for comes from the heap. Not used by [`crate::migrate_local`], whose payloads arrive
    /// in the source's buffers. Default `None`: all from the heap.
    pub buffer_memory: Option<Arc<dyn BufferMemory>>,
}

impl Default for DestinationOptions {
    fn default() -> Self {
        DestinationOptions {
            allow_non_p2p: false,
            max_chunk: 4 << 20,
            buffers_per_device: 4,
            io_timeout: Some(Duration::from_secs(60)),
            drain_timeout: Duration::from_secs(5),
            events: None,
            cancel: None,
            buffer_memory: None,
        }
    }
}

impl fmt::Debug for DestinationOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DestinationOptions")
            .field("allow_non_p2p", &self.allow_non_p2p)
            .field("max_chunk", &self.max_chunk)
            .field("buffers_per_device", &self.buffers_per_device)
            .field("io_timeout", &self.io_timeout)
            .field("drain_timeout", &self.drain_timeout)
            .field("events", &self.events.is_some())
            .field("cancel", &self.cancel)
            .field("buffer_memory", &self.buffer_memory)
            .finish()
    }
}

/// Migrates a stream from `transport` into `devices` (matched to the stream's devices by
/// order): the destination side of a live migration, or a `load` from a file.
///
/// Compatibility (device count, kind, version, compatibility data, the P2P rule) is checked
/// before any device is touched; a refusal leaves them untouched. Then every device enters
/// RESUMING, takes its data, and on END is validated (RESUMING -> STOP), moved to
/// RUNNING_P2P (all of them first) and RUNNING. On any failure after the devices were
/// touched, each of them is reset, so nothing half-loaded runs. The source is told the
/// outcome over the back channel when there is one.
pub fn migrate_in(
    devices: &[NamedDevice],
    transport: Transport,
    opts: &DestinationOptions,
) -> Result<DestinationSummary, MigrationError> {
    let limits = DecoderLimits {
        max_chunk: opts.max_chunk,
    };
    run_destination(devices, transport.into_destination_end(limits), opts)
}

/// [`migrate_in`] over any end: a byte transport's or an in-process link's.
pub(crate) fn run_destination(
    devices: &[NamedDevice],
    end: DestinationEnd,
    opts: &DestinationOptions,
) -> Result<DestinationSummary, MigrationError> {
    let DestinationEnd {
        source,
        acks,
        control,
        description,
    } = end;
    let mut engine = DestinationEngine {
        devices,
        devs: Vec::new(),
        opts,
        em: Emitter::new(Side::Destination, opts.events.clone()),
        stage: Stage::Discovery,
        transport_name: description,
        control,
        acks,
        producer: String::new(),
        chunk_limit: 0,
        stream_bytes: 0,
        pool: None,
        warnings: Vec::new(),
    };
    let Some(mut source) = source else {
        let failure = Failure::Options(format!(
            "the destination needs a readable transport; {} is not",
            engine.transport_name
        ));
        return Err(engine.fail(failure, None));
    };
    let finished = AtomicBool::new(false);
    let watched_control = engine.control.clone();
    std::thread::scope(|scope| {
        // A cancellation shuts the connection down, which ends a read blocked on the source.
        if let Some(cancel) = &opts.cancel {
            let finished = &finished;
            scope.spawn(move || {
                while !finished.load(Ordering::SeqCst) {
                    if cancel.is_cancelled() {
                        watched_control.shutdown(Shutdown::Both);
                        return;
                    }
                    thread::sleep(CANCEL_POLL);
                }
            });
        }
        let result = engine.run(&mut *source);
        finished.store(true, Ordering::SeqCst);
        match result {
            Ok(summary) => Ok(summary),
            Err(failure) => {
                let failure = if opts.cancel.as_ref().is_some_and(Cancel::is_cancelled) {
                    Failure::Cancelled
                } else {
                    failure
                };
                Err(engine.fail(failure, Some(&mut *source)))
            }
        }
    })
}

struct DevWriter {
    /// Chunks in stream order.
    tx: Option<SyncSender<Payload>>,
    join: JoinHandle<Result<(u64, DataStream), Failure>>,
}

struct Dev<'a> {
    index: u16,
    named: &'a NamedDevice,
    features: MigrationFeatures,
    kind: String,
    state: DeviceState,
    touched: bool,
    stream_info: Option<DeviceInfo>,
    writer: Option<DevWriter>,
    /// The resuming stream, kept open until the device validated its state.
    stream: Option<DataStream>,
    totals: DeviceTotals,
}

struct DestinationEngine<'a> {
    devices: &'a [NamedDevice],
    devs: Vec<Dev<'a>>,
    opts: &'a DestinationOptions,
    em: Emitter,
    stage: Stage,
    transport_name: String,
    control: Control,
    acks: Option<Box<dyn AckSink>>,
    producer: String,
    /// The largest chunk the stream's header announced.
    chunk_limit: u32,
    stream_bytes: u64,
    /// Chunk buffers shared by all devices (created once the devices are accepted).
    pool: Option<BufferPool>,
    warnings: Vec<String>,
}

/// Where free chunk buffers are returned, and where they are taken from.
type BufferPool = (SyncSender<PoolBuffer>, Receiver<PoolBuffer>);

impl<'a> DestinationEngine<'a> {
    fn enter(&mut self, stage: Stage) {
        self.stage = stage;
        self.em.stage(stage);
    }

    fn run(&mut self, source: &mut dyn FrameSource) -> Result<DestinationSummary, Failure> {
        self.em.stage(Stage::Discovery);
        if self.opts.buffers_per_device == 0 || self.opts.max_chunk == 0 {
            return Err(Failure::Options(
                "buffers per device and the chunk limit must be at least 1".into(),
            ));
        }
        self.control.set_read_timeout(self.opts.io_timeout);
        self.control.set_write_timeout(self.opts.io_timeout);
        let mut meter = ProgressMeter::new();
        let end_at = loop {
            let record = source.next(self);
            self.stream_bytes = source.bytes();
            if let Some(end_at) = self.on_record(record?)? {
                break end_at;
            }
            if self.stage == Stage::Receiving {
                meter.update(&self.em, Stage::Receiving, self.stream_bytes, false);
            }
        };
        meter.update(&self.em, Stage::Receiving, self.stream_bytes, true);
        self.resume(end_at)
    }

    /// Acts on one record; returns the time END arrived, if this was END.
    fn on_record(&mut self, record: Record) -> Result<Option<Instant>, Failure> {
        match record {
            Record::Header(h) => {
                self.producer = h.producer;
                self.chunk_limit = h.max_chunk;
                if usize::from(h.device_count) != self.devices.len() {
                    return Err(Failure::DeviceCount {
                        stream: h.device_count,
                        local: self.devices.len(),
                    });
                }
            }
            Record::Device { index, info } => {
                let last = usize::from(index) + 1 == self.devices.len();
                self.describe(index, info)?;
                if last {
                    self.accept()?;
                }
            }
            Record::Data { device, payload } => self.deliver(usize::from(device), payload)?,
            Record::DeviceEnd { device, totals } => {
                let d = &mut self.devs[usize::from(device)];
                d.totals = totals;
                if let Some(w) = d.writer.as_mut() {
                    // Closing the channel ends the device's writer once it has written
                    // everything.
                    w.tx = None;
                }
            }
            Record::End => return Ok(Some(Instant::now())),
            Record::Abort { reason } => return Err(Failure::SourceAborted { reason }),
        }
        Ok(None)
    }

    /// A free buffer from the pool shared by the devices' writers; fails if a writer died
    /// (it will not give its buffers back).
    fn take_buffer(&mut self) -> Result<PoolBuffer, Failure> {
        loop {
            let Some((_, pool)) = &self.pool else {
                return Err(Failure::Panicked);
            };
            match pool.recv_timeout(Duration::from_millis(50)) {
                Ok(buf) => return Ok(buf),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => return Err(Failure::Panicked),
            }
            let dead = self.devs.iter().position(|d| {
                d.writer
                    .as_ref()
                    .is_some_and(|w| w.tx.is_some() && w.join.is_finished())
            });
            if let Some(i) = dead {
                return Err(self.writer_failure(i));
            }
        }
    }

    /// Records the stream's description of device `index` and reads the local device's.
    fn describe(&mut self, index: u16, info: DeviceInfo) -> Result<(), Failure> {
        let named = &self.devices[usize::from(index)];
        let dev_err = |op, cause| Failure::Device {
            index,
            name: named.name.clone(),
            op,
            cause,
        };
        let features = named
            .device
            .features()
            .map_err(|c| crate::source::features_failure(index, &named.name, c))?;
        let identity = named
            .device
            .identity()
            .map_err(|c| dev_err(DeviceOp::Identity, c))?;
        let state = named
            .device
            .state()
            .map_err(|c| dev_err(DeviceOp::State, c))?;
        self.em.emit(Event::Device {
            side: Side::Destination,
            device: index,
            name: named.name.clone(),
            kind: identity.kind.clone(),
            version: identity.version.clone(),
            features,
            state,
            data_size: None,
        });
        let local = DeviceInfo {
            name: String::new(),
            kind: identity.kind.clone(),
            version: identity.version,
            compat: identity.compat,
            features,
            data_size_estimate: 0,
        };
        let compatible =
            check_compatibility(&info, &local).map_err(|cause| Failure::Incompatible {
                index,
                name: named.name.clone(),
                cause,
            })?;
        if !matches!(
            state,
            DeviceState::Running | DeviceState::RunningP2p | DeviceState::Stop
        ) {
            return Err(Failure::NotMigratable {
                index,
                name: named.name.clone(),
                reason: format!(
                    "it is in {state}; it must be running, running-p2p or stop to resume a state"
                ),
            });
        }
        self.em.emit(Event::Compatible {
            device: index,
            name: named.name.clone(),
            detail: compatible.to_string(),
        });
        self.devs.push(Dev {
            index,
            named,
            features,
            kind: identity.kind,
            state,
            touched: false,
            stream_info: Some(info),
            writer: None,
            stream: None,
            totals: DeviceTotals::default(),
        });
        Ok(())
    }

    /// Every device described and compatible: apply the P2P rule, move every device to
    /// RESUMING with its writer thread, and tell the source to send.
    fn accept(&mut self) -> Result<(), Failure> {
        if self.devs.len() > 1 && !self.opts.allow_non_p2p {
            let lacking: Vec<String> = self
                .devs
                .iter()
                .filter(|d| !d.features.p2p())
                .map(|d| format!("{} ({})", d.index, d.named.name))
                .collect();
            if !lacking.is_empty() {
                return Err(Failure::P2pRequired {
                    side: Side::Destination,
                    devices: lacking,
                });
            }
        }
        self.enter(Stage::Handshake);
        let buffers = self.devs.len() * self.opts.buffers_per_device;
        let (home, pool) = mpsc::sync_channel(buffers);
        // Every payload of this stream fits: DATA bodies are at most the header's chunk
        // size (the decoder checked it), and other records are not read into buffers.
        let len = self.chunk_limit as usize;
        let memory = self.opts.buffer_memory.as_deref();
        let mut provided = 0;
        for _ in 0..buffers {
            // A heap buffer grows to the chunk size on first use (never, when payloads
            // arrive in the source's buffers over an in-process link).
            let buf = PoolBuffer::provided(memory, len).unwrap_or_default();
            provided += usize::from(buf.is_provided());
            // Cannot fail: the pool has room for every buffer and its receiver is alive.
            let _ = home.send(buf);
        }
        if memory.is_some() && provided < buffers {
            tracing::debug!(
                "{} of the {buffers} chunk buffers come from the heap: the buffer memory had \
                 no room for them",
                buffers - provided
            );
        }
        for i in 0..self.devs.len() {
            let stream = self.transition(i, DeviceState::Resuming)?;
            let d = &self.devs[i];
            let Some(stream) = stream else {
                return Err(Failure::DeviceProtocol {
                    index: d.index,
                    name: d.named.name.clone(),
                    problem: "entering resuming opened no stream".into(),
                });
            };
            let (tx, rx) = mpsc::sync_channel(self.opts.buffers_per_device);
            let (index, name) = (d.index, d.named.name.clone());
            let join = thread::Builder::new()
                .name(format!("mig-dst-write{index}"))
                .spawn(move || device_writer(index, name, stream, rx))
                .expect("spawning a thread");
            self.devs[i].writer = Some(DevWriter { tx: Some(tx), join });
        }
        self.pool = Some((home, pool));
        self.send_ack(&Ack::Ready)?;
        self.enter(Stage::Receiving);
        Ok(())
    }

    fn send_ack(&mut self, ack: &Ack) -> Result<(), Failure> {
        let Some(w) = self.acks.as_mut() else {
            return Ok(());
        };
        w.send(ack)
            .map_err(|e| Failure::transport("answering the source", &self.transport_name, e))?;
        self.em.emit(Event::Acknowledgement {
            side: Side::Destination,
            ack: ack.clone(),
        });
        Ok(())
    }

    /// Hands a chunk to its device's writer.
    fn deliver(&mut self, i: usize, payload: Payload) -> Result<(), Failure> {
        let sent = match self.devs[i].writer.as_ref().and_then(|w| w.tx.as_ref()) {
            Some(tx) => tx.send(payload).is_ok(),
            None => false,
        };
        if sent {
            Ok(())
        } else {
            // The writer stopped: it failed.
            Err(self.writer_failure(i))
        }
    }

    fn writer_failure(&mut self, i: usize) -> Failure {
        let d = &mut self.devs[i];
        match d.writer.take().map(|w| w.join.join()) {
            Some(Ok(Err(f))) => f,
            Some(Ok(Ok((_, stream)))) => {
                d.stream = Some(stream);
                Failure::DeviceProtocol {
                    index: d.index,
                    name: d.named.name.clone(),
                    problem: "its writer stopped before the device's data ended".into(),
                }
            }
            _ => Failure::Panicked,
        }
    }

    fn transition(&mut self, i: usize, target: DeviceState) -> Result<Option<DataStream>, Failure> {
        let d = &mut self.devs[i];
        let mut tracked = Tracked {
            index: d.index,
            named: d.named,
            state: &mut d.state,
            touched: &mut d.touched,
        };
        tracked.transition(Side::Destination, &self.em, target)
    }

    /// END arrived: wait for every writer, validate every device (RESUMING -> STOP), then
    /// all to RUNNING_P2P, then all to RUNNING (the reverse of the source's stop), and tell
    /// the source.
    fn resume(&mut self, end_at: Instant) -> Result<DestinationSummary, Failure> {
        self.enter(Stage::Resume);
        for i in 0..self.devs.len() {
            let Some(w) = self.devs[i].writer.take() else {
                continue;
            };
            drop(w.tx);
            match w.join.join() {
                Ok(Ok((bytes, stream))) => {
                    let d = &mut self.devs[i];
                    d.stream = Some(stream);
                    self.em.emit(Event::DeviceDone {
                        side: Side::Destination,
                        device: d.index,
                        name: d.named.name.clone(),
                        pre_copy_bytes: d.totals.pre_copy.bytes,
                        stop_copy_bytes: bytes.saturating_sub(d.totals.pre_copy.bytes),
                    });
                }
                Ok(Err(f)) => return Err(f),
                Err(_) => return Err(Failure::Panicked),
            }
        }
        for i in 0..self.devs.len() {
            self.transition(i, DeviceState::Stop)?;
            self.devs[i].stream = None;
        }
        let validated = end_at.elapsed();
        let validated_unix_us = unix_us();
        for i in 0..self.devs.len() {
            if self.devs[i].features.p2p() {
                self.transition(i, DeviceState::RunningP2p)?;
            }
        }
        for i in 0..self.devs.len() {
            self.transition(i, DeviceState::Running)?;
        }
        let running_unix_us = unix_us();
        let resume = end_at.elapsed();
        let ack = Ack::Running {
            validated_unix_us,
            running_unix_us,
            resume_us: resume.as_micros() as u64,
        };
        if let Err(f) = self.send_ack(&ack) {
            // The devices run; the source, without an answer, keeps its devices stopped.
            let message = format!(
                "the destination runs, but the source was not told: {}",
                chain(&f)
            );
            self.em.warn(message.clone());
            self.warnings.push(message);
        }
        self.control.shutdown(Shutdown::Both);
        self.enter(Stage::Done);
        let devices: Vec<DeviceReport> = self
            .devs
            .iter()
            .map(|d| DeviceReport {
                index: d.index,
                name: d.named.name.clone(),
                kind: d.kind.clone(),
                features: d.features,
                data_size_estimate: d.stream_info.as_ref().map_or(0, |i| i.data_size_estimate),
                pre_copy: d.totals.pre_copy,
                stop_copy: d.totals.stop_copy,
            })
            .collect();
        Ok(DestinationSummary {
            transport: self.transport_name.clone(),
            producer: self.producer.clone(),
            bytes: devices
                .iter()
                .map(|d| d.pre_copy.bytes + d.stop_copy.bytes)
                .sum(),
            devices,
            stream_bytes: self.stream_bytes,
            total: self.em.start.elapsed(),
            validation: validated,
            resume,
            warnings: std::mem::take(&mut self.warnings),
        })
    }

    /// Resets every touched device, tells the source, and drains the stream so the source
    /// reads the answer.
    fn fail(&mut self, failure: Failure, source: Option<&mut dyn FrameSource>) -> MigrationError {
        tracing::debug!("destination failed in {}: {}", self.stage, chain(&failure));
        // Closing the channels ends the writers; a reset below ends their sessions too.
        for d in &mut self.devs {
            if let Some(w) = d.writer.as_mut() {
                w.tx = None;
            }
        }
        let mut devices = Vec::new();
        for (i, named) in self.devices.iter().enumerate() {
            let index = i as u16;
            let touched = self.devs.get(i).is_some_and(|d| d.touched);
            let (action, state) = if touched {
                let action = match named.device.reset() {
                    Ok(()) => RecoveryAction::Reset,
                    Err(e) => RecoveryAction::Failed {
                        error: format!("reset failed: {}", chain(&e)),
                    },
                };
                (action, named.device.state().ok())
            } else {
                (RecoveryAction::Untouched, named.device.state().ok())
            };
            self.em.emit(Event::Recovery {
                side: Side::Destination,
                device: index,
                name: named.name.clone(),
                action: action.clone(),
                state,
            });
            devices.push(DeviceRecovery {
                device: index,
                name: named.name.clone(),
                action,
                state,
            });
        }
        for d in &mut self.devs {
            d.stream = None;
            if let Some(w) = d.writer.take() {
                let _ = w.join.join();
            }
        }
        let reason = chain(&failure);
        let any_touched = devices
            .iter()
            .any(|d| d.action != RecoveryAction::Untouched);
        let ack = if any_touched {
            Ack::Failed { reason }
        } else {
            Ack::Refused { reason }
        };
        let peer_notified = self.acks.is_some() && self.send_ack(&ack).is_ok();
        if peer_notified {
            if let Some(source) = source {
                if !matches!(
                    failure,
                    Failure::Transport { .. } | Failure::SourceAborted { .. }
                ) {
                    // Until the source closes the stream (it does as soon as it reads our
                    // answer) or the drain timeout passes.
                    source.drain(&self.control, Instant::now() + self.opts.drain_timeout);
                }
            }
        }
        self.control.shutdown(Shutdown::Both);
        let outcome = if devices
            .iter()
            .any(|d| matches!(d.action, RecoveryAction::Failed { .. }))
        {
            RecoveryOutcome::Incomplete
        } else if any_touched {
            RecoveryOutcome::Reset
        } else {
            RecoveryOutcome::Untouched
        };
        MigrationError {
            side: Side::Destination,
            stage: self.stage,
            failure: Box::new(failure),
            recovery: Recovery {
                side: Side::Destination,
                outcome,
                devices,
                peer_notified,
            },
            peer_recovery: None,
        }
    }
}

/// One device's writer: takes chunks in stream order and writes them into the device's
/// resuming stream; returns the stream (kept open until validation) and the bytes written.
fn device_writer(
    index: u16,
    name: String,
    mut stream: DataStream,
    rx: Receiver<Payload>,
) -> Result<(u64, DataStream), Failure> {
    let mut bytes = 0u64;
    for payload in rx {
        write_all(&mut *stream, payload.bytes()).map_err(|cause| Failure::Device {
            index,
            name: name.clone(),
            op: DeviceOp::Write,
            cause,
        })?;
        bytes += payload.len() as u64;
        // Dropping the payload returns its buffer to its pool: ours, or the source's.
    }
    Ok((bytes, stream))
}

impl Buffers for DestinationEngine<'_> {
    fn ready(&self) -> bool {
        self.pool.is_some()
    }

    fn take(&mut self) -> Result<Payload, Failure> {
        let buf = self.take_buffer()?;
        let home = self.pool.as_ref().map(|(home, _)| home.clone());
        Ok(Payload::new(buf, 0, 0, home))
    }
}
