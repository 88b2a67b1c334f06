//! Whether a destination device can take the state a stream carries.
//!
//! The rule: a device's bytes in the stream are opaque, and their format is fixed by the
//! device's kind, the version of its state format and the compatibility data it chose to
//! publish. So those three must be equal on both sides, and are checked in that order (the
//! first difference is reported, naming the field). Migration features are *not* part of
//! the data's format: they decide only which states the orchestrator may drive each device
//! through (a destination uses RESUMING, STOP and RUNNING, and RUNNING_P2P when it has P2P),
//! so a difference in features never makes a device incompatible. It is returned in
//! [`Compatible`] for the orchestrator to apply its own rules, e.g. that several devices
//! migrated together must all support P2P.

use std::fmt;

use vfio_mig_uapi::{Feature, MigrationFeatures};

use crate::record::{to_hex, DeviceInfo};

/// The destination can take the stream's device state; how their features differ.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Compatible {
    /// Features the source device has and the destination device lacks.
    pub missing_on_destination: Vec<Feature>,
    /// Features the destination device has and the source device lacked.
    pub extra_on_destination: Vec<Feature>,
}

impl Compatible {
    /// Whether both devices have the same features.
    pub fn features_equal(&self) -> bool {
        self.missing_on_destination.is_empty() && self.extra_on_destination.is_empty()
    }
}

impl fmt::Display for Compatible {
    /// `compatible`, or `compatible; destination lacks p2p; destination adds pre-copy`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("compatible")?;
        for (label, list) in [
            ("destination lacks", &self.missing_on_destination),
            ("destination adds", &self.extra_on_destination),
        ] {
            if !list.is_empty() {
                let names: Vec<&str> = list.iter().map(|f| f.name()).collect();
                write!(f, "; {label} {}", names.join(","))?;
            }
        }
        Ok(())
    }
}

/// Why a destination device cannot take the stream's device state.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Incompatible {
    /// Different device kinds.
    #[error("device kind differs: the stream carries '{stream}' state, the destination is '{destination}'")]
    Kind {
        /// Kind in the stream.
        stream: String,
        /// Kind of the destination.
        destination: String,
    },
    /// Same kind, different state format versions.
    #[error("{kind} state version differs: the stream carries version '{stream}', the destination takes version '{destination}'")]
    Version {
        /// The device kind.
        kind: String,
        /// Version in the stream.
        stream: String,
        /// Version of the destination.
        destination: String,
    },
    /// Same kind and version, different compatibility data.
    #[error(
        "{kind} compatibility data differs at byte {first_difference}: the stream has {stream_len} \
         bytes ({stream_hex}), the destination {destination_len} bytes ({destination_hex})"
    )]
    CompatData {
        /// The device kind.
        kind: String,
        /// Length in the stream.
        stream_len: usize,
        /// Length on the destination.
        destination_len: usize,
        /// Offset of the first differing byte (the shorter length if one is a prefix of
        /// the other).
        first_difference: usize,
        /// The stream's data in hex (cut after 32 bytes).
        stream_hex: String,
        /// The destination's data in hex (cut after 32 bytes).
        destination_hex: String,
    },
}

/// Checks whether `destination` can take the state `stream` describes (a DEVICE record of
/// the stream), by the rule in the module documentation. The destination's `name` and
/// `data_size_estimate` play no part.
pub fn check_compatibility(
    stream: &DeviceInfo,
    destination: &DeviceInfo,
) -> Result<Compatible, Incompatible> {
    if stream.kind != destination.kind {
        return Err(Incompatible::Kind {
            stream: stream.kind.clone(),
            destination: destination.kind.clone(),
        });
    }
    if stream.version != destination.version {
        return Err(Incompatible::Version {
            kind: stream.kind.clone(),
            stream: stream.version.clone(),
            destination: destination.version.clone(),
        });
    }
    if stream.compat != destination.compat {
        let first_difference = stream
            .compat
            .iter()
            .zip(&destination.compat)
            .position(|(a, b)| a != b)
            .unwrap_or(stream.compat.len().min(destination.compat.len()));
        return Err(Incompatible::CompatData {
            kind: stream.kind.clone(),
            stream_len: stream.compat.len(),
            destination_len: destination.compat.len(),
            first_difference,
            stream_hex: short_hex(&stream.compat),
            destination_hex: short_hex(&destination.compat),
        });
    }
    Ok(feature_differences(stream.features, destination.features))
}

