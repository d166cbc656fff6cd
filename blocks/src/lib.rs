//! fusellm-blocks, the block library: executes any [`ModelSpec`] on candle, CPU or CUDA,
//! with every operation differentiable, returning the logits of all positions (no KV
//! cache: this is the training and precompute path). The model (`lib.rs`, `layers`,
//! `attention`, `positions`, `weights`), the training objective (`loss`, `terms`,
//! `head_loss`, `entry_nll`) and the kernels (`fused/`, `cuda`, `gemm`, `rowwise`) are
//! separate modules; the crate depends on candle and the SDK only.

mod attention;
pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod divergence;
pub mod entry_nll;
pub mod error;
mod fused;
mod gemm;
pub mod generate;
mod head_loss;
mod layers;
pub mod lora;
pub mod loss;
pub mod ops;
pub mod positions;
pub mod rowwise;
mod simd;
mod terms;
pub mod weights;

use std::path::Path;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use fusellm_sdk::adapter::{Positions, Residual};
use fusellm_sdk::ModelSpec;
use rayon::prelude::*;

use attention::{Attention, Context};
use layers::{Mlp, Norm};
use lora::{AdapterSource, LoraSpec};
use loss::{LossBatch, Losses, Objective};
pub use ops::Kernels;
pub use weights::LoadMode;
use weights::Weights;

use crate::error::{Error, Result};

/// Logits held at once on the host by the kernels that walk them in chunks of rows (the
/// head's loss, [`Transformer::map_positions`]): 32 MB, small enough to stay in cache
/// between a chunk's GEMMs and for the allocator to reuse the buffer.
const HOST_CHUNK_ELEMENTS: usize = 8 << 20;

struct Block {
    attn_norm: Norm,
    attn: Attention,
    mlp_norm: Norm,
    mlp: Mlp,
    /// Sandwich norms of the attention's and the MLP's outputs (Gemma 2, 3).
    post_norms: Option<(Norm, Norm)>,
}

impl Block {
    fn load(w: &mut Weights, i: usize, spec: &ModelSpec) -> Result<Self> {
        let (d, norm) = (spec.hidden, spec.norm);
        let post_norms = match spec.post_norms {
            true => Some((
                Norm::load(w, "layers.{i}.attn_post_norm", Some(i), norm, d)?,
                Norm::load(w, "layers.{i}.mlp_post_norm", Some(i), norm, d)?,
            )),
            false => None,
        };
        Ok(Block {
            attn_norm: Norm::load(w, "layers.{i}.attn_norm", Some(i), norm, d)?,
            attn: Attention::load(w, i, spec.attention, norm, d)?,
            mlp_norm: Norm::load(w, "layers.{i}.mlp_norm", Some(i), norm, d)?,
            mlp: Mlp::load(w, i, spec.mlp, d)?,
            post_norms,
        })
    }

    /// The block's residual update of `x` under the layer's context.
    fn forward(&self, x: Tensor, ctx: &Context, residual: Residual) -> candle_core::Result<Tensor> {
        let k = ctx.kernels;
        let post = |y: Tensor, which: fn(&(Norm, Norm)) -> &Norm| match &self.post_norms {
            Some(norms) => which(norms).forward(&y, k),
            None => Ok(y),
        };
        let mlp = |x: &Tensor| post(self.mlp.forward(&self.mlp_norm.forward(x, k)?, ctx)?, |n| &n.1);
        let attn = post(self.attn.forward(&self.attn_norm.forward(&x, k)?, ctx)?, |n| &n.0)?;
        match residual {
            Residual::Sequential => {
                let x = (x + attn)?;
                let mlp = mlp(&x)?;
                x + mlp
            }
            Residual::Parallel => {
                let mlp = mlp(&x)?;
                (x + attn)? + mlp
            }
        }
    }
}

/// A causal language model built from a spec and a checkpoint.
pub struct Transformer {
    spec: ModelSpec,
    embed: Tensor,
    pos_embed: Option<Tensor>,
    blocks: Vec<Block>,
    final_norm: Norm,
    head: Tensor,
    device: Device,
    vars: Vec<(String, Var)>,
    /// The LoRA adapters' spec when the model is adapted: its `vars` are then the
    /// adapters' only.
    lora: Option<LoraSpec>,
    kernels: Kernels,
}

impl Transformer {
    /// Loads the weights of `dir` for `spec`. `dtype` is the compute dtype: f32 anywhere;
    /// bf16 and f16 where the device supports them.
    pub fn load(dir: &Path, spec: &ModelSpec, mode: LoadMode, dtype: DType, device: &Device) -> Result<Self> {
        check_dtype(dtype, device)?;
        spec.check().map_err(Error::msg)?;
        Self::build(Weights::open(dir, spec, mode, dtype, device)?)
    }

