//! Compares our kernel definitions with the system's `<linux/vfio.h>` (Debian package
//! `linux-libc-dev`): a generated C program prints `sizeof`, `_Alignof`, `offsetof` and the
//! value of every constant the header has, and each is compared with the Rust value.
//!
//! Definitions newer than the installed header are guarded with `#if defined(...)` on a
//! macro that arrived in the same kernel release, and reported as absent rather than
//! compared. A missing C compiler or header fails the test unless
//! `VFIO_MIG_SKIP_HEADER_TEST=1` is set.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::mem::{align_of, offset_of, size_of};
use std::path::Path;
use std::process::Command;

use vfio_mig_uapi::kernel::*;
use vfio_mig_uapi::DeviceState;

const SKIP_VAR: &str = "VFIO_MIG_SKIP_HEADER_TEST";

/// Macros whose arrival marks a group of definitions (the guard of each check below).
const SINCE_5_18: &str = "VFIO_DEVICE_FEATURE_MIGRATION";
const PRE_COPY_6_2: &str = "VFIO_MIGRATION_PRE_COPY";
const PRECOPY_INFO_6_2: &str = "VFIO_MIG_GET_PRECOPY_INFO";
const DATA_SIZE_6_2: &str = "VFIO_DEVICE_FEATURE_MIG_DATA_SIZE";
const DMA_LOGGING_6_1: &str = "VFIO_DEVICE_FEATURE_DMA_LOGGING_START";

/// How a header value must relate to ours.
#[derive(Clone, Copy, PartialEq)]
enum Cmp {
    Equal,
    /// For argsz-extensible structs that grew: older headers describe a prefix of ours.
    OursAtLeast,
}

struct Check {
    guard: Option<&'static str>,
    key: String,
    c_expr: String,
    ours: u64,
    cmp: Cmp,
}

#[derive(Default)]
struct Checks(Vec<Check>);

impl Checks {
    fn push(&mut self, guard: Option<&'static str>, key: String, c_expr: String, ours: u64) {
        self.push_cmp(guard, key, c_expr, ours, Cmp::Equal);
    }

    fn push_cmp(
        &mut self,
        guard: Option<&'static str>,
        key: String,
        c_expr: String,
        ours: u64,
        cmp: Cmp,
    ) {
        assert!(!key.contains(char::is_whitespace), "key {key:?}");
        self.0.push(Check {
            guard,
            key,
            c_expr,
            ours,
            cmp,
        });
    }

    /// A macro or enumerator compared by name: `guard` defaults to the macro itself.
    fn constant(&mut self, guard: Option<&'static str>, c_name: &str, ours: u64) {
        self.push(guard, c_name.to_owned(), c_name.to_owned(), ours);
    }

    /// A macro that guards itself.
    fn macro_value(&mut self, c_name: &'static str, ours: u64) {
        self.constant(Some(c_name), c_name, ours);
    }
}

/// Adds size, alignment and each listed field's offset of a struct.
macro_rules! layout {
    ($checks:ident, $guard:expr, $ty:ident $(size $cmp:expr)?, { $($field:ident),* $(,)? }) => {{
        let name = stringify!($ty);
        #[allow(unused_mut, unused_assignments)]
        let mut cmp = Cmp::Equal;
        $(cmp = $cmp;)?
        $checks.push_cmp(
            $guard,
            format!("sizeof({name})"),
            format!("sizeof(struct {name})"),
            size_of::<$ty>() as u64,
            cmp,
        );
        $checks.push(
            $guard,
            format!("alignof({name})"),
            format!("_Alignof(struct {name})"),
            align_of::<$ty>() as u64,
        );
        $(
            let field = stringify!($field);
            $checks.push(
                $guard,
                format!("offsetof({name}.{field})"),
                format!("offsetof(struct {name}, {field})"),
                offset_of!($ty, $field) as u64,
            );
        )*
    }};
}

