//! The addresses of the command line (architecture.md, "Device addresses"): parsing every
//! form, narrowing to what a position accepts, and opening devices.
//!
//! | form | what |
//! |---|---|
//! | `vfio-user:PATH` | a vfio-user server's UNIX socket |
//! | `vfio:/dev/vfio/devices/vfioN` | a kernel VFIO device (cdev) |
//! | `vfio:0000:01:00.0` | a kernel VFIO PCI device by its sysfs address (`01:00.0` means domain 0) |
//! | `vfio:<uuid>` | a kernel VFIO mediated device |
//! | `file:PATH` | a saved migration stream |
//! | `tcp:HOST:PORT`, `unix:PATH` | a `vfio-mig receive` (or where it listens) |
//!
//! Parse errors are clap `value_parser` errors (exit 2) that list the valid forms. The
//! kernel VFIO forms parse and are checked, but opening them fails (exit 1): the kernel
//! backend is not in this build yet.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use vfio_mig_device::MigrationDevice;
use vfio_mig_orchestrator::{Address as TransportAddress, NamedDevice};
use vfio_mig_vfio_user::client::{Client, ClientError, ClientOptions, RemoteDevice};
use vfio_mig_vfio_user::socket::SocketError;

/// The device forms, for error messages.
pub const DEVICE_FORMS: &str =
    "vfio-user:PATH, vfio:/dev/vfio/devices/vfioN, vfio:DDDD:BB:DD.F (PCI), vfio:UUID (mdev)";

/// Every form, for error messages.
pub const ALL_FORMS: &str = "vfio-user:PATH, vfio:/dev/vfio/devices/vfioN, vfio:DDDD:BB:DD.F, \
     vfio:UUID, file:PATH, tcp:HOST:PORT, unix:PATH";

/// How long one vfio-user request may go unanswered. Long enough for the slowest device
/// operation of the emulated devices (resetting or validating gigabytes), short enough that
/// a server busy with another client (vfio-user servers serve one at a time) is reported.
pub const VFIO_USER_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a string is not an address this position accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AddressError {
    input: String,
    reason: String,
    expected: &'static str,
}

impl AddressError {
    pub(crate) fn new(input: &str, reason: impl Into<String>, expected: &'static str) -> Self {
        AddressError {
            input: input.to_owned(),
            reason: reason.into(),
            expected,
        }
    }
}

impl fmt::Display for AddressError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "bad address '{}': {}; expected {}",
            self.input, self.reason, self.expected
        )
    }
}

impl std::error::Error for AddressError {}

/// A PCI address as sysfs spells it: `DDDD:BB:DD.F`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PciAddress {
    /// PCI domain (segment).
    pub domain: u16,
    /// Bus.
    pub bus: u8,
    /// Device, 0 to 31.
    pub device: u8,
    /// Function, 0 to 7.
    pub function: u8,
}

impl PciAddress {
    /// Parses `DDDD:BB:DD.F` or `BB:DD.F` (domain 0), hex digits, either case.
    fn parse(s: &str) -> Option<PciAddress> {
        let hex = |part: &str, max_len: usize| -> Option<u32> {
            if part.is_empty()
                || part.len() > max_len
                || !part.bytes().all(|b| b.is_ascii_hexdigit())
            {
                return None;
            }
            u32::from_str_radix(part, 16).ok()
        };
        let (rest, function) = s.rsplit_once('.')?;
        let parts: Vec<&str> = rest.split(':').collect();
        let (domain, bus, device) = match parts.as_slice() {
            [d, b, dev] if d.len() == 4 => (hex(d, 4)?, *b, *dev),
            [b, dev] => (0, *b, *dev),
            _ => return None,
        };
        let (bus, device, function) =
            (hex_exact(bus, 2)?, hex_exact(device, 2)?, hex(function, 1)?);
        if device > 0x1f || function > 7 {
            return None;
        }
        Some(PciAddress {
            domain: domain as u16,
            bus: bus as u8,
            device: device as u8,
            function: function as u8,
        })
    }
}

/// `len` hex digits exactly.
fn hex_exact(part: &str, len: usize) -> Option<u32> {
    if part.len() != len || !part.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u32::from_str_radix(part, 16).ok()
}

impl fmt::Display for PciAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:04x}:{:02x}:{:02x}.{:x}",
            self.domain, self.bus, self.device, self.function
        )
    }
}

