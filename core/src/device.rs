//! The compute device, as configs and the command line name it.

use candle_core::Device;

use crate::error::{Error, Result};

/// The device of rank `local_rank` of this machine when `ranks` processes run: `cuda`
/// names GPU `local_rank` (one process per GPU); `cpu` and an explicit `cuda:N` stay as
/// written.
pub fn for_rank(name: &str, local_rank: usize, ranks: usize) -> String {
    match name {
        "cuda" if ranks > 1 => format!("cuda:{local_rank}"),
        other => other.to_string(),
    }
}

/// `cpu`, `cuda` (the first GPU) or `cuda:N`. A CUDA device needs a build with the `cuda`
/// feature.
pub fn parse(name: &str) -> Result<Device> {
    let ordinal = match name {
        "cpu" => return Ok(Device::Cpu),
        "cuda" => Some(0),
        other => other.strip_prefix("cuda:").and_then(|n| n.parse().ok()),
    };
    let ordinal = ordinal.ok_or_else(|| Error::msg(format!("device `{name}`: expected cpu, cuda or cuda:N")))?;
    Device::new_cuda(ordinal).map_err(|e| {
        Error::msg(format!(
            "device `{name}`: {e}; CUDA needs a build with `--features cuda` (scripts/cuda-build.sh) and a GPU"
        ))
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn each_rank_takes_its_own_gpu() {
        assert_eq!(super::for_rank("cuda", 3, 8), "cuda:3");
        assert_eq!(super::for_rank("cuda", 0, 1), "cuda");
        assert_eq!(super::for_rank("cuda:1", 3, 8), "cuda:1");
        assert_eq!(super::for_rank("cpu", 3, 8), "cpu");
    }
}
