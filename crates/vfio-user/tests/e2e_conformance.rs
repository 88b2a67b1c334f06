//! The device conformance suite, run through our client against membufs behind our server:
//! every rule of the migration uAPI holds end to end over vfio-user.

mod server_support;

use server_support::*;
use vfio_mig_device::conformance::{Role, Target};
use vfio_mig_device::{migration_conformance_tests, DeviceError, MigrationFeatures};
use vfio_mig_devices::membuf::MembufConfig;

fn served(features: MigrationFeatures, role: Role) -> Result<Served, DeviceError> {
    Ok(Served::membuf(MembufConfig {
        size: 64 * 1024,
        features,
        seed: role.seed(),
        ..MembufConfig::default()
    }))
}

fn digest(device: &Served) -> Result<Vec<u8>, DeviceError> {
    device.digest().map(|d| d.to_le_bytes().to_vec())
}

migration_conformance_tests!(
    every_feature,
    target = Target::new("vfio-user membuf (all features)", |role| served(
        MigrationFeatures::ALL,
        role
    ))
    .with_digest(digest)
    .expect_features(MigrationFeatures::ALL)
    .expect_dma_logging(true)
);

migration_conformance_tests!(
    stop_copy_only,
    target = Target::new("vfio-user membuf (stop-copy)", |role| served(
        MigrationFeatures::STOP_COPY,
        role
    ))
    .with_digest(digest)
    .expect_features(MigrationFeatures::STOP_COPY)
    .expect_dma_logging(true)
);
