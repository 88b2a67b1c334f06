//! Connects the vfio-mig client to any vfio-user server and exercises it: device info,
//! regions, IRQs, migration capabilities and state, then a STOP_COPY save and a RESUMING
//! write-back. A hand tool for interoperability checks (e.g. against libvfio-user's samples).
//!
//! ```text
//! cargo run -p vfio-mig-vfio-user --example probe -- SOCKET [OPTIONS]
//!
//!   --fill REGION:SEED     before saving, write pseudo-random bytes over the whole region
//!   --save FILE            save (RUNNING -> STOP_COPY, read to the end, -> STOP -> RUNNING)
//!                          into FILE and do not write it back
//!   --resume FILE          only resume FILE into the device (-> RESUMING, write, -> STOP)
//!   --dump REGION:FILE     at the end (device in STOP after --save / --resume, else RUNNING
//!                          again), write the whole region into FILE
//!   --keep-stopped         leave the device in STOP instead of returning to RUNNING
//!   --write-u64 R:OFF:V    before saving, write the little-endian u64 V at offset OFF of
//!                          region R; V may be `now+SECS` (libvfio-user's sample server keeps
//!                          an absolute-time timer deadline in BAR0 and refuses to run with
//!                          one in the past)
//!   --chunk N              MIG_DATA_READ buffer size (default 1 MiB; libvfio-user's gpio
//!                          sample asserts that every read asks for exactly 64 bytes)
//! ```
//!
//! Without `--save`/`--resume` it saves and writes the bytes straight back into the same
//! device, reporting each step's outcome.

use std::process::ExitCode;
use std::sync::Arc;

use vfio_mig_device::{write_all, DataStream, MigrationDevice, ReadOutcome};
use vfio_mig_uapi::DeviceState;
use vfio_mig_vfio_user::client::{Client, RemoteDevice};

struct Args {
    socket: String,
    fill: Option<(u32, u64)>,
    save: Option<String>,
    resume: Option<String>,
    dump: Option<(u32, String)>,
    keep_stopped: bool,
    chunk: usize,
    write_u64: Vec<(u32, u64, String)>,
}

fn parse() -> Result<Args, String> {
    let mut it = std::env::args().skip(1);
    let mut args = Args {
        socket: String::new(),
        fill: None,
        save: None,
        resume: None,
        dump: None,
        keep_stopped: false,
        chunk: 1 << 20,
        write_u64: Vec::new(),
    };
    let region_and = |v: String| -> Result<(u32, String), String> {
        let (r, rest) = v
            .split_once(':')
            .ok_or(format!("expected REGION:VALUE, got {v}"))?;
        Ok((
            r.parse().map_err(|e| format!("region {r}: {e}"))?,
            rest.to_owned(),
        ))
    };
    while let Some(a) = it.next() {
        let mut value = || it.next().ok_or(format!("{a} needs a value"));
        match a.as_str() {
            "--fill" => {
                let (r, seed) = region_and(value()?)?;
                args.fill = Some((r, seed.parse().map_err(|e| format!("seed: {e}"))?));
            }
            "--save" => args.save = Some(value()?),
            "--resume" => args.resume = Some(value()?),
            "--dump" => args.dump = Some(region_and(value()?)?),
            "--keep-stopped" => args.keep_stopped = true,
            "--write-u64" => {
                let (r, rest) = region_and(value()?)?;
                let (off, v) = rest.split_once(':').ok_or("expected R:OFF:VALUE")?;
                let off = off.parse().map_err(|e| format!("offset {off}: {e}"))?;
                args.write_u64.push((r, off, v.to_owned()));
            }
            "--chunk" => {
                args.chunk = value()?.parse().map_err(|e| format!("chunk: {e}"))?;
                if args.chunk == 0 {
                    return Err("chunk must be at least 1".into());
                }
            }
            s if s.starts_with('-') => return Err(format!("unknown option {s}")),
            s => args.socket = s.to_owned(),
        }
    }
    if args.socket.is_empty() {
        return Err("usage: probe SOCKET [--fill R:SEED] [--save F | --resume F] [--dump R:F] [--keep-stopped] [--chunk N] [--write-u64 R:OFF:V]".into());
    }
    Ok(args)
}