/// A kernel VFIO device, as `vfio:` names it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum KernelDevice {
    /// A VFIO device cdev, `/dev/vfio/devices/vfioN`.
    Cdev(PathBuf),
    /// A PCI device found through sysfs.
    Pci(PciAddress),
    /// A mediated device by its UUID (lower case).
    Mdev(String),
}

impl fmt::Display for KernelDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KernelDevice::Cdev(p) => write!(f, "{}", p.display()),
            KernelDevice::Pci(a) => write!(f, "{a}"),
            KernelDevice::Mdev(u) => f.write_str(u),
        }
    }
}

/// Whether `s` is a UUID `8-4-4-4-12` in hex.
fn is_uuid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, len)| g.len() == len && g.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl KernelDevice {
    fn parse(input: &str, rest: &str) -> Result<KernelDevice, AddressError> {
        let bad = |reason: &str| AddressError::new(input, reason, DEVICE_FORMS);
        if rest.is_empty() {
            return Err(bad("vfio: needs a device after it"));
        }
        if rest.starts_with('/') {
            let path = Path::new(rest);
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            let number = name.strip_prefix("vfio").unwrap_or("");
            if number.is_empty() || !number.bytes().all(|b| b.is_ascii_digit()) {
                return Err(bad(
                    "a VFIO device cdev path ends in vfioN (e.g. /dev/vfio/devices/vfio0)",
                ));
            }
            return Ok(KernelDevice::Cdev(path.to_path_buf()));
        }
        if is_uuid(rest) {
            return Ok(KernelDevice::Mdev(rest.to_ascii_lowercase()));
        }
        PciAddress::parse(rest).map(KernelDevice::Pci).ok_or_else(|| {
            bad("not a cdev path, a PCI address DDDD:BB:DD.F (device <= 1f, function <= 7) or an mdev UUID")
        })
    }
}

/// A device a command can open.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum DeviceAddress {
    /// A vfio-user server's socket.
    VfioUser(PathBuf),
    /// A kernel VFIO device.
    Vfio(KernelDevice),
}

impl fmt::Display for DeviceAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceAddress::VfioUser(p) => write!(f, "vfio-user:{}", p.display()),
            DeviceAddress::Vfio(k) => write!(f, "vfio:{k}"),
        }
    }
}

/// Any address of the command line.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum AnyAddress {
    /// A device.
    Device(DeviceAddress),
    /// A stream's place: `file:`, `tcp:` or `unix:`.
    Transport(TransportAddress),
}

impl FromStr for AnyAddress {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, AddressError> {
        let Some((scheme, rest)) = input.split_once(':') else {
            return Err(AddressError::new(input, "no scheme", ALL_FORMS));
        };
        match scheme {
            "vfio-user" => {
                if rest.is_empty() {
                    return Err(AddressError::new(
                        input,
                        "vfio-user: needs a socket path",
                        DEVICE_FORMS,
                    ));
                }
                Ok(AnyAddress::Device(DeviceAddress::VfioUser(rest.into())))
            }
            "vfio" => {
                KernelDevice::parse(input, rest).map(|k| AnyAddress::Device(DeviceAddress::Vfio(k)))
            }
            "file" | "tcp" | "unix" => input
                .parse::<TransportAddress>()
                .map(AnyAddress::Transport)
                .map_err(|e| AddressError::new(input, e.to_string(), ALL_FORMS)),
            other => Err(AddressError::new(
                input,
                format!("unknown scheme '{other}:'"),
                ALL_FORMS,
            )),
        }
    }
}

impl FromStr for DeviceAddress {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, AddressError> {
        match input.parse::<AnyAddress>() {
            Ok(AnyAddress::Device(d)) => Ok(d),
            Ok(AnyAddress::Transport(t)) => Err(AddressError::new(
                input,
                format!("{} is a stream address, not a device", scheme_of(&t)),
                DEVICE_FORMS,
            )),
            Err(e) => Err(AddressError {
                expected: DEVICE_FORMS,
                ..e
            }),
        }
    }
}

fn scheme_of(t: &TransportAddress) -> &'static str {
    match t {
        TransportAddress::File(_) => "file:",
        TransportAddress::Unix(_) => "unix:",
        TransportAddress::Tcp { .. } => "tcp:",
    }
}

