//! mergekit's merge methods, tensor by tensor, each with its parameters declared beside it
//! (mergekit's names and defaults). Everything is computed in f32 on flat slices.

use std::collections::BTreeMap;

use fusellm_sdk::rng::Rng;

/// A merge method, by mergekit's name ([`Method::name`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// The weighted average of the models.
    Linear,
    /// `base + lambda * sum_i w_i (model_i - base)`.
    TaskArithmetic,
    /// TIES: each task vector pruned to its largest `density` by magnitude, a sign elected
    /// per entry, the agreeing entries averaged.
    Ties,
    /// DARE: task vectors pruned at random to `density` and rescaled, then summed...
    DareLinear,
    /// ... or combined as TIES does.
    DareTies,
    /// Model Breadcrumbs: the largest `gamma` and the smallest entries dropped...
    Breadcrumbs,
    /// ... with TIES's sign election.
    BreadcrumbsTies,
    /// Spherical interpolation of two models by `t` (0: the base).
    Slerp,
    /// FuseChat's SCE: entries of high variance across the task vectors selected, weights
    /// from each task vector's mean square, TIES's sign election.
    Sce,
    /// Model Stock: the average of the models pulled towards the base by the angle between
    /// their task vectors.
    ModelStock,
}

/// A parameter of a method: per model or global, and its default (none: required).
#[derive(Clone, Copy, Debug)]
pub struct Param {
    pub name: &'static str,
    pub per_model: bool,
    pub default: Option<f64>,
}

const fn model(name: &'static str, default: Option<f64>) -> Param {
    Param { name, per_model: true, default }
}

const fn global(name: &'static str, default: Option<f64>) -> Param {
    Param { name, per_model: false, default }
}

const WEIGHT: Param = model("weight", None);
const DENSITY: Param = model("density", Some(1.0));
const LAMBDA: Param = global("lambda", Some(1.0));
/// Only how mergekit stores its masks (int8 instead of the tensor's dtype): no effect here.
const INT8_MASK: Param = global("int8_mask", Some(0.0));

impl Method {
    pub const ALL: [Method; 10] = [
        Method::Linear,
        Method::TaskArithmetic,
        Method::Ties,
        Method::DareLinear,
        Method::DareTies,
        Method::Breadcrumbs,
        Method::BreadcrumbsTies,
        Method::Slerp,
        Method::Sce,
        Method::ModelStock,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Linear => "linear",
            Method::TaskArithmetic => "task_arithmetic",
            Method::Ties => "ties",
            Method::DareLinear => "dare_linear",
            Method::DareTies => "dare_ties",
            Method::Breadcrumbs => "breadcrumbs",
            Method::BreadcrumbsTies => "breadcrumbs_ties",
            Method::Slerp => "slerp",
            Method::Sce => "sce",
            Method::ModelStock => "model_stock",
        }
    }

    /// The parameters it reads, with mergekit's names and defaults (mergekit 0.1.5's).
    pub fn params(self) -> Vec<Param> {
        let flag = |b: bool| Some(f64::from(u8::from(b)));
        let gta = |normalize: bool, rescale: bool, extra: &[Param]| {
            let mut p =
                vec![WEIGHT, LAMBDA, global("normalize", flag(normalize)), global("rescale", flag(rescale)), INT8_MASK];
            p.extend_from_slice(extra);
            p
        };
        let seed = global("random_seed", Some(0.0));
        let gamma = model("gamma", Some(0.01));
        match self {
            Method::Linear => vec![WEIGHT, global("normalize", Some(1.0))],
            Method::TaskArithmetic => gta(false, false, &[]),
            Method::Ties => gta(true, false, &[DENSITY]),
            Method::DareLinear => gta(false, true, &[DENSITY, seed]),
            Method::DareTies => gta(false, true, &[DENSITY, seed]),
            Method::Breadcrumbs => gta(false, false, &[DENSITY, gamma]),
            Method::BreadcrumbsTies => gta(false, false, &[DENSITY, gamma]),
            Method::Slerp => vec![global("t", None)],
            // mergekit accepts (and ignores) a weight per model for these two.
            Method::Sce => vec![model("weight", Some(1.0)), global("select_topk", Some(1.0)), INT8_MASK],
            Method::ModelStock => vec![model("weight", Some(1.0))],
        }
    }

    /// Whether it needs `base_model`.
    pub fn needs_base(self) -> bool {
        !matches!(self, Method::Linear)
    }
}

