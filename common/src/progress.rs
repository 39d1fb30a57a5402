//! Progress bars with ETA for every long step (convert, train, embed, layouts, fine-tune), one
//! style everywhere. A binary decides once, from `-q`/`--no-progress`, whether bars are drawn;
//! library code asks for a bar and gets a hidden one when they are not (or stderr is not a
//! terminal), so log files and CI output never fill with bar redraws.

use std::io::IsTerminal;
use std::sync::atomic::{AtomicBool, Ordering};

use indicatif::{ProgressBar, ProgressStyle};

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Sets whether bars are drawn in this process (binaries call it once, from their flags).
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether bars are drawn: enabled, and stderr is a terminal.
fn drawn() -> bool {
    ENABLED.load(Ordering::Relaxed) && std::io::stderr().is_terminal()
}

/// A bar over `len` items counted in `unit` ("cells", "step", "epochs"), at position 0.
pub fn bar(len: u64, unit: &str) -> ProgressBar {
    if !drawn() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(len);
    let template = format!("{{elapsed_precise}} [{{bar:30}}] {{pos}}/{{len}} {unit} {{per_sec}} eta {{eta}} {{msg}}");
    if let Ok(style) = ProgressStyle::with_template(&template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar
}

/// A spinner with elapsed time for a step whose length is unknown (a library call without a
/// progress hook, such as t-SNE).
pub fn spinner(msg: &str) -> ProgressBar {
    if !drawn() {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new_spinner().with_message(msg.to_string());
    if let Ok(style) = ProgressStyle::with_template("{spinner} {elapsed_precise} {msg}") {
        bar.set_style(style);
    }
    bar.enable_steady_tick(std::time::Duration::from_millis(200));
    bar
}

/// Logs `msg` at info level above `bar`, so a drawn bar is not torn by the line.
pub fn info_above(bar: &ProgressBar, msg: &str) {
    if bar.is_hidden() {
        tracing::info!("{msg}");
    } else {
        bar.suspend(|| tracing::info!("{msg}"));
    }
}
