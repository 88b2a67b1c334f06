//! End-to-end tests of `vfio-mig fsm`: run the built binary, parse what it prints, and compare
//! it with `vfio-mig-fsm` and with tables transcribed by hand from the uAPI digest
//! (../shared/spec/vfio-migration-uapi.md §2.1 and §2.2).

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Command, Output};

use serde_json::Value;
use vfio_mig_fsm::{direct_arcs, next_step, session_effect, SessionEffect, StreamDirection};
use vfio_mig_uapi::{DeviceState, MigrationFeatures};

fn vfio_mig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(args)
        .output()
        .expect("run vfio-mig")
}

/// Runs and expects exit 0 with nothing on stderr; returns stdout.
fn ok(args: &[&str]) -> String {
    let out = vfio_mig(args);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{args:?}: stderr {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.stderr.is_empty(), "{args:?}");
    String::from_utf8(out.stdout).unwrap()
}

/// Runs and expects exit `code` and no stdout; returns stderr.
fn fails(code: i32, args: &[&str]) -> String {
    let out = vfio_mig(args);
    assert_eq!(out.status.code(), Some(code), "{args:?}");
    assert!(out.stdout.is_empty(), "{args:?} printed to stdout");
    String::from_utf8(out.stderr).unwrap()
}

/// The four valid feature sets, as spelled on the command line.
const FEATURE_SETS: [(&str, MigrationFeatures); 4] = [
    ("stop-copy", MigrationFeatures::STOP_COPY),
    ("p2p", MigrationFeatures::P2P),
    ("pre-copy", MigrationFeatures::PRE_COPY),
    ("p2p,pre-copy", MigrationFeatures::ALL),
];

fn state(name: &str) -> DeviceState {
    name.parse().unwrap()
}

/// The digest's abbreviations.
fn abbrev(a: &str) -> &'static str {
    match a {
        "STOP" => "stop",
        "RUN" => "running",
        "SC" => "stop-copy",
        "RES" => "resuming",
        "RP2P" => "running-p2p",
        "PC" => "pre-copy",
        "PCP2P" => "pre-copy-p2p",
        other => panic!("unknown abbreviation {other}"),
    }
}

// §2.2, copied cell for cell with the digest's row and column order. `=`: no-op (maps to
// itself); `-` or `ERR`: refused. Pairs not in a grid are refused (unsupported or ERROR).
const SPEC_0X1: &str = "
    RUN  STOP SC   RES
RUN  =    STOP STOP STOP
STOP RUN  =    SC   RES
SC   STOP STOP =    STOP
RES  STOP STOP STOP =
";
const SPEC_0X3: &str = "
     RUN  RP2P STOP SC   RES
RUN  =    RP2P RP2P RP2P RP2P
RP2P RUN  =    STOP STOP STOP
STOP RP2P RP2P =    SC   RES
SC   STOP STOP STOP =    STOP
RES  STOP STOP STOP STOP =
";
const SPEC_0X5: &str = "
     RUN  STOP SC   RES  PC
RUN  =    STOP STOP STOP PC
STOP RUN  =    SC   RES  RUN
SC   STOP STOP =    STOP -
RES  STOP STOP STOP =    STOP
PC   RUN  RUN  SC   RUN  =
";
/// Table T, the full feature set.
const SPEC_0X7: &str = "
      STOP RUN  SC    RES  RP2P PC  PCP2P
STOP  STOP RP2P SC    RES  RP2P RP2P RP2P
RUN   RP2P RUN  RP2P  RP2P RP2P PC  RP2P
PC    RUN  RUN  PCP2P RUN  RUN  PC  PCP2P
PCP2P RP2P RP2P SC    RP2P RP2P PC  PCP2P
SC    STOP STOP SC    STOP STOP ERR ERR
RES   STOP STOP STOP  RES  STOP STOP STOP
RP2P  STOP RUN  STOP  STOP RP2P RUN PCP2P
";

/// (from, to) -> next state name, or None where refused; all 64 pairs.
type Expected = BTreeMap<(&'static str, &'static str), Option<&'static str>>;

fn spec_grid(text: &'static str) -> Expected {
    let mut expected: Expected = BTreeMap::new();
    for from in DeviceState::ALL {
        for to in DeviceState::ALL {
            expected.insert((from.name(), to.name()), None);
        }
    }
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let columns: Vec<&str> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(abbrev)
        .collect();
    for line in lines {
        let mut cells = line.split_whitespace();
        let from = abbrev(cells.next().unwrap());
        let cells: Vec<&str> = cells.collect();
        assert_eq!(cells.len(), columns.len(), "{line}");
        for (&to, cell) in columns.iter().zip(cells) {
            let next = match cell {
                "=" => Some(to),
                "-" | "ERR" => None,
                a => Some(abbrev(a)),
            };
            expected.insert((from, to), next);
        }
    }
    expected
}

