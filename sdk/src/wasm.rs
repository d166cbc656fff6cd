//! The WASM tier's guest side: bindings of sdk/wit/plugin.wit and the glue that turns its
//! owned records into the borrowed views every plugin sees.

// The bindings define their own `FusionInput` and `SparseRows`; the SDK's are `data::`.
use crate::adapter::CheckpointFiles;
use crate::aligner;
use crate::data::{self, Candidate, SparseRowsBuf};
use crate::export::{adapt_by_name, align_by_name, fuse_by_name, map_vocab_by_name, Plugin};

wit_bindgen::generate!({
    path: "wit/plugin.wit",
    world: "plugin",
    pub_export_macro: true,
    export_macro_name: "export",
    default_bindings_module: "fusellm_sdk::wasm",
});

use fusellm::plugin::types as wit;

fn rows(r: &wit::SparseRows) -> data::SparseRows<'_> {
    data::SparseRows { offsets: &r.offsets, ids: &r.ids, values: &r.values }
}

/// Body of the exported `fuse` function.
pub fn export_fuse(
    plugins: &[Plugin],
    name: &str,
    params: &str,
    input: &wit::FusionInput,
) -> Result<wit::SparseRows, String> {
    let candidates = input
        .candidates
        .iter()
        .map(|c| Candidate {
            dist: rows(&c.dist),
            ce_doc: c.ce_doc,
            ce_token: &c.ce_token,
            tokens: c.tokens,
            is_target: c.is_target,
        })
        .collect();
    let view = data::FusionInput { gold: &input.gold, text_bytes: input.text_bytes, candidates };
    let SparseRowsBuf { offsets, ids, values } = fuse_by_name(plugins, name, params, &view)?;
    Ok(wit::SparseRows { offsets, ids, values })
}

/// Body of the exported `adapt` function.
pub fn export_adapt(
    plugins: &[Plugin],
    name: &str,
    params: &str,
    config_json: &str,
    tokenizer_json: Option<&str>,
) -> Result<String, String> {
    adapt_by_name(plugins, name, params, CheckpointFiles { config_json, tokenizer_json })
}

fn strings(t: &wit::TokenStrings) -> aligner::TokenStrings<'_> {
    aligner::TokenStrings { offsets: &t.offsets, bytes: &t.bytes }
}

/// Body of the exported `align` function.
pub fn export_align(
    plugins: &[Plugin],
    name: &str,
    params: &str,
    a: &wit::Tokenization,
    b: &wit::Tokenization,
) -> Result<wit::Alignment, String> {
    let a = aligner::Tokenization { strings: strings(&a.strings), spans: &a.spans };
    let b = aligner::Tokenization { strings: strings(&b.strings), spans: &b.spans };
    let al = align_by_name(plugins, name, params, a, b)?;
    Ok(wit::Alignment { a: al.a, b: al.b, cost: al.cost })
}

/// Body of the exported `map-vocab` function.
pub fn export_map_vocab(
    plugins: &[Plugin],
    name: &str,
    params: &str,
    source: &wit::TokenStrings,
    target: &wit::TokenStrings,
    cooccurrence: &wit::Cooccurrence,
) -> Result<wit::VocabMap, String> {
    let counts = aligner::Cooccurrence {
        source: &cooccurrence.source,
        target: &cooccurrence.target,
        count: &cooccurrence.count,
    };
    let map = map_vocab_by_name(plugins, name, params, strings(source), strings(target), counts)?;
    Ok(wit::VocabMap { target: map.target.iter().map(|t| t.unwrap_or(u32::MAX)).collect(), distance: map.distance })
}

/// Exports `plugins` as the component's `manifest`, `fuse` and `adapt`.
#[doc(hidden)]
#[macro_export]
macro_rules! __export_wasm {
    ($plugins:ident) => {
        struct FusellmComponent;
        impl $crate::wasm::Guest for FusellmComponent {
            fn manifest() -> String {
                $crate::manifest_json($plugins)
            }
            fn fuse(
                name: String,
                params: String,
                input: $crate::wasm::fusellm::plugin::types::FusionInput,
            ) -> Result<$crate::wasm::fusellm::plugin::types::SparseRows, String> {
                $crate::wasm::export_fuse($plugins, &name, &params, &input)
            }
            fn adapt(name: String, params: String, config_json: String, tokenizer_json: Option<String>) -> Result<String, String> {
                $crate::wasm::export_adapt($plugins, &name, &params, &config_json, tokenizer_json.as_deref())
            }
            fn align(
                name: String,
                params: String,
                a: $crate::wasm::fusellm::plugin::types::Tokenization,
                b: $crate::wasm::fusellm::plugin::types::Tokenization,
            ) -> Result<$crate::wasm::fusellm::plugin::types::Alignment, String> {
                $crate::wasm::export_align($plugins, &name, &params, &a, &b)
            }
            fn map_vocab(
                name: String,
                params: String,
                source: $crate::wasm::fusellm::plugin::types::TokenStrings,
                target: $crate::wasm::fusellm::plugin::types::TokenStrings,
                cooccurrence: $crate::wasm::fusellm::plugin::types::Cooccurrence,
            ) -> Result<$crate::wasm::fusellm::plugin::types::VocabMap, String> {
                $crate::wasm::export_map_vocab($plugins, &name, &params, &source, &target, &cooccurrence)
            }
        }
        $crate::wasm::export!(FusellmComponent with_types_in $crate::wasm);
    };
}
