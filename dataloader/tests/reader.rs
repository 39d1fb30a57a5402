//! The shard reader on real stores: batches hold the right counts, resume is exact, splits
//! keep groups apart, the tokenizer is fitted on training cells only.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use dataloader::cells::CellSet;
use dataloader::convert::ConvertOptions;
use dataloader::corpus::Corpus;
use dataloader::mask::{batch_fn, Batcher, MaskConfig, SequenceMode, ViewConfig, VALIDATION_EPOCH};
use dataloader::shard::{BatchStream, CellBatch, Rank, ReaderPosition, ShardConfig, ShardReader};
use dataloader::split::{SplitSpec, SplitUnit};
use dataloader::store::Store;
use dataloader::synth::SynthOptions;
use dataloader::tokenize::{quantile_edges, normalize, BinningKind, Tokenizer};

fn store(dir: &std::path::Path) -> Arc<Store> {
    common::no_hdf5_locking();
    let o = SynthOptions::new("unused".into(), 900, 80, 3, 4);
    Arc::new(Store::open(&common::synth_store(dir, "s", o, &ConvertOptions::default())).unwrap())
}

fn corpus(s: &Store) -> Corpus {
    Corpus::single(&s.path).unwrap()
}

fn raw(store: &Arc<Store>, plan_start: ReaderPosition, reader: &ShardReader, epoch: u64) -> Vec<CellBatch> {
    let f: dataloader::shard::BatchFn<CellBatch> = Arc::new(Ok);
    BatchStream::new(store.clone(), reader.plan(epoch), plan_start, 3, 2, f).map(|r| r.unwrap().1).collect()
}

#[test]
fn streamed_batches_hold_the_stores_counts_in_plan_order() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let split = SplitSpec { val_fraction: 0.2, seed: 1, by: None, unit: SplitUnit::Cell }.apply(&s).unwrap();
    let reader = ShardReader::new(split.train.clone(), |c| c as u64 / 64, Rank::single(), ShardConfig { batch_size: 32, seed: 9, window_blocks: 2, plan: Default::default() }).unwrap();
    let plan = reader.plan(0);
    let batches = raw(&s, ReaderPosition::default(), &reader, 0);
    assert_eq!(batches.len(), reader.batches_per_epoch());
    let train: HashSet<u32> = split.train.iter().collect();
    for (b, planned) in batches.iter().zip(&plan.batches()) {
        assert_eq!(&b.cells, planned);
        for (i, &c) in b.cells.iter().enumerate() {
            assert!(train.contains(&c), "validation cell {c} in a training batch");
            let direct = s.read_rows(c as usize..c as usize + 1).unwrap();
            assert_eq!(b.counts.row(i), direct.row(0), "cell {c}");
        }
    }
}

#[test]
fn resume_from_a_saved_position_continues_the_same_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let cells: CellSet = (0..s.n_cells() as u32).collect();
    let reader = ShardReader::new(cells, |c| c as u64 / 50, Rank::single(), ShardConfig { batch_size: 16, seed: 2, window_blocks: 3, plan: Default::default() }).unwrap();
    let tok = Arc::new(Tokenizer::fit(&corpus(&s), &(0..600).collect::<CellSet>(), BinningKind::GeneQuantile, 11, 10_000, 0).unwrap());
    let batcher = Batcher::new(tok, SequenceMode::FullPanel, Some(MaskConfig { ratio: 0.15, nonzero_fraction: 0.5, seed: 5 }), ViewConfig::SINGLE).unwrap();
    let stream = |start: ReaderPosition| -> Vec<(ReaderPosition, Vec<i64>)> {
        BatchStream::new(s.clone(), reader.plan(start.epoch), start, 2, 2, batch_fn(batcher.clone(), start.epoch))
            .map(|r| r.map(|(p, b)| (p, b.views[0].input_bins.clone())).unwrap())
            .collect()
    };
    let full = stream(ReaderPosition { epoch: 3, batch: 0 });
    for k in [1, 7, full.len() - 1] {
        let (pos, _) = full[k - 1];
        assert_eq!(pos, ReaderPosition { epoch: 3, batch: k });
        let resumed = stream(pos);
        assert_eq!(resumed, full[k..].to_vec(), "resume at batch {k}");
    }
    assert_ne!(stream(ReaderPosition { epoch: 4, batch: 0 })[0].1, full[0].1, "next epoch differs");
}

#[test]
fn validation_masks_are_fixed_and_training_masks_move() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let tok = Arc::new(Tokenizer::fit(&corpus(&s), &(0..900).collect::<CellSet>(), BinningKind::CellQuantile, 7, 100, 0).unwrap());
    let b = Batcher::new(tok, SequenceMode::NonzeroPlusZeros { max_len: 40 }, Some(MaskConfig { ratio: 0.2, nonzero_fraction: 0.5, seed: 1 }), ViewConfig::SINGLE).unwrap();
    let cells = CellBatch { cells: vec![0, 1, 2], counts: s.read_rows(0..3).unwrap() };
    assert_eq!(b.build(&cells, VALIDATION_EPOCH), b.build(&cells, VALIDATION_EPOCH));
    assert_ne!(b.build(&cells, 0).first().targets, b.build(&cells, 1).first().targets);
    assert_eq!(b.build(&cells, 0).n_masked(), 3 * 8, "round(0.2 × 39) = 8 per cell");
}

