//! The dylib tier: a cdylib exporting the SDK's abi_stable root module.
//!
//! abi_stable checks the SDK version and the layout of every type at load; its reports run
//! to hundreds of lines, so they are summarised here in at most three. Libraries are
//! never unloaded (abi_stable leaks them on purpose: code may still point into them).

use std::path::Path;

use abi_stable::library::{lib_header_from_path, LibraryError, RootModule};
use abi_stable::std_types::{RResult, RSlice, RStr, RString};
use fusellm_sdk::abi::{AbiCandidate, AbiFusionInput, PluginModule_Ref};
use fusellm_sdk::export::params_json;
use fusellm_sdk::{
    Alignment, CheckpointFiles, Cooccurrence, FusedTarget, FusionFn, FusionInput, ModelAdapter, ModelSpec, Params,
    PluginInfo, SequenceAligner, TokenStrings, Tokenization, VocabMap, VocabMapper,
};

use super::{Entry, Handle, PluginError, Tier};

pub(super) fn load(path: &Path) -> Result<Vec<Entry>, PluginError> {
    let module = open(path).map_err(|e| PluginError::new(summarise(path, &e)))?;
    let manifest = match (module.manifest())() {
        RResult::ROk(json) => json.into_string(),
        RResult::RErr(e) => {
            return Err(PluginError::new(format!("{}: describing its plugins failed: {e}", path.display())))
        }
    };
    parse_manifest(path, &manifest)?
        .into_iter()
        .map(|info| {
            let handle = Handle::remote(DylibPlugin { module, info: info.clone() });
            Entry::new(info, Tier::Dylib, path.display().to_string(), handle)
        })
        .collect()
}

fn open(path: &Path) -> Result<PluginModule_Ref, LibraryError> {
    lib_header_from_path(path)?.init_root_module::<PluginModule_Ref>()
}

/// Parses the JSON manifest that a dylib or component reports.
pub(super) fn parse_manifest(path: &Path, json: &str) -> Result<Vec<PluginInfo>, PluginError> {
    serde_json::from_str(json).map_err(|e| {
        PluginError::new(format!(
            "{}: its plugin manifest is not valid ({e}); rebuild it with fusellm_sdk::export_plugins!",
            path.display()
        ))
    })
}

/// At most three lines: which plugin, which check, expected vs found.
fn summarise(path: &Path, e: &LibraryError) -> String {
    let file = path.display();
    match e {
        LibraryError::OpenError { err, .. } => {
            format!("{file} cannot be loaded as a shared library: {err}\nis it a plugin built for this platform?")
        }
        LibraryError::GetSymbolError { .. } => format!(
            "{file} is not a fusellm plugin: it exports no fusellm root module\nbuild it with `fusellm_sdk::export_plugins!` and crate-type = [\"cdylib\"]"
        ),
        LibraryError::IncompatibleVersionNumber { expected_version, actual_version, .. } => format!(
            "{file} was built against fusellm-sdk {actual_version}, but this fusellm uses fusellm-sdk {expected_version}\nrebuild the plugin against fusellm-sdk {}.{}",
            expected_version.major, expected_version.minor
        ),
        LibraryError::InvalidAbiHeader(header) => format!(
            "{file} was built with an incompatible abi_stable (ABI {}.{})\nrebuild the plugin against fusellm-sdk {}",
            header.abi_major,
            header.abi_minor,
            PluginModule_Ref::VERSION_STRINGS
        ),
        LibraryError::AbiInstability(report) => {
            format!("{file}: the layout of the plugin interface does not match this fusellm\n{}", layout_summary(&report.to_string()))
        }
        other => {
            let text = other.to_string();
            format!("{file} could not be loaded: {}", text.lines().next().unwrap_or_default())
        }
    }
}

