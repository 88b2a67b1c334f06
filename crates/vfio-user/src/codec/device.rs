//! Device queries: DEVICE_GET_INFO, GET_REGION_INFO (with capabilities),
//! GET_REGION_IO_FDS, GET_IRQ_INFO, and DEVICE_SET_IRQS.

use super::wire::{Reader, WireBuf};
use super::{Bulk, CodecError, Limits, Payload};

/// `VFIO_DEVICE_FLAGS_RESET`: the device supports DEVICE_RESET.
pub const DEVICE_FLAGS_RESET: u32 = 1 << 0;
/// `VFIO_DEVICE_FLAGS_PCI`: the device is a PCI device.
pub const DEVICE_FLAGS_PCI: u32 = 1 << 1;

/// `vfio_device_info`, 16 bytes: the DEVICE_GET_INFO request (all but `argsz` zero) and reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct DeviceInfo {
    /// Request: largest reply accepted; reply: size of the full reply (16).
    pub argsz: u32,
    /// [`DEVICE_FLAGS_RESET`] | [`DEVICE_FLAGS_PCI`].
    pub flags: u32,
    /// Number of regions.
    pub num_regions: u32,
    /// Number of IRQ types.
    pub num_irqs: u32,
}

impl DeviceInfo {
    /// Encoded size.
    pub const SIZE: usize = 16;
}

impl<'a> Payload<'a> for DeviceInfo {
    fn decode(bytes: &'a [u8], _limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let v = DeviceInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            num_regions: r.u32()?,
            num_irqs: r.u32()?,
        };
        r.finish("DEVICE_GET_INFO")?;
        Ok(v)
    }

    fn encoded_len(&self) -> usize {
        Self::SIZE
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u32(self.argsz)?;
        out.put_u32(self.flags)?;
        out.put_u32(self.num_regions)?;
        out.put_u32(self.num_irqs)?;
        Ok(Bulk::NONE)
    }
}

/// `VFIO_REGION_INFO_FLAG_READ`.
pub const REGION_INFO_FLAG_READ: u32 = 1 << 0;
/// `VFIO_REGION_INFO_FLAG_WRITE`.
pub const REGION_INFO_FLAG_WRITE: u32 = 1 << 1;
/// `VFIO_REGION_INFO_FLAG_MMAP`: the reply carries an fd to mmap.
pub const REGION_INFO_FLAG_MMAP: u32 = 1 << 2;
/// `VFIO_REGION_INFO_FLAG_CAPS`: `cap_offset` points at a capability chain.
pub const REGION_INFO_FLAG_CAPS: u32 = 1 << 3;
/// `VFIO_REGION_INFO_CAP_SPARSE_MMAP`.
pub const REGION_INFO_CAP_SPARSE_MMAP: u16 = 1;
/// `VFIO_REGION_INFO_CAP_TYPE`.
pub const REGION_INFO_CAP_TYPE: u16 = 2;

/// `vfio_region_info`, the fixed 32 bytes of a GET_REGION_INFO request and reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RegionInfo {
    /// Request: largest reply accepted; reply: size of the full reply, capabilities included
    /// (may exceed what the reply carries: the client then asks again with this much).
    pub argsz: u32,
    /// `REGION_INFO_FLAG_*`.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Offset of the first capability from the start of this structure (0: none).
    pub cap_offset: u32,
    /// Region size.
    pub size: u64,
    /// mmap offset of the region in the passed fd.
    pub offset: u64,
}

impl RegionInfo {
    /// Encoded size.
    pub const SIZE: usize = 32;

    fn read(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(RegionInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            cap_offset: r.u32()?,
            size: r.u64()?,
            offset: r.u64()?,
        })
    }

    fn write<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<(), CodecError> {
        out.put_u32(self.argsz)?;
        out.put_u32(self.flags)?;
        out.put_u32(self.index)?;
        out.put_u32(self.cap_offset)?;
        out.put_u64(self.size)?;
        out.put_u64(self.offset)
    }
}

/// GET_REGION_INFO request: the 32-byte structure (only `argsz` and `index` matter), and
/// `trailing` bytes of reply space some clients append (libvfio-user's sample client sends
/// `argsz` bytes). Trailing bytes are ignored on decode and written as zeros.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RegionInfoRequest {
    /// The fixed structure.
    pub info: RegionInfo,
    /// Bytes after it.
    pub trailing: u32,
}

