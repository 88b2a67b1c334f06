//! Errors that carry the errno the kernel would return.

use std::borrow::Cow;
use std::fmt;

use vfio_mig_uapi::{DeviceState, Errno};

type Cause = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A failed device operation: an errno for the wire and a message for people.
#[derive(Debug)]
pub struct DeviceError {
    errno: Errno,
    message: Cow<'static, str>,
    broken: bool,
    source: Option<Cause>,
}

impl DeviceError {
    /// An error with `errno` and a message saying what was wrong.
    pub fn new(errno: Errno, message: impl Into<Cow<'static, str>>) -> Self {
        DeviceError {
            errno,
            message: message.into(),
            broken: false,
            source: None,
        }
    }

    /// A hook failure after which the device is in no valid state: the controller moves the
    /// device to ERROR.
    pub fn broken(errno: Errno, message: impl Into<Cow<'static, str>>) -> Self {
        DeviceError {
            broken: true,
            ..DeviceError::new(errno, message)
        }
    }

    /// Attaches the underlying cause.
    pub fn with_source(mut self, source: impl Into<Cause>) -> Self {
        self.source = Some(source.into());
        self
    }

    /// An error from an OS call, keeping its errno.
    pub fn from_io(context: impl Into<Cow<'static, str>>, err: std::io::Error) -> Self {
        DeviceError::new(Errno::from_io(&err), context).with_source(err)
    }

    /// The errno the kernel would return for this failure.
    pub fn errno(&self) -> Errno {
        self.errno
    }

    /// The message, without the errno.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Whether the device is left in no valid state.
    pub fn is_broken(&self) -> bool {
        self.broken
    }
}

impl fmt::Display for DeviceError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.message, self.errno)
    }
}

impl std::error::Error for DeviceError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// A failed [`crate::MigrationDevice::set_state`]: which arc failed and where the device is.
///
/// As in the kernel there is no automatic unwind: the device stays at the last state it
/// reached, and the caller chooses to retry, go elsewhere, or reset.
#[derive(Debug, thiserror::Error)]
#[error("{}", self.describe())]
pub struct TransitionError {
    /// The state that was asked for.
    pub requested: DeviceState,
    /// The arc that failed, if the failure was in an arc (not a refused request).
    pub failed_arc: Option<(DeviceState, DeviceState)>,
    /// Where the device is now, if known.
    pub reached: Option<DeviceState>,
    /// Why.
    #[source]
    pub cause: DeviceError,
}

impl TransitionError {
    /// The errno for the wire (the cause's).
    pub fn errno(&self) -> Errno {
        self.cause.errno()
    }

    /// A request refused before any arc was taken; the device did not move.
    pub fn refused(requested: DeviceState, at: DeviceState, cause: DeviceError) -> Self {
        TransitionError {
            requested,
            failed_arc: None,
            reached: Some(at),
            cause,
        }
    }

    fn describe(&self) -> String {
        let mut s = match self.failed_arc {
            Some((from, to)) => format!(
                "transition to {} failed on arc {from} -> {to}",
                self.requested
            ),
            None => format!("transition to {} refused", self.requested),
        };
        if let Some(at) = self.reached {
            s.push_str(&format!("; device is in {at}"));
        }
        s
    }
}
