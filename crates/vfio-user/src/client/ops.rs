//! The device operations of the protocol, one request and reply each (reads and writes
//! chunked by the negotiated limits).

use std::os::fd::{BorrowedFd, OwnedFd};

use vfio_mig_uapi::{DeviceState, Errno};

use super::{bad_reply, Answer, Client, ClientError};
use crate::codec::{Command, Limits, RegionInfoReply};
use crate::codec::{
    DeviceFeature, DeviceInfo, DmaLoggingControl, DmaLoggingReport, DmaMap, DmaUnmap, FeatureData,
    IovaRange, IrqInfo, IrqSet, MigDataReadRequest, Payload, RegionAccess, RegionCap, RegionData,
    RegionInfo, RegionInfoRequest, Reply, Request, SparseMmapArea, DMA_UNMAP_FLAG_ALL,
    FEATURE_DMA_LOGGING_REPORT, FEATURE_DMA_LOGGING_START, FEATURE_DMA_LOGGING_STOP, FEATURE_GET,
    FEATURE_HEADER, FEATURE_MIGRATION, FEATURE_MIG_DATA_SIZE, FEATURE_MIG_DEVICE_STATE,
    FEATURE_PROBE, FEATURE_SET, HEADER_SIZE, IRQ_SET_ACTION_TRIGGER, IRQ_SET_DATA_EVENTFD,
    IRQ_SET_DATA_NONE, MIG_DATA_PREFIX,
};

/// One region as GET_REGION_INFO describes it.
#[derive(Debug)]
pub struct RegionDescription {
    /// The structure as the server sent it (`argsz` is the full reply size).
    pub info: RegionInfo,
    /// The mmap-able areas of the sparse-mmap capability, if any.
    pub sparse_mmap: Option<Vec<SparseMmapArea>>,
    /// The region type capability `(type, subtype)`, if any.
    pub region_type: Option<(u32, u32)>,
    /// The fd to mmap the region through, if the server passed one.
    pub fd: Option<OwnedFd>,
}

/// GET_REGION_INFO is retried with the size the server asks for at most this often.
const REGION_INFO_TRIES: usize = 3;

impl Client {
    /// DEVICE_GET_INFO.
    pub fn device_info(&self) -> Result<DeviceInfo, ClientError> {
        let request = Request::DeviceGetInfo(DeviceInfo {
            argsz: DeviceInfo::SIZE as u32,
            ..DeviceInfo::default()
        });
        self.exchange(request, &[], None, |answer, _| match answer {
            Answer::Reply(Reply::DeviceGetInfo(info), _) => Ok(info),
            _ => Err(bad_reply(Command::DeviceGetInfo, "not a device info")),
        })
    }

    /// DEVICE_GET_REGION_INFO for region `index`, capabilities included: asks with room for
    /// the bare structure and again with the size the server says it needs.
    pub fn region_info(&self, index: u32) -> Result<RegionDescription, ClientError> {
        let mut argsz = RegionInfo::SIZE as u32;
        let max_reply = self.negotiated.incoming.max_msg_size - HEADER_SIZE as u32;
        for _ in 0..REGION_INFO_TRIES {
            let request = Request::GetRegionInfo(RegionInfoRequest::new(index, argsz));
            let got = self.exchange(request, &[], None, |answer, _| match answer {
                Answer::Reply(Reply::GetRegionInfo(reply), fds) => {
                    Ok(describe_region(reply, fds, argsz))
                }
                _ => Err(bad_reply(Command::DeviceGetRegionInfo, "not a region info")),
            })??;
            match got {
                Ok(description) => return Ok(description),
                Err(needed) if needed > max_reply => {
                    return Err(bad_reply(
                        Command::DeviceGetRegionInfo,
                        format!("reply of {needed} bytes exceeds the limit {max_reply}"),
                    ))
                }
                Err(needed) => argsz = needed,
            }
        }
        Err(bad_reply(
            Command::DeviceGetRegionInfo,
            format!("the announced reply size kept growing after {REGION_INFO_TRIES} tries"),
        ))
    }

