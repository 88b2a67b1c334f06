//! `migrate`, `receive`, `save`, `load` and `inspect` of the built binary between devices
//! served by `vfio-mig serve` child processes: every feature set, several devices, TCP
//! between two processes, files, corruption, refusals and rollback.

mod common;

use common::*;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use vfio_mig_device::DeviceState;

fn hex(digest: u64) -> String {
    format!("{digest:#018x}")
}

/// Every byte between the servers and the command went through shared memory.
#[track_caller]
fn assert_all_shared(totals: &Value, what: &str) {
    assert!(
        totals["shared_bytes"].as_u64().unwrap() > 0,
        "{what}: {totals}"
    );
    assert_eq!(totals["message_bytes"], 0, "{what}: {totals}");
}

#[test]
fn vfio_mig_servers_exchange_the_state_through_shared_memory_unless_told_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let src = Served::start(dir.path(), "s", "membuf:size=4M,dirty-rate=8M,seed=3");
    let dst = Served::start(dir.path(), "d", "membuf:size=4M,seed=4");
    let summary = ok(&["migrate", &src.address(), &dst.address(), "--json"]).summary();
    assert_eq!(summary["digests"][0]["verdict"], "verified");
    let path = &summary["data_path"];
    assert_all_shared(&path["source"], "source");
    assert_all_shared(&path["destination"], "destination");
    // Every byte the source read, the destination wrote: nothing else crossed.
    assert_eq!(
        path["source"]["shared_bytes"],
        path["destination"]["shared_bytes"]
    );
    let streamed: u64 = summary["source"]["devices"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            d["pre_copy"]["bytes"].as_u64().unwrap() + d["stop_copy"]["bytes"].as_u64().unwrap()
        })
        .sum();
    assert_eq!(path["source"]["shared_bytes"].as_u64().unwrap(), streamed);

    // Back and forth: the destination, now running, migrates home by messages.
    ok(&["state", &src.address(), "running"]);
    let run = ok(&[
        "migrate",
        &dst.address(),
        &src.address(),
        "--data-path",
        "messages",
    ]);
    // (The old source dirties its state again once it runs: its digest moves on.)
    assert!(
        run.stdout.contains("migrated 1 device(s)"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("data path (source): 0 B through shared memory, 4.0 MiB in messages"),
        "{}",
        run.stdout
    );
    assert!(
        run.stdout
            .contains("data path (destination): 0 B through shared memory"),
        "{}",
        run.stdout
    );
    let bad = vfio_mig(&[
        "migrate",
        &src.address(),
        &dst.address(),
        "--data-path",
        "pipes",
    ]);
    assert_eq!(bad.code, 2, "{}", bad.stderr);
}

#[test]
fn migrates_and_verifies_under_every_feature_set() {
    let dir = tempfile::tempdir().unwrap();
    for (i, features) in ["stop-copy", "p2p", "pre-copy", "p2p+pre-copy"]
        .into_iter()
        .enumerate()
    {
        let src = Served::start(
            dir.path(),
            &format!("src{i}"),
            &format!(
                "membuf:size=2M,dirty-rate=4M,features={features},seed={}",
                10 + i
            ),
        );
        let dst = Served::start(
            dir.path(),
            &format!("dst{i}"),
            &format!("membuf:size=2M,features={features},seed=99"),
        );
        let run = ok(&["migrate", &src.address(), &dst.address(), "--json"]);
        let lines = run.lines();
        let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
        assert_eq!(events[0], "stage", "{features}: {events:?}");
        assert!(events.contains(&"switchover"), "{features}: {events:?}");
        let precopy = features.contains("pre-copy");
        assert_eq!(
            events.contains(&"precopy-round"),
            precopy,
            "{features}: {events:?}"
        );
        let summary = run.summary();
        assert_eq!(summary["source"]["source_state"], "stop");
        let reason = summary["source"]["switchover"].as_str().unwrap();
        if precopy {
            assert_ne!(reason, "no-precopy", "{features}");
            assert!(summary["source"]["precopy_rounds"].as_u64().unwrap() >= 1);
        } else {
            assert_eq!(reason, "no-precopy", "{features}");
        }
        assert_eq!(summary["source"]["downtime"]["clock"], "shared-clock");
        let digests = summary["digests"].as_array().unwrap();
        assert_eq!(digests.len(), 1, "{summary}");
        assert_eq!(digests[0]["verdict"], "verified", "{features}: {summary}");

        let (src_state, src_digest) = src.look();
        let (dst_state, dst_digest) = dst.look();
        assert_eq!(src_state, DeviceState::Stop);
        assert_eq!(dst_state, DeviceState::Running);
        assert_eq!(src_digest, dst_digest, "{features}");
        assert_eq!(digests[0]["source_digest"]["digest"], hex(src_digest));
    }
}

