//! Ctrl-C during a migration: the first SIGINT or SIGTERM cancels the engine, which rolls
//! the source back (or resets the destination devices) as after any failure; a second one
//! exits at once.

use std::sync::OnceLock;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vfio_mig_orchestrator::Cancel;

/// Exit status of a process ended by a second interrupt (128 + SIGINT, as shells report).
const INTERRUPTED: i32 = 130;

/// The process-wide cancellation token, its signal thread started on first use; `None` if
/// the handlers cannot be installed (the default Ctrl-C behaviour then stays).
pub(crate) fn interrupt_token() -> Option<Cancel> {
    static TOKEN: OnceLock<Option<Cancel>> = OnceLock::new();
    TOKEN
        .get_or_init(|| {
            let mut signals = Signals::new([SIGINT, SIGTERM]).ok()?;
            let cancel = Cancel::new();
            let on_signal = cancel.clone();
            std::thread::Builder::new()
                .name("interrupt".into())
                .spawn(move || {
                    for _ in signals.forever() {
                        if on_signal.is_cancelled() {
                            std::process::exit(INTERRUPTED);
                        }
                        eprintln!(
                            "vfio-mig: interrupted: rolling back (interrupt again to quit now)"
                        );
                        on_signal.cancel();
                    }
                })
                .ok()?;
            Some(cancel)
        })
        .clone()
}
