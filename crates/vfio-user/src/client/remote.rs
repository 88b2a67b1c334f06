//! [`MigrationDevice`] for a device behind a vfio-user server.
//!
//! vfio-user returns no data fd: the client works out locally, from the state machine, which
//! SET opened a data session (the last arc of `vfio_mig_fsm::path` from the state it was in),
//! exactly as the server does, and hands out a [`RemoteStream`] speaking MIG_DATA_READ /
//! MIG_DATA_WRITE. Each session has a generation: a stream whose session ended (by a state
//! change or a reset) fails with `ENODEV` without asking the server, as the kernel's data fd
//! does.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use vfio_mig_device::{
    DataStream, DeviceError, DeviceIdentity, IovaRange, MigrationDevice, MigrationStream,
    PrecopyInfo, ReadOutcome, StreamDirection, TransitionError,
};
use vfio_mig_fsm::{path, session_effect, session_in, SessionEffect};
use vfio_mig_uapi::{DeviceState, Errno, MigrationFeatures};

use super::{Client, ClientError};
use crate::codec::{self, FeatureData, FEATURE_GET};
use crate::extension::{decode_precopy_info, FEATURE_PRECOPY_INFO, PRECOPY_INFO_LEN};

/// PCI config space (`VFU_PCI_DEV_CFG_REGION_IDX`), read for a standard server's identity.
const CONFIG_REGION: u32 = 7;

/// What the client knows about the remote device's migration, behind one lock.
#[derive(Debug, Default)]
struct Tracking {
    /// MIGRATION GET, once read (it does not change over a device's life).
    features: Option<MigrationFeatures>,
    /// The state after the last GET or SET; `None` when unknown (an error left it unclear).
    state: Option<DeviceState>,
    /// Generation of the newest session; every opened session gets a new one.
    generation: u64,
    /// The open session, if any: its generation and direction.
    session: Option<(u64, StreamDirection)>,
    /// Identity, once known.
    identity: Option<DeviceIdentity>,
    /// Page size of the last DMA_LOGGING_START (sent again with STOP).
    logging_page_size: u64,
}

/// A device behind a vfio-user server, as a [`MigrationDevice`].
///
/// One `RemoteDevice` per connection: it tracks the device's state and data session on
/// the assumption that nobody else drives the device meanwhile (a vfio-user server serves
/// one client at a time).
#[derive(Debug)]
pub struct RemoteDevice {
    client: Arc<Client>,
    tracking: Arc<Mutex<Tracking>>,
}

impl RemoteDevice {
    /// The device behind `client`.
    pub fn new(client: Arc<Client>) -> Self {
        RemoteDevice {
            client,
            tracking: Arc::default(),
        }
    }

    /// Connects to the server at `path` (default options) and wraps the device.
    pub fn connect(path: impl AsRef<std::path::Path>) -> Result<Self, ClientError> {
        Client::connect(path).map(|c| RemoteDevice::new(Arc::new(c)))
    }

    /// The connection, for region access, DMA mapping and interrupts.
    pub fn client(&self) -> &Arc<Client> {
        &self.client
    }

    fn track(&self) -> MutexGuard<'_, Tracking> {
        // Tracking is plain data updated after each exchange; a panic elsewhere cannot leave
        // it inconsistent with the server in a way later GETs do not repair.
        self.tracking.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn features_tracked(&self, t: &mut Tracking) -> Result<MigrationFeatures, DeviceError> {
        if let Some(f) = t.features {
            return Ok(f);
        }
        let flags = self
            .client
            .migration_flags()
            .map_err(|e| e.into_device_error("MIGRATION GET"))?;
        let features = MigrationFeatures::from_bits(flags).map_err(|e| {
            DeviceError::new(Errno::EPROTO, "server reported invalid migration flags")
                .with_source(e)
        })?;
        t.features = Some(features);
        Ok(features)
    }

