//! Entropy-weighted fusion: at each position, each candidate's distribution is weighted by
//! the inverse of its entropy, so a confident source counts more than an unsure one.

use fusellm_sdk::math::{ln, softmax_into};
use fusellm_sdk::{FusedTarget, FusionFn, FusionInput, ParamSpec, Params, PluginInfo, PluginKind};

pub struct EntropyWeighted;

impl FusionFn for EntropyWeighted {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(PluginKind::Fusion, "entropy_weighted", "0.1.0", "candidates weighted by inverse entropy")
            .param(ParamSpec::float("eps", 0.1, "added to each entropy before inverting").range(Some(1e-9), None))
    }

    fn fuse(&self, params: &Params, input: &FusionInput<'_>) -> Result<FusedTarget, String> {
        let eps = params.float("eps");
        let mut out = FusedTarget::with_capacity(input.positions(), 0);
        let (mut probs, mut merged) = (Vec::new(), Vec::<(u32, f64)>::new());
        for p in 0..input.positions() {
            merged.clear();
            let mut total = 0.0;
            for cand in &input.candidates {
                let (ids, logits) = cand.dist.row(p);
                softmax_into(logits, 1.0, &mut probs);
                let entropy: f64 = probs.iter().filter(|&&q| q > 0.0).map(|&q| -q * ln(q)).sum();
                let weight = 1.0 / (entropy + eps);
                total += if ids.is_empty() { 0.0 } else { weight };
                for (&id, &q) in ids.iter().zip(&probs) {
                    match merged.iter_mut().find(|(m, _)| *m == id) {
                        Some((_, acc)) => *acc += weight * q,
                        None => merged.push((id, weight * q)),
                    }
                }
            }
            out.ids.extend(merged.iter().map(|&(id, _)| id));
            out.values.extend(merged.iter().map(|&(_, q)| (q / total) as f32));
            out.end_row();
        }
        Ok(out)
    }
}

fusellm_sdk::export_plugins!(fusion: [EntropyWeighted]);
