//! The fused CPU kernels against the compositions they replace: values within 1e-5
//! relative and gradients within 1e-4, on random inputs of several shapes.

use candle_core::{Device, Tensor, Var};
use fusellm_core::model::ops::{composed, Scores};
use fusellm_core::model::positions::attention_mask;
use fusellm_core::model::Kernels;
use fusellm_sdk::rng::Rng;

fn random(rng: &mut Rng, shape: &[usize], scale: f64) -> Var {
    let n = shape.iter().product();
    Var::from_vec((0..n).map(|_| (rng.normal() * scale) as f32).collect(), shape, &Device::Cpu).unwrap()
}

fn max_abs(t: &Tensor) -> f32 {
    t.abs().unwrap().max_all().unwrap().to_scalar().unwrap()
}

/// Runs `fused` and `reference` on the same inputs; compares outputs and the gradients of
/// every input under a random upstream gradient.
fn check(name: &str, inputs: &[Var], fused: impl Fn(&[Tensor]) -> Tensor, reference: impl Fn(&[Tensor]) -> Tensor) {
    let tensors: Vec<Tensor> = inputs.iter().map(|v| v.as_tensor().clone()).collect();
    let (a, b) = (fused(&tensors), reference(&tensors));
    let scale = max_abs(&b).max(1e-6);
    let diff = max_abs(&(&a - &b).unwrap());
    assert!(diff <= 1e-5 * scale, "{name}: values differ by {diff} (scale {scale})");
    let mut rng = Rng::new(99);
    let upstream = random(&mut rng, a.dims(), 1.0).as_tensor().clone();
    let grads = |out: &Tensor| (out * &upstream).unwrap().sum_all().unwrap().backward().unwrap();
    let (ga, gb) = (grads(&a), grads(&b));
    for (i, v) in inputs.iter().enumerate() {
        let (x, y) = (ga.get(v).unwrap(), gb.get(v).unwrap());
        let scale = max_abs(y).max(1e-3);
        let diff = max_abs(&(x - y).unwrap());
        assert!(diff <= 1e-4 * scale, "{name}: gradient of input {i} differs by {diff} (scale {scale})");
    }
}

