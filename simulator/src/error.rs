//! The library's error type.

/// Why a simulation input could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A JSON input (trace, measurement) did not parse.
    #[error("{path}: {source}")]
    Json {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// A scenario did not parse.
    #[error("{path}: {source}")]
    Toml {
        /// The file.
        path: String,
        /// The cause.
        #[source]
        source: toml::de::Error,
    },
    /// A converted blob's TOC could not be read.
    #[error("{path}: {source}")]
    Format {
        /// The blob.
        path: String,
        /// The cause.
        #[source]
        source: faasnet_format::FormatError,
    },
    /// A plot could not be drawn or written.
    #[error("plot {path}: {reason}")]
    Plot {
        /// The output file.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// An input is inconsistent (e.g. a start read names a block that does not exist).
    #[error("{0}")]
    Invalid(String),
}

/// Result with [`SimError`].
pub type Result<T> = std::result::Result<T, SimError>;

impl SimError {
    /// An I/O error on `path`.
    pub fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        SimError::Io {
            path: path.as_ref().display().to_string(),
            source,
        }
    }
}
