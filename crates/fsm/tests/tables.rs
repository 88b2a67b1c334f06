//! The kernel's next-step tables for all four feature sets, written out as data and
//! compared cell by cell with `next_step`. The grids are transcribed from the uAPI digest
//! (../shared/spec/vfio-migration-uapi.md §2.2), not generated from the code under test.

use vfio_mig_fsm::{direct_arcs, next_step, Refusal};
use vfio_mig_uapi::{DeviceState, MigrationFeatures};

/// Column and row order of the grids below.
const ORDER: [&str; 7] = [
    "stop",
    "running",
    "stop-copy",
    "resuming",
    "running-p2p",
    "pre-copy",
    "pre-copy-p2p",
];

fn parse(abbrev: &str) -> Option<DeviceState> {
    let name = match abbrev {
        "STOP" => "stop",
        "RUN" => "running",
        "SC" => "stop-copy",
        "RES" => "resuming",
        "RP2P" => "running-p2p",
        "PC" => "pre-copy",
        "PCP2P" => "pre-copy-p2p",
        "-" => return None,
        other => panic!("bad cell {other}"),
    };
    Some(name.parse().unwrap())
}

/// `grid[row][col]`: next hop from ORDER[row] toward ORDER[col]; `-` means EINVAL.
fn check(features: MigrationFeatures, grid: [[&str; 7]; 7]) {
    for (r, row) in grid.iter().enumerate() {
        let from: DeviceState = ORDER[r].parse().unwrap();
        for (c, cell) in row.iter().enumerate() {
            let to: DeviceState = ORDER[c].parse().unwrap();
            let got = next_step(from, to, features).ok();
            assert_eq!(got, parse(cell), "features {features}: {from} -> {to}");
        }
    }
    // ERROR is refused as a source and as a target everywhere.
    for s in DeviceState::ALL {
        assert!(next_step(DeviceState::Error, s, features).is_err());
        assert!(next_step(s, DeviceState::Error, features).is_err());
    }
}

#[rustfmt::skip]
#[test]
fn stop_copy_only() {
    check(MigrationFeatures::STOP_COPY, [
        //  STOP    RUN    SC     RES    RP2P  PC   PCP2P
        ["STOP", "RUN", "SC",  "RES", "-", "-", "-"], // STOP
        ["STOP", "RUN", "STOP","STOP","-", "-", "-"], // RUN
        ["STOP", "STOP","SC",  "STOP","-", "-", "-"], // SC
        ["STOP", "STOP","STOP","RES", "-", "-", "-"], // RES
        ["-",    "-",   "-",   "-",   "-", "-", "-"], // RP2P
        ["-",    "-",   "-",   "-",   "-", "-", "-"], // PC
        ["-",    "-",   "-",   "-",   "-", "-", "-"], // PCP2P
    ]);
}

#[rustfmt::skip]
#[test]
fn with_p2p() {
    check(MigrationFeatures::P2P, [
        //  STOP    RUN     SC      RES     RP2P    PC   PCP2P
        ["STOP", "RP2P", "SC",   "RES",  "RP2P", "-", "-"], // STOP
        ["RP2P", "RUN",  "RP2P", "RP2P", "RP2P", "-", "-"], // RUN
        ["STOP", "STOP", "SC",   "STOP", "STOP", "-", "-"], // SC
        ["STOP", "STOP", "STOP", "RES",  "STOP", "-", "-"], // RES
        ["STOP", "RUN",  "STOP", "STOP", "RP2P", "-", "-"], // RP2P
        ["-",    "-",    "-",    "-",    "-",    "-", "-"], // PC
        ["-",    "-",    "-",    "-",    "-",    "-", "-"], // PCP2P
    ]);
}

#[rustfmt::skip]
#[test]
fn with_pre_copy() {
    check(MigrationFeatures::PRE_COPY, [
        //  STOP    RUN    SC      RES    RP2P  PC     PCP2P
        ["STOP", "RUN", "SC",   "RES", "-",  "RUN", "-"], // STOP
        ["STOP", "RUN", "STOP", "STOP","-",  "PC",  "-"], // RUN
        ["STOP", "STOP","SC",   "STOP","-",  "-",   "-"], // SC
        ["STOP", "STOP","STOP", "RES", "-",  "STOP","-"], // RES
        ["-",    "-",   "-",    "-",   "-",  "-",   "-"], // RP2P
        ["RUN",  "RUN", "SC",   "RUN", "-",  "PC",  "-"], // PC
        ["-",    "-",   "-",    "-",   "-",  "-",   "-"], // PCP2P
    ]);
}

