//! Encoder to decoder round trips, corruption and truncation, as properties.

mod common;

use common::*;
use proptest::prelude::*;
use vfio_mig_stream::{DecodeErrorKind, Decoder, Outcome, Phase};

/// A plan: 1 to 3 devices, each with a few pre-copy then stop-copy chunks of 1 to
/// `max_chunk` bytes, interleaved by `picks`, each device ended after its last chunk, and
/// the stream ended with END or (sometimes) cut short by ABORT.
fn plan() -> impl Strategy<Value = Plan> {
    (1usize..=3, 1u32..=48)
        .prop_flat_map(|(devices, max_chunk)| {
            let chunk = (
                any::<bool>(),
                prop::collection::vec(any::<u8>(), 1..=max_chunk as usize),
            );
            (
                Just(max_chunk),
                prop::collection::vec(prop::collection::vec(chunk, 0..5), devices),
                prop::collection::vec(any::<prop::sample::Index>(), 0..40),
                prop::option::weighted(0.2, (any::<prop::sample::Index>(), "[a-z é]{0,20}")),
            )
        })
        .prop_map(|(max_chunk, per_device, picks, abort)| {
            // Each device's own ops, in order: pre-copy chunks first, then stop-copy, then END.
            let mut queues: Vec<Vec<Op>> = per_device
                .iter()
                .enumerate()
                .map(|(d, chunks)| {
                    let mut chunks = chunks.clone();
                    chunks.sort_by_key(|(stop, _)| *stop);
                    let mut ops: Vec<Op> = chunks
                        .into_iter()
                        .map(|(stop, payload)| Op::Chunk {
                            device: d as u16,
                            phase: if stop {
                                Phase::StopCopy
                            } else {
                                Phase::PreCopy
                            },
                            payload,
                        })
                        .collect();
                    ops.push(Op::EndDevice(d as u16));
                    ops.reverse();
                    ops
                })
                .collect();
            let mut ops = Vec::new();
            let mut picks = picks.into_iter();
            while queues.iter().any(|q| !q.is_empty()) {
                let live: Vec<usize> = (0..queues.len())
                    .filter(|&i| !queues[i].is_empty())
                    .collect();
                let i = picks.next().map_or(0, |p| p.index(live.len()));
                ops.push(queues[live[i]].pop().unwrap());
            }
            match abort {
                Some((at, reason)) => {
                    ops.truncate(at.index(ops.len() + 1));
                    ops.push(Op::Abort(reason));
                }
                None => ops.push(Op::End),
            }
            Plan {
                config: config(max_chunk),
                devices: (0..per_device.len()).map(|i| device(i, "membuf")).collect(),
                ops,
            }
        })
}

fn expected_outcome(events: &[Owned]) -> Outcome {
    match events.last() {
        Some(Owned::End(t)) => Outcome::Complete(*t),
        Some(Owned::Abort(r)) => Outcome::Aborted(r.clone()),
        other => panic!("plan ends with {other:?}"),
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any cutting of the input gives the events the source wrote, and the same outcome.
    #[test]
    fn any_split_gives_the_same_events(
        plan in plan(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..30),
        reads in prop::collection::vec(1usize..64, 1..8),
    ) {
        let (bytes, expected) = encode(&plan);
        let outcome = expected_outcome(&expected);

        let (whole, end) = decode_cut(&bytes, &[]);
        prop_assert_eq!(&whole, &expected);
        prop_assert_eq!(end, Ok(outcome.clone()));

        let cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        let (pieces, end) = decode_cut(&bytes, &cuts);
        prop_assert_eq!(&pieces, &expected);
        prop_assert_eq!(end, Ok(outcome.clone()));

        let (demanded, end) = decode_demand(&bytes, &reads);
        prop_assert_eq!(&demanded, &expected);
        prop_assert_eq!(end, Ok(outcome));
    }

    /// Changing any single byte of a stream, to any other value, is detected.
    #[test]
    fn any_single_byte_change_is_detected(
        plan in plan(),
        at in any::<prop::sample::Index>(),
        xor in 1u8..=255,
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..4),
    ) {
        let (mut bytes, _) = encode(&plan);
        let at = at.index(bytes.len());
        bytes[at] ^= xor;
        let cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
        let (_, end) = decode_cut(&bytes, &cuts);
        prop_assert!(end.is_err(), "change of byte {} by {:#x} went unnoticed", at, xor);
    }

    /// Cutting a stream anywhere is detected by `finish`, at the cut, as truncation.
    #[test]
    fn any_truncation_is_detected(plan in plan(), at in any::<prop::sample::Index>()) {
        let (bytes, _) = encode(&plan);
        let len = at.index(bytes.len());
        let (_, end) = decode_cut(&bytes[..len], &[len / 2]);
        let err = end.unwrap_err();
        prop_assert!(err.is_truncation(), "{}", err);
        prop_assert_eq!(err.offset, len as u64);
    }

    /// Arbitrary bytes, alone or after a valid preamble, never panic the decoder, and
    /// whatever it says is stable.
    #[test]
    fn garbage_never_panics(
        garbage in prop::collection::vec(any::<u8>(), 0..512),
        keep in any::<prop::sample::Index>(),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let (valid, _) = encode(&simple_plan(2, 2, 8));
        for base in [&valid[..0], &valid[..keep.index(valid.len() + 1)]] {
            let mut bytes = base.to_vec();
            bytes.extend_from_slice(&garbage);
            let cuts: Vec<usize> = cuts.iter().map(|i| i.index(bytes.len() + 1)).collect();
            let (_, first) = decode_cut(&bytes, &cuts);
            let (_, second) = decode_cut(&bytes, &[]);
            prop_assert_eq!(first.is_ok(), second.is_ok());
            let _ = vfio_mig_stream::inspect(&bytes[..]).unwrap();
        }
    }
}

#[test]
fn every_single_byte_change_of_a_small_stream_is_detected() {
    // Exhaustive over positions and values, for a stream with every record type but
    // ABORT, and one ending in ABORT.
    let complete = simple_plan(2, 2, 5);
    let mut aborted = simple_plan(2, 1, 3);
    aborted.ops.truncate(1);
    aborted.ops.push(Op::Abort("source failed".into()));
    for plan in [complete, aborted] {
        let (bytes, _) = encode(&plan);
        for at in 0..bytes.len() {
            for xor in 1..=255u8 {
                let mut b = bytes.clone();
                b[at] ^= xor;
                assert!(decode_cut(&b, &[]).1.is_err(), "byte {at} ^ {xor:#x}");
            }
        }
    }
}

#[test]
fn every_truncation_of_a_small_stream_is_detected() {
    let (bytes, _) = encode(&simple_plan(2, 3, 7));
    for len in 0..bytes.len() {
        let mut dec = Decoder::new();
        let mut input = &bytes[..len];
        while !input.is_empty() {
            let (n, _) = dec.feed(input).unwrap();
            input = &input[n..];
        }
        let err = dec.finish().unwrap_err();
        assert!(
            matches!(err.kind, DecodeErrorKind::Truncated { .. }),
            "prefix {len}: {err}"
        );
        assert_eq!(err.offset, len as u64);
        assert!(err
            .to_string()
            .starts_with(&format!("truncated at offset {len}: expected ")));
    }
    assert!(decode_cut(&bytes, &[]).1.is_ok());
}
