//! Progress display: one bar per layer on stderr, hidden when stderr is not a terminal or
//! with `--quiet`; human messages go above the bars.

use std::io::IsTerminal;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// Shared progress display.
#[derive(Clone)]
pub struct Progress {
    multi: MultiProgress,
    bars: bool,
    quiet: bool,
}

impl Progress {
    /// Bars only when stderr is a terminal and not `quiet`; messages unless `quiet`.
    pub fn new(quiet: bool) -> Progress {
        let bars = !quiet && std::io::stderr().is_terminal();
        let target = if bars {
            ProgressDrawTarget::stderr()
        } else {
            ProgressDrawTarget::hidden()
        };
        Progress {
            multi: MultiProgress::with_draw_target(target),
            bars,
            quiet,
        }
    }

    /// A display that shows nothing (library use, tests).
    pub fn hidden() -> Progress {
        Progress {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::hidden()),
            bars: false,
            quiet: true,
        }
    }

    /// Prints a human message on stderr (above the bars when they are shown).
    pub fn message(&self, msg: impl AsRef<str>) {
        if self.quiet {
            return;
        }
        if self.bars {
            let _ = self.multi.println(msg.as_ref());
        } else {
            eprintln!("{}", msg.as_ref());
        }
    }

    /// A bar for one layer of `total` bytes.
    pub fn layer(&self, label: &str, total: u64) -> ProgressBar {
        if !self.bars {
            return ProgressBar::hidden();
        }
        let bar = self.multi.add(ProgressBar::new(total));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix:>20} {bar:30.cyan/blue} {bytes:>10}/{total_bytes:<10} {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        bar.set_prefix(label.to_string());
        bar.enable_steady_tick(Duration::from_millis(200));
        bar
    }
}
