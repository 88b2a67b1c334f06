//! The top-level parser, global flags, dispatch, and how errors reach the user.

use std::io::{self, Write};
use std::process::ExitCode;

use clap::{ArgAction, Parser};

use crate::commands::Command;
use crate::exit::{self, Exit};

/// `vfio-mig`: the command line as a whole.
#[derive(Debug, Parser)]
#[command(
    name = "vfio-mig",
    version,
    about = "Live migration of VFIO devices over the VFIO migration uAPI v2",
    propagate_version = true
)]
pub struct Cli {
    /// On failure, also print the chain of causes (may be repeated for more detail).
    #[arg(short, long, global = true, action = ArgAction::Count)]
    pub verbose: u8,

    /// The command to run.
    #[command(subcommand)]
    pub command: Command,
}

/// What every command gets besides its own arguments.
#[derive(Clone, Copy, Debug, Default)]
pub struct Context {
    /// How many times `-v` was given.
    pub verbose: u8,
}

/// Parses the process arguments, runs the command and turns the outcome into an exit code.
///
/// Usage errors found by clap are printed and exit 2 inside `Cli::parse` (help and version
/// exit 0 there); everything else is reported by [`report`].
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    let ctx = Context {
        verbose: cli.verbose,
    };
    // Not locked for the whole run: commands that start threads may print from them.
    let mut stdout = io::stdout();
    let outcome = cli
        .command
        .run(&ctx, &mut stdout)
        .and_then(|()| stdout.flush().map_err(anyhow::Error::from));
    match outcome {
        Ok(()) => Exit::Success.into(),
        // A reader that went away (`vfio-mig fsm table | head -1`) is not a failure.
        Err(err) if exit::is_broken_pipe(&err) => Exit::Success.into(),
        Err(err) => {
            eprint!("{}", report(&err, ctx.verbose > 0));
            Exit::of(&err).into()
        }
    }
}

/// The text printed on stderr for a failed command: one line `vfio-mig: <reason>`, and with
/// `verbose` one `  caused by: <cause>` line per underlying cause.
pub fn report(err: &anyhow::Error, verbose: bool) -> String {
    let mut text = format!("vfio-mig: {err}\n");
    if verbose {
        for cause in err.chain().skip(1) {
            text.push_str(&format!("  caused by: {cause}\n"));
        }
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn clap_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn report_is_one_line_unless_verbose() {
        let err = anyhow::Error::new(io::Error::from(io::ErrorKind::ConnectionRefused))
            .context("connecting to vfio-user:/tmp/x.sock")
            .context("cannot open the source device");
        assert_eq!(
            report(&err, false),
            "vfio-mig: cannot open the source device\n"
        );
        let verbose = report(&err, true);
        let lines: Vec<&str> = verbose.lines().collect();
        assert_eq!(lines.len(), 3, "{verbose}");
        assert_eq!(lines[0], "vfio-mig: cannot open the source device");
        assert_eq!(lines[1], "  caused by: connecting to vfio-user:/tmp/x.sock");
        assert!(lines[2].starts_with("  caused by: "), "{verbose}");
        assert!(lines[2].to_lowercase().contains("refused"), "{verbose}");
    }

    #[test]
    fn verbose_is_global_and_counts() {
        let cli = Cli::try_parse_from(["vfio-mig", "fsm", "table", "-vv"]).unwrap();
        assert_eq!(cli.verbose, 2);
        let cli = Cli::try_parse_from(["vfio-mig", "--verbose", "fsm", "table"]).unwrap();
        assert_eq!(cli.verbose, 1);
    }
}
