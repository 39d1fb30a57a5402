//! `neurofm TOOL ...` runs the tool itself: its help, its exit code, its output.

use std::process::Command;

fn neurofm(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_neurofm")).args(args).output().expect("run neurofm")
}

#[test]
fn a_tool_runs_in_place_of_neurofm_with_its_own_flags_and_exit_code() {
    let help = neurofm(&["launch", "--help"]);
    assert!(help.status.success());
    let text = String::from_utf8_lossy(&help.stdout);
    assert!(text.contains("--nproc-per-node") && text.contains("Examples:"), "{text}");
    assert_eq!(neurofm(&["help", "launch"]).stdout, help.stdout, "`neurofm help TOOL` is `neurofm TOOL --help`");
    // A usage error of the tool is the tool's exit code (clap's 2), not the dispatcher's.
    let bad = neurofm(&["launch", "--no-such-flag"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--no-such-flag"));
}

#[test]
fn an_unknown_tool_is_refused_with_the_list_of_tools() {
    let out = neurofm(&["trian"]);
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`trian` is not a neurofm tool") && err.contains("train") && err.contains("annotate"), "{err}");
    let usage = neurofm(&["--help"]);
    assert!(usage.status.success() && String::from_utf8_lossy(&usage.stdout).contains("neurofm finetune --pretrained"));
}

#[test]
fn every_tool_help_ends_with_examples() {
    let dir = std::path::Path::new(env!("CARGO_BIN_EXE_neurofm")).parent().expect("bin dir").to_path_buf();
    let mut checked = 0;
    for tool in ["data", "train", "launch", "eval", "finetune", "annotate"] {
        if !dir.join(format!("neurofm-{tool}")).is_file() {
            // Built by `cargo build --workspace --bins` (make test does); CI must have them all.
            assert!(std::env::var_os("CI").is_none(), "neurofm-{tool} is not built");
            continue;
        }
        let help = neurofm(&[tool, "--help"]);
        let text = String::from_utf8_lossy(&help.stdout);
        assert!(help.status.success() && text.contains("Example"), "neurofm {tool} --help has no examples:\n{text}");
        checked += 1;
    }
    assert!(checked >= 1, "at least neurofm-launch (this package) is built");
}
