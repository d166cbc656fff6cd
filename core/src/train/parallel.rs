//! Data parallelism: what the ranks of one training run exchange. Every rank holds the
//! whole model, trains on its own slice of each global micro-batch
//! ([`Dataset::set_rank`](super::Dataset::set_rank)) with the means taken over the global
//! batch ([`Counts`]), and sums its gradients with the others' before the update, so that
//! every rank applies the same update: `N` ranks of micro-batch `b` compute what one rank
//! of `N * b` computes, up to the order of float sums. Under ZeRO stage 1 each rank keeps
//! the optimizer state of its shard of the parameters only ([`RankOptimizer`]), updates
//! that shard, and takes the rest from their owners.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use fusellm_dist::Communicator;

use super::optim::AdamW;
use super::{Dataset, TrainConfig};
use crate::error::{Error, Result};
use crate::files::sha256_hex;
use crate::model::loss::Counts;

/// Elements per all-reduce of gradients: one collective per bucket of parameters rather
/// than one per tensor (64 MiB of f32).
const BUCKET: usize = 1 << 24;

/// Refuses ranks that do not run the same training: the hash of the training settings (the
/// ZeRO stage and checkpointing too, which decide the collectives), of the parameters'
/// names and shapes, and of the data's token ids must be rank 0's on every rank.
pub fn agree(comm: &dyn Communicator, config: &TrainConfig, vars: &[(String, Var)], data: &Dataset) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    let mut bytes = serde_json::to_vec(config).expect("JSON");
    bytes.extend([config.zero, u8::from(config.checkpoint_activations)]);
    for (name, var) in vars {
        bytes.extend(format!("{name}{:?};", var.dims()).into_bytes());
    }
    for ids in data.ids() {
        bytes.extend((ids.len() as u64).to_le_bytes());
        bytes.extend(ids.iter().flat_map(|id| id.to_le_bytes()));
    }
    let hash = u64::from_str_radix(&sha256_hex(&bytes)[..16], 16).expect("hex");
    match unlike_rank_0(comm, hash)? {
        None => Ok(()),
        Some((rank, theirs, ours)) => Err(Error::msg(format!(
            "rank {rank} trains with other settings or other data than rank 0 (their hashes {theirs:016x} and {ours:016x}); start every rank with the same config and the same fused store"
        ))),
    }
}

/// Refuses ranks that start from different steps (a run folder that is not the same one on
/// every rank: each would resume, or not, on its own).
pub fn same_step(comm: &dyn Communicator, step: u64) -> Result<()> {
    match unlike_rank_0(comm, step)? {
        None => Ok(()),
        Some((rank, theirs, ours)) => Err(Error::msg(format!(
            "rank {rank} starts at step {theirs}, rank 0 at step {ours}: the run folder must be one folder that every rank sees (a shared file system)"
        ))),
    }
}

/// The first rank whose `value` is not rank 0's: the rank, its value and rank 0's.
fn unlike_rank_0(comm: &dyn Communicator, value: u64) -> Result<Option<(usize, u64, u64)>> {
    let values = comm.all_gather_u64(value)?;
    Ok(values.iter().position(|&v| v != values[0]).map(|rank| (rank, values[rank], values[0])))
}

/// Sets every rank's weights to rank 0's.
pub fn broadcast_weights(comm: &dyn Communicator, vars: &[(String, Var)]) -> Result<()> {
    if comm.world() == 1 {
        return Ok(());
    }
    vars.iter().try_for_each(|(_, var)| broadcast_var(comm, var, 0))
}

