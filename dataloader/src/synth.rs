//! Synthetic single-cell data with a known right answer.
//!
//! Counts are negative binomial (Poisson–Gamma, dispersion `r`) around per-gene means, with
//! per-type marker programs (each type up-regulates its own block of genes), log-normal
//! library sizes and per-library gene effects. Cells come sorted by type, as atlases often are,
//! so a converter that does not shuffle leaves type-pure shards. Each cell's counts depend
//! only on (seed, cell), so every storage variant of the same options holds identical counts.
//! With `--conditions N`, each cell also belongs to one of N conditions (obs `condition`), and
//! each condition multiplies every gene's mean by its own log-normal effect: a shift between
//! conditions (say, two labs or two treatments) that a classifier trained on one condition
//! must carry over to the other.

use std::path::PathBuf;

use hdf5::{Dataset, Group};
use rand_distr::{Distribution, Gamma, LogNormal, Poisson};
use rayon::prelude::*;
use serde::Serialize;

use crate::csr::CsrRows;
use crate::error::{DataError, Result};
use crate::frame::{Column, Frame};
use crate::h5write::{dict_group, encoding, frame, strings};
use crate::rng::rng_for;
use crate::source::h5::h5err;

/// How the count matrix is stored (to exercise every reader path).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum SynthLayout {
    Csr,
    Csc,
    Dense,
    Loom,
}

/// Where the counts go (`X` then holds log-normalized values for the other two).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum SynthLocation {
    X,
    Layer,
    Raw,
}

/// Element type of the stored counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum SynthDtype {
    F32,
    F64,
    I32,
    I64,
}

/// HDF5 compression filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
pub enum SynthCompression {
    Gzip,
    /// HDF5's byte-shuffle filter before gzip (h5py `shuffle=True`).
    GzipShuffle,
    Lzf,
    None,
}

/// `neurofm-data synth` options.
#[derive(Debug, Clone, clap::Args)]
pub struct SynthOptions {
    pub output: PathBuf,
    #[arg(long, default_value_t = 2000)]
    pub cells: usize,
    #[arg(long, default_value_t = 2000)]
    pub genes: usize,
    /// Number of cell types (marker programs).
    #[arg(long, default_value_t = 4)]
    pub types: usize,
    /// Number of libraries (batches) with their own gene effects.
    #[arg(long, default_value_t = 8)]
    pub libraries: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Fold change of a type's marker genes.
    #[arg(long, default_value_t = 6.0)]
    pub marker_fold: f64,
    /// Mean counts per cell (library size).
    #[arg(long, default_value_t = 4000.0)]
    pub depth: f64,
    /// The last N of the --genes are never detected (as in a whole-transcriptome file); the
    /// others are exactly those of a file made with --genes minus N.
    #[arg(long, default_value_t = 0)]
    pub undetected_genes: usize,
    /// Conditions with their own gene effects (obs `condition`: cond_0, cond_1, ...); 0: none,
    /// and then the output is what it was before the option existed.
    #[arg(long, default_value_t = 0)]
    pub conditions: usize,
    /// Standard deviation of the log of each condition's per-gene effect.
    #[arg(long, default_value_t = 0.5)]
    pub condition_shift: f64,
    #[arg(long, value_enum, default_value = "csr")]
    pub layout: SynthLayout,
    #[arg(long, value_enum, default_value = "x")]
    pub counts_in: SynthLocation,
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: SynthDtype,
    #[arg(long, value_enum, default_value = "gzip")]
    pub compression: SynthCompression,
    /// Replace an existing file.
    #[arg(long)]
    pub force: bool,
}

impl SynthOptions {
    /// Genes that can have counts (the rest are never detected).
    fn detected_genes(&self) -> usize {
        self.genes.saturating_sub(self.undetected_genes)
    }

    /// Defaults with the given output, cells, genes, types and seed (for tests and demos).
    pub fn new(output: PathBuf, cells: usize, genes: usize, types: usize, seed: u64) -> Self {
        SynthOptions {
            output,
            cells,
            genes,
            types,
            libraries: 8,
            seed,
            marker_fold: 6.0,
            depth: 4000.0,
            undetected_genes: 0,
            conditions: 0,
            condition_shift: 0.5,
            layout: SynthLayout::Csr,
            counts_in: SynthLocation::X,
            dtype: SynthDtype::F32,
            compression: SynthCompression::Gzip,
            force: false,
        }
    }
}

