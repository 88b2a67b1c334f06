//! What the records carry: the header, device descriptions, chunks and totals.

use std::fmt;

use vfio_mig_uapi::MigrationFeatures;

use crate::wire::{
    le_u16, le_u64, Phase, DEVICE_END_LEN, DEVICE_FIXED_LEN, END_LEN, MAX_COMPAT_LEN,
    MAX_IDENT_LEN, MAX_NAME_LEN,
};

/// The stream header's fields, as the decoder read them.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct StreamHeader {
    /// Format version (always [`crate::FORMAT_VERSION`] for a header this crate accepts).
    pub version: u16,
    /// Header flags (zero in version 1).
    pub flags: u16,
    /// The largest DATA payload the stream may contain, in bytes.
    pub max_chunk: u32,
    /// How many DEVICE records follow the header.
    pub device_count: u16,
    /// When the producer created the stream, in milliseconds since the Unix epoch; 0 when it
    /// did not say.
    pub created_unix_ms: u64,
    /// Who wrote the stream, e.g. `vfio-mig 0.1.0`.
    pub producer: String,
}

/// One device's identity, compatibility data and migration facts, as a DEVICE record
/// carries them.
///
/// The source describes each of its devices this way; a destination describes itself the
/// same way so that [`crate::check_compatibility`] can compare the two.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceInfo {
    /// The device's name or address on the source (e.g. `vfio-user:/run/dev0.sock`); for
    /// people, not compared. At most [`crate::MAX_NAME_LEN`] bytes.
    pub name: String,
    /// What kind of device produced the state (e.g. `membuf`); never empty, at most
    /// [`crate::MAX_IDENT_LEN`] bytes.
    pub kind: String,
    /// The version of the device's state format (e.g. `1`); never empty, at most
    /// [`crate::MAX_IDENT_LEN`] bytes.
    pub version: String,
    /// Opaque data the device defines, which must be byte-for-byte equal on the destination
    /// (e.g. `membuf` puts its state size there). At most [`crate::MAX_COMPAT_LEN`] bytes.
    #[serde(serialize_with = "serialize_hex")]
    pub compat: Vec<u8>,
    /// The source device's migration capabilities.
    pub features: MigrationFeatures,
    /// The source device's estimate of its stop-copy data size in bytes, when the stream was
    /// started.
    pub data_size_estimate: u64,
}

fn serialize_hex<S: serde::Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&to_hex(bytes))
}

/// Lower-case hex of `bytes`.
pub(crate) fn to_hex(bytes: &[u8]) -> String {
    use fmt::Write;
    let mut out = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        // Writing into a String cannot fail.
        let _ = write!(out, "{b:02x}");
    }
    out
}

/// Why a [`DeviceInfo`] cannot be put in a stream.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceInfoError {
    /// A string or the blob is longer than the format allows.
    #[error("device {field} is {len} bytes; the limit is {limit}")]
    TooLong {
        /// Which field.
        field: &'static str,
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The kind or the version string is empty.
    #[error("device {field} is empty")]
    Empty {
        /// Which field.
        field: &'static str,
    },
}

impl DeviceInfo {
    /// Checks that the description fits the format's limits.
    pub fn validate(&self) -> Result<(), DeviceInfoError> {
        let fields: [(&'static str, usize, usize); 4] = [
            ("name", self.name.len(), MAX_NAME_LEN),
            ("kind", self.kind.len(), MAX_IDENT_LEN),
            ("version", self.version.len(), MAX_IDENT_LEN),
            ("compatibility data", self.compat.len(), MAX_COMPAT_LEN),
        ];
        for (field, len, limit) in fields {
            if len > limit {
                return Err(DeviceInfoError::TooLong { field, len, limit });
            }
        }
        if self.kind.is_empty() {
            return Err(DeviceInfoError::Empty { field: "kind" });
        }
        if self.version.is_empty() {
            return Err(DeviceInfoError::Empty { field: "version" });
        }
        Ok(())
    }

    /// Length of the DEVICE body for this description (valid only after `validate`).
    pub(crate) fn body_len(&self) -> usize {
        DEVICE_FIXED_LEN
            + self.name.len()
            + self.kind.len()
            + self.version.len()
            + self.compat.len()
    }

    /// Appends the DEVICE body; the description must have passed `validate`.
    pub(crate) fn encode_body(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.features.bits().to_le_bytes());
        out.extend_from_slice(&self.data_size_estimate.to_le_bytes());
        // The casts cannot truncate: `validate` bounded every length.
        out.push(self.name.len() as u8);
        out.push(self.kind.len() as u8);
        out.push(self.version.len() as u8);
        out.push(0);
        out.extend_from_slice(&(self.compat.len() as u16).to_le_bytes());
        out.extend_from_slice(&[0, 0]);
        out.extend_from_slice(self.name.as_bytes());
        out.extend_from_slice(self.kind.as_bytes());
        out.extend_from_slice(self.version.as_bytes());
        out.extend_from_slice(&self.compat);
    }

