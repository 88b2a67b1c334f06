//! Negative cases through the public API: each `CodecError` variant, from whole messages as
//! a socket layer would see them, with the errno a server would answer.

use std::error::Error as _;

use vfio_mig_uapi::{Errno, UnknownState};
use vfio_mig_vfio_user::codec::*;

fn msg(msg_id: u16, cmd: u16, flags: u32, payload: &[u8]) -> Vec<u8> {
    let header = Header {
        msg_id,
        cmd,
        msg_size: (HEADER_SIZE + payload.len()) as u32,
        flags,
        error: 0,
    };
    let mut v = header.to_bytes().to_vec();
    v.extend_from_slice(payload);
    v
}

fn decode(bytes: &[u8]) -> Result<Message<'_>, CodecError> {
    Message::decode(bytes, &Limits::default())
}

#[test]
fn truncated() {
    // Not even a header.
    assert!(matches!(
        decode(&[1, 0, 9]),
        Err(CodecError::Truncated { need: 4, have: 3 })
    ));
    // REGION_READ needs 16 bytes of payload.
    let m = msg(1, 9, 0, &[0; 12]);
    let e = decode(&m).unwrap_err();
    assert!(
        matches!(e, CodecError::Truncated { need: 16, have: 12 }),
        "{e:?}"
    );
    assert_eq!(e.errno(), Errno::EINVAL);
    assert_eq!(e.to_string(), "truncated: need 16 bytes, have 12");
}

#[test]
fn length_mismatch() {
    // msg_size promises more than was received.
    let mut m = msg(1, 2, 0, &[0; 32]);
    m.truncate(40);
    assert!(matches!(
        decode(&m),
        Err(CodecError::LengthMismatch {
            expected: 32,
            actual: 24,
            ..
        })
    ));
    // Payload where the layout has none.
    for (cmd, flags) in [(13, 0), (13, 1), (2, 1), (8, 1), (18, 1)] {
        let m = msg(1, cmd, flags, &[0; 4]);
        assert!(
            matches!(
                decode(&m),
                Err(CodecError::LengthMismatch {
                    expected: 0,
                    actual: 4,
                    ..
                })
            ),
            "cmd {cmd} flags {flags}"
        );
    }
    // REGION_WRITE whose count disagrees with its data.
    let mut p = vec![0u8; 16];
    p[12..16].copy_from_slice(&4u32.to_le_bytes());
    p.extend_from_slice(&[1, 2, 3]);
    let e = decode(&msg(1, 10, 0, &p)).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::LengthMismatch {
                expected: 4,
                actual: 3,
                ..
            }
        ),
        "{e:?}"
    );
}

#[test]
fn too_large() {
    let limits = Limits::default();
    // Framing refuses a message above the limit before anything is read or allocated.
    let mut h = Header::for_command(1, Command::MigDataWrite, 0).unwrap();
    h.msg_size = limits.max_msg_size + 1;
    let e = message_len(&h.to_bytes(), &limits).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::TooLarge {
                what: "msg_size",
                ..
            }
        ),
        "{e:?}"
    );
    // A read of more than max_data_xfer_size.
    let mut p = vec![0u8; 16];
    p[12..16].copy_from_slice(&(limits.max_data_xfer_size + 1).to_le_bytes());
    assert!(matches!(
        decode(&msg(1, 9, 0, &p)),
        Err(CodecError::TooLarge { .. })
    ));
    // A negotiated smaller transfer size applies to MIG_DATA_READ.
    let small = Limits {
        max_data_xfer_size: 1024,
        ..limits
    };
    let m = msg(1, 17, 0, &[0x08, 0x08, 0, 0, 0x00, 0x08, 0, 0]);
    assert!(matches!(
        Message::decode(&m, &small),
        Err(CodecError::TooLarge {
            size: 2048,
            limit: 1024,
            ..
        })
    ));
    assert!(Message::decode(&m, &limits).is_ok());
    // More DMA-logging ranges than allowed: refused before any allocation.
    let mut p = vec![0x18, 0, 0, 0, 6, 0, 2, 0];
    p.extend_from_slice(&4096u64.to_le_bytes());
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    p.extend_from_slice(&[0; 4]);
    assert!(matches!(
        decode(&msg(1, 16, 0, &p)),
        Err(CodecError::TooLarge {
            size: 0xffff_ffff,
            ..
        })
    ));
    // Too many fds with one message.
    assert!(matches!(
        limits.check_fds(9),
        Err(CodecError::TooLarge { .. })
    ));
}

