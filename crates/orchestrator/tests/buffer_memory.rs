//! Chunk buffers from a caller's [`BufferMemory`]: the devices' streams are read into and
//! written from that memory (not the heap), the provider is asked for exactly the pools'
//! buffers, a provider out of room only moves buffers to the heap, and every provided
//! buffer comes back, whether the migration succeeds or rolls back.

use std::ops::{Deref, DerefMut};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Duration;

use vfio_mig_device::{
    DataStream, DeviceError, DeviceIdentity, DeviceState, Errno, IovaRange, MigrationDevice,
    MigrationFeatures, MigrationStream, PrecopyInfo, ReadOutcome, StreamDirection, TransitionError,
};
use vfio_mig_devices::fault::{Fault, FaultAction, FaultPlan, FaultPoint, FaultyMigrationDevice};
use vfio_mig_devices::membuf::{self, Membuf, MembufConfig};
use vfio_mig_orchestrator::{
    migrate_in, migrate_local, migrate_out, BufferMemory, ChunkBuffer, DestinationOptions,
    MigrationError, NamedDevice, RecoveryOutcome, SourceOptions, Transport,
};
use vfio_mig_stream::FRAME_LEN;

const MIB: u64 = 1 << 20;
const CHUNK: usize = 64 * 1024;
const SRC_BUFFERS: usize = 3;
const DST_BUFFERS: usize = 2;

/// Buffer memory carved from one block it allocates up front: `slots` slots of `slot_len`
/// bytes, handed out one per buffer and taken back when a buffer drops. Counts what it
/// gave, refused and got back, and the lengths it was asked for.
#[derive(Debug)]
struct Arena {
    base: usize,
    size: usize,
    slot_len: usize,
    /// Successful allocations allowed in all; `None` after that many.
    limit: usize,
    free: Arc<Mutex<Vec<&'static mut [u8]>>>,
    allocations: AtomicUsize,
    refusals: AtomicUsize,
    returns: Arc<AtomicUsize>,
    asked: Mutex<Vec<usize>>,
}

impl Arena {
    fn new(slots: usize, slot_len: usize) -> Arc<Arena> {
        Arena::limited(slots, slot_len, usize::MAX)
    }

    /// Refuses every allocation after the first `limit`.
    fn limited(slots: usize, slot_len: usize, limit: usize) -> Arc<Arena> {
        // Leaked, so that the slots are plain `&'static mut` borrows of it: no unsafe code,
        // and a test process can afford a few MiB.
        let block: &'static mut [u8] = Box::leak(vec![0u8; slots * slot_len].into_boxed_slice());
        let (base, size) = (block.as_ptr() as usize, block.len());
        let free: Vec<&'static mut [u8]> = block.chunks_mut(slot_len).rev().collect();
        Arc::new(Arena {
            base,
            size,
            slot_len,
            limit,
            free: Arc::new(Mutex::new(free)),
            allocations: AtomicUsize::new(0),
            refusals: AtomicUsize::new(0),
            returns: Arc::new(AtomicUsize::new(0)),
            asked: Mutex::new(Vec::new()),
        })
    }

    fn contains(&self, (at, len): (usize, usize)) -> bool {
        at >= self.base && at + len <= self.base + self.size
    }

    fn allocations(&self) -> usize {
        self.allocations.load(Ordering::SeqCst)
    }

    fn refusals(&self) -> usize {
        self.refusals.load(Ordering::SeqCst)
    }

    /// Buffers handed out and not dropped yet.
    fn outstanding(&self) -> usize {
        self.allocations() - self.returns.load(Ordering::SeqCst)
    }

    fn free_slots(&self) -> usize {
        self.free.lock().unwrap().len()
    }

    fn asked(&self) -> Vec<usize> {
        self.asked.lock().unwrap().clone()
    }

    fn memory(self: &Arc<Self>) -> Option<Arc<dyn BufferMemory>> {
        Some(Arc::clone(self) as Arc<dyn BufferMemory>)
    }
}

impl BufferMemory for Arena {
    fn allocate(&self, len: usize) -> Option<Box<dyn ChunkBuffer>> {
        self.asked.lock().unwrap().push(len);
        let slot = if len <= self.slot_len && self.allocations() < self.limit {
            self.free.lock().unwrap().pop()
        } else {
            None
        };
        let Some(slot) = slot else {
            self.refusals.fetch_add(1, Ordering::SeqCst);
            return None;
        };
        self.allocations.fetch_add(1, Ordering::SeqCst);
        Some(Box::new(ArenaBuffer {
            slot: Some(slot),
            len,
            free: Arc::clone(&self.free),
            returns: Arc::clone(&self.returns),
        }))
    }
}

