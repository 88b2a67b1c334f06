//! vfio-mig's extensions of the vfio-user protocol, and how both sides agree on them.
//!
//! Every extension is used only when both peers announced it, so standard peers
//! (libvfio-user, QEMU) never see anything new:
//!
//! * **Announcement**: a `"vfio-mig"` object among the VERSION capabilities. The client sends
//!   `{"version": 1}`; a vfio-mig server answers with its own object (version, the features
//!   below, and the device's identity) only if the client's VERSION had one.
//! * **Precopy info**: DEVICE_FEATURE index [`FEATURE_PRECOPY_INFO`] (GET only), reply data
//!   `{u64 initial_bytes, u64 dirty_bytes}` little-endian; `EINVAL` outside PRE_COPY and
//!   PRE_COPY_P2P; `ENOTTY` (like any unknown feature) when not negotiated.
//! * **Whole messages**: a server announcing `"whole_messages": true` reads every message
//!   whole, so a client may send up to the server's `max_data_xfer_size` in one message.
//!   Otherwise client-to-server payloads stay at or below [`LEGACY_MAX_PAYLOAD`] (libvfio-user's
//!   server reads a message body with one `recv` and loses its place on a short read).
//! * **Identity**: `"identity": {"kind", "version", "compat": "<hex>"}` is the device's
//!   [`DeviceIdentity`].
//! * **Shared data buffer**: a server announcing `"shared_data": true` takes a shared memory
//!   buffer from the client (DEVICE_FEATURE [`FEATURE_DATA_BUFFER`], SET with the buffer's
//!   fd) and then moves migration data through it instead of through messages:
//!   [`FEATURE_DATA_READ_SHARED`] (GET) is MIG_DATA_READ into the buffer,
//!   [`FEATURE_DATA_WRITE_SHARED`] (SET) is MIG_DATA_WRITE from it. A client that registers one
//!   buffer with two servers moves a device's state from one to the other without touching it.
//!
//! Plain uAPI behaviour needs no negotiation: P2P states when MIGRATION GET reports P2P, and
//! MIG_DATA_SIZE (index 9), which a client tries and falls back from (`ENOTTY`).
//!
//! `docs/vfio-user-extensions.md` describes the wire formats in full.

use serde::{Deserialize, Serialize};
use vfio_mig_device::{DeviceIdentity, PrecopyInfo};

use crate::codec::{CodecError, Version};

/// The capability key of the extension object.
pub const EXTENSION_KEY: &str = "vfio-mig";

/// The extension version this implementation speaks.
pub const EXTENSION_VERSION: u32 = 1;

/// DEVICE_FEATURE index of precopy info (`VFIO_USER_MIG_FEATURE_PRECOPY_INFO`): in the
/// range the kernel leaves unused, GET only.
pub const FEATURE_PRECOPY_INFO: u16 = 0xF001;

/// Size of the precopy info data: `{u64 initial_bytes, u64 dirty_bytes}`.
pub const PRECOPY_INFO_LEN: usize = 16;

/// DEVICE_FEATURE index that registers the shared data buffer (SET, with its fd) or forgets
/// it (SET, size 0, no fd). Data: [`DataBufferRegistration`].
pub const FEATURE_DATA_BUFFER: u16 = 0xF002;

/// DEVICE_FEATURE index of MIG_DATA_READ into the shared data buffer (GET). Request and reply
/// data: [`SharedTransfer`], the reply's `count` saying how many bytes were placed.
pub const FEATURE_DATA_READ_SHARED: u16 = 0xF003;

/// DEVICE_FEATURE index of MIG_DATA_WRITE from the shared data buffer (SET). Data:
/// [`SharedTransfer`] with `count` 0.
pub const FEATURE_DATA_WRITE_SHARED: u16 = 0xF004;

/// Size of [`DataBufferRegistration`] and [`SharedTransfer`] on the wire.
pub const SHARED_DATA_LEN: usize = 16;

/// Largest shared data buffer a server maps (1 GiB): it is the client's memory, so this only
/// bounds the server's address space, not its allocations.
pub const MAX_DATA_BUFFER: u64 = 1 << 30;

/// Largest client-to-server payload sent to a server that did not announce whole-message
/// reads (32 KiB: what fits one AF_UNIX buffer on the receiving side).
pub const LEGACY_MAX_PAYLOAD: u32 = 32 * 1024;

