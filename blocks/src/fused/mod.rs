//! Fused kernels of the block library's hot paths, one file per op with its forward and
//! backward on the CPU and, where it has one, on CUDA: linear projections, attention, the
//! attention softmax, RMSNorm and LayerNorm, rotary embedding and SwiGLU.
//! candle's own fused ops record no backward; the compositions in `ops` do, but allocate a
//! tensor per step of the formula (and again in backward). These run row by row
//! over contiguous f32 data on all cores; the attention softmax, the norms, RoPE and SwiGLU
//! also on CUDA (`cuda.rs`), in f32 and bf16. `ops` uses them where they exist and the
//! compositions elsewhere; tests check both against each other.

mod attention;
mod linear;
mod norm;
mod rope;
mod softmax;
mod swiglu;

pub use attention::attention;
pub use linear::linear;
pub use norm::{layer_norm, rms_norm};
pub use rope::rope;
use rope::rotate_half;
pub use softmax::attention_softmax;
use softmax::bias_block;
pub use swiglu::swiglu;

use candle_core::{CustomOp3, Layout, Result, Shape, Tensor};

/// Rows of the last dimension.
fn width(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1).max(1)
}

/// The gradients a backward kernel wrote one after another into its single output buffer,
/// cut apart and given their shapes.
fn unpack<const N: usize>(packed: &Tensor, shapes: [&Shape; N]) -> Result<[Tensor; N]> {
    let mut start = 0;
    let parts = shapes
        .iter()
        .map(|shape| {
            let part = packed.narrow(0, start, shape.elem_count())?.reshape(*shape);
            start += shape.elem_count();
            part
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(parts.try_into().expect("one part per shape"))
}

/// The gradients of both inputs `a`, `b` of a two-input op under the output's gradient `g`,
/// from `kernel`, which writes them one after the other into one buffer.
fn both_grads(a: &Tensor, b: &Tensor, g: &Tensor, kernel: &impl CustomOp3) -> Result<(Option<Tensor>, Option<Tensor>)> {
    let packed = a.apply_op3_no_bwd(b, &g.contiguous()?, kernel)?;
    let [da, db] = unpack(&packed, [a.shape(), b.shape()])?;
    Ok((Some(da), Some(db)))
}
