//! Each way a stream can be wrong, crafted with valid checksums where needed so that the
//! specific check (not just a CRC) must catch it, with the offset it reports.

mod common;

use common::*;
use vfio_mig_stream::{
    inspect, DecodeErrorKind, Decoder, DecoderLimits, Event, Integrity, Outcome, Phase, RecordType,
    FRAME_LEN, HEADER_LEN, MAX_ABORT_REASON_LEN,
};

const DEVICE: u8 = 1;
const DATA: u8 = 2;
const DEVICE_END: u8 = 3;
const END: u8 = 4;

fn stream() -> Vec<u8> {
    encode(&simple_plan(2, 3, 16)).0
}

#[test]
fn bad_magic() {
    let mut b = stream();
    b[0] = b'X';
    let e = first_error(&b);
    assert_eq!(e.offset, 0);
    assert!(matches!(e.kind, DecodeErrorKind::BadMagic { .. }));
    assert!(e.to_string().contains("not a vfio-mig stream"), "{e}");

    // A short file that is not a stream says so, rather than "truncated".
    let e = first_error(b"hello");
    assert_eq!(
        e.kind,
        DecodeErrorKind::BadMagic {
            found: b"hello".to_vec()
        }
    );
}

#[test]
fn unsupported_version_is_reported_before_the_checksum() {
    let mut b = stream();
    b[8] = 2;
    let e = first_error(&b);
    assert_eq!(
        e.kind,
        DecodeErrorKind::UnsupportedVersion {
            found: 2,
            supported: 1
        }
    );
    assert_eq!(e.offset, 0);
}

#[test]
fn header_fields() {
    let mut b = stream();
    b[13] ^= 1;
    let e = first_error(&b);
    assert!(
        e.to_string().contains("stream header checksum mismatch"),
        "{e}"
    );

    let mut b = stream();
    b[10] = 1;
    fix_header(&mut b);
    assert!(matches!(
        first_error(&b).kind,
        DecodeErrorKind::BadHeaderField { field: "flags", .. }
    ));

    let mut b = stream();
    b[16..18].copy_from_slice(&0u16.to_le_bytes());
    fix_header(&mut b);
    assert!(matches!(
        first_error(&b).kind,
        DecodeErrorKind::BadHeaderField {
            field: "device_count",
            ..
        }
    ));

    let mut b = stream();
    b[12..16].copy_from_slice(&0u32.to_le_bytes());
    fix_header(&mut b);
    assert!(matches!(
        first_error(&b).kind,
        DecodeErrorKind::BadHeaderField {
            field: "max_chunk",
            ..
        }
    ));

    // A producer length over the limit is refused before anything is buffered.
    let mut b = stream();
    b[18..20].copy_from_slice(&u16::MAX.to_le_bytes());
    fix_header(&mut b);
    let mut dec = Decoder::new();
    let e = dec.feed(&b[..HEADER_LEN]).unwrap_err();
    assert_eq!(
        e.kind,
        DecodeErrorKind::LengthOverLimit {
            what: "producer string".into(),
            len: 65535,
            limit: 256
        }
    );

    let mut b = stream();
    b[HEADER_LEN] ^= 0x20;
    let e = first_error(&b);
    assert!(
        e.to_string().contains("producer string checksum mismatch"),
        "{e}"
    );
    assert_eq!(e.offset, 0);
}

#[test]
fn decoder_limit_on_the_stated_chunk_size() {
    let (b, _) = encode(&simple_plan(1, 1, 4096));
    let mut dec = Decoder::with_limits(DecoderLimits { max_chunk: 4095 });
    let e = dec.feed(&b).unwrap_err();
    assert_eq!(
        e.kind,
        DecodeErrorKind::LengthOverLimit {
            what: "the header's maximum chunk".into(),
            len: 4096,
            limit: 4095
        }
    );
    let mut dec = Decoder::with_limits(DecoderLimits { max_chunk: 4096 });
    assert!(dec.feed(&b).is_ok());
}

#[test]
fn unknown_record_type() {
    let mut b = stream();
    let (at, _) = nth_record(&b, DATA, 0);
    b[at] = 9;
    fix_frame(&mut b, at);
    let e = first_error(&b);
    assert_eq!(e.kind, DecodeErrorKind::UnknownRecordType(9));
    assert_eq!(e.offset, at as u64);
}

