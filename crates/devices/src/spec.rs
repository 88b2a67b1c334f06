//! Device specifications as the command line spells them (`serve --device SPEC`):
//!
//! ```text
//! membuf:size=256M,dirty-rate=32M,features=p2p+pre-copy,seed=7
//! register:seed=3
//! ```
//!
//! `KIND[:KEY=VALUE[,KEY=VALUE]...]`. Sizes and rates take `K`, `M`, `G`, `T` suffixes
//! (powers of 1024; `KiB` etc. also read) and `0x` hex. membuf keys, all optional:
//!
//! | key | meaning | default |
//! |---|---|---|
//! | `size` | state size, a multiple of 4 KiB | `64M` |
//! | `dirty-rate` | bytes per second rewritten while running; `0` is still | `0` |
//! | `features` | `p2p`, `pre-copy` joined with `+`; `stop-copy` is implied and alone means no option | `p2p+pre-copy` |
//! | `seed` | picks the initial contents | `1` |
//! | `dma-logging` | `on`/`off`: whether DMA dirty logging is offered | `on` |
//! | `dma-window` | `IOVA+LEN`: where the device's completion ring is in guest memory | `0x0+64K` |
//!
//! register keys: `seed` (default 1). lvu-sample (libvfio-user's sample device, see
//! [`crate::lvu_sample`]) keys: `bar1-size` (default `16K`, a power of two). [`DeviceSpec`]'s
//! `Display` prints a spec that parses
//! back to the same value, and [`DeviceSpec::build`] makes the device with the handles a
//! transport needs to host it:
//!
//! ```
//! use vfio_mig_device::{DeviceState, MigrationDevice};
//! use vfio_mig_devices::spec::DeviceSpec;
//!
//! let spec: DeviceSpec = "membuf:size=1M,dirty-rate=4M,features=pre-copy,seed=7".parse()?;
//! let hosted = spec.build()?;
//! assert_eq!(hosted.migration.state()?, DeviceState::Running);
//! let mut magic = [0u8; 8];
//! hosted.regions.region_read(0, 0, &mut magic)?;
//! assert_eq!(&magic, b"VFIOMIG1");
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use vfio_mig_device::{Controller, DeviceError, Dma, IovaRange, MigrationDevice, RegionAccess};
use vfio_mig_uapi::{Feature, FeaturesError, MigrationFeatures};

use crate::lvu_sample::{self, LvuSampleConfig};
use crate::membuf::{self, Membuf, MembufConfig};
use crate::register::{RegisterConfig, RegisterDevice};

/// The device kinds a spec can name.
pub const KINDS: &str = "membuf, register, lvu-sample";
/// The keys a `membuf` spec takes.
pub const MEMBUF_KEYS: &str = "size, dirty-rate, features, seed, dma-logging, dma-window";
/// The keys a `register` spec takes.
pub const REGISTER_KEYS: &str = "seed";
/// The keys an `lvu-sample` spec takes.
pub const LVU_SAMPLE_KEYS: &str = "bar1-size";

/// An emulated device to build, parsed from a spec.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeviceSpec {
    /// `membuf:...`
    Membuf(MembufConfig),
    /// `register:...`
    Register(RegisterConfig),
    /// `lvu-sample:...`
    LvuSample(LvuSampleConfig),
}

impl DeviceSpec {
    /// The device kind (`membuf`, `register`, `lvu-sample`).
    pub fn kind(&self) -> &'static str {
        match self {
            DeviceSpec::Membuf(_) => "membuf",
            DeviceSpec::Register(_) => "register",
            DeviceSpec::LvuSample(_) => lvu_sample::KIND,
        }
    }

    /// Whether the device offers DMA dirty logging (what a host announces).
    pub fn dma_logging(&self) -> bool {
        match self {
            DeviceSpec::Membuf(config) => config.dma_logging,
            DeviceSpec::Register(_) => false,
            DeviceSpec::LvuSample(_) => true,
        }
    }
}

