//! The vfio-mig live-migration engine, over [`vfio_mig_device::MigrationDevice`] and a byte
//! transport only, so that it migrates emulated devices, vfio-user devices and kernel VFIO
//! devices alike.
//!
//! * [`migrate_out`] (source) and [`migrate_in`] (destination) run the two ends over a
//!   [`Transport`]: a file (no back channel: [`save`]/[`load`]), a UNIX socket or TCP
//!   (bidirectional: the destination acknowledges, see [`ack`]).
//! * [`migrate_local`] runs both ends in one process, connected by an in-process link that
//!   hands records and payload buffers over by ownership (no copy, no checksum).
//!
//! The source: discovery (features in one query per device, the P2P rule for several
//! devices), the stream header and DEVICE records, the destination's compatibility verdict
//! before any source device is touched, precopy rounds driven by a [`ConvergencePolicy`],
//! switchover (all devices quiesce P2P, then each enters STOP_COPY), every device's stream
//! read to its end in parallel (one reader thread per device, one writer on the transport,
//! bounded buffers), END, and the destination's `running`. The destination: compatibility
//! check before touching anything, RESUMING, one writer thread per device, then on END
//! validation (RESUMING -> STOP), RUNNING_P2P for all, RUNNING for all.
//!
//! Any failure before the destination runs rolls back: source devices return to the state
//! they had (RUNNING), destination devices are reset, and the [`MigrationError`] says what
//! failed, where, and what was done. Progress is reported as [`Event`]s (serializable, one
//! JSON object each) and a final summary.
//!
//! Memory is bounded whatever the device state size: about `devices x buffers_per_device x
//! chunk_size` on each side, plus one record in the destination's decoder. Those chunk
//! buffers can come from memory the caller provides ([`BufferMemory`], e.g. memory shared
//! with the processes serving the devices) instead of the heap.
#![forbid(unsafe_code)]

pub mod ack;
mod address;
mod buffers;
mod destination;
mod error;
mod event;
mod frames;
mod link;
mod local;
mod policy;
mod source;
mod tracked;
mod transport;

pub use address::{Address, AddressError};
pub use buffers::{BufferMemory, ChunkBuffer};
pub use destination::{migrate_in, DestinationOptions};
pub use error::{
    DeviceOp, DeviceRecovery, Failure, MigrationError, Recovery, RecoveryAction, RecoveryOutcome,
};
pub use event::{
    DestinationSummary, DeviceReport, Downtime, DowntimeClock, Event, EventSink, LocalSummary,
    Side, SourceSummary, Stage,
};
pub use local::{load, migrate_local, save};
pub use policy::{
    ConvergencePolicy, Decision, NonConvergence, RoundStats, SwitchoverReason, MAX_INITIAL_ROUNDS,
};
pub use source::{migrate_out, Cancel, NamedDevice, SourceOptions, CANCEL_POLL};
pub use transport::{Listener, Transport};
