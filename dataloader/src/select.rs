//! Choosing cells and genes at conversion: what the original `s4`, `s6`, `s7` and `s8` did.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::path::{Path, PathBuf};
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

/// Adds the columns of a per-cell CSV (e.g. the Allen atlas `cell_metadata.csv`) to `obs`,
/// matched on `key` against obs names. Returns how many cells had no row in the CSV.
pub fn join_cell_metadata(obs: &mut Frame, csv: &Path, key: &str) -> Result<usize> {
    use std::io::BufRead;
    let file = std::fs::File::open(csv).map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => DataError::NotFound { path: csv.to_path_buf() },
        _ => DataError::io(csv, e),
    })?;
    // Streamed line by line: the Allen atlas metadata is ~1 GB, we keep only matched rows.
    let mut lines = std::io::BufReader::new(file).lines();
    let header = parse_csv_line(&lines.next().transpose().map_err(|e| DataError::io(csv, e))?.unwrap_or_default());
    let key_col = header.iter().position(|h| h == key).ok_or_else(|| {
        DataError::field(csv, key, format!("--metadata-key column not in the CSV header; it has: {}", header.join(", ")))
    })?;
    let row_of: HashMap<&str, usize> = obs.index.iter().enumerate().map(|(i, n)| (n.as_str(), i)).collect();
    // Dictionary-encoded while streaming: 4 bytes per cell and column, not a String each.
    let mut columns: Vec<DictColumn> = (0..header.len()).map(|_| DictColumn::new(obs.len())).collect();
    let mut matched = vec![false; obs.len()];
    for (lineno, line) in lines.enumerate() {
        let line = line.map_err(|e| DataError::io(csv, e))?;
        if line.is_empty() {
            continue;
        }
        let fields = parse_csv_line(&line);
        if fields.len() != header.len() {
            return Err(DataError::input(csv, format!("line {}: {} fields, header has {}", lineno + 2, fields.len(), header.len())));
        }
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
                    categories: order.into_iter().map(|o| self.values[o].clone()).collect(),
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

/// `--genes`: which genes the store keeps.
#[derive(Debug, Clone, PartialEq)]
pub enum GeneSelection {
    All,
    /// The N genes detected (non-zero) in the most selected cells.
    Detected(usize),
    /// The N most variable genes (Seurat v1 / scanpy `flavor="seurat"` dispersion).
    Hvg(usize),
    /// Genes named in a file, one per line, matched against var names.
    List(PathBuf),
}

impl GeneSelection {
    /// True if choosing needs a statistics pass over the counts first.
    pub fn needs_scan(&self) -> bool {
        matches!(self, GeneSelection::Detected(_) | GeneSelection::Hvg(_))
    }
}

impl FromStr for GeneSelection {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || DataError::Config(format!("--genes `{s}`: expected all, detected:N, hvg:N or list:FILE"));
        let n = |v: &str| v.parse::<usize>().ok().filter(|&n| n > 0).ok_or_else(bad);
        match s.split_once(':') {
            None if s == "all" => Ok(GeneSelection::All),
            Some(("detected", v)) => Ok(GeneSelection::Detected(n(v)?)),
            Some(("hvg", v)) => Ok(GeneSelection::Hvg(n(v)?)),
            Some(("list", f)) if !f.is_empty() => Ok(GeneSelection::List(PathBuf::from(f))),
            _ => Err(bad()),
        }
    }
}

impl fmt::Display for GeneSelection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GeneSelection::All => write!(f, "all"),
            GeneSelection::Detected(n) => write!(f, "detected:{n}"),
            GeneSelection::Hvg(n) => write!(f, "hvg:{n}"),
            GeneSelection::List(p) => write!(f, "list:{}", p.display()),
        }
    }
}

/// Per-gene statistics over the selected cells, for gene selection. Values are normalized
/// to 10,000 counts per cell (CP10k), as scanpy's `highly_variable_genes` expects.
#[derive(Debug, Clone, Default)]
pub struct GeneScan {
    pub n_cells: u64,
    pub detected: Vec<u64>,
    pub sum: Vec<f64>,
    pub sum_sq: Vec<f64>,
}

impl GeneScan {
    pub fn new(n_genes: usize) -> Self {
        GeneScan { n_cells: 0, detected: vec![0; n_genes], sum: vec![0.0; n_genes], sum_sq: vec![0.0; n_genes] }
    }

    /// Adds every cell of a block.
    pub fn add(&mut self, block: &crate::csr::CsrRows) {
        for i in 0..block.n_rows() {
            let (idx, val) = block.row(i);
            let total: f64 = val.iter().map(|&v| v as f64).sum();
            let scale = common::norm::cp10k_scale(total);
            for (&g, &v) in idx.iter().zip(val) {
                let x = v as f64 * scale;
                self.detected[g as usize] += (v != 0.0) as u64;
                self.sum[g as usize] += x;
                self.sum_sq[g as usize] += x * x;
            }
            self.n_cells += 1;
        }
    }
}

