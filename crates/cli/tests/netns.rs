//! A live migration between two network namespaces joined by a veth pair: each namespace is
//! a host with its own `vfio-mig serve` (a membuf behind a vfio-user socket); the destination
//! host runs `vfio-mig receive --listen tcp:...`, the source host `vfio-mig migrate ...
//! tcp:...`, and the stream crosses the veth link. Success is checked from outside with
//! `vfio-mig info --json` on both hosts: the source stopped, the destination running, equal
//! digests (which differed before), and the veth carried at least the whole state.
//!
//! Needs root and `ip` (iproute2), as CI has; otherwise the test says why and returns. The
//! namespaces, the veth pair (destroyed with them) and every child process are removed even
//! when an assertion fails.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_vfio-mig");
const STATE_SIZE: u64 = 16 << 20;
const PORT: u16 = 47_213;
const STEP_TIMEOUT: Duration = Duration::from_secs(60);

/// Why this test cannot run here, if it cannot.
fn unsupported() -> Option<String> {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    // "Uid:\treal\teffective\tsaved\tfs"
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .map(str::to_owned);
    if euid.as_deref() != Some("0") {
        return Some(format!(
            "not root (effective uid {})",
            euid.unwrap_or_else(|| "unknown".into())
        ));
    }
    match Command::new("ip").arg("-V").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!("`ip -V` failed: {}", out.status)),
        Err(e) => Some(format!("no `ip` command (iproute2): {e}")),
    }
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Two namespaces `vmig-PID-a` and `vmig-PID-b` with a veth pair between them; deleted on
/// drop (which also destroys the veth pair).
struct Hosts {
    a: String,
    b: String,
    veth_a: String,
    addr_b: String,
}

impl Hosts {
    fn create() -> Hosts {
        let pid = std::process::id();
        let subnet = pid % 250 + 1;
        let hosts = Hosts {
            a: format!("vmig-{pid}-a"),
            b: format!("vmig-{pid}-b"),
            // Interface names are at most 15 bytes.
            veth_a: format!("vmig{pid}a"),
            addr_b: format!("10.213.{subnet}.2"),
        };
        let veth_b = format!("vmig{pid}b");
        // From here on, a panic still deletes whatever was created.
        ip(&["netns", "add", &hosts.a]);
        ip(&["netns", "add", &hosts.b]);
        ip(&[
            "link",
            "add",
            &hosts.veth_a,
            "type",
            "veth",
            "peer",
            "name",
            &veth_b,
        ]);
        ip(&["link", "set", &hosts.veth_a, "netns", &hosts.a]);
        ip(&["link", "set", &veth_b, "netns", &hosts.b]);
        let addr_a = format!("10.213.{subnet}.1/24");
        let addr_b = format!("{}/24", hosts.addr_b);
        for (ns, dev, addr) in [
            (&hosts.a, &hosts.veth_a, &addr_a),
            (&hosts.b, &veth_b, &addr_b),
        ] {
            ip(&["-n", ns, "addr", "add", addr, "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        hosts
    }

    /// `vfio-mig ARGS` in namespace `ns`, output to `log` (stdout) and `log.err` (stderr).
    fn spawn(&self, ns: &str, log: &Path, args: &[&str]) -> Proc {
        let stdout = File::create(log).expect("create log");
        let stderr = File::create(log.with_extension("err")).expect("create log");
        let child = Command::new("ip")
            .args(["netns", "exec", ns, BIN])
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .expect("spawn ip netns exec");
        Proc {
            child,
            log: log.to_owned(),
            what: format!("[{ns}] vfio-mig {}", args.join(" ")),
        }
    }

    /// Runs `vfio-mig ARGS` in `ns` to its end; returns its stdout after checking exit 0.
    fn run(&self, ns: &str, log: &Path, args: &[&str]) -> String {
        let mut proc = self.spawn(ns, log, args);
        proc.expect_success(STEP_TIMEOUT)
    }

    /// `ip -s` counters of the source's veth end: bytes sent.
    fn veth_a_tx_bytes(&self) -> u64 {
        let out = Command::new("ip")
            .args(["-n", &self.a, "-s", "-j", "link", "show", &self.veth_a])
            .output()
            .expect("run ip");
        let links: Value = serde_json::from_slice(&out.stdout).expect("ip -j prints JSON");
        links[0]["stats64"]["tx"]["bytes"]
            .as_u64()
            .unwrap_or_else(|| panic!("no tx bytes in {links}"))
    }

    /// Waits until something listens on TCP `port` in namespace `ns`.
    fn wait_listening(&self, ns: &str, port: u16, server: &mut Proc) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        let needle = format!(":{port}");
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "ss", "-Hltn"])
                .output()
                .expect("run ss");
            let listening = String::from_utf8_lossy(&out.stdout);
            if listening.lines().any(|l| l.contains(&needle)) {
                return;
            }
            server.assert_running();
            assert!(
                Instant::now() < deadline,
                "nothing listens on {port} in {ns}"
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
        }
    }
}

