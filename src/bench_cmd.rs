//! `fusellm bench ...`: benchmarks whose ratios are measured within one run.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use clap::{Args, Subcommand};
use fusellm_core::align::stage::Report;
use fusellm_core::align::vocab::{map_vocab, Vocabulary};
use fusellm_core::align::{DocumentAligner, Tokens};
use fusellm_core::files::{hex, sha256_hex};
use fusellm_core::model::loss::LossBatch;
use fusellm_core::model::Transformer;
use fusellm_core::pipeline::stage::Stage;
use fusellm_core::pipeline::stages::Precompute;
use fusellm_core::plugins::bench::{time_fusion, PAPER_SHAPE};
use fusellm_core::plugins::conformance::Shape;
use fusellm_core::plugins::{Configured, Entry, Registry, Tier};
use fusellm_core::store::{verify, Options};
use fusellm_core::tokenizer::Tokenizer;
use fusellm_core::train::Precision;
use fusellm_sdk::{CheckpointFiles, PluginKind, SparseRowsBuf};
use sha2::{Digest, Sha256};

/// Where and what the training benchmark trains.
#[derive(Args, Clone)]
pub struct TrainSetup {
    /// `cpu`, `cuda` or `cuda:N`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute dtype: f32, or bf16/f16 with f32 master weights (as `[train] dtype`).
    #[arg(long, default_value = "f32")]
    dtype: Precision,
    /// A Hugging Face Llama config.json to train instead of the small Llama (its vocabulary
    /// replaces --vocab).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The device's peak dense TFLOP/s in this dtype, for the model FLOP utilisation (989
    /// for an H100 or H200 in bf16).
    #[arg(long)]
    peak_tflops: Option<f64>,
    /// Recompute each block's activations in the backward (as `[train]
    /// checkpoint_activations`).
    #[arg(long)]
    checkpoint_activations: bool,
}

/// The batch of the model benchmarks.
#[derive(Args, Clone, Copy)]
pub struct BatchShape {
    #[arg(long, default_value_t = 32000)]
    vocab: usize,
    #[arg(long, default_value_t = 8)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq: usize,
}

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Precompute of one model over a split corpus: tokens per second, and bytes per token
    /// of the store beside the same data in the paper's layout (f16 logits and i64 ids,
    /// every document padded to max_len).
    Precompute {
        #[arg(long)]
        model: PathBuf,
        /// The pieces written by `fusellm split`.
        #[arg(long)]
        corpus: PathBuf,
        #[arg(long, default_value_t = 2048)]
        max_len: usize,
    },
    /// Alignment on the paper's 300 fixture documents (NeoX -> Llama-2), one thread, and
    /// the full MinED vocabulary map, side by side with the paper's code's timings.
    Align {
        /// The shared fixtures folder.
        #[arg(long, default_value = "../shared/fixtures")]
        fixtures: PathBuf,
    },
    /// Forward passes of a small Llama (f32, CPU): tokens per second.
    Forward {
        #[command(flatten)]
        shape: BatchShape,
        #[arg(long, default_value_t = 5)]
        iters: usize,
    },
    /// Training steps (forward, loss, backward, AdamW) of a small Llama, or of the Llama of
    /// `--config`: the CLM step, or with `--fusion` the FuseLLM step (CLM + the sparse fusion
    /// loss on a top-10 target). Run one configuration per process: the peak RSS is the
    /// process's.
    Train {
        #[command(flatten)]
        shape: BatchShape,
        #[command(flatten)]
        setup: TrainSetup,
        #[arg(long, default_value_t = 10)]
        iters: usize,
        #[arg(long)]
        fusion: bool,
        /// Measure only one path (for its peak RSS): `fused` or `composed`.
        #[arg(long)]
        only: Option<String>,
    },
    /// One fusion call (2048 positions x 3 candidates x top-10) in each tier.
    Plugins {
        /// The ce-fusion plugins built as a dylib.
        #[arg(long, default_value = "target/release/libfusellm_ce_fusion.so")]
        dylib: PathBuf,
        /// The ce-fusion plugins built as a WASM component.
        #[arg(long, default_value = "target/wasm32-wasip2/plugin-wasm/fusellm_ce_fusion.wasm")]
        wasm: PathBuf,
        #[arg(long, default_value_t = 200)]
        iters: usize,
        /// Positions per document (the paper: 2048).
        #[arg(long, default_value_t = PAPER_SHAPE.positions)]
        positions: usize,
    },
}

