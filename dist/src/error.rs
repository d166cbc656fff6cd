//! What can go wrong between ranks.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The launcher's environment is incomplete or inconsistent.
    #[error("{0}")]
    Launch(String),
    /// The launch asks for a backend this build or this machine does not have.
    #[error("{0}")]
    Backend(String),
    /// Ranks that disagree (on the config, the data, a buffer's length).
    #[error("{0}")]
    Mismatch(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
