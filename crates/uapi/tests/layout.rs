//! Pins every kernel struct layout and constant of `vfio_mig_uapi::kernel` to the literal
//! values of the VFIO migration uAPI (x86_64 / any LP64 target: all u64 fields are
//! `__aligned_u64`, so the layout is the same on every architecture Linux supports).

use std::mem::{align_of, offset_of, size_of};

use vfio_mig_uapi::kernel::*;
use vfio_mig_uapi::{DeviceState, MigrationFeatures};

/// Asserts size, alignment and every field offset of a struct in one line per struct.
macro_rules! assert_layout {
    ($ty:ident, size $size:expr, align $align:expr, { $($field:ident @ $off:expr),* $(,)? }) => {{
        assert_eq!(size_of::<$ty>(), $size, concat!("size of ", stringify!($ty)));
        assert_eq!(align_of::<$ty>(), $align, concat!("alignment of ", stringify!($ty)));
        $(
            assert_eq!(
                offset_of!($ty, $field),
                $off,
                concat!("offset of ", stringify!($ty), ".", stringify!($field))
            );
        )*
    }};
}

#[test]
fn migration_struct_layouts() {
    assert_layout!(vfio_device_feature, size 8, align 4, { argsz @ 0, flags @ 4, data @ 8 });
    assert_layout!(vfio_device_feature_migration, size 8, align 8, { flags @ 0 });
    assert_layout!(vfio_device_feature_mig_state, size 8, align 4, {
        device_state @ 0,
        data_fd @ 4,
    });
    assert_layout!(vfio_precopy_info, size 24, align 8, {
        argsz @ 0,
        flags @ 4,
        initial_bytes @ 8,
        dirty_bytes @ 16,
    });
    assert_layout!(vfio_device_feature_mig_data_size, size 8, align 8, { stop_copy_length @ 0 });
}

#[test]
fn dma_logging_struct_layouts() {
    assert_layout!(vfio_device_feature_dma_logging_control, size 24, align 8, {
        page_size @ 0,
        num_ranges @ 8,
        __reserved @ 12,
        ranges @ 16,
    });
    assert_layout!(vfio_device_feature_dma_logging_range, size 16, align 8, {
        iova @ 0,
        length @ 8,
    });
    assert_layout!(vfio_device_feature_dma_logging_report, size 32, align 8, {
        iova @ 0,
        length @ 8,
        page_size @ 16,
        bitmap @ 24,
    });
}

#[test]
fn device_struct_layouts() {
    assert_layout!(vfio_device_info, size 24, align 4, {
        argsz @ 0,
        flags @ 4,
        num_regions @ 8,
        num_irqs @ 12,
        cap_offset @ 16,
        pad @ 20,
    });
    assert_layout!(vfio_region_info, size 32, align 8, {
        argsz @ 0,
        flags @ 4,
        index @ 8,
        cap_offset @ 12,
        size @ 16,
        offset @ 24,
    });
    assert_layout!(vfio_irq_info, size 16, align 4, {
        argsz @ 0,
        flags @ 4,
        index @ 8,
        count @ 12,
    });
    assert_layout!(vfio_irq_set, size 20, align 4, {
        argsz @ 0,
        flags @ 4,
        index @ 8,
        start @ 12,
        count @ 16,
        data @ 20,
    });
    assert_layout!(vfio_group_status, size 8, align 4, { argsz @ 0, flags @ 4 });
}

#[test]
fn field_types_have_the_kernel_widths_and_signs() {
    // Constructing with typed literals fails to compile if a field's type drifts.
    let state = vfio_device_feature_mig_state {
        device_state: 3u32,
        data_fd: -1i32,
    };
    assert_eq!(state.data_fd, -1);
    let info = vfio_precopy_info {
        argsz: 24u32,
        flags: VFIO_PRECOPY_INFO_REINIT,
        initial_bytes: u64::MAX,
        dirty_bytes: 0u64,
    };
    assert_eq!(info.initial_bytes, u64::MAX);
    let caps = vfio_device_feature_migration {
        flags: VFIO_MIGRATION_STOP_COPY,
    };
    assert_eq!(caps.flags, 1u64);
}

#[test]
fn capability_bits() {
    assert_eq!(VFIO_MIGRATION_STOP_COPY, 0x1u64);
    assert_eq!(VFIO_MIGRATION_P2P, 0x2u64);
    assert_eq!(VFIO_MIGRATION_PRE_COPY, 0x4u64);
    assert_eq!(
        MigrationFeatures::STOP_COPY.bits(),
        VFIO_MIGRATION_STOP_COPY
    );
    assert_eq!(MigrationFeatures::ALL.bits(), 0x7);
}

