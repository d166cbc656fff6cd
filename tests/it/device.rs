//! The block library's ops and a bf16 training step on a GPU, against the CPU kernels.
//! They need a CUDA build and a GPU, so they are ignored by default; scripts/gpu-check.sh
//! runs them on a GPU machine (`it --ignored device::`). `FUSELLM_TEST_DEVICE` picks the
//! device (default `cuda`).

use candle_core::{DType, Device, Tensor, Var};
use fusellm_core::model::entry_nll::entry_nll;
use fusellm_core::model::loss::{LossBatch, Objective};
use fusellm_core::model::ops;
use fusellm_core::model::positions::{attention_mask, rope_tables};
use fusellm_core::model::Kernels;
use fusellm_core::model::Transformer;
use fusellm_core::train::optim::{AdamW, AdamWConfig};
use fusellm_sdk::rng::Rng;

fn device() -> Device {
    let name = std::env::var("FUSELLM_TEST_DEVICE").unwrap_or_else(|_| "cuda".into());
    fusellm_core::device::parse(&name).unwrap()
}

fn random(rng: &mut Rng, shape: &[usize], scale: f64) -> Tensor {
    let n = shape.iter().product();
    Tensor::from_vec((0..n).map(|_| (rng.normal() * scale) as f32).collect(), shape, &Device::Cpu).unwrap()
}

/// The largest magnitude, or NaN if any element is NaN (so that no bound holds).
fn max_abs(t: &Tensor) -> f32 {
    let values = t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values.iter().fold(0f32, |a, &v| if a.is_nan() || v.is_nan() { f32::NAN } else { a.max(v.abs()) })
}

/// `op` on the CPU (fused kernels) and on the device (its own path) from the same inputs:
/// outputs within `tol` relative, and the inputs' gradients under one random upstream
/// gradient within `10 * tol`. Returns the differences found, as an error where they are
/// beyond those bounds or the op fails, so that one run reports every op.
fn same_on_device(name: &str, inputs: &[Tensor], tol: f32, op: impl Fn(&[Tensor]) -> Tensor) -> Result<String, String> {
    let dev = device();
    let run = |device: &Device| {
        let vars: Vec<Var> = inputs.iter().map(|t| Var::from_tensor(&t.to_device(device).unwrap()).unwrap()).collect();
        let out = op(&vars.iter().map(|v| v.as_tensor().clone()).collect::<Vec<_>>());
        let upstream = random(&mut Rng::new(3), out.dims(), 1.0).to_device(device).unwrap();
        let grads = (out.to_dtype(DType::F32).unwrap() * upstream).unwrap().sum_all().unwrap().backward().unwrap();
        let grads: Vec<Tensor> = vars.iter().map(|v| grads.get(v).unwrap().to_device(&Device::Cpu).unwrap()).collect();
        (out.to_device(&Device::Cpu).unwrap().to_dtype(DType::F32).unwrap(), grads)
    };
    let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (run(&Device::Cpu), run(&dev))));
    let ((cpu, cpu_grads), (gpu, gpu_grads)) = ran.map_err(|panic| {
        let message =
            panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()));
        format!("{name}: failed: {}", message.unwrap_or_default())
    })?;
    let relative = |a: &Tensor, b: &Tensor, floor: f32| {
        let (a, b) = (a.to_dtype(DType::F32).unwrap(), b.to_dtype(DType::F32).unwrap());
        max_abs(&(&a - &b).unwrap()) / max_abs(&b).max(floor)
    };
    let values = relative(&gpu, &cpu, 1e-6);
    let grads: Vec<f32> = gpu_grads.iter().zip(&cpu_grads).map(|(a, b)| relative(a, b, 1e-3)).collect();
    let listed: Vec<String> = grads.iter().map(|g| format!("{g:.1e}")).collect();
    let report = format!("{name}: values differ by {values:.1e}, gradients by [{}] (relative)", listed.join(", "));
    match values <= tol && grads.iter().all(|&g| g <= 10.0 * tol) {
        true => Ok(report),
        false => Err(report),
    }
}

