//! `neurofm-data`: inspect single-cell files, convert them to neurofm stores, make synthetic data.
//! Exit codes: 0 ok, 1 runtime failure, 2 bad input or usage.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use common::cli::OutputArgs;
use common::exit::{Exit, ExitStatus};
use common::logging::{self, LogSetup};
use dataloader::convert::{self, ConvertOptions, CountsChoice};
use dataloader::select::{GeneSelection, KeepFilter};
use dataloader::synth::{self, SynthOptions};
use dataloader::DataError;

#[derive(Parser)]
#[command(name = "neurofm-data", version, about = "Single-cell data for neurofm: inspect, convert to Zarr, synthesize")]
#[command(after_help = "\
Examples:
  neurofm data inspect WHB-10Xv3-Neurons-raw.h5ad
  neurofm data convert WHB-10Xv3-Neurons-raw.h5ad whb.zarr --cell-metadata cell_metadata.csv \\
      --metadata-key cell_label --keep cluster_alias=2523,210 --genes hvg:2000
  neurofm data convert pbmc.h5ad pbmc.zarr --counts layers/counts --var-names gene_symbol
  neurofm data synth demo.h5ad --cells 2000 --genes 200 --types 4")]
struct Cli {
    #[command(flatten)]
    output: OutputArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Summarize an .h5ad or .loom file: shape, where raw counts are, obs/var columns.
    #[command(after_help = "Example:\n  neurofm data inspect WHB-10Xv3-Neurons-raw.h5ad --json > inspect.json")]
    Inspect {
        file: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Convert an .h5ad or .loom file into an AnnData-compatible Zarr v3 store.
    #[command(after_help = "\
Examples:
  neurofm data convert whb_cortex_L5exc_MGEinh.h5ad whb.zarr
  neurofm data convert WHB-10Xv3-Neurons-raw.h5ad whb.zarr --cell-metadata cell_metadata.csv \\
      --metadata-key cell_label --keep cluster_alias=2523,210 --genes hvg:2000")]
    Convert(ConvertArgs),
    /// Write a synthetic h5ad (or loom) with known cell types, for demos and tests.
    #[command(after_help = "Example:\n  neurofm data synth demo.h5ad --cells 2000 --genes 200 --types 4 --seed 7")]
    Synth(SynthOptions),
}

#[derive(clap::Args)]
struct ConvertArgs {
    input: PathBuf,
    output: PathBuf,
    /// Count matrix: auto (first integer-valued of X, layers/counts, layers/*, raw/X), X, raw or layers/NAME.
    #[arg(long, default_value = "auto")]
    counts: CountsChoice,
    /// Keep cells whose obs column has one of the values: COL=V1,V2 (repeatable; all must hold).
    #[arg(long, value_name = "COL=V1,V2")]
    keep: Vec<KeepFilter>,
    /// CSV of per-cell metadata to join on obs names (e.g. the Allen atlas cell_metadata.csv).
    #[arg(long, requires = "metadata_key")]
    cell_metadata: Option<PathBuf>,
    /// Column of --cell-metadata holding the obs names.
    #[arg(long, requires = "cell_metadata")]
    metadata_key: Option<String>,
    /// Genes to keep: all, detected:N, hvg:N (Seurat dispersion) or list:FILE.
    #[arg(long, default_value = "all")]
    genes: GeneSelection,
    /// Seed of the cell-order shuffle (recorded in the store).
    #[arg(long, visible_alias = "seed", default_value_t = 0)]
    shuffle_seed: u64,
    /// Keep the source's cell order.
    #[arg(long)]
    no_shuffle: bool,
    /// Store non-integer values (normalized data) instead of refusing them.
    #[arg(long)]
    allow_non_integer: bool,
    /// Replace an existing output store.
    #[arg(long)]
    force: bool,
    /// zstd level of the store's chunks.
    #[arg(long, default_value_t = 3)]
    zstd_level: i32,
    /// Codec of the expression matrix, the training reader's hot path: blosc-lz4 decodes
    /// fastest, blosc-zstd gives the smallest store.
    #[arg(long, value_enum, default_value = "blosc-lz4")]
    codec: dataloader::store::write::MatrixCodec,
    /// Make this `var` column the store's gene names (e.g. `gene_symbol` where the names are
    /// Ensembl ids), as scanpy users do with `adata.var_names = adata.var[COL]`.
    #[arg(long, value_name = "COL")]
    var_names: Option<String>,
    /// Stored values per decoded chunk (power of two ≥ 1024; default 1048576).
    #[arg(long, default_value_t = dataloader::store::write::INNER_CHUNK)]
    chunk_entries: u64,
    /// Print the summary as JSON.
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(LogSetup::stderr(cli.output.quiet));
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            e.downcast_ref::<DataError>().map_or(Exit::Failure, DataError::exit).into()
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Inspect { file, json } => {
            let report = dataloader::inspect::inspect(&file)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{report}");
            }
        }
        Command::Convert(a) => {
            let opts = ConvertOptions {
                counts: a.counts,
                keep: a.keep,
                cell_metadata: a.cell_metadata.zip(a.metadata_key),
                genes: a.genes,
                shuffle_seed: (!a.no_shuffle).then_some(a.shuffle_seed),
                allow_non_integer: a.allow_non_integer,
                force: a.force,
                zstd_level: a.zstd_level,
                matrix_codec: a.codec,
                chunk_entries: a.chunk_entries,
                var_names: a.var_names,
                progress: cli.output.progress(),
                ..ConvertOptions::default()
            };
            let s = convert::convert(&a.input, &a.output, &opts)?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!(
                    "{}: {} cells × {} genes, {} non-zeros from {} in {:.2} s ({:.1} MB/s of input), store {:.1} MB",
                    s.output.display(),
                    s.n_cells,
                    s.n_genes,
                    s.nnz,
                    s.counts_source,
                    s.seconds,
                    s.input_bytes as f64 / 1e6 / s.seconds.max(1e-9),
                    s.output_bytes as f64 / 1e6
                );
            }
        }
        Command::Synth(opts) => {
            let s = synth::write(&opts)?;
            println!("{}: {} cells × {} genes, {} types, {} non-zeros", opts.output.display(), s.n_cells, s.n_genes, s.n_types, s.nnz);
        }
    }
    Ok(())
}