/// What was written.
#[derive(Debug, Clone, Serialize)]
pub struct SynthSummary {
    pub n_cells: usize,
    pub n_genes: usize,
    pub n_types: usize,
    pub nnz: u64,
}

/// The generative model's parameters, fixed by the seed.
struct Model {
    base: Vec<f64>,
    library_effect: Vec<Vec<f64>>,
    /// Per condition, a factor on every gene's mean (empty without conditions).
    condition_effect: Vec<Vec<f64>>,
    markers_per_type: usize,
}

impl Model {
    fn new(o: &SynthOptions) -> Self {
        // The generator's stream keys (1 model, 2 cells, 3 conditions, 4 a cell's condition)
        // predate `rng::Purpose`; moving them there redraws every generated dataset, which the
        // small models of the fine-tuning tests do not survive (tried: benches/README.md).
        let mut rng = rng_for(&[o.seed, 1]);
        let ln = LogNormal::new(0.0, 1.2).unwrap_or_else(|_| unreachable!("constant parameters"));
        let genes = o.detected_genes();
        let raw: Vec<f64> = (0..genes).map(|_| ln.sample(&mut rng)).collect();
        let sum: f64 = raw.iter().sum();
        let base = raw.iter().map(|m| m / sum).collect();
        let batch = LogNormal::new(0.0, 0.25).unwrap_or_else(|_| unreachable!("constant parameters"));
        let library_effect = (0..o.libraries.max(1)).map(|_| (0..genes).map(|_| batch.sample(&mut rng)).collect()).collect();
        // A stream of its own, so the other parameters do not move when conditions are added.
        let mut rng = rng_for(&[o.seed, 3]);
        let shift = LogNormal::new(0.0, o.condition_shift.max(0.0)).unwrap_or_else(|_| unreachable!("a finite, non-negative sigma"));
        let condition_effect = (0..o.conditions).map(|_| (0..genes).map(|_| shift.sample(&mut rng)).collect()).collect();
        Model { base, library_effect, condition_effect, markers_per_type: (genes / (4 * o.types.max(1))).max(1) }
    }

    /// Cell `i`'s condition, independent of its type and library.
    fn condition(&self, o: &SynthOptions, i: usize) -> Option<usize> {
        (o.conditions > 0).then(|| (crate::rng::hash_keys(&[o.seed, 4, i as u64]) % o.conditions as u64) as usize)
    }

    /// Cell `i`'s type (cells sorted by type) and library.
    fn labels(&self, o: &SynthOptions, i: usize) -> (usize, usize) {
        (i * o.types.max(1) / o.cells.max(1), (crate::rng::mix64(o.seed ^ i as u64) % o.libraries.max(1) as u64) as usize)
    }

    /// Counts of cell `i`, sparse and sorted by gene.
    fn cell(&self, o: &SynthOptions, i: usize) -> (Vec<u32>, Vec<f32>) {
        let (t, lib) = self.labels(o, i);
        let condition = self.condition(o, i).map(|c| &self.condition_effect[c]);
        let mut rng = rng_for(&[o.seed, 2, i as u64]);
        let size = o.depth * LogNormal::new(0.0, 0.5).map(|d| d.sample(&mut rng)).unwrap_or(1.0);
        let r = 2.0;
        let marker = t * self.markers_per_type..(t + 1) * self.markers_per_type;
        let mut idx = Vec::new();
        let mut val = Vec::new();
        for g in 0..o.detected_genes() {
            let fold = if marker.contains(&g) { o.marker_fold } else { 1.0 };
            let mut mu = size * self.base[g] * fold * self.library_effect[lib][g];
            if let Some(effect) = condition {
                mu *= effect[g];
            }
            let lambda = Gamma::new(r, mu / r).map(|d| d.sample(&mut rng)).unwrap_or(0.0);
            let x = if lambda > 0.0 { Poisson::new(lambda).map(|d| d.sample(&mut rng)).unwrap_or(0.0) } else { 0.0 };
            if x > 0.0 {
                idx.push(g as u32);
                val.push(x as f32);
            }
        }
        (idx, val)
    }