    /// The weights of `dir` with LoRA adapters on the projections `lora` targets, the
    /// weights `Frozen` (or `HeadersOnly`, to check that the targets exist): the adapters
    /// fresh and trainable from `AdapterSource::Init` (the model's only parameters), or
    /// frozen from a saved adapter.
    pub fn load_adapted(
        dir: &Path,
        spec: &ModelSpec,
        (lora, source): (&LoraSpec, AdapterSource),
        mode: LoadMode,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        check_dtype(dtype, device)?;
        spec.check().map_err(Error::msg)?;
        Self::build(Weights::open(dir, spec, mode, dtype, device)?.adapted(lora, source))
    }

    /// A freshly initialised, trainable model in `dtype`: matrices N(0, std^2) from `seed`,
    /// unit norm weights, zero biases.
    pub fn init(spec: &ModelSpec, seed: u64, std: f64, dtype: DType, device: &Device) -> Result<Self> {
        check_dtype(dtype, device)?;
        spec.check().map_err(Error::msg)?;
        Self::build(Weights::random(spec, seed, std, dtype, device))
    }

    /// Writes the trainable weights as safetensors under their checkpoint names.
    pub fn save_weights(&self, path: &Path) -> Result<()> {
        if self.vars.is_empty() {
            return Err(Error::msg("only a trainable model can be saved (load it with LoadMode::Trainable)"));
        }
        let tensors: std::collections::HashMap<String, Tensor> =
            self.vars.iter().map(|(name, var)| (name.clone(), var.as_tensor().clone())).collect();
        candle_core::safetensors::save(&tensors, path)
            .map_err(|e| Error::context(format!("writing {}", path.display()), e))
    }

    fn build(mut w: Weights) -> Result<Self> {
        let spec = &w.spec().clone();
        let device = &w.device().clone();
        let (v, d) = (spec.vocab_size, spec.hidden);
        let embed = w.get("embed.weight", None, &[v, d])?;
        let pos_embed = match &spec.positions {
            Positions::Learned => Some(w.get("pos_embed.weight", None, &[spec.max_positions, d])?),
            _ => None,
        };
        let blocks = (0..spec.layers).map(|i| Block::load(&mut w, i, spec)).collect::<Result<Vec<_>>>()?;
        let final_norm = Norm::load(&mut w, "final_norm", None, spec.norm, d)?;
        // A tied head is the embedding; so is a missing one (transformers' fallback).
        let head = if spec.tied_embeddings || !w.contains("lm_head.weight", None) {
            embed.clone()
        } else {
            w.get("lm_head.weight", None, &[v, d])?
        };
        Ok(Self {
            spec: spec.clone(),
            embed,
            pos_embed,
            blocks,
            final_norm,
            head,
            device: device.clone(),
            lora: w.lora().cloned(),
            vars: w.into_vars()?,
            kernels: Kernels::default(),
        })
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The model running its ops with `kernels` (the fused ones unless told otherwise).
    pub fn with_kernels(self, kernels: Kernels) -> Self {
        Self { kernels, ..self }
    }

    /// The trainable parameters by checkpoint name (empty when loaded frozen; the
    /// adapters', under PEFT's names, when adapted).
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The spec of the model's LoRA adapters, if it has them.
    pub fn lora(&self) -> Option<&LoraSpec> {
        self.lora.as_ref()
    }

    /// Logits `[b, t, vocab]` (f32) for token ids `[b, t]` (u32); `keep: [b, t]` marks
    /// real tokens (1) and padding (0) when sequences are padded.
    pub fn forward(&self, ids: &Tensor, keep: Option<&Tensor>) -> Result<Tensor> {
        self.logits(&self.hidden(ids, keep, None)?)
    }

    /// The head's logits (f32) of hidden states, soft-capped where the model caps them.
    fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        let logits = self.kernels.linear(hidden, &self.head, None)?.to_dtype(DType::F32)?;
        Ok(match self.spec.final_softcap {
            Some(cap) => ops::soft_cap(&logits, cap)?,
            None => logits,
        })
    }