#[test]
fn fused_kernels_match_the_compositions() {
    let mut rng = Rng::new(1);
    // Attention scores with a bias per head or per sequence, a causal mask among them.
    for (b, h, t, s, bias_b, bias_h) in [(1, 1, 3, 7, 1, 1), (2, 3, 5, 5, 1, 3), (2, 4, 16, 64, 2, 1)] {
        let x = random(&mut rng, &[b, h, t, s], 3.0);
        let mut bias = random(&mut rng, &[bias_b, bias_h, t, s], 1.0).as_tensor().clone();
        if t == s {
            bias = bias.broadcast_add(&attention_mask(t, None, None, &Device::Cpu).unwrap()).unwrap();
        }
        check(
            "attention softmax",
            &[x],
            |x| Kernels::Fused.attention_softmax(&x[0], &bias, 0.3).unwrap(),
            |x| composed::attention_softmax(&x[0], &bias, 0.3).unwrap(),
        );
    }
    for (rows, d) in [(5, 8), (2 * 9, 64), (4 * 33, 96)] {
        let (x, w, b) = (random(&mut rng, &[rows, d], 2.0), random(&mut rng, &[d], 1.0), random(&mut rng, &[d], 1.0));
        check(
            "rms_norm",
            &[x.clone(), w.clone()],
            |t| Kernels::Fused.rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| composed::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        );
        check(
            "layer_norm",
            &[x.clone(), w.clone(), b],
            |t| Kernels::Fused.layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5).unwrap(),
            |t| composed::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5).unwrap(),
        );
        check(
            "layer_norm without bias",
            &[x, w],
            |t| Kernels::Fused.layer_norm(&t[0], &t[1], None, 1e-5).unwrap(),
            |t| composed::layer_norm(&t[0], &t[1], None, 1e-5).unwrap(),
        );
    }
    for (b, h, t, d, rot) in [(1, 2, 5, 8, 8), (2, 4, 17, 32, 32), (2, 2, 9, 16, 4)] {
        let x = random(&mut rng, &[b, h, t, d], 1.0);
        let (cos, sin) =
            fusellm_core::model::positions::rope_tables(10000.0, &Default::default(), rot, t, &Device::Cpu).unwrap();
        check(
            "rope",
            &[x],
            |v| Kernels::Fused.rope(&v[0], &cos, &sin, rot).unwrap(),
            |v| {
                let part = composed::rope(&v[0].narrow(3, 0, rot).unwrap(), &cos, &sin).unwrap();
                match rot == d {
                    true => part,
                    false => Tensor::cat(&[&part, &v[0].narrow(3, rot, d - rot).unwrap()], 3).unwrap(),
                }
            },
        );
    }
    // (b, t, heads, kv heads, d, rot): full, none, partial rotary; grouped-query heads.
    for (b, t, h, kv, d, rot) in [(2, 7, 4, 4, 8, 8), (1, 19, 6, 2, 16, 0), (2, 12, 4, 2, 16, 4)] {
        let (q, k, v) = (
            random(&mut rng, &[b, t, h * d], 1.0),
            random(&mut rng, &[b, t, kv * d], 1.0),
            random(&mut rng, &[b, t, kv * d], 1.0),
        );
        let (cos, sin) =
            fusellm_core::model::positions::rope_tables(10000.0, &Default::default(), rot.max(2), t, &Device::Cpu)
                .unwrap();
        let rope = (rot > 0).then_some((&cos, &sin, rot));
        // Causal with a padded key in the first sequence, plus ALiBi-like per-head slopes.
        let keep =
            Tensor::from_vec((0..b * t).map(|i| u32::from(i != 3)).collect::<Vec<_>>(), (b, t), &Device::Cpu).unwrap();
        let mask = fusellm_core::model::positions::attention_mask(t, Some(&keep), None, &Device::Cpu).unwrap();
        let window = fusellm_core::model::positions::attention_mask(t, Some(&keep), Some(3), &Device::Cpu).unwrap();
        let slopes: Vec<f32> = (0..h).map(|i| 0.5f32.powi(i as i32 + 1)).collect();
        let alibi = fusellm_core::model::positions::alibi_bias(&slopes, t, &Device::Cpu).unwrap();
        // A sliding window, and Gemma 2's soft-capped scores.
        let biases = [(mask.clone(), None), (mask.broadcast_add(&alibi).unwrap(), None), (window, Some(2.0))];
        for (bias, softcap) in biases {
            let scores = Scores { heads: h, scale: 0.3, softcap, bias: &bias, rope };
            check(
                "attention",
                &[q.clone(), k.clone(), v.clone()],
                |x| Kernels::Fused.attention(&x[0], &x[1], &x[2], &scores).unwrap(),
                |x| composed::attention(Kernels::Fused, &x[0], &x[1], &x[2], &scores).unwrap(),
            );
        }
    }
    for (shape, out) in [(vec![5, 12], 7), (vec![2, 9, 32], 48)] {
        let x = random(&mut rng, &shape, 1.0);
        let w = random(&mut rng, &[out, shape[shape.len() - 1]], 0.5);
        check(
            "linear",
            &[x, w],
            |t| Kernels::Fused.linear(&t[0], &t[1], None).unwrap(),
            |t| t[0].broadcast_matmul(&t[1].t().unwrap()).unwrap(),
        );
    }
    for shape in [vec![4, 10], vec![2, 8, 172]] {
        let (gate, up) = (random(&mut rng, &shape, 3.0), random(&mut rng, &shape, 1.0));
        check(
            "swiglu",
            &[gate, up],
            |t| Kernels::Fused.swiglu(&t[0], &t[1]).unwrap(),
            |t| composed::swiglu(&t[0], &t[1]).unwrap(),
        );
    }
}

