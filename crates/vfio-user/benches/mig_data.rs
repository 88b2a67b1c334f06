//! Migration data throughput over vfio-user next to the socket's own limit, measured in the
//! same run: `cargo bench -p vfio-mig-vfio-user --bench mig_data`.
//!
//! The device is a still `membuf` (`VFIO_MIG_BENCH_MIB`, default 256 MiB) hosted by vfio-mig's
//! server on a UNIX socket; the client is vfio-mig's `RemoteDevice`. Every line reports bytes
//! of device state per second:
//!
//! * `raw_socketpair`: one thread writes the same number of bytes from memory into a
//!   `UnixStream` in 1 MiB writes, the other reads them into a 1 MiB buffer: the ceiling;
//! * `in_process_save` / `in_process_resume`: the same STOP_COPY save and resume through the
//!   device's controller directly, no socket: the device's own cost;
//! * `vfio_user_save`: RUNNING -> STOP_COPY, MIG_DATA_READ to the end (1 MiB requests,
//!   replies received straight into the reader's buffer), -> STOP -> RUNNING;
//! * `vfio_user_resume`: RUNNING -> RESUMING, the saved stream in MIG_DATA_WRITEs sent
//!   straight from memory (1 MiB each: vfio-mig's server announces whole-message reads),
//!   -> STOP (the device checks the state) -> RUNNING.
//!
//! * `..._unpipelined`: the same with `ClientOptions::pipelining` off (each reply awaited
//!   before the next request).
//!
//! The target is at least 60% of `raw_socketpair` for the two vfio-user lines.

use std::hint::black_box;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use criterion::{Criterion, Throughput};
use vfio_mig_device::{write_all, DataStream, DeviceState, MigrationDevice, ReadOutcome};
use vfio_mig_devices::membuf::{self, Membuf, MembufConfig};
use vfio_mig_vfio_user::client::{Client, ClientOptions, RemoteDevice};
use vfio_mig_vfio_user::server::{HostedDevice, Server, StopHandle};

const CHUNK: usize = 1 << 20;