#[test]
fn gene_quantile_edges_come_from_training_cells_only() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let train: CellSet = (0..300).collect();
    let tok = Tokenizer::fit(&corpus(&s), &train, BinningKind::GeneQuantile, 9, 100_000, 0).unwrap();
    let counts = s.read_rows(0..300).unwrap();
    let gene = 5u32;
    let mut values = Vec::new();
    let mut norm = Vec::new();
    for i in 0..counts.n_rows() {
        let (idx, val) = counts.row(i);
        normalize(val, &mut norm);
        values.extend(idx.iter().zip(&norm).filter(|(&g, &x)| g == gene && x > 0.0).map(|(_, &x)| x));
    }
    let expected = quantile_edges(&mut values, 9);
    let dataloader::tokenize::Binning::GeneQuantile { edges, fit_cells } = &tok.binning else { panic!("gene-quantile") };
    assert_eq!(*fit_cells, 300);
    assert_eq!(edges[gene as usize], expected);
    let other = Tokenizer::fit(&corpus(&s), &(300..900).collect::<CellSet>(), BinningKind::GeneQuantile, 9, 100_000, 0).unwrap();
    assert_ne!(other.binning, tok.binning, "other cells give other edges");
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    assert_eq!(Tokenizer::load(&path).unwrap(), tok);
}

/// Rank-value medians are each gene's median CP10k among the training cells that express it.
#[test]
fn rank_value_medians_come_from_expressing_training_cells() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let train: CellSet = (0..301).collect();
    let tok = Tokenizer::fit(&corpus(&s), &train, BinningKind::RankValue, 40, 100_000, 0).unwrap();
    let dataloader::tokenize::Binning::RankValue { medians, fit_cells } = &tok.binning else { panic!("rank-value") };
    assert_eq!(*fit_cells, 301);
    let counts = s.read_rows(0..301).unwrap();
    for gene in [0u32, 7, 30] {
        let mut v: Vec<f64> = (0..counts.n_rows())
            .filter_map(|i| {
                let (idx, val) = counts.row(i);
                let total: f64 = val.iter().map(|&x| x as f64).sum();
                idx.iter().position(|&g| g == gene).map(|k| val[k] as f64 / total * 1e4)
            })
            .collect();
        v.sort_by(f64::total_cmp);
        let median = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
        assert!((medians[gene as usize] as f64 - median).abs() < 1e-3 * median, "gene {gene}: {} vs {median}", medians[gene as usize]);
    }
    assert!(tok.is_ranked());
}

/// Expression ranking fits nothing, is ranked, and survives the tokenizer file.
#[test]
fn rank_expression_is_a_ranked_tokenizer_that_saves_and_loads() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let tok = Tokenizer::fit(&corpus(&s), &(0..301).collect(), BinningKind::RankExpression, 40, 100_000, 0).unwrap();
    assert_eq!(tok.binning, dataloader::tokenize::Binning::RankExpression);
    assert!(tok.is_ranked() && BinningKind::RankExpression.is_ranked());
    let path = dir.path().join("tokenizer.json");
    tok.save(&path).unwrap();
    assert_eq!(Tokenizer::load(&path).unwrap(), tok);
}

#[test]
fn group_split_keeps_every_library_on_one_side() {
    let dir = tempfile::tempdir().unwrap();
    let s = store(dir.path());
    let split = SplitSpec { val_fraction: 0.25, seed: 3, by: Some("library".into()), unit: SplitUnit::Cell }.apply(&s).unwrap();
    let lib = s.column("obs", "library").unwrap();
    let train: HashSet<String> = split.train.iter().map(|c| lib.text(c as usize)).collect();
    let val: HashSet<String> = split.val.iter().map(|c| lib.text(c as usize)).collect();
    assert!(train.is_disjoint(&val) && !val.is_empty());
    let frac = split.val.len() as f64 / s.n_cells() as f64;
    assert!((0.1..0.45).contains(&frac), "val fraction {frac}");
    let again = SplitSpec { val_fraction: 0.25, seed: 3, by: Some("library".into()), unit: SplitUnit::Cell }.apply(&s).unwrap();
    assert_eq!(again, split);
    assert!(SplitSpec { val_fraction: 0.2, seed: 0, by: Some("nope".into()), unit: SplitUnit::Cell }.apply(&s).is_err());
}

#[test]
fn real_whb_store_splits_by_library_and_tokenizes() {
    let Some(data) = common::shared_data() else { return };
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("whb.zarr");
    dataloader::convert::convert(&data.join("whb_cortex_L5exc_MGEinh.h5ad"), &out, &ConvertOptions::default()).unwrap();
    let s = Arc::new(Store::open(&out).unwrap());
    let split = SplitSpec { val_fraction: 0.2, seed: 42, by: Some("library_label".into()), unit: SplitUnit::Cell }.apply(&s).unwrap();
    assert_eq!(split.train.len() + split.val.len(), 1152);
    let tok = Arc::new(Tokenizer::fit(&corpus(&s), &split.train, BinningKind::GeneQuantile, 20, 100_000, 0).unwrap());
    let b = Batcher::new(tok, SequenceMode::FullPanel, Some(MaskConfig { ratio: 0.15, nonzero_fraction: 0.5, seed: 42 }), ViewConfig::SINGLE).unwrap();
    let val4: Vec<u32> = split.val.iter().take(4).collect();
    let cells = CellBatch { cells: val4.clone(), counts: s.read_cells(&val4.iter().map(|&c| c as usize).collect::<Vec<_>>()).unwrap() };
    let batch = b.build(&cells, VALIDATION_EPOCH);
    assert_eq!(batch.seq_len, 2001);
    assert_eq!(batch.n_masked(), 4 * 300, "15% of 2000 genes");
    assert!(batch.first().input_bins.iter().all(|&x| (0..23).contains(&x)));
}