/// The inputs in bf16 when they are on a CUDA device (the bf16 kernels), unchanged on the
/// CPU (the f32 reference).
fn bf16_on_device(inputs: &[Tensor]) -> Vec<Tensor> {
    inputs.iter().map(|t| if t.device().is_cuda() { t.to_dtype(DType::BF16).unwrap() } else { t.clone() }).collect()
}

#[test]
#[ignore = "needs a CUDA build and a GPU: scripts/gpu-check.sh"]
fn ops_on_the_device_match_the_cpu_kernels() {
    let mut rng = Rng::new(1);
    let mut results = Vec::new();
    let (b, t, h, kv, d, v) = (2, 33, 4, 2, 16, 3000);
    let x = random(&mut rng, &[b, t, h * d], 1.0);
    let w = random(&mut rng, &[h * d], 1.0);
    // Causal scores with a bias per sequence, and wide rows with a bias per head (ALiBi's).
    let mask = attention_mask(t, None, None, &Device::Cpu).unwrap();
    let causal =
        (random(&mut rng, &[b, h, t, t], 3.0), random(&mut rng, &[b, 1, t, t], 1.0).broadcast_add(&mask).unwrap());
    let wide_rows = (random(&mut rng, &[b, h, 5, 300], 3.0), random(&mut rng, &[1, h, 5, 300], 1.0));
    for (what, (scores, bias)) in [("causal", causal), ("wide", wide_rows)] {
        for (dtype, tol) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            results.push(same_on_device(
                &format!("attention softmax {what} {dtype:?}"),
                std::slice::from_ref(&scores),
                tol,
                |x| {
                    let x = if dtype == DType::BF16 { bf16_on_device(x) } else { x.to_vec() };
                    Kernels::Fused.attention_softmax(&x[0], &bias.to_device(x[0].device()).unwrap(), 0.3).unwrap()
                },
            ));
        }
    }
    results.push(same_on_device("rms_norm", &[x.clone(), w.clone()], 1e-5, |x| {
        Kernels::Fused.rms_norm(&x[0], &x[1], 1e-5).unwrap()
    }));
    results.push(same_on_device("layer_norm", &[x.clone(), w.clone(), w.clone()], 1e-5, |x| {
        Kernels::Fused.layer_norm(&x[0], &x[1], Some(&x[2]), 1e-5).unwrap()
    }));
    results.push(same_on_device("swiglu", &[x.clone(), x.sqr().unwrap()], 1e-5, |x| {
        Kernels::Fused.swiglu(&x[0], &x[1]).unwrap()
    }));
    results.push(same_on_device("linear", &[x.clone(), random(&mut rng, &[96, h * d], 0.2)], 1e-4, |x| {
        Kernels::Fused.linear(&x[0], &x[1], None).unwrap()
    }));
    let (cos, sin) = rope_tables(10000.0, &Default::default(), d, t, &Device::Cpu).unwrap();
    let mask = attention_mask(t, None, None, &Device::Cpu).unwrap();
    let qkv = [x.clone(), random(&mut rng, &[b, t, kv * d], 1.0), random(&mut rng, &[b, t, kv * d], 1.0)];
    results.push(same_on_device("attention", &qkv, 1e-4, |x| {
        let on = |t: &Tensor| t.to_device(x[0].device()).unwrap();
        let (mask, cos, sin) = (on(&mask), on(&cos), on(&sin));
        let scores = ops::Scores { heads: h, scale: 0.25, softcap: None, bias: &mask, rope: Some((&cos, &sin, d)) };
        Kernels::Fused.attention(&x[0], &x[1], &x[2], &scores).unwrap()
    }));
    let ids =
        Tensor::from_vec((0..b * t * 3).map(|i| (i * 7919 % v) as u32).collect(), (b, t, 3), &Device::Cpu).unwrap();
    results.push(same_on_device("entry_nll", &[random(&mut rng, &[b, t, v], 2.0)], 1e-5, |x| {
        entry_nll(Kernels::Fused, &x[0], &ids.to_device(x[0].device()).unwrap()).unwrap()
    }));
    // Rows wider than a block of threads, and enough of them for several parts of the
    // norms' parameter sums.
    let (wide, wide_w) = (random(&mut rng, &[3, 100, 600], 1.0), random(&mut rng, &[600], 1.0));
    results.push(same_on_device("layer_norm wide", &[wide.clone(), wide_w.clone(), wide_w.clone()], 1e-5, |x| {
        Kernels::Fused.layer_norm(&x[0], &x[1], Some(&x[2]), 1e-5).unwrap()
    }));
    // The head and the FuseLLM loss: the CPU kernel against the chunked cuBLAS pass. A
    // temperature puts the fusion term at another scale than the CLM term.
    let objective = Objective { temperature: 2.0, ..Default::default() };
    let ids: Vec<u32> = (0..b * t).map(|i| (i * 31 % v) as u32).collect();
    let (target_ids, target_probs) = ids.iter().flat_map(|&i| [(i, 0.7), ((i + 1) % v as u32, 0.3)]).unzip();
    let batch = LossBatch::sequences(ids, b).unwrap().with_target(target_ids, target_probs, 2).unwrap();
    let hidden_head = [x.clone(), random(&mut rng, &[v, h * d], 0.2)];
    results.push(same_on_device("head loss", &hidden_head, 1e-4, |x| {
        objective.losses_at_head(Kernels::Fused, &x[0], &x[1], None, &batch).unwrap().total
    }));
    // bf16 on the device against f32 on the CPU.
    results.push(same_on_device("rms_norm bf16", &[wide.clone(), wide_w.clone()], 1e-2, |x| {
        let x = bf16_on_device(x);
        Kernels::Fused.rms_norm(&x[0], &x[1], 1e-5).unwrap()
    }));
    results.push(same_on_device("layer_norm bf16", &[x.clone(), w.clone(), w.clone()], 1e-2, |x| {
        let x = bf16_on_device(x);
        Kernels::Fused.layer_norm(&x[0], &x[1], Some(&x[2]), 1e-5).unwrap()
    }));
    results.push(same_on_device("swiglu bf16", &[x.clone(), x.sqr().unwrap()], 1e-2, |x| {
        let x = bf16_on_device(x);
        Kernels::Fused.swiglu(&x[0], &x[1]).unwrap()
    }));
    let heads = x.reshape((b, t, h, d)).unwrap().transpose(1, 2).unwrap().contiguous().unwrap();
    results.push(same_on_device("rope bf16", &[heads], 1e-2, |x| {
        let on = |t: &Tensor| t.to_device(x[0].device()).unwrap();
        let x = bf16_on_device(&[x[0].clone(), on(&cos), on(&sin)]);
        Kernels::Fused.rope(&x[0], &x[1], &x[2], d).unwrap()
    }));
    results.push(same_on_device("head loss bf16", &hidden_head, 1e-2, |x| {
        let x = bf16_on_device(x);
        objective.losses_at_head(Kernels::Fused, &x[0], &x[1], None, &batch).unwrap().total
    }));
    let failed: Vec<&String> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    for line in &results {
        println!("{}", line.as_ref().unwrap_or_else(|e| e));
    }
    assert!(failed.is_empty(), "{} of {} ops differ beyond their bounds: {failed:#?}", failed.len(), results.len());
}