fn state_size() -> u64 {
    std::env::var("VFIO_MIG_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(256)
        << 20
}

fn membuf(size: u64, seed: u64) -> Membuf {
    membuf::create(MembufConfig {
        size,
        dirty_rate: 0,
        seed,
        ..MembufConfig::default()
    })
    .expect("create membuf")
}

/// Serves `dev` on a fresh socket path in a thread.
fn serve(dev: &Membuf, dir: &tempfile::TempDir, name: &str) -> (PathBuf, StopHandle) {
    let path = dir.path().join(name);
    let mut server = Server::bind(&path, HostedDevice::new(dev.migration(), dev.regions()))
        .expect("bind server");
    let stop = server.stop_handle();
    thread::spawn(move || server.serve_forever().expect("serve"));
    (path, stop)
}

/// RUNNING -> STOP_COPY, read to the end into `buf` (each piece to `sink`), -> STOP.
fn save(dev: &dyn MigrationDevice, buf: &mut [u8], mut sink: impl FnMut(&[u8])) {
    let mut stream: DataStream = dev
        .set_state(DeviceState::StopCopy)
        .expect("stop-copy")
        .expect("a stream");
    loop {
        match stream.read(buf).expect("read") {
            ReadOutcome::Data(n) => sink(&buf[..n]),
            ReadOutcome::End => break,
            ReadOutcome::NothingNow => panic!("nothing now in STOP_COPY"),
        }
    }
    dev.set_state(DeviceState::Stop).expect("stop");
}

/// -> RESUMING, `saved` in 1 MiB writes, -> STOP (the device validates it).
fn resume(dev: &dyn MigrationDevice, saved: &[u8]) {
    let mut stream = dev
        .set_state(DeviceState::Resuming)
        .expect("resuming")
        .expect("a stream");
    for piece in saved.chunks(CHUNK) {
        write_all(stream.as_mut(), piece).expect("write");
    }
    dev.set_state(DeviceState::Stop).expect("resume accepted");
}

fn raw_copy(bytes: &Arc<Vec<u8>>, buf: &mut [u8]) {
    let (mut rx, mut tx) = UnixStream::pair().expect("socketpair");
    let data = Arc::clone(bytes);
    let writer = thread::spawn(move || {
        for piece in data.chunks(CHUNK) {
            tx.write_all(piece).expect("write");
        }
    });
    let mut left = bytes.len();
    while left > 0 {
        let n = rx.read(buf).expect("read");
        assert!(n > 0, "writer ended early");
        black_box(&buf[..n]);
        left -= n;
    }
    writer.join().expect("writer");
}

fn throughput(c: &mut Criterion) {
    let size = state_size();
    let dir = tempfile::tempdir().expect("temp dir");
    let src = membuf(size, 1);
    let dst = membuf(size, 2);
    let (src_path, src_stop) = serve(&src, &dir, "src.sock");
    let (dst_path, dst_stop) = serve(&dst, &dir, "dst.sock");
    let connect = |path: &PathBuf, pipelining: bool| {
        let options = ClientOptions {
            pipelining,
            ..ClientOptions::default()
        };
        let client = Client::connect_with(path, options).expect("connect");
        RemoteDevice::new(Arc::new(client))
    };
    let remote_src = connect(&src_path, true);
    let remote_dst = connect(&dst_path, true);
    assert!(
        remote_src.client().negotiated().extension.is_some(),
        "vfio-mig's server negotiates the extensions"
    );

    let mut buf = vec![0u8; CHUNK];
    let mut saved = Vec::with_capacity(size as usize + CHUNK);
    save(&remote_src, &mut buf, |piece| {
        saved.extend_from_slice(piece)
    });
    remote_src.set_state(DeviceState::Running).expect("run");
    // The bytes that are timed below do make a working migration.
    resume(&remote_dst, &saved);
    assert_eq!(
        dst.regs().digest(),
        src.regs().digest(),
        "resumed state differs"
    );
    remote_dst.set_state(DeviceState::Running).expect("run");
    let stream_len = saved.len() as u64;
    let raw = Arc::new(saved.clone());

    let mut group = c.benchmark_group(format!("mig_data_{}MiB", size >> 20));
    group
        .throughput(Throughput::Bytes(stream_len))
        .sample_size(10)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(8));
    group.bench_function("raw_socketpair", |b| b.iter(|| raw_copy(&raw, &mut buf)));
    group.bench_function("in_process_save", |b| {
        b.iter(|| {
            save(src.controller(), &mut buf, |p| {
                black_box(p);
            });
            src.controller()
                .set_state(DeviceState::Running)
                .expect("run");
        })
    });
    group.bench_function("vfio_user_save", |b| {
        b.iter(|| {
            save(&remote_src, &mut buf, |p| {
                black_box(p);
            });
            remote_src.set_state(DeviceState::Running).expect("run");
        })
    });
    // The same without pipelining (every reply awaited before the next request), on a
    // second connection: the server serves one client at a time, so the first one waits.
    drop(remote_src);
    let plain_src = connect(&src_path, false);
    group.bench_function("vfio_user_save_unpipelined", |b| {
        b.iter(|| {
            save(&plain_src, &mut buf, |p| {
                black_box(p);
            });
            plain_src.set_state(DeviceState::Running).expect("run");
        })
    });
    drop(plain_src);
    group.bench_function("in_process_resume", |b| {
        b.iter(|| {
            resume(dst.controller(), black_box(&saved));
            dst.controller()
                .set_state(DeviceState::Running)
                .expect("run");
        })
    });
    group.bench_function("vfio_user_resume", |b| {
        b.iter(|| {
            resume(&remote_dst, black_box(&saved));
            remote_dst.set_state(DeviceState::Running).expect("run");
        })
    });
    drop(remote_dst);
    let plain_dst = connect(&dst_path, false);
    group.bench_function("vfio_user_resume_unpipelined", |b| {
        b.iter(|| {
            resume(&plain_dst, black_box(&saved));
            plain_dst.set_state(DeviceState::Running).expect("run");
        })
    });
    group.finish();
    assert_eq!(
        dst.regs().digest(),
        src.regs().digest(),
        "resumed state differs"
    );

    drop(plain_dst);
    src_stop.stop();
    dst_stop.stop();
}

fn main() {
    let mut criterion = Criterion::default().configure_from_args();
    throughput(&mut criterion);
    criterion.final_summary();
}
