//! Fuzzes every vfio-user decoder entry point: framing, whole messages, each payload type,
//! and reply-to-request checking. Whatever decodes must re-encode to bytes that decode to
//! the same value. The vfio-mig extension's data layouts too.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_mig_vfio_user::codec::*;
use vfio_mig_vfio_user::extension::{decode_precopy_info, DataBufferRegistration, SharedTransfer};

/// The extension's fixed-layout data: whatever decodes re-encodes to the same bytes.
fn extension_data(bytes: &[u8]) {
    if let Ok(t) = SharedTransfer::decode(bytes) {
        assert_eq!(&t.encode()[..], bytes);
    }
    if let Ok(r) = DataBufferRegistration::decode(bytes) {
        assert_eq!(&r.encode()[..], bytes);
    }
    if let Ok(i) = decode_precopy_info(bytes) {
        assert_eq!(&vfio_mig_vfio_user::extension::encode_precopy_info(&i)[..], bytes);
    }
}

fn payloads(bytes: &[u8], limits: &Limits) {
    macro_rules! each {
        ($($t:ty),*) => {$(
            if let Ok(p) = <$t>::decode(bytes, limits) {
                let out = p.encode_to_vec().expect("a decoded payload encodes");
                assert_eq!(out.len(), p.encoded_len());
                let again = <$t>::decode(&out, limits).expect("re-encoded payload decodes");
                assert_eq!(again, p);
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
}

fn message<'a>(bytes: &'a [u8], limits: &Limits) -> Option<Message<'a>> {
    let len = message_len(bytes, limits).ok().flatten()?;
    let whole = bytes.get(..len)?;
    let msg = Message::decode(whole, limits).ok()?;
    let mut out = Vec::new();
    msg.encode(&mut out).expect("a decoded message encodes");
    let mut head = Vec::new();
    let bulk = msg.encode_head(&mut head).expect("head encodes");
    assert_eq!(head.len() + bulk.len(), out.len());
    assert_eq!(
        Message::decode(&out, limits).expect("re-encoded message decodes"),
        msg
    );
    Some(msg)
}

fuzz_target!(|data: &[u8]| {
    // The first byte picks the limits: the defaults, or a small negotiated transfer size.
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let limits = if sel & 1 == 0 {
        Limits::default()
    } else {
        Limits {
            max_data_xfer_size: 1024,
            max_ranges: 4,
            max_caps: 2,
            ..Limits::default()
        }
    };
    payloads(rest, &limits);
    extension_data(rest);
    // Two messages back to back: a request and what may be its reply.
    let first = message(rest, &limits);
    let second = message_len(rest, &limits)
        .ok()
        .flatten()
        .and_then(|n| rest.get(n..))
        .and_then(|tail| message(tail, &limits));
    if let (Some(q), Some(p)) = (first, second) {
        if let (Body::Request(q), Body::Reply(p)) = (&q.body, &p.body) {
            let _ = p.check_answers(q);
        }
    }
});
