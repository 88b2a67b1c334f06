//! The sans-IO server session against every command, successes and refusals with their errno.

mod server_support;

use std::sync::Arc;

use rustix::event::{eventfd, EventfdFlags};
use server_support::*;
use vfio_mig_device::{DeviceState, IrqInfo as DevIrqInfo, MigrationDevice};
use vfio_mig_devices::membuf::{self, BAR0_INDEX, CONFIG_INDEX, REG_DIGEST, REG_DIRTY_RATE};
use vfio_mig_uapi::{Errno, MigrationFeatures};
use vfio_mig_vfio_user::codec::*;
use vfio_mig_vfio_user::extension::{decode_precopy_info, VfioMigCapability, FEATURE_PRECOPY_INFO};
use vfio_mig_vfio_user::server::{DeviceHost, ServerConfig, ServerSession};

const KIB: u64 = 1024;

fn host_of(hosted: vfio_mig_vfio_user::server::HostedDevice) -> DeviceHost {
    DeviceHost::new(hosted).unwrap()
}

fn session(host: &mut DeviceHost) -> ServerSession<'_> {
    let mut s = ServerSession::new(host, ServerConfig::default());
    negotiate(&mut s);
    s
}

fn region_read(offset: u64, region: u32, count: u32) -> Request<'static> {
    Request::RegionRead(RegionAccess {
        offset,
        region,
        count,
    })
}

fn read_u64(s: &mut ServerSession<'_>, offset: u64) -> u64 {
    let r = call(s, region_read(offset, BAR0_INDEX, 8));
    match reply(&r) {
        Reply::RegionRead(d) => u64::from_le_bytes(d.data.try_into().unwrap()),
        other => panic!("{other:?}"),
    }
}

