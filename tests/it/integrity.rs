//! Integrity (issue 19): one run at a time on a run folder.

use std::path::PathBuf;
use std::process::Command;

use crate::common::{fixtures, stage_dir, write_experiment};

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fusellm-integrity-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn experiment(name: &str) -> PathBuf {
    let dir = scratch(name);
    let model = |m: &str| fixtures::model_dir(m).display().to_string();
    let models =
        format!("[target]\nmodel = \"{}\"\n[[sources]]\nmodel = \"{}\"\n", model("tiny-llama2"), model("tiny-mpt"));
    write_experiment(&dir, &models, 4);
    dir
}

/// A second `fusellm run` of the folder while the first holds it is refused with the
/// holder's pid; the first computes every stage once, and metrics.jsonl has each step once.
#[test]
fn a_second_run_on_a_folder_in_use_is_refused_with_the_holder() {
    let dir = experiment("lock");
    let mut first =
        Command::new(env!("CARGO_BIN_EXE_fusellm")).current_dir(&dir).args(["run", "run.toml"]).spawn().unwrap();
    let lock = dir.join("out/cache/.fusellm.lock");
    let started = std::time::Instant::now();
    while !std::fs::read_to_string(&lock).is_ok_and(|t| t.contains("pid")) {
        assert!(started.elapsed().as_secs() < 60, "the first run never took the lock");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let second = crate::common::fusellm_in(&dir, &["run", "run.toml"]);
    let message = String::from_utf8_lossy(&second.stderr);
    assert!(!second.status.success(), "the second run went on: {message}");
    assert!(message.contains("is in use by") && message.contains(&format!("pid {}", first.id())), "{message}");
    assert!(first.wait().unwrap().success());
    let steps: Vec<u64> = std::fs::read_to_string(stage_dir(&dir, "train").join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["step"].as_u64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2, 3, 4]);
    // Released: a third run reuses every stage.
    let third = crate::common::fusellm_in(&dir, &["run", "run.toml"]);
    assert!(third.status.success(), "{}", String::from_utf8_lossy(&third.stderr));
}

