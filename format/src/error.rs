//! Errors of the format crate: every variant names what was wrong.

use thiserror::Error;

/// Result alias for this crate.
pub type Result<T, E = FormatError> = std::result::Result<T, E>;

/// What can go wrong reading or writing a converted layer.
#[derive(Debug, Error)]
pub enum FormatError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),

    #[error("block size {0} is not a power of two between 64 KiB and 4 MiB")]
    BadBlockSize(u32),

    #[error("layer is not a valid tar archive: {0}")]
    NotTar(String),

    #[error("tar entry {path:?}: {reason}")]
    BadEntry { path: String, reason: String },

    #[error("footer: {0}")]
    BadFooter(String),

    #[error("table of contents: {0}")]
    BadToc(String),

    #[error("block {index}: digest mismatch (expected {expected}, got {actual})")]
    BlockDigestMismatch {
        index: usize,
        expected: String,
        actual: String,
    },

    #[error("block {index}: {reason}")]
    BadBlock { index: usize, reason: String },

    #[error("layer data does not match its recorded diffID (expected {expected}, got {actual})")]
    DiffIdMismatch { expected: String, actual: String },
}

impl FormatError {
    pub(crate) fn toc(msg: impl Into<String>) -> Self {
        FormatError::BadToc(msg.into())
    }

    pub(crate) fn block(index: usize, reason: impl Into<String>) -> Self {
        FormatError::BadBlock {
            index,
            reason: reason.into(),
        }
    }
}