impl RegionInfoRequest {
    /// A request for region `index` accepting `argsz` bytes of reply, without trailing bytes.
    pub fn new(index: u32, argsz: u32) -> Self {
        RegionInfoRequest {
            info: RegionInfo {
                argsz,
                index,
                ..RegionInfo::default()
            },
            trailing: 0,
        }
    }
}

impl<'a> Payload<'a> for RegionInfoRequest {
    fn decode(bytes: &'a [u8], _limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let info = RegionInfo::read(&mut r)?;
        let trailing = u32::try_from(r.rest().len()).unwrap_or(u32::MAX);
        Ok(RegionInfoRequest { info, trailing })
    }

    fn encoded_len(&self) -> usize {
        RegionInfo::SIZE + self.trailing as usize
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        self.info.write(out)?;
        out.put_zeros(self.trailing as usize)?;
        Ok(Bulk::NONE)
    }
}

/// One mmap-able area of a sparse region, relative to the region's mmap offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct SparseMmapArea {
    /// Offset within the region.
    pub offset: u64,
    /// Length.
    pub size: u64,
}

/// A region-info capability.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RegionCap<'a> {
    /// `VFIO_REGION_INFO_CAP_SPARSE_MMAP` version 1: the mmap-able areas.
    SparseMmap(Vec<SparseMmapArea>),
    /// `VFIO_REGION_INFO_CAP_TYPE` version 1: a device-specific region's type.
    Type {
        /// Region type.
        region_type: u32,
        /// Region subtype.
        subtype: u32,
    },
    /// Any other capability (or version), kept as its bytes after the 8-byte header.
    Other {
        /// Capability id.
        id: u16,
        /// Capability version.
        version: u16,
        /// Body after the header.
        data: &'a [u8],
    },
}

/// Size of `vfio_info_cap_header`.
const CAP_HEADER: usize = 8;

impl RegionCap<'_> {
    fn encoded_len(&self) -> usize {
        CAP_HEADER
            + match self {
                RegionCap::SparseMmap(areas) => 8 + 16 * areas.len(),
                RegionCap::Type { .. } => 8,
                RegionCap::Other { data, .. } => data.len(),
            }
    }

    fn id_version(&self) -> (u16, u16) {
        match self {
            RegionCap::SparseMmap(_) => (REGION_INFO_CAP_SPARSE_MMAP, 1),
            RegionCap::Type { .. } => (REGION_INFO_CAP_TYPE, 1),
            RegionCap::Other { id, version, .. } => (*id, *version),
        }
    }
}

/// GET_REGION_INFO reply: the structure, then its capability chain.
///
/// The chain is laid out contiguously from offset 32, each `next` pointing at the following
/// capability and the last one 0, as the kernel and libvfio-user lay it out; decode refuses
/// other layouts. A reply that only announces the size it needs (`argsz` larger than the
/// payload, `cap_offset` 0) decodes with no capabilities.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RegionInfoReply<'a> {
    /// The fixed structure, fields as sent.
    pub info: RegionInfo,
    /// The capabilities, in chain order.
    pub caps: Vec<RegionCap<'a>>,
}

impl<'a> RegionInfoReply<'a> {
    /// A complete reply: sets `argsz`, `cap_offset` and the CAPS flag to match `caps`.
    pub fn new(mut info: RegionInfo, caps: Vec<RegionCap<'a>>) -> Self {
        let caps_len: usize = caps.iter().map(RegionCap::encoded_len).sum();
        info.argsz = u32::try_from(RegionInfo::SIZE + caps_len).unwrap_or(u32::MAX);
        if caps.is_empty() {
            info.cap_offset = 0;
            info.flags &= !REGION_INFO_FLAG_CAPS;
        } else {
            info.cap_offset = RegionInfo::SIZE as u32;
            info.flags |= REGION_INFO_FLAG_CAPS;
        }
        RegionInfoReply { info, caps }
    }

    /// The reply to send to a request that accepts `argsz` bytes: this one if it fits,
    /// otherwise the bare structure announcing the size needed.
    pub fn fit_to(self, argsz: u32) -> Self {
        if self.info.argsz <= argsz {
            return self;
        }
        let info = RegionInfo {
            cap_offset: 0,
            flags: self.info.flags & !REGION_INFO_FLAG_CAPS,
            ..self.info
        };
        RegionInfoReply {
            info,
            caps: Vec::new(),
        }
    }