fn all_checks() -> Checks {
    let mut c = Checks::default();

    // Structs. The header of 6.1 and older lacks `vfio_device_info.pad` (added with 4-byte
    // capability alignment) and no macro marks its arrival, so only the older fields and a
    // lower bound on the size are compared; tests/layout.rs pins the full layout.
    layout!(c, None, vfio_device_info size Cmp::OursAtLeast, {
        argsz, flags, num_regions, num_irqs, cap_offset,
    });
    layout!(c, None, vfio_region_info, { argsz, flags, index, cap_offset, size, offset });
    layout!(c, None, vfio_irq_info, { argsz, flags, index, count });
    layout!(c, None, vfio_irq_set, { argsz, flags, index, start, count, data });
    layout!(c, None, vfio_group_status, { argsz, flags });
    layout!(c, Some("VFIO_DEVICE_FEATURE"), vfio_device_feature, { argsz, flags, data });
    layout!(c, Some(SINCE_5_18), vfio_device_feature_migration, {
        flags
    });
    layout!(c, Some(SINCE_5_18), vfio_device_feature_mig_state, { device_state, data_fd });
    layout!(c, Some(PRECOPY_INFO_6_2), vfio_precopy_info, {
        argsz, flags, initial_bytes, dirty_bytes,
    });
    layout!(c, Some(DATA_SIZE_6_2), vfio_device_feature_mig_data_size, {
        stop_copy_length
    });
    layout!(c, Some(DMA_LOGGING_6_1), vfio_device_feature_dma_logging_control, {
        page_size, num_ranges, __reserved, ranges,
    });
    layout!(c, Some(DMA_LOGGING_6_1), vfio_device_feature_dma_logging_range, { iova, length });
    layout!(c, Some(DMA_LOGGING_6_1), vfio_device_feature_dma_logging_report, {
        iova, length, page_size, bitmap,
    });

    // Capability bits and the flags word.
    c.macro_value("VFIO_MIGRATION_STOP_COPY", VFIO_MIGRATION_STOP_COPY);
    c.macro_value("VFIO_MIGRATION_P2P", VFIO_MIGRATION_P2P);
    c.macro_value("VFIO_MIGRATION_PRE_COPY", VFIO_MIGRATION_PRE_COPY);
    c.macro_value("VFIO_DEVICE_FEATURE_MASK", VFIO_DEVICE_FEATURE_MASK.into());
    c.macro_value("VFIO_DEVICE_FEATURE_GET", VFIO_DEVICE_FEATURE_GET.into());
    c.macro_value("VFIO_DEVICE_FEATURE_SET", VFIO_DEVICE_FEATURE_SET.into());
    c.macro_value(
        "VFIO_DEVICE_FEATURE_PROBE",
        VFIO_DEVICE_FEATURE_PROBE.into(),
    );
    c.macro_value("VFIO_PRECOPY_INFO_REINIT", VFIO_PRECOPY_INFO_REINIT.into());

    // Feature indices, by the kernel's own names.
    for feature in FeatureIndex::ALL {
        let name = feature.kernel_name();
        c.constant(Some(name), name, feature.raw().into());
    }

    // Device states (enumerators cannot be tested with #if, so each is guarded by a macro
    // of the release that added it).
    for state in DeviceState::ALL {
        let guard = if state.is_precopy() {
            PRE_COPY_6_2
        } else {
            SINCE_5_18
        };
        c.constant(Some(guard), state.kernel_name(), state.raw().into());
    }

    // ioctl numbers.
    c.constant(None, "VFIO_TYPE", VFIO_TYPE.into());
    c.constant(None, "VFIO_BASE", VFIO_BASE.into());
    c.constant(None, "VFIO_API_VERSION", VFIO_API_VERSION.into());
    let ioctls: [(&'static str, u32); 17] = [
        ("VFIO_GET_API_VERSION", VFIO_GET_API_VERSION),
        ("VFIO_CHECK_EXTENSION", VFIO_CHECK_EXTENSION),
        ("VFIO_SET_IOMMU", VFIO_SET_IOMMU),
        ("VFIO_GROUP_GET_STATUS", VFIO_GROUP_GET_STATUS),
        ("VFIO_GROUP_SET_CONTAINER", VFIO_GROUP_SET_CONTAINER),
        ("VFIO_GROUP_UNSET_CONTAINER", VFIO_GROUP_UNSET_CONTAINER),
        ("VFIO_GROUP_GET_DEVICE_FD", VFIO_GROUP_GET_DEVICE_FD),
        ("VFIO_DEVICE_GET_INFO", VFIO_DEVICE_GET_INFO),
        ("VFIO_DEVICE_GET_REGION_INFO", VFIO_DEVICE_GET_REGION_INFO),
        ("VFIO_DEVICE_GET_IRQ_INFO", VFIO_DEVICE_GET_IRQ_INFO),
        ("VFIO_DEVICE_SET_IRQS", VFIO_DEVICE_SET_IRQS),
        ("VFIO_DEVICE_RESET", VFIO_DEVICE_RESET),
        ("VFIO_DEVICE_FEATURE", VFIO_DEVICE_FEATURE),
        ("VFIO_DEVICE_BIND_IOMMUFD", VFIO_DEVICE_BIND_IOMMUFD),
        (
            "VFIO_DEVICE_ATTACH_IOMMUFD_PT",
            VFIO_DEVICE_ATTACH_IOMMUFD_PT,
        ),
        (
            "VFIO_DEVICE_DETACH_IOMMUFD_PT",
            VFIO_DEVICE_DETACH_IOMMUFD_PT,
        ),
        ("VFIO_MIG_GET_PRECOPY_INFO", VFIO_MIG_GET_PRECOPY_INFO),
    ];
    for (name, value) in ioctls {
        c.macro_value(name, value.into());
    }
    c
}

/// The C program: one output line per check, `KEY VALUE` or `KEY absent`.
fn c_program(checks: &Checks) -> String {
    let mut src = String::from(
        "#include <stddef.h>\n#include <stdio.h>\n#include <linux/vfio.h>\n\nint main(void)\n{\n",
    );
    for check in &checks.0 {
        let print = format!(
            "\tprintf(\"%s %llu\\n\", \"{}\", (unsigned long long)({}));\n",
            check.key, check.c_expr
        );
        match check.guard {
            None => src.push_str(&print),
            Some(guard) => {
                let _ = write!(
                    src,
                    "#if defined({guard})\n{print}#else\n\tputs(\"{} absent\");\n#endif\n",
                    check.key
                );
            }
        }
    }
    src.push_str("\treturn 0;\n}\n");
    src
}

fn skip_requested() -> bool {
    std::env::var_os(SKIP_VAR).is_some_and(|v| v == "1")
}

/// Fails the test, or only warns when the environment asked to skip it.
fn unavailable(reason: &str) {
    if skip_requested() {
        eprintln!("system header test skipped ({SKIP_VAR}=1): {reason}");
        return;
    }
    panic!(
        "{reason}\nThe layout test against <linux/vfio.h> needs a C compiler (`cc`, or $CC) \
         and the kernel headers (Debian/Ubuntu: apt-get install gcc linux-libc-dev). \
         Set {SKIP_VAR}=1 to skip it where they cannot be installed."
    );
}

/// Compiles `source` in `dir` into `exe`; `Err` carries a description of the failure.
fn compile(cc: &str, dir: &Path, name: &str, source: &str) -> Result<std::path::PathBuf, String> {
    let src_path = dir.join(format!("{name}.c"));
    let exe = dir.join(name);
    std::fs::write(&src_path, source).expect("write C source into the temporary directory");
    let out = Command::new(cc)
        .arg("-std=gnu11")
        .arg("-o")
        .arg(&exe)
        .arg(&src_path)
        .output()
        .map_err(|e| format!("cannot run C compiler `{cc}`: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "`{cc}` failed on {name}.c ({}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(exe)
}

#[test]
fn layouts_and_constants_match_the_system_header() {
    let checks = all_checks();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_owned());
    let dir = tempfile::tempdir().expect("create a temporary directory");

    // First make sure the toolchain and header exist, so that a missing package is reported
    // as such and not as a layout mismatch.
    let probe = "#include <linux/vfio.h>\nint main(void) { return 0; }\n";
    if let Err(reason) = compile(&cc, dir.path(), "probe", probe) {
        unavailable(&reason);
        return;
    }

    let source = c_program(&checks);
    let exe = compile(&cc, dir.path(), "vfio_layout", &source)
        .unwrap_or_else(|e| panic!("{e}\n--- generated program ---\n{source}"));
    let out = Command::new(&exe)
        .output()
        .expect("run the compiled layout program");
    assert!(
        out.status.success(),
        "layout program failed: {}",
        out.status
    );
    let stdout = String::from_utf8(out.stdout).expect("layout program prints ASCII");

    let mut header: BTreeMap<&str, Option<u64>> = BTreeMap::new();
    for line in stdout.lines() {
        let (key, value) = line.split_once(' ').expect("`KEY VALUE` line");
        let value = match value {
            "absent" => None,
            v => Some(v.parse::<u64>().expect("decimal value")),
        };
        assert!(header.insert(key, value).is_none(), "duplicate key {key}");
    }
    assert_eq!(header.len(), checks.0.len(), "one line per check");

    let mut mismatches = Vec::new();
    let mut compared = 0;
    let mut absent_guards = std::collections::BTreeSet::new();
    for check in &checks.0 {
        match header[check.key.as_str()] {
            None => {
                absent_guards.insert(check.guard.expect("only guarded checks can be absent"));
            }
            Some(theirs) => {
                compared += 1;
                let ok = match check.cmp {
                    Cmp::Equal => check.ours == theirs,
                    Cmp::OursAtLeast => check.ours >= theirs,
                };
                if !ok {
                    mismatches.push(format!(
                        "{}: header {theirs}, ours {}",
                        check.key, check.ours
                    ));
                }
            }
        }
    }
    eprintln!(
        "compared {compared} values with <linux/vfio.h>; absent from this header: {}",
        if absent_guards.is_empty() {
            "nothing".to_owned()
        } else {
            absent_guards.iter().copied().collect::<Vec<_>>().join(", ")
        }
    );
    assert!(
        mismatches.is_empty(),
        "differences from <linux/vfio.h>:\n{}",
        mismatches.join("\n")
    );

    // A header without the v2 migration uAPI would leave nothing of substance compared.
    if absent_guards.contains(SINCE_5_18) {
        unavailable("the installed <linux/vfio.h> predates the v2 migration uAPI (Linux 5.18)");
    }
}

#[test]
fn every_check_has_a_unique_key() {
    let checks = all_checks();
    let mut keys: Vec<_> = checks.0.iter().map(|c| c.key.as_str()).collect();
    let n = keys.len();
    keys.sort_unstable();
    keys.dedup();
    assert_eq!(keys.len(), n);
}
