//! Errors of the converter library. Each names what it is about (image, layer, host).

use thiserror::Error;

use crate::oci_layout::LayoutError;
use crate::registry::RegistryError;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong converting, inspecting or verifying an image.
#[derive(Debug, Error)]
pub enum Error {
    #[error(transparent)]
    Registry(#[from] RegistryError),

    #[error(transparent)]
    Layout(#[from] LayoutError),

    #[error("{image}: {reason}")]
    Manifest { image: String, reason: String },

    #[error("layer {digest}: unknown media type {media_type:?}; the converter reads tar, tar+gzip, tar+zstd and already converted layers")]
    UnknownMediaType { digest: String, media_type: String },

    #[error("layer {digest}: {reason}")]
    Layer { digest: String, reason: String },

    #[error("{0}")]
    Format(#[from] faasnet_format::FormatError),

    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    pub(crate) fn layer(digest: &str, reason: impl Into<String>) -> Error {
        Error::Layer {
            digest: digest.to_string(),
            reason: reason.into(),
        }
    }

    pub(crate) fn manifest(image: impl Into<String>, reason: impl Into<String>) -> Error {
        Error::Manifest {
            image: image.into(),
            reason: reason.into(),
        }
    }
}