pub fn run(cmd: BenchCommand) -> Result<()> {
    match cmd {
        BenchCommand::Precompute { model, corpus, max_len } => precompute(&model, &corpus, max_len),
        BenchCommand::Align { fixtures } => align(&fixtures),
        BenchCommand::Forward { shape, iters } => forward(shape, iters),
        BenchCommand::Train { shape, setup, iters, fusion, only } => {
            train(shape, &setup, iters, fusion, only.as_deref())
        }
        BenchCommand::Plugins { dylib, wasm, iters, positions } => plugins(&dylib, &wasm, iters, positions),
    }
}

/// The small Llama of the benchmarks: 2 layers, d_model 128, 4 heads, SwiGLU of
/// `intermediate` (the training bench uses 512, as ../shared/bench/torch_step.py).
fn small_llama(vocab: usize, intermediate: usize) -> Result<fusellm_sdk::ModelSpec> {
    let config = serde_json::json!({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": 128, "intermediate_size": intermediate,
        "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5
    });
    llama_spec(&config.to_string())
}

/// The block-library spec of a Llama config.json, by the built-in llama adapter.
fn llama_spec(config_json: &str) -> Result<fusellm_sdk::ModelSpec> {
    let registry = Registry::with_builtins()?;
    let adapter = registry.get(PluginKind::Adapter, "llama")?;
    let files = CheckpointFiles { config_json, tokenizer_json: None };
    Ok(adapter.adapt(&adapter.resolve_params(&Default::default()).expect("no parameters"), files)?)
}

fn forward(shape: BatchShape, iters: usize) -> Result<()> {
    let BatchShape { vocab, batch, seq } = shape;
    let model = Transformer::init(&small_llama(vocab, 344)?, 0, 0.02, candle_core::DType::F32, &Device::Cpu)?;
    let ids: Vec<u32> = (0..batch * seq).map(|i| (i * 7919 % vocab) as u32).collect();
    let ids = Tensor::from_vec(ids, (batch, seq), &Device::Cpu)?;
    model.forward(&ids, None)?;
    let start = Instant::now();
    for _ in 0..iters.max(1) {
        std::hint::black_box(model.forward(&ids, None)?);
    }
    let per_pass = start.elapsed().as_secs_f64() / iters.max(1) as f64;
    println!(
        "forward, small Llama (2 layers, d_model 128, 4 heads, vocab {vocab}), batch {batch} x {seq}, f32 CPU: \
         {:.1} ms per pass, {:.0} tokens/s",
        per_pass * 1e3,
        (batch * seq) as f64 / per_pass
    );
    Ok(())
}

/// A batch of `batch x seq` tokens with, when `fusion`, a random top-10 target per position.
fn bench_batch(shape: BatchShape, fusion: bool) -> Result<LossBatch> {
    let BatchShape { vocab, batch, seq } = shape;
    let mut rng = fusellm_sdk::rng::Rng::new(1);
    let ids: Vec<u32> = (0..batch * seq).map(|_| rng.below(vocab as u32)).collect();
    let b = LossBatch::sequences(ids, batch)?;
    if !fusion {
        return Ok(b);
    }
    let k = 10;
    let target_ids: Vec<u32> =
        (0..batch * seq * k).map(|i| ((i / k) * 7919 + (i % k) * 131) as u32 % vocab as u32).collect();
    let target_probs = vec![0.1f32; batch * seq * k];
    Ok(b.with_target(target_ids, target_probs, k)?)
}

/// The benchmark's model: the small Llama of torch_step.py, or a config file's.
fn bench_model(shape: BatchShape, setup: &TrainSetup) -> Result<Transformer> {
    let spec = match &setup.config {
        None => small_llama(shape.vocab, 512)?,
        Some(path) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            llama_spec(&text)?
        }
    };
    let dtype = setup.dtype.dtype();
    Ok(Transformer::init(&spec, 0, 0.02, dtype, &fusellm_core::device::parse(&setup.device)?)?)
}