#[test]
fn frame_checksum() {
    let mut b = stream();
    let (at, _) = nth_record(&b, DATA, 2);
    b[at + 9] ^= 0x40; // the body length: must be caught before it is believed
    let e = first_error(&b);
    assert!(
        e.to_string()
            .starts_with(&format!("at offset {at}: record frame checksum mismatch")),
        "{e}"
    );
}

#[test]
fn payload_checksum() {
    let mut b = stream();
    let (at, _) = nth_record(&b, DATA, 3); // device 1, chunk 1
    b[at + FRAME_LEN + 5] ^= 1;
    let e = first_error(&b);
    assert_eq!(e.offset, at as u64);
    assert!(
        e.to_string()
            .contains("DATA payload of device 1 chunk 1 checksum mismatch"),
        "{e}"
    );
}

#[test]
fn device_records_in_order() {
    let mut b = stream();
    let (at, _) = nth_record(&b, DEVICE, 1);
    b[at + 2] = 0;
    fix_frame(&mut b, at);
    let e = first_error(&b);
    assert_eq!(
        e.kind,
        DecodeErrorKind::UnexpectedDeviceRecord {
            found: 0,
            expected: Some(1)
        }
    );
    assert_eq!(e.offset, at as u64);
}

#[test]
fn data_before_all_devices_are_declared() {
    let mut b = stream();
    b[16..18].copy_from_slice(&3u16.to_le_bytes());
    fix_header(&mut b);
    let e = first_error(&b);
    assert_eq!(
        e.kind,
        DecodeErrorKind::DevicesNotDeclared {
            record: RecordType::Data,
            declared: 2,
            count: 3
        }
    );
    assert_eq!(e.offset, nth_record(&b, DATA, 0).0 as u64);
}

#[test]
fn chunk_for_an_undeclared_device() {
    let mut b = stream();
    let (at, _) = nth_record(&b, DATA, 0);
    b[at + 2] = 7;
    fix_frame(&mut b, at);
    assert_eq!(
        first_error(&b).kind,
        DecodeErrorKind::UndeclaredDevice {
            record: RecordType::Data,
            device: 7,
            count: 2
        }
    );
}

#[test]
fn sequence_order() {
    let b = stream();
    // Device 0's chunks are DATA records 0, 2, 4. Renumber its second chunk.
    let mut c = b.clone();
    let (at, _) = nth_record(&c, DATA, 2);
    c[at + 4] = 5;
    fix_frame(&mut c, at);
    assert_eq!(
        first_error(&c).kind,
        DecodeErrorKind::OutOfOrderSequence {
            device: 0,
            expected: 1,
            found: 5
        }
    );

    // Drop that chunk: its successor is out of order.
    let (at, len) = nth_record(&b, DATA, 2);
    let mut c = b.clone();
    c.drain(at..at + FRAME_LEN + len);
    let e = first_error(&c);
    assert_eq!(
        e.kind,
        DecodeErrorKind::OutOfOrderSequence {
            device: 0,
            expected: 1,
            found: 2
        }
    );

    // Repeat it: the copy is out of order.
    let mut c = b.clone();
    let record = b[at..at + FRAME_LEN + len].to_vec();
    c.splice(at..at, record);
    let e = first_error(&c);
    assert_eq!(e.offset, (at + FRAME_LEN + len) as u64);
    assert!(matches!(
        e.kind,
        DecodeErrorKind::OutOfOrderSequence {
            found: 1,
            expected: 2,
            ..
        }
    ));

    // Drop a device's last chunk: its DEVICE_END totals no longer match.
    let (at, len) = nth_record(&b, DATA, 4);
    let mut c = b.clone();
    c.drain(at..at + FRAME_LEN + len);
    assert_eq!(
        first_error(&c).kind,
        DecodeErrorKind::DeviceTotalsMismatch {
            device: 0,
            field: "stop-copy bytes",
            stored: 32,
            counted: 16
        }
    );
}