#[test]
fn feature_flag_bits() {
    assert_eq!(VFIO_DEVICE_FEATURE_MASK, 0xffff);
    assert_eq!(VFIO_DEVICE_FEATURE_GET, 0x1_0000);
    assert_eq!(VFIO_DEVICE_FEATURE_SET, 0x2_0000);
    assert_eq!(VFIO_DEVICE_FEATURE_PROBE, 0x4_0000);
    assert_eq!(VFIO_DEVICE_FEATURE_OPS, 0x3_0000);
    assert_eq!(VFIO_PRECOPY_INFO_REINIT, 1);
    assert_eq!(FEATURE_HEADER_LEN, 8);
}

#[test]
fn feature_indices() {
    let expected: [(u32, u32, FeatureIndex); 13] = [
        (
            VFIO_DEVICE_FEATURE_PCI_VF_TOKEN,
            0,
            FeatureIndex::PciVfToken,
        ),
        (VFIO_DEVICE_FEATURE_MIGRATION, 1, FeatureIndex::Migration),
        (
            VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
            2,
            FeatureIndex::MigDeviceState,
        ),
        (
            VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY,
            3,
            FeatureIndex::LowPowerEntry,
        ),
        (
            VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP,
            4,
            FeatureIndex::LowPowerEntryWithWakeup,
        ),
        (
            VFIO_DEVICE_FEATURE_LOW_POWER_EXIT,
            5,
            FeatureIndex::LowPowerExit,
        ),
        (
            VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
            6,
            FeatureIndex::DmaLoggingStart,
        ),
        (
            VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
            7,
            FeatureIndex::DmaLoggingStop,
        ),
        (
            VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
            8,
            FeatureIndex::DmaLoggingReport,
        ),
        (
            VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
            9,
            FeatureIndex::MigDataSize,
        ),
        (VFIO_DEVICE_FEATURE_BUS_MASTER, 10, FeatureIndex::BusMaster),
        (VFIO_DEVICE_FEATURE_DMA_BUF, 11, FeatureIndex::DmaBuf),
        (
            VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFO_V2,
            12,
            FeatureIndex::MigPrecopyInfoV2,
        ),
    ];
    for (constant, literal, typed) in expected {
        assert_eq!(constant, literal, "{typed}");
        assert_eq!(typed.raw(), literal, "{typed}");
    }
    assert_eq!(
        FeatureIndex::ALL.map(FeatureIndex::raw),
        expected.map(|e| e.1)
    );
}

#[test]
fn ioctl_numbers() {
    assert_eq!(VFIO_TYPE, 0x3B);
    assert_eq!(VFIO_BASE, 100);
    assert_eq!(VFIO_API_VERSION, 0);
    let expected = [
        (VFIO_GET_API_VERSION, 0x3B64, "VFIO_GET_API_VERSION"),
        (VFIO_CHECK_EXTENSION, 0x3B65, "VFIO_CHECK_EXTENSION"),
        (VFIO_SET_IOMMU, 0x3B66, "VFIO_SET_IOMMU"),
        (VFIO_GROUP_GET_STATUS, 0x3B67, "VFIO_GROUP_GET_STATUS"),
        (VFIO_GROUP_SET_CONTAINER, 0x3B68, "VFIO_GROUP_SET_CONTAINER"),
        (
            VFIO_GROUP_UNSET_CONTAINER,
            0x3B69,
            "VFIO_GROUP_UNSET_CONTAINER",
        ),
        (VFIO_GROUP_GET_DEVICE_FD, 0x3B6A, "VFIO_GROUP_GET_DEVICE_FD"),
        (VFIO_DEVICE_GET_INFO, 0x3B6B, "VFIO_DEVICE_GET_INFO"),
        (
            VFIO_DEVICE_GET_REGION_INFO,
            0x3B6C,
            "VFIO_DEVICE_GET_REGION_INFO",
        ),
        (VFIO_DEVICE_GET_IRQ_INFO, 0x3B6D, "VFIO_DEVICE_GET_IRQ_INFO"),
        (VFIO_DEVICE_SET_IRQS, 0x3B6E, "VFIO_DEVICE_SET_IRQS"),
        (VFIO_DEVICE_RESET, 0x3B6F, "VFIO_DEVICE_RESET"),
        (VFIO_DEVICE_FEATURE, 0x3B75, "VFIO_DEVICE_FEATURE"),
        (VFIO_DEVICE_BIND_IOMMUFD, 0x3B76, "VFIO_DEVICE_BIND_IOMMUFD"),
        (
            VFIO_DEVICE_ATTACH_IOMMUFD_PT,
            0x3B77,
            "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
        ),
        (
            VFIO_DEVICE_DETACH_IOMMUFD_PT,
            0x3B78,
            "VFIO_DEVICE_DETACH_IOMMUFD_PT",
        ),
        (
            VFIO_MIG_GET_PRECOPY_INFO,
            0x3B79,
            "VFIO_MIG_GET_PRECOPY_INFO",
        ),
    ];
    for (value, literal, name) in expected {
        assert_eq!(value, literal, "{name} = {value:#x}, expected {literal:#x}");
    }
    assert_eq!(vfio_io(0xff), 0x3BFF);
}

