//! `fsm dot`: the direct arcs of a feature set as a Graphviz digraph.

use std::fmt::Write as _;

use vfio_mig_fsm::{direct_arcs, session_effect, SessionEffect, StreamDirection};
use vfio_mig_uapi::{DeviceState, MigrationFeatures};

const SAVING_FILL: &str = "#ffd9a0";
const RESUMING_FILL: &str = "#c6e2ff";
const OPENS_COLOR: &str = "#c0392b";

/// Edge attributes that show what an arc does to the data session; empty for none.
fn edge_attrs(effect: SessionEffect) -> String {
    match effect {
        SessionEffect::Opens(dir) => format!(
            " [style=bold, penwidth=2, color=\"{OPENS_COLOR}\", fontcolor=\"{OPENS_COLOR}\", label=\"opens {}\"]",
            direction(dir)
        ),
        SessionEffect::Keeps => " [label=\"keeps stream\"]".to_owned(),
        SessionEffect::Ends(dir) => format!(" [style=dashed, label=\"ends {}\"]", direction(dir)),
        SessionEffect::None => String::new(),
    }
}

fn direction(dir: StreamDirection) -> &'static str {
    match dir {
        StreamDirection::Saving => "saving",
        StreamDirection::Resuming => "resuming",
    }
}

/// Node attributes: saving states filled and double-bordered, RESUMING filled.
fn node_attrs(state: DeviceState) -> String {
    if state.is_saving() {
        format!(" [style=\"rounded,filled\", fillcolor=\"{SAVING_FILL}\", peripheries=2]")
    } else if state == DeviceState::Resuming {
        format!(" [style=\"rounded,filled\", fillcolor=\"{RESUMING_FILL}\"]")
    } else {
        String::new()
    }
}

/// The digraph: one node per supported state, one edge per direct arc.
pub(super) fn render(features: MigrationFeatures) -> String {
    let mut g = String::from("digraph vfio_migration {\n");
    let _ = writeln!(
        g,
        "  label=\"VFIO migration states, features: {features}\\n\
         bold red: opens a data stream; dashed: ends it; double border: saving state; \
         blue: resuming\";"
    );
    g.push_str("  labelloc=t;\n  node [shape=box, style=rounded, fontname=\"Helvetica\"];\n");
    g.push_str("  edge [fontname=\"Helvetica\", fontsize=10];\n");
    for state in vfio_mig_fsm::supported_states(features) {
        let _ = writeln!(g, "  \"{state}\"{};", node_attrs(state));
    }
    for (from, to) in direct_arcs(features) {
        let attrs = edge_attrs(session_effect(from, to));
        let _ = writeln!(g, "  \"{from}\" -> \"{to}\"{attrs};");
    }
    g.push_str("}\n");
    g
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_session_states_are_styled() {
        assert!(node_attrs(DeviceState::StopCopy).contains("peripheries=2"));
        assert!(node_attrs(DeviceState::PreCopyP2p).contains("peripheries=2"));
        assert!(!node_attrs(DeviceState::Resuming).contains("peripheries"));
        assert!(node_attrs(DeviceState::Resuming).contains("filled"));
        assert_eq!(node_attrs(DeviceState::Running), "");
        assert_eq!(node_attrs(DeviceState::RunningP2p), "");
    }

    #[test]
    fn braces_and_quotes_balance() {
        for features in MigrationFeatures::VALID_SETS {
            let g = render(features);
            assert_eq!(g.matches('{').count(), g.matches('}').count(), "{g}");
            for line in g.lines() {
                assert_eq!(line.matches('"').count() % 2, 0, "{line}");
            }
        }
    }
}