    /// Parses a DEVICE body whose checksum has been verified.
    pub(crate) fn decode_body(body: &[u8]) -> Result<DeviceInfo, DeviceBodyError> {
        if body.len() < DEVICE_FIXED_LEN {
            return Err(DeviceBodyError::Length {
                len: body.len(),
                expected: DEVICE_FIXED_LEN,
            });
        }
        let features_bits = le_u64(body, 0);
        let data_size_estimate = le_u64(body, 8);
        let name_len = usize::from(body[16]);
        let kind_len = usize::from(body[17]);
        let version_len = usize::from(body[18]);
        let compat_len = usize::from(le_u16(body, 20));
        if body[19] != 0 || le_u16(body, 22) != 0 {
            return Err(DeviceBodyError::Reserved);
        }
        if compat_len > MAX_COMPAT_LEN {
            return Err(DeviceBodyError::CompatTooLong { len: compat_len });
        }
        let expected = DEVICE_FIXED_LEN + name_len + kind_len + version_len + compat_len;
        if body.len() != expected {
            return Err(DeviceBodyError::Length {
                len: body.len(),
                expected,
            });
        }
        let features = MigrationFeatures::from_bits(features_bits)
            .map_err(|_| DeviceBodyError::Features(features_bits))?;
        let mut at = DEVICE_FIXED_LEN;
        let mut take_str = |len: usize, field: &'static str| {
            let bytes = &body[at..at + len];
            at += len;
            std::str::from_utf8(bytes)
                .map(str::to_owned)
                .map_err(|_| DeviceBodyError::Utf8 { field })
        };
        let name = take_str(name_len, "name")?;
        let kind = take_str(kind_len, "kind")?;
        let version = take_str(version_len, "version")?;
        let compat = body[at..].to_vec();
        let info = DeviceInfo {
            name,
            kind,
            version,
            compat,
            features,
            data_size_estimate,
        };
        info.validate().map_err(DeviceBodyError::Invalid)?;
        Ok(info)
    }
}

/// What is wrong inside a DEVICE body (the decoder adds the device and offset).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum DeviceBodyError {
    Length { len: usize, expected: usize },
    Reserved,
    CompatTooLong { len: usize },
    Features(u64),
    Utf8 { field: &'static str },
    Invalid(DeviceInfoError),
}

/// Chunk and byte counts of one phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct PhaseTotals {
    /// Number of DATA chunks.
    pub chunks: u64,
    /// Payload bytes in those chunks.
    pub bytes: u64,
}

impl PhaseTotals {
    pub(crate) fn add(&mut self, len: usize) {
        self.chunks += 1;
        self.bytes += len as u64;
    }
}

/// What one device's DEVICE_END record states: its chunks and bytes per phase.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct DeviceTotals {
    /// Data read during pre-copy.
    pub pre_copy: PhaseTotals,
    /// Data read during stop-copy.
    pub stop_copy: PhaseTotals,
}

impl DeviceTotals {
    /// The totals of `phase`.
    pub fn phase(&self, phase: Phase) -> &PhaseTotals {
        match phase {
            Phase::PreCopy => &self.pre_copy,
            Phase::StopCopy => &self.stop_copy,
        }
    }

    pub(crate) fn phase_mut(&mut self, phase: Phase) -> &mut PhaseTotals {
        match phase {
            Phase::PreCopy => &mut self.pre_copy,
            Phase::StopCopy => &mut self.stop_copy,
        }
    }

    /// Payload bytes of both phases.
    pub fn bytes(&self) -> u64 {
        self.pre_copy.bytes + self.stop_copy.bytes
    }

    /// Chunks of both phases.
    pub fn chunks(&self) -> u64 {
        self.pre_copy.chunks + self.stop_copy.chunks
    }

    pub(crate) fn encode(&self) -> [u8; DEVICE_END_LEN] {
        let mut b = [0u8; DEVICE_END_LEN];
        b[0..8].copy_from_slice(&self.pre_copy.bytes.to_le_bytes());
        b[8..16].copy_from_slice(&self.pre_copy.chunks.to_le_bytes());
        b[16..24].copy_from_slice(&self.stop_copy.bytes.to_le_bytes());
        b[24..32].copy_from_slice(&self.stop_copy.chunks.to_le_bytes());
        b
    }

    /// Parses a body of exactly [`DEVICE_END_LEN`] bytes.
    pub(crate) fn decode(b: &[u8]) -> DeviceTotals {
        DeviceTotals {
            pre_copy: PhaseTotals {
                bytes: le_u64(b, 0),
                chunks: le_u64(b, 8),
            },
            stop_copy: PhaseTotals {
                bytes: le_u64(b, 16),
                chunks: le_u64(b, 24),
            },
        }
    }
}