/// The `"vfio-mig"` capability object. Absent keys mean "not offered".
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VfioMigCapability {
    /// Extension version; [`EXTENSION_VERSION`].
    pub version: u32,
    /// Server: answers DEVICE_FEATURE [`FEATURE_PRECOPY_INFO`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precopy_info: Option<bool>,
    /// Server: reads every message whole, whatever its size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole_messages: Option<bool>,
    /// Server: takes a shared data buffer and moves migration data through it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shared_data: Option<bool>,
    /// Server: the device's identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<IdentityCapability>,
}

/// A [`DeviceIdentity`] on the wire: compatibility data as lower-case hex.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdentityCapability {
    /// Device kind.
    pub kind: String,
    /// State format version.
    pub version: String,
    /// Compatibility data, hex.
    pub compat: String,
}

/// The extension object of a peer's VERSION is not what this implementation understands.
#[derive(Debug, thiserror::Error)]
pub enum ExtensionError {
    /// The object does not have the expected shape.
    #[error("malformed \"vfio-mig\" capability")]
    Malformed(#[source] serde_json::Error),
    /// The identity's compatibility data is not hex.
    #[error("\"vfio-mig\" identity compat is not hex")]
    BadCompat(#[source] hex::FromHexError),
}

impl VfioMigCapability {
    /// What a client announces: just the version.
    pub fn client() -> Self {
        VfioMigCapability {
            version: EXTENSION_VERSION,
            ..VfioMigCapability::default()
        }
    }

    /// What a vfio-mig server announces for a device.
    pub fn server(identity: &DeviceIdentity) -> Self {
        VfioMigCapability {
            version: EXTENSION_VERSION,
            precopy_info: Some(true),
            whole_messages: Some(true),
            shared_data: Some(true),
            identity: Some(IdentityCapability::from(identity)),
        }
    }

    /// The extension object of a received VERSION payload; `None` when the peer sent none.
    pub fn from_version(version: &Version<'_>) -> Result<Option<Self>, ExtensionError> {
        version
            .capability_value(EXTENSION_KEY)
            .map(|v| serde_json::from_value(v).map_err(ExtensionError::Malformed))
            .transpose()
    }

    /// The capabilities map entry to pass to [`Version::with_extensions`].
    pub fn to_extensions(&self) -> Result<serde_json::Map<String, serde_json::Value>, CodecError> {
        let mut map = serde_json::Map::new();
        map.insert(
            EXTENSION_KEY.to_owned(),
            serde_json::to_value(self).map_err(CodecError::BadJson)?,
        );
        Ok(map)
    }

    /// Whether precopy info was offered.
    pub fn offers_precopy_info(&self) -> bool {
        self.precopy_info == Some(true)
    }

    /// Whether whole-message reads were offered.
    pub fn offers_whole_messages(&self) -> bool {
        self.whole_messages == Some(true)
    }

    /// Whether the shared data buffer was offered.
    pub fn offers_shared_data(&self) -> bool {
        self.shared_data == Some(true)
    }

    /// The identity offered, decoded.
    pub fn device_identity(&self) -> Result<Option<DeviceIdentity>, ExtensionError> {
        self.identity
            .as_ref()
            .map(DeviceIdentity::try_from)
            .transpose()
    }
}

impl From<&DeviceIdentity> for IdentityCapability {
    fn from(id: &DeviceIdentity) -> Self {
        IdentityCapability {
            kind: id.kind.clone(),
            version: id.version.clone(),
            compat: hex::encode(&id.compat),
        }
    }
}

impl TryFrom<&IdentityCapability> for DeviceIdentity {
    type Error = ExtensionError;

    fn try_from(id: &IdentityCapability) -> Result<Self, ExtensionError> {
        Ok(DeviceIdentity {
            kind: id.kind.clone(),
            version: id.version.clone(),
            compat: hex::decode(&id.compat).map_err(ExtensionError::BadCompat)?,
        })
    }
}

/// The 16 data bytes of a precopy info reply.
pub fn encode_precopy_info(info: &PrecopyInfo) -> [u8; PRECOPY_INFO_LEN] {
    let mut out = [0u8; PRECOPY_INFO_LEN];
    out[..8].copy_from_slice(&info.initial_bytes.to_le_bytes());
    out[8..].copy_from_slice(&info.dirty_bytes.to_le_bytes());
    out
}

/// Decodes the data of a precopy info reply: exactly 16 bytes.
pub fn decode_precopy_info(data: &[u8]) -> Result<PrecopyInfo, CodecError> {
    let bytes: &[u8; PRECOPY_INFO_LEN] =
        data.try_into().map_err(|_| CodecError::LengthMismatch {
            what: "precopy info data",
            expected: PRECOPY_INFO_LEN,
            actual: data.len(),
        })?;
    let (initial, dirty) = bytes.split_at(8);
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    Ok(PrecopyInfo {
        initial_bytes: word(initial),
        dirty_bytes: word(dirty),
    })
}

/// DEVICE_FEATURE [`FEATURE_DATA_BUFFER`] data: `size` bytes of the attached fd at
/// `file_offset` become the shared data buffer; size 0 (without an fd) forgets it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataBufferRegistration {
    /// Offset of the buffer in the file.
    pub file_offset: u64,
    /// Buffer size in bytes.
    pub size: u64,
}

impl DataBufferRegistration {
    /// The 16 bytes on the wire: `u64 file_offset, u64 size`, little-endian.
    pub fn encode(&self) -> [u8; SHARED_DATA_LEN] {
        let mut out = [0u8; SHARED_DATA_LEN];
        out[..8].copy_from_slice(&self.file_offset.to_le_bytes());
        out[8..].copy_from_slice(&self.size.to_le_bytes());
        out
    }

