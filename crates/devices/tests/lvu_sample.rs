//! The lvu-sample device on its own: layout, BAR0 timer, the DMA round through a host, the
//! sample server's stream layout, BAR1 through save and resume, reset.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use vfio_mig_device::{
    write_all, DeviceError, DeviceState, DmaWindow, GuestMemory, HostServices, MigrationDevice,
    ReadOutcome, VecGuestMemory,
};
use vfio_mig_devices::lvu_sample::{
    self, LvuSample, LvuSampleConfig, BAR0, BAR1, BAR1_MMAP_AREAS, CONFIG, DEVICE_ID, SUBSYSTEM_ID,
    SUBSYSTEM_VENDOR_ID, VENDOR_ID,
};
use vfio_mig_uapi::Errno;

const BAR1_SIZE: usize = 16 * 1024;

fn device() -> LvuSample {
    lvu_sample::create(LvuSampleConfig::default()).unwrap()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn write_time(dev: &LvuSample, time: i64) {
    dev.regions()
        .region_write(BAR0, 0, &time.to_le_bytes())
        .unwrap();
}

fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Random-looking bytes (splitmix64 of `seed`).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed;
    (0..len)
        .map(|_| {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let z = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            (z ^ (z >> 27)) as u8
        })
        .collect()
}

fn read_all(stream: &mut vfio_mig_device::DataStream, chunk: usize) -> (Vec<Vec<u8>>, bool) {
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; chunk];
    loop {
        match stream.read(&mut buf).unwrap() {
            ReadOutcome::Data(n) => chunks.push(buf[..n].to_vec()),
            ReadOutcome::NothingNow => return (chunks, false),
            ReadOutcome::End => return (chunks, true),
        }
    }
}

#[test]
fn layout_is_the_sample_servers() {
    let dev = device();
    let regions = dev.regions();
    let sizes: Vec<(u32, u64)> = regions
        .regions()
        .iter()
        .map(|r| (r.index, r.size))
        .collect();
    assert_eq!(sizes, [(0, 8), (1, 16 * 1024), (7, 256)]);
    let irqs: Vec<(u32, u32)> = regions.irqs().iter().map(|i| (i.index, i.count)).collect();
    assert_eq!(irqs, [(0, 1), (1, 0), (2, 0), (3, 1), (4, 1)]);
    let mut config = [0u8; 64];
    regions.region_read(CONFIG, 0, &mut config).unwrap();
    let u16_at = |c: &[u8], o: usize| u16::from_le_bytes([c[o], c[o + 1]]);
    assert_eq!(
        (
            u16_at(&config, 0),
            u16_at(&config, 2),
            u16_at(&config, 0x2c),
            u16_at(&config, 0x2e)
        ),
        (VENDOR_ID, DEVICE_ID, SUBSYSTEM_VENDOR_ID, SUBSYSTEM_ID)
    );
    assert_eq!(config[0x3d], 1, "INTA");
    // IDs are read-only; the command register takes writes.
    regions.region_write(CONFIG, 0, &[0, 0, 0, 0, 6]).unwrap();
    regions.region_read(CONFIG, 0, &mut config).unwrap();
    assert_eq!((u16_at(&config, 0), config[4]), (VENDOR_ID, 6));
    let mmap = regions.region_mmap(BAR1).expect("BAR1 is mappable");
    assert_eq!(mmap.areas, BAR1_MMAP_AREAS);
    assert_eq!(mmap.file_offset, 0);
    assert!(regions.region_mmap(BAR0).is_none() && regions.region_mmap(CONFIG).is_none());
    assert!(regions.host_link().is_some());
    let id = dev.migration().identity().unwrap();
    assert_eq!((id.kind.as_str(), id.version.as_str()), ("lvu-sample", "1"));
    assert_eq!(
        dev.migration().features().unwrap(),
        vfio_mig_uapi::MigrationFeatures::PRE_COPY
    );
    assert_eq!(dev.migration().data_size().unwrap(), 16 * 1024 + 8);
    assert!(lvu_sample::create(LvuSampleConfig {
        bar1_size: 12 * 1024
    })
    .is_err());
}

