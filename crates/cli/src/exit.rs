//! The exit-code contract: 0 success, 1 the operation failed, 2 bad usage or a bad address.

use std::fmt;
use std::io;
use std::process::ExitCode;

/// The process's exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// 0: the command did what was asked.
    Success,
    /// 1: the operation failed (refused transition, device error, verification mismatch...).
    Failed,
    /// 2: bad usage or a bad address. Clap's own parse errors exit 2 before a command runs.
    Usage,
}

impl Exit {
    /// The numeric code.
    pub const fn code(self) -> u8 {
        match self {
            Exit::Success => 0,
            Exit::Failed => 1,
            Exit::Usage => 2,
        }
    }

    /// The exit status for a command's error: [`Exit::Usage`] when a [`UsageError`] is
    /// anywhere in its chain (a command may add context on top of it), else [`Exit::Failed`].
    pub fn of(err: &anyhow::Error) -> Exit {
        if err.chain().any(|cause| cause.is::<UsageError>()) {
            Exit::Usage
        } else {
            Exit::Failed
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> ExitCode {
        ExitCode::from(exit.code())
    }
}

/// A mistake in how the tool was called that only shows once a command runs (an address of
/// the wrong kind for its position, options that contradict each other). Exits 2.
///
/// Mistakes clap can see while parsing should be caught there instead (a `value_parser`
/// from a `FromStr` impl), so that clap prints the usage with them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UsageError(String);

impl UsageError {
    /// A usage error saying `message`.
    pub fn new(message: impl Into<String>) -> Self {
        UsageError(message.into())
    }
}

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

/// Whether the error is a write to a closed pipe (the reader of our stdout exited).
pub fn is_broken_pipe(err: &anyhow::Error) -> bool {
    err.chain().any(|cause| {
        cause
            .downcast_ref::<io::Error>()
            .is_some_and(|e| e.kind() == io::ErrorKind::BrokenPipe)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context as _;

    #[test]
    fn codes_follow_the_contract() {
        assert_eq!(Exit::Success.code(), 0);
        assert_eq!(Exit::Failed.code(), 1);
        assert_eq!(Exit::Usage.code(), 2);
    }

    #[test]
    fn usage_errors_exit_2_even_under_context() {
        let plain = anyhow::Error::new(UsageError::new("expected a file: address"));
        assert_eq!(Exit::of(&plain), Exit::Usage);
        let wrapped: anyhow::Result<()> = Err(plain).context("save");
        assert_eq!(Exit::of(&wrapped.unwrap_err()), Exit::Usage);
    }

    #[test]
    fn other_errors_exit_1() {
        let err = anyhow::anyhow!("device refused the transition");
        assert_eq!(Exit::of(&err), Exit::Failed);
        let io = anyhow::Error::new(io::Error::from(io::ErrorKind::NotFound));
        assert_eq!(Exit::of(&io), Exit::Failed);
    }

    #[test]
    fn broken_pipe_is_recognised_through_context() {
        let err: anyhow::Result<()> =
            Err(io::Error::from(io::ErrorKind::BrokenPipe)).context("writing the table");
        assert!(is_broken_pipe(&err.unwrap_err()));
        let other = anyhow::Error::new(io::Error::from(io::ErrorKind::PermissionDenied));
        assert!(!is_broken_pipe(&other));
    }
}
