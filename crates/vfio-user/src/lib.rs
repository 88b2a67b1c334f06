//! vfio-user protocol: sans-IO codec, server hosting any device, and a client implementing MigrationDevice.
#![deny(unsafe_code)] // allowed only in server::memory (mmap of DMA windows)

pub mod client;
pub mod codec;
pub mod extension;
pub mod server;
pub mod socket;
