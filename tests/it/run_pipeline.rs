//! `fusellm run` end to end over the fixture models and a slice of the math corpus:
//! split, precompute (target and two sources), MinED + DTW alignment, MinCE fusion, four
//! training steps and evaluation; then a variant that changes only the fusion plugin
//! reuses every stage before fusion. And `fusellm validate` pointing at bad inputs.

use std::path::{Path, PathBuf};

use crate::common::{fixtures, fusellm_in, write_experiment};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-run-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A run folder with a corpus of 24 GSM8K problems, an evaluation set of 8 and a config
/// fusing tiny-mpt and tiny-openllama into tiny-llama2.
fn experiment(name: &str) -> PathBuf {
    experiment_of(name, "tiny-llama2", ["tiny-mpt", "tiny-openllama"], 4)
}

fn experiment_of(name: &str, target: &str, sources: [&str; 2], steps: usize) -> PathBuf {
    let dir = scratch(name);
    let model = |m: &str| fixtures::model_dir(m).display().to_string();
    let models = format!(
        "[target]\nmodel = \"{}\"\n[[sources]]\nmodel = \"{}\"\n[[sources]]\nmodel = \"{}\"\n",
        model(target),
        model(sources[0]),
        model(sources[1])
    );
    write_experiment(&dir, &models, steps);
    dir
}

