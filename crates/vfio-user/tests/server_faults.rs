//! Device failures reach the client as error replies carrying the device's errno, and the
//! session goes on.

mod server_support;

use std::sync::Arc;

use server_support::*;
use vfio_mig_device::{Controller, DeviceState, Dma, MigrationDevice};
use vfio_mig_devices::fault::{
    Fault, FaultAction, FaultPlan, FaultPoint, Faulty, FaultyMigrationDevice,
};
use vfio_mig_devices::register::{RegisterConfig, RegisterDevice};
use vfio_mig_uapi::{Errno, MigrationFeatures};
use vfio_mig_vfio_user::codec::*;
use vfio_mig_vfio_user::server::{DeviceHost, HostedDevice, ServerConfig, ServerSession};

fn faulty_membuf() -> (FaultPlan, Arc<dyn MigrationDevice>, DeviceHost) {
    let (_m, hosted) = membuf(256 * 1024, MigrationFeatures::ALL, 1);
    let plan = FaultPlan::new();
    let migration: Arc<dyn MigrationDevice> = Arc::new(FaultyMigrationDevice::new(
        hosted.migration.clone(),
        plan.clone(),
    ));
    let host = DeviceHost::new(HostedDevice {
        migration: Arc::clone(&migration),
        ..hosted
    })
    .unwrap();
    (plan, migration, host)
}

fn session(host: &mut DeviceHost) -> ServerSession<'_> {
    let mut s = ServerSession::new(host, ServerConfig::default());
    negotiate(&mut s);
    s
}

fn read(s: &mut ServerSession<'_>, size: u32) -> Result<Vec<u8>, i32> {
    let r = call(s, Request::MigDataRead(MigDataReadRequest::new(size)));
    match errno(&r) {
        Some(e) => Err(e),
        None => match reply(&r) {
            Reply::MigDataRead(d) => Ok(d.data.to_vec()),
            other => panic!("{other:?}"),
        },
    }
}

#[test]
fn failed_transitions_answer_with_the_device_errno() {
    let (plan, dev, mut host) = faulty_membuf();
    let mut s = session(&mut host);
    plan.arm(Fault::new(
        FaultPoint::SetState(DeviceState::StopCopy),
        FaultAction::Fail(Errno::ENOMEM),
    ));
    assert_errno(
        &call(&mut s, set_state(DeviceState::StopCopy)),
        Errno::ENOMEM,
    );
    assert_eq!(dev.state().unwrap(), DeviceState::Running);
    plan.clear();
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::StopCopy))), None);

    plan.arm(Fault::new(
        FaultPoint::DataSize,
        FaultAction::Fail(Errno::EIO),
    ));
    assert_errno(&call(&mut s, get(FEATURE_MIG_DATA_SIZE, 8)), Errno::EIO);
    plan.arm(Fault::new(
        FaultPoint::Reset,
        FaultAction::Fail(Errno::EBUSY),
    ));
    assert_errno(&call(&mut s, Request::DeviceReset), Errno::EBUSY);
    assert_eq!(dev.state().unwrap(), DeviceState::StopCopy);
}

#[test]
fn a_read_error_after_data_is_answered_on_the_next_read() {
    let (plan, _dev, mut host) = faulty_membuf();
    let mut s = session(&mut host);
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::StopCopy))), None);
    // The server fills a request with several device reads; the second one fails here.
    plan.arm(Fault::new(FaultPoint::StreamRead, FaultAction::Fail(Errno::EIO)).nth(2));
    let first = read(&mut s, 1 << 20).unwrap();
    assert!(!first.is_empty(), "the bytes already read are answered");
    assert_eq!(read(&mut s, 1 << 20), Err(Errno::EIO.raw()));
    // The stream goes on where it was: nothing is lost.
    let mut total = first.len() as u64;
    loop {
        let more = read(&mut s, 1 << 20).unwrap();
        if more.is_empty() {
            break;
        }
        total += more.len() as u64;
    }
    assert_eq!(
        total,
        vfio_mig_devices::membuf::format::full_stream_len(256 * 1024)
    );
    plan.arm(Fault::new(
        FaultPoint::StreamRead,
        FaultAction::Fail(Errno::ENODEV),
    ));
    assert_eq!(read(&mut s, 16), Err(Errno::ENODEV.raw()));
}

