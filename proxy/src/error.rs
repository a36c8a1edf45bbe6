//! The binary's error type: what a command can fail with, worded for the
//! person who ran it.

use store::StoreError;

use crate::config::ConfigError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path}: {message}")]
    Key { path: String, message: String },
    /// Talking to an elector or admin API failed.
    #[error("{0}")]
    Remote(String),
    #[error("{0}")]
    Usage(String),
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
