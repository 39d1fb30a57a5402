//! `neurofm-annotate`: labels, confidences, class probabilities and embeddings of new cells
//! from a fine-tuned neurofm classifier, written into an .h5ad beside the input's obs.

use clap::Parser;
use finetune::annotate::{annotate, AnnotateConfig};

/// Annotate cells with a fine-tuned neurofm classifier.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    cfg: AnnotateConfig,
}

fn main() {
    if std::env::var_os("THP_MEM_ALLOC_ENABLE").is_none() {
        std::env::set_var("THP_MEM_ALLOC_ENABLE", "1");
    }
    finetune::logging::init(0, false);
    let cli = Cli::parse();
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
