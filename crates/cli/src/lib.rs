//! The `vfio-mig` command-line tool: argument parsing, output and wiring. No protocol logic
//! lives here; commands call into the library crates.
//!
//! Layout: [`app`] owns the top-level parser, the global flags and the error/exit-code policy;
//! [`commands`] has one module per command, each exposing its clap arguments and a `run`
//! function that [`commands::Command::run`] dispatches to.
#![forbid(unsafe_code)]

pub mod address;
pub mod app;
pub mod commands;
pub mod data_path;
pub mod exit;
mod interrupt;
pub mod progress;

pub use app::main;