/// xorshift64* bytes: reproducible fill data.
fn pseudo_random(len: usize, mut seed: u64) -> Vec<u8> {
    seed |= 1;
    (0..len)
        .map(|_| {
            seed ^= seed >> 12;
            seed ^= seed << 25;
            seed ^= seed >> 27;
            (seed.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

fn save(device: &RemoteDevice, chunk: usize) -> Result<Vec<u8>, String> {
    let from = device.state().map_err(|e| e.to_string())?;
    let mut stream: DataStream = device
        .set_state(DeviceState::StopCopy)
        .map_err(|e| format!("SET STOP_COPY: {e}: {}", e.cause))?
        .ok_or("SET STOP_COPY returned no stream")?;
    println!("  {from} -> stop-copy: session opened");
    let mut buf = vec![0u8; chunk];
    let mut saved = Vec::new();
    let mut reads = 0;
    loop {
        reads += 1;
        match stream.read(&mut buf).map_err(|e| e.to_string())? {
            ReadOutcome::Data(n) => saved.extend_from_slice(&buf[..n]),
            ReadOutcome::End => break,
            ReadOutcome::NothingNow => return Err("NothingNow in STOP_COPY".into()),
        }
    }
    println!(
        "  read {} bytes in {reads} MIG_DATA_READs (last one: end of state)",
        saved.len()
    );
    device
        .set_state(DeviceState::Stop)
        .map_err(|e| format!("SET STOP: {e}"))?;
    match stream.read(&mut buf) {
        Err(e) => println!("  stop: the stream is closed ({})", e.errno()),
        Ok(o) => return Err(format!("stream still readable after STOP: {o:?}")),
    }
    Ok(saved)
}

fn resume(device: &RemoteDevice, data: &[u8]) -> Result<(), String> {
    let mut stream = device
        .set_state(DeviceState::Resuming)
        .map_err(|e| format!("SET RESUMING: {e}: {}", e.cause))?
        .ok_or("SET RESUMING returned no stream")?;
    println!("  -> resuming: session opened");
    write_all(stream.as_mut(), data).map_err(|e| e.to_string())?;
    println!("  wrote {} bytes", data.len());
    device
        .set_state(DeviceState::Stop)
        .map_err(|e| format!("SET STOP (device validates the state): {e}: {}", e.cause))?;
    println!("  resuming -> stop: accepted");
    Ok(())
}

fn run(args: Args) -> Result<(), String> {
    let client = Arc::new(Client::connect(&args.socket).map_err(|e| format!("connect: {e}"))?);
    let n = client.negotiated();
    println!("connected to {}", args.socket);
    println!(
        "  version {}.{}; server max_msg_fds {} max_data_xfer_size {}; migration.pgsize {:?}",
        n.version.0,
        n.version.1,
        n.server.max_msg_fds(),
        n.server.max_data_xfer_size(),
        n.server.migration_pgsize()
    );
    println!(
        "  vfio-mig extension: {}; read chunk {}, write payload cap {:?}",
        n.extension
            .as_ref()
            .map_or("none (standard server)".to_owned(), |e| format!("{e:?}")),
        n.max_read,
        n.max_payload
    );
    let info = client
        .device_info()
        .map_err(|e| format!("device info: {e}"))?;
    println!(
        "device: flags {:#x}, {} regions, {} IRQ types",
        info.flags, info.num_regions, info.num_irqs
    );
    let mut sizes: Vec<u64> = Vec::new();
    for index in 0..info.num_regions {
        match client.region_info(index) {
            Ok(r) => {
                sizes.push(r.info.size);
                if r.info.size == 0 {
                    continue;
                }
                println!(
                    "  region {index}: size {:#x} flags {:#x} sparse {:?} fd {}",
                    r.info.size,
                    r.info.flags,
                    r.sparse_mmap,
                    if r.fd.is_some() { "yes" } else { "no" }
                );
            }
            Err(e) => {
                sizes.push(0);
                println!("  region {index}: {e}");
            }
        }
    }
    for index in 0..info.num_irqs {
        match client.irq_info(index) {
            Ok(i) => println!("  irq {index}: count {} flags {:#x}", i.count, i.flags),
            Err(e) => println!("  irq {index}: {e}"),
        }
    }
    let device = RemoteDevice::new(Arc::clone(&client));
    println!(
        "identity: {:?}",
        device.identity().map_err(|e| e.to_string())?
    );
    println!(
        "migration: features {}, state {}",
        device
            .features()
            .map_err(|e| format!("MIGRATION GET: {e}"))?,
        device.state().map_err(|e| format!("state GET: {e}"))?
    );
    match device.data_size() {
        Ok(n) => println!("  stop-copy size estimate: {n} bytes"),
        Err(e) => println!("  stop-copy size estimate: unavailable ({})", e.errno()),
    }
    let region_size = |r: u32| -> Result<usize, String> {
        let size = *sizes.get(r as usize).ok_or(format!("no region {r}"))?;
        usize::try_from(size).map_err(|e| e.to_string())
    };
    if let Some((region, seed)) = args.fill {
        let data = pseudo_random(region_size(region)?, seed);
        client
            .region_write(region, 0, &data)
            .map_err(|e| format!("fill region {region}: {e}"))?;
        println!("filled region {region} ({} bytes, seed {seed})", data.len());
    }
    for (region, offset, value) in &args.write_u64 {
        let v = match value.strip_prefix("now+") {
            Some(secs) => {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_err(|e| e.to_string())?
                    .as_secs();
                now + secs.parse::<u64>().map_err(|e| format!("{value}: {e}"))?
            }
            None => value.parse().map_err(|e| format!("{value}: {e}"))?,
        };
        client
            .region_write(*region, *offset, &v.to_le_bytes())
            .map_err(|e| format!("write region {region}: {e}"))?;
        println!("wrote u64 {v} at region {region} offset {offset}");
    }
    if let Some(path) = &args.resume {
        let data = std::fs::read(path).map_err(|e| format!("{path}: {e}"))?;
        println!("resume {path}:");
        resume(&device, &data)?;
    } else {
        println!("save (STOP_COPY):");
        let saved = save(&device, args.chunk)?;
        match &args.save {
            Some(path) => {
                std::fs::write(path, &saved).map_err(|e| format!("{path}: {e}"))?;
                println!("  saved to {path}");
            }
            None => {
                println!("write back (RESUMING):");
                if let Err(e) = resume(&device, &saved) {
                    println!("  FAILED: {e}");
                    println!(
                        "  state now {:?}",
                        device.state().map_err(|e| e.to_string())?
                    );
                }
            }
        }
    }
    if let Some((region, path)) = &args.dump {
        let mut bytes = vec![0u8; region_size(*region)?];
        client
            .region_read(*region, 0, &mut bytes)
            .map_err(|e| format!("read region {region}: {e}"))?;
        std::fs::write(path, &bytes).map_err(|e| format!("{path}: {e}"))?;
        println!("region {region}: {} bytes written to {path}", bytes.len());
    }
    if !args.keep_stopped {
        let current = device.state().map_err(|e| e.to_string())?;
        if current != DeviceState::Running {
            device
                .set_state(DeviceState::Running)
                .map_err(|e| format!("SET RUNNING: {e}"))?;
        }
        println!(
            "device back to {}",
            device.state().map_err(|e| e.to_string())?
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    match parse().and_then(run) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("probe: {e}");
            ExitCode::FAILURE
        }
    }
}
