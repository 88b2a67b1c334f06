//! Property tests: every message type round-trips through encode and decode (both the
//! whole-message and the head + bulk paths), and decoding arbitrary bytes never panics.

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::select;

use vfio_mig_uapi::DeviceState;
use vfio_mig_vfio_user::codec::*;

/// Leaks test data so generated messages can borrow it for `'static`.
fn bytes(max: usize) -> impl Strategy<Value = &'static [u8]> {
    vec(any::<u8>(), 0..max).prop_map(|v| &*v.leak())
}

fn nonempty_bytes(max: usize) -> impl Strategy<Value = &'static [u8]> {
    vec(any::<u8>(), 1..max).prop_map(|v| &*v.leak())
}

fn capabilities() -> impl Strategy<Value = Capabilities> {
    (
        (
            any::<Option<u32>>(),
            any::<Option<u32>>(),
            any::<Option<u32>>(),
            any::<Option<u64>>(),
        ),
        any::<Option<Option<u64>>>(),
        any::<Option<(Option<bool>, Option<u32>)>>(),
        any::<Option<bool>>(),
    )
        .prop_map(
            |((fds, xfer, maps, pgsizes), mig, twin, multi)| Capabilities {
                max_msg_fds: fds,
                max_data_xfer_size: xfer,
                max_dma_maps: maps,
                pgsizes,
                migration: mig.map(|pgsize| MigrationCapability { pgsize }),
                twin_socket: twin.map(|(supported, fd_index)| TwinSocket {
                    supported,
                    fd_index,
                }),
                write_multiple: multi,
            },
        )
}

fn version() -> impl Strategy<Value = Version<'static>> {
    prop_oneof![
        (any::<u16>(), any::<u16>()).prop_map(|(a, b)| Version::without_capabilities(a, b)),
        (any::<u16>(), any::<u16>(), capabilities())
            .prop_map(|(a, b, c)| Version::new(a, b, &c).unwrap()),
    ]
}

fn dma_map() -> impl Strategy<Value = DmaMap> {
    any::<(u32, u32, u64, u64, u64)>().prop_map(|(argsz, flags, offset, addr, size)| DmaMap {
        argsz,
        flags,
        offset,
        addr,
        size,
    })
}

fn dma_unmap() -> impl Strategy<Value = DmaUnmap> {
    any::<(u32, u32, u64, u64)>().prop_map(|(argsz, flags, addr, size)| DmaUnmap {
        argsz,
        flags,
        addr,
        size,
    })
}

fn device_info() -> impl Strategy<Value = DeviceInfo> {
    any::<(u32, u32, u32, u32)>().prop_map(|(argsz, flags, num_regions, num_irqs)| DeviceInfo {
        argsz,
        flags,
        num_regions,
        num_irqs,
    })
}

fn region_info() -> impl Strategy<Value = RegionInfo> {
    any::<(u32, u32, u32, u32, u64, u64)>().prop_map(
        |(argsz, flags, index, cap_offset, size, offset)| RegionInfo {
            argsz,
            flags,
            index,
            cap_offset,
            size,
            offset,
        },
    )
}

fn region_cap() -> impl Strategy<Value = RegionCap<'static>> {
    prop_oneof![
        vec(any::<(u64, u64)>(), 0..5).prop_map(|a| RegionCap::SparseMmap(
            a.into_iter()
                .map(|(offset, size)| SparseMmapArea { offset, size })
                .collect()
        )),
        any::<(u32, u32)>().prop_map(|(region_type, subtype)| RegionCap::Type {
            region_type,
            subtype
        }),
        (3u16..100, any::<u16>(), bytes(40)).prop_map(|(id, version, data)| RegionCap::Other {
            id,
            version,
            data
        }),
        // Known ids with an unknown version stay opaque.
        (1u16..=2, 2u16..10, bytes(40)).prop_map(|(id, version, data)| RegionCap::Other {
            id,
            version,
            data
        }),
    ]
}

fn region_info_reply() -> impl Strategy<Value = RegionInfoReply<'static>> {
    (region_info(), vec(region_cap(), 0..4), any::<Option<u32>>()).prop_map(|(info, caps, fit)| {
        let reply = RegionInfoReply::new(info, caps);
        match fit {
            Some(argsz) => reply.fit_to(argsz),
            None => reply,
        }
    })
}

fn io_fds_head() -> impl Strategy<Value = RegionIoFdsRequest> {
    any::<(u32, u32, u32, u32)>().prop_map(|(argsz, flags, index, count)| RegionIoFdsRequest {
        argsz,
        flags,
        index,
        count,
    })
}