/// A device built from a spec: the three handles a transport (e.g. a vfio-user server)
/// needs to host it. The device starts RUNNING; attach guest memory with
/// [`Dma::set_memory`].
pub struct HostedDevice {
    /// The migration interface.
    pub migration: Arc<dyn MigrationDevice>,
    /// Region (BAR0, config space) access, valid in every migration state.
    pub regions: Arc<dyn RegionAccess>,
    /// The device's DMA handle.
    pub dma: Dma,
    /// The typed membuf handles, when the device is a membuf.
    pub membuf: Option<Membuf>,
}

impl fmt::Debug for HostedDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HostedDevice")
            .field("dma", &self.dma)
            .field("membuf", &self.membuf)
            .finish_non_exhaustive()
    }
}

impl DeviceSpec {
    /// Builds the device the spec describes (for membuf: allocates and fills its state).
    pub fn build(&self) -> Result<HostedDevice, DeviceError> {
        match self {
            DeviceSpec::Membuf(config) => {
                let dev = membuf::create(config.clone())?;
                Ok(HostedDevice {
                    migration: dev.migration(),
                    regions: dev.regions(),
                    dma: dev.dma().clone(),
                    membuf: Some(dev),
                })
            }
            DeviceSpec::Register(config) => {
                let device = RegisterDevice::new(*config);
                let regions: Arc<dyn RegionAccess> = Arc::new(device.bar());
                let dma = Dma::new();
                let controller = Controller::new(device, dma.clone())?;
                Ok(HostedDevice {
                    migration: Arc::new(controller),
                    regions,
                    dma,
                    membuf: None,
                })
            }
            DeviceSpec::LvuSample(config) => {
                let dev = lvu_sample::create(*config)?;
                Ok(HostedDevice {
                    migration: dev.migration(),
                    regions: dev.regions(),
                    dma: dev.dma().clone(),
                    membuf: None,
                })
            }
        }
    }
}

/// Why a spec does not parse.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The part before `:` is no known device kind.
    #[error("unknown device kind '{0}'; valid kinds: {KINDS}")]
    UnknownKind(String),
    /// A key the kind does not take.
    #[error("unknown key '{key}' for a {kind} device; valid keys: {valid}")]
    UnknownKey {
        /// The device kind.
        kind: &'static str,
        /// The key given.
        key: String,
        /// The keys the kind takes.
        valid: &'static str,
    },
    /// An item without `=`.
    #[error("'{0}' is not KEY=VALUE")]
    NotKeyValue(String),
    /// A key given twice.
    #[error("key '{0}' is given twice")]
    Duplicate(String),
    /// A value that does not parse or is out of range.
    #[error("bad {key} '{value}': {reason}")]
    BadValue {
        /// The key.
        key: &'static str,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A feature list naming an unknown feature.
    #[error("bad features '{value}'")]
    Features {
        /// The value given.
        value: String,
        /// Which name was not understood.
        #[source]
        source: FeaturesError,
    },
}

impl FromStr for DeviceSpec {
    type Err = SpecError;

    fn from_str(spec: &str) -> Result<Self, SpecError> {
        let (kind, rest) = spec.split_once(':').unwrap_or((spec, ""));
        let items = key_values(rest)?;
        match kind.trim() {
            "membuf" => parse_membuf(&items).map(DeviceSpec::Membuf),
            "register" => parse_register(&items).map(DeviceSpec::Register),
            "lvu-sample" => parse_lvu_sample(&items).map(DeviceSpec::LvuSample),
            other => Err(SpecError::UnknownKind(other.to_owned())),
        }
    }
}