    fn rows(&self, o: &SynthOptions, range: std::ops::Range<usize>) -> CsrRows {
        let cells: Vec<(Vec<u32>, Vec<f32>)> = range.into_par_iter().map(|i| self.cell(o, i)).collect();
        let mut out = CsrRows::new();
        for (idx, val) in cells {
            out.push_row(&idx, &val);
        }
        out
    }
}

/// Writes the synthetic file described by `o`.
pub fn write(o: &SynthOptions) -> Result<SynthSummary> {
    if o.undetected_genes >= o.genes {
        return Err(DataError::Config(format!("synth --undetected-genes {} must be fewer than --genes {}", o.undetected_genes, o.genes)));
    }
    if o.cells == 0 || o.genes == 0 || o.types == 0 {
        return Err(DataError::Config("synth needs --cells, --genes and --types ≥ 1".into()));
    }
    if !(o.condition_shift >= 0.0 && o.condition_shift.is_finite()) {
        return Err(DataError::Config(format!("--condition-shift {}: must be a finite number ≥ 0", o.condition_shift)));
    }
    if o.output.exists() && !o.force {
        return Err(DataError::OutputExists { path: o.output.clone() });
    }
    common::atomic::write_via_temp(&o.output, |tmp| write_to(o, tmp), DataError::io)
}

fn write_to(o: &SynthOptions, path: &std::path::Path) -> Result<SynthSummary> {
    let file = hdf5::File::create(path).map_err(h5err(path, "/"))?;
    let summary = write_contents(&file, o, path)?;
    // Closing explicitly releases every handle (and HDF5's file lock) before the rename.
    file.close().map_err(h5err(path, "/"))?;
    Ok(summary)
}

