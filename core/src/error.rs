//! The error of fusellm's stages: a message that says what went wrong, where, and what to do.

use std::fmt;

#[derive(Clone, Debug, PartialEq)]
pub struct Error {
    pub message: String,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn msg(message: impl Into<String>) -> Self {
        Self { message: message.into() }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<candle_core::Error> for Error {
    fn from(e: candle_core::Error) -> Self {
        // candle appends a backtrace when RUST_BACKTRACE is set; the first line is the error.
        Self::msg(e.to_string().lines().next().unwrap_or_default().to_string())
    }
}

impl From<crate::plugins::PluginError> for Error {
    fn from(e: crate::plugins::PluginError) -> Self {
        Self::msg(e.message)
    }
}

/// Adds what was being done to an error.
pub trait Context<T> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T>;
}

impl<T, E: fmt::Display> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| Error::msg(format!("{}: {e}", what())))
    }
}