    /// The sparse-mmap areas, if the reply has that capability.
    pub fn sparse_areas(&self) -> Option<&[SparseMmapArea]> {
        self.caps.iter().find_map(|c| match c {
            RegionCap::SparseMmap(a) => Some(a.as_slice()),
            _ => None,
        })
    }
}

impl<'a> Payload<'a> for RegionInfoReply<'a> {
    fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let info = RegionInfo::read(&mut r)?;
        let mut caps = Vec::new();
        if info.cap_offset == 0 {
            r.finish("GET_REGION_INFO reply without capabilities")?;
            return Ok(RegionInfoReply { info, caps });
        }
        if info.cap_offset as usize != RegionInfo::SIZE {
            return Err(CodecError::BadField {
                field: "cap_offset",
                value: info.cap_offset.into(),
                reason: "capabilities must follow the 32-byte structure",
            });
        }
        loop {
            if caps.len() as u64 >= u64::from(limits.max_caps) {
                return Err(CodecError::TooLarge {
                    what: "region capability chain",
                    size: caps.len() as u64 + 1,
                    limit: limits.max_caps.into(),
                });
            }
            let start = r.pos();
            let id = r.u16()?;
            let version = r.u16()?;
            let next = r.u32()? as usize;
            let end = if next == 0 { bytes.len() } else { next };
            if end < start + CAP_HEADER || end > bytes.len() {
                return Err(CodecError::BadField {
                    field: "capability next",
                    value: next as u64,
                    reason: "must point past this capability and inside the reply",
                });
            }
            let body = r.bytes(end - start - CAP_HEADER)?;
            caps.push(decode_cap(id, version, body, limits)?);
            if next == 0 {
                return Ok(RegionInfoReply { info, caps });
            }
        }
    }

    fn encoded_len(&self) -> usize {
        RegionInfo::SIZE + self.caps.iter().map(RegionCap::encoded_len).sum::<usize>()
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        let expected_offset = if self.caps.is_empty() {
            0
        } else {
            RegionInfo::SIZE as u32
        };
        if self.info.cap_offset != expected_offset {
            return Err(CodecError::BadField {
                field: "cap_offset",
                value: self.info.cap_offset.into(),
                reason: "must be 32 with capabilities and 0 without",
            });
        }
        self.info.write(out)?;
        let mut pos = RegionInfo::SIZE;
        for (i, cap) in self.caps.iter().enumerate() {
            let end = pos + cap.encoded_len();
            let next = if i + 1 == self.caps.len() { 0 } else { end };
            let next = u32::try_from(next).map_err(|_| CodecError::TooLarge {
                what: "capability chain",
                size: next as u64,
                limit: u32::MAX.into(),
            })?;
            let (id, version) = cap.id_version();
            out.put_u16(id)?;
            out.put_u16(version)?;
            out.put_u32(next)?;
            match cap {
                RegionCap::SparseMmap(areas) => {
                    out.put_u32(areas.len() as u32)?;
                    out.put_u32(0)?;
                    for a in areas {
                        out.put_u64(a.offset)?;
                        out.put_u64(a.size)?;
                    }
                }
                RegionCap::Type {
                    region_type,
                    subtype,
                } => {
                    out.put_u32(*region_type)?;
                    out.put_u32(*subtype)?;
                }
                RegionCap::Other { data, .. } => out.put(data)?,
            }
            pos = end;
        }
        Ok(Bulk::NONE)
    }
}