/// Splits `k=v,k=v`, refusing items without `=` and repeated keys.
fn key_values(rest: &str) -> Result<Vec<(&str, &str)>, SpecError> {
    let mut items: Vec<(&str, &str)> = Vec::new();
    for item in rest.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| SpecError::NotKeyValue(item.to_owned()))?;
        let (key, value) = (key.trim(), value.trim());
        if items.iter().any(|(k, _)| *k == key) {
            return Err(SpecError::Duplicate(key.to_owned()));
        }
        items.push((key, value));
    }
    Ok(items)
}

fn parse_membuf(items: &[(&str, &str)]) -> Result<MembufConfig, SpecError> {
    let mut config = MembufConfig::default();
    for &(key, value) in items {
        match key {
            "size" => config.size = parse_size("size", value)?,
            "dirty-rate" => config.dirty_rate = parse_size("dirty-rate", value)?,
            "features" => config.features = parse_features(value)?,
            "seed" => config.seed = parse_number("seed", value)?,
            "dma-logging" => {
                config.dma_logging = match value {
                    "on" | "true" | "yes" | "1" => true,
                    "off" | "false" | "no" | "0" => false,
                    _ => return Err(bad("dma-logging", value, "expected on or off")),
                }
            }
            "dma-window" => config.dma_window = parse_window(value)?,
            _ => {
                return Err(SpecError::UnknownKey {
                    kind: "membuf",
                    key: key.to_owned(),
                    valid: MEMBUF_KEYS,
                })
            }
        }
    }
    if let Err(e) = config.validate() {
        let (key, value) = if e.message().contains("DMA window") {
            ("dma-window", Window(config.dma_window).to_string())
        } else {
            ("size", Bytes(config.size).to_string())
        };
        return Err(bad(key, &value, e.message()));
    }
    Ok(config)
}

fn parse_register(items: &[(&str, &str)]) -> Result<RegisterConfig, SpecError> {
    let mut seed = 1;
    for &(key, value) in items {
        match key {
            "seed" => seed = parse_number("seed", value)?,
            _ => {
                return Err(SpecError::UnknownKey {
                    kind: "register",
                    key: key.to_owned(),
                    valid: REGISTER_KEYS,
                })
            }
        }
    }
    Ok(RegisterConfig { seed })
}

fn parse_lvu_sample(items: &[(&str, &str)]) -> Result<LvuSampleConfig, SpecError> {
    let mut config = LvuSampleConfig::default();
    for &(key, value) in items {
        match key {
            "bar1-size" => config.bar1_size = parse_size("bar1-size", value)?,
            _ => {
                return Err(SpecError::UnknownKey {
                    kind: "lvu-sample",
                    key: key.to_owned(),
                    valid: LVU_SAMPLE_KEYS,
                })
            }
        }
    }
    config.validate().map_err(|e| {
        bad(
            "bar1-size",
            &Bytes(config.bar1_size).to_string(),
            e.message(),
        )
    })?;
    Ok(config)
}

fn bad(key: &'static str, value: &str, reason: impl Into<String>) -> SpecError {
    SpecError::BadValue {
        key,
        value: value.to_owned(),
        reason: reason.into(),
    }
}

/// A decimal or `0x` hexadecimal u64.
fn parse_number(key: &'static str, value: &str) -> Result<u64, SpecError> {
    let parsed = match value
        .strip_prefix("0x")
        .or_else(|| value.strip_prefix("0X"))
    {
        Some(hex) => u64::from_str_radix(hex, 16),
        None => value.parse(),
    };
    parsed.map_err(|e| bad(key, value, format!("not a 64-bit number ({e})")))
}