#[test]
fn version_comes_first_once_and_announces_our_limits() {
    let (_m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let mut host = host_of(hosted);
    let mut s = ServerSession::new(&mut host, ServerConfig::default());
    let info = Request::DeviceGetInfo(DeviceInfo {
        argsz: 16,
        ..DeviceInfo::default()
    });
    assert_errno(&call(&mut s, info.clone()), Errno::EINVAL);
    assert!(!s.is_negotiated());
    let r = call(&mut s, version_request(4096));
    let Reply::Version(v) = reply(&r) else {
        panic!()
    };
    assert_eq!((v.major, v.minor), (0, 2));
    let caps = v.capabilities();
    assert_eq!(caps.max_msg_fds, Some(8));
    assert_eq!(caps.max_data_xfer_size, Some(1 << 20));
    assert_eq!(caps.migration_pgsize(), Some(4096));
    assert_eq!(caps.twin_socket, None);
    assert_eq!(
        v.capability_value("vfio-mig"),
        None,
        "standard peers see no extension"
    );
    assert!(s.is_negotiated() && !s.extension_negotiated());
    assert_errno(&call(&mut s, version_request(4096)), Errno::EINVAL);
    assert_eq!(errno(&call(&mut s, info)), None);
    drop(s);

    // A newer minor is answered with ours; another major is refused.
    let mut s = ServerSession::new(&mut host, ServerConfig::default());
    let newer = Request::Version(Version::new(0, 7, &client_caps(4096)).unwrap());
    let r = call(&mut s, newer);
    let Reply::Version(v) = reply(&r) else {
        panic!()
    };
    assert_eq!(v.minor, 2);
    drop(s);
    let mut s = ServerSession::new(&mut host, ServerConfig::default());
    let other = Request::Version(Version::without_capabilities(1, 0));
    assert_errno(&call(&mut s, other), Errno::EINVAL);
}

#[test]
fn the_extension_is_answered_only_to_a_client_that_sent_it() {
    let (_m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let mut host = host_of(hosted);
    let mut s = ServerSession::new(&mut host, ServerConfig::default());
    let r = call(&mut s, version_request_ext(1 << 20));
    let Reply::Version(v) = reply(&r) else {
        panic!()
    };
    let ext = VfioMigCapability::from_version(&v)
        .unwrap()
        .expect("extension");
    assert!(ext.offers_precopy_info() && ext.offers_whole_messages());
    let id = ext.device_identity().unwrap().unwrap();
    assert_eq!(id.kind, "membuf");
    assert_eq!(id, _m.migration().identity().unwrap());
    assert!(s.extension_negotiated());

    // Precopy info: ENOTTY without the extension.
    drop(s);
    let mut s = session(&mut host);
    assert_errno(&call(&mut s, get(FEATURE_PRECOPY_INFO, 16)), Errno::ENOTTY);
}

#[test]
fn device_region_and_irq_queries() {
    let (_m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let hosted = vfio_mig_vfio_user::server::HostedDevice {
        regions: Arc::new(WithIrqs(
            hosted.regions.clone(),
            vec![DevIrqInfo { index: 2, count: 4 }],
        )),
        ..hosted
    };
    let mut host = host_of(hosted);
    let mut s = session(&mut host);

    let r = call(
        &mut s,
        Request::DeviceGetInfo(DeviceInfo {
            argsz: 16,
            ..Default::default()
        }),
    );
    assert_eq!(
        reply(&r),
        Reply::DeviceGetInfo(DeviceInfo {
            argsz: 16,
            flags: DEVICE_FLAGS_RESET | DEVICE_FLAGS_PCI,
            num_regions: 9,
            num_irqs: 5
        })
    );
    let short = Request::DeviceGetInfo(DeviceInfo {
        argsz: 15,
        ..Default::default()
    });
    assert_errno(&call(&mut s, short), Errno::EINVAL);

    for index in 0..9 {
        let r = call(
            &mut s,
            Request::GetRegionInfo(RegionInfoRequest::new(index, 32)),
        );
        let Reply::GetRegionInfo(info) = reply(&r) else {
            panic!()
        };
        assert_eq!(info.info.index, index);
        assert_eq!(info.info.argsz, 32);
        assert!(info.caps.is_empty());
        let (size, flags) = match index {
            0 => (4096, REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE),
            7 => (256, REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE),
            _ => (0, 0),
        };
        assert_eq!(
            (info.info.size, info.info.flags),
            (size, flags),
            "region {index}"
        );
    }
    // A larger argsz gets the size actually needed; a smaller one or index 9 is refused.
    let r = call(
        &mut s,
        Request::GetRegionInfo(RegionInfoRequest::new(0, 80)),
    );
    let Reply::GetRegionInfo(info) = reply(&r) else {
        panic!()
    };
    assert_eq!(info.info.argsz, 32);
    assert_errno(
        &call(
            &mut s,
            Request::GetRegionInfo(RegionInfoRequest::new(0, 16)),
        ),
        Errno::EINVAL,
    );
    assert_errno(
        &call(
            &mut s,
            Request::GetRegionInfo(RegionInfoRequest::new(9, 32)),
        ),
        Errno::EINVAL,
    );

    let io = |index, argsz, flags, count| {
        Request::GetRegionIoFds(RegionIoFdsRequest {
            argsz,
            flags,
            index,
            count,
        })
    };
    let r = call(&mut s, io(0, 64, 0, 0));
    let Reply::GetRegionIoFds(fds) = reply(&r) else {
        panic!()
    };
    assert_eq!(
        (fds.head.count, fds.head.index, fds.subregions.len()),
        (0, 0, 0)
    );
    for bad in [
        io(1, 64, 0, 0),
        io(9, 64, 0, 0),
        io(0, 8, 0, 0),
        io(0, 64, 1, 0),
        io(0, 64, 0, 1),
    ] {
        assert_errno(&call(&mut s, bad), Errno::EINVAL);
    }

    let irq = |index, argsz| {
        Request::GetIrqInfo(IrqInfo {
            argsz,
            index,
            ..Default::default()
        })
    };
    for index in 0..5 {
        let r = call(&mut s, irq(index, 16));
        let Reply::GetIrqInfo(info) = reply(&r) else {
            panic!()
        };
        assert_eq!(info.index, index);
        assert_eq!(info.flags, IRQ_INFO_EVENTFD);
        assert_eq!(info.count, if index == 2 { 4 } else { 0 });
    }
    assert_errno(&call(&mut s, irq(5, 16)), Errno::EINVAL);
    assert_errno(&call(&mut s, irq(0, 8)), Errno::EINVAL);
}

#[test]
fn set_irqs_stores_and_triggers_eventfds() {
    let (_m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let hosted = vfio_mig_vfio_user::server::HostedDevice {
        regions: Arc::new(WithIrqs(
            hosted.regions.clone(),
            vec![DevIrqInfo { index: 0, count: 1 }],
        )),
        ..hosted
    };
    let mut host = host_of(hosted);
    let mut s = session(&mut host);
    let efd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap();
    let watch = efd.try_clone().unwrap();
    let irqs = |flags, count, data: &'static [u8]| {
        Request::SetIrqs(IrqSet {
            argsz: 20 + data.len() as u32,
            flags,
            index: 0,
            start: 0,
            count,
            data,
        })
    };
    let trigger = IRQ_SET_ACTION_TRIGGER;
    let r = call_fds(
        &mut s,
        irqs(IRQ_SET_DATA_EVENTFD | trigger, 1, &[]),
        vec![efd],
    );
    assert_eq!(reply(&r), Reply::SetIrqs);
    assert!(s.irq_eventfd_set(0, 0));
    let r = call(&mut s, irqs(IRQ_SET_DATA_BOOL | trigger, 1, &[1]));
    assert_eq!(errno(&r), None);
    let mut counter = [0u8; 8];
    rustix::io::read(&watch, &mut counter).unwrap();
    assert_eq!(u64::from_ne_bytes(counter), 1);
    // Two fds for one vector, a vector that does not exist: EINVAL.
    let two = vec![
        eventfd(0, EventfdFlags::CLOEXEC).unwrap(),
        eventfd(0, EventfdFlags::CLOEXEC).unwrap(),
    ];
    assert_errno(
        &call_fds(&mut s, irqs(IRQ_SET_DATA_EVENTFD | trigger, 1, &[]), two),
        Errno::EINVAL,
    );
    assert_errno(
        &call(&mut s, irqs(IRQ_SET_DATA_NONE | trigger, 2, &[])),
        Errno::EINVAL,
    );
    // Disconnecting drops the eventfds.
    drop(s);
    let s = ServerSession::new(&mut host, ServerConfig::default());
    assert!(!s.irq_eventfd_set(0, 0));
}

#[test]
fn region_access_is_bounds_checked_and_works_in_every_state() {
    let (m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 5);
    let mut host = host_of(hosted);
    let mut s = session(&mut host);
    let r = call(&mut s, region_read(0, BAR0_INDEX, 8));
    let Reply::RegionRead(d) = reply(&r) else {
        panic!()
    };
    assert_eq!(d.data, b"VFIOMIG1");
    assert_eq!(r.len(), 16 + 16 + 8, "REGION_READ replies are not padded");
    let digest = m.regs().digest();
    for state in [
        DeviceState::Stop,
        DeviceState::StopCopy,
        DeviceState::Stop,
        DeviceState::Resuming,
    ] {
        assert_eq!(errno(&call(&mut s, set_state(state))), None);
        assert_eq!(
            read_u64(&mut s, REG_DIGEST),
            digest,
            "digest readable in {state}"
        );
    }
    // Crossing the end, past the end, a region the device lacks, index 9.
    for (offset, region, count) in [
        (4090, 0, 8),
        (4096, 0, 1),
        (u64::MAX, 0, 2),
        (0, 1, 4),
        (0, 9, 4),
    ] {
        assert_errno(
            &call(&mut s, region_read(offset, region, count)),
            Errno::EINVAL,
        );
    }
    // A count above max_data_xfer_size fails to decode: EINVAL.
    assert_errno(
        &call(&mut s, region_read(0, 7, (1 << 20) + 1)),
        Errno::EINVAL,
    );
    let r = call(&mut s, region_read(0, CONFIG_INDEX, 4));
    let Reply::RegionRead(d) = reply(&r) else {
        panic!()
    };
    assert_eq!(d.data, [0x36, 0x1b, 0xf0, 0x11]);

    // Writes: the dirty-rate register takes 8 bytes; the device refuses other BAR0 writes.
    let write = |offset, data: &'static [u8]| {
        Request::RegionWrite(RegionData {
            offset,
            region: BAR0_INDEX,
            data,
        })
    };
    let r = call(&mut s, write(REG_DIRTY_RATE, &[0, 0x10, 0, 0, 0, 0, 0, 0]));
    assert_eq!(
        reply(&r),
        Reply::RegionWrite(RegionAccess {
            offset: REG_DIRTY_RATE,
            region: 0,
            count: 8
        })
    );
    assert_eq!(m.regs().dirty_rate(), 0x1000);
    assert_errno(&call(&mut s, write(0, b"x")), Errno::EINVAL);
    assert_errno(&call(&mut s, write(4095, b"xy")), Errno::EINVAL);

    let multi = |writes: Vec<MultiWrite>| Request::RegionWriteMulti(WriteMulti { writes });
    let w = |offset, value: u64| MultiWrite {
        offset,
        region: BAR0_INDEX,
        count: 8,
        data: value.to_le_bytes(),
    };
    let r = call(
        &mut s,
        multi(vec![w(REG_DIRTY_RATE, 7), w(REG_DIRTY_RATE, 9)]),
    );
    assert_eq!(
        reply(&r),
        Reply::RegionWriteMulti(WriteMultiReply { count: 2 })
    );
    assert_eq!(m.regs().dirty_rate(), 9);
    assert_errno(&call(&mut s, multi(vec![w(4092, 1)])), Errno::EINVAL);
}

#[test]
fn migration_features_and_state_machine() {
    let (_m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let mut host = host_of(hosted);
    let mut s = session(&mut host);
    let f = call(&mut s, get(FEATURE_MIGRATION, 8));
    let fr = feature(&f);
    assert_eq!((fr.argsz, fr.flags), (16, FEATURE_GET | 1));
    assert_eq!(
        fr.data,
        FeatureData::Migration { flags: 7 },
        "STOP_COPY | P2P | PRE_COPY"
    );
    // Refusals in the kernel's order: argsz, ops, payload size; ENOTTY for what is absent.
    assert_errno(&call(&mut s, get(FEATURE_MIGRATION, 0)), Errno::EINVAL);
    let raw = |argsz, flags| {
        Request::DeviceFeature(DeviceFeature {
            argsz,
            flags,
            data: FeatureData::None,
        })
    };
    assert_errno(&call(&mut s, raw(4, FEATURE_GET | 1)), Errno::EINVAL);
    assert_errno(&call(&mut s, raw(16, FEATURE_SET | 1)), Errno::EINVAL);
    assert_errno(
        &call(&mut s, raw(16, FEATURE_GET | FEATURE_SET | 2)),
        Errno::EINVAL,
    );
    assert_errno(&call(&mut s, raw(16, 2)), Errno::EINVAL);
    assert_errno(&call(&mut s, raw(16, FEATURE_GET | 0x20)), Errno::ENOTTY);
    assert_errno(&call(&mut s, raw(16, FEATURE_GET | 3)), Errno::ENOTTY);
    // PROBE echoes the request.
    let probe = encode(0x1234, raw(8, FEATURE_PROBE | 2));
    let r = call(&mut s, raw(8, FEATURE_PROBE | 2));
    assert_eq!(&r[16..], &probe[16..]);
    assert_eq!(
        errno(&call(
            &mut s,
            raw(8, FEATURE_PROBE | FEATURE_GET | FEATURE_SET | 2)
        )),
        None
    );

    // GET and SET of the state; the SET reply echoes the request's 16 bytes.
    let st = call(&mut s, get(FEATURE_MIG_DEVICE_STATE, 8));
    assert_eq!(
        feature(&st).data,
        FeatureData::MigDeviceState {
            state: DeviceState::Running,
            data_fd: -1
        }
    );
    let req = set_state(DeviceState::RunningP2p);
    let sent = encode(0x1234, req.clone());
    let r = call(&mut s, req);
    assert_eq!(&r[16..], &sent[16..], "SET echoes its payload");
    assert_eq!(_m.migration().state().unwrap(), DeviceState::RunningP2p);
    // ERROR is never a target; a failed SET leaves the state as it was.
    assert_errno(&call(&mut s, set_state(DeviceState::Error)), Errno::EINVAL);
    assert_eq!(_m.migration().state().unwrap(), DeviceState::RunningP2p);
    // A bad state number does not decode; SET without data is refused.
    let mut bad = encode(0x1234, set_state(DeviceState::Stop));
    bad[24] = 8;
    let rep = s.handle(&bad, vec![]).unwrap().to_vec();
    assert_errno(&rep, Errno::EINVAL);
    assert_errno(&call(&mut s, raw(16, FEATURE_SET | 2)), Errno::EINVAL);

    // MIG_DATA_SIZE in any state.
    let r = call(&mut s, get(FEATURE_MIG_DATA_SIZE, 8));
    let FeatureData::MigDataSize { stop_copy_length } = feature(&r).data else {
        panic!()
    };
    assert_eq!(stop_copy_length, _m.migration().data_size().unwrap());
    assert_eq!(stop_copy_length, membuf::format::full_stream_len(64 * KIB));
}

#[test]
fn devices_without_p2p_or_logging_say_so() {
    let (_m, hosted) = membuf(64 * KIB, MigrationFeatures::PRE_COPY, 1);
    let mut host = host_of(hosted);
    let mut s = session(&mut host);
    let r = call(&mut s, get(FEATURE_MIGRATION, 8));
    assert_eq!(feature(&r).data, FeatureData::Migration { flags: 5 });
    assert_errno(
        &call(&mut s, set_state(DeviceState::RunningP2p)),
        Errno::EINVAL,
    );

    let mut host = host_of(register());
    let mut s = session(&mut host);
    let r = call(&mut s, get(FEATURE_MIGRATION, 8));
    assert_eq!(feature(&r).data, FeatureData::Migration { flags: 1 });
    let start = set(
        FEATURE_DMA_LOGGING_START,
        FeatureData::DmaLogging(DmaLoggingControl {
            page_size: 4096,
            ranges: vec![],
        }),
    );
    assert_errno(&call(&mut s, start), Errno::ENOTTY);
    assert_errno(
        &call(&mut s, get(FEATURE_DMA_LOGGING_REPORT, 32)),
        Errno::ENOTTY,
    );
}

/// Reads a whole STOP_COPY stream through the session in `chunk`-byte requests.
fn read_stream(s: &mut ServerSession<'_>, chunk: u32) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let r = call(s, Request::MigDataRead(MigDataReadRequest::new(chunk)));
        let Reply::MigDataRead(d) = reply(&r) else {
            panic!()
        };
        assert_eq!(
            d.data.len() + d.padding as usize,
            chunk as usize,
            "a standard client's replies are padded to the size asked, as libvfio-user's"
        );
        assert_eq!(d.argsz as usize, 8 + d.data.len());
        if d.data.is_empty() {
            return out;
        }
        out.extend_from_slice(d.data);
    }
}

#[test]
fn migration_data_moves_a_membuf_through_the_server() {
    let size = 256 * KIB;
    let (src, hosted) = membuf(size, MigrationFeatures::ALL, 11);
    let mut src_host = host_of(hosted);
    let mut s = ServerSession::new(&mut src_host, ServerConfig::default());
    assert_eq!(errno(&call(&mut s, version_request(64 * 1024))), None);

    let read = |n| Request::MigDataRead(MigDataReadRequest::new(n));
    assert_errno(&call(&mut s, read(64)), Errno::EINVAL);
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::StopCopy))), None);
    // Above the client's max_data_xfer_size, argsz too small: EINVAL.
    assert_errno(&call(&mut s, read(64 * 1024 + 1)), Errno::EINVAL);
    let short = Request::MigDataRead(MigDataReadRequest {
        argsz: 8 + 63,
        size: 64,
    });
    assert_errno(&call(&mut s, short), Errno::EINVAL);
    let write = Request::MigDataWrite(MigDataWrite::new(b"abc"));
    assert_errno(&call(&mut s, write.clone()), Errno::EINVAL);

    let stream = read_stream(&mut s, 64 * 1024);
    assert_eq!(stream.len() as u64, membuf::format::full_stream_len(size));
    // After the end: still 0 bytes.
    assert!(read_stream(&mut s, 100).is_empty());
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::Stop))), None);
    assert_errno(&call(&mut s, read(64)), Errno::EINVAL);

    let (dst, hosted) = membuf(size, MigrationFeatures::ALL, 99);
    assert_ne!(dst.regs().digest(), src.regs().digest());
    let mut dst_host = host_of(hosted);
    let mut d = session(&mut dst_host);
    assert_errno(&call(&mut d, write), Errno::EINVAL);
    assert_eq!(errno(&call(&mut d, set_state(DeviceState::Resuming))), None);
    for chunk in stream.chunks(10_000) {
        let r = call(&mut d, Request::MigDataWrite(MigDataWrite::new(chunk)));
        assert_eq!(reply(&r), Reply::MigDataWrite);
        assert_eq!(r.len(), 16, "MIG_DATA_WRITE replies are header-only");
    }
    let argsz_short = Request::MigDataWrite(MigDataWrite {
        argsz: 8,
        data: b"x",
    });
    assert_errno(&call(&mut d, argsz_short), Errno::EINVAL);
    assert_eq!(errno(&call(&mut d, set_state(DeviceState::Stop))), None);
    assert_eq!(dst.regs().digest(), src.regs().digest());
    assert_eq!(errno(&call(&mut d, set_state(DeviceState::Running))), None);
}

