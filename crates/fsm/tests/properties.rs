//! Properties of `path`, checked exhaustively over every (from, to, feature set) and by
//! random walks: every path ends at its target, uses only direct arcs, never passes through
//! a saving state it entered from outside the saving group (a session is never opened only
//! to be thrown away; PRE_COPY -> PRE_COPY_P2P -> STOP_COPY stays in one session), is a
//! shortest such path, and only its last arc may open a session.

use std::collections::VecDeque;

use proptest::prelude::*;
use vfio_mig_fsm::{
    direct_arcs, is_direct_arc, next_step, path, session_effect, supported_states, Refusal,
    SessionEffect, MAX_PATH_ARCS,
};
use vfio_mig_uapi::{DeviceState, MigrationFeatures};

/// Breadth-first shortest path over direct arcs whose interior never enters the saving
/// group from outside it (a path that starts in the group may stay in it).
fn bfs_len(from: DeviceState, to: DeviceState, features: MigrationFeatures) -> Option<usize> {
    let arcs: Vec<_> = direct_arcs(features).collect();
    let mut dist = [usize::MAX; 8];
    // Whether the node was reached by a path that never left the saving group.
    let mut in_group = [false; 8];
    dist[from.index()] = 0;
    in_group[from.index()] = from.is_saving();
    let mut queue = VecDeque::from([from]);
    while let Some(cur) = queue.pop_front() {
        if cur == to {
            return Some(dist[cur.index()]);
        }
        if cur.is_saving() && !in_group[cur.index()] {
            continue; // entered from outside: may end a path, never be an interior step
        }
        for &(a, b) in &arcs {
            if a == cur && dist[b.index()] == usize::MAX {
                dist[b.index()] = dist[cur.index()] + 1;
                in_group[b.index()] = in_group[cur.index()] && b.is_saving();
                queue.push_back(b);
            }
        }
    }
    None
}

fn check_path(from: DeviceState, to: DeviceState, features: MigrationFeatures) {
    match path(from, to, features) {
        Ok(p) => {
            assert_eq!(p.from(), from);
            assert_eq!(p.to(), to);
            assert!(p.arc_count() <= MAX_PATH_ARCS);
            for (a, b) in p.arcs() {
                assert!(
                    is_direct_arc(a, b, features),
                    "{p}: {a}->{b} not direct ({features})"
                );
            }
            let states = p.states();
            for (i, interior) in states
                .iter()
                .enumerate()
                .skip(1)
                .take(states.len().saturating_sub(2))
            {
                let stayed_in_group = states[..i].iter().all(|s| s.is_saving());
                assert!(
                    !interior.is_saving() || stayed_in_group,
                    "{p} passes through {interior}"
                );
            }
            assert_eq!(
                Some(p.arc_count()),
                bfs_len(from, to, features),
                "{p} is not shortest"
            );
            let arcs: Vec<_> = p.arcs().collect();
            for &(a, b) in arcs.iter().rev().skip(1) {
                assert!(
                    !matches!(session_effect(a, b), SessionEffect::Opens(_)),
                    "{p}: interior arc {a}->{b} opens a session"
                );
            }
        }
        Err(refusal) => {
            let supported = |s: DeviceState| s.is_supported_by(features);
            if supported(from) && supported(to) {
                // The only refusal between supported states is the kernel's deliberate block
                // on going back from stop-copy to pre-copy (a chain through STOP would exist,
                // but it would silently discard the saving session).
                assert_eq!(refusal, Refusal::Blocked { from, to });
                assert_eq!(from, DeviceState::StopCopy);
                assert!(to.is_precopy());
            }
        }
    }
}

#[test]
fn every_path_of_every_feature_set() {
    for features in MigrationFeatures::VALID_SETS {
        for from in DeviceState::ALL {
            for to in DeviceState::ALL {
                check_path(from, to, features);
            }
        }
    }
}

#[test]
fn longest_path_is_resuming_to_pre_copy() {
    use DeviceState::*;
    let p = path(Resuming, PreCopy, MigrationFeatures::ALL).unwrap();
    assert_eq!(p.states(), [Resuming, Stop, RunningP2p, Running, PreCopy]);
    // PRE_COPY -> STOP passes through RUNNING, closing the saving stream.
    let p = path(PreCopy, Stop, MigrationFeatures::ALL).unwrap();
    assert_eq!(p.states(), [PreCopy, Running, RunningP2p, Stop]);
}

#[test]
fn no_op_paths_and_unknown_bits() {
    for features in MigrationFeatures::VALID_SETS {
        for s in supported_states(features) {
            assert_eq!(path(s, s, features).unwrap().arc_count(), 0);
        }
    }
    // Bits a future uAPI may define change nothing.
    let future = MigrationFeatures::from_bits(0x7 | 0x80).unwrap();
    for from in DeviceState::ALL {
        for to in DeviceState::ALL {
            assert_eq!(
                next_step(from, to, future).ok(),
                next_step(from, to, MigrationFeatures::ALL).ok()
            );
        }
    }
}

fn any_state() -> impl Strategy<Value = DeviceState> {
    (0u32..8).prop_map(|v| DeviceState::try_from(v).unwrap())
}

fn any_features() -> impl Strategy<Value = MigrationFeatures> {
    (0usize..4).prop_map(|i| MigrationFeatures::VALID_SETS[i])
}

proptest! {
    /// A device driven through random requests, one next_step at a time as the kernel
    /// does, always lands on the requested target or refuses without moving.
    #[test]
    fn random_walks_reach_their_targets(features in any_features(),
                                        targets in proptest::collection::vec(any_state(), 1..40)) {
        let mut cur = DeviceState::Running;
        for to in targets {
            let mut steps = 0;
            let start = cur;
            let outcome = loop {
                if cur == to && to != DeviceState::Error && to.is_supported_by(features) {
                    break Ok(());
                }
                match next_step(cur, to, features) {
                    Ok(next) => {
                        prop_assert!(is_direct_arc(cur, next, features) || next == cur);
                        cur = next;
                        steps += 1;
                        prop_assert!(steps <= MAX_PATH_ARCS);
                    }
                    Err(e) => break Err(e),
                }
            };
            if outcome.is_err() {
                prop_assert_eq!(cur, start, "a refusal must not move the device");
            }
        }
    }
}