fn decode_cap<'a>(
    id: u16,
    version: u16,
    body: &'a [u8],
    limits: &Limits,
) -> Result<RegionCap<'a>, CodecError> {
    let mut r = Reader::new(body);
    match (id, version) {
        (REGION_INFO_CAP_SPARSE_MMAP, 1) => {
            let nr_areas = r.u32()?;
            let _reserved = r.u32()?;
            limits.check_ranges("sparse-mmap areas", nr_areas.into())?;
            let need = 8 + 16 * nr_areas as usize;
            if body.len() != need {
                return Err(CodecError::LengthMismatch {
                    what: "sparse-mmap capability",
                    expected: need,
                    actual: body.len(),
                });
            }
            let mut areas = Vec::with_capacity(nr_areas as usize);
            for _ in 0..nr_areas {
                areas.push(SparseMmapArea {
                    offset: r.u64()?,
                    size: r.u64()?,
                });
            }
            Ok(RegionCap::SparseMmap(areas))
        }
        (REGION_INFO_CAP_TYPE, 1) => {
            let v = RegionCap::Type {
                region_type: r.u32()?,
                subtype: r.u32()?,
            };
            r.finish("region type capability")?;
            Ok(v)
        }
        _ => Ok(RegionCap::Other {
            id,
            version,
            data: body,
        }),
    }
}

/// `VFIO_USER_IO_FD_TYPE_IOEVENTFD`.
pub const IO_FD_TYPE_IOEVENTFD: u32 = 0;
/// `VFIO_USER_IO_FD_TYPE_IOREGIONFD`.
pub const IO_FD_TYPE_IOREGIONFD: u32 = 1;

/// GET_REGION_IO_FDS request, and the fixed part of its reply: 16 bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct RegionIoFdsRequest {
    /// Largest reply accepted.
    pub argsz: u32,
    /// Must be zero.
    pub flags: u32,
    /// Region index.
    pub index: u32,
    /// Must be zero in a request.
    pub count: u32,
}

impl RegionIoFdsRequest {
    /// Encoded size.
    pub const SIZE: usize = 16;

    fn read(r: &mut Reader<'_>) -> Result<Self, CodecError> {
        Ok(RegionIoFdsRequest {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            count: r.u32()?,
        })
    }

    fn write<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<(), CodecError> {
        out.put_u32(self.argsz)?;
        out.put_u32(self.flags)?;
        out.put_u32(self.index)?;
        out.put_u32(self.count)
    }
}

impl<'a> Payload<'a> for RegionIoFdsRequest {
    fn decode(bytes: &'a [u8], _limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let v = Self::read(&mut r)?;
        r.finish("GET_REGION_IO_FDS request")?;
        Ok(v)
    }

    fn encoded_len(&self) -> usize {
        Self::SIZE
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        self.write(out)?;
        Ok(Bulk::NONE)
    }
}

/// One sub-region of a GET_REGION_IO_FDS reply (40 bytes; the 4 padding bytes are ignored).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IoFdSubRegion {
    /// Offset in the region.
    pub offset: u64,
    /// Length (0: any access size).
    pub size: u64,
    /// Index of the fd among the reply's fds.
    pub fd_index: u32,
    /// [`IO_FD_TYPE_IOEVENTFD`] or [`IO_FD_TYPE_IOREGIONFD`].
    pub fd_type: u32,
    /// KVM ioeventfd / ioregionfd flags.
    pub flags: u32,
    /// ioeventfd datamatch, or ioregionfd user data.
    pub data: u64,
}

impl IoFdSubRegion {
    /// Encoded size.
    pub const SIZE: usize = 40;
}

/// GET_REGION_IO_FDS reply: the 16-byte header (`count` = sub-regions the device has) and
/// the sub-regions carried (none when the reply only announces the size it needs).
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct RegionIoFdsReply {
    /// `argsz`, `flags`, `index`, `count` as sent.
    pub head: RegionIoFdsRequest,
    /// Sub-regions carried, at most `count`.
    pub subregions: Vec<IoFdSubRegion>,
}

