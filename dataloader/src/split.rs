//! Deterministic train/validation split.
//!
//! Decided by hashing the cell's name (or its group's value), not its row, so the split of a
//! cell never changes when the store is re-converted with another shuffle or cell selection.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::cells::{runs_by_key, CellSet};
use crate::error::{DataError, Result};
use crate::frame::Column;
use crate::rng::{hash_keys, hash_str, unit};
use crate::store::Store;

/// Groups of an obs column, numbered as their texts are first seen: equal texts are one group
/// (a missing category is the empty text), whatever the column's type. One `Groups` numbers
/// every slice of a column the same way, so the column is swept, never held.
#[derive(Default)]
struct Groups {
    names: Vec<String>,
    index: HashMap<String, u32>,
}

impl Groups {
    fn intern(&mut self, text: String) -> u32 {
        *self.index.entry(text).or_insert_with_key(|t| {
            self.names.push(t.clone());
            self.names.len() as u32 - 1
        })
    }

    /// The group of each row of `column` (categorical codes looked up once per category).
    fn ids(&mut self, column: &Column) -> Vec<u32> {
        match column {
            Column::Categorical { codes, categories, .. } => {
                let of_code: Vec<u32> = categories.iter().map(|c| self.intern(c.clone())).collect();
                let missing = self.intern(String::new());
                codes.iter().map(|&c| usize::try_from(c).ok().and_then(|c| of_code.get(c).copied()).unwrap_or(missing)).collect()
            }
            other => (0..other.len()).map(|i| self.intern(other.text(i))).collect(),
        }
    }
}

/// Rows of a `by` column read at a time.
const BY_SLICE: u64 = 1 << 20;

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

/// Store rows of the training and validation cells.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    pub train: CellSet,
    pub val: CellSet,
}

impl Split {
    fn assign(&mut self, row: usize, is_val: bool) {
        if is_val { self.val.push(row as u32) } else { self.train.push(row as u32) }
    }
}

impl SplitSpec {
    /// Splits the cells of `store`.
    pub fn apply(&self, store: &Store) -> Result<Split> {
        self.apply_in_slices(store, BY_SLICE)
    }

