//! AdamW with its state in the open (candle's keeps its moments private, and a resumed run
//! must continue from exactly the same moments): decoupled weight decay, bias correction
//! and the order of operations of PyTorch's `torch.optim.AdamW` (single-tensor path).

use std::collections::HashMap;

use candle_core::{backprop::GradStore, CpuStorage, DType, InplaceOp2, InplaceOp3, Layout, Tensor, Var};
use rayon::prelude::*;

use crate::model::cpu::{f32s, f32s_mut};
#[cfg(feature = "cuda")]
use crate::model::cuda::{self, gpu, launch, per_element};
#[cfg(feature = "cuda")]
use candle_core::{backend::BackendStorage, CudaStorage};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    /// The paper's: betas (0.9, 0.95), weight decay 0.1.
    fn default() -> Self {
        Self { beta1: 0.9, beta2: 0.95, eps: 1e-8, weight_decay: 0.1 }
    }
}

/// The optimizer and its state: the step count, both moments of every parameter, and for
/// parameters computed in bf16 or f16 their f32 master weights, which the updates go to (a
/// 16-bit parameter would lose most small updates to rounding). All state is f32.
pub struct AdamW {
    pub config: AdamWConfig,
    pub step: u64,
    moments: Vec<(Tensor, Tensor)>,
    masters: Vec<Option<Tensor>>,
}

impl AdamW {
    pub fn new(vars: &[(String, Var)], config: AdamWConfig) -> Result<Self> {
        let moments = vars
            .iter()
            .map(|(_, v)| Ok((v.zeros_like()?.to_dtype(DType::F32)?, v.zeros_like()?.to_dtype(DType::F32)?)))
            .collect::<Result<Vec<_>>>()?;
        let masters = vars
            .iter()
            .map(|(_, v)| (v.dtype() != DType::F32).then(|| v.as_tensor().to_dtype(DType::F32)).transpose())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Ok(Self { config, step: 0, moments, masters })
    }

    /// One update of every parameter with its gradient in `grads` (scaled by `grad_scale`,
    /// for clipping) at learning rate `lr`. A parameter without a gradient is an error: it
    /// means the graph does not reach it.
    pub fn step(&mut self, vars: &[(String, Var)], grads: &GradStore, grad_scale: f64, lr: f64) -> Result<()> {
        self.step += 1;
        let AdamWConfig { beta1, beta2, eps, weight_decay } = self.config;
        let t = self.step as i32;
        let step_size = lr / (1.0 - beta1.powi(t));
        let bias_correction2_sqrt = (1.0 - beta2.powi(t)).sqrt();
        for (((name, var), (m, v)), master) in vars.iter().zip(self.moments.iter_mut()).zip(self.masters.iter_mut()) {
            let grad = grads
                .get(var)
                .ok_or_else(|| Error::msg(format!("`{name}` received no gradient; the loss does not depend on it")))?;
            // The f32 tensor the update goes to.
            let target = match master {
                Some(weights) => weights.clone(),
                None => var.as_tensor().clone(),
            };
            if in_place(&target, grad, m, v) {
                // Three passes and no allocation, but for the cast of the master weights.
                m.inplace_op2(grad, &Moment { decay: beta1, scale: (1.0 - beta1) * grad_scale, square: false })?;
                v.inplace_op2(
                    grad,
                    &Moment { decay: beta2, scale: (1.0 - beta2) * grad_scale * grad_scale, square: true },
                )?;
                let update = Update { keep: 1.0 - lr * weight_decay, step_size, bias_correction2_sqrt, eps };
                target.inplace_op3(m, v, &update)?;
                if master.is_some() {
                    var.set(&target.to_dtype(var.dtype())?)?;
                }
                continue;
            }
            let grad = (grad.to_dtype(DType::F32)? * grad_scale)?;
            let param = (target * (1.0 - lr * weight_decay))?;
            *m = ((&*m * beta1)? + (&grad * (1.0 - beta1))?)?;
            *v = ((&*v * beta2)? + (grad.sqr()? * (1.0 - beta2))?)?;
            let denom = ((v.sqrt()? / bias_correction2_sqrt)? + eps)?;
            let update = ((&*m / denom)? * step_size)?;
            let updated = (param - update)?;
            var.set(&updated.to_dtype(var.dtype())?)?;
            if let Some(weights) = master {
                *weights = updated;
            }
        }
        Ok(())
    }

