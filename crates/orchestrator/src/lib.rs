//! Live-migration engine: precopy convergence, P2P quiescing, stop-copy, resume and rollback over MigrationDevice.
#![forbid(unsafe_code)]
