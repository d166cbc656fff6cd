//! The demo over several seeds (`fusellm demo --seeds 0,1,2`): every row's mean and
//! standard deviation over the seeds, and for each method its paired difference to CLM per
//! seed with the mean, a 95% interval (Student's t over the seeds) and how many seeds it
//! beats CLM in, and the share of the gap between CLM and the best source it closes.

use std::collections::BTreeMap;
use std::path::Path;

use fusellm_core::error::{Error, Result};
use fusellm_core::files::write_atomically;
use fusellm_core::stats::{ci95, mean_sd};
use serde::{Deserialize, Serialize};

use crate::report::{write_bars, Results};

/// results.json of a run over seeds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeedResults {
    pub seeds: Vec<u64>,
    pub rows: Vec<SeedRow>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SeedRow {
    pub model: String,
    /// The mean over the seeds of the average bits per byte.
    pub avg_bpb: f64,
    /// The average bits per byte of each seed, in the order the seeds were given.
    pub avg_bpb_seeds: Vec<f64>,
    /// Their sample standard deviation.
    pub avg_bpb_sd: f64,
    /// Per domain, the mean and the standard deviation over the seeds.
    pub bpb: BTreeMap<String, f64>,
    pub bpb_sd: BTreeMap<String, f64>,
    /// For the methods (not CLM itself, the sources, the base or the experts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vs_clm: Option<VsClm>,
}

/// A method against CLM, seed by seed (negative: fewer bits per byte than CLM).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VsClm {
    pub per_seed: Vec<f64>,
    pub mean: f64,
    pub ci95: [f64; 2],
    pub seeds_better: usize,
    /// The share of the mean gap from CLM down to the best source that the method closes.
    pub gap_closed: f64,
}

/// Whether a row is a method compared with CLM.
fn is_method(model: &str) -> bool {
    !(model == "clm" || model == "target-base" || model.starts_with("source-") || model.starts_with("expert-"))
}

impl SeedResults {
    /// Gathers the results of `seeds` (the same rows in each).
    pub fn new(seeds: &[u64], runs: &[Results]) -> Result<Self> {
        if runs.len() < 2 || runs.len() != seeds.len() {
            return Err(Error::msg("a spread over seeds needs at least two seeds"));
        }
        let avg = |model: &str| -> Result<Vec<f64>> {
            runs.iter()
                .zip(seeds)
                .map(|(r, s)| {
                    r.get(model)
                        .map(|row| row.avg_bpb)
                        .ok_or_else(|| Error::msg(format!("seed {s} has no row {model}")))
                })
                .collect()
        };
        let clm = avg("clm")?;
        let sources: Vec<f64> = runs[0]
            .rows
            .iter()
            .filter(|r| r.model.starts_with("source-"))
            .map(|r| avg(&r.model).map(|v| mean_sd(&v).0))
            .collect::<Result<_>>()?;
        let gap = mean_sd(&clm).0 - sources.iter().copied().fold(f64::INFINITY, f64::min);
        let mut rows = Vec::new();
        for row in &runs[0].rows {
            let seeds_avg = avg(&row.model)?;
            let (mean, sd) = mean_sd(&seeds_avg);
            let (mut bpb, mut bpb_sd) = (BTreeMap::new(), BTreeMap::new());
            for domain in row.bpb.keys() {
                let values: Vec<f64> =
                    runs.iter().filter_map(|r| r.get(&row.model)?.bpb.get(domain).copied()).collect();
                let (m, s) = mean_sd(&values);
                bpb.insert(domain.clone(), m);
                bpb_sd.insert(domain.clone(), s);
            }
            let vs_clm = is_method(&row.model).then(|| {
                let per_seed: Vec<f64> = seeds_avg.iter().zip(&clm).map(|(m, c)| m - c).collect();
                let d = mean_sd(&per_seed).0;
                let seeds_better = per_seed.iter().filter(|d| **d < 0.0).count();
                VsClm { mean: d, ci95: ci95(&per_seed), seeds_better, gap_closed: -d / gap, per_seed }
            });
            rows.push(SeedRow {
                model: row.model.clone(),
                avg_bpb: mean,
                avg_bpb_seeds: seeds_avg,
                avg_bpb_sd: sd,
                bpb,
                bpb_sd,
                vs_clm,
            });
        }
        Ok(Self { seeds: seeds.to_vec(), rows })
    }