/// The first `len` bytes of an arena slot; the slot goes back to the arena on drop.
struct ArenaBuffer {
    slot: Option<&'static mut [u8]>,
    len: usize,
    free: Arc<Mutex<Vec<&'static mut [u8]>>>,
    returns: Arc<AtomicUsize>,
}

impl Deref for ArenaBuffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.slot.as_deref().expect("a slot until dropped")[..self.len]
    }
}

impl DerefMut for ArenaBuffer {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.slot.as_deref_mut().expect("a slot until dropped")[..self.len]
    }
}

impl Drop for ArenaBuffer {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.free.lock().unwrap().push(slot);
            self.returns.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Where a device's streams were read into and written from: (address, length) per call.
#[derive(Debug, Default)]
struct Touched {
    reads: Mutex<Vec<(usize, usize)>>,
    writes: Mutex<Vec<(usize, usize)>>,
}

impl Touched {
    fn reads(&self) -> Vec<(usize, usize)> {
        self.reads.lock().unwrap().clone()
    }

    fn writes(&self) -> Vec<(usize, usize)> {
        self.writes.lock().unwrap().clone()
    }
}

/// A device whose streams record the buffers the engine hands them.
struct Recording {
    inner: Arc<dyn MigrationDevice>,
    touched: Arc<Touched>,
}

impl Recording {
    fn wrap(inner: Arc<dyn MigrationDevice>) -> (Arc<dyn MigrationDevice>, Arc<Touched>) {
        let touched = Arc::new(Touched::default());
        let dev = Recording {
            inner,
            touched: Arc::clone(&touched),
        };
        (Arc::new(dev), touched)
    }
}

impl MigrationDevice for Recording {
    fn features(&self) -> Result<MigrationFeatures, DeviceError> {
        self.inner.features()
    }
    fn identity(&self) -> Result<DeviceIdentity, DeviceError> {
        self.inner.identity()
    }
    fn state(&self) -> Result<DeviceState, DeviceError> {
        self.inner.state()
    }
    fn set_state(&self, target: DeviceState) -> Result<Option<DataStream>, TransitionError> {
        Ok(self.inner.set_state(target)?.map(|inner| {
            Box::new(RecordingStream {
                inner,
                touched: Arc::clone(&self.touched),
            }) as DataStream
        }))
    }
    fn data_size(&self) -> Result<u64, DeviceError> {
        self.inner.data_size()
    }
    fn dma_logging_start(&self, page_size: u64, ranges: &[IovaRange]) -> Result<u64, DeviceError> {
        self.inner.dma_logging_start(page_size, ranges)
    }
    fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), DeviceError> {
        self.inner
            .dma_logging_report(iova, length, page_size, bitmap)
    }
    fn dma_logging_stop(&self) -> Result<(), DeviceError> {
        self.inner.dma_logging_stop()
    }
    fn reset(&self) -> Result<(), DeviceError> {
        self.inner.reset()
    }
}

#[derive(Debug)]
struct RecordingStream {
    inner: DataStream,
    touched: Arc<Touched>,
}

impl MigrationStream for RecordingStream {
    fn direction(&self) -> StreamDirection {
        self.inner.direction()
    }
    fn read(&mut self, buf: &mut [u8]) -> Result<ReadOutcome, DeviceError> {
        let at = (buf.as_ptr() as usize, buf.len());
        self.touched.reads.lock().unwrap().push(at);
        self.inner.read(buf)
    }
    fn write(&mut self, buf: &[u8]) -> Result<usize, DeviceError> {
        let at = (buf.as_ptr() as usize, buf.len());
        self.touched.writes.lock().unwrap().push(at);
        self.inner.write(buf)
    }
    fn precopy_info(&mut self) -> Result<PrecopyInfo, DeviceError> {
        self.inner.precopy_info()
    }
}

fn membuf(size: u64, dirty_rate: u64, features: u64, seed: u64) -> Membuf {
    membuf::create(MembufConfig {
        size,
        dirty_rate,
        features: MigrationFeatures::from_bits(features).unwrap(),
        seed,
        ..MembufConfig::default()
    })
    .unwrap()
}

