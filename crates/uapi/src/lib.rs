//! Exact types of the Linux VFIO device-migration uAPI "v2".
//!
//! The kernel's contract (`include/uapi/linux/vfio.h`) is expressed here twice:
//!
//! * as safe Rust types ([`DeviceState`], [`MigrationFeatures`], [`Errno`]) that the rest of
//!   vfio-mig speaks, with total, checked conversions from raw wire values, and
//! * as the raw `#[repr(C)]` structs, feature indices and ioctl numbers in [`kernel`], taken
//!   from `vfio-bindings` where it has them and proven against the kernel's layout by tests.
//!
//! Names print and parse the way the `vfio-mig` command line spells them (`stop-copy`,
//! `running-p2p`, `pre-copy`, ...).
#![forbid(unsafe_code)]

mod errno;
mod features;
pub mod kernel;
mod state;

pub use errno::Errno;
pub use features::{Feature, FeaturesError, MigrationFeatures};
pub use state::{DeviceState, ParseStateError, UnknownState};
