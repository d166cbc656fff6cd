//! Data parallelism: what the ranks of one training run exchange. Every rank holds the
//! whole model and optimizer state, trains on its own slice of each global micro-batch
//! ([`Dataset::set_rank`](super::Dataset::set_rank)) with the means taken over the global
//! batch ([`Counts`]), and sums its gradients with the others' before the update, so that
//! every rank applies the same update: `N` ranks of micro-batch `b` compute what one rank
//! of `N * b` computes, up to the order of float sums.

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use fusellm_dist::Communicator;

use super::{Dataset, TrainConfig};
use crate::error::{Error, Result};
use crate::files::sha256_hex;
use crate::model::loss::Counts;

/// Elements per all-reduce of gradients: one collective per bucket of parameters rather
/// than one per tensor (64 MiB of f32).
const BUCKET: usize = 1 << 24;

/// Refuses ranks that do not run the same training: the hash of the training settings and
/// of the data's token ids must be rank 0's on every rank.
pub fn agree(comm: &dyn Communicator, config: &TrainConfig, data: &Dataset) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    let mut bytes = serde_json::to_vec(config).expect("JSON");
    for ids in data.ids() {
        bytes.extend((ids.len() as u64).to_le_bytes());
        bytes.extend(ids.iter().flat_map(|id| id.to_le_bytes()));
    }
    let hash = u64::from_str_radix(&sha256_hex(&bytes)[..16], 16).expect("hex");
    let hashes = comm.all_gather_u64(hash)?;
    match hashes.iter().position(|&h| h != hashes[0]) {
        None => Ok(()),
        Some(rank) => Err(Error::msg(format!(
            "rank {rank} trains with other settings or other data than rank 0 (their hashes {:016x} and {:016x}); start every rank with the same config and the same fused store",
            hashes[rank], hashes[0]
        ))),
    }
}

/// Sets every rank's weights to rank 0's.
pub fn broadcast_weights(comm: &dyn Communicator, vars: &[(String, Var)]) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    for (_, var) in vars {
        let mut values = var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        comm.broadcast(&mut values, 0)?;
        let shared = Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?;
        var.set(&shared)?;
    }
    Ok(())
}

/// The counts of global micro-batch whose part on this rank has `own` counts.
pub fn global_counts(comm: &dyn Communicator, own: Counts) -> Result<Counts> {
    let mut values = [own.clm, own.fused];
    comm.all_reduce_sum_f64(&mut values)?;
    Ok(Counts { clm: values[0], fused: values[1] })
}

/// Sums `values` (loss parts, tokens) over the ranks.
pub fn sum(comm: &dyn Communicator, mut values: [f64; 4]) -> Result<[f64; 4]> {
    comm.all_reduce_sum_f64(&mut values)?;
    Ok(values)
}

/// The gradients summed over the ranks, in buckets of about [`BUCKET`] elements. A rank
/// that had no sequence in this step (`grads` is `None`) contributes zeros; a parameter
/// without a gradient otherwise is an error, as in a single process.
pub fn all_reduce_grads(
    comm: &dyn Communicator,
    vars: &[(String, Var)],
    grads: Option<GradStore>,
) -> Result<GradStore> {
    let mut out = GradStore::default();
    let mut start = 0;
    while start < vars.len() {
        let mut end = start;
        let mut bucket: Vec<f32> = Vec::new();
        while end < vars.len() && (end == start || bucket.len() + vars[end].1.elem_count() <= BUCKET) {
            let var = &vars[end].1;
            match (&grads, grads.as_ref().and_then(|g| g.get(var))) {
                (_, Some(g)) => bucket.extend(g.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                (None, None) => bucket.resize(bucket.len() + var.elem_count(), 0.0),
                (Some(_), None) => {
                    let name = &vars[end].0;
                    return Err(Error::msg(format!("`{name}` received no gradient; the loss does not depend on it")));
                }
            }
            end += 1;
        }
        comm.all_reduce_sum(&mut bucket)?;
        let mut offset = 0;
        for (_, var) in &vars[start..end] {
            let n = var.elem_count();
            let dtype = grads.as_ref().and_then(|g| g.get(var)).map_or(var.dtype(), Tensor::dtype);
            let summed = Tensor::from_slice(&bucket[offset..offset + n], var.shape(), var.device())?.to_dtype(dtype)?;
            out.insert(var, summed);
            offset += n;
        }
        start = end;
    }
    Ok(out)
}