fn table_json(features_arg: Option<&str>) -> Value {
    let mut args = vec!["fsm", "table", "--json"];
    if let Some(f) = features_arg {
        args.extend(["--features", f]);
    }
    serde_json::from_str(&ok(&args)).expect("table --json is JSON")
}

/// The JSON table as (from, to) -> next, checking its shape on the way.
fn json_cells(table: &Value) -> BTreeMap<(String, String), Option<String>> {
    let rows = table.as_object().expect("one object");
    assert_eq!(rows.len(), 8);
    let mut cells = BTreeMap::new();
    for from in DeviceState::ALL {
        let row = rows[from.name()].as_object().expect("row object");
        assert_eq!(row.len(), 8, "row {from}");
        for to in DeviceState::ALL {
            let next = match &row[to.name()] {
                Value::Null => None,
                Value::String(s) => Some(s.clone()),
                other => panic!("{from} -> {to}: {other}"),
            };
            cells.insert((from.name().to_owned(), to.name().to_owned()), next);
        }
    }
    cells
}

#[test]
fn table_json_agrees_with_next_step_for_every_cell_of_every_feature_set() {
    for (arg, features) in FEATURE_SETS {
        let cells = json_cells(&table_json(Some(arg)));
        for from in DeviceState::ALL {
            for to in DeviceState::ALL {
                let lib = next_step(from, to, features)
                    .ok()
                    .map(|s| s.name().to_owned());
                let cli = &cells[&(from.name().to_owned(), to.name().to_owned())];
                assert_eq!(cli, &lib, "--features {arg}: {from} -> {to}");
            }
        }
        // Supported states map to themselves; ERROR and unsupported rows are all null.
        for s in DeviceState::ALL {
            let row: Vec<_> = DeviceState::ALL
                .iter()
                .map(|to| cells[&(s.name().to_owned(), to.name().to_owned())].clone())
                .collect();
            if s.is_supported_by(features) {
                assert_eq!(row[s.index()].as_deref(), Some(s.name()), "{arg}: {s}");
            } else {
                assert!(row.iter().all(Option::is_none), "{arg}: row {s} {row:?}");
            }
        }
    }
}

#[test]
fn table_json_agrees_with_the_spec_tables() {
    for ((arg, _), spec) in FEATURE_SETS
        .iter()
        .zip([SPEC_0X1, SPEC_0X3, SPEC_0X5, SPEC_0X7])
    {
        let cells = json_cells(&table_json(Some(arg)));
        let expected = spec_grid(spec);
        assert_eq!(expected.len(), 64);
        for ((from, to), next) in expected {
            let got = &cells[&(from.to_owned(), to.to_owned())];
            assert_eq!(got.as_deref(), next, "--features {arg}: {from} -> {to}");
        }
    }
}

#[test]
fn default_features_are_all_features() {
    assert_eq!(table_json(None), table_json(Some("p2p,pre-copy")));
    assert_eq!(table_json(None), table_json(Some("stop-copy,pre-copy,p2p")));
    assert_eq!(
        ok(&["fsm", "dot"]),
        ok(&["fsm", "dot", "--features", "p2p,pre-copy"])
    );
}

#[test]
fn table_text_is_the_same_grid() {
    for (arg, features) in FEATURE_SETS {
        let text = ok(&["fsm", "table", "--features", arg]);
        let mut lines = text.lines();
        let header = lines.next().unwrap();
        assert!(header.contains(&features.to_string()), "{header}");
        let columns: Vec<&str> = lines.next().unwrap().split_whitespace().skip(3).collect();
        let names: Vec<&str> = DeviceState::ALL.iter().map(|s| s.name()).collect();
        assert_eq!(columns, names);
        let mut rows = 0;
        for line in lines {
            let cells: Vec<&str> = line.split_whitespace().collect();
            assert_eq!(cells.len(), 9, "{line}");
            let from = state(cells[0]);
            for (to, cell) in DeviceState::ALL.into_iter().zip(&cells[1..]) {
                let lib = next_step(from, to, features).map_or("-", |s| s.name());
                assert_eq!(*cell, lib, "--features {arg}: {from} -> {to}");
            }
            rows += 1;
        }
        assert_eq!(rows, 8);
    }
}