/// The kept genes (ascending source indices).
pub fn choose_genes(sel: &GeneSelection, var: &Frame, scan: Option<&GeneScan>, path: &Path) -> Result<Vec<usize>> {
    let n = var.len();
    let top = |scores: Vec<f64>, k: usize| -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        // Highest score first; ties by gene order so selection is deterministic.
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
        let mut kept: Vec<usize> = order.into_iter().take(k.min(n)).collect();
        kept.sort_unstable();
        kept
    };
    match sel {
        GeneSelection::All => Ok((0..n).collect()),
        GeneSelection::Detected(k) => {
            let scan = scan.ok_or_else(|| DataError::Internal("gene scan missing".into()))?;
            Ok(top(scan.detected.iter().map(|&d| d as f64).collect(), *k))
        }
        GeneSelection::Hvg(k) => {
            let scan = scan.ok_or_else(|| DataError::Internal("gene scan missing".into()))?;
            Ok(top(seurat_dispersion(scan), *k))
        }
        GeneSelection::List(file) => {
            let text = std::fs::read_to_string(file).map_err(|_| DataError::NotFound { path: file.clone() })?;
            let pos: HashMap<&str, usize> = var.index.iter().enumerate().map(|(i, g)| (g.as_str(), i)).collect();
            let wanted: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).collect();
            let missing: Vec<&str> = wanted.iter().copied().filter(|g| !pos.contains_key(g)).collect();
            if !missing.is_empty() {
                return Err(DataError::input(
                    file,
                    format!(
                        "{} of {} genes are not var names of {}: {}",
                        missing.len(),
                        wanted.len(),
                        path.display(),
                        missing.iter().take(10).copied().collect::<Vec<_>>().join(", ")
                    ),
                ));
            }
            let mut kept: Vec<usize> = wanted.iter().map(|g| pos[g]).collect();
            kept.sort_unstable();
            kept.dedup();
            Ok(kept)
        }
    }
}

/// Normalized dispersion per gene, scanpy's `flavor="seurat"` (Satija et al. 2015): mean and
/// variance (ddof 1) of CP10k values, dispersion = var/mean, log dispersion z-scored within 20
/// equal-width bins of log1p(mean). As in scanpy, the bins span every gene's mean (undetected
/// genes included, so they widen the lowest bin), are right-closed like `pandas.cut`, and a
/// gene whose dispersion is undefined (never detected, or constant) scores −∞.
pub fn seurat_dispersion(scan: &GeneScan) -> Vec<f64> {
    const BINS: usize = 20;
    let n = scan.n_cells.max(2) as f64;
    let g = scan.sum.len();
    let mut mean_log = vec![0.0; g];
    let mut disp_log = vec![f64::NEG_INFINITY; g];
    for i in 0..g {
        let mean = scan.sum[i] / n;
        let var = ((scan.sum_sq[i] - n * mean * mean) / (n - 1.0)).max(0.0);
        mean_log[i] = mean.ln_1p();
        if mean > 0.0 && var > 0.0 {
            disp_log[i] = (var / mean).ln();
        }
    }
    let bin_of = mean_bins(&mean_log, BINS);
    let mut acc = [(0.0f64, 0.0f64, 0usize); BINS];
    for i in 0..g {
        if disp_log[i].is_finite() {
            let b = &mut acc[bin_of[i]];
            b.0 += disp_log[i];
            b.1 += disp_log[i] * disp_log[i];
            b.2 += 1;
        }
    }
    (0..g)
        .map(|i| {
            if !disp_log[i].is_finite() {
                return f64::NEG_INFINITY;
            }
            let (s, ss, c) = acc[bin_of[i]];
            if c == 1 {
                // Alone in its bin (sd undefined): scanpy sets normalized dispersion 1.
                return 1.0;
            }
            let mu = s / c as f64;
            let sd = ((ss - c as f64 * mu * mu) / (c as f64 - 1.0)).max(0.0).sqrt();
            // Equal dispersions in a bin give 0/0 in scanpy, a gene never selected.
            if sd > 0.0 { (disp_log[i] - mu) / sd } else { f64::NEG_INFINITY }
        })
        .collect()
}