/// The head and the loss as one kernel ([`Objective::losses_at_head`] on the CPU) against
/// the logits path: every loss part within 1e-5, the total's gradients within 1e-4, with
/// and without a soft-cap of the logits. The second vocabulary is wide enough for the
/// kernel to walk the rows in two chunks.
#[test]
fn head_loss_kernel_matches_the_logits_path() {
    use fusellm_core::model::loss::{Divergence, LossBatch, Objective, Tail};
    let mut rng = Rng::new(5);
    let objectives = [
        Objective { lambda: 1.0, ..Default::default() },
        Objective { lambda: 0.9, ..Default::default() },
        Objective { lambda: 0.7, divergence: Divergence::Kl, temperature: 2.0, ..Default::default() },
        Objective { lambda: 0.6, divergence: Divergence::Jsd { beta: 0.4 }, temperature: 2.0, ..Default::default() },
        Objective { lambda: 0.5, divergence: Divergence::ReverseKl, tail: Tail::Bucket, ..Default::default() },
        Objective { lambda: 0.5, divergence: Divergence::Tv, tail: Tail::Bucket, ..Default::default() },
    ];
    for (b, t, d, v) in [(2, 9, 16, 50), (3, 100, 8, 40_000)] {
        let hidden = random(&mut rng, &[b, t, d], 1.0);
        let head = random(&mut rng, &[v, d], 0.5);
        let ids: Vec<u32> = (0..b * t).map(|_| rng.below(v as u32)).collect();
        let k = 3;
        let mut target_ids: Vec<u32> = (0..b * t * k).map(|_| rng.below(v as u32)).collect();
        let mut target_probs: Vec<f32> = (0..b * t * k).map(|i| [0.6, 0.3, 0.1][i % k]).collect();
        // A position without a target, and a row of two entries padded to three.
        target_probs[..k].fill(0.0);
        (target_ids[k + 2], target_probs[k + 2], target_probs[k + 1]) = (0, 0.0, 0.4);
        let batch = LossBatch::sequences(ids, b).unwrap().with_target(target_ids, target_probs, k).unwrap();
        // Gemma 2's soft-capped logits with some of the objectives.
        let softcaps = [None, None, Some(3.0), None, Some(3.0), None];
        for (objective, softcap) in objectives.iter().zip(softcaps) {
            let fused = objective
                .losses_at_head(Kernels::Fused, hidden.as_tensor(), head.as_tensor(), softcap, &batch)
                .unwrap();
            let mut logits = hidden.as_tensor().broadcast_matmul(&head.as_tensor().t().unwrap()).unwrap();
            if let Some(cap) = softcap {
                logits = ((logits / cap).unwrap().tanh().unwrap() * cap).unwrap();
            }
            let reference = objective.losses(&logits, &batch, Kernels::Fused).unwrap();
            for (name, x, y) in [
                ("total", &fused.total, &reference.total),
                ("clm", &fused.clm, &reference.clm),
                ("fusion", &fused.fusion, &reference.fusion),
            ] {
                let (x, y) = (x.to_scalar::<f32>().unwrap(), y.to_scalar::<f32>().unwrap());
                assert!((x - y).abs() <= 1e-5 * y.abs().max(1.0), "{objective:?} {v}: {name} {x} vs {y}");
            }
            let (gf, gr) = (
                (&fused.total * 0.5).unwrap().backward().unwrap(),
                (&reference.total * 0.5).unwrap().backward().unwrap(),
            );
            for var in [&hidden, &head] {
                let (x, y) = (gf.get(var).unwrap(), gr.get(var).unwrap());
                let scale = max_abs(y).max(1e-3);
                let diff = max_abs(&(x - y).unwrap());
                assert!(diff <= 1e-4 * scale, "{objective:?} {v}: gradient differs by {diff} (scale {scale})");
            }
        }
    }
}

