//! The vfio-mig migration stream format between hosts: sans-IO encoder and decoder.
#![forbid(unsafe_code)]