/// The first mismatch of abi_stable's layout report, in one line: the path of fields from
/// the root module down to the mismatch, the type holding it, expected vs found.
fn layout_summary(report: &str) -> String {
    let lines: Vec<&str> = report.lines().map(str::trim).collect();
    let start = lines.iter().position(|l| l.ends_with("error(s)inside:") && !l.starts_with("0 "));
    let (mut path, mut owner) = (Vec::new(), None);
    if let Some(start) = start {
        let block = lines[start..].iter().take_while(|l| !l.starts_with("Layout of expected type"));
        let block: Vec<&str> = block.copied().collect();
        for pair in block.windows(2) {
            match pair[0].strip_prefix("field_name:") {
                Some(field) if field.parse::<usize>().is_ok() => owner = pair[1].strip_prefix("type:"),
                Some(field) => path.push(field),
                None => {}
            }
        }
    }
    let after = |tag: &str| lines.iter().rposition(|l| l.starts_with(tag)).and_then(|i| lines.get(i + 1)).copied();
    let error = lines.iter().rev().find_map(|l| l.strip_prefix("Error:")).unwrap_or("layouts differ");
    format!(
        "{error} at `{}`{}: expected {}, found {}",
        path.join("."),
        owner.map(|o| format!(" of {o}")).unwrap_or_default(),
        after("Expected:").unwrap_or("?"),
        after("Found:").unwrap_or("?")
    )
}

/// A plugin inside a loaded library.
struct DylibPlugin {
    module: PluginModule_Ref,
    info: PluginInfo,
}

impl FusionFn for DylibPlugin {
    fn info(&self) -> PluginInfo {
        self.info.clone()
    }

    fn fuse(&self, params: &Params, input: &FusionInput<'_>) -> Result<FusedTarget, String> {
        let params = params_json(params);
        let candidates: Vec<AbiCandidate<'_>> = input.candidates.iter().map(AbiCandidate::from).collect();
        let abi_input = AbiFusionInput {
            gold: input.gold.into(),
            text_bytes: input.text_bytes,
            candidates: RSlice::from_slice(&candidates),
        };
        match (self.module.fuse())(self.info.name.as_str().into(), params.as_str().into(), &abi_input) {
            RResult::ROk(rows) => Ok(rows.into()),
            RResult::RErr(e) => Err(e.into_string()),
        }
    }
}

impl ModelAdapter for DylibPlugin {
    fn info(&self) -> PluginInfo {
        self.info.clone()
    }

    fn spec(&self, params: &Params, files: CheckpointFiles<'_>) -> Result<ModelSpec, String> {
        let params = params_json(params);
        let tokenizer = files.tokenizer_json.map(RStr::from).into();
        match (self.module.adapt())(
            self.info.name.as_str().into(),
            params.as_str().into(),
            files.config_json.into(),
            tokenizer,
        ) {
            RResult::ROk(json) => parse_spec(&json),
            RResult::RErr(e) => Err(e.into_string()),
        }
    }
}

impl SequenceAligner for DylibPlugin {
    fn info(&self) -> PluginInfo {
        self.info.clone()
    }

    fn align(&self, params: &Params, a: Tokenization<'_>, b: Tokenization<'_>) -> Result<Alignment, String> {
        let call = self.module.align();
        call(self.info.name.as_str().into(), params_json(params).as_str().into(), a.into(), b.into())
            .into_result()
            .map(Into::into)
            .map_err(RString::into_string)
    }
}

impl VocabMapper for DylibPlugin {
    fn info(&self) -> PluginInfo {
        self.info.clone()
    }

    fn map_vocab(
        &self,
        params: &Params,
        source: TokenStrings<'_>,
        target: TokenStrings<'_>,
        cooccurrence: Cooccurrence<'_>,
    ) -> Result<VocabMap, String> {
        let call = self.module.map_vocab();
        let (name, params) = (self.info.name.as_str(), params_json(params));
        call(name.into(), params.as_str().into(), source.into(), target.into(), cooccurrence.into())
            .into_result()
            .map(Into::into)
            .map_err(RString::into_string)
    }
}

/// Parses the JSON model spec that a dylib or component returns.
pub(super) fn parse_spec(json: &str) -> Result<ModelSpec, String> {
    serde_json::from_str(json).map_err(|e| format!("the returned model spec is not valid: {e}"))
}
