//! `neurofm-data inspect`: what is in a single-cell file, and where its raw counts are.

use std::fmt;
use std::path::Path;

use serde::Serialize;

use crate::error::Result;
use crate::frame::Frame;
use crate::source::{self, MatrixInfo, SourceFile};

/// Cells sampled (evenly spread through the file) for per-cell medians of row-readable layouts.
const SAMPLE_CELLS: usize = 20_000;
const SAMPLE_VALUES: usize = 1 << 20;

/// One count-matrix candidate with what its values look like.
#[derive(Debug, Serialize)]
pub struct MatrixSummary {
    #[serde(flatten)]
    pub info: MatrixInfo,
    /// Fraction of stored entries that are zero-free (sparse) or non-zero (dense), of all cells × genes.
    pub density: f64,
    /// Share of the first stored values that are not integers (0 for raw counts).
    pub non_integer_fraction: f64,
}

/// Summary of a column of obs or var.
#[derive(Debug, Serialize)]
pub struct ColumnSummary {
    pub name: String,
    pub kind: String,
    pub distinct: usize,
    pub top: Vec<(String, usize)>,
}

/// Everything `inspect` reports.
#[derive(Debug, Serialize)]
pub struct Inspection {
    pub path: String,
    pub format: String,
    pub file_bytes: u64,
    pub n_cells: usize,
    pub n_genes: usize,
    pub matrices: Vec<MatrixSummary>,
    /// What `convert --counts auto` would use, if any matrix holds integer counts.
    pub raw_counts: Option<String>,
    pub sampled_cells: usize,
    pub median_cell_total: f64,
    pub median_cell_nonzero: f64,
    pub obs_index: String,
    pub obs: Vec<ColumnSummary>,
    pub var_index: String,
    pub var: Vec<ColumnSummary>,
    pub uns_keys: Vec<String>,
}

/// Inspects a `.h5ad` or `.loom` file.
pub fn inspect(path: &Path) -> Result<Inspection> {
    let src = SourceFile::open(path)?;
    let mut matrices = Vec::new();
    for info in src.matrices()? {
        let sample = src.sample_values(&info.location, SAMPLE_VALUES)?;
        let non_int = if sample.is_empty() { 0.0 } else { sample.iter().filter(|v| v.is_finite() && v.fract() != 0.0).count() as f64 / sample.len() as f64 };
        let cells_genes = (info.n_cells as f64 * info.n_genes as f64).max(1.0);
        let density = match info.layout {
            source::Layout::Csr | source::Layout::Csc => info.stored as f64 / cells_genes,
            _ => f64::NAN, // dense: measured below from the sampled cells
        };
        matrices.push(MatrixSummary { info, density, non_integer_fraction: non_int });
    }
    let raw = matrices.iter().find(|m| m.non_integer_fraction == 0.0).map(|m| m.info.location.clone());
    let main = raw.clone().unwrap_or(matrices[0].info.location.clone());
    let (n_cells, n_genes) = (matrices[0].info.n_cells, matrices[0].info.n_genes);

    // Per-cell medians: CSC by one pass over its entries, other layouts from evenly spread cells.
    let main_info = src.matrix_info(&main)?;
    let (mut totals, mut nonzero) = if main_info.layout == source::Layout::Csc {
        src.csc_cell_totals(&main)?
    } else {
        let (mut totals, mut nonzero) = (Vec::new(), Vec::new());
        let mut rows = src.open_rows(&main, None)?;
        // Runs of consecutive cells (each chunk decoded once): all cells of a small file, else
        // 40 runs spread evenly through it.
        let run = SAMPLE_CELLS / 40;
        let starts: Vec<usize> = if n_cells <= SAMPLE_CELLS {
            (0..n_cells).step_by(run).collect()
        } else {
            (0..40).map(|k| k * (n_cells - run) / 39).collect()
        };
        for start in starts {
            let block = rows.read_rows(start..(start + run).min(n_cells))?;
            totals.extend(block.row_totals());
            nonzero.extend((0..block.n_rows()).map(|i| block.row(i).0.len() as f64));
        }
        (totals, nonzero)
    };
    if let Some(m) = matrices.iter_mut().find(|m| m.info.location == main && m.density.is_nan()) {
        m.density = nonzero.iter().sum::<f64>() / (nonzero.len().max(1) as f64 * n_genes.max(1) as f64);
    }
    let obs = src.obs()?;
    let var = src.var(&main)?;
    Ok(Inspection {
        path: path.display().to_string(),
        format: format!("{:?}", src.format).to_lowercase(),
        file_bytes: std::fs::metadata(path).map(|m| m.len()).unwrap_or(0),
        n_cells,
        n_genes,
        raw_counts: raw.map(|l| l.to_string()),
        sampled_cells: totals.len(),
        median_cell_total: median(&mut totals),
        median_cell_nonzero: median(&mut nonzero),
        obs_index: obs.index_name.clone(),
        obs: summarize(&obs),
        var_index: var.index_name.clone(),
        var: summarize(&var),
        uns_keys: src.uns_keys(),
        matrices,
    })
}

fn summarize(frame: &Frame) -> Vec<ColumnSummary> {
    frame
        .columns
        .iter()
        .map(|(name, col)| ColumnSummary { name: name.clone(), kind: col.type_name().into(), distinct: col.n_distinct(), top: col.top_values(5) })
        .collect()
}

/// Median (NaN when empty).
pub fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { (v[n / 2 - 1] + v[n / 2]) / 2.0 }
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "{} ({}, {:.1} MB)", self.path, self.format, self.file_bytes as f64 / 1e6)?;
        writeln!(f, "  {} cells × {} genes", self.n_cells, self.n_genes)?;
        writeln!(f, "  matrices:")?;
        for m in &self.matrices {
            writeln!(
                f,
                "    {:<16} {:<16} {:<8} {:>12} stored  density {:>6.1}%  {:<5}  {}",
                m.info.location.to_string(),
                format!("{:?}", m.info.layout).to_lowercase(),
                m.info.dtype,
                m.info.stored,
                100.0 * m.density,
                m.info.compression,
                if m.non_integer_fraction == 0.0 { "integer counts".to_string() } else { format!("{:.1}% non-integer", 100.0 * m.non_integer_fraction) }
            )?;
        }
        match &self.raw_counts {
            Some(l) => writeln!(f, "  raw counts: {l}")?,
            None => writeln!(f, "  raw counts: none found (convert needs --allow-non-integer)")?,
        }
        writeln!(
            f,
            "  per cell ({} sampled): median total {:.0}, median non-zero genes {:.0}",
            self.sampled_cells, self.median_cell_total, self.median_cell_nonzero
        )?;
        for (title, index, cols) in [("obs", &self.obs_index, &self.obs), ("var", &self.var_index, &self.var)] {
            writeln!(f, "  {title} (index `{index}`):")?;
            for c in cols.iter() {
                let top: Vec<String> = c.top.iter().map(|(v, n)| format!("{v} ({n})")).collect();
                writeln!(f, "    {:<28} {:<11} {:>7} distinct  {}", c.name, c.kind, c.distinct, top.join(", "))?;
            }
        }
        writeln!(f, "  uns: {}", if self.uns_keys.is_empty() { "(empty)".to_string() } else { self.uns_keys.join(", ") })
    }
}
