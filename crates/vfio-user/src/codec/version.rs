//! VFIO_USER_VERSION: protocol version and the JSON capabilities.

use std::borrow::Cow;

use std::fmt;
use std::marker::PhantomData;

use serde::de::value::MapAccessDeserializer;
use serde::de::{MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

use super::wire::{Reader, WireBuf};
use super::{Bulk, CodecError, Limits, Payload, DEFAULT_MAX_DATA_XFER_SIZE};

/// Protocol major version this codec speaks.
pub const VERSION_MAJOR: u16 = 0;
/// Highest protocol minor version this codec speaks (libvfio-user's).
pub const VERSION_MINOR: u16 = 2;

/// Default `max_msg_fds` when a peer does not send it.
pub const DEFAULT_MAX_MSG_FDS: u32 = 1;
/// Default `max_dma_maps` when a peer does not send it.
pub const DEFAULT_MAX_DMA_MAPS: u32 = 65535;
/// Default `pgsizes` when a peer does not send it (4 KiB pages only).
pub const DEFAULT_PGSIZES: u64 = 4096;

/// The VERSION payload (same layout both ways): version numbers and optional capabilities.
///
/// The JSON text is kept exactly as received, so a decoded message re-encodes to the same
/// bytes; [`Version::capabilities`] is its parsed, validated meaning.
#[derive(Clone, Debug, PartialEq)]
pub struct Version<'a> {
    /// Major version.
    pub major: u16,
    /// Minor version.
    pub minor: u16,
    json: Option<Cow<'a, str>>,
    capabilities: Capabilities,
}

impl<'a> Version<'a> {
    /// A VERSION payload carrying `capabilities` as compact JSON.
    pub fn new(major: u16, minor: u16, capabilities: &Capabilities) -> Result<Self, CodecError> {
        let doc = VersionDoc {
            capabilities: Some(capabilities.clone()),
        };
        let json = serde_json::to_string(&doc).map_err(CodecError::BadJson)?;
        Ok(Version {
            major,
            minor,
            json: Some(Cow::Owned(json)),
            capabilities: capabilities.clone(),
        })
    }

    /// A VERSION payload without JSON (all capabilities at their defaults).
    pub fn without_capabilities(major: u16, minor: u16) -> Self {
        Version {
            major,
            minor,
            json: None,
            capabilities: Capabilities::default(),
        }
    }

    /// The capabilities (all absent when no JSON was sent).
    pub fn capabilities(&self) -> &Capabilities {
        &self.capabilities
    }

    /// The JSON text, without its terminating NUL.
    pub fn json(&self) -> Option<&str> {
        self.json.as_deref()
    }

    /// A VERSION payload carrying `capabilities` and, beside their keys, the `extensions`
    /// (capability objects [`Capabilities`] does not model, such as a protocol extension's),
    /// as compact JSON. An extension key that is also a standard capability's is refused
    /// with [`CodecError::BadField`]. Decoding the result gives back `capabilities`
    /// (unknown keys are ignored) and [`Version::capability_value`] gives the extensions.
    pub fn with_extensions(
        major: u16,
        minor: u16,
        capabilities: &Capabilities,
        extensions: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, CodecError> {
        let mut object = match serde_json::to_value(capabilities).map_err(CodecError::BadJson)? {
            serde_json::Value::Object(object) => object,
            _ => serde_json::Map::new(),
        };
        for (key, value) in extensions {
            if object.contains_key(key) || STANDARD_KEYS.contains(&key.as_str()) {
                return Err(CodecError::BadField {
                    field: "VERSION capability extension",
                    value: 0,
                    reason: "an extension key must not be a standard capability",
                });
            }
            object.insert(key.clone(), value.clone());
        }
        let mut doc = serde_json::Map::new();
        doc.insert("capabilities".into(), serde_json::Value::Object(object));
        let json = serde_json::to_string(&doc).map_err(CodecError::BadJson)?;
        Ok(Version {
            major,
            minor,
            json: Some(Cow::Owned(json)),
            capabilities: capabilities.clone(),
        })
    }

    /// The JSON value of capability `key` as sent, for keys [`Capabilities`] does not model
    /// (protocol extensions); `None` when there is no JSON or no such key.
    pub fn capability_value(&self, key: &str) -> Option<serde_json::Value> {
        let text = self.json.as_deref()?;
        let mut doc: serde_json::Value = serde_json::from_str(text).ok()?;
        doc.get_mut("capabilities")?
            .get_mut(key)
            .map(serde_json::Value::take)
    }

    /// Copies borrowed JSON text so the payload outlives the receive buffer.
    pub fn into_owned(self) -> Version<'static> {
        Version {
            major: self.major,
            minor: self.minor,
            json: self.json.map(|j| Cow::Owned(j.into_owned())),
            capabilities: self.capabilities,
        }
    }
}

