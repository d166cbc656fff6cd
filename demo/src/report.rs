//! The demo's results: results.json (the interface scripts rely on), results.md, and two
//! plots: bits per byte per model and domain, and the continual-training loss curves.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use fusellm_core::error::Result;
use fusellm_core::files::write_atomically;
use fusellm_core::pipeline::RunRecord;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Row {
    pub model: String,
    pub avg_bpb: f64,
    pub bpb: BTreeMap<String, f64>,
    /// The training run's metrics.jsonl, where the row was trained.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics: Option<PathBuf>,
}

impl Row {
    pub fn new(model: &str, bpb: BTreeMap<String, f64>) -> Self {
        let avg_bpb = bpb.values().sum::<f64>() / bpb.len().max(1) as f64;
        Self { model: model.into(), avg_bpb, bpb, metrics: None }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Results {
    pub rows: Vec<Row>,
}

impl Results {
    /// The row of a pipeline run: the evaluation of the model it trained.
    pub fn push(&mut self, name: &str, record: &RunRecord) {
        self.push_model(name, record, "trained");
    }

    /// The row of a pipeline run's evaluated `model` (`trained`, `merged`, ...).
    pub fn push_model(&mut self, name: &str, record: &RunRecord, model: &str) {
        let bpb = record.eval.iter().filter(|e| e.model == model).map(|e| (e.set.clone(), e.bits_per_byte)).collect();
        let mut row = Row::new(name, bpb);
        row.metrics =
            record.stages.iter().find(|s| s.name == "train").map(|s| Path::new(&s.output).join("metrics.jsonl"));
        self.rows.push(row);
    }

    pub fn get(&self, name: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.model == name)
    }

    /// The index in `names` of the row with the lowest average bits per byte.
    pub fn best_of(&self, names: &[&str]) -> usize {
        let avg = |n: &str| self.get(n).map_or(f64::INFINITY, |r| r.avg_bpb);
        (0..names.len()).fold(0, |best, i| if avg(names[i]) < avg(names[best]) { i } else { best })
    }

    /// The evaluation domains, in the rows' order.
    fn domains(&self) -> Vec<&str> {
        self.rows.first().map(|r| r.bpb.keys().map(String::as_str).collect()).unwrap_or_default()
    }

    /// The table in Markdown.
    pub fn markdown(&self) -> String {
        let domains = self.domains();
        let header: Vec<&str> = std::iter::once("model").chain(domains.iter().copied()).chain(["average"]).collect();
        let rows = self.rows.iter().map(|r| {
            let cells = domains.iter().map(|d| r.bpb.get(*d).map_or("".into(), |v| format!("{v:.4}")));
            std::iter::once(r.model.clone()).chain(cells).chain([format!("{:.4}", r.avg_bpb)]).collect()
        });
        fusellm_core::table::markdown(&header, rows)
    }

    pub fn write(&self, out: &Path) -> Result<()> {
        write_atomically(&out.join("results.json"), &serde_json::to_vec_pretty(self).expect("JSON"))?;
        write_atomically(&out.join("results.md"), self.markdown().as_bytes())?;
        let bars: Vec<Bars> = self.rows.iter().map(|r| (r.model.as_str(), &r.bpb, r.avg_bpb, None)).collect();
        write_bars(out, &self.domains(), &bars)?;
        self.write_curves(out)
    }

    /// loss.png: the CLM part of the continual-training loss of the three continued rows.
    fn write_curves(&self, out: &Path) -> Result<()> {
        let curves: Vec<(&str, Vec<(f64, f64)>)> = ["clm", "fusellm-mince", "fusellm-avgce"]
            .iter()
            .filter_map(|name| Some((*name, clm_curve(self.get(name)?.metrics.as_ref()?))))
            .collect();
        let png = fusellm_core::plot::line_chart("continual training: CLM loss", "step", &curves)?;
        Ok(write_atomically(&out.join("loss.png"), &png)?)
    }
}

/// A model's bars: name, bits per byte by domain, the average, and their spread (by
/// domain, and the average's) where there is one.
pub(crate) type Bars<'a> = (&'a str, &'a BTreeMap<String, f64>, f64, Option<(&'a BTreeMap<String, f64>, f64)>);

/// results.png: bits per byte per model (the experts aside) and domain, and the average,
/// with error bars of the spread where it is given.
pub(crate) fn write_bars(out: &Path, domains: &[&str], rows: &[Bars]) -> Result<()> {
    let mut groups: Vec<&str> = domains.to_vec();
    groups.push("average");
    let shown: Vec<&Bars> = rows.iter().filter(|r| !r.0.starts_with("expert-")).collect();
    let values = |by: &BTreeMap<String, f64>, avg: f64| -> Vec<f64> {
        domains.iter().map(|d| by.get(*d).copied().unwrap_or(f64::NAN)).chain([avg]).collect()
    };
    let series: Vec<(&str, Vec<f64>)> = shown.iter().map(|(name, bpb, avg, _)| (*name, values(bpb, *avg))).collect();
    let spread: Vec<Vec<f64>> = shown.iter().filter_map(|r| r.3.map(|(by, avg)| values(by, avg))).collect();
    let png = fusellm_core::plot::bar_chart("bits per byte (lower is better)", &groups, &series, &spread)?;
    Ok(write_atomically(&out.join("results.png"), &png)?)
}

/// The CLM part of the loss per step, from a run's metrics.jsonl.
fn clm_curve(metrics: &Path) -> Vec<(f64, f64)> {
    let text = std::fs::read_to_string(metrics).unwrap_or_default();
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter_map(|m| Some((m["step"].as_f64()?, m["clm"].as_f64()?)))
        .collect()
}
