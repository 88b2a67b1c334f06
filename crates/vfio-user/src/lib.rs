//! vfio-user protocol: sans-IO codec, server hosting any device, and a client implementing MigrationDevice.
#![forbid(unsafe_code)]

pub mod client;
pub mod codec;
pub mod extension;
pub mod socket;
