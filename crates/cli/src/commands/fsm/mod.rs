//! `vfio-mig fsm`: the migration state machine of a feature set, without any device.
//!
//! Everything is computed by `vfio-mig-fsm`; this module only parses and prints.

use std::io::Write;

use clap::{Args, Subcommand};
use vfio_mig_fsm::{SessionEffect, StreamDirection};
use vfio_mig_uapi::{DeviceState, MigrationFeatures};

use crate::app::Context;

mod dot;
mod path;
mod table;

/// The `fsm` subcommands.
#[derive(Debug, Subcommand)]
pub enum FsmCommand {
    /// Print the next state on the way from FROM to TO (the single arc the kernel takes next).
    Next(NextArgs),
    /// Print every state from FROM to TO and what each arc does to the data session.
    Path(PathArgs),
    /// Print the next-step table: for each (from, to) pair, the next state or refused.
    Table(TableArgs),
    /// Print a Graphviz digraph of the supported states and direct arcs.
    Dot(DotArgs),
}

/// `--features LIST`, shared by every `fsm` subcommand.
#[derive(Clone, Copy, Debug, Args)]
pub struct FeaturesArg {
    /// The device's migration features, comma-separated: stop-copy (always implied), p2p,
    /// pre-copy. Default: all features.
    #[arg(long, value_name = "LIST", default_value_t = MigrationFeatures::ALL)]
    pub features: MigrationFeatures,
}

/// A requested transition.
#[derive(Clone, Copy, Debug, Args)]
pub struct TransitionArgs {
    /// Current state: error, stop, running, stop-copy, resuming, running-p2p, pre-copy,
    /// pre-copy-p2p.
    #[arg(value_name = "FROM")]
    pub from: DeviceState,
    /// Target state (same names as FROM).
    #[arg(value_name = "TO")]
    pub to: DeviceState,
    /// The feature set.
    #[command(flatten)]
    pub features: FeaturesArg,
}

/// Arguments of `fsm next`.
#[derive(Clone, Copy, Debug, Args)]
pub struct NextArgs {
    /// The transition.
    #[command(flatten)]
    pub transition: TransitionArgs,
}

/// Arguments of `fsm path`.
#[derive(Clone, Copy, Debug, Args)]
pub struct PathArgs {
    /// The transition.
    #[command(flatten)]
    pub transition: TransitionArgs,
    /// Print one JSON object: from, to, features, states, arcs with their session effect.
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `fsm table`.
#[derive(Clone, Copy, Debug, Args)]
pub struct TableArgs {
    /// The feature set.
    #[command(flatten)]
    pub features: FeaturesArg,
    /// Print one JSON object: from-state -> (to-state -> next state, or null if refused).
    #[arg(long)]
    pub json: bool,
}

/// Arguments of `fsm dot`.
#[derive(Clone, Copy, Debug, Args)]
pub struct DotArgs {
    /// The feature set.
    #[command(flatten)]
    pub features: FeaturesArg,
}

/// Runs an `fsm` subcommand.
pub fn run(cmd: FsmCommand, _ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let text = match cmd {
        FsmCommand::Next(args) => {
            let t = args.transition;
            let next = vfio_mig_fsm::next_step(t.from, t.to, t.features.features)?;
            format!("{next}\n")
        }
        FsmCommand::Path(args) => {
            let t = args.transition;
            let p = vfio_mig_fsm::path(t.from, t.to, t.features.features)?;
            if args.json {
                path::json(&p, t.features.features)?
            } else {
                path::text(&p)
            }
        }
        FsmCommand::Table(args) if args.json => table::json(args.features.features)?,
        FsmCommand::Table(args) => table::text(args.features.features),
        FsmCommand::Dot(args) => dot::render(args.features.features),
    };
    out.write_all(text.as_bytes())?;
    Ok(())
}

/// The JSON spelling of an arc's effect on the data session.
fn session_key(effect: SessionEffect) -> &'static str {
    match effect {
        SessionEffect::Opens(StreamDirection::Saving) => "opens-saving",
        SessionEffect::Opens(StreamDirection::Resuming) => "opens-resuming",
        SessionEffect::Keeps => "keeps",
        SessionEffect::Ends(StreamDirection::Saving) => "ends-saving",
        SessionEffect::Ends(StreamDirection::Resuming) => "ends-resuming",
        SessionEffect::None => "none",
    }
}

/// What an arc does to the data session, as a phrase for people.
fn session_phrase(effect: SessionEffect) -> &'static str {
    match effect {
        SessionEffect::Opens(StreamDirection::Saving) => "opens a new saving stream",
        SessionEffect::Opens(StreamDirection::Resuming) => "opens a new resuming stream",
        SessionEffect::Keeps => "keeps the open saving stream",
        SessionEffect::Ends(StreamDirection::Saving) => "ends the saving stream",
        SessionEffect::Ends(StreamDirection::Resuming) => {
            "ends the resuming stream (the device loads and checks what was written)"
        }
        SessionEffect::None => "no data stream involved",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app::Cli;
    use clap::Parser;

    fn parse(args: &[&str]) -> Result<FsmCommand, clap::Error> {
        let argv = ["vfio-mig", "fsm"].iter().chain(args);
        let cli = Cli::try_parse_from(argv)?;
        match cli.command {
            crate::commands::Command::Fsm(cmd) => Ok(cmd),
            other => panic!("parsed as another command: {other:?}"),
        }
    }

    #[test]
    fn features_default_to_all_and_accept_lists() {
        let FsmCommand::Table(t) = parse(&["table"]).unwrap() else {
            panic!("not table")
        };
        assert_eq!(t.features.features, MigrationFeatures::ALL);
        let FsmCommand::Dot(d) = parse(&["dot", "--features", "p2p"]).unwrap() else {
            panic!("not dot")
        };
        assert_eq!(d.features.features, MigrationFeatures::P2P);
        let FsmCommand::Next(n) = parse(&["next", "stop", "running", "--features", ""]).unwrap()
        else {
            panic!("not next")
        };
        assert_eq!(n.transition.features.features, MigrationFeatures::STOP_COPY);
    }

    #[test]
    fn bad_names_are_usage_errors_listing_the_valid_ones() {
        let err = parse(&["next", "stop", "runing"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("pre-copy-p2p"), "{err}");
        let err = parse(&["table", "--features", "p2p,precopy"]).unwrap_err();
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("stop-copy, p2p, pre-copy"),
            "{err}"
        );
    }

    #[test]
    fn every_session_effect_has_distinct_names() {
        let effects = [
            SessionEffect::Opens(StreamDirection::Saving),
            SessionEffect::Opens(StreamDirection::Resuming),
            SessionEffect::Keeps,
            SessionEffect::Ends(StreamDirection::Saving),
            SessionEffect::Ends(StreamDirection::Resuming),
            SessionEffect::None,
        ];
        let keys: std::collections::HashSet<_> = effects.map(session_key).into();
        let phrases: std::collections::HashSet<_> = effects.map(session_phrase).into();
        assert_eq!(keys.len(), effects.len());
        assert_eq!(phrases.len(), effects.len());
    }

    #[test]
    fn refused_next_step_is_an_operation_failure() {
        let cmd = parse(&["next", "stop-copy", "pre-copy"]).unwrap();
        let mut out = Vec::new();
        let err = run(cmd, &Context::default(), &mut out).unwrap_err();
        assert_eq!(crate::exit::Exit::of(&err), crate::exit::Exit::Failed);
        assert!(
            err.to_string().contains("cannot return to pre-copy"),
            "{err}"
        );
        assert!(out.is_empty());
    }
}
