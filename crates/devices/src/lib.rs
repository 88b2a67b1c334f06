//! Emulated migratable devices, so that everything in vfio-mig runs and is tested with no
//! hardware:
//!
//! * [`membuf`]: a device whose state is a large buffer that keeps changing while it runs,
//!   with the BAR0 register block of the architecture contract (magic, size, digest,
//!   generation, dirty rate) and real DMA writes for dirty logging;
//! * [`register`]: the smallest complete device (a few hundred bytes of registers,
//!   STOP_COPY only), written as the example to copy;
//! * [`fault`]: a wrapper that makes any device fail a chosen arc, read or write, or stall;
//! * [`lvu_sample`]: a device shaped like libvfio-user's sample server (timer interrupt,
//!   DMA by message, a mappable BAR), for interoperability tests with its sample client;
//! * [`spec`]: the `membuf:size=256M,...` device specifications of the command line.
#![forbid(unsafe_code)]

pub mod fault;
pub mod lvu_sample;
pub mod membuf;
pub mod register;
pub mod spec;
