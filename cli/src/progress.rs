//! The training progress display: kohya's `steps: 42%|████ | 21/50 [00:10<00:14, 2.1it/s,
//! avr_loss=0.123]` bar on a terminal, plain lines otherwise, or JSON lines with `--json`.

use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use loractl_trainer::run::RunEvent;

pub struct Progress {
    json: bool,
    bar: Option<ProgressBar>,
    /// Plain-text mode (not a terminal): print a line every this many steps.
    every: usize,
    started: Option<(Instant, usize)>,
}

impl Progress {
    pub fn new(json: bool) -> Self {
        Self {
            json,
            bar: None,
            every: 1,
            started: None,
        }
    }

    fn is_tty() -> bool {
        std::io::stderr().is_terminal()
    }

    pub fn event(&mut self, e: &RunEvent) {
        if self.json {
            println!("{}", event_json(e));
            return;
        }
        match e {
            RunEvent::Status { message } => self.line(message),
            RunEvent::Warning { message } => self.line(&format!("warning: {message}")),
            RunEvent::Started {
                total_steps,
                num_epochs,
                resumed_at,
            } => {
                self.line(&format!(
                    "training {total_steps} steps over {num_epochs} epochs{}",
                    if *resumed_at > 0 {
                        format!(", resuming at step {resumed_at}")
                    } else {
                        String::new()
                    }
                ));
                self.started = Some((Instant::now(), *resumed_at));
                self.every = (*total_steps / 20).max(1);
                if Self::is_tty() {
                    let bar = ProgressBar::with_draw_target(
                        Some(*total_steps as u64),
                        ProgressDrawTarget::stderr(),
                    );
                    let style = ProgressStyle::with_template(
                        "steps: {percent:>3}%|{bar:30}| {pos}/{len} [{elapsed_precise}<{eta_precise}, {per_sec}, {msg}]",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar());
                    bar.set_style(style.progress_chars("█▉▊▋▌▍▎▏ "));
                    bar.set_position(*resumed_at as u64);
                    bar.reset_eta();
                    self.bar = Some(bar);
                }
            }
            RunEvent::Step {
                step,
                total,
                epoch,
                loss,
                loss_average,
                lrs,
                d_lrs,
                ..
            } => {
                let lr = d_lrs
                    .as_ref()
                    .unwrap_or(lrs)
                    .first()
                    .map(|(_, l)| format!(" lr={l:.2e}"))
                    .unwrap_or_default();
                if let Some(bar) = &self.bar {
                    bar.set_message(format!("avr_loss={loss_average:.4}"));
                    bar.set_position(*step as u64);
                } else if step % self.every == 0 || step == total {
                    let rate = self
                        .started
                        .map(|(t, s0)| {
                            let secs = t.elapsed().as_secs_f64();
                            if secs > 0.0 {
                                (step - s0) as f64 / secs
                            } else {
                                0.0
                            }
                        })
                        .unwrap_or(0.0);
                    let eta = if rate > 0.0 {
                        format!("{:.0}s", (total - step) as f64 / rate)
                    } else {
                        "?".into()
                    };
                    eprintln!(
                        "step {step}/{total} epoch {epoch} loss={loss:.4} avr_loss={loss_average:.4}{lr} {rate:.2}it/s eta {eta}"
                    );
                }
            }
            RunEvent::Epoch {
                epoch,
                num_epochs,
                loss_average,
            } => self.line(&format!(
                "epoch {epoch}/{num_epochs} done, epoch average loss {loss_average:.4}"
            )),
            RunEvent::Saved { path, .. } => self.line(&format!("saved {}", path.display())),
            RunEvent::StateSaved { path, .. } => {
                self.line(&format!("saved state {}", path.display()))
            }
            RunEvent::Sampled { paths, .. } => {
                for p in paths {
                    self.line(&format!("sample {}", p.display()));
                }
            }
            RunEvent::TrainingLog { path } => {
                self.line(&format!("TensorBoard log {}", path.display()))
            }
            RunEvent::Finished { .. } | RunEvent::Stopped { .. } | RunEvent::Phase { .. } => {}
        }
    }

    fn line(&self, text: &str) {
        match &self.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }

    pub fn finish(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.abandon();
        }
    }
}

/// The event as one JSON line.
pub fn event_json(e: &RunEvent) -> String {
    serde_json::to_string(e)
        .unwrap_or_else(|err| format!("{{\"kind\":\"error\",\"message\":\"{err}\"}}"))
}
