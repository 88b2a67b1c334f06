//! `fsm path`: a whole transition and each arc's effect on the data session.

use serde::Serialize;
use vfio_mig_fsm::{session_effect, Path};
use vfio_mig_uapi::{DeviceState, MigrationFeatures};

use super::{session_key, session_phrase};

/// The `--json` document.
#[derive(Serialize)]
struct PathJson<'a> {
    from: DeviceState,
    to: DeviceState,
    features: MigrationFeatures,
    states: &'a [DeviceState],
    arcs: Vec<ArcJson>,
}

#[derive(Serialize)]
struct ArcJson {
    from: DeviceState,
    to: DeviceState,
    session: &'static str,
}

/// `a -> b -> c`, then one line per arc: `  a -> b  <what it does to the session>`.
pub(super) fn text(path: &Path) -> String {
    let mut text = format!("{path}\n");
    if path.arc_count() == 0 {
        text.push_str(&format!("  no arcs: already in {}\n", path.from()));
        return text;
    }
    let labels: Vec<String> = path.arcs().map(|(a, b)| format!("{a} -> {b}")).collect();
    let width = labels.iter().map(String::len).max().unwrap_or(0);
    for (label, (a, b)) in labels.iter().zip(path.arcs()) {
        let phrase = session_phrase(session_effect(a, b));
        text.push_str(&format!("  {label:<width$}  {phrase}\n"));
    }
    text
}

/// The path as one pretty-printed JSON object.
pub(super) fn json(path: &Path, features: MigrationFeatures) -> serde_json::Result<String> {
    let doc = PathJson {
        from: path.from(),
        to: path.to(),
        features,
        states: path.states(),
        arcs: path
            .arcs()
            .map(|(from, to)| ArcJson {
                from,
                to,
                session: session_key(session_effect(from, to)),
            })
            .collect(),
    };
    let mut s = serde_json::to_string_pretty(&doc)?;
    s.push('\n');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vfio_mig_uapi::DeviceState::*;

    #[test]
    fn text_aligns_arc_lines() {
        let p = vfio_mig_fsm::path(Resuming, PreCopy, MigrationFeatures::ALL).unwrap();
        let t = text(&p);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(
            lines[0],
            "resuming -> stop -> running-p2p -> running -> pre-copy"
        );
        assert_eq!(lines.len(), 5);
        // The phrase starts in the same column on every arc line.
        let starts: Vec<usize> = p
            .arcs()
            .zip(&lines[1..])
            .map(|((a, b), line)| line.find(session_phrase(session_effect(a, b))).unwrap())
            .collect();
        assert!(starts.windows(2).all(|w| w[0] == w[1]), "{t}");
    }

    #[test]
    fn no_op_path_says_so() {
        let p = vfio_mig_fsm::path(Stop, Stop, MigrationFeatures::STOP_COPY).unwrap();
        assert_eq!(text(&p), "stop\n  no arcs: already in stop\n");
    }
}