/// One tensor's inputs: the base's values, each model's, and every parameter's value for
/// this tensor (per model, and global).
pub struct Inputs<'a> {
    pub base: Option<&'a [f32]>,
    pub models: &'a [&'a [f32]],
    pub per_model: &'a [BTreeMap<&'static str, f64>],
    pub global: &'a BTreeMap<&'static str, f64>,
    /// The seed of random methods' masks, for this tensor.
    pub seed: u64,
}

impl Inputs<'_> {
    fn global(&self, name: &str) -> f64 {
        self.global[name]
    }
    fn of(&self, i: usize, name: &str) -> f64 {
        self.per_model[i][name]
    }
    fn base(&self) -> &[f32] {
        self.base.expect("checked: the method has a base")
    }
}

/// How task vectors are pruned before they are combined.
#[derive(Clone, Copy)]
enum Sparsify {
    None,
    Magnitude,
    Random,
    Outliers,
}

impl Method {
    /// The merged values of one tensor.
    pub fn merge(self, x: &Inputs) -> Vec<f32> {
        match self {
            Method::Linear => linear(x),
            Method::TaskArithmetic => task_arithmetic(x, Sparsify::None, false),
            Method::Ties => task_arithmetic(x, Sparsify::Magnitude, true),
            Method::DareLinear => task_arithmetic(x, Sparsify::Random, false),
            Method::DareTies => task_arithmetic(x, Sparsify::Random, true),
            Method::Breadcrumbs => task_arithmetic(x, Sparsify::Outliers, false),
            Method::BreadcrumbsTies => task_arithmetic(x, Sparsify::Outliers, true),
            Method::Slerp => slerp(x),
            Method::Sce => sce(x),
            Method::ModelStock => model_stock(x),
        }
    }
}

fn linear(x: &Inputs) -> Vec<f32> {
    let weights: Vec<f32> = (0..x.models.len()).map(|i| x.of(i, "weight") as f32).collect();
    let mut out = vec![0f32; x.models[0].len()];
    for (m, w) in x.models.iter().zip(&weights) {
        // One rounding per step, as torch's addcmul_.
        out.iter_mut().zip(m.iter()).for_each(|(o, v)| *o = v.mul_add(*w, *o));
    }
    if x.global("normalize") != 0.0 {
        let total: f32 = weights.iter().sum();
        out.iter_mut().for_each(|o| *o /= total);
    }
    out
}

