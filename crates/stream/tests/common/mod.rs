//! Shared helpers: describing a stream as a plan, encoding it, decoding it in pieces, and
//! patching encoded streams with valid checksums.
#![allow(dead_code)]

use vfio_mig_stream::{
    DecodeError, Decoder, DeviceInfo, DeviceTotals, Encoder, Event, Outcome, Phase, StreamConfig,
    StreamHeader, StreamTotals, FRAME_LEN, HEADER_LEN,
};
use vfio_mig_uapi::MigrationFeatures;

/// One step of a source after the preamble.
#[derive(Clone, Debug)]
pub enum Op {
    Chunk {
        device: u16,
        phase: Phase,
        payload: Vec<u8>,
    },
    EndDevice(u16),
    End,
    Abort(String),
}

/// A whole stream as a source would write it.
#[derive(Clone, Debug)]
pub struct Plan {
    pub config: StreamConfig,
    pub devices: Vec<DeviceInfo>,
    pub ops: Vec<Op>,
}

/// An event with its payload copied, so that events can be collected and compared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Owned {
    Header(StreamHeader),
    Device {
        index: u16,
        info: DeviceInfo,
    },
    Data {
        device: u16,
        phase: Phase,
        sequence: u32,
        payload: Vec<u8>,
    },
    DeviceEnd {
        device: u16,
        totals: DeviceTotals,
    },
    End(StreamTotals),
    Abort(String),
}

impl From<Event<'_>> for Owned {
    fn from(e: Event<'_>) -> Owned {
        match e {
            Event::Header(h) => Owned::Header(h),
            Event::Device { index, info } => Owned::Device { index, info },
            Event::Data(c) => Owned::Data {
                device: c.device,
                phase: c.phase,
                sequence: c.sequence,
                payload: c.payload.to_vec(),
            },
            Event::DeviceEnd { device, totals } => Owned::DeviceEnd { device, totals },
            Event::End(t) => Owned::End(t),
            Event::Abort { reason } => Owned::Abort(reason),
        }
    }
}

pub fn device(index: usize, kind: &str) -> DeviceInfo {
    DeviceInfo {
        name: format!("vfio-user:/tmp/dev{index}.sock"),
        kind: kind.to_owned(),
        version: "1".to_owned(),
        compat: (index as u64 * 4096).to_le_bytes().to_vec(),
        features: MigrationFeatures::ALL,
        data_size_estimate: 4096,
    }
}

pub fn config(max_chunk: u32) -> StreamConfig {
    StreamConfig {
        producer: "vfio-mig test".to_owned(),
        max_chunk,
        created_unix_ms: 1_700_000_000_000,
    }
}

/// Encodes `plan`, returning the bytes and the events a decoder must yield.
pub fn encode(plan: &Plan) -> (Vec<u8>, Vec<Owned>) {
    let mut out = Vec::new();
    let mut enc = Encoder::new(&plan.config, &plan.devices, &mut out).expect("valid plan");
    let mut events = vec![Owned::Header(StreamHeader {
        version: 1,
        flags: 0,
        max_chunk: plan.config.max_chunk,
        device_count: plan.devices.len() as u16,
        created_unix_ms: plan.config.created_unix_ms,
        producer: plan.config.producer.clone(),
    })];
    for (index, info) in plan.devices.iter().enumerate() {
        events.push(Owned::Device {
            index: index as u16,
            info: info.clone(),
        });
    }
    let mut sequences = vec![0u32; plan.devices.len()];
    for op in &plan.ops {
        match op {
            Op::Chunk {
                device,
                phase,
                payload,
            } => {
                // Both ways of writing a chunk must give the same bytes.
                if payload.len() % 2 == 0 {
                    enc.write_chunk(*device, *phase, payload, &mut out).unwrap();
                } else {
                    let frame = enc.chunk_frame(*device, *phase, payload).unwrap();
                    out.extend_from_slice(&frame);
                    out.extend_from_slice(payload);
                }
                let seq = &mut sequences[usize::from(*device)];
                events.push(Owned::Data {
                    device: *device,
                    phase: *phase,
                    sequence: *seq,
                    payload: payload.clone(),
                });
                *seq += 1;
            }
            Op::EndDevice(d) => {
                let totals = enc.end_device(*d, &mut out).unwrap();
                events.push(Owned::DeviceEnd { device: *d, totals });
            }
            Op::End => {
                let totals = enc.end(&mut out).unwrap();
                events.push(Owned::End(totals));
            }
            Op::Abort(reason) => {
                enc.abort(reason, &mut out).unwrap();
                events.push(Owned::Abort(reason.clone()));
            }
        }
    }
    (out, events)
}

