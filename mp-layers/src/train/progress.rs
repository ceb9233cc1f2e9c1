//! Keras-style progress output: a live bar on a terminal, one line per epoch otherwise.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::train::{EpochLogs, Verbose};

/// Prints progress the way Keras does.
pub(crate) struct Reporter {
    verbose: Verbose,
    bar: Option<ProgressBar>,
    steps: usize,
}

impl Reporter {
    pub(crate) fn new(verbose: Verbose, epoch: usize, epochs: usize, steps: usize) -> Self {
        if verbose == Verbose::Silent {
            return Reporter {
                verbose,
                bar: None,
                steps,
            };
        }
        println!("Epoch {}/{}", epoch + 1, epochs);
        let bar = (verbose == Verbose::Auto && std::io::stdout().is_terminal()).then(|| {
            let bar =
                ProgressBar::with_draw_target(Some(steps as u64), ProgressDrawTarget::stdout());
            bar.set_style(
                ProgressStyle::with_template("{pos}/{len} [{bar:30}] - {msg}")
                    .expect("a valid template")
                    .progress_chars("=>."),
            );
            bar
        });
        Reporter {
            verbose,
            bar,
            steps,
        }
    }

    pub(crate) fn step(
        &mut self,
        step: usize,
        loss: f32,
        metrics: &[(&'static str, f32)],
        started: Instant,
    ) {
        if let Some(bar) = &self.bar {
            let eta = started.elapsed().as_secs_f64() / step as f64 * (self.steps - step) as f64;
            bar.set_position(step as u64);
            bar.set_message(format!(
                "ETA: {eta:.0}s - {}",
                format_metrics(loss, metrics, "")
            ));
        }
    }

    pub(crate) fn finish(&mut self, logs: &EpochLogs) {
        if self.verbose == Verbose::Silent {
            return;
        }
        let ms_per_step = logs.seconds * 1000.0 / logs.steps.max(1) as f64;
        let mut metrics = format_metrics(logs.loss, &logs.metrics, "");
        if let Some(l) = logs.val_loss {
            metrics.push_str(" - ");
            metrics.push_str(&format_metrics(l, &logs.val_metrics, "val_"));
        }
        let line = match self.verbose {
            Verbose::Lines => format!(
                "{}/{} - {:.0}s - {metrics}",
                logs.steps, logs.steps, logs.seconds
            ),
            _ => format!(
                "{}/{} [{}] - {:.0}s {:.0}ms/step - {metrics}",
                logs.steps,
                logs.steps,
                "=".repeat(30),
                logs.seconds,
                ms_per_step
            ),
        };
        match self.bar.take() {
            Some(bar) => {
                bar.finish_and_clear();
                println!("{line}");
            }
            None => println!("{line}"),
        }
    }
}

/// `loss: 0.1234 - accuracy: 0.9876`, each key after `prefix` (`val_`), as Keras prints them.
pub(crate) fn format_metrics(loss: f32, metrics: &[(&'static str, f32)], prefix: &str) -> String {
    let mut out = format!("{prefix}loss: {loss:.4}");
    for (name, value) in metrics {
        out.push_str(&format!(" - {prefix}{name}: {value:.4}"));
    }
    out
}
