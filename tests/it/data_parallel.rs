//! Data-parallel training under `mpirun -np 2` (the binary built with `--features mpi`):
//! two ranks of micro-batch b compute what one rank of 2b computes, a resumed run with two
//! ranks is bit-identical to an uninterrupted one, and a rank that stops answering stops
//! the run within the collectives' timeout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};

use crate::common::{fixtures, fusellm_in, stage_dir, write_experiment};

/// An experiment folder with a fused store (one run of `fusellm run` that the tests share,
/// each training into a folder of its own), and the store.
fn fused_experiment() -> (PathBuf, PathBuf) {
    static EXPERIMENT: std::sync::OnceLock<(PathBuf, PathBuf)> = std::sync::OnceLock::new();
    EXPERIMENT.get_or_init(make_experiment).clone()
}

fn make_experiment() -> (PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("fusellm-dp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model = |m: &str| fixtures::model_dir(m).display().to_string();
    let models = format!(
        "[target]\nmodel = \"{}\"\n[[sources]]\nmodel = \"{}\"\n",
        model("tiny-llama2"),
        model("tiny-openllama")
    );
    write_experiment(&dir, &models, 1);
    let out = fusellm_in(&dir, &["run", "run.toml"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let fused = stage_dir(&dir, "fuse");
    (dir, fused)
}

/// `fusellm train` on the store, with `--set` overrides and more arguments, in `ranks`
/// processes under mpirun (or one plain process).
fn train(dir: &Path, fused: &Path, ranks: usize, out: &str, sets: &[&str], more: &[&str]) -> Output {
    let fused = fused.to_str().unwrap();
    let mut args: Vec<&str> = vec!["train", "--config", "run.toml", "--fused", fused, "--out", out];
    for set in sets {
        args.extend(["--set", set]);
    }
    args.extend(more);
    launch(dir, ranks, &[("RUST_LOG", "info")], &args)
}

/// The `fusellm` binary with `args` in `ranks` processes: `mpirun -np ranks`, or a plain
/// process for one rank.
fn launch(dir: &Path, ranks: usize, env: &[(&str, &str)], args: &[&str]) -> Output {
    let binary = env!("CARGO_BIN_EXE_fusellm");
    let mut command = match ranks {
        1 => Command::new(binary),
        n => {
            let mut c = mpirun(n, env);
            c.arg(binary);
            c
        }
    };
    run(command.current_dir(dir).args(args), env)
}

/// `mpirun -np ranks` as CI runs it: as root, on two cores, passing `env` on. (Containers
/// forbid the cross-memory attach of OpenMPI's shared-memory transport.)
fn mpirun(ranks: usize, env: &[(&str, &str)]) -> Command {
    let mut c = Command::new("mpirun");
    c.args(["-np", &ranks.to_string(), "--allow-run-as-root", "--oversubscribe"]);
    c.args(["--mca", "btl_vader_single_copy_mechanism", "none"]);
    for (key, _) in env {
        c.args(["-x", key]);
    }
    c
}

/// Runs `command` with `env`, one thread per rank so that the ranks do not compete for
/// the cores.
fn run(command: &mut Command, env: &[(&str, &str)]) -> Output {
    command.env("RAYON_NUM_THREADS", "1").envs(env.iter().copied());
    command.output().unwrap_or_else(|e| panic!("starting {command:?}: {e} (is OpenMPI installed? see .ci/run)"))
}

/// `fusellm train --fused <the store> args` on two ranks, each started through the shell
/// `script` (`"$0" "$@"` is the command; `$OMPI_COMM_WORLD_RANK` tells the ranks apart).
fn on_two_ranks(script: &str, env: &[(&str, &str)], args: &[&str]) -> Output {
    let (dir, fused) = fused_experiment();
    let binary = env!("CARGO_BIN_EXE_fusellm");
    let mut command = mpirun(2, env);
    command.current_dir(&dir).args(["sh", "-c", script, binary, "train", "--fused", fused.to_str().unwrap()]);
    run(command.args(args), env)
}

fn succeeded(out: &Output) {
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
}

fn losses(run: &Path) -> Vec<f64> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"].as_f64().unwrap())
        .collect()
}

fn weights(checkpoint: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(checkpoint.join("model.safetensors"), &Device::Cpu).unwrap()
}

/// The largest difference between two tensors, relative to the largest magnitude.
fn relative(a: &Tensor, b: &Tensor) -> f32 {
    let scale = a.abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap().max(1e-12);
    (a - b).unwrap().abs().unwrap().max_all().unwrap().to_scalar::<f32>().unwrap() / scale
}

/// The sums of the gradients run in another order on two ranks (two partial sums) than on
/// one, so the gradients agree to float rounding only. Adam's step `m / sqrt(v)` turns a
/// gradient within rounding of zero into a step of its sign, a full learning rate apart;
/// with `eps` above the rounding the step stays linear in the gradient, and the weights
/// then agree as the gradients do.
#[test]
fn two_ranks_of_b_train_as_one_rank_of_2b() {
    let (dir, fused) = fused_experiment();
    let common =
        ["train.steps=4", "train.accumulation=2", "train.seq_len=32", "train.checkpoint_every=4", "train.eps=1e-3"];
    succeeded(&train(&dir, &fused, 1, "one", &[&common[..], &["train.batch_size=4"]].concat(), &[]));
    succeeded(&train(&dir, &fused, 2, "two", &[&common[..], &["train.batch_size=2"]].concat(), &[]));
    // Rank 0 alone writes: one metrics line per step, not one per rank.
    trained_alike(&dir.join("one"), &dir.join("two"), 4);
}

/// Runs `a` and `b` logged `steps` losses each, equal within 1e-6 relative, and ended on
/// weights within 1e-6 relative.
fn trained_alike(a: &Path, b: &Path, steps: u64) {
    let (la, lb) = (losses(a), losses(b));
    assert_eq!((la.len(), lb.len()), (steps as usize, steps as usize));
    for (step, (x, y)) in la.iter().zip(&lb).enumerate() {
        assert!(
            (x - y).abs() <= 1e-6 * x.abs(),
            "step {}: loss {x} in {}, {y} in {}",
            step + 1,
            a.display(),
            b.display()
        );
    }
    let last = format!("checkpoints/step-{steps:07}");
    let (wa, wb) = (weights(&a.join(&last)), weights(&b.join(&last)));
    assert_eq!(wa.len(), wb.len());
    for (name, tensor) in &wa {
        let diff = relative(tensor, &wb[name]);
        assert!(diff <= 1e-6, "`{name}` differs by {diff} (relative) after {steps} steps");
    }
}

#[test]
fn a_resumed_run_of_two_ranks_is_bit_identical() {
    let (dir, fused) = fused_experiment();
    let sets = ["train.steps=4", "train.batch_size=2", "train.seq_len=32", "train.checkpoint_every=2"];
    succeeded(&train(&dir, &fused, 2, "whole", &sets, &[]));
    succeeded(&train(&dir, &fused, 2, "parts", &sets, &["--stop-at", "2"]));
    succeeded(&train(&dir, &fused, 2, "parts", &sets, &["--resume"]));
    let last = "checkpoints/step-0000004/model.safetensors";
    let (whole, parts) =
        (std::fs::read(dir.join("whole").join(last)).unwrap(), std::fs::read(dir.join("parts").join(last)).unwrap());
    assert!(whole == parts, "the resumed run's weights differ from the uninterrupted run's");
    assert_eq!(losses(&dir.join("whole")), losses(&dir.join("parts")));
}

/// A checkpoint of two ranks of batch 2 resumes on one rank of batch 4 (the same global
/// batch) and ends where a run of one rank of 4 ends; a resume that changes the global
/// batch is refused with the batch_size that keeps it.
#[test]
fn a_run_resumes_on_another_number_of_ranks_with_the_same_global_batch() {
    let (dir, fused) = fused_experiment();
    let common = ["train.steps=4", "train.seq_len=32", "train.checkpoint_every=2", "train.eps=1e-3"];
    let with = |batch: &'static str| [&common[..], &[batch]].concat();
    succeeded(&train(&dir, &fused, 1, "alone", &with("train.batch_size=4"), &[]));
    succeeded(&train(&dir, &fused, 2, "regrouped", &with("train.batch_size=2"), &["--stop-at", "2"]));
    let refused = train(&dir, &fused, 1, "regrouped", &with("train.batch_size=2"), &["--resume"]);
    let message = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && message.contains("global batch of 4"), "{message}");
    succeeded(&train(&dir, &fused, 1, "regrouped", &with("train.batch_size=4"), &["--resume"]));
    trained_alike(&dir.join("alone"), &dir.join("regrouped"), 4);
}

#[test]
fn a_rank_that_stops_answering_stops_the_run_within_the_timeout() {
    // Rank 1 is frozen (SIGSTOP) three seconds in, in the middle of a long run; rank 0 then
    // waits in a collective until the timeout and stops, and mpirun ends the job.
    let script = r#"if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then (sleep 3; kill -STOP $$) & fi; exec "$0" "$@""#;
    let sets = ["--set", "train.steps=100000", "--set", "train.seq_len=32", "--set", "train.checkpoint_every=100000"];
    let started = std::time::Instant::now();
    let args = [&["--config", "run.toml", "--out", "stall"][..], &sets].concat();
    let out = on_two_ranks(script, &[("FUSELLM_COLLECTIVE_TIMEOUT_S", "4")], &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the run went on: {stderr}");
    assert!(stderr.contains("rank 0: the") && stderr.contains("for the other ranks"), "{stderr}");
    assert!(started.elapsed().as_secs() < 120, "the run took {:?} to stop", started.elapsed());
}

#[test]
fn an_error_on_one_rank_stops_every_rank_with_that_error() {
    // Rank 1 alone is given a config that does not exist.
    let script =
        r#"c=run.toml; if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then c=/nonexistent.toml; fi; exec "$0" "$@" --config $c"#;
    let out = on_two_ranks(script, &[], &["--out", "error"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("error: rank 1 of 2:") && stderr.contains("/nonexistent.toml"), "{stderr}");
}

#[test]
fn ranks_with_other_settings_are_refused() {
    let script = r#"if [ "$OMPI_COMM_WORLD_RANK" = 1 ]; then set -- "$@" --set train.lr=0.5; fi; exec "$0" "$@""#;
    let out = on_two_ranks(script, &[], &["--config", "run.toml", "--out", "disagree"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("rank 1 trains with other settings or other data than rank 0"), "{stderr}");
}

#[test]
fn an_inconsistent_launch_environment_is_refused() {
    let (dir, fused) = fused_experiment();
    let fused = fused.to_str().unwrap();
    let args = ["train", "--config", "run.toml", "--fused", fused, "--out", "env"];
    let out = launch(&dir, 1, &[("RANK", "2"), ("WORLD_SIZE", "2")], &args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("RANK=2 and WORLD_SIZE=2"), "{stderr}");
    let run = launch(&dir, 1, &[("OMPI_COMM_WORLD_RANK", "0"), ("OMPI_COMM_WORLD_SIZE", "2")], &["run", "run.toml"]);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(!run.status.success() && stderr.contains("`fusellm run` runs in one process"), "{stderr}");
}

/// ZeRO stage 1 shards the optimizer state: the same updates as plain data parallelism
/// (the same bytes), one optimizer state in the checkpoint, which a run on another number
/// of ranks resumes from.
#[test]
fn zero_stage_1_trains_as_plain_data_parallelism() {
    let (dir, fused) = fused_experiment();
    let sets = ["train.steps=4", "train.batch_size=2", "train.seq_len=32", "train.checkpoint_every=2"];
    succeeded(&train(&dir, &fused, 2, "plain", &sets, &[]));
    let zero = [&sets[..], &["train.zero=1"]].concat();
    let sharded = train(&dir, &fused, 2, "zero", &zero, &[]);
    succeeded(&sharded);
    let log = String::from_utf8_lossy(&sharded.stderr);
    for rank in 0..2 {
        let line = log.lines().find(|l| l.contains(&format!("rank {rank} keeps the optimizer state of"))).expect(&log);
        let of: Vec<usize> = line.split_whitespace().filter_map(|w| w.trim_start_matches('(').parse().ok()).collect();
        assert!(of[0] < of[1] && of[2] < of[3], "rank {rank} keeps the whole state: {line}");
    }
    let last = "checkpoints/step-0000004";
    let bytes = |run: &str, file: &str| std::fs::read(dir.join(run).join(last).join(file)).unwrap();
    assert!(bytes("plain", "model.safetensors") == bytes("zero", "model.safetensors"), "ZeRO-1 changed the weights");
    let state = |run: &str| {
        let file = dir.join(run).join(last).join("optimizer.safetensors");
        candle_core::safetensors::load(file, &Device::Cpu).unwrap()
    };
    let (plain, zero_state) = (state("plain"), state("zero"));
    assert_eq!(plain.len(), zero_state.len(), "one whole optimizer state");
    for (key, tensor) in &plain {
        assert_eq!(relative(tensor, &zero_state[key]), 0.0, "`{key}` differs");
    }

    // Stopped at step 2 on two ranks with ZeRO, resumed on one (with the same global batch).
    succeeded(&train(&dir, &fused, 2, "moved", &zero, &["--stop-at", "2"]));
    succeeded(&train(&dir, &fused, 1, "moved", &[&zero[..], &["train.batch_size=4"]].concat(), &["--resume"]));
    assert!(dir.join("moved").join(last).join("model.safetensors").exists());
}

/// `fusellm precompute` under `mpirun -np 2`: each rank fills the shards of its rank (as
/// `--shard i/2` would), and the store is the one a single process writes, byte for byte;
/// `--shard` beside a multi-rank launch is refused.
#[test]
fn precompute_takes_its_shard_from_the_rank() {
    let (dir, _) = fused_experiment();
    let split = stage_dir(&dir, "split");
    let (pieces, model) = (split.join("pieces.jsonl"), fixtures::model_dir("tiny-llama2"));
    let store = |ranks: usize, out: &str, more: &[&str]| {
        let (model, pieces) = (model.to_str().unwrap(), pieces.to_str().unwrap());
        let args = [&["precompute", "--model", model, "--corpus", pieces, "--docs-per-shard", "4", "--out", out], more]
            .concat();
        launch(&dir, ranks, &[], &args)
    };
    succeeded(&store(1, "stores/one", &[]));
    succeeded(&store(2, "stores/two", &[]));
    let files = |out: &str| {
        let mut names: Vec<_> = std::fs::read_dir(dir.join(out)).unwrap().map(|e| e.unwrap().file_name()).collect();
        names.sort();
        names
    };
    assert!(files("stores/one").len() > 3, "{:?}", files("stores/one"));
    assert_eq!(files("stores/one"), files("stores/two"));
    for name in files("stores/one") {
        let read = |out: &str| std::fs::read(dir.join(out).join(&name)).unwrap();
        assert!(read("stores/one") == read("stores/two"), "{name:?} differs");
    }
    let both = store(2, "stores/both", &["--shard", "0/2"]);
    let stderr = String::from_utf8_lossy(&both.stderr);
    assert!(!both.status.success() && stderr.contains("give --shard or start ranks, not both"), "{stderr}");
}