/// A number with an optional K/M/G/T suffix (powers of 1024).
fn parse_size(key: &'static str, value: &str) -> Result<u64, SpecError> {
    let lower = value.to_ascii_lowercase();
    // `KiB` and `KB` read as `K`; a bare trailing `b` is a hex digit, not "bytes".
    let digits = lower
        .strip_suffix("ib")
        .or_else(|| {
            lower
                .strip_suffix('b')
                .filter(|d| d.ends_with(['k', 'm', 'g', 't']))
        })
        .unwrap_or(&lower);
    let (digits, shift) = match digits.as_bytes().last() {
        Some(b'k') => (&digits[..digits.len() - 1], 10),
        Some(b'm') => (&digits[..digits.len() - 1], 20),
        Some(b'g') => (&digits[..digits.len() - 1], 30),
        Some(b't') => (&digits[..digits.len() - 1], 40),
        _ => (digits, 0),
    };
    let n = parse_number(key, digits).map_err(|_| {
        bad(
            key,
            value,
            "expected a number with an optional K, M, G or T suffix",
        )
    })?;
    n.checked_mul(1 << shift)
        .ok_or_else(|| bad(key, value, "does not fit in 64 bits"))
}

fn parse_features(value: &str) -> Result<MigrationFeatures, SpecError> {
    if value.contains(',') {
        return Err(bad(
            "features",
            value,
            "join features with '+' inside a spec",
        ));
    }
    MigrationFeatures::parse_list(value).map_err(|source| SpecError::Features {
        value: value.to_owned(),
        source,
    })
}

fn parse_window(value: &str) -> Result<IovaRange, SpecError> {
    let (iova, length) = value.split_once('+').ok_or_else(|| {
        bad(
            "dma-window",
            value,
            "expected IOVA+LENGTH, e.g. 0x100000+64K",
        )
    })?;
    Ok(IovaRange {
        iova: parse_size("dma-window", iova.trim())?,
        length: parse_size("dma-window", length.trim())?,
    })
}

/// A byte count with the largest exact suffix: `256M`, `4K`, `1000`.
struct Bytes(u64);

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (shift, suffix) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
            let unit = 1u64 << shift;
            if self.0 >= unit && self.0 % unit == 0 {
                return write!(f, "{}{suffix}", self.0 / unit);
            }
        }
        write!(f, "{}", self.0)
    }
}

struct Window(IovaRange);

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#x}+{}", self.0.iova, Bytes(self.0.length))
    }
}

/// Optional features joined with `+`, or `stop-copy` when there are none.
struct Features(MigrationFeatures);

