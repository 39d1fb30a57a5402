//! `Frame`: AnnData's `obs`/`var` dataframes held in memory.
//!
//! var and the obs of one dataset are held whole; converting an atlas reads and writes obs a
//! window of cells at a time instead (`source::ObsReader`, `store::write::FrameWriter`), with
//! `UniqueNames` renaming repeated names as they pass.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// One dataframe column in AnnData's encodings.
#[derive(Debug, Clone, PartialEq)]
pub enum Column {
    /// Codes into `categories`; `-1` is missing (pandas' convention). The categories are
    /// shared, so slices of a column read a window at a time do not copy them.
    Categorical { codes: Vec<i32>, categories: Arc<Vec<String>>, ordered: bool },
    Strings(Vec<String>),
    Float(Vec<f64>),
    Int(Vec<i64>),
    Bool(Vec<bool>),
}

impl Column {
    pub fn len(&self) -> usize {
        match self {
            Column::Categorical { codes, .. } => codes.len(),
            Column::Strings(v) => v.len(),
            Column::Float(v) => v.len(),
            Column::Int(v) => v.len(),
            Column::Bool(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Row `i` as text, the form `--keep` filters and labels compare against.
    pub fn text(&self, i: usize) -> String {
        match self {
            Column::Categorical { codes, categories, .. } => {
                usize::try_from(codes[i]).ok().and_then(|c| categories.get(c)).cloned().unwrap_or_default()
            }
            Column::Strings(v) => v[i].clone(),
            Column::Float(v) => format_float(v[i]),
            Column::Int(v) => v[i].to_string(),
            Column::Bool(v) => if v[i] { "True" } else { "False" }.to_string(),
        }
    }

    /// A short type name for reports.
    pub fn type_name(&self) -> &'static str {
        match self {
            Column::Categorical { .. } => "categorical",
            Column::Strings(_) => "string",
            Column::Float(_) => "float",
            Column::Int(_) => "int",
            Column::Bool(_) => "bool",
        }
    }

    /// The rows `rows` in that order; categoricals keep their category list.
    pub fn take(&self, rows: &[usize]) -> Column {
        match self {
            Column::Categorical { codes, categories, ordered } => Column::Categorical {
                codes: rows.iter().map(|&r| codes[r]).collect(),
                categories: categories.clone(),
                ordered: *ordered,
            },
            Column::Strings(v) => Column::Strings(rows.iter().map(|&r| v[r].clone()).collect()),
            Column::Float(v) => Column::Float(rows.iter().map(|&r| v[r]).collect()),
            Column::Int(v) => Column::Int(rows.iter().map(|&r| v[r]).collect()),
            Column::Bool(v) => Column::Bool(rows.iter().map(|&r| v[r]).collect()),
        }
    }

    /// Appends the rows of `other`, a column of the same kind (a slice of the same source
    /// column: categoricals share their categories).
    fn append(&mut self, other: Column) -> Result<(), String> {
        match (self, other) {
            (Column::Categorical { codes, .. }, Column::Categorical { codes: more, .. }) => codes.extend(more),
            (Column::Strings(v), Column::Strings(more)) => v.extend(more),
            (Column::Float(v), Column::Float(more)) => v.extend(more),
            (Column::Int(v), Column::Int(more)) => v.extend(more),
            (Column::Bool(v), Column::Bool(more)) => v.extend(more),
            (this, other) => return Err(format!("a {} column cannot take {} rows", this.type_name(), other.type_name())),
        }
        Ok(())
    }

    /// Reorders the column in place so row i becomes row `order[i]` (a permutation).
    fn permute(&mut self, order: &[usize]) {
        match self {
            Column::Categorical { codes, .. } => permute(codes, order),
            Column::Strings(v) => permute(v, order),
            Column::Float(v) => permute(v, order),
            Column::Int(v) => permute(v, order),
            Column::Bool(v) => permute(v, order),
        }
    }

    /// `take` that moves strings out of `self` instead of copying them; `rows` must be distinct.
    fn take_moving(&mut self, rows: &[usize]) -> Column {
        match self {
            Column::Strings(v) => Column::Strings(rows.iter().map(|&r| std::mem::take(&mut v[r])).collect()),
            other => other.take(rows),
        }
    }

    /// Value counts, most frequent first (ties by value), for inspection.
    pub fn top_values(&self, k: usize) -> Vec<(String, usize)> {
        let mut counts = BTreeMap::new();
        self.count_values(&mut counts);
        most_common(counts, k)
    }

    /// Adds this column's value counts to `counts` (columns swept a slice at a time).
    pub fn count_values(&self, counts: &mut BTreeMap<String, usize>) {
        for i in 0..self.len() {
            *counts.entry(self.text(i)).or_default() += 1;
        }
    }

    /// Number of distinct values.
    pub fn n_distinct(&self) -> usize {
        match self {
            Column::Categorical { categories, .. } => categories.len(),
            _ => (0..self.len()).map(|i| self.text(i)).collect::<std::collections::HashSet<_>>().len(),
        }
    }

    /// Turns text values into a categorical (what pandas does with few distinct strings).
    pub fn categorical_from_text(values: Vec<String>) -> Column {
        let mut categories: Vec<String> = values.clone();
        categories.sort();
        categories.dedup();
        let lookup: HashMap<&str, i32> = categories.iter().enumerate().map(|(i, c)| (c.as_str(), i as i32)).collect();
        let codes = values.iter().map(|v| lookup[v.as_str()]).collect();
        Column::Categorical { codes, categories: Arc::new(categories), ordered: false }
    }
}

/// The `k` most frequent values of `counts`, most frequent first (ties by value).
pub fn most_common(counts: BTreeMap<String, usize>, k: usize) -> Vec<(String, usize)> {
    let mut v: Vec<(String, usize)> = counts.into_iter().collect();
    v.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    v.truncate(k);
    v
}

fn format_float(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// A dataframe: an index of unique names plus named columns, all of one length.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Frame {
    /// Name of the index column in the source (`_index`, `cell_label`, ...).
    pub index_name: String,
    pub index: Vec<String>,
    pub columns: Vec<(String, Column)>,
}

impl Frame {
    pub fn len(&self) -> usize {
        self.index.len()
    }

    pub fn is_empty(&self) -> bool {
        self.index.is_empty()
    }

    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|(n, _)| n == name).map(|(_, c)| c)
    }