fn io_fds_reply() -> impl Strategy<Value = RegionIoFdsReply> {
    (
        io_fds_head(),
        vec(any::<(u64, u64, u32, u32, u32, u64)>(), 0..4),
        any::<u32>(),
    )
        .prop_map(|(mut head, subs, extra)| {
            head.count = (subs.len() as u32).saturating_add(extra % 4);
            RegionIoFdsReply {
                head,
                subregions: subs
                    .into_iter()
                    .map(
                        |(offset, size, fd_index, fd_type, flags, data)| IoFdSubRegion {
                            offset,
                            size,
                            fd_index,
                            fd_type,
                            flags,
                            data,
                        },
                    )
                    .collect(),
            }
        })
}

fn irq_info() -> impl Strategy<Value = IrqInfo> {
    any::<(u32, u32, u32, u32)>().prop_map(|(argsz, flags, index, count)| IrqInfo {
        argsz,
        flags,
        index,
        count,
    })
}

fn irq_set() -> impl Strategy<Value = IrqSet<'static>> {
    let data_bits = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;
    (
        any::<(u32, u32, u32, u32)>(),
        select(vec![
            IRQ_SET_DATA_NONE,
            IRQ_SET_DATA_BOOL,
            IRQ_SET_DATA_EVENTFD,
        ]),
        bytes(16),
        any::<u32>(),
    )
        .prop_map(
            move |((argsz, other, index, start), data_flag, data, count)| {
                let flags = (other & !data_bits) | data_flag;
                let (count, data) = if data_flag == IRQ_SET_DATA_BOOL {
                    (data.len() as u32, data)
                } else {
                    (count, &[][..])
                };
                IrqSet {
                    argsz,
                    flags,
                    index,
                    start,
                    count,
                    data,
                }
            },
        )
}

fn region_access() -> impl Strategy<Value = RegionAccess> {
    (any::<u64>(), any::<u32>(), 0..=DEFAULT_MAX_DATA_XFER_SIZE).prop_map(
        |(offset, region, count)| RegionAccess {
            offset,
            region,
            count,
        },
    )
}

fn region_data() -> impl Strategy<Value = RegionData<'static>> {
    (any::<u64>(), any::<u32>(), bytes(300)).prop_map(|(offset, region, data)| RegionData {
        offset,
        region,
        data,
    })
}

fn dma_access() -> impl Strategy<Value = DmaAccess> {
    (any::<u64>(), 0..=u64::from(DEFAULT_MAX_DATA_XFER_SIZE))
        .prop_map(|(addr, count)| DmaAccess { addr, count })
}

fn dma_data() -> impl Strategy<Value = DmaData<'static>> {
    (any::<u64>(), bytes(300)).prop_map(|(addr, data)| DmaData { addr, data })
}

fn write_multi() -> impl Strategy<Value = WriteMulti> {
    vec(
        (any::<u64>(), any::<u32>(), 0u32..=8, any::<[u8; 8]>()),
        0..6,
    )
    .prop_map(|w| WriteMulti {
        writes: w
            .into_iter()
            .map(|(offset, region, count, data)| MultiWrite {
                offset,
                region,
                count,
                data,
            })
            .collect(),
    })
}

fn feature_data() -> impl Strategy<Value = (u16, FeatureData<'static>)> {
    let known = [1u16, 2, 6, 7, 8, 9];
    prop_oneof![
        any::<u16>().prop_map(|i| (i, FeatureData::None)),
        any::<u64>().prop_map(|flags| (FEATURE_MIGRATION, FeatureData::Migration { flags })),
        (select(DeviceState::ALL.to_vec()), any::<i32>()).prop_map(|(state, data_fd)| (
            FEATURE_MIG_DEVICE_STATE,
            FeatureData::MigDeviceState { state, data_fd }
        )),
        (
            select(vec![FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP]),
            any::<u64>(),
            vec(any::<(u64, u64)>(), 0..6)
        )
            .prop_map(|(idx, page_size, r)| (
                idx,
                FeatureData::DmaLogging(DmaLoggingControl {
                    page_size,
                    ranges: r
                        .into_iter()
                        .map(|(iova, length)| IovaRange { iova, length })
                        .collect(),
                })
            )),
        (any::<(u64, u64, u64)>(), vec(any::<u64>(), 0..5)).prop_map(
            |((iova, length, page_size), words)| {
                let bitmap: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                (
                    FEATURE_DMA_LOGGING_REPORT,
                    FeatureData::DmaLoggingReport(DmaLoggingReport {
                        iova,
                        length,
                        page_size,
                        bitmap: bitmap.leak(),
                    }),
                )
            }
        ),
        any::<u64>().prop_map(|stop_copy_length| (
            FEATURE_MIG_DATA_SIZE,
            FeatureData::MigDataSize { stop_copy_length }
        )),
        (
            any::<u16>().prop_filter("unknown index", move |i| !known.contains(i)),
            nonempty_bytes(40)
        )
            .prop_map(|(i, b)| (i, FeatureData::Raw(b))),
    ]
}