/// A saved stream, `file:PATH`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileAddress(pub PathBuf);

impl FromStr for FileAddress {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, AddressError> {
        match input.parse::<AnyAddress>() {
            Ok(AnyAddress::Transport(TransportAddress::File(p))) => Ok(FileAddress(p)),
            Ok(_) => Err(AddressError::new(input, "not a file: address", "file:PATH")),
            Err(e) => Err(AddressError {
                expected: "file:PATH",
                ..e
            }),
        }
    }
}

impl fmt::Display for FileAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "file:{}", self.0.display())
    }
}

/// Where a `receive` listens, or where `migrate` finds one: `tcp:HOST:PORT` or `unix:PATH`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct RemoteAddress(pub TransportAddress);

/// The forms of a [`RemoteAddress`].
const REMOTE_FORMS: &str = "tcp:HOST:PORT or unix:PATH";

impl FromStr for RemoteAddress {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, AddressError> {
        match input.parse::<AnyAddress>() {
            Ok(AnyAddress::Transport(
                t @ (TransportAddress::Tcp { .. } | TransportAddress::Unix(_)),
            )) => Ok(RemoteAddress(t)),
            Ok(_) => Err(AddressError::new(
                input,
                "not a network address",
                REMOTE_FORMS,
            )),
            Err(e) => Err(AddressError {
                expected: REMOTE_FORMS,
                ..e
            }),
        }
    }
}

impl fmt::Display for RemoteAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// What `migrate` migrates into: a device, or a `vfio-mig receive` elsewhere.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// A device this process opens (both engines run here).
    Device(DeviceAddress),
    /// A `vfio-mig receive` listening there.
    Remote(RemoteAddress),
}

/// The forms of a [`Destination`].
const DESTINATION_FORMS: &str = "a device (vfio-user:PATH, vfio:...) or tcp:HOST:PORT / unix:PATH \
     of a `vfio-mig receive`";

impl FromStr for Destination {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, AddressError> {
        match input.parse::<AnyAddress>() {
            Ok(AnyAddress::Device(d)) => Ok(Destination::Device(d)),
            Ok(AnyAddress::Transport(TransportAddress::File(_))) => Err(AddressError::new(
                input,
                "migrate does not write files (use save)",
                DESTINATION_FORMS,
            )),
            Ok(AnyAddress::Transport(t)) => Ok(Destination::Remote(RemoteAddress(t))),
            Err(e) => Err(AddressError {
                expected: DESTINATION_FORMS,
                ..e
            }),
        }
    }
}

impl fmt::Display for Destination {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Destination::Device(d) => d.fmt(f),
            Destination::Remote(r) => r.fmt(f),
        }
    }
}

/// An opened device: its [`MigrationDevice`] and, for vfio-user, the connection (for region
/// reads such as membuf's registers).
#[derive(Clone)]
pub struct OpenDevice {
    /// Where it was opened.
    pub address: DeviceAddress,
    /// The user's view of it.
    pub device: Arc<dyn MigrationDevice>,
    /// The vfio-user connection, for a `vfio-user:` device.
    pub client: Option<Arc<Client>>,
}

impl fmt::Debug for OpenDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("OpenDevice")
            .field("address", &self.address)
            .field("client", &self.client)
            .finish_non_exhaustive()
    }
}

/// membuf's BAR0 register block (architecture.md, "The membuf emulated device").
pub mod membuf {
    /// The device kind membuf announces.
    pub const KIND: &str = "membuf";
    /// The kind a client derives from membuf's PCI vendor and device ids.
    pub const PCI_KIND: &str = "pci:1b36:11f0";
    /// The region holding the registers.
    pub const BAR0: u32 = 0;
    /// `VFIOMIG1` at 0x00.
    pub const MAGIC: [u8; 8] = *b"VFIOMIG1";
    /// State size at 0x08.
    pub const REG_SIZE: u64 = 0x08;
    /// Digest of the whole state at 0x10, computed when read.
    pub const REG_DIGEST: u64 = 0x10;
    /// Count of state mutations since power-on, reset or resume, at 0x18.
    pub const REG_GENERATION: u64 = 0x18;
    /// Dirty rate in bytes per second at 0x20.
    pub const REG_DIRTY_RATE: u64 = 0x20;
}