#[test]
fn next_prints_the_next_state() {
    assert_eq!(
        ok(&["fsm", "next", "running", "stop-copy"]),
        "running-p2p\n"
    );
    assert_eq!(
        ok(&[
            "fsm",
            "next",
            "running",
            "stop-copy",
            "--features",
            "stop-copy"
        ]),
        "stop\n"
    );
    assert_eq!(
        ok(&[
            "fsm",
            "next",
            "pre-copy",
            "stop-copy",
            "--features",
            "pre-copy"
        ]),
        "stop-copy\n"
    );
    assert_eq!(ok(&["fsm", "next", "stop", "stop"]), "stop\n");
    // The kernel's spelling is accepted too.
    assert_eq!(ok(&["fsm", "next", "STOP_COPY", "RESUMING"]), "stop\n");
}

/// A refusal is one line `vfio-mig: <reason>` on stderr, exit 1, with or without -v.
fn refused(args: &[&str], reason: &str) {
    for verbose in [false, true] {
        let mut argv = args.to_vec();
        if verbose {
            argv.push("-v");
        }
        let err = fails(1, &argv);
        assert_eq!(err.lines().count(), 1, "{argv:?}: {err}");
        assert!(err.starts_with("vfio-mig: "), "{err}");
        assert!(err.contains(reason), "{argv:?}: {err}");
    }
}

#[test]
fn refused_transitions_exit_1_with_the_reason() {
    refused(
        &["fsm", "next", "stop-copy", "pre-copy"],
        "cannot return to pre-copy",
    );
    refused(
        &["fsm", "path", "stop-copy", "pre-copy-p2p", "--json"],
        "cannot return to pre-copy",
    );
    refused(
        &["fsm", "next", "stop", "error"],
        "error is never a valid target",
    );
    refused(&["fsm", "next", "error", "stop"], "error state");
    refused(
        &[
            "fsm",
            "next",
            "running",
            "running-p2p",
            "--features",
            "pre-copy",
        ],
        "needs feature p2p",
    );
    refused(
        &["fsm", "path", "pre-copy", "stop", "--features", "p2p"],
        "needs feature pre-copy",
    );
}

#[test]
fn bad_usage_exits_2_and_names_the_valid_values() {
    let err = fails(2, &["fsm", "next", "stop", "bogus"]);
    for s in DeviceState::ALL {
        assert!(err.contains(s.name()), "{err}");
    }
    assert!(err.contains("bogus"), "{err}");
    let err = fails(2, &["fsm", "path", "nowhere", "stop"]);
    assert!(err.contains("pre-copy-p2p"), "{err}");

    let err = fails(2, &["fsm", "table", "--features", "p2p,bogus"]);
    assert!(err.contains("bogus"), "{err}");
    assert!(err.contains("stop-copy, p2p, pre-copy"), "{err}");
    fails(2, &["fsm", "dot", "--features", "precopy"]);

    fails(2, &["fsm", "next", "stop"]);
    fails(2, &["fsm", "path"]);
    fails(2, &["fsm"]);
    fails(2, &[]);
    fails(2, &["fsm", "table", "--no-such-flag"]);
}

#[test]
fn path_text_names_each_arc_and_its_session_effect() {
    let text = ok(&["fsm", "path", "resuming", "pre-copy"]);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(
        lines[0],
        "resuming -> stop -> running-p2p -> running -> pre-copy"
    );
    assert_eq!(lines.len(), 5, "{text}");
    let expect = [
        ("resuming -> stop", "ends the resuming stream"),
        ("stop -> running-p2p", "no data stream"),
        ("running-p2p -> running", "no data stream"),
        ("running -> pre-copy", "opens a new saving stream"),
    ];
    for (line, (arc, effect)) in lines[1..].iter().zip(expect) {
        assert!(line.trim_start().starts_with(arc), "{line}");
        assert!(line.contains(effect), "{line}");
    }

    let text = ok(&[
        "fsm",
        "path",
        "pre-copy",
        "stop-copy",
        "--features",
        "p2p,pre-copy",
    ]);
    assert!(
        text.starts_with("pre-copy -> pre-copy-p2p -> stop-copy\n"),
        "{text}"
    );
    assert_eq!(
        text.matches("keeps the open saving stream").count(),
        2,
        "{text}"
    );

    // §2.2: PRE_COPY -> STOP goes through RUNNING and so closes the saving stream.
    let text = ok(&["fsm", "path", "pre-copy", "stop", "--features", "pre-copy"]);
    assert!(text.starts_with("pre-copy -> running -> stop\n"), "{text}");
    assert!(text.contains("ends the saving stream"), "{text}");

    let text = ok(&["fsm", "path", "stop", "stop"]);
    assert_eq!(text.lines().next(), Some("stop"));
}