/// A child process, killed on drop if still running.
struct Proc {
    child: Child,
    log: PathBuf,
    what: String,
}

impl Proc {
    fn logs(&self) -> String {
        let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        format!(
            "{}\nstdout:\n{}\nstderr:\n{}",
            self.what,
            read(&self.log),
            read(&self.log.with_extension("err"))
        )
    }

    fn wait_timeout(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "still running after {timeout:?}: {}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits for exit 0 and returns stdout.
    fn expect_success(&mut self, timeout: Duration) -> String {
        let status = self.wait_timeout(timeout);
        assert!(status.success(), "{status}: {}", self.logs());
        std::fs::read_to_string(&self.log).expect("read log")
    }

    fn assert_running(&mut self) {
        if let Some(status) = self.child.try_wait().expect("wait") {
            panic!("exited early with {status}: {}", self.logs());
        }
    }

    /// Waits until `path` exists (a server's socket), checking the process still runs.
    fn wait_for_file(&mut self, path: &Path) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while !path.exists() {
            self.assert_running();
            assert!(
                Instant::now() < deadline,
                "no {}: {}",
                path.display(),
                self.logs()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn info(hosts: &Hosts, ns: &str, dir: &Path, name: &str, address: &str) -> Value {
    let stdout = hosts.run(ns, &dir.join(name), &["info", "--json", address]);
    let line = stdout.lines().next().unwrap_or_default();
    serde_json::from_str(line).unwrap_or_else(|e| panic!("info --json: {e}: {stdout}"))
}

#[test]
fn migration_between_two_network_namespaces() {
    if let Some(why) = unsupported() {
        println!("skipped: {why}");
        return;
    }
    let dir = tempfile::tempdir().expect("temp dir");
    let hosts = Hosts::create();
    let (a, b) = (hosts.a.clone(), hosts.b.clone());
    let src_sock = dir.path().join("source.sock");
    let dst_sock = dir.path().join("destination.sock");
    let src_addr = format!("vfio-user:{}", src_sock.display());
    let dst_addr = format!("vfio-user:{}", dst_sock.display());

    let mut src_server = hosts.spawn(
        &a,
        &dir.path().join("serve-a"),
        &[
            "serve",
            "--socket",
            src_sock.to_str().unwrap(),
            "--device",
            &format!("membuf:size={STATE_SIZE},dirty-rate=8M,seed=1"),
        ],
    );
    // Still after it resumes, so that its digest can be compared at leisure.
    let mut dst_server = hosts.spawn(
        &b,
        &dir.path().join("serve-b"),
        &[
            "serve",
            "--socket",
            dst_sock.to_str().unwrap(),
            "--device",
            &format!("membuf:size={STATE_SIZE},dirty-rate=0,seed=2"),
        ],
    );
    src_server.wait_for_file(&src_sock);
    dst_server.wait_for_file(&dst_sock);

    let dst_before = info(&hosts, &b, dir.path(), "info-b-before", &dst_addr);
    let digest_before = dst_before["membuf"]["digest"].clone();
    assert!(!digest_before.is_null(), "no membuf digest: {dst_before}");
    let tx_before = hosts.veth_a_tx_bytes();

    let listen = format!("tcp:{}:{PORT}", hosts.addr_b);
    let mut receiver = hosts.spawn(
        &b,
        &dir.path().join("receive"),
        &["receive", "--listen", &listen, &dst_addr],
    );
    hosts.wait_listening(&b, PORT, &mut receiver);
    hosts.run(
        &a,
        &dir.path().join("migrate"),
        &["migrate", "--downtime-limit", "100", &src_addr, &listen],
    );
    receiver.expect_success(STEP_TIMEOUT);

    let src = info(&hosts, &a, dir.path(), "info-a", &src_addr);
    let dst = info(&hosts, &b, dir.path(), "info-b", &dst_addr);
    assert_eq!(src["state"], "stop", "{src}");
    assert_eq!(dst["state"], "running", "{dst}");
    let digest = &src["membuf"]["digest"];
    assert!(!digest.is_null(), "{src}");
    assert_eq!(&dst["membuf"]["digest"], digest, "digests differ");
    assert_ne!(
        &digest_before, digest,
        "the destination had the state before"
    );
    let sent = hosts.veth_a_tx_bytes() - tx_before;
    assert!(
        sent >= STATE_SIZE,
        "the veth carried {sent} bytes, less than the {STATE_SIZE}-byte state"
    );

    drop(src_server);
    drop(dst_server);
    drop(hosts);
}