fn src_opts(memory: Option<Arc<dyn BufferMemory>>) -> SourceOptions {
    SourceOptions {
        chunk_size: CHUNK as u32,
        buffers_per_device: SRC_BUFFERS,
        ack_timeout: Duration::from_secs(20),
        io_timeout: Some(Duration::from_secs(20)),
        downtime_limit: Duration::from_millis(500),
        buffer_memory: memory,
        ..SourceOptions::default()
    }
}

fn dst_opts(memory: Option<Arc<dyn BufferMemory>>) -> DestinationOptions {
    DestinationOptions {
        buffers_per_device: DST_BUFFERS,
        io_timeout: Some(Duration::from_secs(20)),
        drain_timeout: Duration::from_secs(2),
        buffer_memory: memory,
        ..DestinationOptions::default()
    }
}

/// Source and destination membufs (2 MiB each, different contents), the sources dirtying
/// while they run, wrapped to record their streams' buffers.
struct Devices {
    src: Vec<Membuf>,
    dst: Vec<Membuf>,
    src_named: Vec<NamedDevice>,
    dst_named: Vec<NamedDevice>,
    src_touched: Vec<Arc<Touched>>,
    dst_touched: Vec<Arc<Touched>>,
}

impl Devices {
    /// One device per entry of `features`.
    fn new(features: &[u64]) -> Devices {
        let mut d = Devices {
            src: Vec::new(),
            dst: Vec::new(),
            src_named: Vec::new(),
            dst_named: Vec::new(),
            src_touched: Vec::new(),
            dst_touched: Vec::new(),
        };
        for (i, &f) in (0u64..).zip(features) {
            let src = membuf(2 * MIB, 8 * MIB, f, 10 + i);
            let dst = membuf(2 * MIB, 0, f, 20 + i);
            let (s, st) = Recording::wrap(src.migration());
            let (t, dt) = Recording::wrap(dst.migration());
            d.src_named.push(NamedDevice::new(format!("s{i}"), s));
            d.dst_named.push(NamedDevice::new(format!("d{i}"), t));
            d.src_touched.push(st);
            d.dst_touched.push(dt);
            d.src.push(src);
            d.dst.push(dst);
        }
        d
    }

    fn assert_migrated(&self) {
        for (i, (s, d)) in self.src.iter().zip(&self.dst).enumerate() {
            assert_eq!(s.controller().state().unwrap(), DeviceState::Stop, "{i}");
            assert_eq!(d.controller().state().unwrap(), DeviceState::Running, "{i}");
            assert_eq!(s.regs().digest(), d.regs().digest(), "device {i}");
        }
    }

    fn src_reads(&self) -> Vec<(usize, usize)> {
        self.src_touched.iter().flat_map(|t| t.reads()).collect()
    }

    fn dst_writes(&self) -> Vec<(usize, usize)> {
        self.dst_touched.iter().flat_map(|t| t.writes()).collect()
    }
}

fn assert_all_inside(arena: &Arena, spans: &[(usize, usize)], what: &str) {
    assert!(!spans.is_empty(), "{what}: no calls recorded");
    for &span in spans {
        assert!(
            arena.contains(span),
            "{what}: {span:x?} is outside the provided memory {:#x}+{:#x}",
            arena.base,
            arena.size
        );
    }
}

fn assert_all_back(arena: &Arena, slots: usize, what: &str) {
    assert_eq!(
        arena.outstanding(),
        0,
        "{what}: provided buffers not dropped"
    );
    assert_eq!(arena.free_slots(), slots, "{what}: slots missing");
}