/// A plan of `devices` devices, each with `chunks` stop-copy chunks of `len` bytes, devices
/// taking turns, ending with END.
pub fn simple_plan(devices: usize, chunks: usize, len: usize) -> Plan {
    let mut ops = Vec::new();
    for c in 0..chunks {
        for d in 0..devices {
            ops.push(Op::Chunk {
                device: d as u16,
                phase: if c == 0 {
                    Phase::PreCopy
                } else {
                    Phase::StopCopy
                },
                payload: (0..len).map(|i| (i + c * 7 + d * 13) as u8).collect(),
            });
        }
    }
    for d in 0..devices {
        ops.push(Op::EndDevice(d as u16));
    }
    ops.push(Op::End);
    Plan {
        config: config(len.max(1) as u32),
        devices: (0..devices).map(|i| device(i, "membuf")).collect(),
        ops,
    }
}

/// Feeds `bytes` cut at `cuts` (offsets, any order, may repeat) and finishes.
pub fn decode_cut(bytes: &[u8], cuts: &[usize]) -> (Vec<Owned>, Result<Outcome, DecodeError>) {
    let mut points: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
    points.push(0);
    points.push(bytes.len());
    points.sort_unstable();
    points.dedup();
    let mut dec = Decoder::new();
    let mut events = Vec::new();
    for piece in points.windows(2) {
        let mut input = &bytes[piece[0]..piece[1]];
        while !input.is_empty() {
            match dec.feed(input) {
                Ok((n, event)) => {
                    if let Some(e) = event {
                        events.push(Owned::from(e));
                    }
                    assert!(n > 0, "feed consumed nothing from a non-empty input");
                    input = &input[n..];
                }
                Err(e) => return (events, Err(e)),
            }
        }
    }
    let end = dec.finish();
    (events, end)
}

/// Decodes `bytes` through `demand`/`commit`, reading at most the next value of `sizes`
/// (cycled) each time.
pub fn decode_demand(bytes: &[u8], sizes: &[usize]) -> (Vec<Owned>, Result<Outcome, DecodeError>) {
    let mut dec = Decoder::new();
    let mut events = Vec::new();
    let mut at = 0;
    let mut i = 0;
    loop {
        let buf = dec.demand();
        if buf.is_empty() || at == bytes.len() {
            break;
        }
        let max = sizes
            .get(i % sizes.len().max(1))
            .copied()
            .unwrap_or(usize::MAX)
            .max(1);
        i += 1;
        let n = buf.len().min(max).min(bytes.len() - at);
        buf[..n].copy_from_slice(&bytes[at..at + n]);
        at += n;
        match dec.commit(n) {
            Ok(Some(e)) => events.push(Owned::from(e)),
            Ok(None) => {}
            Err(e) => return (events, Err(e)),
        }
    }
    if at < bytes.len() {
        if let Err(e) = dec.feed(&bytes[at..]) {
            return (events, Err(e));
        }
    }
    let end = dec.finish();
    (events, end)
}

/// Offsets, types and body lengths of every record of a well-formed stream.
pub fn records(bytes: &[u8]) -> Vec<(usize, u8, usize)> {
    let producer_len = u16::from_le_bytes([bytes[18], bytes[19]]) as usize;
    let mut at = HEADER_LEN + producer_len;
    let mut out = Vec::new();
    while at < bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
        out.push((at, bytes[at], len));
        at += FRAME_LEN + len;
    }
    out
}

/// The offset of the `nth` record of type `record_type`.
pub fn nth_record(bytes: &[u8], record_type: u8, nth: usize) -> (usize, usize) {
    records(bytes)
        .into_iter()
        .filter(|r| r.1 == record_type)
        .map(|r| (r.0, r.2))
        .nth(nth)
        .expect("record exists")
}

/// Recomputes the frame CRC of the frame at `at`.
pub fn fix_frame(bytes: &mut [u8], at: usize) {
    let crc = crc32fast::hash(&bytes[at..at + 16]);
    bytes[at + 16..at + 20].copy_from_slice(&crc.to_le_bytes());
}

/// Recomputes the body CRC (from the body length in the frame) and the frame CRC of the
/// record at `at`.
pub fn fix_record(bytes: &mut [u8], at: usize) {
    let len = u32::from_le_bytes(bytes[at + 8..at + 12].try_into().unwrap()) as usize;
    let body = at + FRAME_LEN;
    let crc = crc32fast::hash(&bytes[body..body + len]);
    bytes[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
    fix_frame(bytes, at);
}

/// Recomputes the header CRC.
pub fn fix_header(bytes: &mut [u8]) {
    let crc = crc32fast::hash(&bytes[..32]);
    bytes[32..36].copy_from_slice(&crc.to_le_bytes());
}

/// Decodes a whole stream in one piece and returns the first error.
pub fn first_error(bytes: &[u8]) -> DecodeError {
    match decode_cut(bytes, &[]).1 {
        Ok(outcome) => panic!("stream accepted: {outcome:?}"),
        Err(e) => e,
    }
}
