//! The compute device, as configs and the command line name it.

use candle_core::Device;

use crate::error::{Error, Result};

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