fn run_record(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The stages a run record lists, by name: split, then the target's precompute and per
/// source its precompute and alignment, then fuse, train and eval.
fn assert_stages(record: &serde_json::Value, target: &str, sources: [&str; 2]) {
    let stages: Vec<&str> = record["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    let mut expected = vec!["split".to_string(), format!("precompute-{target}")];
    for source in sources {
        expected.extend([format!("precompute-{source}"), format!("align-{source}")]);
    }
    expected.extend(["fuse", "train", "eval"].map(String::from));
    assert_eq!(stages, expected);
}

/// A model's bits per byte in a run record.
fn bits_per_byte(record: &serde_json::Value, model: &str) -> f64 {
    record["eval"].as_array().unwrap().iter().find(|r| r["model"] == model).unwrap()["bits_per_byte"].as_f64().unwrap()
}

fn assert_ok(out: &std::process::Output) {
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn an_experiment_runs_end_to_end_and_reruns_only_what_changed() {
    let dir = experiment("e2e");
    assert_ok(&fusellm_in(&dir, &["validate", "run.toml"]));
    assert_ok(&fusellm_in(&dir, &["run", "run.toml"]));
    let record = run_record(&dir.join("out/run.json"));
    assert_stages(&record, "tiny-llama2", ["tiny-mpt", "tiny-openllama"]);
    assert!(record["git_revision"].as_str().unwrap().len() >= 7);
    assert!(record["plugins"].as_array().unwrap().iter().any(|p| p["name"] == "min_ce" && p["version"] == "0.1.0"));
    // The trained checkpoint is in the Hugging Face layout and better than the base on the
    // held-out problems (four steps at lr 1e-3 on the same domain).
    let checkpoint = PathBuf::from(record["checkpoint"].as_str().unwrap());
    for file in ["config.json", "model.safetensors", "tokenizer.json", "trainer_state.json"] {
        assert!(checkpoint.join(file).exists(), "{file} missing in {}", checkpoint.display());
    }
    let (trained, base) = (bits_per_byte(&record, "trained"), bits_per_byte(&record, "target-base"));
    assert!(trained < base, "{trained} vs {base}");

    // Another fusion plugin: the forward passes and alignments are reused.
    assert_ok(&fusellm_in(&dir, &["run", "run.toml", "--set", "fusion.plugin=avg_ce"]));
    let again = run_record(&dir.join("out/run.json"));
    for stage in again["stages"].as_array().unwrap() {
        let name = stage["name"].as_str().unwrap();
        let expected = !["fuse", "train", "eval"].contains(&name);
        assert_eq!(stage["reused"].as_bool(), Some(expected), "stage {name}");
    }
    assert!(again["config"].as_str().unwrap().contains("avg_ce"));
}

/// The families people fuse today: a Llama-3 target (128256 ids, tied, llama3 RoPE) with
/// Qwen2.5 (151936 ids, q/k/v biases, its own byte-level tokenizer) and Mistral (sliding
/// window, the Llama-2 tokenizer) as sources, from their bf16 files, through every stage.
#[test]
fn a_llama3_target_fuses_qwen2_and_mistral_sources() {
    let dir = experiment_of("modern", "tiny-llama3", ["tiny-qwen2", "tiny-mistral"], 2);
    assert_ok(&fusellm_in(&dir, &["validate", "run.toml"]));
    assert_ok(&fusellm_in(&dir, &["run", "run.toml"]));
    let record = run_record(&dir.join("out/run.json"));
    assert_stages(&record, "tiny-llama3", ["tiny-qwen2", "tiny-mistral"]);
    let (trained, base) = (bits_per_byte(&record, "trained"), bits_per_byte(&record, "target-base"));
    assert!(trained.is_finite() && trained < base, "{trained} vs {base}");
}

/// `[train.lora]` from the config: the run trains adapters only, validate counts them, and
/// evaluation reads the unmerged checkpoint as its base plus the adapter.
#[test]
fn a_lora_run_trains_adapters_and_evaluates_them_on_their_base() {
    let dir = experiment("lora");
    let mut config = std::fs::read_to_string(dir.join("run.toml")).unwrap();
    config += "[train.lora]\nrank = 4\nalpha = 16\ntargets = [\"q_proj\", \"v_proj\", \"o_proj\"]\n";
    std::fs::write(dir.join("run.toml"), config.replace("lr = 1e-3", "lr = 1e-2")).unwrap();
    let out = fusellm_in(&dir, &["validate", "run.toml"]);
    assert_ok(&out);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("LoRA parameters on"), "{report}");
    assert_ok(&fusellm_in(&dir, &["run", "run.toml"]));
    let record = run_record(&dir.join("out/run.json"));
    let checkpoint = PathBuf::from(record["checkpoint"].as_str().unwrap());
    assert!(checkpoint.join("adapter_model.safetensors").exists() && !checkpoint.join("model.safetensors").exists());
    let (trained, base) = (bits_per_byte(&record, "trained"), bits_per_byte(&record, "target-base"));
    assert!(trained < base, "{trained} vs {base}");
    let out = fusellm_in(&dir, &["validate", "run.toml", "--set", "train.lora.targets=[\"wq\"]"]);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && message.contains("wq") && message.contains("q_proj"), "{message}");
}

/// A `[sweep]` over `run.seed` reports each group of variants that differ only in the seed:
/// its seeds' bits per byte, mean, spread and interval (sweep-seeds.json, sweep.md); the
/// seed changes the training's data order and result, and nothing before training runs
/// again.
#[test]
fn a_sweep_over_seeds_reports_the_spread_of_each_setting() {
    let dir = experiment_of("seeds", "tiny-llama2", ["tiny-mpt", "tiny-openllama"], 2);
    let text = std::fs::read_to_string(dir.join("run.toml")).unwrap();
    let sweep = "[sweep]\n\"train.lambda\" = [0.9, 1.0]\n\"run.seed\" = [0, 1]\n";
    std::fs::write(dir.join("run.toml"), text + sweep).unwrap();
    assert_ok(&fusellm_in(&dir, &["run", "run.toml"]));
    let groups: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/sweep-seeds.json")).unwrap()).unwrap();
    let groups = groups.as_array().unwrap();
    assert_eq!(groups.len(), 2, "{groups:?}");
    let variants: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/sweep.json")).unwrap()).unwrap();
    for group in groups {
        let name = group["variant"].as_str().unwrap();
        let values: Vec<f64> =
            group["avg_bits_per_byte_seeds"].as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
        assert_eq!(group["seeds"], serde_json::json!(["0", "1"]), "{group}");
        assert_ne!(values[0], values[1], "{name}: the seed changed nothing");
        for (seed, value) in ["0", "1"].iter().zip(&values) {
            let parts = |v: &str| -> std::collections::BTreeSet<String> { v.split(',').map(String::from).collect() };
            let wanted = parts(&format!("{name},run.seed={seed}"));
            let row = variants.as_array().unwrap().iter().find(|v| parts(v["variant"].as_str().unwrap()) == wanted);
            assert_eq!(row.unwrap()["avg_bits_per_byte"].as_f64().unwrap(), *value);
        }
        let mean = group["avg_bits_per_byte"].as_f64().unwrap();
        assert!((mean - (values[0] + values[1]) / 2.0).abs() < 1e-12);
        let ci = group["ci95"].as_array().unwrap();
        assert!(ci[0].as_f64().unwrap() < mean && mean < ci[1].as_f64().unwrap(), "{group}");
    }
    assert!(std::fs::read_to_string(dir.join("out/sweep.md")).unwrap().contains("Over `run.seed`"));
    let record = run_record(&dir.join("out/run.seed=1_train.lambda=1.0/run.json"));
    for stage in record["stages"].as_array().unwrap() {
        let name = stage["name"].as_str().unwrap();
        assert_eq!(stage["reused"].as_bool(), Some(!["train", "eval"].contains(&name)), "{name}");
    }
}

#[test]
fn validate_points_at_the_file_line_and_key() {
    let dir = experiment("validate");
    let text = std::fs::read_to_string(dir.join("run.toml")).unwrap();
    let check = |config: String, expected: &[&str]| {
        std::fs::write(dir.join("bad.toml"), config).unwrap();
        let out = fusellm_in(&dir, &["validate", "bad.toml"]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        for e in expected {
            assert!(stderr.contains(e), "expected {e:?} in:\n{stderr}");
        }
    };
    check(text.replace("steps = 4", "stesp = 4"), &["bad.toml:", "`train.stesp`", "did you mean `steps`"]);
    check(text.replace("tiny-mpt", "tiny-mtp"), &["bad.toml:11:", "`sources.0.model`", "not a checkpoint folder"]);
    check(text.replace("max_len = 128", "max_len = 4096"), &["`data.max_len`", "do not fit", "512 positions"]);
    check(text.replace("train.jsonl", "missing.jsonl"), &["`data.corpus`", "missing.jsonl does not exist"]);
    check(text.replace("plugin = \"min_ce\"", "plugin = \"min_cee\""), &["`fusion.plugin`", "min_ce"]);
    check(text.replace("seq_len = 128", "seq_len = 1024"), &["`train.seq_len`", "1024 tokens do not fit"]);

    // What a run would reject hours later, or silently bend.
    check(text.replace("margin = 8", "margin = 128"), &["`data.margin`", "use less than max_len"]);
    check(text.replace("margin = 8", "margin = -5"), &["`data.margin`", "must be zero or a positive integer, not -5"]);
    check(text.replace("[run]\n", "[run]\nseed = -1\n"), &["`run.seed`", "not -1"]);
    check(text.replace("warmup_steps = 1", "warmup_steps = -3"), &["`train.warmup_steps`", "not -3"]);
    for (key, value, says) in [
        ("temperature", "nan", "a positive number, not NaN"),
        ("beta1", "1", "at least 0 and below 1, not 1"),
        ("clip", "-1", "or 0 for no clipping, not -1"),
        ("eps", "-1e-8", "a positive number"),
        ("weight_decay", "-0.1", "zero or positive"),
        ("divergence", "\"reverse_kl\"", "use tail = \"bucket\""),
        ("beta", "0.3", "a parameter of divergence = \"jsd\""),
        ("alpha", "0.3", "a parameter of divergence = \"skew_kl\""),
    ] {
        let bad = text.replace("lr = 1e-3", &format!("lr = 1e-3\n{key} = {value}"));
        check(bad, &[&format!("`train.{key}`"), says]);
    }
    let jsd = text.replace("lr = 1e-3", "lr = 1e-3\ndivergence = \"jsd\"\nbeta = 1.5");
    check(jsd, &["`train.beta`", "between 0 and 1, not 1.5"]);
    std::fs::write(dir.join("empty.jsonl"), "\n\n").unwrap();
    check(text.replace("train.jsonl", "empty.jsonl"), &["`data.corpus`", "empty.jsonl is empty"]);
    if !candle_core::utils::cuda_is_available() {
        let on_cuda = text.replace("[run]\n", "[run]\ndevice = \"cuda\"\n");
        check(on_cuda, &["`run.device`", "CUDA needs a build with `--features cuda`"]);
    }
    // A source whose weights are cut short, and one that lacks a tensor.
    let copy = |name: &str| {
        let to = dir.join(name);
        std::fs::create_dir_all(&to).unwrap();
        for file in std::fs::read_dir(fixtures::model_dir("tiny-mpt")).unwrap() {
            let file = file.unwrap().path();
            std::fs::copy(&file, to.join(file.file_name().unwrap())).unwrap();
        }
        to
    };
    let truncated = copy("truncated");
    let weights = truncated.join("model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    std::fs::write(&weights, &bytes[..bytes.len() - 100]).unwrap();
    let mpt = fixtures::model_dir("tiny-mpt").display().to_string();
    check(text.replace(&mpt, &truncated.display().to_string()), &["`sources.0.model`", "reading the weights in"]);
    let incomplete = copy("incomplete");
    let weights = incomplete.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&weights, &candle_core::Device::Cpu).unwrap();
    tensors.remove("transformer.blocks.1.ffn.down_proj.weight").expect("the tensor is there first");
    candle_core::safetensors::save(&tensors, &weights).unwrap();
    check(
        text.replace(&mpt, &incomplete.display().to_string()),
        &["`sources.0.model`", "no tensor `transformer.blocks.1.ffn.down_proj.weight`"],
    );
    // And one whose tensor has another shape than its config.json implies.
    let reshaped = copy("reshaped");
    let config = reshaped.join("config.json");
    let text_of = std::fs::read_to_string(&config).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text_of).unwrap();
    json["expansion_ratio"] = (json["expansion_ratio"].as_u64().unwrap_or(4) * 2).into();
    std::fs::write(&config, json.to_string()).unwrap();
    check(
        text.replace(&mpt, &reshaped.display().to_string()),
        &["`sources.0.model`", "has shape", "but config.json implies"],
    );
}

/// Every variant of a sweep is validated before the first computes: a typo in the second
/// variant stops the run at once, with nothing run.
#[test]
fn a_sweep_is_validated_whole_before_any_stage() {
    let dir = experiment("sweep");
    let text = std::fs::read_to_string(dir.join("run.toml")).unwrap();
    // The sweep's list is the line after its header.
    let line = text.lines().count() + 2;
    std::fs::write(dir.join("run.toml"), text + "[sweep]\n\"fusion.plugin\" = [\"min_ce\", \"avg_cee\"]\n").unwrap();
    let out = fusellm_in(&dir, &["run", "run.toml"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("unknown fusion plugin `avg_cee`") && stderr.contains("(variant"), "{stderr}");
    assert!(!dir.join("out/cache").exists(), "a stage ran before the sweep was validated");
    // The error points at the sweep's line, where the bad value is written.
    assert!(stderr.contains(&format!("run.toml:{line}:")), "expected line {line} in {stderr}");

    // A bad --set value names the override.
    let out = fusellm_in(&dir, &["validate", "run.toml", "--set", "train.steps=-2"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--set train.steps=-2: must be a positive integer, not -2"), "{stderr}");
}

/// Every file under `a` has the same bytes under `b`: the files a stage makes (a cache
/// folder's manifest of them is `fusellm run`'s, which a store made by `fusellm precompute`
/// does without, having its own).
fn assert_same_files(a: &Path, b: &Path) {
    let mut files = 0;
    for entry in std::fs::read_dir(a).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap() == fusellm_core::files::manifest::MANIFEST {
            continue;
        }
        let other = b.join(path.file_name().unwrap());
        if path.is_dir() {
            assert_same_files(&path, &other);
        } else {
            let same = std::fs::read(&path).unwrap() == std::fs::read(&other).unwrap_or_default();
            assert!(same, "{} and {} differ", path.display(), other.display());
        }
        files += 1;
    }
    assert!(files > 0, "{} is empty", a.display());
}

/// The subcommands are the stages of `fusellm run`: split, precompute, align, fuse and
/// train by hand, on what the run split, make the same bytes as the run.
#[test]
fn the_subcommands_make_what_run_makes() {
    let dir = experiment("by-hand");
    assert_ok(&fusellm_in(&dir, &["run", "run.toml"]));
    let record = run_record(&dir.join("out/run.json"));
    let output = |stage: &str| -> PathBuf {
        let found = record["stages"].as_array().unwrap().iter().find(|s| s["name"] == stage);
        PathBuf::from(found.unwrap_or_else(|| panic!("no stage {stage}"))["output"].as_str().unwrap())
    };
    let models = ["tiny-llama2", "tiny-mpt", "tiny-openllama"].map(|m| fixtures::model_dir(m).display().to_string());
    let by_hand = dir.join("by-hand");
    let path = |name: &str| by_hand.join(name).display().to_string();
    // The corpus as the run names it (absolute: the pieces record where they come from).
    let train = dir.join("train.jsonl").display().to_string();
    let mut split = vec!["split", "--input", &train, "--text-field", "question,answer"];
    for m in &models {
        split.extend(["--tokenizer", m]);
    }
    let pieces = path("pieces.jsonl");
    std::fs::create_dir_all(&by_hand).unwrap();
    assert_ok(&fusellm_in(&dir, &[&split[..], &["--max-len", "128", "--margin", "8", "--out", &pieces]].concat()));
    let run_pieces = output("split").join("pieces.jsonl");
    assert!(std::fs::read(&pieces).unwrap() == std::fs::read(&run_pieces).unwrap(), "the pieces differ");

    // On the run's pieces, since a store records the corpus it was made from.
    let corpus = run_pieces.display().to_string();
    for (m, name) in models.iter().zip(["tiny-llama2", "tiny-mpt", "tiny-openllama"]) {
        let out = path(&format!("store-{name}"));
        let args = ["precompute", "--model", m, "--corpus", &corpus, "--out", &out, "--docs-per-shard", "16"];
        assert_ok(&fusellm_in(&dir, &args));
        assert_same_files(&output(&format!("precompute-{name}")), Path::new(&out));
    }
    for name in ["tiny-mpt", "tiny-openllama"] {
        let (source, target, out) =
            (path(&format!("store-{name}")), path("store-tiny-llama2"), path(&format!("aligned-{name}")));
        assert_ok(&fusellm_in(&dir, &["align", "--source", &source, "--target", &target, "--out", &out]));
        assert_same_files(&output(&format!("align-{name}")), Path::new(&out));
    }
    // On the run's stores, since a fused store records the stores it was made from.
    let shown = |stage: &str| output(stage).display().to_string();
    let (target, fused) = (shown("precompute-tiny-llama2"), path("fused"));
    let (mpt, openllama) = (shown("align-tiny-mpt"), shown("align-tiny-openllama"));
    let fuse = ["fuse", "--target", &target, "--aligned", &mpt, "--aligned", &openllama, "--config", "run.toml"];
    assert_ok(&fusellm_in(&dir, &[&fuse[..], &["--out", &fused]].concat()));
    assert_same_files(&output("fuse"), Path::new(&fused));
    let trained = path("trained");
    assert_ok(&fusellm_in(&dir, &["train", "--config", "run.toml", "--fused", &fused, "--out", &trained]));
    let checkpoint = PathBuf::from(record["checkpoint"].as_str().unwrap());
    let in_run = checkpoint.strip_prefix(output("train")).unwrap();
    assert_same_files(&checkpoint, &Path::new(&trained).join(in_run));
}

/// Any number of sources works end to end: five, each with its own tokenizer family, fused
/// into tiny-llama2 (users of the official code ask for more than three).
#[test]
fn five_sources_fuse_end_to_end() {
    let dir = scratch("five");
    let sources = ["tiny-mpt", "tiny-openllama", "tiny-qwen2", "tiny-pythia", "tiny-llama3"];
    let model = |m: &str| fixtures::model_dir(m).display().to_string();
    let mut models = format!("[target]\nmodel = \"{}\"\n", model("tiny-llama2"));
    for s in sources {
        models += &format!("[[sources]]\nmodel = \"{}\"\n", model(s));
    }
    write_experiment(&dir, &models, 2);
    let out = fusellm_in(&dir, &["run", "run.toml"]);
    assert_ok(&out);
    let record = run_record(&dir.join("out/run.json"));
    let stages: Vec<&str> = record["stages"].as_array().unwrap().iter().map(|s| s["name"].as_str().unwrap()).collect();
    for s in sources {
        assert!(stages.contains(&format!("precompute-{s}").as_str()), "{stages:?}");
        assert!(stages.contains(&format!("align-{s}").as_str()), "{stages:?}");
    }
    assert!(bits_per_byte(&record, "trained").is_finite());
    // The fused store was made from all five aligned stores.
    let fuse = crate::common::stage_dir(&dir, "fuse");
    let meta = std::fs::read_to_string(fuse.join("fused.json")).unwrap_or_default()
        + &std::fs::read_to_string(fuse.join("store.json")).unwrap_or_default();
    for s in sources {
        assert!(meta.contains(s), "the fused store names {s}: {meta}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The names of a run record's stages, and whether each was reused.
fn stages_of(record: &serde_json::Value) -> Vec<(String, bool)> {
    let stages = record["stages"].as_array().unwrap();
    stages.iter().map(|s| (s["name"].as_str().unwrap().to_string(), s["reused"].as_bool().unwrap())).collect()
}

#[test]
fn fusechat_is_one_config_pairwise_fusion_then_a_merge() {
    let dir = experiment("fusechat");
    let config = std::fs::read_to_string(dir.join("run.toml")).unwrap()
        + "[merge]\nmethod = \"sce\"\n[merge.parameters]\nselect_topk = 0.5\n";
    std::fs::write(dir.join("run.toml"), config).unwrap();
    assert_ok(&fusellm_in(&dir, &["run", "run.toml"]));
    let record = run_record(&dir.join("out/run.json"));
    let names: Vec<String> = stages_of(&record).into_iter().map(|(n, _)| n).collect();
    // All sources fused and trained (FuseLLM), then each source alone (FuseChat), merged.
    for stage in ["fuse", "train", "train-tiny-mpt", "train-tiny-openllama", "merge", "eval"] {
        assert!(names.iter().any(|n| n == stage), "{stage} in {names:?}");
    }
    assert_eq!(names.iter().filter(|n| *n == "fuse").count(), 3, "{names:?}");
    for model in ["target-base", "trained", "pairwise-tiny-mpt", "pairwise-tiny-openllama", "merged"] {
        assert!(bits_per_byte(&record, model).is_finite(), "{model}");
    }
    // The merged model is the pairwise targets merged by `fusellm merge`'s SCE.
    let merged = PathBuf::from(record["checkpoint"].as_str().unwrap());
    let pairwise = |source: &str| {
        let train = stages_of(&record).iter().position(|(n, _)| n == &format!("train-{source}")).unwrap();
        let out = PathBuf::from(record["stages"][train]["output"].as_str().unwrap());
        let mut steps: Vec<PathBuf> =
            std::fs::read_dir(out.join("checkpoints")).unwrap().map(|e| e.unwrap().path()).collect();
        steps.sort();
        steps.pop().unwrap()
    };
    let yaml = format!(
        "merge_method: sce\nbase_model: {}\nparameters:\n  select_topk: 0.5\nmodels:\n  - model: {}\n  - model: {}\n",
        fixtures::model_dir("tiny-llama2").display(),
        pairwise("tiny-mpt").display(),
        pairwise("tiny-openllama").display()
    );
    std::fs::write(dir.join("merge.yml"), yaml).unwrap();
    assert_ok(&fusellm_in(&dir, &["merge", "--config", "merge.yml", "--out", "by-hand"]));
    let load =
        |d: &Path| candle_core::safetensors::load(d.join("model.safetensors"), &candle_core::Device::Cpu).unwrap();
    let (a, b) = (load(&merged), load(&dir.join("by-hand")));
    assert_eq!(a.len(), b.len());
    for (name, t) in &a {
        let diff = (t - &b[name]).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(diff, 0.0, "{name}");
    }
    // A second run reuses every stage, the merge too.
    assert_ok(&fusellm_in(&dir, &["run", "run.toml"]));
    let again = run_record(&dir.join("out/run.json"));
    assert!(stages_of(&again).iter().all(|(_, reused)| *reused), "{:?}", stages_of(&again));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_bad_merge_section_is_an_error_at_its_key() {
    let dir = experiment("bad-merge");
    let base = std::fs::read_to_string(dir.join("run.toml")).unwrap();
    let validate = |extra: &str| {
        std::fs::write(dir.join("run.toml"), format!("{base}{extra}")).unwrap();
        let out = fusellm_in(&dir, &["validate", "run.toml"]);
        assert!(!out.status.success(), "{extra}");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let e = validate("[merge]\nmethod = \"frankenmerge\"\n");
    assert!(e.contains("merge.method") && e.contains("frankenmerge") && e.contains("sce"), "{e}");
    let e = validate("[merge]\nmethod = \"ties\"\n[merge.parameters]\nepsilon = 0.1\n");
    assert!(e.contains("merge.parameters") && e.contains("epsilon") && e.contains("lambda"), "{e}");
    let e = validate("[merge]\nmethod = \"linear\"\n");
    assert!(e.contains("weight"), "{e}");
    let e = validate("[merge.models.tiny-pythia]\nweight = 1.0\n");
    assert!(e.contains("tiny-pythia") && e.contains("tiny-mpt"), "{e}");
    let e = validate("[train.lora]\nrank = 4\n[merge]\n");
    assert!(e.contains("[merge]") && e.contains("[train.lora]"), "{e}");
    let without_train = base.split("[train]").next().unwrap().to_string();
    std::fs::write(dir.join("run.toml"), format!("{without_train}[merge]\n")).unwrap();
    let out = fusellm_in(&dir, &["validate", "run.toml"]);
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("[merge]") && e.contains("[train]"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// FuseChat's MS mapping in a run: the host counts the aligned token pairs of the corpus
/// and the mapper maps by them. `vocab-map`, which has no corpus, says where MS works.
#[test]
fn the_ms_mapping_maps_by_the_corpus_s_aligned_pairs() {
    let dir = experiment("ms");
    let config = std::fs::read_to_string(dir.join("run.toml")).unwrap() + "[align.vocab]\nplugin = \"ms\"\n";
    std::fs::write(dir.join("run.toml"), config).unwrap();
    assert_ok(&fusellm_in(&dir, &["run", "run.toml"]));
    let record = run_record(&dir.join("out/run.json"));
    assert!(bits_per_byte(&record, "trained").is_finite());
    let align = crate::common::stage_dir(&dir, "align-tiny-mpt");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(align.join("report.json")).unwrap()).unwrap();
    assert_eq!(report["mapper"], "ms");
    // The random fixture sources put mass on tokens the corpus never aligns: unmapped by
    // default, MinED's match with `unaligned = "mined"`; exact matches are the same.
    let again = fusellm_in(&dir, &["run", "run.toml", "--set", "align.vocab.params.unaligned=mined"]);
    assert_ok(&again);
    let record = run_record(&dir.join("out/run.json"));
    let stage = record["stages"].as_array().unwrap().iter().find(|s| s["name"] == "align-tiny-mpt").unwrap();
    let with_mined: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(stage["output"].as_str().unwrap()).join("report.json")).unwrap(),
    )
    .unwrap();
    let mass = |r: &serde_json::Value, k: &str| r[k].as_f64().unwrap();
    assert!((mass(&report, "mass_exact") - mass(&with_mined, "mass_exact")).abs() < 1e-9);
    assert!(mass(&report, "mass_mined") > 0.0, "{report}");
    assert!(mass(&with_mined, "mass_lost") < mass(&report, "mass_lost") / 10.0, "{report} vs {with_mined}");
    let model = |m: &str| fixtures::model_dir(m).join("tokenizer.json").display().to_string();
    let out = fusellm_in(
        &dir,
        &[
            "vocab-map",
            "--source",
            &model("tiny-mpt"),
            "--target",
            &model("tiny-llama2"),
            "--method",
            "ms",
            "--out",
            "m.json",
        ],
    );
    let e = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && e.contains("co-occurrence") && e.contains("fusellm run"), "{e}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The tail bucket end to end: the fusion keeps each row's mass under its model's softmax,
/// the loss gives the rest one more outcome, and a reverse KL (refused with renormalised
/// targets) trains; its fusion part is a divergence, positive and finite at every step.
#[test]
fn a_reverse_kl_trains_with_the_tail_bucket() {
    let dir = experiment("tail");
    let settings = ["fusion.params.renormalize=false", "train.tail=\"bucket\"", "train.divergence=\"reverse_kl\""];
    let mut args = vec!["run", "run.toml"];
    for s in &settings {
        args.extend(["--set", s]);
    }
    assert_ok(&fusellm_in(&dir, &args));
    let record = run_record(&dir.join("out/run.json"));
    assert!(bits_per_byte(&record, "trained").is_finite());
    let metrics = std::fs::read_to_string(crate::common::stage_dir(&dir, "train").join("metrics.jsonl")).unwrap();
    for line in metrics.lines() {
        let fusion = serde_json::from_str::<serde_json::Value>(line).unwrap()["fusion"].as_f64().unwrap();
        assert!(fusion.is_finite() && fusion > 0.0, "{line}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