/// What the END record states about the whole stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StreamTotals {
    /// Payload bytes of every DATA chunk.
    pub bytes: u64,
    /// Number of DATA chunks.
    pub chunks: u64,
    /// Number of devices.
    pub devices: u32,
    /// CRC-32 over the header and every record frame before END, each without its own CRC
    /// (see the format description in the crate documentation).
    pub chain_crc: u32,
}

impl StreamTotals {
    pub(crate) fn encode(&self) -> [u8; END_LEN] {
        let mut b = [0u8; END_LEN];
        b[0..8].copy_from_slice(&self.bytes.to_le_bytes());
        b[8..16].copy_from_slice(&self.chunks.to_le_bytes());
        b[16..20].copy_from_slice(&self.devices.to_le_bytes());
        b[20..24].copy_from_slice(&self.chain_crc.to_le_bytes());
        b
    }

    /// Parses a body of exactly [`END_LEN`] bytes.
    pub(crate) fn decode(b: &[u8]) -> StreamTotals {
        StreamTotals {
            bytes: le_u64(b, 0),
            chunks: le_u64(b, 8),
            devices: crate::wire::le_u32(b, 16),
            chain_crc: crate::wire::le_u32(b, 20),
        }
    }
}

/// One DATA chunk: a piece of one device's opaque state, checksum verified.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Chunk<'a> {
    /// Index of the device (the order of its DEVICE record).
    pub device: u16,
    /// The phase the bytes were read in.
    pub phase: Phase,
    /// Position of the chunk among the device's chunks, from 0, across both phases.
    pub sequence: u32,
    /// The device's bytes, to be written to the destination device in stream order.
    pub payload: &'a [u8],
}

impl fmt::Debug for Chunk<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Chunk")
            .field("device", &self.device)
            .field("phase", &self.phase)
            .field("sequence", &self.sequence)
            .field("len", &self.payload.len())
            .finish()
    }
}

/// What the decoder found next in the stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event<'a> {
    /// The stream header (always the first event).
    Header(StreamHeader),
    /// A device's description. All of them come, in index order, before any other record.
    Device {
        /// The device's index, 0 to `device_count - 1`.
        index: u16,
        /// Its description.
        info: DeviceInfo,
    },
    /// A chunk of a device's state.
    Data(Chunk<'a>),
    /// A device's data is complete; the totals were checked against the chunks seen.
    DeviceEnd {
        /// The device's index.
        device: u16,
        /// Its chunks and bytes per phase.
        totals: DeviceTotals,
    },
    /// The stream is complete and every total and the chain checksum matched.
    End(StreamTotals),
    /// The source aborted the migration; what arrived must be discarded.
    Abort {
        /// The source's reason.
        reason: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> DeviceInfo {
        DeviceInfo {
            name: "vfio-user:/tmp/a.sock".into(),
            kind: "membuf".into(),
            version: "1".into(),
            compat: vec![1, 2, 3, 0xff],
            features: MigrationFeatures::ALL,
            data_size_estimate: 1 << 30,
        }
    }

    #[test]
    fn device_body_round_trips() {
        let d = info();
        d.validate().unwrap();
        let mut body = Vec::new();
        d.encode_body(&mut body);
        assert_eq!(body.len(), d.body_len());
        assert_eq!(DeviceInfo::decode_body(&body), Ok(d));
    }

    #[test]
    fn device_body_rejects_bad_lengths_and_values() {
        let mut body = Vec::new();
        info().encode_body(&mut body);
        assert!(matches!(
            DeviceInfo::decode_body(&body[..body.len() - 1]),
            Err(DeviceBodyError::Length { .. })
        ));
        let mut b = body.clone();
        b[0] = 0x6; // no STOP_COPY
        assert_eq!(
            DeviceInfo::decode_body(&b),
            Err(DeviceBodyError::Features(6))
        );
        let mut b = body.clone();
        b[19] = 1;
        assert_eq!(DeviceInfo::decode_body(&b), Err(DeviceBodyError::Reserved));
        let mut b = body.clone();
        b[DEVICE_FIXED_LEN] = 0xff; // invalid UTF-8 in the name
        assert_eq!(
            DeviceInfo::decode_body(&b),
            Err(DeviceBodyError::Utf8 { field: "name" })
        );
        let mut d = info();
        d.kind.clear();
        assert_eq!(d.validate(), Err(DeviceInfoError::Empty { field: "kind" }));
        let mut d = info();
        d.compat = vec![0; MAX_COMPAT_LEN + 1];
        assert!(matches!(d.validate(), Err(DeviceInfoError::TooLong { .. })));
    }

    #[test]
    fn hex_and_json() {
        assert_eq!(to_hex(&[0, 0xab, 0x10]), "00ab10");
        let json = serde_json::to_value(info()).unwrap();
        assert_eq!(json["compat"], "010203ff");
        assert_eq!(json["features"][1], "p2p");
    }
}
