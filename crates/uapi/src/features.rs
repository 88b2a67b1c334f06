//! Migration capability flags (`vfio_device_feature_migration.flags`).

use std::fmt;
use std::str::FromStr;

use crate::kernel::{VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY};

/// One migration capability, as named on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Feature {
    /// `VFIO_MIGRATION_STOP_COPY`: the mandatory base (STOP, RUNNING, STOP_COPY, RESUMING).
    StopCopy,
    /// `VFIO_MIGRATION_P2P`: RUNNING_P2P (and PRE_COPY_P2P with pre-copy).
    P2p,
    /// `VFIO_MIGRATION_PRE_COPY`: PRE_COPY (and PRE_COPY_P2P with p2p).
    PreCopy,
}

impl Feature {
    /// Every known feature.
    pub const ALL: [Feature; 3] = [Feature::StopCopy, Feature::P2p, Feature::PreCopy];

    /// The flag bit.
    pub const fn bit(self) -> u64 {
        match self {
            Feature::StopCopy => VFIO_MIGRATION_STOP_COPY,
            Feature::P2p => VFIO_MIGRATION_P2P,
            Feature::PreCopy => VFIO_MIGRATION_PRE_COPY,
        }
    }

    /// The command-line name.
    pub const fn name(self) -> &'static str {
        match self {
            Feature::StopCopy => "stop-copy",
            Feature::P2p => "p2p",
            Feature::PreCopy => "pre-copy",
        }
    }
}

/// Why a flag word or a feature list is not a valid migration feature set.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum FeaturesError {
    /// The mandatory `VFIO_MIGRATION_STOP_COPY` bit is missing.
    #[error("migration flags {0:#x} lack the mandatory STOP_COPY bit (0x1)")]
    MissingStopCopy(u64),
    /// A name in a feature list is not a known feature.
    #[error("unknown feature '{0}'; valid features: stop-copy, p2p, pre-copy")]
    UnknownName(String),
}

/// A device's migration capabilities: always STOP_COPY, optionally P2P and PRE_COPY.
///
/// Only the four combinations that include STOP_COPY (0x1, 0x3, 0x5, 0x7) can be built. Bits
/// the uAPI may define in future are kept (so a peer's word round-trips) but play no part in
/// the state machine: capability flags are opt-in, so ignoring an unknown one is the
/// behaviour the uAPI was designed for.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct MigrationFeatures(u64);

impl MigrationFeatures {
    /// STOP_COPY only (0x1).
    pub const STOP_COPY: MigrationFeatures = MigrationFeatures(VFIO_MIGRATION_STOP_COPY);
    /// STOP_COPY | P2P (0x3).
    pub const P2P: MigrationFeatures =
        MigrationFeatures(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P);
    /// STOP_COPY | PRE_COPY (0x5).
    pub const PRE_COPY: MigrationFeatures =
        MigrationFeatures(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY);
    /// STOP_COPY | P2P | PRE_COPY (0x7).
    pub const ALL: MigrationFeatures =
        MigrationFeatures(VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY);
    /// The four valid feature sets, in flag order.
    pub const VALID_SETS: [MigrationFeatures; 4] = [
        MigrationFeatures::STOP_COPY,
        MigrationFeatures::P2P,
        MigrationFeatures::PRE_COPY,
        MigrationFeatures::ALL,
    ];

    const KNOWN: u64 = VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY;

    /// Checks a raw flag word as a device reported it.
    pub const fn from_bits(bits: u64) -> Result<Self, FeaturesError> {
        if bits & VFIO_MIGRATION_STOP_COPY == 0 {
            return Err(FeaturesError::MissingStopCopy(bits));
        }
        Ok(MigrationFeatures(bits))
    }

    /// STOP_COPY plus the given optional capabilities.
    pub const fn new(p2p: bool, pre_copy: bool) -> Self {
        let mut bits = VFIO_MIGRATION_STOP_COPY;
        if p2p {
            bits |= VFIO_MIGRATION_P2P;
        }
        if pre_copy {
            bits |= VFIO_MIGRATION_PRE_COPY;
        }
        MigrationFeatures(bits)
    }

    /// The raw flag word, unknown bits included.
    pub const fn bits(self) -> u64 {
        self.0
    }

    /// The flag word restricted to the bits this version of the uAPI defines.
    pub const fn known(self) -> MigrationFeatures {
        MigrationFeatures(self.0 & Self::KNOWN)
    }

    /// Bits set that this version of the uAPI does not define.
    pub const fn unknown_bits(self) -> u64 {
        self.0 & !Self::KNOWN
    }

    /// Whether the device has P2P states.
    pub const fn p2p(self) -> bool {
        self.0 & VFIO_MIGRATION_P2P != 0
    }

    /// Whether the device has PRE_COPY states.
    pub const fn pre_copy(self) -> bool {
        self.0 & VFIO_MIGRATION_PRE_COPY != 0
    }

