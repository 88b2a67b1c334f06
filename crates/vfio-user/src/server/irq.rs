//! Interrupts of one connection: the eventfds DEVICE_SET_IRQS gave for each IRQ index, and
//! triggering them.

use std::os::fd::OwnedFd;

use vfio_mig_device::{DeviceError, IrqInfo};
use vfio_mig_uapi::Errno;

use crate::codec::{
    IrqSet, IRQ_SET_ACTION_MASK, IRQ_SET_ACTION_TRIGGER, IRQ_SET_ACTION_UNMASK, IRQ_SET_DATA_BOOL,
    IRQ_SET_DATA_EVENTFD, IRQ_SET_DATA_NONE,
};

/// IRQ indices of a PCI device: INTx, MSI, MSI-X, ERR, REQ.
pub const NUM_IRQ_INDICES: u32 = 5;

const ACTIONS: u32 = IRQ_SET_ACTION_MASK | IRQ_SET_ACTION_UNMASK | IRQ_SET_ACTION_TRIGGER;
const DATA: u32 = IRQ_SET_DATA_NONE | IRQ_SET_DATA_BOOL | IRQ_SET_DATA_EVENTFD;

/// One vector: its trigger eventfd and whether it is masked.
#[derive(Debug, Default)]
struct Vector {
    trigger: Option<OwnedFd>,
    masked: bool,
}

/// The eventfds of one connection, per IRQ index and vector.
#[derive(Debug)]
pub(crate) struct IrqTable {
    /// `vectors[index]` has as many entries as the device has vectors of that index.
    vectors: Vec<Vec<Vector>>,
}

impl IrqTable {
    /// A table for a device with `irqs` (indices the device does not list have 0 vectors).
    pub(crate) fn new(irqs: &[IrqInfo]) -> Self {
        let vectors = (0..NUM_IRQ_INDICES)
            .map(|index| {
                let count = irqs
                    .iter()
                    .find(|i| i.index == index)
                    .map_or(0, |i| i.count);
                (0..count).map(|_| Vector::default()).collect()
            })
            .collect();
        IrqTable { vectors }
    }

    /// Number of vectors of `index`, or `None` past the PCI indices.
    pub(crate) fn count(&self, index: u32) -> Option<u32> {
        self.vectors
            .get(index as usize)
            .map(|v| u32::try_from(v.len()).unwrap_or(u32::MAX))
    }

    /// Whether vector `sub` of `index` has a trigger eventfd.
    pub(crate) fn has_trigger(&self, index: u32, sub: u32) -> bool {
        self.vectors
            .get(index as usize)
            .and_then(|v| v.get(sub as usize))
            .is_some_and(|v| v.trigger.is_some())
    }

