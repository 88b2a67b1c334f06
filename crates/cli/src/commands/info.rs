//! `vfio-mig info DEVICE [--json]`: what a device is and what it can do for migration.
//!
//! Shown: identity, migration features, current state, the stop-copy data-size estimate
//! (`unknown` when the device does not answer MIG_DATA_SIZE), DMA-logging support; for a
//! vfio-user device also the negotiated protocol facts and the device's regions and IRQs;
//! for a membuf its BAR0 registers.
//!
//! DMA-logging support is asked, not tried: a vfio-user device is sent DEVICE_FEATURE PROBE
//! of DMA_LOGGING_START with SET (the kernel's way to ask whether a feature exists), which
//! changes nothing on the device. Starting and stopping logging to find out would disturb a
//! device some other user is logging.

use std::fmt::Write as _;
use std::io::Write;

use anyhow::Context as _;
use clap::Args;
use vfio_mig_device::{DeviceState, Errno, MigrationFeatures};
use vfio_mig_vfio_user::client::Client;
use vfio_mig_vfio_user::codec::{
    DEVICE_FLAGS_PCI, DEVICE_FLAGS_RESET, FEATURE_DMA_LOGGING_START, FEATURE_SET,
    IRQ_INFO_AUTOMASKED, IRQ_INFO_EVENTFD, IRQ_INFO_MASKABLE, IRQ_INFO_NORESIZE,
    REGION_INFO_FLAG_CAPS, REGION_INFO_FLAG_MMAP, REGION_INFO_FLAG_READ, REGION_INFO_FLAG_WRITE,
};

use crate::address::{DeviceAddress, MembufRegisters, OpenDevice};
use crate::app::Context;
use crate::progress::{bytes, json_line};

