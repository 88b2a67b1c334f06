//! The shared data buffer extension (DEVICE_FEATURE 0xF002-0xF004): the server's checks
//! message by message, and our client moving a live device's state from one server to
//! another through one arena without carrying a byte in a message.

mod server_support;

use std::os::fd::OwnedFd;
use std::sync::Arc;

use rustix::fs::{memfd_create, MemfdFlags, SealFlags};
use server_support::*;
use vfio_mig_device::{write_all, DeviceState, MigrationDevice, ReadOutcome};
use vfio_mig_devices::membuf;
use vfio_mig_uapi::{Errno, MigrationFeatures};
use vfio_mig_vfio_user::client::{ClientOptions, DataArena, DataCounters};
use vfio_mig_vfio_user::codec::{FeatureData, Request, FEATURE_PROBE, FEATURE_SET};
use vfio_mig_vfio_user::extension::{
    DataBufferRegistration, SharedTransfer, FEATURE_DATA_BUFFER, FEATURE_DATA_READ_SHARED,
    FEATURE_DATA_WRITE_SHARED, MAX_DATA_BUFFER,
};
use vfio_mig_vfio_user::server::{DeviceHost, ServerConfig, ServerSession};

const MIB: u64 = 1 << 20;
const BUF: u64 = 4 * MIB;

fn host(size: u64) -> (membuf::Membuf, DeviceHost) {
    let (m, hosted) = membuf(size, MigrationFeatures::new(true, true), 5);
    (m, DeviceHost::new(hosted).unwrap())
}

/// A session negotiated as a vfio-mig client (1 MiB transfers).
fn ext_session(host: &mut DeviceHost) -> ServerSession<'_> {
    let mut s = ServerSession::new(host, ServerConfig::default());
    assert_eq!(errno(&call(&mut s, version_request_ext(1 << 20))), None);
    s
}

fn sealed_memfd(size: u64) -> OwnedFd {
    let fd = memfd_create("arena", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING).unwrap();
    rustix::fs::ftruncate(&fd, size).unwrap();
    rustix::fs::fcntl_add_seals(&fd, SealFlags::SHRINK | SealFlags::GROW).unwrap();
    fd
}

fn dup(fd: &OwnedFd) -> OwnedFd {
    fd.try_clone().unwrap()
}

fn register(s: &mut ServerSession<'_>, size: u64, fds: Vec<OwnedFd>) -> Vec<u8> {
    let reg = DataBufferRegistration {
        file_offset: 0,
        size,
    }
    .encode();
    call_fds(s, set(FEATURE_DATA_BUFFER, FeatureData::Raw(&reg)), fds)
}

/// A transfer request's data.
fn transfer(offset: u64, size: u32) -> [u8; 16] {
    SharedTransfer {
        offset,
        size,
        count: 0,
    }
    .encode()
}

fn shared_read(s: &mut ServerSession<'_>, offset: u64, size: u32) -> Vec<u8> {
    let t = transfer(offset, size);
    let mut req = get(FEATURE_DATA_READ_SHARED, 16);
    if let Request::DeviceFeature(f) = &mut req {
        f.data = FeatureData::Raw(&t);
    }
    let Request::DeviceFeature(f) = req else {
        unreachable!()
    };
    call(s, Request::DeviceFeature(f))
}

fn shared_write(s: &mut ServerSession<'_>, offset: u64, size: u32) -> Vec<u8> {
    let t = transfer(offset, size);
    call(s, set(FEATURE_DATA_WRITE_SHARED, FeatureData::Raw(&t)))
}

/// The reply data of a shared read.
fn read_reply(bytes: &[u8]) -> SharedTransfer {
    match feature(bytes).data {
        FeatureData::Raw(d) => SharedTransfer::decode(d).unwrap(),
        other => panic!("no data: {other:?}"),
    }
}

