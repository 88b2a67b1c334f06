//! One device's state as an engine tracks it, and the one way both engines move it.

use std::time::Instant;

use vfio_mig_device::{DataStream, DeviceState};

use crate::error::Failure;
use crate::event::{Emitter, Event, Side};
use crate::source::NamedDevice;

/// Borrowed view of an engine's record of one device.
pub(crate) struct Tracked<'d, 'n> {
    pub(crate) index: u16,
    pub(crate) named: &'n NamedDevice,
    /// Where the device is, as far as the engine knows.
    pub(crate) state: &'d mut DeviceState,
    /// Whether the engine asked the device to change state (recovery looks at it).
    pub(crate) touched: &'d mut bool,
}

impl Tracked<'_, '_> {
    /// Moves the device to `target`, recording where it is (also after a failure, from the
    /// error's `reached`) and emitting the transition.
    pub(crate) fn transition(
        &mut self,
        side: Side,
        em: &Emitter,
        target: DeviceState,
    ) -> Result<Option<DataStream>, Failure> {
        let from = *self.state;
        *self.touched = true;
        let started = Instant::now();
        match self.named.device.set_state(target) {
            Ok(stream) => {
                *self.state = target;
                em.emit(Event::Transition {
                    side,
                    device: self.index,
                    name: self.named.name.clone(),
                    from,
                    to: target,
                    duration_us: started.elapsed().as_micros() as u64,
                });
                Ok(stream)
            }
            Err(cause) => {
                if let Some(reached) = cause.reached {
                    *self.state = reached;
                }
                Err(Failure::Transition {
                    index: self.index,
                    name: self.named.name.clone(),
                    target,
                    cause,
                })
            }
        }
    }
}