/// The generalised task arithmetic of mergekit: task vectors (pruned as `sparsify` says),
/// weighted, masked by the elected sign when `consensus`, summed, divided by the weights
/// that took part when `normalize`, scaled by `lambda`, added to the base.
fn task_arithmetic(x: &Inputs, sparsify: Sparsify, consensus: bool) -> Vec<f32> {
    let base = x.base();
    let weights: Vec<f32> = (0..x.models.len()).map(|i| x.of(i, "weight") as f32).collect();
    let weighted: Vec<Vec<f32>> = task_vectors(x)
        .into_iter()
        .enumerate()
        .map(|(i, delta)| {
            let kept = match sparsify {
                Sparsify::None => None,
                Sparsify::Magnitude => Some(magnitude(&delta, x.of(i, "density"))),
                Sparsify::Outliers => Some(outliers(&delta, x.of(i, "density"), x.of(i, "gamma"))),
                Sparsify::Random => {
                    let mut rng = Rng::new(x.seed ^ (i as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
                    Some(random(&delta, x.of(i, "density"), &mut rng))
                }
            };
            let delta = match kept {
                Some(kept) => masked(&delta, &kept, x.global("rescale") != 0.0),
                None => delta,
            };
            delta.into_iter().map(|d| d * weights[i]).collect()
        })
        .collect();
    let (normalize, lambda) = (x.global("normalize") != 0.0, x.global("lambda") as f32);
    (0..base.len())
        .map(|j| {
            let elected = consensus.then(|| if weighted.iter().map(|d| d[j]).sum::<f32>() >= 0.0 { 1.0 } else { -1.0 });
            let (mut mixed, mut divisor) = (0f32, 0f32);
            for (d, w) in weighted.iter().zip(&weights) {
                if elected.is_none_or(|s| sign(d[j]) == s) {
                    mixed += d[j];
                    divisor += w;
                }
            }
            // A divisor of no weight (no model agrees, or weights summing to zero) is one.
            let none = if consensus { divisor == 0.0 } else { divisor.abs() < 1e-8 };
            if normalize {
                mixed /= if none { 1.0 } else { divisor };
            }
            base[j] + mixed * lambda
        })
        .collect()
}

/// Each model's task vector, `model - base`.
fn task_vectors(x: &Inputs) -> Vec<Vec<f32>> {
    let base = x.base();
    x.models.iter().map(|m| m.iter().zip(base).map(|(v, b)| v - b).collect()).collect()
}

/// torch's sign: -1, 0 or 1.
fn sign(v: f32) -> f32 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}

/// The indices of `values` by magnitude, largest first (stable among equals).
fn by_magnitude(values: &[f32]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..values.len()).collect();
    order.sort_by(|&a, &b| values[b].abs().total_cmp(&values[a].abs()));
    order
}

/// The kept entries of `delta`, rescaled where asked so that its L1 norm stays (mergekit's
/// `rescaled_masked_tensor`; a tensor of all zeros stays as it is).
fn masked(delta: &[f32], kept: &[bool], rescale: bool) -> Vec<f32> {
    let out: Vec<f32> = delta.iter().zip(kept).map(|(d, k)| if *k { *d } else { 0.0 }).collect();
    if !rescale {
        return out;
    }
    let l1 = |v: &[f32]| v.iter().map(|a| a.abs()).sum::<f32>();
    let (before, after) = (l1(delta), l1(&out));
    if before < 1e-7 || after < 1e-7 {
        return out;
    }
    out.into_iter().map(|v| v * (before / after)).collect()
}

/// TIES's pruning: the `density` share of entries of largest magnitude (at least one).
fn magnitude(delta: &[f32], density: f64) -> Vec<bool> {
    if density >= 1.0 {
        return vec![true; delta.len()];
    }
    let k = if density <= 0.0 { 0 } else { ((density * delta.len() as f64) as usize).max(1) };
    let mut kept = vec![false; delta.len()];
    by_magnitude(delta).into_iter().take(k).for_each(|i| kept[i] = true);
    kept
}

/// Breadcrumbs' pruning: the `gamma` share of largest magnitude dropped as outliers, and the
/// smallest, so that the `density` share is kept (fewer outliers where both do not fit).
fn outliers(delta: &[f32], density: f64, gamma: f64) -> Vec<bool> {
    let n = delta.len();
    if density >= 1.0 {
        return vec![true; n];
    }
    let keep = (density * n as f64) as usize;
    let top = ((gamma * n as f64) as usize).min(n - keep);
    let mut kept = vec![false; n];
    by_magnitude(delta).into_iter().skip(top).take(keep).for_each(|i| kept[i] = true);
    kept
}

/// DARE's pruning: each entry kept with probability `density`.
fn random(delta: &[f32], density: f64, rng: &mut Rng) -> Vec<bool> {
    if density >= 1.0 {
        return vec![true; delta.len()];
    }
    delta.iter().map(|_| rng.unit() < density).collect()
}

