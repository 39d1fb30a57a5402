//! `neurofm-annotate`: labels, confidences, class probabilities and embeddings of new cells
//! from a fine-tuned neurofm classifier, written into an .h5ad beside the input's obs.

use clap::Parser;
use common::cli::OutputArgs;
use common::exit::ExitStatus;
use common::logging::{self, LogSetup};
use finetune::annotate::{annotate, AnnotateConfig};

/// Annotate cells with a fine-tuned neurofm classifier.
#[derive(Parser)]
#[command(version, after_help = "\
Examples:
  neurofm annotate --model runs/ft-whb --data new_cells.h5ad --out annotated.h5ad
  neurofm annotate --model runs/ft-whb --data new_cells.zarr --out annotated.h5ad --min-confidence 0.8")]
struct Cli {
    #[command(flatten)]
    cfg: AnnotateConfig,
    #[command(flatten)]
    output: OutputArgs,
}

fn main() {
    if std::env::var_os("THP_MEM_ALLOC_ENABLE").is_none() {
        std::env::set_var("THP_MEM_ALLOC_ENABLE", "1");
    }
    let cli = Cli::parse();
    logging::init(LogSetup::stderr(cli.output.quiet));
    common::progress::set_enabled(cli.output.progress());
    match annotate(&cli.cfg) {
        Ok(s) => {
            println!("{}: {} cells; {} of the model's {} genes found in the data", cli.cfg.out.display(), s.cells, s.model_genes_found, s.model_genes);
            for (label, n) in &s.label_counts {
                println!("  {label:<30} {n:>8}");
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(e.exit_code());
        }
    }
}
