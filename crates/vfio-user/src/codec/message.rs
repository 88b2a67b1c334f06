//! Whole messages: every request and reply of every command, tied to its header.

use super::device::{
    DeviceInfo, IrqInfo, IrqSet, RegionInfoReply, RegionInfoRequest, RegionIoFdsReply,
    RegionIoFdsRequest,
};
use super::dma::{DmaAccess, DmaData, DmaMap, DmaUnmap};
use super::feature::DeviceFeature;
use super::header::{
    msg_size_for, Command, Header, MessageKind, FLAGS_ERROR, FLAGS_NO_REPLY, FLAGS_TYPE_COMMAND,
    FLAGS_TYPE_REPLY, HEADER_SIZE,
};
use super::migration::{MigDataReadReply, MigDataReadRequest, MigDataWrite};
use super::region::{RegionAccess, RegionData, WriteMulti, WriteMultiReply};
use super::version::Version;
use super::wire::WireBuf;
use super::{Bulk, CodecError, Limits, Payload};
use vfio_mig_uapi::Errno;

/// A command's payload, by command.
#[derive(Clone, Debug, PartialEq)]
pub enum Request<'a> {
    /// VERSION.
    Version(Version<'a>),
    /// DMA_MAP (an fd may travel beside it).
    DmaMap(DmaMap),
    /// DMA_UNMAP.
    DmaUnmap(DmaUnmap),
    /// DEVICE_GET_INFO.
    DeviceGetInfo(DeviceInfo),
    /// DEVICE_GET_REGION_INFO.
    GetRegionInfo(RegionInfoRequest),
    /// DEVICE_GET_REGION_IO_FDS.
    GetRegionIoFds(RegionIoFdsRequest),
    /// DEVICE_GET_IRQ_INFO.
    GetIrqInfo(IrqInfo),
    /// DEVICE_SET_IRQS (eventfds may travel beside it).
    SetIrqs(IrqSet<'a>),
    /// REGION_READ.
    RegionRead(RegionAccess),
    /// REGION_WRITE (data borrowed).
    RegionWrite(RegionData<'a>),
    /// DMA_READ, server to client.
    DmaRead(DmaAccess),
    /// DMA_WRITE, server to client (data borrowed).
    DmaWrite(DmaData<'a>),
    /// DEVICE_RESET (no payload).
    DeviceReset,
    /// REGION_WRITE_MULTI.
    RegionWriteMulti(WriteMulti),
    /// DEVICE_FEATURE.
    DeviceFeature(DeviceFeature<'a>),
    /// MIG_DATA_READ.
    MigDataRead(MigDataReadRequest),
    /// MIG_DATA_WRITE (data borrowed).
    MigDataWrite(MigDataWrite<'a>),
}

/// A successful reply's payload, by command.
#[derive(Clone, Debug, PartialEq)]
pub enum Reply<'a> {
    /// VERSION.
    Version(Version<'a>),
    /// DMA_MAP (no payload).
    DmaMap,
    /// DMA_UNMAP: the request echoed, or nothing.
    DmaUnmap(Option<DmaUnmap>),
    /// DEVICE_GET_INFO.
    DeviceGetInfo(DeviceInfo),
    /// DEVICE_GET_REGION_INFO (an fd may travel beside it).
    GetRegionInfo(RegionInfoReply<'a>),
    /// DEVICE_GET_REGION_IO_FDS (fds travel beside it).
    GetRegionIoFds(RegionIoFdsReply),
    /// DEVICE_GET_IRQ_INFO.
    GetIrqInfo(IrqInfo),
    /// DEVICE_SET_IRQS (no payload).
    SetIrqs,
    /// REGION_READ (data borrowed).
    RegionRead(RegionData<'a>),
    /// REGION_WRITE: the access header, `count` = bytes written.
    RegionWrite(RegionAccess),
    /// DMA_READ, client to server (data borrowed).
    DmaRead(DmaData<'a>),
    /// DMA_WRITE, client to server.
    DmaWrite(DmaAccess),
    /// DEVICE_RESET (no payload).
    DeviceReset,
    /// REGION_WRITE_MULTI.
    RegionWriteMulti(WriteMultiReply),
    /// DEVICE_FEATURE.
    DeviceFeature(DeviceFeature<'a>),
    /// MIG_DATA_READ (data borrowed, padding counted).
    MigDataRead(MigDataReadReply<'a>),
    /// MIG_DATA_WRITE (no payload).
    MigDataWrite,
}

/// An error reply: the errno from the header and whatever payload came with it (usually
/// none; libvfio-user echoes the request payload of some failed DEVICE_FEATURE SETs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErrorReply<'a> {
    /// Raw command number (an error reply may answer a command this codec does not know).
    pub cmd: u16,
    /// Raw `error` field: the errno (0 is allowed by the protocol).
    pub error: u32,
    /// Payload, borrowed; not interpreted.
    pub payload: &'a [u8],
}

impl ErrorReply<'_> {
    /// The errno.
    pub fn errno(&self) -> Errno {
        Errno::new(i32::try_from(self.error).unwrap_or(i32::MAX))
    }
}

/// What a message carries after its header.
#[derive(Clone, Debug, PartialEq)]
pub enum Body<'a> {
    /// A command.
    Request(Request<'a>),
    /// A successful reply.
    Reply(Reply<'a>),
    /// An error reply.
    Error(ErrorReply<'a>),
}

/// A whole message: msg_id, NO_REPLY and the body; the header is derived from them.
#[derive(Clone, Debug, PartialEq)]
pub struct Message<'a> {
    /// Message id (echoed by replies).
    pub msg_id: u16,
    /// NO_REPLY bit (commands only).
    pub no_reply: bool,
    /// The body.
    pub body: Body<'a>,
}

impl<'a> Request<'a> {
    /// The command this payload belongs to.
    pub fn command(&self) -> Command {
        match self {
            Request::Version(_) => Command::Version,
            Request::DmaMap(_) => Command::DmaMap,
            Request::DmaUnmap(_) => Command::DmaUnmap,
            Request::DeviceGetInfo(_) => Command::DeviceGetInfo,
            Request::GetRegionInfo(_) => Command::DeviceGetRegionInfo,
            Request::GetRegionIoFds(_) => Command::DeviceGetRegionIoFds,
            Request::GetIrqInfo(_) => Command::DeviceGetIrqInfo,
            Request::SetIrqs(_) => Command::DeviceSetIrqs,
            Request::RegionRead(_) => Command::RegionRead,
            Request::RegionWrite(_) => Command::RegionWrite,
            Request::DmaRead(_) => Command::DmaRead,
            Request::DmaWrite(_) => Command::DmaWrite,
            Request::DeviceReset => Command::DeviceReset,
            Request::RegionWriteMulti(_) => Command::RegionWriteMulti,
            Request::DeviceFeature(_) => Command::DeviceFeature,
            Request::MigDataRead(_) => Command::MigDataRead,
            Request::MigDataWrite(_) => Command::MigDataWrite,
        }
    }

    /// Decodes the payload of command `cmd`.
    pub fn decode(cmd: Command, payload: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        Ok(match cmd {
            Command::Version => Request::Version(Version::decode(payload, limits)?),
            Command::DmaMap => Request::DmaMap(DmaMap::decode(payload, limits)?),
            Command::DmaUnmap => Request::DmaUnmap(DmaUnmap::decode(payload, limits)?),
            Command::DeviceGetInfo => Request::DeviceGetInfo(DeviceInfo::decode(payload, limits)?),
            Command::DeviceGetRegionInfo => {
                Request::GetRegionInfo(RegionInfoRequest::decode(payload, limits)?)
            }
            Command::DeviceGetRegionIoFds => {
                Request::GetRegionIoFds(RegionIoFdsRequest::decode(payload, limits)?)
            }
            Command::DeviceGetIrqInfo => Request::GetIrqInfo(IrqInfo::decode(payload, limits)?),
            Command::DeviceSetIrqs => Request::SetIrqs(IrqSet::decode(payload, limits)?),
            Command::RegionRead => Request::RegionRead(RegionAccess::decode(payload, limits)?),
            Command::RegionWrite => Request::RegionWrite(RegionData::decode(payload, limits)?),
            Command::DmaRead => Request::DmaRead(DmaAccess::decode(payload, limits)?),
            Command::DmaWrite => Request::DmaWrite(DmaData::decode(payload, limits)?),
            Command::DeviceReset => {
                empty(payload, "DEVICE_RESET request")?;
                Request::DeviceReset
            }
            Command::DirtyPages => return Err(CodecError::UnsupportedCommand(cmd)),
            Command::RegionWriteMulti => {
                Request::RegionWriteMulti(WriteMulti::decode(payload, limits)?)
            }
            Command::DeviceFeature => {
                Request::DeviceFeature(DeviceFeature::decode(payload, limits)?)
            }
            Command::MigDataRead => {
                Request::MigDataRead(MigDataReadRequest::decode(payload, limits)?)
            }
            Command::MigDataWrite => Request::MigDataWrite(MigDataWrite::decode(payload, limits)?),
        })
    }

    /// Encoded payload size.
    pub fn encoded_len(&self) -> usize {
        match self {
            Request::Version(p) => p.encoded_len(),
            Request::DmaMap(p) => p.encoded_len(),
            Request::DmaUnmap(p) => p.encoded_len(),
            Request::DeviceGetInfo(p) => p.encoded_len(),
            Request::GetRegionInfo(p) => p.encoded_len(),
            Request::GetRegionIoFds(p) => p.encoded_len(),
            Request::GetIrqInfo(p) => p.encoded_len(),
            Request::SetIrqs(p) => p.encoded_len(),
            Request::RegionRead(p) => p.encoded_len(),
            Request::RegionWrite(p) => p.encoded_len(),
            Request::DmaRead(p) => p.encoded_len(),
            Request::DmaWrite(p) => p.encoded_len(),
            Request::DeviceReset => 0,
            Request::RegionWriteMulti(p) => p.encoded_len(),
            Request::DeviceFeature(p) => p.encoded_len(),
            Request::MigDataRead(p) => p.encoded_len(),
            Request::MigDataWrite(p) => p.encoded_len(),
        }
    }

    /// Writes the payload up to its bulk data; returns the bulk data to send after it.
    pub fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        match self {
            Request::Version(p) => p.encode_head(out),
            Request::DmaMap(p) => p.encode_head(out),
            Request::DmaUnmap(p) => p.encode_head(out),
            Request::DeviceGetInfo(p) => p.encode_head(out),
            Request::GetRegionInfo(p) => p.encode_head(out),
            Request::GetRegionIoFds(p) => p.encode_head(out),
            Request::GetIrqInfo(p) => p.encode_head(out),
            Request::SetIrqs(p) => p.encode_head(out),
            Request::RegionRead(p) => p.encode_head(out),
            Request::RegionWrite(p) => p.encode_head(out),
            Request::DmaRead(p) => p.encode_head(out),
            Request::DmaWrite(p) => p.encode_head(out),
            Request::DeviceReset => Ok(Bulk::NONE),
            Request::RegionWriteMulti(p) => p.encode_head(out),
            Request::DeviceFeature(p) => p.encode_head(out),
            Request::MigDataRead(p) => p.encode_head(out),
            Request::MigDataWrite(p) => p.encode_head(out),
        }
    }
}

impl<'a> Reply<'a> {
    /// The command this payload answers.
    pub fn command(&self) -> Command {
        match self {
            Reply::Version(_) => Command::Version,
            Reply::DmaMap => Command::DmaMap,
            Reply::DmaUnmap(_) => Command::DmaUnmap,
            Reply::DeviceGetInfo(_) => Command::DeviceGetInfo,
            Reply::GetRegionInfo(_) => Command::DeviceGetRegionInfo,
            Reply::GetRegionIoFds(_) => Command::DeviceGetRegionIoFds,
            Reply::GetIrqInfo(_) => Command::DeviceGetIrqInfo,
            Reply::SetIrqs => Command::DeviceSetIrqs,
            Reply::RegionRead(_) => Command::RegionRead,
            Reply::RegionWrite(_) => Command::RegionWrite,
            Reply::DmaRead(_) => Command::DmaRead,
            Reply::DmaWrite(_) => Command::DmaWrite,
            Reply::DeviceReset => Command::DeviceReset,
            Reply::RegionWriteMulti(_) => Command::RegionWriteMulti,
            Reply::DeviceFeature(_) => Command::DeviceFeature,
            Reply::MigDataRead(_) => Command::MigDataRead,
            Reply::MigDataWrite => Command::MigDataWrite,
        }
    }

    /// Decodes the payload of a successful reply to command `cmd`.
    pub fn decode(cmd: Command, payload: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        Ok(match cmd {
            Command::Version => Reply::Version(Version::decode(payload, limits)?),
            Command::DmaMap => {
                empty(payload, "DMA_MAP reply")?;
                Reply::DmaMap
            }
            Command::DmaUnmap if payload.is_empty() => Reply::DmaUnmap(None),
            Command::DmaUnmap => Reply::DmaUnmap(Some(DmaUnmap::decode(payload, limits)?)),
            Command::DeviceGetInfo => Reply::DeviceGetInfo(DeviceInfo::decode(payload, limits)?),
            Command::DeviceGetRegionInfo => {
                Reply::GetRegionInfo(RegionInfoReply::decode(payload, limits)?)
            }
            Command::DeviceGetRegionIoFds => {
                Reply::GetRegionIoFds(RegionIoFdsReply::decode(payload, limits)?)
            }
            Command::DeviceGetIrqInfo => Reply::GetIrqInfo(IrqInfo::decode(payload, limits)?),
            Command::DeviceSetIrqs => {
                empty(payload, "SET_IRQS reply")?;
                Reply::SetIrqs
            }
            Command::RegionRead => Reply::RegionRead(RegionData::decode(payload, limits)?),
            Command::RegionWrite => Reply::RegionWrite(RegionAccess::decode(payload, limits)?),
            Command::DmaRead => Reply::DmaRead(DmaData::decode(payload, limits)?),
            Command::DmaWrite => Reply::DmaWrite(DmaAccess::decode(payload, limits)?),
            Command::DeviceReset => {
                empty(payload, "DEVICE_RESET reply")?;
                Reply::DeviceReset
            }
            Command::DirtyPages => return Err(CodecError::UnsupportedCommand(cmd)),
            Command::RegionWriteMulti => {
                Reply::RegionWriteMulti(WriteMultiReply::decode(payload, limits)?)
            }
            Command::DeviceFeature => Reply::DeviceFeature(DeviceFeature::decode(payload, limits)?),
            Command::MigDataRead => Reply::MigDataRead(MigDataReadReply::decode(payload, limits)?),
            Command::MigDataWrite => {
                empty(payload, "MIG_DATA_WRITE reply")?;
                Reply::MigDataWrite
            }
        })
    }

    /// Encoded payload size, padding included.
    pub fn encoded_len(&self) -> usize {
        match self {
            Reply::Version(p) => p.encoded_len(),
            Reply::DmaUnmap(p) => p.as_ref().map_or(0, |p| p.encoded_len()),
            Reply::DeviceGetInfo(p) => p.encoded_len(),
            Reply::GetRegionInfo(p) => p.encoded_len(),
            Reply::GetRegionIoFds(p) => p.encoded_len(),
            Reply::GetIrqInfo(p) => p.encoded_len(),
            Reply::RegionRead(p) => p.encoded_len(),
            Reply::RegionWrite(p) => p.encoded_len(),
            Reply::DmaRead(p) => p.encoded_len(),
            Reply::DmaWrite(p) => p.encoded_len(),
            Reply::RegionWriteMulti(p) => p.encoded_len(),
            Reply::DeviceFeature(p) => p.encoded_len(),
            Reply::MigDataRead(p) => p.encoded_len(),
            Reply::DmaMap | Reply::SetIrqs | Reply::DeviceReset | Reply::MigDataWrite => 0,
        }
    }

    /// Writes the payload up to its bulk data; returns the bulk data to send after it.
    pub fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        match self {
            Reply::Version(p) => p.encode_head(out),
            Reply::DmaUnmap(Some(p)) => p.encode_head(out),
            Reply::DeviceGetInfo(p) => p.encode_head(out),
            Reply::GetRegionInfo(p) => p.encode_head(out),
            Reply::GetRegionIoFds(p) => p.encode_head(out),
            Reply::GetIrqInfo(p) => p.encode_head(out),
            Reply::RegionRead(p) => p.encode_head(out),
            Reply::RegionWrite(p) => p.encode_head(out),
            Reply::DmaRead(p) => p.encode_head(out),
            Reply::DmaWrite(p) => p.encode_head(out),
            Reply::RegionWriteMulti(p) => p.encode_head(out),
            Reply::DeviceFeature(p) => p.encode_head(out),
            Reply::MigDataRead(p) => p.encode_head(out),
            Reply::DmaUnmap(None)
            | Reply::DmaMap
            | Reply::SetIrqs
            | Reply::DeviceReset
            | Reply::MigDataWrite => Ok(Bulk::NONE),
        }
    }

    /// Checks that this reply answers `request`: same command, same target (region, address,
    /// index, feature), no more data than asked for, and padding (MIG_DATA_READ) only up to
    /// the size asked for.
    pub fn check_answers(&self, request: &Request<'_>) -> Result<(), CodecError> {
        let mismatch = |field, request: u64, reply: u64| {
            if request == reply {
                Ok(())
            } else {
                Err(CodecError::ReplyMismatch {
                    field,
                    request,
                    reply,
                })
            }
        };
        let at_most = |field, request: u64, reply: u64| {
            if reply <= request {
                Ok(())
            } else {
                Err(CodecError::ReplyMismatch {
                    field,
                    request,
                    reply,
                })
            }
        };
        mismatch(
            "command",
            request.command().raw().into(),
            self.command().raw().into(),
        )?;
        match (request, self) {
            (Request::Version(q), Reply::Version(p)) => {
                mismatch("major version", q.major.into(), p.major.into())?;
                at_most("minor version", q.minor.into(), p.minor.into())
            }
            (Request::DmaUnmap(q), Reply::DmaUnmap(Some(p))) => {
                mismatch("DMA_UNMAP addr", q.addr, p.addr)?;
                mismatch("DMA_UNMAP size", q.size, p.size)
            }
            (Request::GetRegionInfo(q), Reply::GetRegionInfo(p)) => {
                mismatch("region index", q.info.index.into(), p.info.index.into())
            }
            (Request::GetRegionIoFds(q), Reply::GetRegionIoFds(p)) => {
                mismatch("region index", q.index.into(), p.head.index.into())
            }
            (Request::GetIrqInfo(q), Reply::GetIrqInfo(p)) => {
                mismatch("IRQ index", q.index.into(), p.index.into())
            }
            (Request::RegionRead(q), Reply::RegionRead(p)) => {
                mismatch("region", q.region.into(), p.region.into())?;
                mismatch("region offset", q.offset, p.offset)?;
                at_most("region read count", q.count.into(), p.data.len() as u64)
            }
            (Request::RegionWrite(q), Reply::RegionWrite(p)) => {
                mismatch("region", q.region.into(), p.region.into())?;
                mismatch("region offset", q.offset, p.offset)?;
                at_most("region write count", q.data.len() as u64, p.count.into())
            }
            (Request::DmaRead(q), Reply::DmaRead(p)) => {
                mismatch("DMA addr", q.addr, p.addr)?;
                at_most("DMA read count", q.count, p.data.len() as u64)
            }
            (Request::DmaWrite(q), Reply::DmaWrite(p)) => {
                mismatch("DMA addr", q.addr, p.addr)?;
                at_most("DMA write count", q.data.len() as u64, p.count)
            }
            (Request::RegionWriteMulti(q), Reply::RegionWriteMulti(p)) => {
                at_most("REGION_WRITE_MULTI count", q.writes.len() as u64, p.count)
            }
            (Request::DeviceFeature(q), Reply::DeviceFeature(p)) => {
                mismatch("feature flags", q.flags.into(), p.flags.into())
            }
            (Request::MigDataRead(q), Reply::MigDataRead(p)) => {
                at_most("MIG_DATA_READ size", q.size.into(), p.data.len() as u64)?;
                at_most(
                    "MIG_DATA_READ padded size",
                    q.size.into(),
                    p.data.len() as u64 + u64::from(p.padding),
                )
            }
            _ => Ok(()),
        }
    }
}

fn empty(payload: &[u8], what: &'static str) -> Result<(), CodecError> {
    if payload.is_empty() {
        Ok(())
    } else {
        Err(CodecError::LengthMismatch {
            what,
            expected: 0,
            actual: payload.len(),
        })
    }
}

impl<'a> Body<'a> {
    /// Decodes the payload of a message whose header was already checked with
    /// [`Header::check`]; `payload` must be exactly the `msg_size - 16` bytes after it.
    ///
    /// A command with an unknown number fails with [`CodecError::UnknownCommand`]; the
    /// header still holds the msg_id and command to answer it with
    /// [`Header::error_reply_to`].
    pub fn decode(header: &Header, payload: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        let kind = header.check(limits)?;
        if payload.len() != header.payload_len() {
            return Err(CodecError::LengthMismatch {
                what: "payload after the header",
                expected: header.payload_len(),
                actual: payload.len(),
            });
        }
        if header.is_error() {
            return Ok(Body::Error(ErrorReply {
                cmd: header.cmd,
                error: header.error,
                payload,
            }));
        }
        let cmd = header.command()?;
        Ok(match kind {
            MessageKind::Command => Body::Request(Request::decode(cmd, payload, limits)?),
            MessageKind::Reply => Body::Reply(Reply::decode(cmd, payload, limits)?),
        })
    }

    /// The raw command number.
    pub fn cmd(&self) -> u16 {
        match self {
            Body::Request(r) => r.command().raw(),
            Body::Reply(r) => r.command().raw(),
            Body::Error(e) => e.cmd,
        }
    }

    /// Encoded payload size.
    pub fn encoded_len(&self) -> usize {
        match self {
            Body::Request(r) => r.encoded_len(),
            Body::Reply(r) => r.encoded_len(),
            Body::Error(e) => e.payload.len(),
        }
    }

    /// Writes the payload up to its bulk data; returns the bulk data to send after it.
    pub fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        match self {
            Body::Request(r) => r.encode_head(out),
            Body::Reply(r) => r.encode_head(out),
            Body::Error(e) => Ok(Bulk::data(e.payload)),
        }
    }
}

impl<'a> Message<'a> {
    /// A command.
    pub fn request(msg_id: u16, request: Request<'a>) -> Self {
        Message {
            msg_id,
            no_reply: false,
            body: Body::Request(request),
        }
    }

    /// A successful reply.
    pub fn reply(msg_id: u16, reply: Reply<'a>) -> Self {
        Message {
            msg_id,
            no_reply: false,
            body: Body::Reply(reply),
        }
    }

    /// A header-only error reply to the command in `request`.
    pub fn error_reply(request: &Header, errno: Errno) -> Message<'static> {
        Message {
            msg_id: request.msg_id,
            no_reply: false,
            body: Body::Error(ErrorReply {
                cmd: request.cmd,
                error: errno.raw().unsigned_abs(),
                payload: &[],
            }),
        }
    }

    /// Decodes one whole message; `bytes` must be exactly `msg_size` long.
    pub fn decode(bytes: &'a [u8], limits: &Limits) -> Result<Self, CodecError> {
        let header = Header::decode(bytes)?;
        let body = Body::decode(&header, bytes.get(HEADER_SIZE..).unwrap_or(&[]), limits)?;
        Ok(Message {
            msg_id: header.msg_id,
            no_reply: header.no_reply(),
            body,
        })
    }

    /// The header this message is sent with.
    pub fn header(&self) -> Result<Header, CodecError> {
        let (flags, error) = match &self.body {
            Body::Request(_) if self.no_reply => (FLAGS_TYPE_COMMAND | FLAGS_NO_REPLY, 0),
            Body::Request(_) => (FLAGS_TYPE_COMMAND, 0),
            Body::Reply(_) => (FLAGS_TYPE_REPLY, 0),
            Body::Error(e) => (FLAGS_TYPE_REPLY | FLAGS_ERROR, e.error),
        };
        Ok(Header {
            msg_id: self.msg_id,
            cmd: self.body.cmd(),
            msg_size: msg_size_for(self.body.encoded_len())?,
            flags,
            error,
        })
    }

    /// Encoded size of the whole message.
    pub fn encoded_len(&self) -> usize {
        HEADER_SIZE + self.body.encoded_len()
    }

    /// Writes the header and the payload up to its bulk data, and returns the bulk data (and
    /// zero padding) that completes the message. With a [`super::HeadBuf`] this encodes a
    /// data-carrying message without copying its data: send the head, then the data, e.g.
    /// with one `sendmsg`.
    pub fn encode_head<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<Bulk<'a>, CodecError> {
        self.header()?.encode(out)?;
        self.body.encode_head(out)
    }

    /// Writes the whole message.
    pub fn encode<W: WireBuf + ?Sized>(&self, out: &mut W) -> Result<(), CodecError> {
        let bulk = self.encode_head(out)?;
        out.put(bulk.data)?;
        out.put_zeros(bulk.padding)
    }
}