impl<'a> Payload<'a> for Version<'a> {
    fn decode(bytes: &'a [u8], _limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let major = r.u16()?;
        let minor = r.u16()?;
        let text = r.rest();
        let (json, capabilities) = match text.split_last() {
            None => (None, Capabilities::default()),
            Some((&0, body)) => {
                let s = std::str::from_utf8(body).map_err(CodecError::BadUtf8)?;
                let MapOnly(doc): MapOnly<VersionDoc> =
                    serde_json::from_str(s).map_err(CodecError::BadJson)?;
                (Some(Cow::Borrowed(s)), doc.capabilities.unwrap_or_default())
            }
            Some((&last, _)) => {
                return Err(CodecError::BadField {
                    field: "VERSION JSON terminator",
                    value: last.into(),
                    reason: "capabilities JSON must end with a NUL byte",
                })
            }
        };
        Ok(Version {
            major,
            minor,
            json,
            capabilities,
        })
    }

    fn encoded_len(&self) -> usize {
        4 + self.json.as_ref().map_or(0, |j| j.len() + 1)
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u16(self.major)?;
        out.put_u16(self.minor)?;
        if let Some(json) = &self.json {
            if json.as_bytes().contains(&0) {
                return Err(CodecError::BadField {
                    field: "VERSION JSON",
                    value: 0,
                    reason: "contains a NUL byte",
                });
            }
            out.put(json.as_bytes())?;
            out.put(&[0])?;
        }
        Ok(Bulk::NONE)
    }
}

/// The capability keys [`Capabilities`] models.
const STANDARD_KEYS: [&str; 7] = [
    "max_msg_fds",
    "max_data_xfer_size",
    "max_dma_maps",
    "pgsizes",
    "migration",
    "twin_socket",
    "write_multiple",
];

/// The top-level JSON object: `{"capabilities": {...}}`; other keys are ignored.
#[derive(Serialize, Deserialize, Default)]
struct VersionDoc {
    #[serde(default, deserialize_with = "present_object")]
    capabilities: Option<Capabilities>,
}

/// Deserializes a present key as `Some`, so that `null` is a type error rather than "absent".
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// [`present`] for a key whose value must be a JSON object.
fn present_object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<T>, D::Error> {
    MapOnly::deserialize(d).map(|MapOnly(t)| Some(t))
}

/// Accepts only a JSON object for `T` (derived struct deserializers also take arrays).
struct MapOnly<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for MapOnly<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);

        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = T;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<T, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map))
            }
        }

        d.deserialize_map(ObjectVisitor(PhantomData)).map(MapOnly)
    }
}

/// Capabilities of one side, as sent: `None` means the key was absent. The accessors apply
/// the protocol's defaults. Unknown keys are ignored; a known key of the wrong type (or
/// `null`) is an error.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    /// Most fds the sender can receive in one message (default 1).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_msg_fds: Option<u32>,
    /// Largest data transfer the sender accepts (default 1 MiB).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_data_xfer_size: Option<u32>,
    /// Most simultaneous DMA windows (default 65535).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub max_dma_maps: Option<u32>,
    /// OR of supported DMA page sizes (default 4 KiB).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub pgsizes: Option<u64>,
    /// libvfio-user's migration object (dirty-bitmap page size).
    #[serde(
        default,
        deserialize_with = "present_object",
        skip_serializing_if = "Option::is_none"
    )]
    pub migration: Option<MigrationCapability>,
    /// Separate socket for server-to-client commands.
    #[serde(
        default,
        deserialize_with = "present_object",
        skip_serializing_if = "Option::is_none"
    )]
    pub twin_socket: Option<TwinSocket>,
    /// Whether REGION_WRITE_MULTI is supported (default false).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub write_multiple: Option<bool>,
}

