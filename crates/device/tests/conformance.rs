//! The conformance suite stamped for the controller over the test device, under each of the
//! four feature sets (with and without DMA logging), using every form of the macro.

mod common;

use common::{digest, factory};
use vfio_mig_device::conformance::{run_all, Target};
use vfio_mig_device::{migration_conformance_tests, MigrationFeatures};

migration_conformance_tests!(stop_copy_only, factory(MigrationFeatures::STOP_COPY, false));

migration_conformance_tests!(p2p, factory(MigrationFeatures::P2P, true), digest);

migration_conformance_tests!(
    pre_copy,
    target = Target::new("pre-copy", factory(MigrationFeatures::PRE_COPY, false))
        .with_digest(digest)
        .expect_features(MigrationFeatures::PRE_COPY)
        .expect_dma_logging(false)
);

migration_conformance_tests!(
    all_features,
    target = Target::new("all", factory(MigrationFeatures::ALL, true))
        .with_digest(digest)
        .expect_features(MigrationFeatures::ALL)
        .expect_dma_logging(true),
);

#[test]
fn run_all_reports_every_check_passing_as_json() {
    let target = Target::new("all", factory(MigrationFeatures::ALL, true)).with_digest(digest);
    let report = run_all(&target);
    assert!(report.passed(), "{report}");
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["target"], "all");
    assert_eq!(
        json["features"],
        serde_json::json!(["stop-copy", "p2p", "pre-copy"])
    );
    let checks = json["checks"].as_array().unwrap();
    assert_eq!(
        checks.len(),
        vfio_mig_device::conformance::CHECK_NAMES.len()
    );
    assert_eq!(checks[0]["name"], "features_contain_stop_copy");
    assert_eq!(checks[0]["passed"], true);
    assert!(checks[0]["duration_secs"].as_f64().unwrap() >= 0.0);
}

#[test]
fn wrong_expectations_fail_with_a_message() {
    let target = Target::new("p2p", factory(MigrationFeatures::P2P, false))
        .expect_features(MigrationFeatures::ALL)
        .expect_dma_logging(true);
    let report = run_all(&target);
    let failed: Vec<&str> = report.failures().map(|c| c.name).collect();
    assert_eq!(
        failed,
        ["features_contain_stop_copy", "dma_logging"],
        "{report}"
    );
    let features = &report.checks[0];
    assert!(
        features
            .message
            .as_deref()
            .unwrap()
            .contains("expected stop-copy,p2p,pre-copy"),
        "{features:?}"
    );
}
