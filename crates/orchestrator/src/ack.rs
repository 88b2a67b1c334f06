//! The back channel: the destination's acknowledgements to the source.
//!
//! Each message is a frame: the 4 bytes `VMAK`, a little-endian `u32` body length (at most
//! [`MAX_ACK_LEN`]), then the body, one JSON object tagged by `"ack"`. The destination sends
//! `ready` (or `refused`) once it has checked compatibility and put its devices in RESUMING,
//! and `running` (or `failed`) when the stream is complete. Sans-IO: [`Ack::encode`] builds
//! a frame, [`AckDecoder`] takes bytes in any pieces.

use std::io::{self, Read};

/// The magic every acknowledgement frame starts with.
pub const ACK_MAGIC: [u8; 4] = *b"VMAK";

/// The largest acknowledgement body a reader accepts, in bytes.
pub const MAX_ACK_LEN: u32 = 64 * 1024;

const ACK_HEADER_LEN: usize = 8;

/// A message from the destination to the source.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "ack", rename_all = "kebab-case")]
pub enum Ack {
    /// Every device is compatible and in RESUMING: send the data.
    Ready,
    /// The destination will not take the stream (incompatible devices, wrong device count,
    /// a device that cannot resume); its devices are untouched.
    Refused {
        /// Why, for people.
        reason: String,
    },
    /// Every destination device validated its state and runs.
    Running {
        /// Wall-clock time (µs since the Unix epoch) when every device had validated its
        /// state (RESUMING -> STOP succeeded).
        validated_unix_us: u64,
        /// Wall-clock time (µs since the Unix epoch) when the last device reached RUNNING.
        running_unix_us: u64,
        /// From the END record decoded to the last device running, in µs (destination clock).
        resume_us: u64,
    },
    /// The destination failed after accepting the stream; it reset its devices.
    Failed {
        /// Why, for people.
        reason: String,
    },
}

impl Ack {
    /// The whole frame for this message.
    pub fn encode(&self) -> Vec<u8> {
        // Serializing an enum of strings and integers into a Vec cannot fail.
        let mut body = serde_json::to_vec(self).unwrap_or_default();
        // Reasons are cut, never the frame: a peer must always be able to read it.
        if body.len() > MAX_ACK_LEN as usize {
            let cut = match self {
                Ack::Refused { reason } => Ack::Refused {
                    reason: truncate(reason, 1024),
                },
                Ack::Failed { reason } => Ack::Failed {
                    reason: truncate(reason, 1024),
                },
                other => other.clone(),
            };
            body = serde_json::to_vec(&cut).unwrap_or_default();
        }
        let mut frame = Vec::with_capacity(ACK_HEADER_LEN + body.len());
        frame.extend_from_slice(&ACK_MAGIC);
        frame.extend_from_slice(&(body.len() as u32).to_le_bytes());
        frame.extend_from_slice(&body);
        frame
    }

    /// Reads one message from `reader`: `Ok(None)` on a clean end of stream between
    /// messages.
    pub fn read_from(reader: &mut dyn Read) -> Result<Option<Ack>, AckError> {
        let mut decoder = AckDecoder::default();
        let mut buf = [0u8; 512];
        loop {
            let want = decoder.wanted().min(buf.len());
            let n = match reader.read(&mut buf[..want]) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(AckError::Io(e)),
            };
            if n == 0 {
                return if decoder.is_empty() {
                    Ok(None)
                } else {
                    Err(AckError::Truncated)
                };
            }
            if let Some(ack) = decoder.push(&buf[..n])? {
                return Ok(Some(ack));
            }
        }
    }
}

fn truncate(s: &str, max: usize) -> String {
    let mut cut = s.len().min(max);
    while !s.is_char_boundary(cut) {
        cut -= 1;
    }
    s[..cut].to_owned()
}