    pub fn column_names(&self) -> Vec<&str> {
        self.columns.iter().map(|(n, _)| n.as_str()).collect()
    }

    /// The rows `rows` in that order.
    pub fn take(&self, rows: &[usize]) -> Frame {
        Frame {
            index_name: self.index_name.clone(),
            index: rows.iter().map(|&r| self.index[r].clone()).collect(),
            columns: self.columns.iter().map(|(n, c)| (n.clone(), c.take(rows))).collect(),
        }
    }

    /// `take` of a frame that is not needed afterwards: the selected names and strings are moved,
    /// not copied, so reordering a million-cell obs never holds two copies of its names. A
    /// selection that repeats a row falls back to copying.
    pub fn into_take(mut self, rows: &[usize]) -> Frame {
        let mut seen = vec![false; self.len()];
        if rows.iter().any(|&r| std::mem::replace(&mut seen[r], true)) {
            return self.take(rows);
        }
        if rows.len() == self.len() {
            // A reordering of every row (conversion's shuffle): in place, so an atlas's obs
            // is never held in two vectors at once.
            permute(&mut self.index, rows);
            self.columns.iter_mut().for_each(|(_, c)| c.permute(rows));
            return self;
        }
        Frame {
            index: rows.iter().map(|&r| std::mem::take(&mut self.index[r])).collect(),
            columns: self.columns.iter_mut().map(|(n, c)| (std::mem::take(n), c.take_moving(rows))).collect(),
            index_name: self.index_name,
        }
    }

    /// The frames' rows one after another: slices read from one source, so of one schema.
    pub fn concat(parts: Vec<Frame>) -> Result<Frame, String> {
        let mut parts = parts.into_iter();
        let mut out = parts.next().unwrap_or_default();
        for part in parts {
            if part.columns.len() != out.columns.len() {
                return Err(format!("a frame of {} columns cannot take one of {}", out.columns.len(), part.columns.len()));
            }
            out.index.extend(part.index);
            for ((_, col), (_, more)) in out.columns.iter_mut().zip(part.columns) {
                col.append(more)?;
            }
        }
        Ok(out)
    }

    /// Makes index names unique the way AnnData's `obs_names_make_unique` does:
    /// the second `x` becomes `x-1`, the third `x-2`. Returns how many were renamed.
    pub fn make_index_unique(&mut self) -> usize {
        let mut names = UniqueNames::new(self.index.iter().map(|n| crate::rng::hash_str(n)).collect());
        self.index.iter_mut().for_each(|n| names.rename(n));
        names.renamed()
    }
}

