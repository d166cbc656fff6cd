//! Evaluation: perplexity, and bits per byte, which does not depend on the tokenizer, so
//! that models with different vocabularies compare fairly; multiple-choice accuracy by
//! log-likelihood in the lm-evaluation-harness convention; and ensembles, whose next-token
//! distribution is the average of their members' (only the gold token's probability is
//! needed, so a mixture costs its members' passes and nothing more).

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Context, Error, Result};
use crate::model::{rowwise, Transformer};
use crate::tokenizer::Tokenizer;

/// The summed negative log-likelihood of a model over a set of texts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Score {
    /// Tokens predicted.
    pub tokens: u64,
    /// UTF-8 bytes of the texts.
    pub bytes: u64,
    /// Total negative log-likelihood, in nats.
    pub nll: f64,
}

impl Score {
    pub fn perplexity(&self) -> f64 {
        (self.nll / self.tokens.max(1) as f64).exp()
    }

    pub fn bits_per_byte(&self) -> f64 {
        self.nll / std::f64::consts::LN_2 / self.bytes.max(1) as f64
    }
}

/// A model as evaluation uses it.
pub struct Scorer<'a> {
    pub model: &'a Transformer,
    pub tokenizer: &'a Tokenizer,
    /// Longest sequence per pass (at most the model's positions).
    pub window: usize,
    /// Padded tokens per batch.
    pub batch_tokens: usize,
}

impl Scorer<'_> {
    /// Per text, the NLL of each token after the first: the text tokenized as the model's
    /// pipeline does (BOS first where it has one), cut into windows that overlap by one token
    /// so that every token is predicted exactly once.
    pub fn text_nlls(&self, texts: &[String]) -> Result<Vec<Vec<f32>>> {
        let window = self.window.min(self.model.spec().max_positions);
        if window < 2 {
            return Err(Error::msg(format!(
                "an evaluation window of {window} tokens predicts nothing; use at least 2"
            )));
        }
        let mut windows = Vec::new();
        let mut owner = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let ids = self.tokenizer.encode(text)?;
            let mut start = 0;
            while start + 1 < ids.len() {
                let end = (start + window).min(ids.len());
                windows.push(ids[start..end].to_vec());
                owner.push(i);
                start = end - 1;
            }
        }
        let mut out = vec![Vec::new(); texts.len()];
        for (w, nll) in self.sequence_nlls(&windows)?.into_iter().enumerate() {
            out[owner[w]].extend(nll);
        }
        Ok(out)
    }

    /// The NLL of every token after the first of each sequence, in batches of similar length.
    pub fn sequence_nlls(&self, sequences: &[Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let mut order: Vec<usize> = (0..sequences.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(sequences[i].len()));
        let mut out = vec![Vec::new(); sequences.len()];
        let mut i = 0;
        while i < order.len() {
            let len = sequences[order[i]].len().max(2);
            let n = (self.batch_tokens / len).clamp(1, order.len() - i);
            let batch: Vec<&Vec<u32>> = order[i..i + n].iter().map(|&j| &sequences[j]).collect();
            for (j, nll) in order[i..i + n].iter().zip(self.batch_nlls(&batch)?) {
                out[*j] = nll;
            }
            i += n;
        }
        Ok(out)
    }

    /// Right-padded; one forward pass ([`Transformer::map_positions`]).
    fn batch_nlls(&self, batch: &[&Vec<u32>]) -> Result<Vec<Vec<f32>>> {
        let seqs: Vec<&[u32]> = batch.iter().map(|s| s.as_slice()).collect();
        let nlls = self.model.map_positions(&seqs, |b, t, z| {
            seqs[b].get(t + 1).map(|&next| rowwise::log_sum_exp(z, 1.0) - z[next as usize])
        })?;
        Ok(nlls.into_iter().map(|nll| nll.into_iter().flatten().collect()).collect())
    }

    /// Per choice, the NLL of each token of its continuation after `context`, as the
    /// lm-evaluation-harness cuts it: the tokens of `context + choice` after those of
    /// `context` alone. A choice's log-likelihood is minus their sum.
    pub fn choice_nlls(&self, question: &Question) -> Result<Vec<Vec<f32>>> {
        let context = self.tokenizer.encode(&question.context)?;
        let sequences = question
            .choices
            .iter()
            .map(|c| self.tokenizer.encode(&format!("{}{c}", question.context)))
            .collect::<Result<Vec<_>>>()?;
        let nlls = self.sequence_nlls(&sequences)?;
        Ok(nlls.into_iter().map(|nll| nll.into_iter().skip(context.len().saturating_sub(1)).collect()).collect())
    }
}

/// A choice's log-likelihood from its continuation's NLLs.
pub fn loglik(nlls: &[f32]) -> f64 {
    -nlls.iter().map(|&x| x as f64).sum::<f64>()
}

