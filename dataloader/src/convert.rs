//! `.h5ad`/`.loom` → neurofm store, streaming in blocks of cells with bounded memory.
//!
//! Pipeline: a reader thread pulls blocks of selected cells from the source (HDF5 decoding is
//! single-threaded) while this thread validates, shuffles and hands full shards to zarrs, which
//! compresses their chunks on all cores. The stored order is planned first; obs is then read
//! and written in it a window of blocks at a time, and per-cell tables are streamed into the
//! store as cells are written. Memory is the read and shard buffers, not the file's size nor
//! its number of cells: the selected rows are held as runs, the source's row offsets are read
//! a block at a time, and the sweep for repeated cell names holds 8 bytes a cell before the
//! matrix pass. (Loom and anndata < 0.7 obs, and `--cell-metadata` joins, hold obs whole.)
//! The store is built in a temp directory beside the output and renamed into place only when
//! complete; `uns/neurofm/provenance` is written last.

use std::path::{Path, PathBuf};
use std::sync::mpsc::sync_channel;
use std::time::Instant;

use rand::seq::SliceRandom;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cells::CellSet;
use crate::csr::CsrRows;
use crate::frame::{Column, Frame, UniqueNames};
use crate::error::{DataError, Result};
use crate::rng::{rng_for, Purpose};
use crate::select::{self, GeneScan, GeneSelection, KeepFilter};
use crate::source::{self, CountsLocation, MatrixInfo, ObsReader, SourceFile};
use crate::store::write::{ColumnWriter, MatrixCodec, StoreWriter};
use crate::store::{Provenance, STORE_FORMAT_VERSION};

/// Largest integer a `float32` holds exactly; counts above it would be silently rounded.
const F32_EXACT_MAX: f32 = 16_777_216.0;
/// Values examined per candidate matrix by `--counts auto`.
const AUTO_SAMPLE: usize = 1 << 20;
/// Cell names read at a time by the sweep for repeated names.
const NAME_SLICE: usize = 1 << 20;
/// Shuffle windows whose obs rows are read together (64 × 4 blocks of 1024 cells: ~13 MB of
/// names and labels).
const OBS_READ_WINDOWS: usize = 64;

/// Where to take counts from.
#[derive(Debug, Clone, PartialEq)]
pub enum CountsChoice {
    /// The first integer-valued matrix among `X`, `layers/counts`, other layers, `raw/X`.
    Auto,
    At(CountsLocation),
}

impl std::str::FromStr for CountsChoice {
    type Err = DataError;
    fn from_str(s: &str) -> Result<Self> {
        if s == "auto" {
            Ok(CountsChoice::Auto)
        } else {
            CountsLocation::parse(s).map(CountsChoice::At)
        }
    }
}

/// Settings of one conversion (the `convert` command's flags).
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    pub counts: CountsChoice,
    pub keep: Vec<KeepFilter>,
    /// Per-cell CSV joined on obs names, and its key column.
    pub cell_metadata: Option<(PathBuf, String)>,
    pub genes: GeneSelection,
    /// `None` keeps the source's cell order.
    pub shuffle_seed: Option<u64>,
    pub allow_non_integer: bool,
    pub force: bool,
    pub zstd_level: i32,
    pub matrix_codec: MatrixCodec,
    /// Cells per source read and unit of shuffling: blocks are permuted globally, cells are
    /// shuffled within a window of `window_blocks` blocks. Counted in cells, never in stored
    /// entries, so the order depends only on the counts, not on how the source stores them.
    pub block_cells: usize,
    pub window_blocks: usize,
    /// Stored values per decoded chunk of the matrix (a power of two ≥ 1024): smaller chunks
    /// make sampled reads cheaper, larger ones compress better.
    pub chunk_entries: u64,
    /// A `var` column whose values become the store's gene names (made unique the AnnData
    /// way; the former names are kept in the column `original_var_names`).
    pub var_names: Option<String>,
    pub progress: bool,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        ConvertOptions {
            counts: CountsChoice::Auto,
            keep: Vec::new(),
            cell_metadata: None,
            genes: GeneSelection::All,
            shuffle_seed: Some(0),
            allow_non_integer: false,
            force: false,
            zstd_level: 3,
            matrix_codec: MatrixCodec::BloscLz4,
            block_cells: 1024,
            window_blocks: 4,
            chunk_entries: crate::store::write::INNER_CHUNK,
            var_names: None,
            progress: false,
        }
    }
}

