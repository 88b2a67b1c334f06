//! The eight device states of `enum vfio_device_mig_state`.

use std::fmt;
use std::str::FromStr;

use crate::features::MigrationFeatures;

/// A migration state of a VFIO device (`enum vfio_device_mig_state`, a `u32` on the wire).
///
/// The discriminants are the kernel's values; [`DeviceState::try_from`] is the only way in
/// from a raw `u32` and refuses values the kernel does not define.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u32)]
pub enum DeviceState {
    /// The device failed and must be reset; never a valid target of a transition.
    Error = 0,
    /// No DMA, no interrupts, internal state frozen.
    Stop = 1,
    /// Fully operational.
    Running = 2,
    /// Stopped, and the saving stream is readable to its end.
    StopCopy = 3,
    /// Stopped and taking in new state through the resuming stream.
    Resuming = 4,
    /// Running, but starting no new peer-to-peer DMA.
    RunningP2p = 5,
    /// Running while tracking state changes; the saving stream is open.
    PreCopy = 6,
    /// [`DeviceState::PreCopy`] with peer-to-peer DMA quiesced.
    PreCopyP2p = 7,
}

/// A raw state value the kernel does not define (8 or above).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("unknown device state value {0}; defined values are 0..=7")]
pub struct UnknownState(pub u32);

impl DeviceState {
    /// Number of states (`VFIO_DEVICE_STATE_NR`).
    pub const COUNT: usize = 8;

    /// Every state, in numeric order.
    pub const ALL: [DeviceState; 8] = [
        DeviceState::Error,
        DeviceState::Stop,
        DeviceState::Running,
        DeviceState::StopCopy,
        DeviceState::Resuming,
        DeviceState::RunningP2p,
        DeviceState::PreCopy,
        DeviceState::PreCopyP2p,
    ];

    /// The raw `u32` value on the wire.
    pub const fn raw(self) -> u32 {
        self as u32
    }

    /// Index into tables of [`DeviceState::COUNT`] entries.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// The name used on the command line and in JSON (`stop-copy`, `running-p2p`, ...).
    pub const fn name(self) -> &'static str {
        match self {
            DeviceState::Error => "error",
            DeviceState::Stop => "stop",
            DeviceState::Running => "running",
            DeviceState::StopCopy => "stop-copy",
            DeviceState::Resuming => "resuming",
            DeviceState::RunningP2p => "running-p2p",
            DeviceState::PreCopy => "pre-copy",
            DeviceState::PreCopyP2p => "pre-copy-p2p",
        }
    }

    /// The kernel's name of the state (`VFIO_DEVICE_STATE_STOP_COPY`, ...).
    pub const fn kernel_name(self) -> &'static str {
        match self {
            DeviceState::Error => "VFIO_DEVICE_STATE_ERROR",
            DeviceState::Stop => "VFIO_DEVICE_STATE_STOP",
            DeviceState::Running => "VFIO_DEVICE_STATE_RUNNING",
            DeviceState::StopCopy => "VFIO_DEVICE_STATE_STOP_COPY",
            DeviceState::Resuming => "VFIO_DEVICE_STATE_RESUMING",
            DeviceState::RunningP2p => "VFIO_DEVICE_STATE_RUNNING_P2P",
            DeviceState::PreCopy => "VFIO_DEVICE_STATE_PRE_COPY",
            DeviceState::PreCopyP2p => "VFIO_DEVICE_STATE_PRE_COPY_P2P",
        }
    }

    /// The capability flags a device needs for this state to exist (`state_flags_table`).
    ///
    /// [`DeviceState::Error`] needs every bit, so no feature set supports it.
    pub const fn required_flags(self) -> u64 {
        use crate::kernel::{
            VFIO_MIGRATION_P2P, VFIO_MIGRATION_PRE_COPY, VFIO_MIGRATION_STOP_COPY,
        };
        match self {
            DeviceState::Error => !0,
            DeviceState::Stop
            | DeviceState::Running
            | DeviceState::StopCopy
            | DeviceState::Resuming => VFIO_MIGRATION_STOP_COPY,
            DeviceState::RunningP2p => VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P,
            DeviceState::PreCopy => VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_PRE_COPY,
            DeviceState::PreCopyP2p => {
                VFIO_MIGRATION_STOP_COPY | VFIO_MIGRATION_P2P | VFIO_MIGRATION_PRE_COPY
            }
        }
    }

    /// Whether a device with `features` has this state (the kernel's mask test).
    pub const fn is_supported_by(self, features: MigrationFeatures) -> bool {
        let mask = self.required_flags();
        features.bits() & mask == mask
    }

    /// States in which the saving stream is open: PRE_COPY, PRE_COPY_P2P, STOP_COPY.
    pub const fn is_saving(self) -> bool {
        matches!(
            self,
            DeviceState::PreCopy | DeviceState::PreCopyP2p | DeviceState::StopCopy
        )
    }

    /// PRE_COPY or PRE_COPY_P2P: the states where precopy info is valid.
    pub const fn is_precopy(self) -> bool {
        matches!(self, DeviceState::PreCopy | DeviceState::PreCopyP2p)
    }

    /// States in which the device runs (may DMA and change its state): RUNNING, RUNNING_P2P,
    /// PRE_COPY, PRE_COPY_P2P.
    pub const fn is_running(self) -> bool {
        matches!(
            self,
            DeviceState::Running
                | DeviceState::RunningP2p
                | DeviceState::PreCopy
                | DeviceState::PreCopyP2p
        )
    }

    /// Every state's CLI name, for error messages.
    pub fn valid_names() -> String {
        DeviceState::ALL.map(DeviceState::name).join(", ")
    }
}

