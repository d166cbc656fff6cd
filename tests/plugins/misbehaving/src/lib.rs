//! One fusion plugin per way a plugin can go wrong, and an aligner, a vocabulary mapper
//! and an adapter that answer wrongly. A host must answer each with a clear error and keep
//! running, and the conformance check must catch each.

use fusellm_sdk::{
    Alignment, CheckpointFiles, Cooccurrence, FusedTarget, FusionFn, FusionInput, ModelAdapter, ModelSpec, Params,
    PluginInfo, PluginKind, SequenceAligner, TokenStrings, Tokenization, VocabMap, VocabMapper,
};

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

/// Aligns every token of one side with the first of the other: a valid path, but not the
/// one to one path of a tokenization with itself.
pub struct ToFirst;

impl SequenceAligner for ToFirst {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(PluginKind::SequenceAligner, "to_first", "0.1.0", "aligns everything to the first token")
    }

    fn align(&self, _: &Params, a: Tokenization<'_>, _: Tokenization<'_>) -> Result<Alignment, String> {
        let n = a.len() as u32;
        Ok(Alignment { a: (0..n).collect(), b: vec![0; n as usize], cost: 0.0 })
    }
}

/// Maps every token to the target's first, claiming an exact match.
pub struct AllToZero;

impl VocabMapper for AllToZero {
    fn info(&self) -> PluginInfo {
        PluginInfo::new(PluginKind::VocabMapper, "all_to_zero", "0.1.0", "maps every token to id 0")
    }

    fn map_vocab(
        &self,
        _: &Params,
        source: TokenStrings<'_>,
        _: TokenStrings<'_>,
        _: Cooccurrence<'_>,
    ) -> Result<VocabMap, String> {
        Ok(VocabMap { target: vec![Some(0); source.len()], distance: vec![0; source.len()] })
    }
}

/// An adapter that panics on every config.
pub struct PanickingAdapter;

impl ModelAdapter for PanickingAdapter {
    fn info(&self) -> PluginInfo {
        let mut info = PluginInfo::new(PluginKind::Adapter, "panicking_adapter", "0.1.0", "panics on every config");
        info.handles = vec!["panicking".into()];
        info
    }

    fn spec(&self, _: &Params, _: CheckpointFiles<'_>) -> Result<ModelSpec, String> {
        panic!("this adapter panics on purpose")
    }
}

fusellm_sdk::export_plugins!(sequence_aligner: [ToFirst], vocab_mapper: [AllToZero], adapter: [PanickingAdapter], fusion: [
    Misbehave("panics", panics),
    Misbehave("loops_forever", loops_forever),
    Misbehave("hogs_memory", hogs_memory),
    Misbehave("traps", traps),
    Misbehave("ragged", ragged),
    Misbehave("nan_probs", nan_probs),
    Misbehave("negative_probs", negative_probs),
]);
