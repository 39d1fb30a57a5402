//! `--cell-metadata`: per-cell CSV columns (the Allen atlas `cell_metadata.csv`) joined onto obs,
//! streamed, and the streaming CSV reader the atlas plot shares.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Lines};
use std::path::{Path, PathBuf};

use crate::error::{DataError, Result};
use crate::frame::{Column, Frame};

/// Adds the columns of a per-cell CSV (e.g. the Allen atlas `cell_metadata.csv`) to `obs`,
/// matched on `key` against obs names. Returns how many cells had no row in the CSV.
pub fn join_cell_metadata(obs: &mut Frame, csv: &Path, key: &str) -> Result<usize> {
    // Streamed line by line: the Allen atlas metadata is ~1 GB, we keep only matched rows.
    let rows = CsvRows::open(csv)?;
    let header = rows.header.clone();
    let key_col = header.iter().position(|h| h == key).ok_or_else(|| {
        DataError::field(csv, key, format!("--metadata-key column not in the CSV header; it has: {}", header.join(", ")))
    })?;
    let row_of: HashMap<&str, usize> = obs.index.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    // Dictionary-encoded while streaming: 4 bytes per cell and column, not a String each.
    let mut columns: Vec<DictColumn> = (0..header.len()).map(|_| DictColumn::new(obs.len())).collect();
    let mut matched = vec![false; obs.len()];
    for row in rows {
        let (_, fields) = row?;
        if let Some(&r) = row_of.get(fields[key_col].as_str()) {
            matched[r] = true;
            for (c, v) in fields.into_iter().enumerate() {
                columns[c].set(r, v);
            }
        }
    }
    if !matched.iter().any(|&m| m) {
        return Err(DataError::field(csv, key, "no value matches an obs name; is --metadata-key the column of cell labels?"));
    }
    for (c, (name, col)) in header.iter().zip(columns).enumerate() {
        if c == key_col {
            continue;
        }
        if obs.column(name).is_some() {
            tracing::warn!("{}: column `{name}` already in obs; keeping the file's own", csv.display());
            continue;
        }
        obs.columns.push((name.clone(), col.into_column()));
    }
    Ok(matched.iter().filter(|&&m| !m).count())
}

/// A CSV read row by row: the header first, then each non-empty line's fields, checked to be as
/// many as the header's, so a file of any size is never held whole.
pub struct CsvRows {
    path: PathBuf,
    pub header: Vec<String>,
    lines: std::iter::Enumerate<Lines<BufReader<std::fs::File>>>,
}

impl CsvRows {
    pub fn open(path: &Path) -> Result<CsvRows> {
        let file = std::fs::File::open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => DataError::NotFound { path: path.to_path_buf() },
            _ => DataError::io(path, e),
        })?;
        let mut lines = BufReader::new(file).lines();
        let header = parse_csv_line(&lines.next().transpose().map_err(|e| DataError::io(path, e))?.unwrap_or_default());
        Ok(CsvRows { path: path.to_path_buf(), header, lines: lines.enumerate() })
    }

    /// The position of column `name`; the error names the flag that chose it and lists the header.
    pub fn column(&self, name: &str, flag: &str) -> Result<usize> {
        self.header.iter().position(|h| h == name).ok_or_else(|| {
            DataError::input(&self.path, format!("no column `{name}` ({flag}); the header has: {}", self.header.join(", ")))
        })
    }
}

impl Iterator for CsvRows {
    /// The line number (1 is the header) and the fields.
    type Item = Result<(usize, Vec<String>)>;

    fn next(&mut self) -> Option<Self::Item> {
        for (i, line) in self.lines.by_ref() {
            let line = match line {
                Ok(l) if l.is_empty() => continue,
                Ok(l) => l,
                Err(e) => return Some(Err(DataError::io(&self.path, e))),
            };
            let fields = parse_csv_line(&line);
            if fields.len() != self.header.len() {
                let problem = format!("line {}: {} fields, the header has {}", i + 2, fields.len(), self.header.len());
                return Some(Err(DataError::input(&self.path, problem)));
            }
            return Some(Ok((i + 2, fields)));
        }
        None
    }
}