#[test]
fn bar1_messages_and_the_memfd_see_the_same_bytes() {
    let dev = device();
    let regions = dev.regions();
    let data = noise(BAR1_SIZE, 3);
    regions.region_write(BAR1, 0, &data).unwrap();
    let fd = regions.region_mmap(BAR1).unwrap().fd;
    let mut from_file = vec![0u8; 100];
    pread_fd(&fd, &mut from_file, 0x2000);
    assert_eq!(from_file, data[0x2000..0x2064]);
    // Offsets are honoured (the sample's read callback ignored them).
    let mut part = [0u8; 16];
    regions.region_read(BAR1, 0x3ff0, &mut part).unwrap();
    assert_eq!(part, data[0x3ff0..]);
    let e = regions.region_read(BAR1, 0x3ff8, &mut part).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
    assert_eq!(dev.bar1().unwrap(), data);
}

fn pread_fd(fd: &std::os::fd::OwnedFd, buf: &mut [u8], offset: u64) {
    // std can read at an offset through a File borrowed from the fd.
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::from(fd.try_clone().unwrap());
    file.read_exact_at(buf, offset).unwrap();
}

#[test]
fn bar0_takes_whole_times_and_reads_the_seconds_since() {
    let dev = device();
    let regions = dev.regions();
    let e = regions.region_write(BAR0, 0, &[0; 4]).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
    let e = regions.region_read(BAR0, 0, &mut [0; 4]).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
    let future = now() + 1000;
    write_time(&dev, future);
    let mut b = [0u8; 8];
    regions.region_read(BAR0, 0, &mut b).unwrap();
    let since = i64::from_le_bytes(b);
    assert!((-1001..=-999).contains(&since), "{since}");
    assert_eq!(dev.timer(), (future, Some(future)));
}

/// A host that records interrupts and serves DMA by message from memory of its own.
struct FakeHost {
    windows: Vec<DmaWindow>,
    memory: VecGuestMemory,
    interrupts: Mutex<u32>,
    message_writes: Mutex<Vec<(u64, usize)>>,
    message_reads: Mutex<Vec<(u64, usize)>>,
}

impl FakeHost {
    fn new(windows: Vec<DmaWindow>) -> Arc<FakeHost> {
        Arc::new(FakeHost {
            windows,
            memory: VecGuestMemory::new(0, 0x10000),
            interrupts: Mutex::new(0),
            message_writes: Mutex::new(Vec::new()),
            message_reads: Mutex::new(Vec::new()),
        })
    }
}

impl HostServices for FakeHost {
    fn trigger_irq(&self, index: u32, vector: u32) -> Result<bool, DeviceError> {
        assert_eq!((index, vector), (0, 0), "INTx");
        *self.interrupts.lock().unwrap() += 1;
        Ok(true)
    }
    fn dma_windows(&self) -> Vec<DmaWindow> {
        self.windows.clone()
    }
    fn dma_write_by_message(&self, iova: u64, data: &[u8]) -> Result<(), DeviceError> {
        self.message_writes.lock().unwrap().push((iova, data.len()));
        self.memory.write(iova, data)
    }
    fn dma_read_by_message(&self, iova: u64, buf: &mut [u8]) -> Result<(), DeviceError> {
        self.message_reads.lock().unwrap().push((iova, buf.len()));
        self.memory.read(iova, buf)
    }
}

fn window(iova: u64, direct: bool) -> DmaWindow {
    DmaWindow {
        iova,
        size: 0x1000,
        readable: true,
        writable: true,
        direct,
    }
}