fn write_contents(file: &hdf5::File, o: &SynthOptions, path: &std::path::Path) -> Result<SynthSummary> {
    let err = |f: &str| h5err(path, f);
    let model = Model::new(o);
    let types: Vec<String> = (0..o.cells).map(|i| format!("type_{}", model.labels(o, i).0)).collect();
    let libs: Vec<String> = (0..o.cells).map(|i| format!("lib_{}", model.labels(o, i).1)).collect();
    let conditions: Option<Vec<String>> = (o.conditions > 0).then(|| (0..o.cells).map(|i| format!("cond_{}", model.condition(o, i).unwrap_or(0))).collect());
    let cell_names: Vec<String> = (0..o.cells).map(|i| format!("cell_{i}")).collect();
    let gene_names: Vec<String> = (0..o.genes).map(|g| format!("gene_{g}")).collect();

    if o.layout == SynthLayout::Loom {
        let m = model.rows(o, 0..o.cells);
        let mut dense = vec![0f64; o.genes * o.cells];
        for c in 0..o.cells {
            let (idx, val) = m.row(c);
            for (&g, &v) in idx.iter().zip(val) {
                dense[g as usize * o.cells + c] = v as f64;
            }
        }
        let arr = ndarray::Array2::from_shape_vec((o.genes, o.cells), dense).map_err(|e| DataError::Internal(e.to_string()))?;
        write_numeric_2d(file, "matrix", &arr, o, path)?;
        let ca = file.create_group("col_attrs").map_err(err("col_attrs"))?;
        strings(&ca, "CellID", &cell_names, path)?;
        strings(&ca, "cell_type", &types, path)?;
        strings(&ca, "library", &libs, path)?;
        if let Some(c) = &conditions {
            strings(&ca, "condition", c, path)?;
        }
        let ra = file.create_group("row_attrs").map_err(err("row_attrs"))?;
        strings(&ra, "Gene", &gene_names, path)?;
        for g in ["layers", "row_graphs", "col_graphs"] {
            file.create_group(g).map_err(err(g))?;
        }
        return Ok(SynthSummary { n_cells: o.cells, n_genes: o.genes, n_types: o.types, nnz: m.nnz() as u64 });
    }

    encoding(file, "anndata", "0.1.0", path)?;
    let counts_group = match o.counts_in {
        SynthLocation::X => "X".to_string(),
        SynthLocation::Layer => "layers/counts".to_string(),
        SynthLocation::Raw => "raw/X".to_string(),
    };
    let parent_of = |p: &str| -> Result<Group> {
        match p.rsplit_once('/') {
            Some((parent, _)) => file.group(parent).or_else(|_| file.create_group(parent)).map_err(err(parent)),
            None => file.group("/").map_err(err("/")),
        }
    };
    for d in ["layers", "obsm", "obsp", "varm", "varp", "uns"] {
        dict_group(file, d, path)?;
    }
    if o.counts_in == SynthLocation::Raw {
        let raw = file.create_group("raw").map_err(err("raw"))?;
        frame(&raw, "var", &categorical_frame(&gene_names, vec![]), path)?;
    }
    let nnz = match o.layout {
        SynthLayout::Csr => write_csr_streaming(&parent_of(&counts_group)?, leaf(&counts_group), &model, o, path)?,
        SynthLayout::Csc | SynthLayout::Dense => {
            let m = model.rows(o, 0..o.cells);
            let g = parent_of(&counts_group)?;
            if o.layout == SynthLayout::Csc {
                write_csc(&g, leaf(&counts_group), &m, o, path)?;
            } else {
                let mut dense = vec![0f64; o.cells * o.genes];
                for c in 0..o.cells {
                    let (idx, val) = m.row(c);
                    for (&gi, &v) in idx.iter().zip(val) {
                        dense[c * o.genes + gi as usize] = v as f64;
                    }
                }
                let arr = ndarray::Array2::from_shape_vec((o.cells, o.genes), dense).map_err(|e| DataError::Internal(e.to_string()))?;
                let ds = write_numeric_2d(&g, leaf(&counts_group), &arr, o, path)?;
                encoding(&ds, "array", "0.2.0", path)?;
            }
            m.nnz() as u64
        }
        SynthLayout::Loom => unreachable!("handled above"),
    };
    if o.counts_in != SynthLocation::X {
        // X holds log1p(CP10k), as in a typical processed AnnData file.
        let mut logx = model.rows(o, 0..o.cells);
        for i in 0..logx.n_rows() {
            let (a, b) = (logx.indptr[i] as usize, logx.indptr[i + 1] as usize);
            let total: f32 = logx.values[a..b].iter().sum();
            for v in &mut logx.values[a..b] {
                *v = common::norm::log1p_cp10k(*v as f64, total.max(1.0) as f64) as f32;
            }
        }
        let mut float_opts = o.clone();
        float_opts.dtype = SynthDtype::F32;
        write_csr_block(file, "X", &logx, &float_opts, path)?;
    }
    let mut obs = vec![("cell_type", types), ("library", libs)];
    obs.extend(conditions.map(|c| ("condition", c)));
    frame(file, "obs", &categorical_frame(&cell_names, obs), path)?;
    let symbols: Vec<String> = (0..o.genes).map(|g| format!("G{g}")).collect();
    frame(file, "var", &categorical_frame(&gene_names, vec![("gene_symbol", symbols)]), path)?;
    Ok(SynthSummary { n_cells: o.cells, n_genes: o.genes, n_types: o.types, nnz })
}

/// A dataframe whose columns are all categorical, as pandas stores few distinct strings.
fn categorical_frame(index: &[String], cols: Vec<(&str, Vec<String>)>) -> Frame {
    Frame {
        index_name: "_index".into(),
        index: index.to_vec(),
        columns: cols.into_iter().map(|(n, v)| (n.to_string(), Column::categorical_from_text(v))).collect(),
    }
}

fn leaf(p: &str) -> &str {
    p.rsplit_once('/').map(|(_, l)| l).unwrap_or(p)
}

fn builder(g: &Group, o: &SynthOptions) -> hdf5::DatasetBuilder {
    let b = g.new_dataset_builder();
    match o.compression {
        SynthCompression::Gzip => b.deflate(4),
        SynthCompression::GzipShuffle => b.shuffle().deflate(4),
        SynthCompression::Lzf => b.lzf(),
        SynthCompression::None => b,
    }
}