#[test]
fn a_local_migration_reads_and_writes_the_devices_in_the_provided_memory() {
    let devices = Devices::new(&[0x7, 0x3]);
    let slots = 2 * SRC_BUFFERS;
    let src_arena = Arena::new(slots, FRAME_LEN + CHUNK);
    // The destination engine takes no buffers of its own in a local migration.
    let dst_arena = Arena::new(4, 4 << 20);
    let (src_options, dst_options) = (src_opts(src_arena.memory()), dst_opts(dst_arena.memory()));
    // The options show their provider.
    assert!(format!("{src_options:?}").contains("buffer_memory: Some(Arena {"));
    assert!(format!("{dst_options:?}").contains("buffer_memory: Some(Arena {"));
    assert!(format!("{:?}", SourceOptions::default()).contains("buffer_memory: None"));
    let summary = migrate_local(
        &devices.src_named,
        &devices.dst_named,
        &src_options,
        &dst_options,
    )
    .unwrap_or_else(|e| panic!("{}", e.report()));
    devices.assert_migrated();
    assert!(summary.source.precopy_rounds > 0);
    assert_eq!(src_arena.allocations(), slots);
    assert_eq!(src_arena.refusals(), 0);
    assert_eq!(src_arena.asked(), vec![FRAME_LEN + CHUNK; slots]);
    assert_all_inside(&src_arena, &devices.src_reads(), "source reads");
    // The destination devices take their data from the same buffers: no copy between.
    assert_all_inside(&src_arena, &devices.dst_writes(), "destination writes");
    for (at, _) in devices.src_reads() {
        assert_eq!(
            (at - src_arena.base) % src_arena.slot_len,
            FRAME_LEN,
            "a read does not start after the frame's room"
        );
    }
    assert_all_back(&src_arena, slots, "source");
    assert!(dst_arena.asked().is_empty(), "{:?}", dst_arena.asked());
}

#[test]
fn a_provider_out_of_room_leaves_the_other_buffers_on_the_heap() {
    let devices = Devices::new(&[0x7, 0x7]);
    let slots = 2 * SRC_BUFFERS;
    let room = 2;
    let arena = Arena::limited(slots, FRAME_LEN + CHUNK, room);
    migrate_local(
        &devices.src_named,
        &devices.dst_named,
        &src_opts(arena.memory()),
        &dst_opts(None),
    )
    .unwrap_or_else(|e| panic!("{}", e.report()));
    devices.assert_migrated();
    // Asked once per buffer, never again.
    assert_eq!(arena.asked().len(), slots);
    assert_eq!(arena.allocations(), room);
    assert_eq!(arena.refusals(), slots - room);
    let reads = devices.src_reads();
    assert!(reads.iter().any(|&r| arena.contains(r)));
    assert!(
        reads.iter().any(|&r| !arena.contains(r)),
        "no heap buffer read"
    );
    assert_all_back(&arena, slots, "source");
}

/// A source and a destination engine over a UNIX socket pair, each with its own memory.
fn migrate_over_socket(
    sources: &[NamedDevice],
    destinations: &[NamedDevice],
    src: SourceOptions,
    dst: DestinationOptions,
) -> (Result<(), MigrationError>, Result<(), MigrationError>) {
    let (a, b) = UnixStream::pair().unwrap();
    let destinations = destinations.to_vec();
    let receiver = thread::spawn(move || {
        migrate_in(&destinations, Transport::unix(b).unwrap(), &dst).map(|_| ())
    });
    let sent = migrate_out(sources, Transport::unix(a).unwrap(), &src).map(|_| ());
    (sent, receiver.join().unwrap())
}

#[test]
fn over_a_socket_the_destination_writes_its_devices_from_the_provided_memory() {
    let devices = Devices::new(&[0x7, 0x3]);
    let src_slots = 2 * SRC_BUFFERS;
    let dst_slots = 2 * DST_BUFFERS;
    let src_arena = Arena::new(src_slots, FRAME_LEN + CHUNK);
    // Slots as large as the destination's limit; it asks only for the stream's chunk size.
    let dst_arena = Arena::new(dst_slots, 4 << 20);
    let (sent, received) = migrate_over_socket(
        &devices.src_named,
        &devices.dst_named,
        src_opts(src_arena.memory()),
        dst_opts(dst_arena.memory()),
    );
    sent.unwrap_or_else(|e| panic!("{}", e.report()));
    received.unwrap_or_else(|e| panic!("{}", e.report()));
    devices.assert_migrated();
    assert_all_inside(&src_arena, &devices.src_reads(), "source reads");
    assert_all_inside(&dst_arena, &devices.dst_writes(), "destination writes");
    assert_eq!(src_arena.allocations(), src_slots);
    assert_eq!(dst_arena.allocations(), dst_slots);
    assert_eq!(dst_arena.asked(), vec![CHUNK; dst_slots]);
    assert_all_back(&src_arena, src_slots, "source");
    assert_all_back(&dst_arena, dst_slots, "destination");
}

