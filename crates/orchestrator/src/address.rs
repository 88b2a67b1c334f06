//! Transport addresses: where a migration stream goes to or comes from.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

/// Where a migration stream is written to or read from (architecture.md, device addresses).
///
/// Spelled `file:PATH`, `unix:PATH` or `tcp:HOST:PORT` (an IPv6 host in brackets,
/// `tcp:[::1]:4444`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Address {
    /// A saved stream in a file (`save`/`load`): no back channel.
    File(PathBuf),
    /// A UNIX stream socket: bidirectional.
    Unix(PathBuf),
    /// A TCP connection: bidirectional.
    Tcp {
        /// Host name or IP address (IPv6 without brackets).
        host: String,
        /// Port; 0 asks for an ephemeral port when listening.
        port: u16,
    },
}

impl Address {
    /// Whether the destination can answer the source on this transport (sockets can, files
    /// cannot).
    pub fn has_back_channel(&self) -> bool {
        !matches!(self, Address::File(_))
    }
}

/// Why a string is not a transport address.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// No `scheme:` prefix.
    #[error("'{input}' is not an address: expected file:PATH, unix:PATH or tcp:HOST:PORT")]
    MissingScheme {
        /// The string given.
        input: String,
    },
    /// A scheme this crate does not transport over.
    #[error("unknown transport '{scheme}' in '{input}': expected file:, unix: or tcp:")]
    UnknownScheme {
        /// The scheme.
        scheme: String,
        /// The string given.
        input: String,
    },
    /// The part after the scheme is empty.
    #[error("'{input}' has an empty {what}")]
    Empty {
        /// What is empty (`path`, `host`).
        what: &'static str,
        /// The string given.
        input: String,
    },
    /// `tcp:` without a valid `:PORT`.
    #[error("'{input}' needs a port from 0 to 65535 after the host (tcp:HOST:PORT)")]
    BadPort {
        /// The string given.
        input: String,
    },
}

impl FromStr for Address {
    type Err = AddressError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        let Some((scheme, rest)) = input.split_once(':') else {
            return Err(AddressError::MissingScheme {
                input: input.to_owned(),
            });
        };
        let empty = |what| AddressError::Empty {
            what,
            input: input.to_owned(),
        };
        match scheme {
            "file" | "unix" => {
                if rest.is_empty() {
                    return Err(empty("path"));
                }
                let path = PathBuf::from(rest);
                Ok(if scheme == "file" {
                    Address::File(path)
                } else {
                    Address::Unix(path)
                })
            }
            "tcp" => {
                let bad_port = || AddressError::BadPort {
                    input: input.to_owned(),
                };
                let (host, port) = rest.rsplit_once(':').ok_or_else(bad_port)?;
                let port: u16 = port.parse().map_err(|_| bad_port())?;
                let host = host
                    .strip_prefix('[')
                    .and_then(|h| h.strip_suffix(']'))
                    .unwrap_or(host);
                if host.is_empty() {
                    return Err(empty("host"));
                }
                Ok(Address::Tcp {
                    host: host.to_owned(),
                    port,
                })
            }
            _ => Err(AddressError::UnknownScheme {
                scheme: scheme.to_owned(),
                input: input.to_owned(),
            }),
        }
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::File(p) => write!(f, "file:{}", p.display()),
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp { host, port } if host.contains(':') => write!(f, "tcp:[{host}]:{port}"),
            Address::Tcp { host, port } => write!(f, "tcp:{host}:{port}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_every_form() {
        for (text, addr) in [
            ("file:/tmp/x.mig", Address::File("/tmp/x.mig".into())),
            ("file:rel/x", Address::File("rel/x".into())),
            ("unix:/run/m.sock", Address::Unix("/run/m.sock".into())),
            (
                "tcp:127.0.0.1:4444",
                Address::Tcp {
                    host: "127.0.0.1".into(),
                    port: 4444,
                },
            ),
            (
                "tcp:dst.example:0",
                Address::Tcp {
                    host: "dst.example".into(),
                    port: 0,
                },
            ),
            (
                "tcp:[::1]:65535",
                Address::Tcp {
                    host: "::1".into(),
                    port: 65535,
                },
            ),
        ] {
            let parsed: Address = text.parse().unwrap();
            assert_eq!(parsed, addr, "{text}");
            assert_eq!(parsed.to_string(), text);
        }
        assert!(!Address::File("x".into()).has_back_channel());
        assert!(Address::Unix("x".into()).has_back_channel());
    }

    #[test]
    fn rejects_bad_addresses() {
        let err = |s: &str| s.parse::<Address>().unwrap_err();
        assert!(matches!(err("/tmp/x"), AddressError::MissingScheme { .. }));
        assert!(matches!(
            err("vfio-user:/x"),
            AddressError::UnknownScheme { .. }
        ));
        assert!(matches!(
            err("file:"),
            AddressError::Empty { what: "path", .. }
        ));
        assert!(matches!(
            err("unix:"),
            AddressError::Empty { what: "path", .. }
        ));
        assert!(matches!(err("tcp:host"), AddressError::BadPort { .. }));
        assert!(matches!(
            err("tcp:host:99999"),
            AddressError::BadPort { .. }
        ));
        assert!(matches!(err("tcp:host:"), AddressError::BadPort { .. }));
        assert!(matches!(
            err("tcp::80"),
            AddressError::Empty { what: "host", .. }
        ));
        assert!(matches!(
            err("tcp:[]:80"),
            AddressError::Empty { what: "host", .. }
        ));
    }
}
