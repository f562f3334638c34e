//! How the cell tree is shaped: cell capacity and the label levels that group nodes.

use crate::error::{LocatorError, Result};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Nodes per leaf cell unless configured otherwise (DESIGN.md).
pub const DEFAULT_CELL_CAPACITY: u32 = 8;

/// A node's labels, such as `zone=a` or `rack=3`.
pub type Labels = BTreeMap<String, String>;

/// The shape of a cell tree. Every node of the cluster must use the same configuration, since it
/// decides where entries go.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TreeConfig {
    /// Most nodes a leaf cell holds; a full cell splits in two when it must take another node.
    pub cell_capacity: u32,
    /// Label keys from the top of the tree down, such as `["zone", "rack"]`. A node carrying
    /// `zone=a` lands in the subtree of `zone=a`; a node without labels may land anywhere.
    pub label_levels: Vec<String>,
}

impl Default for TreeConfig {
    fn default() -> Self {
        TreeConfig { cell_capacity: DEFAULT_CELL_CAPACITY, label_levels: Vec::new() }
    }
}

impl TreeConfig {
    /// The default shape with another cell capacity.
    pub fn with_cell_capacity(mut self, cell_capacity: u32) -> Self {
        self.cell_capacity = cell_capacity;
        self
    }

    /// The default shape with label levels, top first.
    pub fn with_label_levels<S: Into<String>>(
        mut self,
        levels: impl IntoIterator<Item = S>,
    ) -> Self {
        self.label_levels = levels.into_iter().map(Into::into).collect();
        self
    }

    /// Checks the configuration.
    pub fn validate(&self) -> Result<()> {
        if self.cell_capacity == 0 {
            return Err(LocatorError::ZeroCapacity);
        }
        if let Some((i, level)) =
            self.label_levels.iter().enumerate().find(|(i, l)| self.label_levels[..*i].contains(l))
        {
            return Err(LocatorError::DuplicateLevel { level: level.clone(), at: i });
        }
        Ok(())
    }

    /// Checks a node's labels against the levels, as adding the node would: `UnknownLabel` or
    /// `LabelGap`. For a supervisor to refuse a join it could not place, so that the joiner
    /// hears why.
    pub fn check_labels(&self, labels: &Labels) -> Result<()> {
        self.label_path(labels).map(|_| ())
    }

    /// Checks the text of `labels` and of the levels ([`check_label_text`]). For where a node
    /// is let in (a bootstrap, a leader admitting a join), not for where the tree places it
    /// from the log: an older build's label refused there would part this node's tree from
    /// its peers'.
    pub fn check_label_texts(&self, labels: &Labels) -> Result<()> {
        let mut texts = labels.iter().flat_map(|(k, v)| [k, v]).chain(&self.label_levels);
        texts.try_for_each(|text| check_label_text(text))
    }

    /// The `(key, value)` path of a node in level order, down to the lowest level it has a
    /// label for. Keys that are no level, and a level given without the ones above it, are
    /// refused rather than ignored: a typo in `--label` would otherwise place a node where the
    /// operator did not mean.
    pub(crate) fn label_path(&self, labels: &Labels) -> Result<Vec<(String, String)>> {
        if let Some(key) = labels.keys().find(|k| !self.label_levels.contains(k)) {
            return Err(LocatorError::UnknownLabel {
                key: key.clone(),
                levels: self.label_levels.join(","),
            });
        }
        let path: Vec<(String, String)> = self
            .label_levels
            .iter()
            .map_while(|level| labels.get(level).map(|v| (level.clone(), v.clone())))
            .collect();
        if let Some(given) =
            self.label_levels[path.len()..].iter().find(|l| labels.contains_key(*l))
        {
            return Err(LocatorError::LabelGap {
                given: given.clone(),
                missing: self.label_levels[path.len()].clone(),
                levels: self.label_levels.join(","),
            });
        }
        Ok(path)
    }
}

/// The longest label key, value or level name, in bytes.
pub const MAX_LABEL: usize = 63;

/// Checks one label key, value or level name: 1 to [`MAX_LABEL`] ASCII letters, digits, `-`,
/// `_` or `.`. Said back quoted and cut short, so that what it refuses reaches no terminal as
/// it is.
pub fn check_label_text(text: &str) -> Result<()> {
    let fits = (1..=MAX_LABEL).contains(&text.len())
        && text.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b));
    if fits {
        return Ok(());
    }
    let shown: String = text.chars().take(MAX_LABEL + 1).collect();
    Err(LocatorError::LabelText(format!(
        "{shown:?}{}",
        if shown.len() < text.len() { "…" } else { "" }
    )))
}

/// Parses `key=value`, as given to `--label`.
pub fn parse_label(text: &str) -> Result<(String, String)> {
    match text.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() && !v.trim().is_empty() => {
            let (key, value) = (k.trim(), v.trim());
            check_label_text(key)?;
            check_label_text(value)?;
            Ok((key.to_string(), value.to_string()))
        }
        _ => Err(LocatorError::BadLabel(text.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_node_s_path_follows_the_levels_down_to_its_lowest_label() {
        let config = TreeConfig::default().with_label_levels(["zone", "rack", "host"]);
        let path = config.label_path(&labels(&[("rack", "3"), ("zone", "a")])).unwrap();
        assert_eq!(path, vec![("zone".into(), "a".into()), ("rack".into(), "3".into())]);
        assert_eq!(config.label_path(&Labels::new()).unwrap(), vec![]);
    }

    #[test]
    fn a_level_named_twice_is_refused() {
        let config = TreeConfig::default().with_label_levels(["zone", "rack", "zone"]);
        assert_eq!(
            config.validate(),
            Err(LocatorError::DuplicateLevel { level: "zone".into(), at: 2 })
        );
        assert_eq!(TreeConfig::default().with_label_levels(["zone", "rack"]).validate(), Ok(()));
    }

    #[test]
    fn a_level_given_without_the_level_above_it_is_refused() {
        let config = TreeConfig::default().with_label_levels(["zone", "rack", "host"]);
        assert_eq!(
            config.label_path(&labels(&[("zone", "a"), ("host", "h1")])),
            Err(LocatorError::LabelGap {
                given: "host".into(),
                missing: "rack".into(),
                levels: "zone,rack,host".into(),
            })
        );
        assert!(matches!(
            config.label_path(&labels(&[("rack", "3")])),
            Err(LocatorError::LabelGap { .. })
        ));
    }
}