    /// Decodes exactly 16 bytes.
    pub fn decode(data: &[u8]) -> Result<Self, CodecError> {
        let b = exact(data, "shared data buffer registration")?;
        Ok(DataBufferRegistration {
            file_offset: u64_at(b, 0),
            size: u64_at(b, 8),
        })
    }
}

/// DEVICE_FEATURE [`FEATURE_DATA_READ_SHARED`] / [`FEATURE_DATA_WRITE_SHARED`] data: `size`
/// bytes at `offset` of the shared data buffer; in a read's reply `count` is how many bytes
/// the server placed there (0 in requests).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SharedTransfer {
    /// Offset in the shared data buffer.
    pub offset: u64,
    /// Bytes asked for (read) or given (write).
    pub size: u32,
    /// Read reply: bytes placed at `offset`; 0 otherwise.
    pub count: u32,
}

impl SharedTransfer {
    /// The 16 bytes on the wire: `u64 offset, u32 size, u32 count`, little-endian.
    pub fn encode(&self) -> [u8; SHARED_DATA_LEN] {
        let mut out = [0u8; SHARED_DATA_LEN];
        out[..8].copy_from_slice(&self.offset.to_le_bytes());
        out[8..12].copy_from_slice(&self.size.to_le_bytes());
        out[12..].copy_from_slice(&self.count.to_le_bytes());
        out
    }

    /// Decodes exactly 16 bytes.
    pub fn decode(data: &[u8]) -> Result<Self, CodecError> {
        let b = exact(data, "shared data transfer")?;
        let word = |at: usize| u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]]);
        Ok(SharedTransfer {
            offset: u64_at(b, 0),
            size: word(8),
            count: word(12),
        })
    }
}

fn exact<'a>(data: &'a [u8], what: &'static str) -> Result<&'a [u8; SHARED_DATA_LEN], CodecError> {
    data.try_into().map_err(|_| CodecError::LengthMismatch {
        what,
        expected: SHARED_DATA_LEN,
        actual: data.len(),
    })
}

