//! `fusellm eval` and `fusellm merge`.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use fusellm_core::eval::{accuracy, loglik, mixture, read_questions, score, Accuracy, Score, Scorer};
use fusellm_core::merge::{Merge, MergePlan};
use fusellm_core::model::LoadMode;
use fusellm_core::split::read_documents;
use serde::Serialize;

use crate::model_args::ModelArgs;

#[derive(Args)]
pub struct EvalArgs {
    /// Checkpoint folders to evaluate (repeatable).
    #[arg(long = "model", required = true)]
    models: Vec<PathBuf>,
    /// Also evaluate the models as one ensemble: the average of their next-token
    /// distributions (they must share a tokenizer).
    #[arg(long)]
    ensemble: bool,
    /// A text set, `NAME=FILE` (JSONL or plain text): perplexity and bits per byte.
    #[arg(long = "set")]
    sets: Vec<String>,
    /// A multiple-choice set, `NAME=FILE` (JSONL of {context, choices, answer}): acc, acc_norm.
    #[arg(long = "choices")]
    choices: Vec<String>,
    /// The JSON field(s) or Parquet column(s) holding the text of a set.
    #[arg(long, default_value = "text", value_delimiter = ',')]
    text_field: Vec<String>,
    #[arg(long, default_value_t = 1024)]
    window: usize,
    #[arg(long, default_value_t = 4096)]
    batch_tokens: usize,
    /// The dtype the model computes in (as `[run] dtype`; bf16 needs a CUDA device).
    #[arg(long, default_value = "f32")]
    dtype: fusellm_core::train::Precision,
    #[command(flatten)]
    open: ModelArgs,
    /// Where to write eval.json and eval.png.
    #[arg(long)]
    out: Option<PathBuf>,
}

#[derive(Serialize)]
struct Row {
    model: String,
    set: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    score: Option<Score>,
    #[serde(skip_serializing_if = "Option::is_none")]
    perplexity: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    bits_per_byte: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    accuracy: Option<Accuracy>,
}

fn named(spec: &str) -> Result<(String, PathBuf)> {
    spec.split_once('=')
        .map(|(n, p)| (n.to_string(), PathBuf::from(p)))
        .ok_or_else(|| anyhow::anyhow!("`{spec}`: expected NAME=FILE"))
}

pub fn eval(args: EvalArgs) -> Result<()> {
    if let Some(out) = &args.out {
        let inputs: Vec<&std::path::Path> = args.models.iter().map(|p| p.as_path()).collect();
        crate::check_output(out, &inputs)?;
    }
    let registry = args.open.plugins.registry()?;
    let device = args.open.device()?;
    let mut texts = Vec::new();
    for spec in &args.sets {
        let (name, file) = named(spec)?;
        texts.push((name, read_documents(&file, &args.text_field)?));
    }
    let questions = args
        .choices
        .iter()
        .map(|s| named(s).and_then(|(n, f)| Ok((n, read_questions(&f)?))))
        .collect::<Result<Vec<_>>>()?;
    let mut rows = Vec::new();
    // Per model: the NLLs of every set's texts and every question's choices, kept for the ensemble.
    // [set][text][token] and [choice set][question][choice][token].
    type Nlls = Vec<Vec<Vec<f32>>>;
    let mut members: Vec<(Nlls, Vec<Nlls>)> = Vec::new();
    let mut tokenizers = Vec::new();
    for dir in &args.models {
        let checkpoint = args.open.open(&registry, dir)?;
        let model = checkpoint.load_model(LoadMode::Frozen, args.dtype.dtype(), &device)?;
        let scorer = Scorer {
            model: &model,
            tokenizer: &checkpoint.tokenizer,
            window: args.window,
            batch_tokens: args.batch_tokens,
        };
        let label = dir.display().to_string();
        let mut set_nlls = Vec::new();
        for (name, set) in &texts {
            let nlls = scorer.text_nlls(set)?;
            rows.push(text_row(
                &label,
                name,
                score(&nlls, set.iter().map(|t| t.len() as u64).sum()).with_context(|| format!("{label} on {name}"))?,
            ));
            set_nlls.push(nlls);
        }
        let mut choice_nlls = Vec::new();
        for (name, qs) in &questions {
            let nlls = qs.iter().map(|q| scorer.choice_nlls(q)).collect::<fusellm_core::error::Result<Vec<_>>>()?;
            rows.push(choice_row(&label, name, qs, &nlls)?);
            choice_nlls.push(nlls);
        }
        members.push((set_nlls, choice_nlls));
        tokenizers.push(fusellm_core::files::file_sha256(&dir.join("tokenizer.json"))?);
    }
    if args.ensemble {
        if tokenizers.iter().any(|t| *t != tokenizers[0]) {
            anyhow::bail!("--ensemble averages next-token distributions, so its members must share a tokenizer; these have different tokenizer.json files");
        }
        for (s, (name, set)) in texts.iter().enumerate() {
            let nlls = mixture(&members.iter().map(|m| m.0[s].clone()).collect::<Vec<_>>())?;
            rows.push(text_row(
                "ensemble",
                name,
                score(&nlls, set.iter().map(|t| t.len() as u64).sum())
                    .with_context(|| format!("the ensemble on {name}"))?,
            ));
        }
        for (s, (name, qs)) in questions.iter().enumerate() {
            let nlls = (0..qs.len())
                .map(|q| mixture(&members.iter().map(|m| m.1[s][q].clone()).collect::<Vec<_>>()))
                .collect::<fusellm_core::error::Result<Vec<_>>>()?;
            rows.push(choice_row("ensemble", name, qs, &nlls)?);
        }
    }
    print_table(&rows);
    if let Some(out) = &args.out {
        write_outputs(out, &rows)?;
    }
    Ok(())
}

