//! `info`, `state` and `inspect` of the built binary against devices served by
//! `vfio-mig serve` child processes, and the exit codes of bad addresses and refusals.

mod common;

use common::*;

use serde_json::Value;
use vfio_mig_device::MigrationDevice;

#[test]
fn info_shows_a_membuf_in_text_and_json() {
    let dir = tempfile::tempdir().unwrap();
    let m = Served::start(dir.path(), "m", "membuf:size=1M,features=p2p,seed=5");
    let addr = m.address();

    let text = ok(&["info", &addr]).stdout;
    for want in [
        &format!("device {addr}") as &str,
        "identity: membuf version 2",
        "features: stop-copy,p2p\n",
        "state: running",
        "data size: 1.0 MiB",
        "dma logging: supported",
        "vfio-user protocol",
        "extensions: vfio-mig v1",
        "region 0: 4.0 KiB (read, write)",
        "region 7: 256 B",
        "membuf registers (BAR0)",
        "size: 1.0 MiB (1048576 bytes)",
        "generation: 0",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }

    let info = ok(&["info", &addr, "--json"]).json();
    assert_eq!(info["address"], addr.as_str());
    assert_eq!(info["identity"]["kind"], "membuf");
    assert_eq!(info["features"], serde_json::json!(["stop-copy", "p2p"]));
    assert_eq!(info["state"], "running");
    assert_eq!(info["dma_logging"], true);
    assert_eq!(info["membuf"]["size"], 1 << 20);
    assert_eq!(info["membuf"]["dirty_rate"], 0);
    let regions = info["vfio_user"]["regions"].as_array().unwrap();
    assert_eq!(regions.len(), 2, "{regions:?}");
    assert_eq!(regions[0]["index"], 0);
    assert_eq!(regions[0]["size"], 4096);
    assert_eq!(info["vfio_user"]["max_data_xfer_size"], 1 << 20);

    // The values are the device's own.
    let dev = m.connect();
    assert_eq!(info["data_size"], dev.data_size().unwrap());
    assert_eq!(
        info["membuf"]["digest"],
        format!("{:#018x}", digest(&dev)).as_str()
    );
}

#[test]
fn info_tells_devices_apart() {
    let dir = tempfile::tempdir().unwrap();
    let quiet = Served::start(
        dir.path(),
        "q",
        "membuf:size=64K,features=stop-copy,dma-logging=off",
    );
    let info = ok(&["info", &quiet.address(), "--json"]).json();
    assert_eq!(info["dma_logging"], false);
    assert_eq!(info["features"], serde_json::json!(["stop-copy"]));
    let text = ok(&["info", &quiet.address()]).stdout;
    assert!(text.contains("dma logging: not supported"), "{text}");

    let reg = Served::start(dir.path(), "r", "register:seed=2");
    let info = ok(&["info", &reg.address(), "--json"]).json();
    assert_eq!(info["identity"]["kind"], "register");
    assert_eq!(
        info["membuf"],
        Value::Null,
        "not a membuf: BAR0 is not read"
    );
    let text = ok(&["info", &reg.address()]).stdout;
    assert!(!text.contains("membuf registers"), "{text}");
}

#[test]
fn state_shows_and_moves_printing_the_arcs() {
    let dir = tempfile::tempdir().unwrap();
    let m = Served::start(dir.path(), "m", "membuf:size=64K,features=p2p+pre-copy");
    let addr = m.address();
    assert_eq!(ok(&["state", &addr]).stdout, "running\n");

    assert_eq!(
        ok(&["state", &addr, "stop"]).stdout,
        "running -> running-p2p -> stop\n"
    );
    assert_eq!(ok(&["state", &addr]).stdout, "stop\n");

    // A state with a data stream is entered, the stream left unread.
    let run = ok(&["state", &addr, "stop-copy"]);
    let mut lines = run.stdout.lines();
    assert_eq!(lines.next(), Some("stop -> stop-copy"));
    let note = lines.next().unwrap();
    assert!(
        note.contains("open saving data stream") && note.contains("does not read it"),
        "{note}"
    );

    let moved = ok(&["state", &addr, "running", "--json"]).json();
    assert_eq!(moved["from"], "stop-copy");
    assert_eq!(moved["state"], "running");
    assert_eq!(
        moved["path"],
        serde_json::json!(["stop-copy", "stop", "running-p2p", "running"])
    );
    assert_eq!(moved["data_stream"], Value::Null);
    let shown = ok(&["state", &addr, "--json"]).json();
    assert_eq!(shown["state"], "running");

    // Without P2P the path is direct.
    let plain = Served::start(dir.path(), "p", "membuf:size=64K,features=stop-copy");
    assert_eq!(
        ok(&["state", &plain.address(), "stop"]).stdout,
        "running -> stop\n"
    );
}