    /// The moments and master weights by parameter name (`m.<name>`, `v.<name>`,
    /// `master.<name>`), for the training state.
    pub fn state(&self, vars: &[(String, Var)]) -> HashMap<String, Tensor> {
        let mut out = HashMap::new();
        for (((name, _), (m, v)), master) in vars.iter().zip(&self.moments).zip(&self.masters) {
            out.insert(format!("m.{name}"), m.clone());
            out.insert(format!("v.{name}"), v.clone());
            if let Some(weights) = master {
                out.insert(format!("master.{name}"), weights.clone());
            }
        }
        out
    }

    /// Restores the moments saved by [`AdamW::state`] at `step`.
    pub fn restore(&mut self, vars: &[(String, Var)], mut saved: HashMap<String, Tensor>, step: u64) -> Result<()> {
        for (((name, var), (m, v)), master) in vars.iter().zip(self.moments.iter_mut()).zip(self.masters.iter_mut()) {
            let mut take = |key: String| {
                saved
                    .remove(&key)
                    .ok_or_else(|| Error::msg(format!("the optimizer state has no `{key}`")))?
                    .to_device(var.device())
                    .map_err(Error::from)
            };
            let (saved_m, saved_v) = (take(format!("m.{name}"))?, take(format!("v.{name}"))?);
            let saved_master = master.as_ref().map(|_| take(format!("master.{name}"))).transpose()?;
            for saved in [Some(&saved_m), Some(&saved_v), saved_master.as_ref()].into_iter().flatten() {
                if saved.dims() != var.dims() {
                    return Err(Error::msg(format!(
                        "the optimizer state of `{name}` has shape {:?}, the parameter {:?}; was it saved for another model?",
                        saved.dims(),
                        var.dims()
                    )));
                }
            }
            (*m, *v) = (saved_m, saved_v);
            if saved_master.is_some() {
                *master = saved_master;
            }
        }
        self.step = step;
        Ok(())
    }
}

/// The global L2 norm of the gradients (summed in f64), and the first parameter whose
/// gradient is not finite. The squared sums are read from the device at once: one
/// synchronisation per step, not one per parameter.
pub fn grad_norm(vars: &[(String, Var)], grads: &GradStore) -> Result<(f64, Option<String>)> {
    let (mut names, mut sums) = (Vec::new(), Vec::new());
    for (name, var) in vars {
        let Some(g) = grads.get(var) else { continue };
        names.push(name);
        sums.push(g.to_dtype(DType::F32)?.sqr()?.sum_all()?);
    }
    if sums.is_empty() {
        return Ok((0.0, None));
    }
    let sums = Tensor::stack(&sums, 0)?.to_vec1::<f32>()?;
    if let Some(i) = sums.iter().position(|s| !s.is_finite()) {
        return Ok((f64::NAN, Some(names[i].clone())));
    }
    Ok((sums.iter().map(|&s| s as f64).sum::<f64>().sqrt(), None))
}

/// Whether the in-place update applies: the updated f32 weights and the moments
/// contiguous on the gradient's device, which is the CPU (an f32 gradient) or, in a CUDA
/// build, a CUDA device (an f32 or bf16 gradient).
fn in_place(target: &Tensor, grad: &Tensor, m: &Tensor, v: &Tensor) -> bool {
    let device = grad.device();
    let state =
        [target, m, v].iter().all(|t| t.dtype() == DType::F32 && t.is_contiguous() && t.device().same_device(device));
    let cuda = cfg!(feature = "cuda") && device.is_cuda();
    let grad_dtype = match grad.dtype() {
        DType::F32 => device.is_cpu() || cuda,
        DType::BF16 => cuda,
        _ => false,
    };
    state && grad_dtype && grad.is_contiguous()
}