/// Spherical interpolation from the base (t = 0) to the other model (t = 1), linear where
/// the two are nearly parallel.
fn slerp(x: &Inputs) -> Vec<f32> {
    let base = x.base();
    let other = x.models[0];
    let t = x.global("t") as f32;
    // Sums in f64: torch's pairwise f32 reductions are that accurate, a running f32 sum is not.
    let norm = |v: &[f32]| match v.iter().map(|a| f64::from(*a).powi(2)).sum::<f64>().sqrt() as f32 {
        n if n > 1e-8 => n,
        _ => 1.0,
    };
    let (na, nb) = (norm(base), norm(other));
    let dot = base.iter().zip(other).map(|(a, b)| f64::from((a / na) * (b / nb))).sum::<f64>();
    let dot = (dot as f32).clamp(-1.0, 1.0);
    let (s0, s1) = if dot.abs() > 0.9995 {
        (1.0 - t, t)
    } else {
        let theta = dot.acos();
        let sin = theta.sin();
        (((1.0 - t) * theta).sin() / sin, (t * theta).sin() / sin)
    };
    base.iter().zip(other).map(|(a, b)| s0 * a + s1 * b).collect()
}

/// FuseChat's SCE.
fn sce(x: &Inputs) -> Vec<f32> {
    let base = x.base();
    let mut tvs = task_vectors(x);
    let k = tvs.len() as f32;
    let topk = x.global("select_topk");
    if topk < 1.0 {
        // Select the entries whose values vary most across the task vectors.
        let var: Vec<f32> = (0..base.len())
            .map(|j| {
                let mean = tvs.iter().map(|t| t[j]).sum::<f32>() / k;
                tvs.iter().map(|t| (t[j] - mean).powi(2)).sum::<f32>() / k
            })
            .collect();
        let nonzero = var.iter().filter(|v| **v != 0.0).count();
        let keep = if topk <= 0.0 { 0 } else { (nonzero as f32 * topk as f32) as usize };
        let mut mask = vec![false; base.len()];
        for i in by_magnitude(&var).into_iter().take(keep) {
            mask[i] = true;
        }
        for t in &mut tvs {
            t.iter_mut().zip(&mask).for_each(|(v, m)| *v = if *m { *v } else { 0.0 });
        }
    }
    // Weights: each task vector's mean square, normalised to sum to one.
    let squares: Vec<f32> = tvs.iter().map(|t| t.iter().map(|v| v * v).sum::<f32>() / t.len() as f32).collect();
    let total: f32 = squares.iter().sum();
    let weights: Vec<f32> =
        if total.abs() < 1e-6 { vec![1.0 / k; tvs.len()] } else { squares.iter().map(|s| s / total).collect() };
    (0..base.len())
        .map(|j| {
            let elected = if tvs.iter().map(|t| t[j]).sum::<f32>() >= 0.0 { 1.0 } else { -1.0 };
            let (mut merged, mut divisor) = (0f32, 0f32);
            for (t, w) in tvs.iter().zip(&weights) {
                if sign(t[j]) == elected {
                    merged += t[j] * w;
                    divisor += w;
                }
            }
            base[j] + merged / divisor.max(1e-6)
        })
        .collect()
}

/// Model Stock: `t = N cos / (1 + (N - 1) cos)` from the mean pairwise cosine of the task
/// vectors; the result `t * average + (1 - t) * base`.
fn model_stock(x: &Inputs) -> Vec<f32> {
    let base = x.base();
    let offsets = task_vectors(x);
    let norm = |v: &[f32]| v.iter().map(|a| a * a).sum::<f32>().sqrt();
    let mut cosines = Vec::new();
    for i in 0..offsets.len() {
        for j in i + 1..offsets.len() {
            let dot: f32 = offsets[i].iter().zip(&offsets[j]).map(|(a, b)| a * b).sum();
            cosines.push((dot / (norm(&offsets[i]) * norm(&offsets[j])).max(1e-6)).clamp(-1.0, 1.0));
        }
    }
    let cos = cosines.iter().sum::<f32>() / cosines.len().max(1) as f32;
    let n = x.models.len() as f32;
    let den = 1.0 + (n - 1.0) * cos;
    let t = if den.abs() < 1e-6 { 0.0 } else { n * cos / den };
    (0..base.len())
        .map(|j| {
            let avg = x.models.iter().map(|m| m[j]).sum::<f32>() / n;
            t * avg + (1.0 - t) * base[j]
        })
        .collect()
}