/// AnnData's `obs_names_make_unique` over names that arrive in order, a window at a time
/// (conversion writes obs so): built from the hashes of every name, it holds 8 bytes a name
/// while some name repeats, none when every name is unique (the usual case), and the text of
/// repeated names only.
pub struct UniqueNames {
    /// Sorted hashes of every name; empty when no hash repeats.
    hashes: Vec<u64>,
    /// Occurrences so far of each repeated name, and the next suffix to try.
    seen: HashMap<String, usize>,
    renamed: usize,
}

impl UniqueNames {
    /// From the hashes (`rng::hash_str`) of all the names, in any order.
    pub fn new(mut hashes: Vec<u64>) -> UniqueNames {
        hashes.sort_unstable();
        if hashes.windows(2).all(|w| w[0] != w[1]) {
            hashes = Vec::new();
        }
        UniqueNames { hashes, seen: HashMap::new(), renamed: 0 }
    }

    fn count(&self, h: u64) -> usize {
        self.hashes.partition_point(|&x| x <= h) - self.hashes.partition_point(|&x| x < h)
    }

    /// Renames `name` if an earlier name was the same: `x` → `x-k` with the smallest `k` not
    /// taken by a name of the input. (Hashes stand for names in that check, so two names
    /// colliding in 64 bits would only skip a suffix.)
    pub fn rename(&mut self, name: &mut String) {
        if self.hashes.is_empty() || self.count(crate::rng::hash_str(name)) < 2 {
            return;
        }
        let Some(count) = self.seen.get(name.as_str()).copied() else {
            self.seen.insert(name.clone(), 1);
            return;
        };
        let mut k = count;
        let mut candidate = format!("{name}-{k}");
        while self.count(crate::rng::hash_str(&candidate)) > 0 {
            k += 1;
            candidate = format!("{name}-{k}");
        }
        self.seen.insert(std::mem::replace(name, candidate), k + 1);
        self.renamed += 1;
    }

    /// Names renamed so far.
    pub fn renamed(&self) -> usize {
        self.renamed
    }
}

/// Reorders `v` in place so that `v[i]` becomes the old `v[order[i]]`, following each cycle of
/// the permutation `order` once.
fn permute<T: Default>(v: &mut [T], order: &[usize]) {
    let mut done = vec![false; v.len()];
    for start in 0..v.len() {
        if done[start] {
            continue;
        }
        let first = std::mem::take(&mut v[start]);
        let mut j = start;
        loop {
            done[j] = true;
            let k = order[j];
            if k == start {
                v[j] = first;
                break;
            }
            v[j] = std::mem::take(&mut v[k]);
            j = k;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_names_get_anndata_style_suffixes() {
        let mut f = Frame { index: ["a", "b", "a", "a"].map(String::from).to_vec(), ..Default::default() };
        assert_eq!(f.make_index_unique(), 2);
        assert_eq!(f.index, vec!["a", "b", "a-1", "a-2"]);
        let mut taken = Frame { index: ["x", "x-1", "x", "x"].map(String::from).to_vec(), ..Default::default() };
        assert_eq!(taken.make_index_unique(), 2);
        assert_eq!(taken.index, vec!["x", "x-1", "x-2", "x-3"], "a suffix already taken by a name is skipped");
        let mut unique = Frame { index: ["a", "b", "c"].map(String::from).to_vec(), ..Default::default() };
        assert_eq!(unique.make_index_unique(), 0);
        assert_eq!(unique.index, vec!["a", "b", "c"]);
    }

    #[test]
    fn into_take_equals_take() {
        let f = Frame {
            index_name: "cell".into(),
            index: ["c0", "c1", "c2", "c3"].map(String::from).to_vec(),
            columns: vec![
                ("s".into(), Column::Strings(["w", "x", "y", "z"].map(String::from).to_vec())),
                ("n".into(), Column::Int(vec![0, 1, 2, 3])),
            ],
        };
        for rows in [vec![2, 0, 3], vec![1, 1], vec![3, 0, 2, 1], vec![1, 0, 3, 2], vec![0, 1, 2, 3]] {
            let want = f.take(&rows);
            let got = f.clone().into_take(&rows);
            assert_eq!((got.index_name.as_str(), &got.index), (want.index_name.as_str(), &want.index), "{rows:?}");
            assert_eq!(got.columns, want.columns, "{rows:?}: a repeated row is copied, not emptied");
        }
    }

    #[test]
    fn categorical_text_and_missing_code() {
        let c = Column::Categorical { codes: vec![1, -1, 0], categories: Arc::new(vec!["x".into(), "y".into()]), ordered: false };
        assert_eq!((c.text(0), c.text(1), c.text(2)), ("y".to_string(), String::new(), "x".to_string()));
        assert_eq!(c.top_values(1), vec![(String::new(), 1)]);
    }
}