macro_rules! with_dtype {
    ($o:expr, $values:expr, |$v:ident| $body:expr) => {
        match $o.dtype {
            SynthDtype::F32 => { let $v: Vec<f32> = $values.iter().map(|&x| x as f32).collect(); $body }
            SynthDtype::F64 => { let $v: Vec<f64> = $values.iter().map(|&x| x as f64).collect(); $body }
            SynthDtype::I32 => { let $v: Vec<i32> = $values.iter().map(|&x| x as i32).collect(); $body }
            SynthDtype::I64 => { let $v: Vec<i64> = $values.iter().map(|&x| x as i64).collect(); $body }
        }
    };
}

fn write_numeric_2d(g: &Group, name: &str, arr: &ndarray::Array2<f64>, o: &SynthOptions, path: &std::path::Path) -> Result<Dataset> {
    let (r, c) = arr.dim();
    let chunk = [r.clamp(1, 64), c.clamp(1, 64)];
    let flat: Vec<f64> = arr.iter().copied().collect();
    with_dtype!(o, flat, |v| {
        let a = ndarray::Array2::from_shape_vec((r, c), v).map_err(|e| DataError::Internal(e.to_string()))?;
        builder(g, o).chunk(chunk).with_data(&a).create(name).map_err(h5err(path, name))
    })
}

fn sparse_group(parent: &Group, name: &str, enc: &str, shape: [usize; 2], path: &std::path::Path) -> Result<Group> {
    let g = parent.create_group(name).map_err(h5err(path, name))?;
    encoding(&g, enc, "0.1.0", path)?;
    let s = [shape[0] as i64, shape[1] as i64];
    g.new_attr_builder().with_data(&s).create("shape").map_err(h5err(path, "shape"))?;
    Ok(g)
}

/// Writes a whole CSR matrix from memory.
fn write_csr_block(parent: &Group, name: &str, m: &CsrRows, o: &SynthOptions, path: &std::path::Path) -> Result<()> {
    write_compressed(parent, name, "csr_matrix", m, o, path)
}

/// Writes `major` (rows for CSR, columns for CSC) as an AnnData sparse group.
fn write_compressed(parent: &Group, name: &str, enc: &str, major: &CsrRows, o: &SynthOptions, path: &std::path::Path) -> Result<()> {
    let g = sparse_group(parent, name, enc, [o.cells, o.genes], path)?;
    let chunk = major.nnz().clamp(1, 1 << 16);
    with_dtype!(o, major.values, |v| builder(&g, o).chunk(chunk).with_data(&v).create("data").map_err(h5err(path, "data"))?);
    let idx: Vec<i32> = major.indices.iter().map(|&x| x as i32).collect();
    builder(&g, o).chunk(chunk).with_data(&idx).create("indices").map_err(h5err(path, "indices"))?;
    let ptr: Vec<i64> = major.indptr.iter().map(|&x| x as i64).collect();
    g.new_dataset_builder().with_data(&ptr).create("indptr").map_err(h5err(path, "indptr"))?;
    Ok(())
}

/// Writes CSR in blocks of cells, growing the datasets, so memory stays flat for any size.
fn write_csr_streaming(parent: &Group, name: &str, model: &Model, o: &SynthOptions, path: &std::path::Path) -> Result<u64> {
    let g = sparse_group(parent, name, "csr_matrix", [o.cells, o.genes], path)?;
    let chunk = 1 << 16;
    let data = builder(&g, o).chunk(chunk).empty_as(dtype_of(o)).shape(0..).create("data").map_err(h5err(path, "data"))?;
    let indices = builder(&g, o).chunk(chunk).empty::<i32>().shape(0..).create("indices").map_err(h5err(path, "indices"))?;
    let mut indptr: Vec<i64> = vec![0];
    let block = 4096;
    for start in (0..o.cells).step_by(block) {
        let m = model.rows(o, start..(start + block).min(o.cells));
        let base = *indptr.last().unwrap_or(&0);
        let end = base as usize + m.nnz();
        data.resize(end).map_err(h5err(path, "data"))?;
        indices.resize(end).map_err(h5err(path, "indices"))?;
        with_dtype!(o, m.values, |v| data.write_slice(&v, base as usize..end).map_err(h5err(path, "data"))?);
        let idx: Vec<i32> = m.indices.iter().map(|&x| x as i32).collect();
        indices.write_slice(&idx, base as usize..end).map_err(h5err(path, "indices"))?;
        indptr.extend(m.indptr[1..].iter().map(|&p| base + p as i64));
    }
    g.new_dataset_builder().with_data(&indptr).create("indptr").map_err(h5err(path, "indptr"))?;
    Ok(*indptr.last().unwrap_or(&0) as u64)
}