#[test]
fn a_bad_stream_is_refused_with_the_devices_errno() {
    let (_dst, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let mut host = host_of(hosted);
    let mut d = session(&mut host);
    assert_eq!(errno(&call(&mut d, set_state(DeviceState::Resuming))), None);
    let garbage = [0x55u8; 100];
    let r = call(&mut d, Request::MigDataWrite(MigDataWrite::new(&garbage)));
    let write_errno = errno(&r);
    // The device may reject early (the header is wrong) or only when leaving RESUMING.
    let r = call(&mut d, set_state(DeviceState::Stop));
    assert!(write_errno.is_some() || errno(&r).is_some());
    assert_eq!(_dst.migration().state().unwrap(), DeviceState::Resuming);
}

#[test]
fn precopy_info_extension() {
    let size = 128 * KIB;
    let (_m, hosted) = membuf(size, MigrationFeatures::ALL, 1);
    let mut host = host_of(hosted);
    let mut s = ServerSession::new(&mut host, ServerConfig::default());
    assert_eq!(errno(&call(&mut s, version_request_ext(1 << 20))), None);
    assert_errno(&call(&mut s, get(FEATURE_PRECOPY_INFO, 16)), Errno::EINVAL);
    assert_errno(&call(&mut s, get(FEATURE_PRECOPY_INFO, 8)), Errno::EINVAL);
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::PreCopy))), None);
    let info = |s: &mut ServerSession<'_>| {
        let r = call(s, get(FEATURE_PRECOPY_INFO, 16));
        let f = feature(&r);
        assert_eq!(f.argsz, 24);
        let FeatureData::Raw(data) = f.data else {
            panic!()
        };
        decode_precopy_info(data).unwrap()
    };
    let before = info(&mut s);
    assert!(before.initial_bytes >= size, "{before:?}");
    call(
        &mut s,
        Request::MigDataRead(MigDataReadRequest::new(64 * 1024)),
    );
    let after = info(&mut s);
    assert!(after.initial_bytes < before.initial_bytes, "{after:?}");
    assert_eq!(
        errno(&call(&mut s, set_state(DeviceState::PreCopyP2p))),
        None
    );
    info(&mut s);
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::StopCopy))), None);
    assert_errno(&call(&mut s, get(FEATURE_PRECOPY_INFO, 16)), Errno::EINVAL);
}