#[test]
fn write_precopy_and_logging_failures_pass_their_errno() {
    let (plan, _dev, mut host) = faulty_membuf();
    let mut s = ServerSession::new(&mut host, ServerConfig::default());
    assert_eq!(errno(&call(&mut s, version_request_ext(1 << 20))), None);
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::PreCopy))), None);
    plan.arm(Fault::new(
        FaultPoint::PrecopyInfo,
        FaultAction::Fail(Errno::EIO),
    ));
    assert_errno(
        &call(
            &mut s,
            get(vfio_mig_vfio_user::extension::FEATURE_PRECOPY_INFO, 16),
        ),
        Errno::EIO,
    );
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::Running))), None);
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::Resuming))), None);
    plan.arm(Fault::new(
        FaultPoint::StreamWrite,
        FaultAction::Fail(Errno::ENOSPC),
    ));
    assert_errno(
        &call(
            &mut s,
            Request::MigDataWrite(MigDataWrite::new(b"0123456789")),
        ),
        Errno::ENOSPC,
    );
    plan.arm(Fault::new(
        FaultPoint::DmaLoggingStart,
        FaultAction::Fail(Errno::EBUSY),
    ));
    let start = set(
        FEATURE_DMA_LOGGING_START,
        FeatureData::DmaLogging(DmaLoggingControl {
            page_size: 4096,
            ranges: vec![IovaRange {
                iova: 0,
                length: 4096,
            }],
        }),
    );
    assert_errno(&call(&mut s, start), Errno::EBUSY);
}

#[test]
fn a_broken_device_reports_error_state_until_reset() {
    let plan = FaultPlan::new();
    let device = Faulty::new(RegisterDevice::new(RegisterConfig::default()), plan.clone());
    let dma = Dma::new();
    let controller = Controller::new(device, dma.clone()).unwrap();
    let bar =
        Arc::new(vfio_mig_devices::register::RegisterDevice::new(RegisterConfig::default()).bar());
    let mut host = DeviceHost::new(HostedDevice::new(Arc::new(controller), bar)).unwrap();
    let mut s = session(&mut host);
    plan.arm(Fault::new(
        FaultPoint::Arc(DeviceState::Running, DeviceState::Stop),
        FaultAction::Break(Errno::EIO),
    ));
    assert_errno(&call(&mut s, set_state(DeviceState::Stop)), Errno::EIO);
    let r = call(&mut s, get(FEATURE_MIG_DEVICE_STATE, 8));
    assert_eq!(
        feature(&r).data,
        FeatureData::MigDeviceState {
            state: DeviceState::Error,
            data_fd: -1
        }
    );
    assert_errno(
        &call(&mut s, set_state(DeviceState::Running)),
        Errno::EINVAL,
    );
    plan.clear();
    assert_eq!(
        reply(&call(&mut s, Request::DeviceReset)),
        Reply::DeviceReset
    );
    let r = call(&mut s, get(FEATURE_MIG_DEVICE_STATE, 8));
    assert_eq!(
        feature(&r).data,
        FeatureData::MigDeviceState {
            state: DeviceState::Running,
            data_fd: -1
        }
    );
}

#[test]
fn a_failed_write_ends_the_resuming_session() {
    let (plan, _dev, mut host) = faulty_membuf();
    let mut s = session(&mut host);
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::Resuming))), None);
    let write = |data: &'static [u8]| Request::MigDataWrite(MigDataWrite::new(data));
    plan.arm(Fault::new(
        FaultPoint::StreamWrite,
        FaultAction::Fail(Errno::ENOSPC),
    ));
    assert_errno(&call(&mut s, write(b"MBUFSTRM")), Errno::ENOSPC);
    // Part of a failed write may be in the device: later writes (a pipelining client's)
    // would land at the wrong place, so they are refused until the session ends.
    plan.clear();
    assert_errno(&call(&mut s, write(b"MBUFSTRM")), Errno::ENOSPC);
    assert_eq!(
        reply(&call(&mut s, Request::DeviceReset)),
        Reply::DeviceReset
    );
    assert_eq!(errno(&call(&mut s, set_state(DeviceState::Resuming))), None);
    assert_eq!(
        errno(&call(&mut s, write(b"MBUFSTRM"))),
        None,
        "a new session takes writes again"
    );
}
