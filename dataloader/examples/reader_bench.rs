//! Reader throughput: raw cells/s and tokenized+masked cells/s, per worker thread (= per core).
//!
//! `cargo run --release -p neurofm-dataloader --example reader_bench [-- STORE]`
//! Without STORE it synthesizes a 2000-gene store (60k cells) in a temp directory, with the
//! matrix codec from `NEUROFM_BENCH_CODEC` (zstd, blosc-lz4 (default), blosc-zstd).
//! Run with `RAYON_NUM_THREADS=1` for honest per-core numbers (zarrs decodes on rayon).
//! First it prints what each rank of 1 … 64 would decode per epoch under each read plan
//! (`NEUROFM_BENCH_PLANS_ONLY=1` stops there).

use std::sync::Arc;
use std::time::Instant;

use dataloader::cells::CellSet;
use dataloader::convert::{convert, ConvertOptions};
use dataloader::corpus::Corpus;
use dataloader::mask::{batch_fn, Batcher, MaskConfig, SequenceMode, ViewConfig};
use dataloader::shard::{BatchFn, BatchStream, CellBatch, Rank, ReadPlan, ReaderPosition, ShardConfig, ShardReader};
use dataloader::store::write::MatrixCodec;
use dataloader::store::Store;
use dataloader::synth::{self, SynthOptions};
use dataloader::tokenize::{BinningKind, Tokenizer};

fn main() -> anyhow::Result<()> {
    let tmp = tempfile::tempdir()?;
    let codec = match std::env::var("NEUROFM_BENCH_CODEC").as_deref() {
        Ok("zstd") => MatrixCodec::Zstd,
        Ok("blosc-zstd") => MatrixCodec::BloscZstd,
        _ => MatrixCodec::BloscLz4,
    };
    let path = match std::env::args().nth(1) {
        Some(p) => p.into(),
        None => {
            let src = tmp.path().join("bench.h5ad");
            synth::write(&SynthOptions::new(src.clone(), 60_000, 2000, 8, 1))?;
            let out = tmp.path().join("bench.zarr");
            let s = convert(&src, &out, &ConvertOptions { matrix_codec: codec, ..ConvertOptions::default() })?;
            println!("matrix codec {codec:?}: store {:.1} MB", s.output_bytes as f64 / 1e6);
            out
        }
    };
    let store = Arc::new(Store::open(&path)?);
    let cells: CellSet = (0..store.n_cells() as u32).collect();
    println!(
        "store {}: {} cells × {} genes, {:.0} non-zeros per cell",
        path.display(),
        store.n_cells(),
        store.n_genes(),
        store.nnz() as f64 / store.n_cells() as f64
    );
    let corpus = Arc::new(Corpus::single(&path)?);
    let shard = |plan: ReadPlan| ShardConfig { batch_size: 64, seed: 0, window_blocks: 2, plan };
    let reader = ShardReader::new(cells.clone(), |c| corpus.block_of(c), Rank::single(), shard(ReadPlan::Local))?;
    let tok = Arc::new(Tokenizer::fit(&corpus, &cells, BinningKind::GeneQuantile, 51, 20_000, 0)?);
    // What each rank of a W-rank group would decode in one epoch, from the plans alone.
    println!("read plans (one epoch, batch 64 per rank): world, plan, cells decoded per rank / cells it trains on, share of the store a rank decodes");
    for world in [1usize, 2, 8, 64] {
        for plan in [ReadPlan::Local, ReadPlan::Global] {
            let (mut worst, mut share) = (0f64, 0f64);
            for r in [0, world / 2, world - 1] {
                let Ok(rd) = ShardReader::new(cells.clone(), |c| corpus.block_of(c), Rank::new(r, world)?, shard(plan)) else { continue };
                let (mut wanted, mut decoded) = (0usize, 0u64);
                for cells in rd.plan(1).reads() {
                    wanted += cells.len();
                    decoded += corpus.read_cost(&cells)?;
                }
                worst = worst.max(decoded as f64 / wanted.max(1) as f64);
                share = share.max(decoded as f64 / store.n_cells() as f64);
            }
            println!("  world {world:>3} {plan:?}: read_amplification {worst:.3}, decoded share per rank {share:.4} (ideal {:.4})", 1.0 / world as f64);
        }
    }
    if std::env::var_os("NEUROFM_BENCH_PLANS_ONLY").is_some() {
        return Ok(());
    }
    let mask = Some(MaskConfig { ratio: 0.15, nonzero_fraction: 0.5, seed: 0 });
    let run = |name: &str, workers: usize, f: BatchFn<usize>| -> anyhow::Result<()> {
        let t = Instant::now();
        let mut n = 0usize;
        for item in BatchStream::new(corpus.clone(), reader.plan(1), ReaderPosition { epoch: 1, batch: 0 }, workers, 4, f) {
            n += item?.1;
        }
        let secs = t.elapsed().as_secs_f64();
        println!("{name:<44} workers={workers}  {:>9.0} cells/s  ({:.0} cells/s per worker)", n as f64 / secs, n as f64 / secs / workers as f64);
        Ok(())
    };
    let raw: BatchFn<usize> = Arc::new(|b: CellBatch| Ok(b.cells.len()));
    for mode in [SequenceMode::FullPanel, SequenceMode::NonzeroPlusZeros { max_len: 1024 }] {
        let batcher = Batcher::new(tok.clone(), mode, mask, ViewConfig::SINGLE)?;
        let masked = batch_fn(batcher, 1);
        let counted: BatchFn<usize> = Arc::new(move |b: CellBatch| masked(b).map(|m| m.batch_size));
        for workers in [1, 2] {
            if matches!(mode, SequenceMode::FullPanel) {
                run("raw cells (read + decode)", workers, raw.clone())?;
            }
            run(&format!("tokenized + masked ({mode:?})"), workers, counted.clone())?;
        }
    }
    Ok(())
}
