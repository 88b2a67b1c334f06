//! The migration data path allocates nothing: framing, decoding and head encoding of the
//! bulk-data messages are measured with a counting allocator.
//!
//! This file holds a single test so that no other test thread allocates while it counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};

use vfio_mig_vfio_user::codec::{
    message_len, Body, DmaData, HeadBuf, Header, Limits, Message, MigDataReadReply, MigDataWrite,
    RegionData, Reply, Request, HEADER_SIZE,
};

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged, so the
// GlobalAlloc contract is upheld by `System`; the counter has no effect on memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: same layout the caller gave us, which it guarantees to be valid.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was returned by `System.alloc` above with this `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Ordering::Relaxed);
        // SAFETY: `ptr`/`layout` come from this allocator; the caller upholds `new_size`.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Frames, decodes and re-encodes (head only) one message; returns the bulk length.
fn receive_and_resend(bytes: &[u8], limits: &Limits) -> usize {
    let len = message_len(bytes, limits).unwrap().unwrap();
    let header = Header::decode(bytes).unwrap();
    let body = Body::decode(&header, &bytes[HEADER_SIZE..len], limits).unwrap();
    let msg = Message {
        msg_id: header.msg_id,
        no_reply: false,
        body,
    };
    let mut head = HeadBuf::new();
    let bulk = msg.encode_head(&mut head).unwrap();
    assert_eq!(head.len() + bulk.len(), len);
    bulk.data.len()
}

#[test]
fn bulk_messages_are_framed_decoded_and_encoded_without_allocating() {
    let limits = Limits::default();
    let data = vec![0x5a_u8; 1 << 20];
    let messages = [
        Message::request(1, Request::MigDataWrite(MigDataWrite::new(&data))),
        Message::reply(2, Reply::MigDataRead(MigDataReadReply::new(&data))),
        Message::request(
            3,
            Request::RegionWrite(RegionData {
                offset: 0,
                region: 0,
                data: &data,
            }),
        ),
        Message::reply(
            4,
            Reply::RegionRead(RegionData {
                offset: 0,
                region: 0,
                data: &data,
            }),
        ),
        Message::request(
            5,
            Request::DmaWrite(DmaData {
                addr: 0,
                data: &data,
            }),
        ),
        Message::reply(
            6,
            Reply::DmaRead(DmaData {
                addr: 0,
                data: &data,
            }),
        ),
    ];
    let wire: Vec<Vec<u8>> = messages
        .iter()
        .map(|m| {
            let mut v = Vec::new();
            m.encode(&mut v).unwrap();
            v
        })
        .collect();

    let before = ALLOCATIONS.load(Ordering::Relaxed);
    let mut total = 0;
    for bytes in &wire {
        total += receive_and_resend(bytes, &limits);
    }
    let after = ALLOCATIONS.load(Ordering::Relaxed);

    assert_eq!(total, 6 << 20);
    assert_eq!(after - before, 0, "the data path allocated");
    // The counter is live: an allocation outside the data path is seen.
    let before = ALLOCATIONS.load(Ordering::Relaxed);
    std::hint::black_box(Vec::<u8>::with_capacity(16));
    assert_eq!(ALLOCATIONS.load(Ordering::Relaxed), before + 1);
}
