//! `fusellm demo --transfer`: the controls of how much of the sources' knowledge FuseLLM
//! moves into the target, swept one at a time around the demo's setting: the fusion weight
//! lambda, the number of continual steps, the target's size relative to the sources', and
//! the top-k of the sources' stored distributions. Every point is CLM and FuseLLM-MinCE
//! trained from the same sources and base over several seeds; its figures are MinCE's paired
//! difference to the CLM of the same point and the share of the CLM-to-best-source gap it
//! closes.

use std::collections::BTreeMap;
use std::path::Path;

use fusellm_core::error::Result;
use fusellm_core::files::write_atomically;
use fusellm_core::plugins::Registry;
use serde::{Deserialize, Serialize};

use crate::models::Shape;
use crate::{Demo, Results, SeedResults, Sizes, FUSION_LAMBDA, TOP_K};

/// One setting of the controls.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Point {
    /// The weight of the CLM loss; the fusion loss gets `1 - lambda`.
    pub lambda: f64,
    /// The top-k of the sources' stored distributions.
    pub top_k: usize,
    pub continual_steps: u64,
    pub target: Shape,
}

impl Point {
    /// The demo's own setting at these sizes.
    pub fn demo(sizes: &Sizes) -> Self {
        Self { lambda: FUSION_LAMBDA, top_k: TOP_K, continual_steps: sizes.continual_steps, target: sizes.target }
    }

    /// The run names of this point's CLM (which lambda and top-k do not touch) and MinCE.
    fn names(&self) -> (String, String) {
        let t = format!("s{}-t{}x{}", self.continual_steps, self.target.hidden, self.target.layers);
        (format!("clm-{t}"), format!("mince-l{}-k{}-{t}", self.lambda, self.top_k))
    }
}

/// The points of the sweep around the demo's setting: each control in turn, the others at
/// the demo's. The target's sizes: half the demo's width, the demo's, and the sources' shape.
pub fn points(sizes: &Sizes) -> Vec<(&'static str, String, Point)> {
    let default = Point::demo(sizes);
    let half = Shape { hidden: default.target.hidden / 2, ..default.target };
    let source = Shape { max_positions: default.target.max_positions, ..sizes.source };
    let mut points = Vec::new();
    for lambda in [0.9, 0.7, 0.5, 0.3] {
        points.push(("lambda", format!("{lambda}"), Point { lambda, ..default }));
    }
    for steps in [default.continual_steps / 2, default.continual_steps, default.continual_steps * 2] {
        points.push(("continual steps", steps.to_string(), Point { continual_steps: steps, ..default }));
    }
    for target in [half, default.target, source] {
        let value = format!("{}x{}", target.hidden, target.layers);
        points.push(("target hidden x layers", value, Point { target, ..default }));
    }
    for top_k in [1, 4, TOP_K, 20] {
        points.push(("top-k", top_k.to_string(), Point { top_k, ..default }));
    }
    points
}

/// transfer.json: one row per point.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TransferRow {
    pub control: String,
    pub value: String,
    /// Whether this is the demo's own setting.
    pub default: bool,
    pub clm_avg_bpb: f64,
    pub mince_avg_bpb: f64,
    /// MinCE minus CLM per seed, their mean, 95% interval, the seeds MinCE wins, the gap
    /// closed.
    pub vs_clm: crate::VsClm,
}

impl Demo<'_> {
    /// The sweep for this demo's seed: per point, the sources, CLM and MinCE rows.
    pub fn transfer(&mut self, registry: &mut Registry) -> Result<Vec<Results>> {
        let (sources_rows, prepared) = self.prepare(registry)?;
        let mut bases = BTreeMap::from([(shape_key(self.sizes.target), prepared.base.clone())]);
        let mut rows: BTreeMap<String, crate::Row> = BTreeMap::new();
        let mut out = Vec::new();
        for (_, _, point) in points(&self.sizes) {
            let key = shape_key(point.target);
            if !bases.contains_key(&key) {
                let base = self.base(registry, point.target)?;
                bases.insert(key.clone(), base);
            }
            let base = &bases[&key];
            let (clm, mince) = point.names();
            let mut results = sources_rows.clone();
            for (name, row, fused) in [(clm, "clm", false), (mince, "fusellm-mince", true)] {
                if !rows.contains_key(&name) {
                    let sources = if fused { prepared.sources.clone() } else { Vec::new() };
                    let fusion = fused.then(|| crate::by_byte("min_ce"));
                    let plan = crate::Plan {
                        steps: point.continual_steps,
                        lambda: point.lambda,
                        top_k: point.top_k,
                        ..self.continual(base, sources, fusion)
                    };
                    self.stage(&format!("transfer: {name}"));
                    let record = self.pipeline(registry, &format!("transfer-{name}"), &plan)?;
                    let mut one = Results::default();
                    one.push(row, &record);
                    rows.insert(name.clone(), one.rows.remove(0));
                }
                results.rows.push(rows[&name].clone());
            }
            out.push(results);
        }
        Ok(out)
    }
}

fn shape_key(s: Shape) -> String {
    format!("{}x{}", s.hidden, s.layers)
}

/// The sweep over seeds: `runs[i]` is seed i's [`Demo::transfer`].
pub fn gather(seeds: &[u64], runs: &[Vec<Results>], sizes: &Sizes) -> Result<Vec<TransferRow>> {
    let default = Point::demo(sizes);
    points(sizes)
        .into_iter()
        .enumerate()
        .map(|(i, (control, value, point))| {
            let at: Vec<Results> = runs.iter().map(|r| r[i].clone()).collect();
            let over = SeedResults::new(seeds, &at)?;
            let row = |m: &str| over.rows.iter().find(|r| r.model == m).expect("every point has CLM and MinCE");
            Ok(TransferRow {
                control: control.into(),
                value,
                default: point == default,
                clm_avg_bpb: row("clm").avg_bpb,
                mince_avg_bpb: row("fusellm-mince").avg_bpb,
                vs_clm: row("fusellm-mince").vs_clm.clone().expect("MinCE is a method"),
            })
        })
        .collect()
}

/// The table in Markdown.
pub fn markdown(rows: &[TransferRow], seeds: usize) -> String {
    let header = ["control", "value", "CLM", "MinCE", "MinCE - CLM", "95% interval", "seeds better", "gap closed"];
    let cells = rows.iter().map(|r| {
        let v = &r.vs_clm;
        vec![
            r.control.clone(),
            if r.default { format!("**{}** (demo)", r.value) } else { r.value.clone() },
            format!("{:.4}", r.clm_avg_bpb),
            format!("{:.4}", r.mince_avg_bpb),
            format!("{:+.4}", v.mean),
            format!("[{:+.4}, {:+.4}]", v.ci95[0], v.ci95[1]),
            format!("{}/{seeds}", v.seeds_better),
            format!("{:.1}%", 100.0 * v.gap_closed),
        ]
    });
    fusellm_core::table::markdown(&header, cells)
}

/// transfer.json and transfer.md.
pub fn write(out: &Path, rows: &[TransferRow], seeds: usize) -> Result<()> {
    write_atomically(&out.join("transfer.json"), &serde_json::to_vec_pretty(rows).expect("JSON"))?;
    Ok(write_atomically(&out.join("transfer.md"), markdown(rows, seeds).as_bytes())?)
}