/// What a conversion did, printed by the CLI and used by benchmarks.
#[derive(Debug, Clone, Serialize)]
pub struct ConvertSummary {
    pub output: PathBuf,
    pub counts_source: String,
    pub n_cells: usize,
    pub n_genes: usize,
    pub nnz: u64,
    pub non_integer_values: u64,
    pub seconds: f64,
    pub input_bytes: u64,
    pub output_bytes: u64,
}

/// Deletes the temp directory unless the conversion committed it.
struct TempDir(PathBuf, bool);

impl Drop for TempDir {
    fn drop(&mut self) {
        if !self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Converts `input` into a store at `output`.
pub fn convert(input: &Path, output: &Path, opts: &ConvertOptions) -> Result<ConvertSummary> {
    let started = Instant::now();
    if output.exists() && !opts.force {
        return Err(DataError::OutputExists { path: output.to_path_buf() });
    }
    if opts.chunk_entries < 1024 || !opts.chunk_entries.is_power_of_two() {
        return Err(DataError::Config(format!("--chunk-entries {}: use a power of two ≥ 1024 (default {})", opts.chunk_entries, crate::store::write::INNER_CHUNK)));
    }
    let src = SourceFile::open(input)?;
    let (loc, info) = resolve_counts(&src, opts)?;
    tracing::info!("{}: counts from {loc} ({:?}, {}, {} cells × {} genes)", input.display(), info.layout, info.dtype, info.n_cells, info.n_genes);

    let mut obs = src.obs_reader()?;
    let var = src.var(&loc)?;
    if obs.len() != info.n_cells {
        return Err(DataError::field(input, "obs", format!("has {} rows but {loc} has {} cells", obs.len(), info.n_cells)));
    }
    if var.len() != info.n_genes {
        return Err(DataError::field(input, "var", format!("has {} rows but {loc} has {} genes", var.len(), info.n_genes)));
    }
    if let Some((csv, key)) = &opts.cell_metadata {
        // The join matches every obs name against the CSV, so obs is held whole for it.
        let mut frame = obs.into_frame()?;
        let unmatched = select::join_cell_metadata(&mut frame, csv, key)?;
        if unmatched > 0 {
            tracing::warn!("{}: {unmatched} cells have no row in the metadata CSV", csv.display());
        }
        obs = ObsReader::Held(frame);
    }
    let rows = select::apply_keep(&obs, &opts.keep, input)?;
    if rows.is_empty() {
        return Err(DataError::input(input, "zero cells left after --keep; check the filter values"));
    }

    let tmp = common::atomic::temp_beside(output);
    let _ = std::fs::remove_dir_all(&tmp);
    let mut guard = TempDir(tmp.clone(), false);
    let writer = StoreWriter::create(&tmp, opts.zstd_level, opts.matrix_codec)?.with_chunk_entries(opts.chunk_entries);
    for d in ["layers", "obsm", "obsp", "varm", "varp", "uns", "uns/neurofm"] {
        writer.dict(d)?;
    }

    // The stored order is settled before any count is read, and obs is written in it a
    // window at a time before the matrix pass, which then holds per block, not per cell.
    let mut blocks = plan_blocks(rows.len(), opts.block_cells);
    if let Some(seed) = opts.shuffle_seed {
        blocks.shuffle(&mut rng_for(&[seed, Purpose::ConvertBlocks as u64]));
    }
    let renamed_cells = write_obs(&writer, &obs, &rows, &blocks, opts)?;
    drop(obs);
    return_freed_memory();

    let scratch = tmp.join("_scratch");
    let mut rowsrc = src.open_rows(&loc, Some(&scratch))?;
    let scan = if opts.genes.needs_scan() {
        let mut scan = GeneScan::new(info.n_genes);
        for block in plan_blocks(rows.len(), opts.block_cells) {
            scan.add(&source::read_selected(rowsrc.as_mut(), &block_rows(&rows, &block))?);
        }
        Some(scan)
    } else {
        None
    };
    let kept_genes = select::choose_genes(&opts.genes, &var, scan.as_ref(), input)?;
    let mut gene_map: Vec<Option<u32>> = vec![None; info.n_genes];
    for (j, &g) in kept_genes.iter().enumerate() {
        gene_map[g] = Some(j as u32);
    }

    let ctx = WriteContext { path: input, loc: loc.clone(), allow_non_integer: opts.allow_non_integer };
    let all_genes = kept_genes.len() == info.n_genes;
    let bar = if opts.progress { common::progress::bar(rows.len() as u64, "cells") } else { indicatif::ProgressBar::hidden() };

    let (written, sha) = std::thread::scope(|scope| -> Result<(Written, String)> {
        let sha = scope.spawn(|| sha256_file(input));
        // The reader thread reads, selects genes and validates; this thread shuffles and writes.
        let (tx, rx) = sync_channel::<Result<CsrRows>>(2);
        let (blocks_ref, rows_ref, ctx_ref, gene_map_ref) = (&blocks, &rows, &ctx, &gene_map);
        let reader = scope.spawn(move || {
            let mut seen = ValueCounts::default();
            for block in blocks_ref {
                let rows = block_rows(rows_ref, block);
                let read = source::read_selected(rowsrc.as_mut(), &rows).and_then(|counts| {
                    let counts = if all_genes { counts } else { counts.select_genes(gene_map_ref) };
                    validate(&counts, &rows, ctx_ref, &mut seen)?;
                    Ok(counts)
                });
                let failed = read.is_err();
                if tx.send(read).is_err() || failed {
                    break;
                }
            }
            seen.non_integer
        });
        let written = write_matrix(&writer, rx, rows.len(), kept_genes.len(), opts, &bar);
        let non_integer = reader.join().map_err(|_| DataError::Internal("reader thread panicked".into()))?;
        let written = written.map(|w| Written { non_integer, ..w });
        let sha = sha.join().map_err(|_| DataError::Internal("sha256 thread panicked".into()))??;
        Ok((written?, sha))
    })?;
    bar.finish_and_clear();

    let mut var_out = var.take(&kept_genes);
    if let Some(col) = &opts.var_names {
        rename_genes(&mut var_out, col, input)?;
    }
    let renamed_genes = var_out.make_index_unique();
    writer.frame("var", &var_out)?;
    let provenance = Provenance {
        format_version: STORE_FORMAT_VERSION,
        created_by: format!("neurofm-data {}", env!("CARGO_PKG_VERSION")),
        source_path: std::fs::canonicalize(input).unwrap_or_else(|_| input.to_path_buf()).display().to_string(),
        source_sha256: sha,
        source_format: format!("{:?}", src.format).to_lowercase(),
        counts_source: loc.to_string(),
        source_layout: format!("{:?}", info.layout).to_lowercase(),
        keep: opts.keep.iter().map(|k| k.to_string()).collect(),
        cell_metadata: opts.cell_metadata.as_ref().map(|(p, k)| format!("{}#{k}", p.display())),
        gene_selection: opts.genes.to_string(),
        shuffle_seed: opts.shuffle_seed,
        allow_non_integer: opts.allow_non_integer,
        non_integer_values: written.non_integer,
        n_cells: rows.len(),
        n_genes: kept_genes.len(),
        nnz: written.nnz,
        renamed_duplicate_cells: renamed_cells,
        renamed_duplicate_genes: renamed_genes,
    };
    write_uns_neurofm(&writer, &written, &provenance)?;

    let _ = std::fs::remove_dir_all(&scratch);
    commit(&tmp, output, opts.force)?;
    guard.1 = true;
    Ok(ConvertSummary {
        output: output.to_path_buf(),
        counts_source: loc.to_string(),
        n_cells: provenance.n_cells,
        n_genes: provenance.n_genes,
        nnz: provenance.nnz,
        non_integer_values: written.non_integer,
        seconds: started.elapsed().as_secs_f64(),
        input_bytes: std::fs::metadata(input).map(|m| m.len()).unwrap_or(0),
        output_bytes: dir_size(output),
    })
}

/// Makes `var[col]` the gene names (`--var-names`), keeping the former ones as a column; a
/// cell of `col` that is empty keeps its former name.
fn rename_genes(var: &mut Frame, col: &str, input: &Path) -> Result<()> {
    let column = var.column(col).ok_or_else(|| {
        DataError::field(input, format!("var/{col}"), format!("no such column for --var-names; var has: {}", var.column_names().join(", ")))
    })?;
    let names: Vec<String> = (0..var.len()).map(|i| column.text(i)).collect();
    let former = std::mem::take(&mut var.index);
    var.index = names.into_iter().zip(&former).map(|(n, f)| if n.is_empty() || n == "nan" { f.clone() } else { n }).collect();
    var.columns.retain(|(name, _)| name != "original_var_names");
    var.columns.push(("original_var_names".into(), Column::Strings(former)));
    Ok(())
}

/// Picks the count matrix, checking a sample for integer values.
fn resolve_counts(src: &SourceFile, opts: &ConvertOptions) -> Result<(CountsLocation, MatrixInfo)> {
    let non_integer_fraction = |loc: &CountsLocation| -> Result<f64> {
        // Non-finite values are not "non-integer": full validation reports them with their cell.
        let v: Vec<f64> = src.sample_values(loc, AUTO_SAMPLE)?.into_iter().filter(|x| x.is_finite()).collect();
        Ok(if v.is_empty() { 0.0 } else { v.iter().filter(|x| x.fract() != 0.0).count() as f64 / v.len() as f64 })
    };
    match &opts.counts {
        CountsChoice::At(loc) => {
            let info = src.matrix_info(loc)?;
            let frac = non_integer_fraction(loc)?;
            if frac > 0.0 && !opts.allow_non_integer {
                return Err(non_integer_error(&src.path, loc, frac));
            }
            Ok((loc.clone(), info))
        }
        CountsChoice::Auto => {
            let candidates = src.matrices()?;
            let mut seen = Vec::new();
            for m in &candidates {
                let frac = non_integer_fraction(&m.location)?;
                if frac == 0.0 {
                    return Ok((m.location.clone(), m.clone()));
                }
                seen.push(format!("{} ({:.1}% non-integer)", m.location, 100.0 * frac));
            }
            if opts.allow_non_integer {
                let first = candidates[0].clone();
                tracing::warn!("{}: no integer-valued matrix; using {} as allowed", src.path.display(), first.location);
                return Ok((first.location.clone(), first));
            }
            Err(DataError::field(
                &src.path,
                "X",
                format!(
                    "no matrix holds raw integer counts: {}. Log-normalized or RPKM/TPM data is not counts; \
                     point --counts at the raw counts, or pass --allow-non-integer to store the values as they are",
                    seen.join(", ")
                ),
            ))
        }
    }
}

fn non_integer_error(path: &Path, loc: &CountsLocation, frac: f64) -> DataError {
    DataError::field(
        path,
        format!("{loc}"),
        format!(
            "{:.2}% of the values examined are not integers (log-normalized or RPKM/TPM data?); \
             neurofm expects raw counts. Choose another --counts source or pass --allow-non-integer",
            100.0 * frac
        ),
    )
}

/// Groups the selected rows into read blocks of `block_cells` cells: ranges of positions in
/// the selection, so the plan holds no copy of the rows.
fn plan_blocks(n_selected: usize, block_cells: usize) -> Vec<std::ops::Range<usize>> {
    let n = block_cells.max(1);
    (0..n_selected).step_by(n).map(|start| start..(start + n).min(n_selected)).collect()
}

/// The source rows of one block (ascending).
fn block_rows(rows: &CellSet, block: &std::ops::Range<usize>) -> Vec<usize> {
    rows.slice(block.clone()).map(|r| r as usize).collect()
}

/// Gives the heap freed by obs back to the system: glibc keeps freed small allocations (every
/// cell's name) for reuse, and the matrix pass allocates outside that heap.
fn return_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages of the allocator's own heap.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The order cells are stored in: blocks in plan order, and within each window of
/// `window_blocks` blocks the (block, row) pairs shuffled. Shared by obs and the matrix pass.
fn window_order(block_sizes: &[usize], opts: &ConvertOptions, window_index: u64) -> Vec<(u32, u32)> {
    let mut order: Vec<(u32, u32)> = block_sizes.iter().enumerate().flat_map(|(b, &n)| (0..n as u32).map(move |r| (b as u32, r))).collect();
    if let Some(seed) = opts.shuffle_seed {
        order.shuffle(&mut rng_for(&[seed, Purpose::ConvertWindow as u64, window_index]));
    }
    order
}

/// Writes obs and `uns/neurofm/cell_source_row` in stored order, a window of blocks at a
/// time: each block's rows are read from the source, gathered in the window's order, and
/// repeated names renamed as AnnData does. Blocks are read `OBS_READ_WINDOWS` windows at a
/// time in source order, so a file on disk is read forward, not by a seek per block. Returns
/// how many names were renamed.
fn write_obs(writer: &StoreWriter, obs: &ObsReader, rows: &CellSet, blocks: &[std::ops::Range<usize>], opts: &ConvertOptions) -> Result<usize> {
    let mut names = UniqueNames::new(name_hashes(obs, rows)?);
    let mut frame = writer.frame_writer("obs", &obs.read(0..1)?, rows.len() as u64)?;
    let mut source_row = writer.column::<i64>("uns/neurofm/cell_source_row", rows.len() as u64)?;
    let window_blocks = opts.window_blocks.max(1);
    for (g, group) in blocks.chunks(window_blocks * OBS_READ_WINDOWS).enumerate() {
        let mut by_position: Vec<usize> = (0..group.len()).collect();
        by_position.sort_by_key(|&b| group[b].start);
        let mut read: Vec<Option<(Frame, Vec<usize>)>> = (0..group.len()).map(|_| None).collect();
        for b in by_position {
            let block = block_rows(rows, &group[b]);
            let span = block[0]..block[block.len() - 1] + 1;
            let picked: Vec<usize> = block.iter().map(|r| r - span.start).collect();
            read[b] = Some((obs.read(span)?.into_take(&picked), block));
        }
        for (i, parts) in read.chunks_mut(window_blocks).enumerate() {
            let (parts, sources): (Vec<Frame>, Vec<Vec<usize>>) = parts.iter_mut().filter_map(Option::take).unzip();
            let sizes: Vec<usize> = parts.iter().map(Frame::len).collect();
            let offsets: Vec<usize> = sizes.iter().scan(0, |at, &n| Some(std::mem::replace(at, *at + n))).collect();
            let window = (g * OBS_READ_WINDOWS + i) as u64;
            let order: Vec<usize> = window_order(&sizes, opts, window).into_iter().map(|(b, r)| offsets[b as usize] + r as usize).collect();
            let sources: Vec<usize> = sources.concat();
            let mut cells = Frame::concat(parts).map_err(DataError::Internal)?.into_take(&order);
            cells.index.iter_mut().for_each(|n| names.rename(n));
            frame.push(&cells)?;
            order.iter().try_for_each(|&i| source_row.push(sources[i] as i64))?;
        }
    }
    frame.finish()?;
    source_row.finish()?;
    Ok(names.renamed())
}

/// Hashes of the selected cells' names, swept a slice of obs at a time: 8 bytes a cell,
/// dropped before the matrix pass unless some name repeats.
fn name_hashes(obs: &ObsReader, rows: &CellSet) -> Result<Vec<u64>> {
    let mut hashes = Vec::with_capacity(rows.len());
    for at in source::slices(obs.len(), NAME_SLICE) {
        let names = obs.names(at.clone())?;
        hashes.extend(rows.within(at.start as u32..at.end as u32).map(|r| crate::rng::hash_str(&names[r as usize - at.start])));
    }
    Ok(hashes)
}

struct WriteContext<'a> {
    path: &'a Path,
    loc: CountsLocation,
    allow_non_integer: bool,
}

/// The name of source cell `row`, for an error message: obs is reread rather than held
/// through the matrix pass.
fn cell_name(path: &Path, row: usize) -> String {
    let name = SourceFile::open(path).and_then(|s| s.obs_reader()).and_then(|obs| obs.names(row..row + 1));
    name.ok().and_then(|mut n| n.pop()).unwrap_or_else(|| "?".into())
}

/// What writing the matrix produced, per gene (per-cell tables went to the store as they came).
struct Written {
    gene_nnz: Vec<i64>,
    gene_sum: Vec<f64>,
    gene_sum_sq: Vec<f64>,
    non_integer: u64,
    nnz: u64,
}

/// Values validated so far, for the non-integer share.
#[derive(Default)]
struct ValueCounts {
    non_integer: u64,
    seen: u64,
}

fn write_matrix(
    writer: &StoreWriter,
    rx: std::sync::mpsc::Receiver<Result<CsrRows>>,
    n_cells: usize,
    n_genes: usize,
    opts: &ConvertOptions,
    bar: &indicatif::ProgressBar,
) -> Result<Written> {
    let mut csr = writer.csr("X", n_cells)?;
    let mut cells = CellTables {
        total: writer.column("uns/neurofm/cell_total", n_cells as u64)?,
        nnz: writer.column("uns/neurofm/cell_nnz", n_cells as u64)?,
    };
    let mut w = Written {
        gene_nnz: vec![0; n_genes],
        gene_sum: vec![0.0; n_genes],
        gene_sum_sq: vec![0.0; n_genes],
        non_integer: 0,
        nnz: 0,
    };
    let mut window: Vec<CsrRows> = Vec::new();
    let mut window_index = 0u64;
    let mut received = rx.iter().peekable();
    while let Some(msg) = received.next() {
        window.push(msg?);
        if window.len() < opts.window_blocks.max(1) && received.peek().is_some() {
            continue;
        }
        // Copy each row once, in stored order, straight into the shard buffers.
        let sizes: Vec<usize> = window.iter().map(CsrRows::n_rows).collect();
        let order = window_order(&sizes, opts, window_index);
        for &(b, r) in &order {
            let (idx, vals) = window[b as usize].row(r as usize);
            accumulate(idx, vals, &mut w, &mut cells)?;
            csr.push_row(idx, vals)?;
        }
        bar.inc(order.len() as u64);
        window.clear();
        window_index += 1;
    }
    w.nnz = writer.finish_csr(csr, n_genes)?;
    cells.total.finish()?;
    cells.nnz.finish()?;
    Ok(w)
}

/// Per-cell statistics, streamed into `uns/neurofm` as cells are written.
struct CellTables {
    total: ColumnWriter<f64>,
    nnz: ColumnWriter<i64>,
}

/// Refuses negative, NaN, infinite and (unless allowed) non-integer counts, naming the cell.
fn validate(block: &CsrRows, rows: &[usize], ctx: &WriteContext, w: &mut ValueCounts) -> Result<()> {
    for (i, &row) in rows.iter().enumerate().take(block.n_rows()) {
        let (_, vals) = block.row(i);
        for &v in vals {
            let problem = if !v.is_finite() {
                Some(format!("value {v}"))
            } else if v < 0.0 {
                Some(format!("negative value {v}"))
            } else if v > F32_EXACT_MAX {
                Some(format!("value {v} exceeds 2^24, the largest count stored exactly"))
            } else {
                None
            };
            if let Some(p) = problem {
                return Err(DataError::field(
                    ctx.path,
                    ctx.loc.to_string(),
                    format!("{p} in cell `{}` (row {row}); counts must be finite and non-negative", cell_name(ctx.path, row)),
                ));
            }
            // Exact: v is finite and below 2^24 here, so the cast cannot overflow.
            w.non_integer += ((v as i32) as f32 != v) as u64;
        }
        w.seen += vals.len() as u64;
        if w.non_integer > 0 && !ctx.allow_non_integer {
            return Err(non_integer_error(ctx.path, &ctx.loc, w.non_integer as f64 / w.seen as f64));
        }
    }
    Ok(())
}

fn accumulate(idx: &[u32], vals: &[f32], w: &mut Written, cells: &mut CellTables) -> Result<()> {
    let mut total = 0.0;
    for (&g, &v) in idx.iter().zip(vals) {
        let (g, v) = (g as usize, v as f64);
        total += v;
        w.gene_nnz[g] += (v != 0.0) as i64;
        w.gene_sum[g] += v;
        w.gene_sum_sq[g] += v * v;
    }
    cells.total.push(total)?;
    cells.nnz.push(idx.len() as i64)
}

fn write_uns_neurofm(writer: &StoreWriter, w: &Written, provenance: &Provenance) -> Result<()> {
    writer.array("uns/neurofm/gene_nnz", &w.gene_nnz)?;
    writer.array("uns/neurofm/gene_sum", &w.gene_sum)?;
    writer.array("uns/neurofm/gene_sum_sq", &w.gene_sum_sq)?;
    let json = serde_json::to_string_pretty(provenance).map_err(|e| DataError::Internal(e.to_string()))?;
    // Last: its presence is what marks the store complete.
    writer.string_scalar("uns/neurofm/provenance", &json)
}

/// Moves the finished store into place, replacing an old one only when `force` is set.
fn commit(tmp: &Path, output: &Path, force: bool) -> Result<()> {
    if output.exists() {
        if !force {
            return Err(DataError::OutputExists { path: output.to_path_buf() });
        }
        let trash = tmp.with_extension("old");
        std::fs::rename(output, &trash).map_err(|e| DataError::io(output, e))?;
        std::fs::rename(tmp, output).map_err(|e| DataError::io(output, e))?;
        let _ = if trash.is_dir() { std::fs::remove_dir_all(&trash) } else { std::fs::remove_file(&trash) };
        return Ok(());
    }
    std::fs::rename(tmp, output).map_err(|e| DataError::io(output, e))
}

/// SHA-256 of a file, streamed.
pub fn sha256_file(path: &Path) -> Result<String> {
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| DataError::io(path, e))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Total bytes of the files under a directory.
pub fn dir_size(path: &Path) -> u64 {
    let Ok(rd) = std::fs::read_dir(path) else { return std::fs::metadata(path).map(|m| m.len()).unwrap_or(0) };
    rd.flatten().map(|e| if e.path().is_dir() { dir_size(&e.path()) } else { e.metadata().map(|m| m.len()).unwrap_or(0) }).sum()
}
