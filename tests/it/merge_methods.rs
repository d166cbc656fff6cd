//! mergekit's merge methods: `fusellm merge --config merge.yml` on mergekit's own YAML files
//! reproduces mergekit's output tensors (../shared/fixtures/merge); DARE's random masks are
//! checked by their statistics; bad configs name the key and what is expected.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{DType, Device, Tensor};

use crate::common::fixtures;

fn merge_dir() -> PathBuf {
    fixtures::root().join("merge")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-merge-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `fusellm merge --config FILE --out OUT`, from the fixtures' merge folder (the YAMLs name
/// models relative to it, as mergekit reads them from its working folder).
fn merge(config: &Path, out: &Path) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_fusellm"))
        .current_dir(merge_dir())
        .arg("merge")
        .arg("--config")
        .arg(config)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap()
}

fn load(file: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(file, &Device::Cpu).unwrap()
}

fn values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap()
}

#[test]
fn every_deterministic_method_reproduces_mergekit_within_1e_6() {
    let dir = scratch("parity");
    for method in ["linear", "task_arithmetic", "ties", "breadcrumbs_ties", "sce", "model_stock", "slerp"] {
        let out = dir.join(method);
        let run = merge(&merge_dir().join(method).join("merge.yml"), &out);
        assert!(run.status.success(), "{method}: {}", String::from_utf8_lossy(&run.stderr));
        let ours = load(&out.join("model.safetensors"));
        let theirs = load(&merge_dir().join(method).join("model.safetensors"));
        assert_eq!(ours.len(), theirs.len(), "{method}: every tensor of the base");
        let mut worst = 0f32;
        for (name, reference) in &theirs {
            let got = ours.get(name).unwrap_or_else(|| panic!("{method}: no {name}"));
            assert_eq!(got.dims(), reference.dims(), "{method}: {name}");
            assert_eq!(got.dtype(), DType::F32, "{method}: {name}");
            for (a, b) in values(got).iter().zip(values(reference)) {
                worst = worst.max((a - b).abs());
            }
        }
        eprintln!("{method}: max |fusellm - mergekit| = {worst:e}");
        assert!(worst <= 1e-6, "{method}: max |fusellm - mergekit| = {worst:e}");
        // The base's tokenizer comes with it.
        let base = if method == "slerp" { "models/ft-a" } else { "models/base" };
        assert_eq!(
            std::fs::read(out.join("tokenizer.json")).unwrap(),
            std::fs::read(merge_dir().join(base).join("tokenizer.json")).unwrap()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The share of entries of `out` that equal `base`, over a tensor.
fn unchanged(out: &[f32], base: &[f32]) -> f64 {
    out.iter().zip(base).filter(|(a, b)| a == b).count() as f64 / out.len() as f64
}

#[test]
fn dare_keeps_its_density_rescales_and_is_seeded() {
    let dir = scratch("dare");
    let base = load(&merge_dir().join("models/base/model.safetensors"));
    let ft_b = load(&merge_dir().join("models/ft-b/model.safetensors"));
    let name = "model.layers.0.mlp.up_proj.weight"; // 8192 entries
                                                    // One model at weight 1: the kept share is the density, and rescaling keeps the L1 norm.
    let single = |density: f64, rescale: bool, seed: u64, out: &str| {
        let yaml = format!(
            "merge_method: dare_linear\nbase_model: models/base\nparameters:\n  rescale: {rescale}\n  random_seed: {seed}\nmodels:\n  - model: models/ft-b\n    parameters:\n      weight: 1.0\n      density: {density}\ndtype: float32\n"
        );
        let file = dir.join(format!("{out}.yml"));
        std::fs::write(&file, yaml).unwrap();
        let run = merge(&file, &dir.join(out));
        assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
        values(&load(&dir.join(out).join("model.safetensors"))[name])
    };
    let (b, f) = (values(&base[name]), values(&ft_b[name]));
    let delta: Vec<f32> = f.iter().zip(&b).map(|(x, y)| x - y).collect();
    let n = delta.len() as f64;
    for density in [0.3, 0.7] {
        let plain = single(density, false, 0, &format!("plain-{density}"));
        let kept = 1.0 - unchanged(&plain, &b);
        // Binomial: within 4 standard deviations.
        let sd = (density * (1.0 - density) / n).sqrt();
        assert!((kept - density).abs() < 4.0 * sd, "density {density}: kept {kept}");
        // Kept entries are the model's own.
        for ((o, x), y) in plain.iter().zip(&f).zip(&b) {
            assert!(o == y || (o - x).abs() < 1e-6, "{o} is neither the base {y} nor the model {x}");
        }
        let scaled = single(density, true, 0, &format!("scaled-{density}"));
        let l1 = |v: &[f32]| v.iter().zip(&b).map(|(o, y)| (o - y).abs() as f64).sum::<f64>();
        let (before, after) = (delta.iter().map(|d| d.abs() as f64).sum::<f64>(), l1(&scaled));
        assert!((after / before - 1.0).abs() < 1e-4, "rescaled L1 {after} vs {before}");
        assert!((l1(&plain) * (1.0 / density) / before - 1.0).abs() < 0.1, "the scale is about 1/density");
    }
    assert_eq!(single(0.5, true, 3, "seed3"), single(0.5, true, 3, "seed3-again"), "seeded: the same masks");
    assert_ne!(single(0.5, true, 3, "seed3b"), single(0.5, true, 4, "seed4"), "another seed, other masks");

    // mergekit's dare_ties fixture and ours agree in their statistics: three task vectors
    // kept at 0.5, so about (1/2)^3 of the entries stay the base's.
    let out = dir.join("dare_ties");
    let run = merge(&merge_dir().join("dare_ties/merge.yml"), &out);
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let ours = load(&out.join("model.safetensors"));
    let theirs = load(&merge_dir().join("dare_ties/model.safetensors"));
    for name in ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"] {
        let b = values(&base[name]);
        let (u_ours, u_theirs) = (unchanged(&values(&ours[name]), &b), unchanged(&values(&theirs[name]), &b));
        assert!((u_ours - 0.125).abs() < 0.02 && (u_ours - u_theirs).abs() < 0.03, "{name}: {u_ours} vs {u_theirs}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn bad_merge_configs_name_the_key_and_what_is_expected() {
    let dir = scratch("bad");
    let run = |yaml: &str| {
        let file = dir.join("bad.yml");
        std::fs::write(&file, yaml).unwrap();
        let out = merge(&file, &dir.join("out"));
        assert!(!out.status.success(), "{yaml}");
        assert!(!dir.join("out").exists(), "nothing written for {yaml}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let models = "models:\n  - model: models/ft-a\n    parameters:\n      weight: 0.5\n  - model: models/ft-b\n    parameters:\n      weight: 0.5\n";
    let e = run(&format!("merge_method: frankenstein\n{models}"));
    assert!(e.contains("merge method `frankenstein`") && e.contains("ties"), "{e}");
    let e = run(&format!("merge_method: ties\nbase_model: models/base\nparameters:\n  epsilon: 0.1\n{models}"));
    assert!(e.contains("`epsilon` is not a global parameter of ties") && e.contains("normalize"), "{e}");
    let e = run(&format!("merge_method: ties\n{models}"));
    assert!(e.contains("ties needs a base_model"), "{e}");
    let e = run("merge_method: linear\nmodels:\n  - model: models/ft-a\n  - model: models/ft-b\n");
    assert!(e.contains("linear needs `weight` for every model"), "{e}");
    let e = run(&format!("merge_method: linear\nmodelz: []\n{models}"));
    assert!(e.contains("modelz"), "{e}");
    // Models of different shapes.
    let other = fixtures::model_dir("tiny-llama2");
    let e = run(&format!(
        "merge_method: linear\nmodels:\n  - model: models/ft-a\n    parameters:\n      weight: 0.5\n  - model: {}\n    parameters:\n      weight: 0.5\n",
        other.display()
    ));
    assert!(e.contains("differ") && e.contains("only checkpoints of one architecture merge"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}