    fn state_tracked(&self, t: &mut Tracking) -> Result<DeviceState, DeviceError> {
        let state = self.client.mig_state();
        t.state = state.as_ref().ok().copied();
        state.map_err(|e| e.into_device_error("MIG_DEVICE_STATE GET"))
    }

    /// The identity a standard server implies: PCI vendor and device id from config space.
    fn pci_identity(&self) -> DeviceIdentity {
        let mut ids = [0u8; 4];
        match self.client.region_read(CONFIG_REGION, 0, &mut ids) {
            Ok(()) => DeviceIdentity {
                kind: format!(
                    "pci:{:04x}:{:04x}",
                    u16::from_le_bytes([ids[0], ids[1]]),
                    u16::from_le_bytes([ids[2], ids[3]])
                ),
                version: String::new(),
                compat: Vec::new(),
            },
            Err(e) => {
                tracing::debug!(error = %e, "no readable config space; identity is generic");
                DeviceIdentity {
                    kind: "vfio-user".into(),
                    version: String::new(),
                    compat: Vec::new(),
                }
            }
        }
    }

    fn set_state_tracked(
        &self,
        t: &mut Tracking,
        target: DeviceState,
    ) -> Result<Option<DataStream>, TransitionError> {
        let unknown = |cause: DeviceError| TransitionError {
            requested: target,
            failed_arc: None,
            reached: None,
            cause,
        };
        if matches!(t.session, Some((_, StreamDirection::Resuming))) {
            if let Err(e) = self.client.flush_writes() {
                if !matches!(e, ClientError::Remote { .. }) {
                    t.state = None;
                }
                return Err(TransitionError {
                    requested: target,
                    failed_arc: None,
                    reached: t.state,
                    cause: e.into_device_error(
                        "a MIG_DATA_WRITE of this resuming session was refused; state unchanged \
                         (ask again to change it anyway)",
                    ),
                });
            }
        }
        let features = self.features_tracked(t).map_err(unknown)?;
        let current = match t.state {
            Some(s) => s,
            None => self.state_tracked(t).map_err(unknown)?,
        };
        if let Err(e) = self.client.set_mig_state(target) {
            let reached = self.state_tracked(t).ok();
            if let (Some((_, dir)), Some(at)) = (t.session, reached) {
                if session_in(at) != Some(dir) {
                    t.session = None;
                }
            }
            // Which arc failed: the one leaving the state the device stopped in, if that
            // state is on the path the server walks.
            let failed_arc = reached.and_then(|at| {
                let p = path(current, target, features).ok()?;
                let arc = p.arcs().find(|&(from, _)| from == at);
                arc
            });
            let cause = e.into_device_error(format!("MIG_DEVICE_STATE SET {target}"));
            return Err(TransitionError {
                requested: target,
                failed_arc,
                reached,
                cause,
            });
        }
        t.state = Some(target);
        match effect_of(current, target, features) {
            SessionEffect::Opens(direction) => {
                t.generation += 1;
                t.session = Some((t.generation, direction));
                Ok(Some(Box::new(RemoteStream {
                    client: Arc::clone(&self.client),
                    tracking: Arc::clone(&self.tracking),
                    generation: t.generation,
                    direction,
                })))
            }
            SessionEffect::Keeps | SessionEffect::None
                if t.session.map(|(_, d)| Some(d)) == Some(session_in(target)) =>
            {
                Ok(None)
            }
            _ => {
                t.session = None;
                Ok(None)
            }
        }
    }
}

/// Whether a SET from `from` to `to` opens a session, and which; `Keeps`/`Ends`/`None`
/// otherwise. From the local path when the state machine allows the request, else from
/// where it ended (a server whose state machine differs from the kernel's).
fn effect_of(from: DeviceState, to: DeviceState, features: MigrationFeatures) -> SessionEffect {
    if from == to {
        return SessionEffect::None;
    }
    if let Ok(p) = path(from, to, features) {
        return p
            .arcs()
            .last()
            .map_or(SessionEffect::None, |(a, b)| session_effect(a, b));
    }
    match (session_in(from), session_in(to)) {
        (a, Some(b)) if a != Some(b) => SessionEffect::Opens(b),
        (Some(a), Some(b)) if a == b => SessionEffect::Keeps,
        (Some(a), None) => SessionEffect::Ends(a),
        _ => SessionEffect::None,
    }
}

