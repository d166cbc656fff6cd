//! The fused CPU kernels against the compositions they replace: values within 1e-5
//! relative and gradients within 1e-4, on random inputs of several shapes.

use candle_core::{Device, Tensor, Var};
use fusellm_core::model::ops::{self, composed};
use fusellm_core::rng::Rng;

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
    for shape in [vec![3, 7], vec![2, 4, 16], vec![2, 3, 5, 64]] {
        let x = random(&mut rng, &shape, 3.0);
        check("softmax", &[x], |t| ops::softmax(&t[0]).unwrap(), |t| composed::softmax(&t[0]).unwrap());
    }
    for (rows, d) in [(5, 8), (2 * 9, 64), (4 * 33, 96)] {
        let (x, w, b) = (random(&mut rng, &[rows, d], 2.0), random(&mut rng, &[d], 1.0), random(&mut rng, &[d], 1.0));
        check(
            "rms_norm",
            &[x.clone(), w.clone()],
            |t| ops::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
            |t| composed::rms_norm(&t[0], &t[1], 1e-5).unwrap(),
        );
        check(
            "layer_norm",
            &[x.clone(), w.clone(), b],
            |t| ops::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5).unwrap(),
            |t| composed::layer_norm(&t[0], &t[1], Some(&t[2]), 1e-5).unwrap(),
        );
        check(
            "layer_norm without bias",
            &[x, w],
            |t| ops::layer_norm(&t[0], &t[1], None, 1e-5).unwrap(),
            |t| composed::layer_norm(&t[0], &t[1], None, 1e-5).unwrap(),
        );
    }
    for (b, h, t, d, rot) in [(1, 2, 5, 8, 8), (2, 4, 17, 32, 32), (2, 2, 9, 16, 4)] {
        let x = random(&mut rng, &[b, h, t, d], 1.0);
        let (cos, sin) = fusellm_core::model::positions::rope_tables(10000.0, rot, t, &Device::Cpu).unwrap();
        check(
            "rope",
            &[x],
            |v| ops::rope(&v[0], &cos, &sin, rot).unwrap(),
            |v| {
                let part = composed::rope(&v[0].narrow(3, 0, rot).unwrap(), &cos, &sin).unwrap();
                match rot == d {
                    true => part,
                    false => Tensor::cat(&[&part, &v[0].narrow(3, rot, d - rot).unwrap()], 3).unwrap(),
                }
            },
        );
    }
    for shape in [vec![4, 10], vec![2, 8, 172]] {
        let (gate, up) = (random(&mut rng, &shape, 3.0), random(&mut rng, &shape, 1.0));
        check(
            "swiglu",
            &[gate, up],
            |t| ops::swiglu(&t[0], &t[1]).unwrap(),
            |t| composed::swiglu(&t[0], &t[1]).unwrap(),
        );
    }
}