/// AdamW in place on the device against the CPU, three steps: f32 parameters alike, and
/// for bf16 ones the f32 master weights moved alike (within the bf16 gradients' rounding)
/// and the parameters equal to the master weights rounded.
#[test]
#[ignore = "needs a CUDA build and a GPU: scripts/gpu-check.sh"]
fn adamw_on_the_device_matches_the_cpu() {
    let mut rng = Rng::new(4);
    let (init, grads) = (random(&mut rng, &[300, 7], 1.0), random(&mut rng, &[300, 7], 0.1));
    // The parameters, and the master weights if any, after three steps.
    let steps = |device: &Device, dtype: DType| {
        let var = Var::from_tensor(&init.to_device(device).unwrap().to_dtype(dtype).unwrap()).unwrap();
        let vars = vec![("w".to_string(), var.clone())];
        let mut optimizer = AdamW::new(&vars, AdamWConfig::default()).unwrap();
        for step in 1..=3 {
            let g = (grads.to_device(device).unwrap().to_dtype(dtype).unwrap() * step as f64).unwrap();
            let loss = (var.as_tensor() * g).unwrap().sum_all().unwrap();
            optimizer.step(&vars, &loss.backward().unwrap(), 0.5, 1e-2).unwrap();
        }
        let cpu = |t: &Tensor| t.to_device(&Device::Cpu).unwrap();
        (cpu(var.as_tensor()), optimizer.state(&vars).get("master.w").map(cpu))
    };
    // How far the weights moved from where they started (bf16 ones start from `init` rounded).
    let moved = |t: &Tensor, dtype: DType| {
        let start = init.to_dtype(dtype).unwrap().to_dtype(DType::F32).unwrap();
        (t.to_dtype(DType::F32).unwrap() - start).unwrap()
    };
    let (cpu, _) = steps(&Device::Cpu, DType::F32);
    let scale = max_abs(&moved(&cpu, DType::F32));
    let (f32s, _) = steps(&device(), DType::F32);
    let diff = max_abs(&(&f32s - &cpu).unwrap());
    assert!(diff <= 1e-5 * scale, "f32: parameters differ by {diff}");
    let (bf16s, master) = steps(&device(), DType::BF16);
    let master = master.expect("bf16 parameters have f32 master weights");
    let diff = max_abs(&(moved(&master, DType::BF16) - moved(&cpu, DType::F32)).unwrap());
    assert!(diff <= 1e-2 * scale, "bf16: master weights moved {diff} apart from the CPU's (of {scale})");
    let rounded = master.to_dtype(DType::BF16).unwrap().to_dtype(DType::F32).unwrap();
    let off = max_abs(&(bf16s.to_dtype(DType::F32).unwrap() - rounded).unwrap());
    assert_eq!(off, 0.0, "bf16 parameters are not the master weights rounded");
}