/// The stages' records of the run of `dir`: (name, reused).
fn reused(dir: &std::path::Path) -> Vec<(String, bool)> {
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/run.json")).unwrap()).unwrap();
    let stages = record["stages"].as_array().unwrap().iter();
    stages.map(|s| (s["name"].as_str().unwrap().to_string(), s["reused"].as_bool().unwrap())).collect()
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// A model is its content: weights changed in place with their size and modification time
/// kept (as `cp -p` leaves them) make the stages that read it run again; the same model in
/// another folder reuses them.
#[test]
fn a_model_is_known_by_its_content_not_its_file_times_or_place() {
    let dir = scratch("identity");
    let source = dir.join("models/mpt");
    copy_dir(&fixtures::model_dir("tiny-mpt"), &source);
    let model = |path: &std::path::Path| path.display().to_string();
    let models = |src: &std::path::Path| {
        format!(
            "[target]\nmodel = \"{}\"\n[[sources]]\nmodel = \"{}\"\n",
            model(&fixtures::model_dir("tiny-llama2")),
            model(src)
        )
    };
    write_experiment(&dir, &models(&source), 2);
    let run = || {
        let out = crate::common::fusellm_in(&dir, &["run", "run.toml"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        reused(&dir).into_iter().filter(|(name, _)| name.ends_with("-mpt")).map(|(_, r)| r).collect::<Vec<_>>()
    };
    assert_eq!(run(), [false, false], "precompute-mpt and align-mpt run");

    // One weight changed in place, the file's length and mtime as they were.
    let weights = source.join("model.safetensors");
    let mtime = std::fs::metadata(&weights).unwrap().modified().unwrap();
    let mut bytes = std::fs::read(&weights).unwrap();
    let at = bytes.len() - 64;
    bytes[at] ^= 0x01;
    std::fs::write(&weights, &bytes).unwrap();
    std::fs::File::options().write(true).open(&weights).unwrap().set_modified(mtime).unwrap();
    assert_eq!(std::fs::metadata(&weights).unwrap().modified().unwrap(), mtime);
    assert_eq!(run(), [false, false], "the edited model's stages were reused");

    // The same files in another folder: nothing to compute again.
    let moved = dir.join("elsewhere/mpt");
    copy_dir(&source, &moved);
    let config = std::fs::read_to_string(dir.join("run.toml")).unwrap();
    std::fs::write(dir.join("run.toml"), config.replace(&model(&source), &model(&moved))).unwrap();
    assert_eq!(run(), [true, true], "the moved model's stages ran again");
}

/// `fusellm run` of `dir` with fusellm's own cache (vocabulary maps, hashes) in `cache`.
fn run_cached(dir: &std::path::Path, cache: &std::path::Path) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_fusellm"))
        .current_dir(dir)
        .env("FUSELLM_CACHE", cache)
        .args(["run", "run.toml"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    out
}

fn eval_of(dir: &std::path::Path) -> serde_json::Value {
    let record: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("out/run.json")).unwrap()).unwrap();
    record["eval"].clone()
}

/// One byte changed in the middle of `file` (its length kept).
fn flip(file: &std::path::Path) -> Vec<u8> {
    let original = std::fs::read(file).unwrap();
    let mut bytes = original.clone();
    let at = bytes.len() / 2;
    bytes[at] ^= 0x01;
    std::fs::write(file, bytes).unwrap();
    original
}

fn files_below(dir: &std::path::Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(files_below(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// A byte flipped in each kind of cached output in turn (split pieces, a store shard, an
/// aligned shard, a fused shard, a checkpoint, the eval result; the vocabulary map of
/// fusellm's cache): the next run notices, makes that output again, and ends where the
/// clean run ended, the file restored byte for byte.
#[test]
fn a_damaged_cached_output_is_found_and_made_again() {
    let dir = experiment("faults");
    let cache = dir.join("fusellm-cache");
    run_cached(&dir, &cache);
    let clean = eval_of(&dir);
    let cached = |stage: &str, file: &str| stage_dir(&dir, stage).join(file);
    let outputs = [
        cached("split", "pieces.jsonl"),
        cached("precompute-tiny-mpt", "shard-00001.safetensors"),
        cached("align-tiny-mpt", "aligned-00001.safetensors"),
        cached("fuse", "fused-00001.safetensors"),
        cached("train", "checkpoints/step-0000004/model.safetensors"),
        cached("eval", "eval.json"),
    ];
    for file in &outputs {
        let original = flip(file);
        run_cached(&dir, &cache);
        assert_eq!(eval_of(&dir), clean, "after damage to {}", file.display());
        assert!(std::fs::read(file).unwrap() == original, "{} was not made again as it was", file.display());
    }

    // The vocabulary map lives in fusellm's cache, read when a source is aligned.
    let map = files_below(&cache).into_iter().find(|f| f.to_string_lossy().contains("vocab")).expect("a cached map");
    flip(&map);
    std::fs::remove_dir_all(stage_dir(&dir, "align-tiny-mpt")).unwrap();
    let out = run_cached(&dir, &cache);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(log.contains(&format!("{} is damaged", map.display())), "{log}");
    assert_eq!(eval_of(&dir), clean);
}

/// A corpus of pieces (JSONL, a `text` each) and the store of `model` over it, made by
/// `fusellm precompute` in `dir`.
fn store_of(dir: &std::path::Path, model: &str, name: &str) -> PathBuf {
    let corpus = dir.join("pieces.jsonl");
    if !corpus.exists() {
        let text = std::fs::read_to_string(fixtures::root().join("corpora/prose/tinyshakespeare.valid.txt")).unwrap();
        let lines: Vec<String> =
            text.split("\n\n").take(12).map(|t| serde_json::json!({ "text": t }).to_string()).collect();
        std::fs::write(&corpus, lines.join("\n")).unwrap();
    }
    let out = dir.join(name);
    let model = fixtures::model_dir(model).display().to_string();
    let args = ["precompute", "--model", &model, "--corpus", "pieces.jsonl", "--docs-per-shard", "4", "--out", name];
    let done = crate::common::fusellm_in(dir, &args);
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    out
}

/// Case 1 of the issue, outside `fusellm run`: `fusellm align` refuses a store that fails
/// `store verify` and names the shard and the repair; a precompute resumed in a store with
/// no manifest recomputes a corrupt shard instead of blessing it; `fusellm train` refuses
/// a fused shard that is not the one fused.json records; a garbage store.json fails
/// `store verify`.
#[test]
fn readers_refuse_damaged_stores_and_a_resumed_precompute_recomputes_a_corrupt_shard() {
    let dir = scratch("readers");
    let (target, source) = (store_of(&dir, "tiny-llama2", "target"), store_of(&dir, "tiny-mpt", "source"));
    let shard = source.join("shard-00001.safetensors");
    let original = flip(&shard);
    let align = ["align", "--source", "source", "--target", "target", "--out", "aligned"];
    let out = crate::common::fusellm_in(&dir, &align);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && message.contains("source/shard-00001.safetensors"), "{message}");
    assert!(message.contains("fusellm precompute"), "{message}");

    // Without the manifest the shard's own recorded hash finds it.
    std::fs::remove_file(source.join("manifest.json")).unwrap();
    store_of(&dir, "tiny-mpt", "source");
    assert!(std::fs::read(&shard).unwrap() == original, "the corrupt shard was kept");
    let verified = crate::common::fusellm_in(&dir, &["store", "verify", "source"]);
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stdout));

    // A fused shard changed after fuse.
    let out = crate::common::fusellm_in(&dir, &align);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(dir.join("fuse.toml"), "[fusion]\nplugin = \"min_ce\"\n").unwrap();
    let fuse = ["fuse", "--target", "target", "--aligned", "aligned", "--config", "fuse.toml", "--out", "fused"];
    let out = crate::common::fusellm_in(&dir, &fuse);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fused = dir.join("fused/fused-00001.safetensors");
    flip(&fused);
    let model = fixtures::model_dir("tiny-llama2").display().to_string();
    let config = format!("[target]\nmodel = \"{model}\"\n[train]\nsteps = 1\nbatch_size = 2\nseq_len = 64\n");
    std::fs::write(dir.join("train.toml"), config).unwrap();
    let train = ["train", "--config", "train.toml", "--fused", "fused", "--out", "run"];
    let out = crate::common::fusellm_in(&dir, &train);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && message.contains("fused/fused-00001.safetensors"), "{message}");
    assert!(message.contains("fusellm fuse"), "{message}");

    // store.json replaced by other JSON.
    std::fs::write(target.join("store.json"), b"{\"format\": \"garbage\"}").unwrap();
    let out = crate::common::fusellm_in(&dir, &["store", "verify", "target"]);
    let report = String::from_utf8_lossy(&out.stdout) + String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && report.contains("store.json"), "{report}");
}

