//! One fusion plugin per way a plugin can go wrong. A host must answer each with a clear
//! error and keep running.

use fusellm_sdk::{FusedTarget, FusionFn, FusionInput, Params, PluginInfo, PluginKind};

/// A misbehaving fusion plugin: its name and what it does instead of fusing.
pub struct Misbehave(&'static str, fn(&FusionInput<'_>) -> FusedTarget);

impl FusionFn for Misbehave {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(PluginKind::Fusion, self.0, "0.1.0", "misbehaves on purpose")
    }

    fn fuse(&self, _params: &Params, input: &FusionInput<'_>) -> Result<FusedTarget, String> {
        Ok((self.1)(input))
    }
}

/// One uniform row per position over the gold token and its successor.
fn uniform(input: &FusionInput<'_>, value: f32) -> FusedTarget {
    let mut out = FusedTarget::with_capacity(input.positions(), 2 * input.positions());
    for &g in input.gold {
        out.push_row(&[g, g + 1], &[value, 1.0 - value]);
    }
    out
}

fn panics(_: &FusionInput<'_>) -> FusedTarget {
    panic!("this plugin panics on purpose")
}

fn loops_forever(_: &FusionInput<'_>) -> FusedTarget {
    let mut n = 0u64;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

fn hogs_memory(_: &FusionInput<'_>) -> FusedTarget {
    let mut hoard: Vec<Vec<u8>> = Vec::new();
    loop {
        hoard.push(vec![1; 16 << 20]);
        std::hint::black_box(&hoard);
    }
}

fn traps(_: &FusionInput<'_>) -> FusedTarget {
    #[cfg(target_arch = "wasm32")]
    core::arch::wasm32::unreachable();
    #[cfg(not(target_arch = "wasm32"))]
    panic!("traps only in WASM")
}

fn ragged(input: &FusionInput<'_>) -> FusedTarget {
    let mut out = uniform(input, 0.5);
    out.offsets.pop();
    out
}

fn nan_probs(input: &FusionInput<'_>) -> FusedTarget {
    uniform(input, f32::NAN)
}

fn negative_probs(input: &FusionInput<'_>) -> FusedTarget {
    uniform(input, -0.5)
}

fusellm_sdk::export_plugins!(fusion: [
    Misbehave("panics", panics),
    Misbehave("loops_forever", loops_forever),
    Misbehave("hogs_memory", hogs_memory),
    Misbehave("traps", traps),
    Misbehave("ragged", ragged),
    Misbehave("nan_probs", nan_probs),
    Misbehave("negative_probs", negative_probs),
]);