impl Capabilities {
    /// `max_msg_fds`, or its default 1.
    pub fn max_msg_fds(&self) -> u32 {
        self.max_msg_fds.unwrap_or(DEFAULT_MAX_MSG_FDS)
    }

    /// `max_data_xfer_size`, or its default 1 MiB.
    pub fn max_data_xfer_size(&self) -> u32 {
        self.max_data_xfer_size
            .unwrap_or(DEFAULT_MAX_DATA_XFER_SIZE)
    }

    /// `max_dma_maps`, or its default 65535.
    pub fn max_dma_maps(&self) -> u32 {
        self.max_dma_maps.unwrap_or(DEFAULT_MAX_DMA_MAPS)
    }

    /// `pgsizes`, or its default 4 KiB.
    pub fn pgsizes(&self) -> u64 {
        self.pgsizes.unwrap_or(DEFAULT_PGSIZES)
    }

    /// `migration.pgsize`, if sent.
    pub fn migration_pgsize(&self) -> Option<u64> {
        self.migration.as_ref().and_then(|m| m.pgsize)
    }

    /// `twin_socket.supported`, or false.
    pub fn twin_socket_supported(&self) -> bool {
        self.twin_socket
            .as_ref()
            .and_then(|t| t.supported)
            .unwrap_or(false)
    }

    /// `twin_socket.fd_index`, if sent.
    pub fn twin_socket_fd_index(&self) -> Option<u32> {
        self.twin_socket.as_ref().and_then(|t| t.fd_index)
    }

    /// `write_multiple`, or false.
    pub fn write_multiple(&self) -> bool {
        self.write_multiple.unwrap_or(false)
    }
}

/// The `migration` capability object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationCapability {
    /// Page size of dirty-page bitmaps.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub pgsize: Option<u64>,
}

