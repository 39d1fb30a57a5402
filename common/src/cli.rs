//! Flags every binary spells the same way, flattened into each one's clap parser.

use std::io::IsTerminal;

/// `-q/--quiet` and `--no-progress`.
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub struct OutputArgs {
    /// Less output: warnings and errors only, no progress bars.
    #[arg(long, short, global = true)]
    pub quiet: bool,
    /// No progress bars (they are drawn only on a terminal anyway).
    #[arg(long, global = true)]
    pub no_progress: bool,
}

impl OutputArgs {
    /// Whether to draw progress bars: asked for, and stderr is a terminal.
    pub fn progress(&self) -> bool {
        !self.quiet && !self.no_progress && std::io::stderr().is_terminal()
    }
}
