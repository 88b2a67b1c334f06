//! The engines' memory stays bounded whatever the state size: a 256 MiB state generated on
//! the fly (the devices hold no copy) moves through a local migration while the process's
//! peak RSS grows by far less than the state. Alone in its test binary so that nothing else
//! moves the high-water mark.

use std::sync::Arc;
use std::time::Duration;

use vfio_mig_device::{
    Controller, DeviceError, DeviceIdentity, Dma, Errno, Migratable, MigrationDevice,
    MigrationFeatures, PrecopyInfo, RunMode, SaveKind,
};
use vfio_mig_orchestrator::{migrate_local, DestinationOptions, NamedDevice, SourceOptions};

const PAGE: u64 = 4096;
const SIZE: u64 = 256 << 20;

/// Page `p` is filled with the byte `p * 7 + 3`: a state described, never stored.
fn page_byte(page: u64) -> u8 {
    (page.wrapping_mul(7).wrapping_add(3)) as u8
}

/// Saves the synthetic state; resumes by checking it, keeping only a count.
struct Synthetic {
    at: u64,
    saving: bool,
    received: u64,
    bad: u64,
}

impl Migratable for Synthetic {
    fn features(&self) -> MigrationFeatures {
        MigrationFeatures::STOP_COPY
    }
    fn identity(&self) -> DeviceIdentity {
        DeviceIdentity {
            kind: "synthetic".into(),
            version: "1".into(),
            compat: SIZE.to_le_bytes().to_vec(),
        }
    }
    fn stop(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn start(&mut self, _mode: RunMode) -> Result<(), DeviceError> {
        Ok(())
    }
    fn set_p2p_quiesced(&mut self, _quiesced: bool) -> Result<(), DeviceError> {
        Ok(())
    }
    fn save_begin(&mut self, _kind: SaveKind) -> Result<(), DeviceError> {
        self.at = 0;
        self.saving = true;
        Ok(())
    }
    fn save_stop_copy(&mut self) -> Result<(), DeviceError> {
        Ok(())
    }
    fn save_read(&mut self, buf: &mut [u8]) -> Result<usize, DeviceError> {
        let mut n = 0;
        while n < buf.len() && self.at < SIZE {
            let in_page = (PAGE - self.at % PAGE).min((buf.len() - n) as u64) as usize;
            buf[n..n + in_page].fill(page_byte(self.at / PAGE));
            n += in_page;
            self.at += in_page as u64;
        }
        Ok(n)
    }
    fn save_pending(&mut self) -> Result<PrecopyInfo, DeviceError> {
        Err(DeviceError::new(Errno::EINVAL, "no precopy"))
    }
    fn save_end(&mut self) {
        self.saving = false;
    }
    fn resume_begin(&mut self) -> Result<(), DeviceError> {
        self.received = 0;
        self.bad = 0;
        Ok(())
    }
    fn resume_write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let mut at = self.received;
        let mut rest = buf;
        while !rest.is_empty() {
            let in_page = (PAGE - at % PAGE).min(rest.len() as u64) as usize;
            let want = [page_byte(at / PAGE); PAGE as usize];
            if rest[..in_page] != want[..in_page] {
                self.bad += 1;
            }
            rest = &rest[in_page..];
            at += in_page as u64;
        }
        self.received = at;
        Ok(buf.len())
    }
    fn resume_finish(&mut self) -> Result<(), DeviceError> {
        if self.received != SIZE || self.bad != 0 {
            return Err(DeviceError::new(
                Errno::EINVAL,
                format!("{} bytes, {} bad pages", self.received, self.bad),
            ));
        }
        Ok(())
    }
    fn stop_copy_size(&mut self) -> Result<u64, DeviceError> {
        Ok(SIZE)
    }
    fn dma_logging_supported(&self) -> bool {
        false
    }
    fn reset(&mut self) {
        self.saving = false;
    }
}

fn peak_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn synthetic() -> Controller<Synthetic> {
    Controller::new(
        Synthetic {
            at: 0,
            saving: false,
            received: 0,
            bad: 0,
        },
        Dma::new(),
    )
    .unwrap()
}

/// The raw speed of the same transport: SIZE bytes through a UNIX socket pair in 1 MiB
/// writes, bytes per second.
fn raw_socket_copy() -> f64 {
    use std::io::{Read, Write};
    let (mut a, mut b) = std::os::unix::net::UnixStream::pair().unwrap();
    let start = std::time::Instant::now();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 20];
        let mut total = 0u64;
        while total < SIZE {
            total += b.read(&mut buf).unwrap() as u64;
        }
    });
    let buf = vec![7u8; 1 << 20];
    for _ in 0..SIZE >> 20 {
        a.write_all(&buf).unwrap();
    }
    reader.join().unwrap();
    SIZE as f64 / start.elapsed().as_secs_f64()
}

/// Also prints the throughput against a raw socket copy (meaningful in release builds:
/// `cargo test --release -p vfio-mig-orchestrator --test memory -- --nocapture`).
#[test]
fn peak_memory_does_not_grow_with_the_state() {
    let before = peak_rss_kib();
    let src = synthetic();
    let dst = synthetic();
    let summary = migrate_local(
        &[NamedDevice::new(
            "src",
            Arc::new(src) as Arc<dyn MigrationDevice>,
        )],
        &[NamedDevice::new(
            "dst",
            Arc::new(dst.clone()) as Arc<dyn MigrationDevice>,
        )],
        &SourceOptions {
            ack_timeout: Duration::from_secs(120),
            ..SourceOptions::default()
        },
        &DestinationOptions::default(),
    )
    .unwrap_or_else(|e| panic!("{}", e.report()));
    assert_eq!(summary.source.bytes, SIZE);
    assert_eq!(dst.with_device(|d| (d.received, d.bad)), (SIZE, 0));
    let grown_mib = peak_rss_kib().saturating_sub(before) / 1024;
    eprintln!("peak RSS grew by {grown_mib} MiB moving {} MiB", SIZE >> 20);
    assert!(grown_mib < 64, "peak RSS grew by {grown_mib} MiB");
    let raw = raw_socket_copy();
    let engine = summary.source.stream_bytes as f64 / summary.source.total.as_secs_f64();
    eprintln!(
        "engine {:.0} MiB/s, raw socket copy {:.0} MiB/s ({:.0}%), downtime {:?}",
        engine / 1048576.0,
        raw / 1048576.0,
        100.0 * engine / raw,
        summary.source.downtime.map(|d| d.duration)
    );
}