    /// Applies DEVICE_SET_IRQS, validated as the kernel does: one DATA and one ACTION bit; the
    /// vectors `start..start + count` must exist, except that count 0 with DATA_NONE and
    /// ACTION_TRIGGER releases every trigger of the index; DATA_EVENTFD needs exactly `count`
    /// fds (and only it may carry fds).
    pub(crate) fn set(&mut self, req: &IrqSet<'_>, fds: Vec<OwnedFd>) -> Result<(), DeviceError> {
        let einval = |msg: String| Err(DeviceError::new(Errno::EINVAL, msg));
        if req.argsz < IrqSet::SIZE as u32 {
            return einval(format!("SET_IRQS argsz {} is below 20", req.argsz));
        }
        let data = req.flags & DATA;
        let action = req.flags & ACTIONS;
        if req.flags & !(DATA | ACTIONS) != 0 || action.count_ones() != 1 {
            return einval(format!(
                "SET_IRQS flags {:#x}: need one DATA and one ACTION bit",
                req.flags
            ));
        }
        let Some(vectors) = self.vectors.get_mut(req.index as usize) else {
            return einval(format!("SET_IRQS index {} is not an IRQ index", req.index));
        };
        if data != IRQ_SET_DATA_EVENTFD && !fds.is_empty() {
            return einval(format!(
                "SET_IRQS without DATA_EVENTFD came with {} fds",
                fds.len()
            ));
        }
        if req.count == 0 {
            if data == IRQ_SET_DATA_NONE && action == IRQ_SET_ACTION_TRIGGER {
                vectors.iter_mut().for_each(|v| v.trigger = None);
                return Ok(());
            }
            return einval("SET_IRQS with count 0 only releases triggers".into());
        }
        let end = u64::from(req.start) + u64::from(req.count);
        if end > vectors.len() as u64 {
            return einval(format!(
                "SET_IRQS vectors {}..{end} of index {}, which has {}",
                req.start,
                req.index,
                vectors.len()
            ));
        }
        let range = req.start as usize..end as usize;
        match (data, action) {
            (IRQ_SET_DATA_EVENTFD, IRQ_SET_ACTION_TRIGGER) => {
                if fds.len() != req.count as usize {
                    return einval(format!(
                        "SET_IRQS DATA_EVENTFD for {} vectors came with {} fds",
                        req.count,
                        fds.len()
                    ));
                }
                for (v, fd) in vectors[range].iter_mut().zip(fds) {
                    v.trigger = Some(fd);
                }
                Ok(())
            }
            (IRQ_SET_DATA_EVENTFD, _) => {
                einval("SET_IRQS: eventfds for mask/unmask are not supported".into())
            }
            (_, IRQ_SET_ACTION_TRIGGER) => {
                for (i, v) in vectors[range].iter().enumerate() {
                    let fire = data == IRQ_SET_DATA_NONE || req.data.get(i) == Some(&1);
                    if fire && !v.masked {
                        signal(v)?;
                    }
                }
                Ok(())
            }
            (_, mask_or_unmask) => {
                let masked = mask_or_unmask == IRQ_SET_ACTION_MASK;
                for (i, v) in vectors[range].iter_mut().enumerate() {
                    if data == IRQ_SET_DATA_NONE || req.data.get(i) == Some(&1) {
                        v.masked = masked;
                    }
                }
                Ok(())
            }
        }
    }

    /// The device raises vector `sub` of `index`: signals its eventfd. `Ok(false)` when the
    /// client set none or masked the vector (the interrupt is lost, as on a line nobody
    /// listens to); `EINVAL` for a vector the device does not have.
    pub(crate) fn trigger(&self, index: u32, sub: u32) -> Result<bool, DeviceError> {
        let v = self
            .vectors
            .get(index as usize)
            .and_then(|v| v.get(sub as usize))
            .ok_or_else(|| {
                DeviceError::new(
                    Errno::EINVAL,
                    format!("the device has no vector {sub} of IRQ index {index}"),
                )
            })?;
        if v.masked || v.trigger.is_none() {
            return Ok(false);
        }
        signal(v)?;
        Ok(true)
    }

    /// Drops every eventfd.
    pub(crate) fn clear(&mut self) {
        for v in self.vectors.iter_mut().flatten() {
            v.trigger = None;
            v.masked = false;
        }
    }
}

