//! Runs the `custom_device` example's migration, so that a change breaking the example
//! fails the tests and not only `cargo run --example`.

#[allow(dead_code)] // its `main` is for `cargo run --example custom_device`
#[path = "../examples/custom_device.rs"]
mod custom_device;

#[test]
fn the_custom_device_example_migrates_and_verifies() {
    let state = custom_device::migrate().expect("the example's migration verifies");
    // The count (21 events) leads the state; the ring holds the last 16 of them.
    assert_eq!(&state[..4], &21u32.to_le_bytes());
    assert_eq!(state.len(), 4 + 16 * 4);
}