/// Serializes a 64-bit value as the string `0x%016x`: many JSON readers lose precision in
/// numbers above 2^53.
pub fn hex_u64<S: serde::Serializer>(value: &u64, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{value:#018x}"))
}

/// membuf's registers as read at one moment.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct MembufRegisters {
    /// State size in bytes.
    pub size: u64,
    /// Digest of the whole state (JSON: a hex string).
    #[serde(serialize_with = "hex_u64")]
    pub digest: u64,
    /// State mutations so far (0 after a resume until the device changes its state).
    pub generation: u64,
    /// Bytes rewritten per second while running.
    pub dirty_rate: u64,
}

/// A digest read between two reads of the generation register: when both are equal, no
/// mutation happened while the digest was computed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DigestReading {
    /// The digest (JSON: a hex string).
    #[serde(serialize_with = "hex_u64")]
    pub digest: u64,
    /// Generation before the digest was read.
    pub generation_before: u64,
    /// Generation after.
    pub generation_after: u64,
}

impl DigestReading {
    /// Whether the digest covers a state the device had not changed since power-on, reset
    /// or resume (no mutation before or during the read).
    pub fn untouched_since_resume(&self) -> bool {
        self.generation_before == 0 && self.generation_after == 0
    }
}

impl OpenDevice {
    /// The device as the orchestrator names it (by its address).
    pub fn named(&self) -> NamedDevice {
        NamedDevice::new(self.address.to_string(), Arc::clone(&self.device))
    }

    /// Whether the device is a membuf: it names itself one (kind `membuf`, or membuf's PCI
    /// ids `pci:1b36:11f0` from a server without the vfio-mig extension) and region 0 starts
    /// with the magic. BAR0 of any other device is never read: reads of a real device's
    /// registers may have side effects.
    pub fn is_membuf(&self) -> bool {
        let Some(client) = &self.client else {
            return false;
        };
        let named = self
            .device
            .identity()
            .is_ok_and(|id| id.kind == membuf::KIND || id.kind == membuf::PCI_KIND);
        let mut magic = [0u8; 8];
        named && client.region_read(membuf::BAR0, 0, &mut magic).is_ok() && magic == membuf::MAGIC
    }

    fn register(&self, offset: u64) -> anyhow::Result<u64> {
        let client = self
            .client
            .as_ref()
            .context("no region access to this device")?;
        let mut bytes = [0u8; 8];
        client
            .region_read(membuf::BAR0, offset, &mut bytes)
            .with_context(|| format!("reading BAR0 register {offset:#x} of {}", self.address))?;
        Ok(u64::from_le_bytes(bytes))
    }

    /// All of membuf's registers, if the device is a membuf (by its magic).
    pub fn membuf_registers(&self) -> anyhow::Result<Option<MembufRegisters>> {
        if !self.is_membuf() {
            return Ok(None);
        }
        Ok(Some(MembufRegisters {
            size: self.register(membuf::REG_SIZE)?,
            digest: self.register(membuf::REG_DIGEST)?,
            generation: self.register(membuf::REG_GENERATION)?,
            dirty_rate: self.register(membuf::REG_DIRTY_RATE)?,
        }))
    }

    /// The state digest, bracketed by generation reads (call only on a membuf).
    pub fn digest(&self) -> anyhow::Result<DigestReading> {
        let generation_before = self.register(membuf::REG_GENERATION)?;
        let digest = self.register(membuf::REG_DIGEST)?;
        let generation_after = self.register(membuf::REG_GENERATION)?;
        Ok(DigestReading {
            digest,
            generation_before,
            generation_after,
        })
    }
}

impl DeviceAddress {
    /// Opens the device: connects and negotiates for `vfio-user:`; the kernel backend is not
    /// in this build, so `vfio:` fails (exit 1).
    pub fn open(&self) -> anyhow::Result<OpenDevice> {
        match self {
            DeviceAddress::VfioUser(path) => {
                let options = ClientOptions {
                    timeout: Some(VFIO_USER_TIMEOUT),
                    ..ClientOptions::default()
                };
                let client =
                    Client::connect_with(path, options).map_err(|e| connect_failed(self, e))?;
                let client = Arc::new(client);
                let device: Arc<dyn MigrationDevice> =
                    Arc::new(RemoteDevice::new(Arc::clone(&client)));
                Ok(OpenDevice {
                    address: self.clone(),
                    device,
                    client: Some(client),
                })
            }
            DeviceAddress::Vfio(_) => anyhow::bail!(
                "cannot open {self}: the kernel VFIO backend is not available in this build yet"
            ),
        }
    }
}