/// Sets `var` on every rank to its value on rank `root` (sent as f32, exact for the 16-bit
/// dtypes).
fn broadcast_var(comm: &dyn Communicator, var: &Var, root: usize) -> Result<()> {
    let mut values = var.as_tensor().to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
    comm.broadcast(&mut values, root)?;
    Ok(var.set(&Tensor::from_vec(values, var.shape(), var.device())?.to_dtype(var.dtype())?)?)
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

/// The gradients summed over the ranks, in buckets of about 64 MiB (`BUCKET` elements). A rank
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

/// Which rank keeps each parameter's optimizer state and updates it: with ZeRO stage 1 the
/// parameters are dealt out by size, largest first, each to the rank with the fewest
/// elements so far; otherwise every rank keeps all of them.
struct Shards {
    /// The owner of each parameter, or `None` when nothing is sharded.
    owner: Option<Vec<usize>>,
}

impl Shards {
    fn new(vars: &[(String, Var)], world: usize, zero: u8) -> Self {
        if zero == 0 || world == 1 {
            return Self { owner: None };
        }
        let mut order: Vec<usize> = (0..vars.len()).collect();
        order.sort_by_key(|&i| std::cmp::Reverse(vars[i].1.elem_count()));
        let (mut owner, mut load) = (vec![0; vars.len()], vec![0usize; world]);
        for i in order {
            let rank = (0..world).min_by_key(|&r| load[r]).expect("one rank at least");
            owner[i] = rank;
            load[rank] += vars[i].1.elem_count();
        }
        Self { owner: Some(owner) }
    }

    fn owns(&self, rank: usize, i: usize) -> bool {
        self.owner.as_ref().is_none_or(|owner| owner[i] == rank)
    }
}

/// This rank's optimizer: AdamW over the parameters whose state it keeps (all of them, or
/// its shard under ZeRO stage 1).
pub struct RankOptimizer {
    adamw: AdamW,
    owned: Vec<(String, Var)>,
    shards: Shards,
}

impl RankOptimizer {
    pub fn new(comm: &dyn Communicator, vars: &[(String, Var)], config: &TrainConfig) -> Result<Self> {
        let shards = Shards::new(vars, comm.world(), config.zero);
        let owned: Vec<(String, Var)> =
            vars.iter().enumerate().filter(|(i, _)| shards.owns(comm.rank(), *i)).map(|(_, v)| v.clone()).collect();
        if shards.owner.is_some() {
            let elements = |vars: &[(String, Var)]| vars.iter().map(|(_, v)| v.elem_count()).sum::<usize>();
            tracing::info!(
                "rank {} keeps the optimizer state of {} of {} parameters ({} of {} elements)",
                comm.rank(),
                owned.len(),
                vars.len(),
                elements(&owned),
                elements(vars)
            );
        }
        Ok(Self { adamw: AdamW::new(&owned, config.adamw)?, owned, shards })
    }

    /// Updates this rank's parameters with the summed gradients; when sharded, every rank
    /// then takes each parameter from the rank that updated it.
    pub fn step(
        &mut self,
        comm: &dyn Communicator,
        vars: &[(String, Var)],
        grads: &GradStore,
        grad_scale: f64,
        lr: f64,
    ) -> Result<()> {
        self.adamw.step(&self.owned, grads, grad_scale, lr)?;
        if let Some(owner) = &self.shards.owner {
            for ((_, var), &root) in vars.iter().zip(owner) {
                broadcast_var(comm, var, root)?;
            }
        }
        Ok(())
    }

    /// The whole optimizer state, as one checkpoint holds it whatever the ranks: on rank 0
    /// (each shard sent by its owner), `None` on the others.
    pub fn state(&self, comm: &dyn Communicator, vars: &[(String, Var)]) -> Result<Option<HashMap<String, Tensor>>> {
        let mine = self.adamw.state(&self.owned);
        let Some(owner) = &self.shards.owner else { return Ok((comm.rank() == 0).then_some(mine)) };
        let mut all = HashMap::new();
        for ((name, var), &root) in vars.iter().zip(owner) {
            let mut keys = vec![format!("m.{name}"), format!("v.{name}")];
            if var.dtype() != DType::F32 {
                keys.push(format!("master.{name}"));
            }
            for key in keys {
                let mut values = match mine.get(&key) {
                    Some(t) => t.flatten_all()?.to_vec1::<f32>()?,
                    None => vec![0.0; var.elem_count()],
                };
                comm.broadcast(&mut values, root)?;
                if comm.rank() == 0 {
                    all.insert(key, Tensor::from_vec(values, var.shape(), &candle_core::Device::Cpu)?);
                }
            }
        }
        Ok((comm.rank() == 0).then_some(all))
    }

    /// Restores this rank's part of a saved state (of any number of ranks).
    pub fn restore(&mut self, saved: HashMap<String, Tensor>, step: u64) -> Result<()> {
        self.adamw.restore(&self.owned, saved, step)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_deals_every_parameter_to_one_rank_by_size() {
        let sizes = [1000, 10, 600, 500, 20, 400];
        let vars: Vec<(String, Var)> = sizes
            .iter()
            .map(|&n| (n.to_string(), Var::zeros(n, DType::F32, &candle_core::Device::Cpu).unwrap()))
            .collect();
        let owner = Shards::new(&vars, 2, 1).owner.unwrap();
        // Largest first, each to the lighter rank: 1000 -> 0, 600 -> 1, 500 -> 1, 400 -> 0,
        // 20 -> 1 (1100 against 1400), 10 -> 1.
        assert_eq!(owner, vec![0, 1, 1, 1, 1, 0]);
        assert!(Shards::new(&vars, 2, 0).owner.is_none() && Shards::new(&vars, 1, 1).owner.is_none());
    }
}