fn path_json(from: &str, to: &str, features: &str) -> Value {
    let args = ["fsm", "path", from, to, "--features", features, "--json"];
    serde_json::from_str(&ok(&args)).unwrap()
}

#[test]
fn path_json_examples() {
    let p = path_json("resuming", "pre-copy", "p2p,pre-copy");
    assert_eq!(p["from"], "resuming");
    assert_eq!(p["to"], "pre-copy");
    assert_eq!(
        p["features"],
        serde_json::json!(["stop-copy", "p2p", "pre-copy"])
    );
    assert_eq!(
        p["states"],
        serde_json::json!(["resuming", "stop", "running-p2p", "running", "pre-copy"])
    );
    let sessions: Vec<&str> = p["arcs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["session"].as_str().unwrap())
        .collect();
    assert_eq!(sessions, ["ends-resuming", "none", "none", "opens-saving"]);

    let p = path_json("running-p2p", "resuming", "p2p");
    assert_eq!(
        p["states"],
        serde_json::json!(["running-p2p", "stop", "resuming"])
    );
    assert_eq!(p["arcs"][1]["session"], "opens-resuming");
    assert_eq!(p["features"], serde_json::json!(["stop-copy", "p2p"]));

    let p = path_json("stop-copy", "stop", "stop-copy");
    assert_eq!(p["arcs"][0]["session"], "ends-saving");

    let p = path_json("running", "running", "stop-copy");
    assert_eq!(p["states"], serde_json::json!(["running"]));
    assert_eq!(p["arcs"], serde_json::json!([]));
}

fn session_key(effect: SessionEffect) -> &'static str {
    match effect {
        SessionEffect::Opens(StreamDirection::Saving) => "opens-saving",
        SessionEffect::Opens(StreamDirection::Resuming) => "opens-resuming",
        SessionEffect::Keeps => "keeps",
        SessionEffect::Ends(StreamDirection::Saving) => "ends-saving",
        SessionEffect::Ends(StreamDirection::Resuming) => "ends-resuming",
        SessionEffect::None => "none",
    }
}

#[test]
fn path_json_agrees_with_the_library_for_every_supported_pair() {
    for (arg, features) in FEATURE_SETS {
        for from in vfio_mig_fsm::supported_states(features) {
            for to in vfio_mig_fsm::supported_states(features) {
                let Ok(lib) = vfio_mig_fsm::path(from, to, features) else {
                    fails(
                        1,
                        &["fsm", "path", from.name(), to.name(), "--features", arg],
                    );
                    continue;
                };
                let p = path_json(from.name(), to.name(), arg);
                let states: Vec<&str> = lib.states().iter().map(|s| s.name()).collect();
                assert_eq!(
                    p["states"],
                    serde_json::json!(states),
                    "{arg}: {from}->{to}"
                );
                let arcs: Vec<Value> = lib
                    .arcs()
                    .map(|(a, b)| {
                        serde_json::json!({
                            "from": a.name(),
                            "to": b.name(),
                            "session": session_key(session_effect(a, b)),
                        })
                    })
                    .collect();
                assert_eq!(p["arcs"], Value::Array(arcs), "{arg}: {from}->{to}");
            }
        }
    }
}

/// §2.1, transcribed: the direct arcs a driver implements, per feature set.
fn spec_direct_arcs(p2p: bool, pre_copy: bool) -> BTreeSet<(&'static str, &'static str)> {
    let mut arcs = vec![
        ("STOP", "SC"),
        ("SC", "STOP"),
        ("STOP", "RES"),
        ("RES", "STOP"),
    ];
    if p2p {
        arcs.extend([
            ("RUN", "RP2P"),
            ("RP2P", "RUN"),
            ("RP2P", "STOP"),
            ("STOP", "RP2P"),
        ]);
    } else {
        arcs.extend([("RUN", "STOP"), ("STOP", "RUN")]);
    }
    match (pre_copy, p2p) {
        (true, false) => arcs.extend([("RUN", "PC"), ("PC", "RUN"), ("PC", "SC")]),
        (true, true) => arcs.extend([
            ("RUN", "PC"),
            ("PC", "RUN"),
            ("PC", "PCP2P"),
            ("PCP2P", "PC"),
            ("PCP2P", "RP2P"),
            ("PCP2P", "SC"),
            ("RP2P", "PCP2P"),
        ]),
        (false, _) => {}
    }
    arcs.into_iter()
        .map(|(a, b)| (abbrev(a), abbrev(b)))
        .collect()
}

/// The parsed digraph: node name -> attributes, (from, to) -> attributes.
struct Dot {
    nodes: BTreeMap<String, String>,
    edges: BTreeMap<(String, String), String>,
}