impl fmt::Display for Features {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self
            .0
            .iter()
            .filter(|&x| x != Feature::StopCopy)
            .map(Feature::name)
            .collect();
        if names.is_empty() {
            f.write_str(Feature::StopCopy.name())
        } else {
            f.write_str(&names.join("+"))
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Membuf(c) => {
                write!(
                    f,
                    "membuf:size={},dirty-rate={},features={},seed={}",
                    Bytes(c.size),
                    Bytes(c.dirty_rate),
                    Features(c.features),
                    c.seed
                )?;
                if !c.dma_logging {
                    f.write_str(",dma-logging=off")?;
                }
                if c.dma_window != crate::membuf::DEFAULT_DMA_WINDOW {
                    write!(f, ",dma-window={}", Window(c.dma_window))?;
                }
                Ok(())
            }
            DeviceSpec::Register(c) => write!(f, "register:seed={}", c.seed),
            DeviceSpec::LvuSample(c) => {
                write!(f, "{}:bar1-size={}", lvu_sample::KIND, Bytes(c.bar1_size))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn membuf(spec: &str) -> MembufConfig {
        match spec.parse::<DeviceSpec>().unwrap() {
            DeviceSpec::Membuf(c) => c,
            other => panic!("{spec} gave {other:?}"),
        }
    }

    fn err(spec: &str) -> String {
        spec.parse::<DeviceSpec>().unwrap_err().to_string()
    }

    #[test]
    fn the_architecture_example_parses() {
        let c = membuf("membuf:size=256M,dirty-rate=32M,features=p2p+pre-copy,seed=7");
        assert_eq!(
            c,
            MembufConfig {
                size: 256 << 20,
                dirty_rate: 32 << 20,
                features: MigrationFeatures::ALL,
                seed: 7,
                ..MembufConfig::default()
            }
        );
    }

    #[test]
    fn defaults_and_suffixes() {
        assert_eq!(membuf("membuf"), MembufConfig::default());
        assert_eq!(membuf("membuf:"), MembufConfig::default());
        let c = membuf("membuf:size=1G,dirty-rate=0,seed=0x10");
        assert_eq!((c.size, c.dirty_rate, c.seed), (1 << 30, 0, 16));
        assert_eq!(membuf("membuf:size=8k").size, 8192);
        assert_eq!(membuf("membuf:size=2MiB").size, 2 << 20);
        assert_eq!(membuf("membuf:size=2MB").size, 2 << 20);
        assert_eq!(membuf("membuf:size=0xb000").size, 0xb000);
        assert_eq!(membuf("membuf:size=12288").size, 12288);
        assert_eq!(membuf("membuf: size = 4K , seed = 3 ").seed, 3);
        assert_eq!(membuf("membuf:dirty-rate=1T").dirty_rate, 1 << 40);
    }

    #[test]
    fn feature_sets() {
        let f = |s: &str| membuf(&format!("membuf:features={s}")).features;
        assert_eq!(f("stop-copy"), MigrationFeatures::STOP_COPY);
        assert_eq!(f("p2p"), MigrationFeatures::P2P);
        assert_eq!(f("pre-copy"), MigrationFeatures::PRE_COPY);
        assert_eq!(f("pre-copy+p2p+stop-copy"), MigrationFeatures::ALL);
        assert_eq!(membuf("membuf").features, MigrationFeatures::ALL);
    }

    #[test]
    fn dma_keys() {
        let c = membuf("membuf:dma-logging=off,dma-window=0x100000+1M");
        assert!(!c.dma_logging);
        assert_eq!(
            c.dma_window,
            IovaRange {
                iova: 0x100000,
                length: 1 << 20
            }
        );
    }

    #[test]
    fn errors_say_what_is_valid() {
        assert_eq!(
            err("membof:size=1M"),
            "unknown device kind 'membof'; valid kinds: membuf, register, lvu-sample"
        );
        assert_eq!(
            err("membuf:sise=1M"),
            "unknown key 'sise' for a membuf device; valid keys: size, dirty-rate, features, seed, dma-logging, dma-window"
        );
        assert_eq!(
            err("register:size=1M"),
            "unknown key 'size' for a register device; valid keys: seed"
        );
        assert_eq!(err("membuf:size"), "'size' is not KEY=VALUE");
        assert_eq!(err("membuf:seed=1,seed=2"), "key 'seed' is given twice");
        assert!(err("membuf:size=12Q")
            .contains("expected a number with an optional K, M, G or T suffix"));
        assert!(err("membuf:size=100").contains("not a multiple of 4 KiB"));
        assert!(err("membuf:size=0").contains("bad size '0'"));
        assert!(err("membuf:size=16777216T").contains("does not fit in 64 bits"));
        assert!(err("membuf:seed=-1").contains("bad seed '-1'"));
        assert_eq!(
            err("membuf:features=p2p+precopy"),
            "bad features 'p2p+precopy'"
        );
        let e = "membuf:features=p2p+precopy"
            .parse::<DeviceSpec>()
            .unwrap_err();
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(source.contains("unknown feature 'precopy'"), "{source}");
        assert!(err("membuf:dma-logging=maybe").contains("expected on or off"));
        assert!(err("membuf:dma-window=0x1000").contains("expected IOVA+LENGTH"));
        assert!(err("membuf:dma-window=0xffffffffffffffff+8K").contains("overflows"));
    }

    #[test]
    fn display_is_canonical() {
        let spec: DeviceSpec = "membuf:seed=7,features=p2p,size=1024K".parse().unwrap();
        assert_eq!(
            spec.to_string(),
            "membuf:size=1M,dirty-rate=0,features=p2p,seed=7"
        );
        let still: DeviceSpec = "membuf:features=stop-copy,size=12K,dirty-rate=1000"
            .parse()
            .unwrap();
        assert_eq!(
            still.to_string(),
            "membuf:size=12K,dirty-rate=1000,features=stop-copy,seed=1"
        );
        assert_eq!(spec.kind(), "membuf");
    }

    #[test]
    fn register_specs() {
        let spec: DeviceSpec = "register:seed=9".parse().unwrap();
        assert_eq!(spec.kind(), "register");
        assert_eq!(spec.to_string(), "register:seed=9");
        let DeviceSpec::Register(c) = "register".parse().unwrap() else {
            panic!("not a register spec")
        };
        assert_eq!(c.seed, 1);
    }

    #[test]
    fn lvu_sample_specs() {
        let spec: DeviceSpec = "lvu-sample".parse().unwrap();
        assert_eq!(spec, DeviceSpec::LvuSample(LvuSampleConfig::default()));
        assert_eq!(spec.kind(), "lvu-sample");
        assert_eq!(spec.to_string(), "lvu-sample:bar1-size=16K");
        assert!(spec.dma_logging());
        let big: DeviceSpec = "lvu-sample:bar1-size=32K".parse().unwrap();
        assert_eq!(big.to_string().parse::<DeviceSpec>().unwrap(), big);
        assert!(err("lvu-sample:bar1-size=12K").contains("power of two"));
        assert!(err("lvu-sample:bar1-size=8K").contains("power of two"));
        assert_eq!(
            err("lvu-sample:seed=1"),
            "unknown key 'seed' for a lvu-sample device; valid keys: bar1-size"
        );
        let hosted = spec.build().unwrap();
        assert_eq!(hosted.migration.identity().unwrap().kind, "lvu-sample");
        assert!(hosted.regions.host_link().is_some());
        assert!(hosted.regions.region_mmap(1).is_some());
        assert!(hosted.regions.region_mmap(0).is_none());
    }

    #[test]
    fn specs_build_hostable_devices() {
        let hosted = "membuf:size=64K,seed=3"
            .parse::<DeviceSpec>()
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(hosted.migration.identity().unwrap().kind, "membuf");
        let mut size = [0u8; 8];
        hosted.regions.region_read(0, 8, &mut size).unwrap();
        assert_eq!(u64::from_le_bytes(size), 64 * 1024);
        assert!(hosted.membuf.is_some());
        let hosted = "register:seed=3"
            .parse::<DeviceSpec>()
            .unwrap()
            .build()
            .unwrap();
        assert_eq!(
            hosted.migration.features().unwrap(),
            MigrationFeatures::STOP_COPY
        );
        assert!(hosted.membuf.is_none());
        assert!(!hosted.regions.regions().is_empty());
    }

    proptest! {
        #[test]
        fn display_round_trips(
            pages in 1u64..(1 << 28),
            rate in any::<u64>(),
            set in 0usize..4,
            seed in any::<u64>(),
            logging in any::<bool>(),
            iova in any::<u32>(),
            length in 0u64..(1 << 32),
        ) {
            let config = MembufConfig {
                size: pages * 4096,
                dirty_rate: rate,
                features: MigrationFeatures::VALID_SETS[set],
                seed,
                dma_logging: logging,
                dma_window: IovaRange { iova: u64::from(iova), length },
            };
            let spec = DeviceSpec::Membuf(config);
            let text = spec.to_string();
            prop_assert_eq!(text.parse::<DeviceSpec>().unwrap(), spec, "{}", text);
        }

        #[test]
        fn register_display_round_trips(seed in any::<u64>()) {
            let spec = DeviceSpec::Register(RegisterConfig { seed });
            prop_assert_eq!(spec.to_string().parse::<DeviceSpec>().unwrap(), spec);
        }
    }
}
