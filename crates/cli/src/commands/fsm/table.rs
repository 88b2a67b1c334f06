//! `fsm table`: the next step for every (from, to) pair of states.

use std::fmt::Write as _;

use serde::ser::{Serialize, SerializeMap, Serializer};
use vfio_mig_uapi::{DeviceState, MigrationFeatures};

/// `grid[from][to]`: the next state, or `None` where the transition is refused.
fn grid(features: MigrationFeatures) -> [[Option<DeviceState>; 8]; 8] {
    DeviceState::ALL
        .map(|from| DeviceState::ALL.map(|to| vfio_mig_fsm::next_step(from, to, features).ok()))
}

/// Header line, column names, then one row per from-state; `-` marks a refused transition.
pub(super) fn text(features: MigrationFeatures) -> String {
    const CORNER: &str = "from \\ to";
    let width = DeviceState::ALL
        .iter()
        .map(|s| s.name().len())
        .max()
        .unwrap_or(0)
        .max(CORNER.len());
    let mut out = format!("next step toward each target, features: {features} (-: refused)\n");
    let mut line = format!("{CORNER:<width$}");
    for to in DeviceState::ALL {
        let _ = write!(line, "  {:<width$}", to.name());
    }
    out.push_str(line.trim_end());
    out.push('\n');
    for (from, row) in DeviceState::ALL.iter().zip(grid(features)) {
        let mut line = format!("{:<width$}", from.name());
        for cell in row {
            let _ = write!(line, "  {:<width$}", cell.map_or("-", DeviceState::name));
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// The whole table as the JSON object architecture.md specifies, states in numeric order.
struct TableJson([[Option<DeviceState>; 8]; 8]);

/// One from-state's row: to-state -> next state or null.
struct RowJson([Option<DeviceState>; 8]);

impl Serialize for TableJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(DeviceState::COUNT))?;
        for (from, row) in DeviceState::ALL.iter().zip(self.0) {
            map.serialize_entry(from.name(), &RowJson(row))?;
        }
        map.end()
    }
}

impl Serialize for RowJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(DeviceState::COUNT))?;
        for (to, next) in DeviceState::ALL.iter().zip(self.0) {
            map.serialize_entry(to.name(), &next)?;
        }
        map.end()
    }
}

/// The table as one pretty-printed JSON object.
pub(super) fn json(features: MigrationFeatures) -> serde_json::Result<String> {
    let mut s = serde_json::to_string_pretty(&TableJson(grid(features)))?;
    s.push('\n');
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_columns_line_up() {
        let t = text(MigrationFeatures::ALL);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 2 + 8);
        assert!(lines[0].contains("stop-copy,p2p,pre-copy"));
        // Every cell starts where its column header starts.
        let header = lines[1];
        let starts: Vec<usize> = DeviceState::ALL
            .iter()
            .map(|s| header.find(&format!("  {}", s.name())).unwrap() + 2)
            .collect();
        for row in &lines[2..] {
            for &col in &starts[..] {
                let before = &row.as_bytes()[col - 2..col];
                assert_eq!(before, b"  ", "{row}");
                assert_ne!(row.as_bytes()[col], b' ', "{row}");
            }
        }
    }

    #[test]
    fn json_keeps_numeric_state_order() {
        let j = json(MigrationFeatures::STOP_COPY).unwrap();
        let positions: Vec<usize> = DeviceState::ALL
            .iter()
            .map(|s| j.find(&format!("\n  \"{}\": {{", s.name())).unwrap())
            .collect();
        assert!(positions.windows(2).all(|w| w[0] < w[1]), "{j}");
    }
}