#[test]
fn the_timer_raises_intx_then_dma_direct_on_window_1_and_by_message_on_window_0() {
    let dev = device();
    let host = FakeHost::new(vec![window(0x8000, false), window(0x9000, true)]);
    dev.link().attach(Some(host.clone()));
    let direct = Arc::new(VecGuestMemory::new(0x9000, 0x1000));
    dev.dma().set_memory(Some(direct.clone()));
    dev.dma()
        .log()
        .start(
            4096,
            &[vfio_mig_device::IovaRange {
                iova: 0x8000,
                length: 0x2000,
            }],
        )
        .unwrap();
    write_time(&dev, now() - 5);
    wait_until("the DMA round", || dev.stats().dma_rounds == 2);
    let stats = dev.stats();
    assert_eq!(
        (stats.timer_fired, stats.interrupts, stats.dma_errors),
        (1, 1, 0)
    );
    assert_eq!(*host.interrupts.lock().unwrap(), 1);
    // By message on window 0: four 1 KiB writes, then two 2 KiB reads.
    assert_eq!(
        *host.message_writes.lock().unwrap(),
        [
            (0x8000, 1024),
            (0x8400, 1024),
            (0x8800, 1024),
            (0x8c00, 1024)
        ]
    );
    assert_eq!(
        *host.message_reads.lock().unwrap(),
        [(0x8000, 2048), (0x8800, 2048)]
    );
    let mut got = vec![0u8; 4096];
    host.memory.read(0x8000, &mut got).unwrap();
    let expected: Vec<u8> = (0..4096).map(|i| b'A' + (i / 1024) as u8).collect();
    assert_eq!(got, expected);
    // Directly on window 1, and logged by the DMA handle.
    direct.read(0x9000, &mut got).unwrap();
    assert_eq!(got, expected);
    let mut bitmap = [0u64; 1];
    dev.dma()
        .log()
        .report(0x8000, 0x2000, 4096, &mut bitmap)
        .unwrap();
    assert_eq!(bitmap[0] & 0b10, 0b10, "window 1 written directly is dirty");
    assert_eq!(dev.timer().1, None, "the timer fired once");
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(dev.stats().timer_fired, 1);
}

#[test]
fn without_a_host_the_timer_fires_into_nothing() {
    let dev = device();
    write_time(&dev, now());
    wait_until("the timer", || dev.stats().timer_fired == 1);
    let stats = dev.stats();
    assert_eq!(
        (stats.interrupts, stats.dma_rounds, stats.dma_errors),
        (0, 0, 0)
    );
}

#[test]
fn an_armed_timer_waits_while_the_device_is_stopped() {
    let dev = device();
    let host = FakeHost::new(Vec::new());
    dev.link().attach(Some(host.clone()));
    // Written while stopped: stored, not armed.
    dev.migration().set_state(DeviceState::Stop).unwrap();
    write_time(&dev, now() - 1);
    assert_eq!(dev.timer().1, None);
    dev.migration().set_state(DeviceState::Running).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(dev.stats().timer_fired, 0);
    // Armed, then stopped before it is due: it waits.
    write_time(&dev, now() + 1);
    dev.migration().set_state(DeviceState::Stop).unwrap();
    std::thread::sleep(Duration::from_millis(2100));
    assert_eq!(dev.stats().timer_fired, 0);
    assert!(dev.timer().1.is_some());
    dev.migration().set_state(DeviceState::Running).unwrap();
    wait_until("the timer after start", || dev.stats().timer_fired == 1);
    assert_eq!(*host.interrupts.lock().unwrap(), 1);
}

#[test]
fn streams_are_the_sample_servers_layout() {
    let dev = device();
    let bar1 = noise(BAR1_SIZE, 7);
    dev.regions().region_write(BAR1, 0, &bar1).unwrap();
    let time = now() + 600;
    write_time(&dev, time);
    let mig = dev.migration();
    let mut pre = mig.set_state(DeviceState::PreCopy).unwrap().expect("opens");
    let info = pre.precopy_info().unwrap();
    assert_eq!((info.initial_bytes, info.dirty_bytes), (16 * 1024, 0));
    // The sample client's pre-copy: 16 reads of 1 KiB, each full, then nothing.
    let (chunks, ended) = read_all(&mut pre, 1024);
    assert!(!ended);
    assert_eq!(chunks.len(), 16);
    assert!(chunks.iter().all(|c| c.len() == 1024));
    assert_eq!(chunks.concat(), bar1);
    // Stop-copy, the same session: BAR1 again, then the 8-byte time: 17 reads of 1 KiB,
    // the last one short.
    assert!(mig.set_state(DeviceState::StopCopy).unwrap().is_none());
    let mut stop = pre;
    let mut stop_copy = Vec::new();
    let mut buf = [0u8; 1024];
    let mut reads = 0;
    loop {
        match stop.read(&mut buf).unwrap() {
            ReadOutcome::Data(n) => {
                reads += 1;
                stop_copy.extend_from_slice(&buf[..n]);
            }
            ReadOutcome::End => break,
            ReadOutcome::NothingNow => panic!("STOP_COPY has it all"),
        }
    }
    assert_eq!(reads, 17);
    assert_eq!(stop_copy.len(), BAR1_SIZE + 8);
    assert_eq!(stop_copy[..BAR1_SIZE], bar1[..]);
    assert_eq!(stop_copy[BAR1_SIZE..], time.to_le_bytes());
    mig.set_state(DeviceState::Stop).unwrap();
}

