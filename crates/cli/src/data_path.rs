//! How device data moves between vfio-user servers and the engines' chunk buffers.
//!
//! With `--data-path auto` (the default) the engines' buffers live in one shared memory
//! arena that is registered with every server offering vfio-mig's shared data buffer
//! extension: a server writes the state it saves straight into a buffer, and a server
//! resuming a device reads it straight from one. Between two such servers in one
//! `migrate`, this process touches no byte of the state. Servers without the extension
//! (libvfio-user's) get the bytes in MIG_DATA_READ / MIG_DATA_WRITE messages, as with
//! `--data-path messages`.

use std::fmt::Write as _;
use std::sync::Arc;

use clap::{Args, ValueEnum};
use vfio_mig_orchestrator::{BufferMemory, ChunkBuffer};
use vfio_mig_stream::FRAME_LEN;
use vfio_mig_vfio_user::client::{Client, DataArena, DataCounters};
use vfio_mig_vfio_user::extension::MAX_DATA_BUFFER;

use crate::address::OpenDevice;
use crate::progress::bytes;

/// Where device data travels between a vfio-user server and this process.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum DataPath {
    /// Shared memory with the servers that offer it, messages with the others.
    #[default]
    Auto,
    /// Always in MIG_DATA_READ / MIG_DATA_WRITE messages.
    Messages,
}

/// The `--data-path` option.
#[derive(Clone, Copy, Debug, Args)]
pub struct DataPathArg {
    /// How device data travels between a vfio-user server and this process: `auto` uses
    /// shared memory with servers that offer it (vfio-mig's), `messages` always sends it in
    /// MIG_DATA_READ/WRITE messages.
    #[arg(long, value_enum, value_name = "PATH", default_value_t = DataPath::Auto)]
    pub data_path: DataPath,
}

/// The vfio-user connections of `devices`, named by address, for [`attach`].
pub fn clients_of<'a>(
    devices: impl IntoIterator<Item = &'a OpenDevice>,
) -> Vec<(String, &'a Client)> {
    devices
        .into_iter()
        .filter_map(|d| d.client.as_deref().map(|c| (d.address.to_string(), c)))
        .collect()
}

/// An arena as the engines' buffer memory.
#[derive(Debug)]
struct ArenaMemory(Arc<DataArena>);

impl BufferMemory for ArenaMemory {
    fn allocate(&self, len: usize) -> Option<Box<dyn ChunkBuffer>> {
        self.0
            .allocate(len)
            .map(|b| Box::new(b) as Box<dyn ChunkBuffer>)
    }
}

/// Makes an arena for `buffers` chunk buffers of up to `chunk` bytes each and registers it
/// with every server among `clients` (named by their device address) that offers it. Returns the memory for the
/// engines' buffer pools, or `None` when no server took it (or `path` says messages).
///
/// A server that refuses the registration gets a warning on stderr and stays on messages: the migration
/// works either way.
pub fn attach(
    clients: &[(String, &Client)],
    buffers: usize,
    chunk: usize,
    path: DataPath,
) -> anyhow::Result<Option<Arc<dyn BufferMemory>>> {
    if path == DataPath::Messages {
        return Ok(None);
    }
    let offering: Vec<&(String, &Client)> = clients
        .iter()
        .filter(|(_, c)| c.negotiated().shared_data())
        .collect();
    if offering.is_empty() {
        return Ok(None);
    }
    // Every buffer rounded up to whole pages, as the arena hands them out.
    let each = (chunk + FRAME_LEN).next_multiple_of(4096);
    let size = buffers.saturating_mul(each);
    if size as u64 > MAX_DATA_BUFFER {
        eprintln!(
            "warning: {} of buffers do not fit one shared arena; device data goes in messages",
            bytes(size as u64)
        );
        return Ok(None);
    }
    let arena = DataArena::new(size)
        .map_err(|e| anyhow::Error::new(e).context("creating the shared data arena"))?;
    let mut attached = 0;
    for (name, client) in offering {
        match client.attach_data_arena(&arena) {
            Ok(true) => attached += 1,
            Ok(false) => {}
            Err(e) => eprintln!(
                "warning: {name} refused the shared data buffer ({e}); its data goes in messages"
            ),
        }
    }
    Ok((attached > 0).then(|| Arc::new(ArenaMemory(arena)) as Arc<dyn BufferMemory>))
}

/// Device data moved so far between the servers of `devices` and this process, by path.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DataPathTotals {
    /// Bytes through shared memory.
    pub shared_bytes: u64,
    /// Bytes in messages.
    pub message_bytes: u64,
}

impl DataPathTotals {
    /// The sums over `devices` (devices without a vfio-user connection count nothing).
    pub fn of(devices: &[OpenDevice]) -> DataPathTotals {
        Self::of_clients(devices.iter().filter_map(|d| d.client.as_deref()))
    }

    /// The sums over `clients`.
    pub fn of_clients<'a>(clients: impl Iterator<Item = &'a Client>) -> DataPathTotals {
        clients
            .map(|c| c.data_counters())
            .fold(DataPathTotals::default(), |t, c: DataCounters| {
                DataPathTotals {
                    shared_bytes: t.shared_bytes + c.shared,
                    message_bytes: t.message_bytes + c.by_message,
                }
            })
    }

    /// `  data path (SIDE): X through shared memory, Y in messages` and a newline.
    pub fn describe(&self, side: &str) -> String {
        let mut text = String::new();
        let _ = writeln!(
            text,
            "  data path ({side}): {} through shared memory, {} in messages",
            bytes(self.shared_bytes),
            bytes(self.message_bytes)
        );
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn totals_read_well() {
        let t = DataPathTotals {
            shared_bytes: 3 << 20,
            message_bytes: 0,
        };
        let line = t.describe("source");
        assert!(line.starts_with("  data path (source): 3"), "{line}");
        assert!(
            line.contains("through shared memory, 0 B in messages"),
            "{line}"
        );
    }
}
