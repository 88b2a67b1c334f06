//! The register device: the conformance suite, and a migration observed through BAR0.

use vfio_mig_device::conformance::{Role, Target};
use vfio_mig_device::{
    migration_conformance_tests, write_all, Controller, DeviceError, DeviceState, Dma, Errno,
    MigrationDevice, MigrationFeatures, ReadOutcome, RegionAccess,
};
use vfio_mig_devices::register::{
    RegisterBar, RegisterConfig, RegisterDevice, BAR0, STREAM_LEN, WRITE_COUNT,
};

fn register(role: Role) -> Result<Controller<RegisterDevice>, DeviceError> {
    Controller::new(
        RegisterDevice::new(RegisterConfig { seed: role.seed() }),
        Dma::new(),
    )
}

fn digest(device: &Controller<RegisterDevice>) -> Result<Vec<u8>, DeviceError> {
    Ok(device.with_device(|d| d.bar().state().to_vec()))
}

migration_conformance_tests!(register_conformance, register, digest);

migration_conformance_tests!(
    register_expectations,
    target = Target::new("register", register)
        .with_digest(digest)
        .expect_features(MigrationFeatures::STOP_COPY)
        .expect_dma_logging(false)
);

fn device(seed: u64) -> (Controller<RegisterDevice>, RegisterBar) {
    let device = RegisterDevice::new(RegisterConfig { seed });
    let bar = device.bar();
    (Controller::new(device, Dma::new()).unwrap(), bar)
}

fn save(device: &Controller<RegisterDevice>) -> Vec<u8> {
    let mut stream = device.set_state(DeviceState::StopCopy).unwrap().unwrap();
    let mut bytes = Vec::new();
    let mut buf = [0; 100];
    while let ReadOutcome::Data(n) = stream.read(&mut buf).unwrap() {
        bytes.extend_from_slice(&buf[..n]);
    }
    bytes
}

#[test]
fn guest_writes_migrate_and_the_destination_runs_on() {
    let (source, source_bar) = device(1);
    let (destination, destination_bar) = device(2);
    source_bar.region_write(BAR0, 0x20, &[1, 2, 3, 4]).unwrap();

    let bytes = save(&source);
    assert_eq!(bytes.len(), STREAM_LEN);
    assert_eq!(source.data_size().unwrap(), STREAM_LEN as u64);
    let mut resuming = destination
        .set_state(DeviceState::Resuming)
        .unwrap()
        .unwrap();
    write_all(&mut *resuming, &bytes).unwrap();
    destination.set_state(DeviceState::Running).unwrap();

    assert_eq!(destination_bar.state(), source_bar.state());
    let mut count = [0; 4];
    destination_bar
        .region_read(BAR0, WRITE_COUNT, &mut count)
        .unwrap();
    assert_eq!(
        u32::from_le_bytes(count),
        1,
        "the write count is state and migrates"
    );
    destination_bar
        .region_write(BAR0, 0, &[9])
        .expect("the destination runs");
}

#[test]
fn a_stopped_source_refuses_bar_writes() {
    let (source, bar) = device(1);
    source.set_state(DeviceState::Stop).unwrap();
    assert_eq!(
        bar.region_write(BAR0, 0, &[1]).unwrap_err().errno(),
        Errno::EBUSY
    );
    source.set_state(DeviceState::Running).unwrap();
    bar.region_write(BAR0, 0, &[1]).unwrap();
}

#[test]
fn a_corrupted_stream_is_refused_with_a_message_and_the_state_kept() {
    let (source, _) = device(1);
    let (destination, destination_bar) = device(2);
    let before = destination_bar.state();
    let mut bytes = save(&source);
    bytes[40] ^= 0x01;
    let mut resuming = destination
        .set_state(DeviceState::Resuming)
        .unwrap()
        .unwrap();
    write_all(&mut *resuming, &bytes).unwrap();

    let err = destination.set_state(DeviceState::Stop).unwrap_err();

    assert_eq!(err.errno(), Errno::EINVAL);
    assert_eq!(
        err.failed_arc,
        Some((DeviceState::Resuming, DeviceState::Stop))
    );
    assert!(err.cause.message().contains("checksum"), "{}", err.cause);
    assert_eq!(destination.state().unwrap(), DeviceState::Resuming);
    assert_eq!(destination_bar.state(), before);
}

#[test]
fn dma_logging_is_not_supported() {
    let (device, _) = device(1);
    let err = device.dma_logging_start(4096, &[]).unwrap_err();
    assert_eq!(err.errno(), Errno::ENOTTY);
}

#[test]
fn identity_names_the_kind_and_version() {
    let (device, _) = device(1);
    let identity = device.identity().unwrap();
    assert_eq!(
        (identity.kind.as_str(), identity.version.as_str()),
        ("register", "1")
    );
}
