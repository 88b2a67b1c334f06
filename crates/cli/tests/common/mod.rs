//! The harness shared by the end-to-end tests of the built binary: `vfio-mig serve` child
//! processes and runs of the binary.
// Each test file uses its own part of the harness.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

use serde_json::Value;
use vfio_mig_device::{DeviceState, MigrationDevice};
use vfio_mig_vfio_user::client::RemoteDevice;

/// A `vfio-mig serve` child process, killed on drop.
pub struct Served {
    pub child: Child,
    // Kept open: the server may write more lines.
    _stdout: BufReader<ChildStdout>,
    pub socket: PathBuf,
}

impl Served {
    pub fn start(dir: &Path, name: &str, spec: &str) -> Served {
        let socket = dir.join(format!("{name}.sock"));
        let mut child = Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
            .args(["serve", "--socket"])
            .arg(&socket)
            .args(["--device", spec])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawning vfio-mig serve");
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        assert!(line.starts_with("serving"), "serve said: {line:?}");
        Served {
            child,
            _stdout: stdout,
            socket,
        }
    }

    pub fn address(&self) -> String {
        format!("vfio-user:{}", self.socket.display())
    }

    /// The device, over a connection of the test's own (close it before the next command).
    pub fn connect(&self) -> RemoteDevice {
        RemoteDevice::connect(&self.socket).unwrap()
    }

    /// State and digest, over a connection of the test's own (closed on return).
    pub fn look(&self) -> (DeviceState, u64) {
        let d = RemoteDevice::connect(&self.socket).unwrap();
        let mut b = [0u8; 8];
        d.client().region_read(0, 0x10, &mut b).unwrap();
        (d.state().unwrap(), u64::from_le_bytes(b))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A finished run of the binary.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// Stdout as one JSON object.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim())
            .unwrap_or_else(|e| panic!("not one JSON object ({e}): {}", self.stdout))
    }

    /// Every stdout line as JSON.
    pub fn lines(&self) -> Vec<Value> {
        self.stdout
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
            .collect()
    }

    /// The last JSON line, which must be `{"event":"summary",...}`.
    pub fn summary(&self) -> Value {
        let last = self.lines().pop().expect("output");
        assert_eq!(last["event"], "summary", "{last}");
        last
    }
}

pub fn vfio_mig(args: &[&str]) -> Run {
    let out = Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    Run {
        code: out.status.code().expect("exited"),
        stdout: String::from_utf8(out.stdout).unwrap(),
        stderr: String::from_utf8(out.stderr).unwrap(),
    }
}

pub fn ok(args: &[&str]) -> Run {
    let run = vfio_mig(args);
    assert_eq!(
        run.code, 0,
        "{args:?} failed: {}\n{}",
        run.stderr, run.stdout
    );
    run
}

/// The digest register (BAR0 0x10) of a membuf.
pub fn digest(device: &RemoteDevice) -> u64 {
    let mut b = [0u8; 8];
    device.client().region_read(0, 0x10, &mut b).unwrap();
    u64::from_le_bytes(b)
}