#[test]
fn text_summary_says_verified_with_bytes_downtime_and_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let src = Served::start(dir.path(), "s", "membuf:size=1M,dirty-rate=2M,seed=3");
    let dst = Served::start(dir.path(), "d", "membuf:size=1M,seed=4");
    let run = ok(&["migrate", &src.address(), &dst.address()]);
    let text = &run.stdout;
    for want in [
        "migrated 1 device(s) in ",
        &format!("device 0: {} -> {} (membuf", src.address(), dst.address()) as &str,
        "precopy: ",
        "switchover: ",
        "throughput: ",
        " MB/s",
        "downtime: ",
        "(one clock:",
        "time: ",
        "source devices left in stop",
        ": verified",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    // No progress bar when stderr is not a terminal.
    assert!(run.stderr.is_empty(), "{}", run.stderr);
}

#[test]
fn several_pairs_migrate_together() {
    let dir = tempfile::tempdir().unwrap();
    let a = Served::start(dir.path(), "a", "membuf:size=1M,dirty-rate=2M,seed=1");
    let b = Served::start(dir.path(), "b", "membuf:size=1M,seed=2");
    let c = Served::start(dir.path(), "c", "membuf:size=512K,features=p2p,seed=3");
    let d = Served::start(dir.path(), "d", "membuf:size=512K,features=p2p,seed=4");
    let run = ok(&[
        "migrate",
        "--pair",
        &format!("{}={}", a.address(), b.address()),
        "--pair",
        &format!("{}={}", c.address(), d.address()),
        "--json",
    ]);
    let summary = run.summary();
    let devices = summary["source"]["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 2);
    let digests = summary["digests"].as_array().unwrap();
    assert_eq!(digests.len(), 2);
    for dg in digests {
        assert_eq!(dg["verdict"], "verified", "{dg}");
    }
    assert_eq!(a.look().1, b.look().1);
    assert_eq!(c.look().1, d.look().1);
    assert_eq!(b.look().0, DeviceState::Running);
    assert_eq!(d.look().0, DeviceState::Running);
}

#[test]
fn several_devices_without_p2p_need_the_users_consent() {
    let dir = tempfile::tempdir().unwrap();
    let a = Served::start(dir.path(), "a", "membuf:size=256K,features=pre-copy,seed=1");
    let b = Served::start(dir.path(), "b", "membuf:size=256K,features=pre-copy,seed=2");
    let c = Served::start(dir.path(), "c", "register:seed=3");
    let d = Served::start(dir.path(), "d", "register:seed=4");
    let pairs = [
        "--pair".to_owned(),
        format!("{}={}", a.address(), b.address()),
        "--pair".to_owned(),
        format!("{}={}", c.address(), d.address()),
    ];
    let mut args: Vec<&str> = vec!["migrate"];
    args.extend(pairs.iter().map(String::as_str));
    let run = vfio_mig(&args);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(run.stderr.contains("without P2P support"), "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    let (state, _) = a.look();
    assert_eq!(state, DeviceState::Running, "untouched");

    args.push("--allow-non-p2p");
    let run = ok(&args);
    assert!(
        run.stdout.contains("migrated 2 device(s)"),
        "{}",
        run.stdout
    );
    // Only the membuf pair has digests to compare.
    assert_eq!(
        run.stdout.matches(": verified").count(),
        1,
        "{}",
        run.stdout
    );
}

#[test]
fn an_incompatible_destination_is_refused_and_the_source_runs_on() {
    let dir = tempfile::tempdir().unwrap();
    let src = Served::start(dir.path(), "s", "membuf:size=1M,seed=1");
    let dst = Served::start(dir.path(), "d", "membuf:size=2M,seed=2");
    let (_, src_before) = src.look();
    let (_, dst_before) = dst.look();
    let run = vfio_mig(&["migrate", &src.address(), &dst.address(), "--json"]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq!(run.stderr.lines().count(), 1, "{}", run.stderr);
    assert!(run.stderr.contains("refused"), "{}", run.stderr);
    let last = run.lines().pop().unwrap();
    assert_eq!(last["event"], "error", "{last}");
    assert_eq!(
        last["message"].as_str().unwrap(),
        run.stderr.trim().trim_start_matches("vfio-mig: ")
    );
    assert_eq!(src.look(), (DeviceState::Running, src_before));
    assert_eq!(dst.look(), (DeviceState::Running, dst_before));
    // -v shows the causes.
    let run = vfio_mig(&["-v", "migrate", &src.address(), &dst.address()]);
    assert_eq!(run.code, 1);
    assert!(run.stderr.contains("caused by:"), "{}", run.stderr);
}

#[test]
fn no_precopy_and_abort_on_no_convergence() {
    let dir = tempfile::tempdir().unwrap();
    let src = Served::start(dir.path(), "s", "membuf:size=1M,dirty-rate=8M,seed=1");
    let dst = Served::start(dir.path(), "d", "membuf:size=1M,seed=2");

    // A downtime limit of 0 can never be met while the device has state left to move.
    let run = vfio_mig(&[
        "migrate",
        &src.address(),
        &dst.address(),
        "--downtime-limit",
        "0",
        "--max-rounds",
        "2",
        "--on-no-convergence",
        "abort",
    ]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("did not converge in 2 round(s)"),
        "{}",
        run.stderr
    );
    assert_eq!(src.look().0, DeviceState::Running, "rolled back");
    assert_eq!(dst.look().0, DeviceState::Running, "reset");

    let run = ok(&[
        "migrate",
        &src.address(),
        &dst.address(),
        "--no-precopy",
        "--json",
    ]);
    let summary = run.summary();
    assert_eq!(summary["source"]["switchover"], "no-precopy");
    assert_eq!(summary["source"]["precopy_rounds"], 0);
    assert_eq!(summary["digests"][0]["verdict"], "verified");
}

#[test]
fn save_inspect_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let src = Served::start(dir.path(), "s", "membuf:size=1M,dirty-rate=2M,seed=7");
    let reg = Served::start(dir.path(), "r", "register:seed=5");
    let dst = Served::start(dir.path(), "d", "membuf:size=1M,seed=8");
    let reg_dst = Served::start(dir.path(), "rd", "register:seed=6");
    let file = format!("file:{}", dir.path().join("saved.mig").display());

    let saved = ok(&[
        "save",
        &src.address(),
        &reg.address(),
        &file,
        "--allow-non-p2p",
        "--json",
    ])
    .summary();
    assert_eq!(saved["file"], file.as_str());
    assert_eq!(saved["source_state"], "stop");
    assert_all_shared(&saved["data_path"], "save");
    let saved_digest = saved["source_digests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        src.look(),
        (
            DeviceState::Stop,
            u64::from_str_radix(&saved_digest[2..], 16).unwrap()
        )
    );

    let text = ok(&["inspect", &file]).stdout;
    assert!(text.contains("2 device(s)"), "{text}");
    assert!(
        text.contains(&format!("device 0: {}", src.address())),
        "{text}"
    );
    assert!(text.contains("kind membuf"), "{text}");
    assert!(text.contains("integrity: ok"), "{text}");
    let inspection: Value =
        serde_json::from_str(&ok(&["inspect", &file, "--json"]).stdout).unwrap();
    assert_eq!(inspection["integrity"]["status"], "ok");
    assert_eq!(inspection["devices"].as_array().unwrap().len(), 2);

    let loaded = ok(&[
        "load",
        &file,
        &dst.address(),
        &reg_dst.address(),
        "--allow-non-p2p",
        "--json",
    ])
    .summary();
    assert_eq!(
        loaded["destination_digests"][0]["digest"],
        saved_digest.as_str()
    );
    assert_all_shared(&loaded["data_path"], "load");
    assert_eq!(
        dst.look(),
        (
            DeviceState::Running,
            u64::from_str_radix(&saved_digest[2..], 16).unwrap()
        )
    );

    // Restarting the saved device is the user's choice.
    ok(&["state", &src.address(), "running"]);
    assert_eq!(src.look().0, DeviceState::Running);

    // Text output of save and load.
    let file2 = format!("file:{}", dir.path().join("one.mig").display());
    let text = ok(&["save", &src.address(), &file2]).stdout;
    assert!(text.contains("saved 1 device(s) to file:"), "{text}");
    assert!(text.contains("as saved: 0x"), "{text}");
    let text = ok(&["load", &file2, &dst.address()]).stdout;
    assert!(text.contains("loaded 1 device(s) from file:"), "{text}");
    assert!(text.contains("after load: 0x"), "{text}");
}

#[test]
fn corrupt_and_truncated_files_fail_with_the_offset_and_load_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let src = Served::start(dir.path(), "s", "membuf:size=512K,seed=7");
    let dst = Served::start(dir.path(), "d", "membuf:size=512K,seed=8");
    let path = dir.path().join("good.mig");
    let file = format!("file:{}", path.display());
    ok(&["save", &src.address(), &file]);
    let (_, dst_before) = dst.look();

    let mut bytes = Vec::new();
    std::fs::File::open(&path)
        .unwrap()
        .read_to_end(&mut bytes)
        .unwrap();
    let mut corrupt = bytes.clone();
    let at = corrupt.len() / 2;
    corrupt[at] ^= 0x40;
    let corrupt_path = dir.path().join("corrupt.mig");
    std::fs::write(&corrupt_path, &corrupt).unwrap();
    let truncated_path = dir.path().join("truncated.mig");
    std::fs::write(&truncated_path, &bytes[..bytes.len() - 100]).unwrap();

    for (path, status) in [(&corrupt_path, "corrupt"), (&truncated_path, "truncated")] {
        let addr = format!("file:{}", path.display());
        let run = vfio_mig(&["inspect", &addr]);
        assert_eq!(run.code, 1, "{status}");
        assert!(
            run.stderr.contains("at offset "),
            "{status}: {}",
            run.stderr
        );
        assert!(run.stdout.contains("integrity: "), "{}", run.stdout);
        assert!(!run.stdout.contains("integrity: ok"), "{}", run.stdout);
        let run = vfio_mig(&["inspect", &addr, "--json"]);
        assert_eq!(run.code, 1);
        let v: Value = serde_json::from_str(&run.stdout).unwrap();
        assert_eq!(v["integrity"]["status"], status);
        assert!(v["integrity"]["offset"].as_u64().unwrap() > 0);

        let run = vfio_mig(&["load", &addr, &dst.address()]);
        assert_eq!(run.code, 1, "{status}: {}", run.stderr);
        assert!(
            run.stderr.contains("at offset "),
            "{status}: {}",
            run.stderr
        );
        assert!(
            run.stderr.contains("nothing half-loaded runs"),
            "{}",
            run.stderr
        );
        // Reset: the destination runs its own power-on state again, nothing of the file.
        assert_eq!(dst.look(), (DeviceState::Running, dst_before), "{status}");
    }
}

/// A `vfio-mig receive` child process, killed on drop unless it exited.
struct Receiver {
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn receive_in_one_process_and_migrate_over_tcp_from_another() {
    let dir = tempfile::tempdir().unwrap();
    let a = Served::start(dir.path(), "a", "membuf:size=2M,dirty-rate=4M,seed=1");
    let b = Served::start(dir.path(), "b", "membuf:size=2M,seed=2");
    let c = Served::start(dir.path(), "c", "membuf:size=1M,seed=3");
    let d = Served::start(dir.path(), "d", "membuf:size=1M,seed=4");

    let mut child = Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(["receive", "--listen", "tcp:127.0.0.1:0", "--json"])
        .args([b.address(), d.address()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut receiver = Receiver { child, stdout };
    let mut first = String::new();
    receiver.stdout.read_line(&mut first).unwrap();
    let listening: Value = serde_json::from_str(&first).unwrap();
    assert_eq!(listening["event"], "listening");
    let address = listening["address"].as_str().unwrap().to_owned();
    assert!(address.starts_with("tcp:127.0.0.1:"), "{address}");
    assert_ne!(address, "tcp:127.0.0.1:0", "the actual port is printed");

    let run = ok(&["migrate", &a.address(), &c.address(), &address, "--json"]);
    let sent = run.summary();
    assert_eq!(sent["downtime"]["clock"], "ack-receipt");
    assert_eq!(sent["source_state"], "stop");
    assert_all_shared(&sent["data_path"], "migrate to tcp");

    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = receiver.child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "receive did not exit");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut rest = String::new();
    receiver.stdout.read_to_string(&mut rest).unwrap();
    assert!(status.success(), "receive failed: {rest}");
    let received: Value = serde_json::from_str(rest.lines().last().unwrap()).unwrap();
    assert_eq!(received["event"], "summary");
    assert_eq!(received["devices"].as_array().unwrap().len(), 2);
    assert_all_shared(&received["data_path"], "receive");

    // The digests the two processes printed agree, and are the devices' own.
    for i in 0..2 {
        let s = &sent["source_digests"][i]["digest"];
        let r = &received["destination_digests"][i]["digest"];
        assert_eq!(s, r, "device {i}");
        assert_eq!(received["destination_digests"][i]["generation_after"], 0);
    }
    assert_eq!(a.look().1, b.look().1);
    assert_eq!(c.look().1, d.look().1);
    assert_eq!(b.look().0, DeviceState::Running);
    assert_eq!(a.look().0, DeviceState::Stop);
}

#[test]
fn receive_prints_a_text_first_line_and_migrate_to_nobody_fails() {
    let dir = tempfile::tempdir().unwrap();
    let b = Served::start(dir.path(), "b", "membuf:size=64K,seed=2");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(["receive", "--listen", "tcp:127.0.0.1:0"])
        .arg(b.address())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let mut receiver = Receiver { child, stdout };
    let mut first = String::new();
    receiver.stdout.read_line(&mut first).unwrap();
    assert!(first.starts_with("listening on tcp:127.0.0.1:"), "{first}");
    let port: u16 = first.trim().rsplit(':').next().unwrap().parse().unwrap();
    assert_ne!(port, 0);
    drop(receiver);

    // Nobody listens there any more.
    let a = Served::start(dir.path(), "a", "membuf:size=64K,seed=1");
    let run = vfio_mig(&["migrate", &a.address(), &format!("tcp:127.0.0.1:{port}")]);
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("cannot connect to tcp:127.0.0.1:"),
        "{}",
        run.stderr
    );
    assert_eq!(a.look().0, DeviceState::Running);
}

#[test]
fn an_interrupted_migration_rolls_back_the_source() {
    let dir = tempfile::tempdir().unwrap();
    let src = Served::start(dir.path(), "s", "membuf:size=1M,dirty-rate=8M,seed=1");
    let dst = Served::start(dir.path(), "d", "membuf:size=1M,seed=2");

    // Never converges (a downtime limit of 0 with a dirtying source): only Ctrl-C ends it.
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(["migrate", &src.address(), &dst.address(), "--json"])
        .args(["--downtime-limit", "0", "--max-rounds", "1000000"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stdout.read_line(&mut line).unwrap() > 0,
            "migrate ended early"
        );
        if line.contains("\"precopy-round\"") {
            break;
        }
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    assert_eq!(
        src.look().0,
        DeviceState::Running,
        "source rolled back: {stderr}"
    );
    assert_eq!(
        dst.look().0,
        DeviceState::Running,
        "destination reset: {stderr}"
    );
}

#[test]
fn an_interrupted_receive_leaves_its_device_running() {
    let dir = tempfile::tempdir().unwrap();
    let b = Served::start(dir.path(), "b", "membuf:size=64K,seed=2");
    let before = b.look();
    let mut child = Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(["receive", "--listen", "tcp:127.0.0.1:0"])
        .arg(b.address())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut first = String::new();
    stdout.read_line(&mut first).unwrap();
    let port: u16 = first.trim().rsplit(':').next().unwrap().parse().unwrap();
    // A source that connects and then says nothing: receive waits for its stream.
    let _silent = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("cancelled"), "{stderr}");
    assert_eq!(b.look(), before, "the destination runs untouched");
}