    /// Whether `feature` is in the set.
    pub const fn contains(self, feature: Feature) -> bool {
        self.0 & feature.bit() != 0
    }

    /// The features in the set, in flag order.
    pub fn iter(self) -> impl Iterator<Item = Feature> {
        Feature::ALL.into_iter().filter(move |f| self.contains(*f))
    }

    /// The optional features both sets have (the base is always shared).
    pub const fn intersection(self, other: MigrationFeatures) -> MigrationFeatures {
        MigrationFeatures((self.0 & other.0) | VFIO_MIGRATION_STOP_COPY)
    }

    /// Parses a list such as `p2p,pre-copy` or `p2p+pre-copy`; `stop-copy` is implied, an
    /// empty list means STOP_COPY only, and `all` means every feature.
    pub fn parse_list(list: &str) -> Result<Self, FeaturesError> {
        let mut set = MigrationFeatures::STOP_COPY;
        for word in list
            .split([',', '+'])
            .map(str::trim)
            .filter(|w| !w.is_empty())
        {
            let norm = word.to_ascii_lowercase().replace('_', "-");
            if norm == "all" {
                set = MigrationFeatures::ALL;
                continue;
            }
            let feature = Feature::ALL
                .into_iter()
                .find(|f| f.name() == norm)
                .ok_or_else(|| FeaturesError::UnknownName(word.to_owned()))?;
            set.0 |= feature.bit();
        }
        Ok(set)
    }
}

impl Default for MigrationFeatures {
    /// Every feature this uAPI version defines.
    fn default() -> Self {
        MigrationFeatures::ALL
    }
}

impl FromStr for MigrationFeatures {
    type Err = FeaturesError;

    fn from_str(s: &str) -> Result<Self, FeaturesError> {
        MigrationFeatures::parse_list(s)
    }
}

impl fmt::Display for MigrationFeatures {
    /// Comma-separated names, e.g. `stop-copy,p2p,pre-copy`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for feature in self.iter() {
            if !first {
                f.write_str(",")?;
            }
            first = false;
            f.write_str(feature.name())?;
        }
        if self.unknown_bits() != 0 {
            write!(f, ",unknown({:#x})", self.unknown_bits())?;
        }
        Ok(())
    }
}

impl fmt::Debug for MigrationFeatures {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "MigrationFeatures({:#x}: {self})", self.0)
    }
}

impl serde::Serialize for MigrationFeatures {
    /// A list of names, e.g. `["stop-copy","p2p"]`.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(self.iter().map(Feature::name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sets_with_stop_copy_are_valid() {
        for bits in 0u64..16 {
            let r = MigrationFeatures::from_bits(bits);
            assert_eq!(r.is_ok(), bits & 1 == 1, "{bits:#x}");
        }
        assert_eq!(
            MigrationFeatures::VALID_SETS.map(|f| f.bits()),
            [0x1, 0x3, 0x5, 0x7]
        );
    }

    #[test]
    fn unknown_bits_are_kept_but_ignored() {
        let f = MigrationFeatures::from_bits(0x1 | 0x100).unwrap();
        assert_eq!(f.unknown_bits(), 0x100);
        assert_eq!(f.known(), MigrationFeatures::STOP_COPY);
        assert!(!f.p2p() && !f.pre_copy());
        assert_eq!(f.to_string(), "stop-copy,unknown(0x100)");
    }

    #[test]
    fn lists_parse_with_either_separator() {
        assert_eq!(
            "".parse::<MigrationFeatures>().unwrap(),
            MigrationFeatures::STOP_COPY
        );
        assert_eq!("stop-copy".parse::<MigrationFeatures>().unwrap().bits(), 1);
        assert_eq!("p2p".parse::<MigrationFeatures>().unwrap().bits(), 3);
        assert_eq!("pre-copy".parse::<MigrationFeatures>().unwrap().bits(), 5);
        assert_eq!(
            "p2p,pre-copy".parse::<MigrationFeatures>().unwrap().bits(),
            7
        );
        assert_eq!(
            "p2p+pre-copy".parse::<MigrationFeatures>().unwrap().bits(),
            7
        );
        assert_eq!("PRE_COPY".parse::<MigrationFeatures>().unwrap().bits(), 5);
        assert_eq!("all".parse::<MigrationFeatures>().unwrap().bits(), 7);
        let err = "p2p,precopy".parse::<MigrationFeatures>().unwrap_err();
        assert_eq!(err, FeaturesError::UnknownName("precopy".into()));
        assert!(err.to_string().contains("pre-copy"));
    }

    #[test]
    fn display_round_trips() {
        for set in MigrationFeatures::VALID_SETS {
            assert_eq!(set.to_string().parse::<MigrationFeatures>().unwrap(), set);
        }
    }
}