/// The `twin_socket` capability object.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TwinSocket {
    /// Whether the sender supports twin-socket mode.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub supported: Option<bool>,
    /// In a reply: index of the server-to-client socket among the message's fds.
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub fd_index: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(json: &str) -> Vec<u8> {
        let mut v = vec![0, 0, 2, 0];
        v.extend_from_slice(json.as_bytes());
        v.push(0);
        v
    }

    fn decode(bytes: &[u8]) -> Result<Version<'_>, CodecError> {
        Version::decode(bytes, &Limits::default())
    }

    #[test]
    fn extensions_ride_beside_standard_capabilities() {
        let caps = Capabilities {
            max_msg_fds: Some(8),
            ..Capabilities::default()
        };
        let mut ext = serde_json::Map::new();
        ext.insert("vfio-mig".into(), serde_json::json!({"version": 1}));
        let v = Version::with_extensions(0, 2, &caps, &ext).unwrap();
        let mut bytes = Vec::new();
        v.encode(&mut bytes).unwrap();
        let back = decode(&bytes).unwrap();
        assert_eq!(back.capabilities(), &caps);
        assert_eq!(
            back.capability_value("vfio-mig"),
            Some(serde_json::json!({"version": 1}))
        );
        assert_eq!(back.capability_value("other"), None);
        assert_eq!(
            Version::without_capabilities(0, 2).capability_value("vfio-mig"),
            None
        );
        let mut clash = serde_json::Map::new();
        clash.insert("migration".into(), serde_json::json!({}));
        assert!(matches!(
            Version::with_extensions(0, 2, &Capabilities::default(), &clash),
            Err(CodecError::BadField { .. })
        ));
    }

    #[test]
    fn parses_libvfio_user_reply_and_keeps_its_spacing() {
        let text = r#"{ "capabilities": { "max_msg_fds": 8, "max_data_xfer_size": 1048576, "migration": { "pgsize": 4096 } } }"#;
        let bytes = payload(text);
        let v = decode(&bytes).unwrap();
        assert_eq!((v.major, v.minor), (0, 2));
        assert_eq!(v.json(), Some(text));
        let c = v.capabilities();
        assert_eq!(c.max_msg_fds(), 8);
        assert_eq!(c.max_data_xfer_size(), 1 << 20);
        assert_eq!(c.migration_pgsize(), Some(4096));
        assert_eq!(c.max_dma_maps(), 65535);
        assert_eq!(c.pgsizes(), 4096);
        assert!(!c.twin_socket_supported() && !c.write_multiple());
        let mut out = Vec::new();
        v.encode(&mut out).unwrap();
        assert_eq!(out, bytes);
    }

    #[test]
    fn defaults_apply_without_json_or_without_keys() {
        let v = decode(&[0, 0, 1, 0]).unwrap();
        assert_eq!(v.json(), None);
        assert_eq!(v.capabilities().max_msg_fds(), 1);
        assert_eq!(v.capabilities().max_data_xfer_size(), 1 << 20);
        let empty = payload("{}");
        let v = decode(&empty).unwrap();
        assert_eq!(v.capabilities(), &Capabilities::default());
    }

    #[test]
    fn unknown_keys_are_ignored_and_twin_socket_parses() {
        let bytes = payload(
            r#"{"capabilities":{"future":[1,{"x":null}],"twin_socket":{"supported":true,"fd_index":0},"write_multiple":true,"pgsizes":12288,"max_dma_maps":7},"other":1}"#,
        );
        let c = decode(&bytes).unwrap().capabilities().clone();
        assert!(c.twin_socket_supported());
        assert_eq!(c.twin_socket_fd_index(), Some(0));
        assert!(c.write_multiple());
        assert_eq!(c.pgsizes(), 12288);
        assert_eq!(c.max_dma_maps(), 7);
    }

    #[test]
    fn wrong_types_and_bad_text_are_errors() {
        for bad in [
            r#"{"capabilities":{"max_msg_fds":"8"}}"#,
            r#"{"capabilities":{"max_msg_fds":-1}}"#,
            r#"{"capabilities":{"max_msg_fds":1.5}}"#,
            r#"{"capabilities":{"max_data_xfer_size":4294967296}}"#,
            r#"{"capabilities":{"max_msg_fds":null}}"#,
            r#"{"capabilities":{"write_multiple":1}}"#,
            r#"{"capabilities":{"migration":{"pgsize":true}}}"#,
            r#"{"capabilities":{"twin_socket":{"supported":"yes"}}}"#,
            r#"{"capabilities":[]}"#,
            r#"{"capabilities":{"migration":[4096]}}"#,
            r#"{"capabilities":{"twin_socket":[true,0]}}"#,
            r#"{"capabilities":null}"#,
            r#"[]"#,
            r#"{"capabilities":{"#,
            "",
        ] {
            let err = decode(&payload(bad)).unwrap_err();
            assert!(matches!(err, CodecError::BadJson(_)), "{bad}: {err:?}");
        }
        let mut not_utf8 = payload("{}");
        not_utf8[4] = 0xff;
        assert!(matches!(decode(&not_utf8), Err(CodecError::BadUtf8(_))));
        let mut unterminated = payload("{}");
        unterminated.pop();
        assert!(matches!(
            decode(&unterminated),
            Err(CodecError::BadField { .. })
        ));
        assert!(matches!(
            decode(&[0, 0, 2]),
            Err(CodecError::Truncated { need: 4, have: 3 })
        ));
    }

    #[test]
    fn produced_json_omits_absent_keys_and_round_trips() {
        let caps = Capabilities {
            max_msg_fds: Some(8),
            max_data_xfer_size: Some(1 << 20),
            migration: Some(MigrationCapability { pgsize: Some(4096) }),
            twin_socket: Some(TwinSocket {
                supported: Some(true),
                fd_index: None,
            }),
            ..Capabilities::default()
        };
        let v = Version::new(VERSION_MAJOR, VERSION_MINOR, &caps).unwrap();
        assert_eq!(
            v.json().unwrap(),
            r#"{"capabilities":{"max_msg_fds":8,"max_data_xfer_size":1048576,"migration":{"pgsize":4096},"twin_socket":{"supported":true}}}"#
        );
        let mut out = Vec::new();
        v.encode(&mut out).unwrap();
        assert_eq!(out.len(), v.encoded_len());
        let back = decode(&out).unwrap();
        assert_eq!(back, v);
        assert_eq!(back.capabilities(), &caps);
    }
}
