//! `--keep`: which cells conversion keeps, by the values of obs columns.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::error::{DataError, Result};
use crate::cells::CellSet;
use crate::frame::{most_common, Column};
use crate::source::{self, ObsReader};

/// `--keep COL=V1,V2`: keep cells whose `obs[COL]` is one of the values.
#[derive(Debug, Clone, PartialEq)]
pub struct KeepFilter {
    pub column: String,
    pub values: Vec<String>,
}

impl FromStr for KeepFilter {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        let (col, vals) = s
            .split_once('=')
            .ok_or_else(|| DataError::Config(format!("--keep `{s}`: expected COLUMN=VALUE[,VALUE...]")))?;
        let values: Vec<String> = vals.split(',').map(|v| v.trim().trim_matches('"').to_string()).filter(|v| !v.is_empty()).collect();
        if col.is_empty() || values.is_empty() {
            return Err(DataError::Config(format!("--keep `{s}`: expected COLUMN=VALUE[,VALUE...]")));
        }
        Ok(KeepFilter { column: col.trim().to_string(), values })
    }
}

impl fmt::Display for KeepFilter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.column, self.values.join(","))
    }
}

/// Rows of obs swept at a time by `--keep`.
const KEEP_SLICE: usize = 1 << 20;

/// Rows of `obs` passing every filter, swept a slice at a time. A missing column or value is
/// an error that lists what exists, since a typo would otherwise silently select nothing.
pub fn apply_keep(obs: &ObsReader, filters: &[KeepFilter], path: &Path) -> Result<CellSet> {
    keep_in_slices(obs, filters, path, KEEP_SLICE)
}

fn keep_in_slices(obs: &ObsReader, filters: &[KeepFilter], path: &Path, slice: usize) -> Result<CellSet> {
    if u32::try_from(obs.len()).is_err() {
        return Err(DataError::field(path, "obs", format!("has {} cells; neurofm stores at most 2^32 - 1 per file: split the file", obs.len())));
    }
    for f in filters {
        if !obs.column_names().contains(&f.column.as_str()) {
            return Err(DataError::field(path, format!("obs/{}", f.column), format!("no such column for --keep; obs has: {}", obs.column_names().join(", "))));
        }
    }
    // Which wanted values occur anywhere in their column, whatever the other filters say.
    let mut found: Vec<Vec<bool>> = filters.iter().map(|f| vec![false; f.values.len()]).collect();
    let mut rows = CellSet::new();
    for at in source::slices(obs.len(), slice) {
        let mut keep = vec![true; at.len()];
        for (f, found) in filters.iter().zip(&mut found) {
            let col = obs.column(&f.column, at.clone())?.ok_or_else(|| DataError::Internal(format!("obs/{} vanished", f.column)))?;
            let wanted: HashMap<String, usize> = f.values.iter().enumerate().map(|(i, v)| (key(&col, v), i)).collect();
            for (i, k) in keep.iter_mut().enumerate() {
                match wanted.get(&key(&col, &col.text(i))) {
                    Some(&v) => found[v] = true,
                    None => *k = false,
                }
            }
        }
        keep.iter().enumerate().filter(|(_, &k)| k).for_each(|(i, _)| rows.push((at.start + i) as u32));
    }
    for (f, found) in filters.iter().zip(&found) {
        if let Some(missing) = f.values.iter().zip(found).find(|(_, &ok)| !ok).map(|(v, _)| v) {
            let mut counts = BTreeMap::new();
            for at in source::slices(obs.len(), slice) {
                if let Some(col) = obs.column(&f.column, at)? {
                    col.count_values(&mut counts);
                }
            }
            let examples: Vec<String> = most_common(counts, 10).into_iter().map(|(v, n)| format!("{v} ({n})")).collect();
            return Err(DataError::field(
                path,
                format!("obs/{}", f.column),
                format!("value `{missing}` in --keep does not occur; most common values: {}", examples.join(", ")),
            ));
        }
    }
    Ok(rows)
}

/// What a value is compared by: numeric columns match by value, so `2523`, `2523.0` and
/// `2.523e3` are the same.
fn key(col: &Column, text: &str) -> String {
    match (col, text.parse::<f64>()) {
        (Column::Float(_) | Column::Int(_), Ok(x)) => format!("{x}"),
        _ => text.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Frame;
    use crate::select::tests::obs;

    /// Kept rows, swept a row at a time and in one slice: both must agree.
    fn keep(obs: &Frame, filters: &[KeepFilter]) -> Result<Vec<u32>> {
        let obs = ObsReader::Held(obs.clone());
        let whole = apply_keep(&obs, filters, Path::new("x.h5ad"))?.to_vec();
        assert_eq!(keep_in_slices(&obs, filters, Path::new("x.h5ad"), 1)?.to_vec(), whole);
        Ok(whole)
    }

    #[test]
    fn keep_selects_matching_rows_and_names_missing_values() {
        let f: KeepFilter = "t=a".parse().unwrap();
        assert_eq!(keep(&obs(), &[f]).unwrap(), vec![0, 2]);
        let bad: KeepFilter = "t=zzz".parse().unwrap();
        let e = keep(&obs(), &[bad]).unwrap_err().to_string();
        assert!(e.contains("zzz") && e.contains("a (2)"), "{e}");
        let nocol: KeepFilter = "nope=a".parse().unwrap();
        assert!(keep(&obs(), &[nocol]).unwrap_err().to_string().contains("obs has: t"));
    }

    #[test]
    fn numeric_columns_match_keep_values_by_number() {
        let mut f = obs();
        f.columns.push(("cluster_alias".into(), Column::Int(vec![2523, 210, 2523])));
        f.columns.push(("depth".into(), Column::Float(vec![1.0, 2.5, 1.0])));
        let keep = |s: &str| keep(&f, &[s.parse().unwrap()]).unwrap();
        assert_eq!(keep("cluster_alias=2523"), vec![0, 2]);
        assert_eq!(keep("depth=1"), vec![0, 2]);
        assert_eq!(keep("depth=2.5"), vec![1]);
    }
}