/// Why a back-channel message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AckError {
    /// The connection failed.
    #[error("reading the back channel failed")]
    Io(#[source] io::Error),
    /// The frame does not start with [`ACK_MAGIC`].
    #[error("back-channel message has bad magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// The stated length exceeds [`MAX_ACK_LEN`].
    #[error("back-channel message of {0} bytes exceeds the limit of {MAX_ACK_LEN}")]
    TooLong(u32),
    /// The body is not a known message.
    #[error("back-channel message is not valid")]
    Json(#[source] serde_json::Error),
    /// The connection ended inside a message.
    #[error("the back channel ended inside a message")]
    Truncated,
}

/// Sans-IO reassembly of one acknowledgement frame from pieces of any size.
#[derive(Debug, Default)]
pub struct AckDecoder {
    buf: Vec<u8>,
    body_len: Option<usize>,
}

impl AckDecoder {
    /// How many more bytes complete the current part (header or body); feed at most this
    /// many so that no byte of the next frame is taken.
    pub fn wanted(&self) -> usize {
        match self.body_len {
            None => ACK_HEADER_LEN - self.buf.len(),
            Some(len) => ACK_HEADER_LEN + len - self.buf.len(),
        }
    }

    /// Whether no byte of a frame has been taken yet.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Takes at most [`AckDecoder::wanted`] bytes; returns the message once complete.
    ///
    /// # Panics
    ///
    /// If given more than [`AckDecoder::wanted`] bytes (a caller bug).
    pub fn push(&mut self, bytes: &[u8]) -> Result<Option<Ack>, AckError> {
        assert!(
            bytes.len() <= self.wanted(),
            "AckDecoder::push past the frame"
        );
        self.buf.extend_from_slice(bytes);
        if self.body_len.is_none() && self.buf.len() == ACK_HEADER_LEN {
            let magic: [u8; 4] = [self.buf[0], self.buf[1], self.buf[2], self.buf[3]];
            if magic != ACK_MAGIC {
                return Err(AckError::BadMagic(magic));
            }
            let len = u32::from_le_bytes([self.buf[4], self.buf[5], self.buf[6], self.buf[7]]);
            if len > MAX_ACK_LEN {
                return Err(AckError::TooLong(len));
            }
            self.body_len = Some(len as usize);
        }
        match self.body_len {
            Some(len) if self.buf.len() == ACK_HEADER_LEN + len => {
                let ack =
                    serde_json::from_slice(&self.buf[ACK_HEADER_LEN..]).map_err(AckError::Json);
                self.buf.clear();
                self.body_len = None;
                ack.map(Some)
            }
            _ => Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn samples() -> Vec<Ack> {
        vec![
            Ack::Ready,
            Ack::Refused {
                reason: "kind differs".into(),
            },
            Ack::Running {
                validated_unix_us: 1,
                running_unix_us: 2,
                resume_us: 3,
            },
            Ack::Failed {
                reason: "é".repeat(40_000),
            },
        ]
    }

    #[test]
    fn frames_round_trip_through_a_reader() {
        let mut bytes = Vec::new();
        for a in samples() {
            bytes.extend(a.encode());
        }
        let mut r = &bytes[..];
        let mut got = Vec::new();
        while let Some(a) = Ack::read_from(&mut r).unwrap() {
            got.push(a);
        }
        let mut want = samples();
        // The 80 000-byte reason exceeds the frame limit and is cut to 1024 bytes.
        want[3] = Ack::Failed {
            reason: "é".repeat(512),
        };
        assert_eq!(got, want);
        let json = String::from_utf8(Ack::Ready.encode()[8..].to_vec()).unwrap();
        assert_eq!(json, r#"{"ack":"ready"}"#);
    }

    #[test]
    fn rejects_bad_frames() {
        let mut frame = Ack::Ready.encode();
        assert!(matches!(
            Ack::read_from(&mut &frame[..frame.len() - 1]),
            Err(AckError::Truncated)
        ));
        frame[0] = b'X';
        assert!(matches!(
            Ack::read_from(&mut &frame[..]),
            Err(AckError::BadMagic(_))
        ));
        let mut long = ACK_MAGIC.to_vec();
        long.extend_from_slice(&(MAX_ACK_LEN + 1).to_le_bytes());
        assert!(matches!(
            Ack::read_from(&mut &long[..]),
            Err(AckError::TooLong(_))
        ));
        let mut junk = ACK_MAGIC.to_vec();
        junk.extend_from_slice(&3u32.to_le_bytes());
        junk.extend_from_slice(b"{x}");
        assert!(matches!(
            Ack::read_from(&mut &junk[..]),
            Err(AckError::Json(_))
        ));
        assert!(Ack::read_from(&mut &[][..]).unwrap().is_none());
    }

    proptest! {
        #[test]
        fn any_split_decodes_the_same(reason in ".{0,200}", cuts in proptest::collection::vec(1usize..9, 1..40)) {
            let ack = Ack::Failed { reason };
            let frame = ack.encode();
            let mut d = AckDecoder::default();
            let mut at = 0;
            let mut out = None;
            let mut cuts = cuts.into_iter().cycle();
            while at < frame.len() {
                let n = cuts.next().unwrap().min(d.wanted()).min(frame.len() - at);
                if let Some(a) = d.push(&frame[at..at + n]).unwrap() {
                    out = Some(a);
                }
                at += n;
            }
            prop_assert_eq!(out, Some(ack));
            prop_assert!(d.is_empty());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = Ack::read_from(&mut &bytes[..]);
        }
    }
}