/// A CSV column as codes into its distinct values (`u32::MAX`: no row for that cell).
struct DictColumn {
    values: Vec<String>,
    lookup: HashMap<String, u32>,
    codes: Vec<u32>,
}

impl DictColumn {
    fn new(n: usize) -> Self {
        DictColumn { values: Vec::new(), lookup: HashMap::new(), codes: vec![u32::MAX; n] }
    }

    fn set(&mut self, row: usize, v: String) {
        let next = self.values.len() as u32;
        let code = *self.lookup.entry(v.clone()).or_insert_with(|| {
            self.values.push(v);
            next
        });
        self.codes[row] = code;
    }

    /// Integer ids (e.g. the atlas' `cluster_alias`) stay integers so `--keep c=2523` matches;
    /// other numbers become floats (missing → NaN); anything else a categorical (missing → -1).
    fn into_column(self) -> Column {
        let complete = self.codes.iter().all(|&c| c != u32::MAX);
        let ints: Option<Vec<i64>> = self.values.iter().map(|v| v.parse::<i64>().ok()).collect();
        let floats: Option<Vec<f64>> =
            self.values.iter().map(|v| if v.is_empty() { Some(f64::NAN) } else { v.parse::<f64>().ok() }).collect();
        match (ints, floats) {
            (Some(v), _) if complete => Column::Int(self.codes.iter().map(|&c| v[c as usize]).collect()),
            (_, Some(v)) => Column::Float(self.codes.iter().map(|&c| v.get(c as usize).copied().unwrap_or(f64::NAN)).collect()),
            _ => {
                let mut order: Vec<usize> = (0..self.values.len()).collect();
                order.sort_by(|&a, &b| self.values[a].cmp(&self.values[b]));
                let mut remap = vec![0i32; order.len()];
                for (new, &old) in order.iter().enumerate() {
                    remap[old] = new as i32;
                }
                Column::Categorical {
                    codes: self.codes.iter().map(|&c| if c == u32::MAX { -1 } else { remap[c as usize] }).collect(),
                    categories: std::sync::Arc::new(order.into_iter().map(|o| self.values[o].clone()).collect()),
                    ordered: false,
                }
            }
        }
    }
}

/// Splits one CSV line (RFC 4180 quoting, no embedded newlines).
pub fn parse_csv_line(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.trim_end_matches('\r').chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            _ => cur.push(c),
        }
    }
    out.push(cur);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::select::tests::obs;
    use crate::select::apply_keep;

    #[test]
    fn metadata_csv_integer_ids_stay_integers() {
        let dir = std::env::temp_dir().join(format!("neurofm-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("cell_metadata.csv");
        std::fs::write(&csv, "cell_label,cluster_alias,x\nc2,210,0.5\nc0,2523,1.5\nother,1,2\n").unwrap();
        let mut f = obs();
        assert_eq!(join_cell_metadata(&mut f, &csv, "cell_label").unwrap(), 1, "c1 has no row");
        assert!(matches!(f.column("cluster_alias"), Some(Column::Float(_))), "a missing cell makes it float (NaN)");
        let kept = apply_keep(&crate::source::ObsReader::Held(f), &["cluster_alias=2523".parse().unwrap()], &csv).unwrap();
        assert_eq!(kept.to_vec(), vec![0]);
        std::fs::write(&csv, "cell_label,cluster_alias\nc0,2523\nc1,210\nc2,2523\n").unwrap();
        let mut f = obs();
        join_cell_metadata(&mut f, &csv, "cell_label").unwrap();
        assert_eq!(f.column("cluster_alias"), Some(&Column::Int(vec![2523, 210, 2523])));
        std::fs::write(&csv, "cell_label,region\nc0,V1\nc2,ACC\n").unwrap();
        let mut f = obs();
        join_cell_metadata(&mut f, &csv, "cell_label").unwrap();
        let want = Column::Categorical { codes: vec![1, -1, 0], categories: vec!["ACC".into(), "V1".into()].into(), ordered: false };
        assert_eq!(f.column("region"), Some(&want), "sorted categories, missing cell is -1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn csv_quotes_and_commas() {
        assert_eq!(parse_csv_line(r#"a,"b,c","d""e""#), vec!["a", "b,c", "d\"e"]);
    }
}