#[test]
fn a_shared_read_places_the_stream_in_the_buffer_and_a_shared_write_takes_it() {
    let size = 2 * MIB;
    let (src_membuf, mut src_host) = host(size);
    let (dst_membuf, mut dst_host) = host(size);
    let fd = sealed_memfd(BUF);
    let mut src = ext_session(&mut src_host);
    let mut dst = ext_session(&mut dst_host);
    assert_eq!(errno(&register(&mut src, BUF, vec![dup(&fd)])), None);
    assert_eq!(errno(&register(&mut dst, BUF, vec![dup(&fd)])), None);
    assert_eq!(
        errno(&call(&mut src, set_state(DeviceState::StopCopy))),
        None
    );
    assert_eq!(
        errno(&call(&mut dst, set_state(DeviceState::Resuming))),
        None
    );
    let mut total = 0u64;
    let mut offset = 0;
    loop {
        // Alternate between two slots, as a pipelining client would.
        let got = read_reply(&shared_read(&mut src, offset, MIB as u32));
        assert_eq!((got.offset, got.size), (offset, MIB as u32));
        if got.count == 0 {
            break;
        }
        total += u64::from(got.count);
        assert_eq!(errno(&shared_write(&mut dst, offset, got.count)), None);
        offset = MIB - offset;
    }
    assert_eq!(total, membuf::format::full_stream_len(size));
    assert_eq!(errno(&call(&mut dst, set_state(DeviceState::Stop))), None);
    assert_eq!(dst_membuf.regs().digest(), src_membuf.regs().digest());
}

#[test]
fn the_bytes_land_where_asked_and_nowhere_else() {
    let (_m, mut h) = host(MIB);
    let fd = sealed_memfd(BUF);
    rustix::io::pwrite(&fd, &[0xEE; 64], 4096 - 32).unwrap();
    let mut s = ext_session(&mut h);
    assert_eq!(errno(&register(&mut s, BUF, vec![dup(&fd)])), None);
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::StopCopy))), None);
    let got = read_reply(&shared_read(&mut s, 4096, 1000));
    assert_eq!(got.count, 1000);
    let around = pread(&fd, 4096 - 32, 1064);
    assert_eq!(
        around[..32],
        [0xEE; 32],
        "bytes before the range are untouched"
    );
    assert_eq!(
        around[32 + 1000..],
        [0; 32],
        "bytes after the range are untouched"
    );
    assert_eq!(
        &around[32..36],
        &membuf::format::STREAM_MAGIC[..4],
        "the stream starts with its magic"
    );
}

#[test]
fn the_server_checks_every_field() {
    let (_m, mut h) = host(MIB);
    let fd = sealed_memfd(BUF);
    let mut s = ext_session(&mut h);
    // Nothing registered yet.
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::StopCopy))), None);
    assert_errno(&shared_read(&mut s, 0, 100), Errno::EINVAL);
    // Registration: the fd is needed, exactly one, and a size within bounds inside the file.
    assert_errno(&register(&mut s, BUF, vec![]), Errno::EINVAL);
    assert_errno(
        &register(&mut s, BUF, vec![dup(&fd), dup(&fd)]),
        Errno::EINVAL,
    );
    assert_errno(&register(&mut s, 0, vec![dup(&fd)]), Errno::EINVAL);
    assert_errno(
        &register(&mut s, MAX_DATA_BUFFER + 1, vec![dup(&fd)]),
        Errno::EINVAL,
    );
    assert_errno(&register(&mut s, BUF + 1, vec![dup(&fd)]), Errno::EINVAL);
    let (pipe_r, _pipe_w) = rustix::pipe::pipe().unwrap();
    assert_errno(&register(&mut s, 4096, vec![pipe_r]), Errno::EINVAL);
    // fds on any other feature are refused.
    let t = transfer(0, 1);
    assert_errno(
        &call_fds(
            &mut s,
            set(FEATURE_DATA_WRITE_SHARED, FeatureData::Raw(&t)),
            vec![dup(&fd)],
        ),
        Errno::EINVAL,
    );
    assert_eq!(errno(&register(&mut s, BUF, vec![dup(&fd)])), None);
    // Ranges must lie inside the buffer and within the transfer limit; count must be 0.
    assert_errno(&shared_read(&mut s, BUF - 10, 11), Errno::EINVAL);
    assert_errno(&shared_read(&mut s, u64::MAX, 2), Errno::EINVAL);
    assert_errno(&shared_read(&mut s, 0, (MIB + 1) as u32), Errno::EINVAL);
    let bad = SharedTransfer {
        offset: 0,
        size: 8,
        count: 1,
    }
    .encode();
    let mut req = get(FEATURE_DATA_READ_SHARED, 16);
    if let Request::DeviceFeature(f) = &mut req {
        f.data = FeatureData::Raw(&bad);
    }
    assert_errno(&call(&mut s, req), Errno::EINVAL);
    // Data of the wrong length.
    let mut req = get(FEATURE_DATA_READ_SHARED, 16);
    if let Request::DeviceFeature(f) = &mut req {
        f.data = FeatureData::Raw(&bad[..12]);
    }
    assert_errno(&call(&mut s, req), Errno::EINVAL);
    // Direction and state: reads only while saving, writes only while resuming.
    assert_errno(&shared_write(&mut s, 0, 8), Errno::EINVAL);
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::Running))), None);
    assert_errno(&shared_read(&mut s, 0, 8), Errno::EINVAL);
    // The right ops: read is GET only, write and registration SET only; PROBE answers.
    let probe = call(
        &mut s,
        Request::DeviceFeature(vfio_mig_vfio_user::codec::DeviceFeature::new(
            FEATURE_PROBE | FEATURE_SET,
            FEATURE_DATA_READ_SHARED,
            FeatureData::None,
        )),
    );
    assert_errno(&probe, Errno::EINVAL);
    for (index, ops) in [
        (FEATURE_DATA_BUFFER, FEATURE_SET),
        (
            FEATURE_DATA_READ_SHARED,
            vfio_mig_vfio_user::codec::FEATURE_GET,
        ),
        (FEATURE_DATA_WRITE_SHARED, FEATURE_SET),
    ] {
        let probe = call(
            &mut s,
            Request::DeviceFeature(vfio_mig_vfio_user::codec::DeviceFeature::new(
                FEATURE_PROBE | ops,
                index,
                FeatureData::None,
            )),
        );
        assert_eq!(errno(&probe), None, "PROBE of {index:#x}");
    }
    // Forgetting the buffer: size 0 without an fd.
    assert_eq!(errno(&register(&mut s, 0, vec![])), None);
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::StopCopy))), None);
    assert_errno(&shared_read(&mut s, 0, 8), Errno::EINVAL);
}

