//! A corpus of stores with partly overlapping gene panels: the vocabulary, absent genes, the
//! tokenizer over several stores, and reads that decode each chunk once.

mod common;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;

use dataloader::cells::CellSet;
use dataloader::convert::ConvertOptions;
use dataloader::corpus::{Corpus, StoreSpec};
use dataloader::genes::{GeneCase, VocabularySpec};
use dataloader::mask::{batch_fn, Batcher, SequenceMode, ViewConfig};
use dataloader::select::GeneSelection;
use dataloader::shard::{BatchStream, Rank, ReadPlan, ReaderPosition, ShardConfig, ShardReader};
use dataloader::split::{SplitSpec, SplitUnit};
use dataloader::store::Store;
use dataloader::synth::SynthOptions;
use dataloader::tokenize::{Binning, BinningKind, Tokenizer};

/// Store `name` of a synthetic dataset (seed `seed`) keeping genes `genes` of its 80.
fn panel_store(dir: &Path, name: &str, seed: u64, genes: std::ops::Range<usize>, chunk_entries: u64) -> std::path::PathBuf {
    sized_store(dir, name, 600, seed, genes, chunk_entries)
}

fn sized_store(dir: &Path, name: &str, cells: usize, seed: u64, genes: std::ops::Range<usize>, chunk_entries: u64) -> std::path::PathBuf {
    common::no_hdf5_locking();
    let list = dir.join(format!("{name}.genes.txt"));
    std::fs::write(&list, genes.map(|g| format!("gene_{g}\n")).collect::<String>()).unwrap();
    let opts = ConvertOptions { genes: GeneSelection::List(list), chunk_entries, ..ConvertOptions::default() };
    common::synth_store(dir, name, SynthOptions::new("unused".into(), cells, 80, 3, seed), &opts)
}

fn names(r: std::ops::Range<usize>) -> Vec<String> {
    r.map(|g| format!("gene_{g}")).collect()
}

#[test]
fn a_two_store_corpus_has_the_union_vocabulary_and_absent_genes_never_appear() {
    let dir = tempfile::tempdir().unwrap();
    let a = panel_store(dir.path(), "a", 1, 0..60, 1 << 20);
    let b = panel_store(dir.path(), "b", 2, 30..80, 1 << 20);
    let corpus = Corpus::open(&[StoreSpec::new(&a), StoreSpec::new(&b)], &VocabularySpec::Union, GeneCase::Exact).unwrap();
    assert_eq!(corpus.vocabulary, [names(0..60), names(60..80)].concat(), "store order, then var order");
    let o: Vec<_> = corpus.overlaps().into_iter().map(|(_, o)| (o.shared, o.missing, o.unknown)).collect();
    assert_eq!(o, vec![(60, 20, 0), (50, 30, 0)]);
    assert_eq!(corpus.n_cells(), 1200);

    // Counts come back in vocabulary order: cell 0 of store b is corpus cell 600.
    let own = Store::open(&b).unwrap().read_rows(0..1).unwrap();
    let via = corpus.read_cells(&[600]).unwrap();
    let (oi, ov) = own.row(0);
    assert_eq!(via.row(0).0, oi.iter().map(|&g| g + 30).collect::<Vec<_>>().as_slice(), "b's gene k is vocabulary gene 30 + k");
    assert_eq!(via.row(0).1, ov);

    let cells: CellSet = (0..1200).collect();
    let tok = Arc::new(Tokenizer::fit(&corpus, &cells, BinningKind::GeneQuantile, 9, 100_000, 0).unwrap());
    let panels = Arc::new(corpus.panels());
    let absent = |cell: u32| if cell < 600 { 60..80 } else { 0..30 };
    for mode in [SequenceMode::FullPanel, SequenceMode::NonzeroPlusZeros { max_len: 81 }] {
        let batcher = Batcher::new(tok.clone(), mode, None, ViewConfig::SINGLE).unwrap().with_panels(panels.clone());
        let reader = ShardReader::new(cells.clone(), |c| corpus.block_of(c), Rank::single(), ShardConfig { batch_size: 50, seed: 3, window_blocks: 2, plan: ReadPlan::Local }).unwrap();
        let corpus_src: Arc<Corpus> = Arc::new(Corpus::open(&[StoreSpec::new(&a), StoreSpec::new(&b)], &VocabularySpec::Union, GeneCase::Exact).unwrap());
        let mut seen_stores = HashSet::new();
        for item in BatchStream::new(corpus_src, reader.plan(0), ReaderPosition::default(), 2, 2, batch_fn(batcher.clone(), 0)) {
            let (_, batch) = item.unwrap();
            let v = batch.first();
            for (i, &cell) in batch.cells.iter().enumerate() {
                seen_stores.insert(cell < 600);
                let row = &v.gene_ids[i * batch.seq_len..(i + 1) * batch.seq_len];
                let genes: Vec<i64> = row.iter().copied().filter(|&g| g < 80).collect();
                assert_eq!(genes.len(), if cell < 600 { 60 } else { 50 }, "{mode:?}: every measured gene, nothing else");
                assert!(genes.iter().all(|&g| !absent(cell).contains(&(g as usize))), "{mode:?}: cell {cell} holds a gene its store lacks: {genes:?}");
            }
        }
        assert_eq!(seen_stores.len(), 2, "batches draw from both stores");
    }

    // A gene measured only in store a is fitted on a's cells alone: the corpus's edges equal
    // those of store a by itself.
    let alone = Tokenizer::fit(&Corpus::single(&a).unwrap(), &(0..600).collect::<CellSet>(), BinningKind::GeneQuantile, 9, 100_000, 0).unwrap();
    let (Binning::GeneQuantile { edges: both, .. }, Binning::GeneQuantile { edges: one, .. }) = (&tok.binning, &alone.binning) else { panic!("gene-quantile") };
    assert_eq!(both[5], one[5], "gene_5 (only in a)");
    assert_ne!(both[40], one[40], "gene_40 is measured in both stores");
}