#[test]
fn phases() {
    let b = stream();
    let (at, _) = nth_record(&b, DATA, 4); // device 0, third chunk, stop-copy
    let mut c = b.clone();
    c[at + 1] = Phase::PreCopy as u8;
    fix_frame(&mut c, at);
    assert_eq!(
        first_error(&c).kind,
        DecodeErrorKind::PhaseRegression {
            device: 0,
            phase: Phase::PreCopy
        }
    );
    let mut c = b.clone();
    c[at + 1] = 3;
    fix_frame(&mut c, at);
    assert_eq!(
        first_error(&c).kind,
        DecodeErrorKind::UnknownPhase {
            device: 0,
            phase: 3
        }
    );
}

#[test]
fn lengths_over_limits_are_refused_at_the_frame() {
    let b = stream();
    let (at, _) = nth_record(&b, DATA, 0);
    for (len, kind) in [
        (
            17u32,
            DecodeErrorKind::LengthOverLimit {
                what: "DATA payload of device 0".into(),
                len: 17,
                limit: 16,
            },
        ),
        (
            u32::MAX,
            DecodeErrorKind::LengthOverLimit {
                what: "DATA payload of device 0".into(),
                len: u32::MAX.into(),
                limit: 16,
            },
        ),
        (0, DecodeErrorKind::EmptyChunk { device: 0 }),
    ] {
        let mut c = b[..at + FRAME_LEN].to_vec();
        c[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        fix_frame(&mut c, at);
        // The frame alone is enough to refuse it: no payload is awaited or buffered.
        let (_, end) = decode_cut(&c, &[]);
        let e = end.unwrap_err();
        assert_eq!(e.kind, kind);
        assert_eq!(e.offset, at as u64);
    }

    let (at, _) = nth_record(&b, DEVICE, 0);
    let mut c = b[..at + FRAME_LEN].to_vec();
    c[at + 8..at + 12].copy_from_slice(&100_000u32.to_le_bytes());
    fix_frame(&mut c, at);
    assert!(matches!(
        decode_cut(&c, &[]).1.unwrap_err().kind,
        DecodeErrorKind::LengthOverLimit { len: 100_000, .. }
    ));

    // An ABORT reason longer than the limit.
    let (at, _) = nth_record(&b, DATA, 0);
    let mut c = b[..at].to_vec();
    let mut frame = [0u8; FRAME_LEN];
    frame[0] = 5;
    frame[8..12].copy_from_slice(&(MAX_ABORT_REASON_LEN as u32 + 1).to_le_bytes());
    c.extend_from_slice(&frame);
    fix_frame(&mut c, at);
    assert!(matches!(
        decode_cut(&c, &[]).1.unwrap_err().kind,
        DecodeErrorKind::LengthOverLimit {
            len: 1025,
            limit: 1024,
            ..
        }
    ));
}

#[test]
fn fixed_size_records_and_zero_fields() {
    let b = stream();
    let (at, _) = nth_record(&b, DEVICE_END, 0);
    let mut c = b.clone();
    c[at + 1] = 1;
    fix_frame(&mut c, at);
    assert_eq!(
        first_error(&c).kind,
        DecodeErrorKind::NonZeroField {
            record: RecordType::DeviceEnd,
            field: "phase",
            value: 1
        }
    );
    let mut c = b.clone();
    c[at + 8] = 31;
    fix_frame(&mut c, at);
    assert_eq!(
        first_error(&c).kind,
        DecodeErrorKind::BadRecordLength {
            record: RecordType::DeviceEnd,
            len: 31,
            expected: 32
        }
    );
    let (at, _) = nth_record(&b, END, 0);
    let mut c = b.clone();
    c[at + 2] = 1;
    fix_frame(&mut c, at);
    assert!(matches!(
        first_error(&c).kind,
        DecodeErrorKind::NonZeroField {
            record: RecordType::End,
            field: "device index",
            ..
        }
    ));
}

#[test]
fn device_record_contents() {
    let b = stream();
    let (at, _) = nth_record(&b, DEVICE, 1);
    let body = at + FRAME_LEN;
    let mut c = b.clone();
    c[body] = 0x6; // features without STOP_COPY
    fix_record(&mut c, at);
    let e = first_error(&c);
    assert_eq!(e.offset, at as u64);
    assert!(
        e.to_string()
            .contains("DEVICE record for device 1: migration features 0x6"),
        "{e}"
    );

    let mut c = b.clone();
    c[body + 24] = 0xff; // first byte of the name
    fix_record(&mut c, at);
    assert!(first_error(&c)
        .to_string()
        .contains("name is not valid UTF-8"));

    let mut c = b.clone();
    c[body + 16] += 1; // name length one longer than the body holds
    fix_record(&mut c, at);
    assert!(first_error(&c).to_string().contains("fields need"));
}

#[test]
fn device_end_totals() {
    let b = stream();
    let (at, _) = nth_record(&b, DEVICE_END, 1);
    let mut c = b.clone();
    c[at + FRAME_LEN + 8] = 2; // pre-copy chunks
    fix_record(&mut c, at);
    let e = first_error(&c);
    assert_eq!(
        e.kind,
        DecodeErrorKind::DeviceTotalsMismatch {
            device: 1,
            field: "pre-copy chunks",
            stored: 2,
            counted: 1
        }
    );
    assert_eq!(e.offset, at as u64);

    // A chunk after the device ended.
    let (data_at, len) = nth_record(&b, DATA, 5);
    let mut c = b.clone();
    let record = b[data_at..data_at + FRAME_LEN + len].to_vec();
    let end_at = nth_record(&b, END, 0).0;
    c.splice(end_at..end_at, record);
    assert_eq!(
        first_error(&c).kind,
        DecodeErrorKind::AfterDeviceEnd {
            record: RecordType::Data,
            device: 1
        }
    );
}

#[test]
fn end_record() {
    let b = stream();
    let (at, len) = nth_record(&b, DEVICE_END, 1);
    let mut c = b.clone();
    c.drain(at..at + FRAME_LEN + len);
    let e = first_error(&c);
    assert_eq!(e.kind, DecodeErrorKind::DeviceNotEnded { device: 1 });
    assert_eq!(e.offset, at as u64);

    let (at, _) = nth_record(&b, END, 0);
    let mut c = b.clone();
    c[at + FRAME_LEN] ^= 1; // total bytes
    fix_record(&mut c, at);
    assert!(matches!(
        first_error(&c).kind,
        DecodeErrorKind::EndTotalsMismatch { field: "bytes", .. }
    ));
}

#[test]
fn chain_checksum_catches_records_swapped_between_devices() {
    // DATA records 0 and 1 belong to devices 0 and 1: swapping them breaks no per-device
    // rule, but changes the stream the source wrote.
    let b = stream();
    let (a, alen) = nth_record(&b, DATA, 0);
    let (c_at, clen) = nth_record(&b, DATA, 1);
    assert_eq!(a + FRAME_LEN + alen, c_at);
    let mut c = b[..a].to_vec();
    c.extend_from_slice(&b[c_at..c_at + FRAME_LEN + clen]);
    c.extend_from_slice(&b[a..c_at]);
    c.extend_from_slice(&b[c_at + FRAME_LEN + clen..]);
    let e = first_error(&c);
    assert!(
        e.to_string()
            .contains("chain (header and record frames) checksum mismatch"),
        "{e}"
    );
    assert_eq!(e.offset, nth_record(&b, END, 0).0 as u64);
}

#[test]
fn data_after_the_end() {
    let mut b = stream();
    let len = b.len();
    b.push(0);
    let e = first_error(&b);
    assert_eq!(
        e.kind,
        DecodeErrorKind::DataAfterEnd {
            last: RecordType::End
        }
    );
    assert_eq!(e.offset, len as u64);

    // A second complete stream appended is data after the end too.
    let mut b = stream();
    b.extend_from_slice(&stream());
    assert_eq!(first_error(&b).offset, stream().len() as u64);
}

#[test]
fn abort() {
    let mut plan = simple_plan(2, 2, 8);
    plan.ops.truncate(1);
    plan.ops.push(Op::Abort("device 1 failed: EIO".into()));
    let (b, events) = encode(&plan);
    let (got, end) = decode_cut(&b, &[]);
    assert_eq!(got, events);
    assert_eq!(end, Ok(Outcome::Aborted("device 1 failed: EIO".into())));

    let mut c = b.clone();
    c.push(1);
    assert_eq!(
        first_error(&c).kind,
        DecodeErrorKind::DataAfterEnd {
            last: RecordType::Abort
        }
    );

    // ABORT may come even before every device is declared.
    let mut out = Vec::new();
    let mut enc =
        vfio_mig_stream::Encoder::new(&config(8), &[device(0, "membuf")], &mut out).unwrap();
    enc.abort("early", &mut out).unwrap();
    let recs = records(&out); // the DEVICE record, then the ABORT record
    let mut c = out[..recs[0].0].to_vec();
    c.extend_from_slice(&out[recs[1].0..]);
    assert_eq!(decode_cut(&c, &[]).1, Ok(Outcome::Aborted("early".into())));
}

#[test]
fn truncation_messages_say_what_was_missing() {
    let b = stream();
    let msg = |len: usize| decode_cut(&b[..len], &[]).1.unwrap_err().to_string();
    assert_eq!(
        msg(0),
        "truncated at offset 0: expected the 36-byte stream header, but the stream is empty"
    );
    assert_eq!(
        msg(10),
        "truncated at offset 10: expected the 36-byte stream header (10 bytes present)"
    );
    let (dev1, _) = nth_record(&b, DEVICE, 1);
    assert_eq!(
        msg(dev1),
        format!("truncated at offset {dev1}: expected the DEVICE record of device 1")
    );
    let (at, _) = nth_record(&b, DATA, 3);
    assert_eq!(
        msg(at + 3),
        format!(
            "truncated at offset {}: expected the rest of a 20-byte record frame (3 bytes present)",
            at + 3
        )
    );
    assert_eq!(
        msg(at + FRAME_LEN + 5),
        format!(
            "truncated at offset {}: expected the rest of DATA chunk 1 of device 1 (5 of 16 payload bytes present)",
            at + FRAME_LEN + 5
        )
    );
    let (end, _) = nth_record(&b, END, 0);
    assert_eq!(
        msg(end),
        format!("truncated at offset {end}: expected another record: the stream ended before its END record (0 device(s) without DEVICE_END)")
    );
    assert_eq!(
        msg(end + FRAME_LEN),
        format!("truncated at offset {}: expected the rest of a END record (0 of 24 body bytes present)", end + FRAME_LEN)
    );
}

#[test]
fn errors_are_sticky() {
    let mut b = stream();
    b[40] ^= 1;
    let mut dec = Decoder::new();
    let mut input = &b[..];
    let first = loop {
        match dec.feed(input) {
            Ok((n, _)) => input = &input[n..],
            Err(e) => break e,
        }
    };
    assert_eq!(dec.feed(&b[..]).unwrap_err(), first);
    assert_eq!(dec.finish().unwrap_err(), first);
    assert!(dec.demand().is_empty());
    assert_eq!(dec.commit(0).unwrap_err(), first);
}

#[test]
fn payloads_are_borrowed_from_the_input_when_whole() {
    let b = stream();
    let mut dec = Decoder::new();
    let mut input = &b[..];
    let range = b.as_ptr_range();
    let mut chunks = 0;
    while !input.is_empty() {
        let (n, event) = dec.feed(input).unwrap();
        if let Some(Event::Data(chunk)) = event {
            assert!(
                range.contains(&chunk.payload.as_ptr()),
                "payload was copied"
            );
            chunks += 1;
        }
        input = &input[n..];
    }
    assert_eq!(chunks, 6);
    assert_eq!(dec.device_progress(1).unwrap().chunks(), 3);
    assert!(matches!(dec.finish(), Ok(Outcome::Complete(_))));
}

#[test]
fn inspect_summarises_a_stream() {
    let b = stream();
    let report = inspect(&b[..]).unwrap();
    assert_eq!(report.integrity, Integrity::Ok);
    assert_eq!(report.bytes_read, b.len() as u64);
    assert_eq!(report.devices.len(), 2);
    let d = &report.devices[1];
    assert_eq!((d.pre_copy.chunks, d.pre_copy.bytes), (1, 16));
    assert_eq!((d.stop_copy.chunks, d.stop_copy.bytes), (2, 32));
    assert!(d.ended);
    assert_eq!(report.end.unwrap().bytes, 96);

    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["integrity"]["status"], "ok");
    assert_eq!(json["header"]["producer"], "vfio-mig test");
    assert_eq!(json["devices"][1]["kind"], "membuf");
    assert_eq!(json["devices"][1]["compat"], "0010000000000000");
    assert_eq!(json["devices"][1]["features"][2], "pre-copy");
    assert_eq!(json["devices"][1]["stop_copy"]["bytes"], 32);

    let text = report.to_string();
    assert!(
        text.contains("written by \"vfio-mig test\" at 2023-11-14 22:13:20 UTC"),
        "{text}"
    );
    assert!(
        text.contains("device 1: vfio-user:/tmp/dev1.sock"),
        "{text}"
    );
    assert!(
        text.contains("stop-copy: 2 chunk(s), 32 bytes; complete"),
        "{text}"
    );
    assert!(
        text.ends_with(&format!("integrity: ok ({} bytes read)", b.len())),
        "{text}"
    );
}

