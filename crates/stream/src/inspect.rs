//! Walking a whole stream to describe it to a person (`vfio-mig inspect`).

use std::fmt;
use std::io::{self, BufReader, Read};

use crate::decoder::{Decoder, Outcome};
use crate::error::DecodeError;
use crate::record::{to_hex, DeviceInfo, Event, PhaseTotals, StreamHeader, StreamTotals};

/// What a stream contains and whether it is intact.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Inspection {
    /// Bytes read from the input (up to the first error, if any).
    pub bytes_read: u64,
    /// The stream header, if it was readable.
    pub header: Option<StreamHeader>,
    /// Every device whose DEVICE record was readable, in index order.
    pub devices: Vec<DeviceSummary>,
    /// What the END record states, if the stream got that far.
    pub end: Option<StreamTotals>,
    /// Whether the stream is complete and every check passed.
    pub integrity: Integrity,
}

/// One device of an inspected stream.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct DeviceSummary {
    /// The device's index in the stream.
    pub index: u16,
    /// Its DEVICE record.
    #[serde(flatten)]
    pub info: DeviceInfo,
    /// Pre-copy chunks and bytes that passed their checks.
    pub pre_copy: PhaseTotals,
    /// Stop-copy chunks and bytes that passed their checks.
    pub stop_copy: PhaseTotals,
    /// Whether its DEVICE_END record was read and matched.
    pub ended: bool,
}

/// The integrity verdict of an inspected stream.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(tag = "status", rename_all = "kebab-case")]
pub enum Integrity {
    /// Complete: END read, every checksum and total matched, nothing after it.
    Ok,
    /// Intact up to an ABORT record: the source gave up.
    Aborted {
        /// The source's reason.
        reason: String,
    },
    /// The stream ends early.
    Truncated {
        /// Where it ends.
        offset: u64,
        /// What was missing.
        message: String,
    },
    /// The stream holds bytes that fail a check.
    Corrupt {
        /// Offset of the header or record at fault.
        offset: u64,
        /// What was wrong.
        message: String,
    },
}

impl Integrity {
    /// Whether the stream is complete and intact.
    pub fn is_ok(&self) -> bool {
        matches!(self, Integrity::Ok)
    }

    fn from_error(e: &DecodeError) -> Integrity {
        if e.is_truncation() {
            Integrity::Truncated {
                offset: e.offset,
                message: e.to_string(),
            }
        } else {
            Integrity::Corrupt {
                offset: e.offset,
                message: e.to_string(),
            }
        }
    }
}

/// Reads a whole stream from `reader`, checking everything, and describes it.
///
/// Memory stays bounded by one record whatever the stream's size: payloads are checked and
/// dropped. Problems in the stream go into [`Inspection::integrity`] (the first one, with
/// its offset); only a failure to read the input is an `Err`.
pub fn inspect<R: Read>(reader: R) -> io::Result<Inspection> {
    // Small records are served from the buffer; a payload read of 64 KiB or more goes
    // straight into the decoder's buffer.
    let mut reader = BufReader::with_capacity(64 << 10, reader);
    let mut decoder = Decoder::new();
    let mut header = None;
    let mut devices = Vec::new();
    let mut end = None;
    let mut error = None;

    loop {
        let buf = decoder.demand();
        if buf.is_empty() {
            break;
        }
        let n = match reader.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        match decoder.commit(n) {
            Ok(Some(event)) => match event {
                Event::Header(h) => header = Some(h),
                Event::Device { index, info } => devices.push(DeviceSummary {
                    index,
                    info,
                    pre_copy: PhaseTotals::default(),
                    stop_copy: PhaseTotals::default(),
                    ended: false,
                }),
                Event::DeviceEnd { device, .. } => {
                    if let Some(d) = devices.get_mut(usize::from(device)) {
                        d.ended = true;
                    }
                }
                Event::End(totals) => end = Some(totals),
                Event::Data(_) | Event::Abort { .. } => {}
            },
            Ok(None) => {}
            Err(e) => {
                error = Some(e);
                break;
            }
        }
    }

    if error.is_none() && decoder.outcome().is_some() {
        // Anything after the last record is an error too.
        let mut extra = [0u8; 1];
        let n = loop {
            match reader.read(&mut extra) {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                other => break other?,
            }
        };
        if let Err(e) = decoder.feed(&extra[..n]) {
            error = Some(e);
        }
    }
    let integrity = match error.map_or_else(|| decoder.finish(), Err) {
        Ok(Outcome::Complete(_)) => Integrity::Ok,
        Ok(Outcome::Aborted(reason)) => Integrity::Aborted { reason },
        Err(e) => Integrity::from_error(&e),
    };
    for d in &mut devices {
        if let Some(progress) = decoder.device_progress(d.index) {
            d.pre_copy = progress.pre_copy;
            d.stop_copy = progress.stop_copy;
        }
    }
    Ok(Inspection {
        bytes_read: decoder.offset(),
        header,
        devices,
        end,
        integrity,
    })
}