    /// DEVICE_GET_IRQ_INFO for IRQ type `index`.
    pub fn irq_info(&self, index: u32) -> Result<IrqInfo, ClientError> {
        let request = Request::GetIrqInfo(IrqInfo {
            argsz: IrqInfo::SIZE as u32,
            index,
            ..IrqInfo::default()
        });
        self.exchange(request, &[], None, |answer, _| match answer {
            Answer::Reply(Reply::GetIrqInfo(info), _) => Ok(info),
            _ => Err(bad_reply(Command::DeviceGetIrqInfo, "not an IRQ info")),
        })
    }

    /// Reads `buf.len()` bytes at `offset` of region `index` (REGION_READ, in chunks of the
    /// negotiated size, each received straight into `buf`). A short reply is an error.
    pub fn region_read(&self, index: u32, offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let chunk = self.negotiated.max_read as usize;
        let mut done = 0;
        while done < buf.len() {
            let n = chunk.min(buf.len() - done);
            let at = offset.checked_add(done as u64).ok_or_else(|| {
                ClientError::InvalidArgument(format!("offset {offset:#x} overflows"))
            })?;
            let access = RegionAccess {
                offset: at,
                region: index,
                count: n as u32,
            };
            let request = Request::RegionRead(access);
            let limits = &self.negotiated.incoming;
            self.exchange(
                request,
                &[],
                Some(&mut buf[done..done + n]),
                |answer, dest| check_region_read(&access, limits, answer, dest.unwrap_or_default()),
            )?;
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `offset` of region `index` (REGION_WRITE, in chunks of the
    /// negotiated size, each sent straight from `data`).
    pub fn region_write(&self, index: u32, offset: u64, data: &[u8]) -> Result<(), ClientError> {
        let chunk = self.negotiated.write_chunk(RegionAccess::SIZE);
        for (i, piece) in data.chunks(chunk).enumerate() {
            let at = offset.checked_add((i * chunk) as u64).ok_or_else(|| {
                ClientError::InvalidArgument(format!("offset {offset:#x} overflows"))
            })?;
            let request = Request::RegionWrite(RegionData {
                offset: at,
                region: index,
                data: piece,
            });
            self.exchange(request, &[], None, |answer, _| match answer {
                Answer::Reply(Reply::RegionWrite(done), _)
                    if done.count as usize == piece.len() =>
                {
                    Ok(())
                }
                Answer::Reply(Reply::RegionWrite(done), _) => Err(ClientError::Short {
                    command: Command::RegionWrite,
                    done: done.count as usize,
                    asked: piece.len(),
                }),
                _ => Err(bad_reply(Command::RegionWrite, "not a region write reply")),
            })?;
        }
        Ok(())
    }

    /// DMA_MAP: makes `[addr, addr + size)` of the device's address space the memory at
    /// `offset` of `fd` (or, without an fd, memory the server must reach by messages, which
    /// this client does not serve). `flags`: `DMA_MAP_FLAG_READ` | `DMA_MAP_FLAG_WRITE`.
    pub fn dma_map(
        &self,
        addr: u64,
        size: u64,
        flags: u32,
        offset: u64,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(), ClientError> {
        let request = Request::DmaMap(DmaMap {
            argsz: DmaMap::SIZE as u32,
            flags,
            offset,
            addr,
            size,
        });
        let fds: &[BorrowedFd<'_>] = match &fd {
            Some(fd) => std::slice::from_ref(fd),
            None => &[],
        };
        self.exchange(request, fds, None, |answer, _| match answer {
            Answer::Reply(Reply::DmaMap, _) => Ok(()),
            _ => Err(bad_reply(Command::DmaMap, "not a DMA_MAP reply")),
        })
    }

    /// DMA_UNMAP of the window mapped at exactly `[addr, addr + size)`.
    pub fn dma_unmap(&self, addr: u64, size: u64) -> Result<(), ClientError> {
        self.unmap(DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            flags: 0,
            addr,
            size,
        })
    }

    /// DMA_UNMAP of every window.
    pub fn dma_unmap_all(&self) -> Result<(), ClientError> {
        self.unmap(DmaUnmap {
            argsz: DmaUnmap::SIZE as u32,
            flags: DMA_UNMAP_FLAG_ALL,
            addr: 0,
            size: 0,
        })
    }

    fn unmap(&self, unmap: DmaUnmap) -> Result<(), ClientError> {
        self.exchange(
            Request::DmaUnmap(unmap),
            &[],
            None,
            |answer, _| match answer {
                Answer::Reply(Reply::DmaUnmap(_), _) => Ok(()),
                _ => Err(bad_reply(Command::DmaUnmap, "not a DMA_UNMAP reply")),
            },
        )
    }

    /// DEVICE_SET_IRQS with eventfds: interrupt `start + i` of IRQ type `index` signals
    /// `eventfds[i]`. Split into several messages when the server takes fewer fds at once.
    pub fn set_irq_eventfds(
        &self,
        index: u32,
        start: u32,
        eventfds: &[BorrowedFd<'_>],
    ) -> Result<(), ClientError> {
        let per_message = (self.negotiated.max_fds as usize).max(1);
        for (i, fds) in eventfds.chunks(per_message).enumerate() {
            let first = start
                .checked_add((i * per_message) as u32)
                .ok_or_else(|| ClientError::InvalidArgument("IRQ sub-index overflows".into()))?;
            self.set_irqs(
                IrqSet {
                    argsz: IrqSet::SIZE as u32,
                    flags: IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_TRIGGER,
                    index,
                    start: first,
                    count: fds.len() as u32,
                    data: &[],
                },
                fds,
            )?;
        }
        Ok(())
    }

    /// DEVICE_SET_IRQS removing every trigger of IRQ type `index`.
    pub fn disable_irqs(&self, index: u32) -> Result<(), ClientError> {
        self.set_irqs(
            IrqSet {
                argsz: IrqSet::SIZE as u32,
                flags: IRQ_SET_DATA_NONE | IRQ_SET_ACTION_TRIGGER,
                index,
                start: 0,
                count: 0,
                data: &[],
            },
            &[],
        )
    }

    /// DEVICE_SET_IRQS as given, with `fds` beside it.
    pub fn set_irqs(&self, irqs: IrqSet<'_>, fds: &[BorrowedFd<'_>]) -> Result<(), ClientError> {
        if fds.len() > self.negotiated.max_fds as usize {
            return Err(ClientError::InvalidArgument(format!(
                "{} fds exceed the server's max_msg_fds {}",
                fds.len(),
                self.negotiated.max_fds
            )));
        }
        self.exchange(
            Request::SetIrqs(irqs),
            fds,
            None,
            |answer, _| match answer {
                Answer::Reply(Reply::SetIrqs, _) => Ok(()),
                _ => Err(bad_reply(Command::DeviceSetIrqs, "not a SET_IRQS reply")),
            },
        )
    }

    /// DEVICE_RESET.
    pub fn device_reset(&self) -> Result<(), ClientError> {
        self.exchange(Request::DeviceReset, &[], None, |answer, _| match answer {
            Answer::Reply(Reply::DeviceReset, _) => Ok(()),
            _ => Err(bad_reply(Command::DeviceReset, "not a DEVICE_RESET reply")),
        })
    }

    /// DEVICE_FEATURE PROBE: whether the server supports feature `index` with `ops`
    /// (`FEATURE_GET` and/or `FEATURE_SET`). `ENOTTY`, `EINVAL`, `EOPNOTSUPP` and `ENOSYS`
    /// answers mean "no".
    pub fn feature_probe(&self, index: u16, ops: u32) -> Result<bool, ClientError> {
        let request = DeviceFeature::new(FEATURE_PROBE | ops, index, FeatureData::None);
        match self.feature(request, |_| Ok(())) {
            Ok(()) => Ok(true),
            Err(ClientError::Remote { errno, .. })
                if [
                    Errno::ENOTTY,
                    Errno::EINVAL,
                    Errno::EOPNOTSUPP,
                    Errno::ENOSYS,
                ]
                .contains(&errno) =>
            {
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    /// DEVICE_FEATURE GET of feature `index` sending no data and accepting `reply_len` bytes
    /// of data; returns the data.
    pub fn feature_get_raw(&self, index: u16, reply_len: usize) -> Result<Vec<u8>, ClientError> {
        let mut request = DeviceFeature::new(FEATURE_GET, index, FeatureData::None);
        request.argsz = u32::try_from(FEATURE_HEADER + reply_len)
            .map_err(|_| ClientError::InvalidArgument(format!("reply of {reply_len} bytes")))?;
        self.feature(request, |reply| match reply.data {
            FeatureData::None => Ok(Vec::new()),
            FeatureData::Raw(bytes) => Ok(bytes.to_vec()),
            other => {
                let mut bytes = Vec::new();
                DeviceFeature::new(0, index, other).encode(&mut bytes)?;
                Ok(bytes.split_off(FEATURE_HEADER))
            }
        })
    }

    /// DEVICE_FEATURE SET of feature `index` with raw `data`.
    pub fn feature_set_raw(&self, index: u16, data: &[u8]) -> Result<(), ClientError> {
        let request = DeviceFeature::new(FEATURE_SET, index, FeatureData::Raw(data));
        self.feature(request, |_| Ok(()))
    }

    /// MIGRATION GET: the raw capability flags.
    pub fn migration_flags(&self) -> Result<u64, ClientError> {
        let request = DeviceFeature::new(
            FEATURE_GET,
            FEATURE_MIGRATION,
            FeatureData::Migration { flags: 0 },
        );
        self.feature(request, |reply| match reply.data {
            FeatureData::Migration { flags } => Ok(flags),
            _ => Err(bad_reply(
                Command::DeviceFeature,
                "MIGRATION GET without flags",
            )),
        })
    }

    /// MIG_DEVICE_STATE GET.
    pub fn mig_state(&self) -> Result<DeviceState, ClientError> {
        let request = DeviceFeature::new(
            FEATURE_GET,
            FEATURE_MIG_DEVICE_STATE,
            FeatureData::MigDeviceState {
                state: DeviceState::Error,
                data_fd: -1,
            },
        );
        self.feature(request, |reply| match reply.data {
            FeatureData::MigDeviceState { state, .. } => Ok(state),
            _ => Err(bad_reply(
                Command::DeviceFeature,
                "MIG_DEVICE_STATE GET without a state",
            )),
        })
    }

    /// MIG_DEVICE_STATE SET: the server walks every arc to `target` before it answers.
    pub fn set_mig_state(&self, target: DeviceState) -> Result<(), ClientError> {
        let request = DeviceFeature::new(
            FEATURE_SET,
            FEATURE_MIG_DEVICE_STATE,
            FeatureData::MigDeviceState {
                state: target,
                data_fd: -1,
            },
        );
        self.feature(request, |_| Ok(()))
    }

    /// MIG_DATA_SIZE GET: the estimated length of the STOP_COPY stream.
    pub fn mig_data_size(&self) -> Result<u64, ClientError> {
        let request = DeviceFeature::new(
            FEATURE_GET,
            FEATURE_MIG_DATA_SIZE,
            FeatureData::MigDataSize {
                stop_copy_length: 0,
            },
        );
        self.feature(request, |reply| match reply.data {
            FeatureData::MigDataSize { stop_copy_length } => Ok(stop_copy_length),
            _ => Err(bad_reply(
                Command::DeviceFeature,
                "MIG_DATA_SIZE GET without a length",
            )),
        })
    }

    /// DMA_LOGGING_START with `page_size` over `ranges`.
    pub fn dma_logging_start(
        &self,
        page_size: u64,
        ranges: &[IovaRange],
    ) -> Result<(), ClientError> {
        let request = DeviceFeature::new(
            FEATURE_SET,
            FEATURE_DMA_LOGGING_START,
            FeatureData::DmaLogging(DmaLoggingControl {
                page_size,
                ranges: ranges.to_vec(),
            }),
        );
        self.feature(request, |_| Ok(()))
    }

    /// DMA_LOGGING_STOP (sent with START's layout, which libvfio-user expects).
    pub fn dma_logging_stop(&self, page_size: u64) -> Result<(), ClientError> {
        let request = DeviceFeature::new(
            FEATURE_SET,
            FEATURE_DMA_LOGGING_STOP,
            FeatureData::DmaLogging(DmaLoggingControl {
                page_size,
                ranges: Vec::new(),
            }),
        );
        self.feature(request, |_| Ok(()))
    }

    /// DMA_LOGGING_REPORT of `[iova, iova + length)`: ORs the dirty bits (page k at bit
    /// k % 64 of word k / 64) into `bitmap`. Windows whose bitmap would exceed the
    /// negotiated message size are asked for in pieces of whole 64-page words.
    pub fn dma_logging_report(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        bitmap: &mut [u64],
    ) -> Result<(), ClientError> {
        if !page_size.is_power_of_two() {
            return Err(ClientError::InvalidArgument(format!(
                "page size {page_size} is not a power of two"
            )));
        }
        let pages = length.div_ceil(page_size);
        let words = pages.div_ceil(64);
        if (bitmap.len() as u64) < words {
            return Err(ClientError::InvalidArgument(format!(
                "bitmap of {} words, the window needs {words}",
                bitmap.len()
            )));
        }
        let overhead = (HEADER_SIZE + FEATURE_HEADER + 24) as u64;
        let max_words = (u64::from(self.negotiated.incoming.max_msg_size) - overhead) / 8;
        let piece_len = max_words
            .saturating_mul(64)
            .saturating_mul(page_size)
            .max(page_size * 64);
        let mut word = 0usize;
        let mut done = 0u64;
        while done < length {
            let len = piece_len.min(length - done);
            let piece_words = len.div_ceil(page_size).div_ceil(64) as usize;
            let at = iova + done;
            let out = &mut bitmap[word..word + piece_words];
            self.report_piece(at, len, page_size, out)?;
            word += piece_words;
            done += len;
        }
        Ok(())
    }

    fn report_piece(
        &self,
        iova: u64,
        length: u64,
        page_size: u64,
        out: &mut [u64],
    ) -> Result<(), ClientError> {
        let query = DmaLoggingReport {
            iova,
            length,
            page_size,
            bitmap: &[],
        };
        let bitmap_len = query.bitmap_len(&self.negotiated.incoming)?;
        let mut request = DeviceFeature::new(
            FEATURE_GET,
            FEATURE_DMA_LOGGING_REPORT,
            FeatureData::DmaLoggingReport(query),
        );
        request.argsz = (FEATURE_HEADER + 24 + bitmap_len) as u32;
        self.feature(request, |reply| match reply.data {
            FeatureData::DmaLoggingReport(r)
                if (r.iova, r.length, r.page_size) == (iova, length, page_size)
                    && r.bitmap.len() == bitmap_len =>
            {
                for (dst, src) in out.iter_mut().zip(r.bitmap_words()) {
                    *dst |= src;
                }
                Ok(())
            }
            _ => Err(bad_reply(
                Command::DeviceFeature,
                "DMA_LOGGING_REPORT reply does not match the window asked for",
            )),
        })
    }

    /// One DEVICE_FEATURE exchange; `handle` gets the decoded reply.
    pub(super) fn feature<T>(
        &self,
        request: DeviceFeature<'_>,
        handle: impl FnOnce(DeviceFeature<'_>) -> Result<T, ClientError>,
    ) -> Result<T, ClientError> {
        self.exchange(
            Request::DeviceFeature(request),
            &[],
            None,
            |answer, _| match answer {
                Answer::Reply(Reply::DeviceFeature(reply), _) => handle(reply),
                _ => Err(bad_reply(
                    Command::DeviceFeature,
                    "not a DEVICE_FEATURE reply",
                )),
            },
        )
    }

    /// One MIG_DATA_READ of up to `buf.len()` bytes (at most the negotiated read size),
    /// received straight into `buf`; returns the bytes the server gave.
    pub fn mig_data_read(&self, buf: &mut [u8]) -> Result<usize, ClientError> {
        self.read_mig_data(buf, false)
    }

    /// One MIG_DATA_WRITE of the first bytes of `data` (as many as one message may carry),
    /// sent straight from `data`; waits for its reply and returns how many were written.
    pub fn mig_data_write(&self, data: &[u8]) -> Result<usize, ClientError> {
        self.write_mig_data(data, false)
    }
}

/// A region-info reply as a description, or the reply size needed when it only announces it.
fn describe_region(
    reply: RegionInfoReply<'_>,
    fds: Vec<OwnedFd>,
    asked: u32,
) -> Result<Result<RegionDescription, u32>, ClientError> {
    if reply.info.argsz > asked && reply.caps.is_empty() {
        return Ok(Err(reply.info.argsz));
    }
    if fds.len() > 1 {
        return Err(bad_reply(
            Command::DeviceGetRegionInfo,
            format!("{} fds with one region", fds.len()),
        ));
    }
    let mut sparse_mmap = None;
    let mut region_type = None;
    for cap in reply.caps {
        match cap {
            RegionCap::SparseMmap(areas) => sparse_mmap = Some(areas),
            RegionCap::Type {
                region_type: t,
                subtype,
            } => region_type = Some((t, subtype)),
            RegionCap::Other { id, version, .. } => {
                tracing::debug!(id, version, "ignoring unknown region capability")
            }
        }
    }
    Ok(Ok(RegionDescription {
        info: reply.info,
        sparse_mmap,
        region_type,
        fd: fds.into_iter().next(),
    }))
}

/// Checks a REGION_READ reply; the data is in `dest` (direct) or copied there.
fn check_region_read(
    access: &RegionAccess,
    limits: &Limits,
    answer: Answer<'_>,
    dest: &mut [u8],
) -> Result<(), ClientError> {
    let (offset, region, len) = match answer {
        Answer::Direct {
            prefix,
            len,
            trailing,
            ..
        } => {
            let got = RegionAccess::decode(prefix, limits)?;
            if !trailing.is_empty() || got.count as usize != len {
                return Err(bad_reply(
                    Command::RegionRead,
                    "data length disagrees with count",
                ));
            }
            (got.offset, got.region, len)
        }
        Answer::Reply(Reply::RegionRead(data), _) => {
            // The codec checked offset and region against the request already.
            let n = data.data.len().min(dest.len());
            dest[..n].copy_from_slice(&data.data[..n]);
            (data.offset, data.region, data.data.len())
        }
        Answer::Reply(..) => return Err(bad_reply(Command::RegionRead, "not a region read reply")),
    };
    if (offset, region) != (access.offset, access.region) {
        return Err(bad_reply(
            Command::RegionRead,
            format!("reply for region {region} offset {offset:#x}"),
        ));
    }
    if len != access.count as usize {
        return Err(ClientError::Short {
            command: Command::RegionRead,
            done: len,
            asked: access.count as usize,
        });
    }
    Ok(())
}

/// Checks a MIG_DATA_READ reply to a request for `asked` bytes; returns the data length.
/// libvfio-user pads replies to the size asked for: trailing zeros up to that are accepted.
pub(super) fn check_mig_data_read(
    asked: u32,
    limits: &Limits,
    answer: Answer<'_>,
    dest: &mut [u8],
) -> Result<usize, ClientError> {
    let (argsz, len, padding) = match answer {
        Answer::Direct {
            prefix,
            len,
            trailing,
            ..
        } => {
            let head = MigDataReadRequest::decode(prefix, limits)?;
            if head.size as usize != len {
                return Err(bad_reply(
                    Command::MigDataRead,
                    "size disagrees with the data",
                ));
            }
            (head.argsz, len, trailing.len())
        }
        Answer::Reply(Reply::MigDataRead(reply), _) => {
            let n = reply.data.len();
            if n > dest.len() {
                return Err(bad_reply(
                    Command::MigDataRead,
                    format!("{n} bytes for a {}-byte buffer", dest.len()),
                ));
            }
            dest[..n].copy_from_slice(reply.data);
            (reply.argsz, n, reply.padding as usize)
        }
        Answer::Reply(..) => {
            return Err(bad_reply(Command::MigDataRead, "not a MIG_DATA_READ reply"))
        }
    };
    if len > asked as usize || len + padding > asked as usize {
        return Err(bad_reply(
            Command::MigDataRead,
            format!("{len} bytes and {padding} padding for {asked} asked"),
        ));
    }
    if argsz as usize != MIG_DATA_PREFIX + len {
        tracing::debug!(argsz, len, "MIG_DATA_READ reply argsz is not 8 + size");
    }
    Ok(len)
}
