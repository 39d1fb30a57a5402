//! `--keep`: which cells conversion keeps, by the values of obs columns.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;
use std::str::FromStr;

use crate::error::{DataError, Result};
use crate::frame::{Column, Frame};

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

/// Rows (ascending) of `obs` passing every filter. A missing column or value is an error that
/// lists what exists, since a typo would otherwise silently select nothing.
pub fn apply_keep(obs: &Frame, filters: &[KeepFilter], path: &Path) -> Result<Vec<usize>> {
    let mut keep = vec![true; obs.len()];
    for f in filters {
        let col = obs.column(&f.column).ok_or_else(|| {
            DataError::field(path, format!("obs/{}", f.column), format!("no such column for --keep; obs has: {}", obs.column_names().join(", ")))
        })?;
        // Numeric columns match by value, so `2523`, `2523.0` and `2.523e3` are the same.
        let key = |text: &str| -> String {
            match (col, text.parse::<f64>()) {
                (Column::Float(_) | Column::Int(_), Ok(x)) => format!("{x}"),
                _ => text.to_string(),
            }
        };
        let present: HashSet<String> = (0..col.len()).map(|i| key(&col.text(i))).collect();
        if let Some(missing) = f.values.iter().find(|v| !present.contains(&key(v))) {
            let examples: Vec<String> = col.top_values(10).into_iter().map(|(v, n)| format!("{v} ({n})")).collect();
            return Err(DataError::field(
                path,
                format!("obs/{}", f.column),
                format!("value `{missing}` in --keep does not occur; most common values: {}", examples.join(", ")),
            ));
        }
        let wanted: HashSet<String> = f.values.iter().map(|v| key(v)).collect();
        for (i, k) in keep.iter_mut().enumerate() {
            *k = *k && wanted.contains(&key(&col.text(i)));
        }
    }
    Ok(keep.iter().enumerate().filter(|(_, &k)| k).map(|(i, _)| i).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::tests::obs;

    #[test]
    fn keep_selects_matching_rows_and_names_missing_values() {
        let f: KeepFilter = "t=a".parse().unwrap();
        assert_eq!(apply_keep(&obs(), &[f], Path::new("x.h5ad")).unwrap(), vec![0, 2]);
        let bad: KeepFilter = "t=zzz".parse().unwrap();
        let e = apply_keep(&obs(), &[bad], Path::new("x.h5ad")).unwrap_err().to_string();
        assert!(e.contains("zzz") && e.contains("a (2)"), "{e}");
        let nocol: KeepFilter = "nope=a".parse().unwrap();
        assert!(apply_keep(&obs(), &[nocol], Path::new("x.h5ad")).unwrap_err().to_string().contains("obs has: t"));
    }

    #[test]
    fn numeric_columns_match_keep_values_by_number() {
        let mut f = obs();
        f.columns.push(("cluster_alias".into(), Column::Int(vec![2523, 210, 2523])));
        f.columns.push(("depth".into(), Column::Float(vec![1.0, 2.5, 1.0])));
        let keep = |s: &str| apply_keep(&f, &[s.parse().unwrap()], Path::new("x")).unwrap();
        assert_eq!(keep("cluster_alias=2523"), vec![0, 2]);
        assert_eq!(keep("depth=1"), vec![0, 2]);
        assert_eq!(keep("depth=2.5"), vec![1]);
    }
}