impl fmt::Display for Inspection {
    /// A multi-line description for a terminal.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.header {
            Some(h) => {
                write!(
                    f,
                    "stream format {}, written by \"{}\"",
                    h.version, h.producer
                )?;
                if h.created_unix_ms != 0 {
                    write!(f, " at {}", utc_time(h.created_unix_ms))?;
                }
                writeln!(
                    f,
                    "\n{} device(s), chunks of at most {}",
                    h.device_count,
                    bytes(h.max_chunk.into())
                )?;
            }
            None => writeln!(f, "no readable stream header")?,
        }
        for d in &self.devices {
            let i = &d.info;
            writeln!(
                f,
                "device {}: {}",
                d.index,
                if i.name.is_empty() {
                    "(unnamed)"
                } else {
                    &i.name
                }
            )?;
            writeln!(f, "  kind {}, version {}", i.kind, i.version)?;
            if i.compat.is_empty() {
                writeln!(f, "  compatibility data: none")?;
            } else {
                writeln!(
                    f,
                    "  compatibility data: {} ({} bytes)",
                    to_hex(&i.compat),
                    i.compat.len()
                )?;
            }
            writeln!(f, "  features: {}", i.features)?;
            writeln!(f, "  data size estimate: {}", bytes(i.data_size_estimate))?;
            writeln!(
                f,
                "  pre-copy: {} chunk(s), {}; stop-copy: {} chunk(s), {}; {}",
                d.pre_copy.chunks,
                bytes(d.pre_copy.bytes),
                d.stop_copy.chunks,
                bytes(d.stop_copy.bytes),
                if d.ended { "complete" } else { "not complete" }
            )?;
        }
        if let Some(end) = &self.end {
            writeln!(
                f,
                "end: {} device(s), {} chunk(s), {}",
                end.devices,
                end.chunks,
                bytes(end.bytes)
            )?;
        }
        match &self.integrity {
            Integrity::Ok => write!(f, "integrity: ok ({} read)", bytes(self.bytes_read)),
            Integrity::Aborted { reason } => {
                write!(f, "integrity: intact, but the source aborted: {reason}")
            }
            Integrity::Truncated { message, .. } | Integrity::Corrupt { message, .. } => {
                write!(f, "integrity: FAILED: {message}")
            }
        }
    }
}

/// `N bytes`, with a binary-prefixed size for larger values.
fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} bytes");
    }
    let mut value = n as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{n} bytes ({value:.1} {})", UNITS[unit])
}

/// `YYYY-MM-DD hh:mm:ss UTC` for milliseconds since the Unix epoch.
fn utc_time(unix_ms: u64) -> String {
    let secs = unix_ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_date(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The proleptic Gregorian date `days` days after 1970-01-01.
fn civil_date(days: u64) -> (u64, u64, u64) {
    // Count from 0000-03-01 so that leap days fall at the end of a year; eras are the
    // 400-year cycles of 146097 days.
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z % 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let month_index = (5 * day_of_year + 2) / 153; // 0 = March
    let day = day_of_year - (153 * month_index + 2) / 5 + 1;
    let month = if month_index < 10 {
        month_index + 3
    } else {
        month_index - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(utc_time(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc_time(951_782_400_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc_time(1_709_251_199_000), "2024-02-29 23:59:59 UTC");
        assert_eq!(utc_time(4_107_542_400_000), "2100-03-01 00:00:00 UTC");
    }

    #[test]
    fn sizes() {
        assert_eq!(bytes(0), "0 bytes");
        assert_eq!(bytes(1023), "1023 bytes");
        assert_eq!(bytes(1 << 20), "1048576 bytes (1.0 MiB)");
        assert_eq!(bytes(3 << 29), "1610612736 bytes (1.5 GiB)");
    }
}