#[test]
fn a_vocabulary_list_matches_a_gene_key_case_insensitively() {
    let dir = tempfile::tempdir().unwrap();
    let a = panel_store(dir.path(), "a", 1, 0..60, 1 << 20);
    let list = dir.path().join("vocab.txt");
    std::fs::write(&list, "g5\ng70\ng59\n").unwrap();
    let spec = StoreSpec { gene_key: Some("gene_symbol".into()), ..StoreSpec::new(&a) };
    let corpus = Corpus::open(std::slice::from_ref(&spec), &VocabularySpec::List(list.clone()), GeneCase::Insensitive).unwrap();
    assert_eq!(corpus.vocabulary, vec!["g5", "g70", "g59"]);
    let o = &corpus.overlaps()[0].1;
    assert_eq!((o.shared, o.missing, o.unknown), (2, 1, 58), "G5 and G59 match; g70 is not in the store");
    let exact = Corpus::open(&[spec], &VocabularySpec::List(list), GeneCase::Exact).err().unwrap().to_string();
    assert!(exact.contains("none of its 60 genes") && exact.contains("insensitive"), "{exact}");
}

/// With small chunks, a local read plan decodes about 1/W of the chunks per rank: cells in
/// the decoded chunks over the cells used stays near 1 at any world size.
#[test]
fn local_read_plans_keep_read_amplification_low_at_two_and_four_ranks() {
    let dir = tempfile::tempdir().unwrap();
    let a = panel_store(dir.path(), "a", 1, 0..80, 1024);
    let corpus = Corpus::single(&a).unwrap();
    let cells: CellSet = (0..600).collect();
    for world in [2usize, 4] {
        for plan in [ReadPlan::Local, ReadPlan::Global] {
            let mut worst: f64 = 0.0;
            for r in 0..world {
                let cfg = ShardConfig { batch_size: 8, seed: 1, window_blocks: 2, plan };
                let reader = ShardReader::new(cells.clone(), |c| corpus.block_of(c), Rank::new(r, world).unwrap(), cfg).unwrap();
                let reads: Vec<Vec<u32>> = reader.plan(2).reads().collect();
                let wanted: usize = reads.iter().map(Vec::len).sum();
                let decoded: u64 = reads.iter().map(|c| corpus.read_cost(c).unwrap()).sum();
                worst = worst.max(decoded as f64 / wanted as f64);
            }
            match plan {
                ReadPlan::Local => assert!(worst <= 1.25, "world {world}: read amplification {worst:.3}"),
                ReadPlan::Global => assert!(worst > 0.8 * world as f64, "world {world}: every rank decodes every chunk ({worst:.3})"),
            }
        }
    }
}

