//! `vfio-mig state DEVICE [TARGET] [--json]`: show a device's migration state, or move it.
//!
//! The arcs printed are the state machine's path from the state read before the SET, for
//! the device's features (`vfio_mig_fsm::path`); the device walks them itself in one SET.
//! The device is the authority: a target the local state machine refuses is still asked
//! for, and the refusal reported is the device's (with the state machine's reason).
//!
//! A target with an open data stream (pre-copy, pre-copy-p2p, stop-copy, resuming) is left
//! as it is: this command neither reads nor writes the stream. A vfio-user server keeps the
//! session for the next client; moving the device out of the state ends it.

use std::io::Write;

use anyhow::Context as _;
use clap::Args;
use vfio_mig_device::{DeviceState, StreamDirection};
use vfio_mig_fsm::session_in;

use crate::address::DeviceAddress;
use crate::app::Context;
use crate::progress::json_line;

/// Arguments of `state`.
#[derive(Clone, Debug, Args)]
pub struct StateArgs {
    /// The device: vfio-user:PATH, vfio:/dev/vfio/devices/vfioN, vfio:DDDD:BB:DD.F or
    /// vfio:UUID.
    #[arg(value_name = "DEVICE")]
    pub device: DeviceAddress,
    /// Move the device to this state: stop, running, stop-copy, resuming, running-p2p,
    /// pre-copy, pre-copy-p2p.
    #[arg(value_name = "TARGET")]
    pub target: Option<DeviceState>,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// What `state` reports.
#[derive(Debug, serde::Serialize)]
struct Report {
    device: String,
    /// The state now (after the move, when there was one).
    state: DeviceState,
    /// The state before the move.
    #[serde(skip_serializing_if = "Option::is_none")]
    from: Option<DeviceState>,
    /// Every state on the way, the start state first (moves only).
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<Vec<DeviceState>>,
    /// The data stream open in the final state and left unread: `saving` or `resuming`.
    data_stream: Option<&'static str>,
}

fn direction(d: StreamDirection) -> &'static str {
    match d {
        StreamDirection::Saving => "saving",
        StreamDirection::Resuming => "resuming",
    }
}

/// Runs `state`.
pub fn run(args: StateArgs, _ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let dev = args.device.open()?;
    let device = &dev.device;
    let current = device
        .state()
        .context("reading the device's state failed")?;
    let Some(target) = args.target else {
        let report = Report {
            device: dev.address.to_string(),
            state: current,
            from: None,
            path: None,
            data_stream: session_in(current).map(direction),
        };
        if args.json {
            json_line(out, &report)?;
        } else {
            writeln!(out, "{current}")?;
        }
        return Ok(());
    };
    let features = device
        .features()
        .context("querying the device's migration features failed")?;
    let planned = vfio_mig_fsm::path(current, target, features);
    match device.set_state(target) {
        Ok(_stream) => {
            // The stream handle is dropped unread; the session stays with the device.
            let states = match &planned {
                Ok(p) => p.states().to_vec(),
                Err(_) => vec![current, target],
            };
            let now = device
                .state()
                .context("reading the device's state after the move failed")?;
            let stream = session_in(now).map(direction);
            let report = Report {
                device: dev.address.to_string(),
                state: now,
                from: Some(current),
                path: Some(states.clone()),
                data_stream: stream,
            };
            if args.json {
                json_line(out, &report)?;
            } else {
                let names: Vec<&str> = states.iter().map(|s| s.name()).collect();
                writeln!(out, "{}", names.join(" -> "))?;
                if current == target {
                    writeln!(out, "the device was already in {target}")?;
                }
                if now != target {
                    writeln!(
                        out,
                        "note: the device reports {now} after accepting {target}"
                    )?;
                }
                if let Some(dir) = stream {
                    writeln!(
                        out,
                        "note: {now} has an open {dir} data stream; this command does not \
                         {} it, so the device stays in {now} until it is moved on",
                        if dir == "saving" { "read" } else { "write" },
                    )?;
                }
            }
            Ok(())
        }
        Err(e) => match planned {
            // The device's error names the arc that failed and where the device is.
            Ok(_) => Err(anyhow::Error::new(e)),
            Err(refusal) => {
                let line = format!("{e} (the state machine refuses it too: {refusal})");
                Err(anyhow::Error::new(e).context(line))
            }
        },
    }
}