    /// `apply`, sweeping a `by` column `slice` rows at a time.
    fn apply_in_slices(&self, store: &Store, slice: u64) -> Result<Split> {
        if !(0.0..1.0).contains(&self.val_fraction) {
            return Err(DataError::Config(format!("split.val_fraction = {} must be in [0, 1)", self.val_fraction)));
        }
        let n = store.n_cells();
        let mut split = Split { train: CellSet::new(), val: CellSet::new() };
        // Cells are assigned in store order into run-length sets: no per-cell table.
        match (&self.by, self.unit) {
            (Some(_), SplitUnit::Block) => return Err(DataError::Config("split.by and split.unit = \"block\" exclude each other; choose one".into())),
            (None, SplitUnit::Block) => {
                // A block is a run of rows in store order.
                let blocks = runs_by_key((0..n as u32).map(|i| store.chunk_of(i) / crate::corpus::CHUNKS_PER_BLOCK));
                let groups: Vec<(String, usize)> = blocks.iter().map(|(b, rows)| (b.to_string(), rows.len())).collect();
                for ((_, rows), chosen) in blocks.into_iter().zip(self.choose_groups(&groups, n)) {
                    let set = if chosen { &mut split.val } else { &mut split.train };
                    set.push_run(rows.start as u32..rows.end as u32);
                }
            }
            (None, SplitUnit::Cell) => store.for_each_obs_name(|i, name| split.assign(i, unit(hash_keys(&[self.seed, hash_str(name)])) < self.val_fraction))?,
            (Some(col), SplitUnit::Cell) => {
                // Two sweeps of the column: the groups' sizes, then each cell's side.
                let mut groups = Groups::default();
                let mut sizes: Vec<usize> = Vec::new();
                for start in (0..n as u64).step_by(slice as usize) {
                    let ids = groups.ids(&store.column_slice("obs", col, start..start + slice)?);
                    sizes.resize(groups.names.len(), 0);
                    ids.iter().for_each(|&g| sizes[g as usize] += 1);
                }
                let named: Vec<(String, usize)> = groups.names.iter().cloned().zip(sizes).collect();
                let chosen = self.choose_groups(&named, n);
                for start in (0..n as u64).step_by(slice as usize) {
                    let ids = groups.ids(&store.column_slice("obs", col, start..start + slice)?);
                    ids.iter().enumerate().for_each(|(i, &g)| split.assign(start as usize + i, chosen[g as usize]));
                }
            }
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

    /// Of `groups` (a name and its cells), those taken in hash order of their names until
    /// they hold `val_fraction` of the `n` cells.
    fn choose_groups(&self, groups: &[(String, usize)], n: usize) -> Vec<bool> {
        let mut order: Vec<usize> = (0..groups.len()).filter(|&g| groups[g].1 > 0).collect();
        order.sort_by_key(|&g| hash_keys(&[self.seed, hash_str(&groups[g].0)]));
        let target = (self.val_fraction * n as f64).round() as usize;
        let mut chosen = vec![false; groups.len()];
        let mut taken = 0;
        for g in order {
            if taken >= target {
                break;
            }
            chosen[g] = true;
            taken += groups[g].1;
        }
        chosen
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn groups_are_texts_whatever_the_column_type() {
        // Codes 0 and 2 name the same text; -1 (missing) is the empty text, like "".
        let cat = Column::Categorical { codes: vec![0, 1, 2, -1, 3, 0], categories: ["a", "b", "a", ""].map(String::from).to_vec().into(), ordered: false };
        let mut groups = Groups::default();
        let group = groups.ids(&cat);
        let text: Vec<&str> = group.iter().map(|&g| groups.names[g as usize].as_str()).collect();
        assert_eq!(text, ["a", "b", "a", "", "", "a"]);
        assert_eq!(groups.names.iter().collect::<std::collections::HashSet<_>>().len(), groups.names.len(), "one group per text");
        assert_eq!(groups.ids(&cat), group, "a second slice is numbered the same way");
        let mut groups = Groups::default();
        let group = groups.ids(&Column::Int(vec![3, 1, 3]));
        assert_eq!((group[0] == group[2], group[0] != group[1], groups.names.len()), (true, true, 2));
    }

    #[test]
    fn a_column_swept_in_slices_splits_like_one_sweep() {
        let dir = tempfile::tempdir().unwrap();
        let (src, out) = (dir.path().join("s.h5ad"), dir.path().join("s.zarr"));
        crate::synth::write(&crate::synth::SynthOptions::new(src.clone(), 300, 30, 3, 2)).unwrap();
        crate::convert::convert(&src, &out, &Default::default()).unwrap();
        let store = Store::open(&out).unwrap();
        for by in ["library", "cell_type"] {
            let spec = SplitSpec { val_fraction: 0.3, seed: 1, by: Some(by.into()), unit: SplitUnit::Cell };
            let whole = spec.apply(&store).unwrap();
            assert!(!whole.val.is_empty() && !whole.train.is_empty());
            assert_eq!(spec.apply_in_slices(&store, 7).unwrap(), whole, "{by}");
        }
    }

    #[test]
    fn groups_are_taken_in_hash_order_until_the_share_is_reached() {
        let spec = SplitSpec { val_fraction: 0.5, seed: 3, by: None, unit: SplitUnit::Cell };
        let groups: Vec<(String, usize)> = (0..20).map(|g| (format!("g{g}"), 10)).chain([("empty".to_string(), 0)]).collect();
        let chosen = spec.choose_groups(&groups, 200);
        assert_eq!(chosen.iter().filter(|&&c| c).count(), 10);
        assert!(!chosen[20], "a group without cells is never chosen");
        let mut by_hash: Vec<usize> = (0..20).collect();
        by_hash.sort_by_key(|&g| hash_keys(&[3, hash_str(&groups[g].0)]));
        assert!(by_hash[..10].iter().all(|&g| chosen[g]));
    }
}