#[test]
fn device_state_values() {
    let expected = [
        (DeviceState::Error, 0),
        (DeviceState::Stop, 1),
        (DeviceState::Running, 2),
        (DeviceState::StopCopy, 3),
        (DeviceState::Resuming, 4),
        (DeviceState::RunningP2p, 5),
        (DeviceState::PreCopy, 6),
        (DeviceState::PreCopyP2p, 7),
    ];
    for (state, raw) in expected {
        assert_eq!(state.raw(), raw, "{state}");
    }
}

/// vfio-bindings was generated from a newer header than most hosts have; its constants must
/// agree with ours wherever it has them.
#[test]
fn agrees_with_vfio_bindings_constants() {
    use vfio_mig_uapi::kernel::bindings as b;
    assert_eq!(
        u64::from(b::VFIO_MIGRATION_STOP_COPY),
        VFIO_MIGRATION_STOP_COPY
    );
    assert_eq!(u64::from(b::VFIO_MIGRATION_P2P), VFIO_MIGRATION_P2P);
    assert_eq!(
        u64::from(b::VFIO_MIGRATION_PRE_COPY),
        VFIO_MIGRATION_PRE_COPY
    );
    assert_eq!(b::VFIO_DEVICE_FEATURE_MASK, VFIO_DEVICE_FEATURE_MASK);
    assert_eq!(b::VFIO_DEVICE_FEATURE_GET, VFIO_DEVICE_FEATURE_GET);
    assert_eq!(b::VFIO_DEVICE_FEATURE_SET, VFIO_DEVICE_FEATURE_SET);
    assert_eq!(b::VFIO_DEVICE_FEATURE_PROBE, VFIO_DEVICE_FEATURE_PROBE);
    assert_eq!(b::VFIO_PRECOPY_INFO_REINIT, VFIO_PRECOPY_INFO_REINIT);
    assert_eq!(b::VFIO_TYPE, VFIO_TYPE);
    assert_eq!(b::VFIO_BASE, VFIO_BASE);
    assert_eq!(b::VFIO_API_VERSION, VFIO_API_VERSION);
    let indices = [
        b::VFIO_DEVICE_FEATURE_PCI_VF_TOKEN,
        b::VFIO_DEVICE_FEATURE_MIGRATION,
        b::VFIO_DEVICE_FEATURE_MIG_DEVICE_STATE,
        b::VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY,
        b::VFIO_DEVICE_FEATURE_LOW_POWER_ENTRY_WITH_WAKEUP,
        b::VFIO_DEVICE_FEATURE_LOW_POWER_EXIT,
        b::VFIO_DEVICE_FEATURE_DMA_LOGGING_START,
        b::VFIO_DEVICE_FEATURE_DMA_LOGGING_STOP,
        b::VFIO_DEVICE_FEATURE_DMA_LOGGING_REPORT,
        b::VFIO_DEVICE_FEATURE_MIG_DATA_SIZE,
        b::VFIO_DEVICE_FEATURE_BUS_MASTER,
        b::VFIO_DEVICE_FEATURE_DMA_BUF,
        b::VFIO_DEVICE_FEATURE_MIG_PRECOPY_INFOv2,
    ];
    assert_eq!(indices, FeatureIndex::ALL.map(FeatureIndex::raw));
    let states = [
        b::vfio_device_mig_state_VFIO_DEVICE_STATE_ERROR,
        b::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP,
        b::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING,
        b::vfio_device_mig_state_VFIO_DEVICE_STATE_STOP_COPY,
        b::vfio_device_mig_state_VFIO_DEVICE_STATE_RESUMING,
        b::vfio_device_mig_state_VFIO_DEVICE_STATE_RUNNING_P2P,
        b::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY,
        b::vfio_device_mig_state_VFIO_DEVICE_STATE_PRE_COPY_P2P,
    ];
    assert_eq!(states, DeviceState::ALL.map(DeviceState::raw));
    assert_eq!(
        b::vfio_device_mig_state_VFIO_DEVICE_STATE_NR as usize,
        DeviceState::COUNT
    );
}
