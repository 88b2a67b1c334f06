//! The conformance suite: checks any [`crate::MigrationDevice`] against the uAPI's rules.