/// tiny-mpt with one weight of `tensor` set to NaN, in `dir`.
fn nan_model(dir: &std::path::Path, tensor: &str) -> PathBuf {
    let out = dir.join("nan-mpt");
    copy_dir(&fixtures::model_dir("tiny-mpt"), &out);
    let file = out.join("model.safetensors");
    let mut tensors = candle_core::safetensors::load(&file, &candle_core::Device::Cpu).unwrap();
    let t = &tensors[tensor];
    let mut values = t.to_dtype(candle_core::DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
    values[3] = f32::NAN;
    let poisoned = candle_core::Tensor::from_vec(values, t.shape(), &candle_core::Device::Cpu).unwrap();
    tensors.insert(tensor.to_string(), poisoned.to_dtype(t.dtype()).unwrap());
    candle_core::safetensors::save(&tensors, &file).unwrap();
    out
}

/// Case 4: NaN is caught where it enters. A weight at load (named, with the opt-out named
/// too); with the opt-out, the store refuses the NaN log-probs; evaluation of such a model
/// is an error, not NaN bits per byte; an empty set, an empty multiple-choice file and an
/// empty choice are errors.
#[test]
fn nan_weights_and_empty_evaluation_sets_are_errors_where_they_enter() {
    let dir = scratch("nan");
    let model = nan_model(&dir, "transformer.blocks.0.ffn.up_proj.weight");
    let shown = model.display().to_string();
    std::fs::write(dir.join("pieces.jsonl"), "{\"text\": \"To be, or not to be, that is the question.\"}\n").unwrap();
    let precompute = ["precompute", "--model", &shown, "--corpus", "pieces.jsonl", "--out", "store"];
    let out = crate::common::fusellm_in(&dir, &precompute);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && message.contains("transformer.blocks.0.ffn.up_proj.weight"), "{message}");
    assert!(message.contains("FUSELLM_ALLOW_NONFINITE_WEIGHTS"), "{message}");

    let allowed = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_fusellm"))
            .current_dir(&dir)
            .env("FUSELLM_ALLOW_NONFINITE_WEIGHTS", "1")
            .args(args)
            .output()
            .unwrap()
    };
    let out = allowed(&precompute);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && message.contains("NaN or Inf"), "{message}");
    assert!(!dir.join("store/manifest.json").exists());

    std::fs::write(dir.join("text.jsonl"), "{\"text\": \"To be, or not to be, that is the question.\"}\n").unwrap();
    let out = allowed(&["eval", "--model", &shown, "--set", "prose=text.jsonl", "--out", "eval"]);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && message.contains("is NaN"), "{message}");

    let good = fixtures::model_dir("tiny-mpt").display().to_string();
    let eval = |set: &str, file: &str, content: &str| {
        std::fs::write(dir.join(file), content).unwrap();
        let out = crate::common::fusellm_in(&dir, &["eval", "--model", &good, set, &format!("x={file}"), "--out", "e"]);
        assert!(!out.status.success(), "{file}: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(eval("--set", "empty.jsonl", "").contains("no token to predict"));
    assert!(eval("--choices", "none.jsonl", "\n").contains("holds no question"));
    let blank = r#"{"context": "The sky is", "choices": ["blue", ""], "answer": 0}"#;
    assert!(eval("--choices", "blank.jsonl", blank).contains("choice 1 is empty"));
}

/// Case 5: an output never destroys an input. `split` into its input, `merge` into one of
/// its models, and a merge into a folder holding other files are refused, the inputs
/// untouched; merge weights must be finite and not all zero.
#[test]
fn an_output_that_is_an_input_is_refused_and_merge_weights_are_checked() {
    let dir = scratch("outputs");
    let corpus = dir.join("same.jsonl");
    std::fs::write(&corpus, "{\"text\": \"To be, or not to be, that is the question.\"}\n").unwrap();
    let before = std::fs::read(&corpus).unwrap();
    let tokenizer = fixtures::model_dir("tiny-llama2").join("tokenizer.json").display().to_string();
    let split = ["split", "--input", "same.jsonl", "--tokenizer", &tokenizer, "--out", "./same.jsonl"];
    let out = crate::common::fusellm_in(&dir, &split);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && message.contains("is the input same.jsonl"), "{message}");
    assert_eq!(std::fs::read(&corpus).unwrap(), before);

    let a = dir.join("a");
    copy_dir(&fixtures::model_dir("tiny-llama2"), &a);
    let weights = std::fs::read(a.join("model.safetensors")).unwrap();
    let merge = |more: &[&str]| {
        let args = [&["merge", "--model", "a", "--model", "a"][..], more].concat();
        crate::common::fusellm_in(&dir, &args)
    };
    let refused = |out: std::process::Output| {
        assert!(!out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    assert!(refused(merge(&["--out", "a"])).contains("is the input a"));
    assert!(refused(merge(&["--out", "."])).contains("holds the input a"));
    assert_eq!(std::fs::read(a.join("model.safetensors")).unwrap(), weights);
    assert!(refused(merge(&["--weights", "nan,0.5", "--out", "m"])).contains("finite"));
    assert!(refused(merge(&["--weights", "0,0", "--out", "m"])).contains("every merge weight is 0"));
    std::fs::create_dir_all(dir.join("busy")).unwrap();
    std::fs::write(dir.join("busy/notes.txt"), "mine").unwrap();
    assert!(refused(merge(&["--out", "busy"])).contains("notes.txt"));
    // A merge output is replaced whole by the next merge into it.
    assert!(merge(&["--out", "m"]).status.success());
    assert!(merge(&["--weights", "0.3,0.7", "--out", "m"]).status.success());
}

/// tiny-llama2 copied to `dir/name` with its config.json changed by `edit`.
fn edited_model(dir: &std::path::Path, name: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let out = dir.join(name);
    copy_dir(&fixtures::model_dir("tiny-llama2"), &out);
    let file = out.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&file, config.to_string()).unwrap();
    name.to_string()
}

/// `fusellm eval` of `model` on a one-line set, which must fail: its message.
fn eval_error(dir: &std::path::Path, model: &str) -> String {
    std::fs::write(dir.join("t.jsonl"), "{\"text\": \"To be, or not to be.\"}\n").unwrap();
    let out = crate::common::fusellm_in(dir, &["eval", "--model", model, "--set", "x=t.jsonl"]);
    assert!(!out.status.success(), "{model} was accepted");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Case 6: a checkpoint whose tensors and config.json disagree is refused: layers past the
/// config's count, its own LM head beside tied embeddings, a negative norm epsilon, an
/// integer norm tensor.
#[test]
fn a_checkpoint_that_disagrees_with_its_config_is_refused() {
    let dir = scratch("consistency");
    let fewer = edited_model(&dir, "fewer", |c| c["num_hidden_layers"] = 1.into());
    assert!(eval_error(&dir, &fewer).contains("holds layer 1") && eval_error(&dir, &fewer).contains("gives 1 layers"));
    let tied = edited_model(&dir, "tied", |c| c["tie_word_embeddings"] = true.into());
    assert!(eval_error(&dir, &tied).contains("holds its own `lm_head.weight`, which differs"));
    let eps = edited_model(&dir, "eps", |c| c["rms_norm_eps"] = (-1e-5).into());
    assert!(eval_error(&dir, &eps).contains("epsilon"));

    // model.norm.weight's bytes declared I32 (its size unchanged).
    let int = edited_model(&dir, "int", |_| {});
    let file = dir.join("int/model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["model.norm.weight"]["dtype"] = "I32".into();
    let mut text = header.to_string().into_bytes();
    text.resize(text.len().next_multiple_of(8), b' ');
    let rewritten = [&(text.len() as u64).to_le_bytes()[..], &text, &bytes[8 + n..]].concat();
    std::fs::write(&file, rewritten).unwrap();
    assert!(eval_error(&dir, &int).contains("`model.norm.weight` is stored as I32"));
}

/// Case 7: messages that point the right way. A bad corpus line under `fusellm run` names
/// the config key, not a flag of another command; `--set` values are named in errors found
/// after parsing too; fusing a store that was never aligned says to align it; a prompt
/// the tokenizer cannot encode says so.
#[test]
fn messages_point_at_what_to_change() {
    let dir = experiment("messages");
    let mut corpus = std::fs::read_to_string(dir.join("train.jsonl")).unwrap();
    corpus.insert_str(0, "{not json\n");
    std::fs::write(dir.join("bad.jsonl"), corpus).unwrap();
    let out = crate::common::fusellm_in(&dir, &["run", "run.toml", "--set", "data.corpus=[\"bad.jsonl\"]"]);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && message.contains("bad.jsonl:1: not valid JSON"), "{message}");
    assert!(message.contains("`skip_bad = true` in [data]") && !message.contains("--skip-bad"), "{message}");

    let out = crate::common::fusellm_in(&dir, &["validate", "run.toml", "--set", "fusion.plugin=nope"]);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("--set fusion.plugin=nope: unknown fusion plugin `nope`"), "{message}");

    let (target, source) = (store_of(&dir, "tiny-llama2", "target"), store_of(&dir, "tiny-mpt", "source"));
    let fuse = ["fuse", "--target", "target", "--aligned", "source", "--config", "run.toml", "--out", "fused"];
    let out = crate::common::fusellm_in(&dir, &fuse);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(message.contains("not yet aligned to the target: align it first"), "{message}");
    assert!(target.exists() && source.exists());

    // A tokenizer with no vocabulary at all.
    let empty = edited_model(&dir, "empty-vocab", |_| {});
    let file = dir.join("empty-vocab/tokenizer.json");
    let mut tokenizer: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    tokenizer["model"]["vocab"] = serde_json::json!({});
    tokenizer["model"]["merges"] = serde_json::json!([]);
    tokenizer["model"]["byte_fallback"] = false.into();
    tokenizer["model"]["unk_token"] = serde_json::Value::Null;
    tokenizer["added_tokens"] = serde_json::json!([]);
    tokenizer["post_processor"] = serde_json::Value::Null;
    std::fs::write(&file, tokenizer.to_string()).unwrap();
    let out = crate::common::fusellm_in(&dir, &["generate", "--model", &empty, "--prompt", "hello"]);
    let message = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && message.contains("encodes to no token"), "{message}");
}