impl MigrationDevice for RemoteDevice {
    fn features(&self) -> Result<MigrationFeatures, DeviceError> {
        let mut t = self.track();
        self.features_tracked(&mut t)
    }

    fn identity(&self) -> Result<DeviceIdentity, DeviceError> {
        let mut t = self.track();
        if let Some(id) = &t.identity {
            return Ok(id.clone());
        }
        let announced = match &self.client.negotiated().extension {
            Some(ext) => ext.device_identity().map_err(|e| {
                DeviceError::new(Errno::EPROTO, "server announced a malformed identity")
                    .with_source(e)
            })?,
            None => None,
        };
        let id = match announced {
            Some(id) => id,
            None => self.pci_identity(),
        };
        t.identity = Some(id.clone());
        Ok(id)
    }

    fn state(&self) -> Result<DeviceState, DeviceError> {
        let mut t = self.track();
        self.state_tracked(&mut t)
    }

    fn set_state(&self, target: DeviceState) -> Result<Option<DataStream>, TransitionError> {
        let mut t = self.track();
        let before = t.session;
        let result = self.set_state_tracked(&mut t, target);
        if t.session != before {
            // Data read ahead for a session that is over must not reach anyone.
            self.client.discard_pipeline();
        }
        result
    }
    fn data_size(&self) -> Result<u64, DeviceError> {
        match self.client.mig_data_size() {
            Ok(n) => Ok(n),
            Err(ClientError::Remote { errno, .. })
                if [
                    Errno::ENOTTY,
                    Errno::EINVAL,
                    Errno::EOPNOTSUPP,
                    Errno::ENOSYS,
                ]
                .contains(&errno) =>
            {
                Err(DeviceError::new(
                    Errno::ENOTTY,
                    format!("server does not answer MIG_DATA_SIZE ({errno})"),
                ))
            }
            Err(e) => Err(e.into_device_error("MIG_DATA_SIZE GET")),
        }
    }

    fn dma_logging_start(&self, page_size: u64, ranges: &[IovaRange]) -> Result<u64, DeviceError> {
        let wire: Vec<codec::IovaRange> = ranges
            .iter()
            .map(|r| codec::IovaRange {
                iova: r.iova,
                length: r.length,
            })
            .collect();
        self.client
            .dma_logging_start(page_size, &wire)
            .map_err(|e| e.into_device_error("DMA_LOGGING_START"))?;
        self.track().logging_page_size = page_size;
        Ok(page_size)
    }

    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        self.client
            .dma_logging_report(iova, length, page_size, bitmap)
            .map_err(|e| e.into_device_error("DMA_LOGGING_REPORT"))
    }

    fn dma_logging_stop(&self) -> Result<(), DeviceError> {
        let page_size = self.track().logging_page_size;
        self.client
            .dma_logging_stop(page_size)
            .map_err(|e| e.into_device_error("DMA_LOGGING_STOP"))
    }

    fn reset(&self) -> Result<(), DeviceError> {
        let mut t = self.track();
        let result = self.client.device_reset();
        // Whatever the answer, no stream of the old session may be used again.
        t.session = None;
        t.generation += 1;
        self.client.discard_pipeline();
        match result {
            Ok(()) => {
                t.state = Some(DeviceState::Running);
                Ok(())
            }
            Err(e) => {
                t.state = None;
                Err(e.into_device_error("DEVICE_RESET"))
            }
        }
    }
}

/// A data session of a [`RemoteDevice`]: MIG_DATA_READ (saving) or MIG_DATA_WRITE
/// (resuming), each chunk straight between the caller's buffer and the socket; or, for a
/// buffer inside the [`DataArena`](super::DataArena) attached to the client, through that
/// shared memory with the server (no byte on the socket).
pub struct RemoteStream {
    client: Arc<Client>,
    tracking: Arc<Mutex<Tracking>>,
    generation: u64,
    direction: StreamDirection,
}