#[test]
fn a_refused_transition_exits_1_and_says_where_the_device_is() {
    let dir = tempfile::tempdir().unwrap();
    let m = Served::start(dir.path(), "m", "membuf:size=64K,features=p2p");
    let addr = m.address();
    let run = vfio_mig(&["state", &addr, "pre-copy"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    let lines: Vec<&str> = run.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line without -v: {}", run.stderr);
    assert!(
        lines[0].starts_with("vfio-mig: transition to pre-copy refused; device is in running"),
        "{}",
        run.stderr
    );
    assert!(
        lines[0].contains("needs feature pre-copy"),
        "{}",
        run.stderr
    );
    assert!(run.stdout.is_empty());
    // -v adds the causes: the server's answer.
    let run = vfio_mig(&["-v", "state", &addr, "pre-copy"]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("caused by:"), "{}", run.stderr);
    assert!(run.stderr.contains("EINVAL"), "{}", run.stderr);
    assert_eq!(ok(&["state", &addr]).stdout, "running\n");
}

#[test]
fn bad_addresses_and_names_are_usage_errors() {
    for args in [
        &["info", "/tmp/x.sock"][..],
        &["info", "vfio-usr:/tmp/x.sock"],
        &["info", "vfio-user:"],
        &["info", "file:/tmp/x"],
        &["state", "vfio:0000:01:00"],
        &["state", "vfio:/dev/vfio/devices/vfiox"],
        &["state", "vfio:not-a-uuid"],
        &["state", "vfio-user:/tmp/x.sock", "runing"],
        &["inspect", "vfio-user:/tmp/x.sock"],
        &["inspect", "/tmp/x.mig"],
        &["load", "file:/tmp/x.mig", "tcp:h:1"],
        &[
            "receive",
            "--listen",
            "file:/tmp/x",
            "vfio-user:/tmp/x.sock",
        ],
        &["receive", "--listen", "tcp:127.0.0.1:0"],
        &["save", "vfio-user:/tmp/x.sock", "vfio-user:/tmp/y.sock"],
        &["save", "file:/tmp/x.mig", "vfio-user:/tmp/y.sock"],
        &["migrate", "vfio-user:/tmp/x.sock"],
        &["migrate", "vfio-user:/tmp/x.sock", "file:/tmp/x"],
        &["migrate", "--pair", "vfio-user:/a.sock"],
    ] {
        let run = vfio_mig(args);
        assert_eq!(run.code, 2, "{args:?}: {}", run.stderr);
        assert!(!run.stderr.is_empty());
    }
    let run = vfio_mig(&["info", "nfs:/x"]);
    assert!(
        run.stderr.contains("unknown scheme 'nfs:'"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("vfio-user:PATH"), "{}", run.stderr);
}

#[test]
fn kernel_devices_and_absent_servers_fail_with_exit_1() {
    for addr in [
        "vfio:/dev/vfio/devices/vfio0",
        "vfio:0000:01:00.0",
        "vfio:c4a6a6b4-2a39-4b64-8d6c-0f4a7e1c9b21",
    ] {
        let run = vfio_mig(&["info", addr]);
        assert_eq!(run.code, 1, "{addr}");
        assert!(
            run.stderr
                .contains("the kernel VFIO backend is not available in this build yet"),
            "{}",
            run.stderr
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let absent = format!("vfio-user:{}", dir.path().join("none.sock").display());
    let run = vfio_mig(&["state", &absent]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("cannot connect to"), "{}", run.stderr);
}

#[test]
fn inspect_of_missing_and_foreign_files_fails() {
    let dir = tempfile::tempdir().unwrap();
    let missing = format!("file:{}", dir.path().join("none.mig").display());
    let run = vfio_mig(&["inspect", &missing]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("cannot open"), "{}", run.stderr);

    let foreign = dir.path().join("foreign.mig");
    std::fs::write(&foreign, b"not a migration stream at all").unwrap();
    let addr = format!("file:{}", foreign.display());
    let run = vfio_mig(&["inspect", &addr]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("is corrupt"), "{}", run.stderr);
    assert!(run.stderr.contains("offset 0"), "{}", run.stderr);
    let run = vfio_mig(&["inspect", &addr, "--json"]);
    assert_eq!(run.code, 1);
    assert_eq!(run.json()["integrity"]["status"], "corrupt");
}