/// The error of a failed vfio-user connection: the reason in the one line, with a hint
/// when the server did not answer (it serves one client at a time).
fn connect_failed(address: &DeviceAddress, err: ClientError) -> anyhow::Error {
    let timed_out = matches!(
        &err,
        ClientError::Socket(SocketError::Io(e))
            if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut)
    );
    let line = if timed_out {
        format!(
            "cannot connect to {address}: no answer within {} s (a vfio-user server serves one \
             client at a time: is another one connected?)",
            VFIO_USER_TIMEOUT.as_secs()
        )
    } else {
        let mut root: &dyn std::error::Error = &err;
        while let Some(cause) = root.source() {
            root = cause;
        }
        format!("cannot connect to {address}: {root}")
    };
    anyhow::Error::new(err).context(line)
}

/// Opens every device, in order.
pub fn open_all(addresses: &[DeviceAddress]) -> anyhow::Result<Vec<OpenDevice>> {
    addresses.iter().map(DeviceAddress::open).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(s: &str) -> DeviceAddress {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    #[test]
    fn parses_every_device_form_and_prints_it_back() {
        for (text, expected) in [
            (
                "vfio-user:/tmp/a.sock",
                DeviceAddress::VfioUser("/tmp/a.sock".into()),
            ),
            (
                "vfio-user:rel/b.sock",
                DeviceAddress::VfioUser("rel/b.sock".into()),
            ),
            (
                "vfio:/dev/vfio/devices/vfio0",
                DeviceAddress::Vfio(KernelDevice::Cdev("/dev/vfio/devices/vfio0".into())),
            ),
            (
                "vfio:0000:01:00.0",
                DeviceAddress::Vfio(KernelDevice::Pci(PciAddress {
                    domain: 0,
                    bus: 1,
                    device: 0,
                    function: 0,
                })),
            ),
            (
                "vfio:10de:af:1f.7",
                DeviceAddress::Vfio(KernelDevice::Pci(PciAddress {
                    domain: 0x10de,
                    bus: 0xaf,
                    device: 0x1f,
                    function: 7,
                })),
            ),
            (
                "vfio:c4a6a6b4-2a39-4b64-8d6c-0f4a7e1c9b21",
                DeviceAddress::Vfio(KernelDevice::Mdev(
                    "c4a6a6b4-2a39-4b64-8d6c-0f4a7e1c9b21".into(),
                )),
            ),
        ] {
            let parsed = device(text);
            assert_eq!(parsed, expected, "{text}");
            assert_eq!(parsed.to_string(), text);
        }
        // Short and upper-case spellings are normalised.
        assert_eq!(device("vfio:01:00.1").to_string(), "vfio:0000:01:00.1");
        assert_eq!(
            device("vfio:C4A6A6B4-2A39-4B64-8D6C-0F4A7E1C9B21").to_string(),
            "vfio:c4a6a6b4-2a39-4b64-8d6c-0f4a7e1c9b21"
        );
    }

    #[test]
    fn rejects_malformed_devices_listing_the_forms() {
        for bad in [
            "",
            "/tmp/a.sock",
            "vfio-user:",
            "vfio:",
            "vfio:/dev/vfio/devices/vfio",
            "vfio:/dev/vfio/devices/vfiox",
            "vfio:/dev/sda",
            "vfio:0000:01:00",
            "vfio:0000:01:20.0",
            "vfio:0000:01:00.8",
            "vfio:000:01:00.0",
            "vfio:0000:1:00.0",
            "vfio:0000:01:00.0.0",
            "vfio:g000:01:00.0",
            "vfio:c4a6a6b4-2a39-4b64-8d6c-0f4a7e1c9b2",
            "vfio:c4a6a6b4-2a39-4b64-8d6c-0f4a7e1c9b2z",
            "vfio-usr:/tmp/a.sock",
            "pci:0000:01:00.0",
            "file:/tmp/x",
            "tcp:host:1",
        ] {
            let err = bad.parse::<DeviceAddress>().unwrap_err().to_string();
            assert!(err.contains("vfio-user:PATH"), "{bad}: {err}");
            assert!(err.contains(&format!("'{bad}'")), "{bad}: {err}");
        }
        let err = "file:/x".parse::<DeviceAddress>().unwrap_err().to_string();
        assert!(err.contains("stream address, not a device"), "{err}");
        let err = "nfs:/x".parse::<DeviceAddress>().unwrap_err().to_string();
        assert!(err.contains("unknown scheme 'nfs:'"), "{err}");
    }

    #[test]
    fn narrows_to_what_each_position_takes() {
        assert_eq!(
            "file:/tmp/s".parse::<FileAddress>().unwrap(),
            FileAddress("/tmp/s".into())
        );
        assert!("tcp:h:1".parse::<FileAddress>().is_err());
        assert!("vfio-user:/s".parse::<FileAddress>().is_err());
        assert!("file:".parse::<FileAddress>().is_err());

        assert_eq!(
            "tcp:127.0.0.1:0"
                .parse::<RemoteAddress>()
                .unwrap()
                .to_string(),
            "tcp:127.0.0.1:0"
        );
        assert!("unix:/run/r.sock".parse::<RemoteAddress>().is_ok());
        assert!("file:/x".parse::<RemoteAddress>().is_err());
        assert!("tcp:host".parse::<RemoteAddress>().is_err());
        assert!("tcp:host:70000".parse::<RemoteAddress>().is_err());

        assert_eq!(
            "vfio-user:/b".parse::<Destination>().unwrap(),
            Destination::Device(DeviceAddress::VfioUser("/b".into()))
        );
        assert!(matches!(
            "tcp:[::1]:4444".parse::<Destination>().unwrap(),
            Destination::Remote(_)
        ));
        let err = "file:/x".parse::<Destination>().unwrap_err().to_string();
        assert!(err.contains("use save"), "{err}");

        assert!(matches!(
            "file:/x".parse::<AnyAddress>().unwrap(),
            AnyAddress::Transport(TransportAddress::File(_))
        ));
        assert!(matches!(
            "vfio:01:00.0".parse::<AnyAddress>().unwrap(),
            AnyAddress::Device(_)
        ));
    }

    #[test]
    fn kernel_devices_parse_but_do_not_open_yet() {
        for text in [
            "vfio:/dev/vfio/devices/vfio3",
            "vfio:0000:01:00.0",
            "vfio:c4a6a6b4-2a39-4b64-8d6c-0f4a7e1c9b21",
        ] {
            let err = device(text).open().unwrap_err().to_string();
            assert!(
                err.contains("kernel VFIO backend is not available in this build yet"),
                "{err}"
            );
            assert!(err.contains(text), "{err}");
        }
    }

    #[test]
    fn a_missing_vfio_user_socket_fails_to_open() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("none.sock");
        let err = DeviceAddress::VfioUser(path).open().unwrap_err();
        assert!(
            err.to_string().contains("cannot connect to vfio-user:"),
            "{err}"
        );
        assert_eq!(crate::exit::Exit::of(&err), crate::exit::Exit::Failed);
    }

    #[test]
    fn a_silent_server_gets_a_hint_other_failures_their_reason() {
        let addr = DeviceAddress::VfioUser("/run/x.sock".into());
        let silent = ClientError::Socket(SocketError::Io(io::ErrorKind::WouldBlock.into()));
        let line = connect_failed(&addr, silent).to_string();
        assert!(line.starts_with("cannot connect to vfio-user:/run/x.sock: no answer within 30 s"));
        assert!(line.contains("one client at a time"), "{line}");
        let refused = ClientError::Socket(SocketError::Io(io::ErrorKind::ConnectionRefused.into()));
        let line = connect_failed(&addr, refused).to_string();
        assert!(
            line.starts_with("cannot connect to vfio-user:/run/x.sock: "),
            "{line}"
        );
        assert!(line.to_lowercase().contains("refused"), "{line}");
        assert!(!line.contains("one client at a time"), "{line}");
    }

    #[test]
    fn digest_readings_know_whether_the_state_moved() {
        let still = DigestReading {
            digest: 1,
            generation_before: 0,
            generation_after: 0,
        };
        assert!(still.untouched_since_resume());
        let moved = DigestReading {
            generation_after: 3,
            ..still
        };
        assert!(!moved.untouched_since_resume());
    }
}
