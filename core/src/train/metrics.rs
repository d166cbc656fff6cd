//! Per-step metrics: one JSON line per step in `metrics.jsonl` (cut back to the resumed
//! step when a run resumes, so the file always describes one history) and `loss.png`.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{Context, Result};
use crate::files::write_atomically;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub clm: f64,
    pub fusion: f64,
    pub lambda: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Tokens seen since the start of training.
    pub tokens: u64,
    /// Of this session (a resumed run counts from its resume).
    pub tokens_per_s: f64,
    pub elapsed_s: f64,
}

pub struct Log {
    file: PathBuf,
    lines: Vec<StepMetrics>,
}

impl Log {
    /// The log of a run folder, keeping the steps up to `step`.
    pub fn open(run_dir: &Path, step: u64) -> Result<Self> {
        std::fs::create_dir_all(run_dir).context(|| format!("creating {}", run_dir.display()))?;
        let file = run_dir.join("metrics.jsonl");
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let lines: Vec<StepMetrics> = text
            .lines()
            .filter_map(|l| serde_json::from_str::<StepMetrics>(l).ok())
            .filter(|m| m.step <= step)
            .collect();
        let kept: String = lines.iter().map(|m| serde_json::to_string(m).expect("JSON") + "\n").collect();
        write_atomically(&file, kept.as_bytes())?;
        Ok(Self { file, lines })
    }

    pub fn push(&mut self, metrics: &StepMetrics) -> Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.file)
            .context(|| format!("opening {}", self.file.display()))?;
        writeln!(f, "{}", serde_json::to_string(metrics).expect("JSON")).context(|| self.file.display().to_string())?;
        self.lines.push(metrics.clone());
        Ok(())
    }

    /// The loss curves as a PNG.
    pub fn plot(&self, file: &Path) -> Result<()> {
        let curve = |f: fn(&StepMetrics) -> f64| self.lines.iter().map(|m| (m.step as f64, f(m))).collect::<Vec<_>>();
        let png = crate::plot::line_chart(
            "training loss",
            "step",
            &[("total", curve(|m| m.loss)), ("clm", curve(|m| m.clm)), ("fusion", curve(|m| m.fusion))],
        )?;
        Ok(write_atomically(file, &png)?)
    }
}
