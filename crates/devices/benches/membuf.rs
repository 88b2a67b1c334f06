//! Save and resume throughput of a 256 MiB membuf, with memcpy baselines measured in the same
//! run: `cargo bench -p vfio-mig-devices --bench membuf`.
//!
//! Every benchmark reports bytes of state per second, so the lines compare directly:
//! * `memcpy` copies 256 MiB into another 256 MiB buffer (what a resume must at least do);
//! * `memcpy_via_1MiB` copies 256 MiB through one 1 MiB buffer (what a save into a reader's
//!   1 MiB buffer must at least do);
//! * `digest` hashes the state (the digest register);
//! * `save` reads the whole STOP_COPY stream through a 1 MiB buffer (stream framing + copy +
//!   a page hash of every page for the trailer);
//! * `resume` writes that stream back in 1 MiB pieces and leaves RESUMING (copy + a page hash
//!   of every page + the trailer check).

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use vfio_mig_device::{write_all, DataStream, DeviceState, MigrationDevice, ReadOutcome};
use vfio_mig_devices::membuf::{self, Membuf, MembufConfig};

const SIZE: u64 = 256 << 20;
const CHUNK: usize = 1 << 20;

fn stopped(seed: u64) -> Membuf {
    let dev = membuf::create(MembufConfig {
        size: SIZE,
        dirty_rate: 0,
        seed,
        ..MembufConfig::default()
    })
    .expect("create membuf");
    dev.controller().set_state(DeviceState::Stop).expect("stop");
    dev
}

/// Reads one STOP_COPY stream, handing each piece to `sink`.
fn save(dev: &Membuf, buf: &mut [u8], mut sink: impl FnMut(&[u8])) {
    let mut stream: DataStream = dev
        .controller()
        .set_state(DeviceState::StopCopy)
        .expect("stop-copy")
        .expect("a stream");
    while let ReadOutcome::Data(n) = stream.read(buf).expect("read") {
        sink(&buf[..n]);
    }
    dev.controller().set_state(DeviceState::Stop).expect("stop");
}

fn resume(dev: &Membuf, saved: &[u8]) {
    let mut stream = dev
        .controller()
        .set_state(DeviceState::Resuming)
        .expect("resuming")
        .expect("a stream");
    for piece in saved.chunks(CHUNK) {
        write_all(stream.as_mut(), piece).expect("write");
    }
    dev.controller()
        .set_state(DeviceState::Stop)
        .expect("resume accepted");
}

fn throughput(c: &mut Criterion) {
    let src = stopped(1);
    let dst = stopped(2);
    let mut buf = vec![0u8; CHUNK];
    let mut saved = Vec::new();
    save(&src, &mut buf, |piece| saved.extend_from_slice(piece));

    let mut group = c.benchmark_group("membuf_256MiB");
    group
        .throughput(Throughput::Bytes(SIZE))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    {
        let from = vec![0x5au8; SIZE as usize];
        let mut to = vec![0u8; SIZE as usize];
        group.bench_function("memcpy", |b| {
            b.iter(|| {
                to.copy_from_slice(black_box(&from));
                black_box(&to);
            })
        });
        group.bench_function("memcpy_via_1MiB", |b| {
            b.iter(|| {
                for piece in black_box(&from).chunks(CHUNK) {
                    buf[..piece.len()].copy_from_slice(piece);
                    black_box(&buf);
                }
            })
        });
    }
    group.bench_function("digest", |b| b.iter(|| black_box(src.regs().digest())));
    group.bench_function("save", |b| {
        b.iter(|| {
            save(&src, &mut buf, |piece| {
                black_box(piece);
            })
        })
    });
    group.bench_function("resume", |b| b.iter(|| resume(&dst, black_box(&saved))));
    group.finish();
    assert_eq!(dst.regs().digest(), src.regs().digest());
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    throughput(&mut criterion);
    criterion.final_summary();
}
