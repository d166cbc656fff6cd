//! fusellm-sdk: the stable contract between fusellm and its plugins.
//!
//! Plain data types and traits, no candle; it compiles for the host and for
//! `wasm32-wasip2`, so a plugin author depends on this crate alone. A plugin crate
//! implements [`FusionFn`] (or an aligner or model adapter) and calls
//! [`export_plugins!`] once; the same source then builds as a built-in (linked into
//! fusellm), a dylib (`crate-type = ["cdylib"]`) and a WASM component
//! (`cargo build --target wasm32-wasip2`).

pub mod adapter;
pub mod aligner;
pub mod data;
pub mod export;
pub mod fusion;
pub mod math;
pub mod mixture;
pub mod params;
pub mod plugin;
pub mod rng;
pub mod suggest;

#[cfg(not(target_arch = "wasm32"))]
pub mod abi;
#[cfg(target_arch = "wasm32")]
pub mod wasm;

#[cfg(not(target_arch = "wasm32"))]
#[doc(hidden)]
pub use {abi_stable, inventory};

pub use adapter::{CheckpointFiles, HfConfig, ModelAdapter, ModelSpec, TensorNames, TokenizerConventions};
pub use aligner::{
    Alignment, Cooccurrence, CooccurrenceBuf, SequenceAligner, TokenStrings, Tokenization, VocabMap, VocabMapper,
};
pub use data::{
    check_fused, Candidate, CandidateBuf, FusedTarget, FusionInput, FusionInputBuf, SparseRows, SparseRowsBuf,
};
#[cfg(not(target_arch = "wasm32"))]
pub use export::{builtin_sets, BuiltinSet};
pub use export::{manifest_json, Plugin};
pub use fusion::FusionFn;
pub use mixture::Mixture;
pub use params::{ParamError, ParamKind, ParamSpec, ParamValue, Params};
pub use plugin::{PluginInfo, PluginKind};

/// Exports a crate's plugins in every tier at once: registers them as built-ins (when the
/// crate is linked into fusellm), as the root module of a dylib, and as the exports of a
/// WASM component.
///
/// ```text
/// fusellm_sdk::export_plugins!(fusion: [MinCe, AvgCe]);
/// ```
///
/// Kinds: `fusion`, `sequence_aligner`, `vocab_mapper`, `adapter`; each plugin is a
/// constant expression (usually a unit struct).
#[macro_export]
macro_rules! export_plugins {
    ($($kind:ident : [$($plugin:expr),* $(,)?]),* $(,)?) => {
        #[doc(hidden)]
        pub static FUSELLM_PLUGINS: &[$crate::Plugin] = &[$($($crate::__plugin!($kind, $plugin)),*),*];

        #[cfg(not(target_arch = "wasm32"))]
        $crate::inventory::submit! {
            $crate::BuiltinSet { crate_name: env!("CARGO_PKG_NAME"), plugins: FUSELLM_PLUGINS }
        }
        #[cfg(not(target_arch = "wasm32"))]
        $crate::__export_dylib!(FUSELLM_PLUGINS);
        #[cfg(target_arch = "wasm32")]
        $crate::__export_wasm!(FUSELLM_PLUGINS);
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __plugin {
    (fusion, $p:expr) => {
        $crate::Plugin::Fusion(&$p)
    };
    (sequence_aligner, $p:expr) => {
        $crate::Plugin::SequenceAligner(&$p)
    };
    (vocab_mapper, $p:expr) => {
        $crate::Plugin::VocabMapper(&$p)
    };
    (adapter, $p:expr) => {
        $crate::Plugin::Adapter(&$p)
    };
}