/// Every divergence's gradient with respect to the logits against central finite
/// differences of its value, with the target renormalised and with a tail bucket, at two
/// temperatures; the padded entry and the position without a target take no part.
#[test]
fn every_divergence_s_gradient_matches_finite_differences() {
    use fusellm_core::model::loss::{Divergence, LossBatch, Objective, Tail};
    let mut rng = Rng::new(8);
    let (b, t, v, k) = (1, 4, 6, 3);
    let logits = random(&mut rng, &[b, t, v], 1.5);
    let ids: Vec<u32> = (0..t as u32).collect();
    let target_ids = vec![0, 1, 2, 3, 4, 5, 5, 0, 1, 2, 0, 0];
    // Rows keeping 0.9, 0.9 and 0.7 of their mass (for the bucket), and the same renormalised.
    let kept = vec![0.5, 0.3, 0.1, 0.6, 0.2, 0.1, 0.7, 0.0, 0.0, 0.0, 0.0, 0.0];
    let whole: Vec<f32> = kept
        .chunks(k)
        .flat_map(|r: &[f32]| r.iter().map(|p| p / r.iter().sum::<f32>().max(1e-9)).collect::<Vec<_>>())
        .collect();
    let batch_of = |probs: Vec<f32>| {
        LossBatch::sequences(ids.clone(), b).unwrap().with_target(target_ids.clone(), probs, k).unwrap()
    };
    let (bucket, renormalised) = (batch_of(kept), batch_of(whole));
    let divergences = [
        (Divergence::Kl, Tail::Bucket),
        (Divergence::ReverseKl, Tail::Bucket),
        (Divergence::Jsd { beta: 0.3 }, Tail::Renormalize),
        (Divergence::Jsd { beta: 0.7 }, Tail::Bucket),
        (Divergence::SkewKl { alpha: 0.1 }, Tail::Renormalize),
        (Divergence::SkewReverseKl { alpha: 0.2 }, Tail::Renormalize),
        (Divergence::SkewReverseKl { alpha: 0.2 }, Tail::Bucket),
        (Divergence::Tv, Tail::Bucket),
    ];
    for (divergence, tail) in divergences {
        let batch = if tail == Tail::Bucket { &bucket } else { &renormalised };
        for temperature in [1.0, 2.0] {
            let objective = Objective { lambda: 0.0, divergence, tail, temperature };
            let fusion =
                |z: &Tensor| objective.losses(z, batch, Kernels::Fused).unwrap().fusion.to_scalar::<f32>().unwrap();
            let total = objective.losses(logits.as_tensor(), batch, Kernels::Fused).unwrap().total;
            let grad: Vec<f32> =
                total.backward().unwrap().get(&logits).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f32> = logits.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let eps = 1e-2f32;
            for (i, g) in grad.iter().enumerate() {
                let at = |delta: f32| {
                    let mut moved = base.clone();
                    moved[i] += delta;
                    fusion(&Tensor::from_vec(moved, (b, t, v), &Device::Cpu).unwrap())
                };
                let fd = (at(eps) - at(-eps)) / (2.0 * eps);
                assert!(
                    (fd - g).abs() <= 2e-3 * g.abs().max(0.1),
                    "{divergence:?} {tail:?} T={temperature} logit {i}: {g} vs {fd}"
                );
            }
        }
    }
    // Rows that keep part of their mass, taken as renormalised: refused, saying how to fix it.
    let e = Objective::default().losses(logits.as_tensor(), &bucket, Kernels::Fused).err().unwrap().to_string();
    assert!(e.contains("tail = \"bucket\"") && e.contains("renormalize = true"), "{e}");
}

#[test]
fn head_loss_kernel_refuses_gradients_of_a_single_part() {
    use fusellm_core::model::loss::{LossBatch, Objective};
    let mut rng = Rng::new(6);
    let (hidden, head) = (random(&mut rng, &[1, 4, 8], 1.0), random(&mut rng, &[20, 8], 1.0));
    let batch = LossBatch::sequences(vec![1, 2, 3, 4], 1).unwrap().with_target(vec![5; 4], vec![1.0; 4], 1).unwrap();
    let losses = Objective::default()
        .losses_at_head(Kernels::Fused, hidden.as_tensor(), head.as_tensor(), None, &batch)
        .unwrap();
    let err = losses.clm.backward().unwrap_err().to_string();
    assert!(err.contains("differentiable only through the total"), "{err}");
}