/// Sums per-text NLLs into a score over texts of `bytes` bytes. A set that predicts no
/// token, and an NLL that is not a number, are errors: neither is a score.
pub fn score(nlls: &[Vec<f32>], bytes: u64) -> Result<Score> {
    let nll: f64 = nlls.iter().flatten().map(|&x| x as f64).sum();
    let tokens = nlls.iter().map(|n| n.len() as u64).sum();
    if tokens == 0 || bytes == 0 {
        return Err(Error::msg(format!(
            "the evaluation set has no token to predict ({} texts, {bytes} bytes): give it texts of at least two tokens",
            nlls.len()
        )));
    }
    if !nll.is_finite() {
        return Err(non_finite("negative log-likelihood", nll));
    }
    Ok(Score { tokens, bytes, nll })
}

/// The error of a metric that came out NaN or infinite.
fn non_finite(what: &str, value: f64) -> Error {
    Error::msg(format!(
        "the model's {what} is {value}: its weights or its computation produced NaN or Inf (check the checkpoint with `fusellm validate`, or evaluate in f32)"
    ))
}

/// The NLLs of an ensemble: per token `-log(mean_i exp(-nll_i))`. The members must have
/// tokenized alike (the same tokenizer), so their NLL vectors line up.
pub fn mixture(members: &[Vec<Vec<f32>>]) -> Result<Vec<Vec<f32>>> {
    let first = members.first().ok_or_else(|| Error::msg("an ensemble needs at least one member"))?;
    if members.iter().any(|m| m.len() != first.len() || m.iter().zip(first).any(|(a, b)| a.len() != b.len())) {
        return Err(Error::msg("ensemble members tokenized the texts differently; an ensemble averages next-token distributions, so its members must share a tokenizer"));
    }
    let n = members.len() as f64;
    Ok((0..first.len())
        .map(|t| {
            (0..first[t].len())
                .map(|p| {
                    let nlls: Vec<f64> = members.iter().map(|m| m[t][p] as f64).collect();
                    let lo = nlls.iter().copied().fold(f64::INFINITY, f64::min);
                    (lo - (nlls.iter().map(|x| (lo - x).exp()).sum::<f64>() / n).ln()) as f32
                })
                .collect()
        })
        .collect())
}

/// A multiple-choice question: `{"context": ..., "choices": [...], "answer": index}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Question {
    pub context: String,
    pub choices: Vec<String>,
    pub answer: usize,
}

/// Reads questions from JSONL, naming the file and line of a bad one.
pub fn read_questions(path: &Path) -> Result<Vec<Question>> {
    let text = std::fs::read_to_string(path).context(|| format!("reading {}", path.display()))?;
    let questions = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, line)| {
            let q: Question = serde_json::from_str(line).map_err(|e| {
                Error::msg(format!(
                    "{}:{}: {e}; expected {{\"context\", \"choices\", \"answer\"}}",
                    path.display(),
                    i + 1
                ))
            })?;
            if let Some(c) = q.choices.iter().position(|c| c.is_empty()) {
                return Err(Error::msg(format!(
                    "{}:{}: choice {c} is empty, which has no token to score; give every choice its text",
                    path.display(),
                    i + 1
                )));
            }
            match q.answer < q.choices.len() {
                true => Ok(q),
                false => Err(Error::msg(format!(
                    "{}:{}: answer {} but only {} choices",
                    path.display(),
                    i + 1,
                    q.answer,
                    q.choices.len()
                ))),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    if questions.is_empty() {
        return Err(Error::msg(format!(
            "{} holds no question; expected JSONL of {{\"context\", \"choices\", \"answer\"}}",
            path.display()
        )));
    }
    Ok(questions)
}

/// Accuracy (`acc`, the highest log-likelihood) and length-normalised accuracy (`acc_norm`,
/// the highest log-likelihood per byte of the choice).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Accuracy {
    pub questions: usize,
    pub acc: f64,
    pub acc_norm: f64,
}

pub fn accuracy(questions: &[Question], logliks: &[Vec<f64>]) -> Result<Accuracy> {
    if let Some(&bad) = logliks.iter().flatten().find(|l| !l.is_finite()) {
        return Err(non_finite("log-likelihood of a choice", bad));
    }
    let argmax = |v: Vec<f64>| v.iter().enumerate().fold(0, |best, (i, &x)| if x > v[best] { i } else { best });
    let (mut acc, mut norm) = (0, 0);
    for (q, ll) in questions.iter().zip(logliks) {
        acc += usize::from(argmax(ll.clone()) == q.answer);
        let per_byte = ll.iter().zip(&q.choices).map(|(l, c)| l / c.len().max(1) as f64).collect();
        norm += usize::from(argmax(per_byte) == q.answer);
    }
    let n = questions.len().max(1) as f64;
    Ok(Accuracy { questions: questions.len(), acc: acc as f64 / n, acc_norm: norm as f64 / n })
}