    /// One forward pass over `seqs` (right-padded to the longest), mapping the logits of
    /// every real position with `f(sequence, position, logits)` on all cores; returns each
    /// sequence's results in order. The logits (f32, on the host) are computed in chunks of
    /// rows of at most 32 MB: the full `[batch * len, V]` logits (gigabytes at a 50k
    /// vocabulary) never exist at once, and a chunk's buffer is small enough for the
    /// allocator to reuse.
    pub fn map_positions<T: Send>(
        &self,
        seqs: &[&[u32]],
        f: impl Fn(usize, usize, &[f32]) -> T + Sync,
    ) -> Result<Vec<Vec<T>>> {
        let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
        let (mut ids, mut keep) = (vec![0u32; seqs.len() * len], vec![0u32; seqs.len() * len]);
        for (row, seq) in seqs.iter().enumerate() {
            ids[row * len..row * len + seq.len()].copy_from_slice(seq);
            keep[row * len..row * len + seq.len()].fill(1);
        }
        let shape = (seqs.len(), len);
        let keep = keep.contains(&0).then(|| Tensor::from_vec(keep, shape, &self.device)).transpose()?;
        let hidden = self.hidden(&Tensor::from_vec(ids, shape, &self.device)?, keep.as_ref(), None)?.flatten_to(1)?;
        let (n, vocab) = (hidden.dim(0)?, self.spec.vocab_size);
        let rows = (HOST_CHUNK_ELEMENTS / vocab).max(1);
        let mut mapped: Vec<Option<T>> = Vec::with_capacity(n);
        for start in (0..n).step_by(rows) {
            let chunk = self.logits(&hidden.narrow(0, start, rows.min(n - start))?)?;
            cpu::with_host_f32s(&chunk, |z| {
                mapped.par_extend(z.par_chunks_exact(vocab).enumerate().map(|(i, logits)| {
                    let (s, p) = ((start + i) / len, (start + i) % len);
                    (p < seqs[s].len()).then(|| f(s, p, logits))
                }))
            })?;
        }
        let mut mapped = mapped.into_iter();
        Ok(seqs.iter().map(|_| mapped.by_ref().take(len).flatten().collect()).collect())
    }

    /// The training losses of `batch`: the forward pass to the final hidden states, then
    /// the head and the objective together ([`Objective::losses_at_head`]).
    pub fn losses(&self, batch: &LossBatch, objective: &Objective) -> Result<Losses> {
        let (ids, keep) = (batch.ids_tensor(&self.device)?, batch.keep_tensor(&self.device)?);
        let hidden = self.hidden(&ids, keep.as_ref(), batch.dropout_seed)?;
        objective.losses_at_head(self.kernels, &hidden, &self.head, self.spec.final_softcap, batch)
    }

    /// The training losses of `batch` and the gradients of `total / divisor` (the
    /// divisor spreads a step over its micro-batches). With `checkpointed` activations the
    /// forward pass keeps only each block's input, and the backward recomputes one block at
    /// a time, carrying the gradient down through it as a vector-Jacobian product (the
    /// gradient of `sum(block(x) * g)` with respect to `x` and the block's parameters is
    /// `g` through the block): the same gradients, with one block's activations alive.
    pub fn gradients(
        &self,
        batch: &LossBatch,
        objective: &Objective,
        divisor: f64,
        checkpointed: bool,
    ) -> Result<(Losses, GradStore)> {
        if !checkpointed {
            let losses = self.losses(batch, objective)?;
            let grads = (&losses.total / divisor)?.backward()?;
            return Ok((losses, grads));
        }
        let ids = batch.ids_tensor(&self.device)?;
        self.check_input(&ids, ids.dim(1)?)?;
        let contexts = self.contexts(ids.dim(1)?, batch.keep_tensor(&self.device)?.as_ref(), batch.dropout_seed)?;
        let mut inputs = Vec::with_capacity(self.blocks.len());
        let mut x = self.embedded(&ids)?.detach();
        for (block, ctx) in self.blocks.iter().zip(&contexts) {
            inputs.push(x.clone());
            x = block.forward(x, ctx, self.spec.residual)?.detach();
        }
        let top = Var::from_tensor(&x)?;
        let hidden = self.final_norm.forward(top.as_tensor(), self.kernels)?;
        let softcap = self.spec.final_softcap;
        let losses = objective.losses_at_head(self.kernels, &hidden, &self.head, softcap, batch)?;
        let mut grads = (&losses.total / divisor)?.backward()?;
        // Gradients are values here: candle leaves a graph on the gradients of leaves where an
        // op's backward is made of differentiable ops, and carrying it into the next
        // block's backward would add terms (and keep every block's tensors alive).
        let mut g =
            grads.remove(top.as_tensor()).ok_or_else(|| Error::msg("the loss does not reach the blocks"))?.detach();
        for ((block, ctx), input) in self.blocks.iter().zip(&contexts).zip(inputs).rev() {
            let input = Var::from_tensor(&input)?;
            let out = block.forward(input.as_tensor().clone(), ctx, self.spec.residual)?;
            let mut step = (out * &g)?.sum_all()?.backward()?;
            g = step
                .remove(input.as_tensor())
                .ok_or_else(|| Error::msg("a block's output does not depend on its input"))?
                .detach();
            self.add_grads(&mut grads, &step)?;
        }
        let step = (self.embedded(&ids)? * &g)?.sum_all()?.backward()?;
        self.add_grads(&mut grads, &step)?;
        Ok((losses, grads))
    }