#[test]
fn a_destination_provider_out_of_room_still_loads_everything() {
    let devices = Devices::new(&[0x7]);
    let arena = Arena::limited(DST_BUFFERS, CHUNK, 1);
    let (sent, received) = migrate_over_socket(
        &devices.src_named,
        &devices.dst_named,
        src_opts(None),
        dst_opts(arena.memory()),
    );
    sent.unwrap_or_else(|e| panic!("{}", e.report()));
    received.unwrap_or_else(|e| panic!("{}", e.report()));
    devices.assert_migrated();
    assert_eq!(arena.allocations(), 1);
    assert_eq!(arena.refusals(), DST_BUFFERS - 1);
    let writes = devices.dst_writes();
    assert!(writes.iter().any(|&w| arena.contains(w)));
    assert!(
        writes.iter().any(|&w| !arena.contains(w)),
        "no heap buffer used"
    );
    assert_all_back(&arena, DST_BUFFERS, "destination");
}

/// A membuf behind a fault plan, recording its streams' buffers.
fn faulty(dev: &Membuf, fault: Fault) -> NamedDevice {
    let plan = FaultPlan::new();
    plan.arm(fault);
    let inner = FaultyMigrationDevice::new(dev.controller().clone(), plan);
    NamedDevice::new("faulty", Arc::new(inner))
}

#[test]
fn rollbacks_give_every_provided_buffer_back() {
    let fail = FaultAction::Fail(Errno::EIO);
    // (what fails, source fault, destination fault, whether the source started reading)
    let cases = [
        (
            "source read",
            Some(Fault::new(FaultPoint::StreamRead, fail).nth(5)),
            None,
            true,
        ),
        (
            "destination write",
            None,
            Some(Fault::new(FaultPoint::StreamWrite, fail).nth(3)),
            true,
        ),
        // Refused before the source touched its device: it never read.
        (
            "destination resuming",
            None,
            Some(Fault::new(
                FaultPoint::SetState(DeviceState::Resuming),
                fail,
            )),
            false,
        ),
        (
            "destination running",
            None,
            Some(Fault::new(FaultPoint::SetState(DeviceState::Running), fail)),
            true,
        ),
    ];
    for (what, src_fault, dst_fault, src_read) in cases {
        for over_socket in [false, true] {
            let what = format!("{what}, over a socket: {over_socket}");
            let src = membuf(2 * MIB, 8 * MIB, 0x7, 31);
            let dst = membuf(2 * MIB, 0, 0x7, 32);
            let src_named = match src_fault {
                Some(f) => faulty(&src, f),
                None => NamedDevice::new("s", src.migration()),
            };
            let dst_named = match dst_fault {
                Some(f) => faulty(&dst, f),
                None => NamedDevice::new("d", dst.migration()),
            };
            let src_arena = Arena::new(SRC_BUFFERS, FRAME_LEN + CHUNK);
            let dst_arena = Arena::new(DST_BUFFERS, CHUNK);
            let src_opts = src_opts(src_arena.memory());
            let dst_opts = dst_opts(dst_arena.memory());
            let err = if over_socket {
                let (sent, received) =
                    migrate_over_socket(&[src_named], &[dst_named], src_opts, dst_opts);
                assert!(received.is_err(), "{what}: the destination succeeded");
                sent.unwrap_err()
            } else {
                migrate_local(&[src_named], &[dst_named], &src_opts, &dst_opts).unwrap_err()
            };
            let report = err.report();
            assert!(
                matches!(
                    err.recovery.outcome,
                    RecoveryOutcome::RolledBack | RecoveryOutcome::Untouched
                ),
                "{what}: {report}"
            );
            assert_eq!(
                src.controller().state().unwrap(),
                DeviceState::Running,
                "{what}"
            );
            assert_eq!(
                dst.controller().state().unwrap(),
                DeviceState::Running,
                "{what}"
            );
            let src_allocated = if src_read { SRC_BUFFERS } else { 0 };
            assert_eq!(src_arena.allocations(), src_allocated, "{what}: {report}");
            assert_all_back(&src_arena, SRC_BUFFERS, &what);
            // The destination takes buffers only over a socket, once it accepted the devices.
            let dst_allocated = if over_socket { DST_BUFFERS } else { 0 };
            assert_eq!(dst_arena.allocations(), dst_allocated, "{what}: {report}");
            assert_all_back(&dst_arena, DST_BUFFERS, &what);
        }
    }
}