impl<'a> Payload<'a> for RegionIoFdsReply {
    fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let head = RegionIoFdsRequest::read(&mut r)?;
        let rest = r.remaining();
        if rest % IoFdSubRegion::SIZE != 0 {
            return Err(CodecError::LengthMismatch {
                what: "GET_REGION_IO_FDS sub-regions",
                expected: rest / IoFdSubRegion::SIZE * IoFdSubRegion::SIZE,
                actual: rest,
            });
        }
        let n = rest / IoFdSubRegion::SIZE;
        limits.check_ranges("I/O fd sub-regions", n as u64)?;
        if n as u64 > u64::from(head.count) {
            return Err(CodecError::BadField {
                field: "GET_REGION_IO_FDS count",
                value: head.count.into(),
                reason: "fewer than the sub-regions carried",
            });
        }
        let mut subregions = Vec::with_capacity(n);
        for _ in 0..n {
            let offset = r.u64()?;
            let size = r.u64()?;
            let fd_index = r.u32()?;
            let fd_type = r.u32()?;
            let flags = r.u32()?;
            let _padding = r.u32()?;
            let data = r.u64()?;
            subregions.push(IoFdSubRegion {
                offset,
                size,
                fd_index,
                fd_type,
                flags,
                data,
            });
        }
        Ok(RegionIoFdsReply { head, subregions })
    }

    fn encoded_len(&self) -> usize {
        RegionIoFdsRequest::SIZE + IoFdSubRegion::SIZE * self.subregions.len()
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        if self.subregions.len() as u64 > u64::from(self.head.count) {
            return Err(CodecError::BadField {
                field: "GET_REGION_IO_FDS count",
                value: self.head.count.into(),
                reason: "fewer than the sub-regions carried",
            });
        }
        self.head.write(out)?;
        for s in &self.subregions {
            out.put_u64(s.offset)?;
            out.put_u64(s.size)?;
            out.put_u32(s.fd_index)?;
            out.put_u32(s.fd_type)?;
            out.put_u32(s.flags)?;
            out.put_u32(0)?;
            out.put_u64(s.data)?;
        }
        Ok(Bulk::NONE)
    }
}

/// `VFIO_IRQ_INFO_EVENTFD`.
pub const IRQ_INFO_EVENTFD: u32 = 1 << 0;
/// `VFIO_IRQ_INFO_MASKABLE`.
pub const IRQ_INFO_MASKABLE: u32 = 1 << 1;
/// `VFIO_IRQ_INFO_AUTOMASKED`.
pub const IRQ_INFO_AUTOMASKED: u32 = 1 << 2;
/// `VFIO_IRQ_INFO_NORESIZE`.
pub const IRQ_INFO_NORESIZE: u32 = 1 << 3;

/// `vfio_irq_info`, 16 bytes: the GET_IRQ_INFO request (`argsz`, `index`) and reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IrqInfo {
    /// Request: largest reply accepted; reply: 16.
    pub argsz: u32,
    /// `IRQ_INFO_*`.
    pub flags: u32,
    /// IRQ type index.
    pub index: u32,
    /// Number of interrupts of this type.
    pub count: u32,
}

impl IrqInfo {
    /// Encoded size.
    pub const SIZE: usize = 16;
}

impl<'a> Payload<'a> for IrqInfo {
    fn decode(bytes: &'a [u8], _limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let v = IrqInfo {
            argsz: r.u32()?,
            flags: r.u32()?,
            index: r.u32()?,
            count: r.u32()?,
        };
        r.finish("GET_IRQ_INFO")?;
        Ok(v)
    }

    fn encoded_len(&self) -> usize {
        Self::SIZE
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u32(self.argsz)?;
        out.put_u32(self.flags)?;
        out.put_u32(self.index)?;
        out.put_u32(self.count)?;
        Ok(Bulk::NONE)
    }
}

/// `VFIO_IRQ_SET_DATA_NONE`.
pub const IRQ_SET_DATA_NONE: u32 = 1 << 0;
/// `VFIO_IRQ_SET_DATA_BOOL`: `count` bool bytes follow.
pub const IRQ_SET_DATA_BOOL: u32 = 1 << 1;
/// `VFIO_IRQ_SET_DATA_EVENTFD`: the eventfds travel beside the message.
pub const IRQ_SET_DATA_EVENTFD: u32 = 1 << 2;
/// `VFIO_IRQ_SET_ACTION_MASK`.
pub const IRQ_SET_ACTION_MASK: u32 = 1 << 3;
/// `VFIO_IRQ_SET_ACTION_UNMASK`.
pub const IRQ_SET_ACTION_UNMASK: u32 = 1 << 4;
/// `VFIO_IRQ_SET_ACTION_TRIGGER`.
pub const IRQ_SET_ACTION_TRIGGER: u32 = 1 << 5;
const IRQ_SET_DATA_MASK: u32 = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;