    /// Adds the parameters' gradients in `more` to those in `grads`.
    fn add_grads(&self, grads: &mut GradStore, more: &GradStore) -> Result<()> {
        for (_, var) in &self.vars {
            if let Some(g) = more.get(var) {
                let sum = match grads.get(var) {
                    Some(have) => (have.detach() + g.detach())?,
                    None => g.detach(),
                };
                grads.insert(var, sum);
            }
        }
        Ok(())
    }

    /// The final (normalised) hidden states `[b, t, hidden]`, the head's input; LoRA's
    /// dropout drawn from `dropout` when training.
    fn hidden(&self, ids: &Tensor, keep: Option<&Tensor>, dropout: Option<u64>) -> Result<Tensor> {
        self.check_input(ids, ids.dim(1)?)?;
        let contexts = self.contexts(ids.dim(1)?, keep, dropout)?;
        let mut x = self.embedded(ids)?;
        for (block, ctx) in self.blocks.iter().zip(&contexts) {
            x = block.forward(x, ctx, self.spec.residual)?;
        }
        Ok(self.final_norm.forward(&x, self.kernels)?)
    }

    /// The blocks' input: the embeddings of `ids` `[b, t]` (checked), scaled and with
    /// learned positions where the model has them.
    fn embedded(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let mut x = self.embed.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, self.spec.hidden))?;
        if let Some(scale) = self.spec.embed_scale {
            x = (x * scale)?;
        }
        if let Some(table) = &self.pos_embed {
            x = x.broadcast_add(&table.narrow(0, 0, t)?)?;
        }
        Ok(x)
    }

    fn check_input(&self, ids: &Tensor, t: usize) -> Result<()> {
        if ids.elem_count() == 0 {
            return Err(Error::msg(format!("an empty batch ({:?} token ids) has nothing to compute", ids.dims())));
        }
        if t > self.spec.max_positions {
            return Err(Error::msg(format!(
                "a sequence of {t} tokens is longer than the model's maximum of {} positions; split the document into shorter pieces",
                self.spec.max_positions
            )));
        }
        {
            let max = ids.flatten_all()?.max(0)?.to_scalar::<u32>()? as usize;
            if max >= self.spec.vocab_size {
                return Err(Error::msg(format!(
                    "token id {max} is outside the model's embedding of {} rows; is the tokenizer the model's own?",
                    self.spec.vocab_size
                )));
            }
        }
        Ok(())
    }

    /// Each layer's context: its mask (causal, padding, window) and positions. Layers that
    /// attend alike share one.
    fn contexts(&self, t: usize, keep: Option<&Tensor>, dropout: Option<u64>) -> Result<Vec<Context>> {
        let mut made: Vec<((Option<usize>, &Positions), Context)> = Vec::new();
        (0..self.spec.layers)
            .map(|i| {
                let layer = self.spec.layer(i);
                if let Some((_, ctx)) = made.iter().find(|(key, _)| *key == layer) {
                    return Ok(ctx.clone());
                }
                let ctx = self.context(t, keep, layer.0, layer.1, dropout)?;
                made.push((layer, ctx.clone()));
                Ok(ctx)
            })
            .collect()
    }

    fn context(
        &self,
        t: usize,
        keep: Option<&Tensor>,
        window: Option<usize>,
        positions: &Positions,
        dropout: Option<u64>,
    ) -> Result<Context> {
        let mask = positions::attention_mask(t, keep, window, &self.device)?;
        let (rope, bias) = match positions {
            Positions::Rope { theta, fraction, scaling } => {
                let rot = (self.spec.attention.head_dim as f64 * fraction) as usize;
                let (cos, sin) = positions::rope_tables(*theta, scaling, rot, t, &self.device)?;
                let dtype = self.embed.dtype();
                (Some((cos.to_dtype(dtype)?, sin.to_dtype(dtype)?, rot)), mask)
            }
            Positions::Alibi { max_bias } => {
                let slopes = positions::alibi_slopes(self.spec.attention.heads, *max_bias);
                (None, mask.broadcast_add(&positions::alibi_bias(&slopes, t, &self.device)?)?)
            }
            Positions::Learned => (None, mask),
        };
        Ok(Context { kernels: self.kernels, rope, bias, dropout })
    }
}

/// Refuses a dtype the device cannot compute in, before any weight is read.
fn check_dtype(dtype: DType, device: &Device) -> Result<()> {
    match dtype {
        DType::F32 | DType::F64 => Ok(()),
        DType::BF16 if device.is_cpu() => Err(Error::msg(
            "bf16 is not supported on the CPU (candle's CPU matmul has no bf16 kernel); use f32, or a CUDA device",
        )),
        DType::BF16 | DType::F16 => Ok(()),
        other => {
            Err(Error::msg(format!("{other:?} is not a floating-point dtype for model weights; use f32, bf16 or f16")))
        }
    }
}