/// Adds one to the vector's eventfd counter (a vector without an eventfd ignores it).
fn signal(v: &Vector) -> Result<(), DeviceError> {
    if let Some(fd) = &v.trigger {
        rustix::io::write(fd, &1u64.to_ne_bytes())
            .map_err(|e| DeviceError::from_io("signalling an IRQ eventfd", e.into()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::event::{eventfd, EventfdFlags};

    fn set(flags: u32, index: u32, start: u32, count: u32, data: &[u8]) -> IrqSet<'_> {
        IrqSet {
            argsz: (IrqSet::SIZE + data.len()) as u32,
            flags,
            index,
            start,
            count,
            data,
        }
    }

    fn efd() -> OwnedFd {
        eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK).unwrap()
    }

    fn counter(fd: &OwnedFd) -> u64 {
        let mut b = [0u8; 8];
        match rustix::io::read(fd, &mut b) {
            Ok(_) => u64::from_ne_bytes(b),
            Err(_) => 0,
        }
    }

    #[test]
    fn eventfds_are_stored_and_triggered() {
        let mut t = IrqTable::new(&[IrqInfo { index: 2, count: 4 }]);
        assert_eq!(t.count(2), Some(4));
        assert_eq!(t.count(0), Some(0));
        assert_eq!(t.count(5), None);
        let a = efd();
        let b = efd();
        let (ca, cb) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let trig = IRQ_SET_ACTION_TRIGGER;
        t.set(&set(IRQ_SET_DATA_EVENTFD | trig, 2, 1, 2, &[]), vec![a, b])
            .unwrap();
        assert!(t.has_trigger(2, 1) && t.has_trigger(2, 2) && !t.has_trigger(2, 0));
        t.set(&set(IRQ_SET_DATA_BOOL | trig, 2, 1, 2, &[0, 1]), vec![])
            .unwrap();
        assert_eq!((counter(&ca), counter(&cb)), (0, 1));
        t.set(
            &set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 2, 2, 1, &[]),
            vec![],
        )
        .unwrap();
        t.set(&set(IRQ_SET_DATA_NONE | trig, 2, 1, 2, &[]), vec![])
            .unwrap();
        assert_eq!((counter(&ca), counter(&cb)), (1, 0));
        t.set(&set(IRQ_SET_DATA_NONE | trig, 2, 0, 0, &[]), vec![])
            .unwrap();
        assert!(!t.has_trigger(2, 1));
    }

    #[test]
    fn the_device_triggers_vectors_that_have_an_unmasked_eventfd() {
        let mut t = IrqTable::new(&[IrqInfo { index: 0, count: 1 }]);
        assert!(!t.trigger(0, 0).unwrap(), "no eventfd yet");
        assert_eq!(t.trigger(0, 1).unwrap_err().errno(), Errno::EINVAL);
        assert_eq!(t.trigger(1, 0).unwrap_err().errno(), Errno::EINVAL);
        assert_eq!(t.trigger(9, 0).unwrap_err().errno(), Errno::EINVAL);
        let fd = efd();
        let probe = fd.try_clone().unwrap();
        let trig = IRQ_SET_ACTION_TRIGGER;
        t.set(&set(IRQ_SET_DATA_EVENTFD | trig, 0, 0, 1, &[]), vec![fd])
            .unwrap();
        assert!(t.trigger(0, 0).unwrap());
        assert!(t.trigger(0, 0).unwrap());
        assert_eq!(counter(&probe), 2);
        t.set(
            &set(IRQ_SET_DATA_NONE | IRQ_SET_ACTION_MASK, 0, 0, 1, &[]),
            vec![],
        )
        .unwrap();
        assert!(!t.trigger(0, 0).unwrap(), "masked");
        assert_eq!(counter(&probe), 0);
        t.clear();
        assert!(!t.trigger(0, 0).unwrap());
    }

    #[test]
    fn bad_requests_are_einval() {
        let mut t = IrqTable::new(&[IrqInfo { index: 0, count: 1 }]);
        let trig = IRQ_SET_ACTION_TRIGGER;
        let cases: Vec<(IrqSet<'_>, usize)> = vec![
            (set(IRQ_SET_DATA_EVENTFD | trig, 0, 0, 1, &[]), 0),
            (set(IRQ_SET_DATA_EVENTFD | trig, 0, 0, 1, &[]), 2),
            (set(IRQ_SET_DATA_EVENTFD | trig, 0, 1, 1, &[]), 1),
            (set(IRQ_SET_DATA_EVENTFD | trig, 1, 0, 1, &[]), 1),
            (set(IRQ_SET_DATA_EVENTFD | trig, 5, 0, 1, &[]), 1),
            (
                set(IRQ_SET_DATA_NONE | trig | IRQ_SET_ACTION_MASK, 0, 0, 1, &[]),
                0,
            ),
            (set(IRQ_SET_DATA_NONE, 0, 0, 1, &[]), 0),
            (set(IRQ_SET_DATA_NONE | trig, 0, 0, 1, &[]), 1),
            (
                set(IRQ_SET_DATA_BOOL | IRQ_SET_ACTION_MASK, 0, 0, 0, &[]),
                0,
            ),
            (
                set(IRQ_SET_DATA_EVENTFD | IRQ_SET_ACTION_UNMASK, 0, 0, 1, &[]),
                1,
            ),
        ];
        for (i, (req, nfds)) in cases.iter().enumerate() {
            let fds = (0..*nfds).map(|_| efd()).collect();
            let e = t.set(req, fds).unwrap_err();
            assert_eq!(e.errno(), Errno::EINVAL, "case {i}: {e}");
        }
        let mut short = set(IRQ_SET_DATA_NONE | trig, 0, 0, 1, &[]);
        short.argsz = 19;
        assert_eq!(t.set(&short, vec![]).unwrap_err().errno(), Errno::EINVAL);
    }
}