/// Model FLOPs of one training step per token: `6 N` for the N weights every token goes
/// through (the embedding lookup excluded) plus attention's `12 L d T` (PaLM's MFU).
fn flops_per_token(model: &Transformer, seq: usize) -> f64 {
    let spec = model.spec();
    let weights: usize =
        model.vars().iter().filter(|(name, _)| name != "embed.weight").map(|(_, v)| v.elem_count()).sum();
    let head = if spec.tied_embeddings { spec.vocab_size * spec.hidden } else { 0 };
    6.0 * (weights + head) as f64 + 12.0 * (spec.layers * spec.hidden * seq) as f64
}

/// The median milliseconds per training step (as torch_step.py reports) with the model's
/// kernels; under a launcher the gradients are all-reduced over its ranks, as the trainer
/// does (on a GPU, over NCCL, a world of one included).
fn step_ms(model: &Transformer, data: &LossBatch, run: &StepRun) -> Result<f64> {
    use fusellm_core::model::loss::Objective;
    use fusellm_core::train::optim::{AdamW, AdamWConfig};
    let objective = Objective { lambda: if run.fusion { 0.9 } else { 1.0 }, ..Default::default() };
    let mut optimizer = AdamW::new(model.vars(), AdamWConfig::default())?;
    let mut step = || -> Result<()> {
        let (_, grads) = model.gradients(data, &objective, 1.0, run.checkpointed)?;
        let grads = match run.comm {
            Some(comm) => fusellm_core::train::all_reduce_grads(comm, model.vars(), Some(grads))?,
            None => grads,
        };
        optimizer.step(model.vars(), &grads, 1.0, 1e-4)?;
        Ok(model.device().synchronize()?)
    };
    step()?;
    let mut times: Vec<f64> = (0..run.iters.max(1))
        .map(|_| {
            let start = Instant::now();
            // As the trainer runs its steps: on a worker of rayon's pool.
            rayon::scope(|_| step()).map(|()| start.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_>>()?;
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}

/// How the benchmark's steps run.
struct StepRun<'a> {
    iters: usize,
    fusion: bool,
    checkpointed: bool,
    /// The launcher's ranks, when launched.
    comm: Option<&'a dyn fusellm_dist::Communicator>,
}

fn train(shape: BatchShape, setup: &TrainSetup, iters: usize, fusion: bool, only: Option<&str>) -> Result<()> {
    let BatchShape { batch, seq, .. } = shape;
    let launch = fusellm_dist::Launch::from_env()?;
    let devices = match setup.device.starts_with("cuda") {
        true => fusellm_dist::Devices::Gpu,
        false => fusellm_dist::Devices::Cpu,
    };
    let comm = fusellm_dist::join(&launch, devices)?;
    let launched = launch.launcher != fusellm_dist::Launcher::None;
    let run = StepRun { iters, fusion, checkpointed: setup.checkpoint_activations, comm: launched.then_some(&*comm) };
    let mut how = String::new();
    if run.checkpointed {
        how += ", checkpointed activations";
    }
    if launched {
        let backend = if devices == fusellm_dist::Devices::Gpu { "NCCL" } else { "MPI" };
        how += &format!(", gradients all-reduced over {} rank(s) ({backend})", comm.world());
    }
    let what = if fusion { "CLM + sparse fusion, top-10" } else { "CLM" };
    use fusellm_core::model::Kernels;
    let paths: Vec<(&str, Kernels)> = match only {
        Some("fused") => vec![("fused", Kernels::Fused)],
        Some("composed") => vec![("composed", Kernels::Composed)],
        Some(other) => {
            anyhow::bail!("--only {other}: expected fused or composed")
        }
        None => vec![("composed", Kernels::Composed), ("fused", Kernels::Fused)],
    };
    let mut times = Vec::new();
    for (name, kernels) in &paths {
        let model = bench_model(shape, setup)?.with_kernels(*kernels);
        let spec = model.spec();
        let data = bench_batch(BatchShape { vocab: spec.vocab_size, ..shape }, fusion)?;
        let ms = step_ms(&model, &data, &run)?;
        let tokens_per_s = (batch * seq) as f64 / ms * 1e3;
        let tflops = flops_per_token(&model, seq) * tokens_per_s / 1e12;
        let mfu = setup.peak_tflops.map(|peak| format!(", MFU {:.1}%", 100.0 * tflops / peak)).unwrap_or_default();
        println!(
            "train step ({what}), Llama ({} layers, d_model {}, {} heads, SwiGLU {}, vocab {}), batch {batch} x {seq}, \
             {} {}, {name} kernels{how}: median {ms:.1} ms per step, {tokens_per_s:.0} tokens/s, {tflops:.2} model TFLOP/s{mfu}",
            spec.layers, spec.hidden, spec.attention.heads, spec.mlp.hidden, spec.vocab_size, setup.dtype, setup.device
        );
        times.push(ms);
    }
    if let [composed, fused] = times[..] {
        println!("fused / composed: {:.2}x the time", fused / composed);
    }
    let peak = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines().find(|l| l.starts_with("VmHWM:")).map(|l| l.trim_start_matches("VmHWM:").trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    println!("peak RSS of this process: {peak}");
    Ok(())
}

fn plugins(dylib: &Path, wasm: &Path, iters: usize, positions: usize) -> Result<()> {
    let shape = Shape { positions, ..PAPER_SHAPE };
    let builtin = Registry::with_builtins()?;
    let from_file = |tier, path: &Path| {
        let mut r = Registry::empty();
        r.load_file(tier, path)?;
        anyhow::Ok(r)
    };
    let tiers = [builtin, from_file(Tier::Dylib, dylib)?, from_file(Tier::Wasm, wasm)?];
    println!(
        "one fusion call: {} positions x {} candidates x top-{}, median of {iters} (release build recommended)",
        shape.positions, shape.candidates, shape.top_k
    );
    let mut table = crate::table::terminal(["plugin", "builtin", "dylib", "ratio", "wasm", "ratio"]);
    crate::table::align_right(&mut table, 1..6);
    for name in ["min_ce", "avg_ce"] {
        let mut micros = Vec::new();
        for registry in &tiers {
            let entry: &Entry = registry.get(PluginKind::Fusion, name)?;
            let params = entry.resolve_params(&Default::default())?;
            let t = time_fusion(entry, &params, shape, iters)?;
            micros.push(t.as_secs_f64() * 1e6);
        }
        table.add_row([
            name.to_string(),
            format!("{:.1} us", micros[0]),
            format!("{:.1} us", micros[1]),
            format!("{:.2}x", micros[1] / micros[0]),
            format!("{:.1} us", micros[2]),
            format!("{:.2}x", micros[2] / micros[0]),
        ]);
    }
    println!("{table}");
    Ok(())
}

/// One document of the paper's alignment set: ids and spans on both sides (the spans from
/// encoding its text again) and the source's top-10.
struct SetADoc {
    base: Vec<u32>,
    base_spans: Vec<u32>,
    blending: Vec<u32>,
    blending_spans: Vec<u32>,
    topk: SparseRowsBuf,
}

/// Spans of `ids` (a document's tokens plus its EOS) by encoding `text` again; the EOS is
/// a zero-width span at the end.
fn spans(tokenizer: &Tokenizer, text: &str, ids: &[u32]) -> Result<Vec<u32>> {
    let (again, mut spans) = tokenizer.encode_with_spans(text)?;
    if again.len() + 1 != ids.len() || again[..] != ids[..again.len()] {
        anyhow::bail!("the fixture's token ids differ from encoding its text again");
    }
    spans.extend([text.len() as u32; 2]);
    Ok(spans)
}

fn read_set_a(dir: &Path, base_tok: &Tokenizer, blending_tok: &Tokenizer) -> Result<Vec<SetADoc>> {
    let read =
        |name: &str| std::fs::read(dir.join(name)).with_context(|| format!("reading {}", dir.join(name).display()));
    let (logits, indices) = (read("synthetic_setA_blending_logits.f32")?, read("synthetic_setA_blending_indices.i32")?);
    let word = |bytes: &[u8], k: usize| <[u8; 4]>::try_from(&bytes[4 * k..4 * k + 4]).expect("4 bytes");
    let text = String::from_utf8(read("docs_setA.jsonl")?)?;
    let ids = |v: &serde_json::Value| {
        v.as_array().map(|a| a.iter().filter_map(|x| x.as_u64()).map(|x| x as u32).collect::<Vec<_>>())
    };
    let mut row = 0;
    text.lines()
        .map(|line| {
            let doc: serde_json::Value = serde_json::from_str(line)?;
            let (base, blending) =
                (ids(&doc["base_input_ids"]).unwrap_or_default(), ids(&doc["blending_input_ids"]).unwrap_or_default());
            let mut topk = SparseRowsBuf::with_capacity(blending.len(), 10 * blending.len());
            for _ in 0..blending.len() {
                let k = row * 10..row * 10 + 10;
                let ids: Vec<u32> = k.clone().map(|k| i32::from_le_bytes(word(&indices, k)) as u32).collect();
                let values: Vec<f32> = k.map(|k| f32::from_le_bytes(word(&logits, k))).collect();
                topk.push_row(&ids, &values);
                row += 1;
            }
            let text = doc["text"].as_str().unwrap_or_default();
            let (base_spans, blending_spans) = (spans(base_tok, text, &base)?, spans(blending_tok, text, &blending)?);
            Ok(SetADoc { base, base_spans, blending, blending_spans, topk })
        })
        .collect()
}

/// The fixture's digest of aligned outputs: per document, sha256 over its target
/// positions of (u32 count, i32 ids, f32 logits), then sha256 of the hex digests.
fn set_a_digest(outputs: &[SparseRowsBuf]) -> String {
    let mut all = String::new();
    for out in outputs {
        let mut h = Sha256::new();
        let rows = out.rows();
        for p in 0..rows.len() {
            let (ids, values) = rows.row(p);
            h.update((ids.len() as u32).to_le_bytes());
            ids.iter().for_each(|i| h.update((*i as i32).to_le_bytes()));
            values.iter().for_each(|v| h.update(v.to_le_bytes()));
        }
        all.push_str(&hex(&h.finalize()));
    }
    sha256_hex(all.as_bytes())
}

fn align(fixtures: &Path) -> Result<()> {
    let tokenizer =
        |name: &str| Vocabulary::from_tokenizer_json(&fixtures.join("tokenizers").join(name).join("tokenizer.json"));
    let (llama, neox) = (tokenizer("llama2")?, tokenizer("gpt-neox-20b")?);
    let registry = Registry::with_builtins()?;
    let timing: serde_json::Value = serde_json::from_slice(
        &std::fs::read(fixtures.join("alignment/timing_alignment_setA.json")).context("reading the paper's timings")?,
    )?;
    let paper = &timing["summary"];

    let mined = &Configured::named(&registry, PluginKind::VocabMapper, "mined")?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let start = Instant::now();
    let map = map_vocab(mined, &neox, &llama, true, None, None)?;
    let mined_s = start.elapsed().as_secs_f64();
    println!(
        "MinED map NeoX -> Llama-2 (50277 x 32000, compat), {threads} threads: {mined_s:.2} s; the paper's code: 568.4 s on one core ({:.0}x)",
        568.36 / mined_s
    );
    // The pairs of today's vocabularies, canonical strings (as `fusellm vocab-map` maps).
    let (llama3, qwen) = (tokenizer("llama3")?, tokenizer("qwen2.5")?);
    for (what, source, target) in [
        ("NeoX -> Llama-2", &neox, &llama),
        ("Llama 3 -> Qwen2.5", &llama3, &qwen),
        ("Qwen2.5 -> Llama 3", &qwen, &llama3),
    ] {
        let start = Instant::now();
        let map = map_vocab(mined, source, target, false, None, None)?;
        let unmatched = map.distance.iter().filter(|&&d| d > 0).count();
        println!(
            "MinED map {what} ({} x {}, canonical), {threads} threads: {:.2} s ({unmatched} tokens without an exact match)",
            source.tokens.len(),
            target.tokens.len(),
            start.elapsed().as_secs_f64()
        );
    }

    let open = |name: &str| Tokenizer::open(&fixtures.join("tokenizers").join(name).join("tokenizer.json"));
    let docs = read_set_a(&fixtures.join("alignment"), &open("llama2")?, &open("gpt-neox-20b")?)?;
    let tokens: usize = docs.iter().map(|d| d.base.len()).sum();
    let paper_rate = paper["transform_base_tokens_per_s"].as_f64().unwrap_or(f64::NAN);
    for (aligner_name, compat) in [("dtw", true), ("dtw", false), ("offsets", false)] {
        let entry = registry.get(PluginKind::SequenceAligner, aligner_name)?;
        let params = entry.resolve_params(&Default::default()).expect("defaults");
        let aligner = DocumentAligner::new(entry, params, &map, &neox, &llama, compat);
        let start = Instant::now();
        let outputs = docs
            .iter()
            .map(|d| {
                let source = Tokens { ids: &d.blending, spans: &d.blending_spans };
                aligner.align(source, Tokens { ids: &d.base, spans: &d.base_spans }, d.topk.rows())
            })
            .collect::<fusellm_core::error::Result<Vec<_>>>()?;
        let rate = tokens as f64 / start.elapsed().as_secs_f64();
        let mut report = Report::default();
        for (d, (_, path)) in docs.iter().zip(&outputs) {
            report.add(path, d.blending.len(), d.base.len(), d.topk.rows(), &map);
        }
        let report = report.finish();
        let outputs: Vec<SparseRowsBuf> = outputs.into_iter().map(|(rows, _)| rows).collect();
        print!(
            "{aligner_name} + projection ({}), {} documents, {tokens} target tokens, one thread: {rate:.0} tokens/s; \
             the paper's code: {paper_rate:.0} ({:.0}x)",
            if compat { "compat" } else { "corrected" },
            docs.len(),
            rate / paper_rate
        );
        let [positions, mass] = report.summary();
        print!("\n    {positions}; {mass}");
        if compat {
            let same = Some(set_a_digest(&outputs).as_str()) == paper["all_docs_sha256"].as_str();
            print!("; output identical to the paper's: {}", if same { "yes" } else { "NO" });
        }
        println!();
    }
    Ok(())
}

fn precompute(model_dir: &Path, corpus: &Path, max_len: usize) -> Result<()> {
    let registry = Registry::with_builtins()?;
    let options = Options::default();
    let dir = std::env::temp_dir().join(format!("fusellm-bench-store-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let start = Instant::now();
    let checkpoint = fusellm_core::checkpoint::Checkpoint::open(model_dir, &registry, None)?;
    let (device, dtype) = (&candle_core::Device::Cpu, Precision::F32);
    let precompute = Precompute { checkpoint: &checkpoint, corpus, options, device, dtype, worker: (0, 1) };
    let run = precompute.run(&dir, &mut |_| ())?;
    let secs = start.elapsed().as_secs_f64();
    let check = verify(&dir)?;
    let ours = check.bytes as f64 / check.tokens as f64;
    // The paper's forward_for_logits keeps, per document padded to max_len: top-k logits
    // (f16) and indices (i64), input ids and attention mask (i64), and a CE (f32).
    let paper = run.documents as f64 * (max_len * (options.k * (2 + 8) + 8 + 8) + 4) as f64 / check.tokens as f64;
    println!(
        "precompute {} over {} documents ({} tokens), f32 CPU: {:.0} tokens/s; store: {ours:.1} bytes per token, \
         the paper's layout (padded to {max_len}): {paper:.1} bytes per token ({:.1}x smaller)",
        model_dir.display(),
        run.documents,
        run.tokens,
        run.tokens as f64 / secs,
        paper / ours
    );
    std::fs::remove_dir_all(&dir).with_context(|| format!("removing {}", dir.display()))
}