#[test]
fn a_standard_client_does_not_have_the_features() {
    let (_m, mut h) = host(MIB);
    let mut s = ServerSession::new(&mut h, ServerConfig::default());
    negotiate(&mut s);
    let fd = sealed_memfd(BUF);
    assert_errno(&register(&mut s, BUF, vec![fd]), Errno::ENOTTY);
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::StopCopy))), None);
    assert_errno(&shared_read(&mut s, 0, 8), Errno::ENOTTY);
}

#[test]
fn a_client_shrinking_an_unsealed_buffer_gets_efault_not_sigbus() {
    let (_m, mut h) = host(MIB);
    let fd = memfd(BUF);
    let mut s = ext_session(&mut h);
    assert_eq!(errno(&register(&mut s, BUF, vec![dup(&fd)])), None);
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::StopCopy))), None);
    rustix::fs::ftruncate(&fd, 4096).unwrap();
    assert_errno(&shared_read(&mut s, 8192, 4096), Errno::EFAULT);
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::Resuming))), None);
    assert_errno(&shared_write(&mut s, 8192, 4096), Errno::EFAULT);
}

#[test]
fn a_live_migration_through_one_arena_sends_no_data_in_messages() {
    let size = 8 * MIB;
    let src = Served::membuf(membuf_config(size, 16 * MIB, 7));
    let dst = Served::membuf(membuf_config(size, 0, 8));
    assert!(src.remote.client().negotiated().shared_data());
    let arena = DataArena::new(2 * MIB as usize).unwrap();
    assert!(src.remote.client().attach_data_arena(&arena).unwrap());
    assert!(dst.remote.client().attach_data_arena(&arena).unwrap());
    assert!(Arc::ptr_eq(
        &src.remote.client().data_arena().unwrap(),
        &arena
    ));
    let mut bufs = [
        arena.allocate(MIB as usize).unwrap(),
        arena.allocate(MIB as usize).unwrap(),
    ];
    let mut save = src.set_state(DeviceState::PreCopy).unwrap().unwrap();
    let mut restore = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
    let mut next = 0;
    let mut moved = 0u64;
    let mut rounds = 0;
    loop {
        let buf = &mut bufs[next];
        match save.read(buf).unwrap() {
            ReadOutcome::Data(n) => {
                write_all(restore.as_mut(), &buf[..n]).unwrap();
                moved += n as u64;
                next = 1 - next;
            }
            ReadOutcome::NothingNow => {
                rounds += 1;
                if save.precopy_info().unwrap().initial_bytes == 0 && rounds >= 3 {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(5));
            }
            ReadOutcome::End => panic!("End in PRE_COPY"),
        }
    }
    assert!(src.set_state(DeviceState::StopCopy).unwrap().is_none());
    loop {
        let buf = &mut bufs[next];
        match save.read(buf).unwrap() {
            ReadOutcome::Data(n) => {
                write_all(restore.as_mut(), &buf[..n]).unwrap();
                moved += n as u64;
                next = 1 - next;
            }
            ReadOutcome::End => break,
            ReadOutcome::NothingNow => panic!("NothingNow in STOP_COPY"),
        }
    }
    dst.set_state(DeviceState::Stop).unwrap();
    dst.set_state(DeviceState::Running).unwrap();
    assert_eq!(dst.digest().unwrap(), src.membuf.regs().digest());
    let expect = DataCounters {
        by_message: 0,
        shared: moved,
    };
    assert_eq!(src.remote.client().data_counters(), expect);
    assert_eq!(dst.remote.client().data_counters(), expect);
    assert!(moved >= size);

    // Buffers outside the arena still go by message on the same connections, and after
    // detaching everything does.
    src.set_state(DeviceState::Running).unwrap();
    dst.remote.client().detach_data_arena().unwrap();
    assert!(dst.remote.client().data_arena().is_none());
    let mut save = src.set_state(DeviceState::StopCopy).unwrap().unwrap();
    let mut restore = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
    let mut heap = vec![0u8; MIB as usize];
    let mut by_message = 0u64;
    let mut shared = 0u64;
    loop {
        // Even reads into the arena, odd ones into the heap.
        let into_arena = (shared + by_message) / MIB % 2 == 0;
        let outcome = if into_arena {
            save.read(&mut bufs[0]).unwrap()
        } else {
            save.read(&mut heap).unwrap()
        };
        let ReadOutcome::Data(n) = outcome else {
            break;
        };
        let data: &[u8] = if into_arena {
            &bufs[0][..n]
        } else {
            &heap[..n]
        };
        write_all(restore.as_mut(), data).unwrap();
        if into_arena {
            shared += n as u64;
        } else {
            by_message += n as u64;
        }
    }
    dst.set_state(DeviceState::Running).unwrap();
    assert_eq!(dst.digest().unwrap(), src.membuf.regs().digest());
    let src_counts = src.remote.client().data_counters();
    assert!(shared > 0 && by_message > 0);
    // A read into the heap in STOP_COPY asks for the next chunk ahead by message, and the
    // next read (into the arena or not) takes that reply: only the sum is fixed.
    assert_eq!(
        src_counts.shared + src_counts.by_message,
        moved + shared + by_message
    );
    assert!(src_counts.shared > moved && src_counts.by_message >= by_message);
    let dst_counts = dst.remote.client().data_counters();
    assert_eq!(
        dst_counts.shared, moved,
        "the detached destination took none"
    );
    assert_eq!(dst_counts.by_message, shared + by_message);
}

