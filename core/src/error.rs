//! The error of fusellm's stages. Each variant keeps what it wraps as its `source`, so a
//! caller sees the whole chain (what was being done, down to the I/O or tensor error
//! underneath); [`Error::report`] and the binary render it as `what: cause: cause`.

use crate::config::ConfigError;
use crate::plugins::PluginError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A finding of fusellm's own checks: what is wrong, where, and what to do.
    #[error("{0}")]
    Invalid(String),
    /// What was being done when a lower-level error happened (the source).
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The ranks of a data-parallel run: their launch or a collective between them.
    #[error(transparent)]
    Dist(#[from] fusellm_dist::Error),
    /// Writing, reading or hashing a file.
    #[error(transparent)]
    File(#[from] fusellm_files::Error),
    /// A tensor operation of candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    /// The block library: a model it cannot run or load.
    #[error(transparent)]
    Blocks(#[from] fusellm_blocks::error::Error),
    /// Loading, resolving or calling a plugin.
    #[error(transparent)]
    Plugin(#[from] PluginError),
    /// A plugin's parameters that do not match its schema.
    #[error(transparent)]
    Param(#[from] fusellm_sdk::params::ParamError),
    /// The experiment config, with the file, line and column it points at.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn msg(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }

    /// The error and its sources, joined by ": " (what the binary prints).
    pub fn report(&self) -> String {
        report(self)
    }
}

/// Any error and its chain of sources, joined by ": ".
pub fn report(error: &(dyn std::error::Error + 'static)) -> String {
    let mut out = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        out += ": ";
        out += &e.to_string();
        source = e.source();
    }
    out
}

/// Adds what was being done to an error, keeping the error as the source.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: Into<Box<dyn std::error::Error + Send + Sync>>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::Context { what: what(), source: e.into() })
    }
}