fn text_row(model: &str, set: &str, s: Score) -> Row {
    Row {
        model: model.into(),
        set: set.into(),
        score: Some(s),
        perplexity: Some(s.perplexity()),
        bits_per_byte: Some(s.bits_per_byte()),
        accuracy: None,
    }
}

fn choice_row(
    model: &str,
    set: &str,
    questions: &[fusellm_core::eval::Question],
    nlls: &[Vec<Vec<f32>>],
) -> Result<Row> {
    let logliks: Vec<Vec<f64>> = nlls.iter().map(|q| q.iter().map(|c| loglik(c)).collect()).collect();
    let accuracy = accuracy(questions, &logliks).with_context(|| format!("{model} on {set}"))?;
    Ok(Row {
        model: model.into(),
        set: set.into(),
        score: None,
        perplexity: None,
        bits_per_byte: None,
        accuracy: Some(accuracy),
    })
}

fn print_table(rows: &[Row]) {
    let cell = |v: Option<f64>| v.map_or("".to_string(), |v| format!("{v:.4}"));
    let rows = rows.iter().map(|r| {
        let accuracy = [r.accuracy.map(|a| a.acc), r.accuracy.map(|a| a.acc_norm)];
        [r.model.clone(), r.set.clone(), cell(r.bits_per_byte), cell(r.perplexity)]
            .into_iter()
            .chain(accuracy.map(cell))
            .collect()
    });
    print!("{}", fusellm_core::table::markdown(&["model", "set", "bits/byte", "perplexity", "acc", "acc_norm"], rows));
}

/// eval.json, and eval.png: bits per byte per set and model.
fn write_outputs(out: &std::path::Path, rows: &[Row]) -> Result<()> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    fusellm_core::files::write_atomically(&out.join("eval.json"), &serde_json::to_vec_pretty(rows).expect("JSON"))?;
    let sets = crate::run_cmd::unique(rows.iter().filter(|r| r.bits_per_byte.is_some()).map(|r| r.set.as_str()));
    let models = crate::run_cmd::unique(rows.iter().map(|r| r.model.as_str()));
    let series: Vec<(&str, Vec<f64>)> = models
        .iter()
        .map(|m| {
            (
                *m,
                sets.iter()
                    .map(|s| {
                        rows.iter()
                            .find(|r| r.model == *m && r.set == *s)
                            .and_then(|r| r.bits_per_byte)
                            .unwrap_or(f64::NAN)
                    })
                    .collect(),
            )
        })
        .collect();
    fusellm_core::files::write_atomically(
        &out.join("eval.png"),
        &fusellm_core::plot::bar_chart("bits per byte", &sets, &series, &[])?,
    )?;
    println!("{} and {}", out.join("eval.json").display(), out.join("eval.png").display());
    Ok(())
}

#[derive(Args)]
pub struct MergeArgs {
    /// A mergekit YAML (merge_method, models with parameters, base_model, parameters,
    /// dtype): mergekit's methods linear, task_arithmetic, ties, dare_linear, dare_ties,
    /// breadcrumbs, breadcrumbs_ties, slerp, sce, model_stock.
    #[arg(long, conflicts_with_all = ["models", "weights", "base"])]
    config: Option<PathBuf>,
    /// Checkpoints of one architecture (repeatable).
    #[arg(long = "model", required_unless_present = "config")]
    models: Vec<PathBuf>,
    /// One weight per model (default: the plain average).
    #[arg(long, value_delimiter = ',')]
    weights: Vec<f64>,
    /// Task arithmetic: merged = base + sum_i w_i (model_i - base).
    #[arg(long)]
    base: Option<PathBuf>,
    #[arg(long)]
    out: PathBuf,
}

pub fn merge(args: MergeArgs) -> Result<()> {
    if let Some(config) = &args.config {
        let plan = MergePlan::from_yaml(config)?;
        let inputs: Vec<&std::path::Path> =
            plan.models.iter().map(|m| m.dir.as_path()).chain(plan.base.as_deref()).collect();
        crate::check_output(&args.out, &inputs)?;
        plan.write(&args.out)?;
        eprintln!("merged {} models by {} into {}", plan.models.len(), plan.method.name(), args.out.display());
        return Ok(());
    }
    let inputs: Vec<&std::path::Path> = args.models.iter().map(|p| p.as_path()).chain(args.base.as_deref()).collect();
    crate::check_output(&args.out, &inputs)?;
    Merge { models: &args.models, weights: &args.weights, base: args.base.as_deref() }.write(&args.out)?;
    eprintln!("merged {} checkpoints into {}", args.models.len(), args.out.display());
    Ok(())
}