fn dtype_of(o: &SynthOptions) -> hdf5::Datatype {
    let r = match o.dtype {
        SynthDtype::F32 => hdf5::Datatype::from_type::<f32>(),
        SynthDtype::F64 => hdf5::Datatype::from_type::<f64>(),
        SynthDtype::I32 => hdf5::Datatype::from_type::<i32>(),
        SynthDtype::I64 => hdf5::Datatype::from_type::<i64>(),
    };
    r.unwrap_or_else(|_| unreachable!("native types always map"))
}

fn write_csc(parent: &Group, name: &str, m: &CsrRows, o: &SynthOptions, path: &std::path::Path) -> Result<()> {
    let mut cols: Vec<Vec<(u32, f32)>> = vec![Vec::new(); o.genes];
    for r in 0..m.n_rows() {
        let (idx, val) = m.row(r);
        for (&g, &v) in idx.iter().zip(val) {
            cols[g as usize].push((r as u32, v));
        }
    }
    let mut t = CsrRows::new();
    for c in &cols {
        let (i, v): (Vec<u32>, Vec<f32>) = c.iter().copied().unzip();
        t.push_row(&i, &v);
    }
    write_compressed(parent, name, "csc_matrix", &t, o, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Without `--conditions` the model is what it was; a zero shift changes no count (only
    /// the labels are added); a real shift moves each gene's mean by its condition's effect.
    #[test]
    fn conditions_shift_gene_means_and_change_nothing_when_off() {
        let off = SynthOptions::new("unused.h5ad".into(), 400, 40, 2, 3);
        let zero = SynthOptions { conditions: 2, condition_shift: 0.0, ..off.clone() };
        let (m_off, m_zero) = (Model::new(&off), Model::new(&zero));
        assert!(m_off.condition(&off, 0).is_none() && m_off.condition_effect.is_empty());
        assert_eq!((&m_off.base, &m_off.library_effect), (&m_zero.base, &m_zero.library_effect), "the other parameters do not move");
        for i in 0..off.cells {
            assert_eq!(m_off.cell(&off, i), m_zero.cell(&zero, i), "cell {i}");
        }
        let on = SynthOptions { conditions: 2, condition_shift: 1.0, ..off.clone() };
        let m = Model::new(&on);
        let cond: Vec<usize> = (0..on.cells).map(|i| m.condition(&on, i).unwrap()).collect();
        let n1 = cond.iter().filter(|&&c| c == 1).count();
        assert!((120..280).contains(&n1), "conditions are drawn evenly: {n1} of 400");
        // Per gene, log(mean in condition 1 / mean in condition 0) follows log(effect1 / effect0).
        let mut sums = vec![[0f64; 2]; on.genes];
        for (i, &c) in cond.iter().enumerate() {
            let (idx, val) = m.cell(&on, i);
            for (&g, &v) in idx.iter().zip(&val) {
                sums[g as usize][c] += v as f64;
            }
        }
        let n = [(on.cells - n1) as f64, n1 as f64];
        let (observed, planted): (Vec<f64>, Vec<f64>) = (0..on.genes)
            .filter(|&g| sums[g][0] > 0.0 && sums[g][1] > 0.0)
            .map(|g| (((sums[g][1] / n[1]) / (sums[g][0] / n[0])).ln(), (m.condition_effect[1][g] / m.condition_effect[0][g]).ln()))
            .unzip();
        let corr = correlation(&observed, &planted);
        assert!(corr > 0.8, "observed shifts follow the planted ones: r = {corr}");
    }

    fn correlation(a: &[f64], b: &[f64]) -> f64 {
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
        let (ma, mb) = (mean(a), mean(b));
        let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
        let var = |v: &[f64], m: f64| v.iter().map(|x| (x - m).powi(2)).sum::<f64>();
        cov / (var(a, ma) * var(b, mb)).sqrt()
    }
}
