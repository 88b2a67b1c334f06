//! Emulated migratable devices: membuf, a small register device, and a fault-injecting wrapper.
#![forbid(unsafe_code)]