fn device_feature() -> impl Strategy<Value = DeviceFeature<'static>> {
    (any::<u32>(), 0u32..8, feature_data()).prop_map(|(argsz, ops, (index, data))| DeviceFeature {
        argsz,
        flags: (ops << 16) | u32::from(index),
        data,
    })
}

fn mig_read_request() -> impl Strategy<Value = MigDataReadRequest> {
    (any::<u32>(), 0..=DEFAULT_MAX_DATA_XFER_SIZE)
        .prop_map(|(argsz, size)| MigDataReadRequest { argsz, size })
}

fn mig_read_reply() -> impl Strategy<Value = MigDataReadReply<'static>> {
    (any::<u32>(), bytes(300), 0u32..64).prop_map(|(argsz, data, padding)| MigDataReadReply {
        argsz,
        data,
        padding,
    })
}

fn mig_write() -> impl Strategy<Value = MigDataWrite<'static>> {
    (any::<u32>(), bytes(300)).prop_map(|(argsz, data)| MigDataWrite { argsz, data })
}

fn request() -> impl Strategy<Value = Request<'static>> {
    prop_oneof![
        version().prop_map(Request::Version),
        dma_map().prop_map(Request::DmaMap),
        dma_unmap().prop_map(Request::DmaUnmap),
        device_info().prop_map(Request::DeviceGetInfo),
        (region_info(), 0u32..100).prop_map(|(info, trailing)| Request::GetRegionInfo(
            RegionInfoRequest { info, trailing }
        )),
        io_fds_head().prop_map(Request::GetRegionIoFds),
        irq_info().prop_map(Request::GetIrqInfo),
        irq_set().prop_map(Request::SetIrqs),
        region_access().prop_map(Request::RegionRead),
        region_data().prop_map(Request::RegionWrite),
        dma_access().prop_map(Request::DmaRead),
        dma_data().prop_map(Request::DmaWrite),
        Just(Request::DeviceReset),
        write_multi().prop_map(Request::RegionWriteMulti),
        device_feature().prop_map(Request::DeviceFeature),
        mig_read_request().prop_map(Request::MigDataRead),
        mig_write().prop_map(Request::MigDataWrite),
    ]
}

fn reply() -> impl Strategy<Value = Reply<'static>> {
    prop_oneof![
        version().prop_map(Reply::Version),
        Just(Reply::DmaMap),
        proptest::option::of(dma_unmap()).prop_map(Reply::DmaUnmap),
        device_info().prop_map(Reply::DeviceGetInfo),
        region_info_reply().prop_map(Reply::GetRegionInfo),
        io_fds_reply().prop_map(Reply::GetRegionIoFds),
        irq_info().prop_map(Reply::GetIrqInfo),
        Just(Reply::SetIrqs),
        region_data().prop_map(Reply::RegionRead),
        region_access().prop_map(Reply::RegionWrite),
        dma_data().prop_map(Reply::DmaRead),
        dma_access().prop_map(Reply::DmaWrite),
        Just(Reply::DeviceReset),
        any::<u64>().prop_map(|count| Reply::RegionWriteMulti(WriteMultiReply { count })),
        device_feature().prop_map(Reply::DeviceFeature),
        mig_read_reply().prop_map(Reply::MigDataRead),
        Just(Reply::MigDataWrite),
    ]
}

fn message() -> impl Strategy<Value = Message<'static>> {
    prop_oneof![
        (any::<u16>(), any::<bool>(), request()).prop_map(|(msg_id, no_reply, r)| Message {
            msg_id,
            no_reply,
            body: Body::Request(r),
        }),
        (any::<u16>(), reply()).prop_map(|(msg_id, r)| Message::reply(msg_id, r)),
        (any::<u16>(), any::<u16>(), any::<u32>(), bytes(40)).prop_map(
            |(msg_id, cmd, error, payload)| Message {
                msg_id,
                no_reply: false,
                body: Body::Error(ErrorReply {
                    cmd,
                    error,
                    payload,
                }),
            }
        ),
    ]
}

