//! Fuzzes the migration stream decoder (`vfio-mig-stream`).
//!
//! Input: one mode byte, one piece-size byte, then either raw stream bytes (mode even) or, for
//! an odd mode, bytes that describe a valid stream which is encoded and then has one byte
//! changed. Checks: no panic; the verdict does not depend on how the input is cut; errors are
//! sticky; `inspect` agrees with the decoder; a changed valid stream is always rejected.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_mig_stream::{
    inspect, DecodeError, Decoder, DeviceInfo, Encoder, Integrity, Outcome, Phase, StreamConfig,
};
use vfio_mig_uapi::MigrationFeatures;

/// Decodes `stream` fed in pieces of `piece` bytes; returns the verdict and the number of
/// DATA payload bytes seen.
fn decode(stream: &[u8], piece: usize) -> (Result<Outcome, DecodeError>, u64) {
    let mut dec = Decoder::new();
    let mut payload = 0u64;
    for mut input in stream.chunks(piece.max(1)) {
        while !input.is_empty() {
            match dec.feed(input) {
                Ok((n, event)) => {
                    if let Some(vfio_mig_stream::Event::Data(chunk)) = event {
                        payload += chunk.payload.len() as u64;
                    }
                    assert!(n > 0 && n <= input.len());
                    input = &input[n..];
                }
                Err(e) => {
                    // Sticky: the same error from every later call.
                    assert_eq!(dec.feed(b"x").unwrap_err(), e);
                    assert_eq!(dec.finish().unwrap_err(), e);
                    return (Err(e), payload);
                }
            }
        }
    }
    (dec.finish(), payload)
}

/// Builds a valid stream from `data`: device count, chunk sizes and owners, END or ABORT.
fn build(data: &[u8]) -> Vec<u8> {
    let mut bytes = data.iter().copied();
    let mut next = move || bytes.next().unwrap_or(0);
    let devices = usize::from(next() % 3) + 1;
    let max_chunk = u32::from(next() % 64) + 1;
    let infos: Vec<DeviceInfo> = (0..devices)
        .map(|i| DeviceInfo {
            name: format!("dev{i}"),
            kind: "membuf".into(),
            version: "1".into(),
            compat: vec![next(); usize::from(next() % 8)],
            features: MigrationFeatures::ALL,
            data_size_estimate: u64::from(next()),
        })
        .collect();
    let config = StreamConfig {
        max_chunk,
        ..StreamConfig::default()
    };
    let mut out = Vec::new();
    let mut enc = Encoder::new(&config, &infos, &mut out).expect("valid stream description");
    let mut stop_copy = vec![false; devices];
    for _ in 0..next() % 16 {
        let device = usize::from(next()) % devices;
        stop_copy[device] |= next() % 2 == 1;
        let phase = if stop_copy[device] {
            Phase::StopCopy
        } else {
            Phase::PreCopy
        };
        let len = usize::from(next()) % max_chunk as usize + 1;
        let fill = next();
        enc.write_chunk(device as u16, phase, &vec![fill; len], &mut out)
            .expect("valid chunk");
    }
    if next() % 4 == 0 {
        enc.abort("fuzz", &mut out).expect("abort before the end");
    } else {
        for d in 0..devices {
            enc.end_device(d as u16, &mut out)
                .expect("device not yet ended");
        }
        enc.end(&mut out).expect("every device ended");
    }
    out
}

fn check(data: &[u8]) {
    let [mode, piece, rest @ ..] = data else {
        return;
    };
    let piece = usize::from(*piece) + 1;
    let (stream, changed) = if mode % 2 == 0 {
        (rest.to_vec(), false)
    } else {
        let (spec, change) = rest.split_at(rest.len().min(48));
        let mut stream = build(spec);
        let (valid, _) = decode(&stream, piece);
        assert!(
            valid.is_ok(),
            "encoder wrote a stream the decoder rejects: {valid:?}"
        );
        let at = change.first().map_or(0, |&b| usize::from(b) * 7) % stream.len();
        let xor = change.get(1).copied().unwrap_or(1).max(1);
        stream[at] ^= xor;
        (stream, true)
    };

    let (whole, whole_payload) = decode(&stream, stream.len());
    let (cut, cut_payload) = decode(&stream, piece);
    assert_eq!(whole, cut, "verdict depends on how the input is cut");
    assert_eq!(whole_payload, cut_payload);
    if changed {
        assert!(whole.is_err(), "a changed byte went unnoticed");
    }

    let report = inspect(&stream[..]).expect("reading from a slice cannot fail");
    match (&whole, &report.integrity) {
        (Ok(Outcome::Complete(_)), Integrity::Ok)
        | (Ok(Outcome::Aborted(_)), Integrity::Aborted { .. }) => {}
        (Err(e), Integrity::Truncated { offset, .. } | Integrity::Corrupt { offset, .. }) => {
            assert_eq!(e.offset, *offset)
        }
        (verdict, integrity) => panic!("decoder says {verdict:?}, inspect says {integrity:?}"),
    }
}

fuzz_target!(|data: &[u8]| check(data));
