//! The block library's error: a check of its own (a spec it cannot run, a dtype the device
//! lacks, weights that disagree with the config), or a lower error kept as the source.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// What is wrong, where, and what to do.
    #[error("{0}")]
    Invalid(String),
    /// What was being done when a lower-level error happened (the source).
    #[error("{what}")]
    Context {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A tensor operation of candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn msg(message: impl Into<String>) -> Self {
        Self::Invalid(message.into())
    }

    /// `source`, with what was being done.
    pub fn context(what: impl Into<String>, source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Context { what: what.into(), source: source.into() }
    }
}
