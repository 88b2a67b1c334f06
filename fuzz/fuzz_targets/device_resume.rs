//! Fuzzes the emulated devices' resume parsers (`membuf` and `register`) through the
//! framework, as a migration destination sees them: arbitrary bytes written into a RESUMING
//! stream in arbitrary pieces, then RESUMING -> STOP.
//!
//! Input: a selector byte (bit 0: membuf or register), a piece-size byte, then the stream.
//! Checks: no panic; a refusal leaves the device in RESUMING (never half-loaded and running);
//! a reset always brings it back to RUNNING.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_mig_device::{Controller, DeviceState, Dma, MigrationDevice};
use vfio_mig_devices::membuf::{self, MembufConfig};
use vfio_mig_devices::register::{RegisterConfig, RegisterDevice};

fn exercise(device: &dyn MigrationDevice, piece: usize, bytes: &[u8]) {
    let mut stream = device
        .set_state(DeviceState::Resuming)
        .expect("stop -> resuming")
        .expect("resuming opens a stream");
    let mut refused = false;
    for mut chunk in bytes.chunks(piece.max(1)) {
        while !chunk.is_empty() {
            match stream.write(chunk) {
                Ok(n) => chunk = &chunk[n..],
                Err(_) => {
                    refused = true;
                    break;
                }
            }
        }
        if refused {
            break;
        }
    }
    match device.set_state(DeviceState::Stop) {
        Ok(_) => assert_eq!(device.state().unwrap(), DeviceState::Stop),
        Err(_) => assert_eq!(device.state().unwrap(), DeviceState::Resuming),
    }
    device.reset().unwrap();
    assert_eq!(device.state().unwrap(), DeviceState::Running);
}

fuzz_target!(|data: &[u8]| {
    let [selector, piece, stream @ ..] = data else { return };
    if selector & 1 == 0 {
        let config = MembufConfig {
            size: 16 * 1024,
            ..MembufConfig::default()
        };
        let dev = membuf::create(config).expect("membuf");
        exercise(&*dev.migration(), usize::from(*piece), stream);
    } else {
        let controller =
            Controller::new(RegisterDevice::new(RegisterConfig { seed: 3 }), Dma::new()).unwrap();
        exercise(&controller, usize::from(*piece), stream);
    }
});