#[test]
fn inspect_reports_the_first_problem() {
    let b = stream();
    let (at, _) = nth_record(&b, DATA, 4);
    let mut c = b.clone();
    c[at + FRAME_LEN] ^= 0xff;
    let report = inspect(&c[..]).unwrap();
    match &report.integrity {
        Integrity::Corrupt { offset, message } => {
            assert_eq!(*offset, at as u64);
            assert!(message.contains("checksum mismatch"), "{message}");
        }
        other => panic!("{other:?}"),
    }
    // What came before the problem is still described.
    assert_eq!(report.devices[0].pre_copy.chunks, 1);
    assert_eq!(report.devices[0].stop_copy.chunks, 1);
    assert!(report.end.is_none());
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["integrity"]["status"], "corrupt");
    assert_eq!(json["integrity"]["offset"], at as u64);

    let report = inspect(&b[..b.len() - 1]).unwrap();
    assert!(
        matches!(report.integrity, Integrity::Truncated { offset, .. } if offset == b.len() as u64 - 1)
    );
    assert!(report
        .to_string()
        .contains("integrity: FAILED: truncated at offset"));

    let mut c = b.clone();
    c.extend_from_slice(b"trailing");
    let report = inspect(&c[..]).unwrap();
    assert!(
        matches!(&report.integrity, Integrity::Corrupt { offset, message }
        if *offset == b.len() as u64 && message.contains("data after the END record"))
    );

    let mut plan = simple_plan(1, 2, 4);
    plan.ops.truncate(1);
    plan.ops.push(Op::Abort("stopped".into()));
    let report = inspect(&encode(&plan).0[..]).unwrap();
    assert_eq!(
        report.integrity,
        Integrity::Aborted {
            reason: "stopped".into()
        }
    );

    let report = inspect(&b"not a stream at all"[..]).unwrap();
    assert!(report.header.is_none());
    assert!(matches!(
        report.integrity,
        Integrity::Corrupt { offset: 0, .. }
    ));
}

#[test]
fn inspect_passes_read_errors_on() {
    struct Failing;
    impl std::io::Read for Failing {
        fn read(&mut self, _: &mut [u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk on fire"))
        }
    }
    assert_eq!(inspect(Failing).unwrap_err().to_string(), "disk on fire");
}

#[test]
fn devices_complete_exactly_after_the_last_device_record() {
    let b = stream();
    let mut dec = Decoder::new();
    let mut input = &b[..];
    let mut seen = Vec::new();
    while !input.is_empty() {
        let complete_before = dec.devices_complete();
        let (n, event) = dec.feed(input).unwrap();
        if let Some(event) = event {
            let name = match event {
                Event::Header(_) => "header",
                Event::Device { .. } => "device",
                _ => "other",
            };
            seen.push((name, complete_before, dec.devices_complete()));
        }
        input = &input[n..];
    }
    assert_eq!(
        &seen[..4],
        &[
            ("header", false, false),
            ("device", false, false),
            ("device", false, true),
            ("other", true, true)
        ]
    );
    assert_eq!(dec.header().unwrap().device_count, 2);
}