#[rustfmt::skip]
#[test]
fn with_all_features() {
    check(MigrationFeatures::ALL, [
        //  STOP    RUN     SC       RES     RP2P    PC     PCP2P
        ["STOP", "RP2P", "SC",    "RES",  "RP2P", "RP2P", "RP2P"],  // STOP
        ["RP2P", "RUN",  "RP2P",  "RP2P", "RP2P", "PC",   "RP2P"],  // RUN
        ["STOP", "STOP", "SC",    "STOP", "STOP", "-",    "-"],     // SC
        ["STOP", "STOP", "STOP",  "RES",  "STOP", "STOP", "STOP"],  // RES
        ["STOP", "RUN",  "STOP",  "STOP", "RP2P", "RUN",  "PCP2P"], // RP2P
        ["RUN",  "RUN",  "PCP2P", "RUN",  "RUN",  "PC",   "PCP2P"], // PC
        ["RP2P", "RP2P", "SC",    "RP2P", "RP2P", "PC",   "PCP2P"], // PCP2P
    ]);
}

fn arcs(list: &[(&str, &str)]) -> Vec<(DeviceState, DeviceState)> {
    let mut v: Vec<_> = list
        .iter()
        .map(|(a, b)| (parse(a).unwrap(), parse(b).unwrap()))
        .collect();
    v.sort();
    v
}

/// The direct arcs of spec §2.1, per feature set.
#[test]
fn direct_arcs_match_the_spec() {
    let always = [
        ("STOP", "SC"),
        ("SC", "STOP"),
        ("STOP", "RES"),
        ("RES", "STOP"),
    ];
    let no_p2p = [("RUN", "STOP"), ("STOP", "RUN")];
    let p2p = [
        ("RUN", "RP2P"),
        ("RP2P", "RUN"),
        ("RP2P", "STOP"),
        ("STOP", "RP2P"),
    ];
    let pre_copy_no_p2p = [("RUN", "PC"), ("PC", "RUN"), ("PC", "SC")];
    let pre_copy_p2p = [
        ("RUN", "PC"),
        ("PC", "RUN"),
        ("PC", "PCP2P"),
        ("PCP2P", "PC"),
        ("PCP2P", "RP2P"),
        ("PCP2P", "SC"),
        ("RP2P", "PCP2P"),
    ];
    let cases: [(MigrationFeatures, Vec<(&str, &str)>); 4] = [
        (
            MigrationFeatures::STOP_COPY,
            [&always[..], &no_p2p].concat(),
        ),
        (MigrationFeatures::P2P, [&always[..], &p2p].concat()),
        (
            MigrationFeatures::PRE_COPY,
            [&always[..], &no_p2p, &pre_copy_no_p2p].concat(),
        ),
        (
            MigrationFeatures::ALL,
            [&always[..], &p2p, &pre_copy_p2p].concat(),
        ),
    ];
    for (features, expected) in cases {
        let mut got: Vec<_> = direct_arcs(features).collect();
        got.sort();
        assert_eq!(got, arcs(&expected), "features {features}");
    }
}

#[test]
fn stop_copy_to_pre_copy_is_refused_and_terminates() {
    use DeviceState::*;
    for features in [MigrationFeatures::PRE_COPY, MigrationFeatures::ALL] {
        assert_eq!(
            next_step(StopCopy, PreCopy, features),
            Err(Refusal::Blocked {
                from: StopCopy,
                to: PreCopy
            })
        );
    }
    assert_eq!(
        next_step(StopCopy, PreCopyP2p, MigrationFeatures::ALL),
        Err(Refusal::Blocked {
            from: StopCopy,
            to: PreCopyP2p
        })
    );
}

#[test]
fn refusals_say_why() {
    use DeviceState::*;
    let e = next_step(Running, RunningP2p, MigrationFeatures::PRE_COPY).unwrap_err();
    assert!(matches!(
        e,
        Refusal::UnsupportedTarget {
            state: RunningP2p,
            needs: "p2p",
            ..
        }
    ));
    assert!(
        e.to_string().contains("running-p2p") && e.to_string().contains("p2p"),
        "{e}"
    );
    let e = next_step(PreCopy, Running, MigrationFeatures::P2P).unwrap_err();
    assert!(matches!(
        e,
        Refusal::UnsupportedSource {
            state: PreCopy,
            needs: "pre-copy",
            ..
        }
    ));
    assert_eq!(
        next_step(Error, Running, MigrationFeatures::ALL),
        Err(Refusal::ErrorSource)
    );
    assert_eq!(
        next_step(Running, Error, MigrationFeatures::ALL),
        Err(Refusal::ErrorTarget)
    );
}