/// Decodes `bytes` as every payload type, as a message, and through framing; whatever
/// decodes must re-encode to bytes that decode to the same value.
fn decode_everything(bytes: &[u8]) {
    let limits = Limits::default();
    fn again<'a, P: Payload<'a> + PartialEq + std::fmt::Debug>(p: &P, limits: &Limits) {
        let out: &'a [u8] = p.encode_to_vec().unwrap().leak();
        assert_eq!(&P::decode(out, limits).unwrap(), p);
    }
    macro_rules! each {
        ($($t:ty),*) => {$(
            if let Ok(p) = <$t>::decode(bytes, &limits) {
                again(&p, &limits);
            }
        )*};
    }
    each!(
        Version,
        DmaMap,
        DmaUnmap,
        DeviceInfo,
        RegionInfoRequest,
        RegionInfoReply,
        RegionIoFdsRequest,
        RegionIoFdsReply,
        IrqInfo,
        IrqSet,
        RegionAccess,
        RegionData,
        DmaAccess,
        DmaData,
        WriteMulti,
        WriteMultiReply,
        DeviceFeature,
        MigDataReadRequest,
        MigDataReadReply,
        MigDataWrite
    );
    let _ = message_len(bytes, &limits);
    if let Ok(m) = Message::decode(bytes, &limits) {
        let mut out = Vec::new();
        m.encode(&mut out).unwrap();
        assert_eq!(Message::decode(&out, &limits).unwrap(), m);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_message_round_trips(msg in message()) {
        let limits = Limits::default();
        let mut whole = Vec::new();
        msg.encode(&mut whole).unwrap();
        prop_assert_eq!(whole.len(), msg.encoded_len());
        prop_assert_eq!(message_len(&whole, &limits).unwrap(), Some(whole.len()));
        let back = Message::decode(&whole, &limits).unwrap();
        prop_assert_eq!(&back, &msg);

        // The head + bulk path produces the same bytes.
        let mut head = Vec::new();
        let bulk = msg.encode_head(&mut head).unwrap();
        head.extend_from_slice(bulk.data);
        head.resize(head.len() + bulk.padding, 0);
        prop_assert_eq!(&head, &whole);

        // Data-carrying messages fit their head in a stack buffer.
        let h = msg.header().unwrap();
        if let (Ok(cmd), false) = (h.command(), h.is_error()) {
            if let Some(prefix) = data_prefix_len(cmd, h.kind().unwrap()) {
                let mut stack = HeadBuf::new();
                let bulk = msg.encode_head(&mut stack).unwrap();
                prop_assert_eq!(stack.len(), HEADER_SIZE + prefix);
                prop_assert_eq!(stack.len() + bulk.len(), whole.len());
            }
        }
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in vec(any::<u8>(), 0..512)) {
        decode_everything(&bytes);
    }

    /// Arbitrary payloads behind a well-formed header reach every payload decoder.
    #[test]
    fn arbitrary_payloads_behind_valid_headers_never_panic(
        msg_id in any::<u16>(),
        cmd in 0u16..20,
        flags in select(vec![0u32, 1, 0x10, 0x21]),
        error in any::<u32>(),
        payload in vec(any::<u8>(), 0..300),
    ) {
        let header = Header {
            msg_id,
            cmd,
            msg_size: (HEADER_SIZE + payload.len()) as u32,
            flags,
            error,
        };
        let mut bytes = header.to_bytes().to_vec();
        bytes.extend_from_slice(&payload);
        decode_everything(&bytes);
        match Message::decode(&bytes, &Limits::default()) {
            Ok(m) => prop_assert_eq!(m.msg_id, msg_id),
            Err(e) => {
                // Whatever failed, the header allows an error reply.
                let reply = Message::error_reply(&header, e.errno());
                let mut out = Vec::new();
                reply.encode(&mut out).unwrap();
                prop_assert_eq!(&out[..4], &bytes[..4]);
            }
        }
    }

    /// Mutating one byte of a valid message yields a message or an error, never a panic.
    #[test]
    fn mutated_messages_never_panic(msg in message(), pos in any::<usize>(), val in any::<u8>()) {
        let mut bytes = Vec::new();
        msg.encode(&mut bytes).unwrap();
        let i = pos % bytes.len();
        bytes[i] = val;
        decode_everything(&bytes);
    }
}