/// A few bf16 steps of a small Llama on the device on one batch: the loss falls, and every
/// parameter's gradient is finite and not all zero.
#[test]
#[ignore = "needs a CUDA build and a GPU: scripts/gpu-check.sh"]
fn a_bf16_training_step_on_the_device_learns() {
    use fusellm_core::plugins::Registry;
    use fusellm_sdk::{CheckpointFiles, PluginKind};
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": 500, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64,
        "rms_norm_eps": 1e-5
    })
    .to_string();
    let registry = Registry::with_builtins().unwrap();
    let adapter = registry.get(PluginKind::Adapter, "llama").unwrap();
    let files = CheckpointFiles { config_json: &config, tokenizer_json: None };
    let spec = adapter.adapt(&adapter.resolve_params(&Default::default()).unwrap(), files).unwrap();
    let model = Transformer::init(&spec, 1, 0.02, DType::BF16, &device()).unwrap();
    let mut rng = Rng::new(2);
    let ids: Vec<u32> = (0..4 * 48).map(|_| rng.below(500)).collect();
    let k = 4;
    let (target_ids, target_probs) = ((0..4 * 48 * k).map(|i| (i % 500) as u32).collect(), vec![0.25; 4 * 48 * k]);
    let batch = LossBatch::sequences(ids, 4).unwrap().with_target(target_ids, target_probs, k).unwrap();
    let objective = Objective::default();
    let mut optimizer = AdamW::new(model.vars(), AdamWConfig::default()).unwrap();
    let mut losses = Vec::new();
    for step in 0..8 {
        let loss = model.losses(&batch, &objective).unwrap().total;
        losses.push(loss.to_dtype(DType::F32).unwrap().to_scalar::<f32>().unwrap());
        let grads = loss.backward().unwrap();
        if step == 0 {
            for (name, var) in model.vars() {
                let g =
                    grads.get(var).unwrap_or_else(|| panic!("{name} has no gradient")).to_dtype(DType::F32).unwrap();
                let (sum, max) = (g.sqr().unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), max_abs(&g));
                assert!(sum.is_finite() && max > 0.0, "{name}: gradient norm^2 {sum}, max {max}");
            }
        }
        optimizer.step(model.vars(), &grads, 1.0, 3e-3).unwrap();
    }
    assert!(losses.iter().all(|l| l.is_finite()) && losses[7] < losses[0] - 0.05, "losses {losses:?}");
}
