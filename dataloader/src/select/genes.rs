//! `--genes`: which genes conversion keeps (all, most detected, most variable as scanpy's
//! `flavor="seurat"`, or a list), from one statistics pass over the selected cells.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use crate::error::{DataError, Result};
use crate::frame::Frame;

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