/// DEVICE_SET_IRQS request (`vfio_irq_set`, 20 bytes, then `count` bools with
/// [`IRQ_SET_DATA_BOOL`]). The reply has no payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct IrqSet<'a> {
    /// Size of the request payload.
    pub argsz: u32,
    /// One `IRQ_SET_DATA_*` and one `IRQ_SET_ACTION_*` bit.
    pub flags: u32,
    /// IRQ type index.
    pub index: u32,
    /// First sub-index.
    pub start: u32,
    /// Number of sub-indexes.
    pub count: u32,
    /// The bools of [`IRQ_SET_DATA_BOOL`]; empty otherwise.
    pub data: &'a [u8],
}

impl IrqSet<'_> {
    /// Size of the fixed part.
    pub const SIZE: usize = 20;
}

impl<'a> Payload<'a> for IrqSet<'a> {
    fn decode(bytes: &'a [u8], _limits: &Limits) -> Result<Self, CodecError> {
        let mut r = Reader::new(bytes);
        let argsz = r.u32()?;
        let flags = r.u32()?;
        let index = r.u32()?;
        let start = r.u32()?;
        let count = r.u32()?;
        let data = r.rest();
        let expected = match flags & IRQ_SET_DATA_MASK {
            IRQ_SET_DATA_BOOL => count as usize,
            IRQ_SET_DATA_NONE | IRQ_SET_DATA_EVENTFD => 0,
            _ => {
                return Err(CodecError::BadField {
                    field: "SET_IRQS flags",
                    value: flags.into(),
                    reason: "exactly one DATA_* bit must be set",
                })
            }
        };
        if data.len() != expected {
            return Err(CodecError::LengthMismatch {
                what: "SET_IRQS data",
                expected,
                actual: data.len(),
            });
        }
        Ok(IrqSet {
            argsz,
            flags,
            index,
            start,
            count,
            data,
        })
    }

    fn encoded_len(&self) -> usize {
        Self::SIZE + self.data.len()
    }

    fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        out.put_u32(self.argsz)?;
        out.put_u32(self.flags)?;
        out.put_u32(self.index)?;
        out.put_u32(self.start)?;
        out.put_u32(self.count)?;
        Ok(Bulk::data(self.data))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_bar1() -> RegionInfoReply<'static> {
        RegionInfoReply::new(
            RegionInfo {
                argsz: 0,
                flags: REGION_INFO_FLAG_READ | REGION_INFO_FLAG_WRITE | REGION_INFO_FLAG_MMAP,
                index: 1,
                cap_offset: 0,
                size: 0x4000,
                offset: 0,
            },
            vec![RegionCap::SparseMmap(vec![
                SparseMmapArea {
                    offset: 0,
                    size: 0x1000,
                },
                SparseMmapArea {
                    offset: 0x2000,
                    size: 0x1000,
                },
            ])],
        )
    }

    #[test]
    fn sparse_mmap_reply_matches_libvfio_user_bytes() {
        let reply = sample_bar1();
        assert_eq!(
            (reply.info.argsz, reply.info.flags, reply.info.cap_offset),
            (80, 0xf, 32)
        );
        let bytes = reply.encode_to_vec().unwrap();
        let expected = "500000000f000000010000002000000000400000000000000000000000000000\
                        01000100000000000200000000000000\
                        0000000000000000001000000000000000200000000000000010000000000000";
        assert_eq!(hex(&bytes), expected);
        let back = RegionInfoReply::decode(&bytes, &Limits::default()).unwrap();
        assert_eq!(back, reply);
        assert_eq!(back.sparse_areas().unwrap().len(), 2);
    }

    #[test]
    fn fit_to_announces_the_size_needed() {
        let short = sample_bar1().fit_to(32);
        assert_eq!(
            (short.info.argsz, short.info.flags, short.info.cap_offset),
            (80, 7, 0)
        );
        let bytes = short.encode_to_vec().unwrap();
        assert_eq!(bytes.len(), 32);
        assert_eq!(
            RegionInfoReply::decode(&bytes, &Limits::default()).unwrap(),
            short
        );
        assert_eq!(sample_bar1().fit_to(80), sample_bar1());
    }

    #[test]
    fn capability_chains_are_bounded_and_checked() {
        let limits = Limits::default();
        let caps: Vec<_> = (0..4)
            .map(|i| RegionCap::Type {
                region_type: i,
                subtype: 0,
            })
            .chain([RegionCap::Other {
                id: 9,
                version: 3,
                data: &[1, 2, 3],
            }])
            .collect();
        let reply = RegionInfoReply::new(RegionInfo::default(), caps);
        let bytes = reply.encode_to_vec().unwrap();
        assert_eq!(RegionInfoReply::decode(&bytes, &limits).unwrap(), reply);
        let few = Limits {
            max_caps: 4,
            ..limits
        };
        assert!(matches!(
            RegionInfoReply::decode(&bytes, &few),
            Err(CodecError::TooLarge {
                size: 5,
                limit: 4,
                ..
            })
        ));
        // A chain that points back at itself.
        let mut looped = bytes.clone();
        looped[32 + 4..32 + 8].copy_from_slice(&32u32.to_le_bytes());
        assert!(matches!(
            RegionInfoReply::decode(&looped, &limits),
            Err(CodecError::BadField {
                field: "capability next",
                ..
            })
        ));
        // cap_offset not right after the structure.
        let mut off = bytes.clone();
        off[12..16].copy_from_slice(&40u32.to_le_bytes());
        assert!(matches!(
            RegionInfoReply::decode(&off, &limits),
            Err(CodecError::BadField { .. })
        ));
        // Too many sparse areas for the limit.
        let mut areas = sample_bar1().encode_to_vec().unwrap();
        areas[40..44].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            RegionInfoReply::decode(&areas, &limits),
            Err(CodecError::TooLarge { .. })
        ));
        areas[40..44].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            RegionInfoReply::decode(&areas, &limits),
            Err(CodecError::LengthMismatch { .. })
        ));
    }

    #[test]
    fn irq_set_data_follows_the_data_flag() {
        let limits = Limits::default();
        let eventfd = IrqSet {
            argsz: 20,
            flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
            index: 0,
            start: 0,
            count: 1,
            data: &[],
        };
        let bytes = eventfd.encode_to_vec().unwrap();
        assert_eq!(hex(&bytes), "1400000024000000000000000000000001000000");
        assert_eq!(IrqSet::decode(&bytes, &limits).unwrap(), eventfd);
        let bools = IrqSet {
            flags: IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_MASK,
            count: 3,
            data: &[1, 0, 1],
            ..eventfd
        };
        let bytes = bools.encode_to_vec().unwrap();
        assert_eq!(IrqSet::decode(&bytes, &limits).unwrap(), bools);
        assert!(matches!(
            IrqSet::decode(&bytes[..22], &limits),
            Err(CodecError::LengthMismatch {
                expected: 3,
                actual: 2,
                ..
            })
        ));
        let mut two = bytes.clone();
        two[4] = (IRQ_SET_DATA_BOOL | IRQ_SET_DATA_NONE) as u8;
        assert!(matches!(
            IrqSet::decode(&two, &limits),
            Err(CodecError::BadField { .. })
        ));
    }

    #[test]
    fn io_fds_reply_round_trips_and_bounds_count() {
        let limits = Limits::default();
        let reply = RegionIoFdsReply {
            head: RegionIoFdsRequest {
                argsz: 16 + 80,
                flags: 0,
                index: 0,
                count: 2,
            },
            subregions: vec![
                IoFdSubRegion {
                    offset: 0x100,
                    size: 4,
                    fd_index: 0,
                    fd_type: IO_FD_TYPE_IOEVENTFD,
                    flags: 1,
                    data: 0xabcd,
                },
                IoFdSubRegion {
                    offset: 0x200,
                    size: 0,
                    fd_index: 1,
                    fd_type: IO_FD_TYPE_IOREGIONFD,
                    flags: 0,
                    data: 7,
                },
            ],
        };
        let bytes = reply.encode_to_vec().unwrap();
        assert_eq!(bytes.len(), 96);
        assert_eq!(&bytes[16 + 28..16 + 32], &[0, 0, 0, 0]);
        assert_eq!(RegionIoFdsReply::decode(&bytes, &limits).unwrap(), reply);
        assert!(matches!(
            RegionIoFdsReply::decode(&bytes[..95], &limits),
            Err(CodecError::LengthMismatch { .. })
        ));
        let mut low = bytes;
        low[12] = 1;
        assert!(matches!(
            RegionIoFdsReply::decode(&low, &limits),
            Err(CodecError::BadField { .. })
        ));
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }
}
