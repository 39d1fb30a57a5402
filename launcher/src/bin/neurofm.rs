//! `neurofm`: one command for the whole pipeline. `neurofm TOOL ARGS...` runs `neurofm-TOOL`
//! from this executable's directory (else from PATH) in place of this process, so exit codes,
//! signals and ranks under srun/mpirun/neurofm-launch behave exactly as with the tool itself;
//! the `neurofm-*` binaries keep working on their own.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

use common::exit::Exit;

/// The tools, what each is for, and one example each.
const TOOLS: &[(&str, &str, &str)] = &[
    ("data", "inspect, convert (.h5ad/.loom → Zarr store) and synthesize data", "neurofm data convert atlas.h5ad atlas.zarr --genes hvg:2000"),
    ("train", "pretrain the encoder (one process, or one rank of a group)", "neurofm train --config configs/whb-fast.toml --data whb.zarr --run-dir runs/whb"),
    ("launch", "start one rank per GPU (or CPU ranks) on this node and supervise them", "neurofm launch --nproc-per-node 4 -- neurofm train --config configs/atlas.toml"),
    ("eval", "embeddings, probes vs baselines, clustering, layouts and a report", "neurofm eval --run-dir runs/whb --data whb.zarr --label-col subtype"),
    ("finetune", "a classifier head on the pretrained encoder, beside LR and a random forest", "neurofm finetune --pretrained runs/whb --data whb.zarr --label-col subtype"),
    ("annotate", "labels, confidences and embeddings of new cells from a fine-tune", "neurofm annotate --model runs/ft-whb --data new.h5ad --out annotated.h5ad"),
];

fn usage() -> String {
    let mut s = format!("neurofm {}: single-cell foundation models for neurons\n\nUsage: neurofm <TOOL> [ARGS]...   (neurofm <TOOL> --help for its flags)\n\nTools:\n", env!("CARGO_PKG_VERSION"));
    for (name, what, _) in TOOLS {
        s.push_str(&format!("  {name:<9} {what}\n"));
    }
    s.push_str("\nShared flags: --data, --run-dir, --device, --seed, -q/--quiet, --no-progress\n\nExamples:\n");
    for (_, _, example) in TOOLS {
        s.push_str(&format!("  {example}\n"));
    }
    s
}

/// `neurofm-TOOL` beside this executable if it is there, else the bare name (found on PATH).
fn tool_path(tool: &str) -> PathBuf {
    let name = format!("neurofm-{tool}");
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join(&name)))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(name))
}

fn main() -> ExitCode {
    let mut args = std::env::args_os().skip(1);
    let Some(first) = args.next() else {
        eprint!("{}", usage());
        return Exit::BadInput.into();
    };
    let rest: Vec<OsString> = args.collect();
    let (tool, rest) = match first.to_str() {
        Some("-h" | "--help") => {
            print!("{}", usage());
            return ExitCode::SUCCESS;
        }
        Some("-V" | "--version") => {
            println!("neurofm {}", env!("CARGO_PKG_VERSION"));
            return ExitCode::SUCCESS;
        }
        // `neurofm help TOOL` is `neurofm TOOL --help`.
        Some("help") => match rest.first().and_then(|t| t.to_str()) {
            Some(t) => (t.to_string(), vec![OsString::from("--help")]),
            None => {
                print!("{}", usage());
                return ExitCode::SUCCESS;
            }
        },
        Some(t) => (t.to_string(), rest),
        None => (String::new(), rest),
    };
    if !TOOLS.iter().any(|(name, _, _)| *name == tool) {
        let names: Vec<&str> = TOOLS.iter().map(|t| t.0).collect();
        eprintln!("error: `{}` is not a neurofm tool; the tools are: {}", first.to_string_lossy(), names.join(", "));
        return Exit::BadInput.into();
    }
    let path = tool_path(&tool);
    // `exec` returns only when the tool could not be started.
    let e = Command::new(&path).args(&rest).exec();
    eprintln!("error: cannot run {}: {e}; build the tools with `cargo build --release --workspace --bins` (or `make build`)", path.display());
    Exit::Failure.into()
}
