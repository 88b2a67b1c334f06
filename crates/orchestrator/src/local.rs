//! Both ends in one process, and the file-based cold migration.

use std::path::Path;
use std::thread;

use crate::destination::{migrate_in, run_destination, DestinationOptions};
use crate::error::{Failure, MigrationError, Recovery, RecoveryAction, RecoveryOutcome};
use crate::event::{DestinationSummary, LocalSummary, Side, SourceSummary, Stage};
use crate::link;
use crate::source::{migrate_out, run_source, NamedDevice, SourceOptions};
use crate::transport::Transport;

/// Migrates `source` devices into `destination` devices (paired by order) with both engines
/// in this process, with the downtime measured on one clock.
///
/// The engines are those of a networked migration, connected by an in-process link
/// instead of a socket: the source's records and the buffers its device readers filled
/// are handed to the destination by ownership, so no byte is encoded, copied, checksummed
/// or passed through the kernel between them. Memory stays bounded by the source's buffer
/// pools (devices x buffers per device x chunk size).
///
/// Those buffers come from [`SourceOptions::buffer_memory`] when it is set: the source
/// devices read into that memory and the destination devices are written from it.
/// [`DestinationOptions::buffer_memory`] is not used (the destination engine takes no
/// buffers of its own here), so one provider can serve both option sets.
///
/// On failure the error is the source engine's (it carries the destination's reason when the
/// destination refused or failed), with the destination's recovery in
/// [`MigrationError::peer_recovery`].
pub fn migrate_local(
    source: &[NamedDevice],
    destination: &[NamedDevice],
    source_opts: &SourceOptions,
    destination_opts: &DestinationOptions,
) -> Result<LocalSummary, MigrationError> {
    // Every record in flight fits: the header and DEVICE records, the chunks of every
    // buffer of every device, their DEVICE_END records, and END or ABORT.
    let capacity = source
        .len()
        .saturating_mul(source_opts.buffers_per_device.saturating_add(2))
        .saturating_add(2);
    let (src_end, dst_end) = link::pair(capacity, destination_opts.max_chunk);
    let opts = SourceOptions {
        shared_clock: true,
        ..source_opts.clone()
    };
    // Payloads arrive in the source's buffers: a pool of the destination's own would
    // only hold provided memory that nothing uses.
    let destination_opts = &DestinationOptions {
        buffer_memory: None,
        ..destination_opts.clone()
    };
    thread::scope(|s| {
        let dst = thread::Builder::new()
            .name("mig-destination".into())
            .spawn_scoped(s, || {
                run_destination(destination, dst_end, destination_opts)
            })
            .expect("spawning a thread");
        let src = run_source(source, src_end, &opts);
        let dst = dst.join().unwrap_or_else(|_| {
            Err(MigrationError {
                side: Side::Destination,
                stage: Stage::Discovery,
                failure: Box::new(Failure::Panicked),
                recovery: Recovery {
                    side: Side::Destination,
                    outcome: RecoveryOutcome::Incomplete,
                    devices: Vec::new(),
                    peer_notified: false,
                },
                peer_recovery: None,
            })
        });
        combine(src, dst)
    })
}

fn combine(
    src: Result<SourceSummary, MigrationError>,
    dst: Result<DestinationSummary, MigrationError>,
) -> Result<LocalSummary, MigrationError> {
    match (src, dst) {
        (Ok(source), Ok(destination)) => Ok(LocalSummary {
            source,
            destination,
        }),
        (Err(mut e), Err(d)) => {
            e.peer_recovery = Some(d.recovery);
            Err(e)
        }
        // The source succeeds only once the destination reported running, and the
        // destination fails only after telling the source; either half alone is the story.
        (Err(e), Ok(_)) | (Ok(_), Err(e)) => Err(e),
    }
}

/// A failure before any device was touched.
fn untouched(side: Side, devices: &[NamedDevice], failure: Failure) -> MigrationError {
    MigrationError {
        side,
        stage: Stage::Discovery,
        failure: Box::new(failure),
        recovery: Recovery {
            side,
            outcome: RecoveryOutcome::Untouched,
            devices: devices
                .iter()
                .enumerate()
                .map(|(i, d)| crate::error::DeviceRecovery {
                    device: i as u16,
                    name: d.name.clone(),
                    action: RecoveryAction::Untouched,
                    state: d.device.state().ok(),
                })
                .collect(),
            peer_notified: false,
        },
        peer_recovery: None,
    }
}

/// Saves `devices` into a new file at `path` (cold migration): every device is stopped,
/// its whole state written through STOP_COPY, and left **stopped**, so that the file holds
/// the state the device keeps (restart it with a state change to RUNNING, or load the file
/// elsewhere). Precopy is not used whatever `opts` says. On failure the devices are back in
/// their original state and the partial file is removed.
pub fn save(
    devices: &[NamedDevice],
    path: &Path,
    opts: &SourceOptions,
) -> Result<SourceSummary, MigrationError> {
    let transport = Transport::create_file(path).map_err(|e| {
        untouched(
            Side::Source,
            devices,
            Failure::transport("creating the file", &format!("file:{}", path.display()), e),
        )
    })?;
    let opts = SourceOptions {
        precopy: false,
        ..opts.clone()
    };
    migrate_out(devices, transport, &opts).inspect_err(|_| {
        // A partial stream is of no use; its ABORT record would say so anyway.
        let _ = std::fs::remove_file(path);
    })
}

/// Loads the stream saved at `path` into `devices` (paired by order); they run the loaded
/// state on success and are reset on failure (nothing half-loaded runs).
pub fn load(
    path: &Path,
    devices: &[NamedDevice],
    opts: &DestinationOptions,
) -> Result<DestinationSummary, MigrationError> {
    let transport = Transport::open_file(path).map_err(|e| {
        untouched(
            Side::Destination,
            devices,
            Failure::transport("opening the file", &format!("file:{}", path.display()), e),
        )
    })?;
    migrate_in(devices, transport, opts)
}
