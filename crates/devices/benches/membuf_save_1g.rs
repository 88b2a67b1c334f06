//! Saves a 1 GiB membuf (or `MIB` MiB given as the first argument) through a 1 MiB buffer
//! into a hashing sink, then resumes nothing: it shows that saving holds the state once.
//!
//! ```text
//! cargo bench -p vfio-mig-devices --bench membuf_save_1g --no-run
//! /usr/bin/time -v target/release/deps/membuf_save_1g-<hash> [MIB]
//! ```
//!
//! Prints the state size, the time to generate it, the stream length and save throughput,
//! and the process's peak resident set (VmHWM) at the end.

use std::time::Instant;

use vfio_mig_device::{DeviceState, MigrationDevice, ReadOutcome};
use vfio_mig_devices::membuf::{self, MembufConfig};
use xxhash_rust::xxh3::Xxh3;

fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

fn main() {
    // `cargo bench` passes `--bench`; a plain number is the size in MiB.
    let mib: u64 = std::env::args()
        .skip(1)
        .find_map(|a| a.parse().ok())
        .unwrap_or(1024);
    let size = mib << 20;

    let t = Instant::now();
    let dev = membuf::create(MembufConfig {
        size,
        dirty_rate: 0,
        ..MembufConfig::default()
    })
    .expect("create membuf");
    let generate = t.elapsed();
    let rss_after_create = peak_rss_kib();

    let t = Instant::now();
    let mut stream = dev
        .controller()
        .set_state(DeviceState::StopCopy)
        .expect("stop-copy")
        .expect("a stream");
    let mut buf = vec![0u8; 1 << 20];
    let mut hasher = Xxh3::new();
    let mut total = 0u64;
    while let ReadOutcome::Data(n) = stream.read(&mut buf).expect("read") {
        hasher.update(&buf[..n]);
        total += n as u64;
    }
    let save = t.elapsed();
    dev.controller().set_state(DeviceState::Stop).expect("stop");

    let gib_s = |bytes: u64, secs: f64| bytes as f64 / secs / f64::from(1u32 << 30);
    println!("state            {} MiB", mib);
    println!(
        "generate         {:.3} s ({:.2} GiB/s)",
        generate.as_secs_f64(),
        gib_s(size, generate.as_secs_f64())
    );
    println!(
        "save             {total} stream bytes in {:.3} s ({:.2} GiB/s, read + hash)",
        save.as_secs_f64(),
        gib_s(total, save.as_secs_f64())
    );
    println!("stream xxh3      {:#018x}", hasher.digest());
    println!("state digest     {:#018x}", dev.regs().digest());
    if let (Some(created), Some(peak)) = (rss_after_create, peak_rss_kib()) {
        println!("peak RSS         {created} KiB after create, {peak} KiB at the end");
    }
}