#[test]
fn bad_field() {
    // Header type 2 is neither command nor reply.
    let e = decode(&msg(1, 1, 2, &[0, 0, 2, 0])).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::BadField {
                field: "header flags type",
                ..
            }
        ),
        "{e:?}"
    );
    // ERROR on a command.
    assert!(matches!(
        decode(&msg(1, 13, 0x20, &[])),
        Err(CodecError::BadField { .. })
    ));
    // SET_IRQS with two DATA bits.
    let mut p = vec![20, 0, 0, 0];
    p.extend_from_slice(
        &(IRQ_SET_DATA_NONE | IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER).to_le_bytes(),
    );
    p.extend_from_slice(&[0; 12]);
    assert!(matches!(
        decode(&msg(1, 8, 0, &p)),
        Err(CodecError::BadField { .. })
    ));
    // VERSION JSON without its NUL.
    assert!(matches!(
        decode(&msg(1, 1, 0, b"\0\0\x02\0{}")),
        Err(CodecError::BadField {
            field: "VERSION JSON terminator",
            ..
        })
    ));
    // msg_size smaller than the header.
    let mut m = msg(1, 13, 0, &[]);
    m[4] = 8;
    assert!(matches!(
        decode(&m),
        Err(CodecError::BadField {
            field: "msg_size",
            ..
        })
    ));
}

#[test]
fn unknown_command_can_still_be_answered() {
    let m = msg(283, 99, 0, &[]);
    let header = Header::decode(&m).unwrap();
    let e = decode(&m).unwrap_err();
    assert!(matches!(e, CodecError::UnknownCommand(99)));
    assert_eq!(e.errno(), Errno::EINVAL);
    let mut out = Vec::new();
    Message::error_reply(&header, e.errno())
        .encode(&mut out)
        .unwrap();
    // What libvfio-user's gpio sample answered to the same message.
    assert_eq!(hex::encode(&out), "1b016300100000002100000016000000");
    // And the error reply itself decodes, though its command is unknown.
    let Body::Error(err) = decode(&out).unwrap().body else {
        panic!()
    };
    assert_eq!((err.cmd, err.errno()), (99, Errno::EINVAL));
}

#[test]
fn unsupported_dirty_pages() {
    let m = msg(5, 14, 0, &[0; 16]);
    let e = decode(&m).unwrap_err();
    assert!(matches!(
        e,
        CodecError::UnsupportedCommand(Command::DirtyPages)
    ));
    assert_eq!(e.errno(), Errno::ENOSYS);
    assert_eq!(
        Header::decode(&m).unwrap().command().unwrap(),
        Command::DirtyPages
    );
    let reply = Message::error_reply(&Header::decode(&m).unwrap(), Errno::ENOSYS);
    let mut out = Vec::new();
    reply.encode(&mut out).unwrap();
    assert!(matches!(decode(&out).unwrap().body, Body::Error(e) if e.errno() == Errno::ENOSYS));
}

#[test]
fn bad_device_state() {
    let mut p = vec![16, 0, 0, 0, 2, 0, 2, 0];
    p.extend_from_slice(&9u32.to_le_bytes());
    p.extend_from_slice(&(-1i32).to_le_bytes());
    let e = decode(&msg(1, 16, 0, &p)).unwrap_err();
    assert!(
        matches!(e, CodecError::BadDeviceState(UnknownState(9))),
        "{e:?}"
    );
    assert_eq!(e.errno(), Errno::EINVAL);
    let source = e.source().expect("the unknown state is the source");
    assert!(source.to_string().contains('9'));
    assert!(
        !e.to_string().contains('9'),
        "cause repeated in the message: {e}"
    );
}

