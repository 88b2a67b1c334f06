//! Encode and decode throughput of 256 MiB in 1 MiB chunks, against a plain memcpy of the
//! same bytes measured in the same run.
//!
//! `cargo bench -p vfio-mig-stream -- --warm-up-time 1 --measurement-time 3`

use std::hint::black_box;

use criterion::{Criterion, Throughput};
use vfio_mig_stream::{payload_crc, Decoder, DeviceInfo, Encoder, Event, Phase, StreamConfig};
use vfio_mig_uapi::MigrationFeatures;

const TOTAL: usize = 256 << 20;
const CHUNK: usize = 1 << 20;

fn device() -> DeviceInfo {
    DeviceInfo {
        name: "bench".into(),
        kind: "membuf".into(),
        version: "1".into(),
        compat: vec![],
        features: MigrationFeatures::ALL,
        data_size_estimate: TOTAL as u64,
    }
}

/// Encodes `src` as one device's stop-copy data into `out` (cleared first).
fn encode(src: &[u8], out: &mut Vec<u8>) {
    out.clear();
    let mut enc = Encoder::new(&StreamConfig::default(), &[device()], out).unwrap();
    for chunk in src.chunks(CHUNK) {
        enc.write_chunk(0, Phase::StopCopy, chunk, out).unwrap();
    }
    enc.end_device(0, out).unwrap();
    enc.end(out).unwrap();
}

/// Decodes `stream`, handed over in pieces of `piece` bytes, copying every payload into
/// `dst` as a destination writes it into its device.
fn decode(stream: &[u8], piece: usize, dst: &mut [u8]) {
    let mut dec = Decoder::new();
    let mut at = 0;
    for mut input in stream.chunks(piece) {
        while !input.is_empty() {
            let (n, event) = dec.feed(input).unwrap();
            if let Some(Event::Data(chunk)) = event {
                dst[at..at + chunk.payload.len()].copy_from_slice(chunk.payload);
                at += chunk.payload.len();
            }
            input = &input[n..];
        }
    }
    dec.finish().unwrap();
    assert_eq!(at, dst.len());
}

fn bench(c: &mut Criterion) {
    let src: Vec<u8> = (0..TOTAL)
        .map(|i| (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) as u8 ^ (i >> 20) as u8)
        .collect();
    let mut dst = vec![0u8; TOTAL];
    let mut encoded = Vec::with_capacity(TOTAL + TOTAL / CHUNK * 64 + 4096);
    encode(&src, &mut encoded);
    let mut scratch = Vec::with_capacity(encoded.capacity());
    encode(&src, &mut scratch);

    let mut group = c.benchmark_group("stream 256MiB in 1MiB chunks");
    group.throughput(Throughput::Bytes(TOTAL as u64));
    group.sample_size(10);

    group.bench_function("baseline: memcpy", |b| {
        b.iter(|| {
            dst.copy_from_slice(black_box(&src));
            black_box(&dst);
        })
    });
    group.bench_function("crc32 only", |b| {
        b.iter(|| {
            for chunk in black_box(&src).chunks(CHUNK) {
                black_box(payload_crc(chunk));
            }
        })
    });
    group.bench_function("encode: frames only (payload written in place)", |b| {
        b.iter(|| {
            let mut out = Vec::new();
            let mut enc = Encoder::new(&StreamConfig::default(), &[device()], &mut out).unwrap();
            for chunk in black_box(&src).chunks(CHUNK) {
                black_box(enc.chunk_frame(0, Phase::StopCopy, chunk).unwrap());
            }
        })
    });
    group.bench_function("encode: into a Vec (crc + copy)", |b| {
        b.iter(|| {
            encode(black_box(&src), &mut scratch);
            black_box(&scratch);
        })
    });
    group.bench_function("decode: whole input, payloads copied out", |b| {
        b.iter(|| decode(black_box(&encoded), encoded.len(), &mut dst))
    });
    group.bench_function("decode: 64KiB pieces, payloads copied out", |b| {
        b.iter(|| decode(black_box(&encoded), 64 << 10, &mut dst))
    });
    group.bench_function("encode + decode (64KiB pieces)", |b| {
        b.iter(|| {
            encode(black_box(&src), &mut scratch);
            decode(&scratch, 64 << 10, &mut dst);
        })
    });
    group.finish();
    assert_eq!(dst, src);
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    bench(&mut criterion);
    criterion.final_summary();
}