#[test]
fn without_the_extension_attach_is_declined_and_arena_buffers_go_by_message() {
    let options = ClientOptions {
        announce_extensions: false,
        ..ClientOptions::default()
    };
    let size = 2 * MIB;
    let src = Served::membuf_with(membuf_config(size, 0, 1), options);
    let dst = Served::membuf(membuf_config(size, 0, 2));
    assert!(!src.remote.client().negotiated().shared_data());
    let arena = DataArena::new(MIB as usize).unwrap();
    assert!(!src.remote.client().attach_data_arena(&arena).unwrap());
    assert!(src.remote.client().data_arena().is_none());
    let mut buf = arena.allocate(MIB as usize).unwrap();
    let mut save = src.set_state(DeviceState::StopCopy).unwrap().unwrap();
    let mut restore = dst.set_state(DeviceState::Resuming).unwrap().unwrap();
    while let ReadOutcome::Data(n) = save.read(&mut buf).unwrap() {
        write_all(restore.as_mut(), &buf[..n]).unwrap();
    }
    dst.set_state(DeviceState::Running).unwrap();
    assert_eq!(dst.digest().unwrap(), src.membuf.regs().digest());
    assert_eq!(src.remote.client().data_counters().shared, 0);
    assert_eq!(
        src.remote.client().data_counters().by_message,
        membuf::format::full_stream_len(size)
    );
}