#[test]
fn bad_utf8_and_bad_json() {
    let e = decode(&msg(1, 1, 0, b"\0\0\x02\0\xff\xfe\0")).unwrap_err();
    assert!(matches!(e, CodecError::BadUtf8(_)), "{e:?}");
    assert!(e.source().is_some());
    let e = decode(&msg(
        1,
        1,
        1,
        b"\0\0\x02\0{\"capabilities\":{\"max_msg_fds\":true}}\0",
    ))
    .unwrap_err();
    assert!(matches!(e, CodecError::BadJson(_)), "{e:?}");
    let source = e
        .source()
        .expect("serde_json error is the source")
        .to_string();
    assert!(source.contains("invalid type"), "{source}");
    assert!(
        !e.to_string().contains("invalid type"),
        "cause repeated: {e}"
    );
}

#[test]
fn reply_mismatch() {
    let request = Request::RegionRead(RegionAccess {
        offset: 0,
        region: 2,
        count: 1,
    });
    let too_much = Reply::RegionRead(RegionData {
        offset: 0,
        region: 2,
        data: &[1, 2],
    });
    assert!(matches!(
        too_much.check_answers(&request),
        Err(CodecError::ReplyMismatch {
            request: 1,
            reply: 2,
            ..
        })
    ));
    let other_region = Reply::RegionRead(RegionData {
        offset: 0,
        region: 3,
        data: &[1],
    });
    assert!(matches!(
        other_region.check_answers(&request),
        Err(CodecError::ReplyMismatch {
            field: "region",
            ..
        })
    ));
    let wrong_cmd = Reply::DmaMap;
    assert!(matches!(
        wrong_cmd.check_answers(&request),
        Err(CodecError::ReplyMismatch {
            field: "command",
            ..
        })
    ));
    // A MIG_DATA_READ reply padded beyond the size asked for.
    let req = Request::MigDataRead(MigDataReadRequest::new(8));
    let padded = Reply::MigDataRead(MigDataReadReply {
        argsz: 8,
        data: &[],
        padding: 16,
    });
    assert!(padded.check_answers(&req).is_err());
    let fine = Reply::MigDataRead(MigDataReadReply {
        argsz: 8,
        data: &[],
        padding: 8,
    });
    fine.check_answers(&req).unwrap();
    // Feature replies must keep the request's flags.
    let get = Request::DeviceFeature(DeviceFeature::new(
        FEATURE_GET,
        FEATURE_MIGRATION,
        FeatureData::None,
    ));
    let reply = Reply::DeviceFeature(DeviceFeature::new(
        FEATURE_GET,
        FEATURE_MIG_DATA_SIZE,
        FeatureData::MigDataSize {
            stop_copy_length: 1,
        },
    ));
    assert!(reply.check_answers(&get).is_err());
}

#[test]
fn buffer_full() {
    // A control message does not fit a head buffer; the data messages always do.
    let caps = Capabilities {
        max_msg_fds: Some(8),
        max_data_xfer_size: Some(1 << 20),
        ..Capabilities::default()
    };
    let version = Message::request(1, Request::Version(Version::new(0, 2, &caps).unwrap()));
    let mut head = HeadBuf::new();
    let e = version.encode_head(&mut head).unwrap_err();
    assert!(
        matches!(
            e,
            CodecError::BufferFull {
                capacity: MAX_HEAD_LEN,
                ..
            }
        ),
        "{e:?}"
    );
    let data = vec![7u8; 1 << 20];
    let write = Message::request(2, Request::MigDataWrite(MigDataWrite::new(&data)));
    let mut head = HeadBuf::new();
    let bulk = write.encode_head(&mut head).unwrap();
    assert_eq!(head.len(), HEADER_SIZE + MIG_DATA_PREFIX);
    assert!(std::ptr::eq(bulk.data, data.as_slice()));
    let mut tiny = StackBuf::<8>::new();
    assert!(matches!(
        write.encode_head(&mut tiny),
        Err(CodecError::BufferFull {
            need: 16,
            capacity: 8
        })
    ));
}