#[test]
fn bar1_and_the_timer_survive_save_and_resume() {
    let src = device();
    let bar1 = noise(BAR1_SIZE, 11);
    src.regions().region_write(BAR1, 0, &bar1).unwrap();
    let time = now() + 3600;
    write_time(&src, time);
    let crc = crc32fast::hash(&bar1);
    src.migration().set_state(DeviceState::Stop).unwrap();
    let mut saving = src
        .migration()
        .set_state(DeviceState::StopCopy)
        .unwrap()
        .unwrap();
    let (chunks, ended) = read_all(&mut saving, 4096);
    assert!(ended);
    let stream = chunks.concat();
    src.migration().set_state(DeviceState::Stop).unwrap();

    let dst = device();
    // Too much is refused at once; too little when leaving RESUMING.
    let mut resuming = dst
        .migration()
        .set_state(DeviceState::Resuming)
        .unwrap()
        .unwrap();
    let e = resuming.write(&vec![0; 2 * BAR1_SIZE + 9]).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
    write_all(&mut *resuming, &stream[..100]).unwrap();
    let e = dst.migration().set_state(DeviceState::Stop).unwrap_err();
    assert_eq!(e.errno(), Errno::EINVAL);
    assert!(e.cause.message().contains("truncated"), "{e}");
    write_all(&mut *resuming, &stream[100..]).unwrap();
    dst.migration().set_state(DeviceState::Stop).unwrap();
    assert_eq!(crc32fast::hash(&dst.bar1().unwrap()), crc);
    assert_eq!(
        dst.timer(),
        (time, Some(time)),
        "armed for the migrated time"
    );
    dst.migration().set_state(DeviceState::Running).unwrap();
    assert_eq!(dst.stats().timer_fired, 0, "not due for an hour");
}

#[test]
fn a_destination_given_the_pre_copy_data_too_installs_the_stop_copy_state() {
    // What a uAPI user (vfio-mig's orchestrator) sends: everything the source produced.
    let src = device();
    src.regions()
        .region_write(BAR1, 0, &noise(BAR1_SIZE, 1))
        .unwrap();
    let mut saving = src
        .migration()
        .set_state(DeviceState::PreCopy)
        .unwrap()
        .unwrap();
    // Part of the pre-copy image only, then the guest changes BAR1 again.
    let mut sent = vec![0u8; 5000];
    assert_eq!(saving.read(&mut sent).unwrap(), ReadOutcome::Data(5000));
    let last = noise(BAR1_SIZE, 2);
    src.regions().region_write(BAR1, 0, &last).unwrap();
    let time = now() + 3600;
    write_time(&src, time);
    assert!(src
        .migration()
        .set_state(DeviceState::StopCopy)
        .unwrap()
        .is_none());
    let (rest, ended) = read_all(&mut saving, 4096);
    assert!(ended);
    sent.extend(rest.concat());
    assert_eq!(sent.len(), 5000 + BAR1_SIZE + 8);
    let dst = device();
    let mut resuming = dst
        .migration()
        .set_state(DeviceState::Resuming)
        .unwrap()
        .unwrap();
    write_all(&mut *resuming, &sent).unwrap();
    dst.migration().set_state(DeviceState::Running).unwrap();
    assert_eq!(
        crc32fast::hash(&dst.bar1().unwrap()),
        crc32fast::hash(&last)
    );
    assert_eq!(dst.timer(), (time, Some(time)));
}

#[test]
fn reset_clears_bar1_and_the_timer() {
    let dev = device();
    dev.regions().region_write(BAR1, 0x100, &[9; 64]).unwrap();
    write_time(&dev, now() + 100);
    dev.migration().set_state(DeviceState::Stop).unwrap();
    dev.migration().reset().unwrap();
    assert!(dev.bar1().unwrap().iter().all(|&b| b == 0));
    assert_eq!(dev.timer(), (0, None));
    assert_eq!(dev.migration().state().unwrap(), DeviceState::Running);
}