fn parse_dot(text: &str) -> Dot {
    assert!(text.starts_with("digraph "), "{text}");
    assert!(text.trim_end().ends_with('}'), "{text}");
    let quoted = |s: &str| -> (String, String) {
        let s = s.strip_prefix('"').unwrap();
        let end = s.find('"').unwrap();
        (s[..end].to_owned(), s[end + 1..].trim().to_owned())
    };
    let mut nodes = BTreeMap::new();
    let mut edges = BTreeMap::new();
    for line in text.lines().map(str::trim).filter(|l| l.starts_with('"')) {
        let line = line.strip_suffix(';').expect("statements end with ;");
        let (first, rest) = quoted(line);
        if let Some(rest) = rest.strip_prefix("->") {
            let (second, attrs) = quoted(rest.trim_start());
            assert!(
                edges.insert((first, second), attrs).is_none(),
                "duplicate edge"
            );
        } else {
            assert!(nodes.insert(first, rest).is_none(), "duplicate node");
        }
    }
    Dot { nodes, edges }
}

#[test]
fn dot_has_the_direct_arcs_of_each_feature_set() {
    for (arg, features) in FEATURE_SETS {
        let dot = parse_dot(&ok(&["fsm", "dot", "--features", arg]));
        let nodes: BTreeSet<&str> = dot.nodes.keys().map(String::as_str).collect();
        let supported: BTreeSet<&str> = vfio_mig_fsm::supported_states(features)
            .map(DeviceState::name)
            .collect();
        assert_eq!(nodes, supported, "--features {arg}");

        let edges: BTreeSet<(&str, &str)> = dot
            .edges
            .keys()
            .map(|(a, b)| (a.as_str(), b.as_str()))
            .collect();
        assert_eq!(
            edges,
            spec_direct_arcs(features.p2p(), features.pre_copy()),
            "--features {arg}"
        );
        let lib: BTreeSet<(&str, &str)> = direct_arcs(features)
            .map(|(a, b)| (a.name(), b.name()))
            .collect();
        assert_eq!(edges, lib, "--features {arg}");

        for ((from, to), attrs) in &dot.edges {
            let effect = session_effect(state(from), state(to));
            let marked = |mark: &str| attrs.contains(mark);
            match effect {
                SessionEffect::Opens(dir) => {
                    assert!(marked("style=bold"), "{from}->{to} {attrs}");
                    let label = match dir {
                        StreamDirection::Saving => "label=\"opens saving\"",
                        StreamDirection::Resuming => "label=\"opens resuming\"",
                    };
                    assert!(marked(label), "{from}->{to} {attrs}");
                }
                SessionEffect::Ends(dir) => {
                    assert!(marked("style=dashed"), "{from}->{to} {attrs}");
                    let label = match dir {
                        StreamDirection::Saving => "label=\"ends saving\"",
                        StreamDirection::Resuming => "label=\"ends resuming\"",
                    };
                    assert!(marked(label), "{from}->{to} {attrs}");
                }
                SessionEffect::Keeps => assert!(marked("keeps"), "{from}->{to} {attrs}"),
                SessionEffect::None => assert_eq!(attrs, "", "{from}->{to}"),
            }
        }
        for (name, attrs) in &dot.nodes {
            let saving = state(name).is_saving();
            assert_eq!(attrs.contains("peripheries=2"), saving, "{name}: {attrs}");
        }
    }
}

#[test]
fn dot_marks_the_four_session_opening_arcs() {
    let dot = parse_dot(&ok(&["fsm", "dot"]));
    let attrs = |a: &str, b: &str| dot.edges[&(a.to_owned(), b.to_owned())].clone();
    for (a, b, label) in [
        ("stop", "stop-copy", "opens saving"),
        ("stop", "resuming", "opens resuming"),
        ("running", "pre-copy", "opens saving"),
        ("running-p2p", "pre-copy-p2p", "opens saving"),
    ] {
        let e = attrs(a, b);
        assert!(e.contains("bold") && e.contains(label), "{a}->{b}: {e}");
    }
    assert!(attrs("pre-copy-p2p", "stop-copy").contains("keeps"));
    assert!(attrs("resuming", "stop").contains("dashed"));
    assert!(!dot
        .edges
        .contains_key(&("stop-copy".into(), "pre-copy".into())));
    assert!(!dot.edges.contains_key(&("running".into(), "stop".into())));
    let text = ok(&["fsm", "dot"]);
    let header: Vec<&str> = text.lines().take(3).collect();
    assert!(
        header.iter().any(|l| l.contains("stop-copy,p2p,pre-copy")),
        "{header:?}"
    );
}