impl TryFrom<u32> for DeviceState {
    type Error = UnknownState;

    fn try_from(raw: u32) -> Result<Self, UnknownState> {
        DeviceState::ALL
            .get(raw as usize)
            .copied()
            .ok_or(UnknownState(raw))
    }
}

impl From<DeviceState> for u32 {
    fn from(state: DeviceState) -> u32 {
        state.raw()
    }
}

impl fmt::Display for DeviceState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A state name that is not one of the eight.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown state '{given}'; valid states: {}",
    DeviceState::valid_names()
)]
pub struct ParseStateError {
    given: String,
}

impl FromStr for DeviceState {
    type Err = ParseStateError;

    /// Parses the CLI spelling; `_` may stand for `-` and case is ignored, so the kernel's
    /// names without their prefix (`STOP_COPY`) are accepted too.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let norm = s.trim().to_ascii_lowercase().replace('_', "-");
        let norm = norm.strip_prefix("vfio-device-state-").unwrap_or(&norm);
        DeviceState::ALL
            .into_iter()
            .find(|st| st.name() == norm)
            .ok_or_else(|| ParseStateError {
                given: s.to_owned(),
            })
    }
}

impl serde::Serialize for DeviceState {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> serde::Deserialize<'de> for DeviceState {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_values_match_the_kernel() {
        let expected = [
            (DeviceState::Error, 0),
            (DeviceState::Stop, 1),
            (DeviceState::Running, 2),
            (DeviceState::StopCopy, 3),
            (DeviceState::Resuming, 4),
            (DeviceState::RunningP2p, 5),
            (DeviceState::PreCopy, 6),
            (DeviceState::PreCopyP2p, 7),
        ];
        for (state, raw) in expected {
            assert_eq!(state.raw(), raw, "{state}");
            assert_eq!(DeviceState::try_from(raw), Ok(state));
        }
    }

    #[test]
    fn unknown_raw_values_are_errors() {
        for raw in [8, 9, 100, u32::MAX] {
            assert_eq!(DeviceState::try_from(raw), Err(UnknownState(raw)));
        }
    }

    #[test]
    fn names_round_trip_and_accept_kernel_spelling() {
        for state in DeviceState::ALL {
            assert_eq!(state.name().parse::<DeviceState>().unwrap(), state);
            let k = state.kernel_name();
            assert_eq!(k.parse::<DeviceState>().unwrap(), state);
            let short = k.trim_start_matches("VFIO_DEVICE_STATE_");
            assert_eq!(short.parse::<DeviceState>().unwrap(), state);
        }
        let err = "runing".parse::<DeviceState>().unwrap_err().to_string();
        assert!(
            err.contains("runing") && err.contains("pre-copy-p2p"),
            "{err}"
        );
    }

    #[test]
    fn saving_and_running_classes() {
        use DeviceState::*;
        let saving: Vec<_> = DeviceState::ALL
            .into_iter()
            .filter(|s| s.is_saving())
            .collect();
        assert_eq!(saving, [StopCopy, PreCopy, PreCopyP2p]);
        let running: Vec<_> = DeviceState::ALL
            .into_iter()
            .filter(|s| s.is_running())
            .collect();
        assert_eq!(running, [Running, RunningP2p, PreCopy, PreCopyP2p]);
    }

    proptest::proptest! {
        #[test]
        fn try_from_is_total(raw in proptest::prelude::any::<u32>()) {
            match DeviceState::try_from(raw) {
                Ok(state) => proptest::prop_assert_eq!(state.raw(), raw),
                Err(e) => proptest::prop_assert!(raw >= 8 && e.0 == raw),
            }
        }
    }
}