    /// The table in Markdown: each row's mean, spread and seeds; each method's paired
    /// difference to CLM.
    pub fn markdown(&self) -> String {
        let seeds: Vec<String> = self.seeds.iter().map(|s| format!("seed {s}")).collect();
        let header: Vec<&str> = ["model", "mean", "sd"]
            .into_iter()
            .chain(seeds.iter().map(String::as_str))
            .chain(["vs CLM", "95% interval", "seeds better", "gap closed"])
            .collect();
        let rows = self.rows.iter().map(|r| {
            let mut cells = vec![r.model.clone(), format!("{:.4}", r.avg_bpb), format!("{:.4}", r.avg_bpb_sd)];
            cells.extend(r.avg_bpb_seeds.iter().map(|v| format!("{v:.4}")));
            match &r.vs_clm {
                Some(v) => cells.extend([
                    format!("{:+.4}", v.mean),
                    format!("[{:+.4}, {:+.4}]", v.ci95[0], v.ci95[1]),
                    format!("{}/{}", v.seeds_better, self.seeds.len()),
                    format!("{:.1}%", 100.0 * v.gap_closed),
                ]),
                None => cells.extend(std::iter::repeat_n(String::new(), 4)),
            }
            cells
        });
        fusellm_core::table::markdown(&header, rows)
    }

    /// results.json, results.md and results.png (the means, with error bars of one standard
    /// deviation).
    pub fn write(&self, out: &Path) -> Result<()> {
        write_atomically(&out.join("results.json"), &serde_json::to_vec_pretty(self).expect("JSON"))?;
        write_atomically(&out.join("results.md"), self.markdown().as_bytes())?;
        let domains: Vec<&str> =
            self.rows.first().map(|r| r.bpb.keys().map(String::as_str).collect()).unwrap_or_default();
        let bars: Vec<_> =
            self.rows.iter().map(|r| (r.model.as_str(), &r.bpb, r.avg_bpb, Some((&r.bpb_sd, r.avg_bpb_sd)))).collect();
        write_bars(out, &domains, &bars)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::Row;

    fn results(clm: f64, fused: f64, source: f64) -> Results {
        let row = |name: &str, v: f64| Row::new(name, [("a".to_string(), v), ("b".to_string(), v + 0.2)].into());
        Results { rows: vec![row("source-x", source), row("clm", clm), row("fusellm-mince", fused)] }
    }

    /// Three seeds by hand: differences -0.02, -0.01, +0.03 (mean 0, sd 0.0265); t(2) =
    /// 4.303; two seeds better; the gap CLM to source is 0.5 on average.
    #[test]
    fn the_spread_and_the_paired_interval_are_the_hand_computed_ones() {
        let runs = [results(1.00, 0.98, 0.5), results(1.10, 1.09, 0.6), results(0.90, 0.93, 0.4)];
        let seeds = SeedResults::new(&[0, 1, 2], &runs).unwrap();
        let clm = &seeds.rows[1];
        assert!((clm.avg_bpb - 1.1).abs() < 1e-12 && (clm.avg_bpb_sd - 0.1).abs() < 1e-12, "{clm:?}");
        assert!(clm.avg_bpb_seeds.iter().zip([1.1, 1.2, 1.0]).all(|(a, b)| (a - b).abs() < 1e-12), "{clm:?}");
        assert!(clm.vs_clm.is_none() && seeds.rows[0].vs_clm.is_none());
        let v = seeds.rows[2].vs_clm.as_ref().unwrap();
        let sd = ((0.02f64.powi(2) + 0.01f64.powi(2) + 0.03f64.powi(2)) / 2.0).sqrt();
        let half = 4.303 * sd / 3f64.sqrt();
        assert!(v.mean.abs() < 1e-12 && (v.ci95[1] - half).abs() < 1e-9 && (v.ci95[0] + half).abs() < 1e-9, "{v:?}");
        assert_eq!(v.seeds_better, 2);
        assert!(v.gap_closed.abs() < 1e-9);
        assert!(SeedResults::new(&[0], &runs[..1]).is_err());
        assert!(seeds.markdown().contains("| fusellm-mince |"));
    }
}
