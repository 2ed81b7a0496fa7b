use std::path::{Path, PathBuf};

/// Errors of the audit library. File and network input never panics: it ends up here.
#[derive(thiserror::Error, Debug)]
pub enum Error {
    #[error("I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("I/O error: {0}")]
    IoBare(#[from] std::io::Error),
    #[error("JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("the store is damaged before its last signed checkpoint (run `audit verify`): {0}")]
    Tampered(String),
    #[error("corrupt store data: {0}")]
    Corrupt(String),
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("forwarding: {0}")]
    Forward(String),
    /// The store refused what the recorder's writer thread asked of it.
    #[error("{0}")]
    Writer(String),
    #[error("the recorder queue is full; the event was counted as dropped")]
    QueueFull,
    #[error("the recorder has stopped")]
    Stopped,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attach a path to an I/O error.
pub(crate) trait IoCtx<T> {
    fn ctx(self, path: &Path) -> Result<T>;
}

impl<T> IoCtx<T> for std::io::Result<T> {
    fn ctx(self, path: &Path) -> Result<T> {
        self.map_err(|source| Error::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}
