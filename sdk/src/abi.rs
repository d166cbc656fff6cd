//! The dylib tier's stable ABI (abi_stable): a root module of two functions, with the
//! ragged arrays passed by reference in and moved out, so a call copies nothing.

// abi_stable names the prefix reference of `PluginModule` `PluginModule_Ref`.
#![allow(non_camel_case_types)]

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::adapter::CheckpointFiles;
use crate::aligner::{Alignment, Cooccurrence, TokenStrings, Tokenization, VocabMap};
use crate::data::{Candidate, FusionInput, SparseRows, SparseRowsBuf};
use crate::export::{
    adapt_by_name, align_by_name, catch_panics, fuse_by_name, manifest_json, map_vocab_by_name, Plugin,
};

#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct AbiRows<'a> {
    pub offsets: RSlice<'a, u32>,
    pub ids: RSlice<'a, u32>,
    pub values: RSlice<'a, f32>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct AbiCandidate<'a> {
    pub dist: AbiRows<'a>,
    pub ce_doc: f32,
    pub ce_token: RSlice<'a, f32>,
    pub tokens: u32,
    pub is_target: bool,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct AbiFusionInput<'a> {
    pub gold: RSlice<'a, u32>,
    pub text_bytes: u32,
    pub candidates: RSlice<'a, AbiCandidate<'a>>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct AbiRowsBuf {
    pub offsets: RVec<u32>,
    pub ids: RVec<u32>,
    pub values: RVec<f32>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct AbiTokenStrings<'a> {
    pub offsets: RSlice<'a, u32>,
    pub bytes: RSlice<'a, u8>,
}

#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct AbiTokenization<'a> {
    pub strings: AbiTokenStrings<'a>,
    pub spans: RSlice<'a, u32>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct AbiAlignment {
    pub a: RVec<u32>,
    pub b: RVec<u32>,
    pub cost: f64,
}

#[repr(C)]
#[derive(StableAbi, Clone, Copy)]
pub struct AbiCooccurrence<'a> {
    pub source: RSlice<'a, u32>,
    pub target: RSlice<'a, u32>,
    pub count: RSlice<'a, u32>,
}

/// A vocabulary map with `u32::MAX` for "unmapped".
#[repr(C)]
#[derive(StableAbi)]
pub struct AbiVocabMap {
    pub target: RVec<u32>,
    pub distance: RVec<u32>,
}

/// The root module every fusellm dylib exports (through [`export_plugins!`](crate::export_plugins)).
#[repr(C)]
#[derive(StableAbi)]
#[sabi(kind(Prefix(prefix_ref = PluginModule_Ref)))]
#[sabi(missing_field(panic))]
pub struct PluginModule {
    /// The JSON manifest of the library's plugins.
    pub manifest: extern "C" fn() -> RResult<RString, RString>,
    /// Runs a fusion plugin by name; see [`fuse_by_name`].
    pub fuse: extern "C" fn(RStr<'_>, RStr<'_>, &AbiFusionInput<'_>) -> RResult<AbiRowsBuf, RString>,
    /// Runs an adapter by name on config.json (and tokenizer.json) text; the model spec
    /// returns as JSON. See [`adapt_by_name`].
    pub adapt: extern "C" fn(RStr<'_>, RStr<'_>, RStr<'_>, ROption<RStr<'_>>) -> RResult<RString, RString>,
    /// Runs a sequence aligner by name; see [`align_by_name`].
    pub align:
        extern "C" fn(RStr<'_>, RStr<'_>, AbiTokenization<'_>, AbiTokenization<'_>) -> RResult<AbiAlignment, RString>,
    /// Runs a vocabulary mapper by name; see [`map_vocab_by_name`].
    #[sabi(last_prefix_field)]
    pub map_vocab: extern "C" fn(
        RStr<'_>,
        RStr<'_>,
        AbiTokenStrings<'_>,
        AbiTokenStrings<'_>,
        AbiCooccurrence<'_>,
    ) -> RResult<AbiVocabMap, RString>,
}

impl RootModule for PluginModule_Ref {
    abi_stable::declare_root_module_statics! {PluginModule_Ref}
    const BASE_NAME: &'static str = "fusellm_plugin";
    const NAME: &'static str = "fusellm_plugin";
    /// The SDK version a library was built against; hosts refuse an incompatible one
    /// (same major, and for 0.x the same minor).
    const VERSION_STRINGS: VersionStrings = abi_stable::package_version_strings!();
}

impl<'a> From<SparseRows<'a>> for AbiRows<'a> {
    fn from(r: SparseRows<'a>) -> Self {
        Self { offsets: r.offsets.into(), ids: r.ids.into(), values: r.values.into() }
    }
}

impl<'a> From<AbiRows<'a>> for SparseRows<'a> {
    fn from(r: AbiRows<'a>) -> Self {
        Self { offsets: r.offsets.as_slice(), ids: r.ids.as_slice(), values: r.values.as_slice() }
    }
}

