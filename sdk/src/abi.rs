//! The dylib tier's stable ABI (abi_stable): a root module of two functions, with the
//! ragged arrays passed by reference in and moved out, so a call copies nothing.

// abi_stable names the prefix reference of `PluginModule` `PluginModule_Ref`.
#![allow(non_camel_case_types)]

use abi_stable::library::RootModule;
use abi_stable::sabi_types::VersionStrings;
use abi_stable::std_types::{ROption, RResult, RSlice, RStr, RString, RVec};
use abi_stable::StableAbi;

use crate::adapter::CheckpointFiles;
use crate::data::{Candidate, FusionInput, SparseRows, SparseRowsBuf};
use crate::export::{adapt_by_name, catch_panics, fuse_by_name, manifest_json, Plugin};

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
    pub text_bytes: TextBytes,
    pub candidates: RSlice<'a, AbiCandidate<'a>>,
}

#[repr(C)]
#[derive(StableAbi)]
pub struct AbiRowsBuf {
    pub offsets: RVec<u32>,
    pub ids: RVec<u32>,
    pub values: RVec<f32>,
}

/// The type of [`AbiFusionInput::text_bytes`].
#[cfg(not(feature = "simulate-layout-drift"))]
pub type TextBytes = u32;
/// Test-only: a build whose interface layout differs from the host's, to exercise hosts'
/// layout check.
#[cfg(feature = "simulate-layout-drift")]
pub type TextBytes = u64;

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
    #[sabi(last_prefix_field)]
    pub adapt: extern "C" fn(RStr<'_>, RStr<'_>, RStr<'_>, ROption<RStr<'_>>) -> RResult<RString, RString>,
}

impl RootModule for PluginModule_Ref {
    abi_stable::declare_root_module_statics! {PluginModule_Ref}
    const BASE_NAME: &'static str = "fusellm_plugin";
    const NAME: &'static str = "fusellm_plugin";
    const VERSION_STRINGS: VersionStrings = SDK_VERSION;
}

/// The SDK version a library was built against; hosts refuse an incompatible one
/// (same major, and for 0.x the same minor).
#[cfg(not(feature = "simulate-next-major"))]
pub const SDK_VERSION: VersionStrings = abi_stable::package_version_strings!();
/// Test-only: a build that claims the next major SDK version, to exercise hosts' check.
#[cfg(feature = "simulate-next-major")]
pub const SDK_VERSION: VersionStrings = VersionStrings::new("1.0.0");

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
        Self { gold: i.gold.as_slice(), text_bytes: i.text_bytes as u32, candidates }
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
            fn root_module() -> $crate::abi::PluginModule_Ref {
                $crate::abi::PluginModule { manifest, fuse, adapt }.leak_into_prefix()
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
