//! The two device traits (user's view and author's hooks) and the controller that enforces the VFIO migration uAPI.
#![forbid(unsafe_code)]
