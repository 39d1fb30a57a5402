//! Deterministic train/validation split.
//!
//! Decided by hashing the cell's name (or its group's value), not its row, so the split of a
//! cell never changes when the store is re-converted with another shuffle or cell selection.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::{DataError, Result};
use crate::rng::{hash_keys, hash_str, unit};
use crate::store::Store;

/// How to choose validation cells.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    /// Share of cells held out for validation, in [0, 1).
    pub val_fraction: f64,
    pub seed: u64,
    /// Hold out whole groups of this obs column (e.g. `library_label`), so no group is in both.
    #[serde(default)]
    pub by: Option<String>,
    #[serde(default)]
    pub unit: SplitUnit,
}

/// What the split assigns to validation when `by` is unset (`split.unit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SplitUnit {
    /// Cells, by a hash of their name: stable when the store is re-converted.
    #[default]
    Cell,
    /// Whole read blocks of the store (`corpus::CHUNKS_PER_BLOCK` chunks), in hashed order:
    /// validation then decodes only its own chunks and training never decodes validation
    /// cells, at atlas scale the difference between reading 1 % and half of the store. As
    /// random as the store's cell order (shuffled at conversion); changes with a re-conversion.
    Block,
}

/// Store rows of the training and validation cells, each ascending.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub train: Vec<u32>,
    pub val: Vec<u32>,
}

impl SplitSpec {
    /// Splits the cells of `store`.
    pub fn apply(&self, store: &Store) -> Result<Split> {
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(DataError::Config(format!("split.val_fraction = {} must be in [0, 1)", self.val_fraction)));
        }
        let n = store.n_cells();
        let is_val: Vec<bool> = match (&self.by, self.unit) {
            (Some(_), SplitUnit::Block) => return Err(DataError::Config("split.by and split.unit = \"block\" exclude each other; choose one".into())),
            (None, SplitUnit::Block) => {
                let blocks: Vec<String> = (0..n).map(|i| (store.chunk_of(i as u32) / crate::corpus::CHUNKS_PER_BLOCK).to_string()).collect();
                let val_blocks = self.choose_groups(&blocks);
                blocks.iter().map(|b| val_blocks.contains(b.as_str())).collect()
            }
            (None, SplitUnit::Cell) => {
                let names = store.obs_names()?;
                names.iter().map(|name| unit(hash_keys(&[self.seed, hash_str(name)])) < self.val_fraction).collect()
            }
            (Some(col), SplitUnit::Cell) => {
                let column = store.column("obs", col)?;
                let values: Vec<String> = (0..n).map(|i| column.text(i)).collect();
                let val_groups = self.choose_groups(&values);
                values.iter().map(|v| val_groups.contains(v.as_str())).collect()
            }
        };
        let mut split = Split { train: Vec::new(), val: Vec::new() };
        for (i, v) in is_val.into_iter().enumerate() {
            if v { split.val.push(i as u32) } else { split.train.push(i as u32) }
        }
        if split.train.is_empty() || (self.val_fraction > 0.0 && split.val.is_empty()) {
            return Err(DataError::input(
                &store.path,
                format!(
                    "split with val_fraction {}{} leaves {} training and {} validation cells; both need cells",
                    self.val_fraction,
                    self.by.as_ref().map(|b| format!(" by `{b}`")).unwrap_or_default(),
                    split.train.len(),
                    split.val.len()
                ),
            ));
        }
        Ok(split)
    }

    /// Groups in hash order until they hold `val_fraction` of the cells.
    fn choose_groups<'a>(&self, values: &'a [String]) -> std::collections::HashSet<&'a str> {
        let mut sizes: BTreeMap<&str, usize> = BTreeMap::new();
        for v in values {
            *sizes.entry(v.as_str()).or_default() += 1;
        }
        let mut groups: Vec<(&str, usize)> = sizes.into_iter().collect();
        groups.sort_by_key(|(g, _)| hash_keys(&[self.seed, hash_str(g)]));
        let target = (self.val_fraction * values.len() as f64).round() as usize;
        let mut chosen = std::collections::HashSet::new();
        let mut taken = 0;
        for (g, size) in groups {
            if taken >= target {
                break;
            }
            chosen.insert(g);
            taken += size;
        }
        chosen
    }
}