impl<'a> From<&Candidate<'a>> for AbiCandidate<'a> {
    fn from(c: &Candidate<'a>) -> Self {
        Self {
            dist: c.dist.into(),
            ce_doc: c.ce_doc,
            ce_token: c.ce_token.into(),
            tokens: c.tokens,
            is_target: c.is_target,
        }
    }
}

impl<'a> From<&AbiFusionInput<'a>> for FusionInput<'a> {
    fn from(i: &AbiFusionInput<'a>) -> Self {
        let candidates = i
            .candidates
            .iter()
            .map(|c| Candidate {
                dist: c.dist.into(),
                ce_doc: c.ce_doc,
                ce_token: c.ce_token.as_slice(),
                tokens: c.tokens,
                is_target: c.is_target,
            })
            .collect();
        Self { gold: i.gold.as_slice(), text_bytes: i.text_bytes, candidates }
    }
}

impl From<SparseRowsBuf> for AbiRowsBuf {
    fn from(b: SparseRowsBuf) -> Self {
        Self { offsets: b.offsets.into(), ids: b.ids.into(), values: b.values.into() }
    }
}

impl From<AbiRowsBuf> for SparseRowsBuf {
    fn from(b: AbiRowsBuf) -> Self {
        Self { offsets: b.offsets.into_vec(), ids: b.ids.into_vec(), values: b.values.into_vec() }
    }
}

/// Runs `f`, turning a panic into an error: a panic must never unwind across the ABI.
fn guarded<T>(f: impl FnOnce() -> Result<T, String>) -> RResult<T, RString> {
    catch_panics(f).map_err(RString::from).into()
}

/// Body of the exported `manifest` function.
pub fn export_manifest(plugins: &[Plugin]) -> RResult<RString, RString> {
    guarded(|| Ok(manifest_json(plugins).into()))
}

/// Body of the exported `fuse` function.
pub fn export_fuse(
    plugins: &[Plugin],
    name: RStr<'_>,
    params: RStr<'_>,
    input: &AbiFusionInput<'_>,
) -> RResult<AbiRowsBuf, RString> {
    guarded(|| fuse_by_name(plugins, name.as_str(), params.as_str(), &input.into()).map(AbiRowsBuf::from))
}

/// Body of the exported `adapt` function.
pub fn export_adapt(
    plugins: &[Plugin],
    name: RStr<'_>,
    params: RStr<'_>,
    config_json: RStr<'_>,
    tokenizer_json: ROption<RStr<'_>>,
) -> RResult<RString, RString> {
    guarded(|| {
        let files = CheckpointFiles {
            config_json: config_json.as_str(),
            tokenizer_json: tokenizer_json.map(|t| t.as_str()).into_option(),
        };
        adapt_by_name(plugins, name.as_str(), params.as_str(), files).map(RString::from)
    })
}

/// Body of the exported `align` function.
pub fn export_align(
    plugins: &[Plugin],
    name: RStr<'_>,
    params: RStr<'_>,
    a: AbiTokenization<'_>,
    b: AbiTokenization<'_>,
) -> RResult<AbiAlignment, RString> {
    guarded(|| align_by_name(plugins, name.as_str(), params.as_str(), a.into(), b.into()).map(AbiAlignment::from))
}

/// Body of the exported `map_vocab` function.
pub fn export_map_vocab(
    plugins: &[Plugin],
    name: RStr<'_>,
    params: RStr<'_>,
    source: AbiTokenStrings<'_>,
    target: AbiTokenStrings<'_>,
    cooccurrence: AbiCooccurrence<'_>,
) -> RResult<AbiVocabMap, RString> {
    guarded(|| {
        map_vocab_by_name(plugins, name.as_str(), params.as_str(), source.into(), target.into(), cooccurrence.into())
            .map(AbiVocabMap::from)
    })
}

impl<'a> From<Cooccurrence<'a>> for AbiCooccurrence<'a> {
    fn from(c: Cooccurrence<'a>) -> Self {
        Self { source: c.source.into(), target: c.target.into(), count: c.count.into() }
    }
}

impl<'a> From<AbiCooccurrence<'a>> for Cooccurrence<'a> {
    fn from(c: AbiCooccurrence<'a>) -> Self {
        Self { source: c.source.as_slice(), target: c.target.as_slice(), count: c.count.as_slice() }
    }
}

impl<'a> From<TokenStrings<'a>> for AbiTokenStrings<'a> {
    fn from(t: TokenStrings<'a>) -> Self {
        Self { offsets: t.offsets.into(), bytes: t.bytes.into() }
    }
}

impl<'a> From<AbiTokenStrings<'a>> for TokenStrings<'a> {
    fn from(t: AbiTokenStrings<'a>) -> Self {
        Self { offsets: t.offsets.as_slice(), bytes: t.bytes.as_slice() }
    }
}