/// The bin of each value among `bins` equal-width intervals over its range, as
/// `pandas.cut(x, bins)` assigns them: right-closed intervals, the lowest edge lowered by 0.1 %
/// of the range so the minimum falls in the first.
fn mean_bins(x: &[f64], bins: usize) -> Vec<usize> {
    let (lo, hi) = x.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &m| (a.min(m), b.max(m)));
    if !(hi > lo) {
        return vec![0; x.len()];
    }
    let step = (hi - lo) / bins as f64;
    let mut edges: Vec<f64> = (0..=bins).map(|k| lo + step * k as f64).collect();
    edges[bins] = hi;
    edges[0] -= (hi - lo) * 0.001;
    x.iter().map(|&m| edges.partition_point(|&e| e < m).saturating_sub(1).min(bins - 1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::csr::CsrRows;

    fn obs() -> Frame {
        Frame {
            index_name: "_index".into(),
            index: vec!["c0".into(), "c1".into(), "c2".into()],
            columns: vec![("t".into(), Column::categorical_from_text(vec!["a".into(), "b".into(), "a".into()]))],
        }
    }

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

    #[test]
    fn metadata_csv_integer_ids_stay_integers() {
        let dir = std::env::temp_dir().join(format!("neurofm-meta-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let csv = dir.join("cell_metadata.csv");
        std::fs::write(&csv, "cell_label,cluster_alias,x\nc2,210,0.5\nc0,2523,1.5\nother,1,2\n").unwrap();
        let mut f = obs();
        assert_eq!(join_cell_metadata(&mut f, &csv, "cell_label").unwrap(), 1, "c1 has no row");
        assert!(matches!(f.column("cluster_alias"), Some(Column::Float(_))), "a missing cell makes it float (NaN)");
        assert_eq!(apply_keep(&f, &["cluster_alias=2523".parse().unwrap()], &csv).unwrap(), vec![0]);
        std::fs::write(&csv, "cell_label,cluster_alias\nc0,2523\nc1,210\nc2,2523\n").unwrap();
        let mut f = obs();
        join_cell_metadata(&mut f, &csv, "cell_label").unwrap();
        assert_eq!(f.column("cluster_alias"), Some(&Column::Int(vec![2523, 210, 2523])));
        std::fs::write(&csv, "cell_label,region\nc0,V1\nc2,ACC\n").unwrap();
        let mut f = obs();
        join_cell_metadata(&mut f, &csv, "cell_label").unwrap();
        let want = Column::Categorical { codes: vec![1, -1, 0], categories: vec!["ACC".into(), "V1".into()], ordered: false };
        assert_eq!(f.column("region"), Some(&want), "sorted categories, missing cell is -1");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn csv_quotes_and_commas() {
        assert_eq!(parse_csv_line(r#"a,"b,c","d""e""#), vec!["a", "b,c", "d\"e"]);
    }

    #[test]
    fn detected_picks_most_detected_genes_in_order() {
        let mut scan = GeneScan::new(3);
        scan.add(&CsrRows::from_dense(2, 3, &[1.0, 0.0, 2.0, 0.0, 0.0, 3.0]));
        let var = Frame { index: vec!["g0".into(), "g1".into(), "g2".into()], ..Default::default() };
        assert_eq!(choose_genes(&GeneSelection::Detected(2), &var, Some(&scan), Path::new("x")).unwrap(), vec![0, 2]);
    }

    #[test]
    fn hvg_prefers_the_overdispersed_gene_at_equal_mean() {
        // Two genes with the same mean CP10k; gene 1 is bursty (high variance).
        let mut scan = GeneScan::new(3);
        let mut dense = Vec::new();
        for c in 0..100 {
            let bursty = if c % 10 == 0 { 100.0 } else { 0.0 };
            dense.extend_from_slice(&[10.0, bursty, 1000.0 - 10.0 - bursty]);
        }
        scan.add(&CsrRows::from_dense(100, 3, &dense));
        let scores = seurat_dispersion(&scan);
        assert!(scores[1] > scores[0], "{scores:?}");
    }

    #[test]
    fn mean_bins_are_right_closed_over_the_whole_range() {
        // Edges 0, 1, 2, 3, 4 (the first lowered): 1.0 closes bin 0, 1.5 opens bin 1.
        assert_eq!(mean_bins(&[0.0, 1.0, 1.5, 4.0], 4), vec![0, 0, 1, 3]);
        assert_eq!(mean_bins(&[2.0, 2.0], 20), vec![0, 0], "a single value: one bin");
    }

    #[test]
    fn undetected_genes_widen_the_lowest_mean_bin() {
        // Gene 2 is never detected; its mean (0) still sets the bins' lower edge, so genes 0 and
        // 1 (log1p CP10k means ~8.4 and ~8.6) share the top bin and are z-scored against each
        // other (±1/√2); over detected genes only, each would be alone in its bin (1.0).
        let mut scan = GeneScan::new(3);
        let mut dense = Vec::new();
        for c in 0..50 {
            dense.extend_from_slice(&[45.0 + (c % 2) as f32 * 4.0, 55.0 + (c % 5) as f32 * 5.0, 0.0]);
        }
        scan.add(&CsrRows::from_dense(50, 3, &dense));
        let s = seurat_dispersion(&scan);
        assert_eq!(s[2], f64::NEG_INFINITY);
        let z = std::f64::consts::FRAC_1_SQRT_2;
        assert!((s[0].abs() - z).abs() < 1e-9 && (s[0] + s[1]).abs() < 1e-9, "two genes z-scored in one bin: {s:?}");
    }

    #[test]
    fn gene_selection_parses() {
        assert_eq!("hvg:2000".parse::<GeneSelection>().unwrap(), GeneSelection::Hvg(2000));
        assert!("hvg:0".parse::<GeneSelection>().is_err());
        assert!("bogus".parse::<GeneSelection>().is_err());
    }
}