fn u64_at(b: &[u8; SHARED_DATA_LEN], at: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::codec::{Capabilities, Limits, Payload};

    fn round_trip(v: &Version<'_>) -> Version<'static> {
        let mut bytes = Vec::new();
        v.encode(&mut bytes).unwrap();
        Version::decode(&bytes, &Limits::default())
            .unwrap()
            .into_owned()
    }

    #[test]
    fn client_announcement_is_just_the_version() {
        let ext = VfioMigCapability::client().to_extensions().unwrap();
        let v = Version::with_extensions(0, 2, &Capabilities::default(), &ext).unwrap();
        assert_eq!(
            v.json().unwrap(),
            r#"{"capabilities":{"vfio-mig":{"version":1}}}"#
        );
        let back = VfioMigCapability::from_version(&round_trip(&v))
            .unwrap()
            .unwrap();
        assert_eq!(back, VfioMigCapability::client());
        assert!(!back.offers_precopy_info() && !back.offers_whole_messages());
        assert!(!back.offers_shared_data());
        assert_eq!(back.device_identity().unwrap(), None);
    }

    #[test]
    fn server_announcement_carries_features_and_identity() {
        let id = DeviceIdentity {
            kind: "membuf".into(),
            version: "1".into(),
            compat: vec![0, 0x10, 0xff],
        };
        let ext = VfioMigCapability::server(&id).to_extensions().unwrap();
        let caps = Capabilities {
            max_msg_fds: Some(8),
            ..Capabilities::default()
        };
        let v = Version::with_extensions(0, 2, &caps, &ext).unwrap();
        assert!(v.json().unwrap().contains(r#""compat":"0010ff""#));
        let v = round_trip(&v);
        assert_eq!(v.capabilities(), &caps);
        let back = VfioMigCapability::from_version(&v).unwrap().unwrap();
        assert!(back.offers_precopy_info() && back.offers_whole_messages());
        assert!(back.offers_shared_data());
        assert_eq!(back.device_identity().unwrap(), Some(id));
    }

    #[test]
    fn absent_and_malformed_objects() {
        let plain = Version::new(0, 2, &Capabilities::default()).unwrap();
        assert_eq!(VfioMigCapability::from_version(&plain).unwrap(), None);
        let mut ext = serde_json::Map::new();
        ext.insert(EXTENSION_KEY.into(), serde_json::json!({"version": "one"}));
        let bad = Version::with_extensions(0, 2, &Capabilities::default(), &ext).unwrap();
        assert!(matches!(
            VfioMigCapability::from_version(&bad),
            Err(ExtensionError::Malformed(_))
        ));
        let cap = VfioMigCapability {
            identity: Some(IdentityCapability {
                kind: "x".into(),
                version: String::new(),
                compat: "zz".into(),
            }),
            ..VfioMigCapability::client()
        };
        assert!(matches!(
            cap.device_identity(),
            Err(ExtensionError::BadCompat(_))
        ));
    }

    #[test]
    fn precopy_info_layout() {
        let info = PrecopyInfo {
            initial_bytes: 0x0102,
            dirty_bytes: 0x0304_0000_0000,
        };
        let bytes = encode_precopy_info(&info);
        assert_eq!(bytes[..2], [2, 1]);
        assert_eq!(bytes[8..14], [0, 0, 0, 0, 4, 3]);
        assert_eq!(decode_precopy_info(&bytes).unwrap(), info);
        assert!(matches!(
            decode_precopy_info(&bytes[..15]),
            Err(CodecError::LengthMismatch {
                expected: 16,
                actual: 15,
                ..
            })
        ));
    }

    #[test]
    fn shared_data_layouts() {
        let reg = DataBufferRegistration {
            file_offset: 0x1000,
            size: 0x0200_0000,
        };
        let bytes = reg.encode();
        assert_eq!(bytes[..8], [0, 0x10, 0, 0, 0, 0, 0, 0]);
        assert_eq!(bytes[8..], [0, 0, 0, 2, 0, 0, 0, 0]);
        assert_eq!(DataBufferRegistration::decode(&bytes).unwrap(), reg);
        let t = SharedTransfer {
            offset: 0x0102_0304_0506_0708,
            size: 0x0010_0000,
            count: 7,
        };
        let bytes = t.encode();
        assert_eq!(bytes[..8], [8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(bytes[8..12], [0, 0, 0x10, 0]);
        assert_eq!(bytes[12..], [7, 0, 0, 0]);
        assert_eq!(SharedTransfer::decode(&bytes).unwrap(), t);
        for len in [0, 15, 17] {
            let data = vec![0u8; len];
            assert!(matches!(
                SharedTransfer::decode(&data),
                Err(CodecError::LengthMismatch { expected: 16, .. })
            ));
            assert!(DataBufferRegistration::decode(&data).is_err());
        }
    }
}
