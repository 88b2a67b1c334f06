//! End-to-end tests of `vfio-mig demo`: run the built binary with small devices and check
//! what it prints and how it exits. (That the verification can fail is tested beside
//! `demo::verify`, with observations a working migration cannot produce.)

use std::process::{Command, Output};

use serde_json::Value;

fn vfio_mig(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(args)
        .output()
        .expect("run vfio-mig")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8(bytes.to_vec()).expect("UTF-8 output")
}

/// Runs `demo` with `args`, expects exit 0, returns (stdout, stderr).
fn demo_ok(args: &[&str]) -> (String, String) {
    let mut all = vec!["demo"];
    all.extend_from_slice(args);
    let out = vfio_mig(&all);
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(0),
        "{all:?}\nstdout:\n{stdout}\nstderr:\n{stderr}"
    );
    (stdout, stderr)
}

/// Parses every stdout line as one JSON object.
fn json_lines(stdout: &str) -> Vec<Value> {
    stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: not JSON: {l}")))
        .collect()
}

fn summary_of(lines: &[Value]) -> &Value {
    let last = lines.last().expect("some output");
    assert_eq!(last["event"], "summary", "the last line is the summary");
    assert_eq!(
        lines.iter().filter(|l| l["event"] == "summary").count(),
        1,
        "one summary"
    );
    last
}

#[test]
fn demo_verifies_a_live_migration_with_precopy() {
    let (stdout, stderr) = demo_ok(&["--size", "8M", "--dirty-rate", "16M"]);
    let last = stdout.lines().last().unwrap_or_default();
    assert!(last.starts_with("verified"), "{stdout}");
    for label in [
        "precopy",
        "stop-copy",
        "stream",
        "downtime",
        "total time",
        "source digest",
        "destination digest",
    ] {
        assert!(
            stdout.lines().any(|l| l.trim_start().starts_with(label)),
            "no {label} row in\n{stdout}"
        );
    }
    // The digests shown are equal.
    let digest = |label: &str| {
        stdout
            .lines()
            .find(|l| l.trim_start().starts_with(label))
            .and_then(|l| l.split_whitespace().find(|w| w.starts_with("0x")))
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("no {label} in\n{stdout}"))
    };
    assert_eq!(digest("source digest"), digest("destination digest"));
    // Progress lines on stderr, and no terminal control codes when piped.
    assert!(stderr.contains("precopy round 1"), "{stderr}");
    assert!(stderr.contains("switchover"), "{stderr}");
    assert!(
        !stderr.contains('\r') && !stderr.contains('\x1b'),
        "{stderr:?}"
    );
}

#[test]
fn demo_json_is_events_then_a_summary() {
    let (stdout, stderr) = demo_ok(&["--size", "4M", "--dirty-rate", "8M", "--json"]);
    assert!(stderr.is_empty(), "--json keeps stderr quiet: {stderr}");
    let lines = json_lines(&stdout);
    let summary = summary_of(&lines);
    let events: Vec<&str> = lines.iter().filter_map(|l| l["event"].as_str()).collect();
    for expected in [
        "stage",
        "device",
        "transition",
        "precopy-round",
        "switchover",
    ] {
        assert!(
            events.contains(&expected),
            "no {expected} event: {events:?}"
        );
    }

    assert_eq!(summary["verified"], true, "{summary}");
    assert_eq!(summary["problems"], Value::Array(vec![]));
    assert_eq!(summary["size"], 4 << 20);
    assert_eq!(summary["dirty_rate"], 8 << 20);
    assert_eq!(summary["downtime_limit_ms"], 50);
    let (src, dst) = (&summary["source"], &summary["destination"]);
    assert_eq!(src["state"], "stop");
    assert_eq!(dst["state"], "running");
    assert!(src["address"].as_str().unwrap().starts_with("vfio-user:"));
    assert!(dst["address"].as_str().unwrap().starts_with("vfio-user:"));
    let digest = src["digest"].as_str().unwrap();
    assert_eq!(digest.len(), 18, "0x and 16 hex digits: {digest}");
    assert_eq!(dst["digest"], src["digest"]);
    assert_ne!(dst["digest_before"], src["digest"]);

    let migration = &summary["migration"]["source"];
    assert!(migration["precopy_rounds"].as_u64().unwrap() >= 1);
    assert_eq!(migration["source_state"], "stop");
    assert_eq!(migration["downtime"]["clock"], "shared-clock");
    assert!(migration["downtime"]["ms"].as_f64().unwrap() > 0.0);
    // The whole state crossed at least once.
    let pre_copy = migration["devices"][0]["pre_copy"]["bytes"]
        .as_u64()
        .unwrap();
    assert!(pre_copy >= 4 << 20, "{migration}");
    assert!(migration["throughput_bps"].as_f64().unwrap() > 0.0);
    // Both servers offer the shared data buffer: no byte of state went in a message.
    for side in ["source", "destination"] {
        let path = &summary["data_path"][side];
        assert!(
            path["shared_bytes"].as_u64().unwrap() >= 4 << 20,
            "{side}: {path}"
        );
        assert_eq!(path["message_bytes"], 0, "{side}: {path}");
    }
}

#[test]
fn demo_verifies_every_feature_set() {
    for (features, precopy) in [
        ("stop-copy", false),
        ("p2p", false),
        ("pre-copy", true),
        ("p2p,pre-copy", true),
    ] {
        let (stdout, _) = demo_ok(&[
            "--size",
            "1M",
            "--dirty-rate",
            "4M",
            "--features",
            features,
            "--json",
        ]);
        let lines = json_lines(&stdout);
        let summary = summary_of(&lines);
        assert_eq!(summary["verified"], true, "{features}: {summary}");
        let migration = &summary["migration"]["source"];
        let reason = migration["switchover"].as_str().unwrap();
        if precopy {
            assert_ne!(reason, "no-precopy", "{features}");
        } else {
            assert_eq!(reason, "no-precopy", "{features}");
            assert_eq!(migration["precopy_rounds"], 0, "{features}");
        }
        let p2p_seen = lines.iter().any(|l| {
            l["event"] == "transition" && (l["to"] == "running-p2p" || l["to"] == "pre-copy-p2p")
        });
        assert_eq!(p2p_seen, features.contains("p2p"), "{features}");
    }
}

#[test]
fn demo_with_a_still_source_verifies_too() {
    let (stdout, _) = demo_ok(&["--size", "1M", "--dirty-rate", "0"]);
    assert!(stdout.contains("\nverified"), "{stdout}");
    assert!(
        stdout.contains("through shared memory, 0 B in messages"),
        "{stdout}"
    );
}

#[test]
fn demo_over_messages_verifies_too() {
    let (stdout, _) = demo_ok(&["--size", "1M", "--data-path", "messages"]);
    assert!(stdout.contains("\nverified"), "{stdout}");
    assert!(
        stdout.contains("data path           0 B through shared memory"),
        "{stdout}"
    );
}

#[test]
fn bad_parameters_are_usage_errors() {
    for args in [
        &["demo", "--size", "1000"][..],
        &["demo", "--size", "lots"],
        &["demo", "--dirty-rate", "fast"],
        &["demo", "--features", "teleport"],
        &["demo", "--downtime-limit", "-3"],
    ] {
        let out = vfio_mig(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
        assert!(!out.stderr.is_empty(), "{args:?}");
    }
    let out = vfio_mig(&["demo", "--size", "1000"]);
    assert!(text(&out.stderr).contains("4 KiB"), "{}", text(&out.stderr));
}
