//! `vfio-mig serve --socket PATH --device SPEC`: a vfio-user server for an emulated device,
//! serving one client after another until SIGINT or SIGTERM.
//!
//! The device lives as long as the command: a client that disconnects (even in the middle of
//! a migration) leaves its state for the next one. A stale socket file at `PATH` (one nobody
//! listens on) is replaced; any other file there is left alone and refused.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context as _};
use clap::Args;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vfio_mig_devices::spec::DeviceSpec;
use vfio_mig_vfio_user::server::{HostedDevice, Server};

use crate::app::Context;
use crate::exit::UsageError;

/// Arguments of `serve`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// The UNIX socket to listen on (clients use the address `vfio-user:PATH`).
    #[arg(long, value_name = "PATH")]
    pub socket: PathBuf,

    /// The device to serve: `membuf[:size=64M,dirty-rate=0,features=p2p+pre-copy,seed=1,
    /// dma-logging=on,dma-window=0x0+64K]`, `register[:seed=1]` or
    /// `lvu-sample[:bar1-size=16K]`.
    #[arg(long, value_name = "SPEC")]
    pub device: DeviceSpec,
}

/// Runs `serve`.
pub fn run(args: ServeArgs, _ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let dma_logging = args.device.dma_logging();
    let built = args
        .device
        .build()
        .with_context(|| format!("cannot build the device {}", args.device))?;
    let hosted = HostedDevice::new(built.migration, built.regions).with_dma(built.dma, dma_logging);

    remove_stale_socket(&args.socket)?;
    let mut server = Server::bind(&args.socket, hosted)
        .with_context(|| format!("cannot serve on {}", args.socket.display()))?;

    // signal-hook installs the handlers (async-signal-safe, no unsafe code here) and hands
    // the signals to a thread, which stops the server; the server shuts down the client it
    // is serving, removes its socket file and returns.
    let mut signals =
        Signals::new([SIGINT, SIGTERM]).context("cannot install the SIGINT/SIGTERM handlers")?;
    let signals_handle = signals.handle();
    let stop = server.stop_handle();
    let watcher = std::thread::Builder::new()
        .name("serve-signals".into())
        .spawn(move || {
            if signals.forever().next().is_some() {
                stop.stop();
            }
        })
        .context("cannot start the signal thread")?;

    writeln!(
        out,
        "serving {} at vfio-user:{} (SIGINT or SIGTERM stops)",
        args.device,
        args.socket.display()
    )?;
    out.flush()?;

    let served = server.serve_forever();
    signals_handle.close();
    let _ = watcher.join();
    drop(server);
    served.with_context(|| format!("the vfio-user server at {} failed", args.socket.display()))
}

/// Removes a socket file at `path` that nobody listens on; refuses anything else there.
fn remove_stale_socket(path: &Path) -> anyhow::Result<()> {
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(e).with_context(|| format!("cannot inspect {}", path.display()));
        }
    };
    if !meta.file_type().is_socket() {
        return Err(UsageError::new(format!(
            "{} exists and is not a socket; refusing to replace it",
            path.display()
        ))
        .into());
    }
    if UnixStream::connect(path).is_ok() {
        bail!("a server is already listening on {}", path.display());
    }
    fs::remove_file(path)
        .with_context(|| format!("cannot remove the stale socket {}", path.display()))
}