#[test]
fn dma_map_unmap_and_logging() {
    let (m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let mut host = host_of(hosted);
    let mut s = session(&mut host);
    let log_start = |ranges: Vec<IovaRange>| {
        set(
            FEATURE_DMA_LOGGING_START,
            FeatureData::DmaLogging(DmaLoggingControl {
                page_size: 4096,
                ranges,
            }),
        )
    };
    // Nothing mapped: nothing to log. More ranges than the kernel takes: E2BIG.
    assert_errno(&call(&mut s, log_start(vec![])), Errno::EINVAL);
    let many = (0..257)
        .map(|i| IovaRange {
            iova: i * 8192,
            length: 4096,
        })
        .collect();
    assert_errno(&call(&mut s, log_start(many)), Errno::E2BIG);

    let ram = memfd(64 * KIB);
    let map = |addr, size, offset| {
        Request::DmaMap(DmaMap {
            argsz: 32,
            flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
            offset,
            addr,
            size,
        })
    };
    let fd = || ram.try_clone().unwrap();
    let r = call_fds(&mut s, map(0, 32 * KIB, 0), vec![fd()]);
    assert_eq!(reply(&r), Reply::DmaMap);
    assert_eq!(r.len(), 16);
    let r = call_fds(&mut s, map(32 * KIB, 32 * KIB, 32 * KIB), vec![fd()]);
    assert_eq!(errno(&r), None);
    assert_errno(
        &call_fds(&mut s, map(16 * KIB, 4096, 0), vec![fd()]),
        Errno::EEXIST,
    );
    assert_errno(
        &call_fds(&mut s, map(1 << 20, 4096, 0), vec![fd(), fd()]),
        Errno::EINVAL,
    );
    assert_errno(
        &call_fds(&mut s, map(1 << 20, 128 * KIB, 0), vec![fd()]),
        Errno::EINVAL,
    );
    assert_errno(
        &call_fds(&mut s, Request::DeviceReset, vec![fd()]),
        Errno::EINVAL,
    );
    // A window without an fd is tracked (overlaps count) but unreachable by DMA.
    assert_eq!(errno(&call(&mut s, map(1 << 20, 4096, 0))), None);
    assert_eq!(s.dma_windows(), 3);
    assert!(m.dma().has_memory());

    // Device DMA goes into the client's memory.
    m.dma().write(0x9000, b"completion").unwrap();
    assert_eq!(pread(&ram, 0x9000, 10), b"completion");

    // Logging every mapped window: the device's writes show in the report.
    let r = call(&mut s, log_start(vec![]));
    assert_eq!(errno(&r), None);
    assert_errno(&call(&mut s, log_start(vec![])), Errno::EINVAL);
    m.dma().write(0x3000, &[1; 16]).unwrap();
    m.dma().write(0x8ff8, &[2; 16]).unwrap();
    let report = |iova, length, page_size, argsz| {
        Request::DeviceFeature(DeviceFeature {
            argsz,
            flags: FEATURE_GET | u32::from(FEATURE_DMA_LOGGING_REPORT),
            data: FeatureData::DmaLoggingReport(DmaLoggingReport {
                iova,
                length,
                page_size,
                bitmap: &[],
            }),
        })
    };
    let r = call(&mut s, report(0, 64 * KIB, 4096, 40));
    let f = feature(&r);
    assert_eq!(f.argsz, 40);
    let FeatureData::DmaLoggingReport(rep) = f.data else {
        panic!()
    };
    assert_eq!((rep.iova, rep.length, rep.page_size), (0, 64 * KIB, 4096));
    assert_eq!(
        rep.bitmap_words().collect::<Vec<_>>(),
        [(1 << 3) | (1 << 8) | (1 << 9)]
    );
    // Reading cleared the bits; the reply carries exactly the bitmap.
    let r = call(&mut s, report(0, 64 * KIB, 4096, 40));
    let FeatureData::DmaLoggingReport(rep) = feature(&r).data else {
        panic!()
    };
    assert_eq!(rep.bitmap_words().collect::<Vec<_>>(), [0]);
    assert_errno(&call(&mut s, report(0, 64 * KIB, 4096, 39)), Errno::EINVAL);
    assert_errno(&call(&mut s, report(0, 64 * KIB, 3000, 64)), Errno::EINVAL);
    assert_errno(&call(&mut s, report(0, 64 * KIB, 2048, 64)), Errno::EINVAL);

    let stop = set(FEATURE_DMA_LOGGING_STOP, FeatureData::None);
    assert_eq!(errno(&call(&mut s, stop.clone())), None);
    assert_errno(&call(&mut s, stop), Errno::EINVAL);

    // Unmap: exact match (the reply echoes the request), or ALL.
    let unmap = |addr, size, flags| {
        Request::DmaUnmap(DmaUnmap {
            argsz: 24,
            flags,
            addr,
            size,
        })
    };
    assert_errno(&call(&mut s, unmap(0, 4096, 0)), Errno::ENOENT);
    let sent = encode(0x1234, unmap(0, 32 * KIB, 0));
    let r = call(&mut s, unmap(0, 32 * KIB, 0));
    assert_eq!(&r[16..], &sent[16..]);
    assert_eq!(
        m.dma().write(0x100, b"x").unwrap_err().errno(),
        Errno::EFAULT
    );
    m.dma().write(0x9000, b"x").unwrap();
    assert_errno(
        &call(&mut s, unmap(0, 1, DMA_UNMAP_FLAG_ALL)),
        Errno::EINVAL,
    );
    assert_eq!(errno(&call(&mut s, unmap(0, 0, DMA_UNMAP_FLAG_ALL))), None);
    assert_eq!(s.dma_windows(), 0);
    assert!(!m.dma().has_memory());
}

#[test]
fn a_departed_client_leaves_state_and_stream_but_not_its_setup() {
    let size = 64 * KIB;
    let (m, hosted) = membuf(size, MigrationFeatures::ALL, 3);
    let mut host = host_of(hosted);
    let first_part;
    {
        let mut s = session(&mut host);
        let ram = memfd(64 * KIB);
        let r = call_fds(
            &mut s,
            Request::DmaMap(DmaMap {
                argsz: 32,
                flags: DMA_MAP_FLAG_READ | DMA_MAP_FLAG_WRITE,
                offset: 0,
                addr: 0,
                size: 64 * KIB,
            }),
            vec![ram],
        );
        assert_eq!(errno(&r), None);
        let start = set(
            FEATURE_DMA_LOGGING_START,
            FeatureData::DmaLogging(DmaLoggingControl {
                page_size: 4096,
                ranges: vec![],
            }),
        );
        assert_eq!(errno(&call(&mut s, start)), None);
        assert_eq!(errno(&call(&mut s, set_state(DeviceState::StopCopy))), None);
        let r = call(&mut s, Request::MigDataRead(MigDataReadRequest::new(1000)));
        let Reply::MigDataRead(d) = reply(&r) else {
            panic!()
        };
        first_part = d.data.to_vec();
        assert_eq!(first_part.len(), 1000);
    }
    assert!(!m.dma().has_memory(), "DMA windows are detached");
    assert_eq!(m.migration().state().unwrap(), DeviceState::StopCopy);
    assert!(host.has_stream());
    let mut s = session(&mut host);
    // Logging was stopped, so a new client may start it again (on explicit ranges here).
    let start = set(
        FEATURE_DMA_LOGGING_START,
        FeatureData::DmaLogging(DmaLoggingControl {
            page_size: 4096,
            ranges: vec![IovaRange {
                iova: 0,
                length: 4096,
            }],
        }),
    );
    assert_eq!(errno(&call(&mut s, start)), None);
    let rest = read_stream(&mut s, 4096);
    assert_eq!(
        (first_part.len() + rest.len()) as u64,
        membuf::format::full_stream_len(size)
    );
    // DEVICE_RESET drops the session: back to RUNNING, no more data.
    assert_eq!(
        reply(&call(&mut s, Request::DeviceReset)),
        Reply::DeviceReset
    );
    assert_eq!(m.migration().state().unwrap(), DeviceState::Running);
    drop(s);
    assert!(!host.has_stream());
}

#[test]
fn unknown_removed_and_misdirected_messages() {
    let (_m, hosted) = membuf(64 * KIB, MigrationFeatures::ALL, 1);
    let mut host = host_of(hosted);
    let mut s = session(&mut host);
    let raw = |cmd: u16, flags: u32, payload: &[u8]| {
        let mut h = Header {
            msg_id: 77,
            cmd,
            msg_size: (16 + payload.len()) as u32,
            flags,
            error: 0,
        }
        .to_bytes()
        .to_vec();
        h.extend_from_slice(payload);
        h
    };
    let answer = |s: &mut ServerSession<'_>, m: &[u8]| s.handle(m, vec![]).map(|r| r.to_vec());
    let r = answer(&mut s, &raw(99, 0, &[])).unwrap();
    assert_errno(&r, Errno::EINVAL);
    assert_eq!(Header::decode(&r).unwrap().cmd, 99);
    assert_errno(
        &answer(&mut s, &raw(14, 0, &[0; 8])).unwrap(),
        Errno::ENOSYS,
    );
    assert_errno(
        &answer(&mut s, &raw(11, 0, &[0; 16])).unwrap(),
        Errno::EINVAL,
    );
    // Malformed payloads, bad header flags.
    assert_errno(
        &answer(&mut s, &raw(4, 0, &[0; 15])).unwrap(),
        Errno::EINVAL,
    );
    assert_errno(
        &answer(
            &mut s,
            &raw(
                4,
                1 << 7,
                &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
            ),
        )
        .unwrap(),
        Errno::EINVAL,
    );
    // NO_REPLY commands are carried out silently; replies from the client are ignored.
    let info = raw(
        4,
        FLAGS_NO_REPLY,
        &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
    );
    assert!(answer(&mut s, &info).is_none());
    assert!(answer(&mut s, &raw(4, FLAGS_TYPE_REPLY, &[0; 16])).is_none());
    assert!(answer(&mut s, &raw(4, FLAGS_TYPE_REPLY | FLAGS_ERROR, &[])).is_none());
    assert!(answer(&mut s, &[1, 2, 3]).is_none());
    // msg_size disagreeing with the bytes given.
    let mut lying = raw(4, 0, &[16, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    lying[4] = 40;
    assert_errno(&answer(&mut s, &lying).unwrap(), Errno::EINVAL);
    // The session is still usable.
    assert_eq!(read_u64(&mut s, 0x08), 64 * KIB);
}