impl<'a> From<Tokenization<'a>> for AbiTokenization<'a> {
    fn from(t: Tokenization<'a>) -> Self {
        Self { strings: t.strings.into(), spans: t.spans.into() }
    }
}

impl<'a> From<AbiTokenization<'a>> for Tokenization<'a> {
    fn from(t: AbiTokenization<'a>) -> Self {
        Self { strings: t.strings.into(), spans: t.spans.as_slice() }
    }
}

impl From<Alignment> for AbiAlignment {
    fn from(a: Alignment) -> Self {
        Self { a: a.a.into(), b: a.b.into(), cost: a.cost }
    }
}

impl From<AbiAlignment> for Alignment {
    fn from(a: AbiAlignment) -> Self {
        Self { a: a.a.into_vec(), b: a.b.into_vec(), cost: a.cost }
    }
}

impl From<VocabMap> for AbiVocabMap {
    fn from(m: VocabMap) -> Self {
        Self { target: m.target.iter().map(|t| t.unwrap_or(u32::MAX)).collect(), distance: m.distance.into() }
    }
}

impl From<AbiVocabMap> for VocabMap {
    fn from(m: AbiVocabMap) -> Self {
        Self {
            target: m.target.iter().map(|&t| (t != u32::MAX).then_some(t)).collect(),
            distance: m.distance.into_vec(),
        }
    }
}

/// Exports `plugins` as the library's root module. This is what abi_stable's
/// `#[export_root_module]` expands to, written with `$crate` paths so that plugin crates
/// need no dependency of their own on abi_stable.
///
/// The root module is one fixed symbol, so the plugin crates linked together into fusellm
/// as built-ins must not export it: the host enables the SDK's `builtin` feature, which
/// turns this macro into nothing. (Build plugin cdylibs in a cargo invocation of their own.)
#[cfg(not(feature = "builtin"))]
#[doc(hidden)]
#[macro_export]
macro_rules! __export_dylib {
    ($plugins:ident) => {
        const _: () = {
            use $crate::abi_stable::library::{LibHeader, RootModuleResult};
            use $crate::abi_stable::prefix_type::PrefixTypeTrait;
            use $crate::abi_stable::std_types::{ROption, RResult, RStr, RString};

            extern "C" fn manifest() -> RResult<RString, RString> {
                $crate::abi::export_manifest($plugins)
            }
            extern "C" fn fuse(
                name: RStr<'_>,
                params: RStr<'_>,
                input: &$crate::abi::AbiFusionInput<'_>,
            ) -> RResult<$crate::abi::AbiRowsBuf, RString> {
                $crate::abi::export_fuse($plugins, name, params, input)
            }
            extern "C" fn adapt(
                name: RStr<'_>,
                params: RStr<'_>,
                config_json: RStr<'_>,
                tokenizer_json: ROption<RStr<'_>>,
            ) -> RResult<RString, RString> {
                $crate::abi::export_adapt($plugins, name, params, config_json, tokenizer_json)
            }
            extern "C" fn align(
                name: RStr<'_>,
                params: RStr<'_>,
                a: $crate::abi::AbiTokenization<'_>,
                b: $crate::abi::AbiTokenization<'_>,
            ) -> RResult<$crate::abi::AbiAlignment, RString> {
                $crate::abi::export_align($plugins, name, params, a, b)
            }
            extern "C" fn map_vocab(
                name: RStr<'_>,
                params: RStr<'_>,
                source: $crate::abi::AbiTokenStrings<'_>,
                target: $crate::abi::AbiTokenStrings<'_>,
                cooccurrence: $crate::abi::AbiCooccurrence<'_>,
            ) -> RResult<$crate::abi::AbiVocabMap, RString> {
                $crate::abi::export_map_vocab($plugins, name, params, source, target, cooccurrence)
            }
            fn root_module() -> $crate::abi::PluginModule_Ref {
                $crate::abi::PluginModule { manifest, fuse, adapt, align, map_vocab }.leak_into_prefix()
            }
            extern "C" fn load_root_module() -> RootModuleResult {
                $crate::abi_stable::library::__call_root_module_loader(root_module)
            }
            #[unsafe(no_mangle)]
            #[allow(non_upper_case_globals)]
            pub static _1as_0lib_1header_0root_bmodule_bloader: LibHeader = unsafe {
                LibHeader::from_constructor::<$crate::abi::PluginModule_Ref>(
                    load_root_module,
                    $crate::abi_stable::library::CheckTypeLayout::Yes,
                )
            };
        };
    };
}

/// With the `builtin` feature (a host linking plugin crates in), no dylib export.
#[cfg(feature = "builtin")]
#[doc(hidden)]
#[macro_export]
macro_rules! __export_dylib {
    ($plugins:ident) => {};
}

#[cfg(test)]
mod tests {
    #[test]
    fn exported_symbol_is_abi_stables_loader_name() {
        assert_eq!(abi_stable::library::ROOT_MODULE_LOADER_NAME, "_1as_0lib_1header_0root_bmodule_bloader");
    }
}