fn feature_differences(source: MigrationFeatures, destination: MigrationFeatures) -> Compatible {
    let only = |a: MigrationFeatures, b: MigrationFeatures| {
        a.iter().filter(|f| !b.contains(*f)).collect::<Vec<_>>()
    };
    Compatible {
        missing_on_destination: only(source, destination),
        extra_on_destination: only(destination, source),
    }
}

fn short_hex(bytes: &[u8]) -> String {
    const SHOWN: usize = 32;
    if bytes.is_empty() {
        "empty".to_owned()
    } else if bytes.len() <= SHOWN {
        to_hex(bytes)
    } else {
        format!("{}...", to_hex(&bytes[..SHOWN]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn membuf(size: u64, features: MigrationFeatures) -> DeviceInfo {
        DeviceInfo {
            name: "src".into(),
            kind: "membuf".into(),
            version: "1".into(),
            compat: size.to_le_bytes().to_vec(),
            features,
            data_size_estimate: size,
        }
    }

    #[test]
    fn same_identity_is_compatible_whatever_the_features() {
        let src = membuf(4096, MigrationFeatures::ALL);
        let mut dst = membuf(4096, MigrationFeatures::STOP_COPY);
        dst.name = "other".into();
        dst.data_size_estimate = 0;
        let ok = check_compatibility(&src, &dst).unwrap();
        assert_eq!(
            ok.missing_on_destination,
            vec![Feature::P2p, Feature::PreCopy]
        );
        assert!(ok.extra_on_destination.is_empty());
        assert_eq!(ok.to_string(), "compatible; destination lacks p2p,pre-copy");
        let back = check_compatibility(&dst, &src).unwrap();
        assert_eq!(
            back.extra_on_destination,
            vec![Feature::P2p, Feature::PreCopy]
        );
        assert!(check_compatibility(&src, &src).unwrap().features_equal());
    }

    #[test]
    fn each_mismatch_names_its_field() {
        let src = membuf(4096, MigrationFeatures::ALL);
        let mut dst = src.clone();
        dst.kind = "regs".into();
        let e = check_compatibility(&src, &dst).unwrap_err();
        assert!(matches!(e, Incompatible::Kind { .. }));
        assert!(e.to_string().contains("kind differs"), "{e}");

        let mut dst = src.clone();
        dst.version = "2".into();
        let e = check_compatibility(&src, &dst).unwrap_err();
        assert!(e.to_string().contains("version differs"), "{e}");

        let dst = membuf(8192, MigrationFeatures::ALL);
        let e = check_compatibility(&src, &dst).unwrap_err();
        assert_eq!(
            e,
            Incompatible::CompatData {
                kind: "membuf".into(),
                stream_len: 8,
                destination_len: 8,
                first_difference: 1,
                stream_hex: "0010000000000000".into(),
                destination_hex: "0020000000000000".into(),
            }
        );

        let mut dst = src.clone();
        dst.compat.push(0);
        let e = check_compatibility(&src, &dst).unwrap_err();
        assert!(matches!(
            e,
            Incompatible::CompatData {
                first_difference: 8,
                ..
            }
        ));

        let mut dst = src.clone();
        dst.compat = vec![0; 100];
        let e = check_compatibility(&src, &dst).unwrap_err();
        assert!(e.to_string().contains("..."), "{e}");
    }
}
