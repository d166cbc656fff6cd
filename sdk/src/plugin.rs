//! What every plugin declares about itself, and the four kinds of plugin.

use serde::{Deserialize, Serialize};

use crate::params::ParamSpec;

/// The extension points of DESIGN.md.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    /// Checkpoint directory -> ModelSpec.
    Adapter,
    /// Two tokenizations of one text -> the pairs of positions that align.
    SequenceAligner,
    /// A source vocabulary -> a target token for each of its tokens.
    VocabMapper,
    /// Candidates' aligned distributions -> fused target.
    Fusion,
}

impl PluginKind {
    pub const ALL: [PluginKind; 4] =
        [PluginKind::Adapter, PluginKind::SequenceAligner, PluginKind::VocabMapper, PluginKind::Fusion];

    /// The name configs, listings and messages use.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Adapter => "adapter",
            PluginKind::SequenceAligner => "sequence-aligner",
            PluginKind::VocabMapper => "vocab-mapper",
            PluginKind::Fusion => "fusion",
        }
    }

    /// The kind in words, for messages: "sequence aligner".
    pub fn words(self) -> &'static str {
        match self {
            PluginKind::Adapter => "adapter",
            PluginKind::SequenceAligner => "sequence aligner",
            PluginKind::VocabMapper => "vocabulary mapper",
            PluginKind::Fusion => "fusion",
        }
    }
}

impl std::fmt::Display for PluginKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.words())
    }
}

/// A plugin's self-description: its registry name, semantic version (part of every cache
/// key downstream, so a new version recomputes what it produced), and parameter schema.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginInfo {
    pub name: String,
    pub kind: PluginKind,
    pub version: String,
    pub doc: String,
    pub params: Vec<ParamSpec>,
    /// For adapters: the config.json `model_type` values they understand.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub handles: Vec<String>,
    /// For vocabulary mappers: whether they read the corpus's [`Cooccurrence`] counts
    /// (the host aligns the corpus to count them first).
    ///
    /// [`Cooccurrence`]: crate::Cooccurrence
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub cooccurrence: bool,
}

impl PluginInfo {
    pub fn new(kind: PluginKind, name: &str, version: &str, doc: &str) -> Self {
        Self {
            name: name.into(),
            kind,
            version: version.into(),
            doc: doc.into(),
            params: Vec::new(),
            handles: Vec::new(),
            cooccurrence: false,
        }
    }

    /// Declares that a vocabulary mapper reads the co-occurrence counts.
    pub fn reads_cooccurrence(mut self) -> Self {
        self.cooccurrence = true;
        self
    }

    /// Declares the config.json `model_type` values an adapter understands.
    pub fn handles(mut self, model_types: &[&str]) -> Self {
        self.handles = model_types.iter().map(|s| s.to_string()).collect();
        self
    }

    /// Declares the parameters of a [`params!`](crate::params!) struct.
    pub fn params<P: crate::params::Declared>(mut self) -> Self {
        self.params.extend(P::schema());
        self
    }

    /// Checks what a host relies on: a plugin name usable in configs and a semantic version.
    pub fn check(&self) -> Result<(), String> {
        let name_ok =
            !self.name.is_empty() && self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !name_ok {
            return Err(format!("plugin name {:?} must be non-empty ASCII letters, digits, `_` or `-`", self.name));
        }
        semver::Version::parse(&self.version).map(|_| ()).map_err(|e| {
            format!("plugin `{}` has version {:?}, not a semantic version like 1.2.3 ({e})", self.name, self.version)
        })
    }
}
