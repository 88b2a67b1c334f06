//! `vfio-mig serve`: the binary serves a device to one client after another until SIGTERM or
//! SIGINT, replaces only stale sockets, and refuses bad specs with exit 2.

use std::io::{BufRead, BufReader};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vfio_mig_device::{DeviceState, MigrationDevice, MigrationFeatures};
use vfio_mig_vfio_user::client::RemoteDevice;

fn vfio_mig() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vfio-mig"))
}

/// Starts `serve` and returns it with its first line of output.
fn serve(socket: &Path, spec: &str) -> (Child, String) {
    let mut child = vfio_mig()
        .args(["serve", "--socket"])
        .arg(socket)
        .args(["--device", spec])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    (child, line)
}

fn signal(child: &Child, signal: rustix::process::Signal) {
    let pid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
    rustix::process::kill_process(pid, signal).unwrap();
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "serve did not exit");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn serves_clients_one_after_another_until_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("membuf.sock");
    let (mut child, line) = serve(&socket, "membuf:size=1M,features=pre-copy,seed=4");
    assert!(
        line.contains(&format!("vfio-user:{}", socket.display())),
        "{line}"
    );
    assert!(line.contains("membuf:size=1M"), "{line}");

    let first = RemoteDevice::connect(&socket).unwrap();
    assert_eq!(first.state().unwrap(), DeviceState::Running);
    assert_eq!(first.features().unwrap(), MigrationFeatures::PRE_COPY);
    let mut magic = [0u8; 8];
    first.client().region_read(0, 0, &mut magic).unwrap();
    assert_eq!(&magic, b"VFIOMIG1");
    first.set_state(DeviceState::Stop).unwrap();
    drop(first);

    // The next client finds the device as the last one left it.
    let second = RemoteDevice::connect(&socket).unwrap();
    assert_eq!(second.state().unwrap(), DeviceState::Stop);
    drop(second);

    signal(&child, rustix::process::Signal::TERM);
    let status = wait_exit(&mut child);
    assert!(status.success(), "{status:?}");
    assert!(!socket.exists(), "the socket file is removed");
}

#[test]
fn sigint_stops_a_server_with_a_client_connected() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("reg.sock");
    let (mut child, line) = serve(&socket, "register:seed=2");
    assert!(line.contains("register"), "{line}");
    let client = RemoteDevice::connect(&socket).unwrap();
    assert_eq!(client.features().unwrap(), MigrationFeatures::STOP_COPY);
    signal(&child, rustix::process::Signal::INT);
    assert!(wait_exit(&mut child).success());
    assert!(client.state().is_err(), "the connection was shut down");
    assert!(!socket.exists());
}

#[test]
fn a_stale_socket_is_replaced_but_other_files_are_not() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("stale.sock");
    drop(UnixListener::bind(&socket).unwrap());
    assert!(socket.exists());
    let (mut child, line) = serve(&socket, "register");
    assert!(line.starts_with("serving"), "{line}");
    assert_eq!(
        RemoteDevice::connect(&socket).unwrap().state().unwrap(),
        DeviceState::Running
    );

    // A second server on a live socket fails (exit 1) and leaves it alone.
    let out = vfio_mig()
        .args(["serve", "--socket"])
        .arg(&socket)
        .args(["--device", "register"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already listening"));
    assert!(RemoteDevice::connect(&socket).is_ok());
    signal(&child, rustix::process::Signal::TERM);
    assert!(wait_exit(&mut child).success());

    let file = dir.path().join("not-a-socket");
    std::fs::write(&file, b"keep me").unwrap();
    let out = vfio_mig()
        .args(["serve", "--socket"])
        .arg(&file)
        .args(["--device", "register"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a socket"));
    assert_eq!(std::fs::read(&file).unwrap(), b"keep me");
}

#[test]
fn a_bad_spec_is_a_usage_error() {
    let dir = tempfile::tempdir().unwrap();
    for (spec, says) in [
        ("gpu:size=1M", "valid kinds: membuf, register"),
        ("membuf:size=1000", "multiple of 4 KiB"),
        ("membuf:colour=red", "unknown key 'colour'"),
        ("register:seed", "not KEY=VALUE"),
    ] {
        let out = vfio_mig()
            .args(["serve", "--socket"])
            .arg(dir.path().join("x.sock"))
            .args(["--device", spec])
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{spec}");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(says), "{spec}: {stderr}");
    }
    assert!(!dir.path().join("x.sock").exists());
}
