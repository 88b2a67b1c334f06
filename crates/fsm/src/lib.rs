//! The VFIO migration state machine: direct arcs, next step and whole paths per feature set, data-session effects. Pure, no I/O.
#![forbid(unsafe_code)]