/// Refuses operands of the in-place update with different element counts: the kernels
/// read them all over the length of the first.
fn same_sizes(layouts: &[&Layout]) -> candle_core::Result<()> {
    let counts: Vec<usize> = layouts.iter().map(|l| l.shape().elem_count()).collect();
    if counts.iter().any(|&n| n != counts[0]) {
        candle_core::bail!("adamw: a parameter, its gradient and its moments of {counts:?} elements");
    }
    Ok(())
}

/// `m = decay * m + scale * g` (or `g^2` when `square`), in place.
struct Moment {
    decay: f64,
    scale: f64,
    square: bool,
}

impl InplaceOp2 for Moment {
    fn name(&self) -> &'static str {
        "adamw-moment"
    }

    fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> candle_core::Result<()> {
        same_sizes(&[l1, l2])?;
        let (m, g) = (f32s_mut(s1, l1, "adamw")?, f32s(s2, l2, "adamw")?);
        let (decay, scale, square) = (self.decay as f32, self.scale as f32, self.square);
        m.par_chunks_mut(4096).zip(g.par_chunks(4096)).for_each(|(m, g)| {
            for (m, &g) in m.iter_mut().zip(g) {
                *m = decay * *m + scale * if square { g * g } else { g };
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s1: &mut CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> candle_core::Result<()> {
        same_sizes(&[l1, l2])?;
        let (n, dev) = (l1.shape().elem_count(), s1.device.clone());
        let m = &mut gpu::rows_mut::<f32>(s1, l1)?;
        let (decay, scale, square) = (self.decay as f32, self.scale as f32, i32::from(self.square));
        per_element!(s2.dtype(), T => {
            let (g, name) = (gpu::rows::<T>(s2, l2)?, cuda::kernel::<T>("adamw_moment"));
            launch!(dev, name, cuda::elements(n)?, m, &g, &cuda::int(n)?, &decay, &scale, &square)
        })
    }
}

/// `p = p * keep - step_size * m / (sqrt(v) / bias_correction2_sqrt + eps)`, in place.
struct Update {
    keep: f64,
    step_size: f64,
    bias_correction2_sqrt: f64,
    eps: f64,
}

impl InplaceOp3 for Update {
    fn name(&self) -> &'static str {
        "adamw-update"
    }

    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        same_sizes(&[l1, l2, l3])?;
        let (p, m, v) = (f32s_mut(s1, l1, "adamw")?, f32s(s2, l2, "adamw")?, f32s(s3, l3, "adamw")?);
        let (keep, step, bc2, eps) =
            (self.keep as f32, self.step_size as f32, self.bias_correction2_sqrt as f32, self.eps as f32);
        p.par_chunks_mut(4096).zip(m.par_chunks(4096).zip(v.par_chunks(4096))).for_each(|(p, (m, v))| {
            for ((p, &m), &v) in p.iter_mut().zip(m).zip(v) {
                *p = *p * keep - step * m / (v.sqrt() / bc2 + eps);
            }
        });
        Ok(())
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &mut CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
        s3: &CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<()> {
        same_sizes(&[l1, l2, l3])?;
        let (n, dev) = (l1.shape().elem_count(), s1.device.clone());
        let p = &mut gpu::rows_mut::<f32>(s1, l1)?;
        let (m, v) = (gpu::rows::<f32>(s2, l2)?, gpu::rows::<f32>(s3, l3)?);
        let (keep, step, bc2, eps) =
            (self.keep as f32, self.step_size as f32, self.bias_correction2_sqrt as f32, self.eps as f32);
        launch!(dev, "adamw_update", cuda::elements(n)?, p, &m, &v, &cuda::int(n)?, &keep, &step, &bc2, &eps)
    }
}
