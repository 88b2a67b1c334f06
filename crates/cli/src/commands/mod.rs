//! One module per `vfio-mig` command.
//!
//! To add a command `foo`: create `foo.rs` (or `foo/mod.rs`) with a clap `Args` (or
//! `Subcommand`) type and `pub fn run(args, ctx: &Context, out: &mut dyn Write) ->
//! anyhow::Result<()>`; add `pub mod foo;` here, a variant to [`Command`] (its doc comment
//! is the command's help line) and one arm to [`Command::run`]. Errors go back as
//! `anyhow::Error`: the top level prints them and maps them to exit codes (see
//! [`crate::exit`]).

use std::io::Write;

use clap::Subcommand;

use crate::app::Context;

pub mod demo;
pub mod fsm;
pub mod info;
pub mod inspect;
pub mod load;
pub mod migrate;
pub mod receive;
pub mod save;
pub mod serve;
pub mod state;

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// The main job: live-migrate one emulated device into another over vfio-user, with
    /// precopy while it keeps changing, and verify the destination's state digest.
    Demo(demo::DemoArgs),
    /// Explore the migration state machine: next step, whole paths, tables, graphs.
    #[command(subcommand)]
    Fsm(fsm::FsmCommand),
    /// Run a vfio-user server for an emulated device, one client after another, until
    /// SIGINT or SIGTERM.
    Serve(serve::ServeArgs),
    /// Show a device: capabilities, state, data-size estimate, DMA-logging support.
    Info(info::InfoArgs),
    /// Show a device's migration state, or move it to TARGET (printing the arcs taken).
    State(state::StateArgs),
    /// Live-migrate devices into other devices, or to a `vfio-mig receive` over the network.
    Migrate(migrate::MigrateArgs),
    /// Receive a migration over the network into local devices.
    Receive(receive::ReceiveArgs),
    /// Save devices' state into a file (cold migration; the devices stay stopped).
    Save(save::SaveArgs),
    /// Load a saved file into devices and start them.
    Load(load::LoadArgs),
    /// Describe a saved stream and check its integrity.
    Inspect(inspect::InspectArgs),
}

impl Command {
    /// Runs the command, writing its normal output to `out`.
    pub fn run(self, ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
        match self {
            Command::Demo(args) => demo::run(args, ctx, out),
            Command::Fsm(cmd) => fsm::run(cmd, ctx, out),
            Command::Serve(args) => serve::run(args, ctx, out),
            Command::Info(args) => info::run(args, ctx, out),
            Command::State(args) => state::run(args, ctx, out),
            Command::Migrate(args) => migrate::run(args, ctx, out),
            Command::Receive(args) => receive::run(args, ctx, out),
            Command::Save(args) => save::run(args, ctx, out),
            Command::Load(args) => load::run(args, ctx, out),
            Command::Inspect(args) => inspect::run(args, ctx, out),
        }
    }
}