impl fmt::Debug for RemoteStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RemoteStream")
            .field("generation", &self.generation)
            .field("direction", &self.direction)
            .finish_non_exhaustive()
    }
}

impl RemoteStream {
    /// The device's state if this stream's session is still open and goes `direction`.
    fn live(&self, direction: StreamDirection) -> Result<Option<DeviceState>, DeviceError> {
        let t = self.tracking.lock().unwrap_or_else(|p| p.into_inner());
        if t.session != Some((self.generation, self.direction)) {
            return Err(DeviceError::new(
                Errno::ENODEV,
                "the data session of this stream has ended",
            ));
        }
        if direction != self.direction {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!("{:?} operation on a {:?} stream", direction, self.direction),
            ));
        }
        Ok(t.state)
    }

    /// After an exchange failed without an answer the device's state is no longer certain
    /// (an error reply leaves it where it was).
    fn note_failure(&self, e: &ClientError) {
        if !matches!(e, ClientError::Remote { .. }) {
            self.tracking
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .state = None;
        }
    }
}

impl MigrationStream for RemoteStream {
    fn direction(&self) -> StreamDirection {
        self.direction
    }

    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, DeviceError> {
        let state = self.live(StreamDirection::Saving)?;
        if buf.is_empty() {
            return Err(DeviceError::new(Errno::EINVAL, "read into an empty buffer"));
        }
        // In STOP_COPY the next chunk is asked for before this one is consumed, so the
        // server produces it while the caller works; PRE_COPY reads stay one at a time
        // (precopy info must not miss data already fetched).
        let ahead = state == Some(DeviceState::StopCopy) && self.client.negotiated().pipelining;
        match self.client.read_mig_data(buf, ahead) {
            Ok(0) if state == Some(DeviceState::StopCopy) => Ok(ReadOutcome::End),
            Ok(0) => Ok(ReadOutcome::NothingNow),
            Ok(n) => Ok(ReadOutcome::Data(n)),
            Err(e) => {
                self.note_failure(&e);
                Err(e.into_device_error("MIG_DATA_READ"))
            }
        }
    }

    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        self.live(StreamDirection::Resuming)?;
        if buf.is_empty() {
            return Ok(0);
        }
        // Posted: the reply is collected after the next chunk went out, so the server stores
        // this chunk while the next one travels. A refusal is reported by the next write, or
        // by the next state change, which will not leave RESUMING over it.
        let posted = self.client.negotiated().pipelining;
        self.client.write_mig_data(buf, posted).map_err(|e| {
            self.note_failure(&e);
            e.into_device_error("MIG_DATA_WRITE")
        })
    }

    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError> {
        let state = self.live(StreamDirection::Saving)?;
        if !self.client.negotiated().precopy_info() {
            return Err(DeviceError::new(
                Errno::ENOTTY,
                "the server does not offer precopy info",
            ));
        }
        if !matches!(state, Some(DeviceState::PreCopy | DeviceState::PreCopyP2p)) {
            return Err(DeviceError::new(
                Errno::EINVAL,
                "precopy info exists only in PRE_COPY states",
            ));
        }
        let mut request =
            codec::DeviceFeature::new(FEATURE_GET, FEATURE_PRECOPY_INFO, FeatureData::None);
        request.argsz = (codec::FEATURE_HEADER + PRECOPY_INFO_LEN) as u32;
        self.client
            .feature(request, |reply| match reply.data {
                FeatureData::Raw(bytes) => Ok(decode_precopy_info(bytes)?),
                _ => Err(super::bad_reply(
                    codec::Command::DeviceFeature,
                    "precopy info reply without data",
                )),
            })
            .map_err(|e| e.into_device_error("PRECOPY_INFO GET"))
    }
}