/// Arguments of `info`.
#[derive(Clone, Debug, Args)]
pub struct InfoArgs {
    /// The device: vfio-user:PATH, vfio:/dev/vfio/devices/vfioN, vfio:DDDD:BB:DD.F or
    /// vfio:UUID.
    #[arg(value_name = "DEVICE")]
    pub device: DeviceAddress,
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

/// The device's identity, compatibility data in hex.
#[derive(Debug, serde::Serialize)]
struct Identity {
    kind: String,
    version: String,
    compat: String,
}

/// What `info` found out.
#[derive(Debug, serde::Serialize)]
struct Info {
    address: String,
    identity: Identity,
    features: MigrationFeatures,
    state: DeviceState,
    /// Stop-copy size estimate in bytes; `null` when unknown.
    data_size: Option<u64>,
    /// Why the estimate is unknown.
    #[serde(skip_serializing_if = "Option::is_none")]
    data_size_unknown: Option<String>,
    /// Whether DMA dirty logging is supported; `null` when it could not be asked.
    dma_logging: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vfio_user: Option<VfioUserFacts>,
    /// membuf's registers, when the device is a membuf.
    membuf: Option<MembufRegisters>,
}

/// The vfio-user protocol facts of a connection.
#[derive(Debug, serde::Serialize)]
struct VfioUserFacts {
    /// `major.minor` agreed in VERSION.
    version: String,
    /// The server's announced `max_data_xfer_size`.
    max_data_xfer_size: u32,
    /// The server's announced `max_msg_fds`.
    max_msg_fds: u32,
    /// The server's announced `max_dma_maps`.
    max_dma_maps: u32,
    /// The server's DMA page sizes (`pgsizes`).
    pgsizes: u64,
    /// The dirty-bitmap page size (`migration.pgsize`), if announced.
    migration_pgsize: Option<u64>,
    /// Largest data of one read request after negotiation.
    max_read: u32,
    /// Largest payload of one client message, if capped (servers that short-read).
    max_payload: Option<u32>,
    /// Extensions both sides announced.
    extensions: Vec<String>,
    /// DEVICE_GET_INFO flags.
    device_flags: Vec<&'static str>,
    regions: Vec<Region>,
    irqs: Vec<Irq>,
}

#[derive(Debug, serde::Serialize)]
struct Region {
    index: u32,
    size: u64,
    flags: Vec<&'static str>,
}

#[derive(Debug, serde::Serialize)]
struct Irq {
    index: u32,
    count: u32,
    flags: Vec<&'static str>,
}

fn flag_names(flags: u32, names: &[(u32, &'static str)]) -> Vec<&'static str> {
    names
        .iter()
        .filter(|(bit, _)| flags & bit != 0)
        .map(|&(_, name)| name)
        .collect()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn vfio_user_facts(client: &Client) -> anyhow::Result<VfioUserFacts> {
    let n = client.negotiated();
    let mut extensions = Vec::new();
    if let Some(ext) = &n.extension {
        let mut e = format!("vfio-mig v{}", ext.version);
        if ext.offers_precopy_info() {
            e.push_str(" precopy-info");
        }
        if ext.offers_whole_messages() {
            e.push_str(" whole-messages");
        }
        extensions.push(e);
    }
    if n.server.twin_socket_supported() {
        extensions.push("twin-socket".into());
    }
    if n.server.write_multiple() {
        extensions.push("write-multiple".into());
    }
    let info = client
        .device_info()
        .context("DEVICE_GET_INFO of the device failed")?;
    let mut regions = Vec::new();
    for index in 0..info.num_regions {
        let r = client
            .region_info(index)
            .with_context(|| format!("GET_REGION_INFO of region {index} failed"))?;
        if r.info.size > 0 {
            regions.push(Region {
                index,
                size: r.info.size,
                flags: flag_names(
                    r.info.flags,
                    &[
                        (REGION_INFO_FLAG_READ, "read"),
                        (REGION_INFO_FLAG_WRITE, "write"),
                        (REGION_INFO_FLAG_MMAP, "mmap"),
                        (REGION_INFO_FLAG_CAPS, "caps"),
                    ],
                ),
            });
        }
    }
    let mut irqs = Vec::new();
    for index in 0..info.num_irqs {
        let i = client
            .irq_info(index)
            .with_context(|| format!("GET_IRQ_INFO of IRQ index {index} failed"))?;
        if i.count > 0 {
            irqs.push(Irq {
                index,
                count: i.count,
                flags: flag_names(
                    i.flags,
                    &[
                        (IRQ_INFO_EVENTFD, "eventfd"),
                        (IRQ_INFO_MASKABLE, "maskable"),
                        (IRQ_INFO_AUTOMASKED, "automasked"),
                        (IRQ_INFO_NORESIZE, "noresize"),
                    ],
                ),
            });
        }
    }
    Ok(VfioUserFacts {
        version: format!("{}.{}", n.version.0, n.version.1),
        max_data_xfer_size: n.server.max_data_xfer_size(),
        max_msg_fds: n.server.max_msg_fds(),
        max_dma_maps: n.server.max_dma_maps(),
        pgsizes: n.server.pgsizes(),
        migration_pgsize: n.server.migration_pgsize(),
        max_read: n.max_read,
        max_payload: n.max_payload,
        extensions,
        device_flags: flag_names(
            info.flags,
            &[(DEVICE_FLAGS_RESET, "reset"), (DEVICE_FLAGS_PCI, "pci")],
        ),
        regions,
        irqs,
    })
}

fn gather(dev: &OpenDevice) -> anyhow::Result<Info> {
    let d = &dev.device;
    let identity = d
        .identity()
        .context("reading the device's identity failed")?;
    let features = d
        .features()
        .context("querying the device's migration features failed")?;
    let state = d.state().context("reading the device's state failed")?;
    let (data_size, data_size_unknown) = match d.data_size() {
        Ok(n) => (Some(n), None),
        Err(e) if e.errno() == Errno::ENOTTY => (
            None,
            Some("the device does not answer MIG_DATA_SIZE".into()),
        ),
        Err(e) => (None, Some(e.to_string())),
    };
    let (dma_logging, vfio_user) = match &dev.client {
        Some(client) => (
            client
                .feature_probe(FEATURE_DMA_LOGGING_START, FEATURE_SET)
                .ok(),
            Some(vfio_user_facts(client)?),
        ),
        None => (None, None),
    };
    Ok(Info {
        address: dev.address.to_string(),
        identity: Identity {
            kind: identity.kind,
            version: identity.version,
            compat: hex(&identity.compat),
        },
        features,
        state,
        data_size,
        data_size_unknown,
        dma_logging,
        vfio_user,
        membuf: dev.membuf_registers()?,
    })
}

fn text(info: &Info) -> String {
    let mut t = String::new();
    let _ = writeln!(t, "device {}", info.address);
    let id = &info.identity;
    let _ = write!(t, "  identity: {}", id.kind);
    if !id.version.is_empty() {
        let _ = write!(t, " version {}", id.version);
    }
    if !id.compat.is_empty() {
        let _ = write!(t, ", compatibility data {}", id.compat);
    }
    let _ = writeln!(t);
    let _ = writeln!(t, "  features: {}", info.features);
    let _ = writeln!(t, "  state: {}", info.state);
    match (info.data_size, &info.data_size_unknown) {
        (Some(n), _) => {
            let _ = writeln!(
                t,
                "  data size: {} ({n} bytes, stop-copy estimate)",
                bytes(n)
            );
        }
        (None, why) => {
            let _ = writeln!(
                t,
                "  data size: unknown ({})",
                why.as_deref().unwrap_or("no answer")
            );
        }
    }
    let _ = writeln!(
        t,
        "  dma logging: {}",
        match info.dma_logging {
            Some(true) => "supported",
            Some(false) => "not supported",
            None => "unknown",
        }
    );
    if let Some(v) = &info.vfio_user {
        let _ = writeln!(t, "vfio-user protocol {}", v.version);
        let _ = writeln!(
            t,
            "  server limits: max_data_xfer_size {} ({}), max_msg_fds {}, max_dma_maps {}, pgsizes {:#x}",
            v.max_data_xfer_size,
            bytes(v.max_data_xfer_size.into()),
            v.max_msg_fds,
            v.max_dma_maps,
            v.pgsizes
        );
        if let Some(p) = v.migration_pgsize {
            let _ = writeln!(t, "  dirty page size: {p}");
        }
        let _ = write!(
            t,
            "  negotiated: reads of up to {}",
            bytes(v.max_read.into())
        );
        match v.max_payload {
            Some(cap) => {
                let _ = writeln!(t, ", messages capped at {} of payload", bytes(cap.into()));
            }
            None => {
                let _ = writeln!(t, ", whole messages of any size");
            }
        }
        let _ = writeln!(
            t,
            "  extensions: {}",
            if v.extensions.is_empty() {
                "none".to_owned()
            } else {
                v.extensions.join(", ")
            }
        );
        let _ = writeln!(
            t,
            "  device flags: {}",
            if v.device_flags.is_empty() {
                "none".to_owned()
            } else {
                v.device_flags.join(", ")
            }
        );
        let _ = writeln!(t, "  regions: {}", v.regions.len());
        for r in &v.regions {
            let _ = writeln!(
                t,
                "    region {}: {} ({})",
                r.index,
                bytes(r.size),
                r.flags.join(", ")
            );
        }
        let _ = writeln!(t, "  irqs: {}", v.irqs.len());
        for i in &v.irqs {
            let _ = writeln!(
                t,
                "    irq index {}: {} vector(s) ({})",
                i.index,
                i.count,
                i.flags.join(", ")
            );
        }
    }
    if let Some(m) = &info.membuf {
        let _ = writeln!(t, "membuf registers (BAR0)");
        let _ = writeln!(t, "  size: {} ({} bytes)", bytes(m.size), m.size);
        let _ = writeln!(t, "  digest: {:#018x}", m.digest);
        let _ = writeln!(t, "  generation: {}", m.generation);
        let _ = writeln!(t, "  dirty rate: {}/s", bytes(m.dirty_rate));
    }
    t
}

/// Runs `info`.
pub fn run(args: InfoArgs, _ctx: &Context, out: &mut dyn Write) -> anyhow::Result<()> {
    let dev = args.device.open()?;
    let info = gather(&dev)?;
    if args.json {
        json_line(out, &info)?;
    } else {
        out.write_all(text(&info).as_bytes())?;
    }
    Ok(())
}
