//! `neurofm-eval`: embeddings, probes with baselines, clustering, layouts and a report for a
//! trained run; `neurofm-eval atlas-plot` draws an atlas's own coordinates.

use clap::{Parser, Subcommand};
use common::cli::OutputArgs;
use common::exit::ExitStatus;
use common::logging::{self, LogSetup};
use evaluation::atlas::{atlas_plot, AtlasConfig};
use evaluation::evaluate::{evaluate, EvalConfig};
use evaluation::layout::{layout_file, LayoutConfig};
use evaluation::EvalError;

#[derive(Parser)]
#[command(version, about = "Evaluate a neurofm run: cell embeddings, probes vs baselines, clustering, PCA/t-SNE/UMAP, report")]
#[command(subcommand_negates_reqs = true)]
#[command(after_help = "\
Examples:
  neurofm eval --run-dir runs/whb --data whb.zarr --label-col subtype
  neurofm eval --run-dir runs/whb --data other.zarr --label-col cell_type --gene-key gene_symbol --out runs/whb/eval-other
  neurofm eval atlas-plot --cell-metadata cell_metadata.csv --cluster cluster.csv --annotation cluster_annotation_term.csv --highlight 2523,210 --out atlas.png")]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    eval: Option<EvalConfig>,
    #[command(flatten)]
    output: OutputArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Scatter of an atlas's own 2-D coordinates, top clusters colored (Allen metadata CSVs).
    #[command(after_help = "\
Example:
  neurofm eval atlas-plot --cell-metadata cell_metadata.csv --cluster cluster.csv \\
      --annotation cluster_annotation_term.csv --highlight 2523,210 --out atlas.png")]
    AtlasPlot(AtlasConfig),
    /// 2-D layout (UMAP, t-SNE or PCA) of any matrix in a .npy file.
    #[command(after_help = "Example:\n  neurofm eval layout --input runs/whb/eval/embeddings.npy --method umap --out umap.npy")]
    Layout(LayoutConfig),
}

fn main() {
    let cli = Cli::parse();
    logging::init(LogSetup::stderr(cli.output.quiet));
    common::progress::set_enabled(cli.output.progress());
    let result: Result<(), EvalError> = match (cli.command, cli.eval) {
        (Some(Command::Layout(cfg)), _) => layout_file(&cfg).map(|secs| println!("{}: {:?} layout in {secs:.2} s", cfg.out.display(), cfg.method)),
        (Some(Command::AtlasPlot(cfg)), _) => atlas_plot(&cfg).map(|n| println!("{}: {n} cells", cfg.out.display())),
        (None, Some(cfg)) => evaluate(&cfg).map(|m| {
            let out = cfg.out.clone().unwrap_or_else(|| cfg.run.join("eval"));
            println!("{:<34} {:>8} {:>8} {:>8} {:>8}", "representation", "accuracy", "macro F1", "ROC-AUC", "ARI");
            for r in &m.representations {
                println!("{:<34} {:>8.3} {:>8.3} {:>8} {:>8.3}", r.name, r.probe.accuracy, r.probe.macro_f1, evaluation::report::num(r.probe.roc_auc), r.cluster_ari);
            }
            println!("report: {}", out.join("report.html").display());
        }),
        (None, None) => Err(EvalError::Usage("give --run, --data and --label-col (or a subcommand); see --help".into())),
    };
    if let Err(e) = result {
        eprintln!("error: {e}");
        std::process::exit(e.exit_code());
    }
}
