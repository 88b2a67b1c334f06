//! Fuzzes the command line's device specifications (`membuf:size=256M,...`): any string
//! parses or gives an error, never a panic, and whatever parses prints back to a string that
//! parses to the same specification.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vfio_mig_devices::spec::DeviceSpec;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(spec) = text.parse::<DeviceSpec>() {
        let printed = spec.to_string();
        let again: DeviceSpec = printed.parse().expect("printed spec parses");
        assert_eq!(again, spec, "{printed}");
    }
});