/// Cells sampled sparsely from the same chunks are read with one decode per chunk.
#[test]
fn sampled_reads_decode_each_chunk_once() {
    let dir = tempfile::tempdir().unwrap();
    let a = panel_store(dir.path(), "a", 1, 0..80, 1024);
    let store = Store::open(&a).unwrap();
    let every_third: Vec<usize> = (0..600).step_by(3).collect();
    let (rows, decoded) = store.read_cells_costed(&every_third).unwrap();
    assert_eq!(rows.n_rows(), 200);
    for (i, &r) in every_third.iter().enumerate().step_by(37) {
        assert_eq!(rows.row(i), store.read_rows(r..r + 1).unwrap().row(0));
    }
    // Decoding all chunks once yields each cell once, plus the cells straddling two chunks
    // (about one per chunk boundary, and a span boundary every 16 chunks).
    let chunks = store.nnz().div_ceil(store.chunk_entries());
    assert!(decoded <= 600 + 2 * chunks, "decoded {decoded} cells for 600 stored over {chunks} chunks");
}

/// `split.unit = "block"` puts whole read blocks in validation: no read block holds cells of
/// both sides, and the share is about `val_fraction`.
#[test]
fn a_block_split_keeps_validation_in_blocks_of_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let a = sized_store(dir.path(), "big", 4000, 1, 0..80, 1024);
    let corpus = Corpus::single(&a).unwrap();
    let split = corpus.split(&SplitSpec { val_fraction: 0.2, seed: 4, by: None, unit: SplitUnit::Block }).unwrap();
    let val_blocks: HashSet<u64> = split.val.iter().map(|c| corpus.block_of(c)).collect();
    let train_blocks: HashSet<u64> = split.train.iter().map(|c| corpus.block_of(c)).collect();
    assert!(val_blocks.len() >= 2 && train_blocks.len() >= 6, "{} / {} blocks", val_blocks.len(), train_blocks.len());
    assert!(val_blocks.is_disjoint(&train_blocks));
    let share = split.val.len() as f64 / 4000.0;
    assert!((0.15..0.35).contains(&share), "validation share {share}");
    let by_cell = corpus.split(&SplitSpec { val_fraction: 0.2, seed: 4, by: None, unit: SplitUnit::Cell }).unwrap();
    let mixed: HashSet<u64> = by_cell.val.iter().map(|c| corpus.block_of(c)).collect();
    assert!(mixed.len() > val_blocks.len(), "a cell split scatters validation over every block");
    assert!(corpus.split(&SplitSpec { val_fraction: 0.2, seed: 4, by: Some("library".into()), unit: SplitUnit::Block }).is_err());
}

/// `--var-names COL` makes a var column the store's gene names, keeping the former ones.
#[test]
fn var_names_from_a_column_keep_the_former_names() {
    let dir = tempfile::tempdir().unwrap();
    let opts = ConvertOptions { var_names: Some("gene_symbol".into()), ..ConvertOptions::default() };
    let path = common::synth_store(dir.path(), "sym", SynthOptions::new("unused".into(), 50, 12, 2, 1), &opts);
    let store = Store::open(&path).unwrap();
    assert_eq!(store.var_names().unwrap()[..3], ["G0", "G1", "G2"]);
    assert_eq!(store.column("var", "original_var_names").unwrap().text(2), "gene_2");
    let bad = ConvertOptions { var_names: Some("symbol".into()), ..ConvertOptions::default() };
    let src = dir.path().join("sym.h5ad");
    let e = dataloader::convert::convert(&src, &dir.path().join("bad.zarr"), &bad).unwrap_err().to_string();
    assert!(e.contains("var/symbol") && e.contains("gene_symbol"), "{e}");
    let e = dataloader::convert::convert(&src, &dir.path().join("bad.zarr"), &ConvertOptions { chunk_entries: 1000, ..ConvertOptions::default() }).unwrap_err().to_string();
    assert!(e.contains("power of two"), "{e}");
}
