//! One interface over the two places images live: a registry repository or an OCI layout
//! directory.

use std::io;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio::io::{AsyncReadExt, AsyncSeekExt};

use crate::error::Error;
use crate::manifest::Descriptor;
use crate::oci_layout::OciLayout;
use crate::reference::{ImageLocation, Reference};
use crate::registry::{BlobStream, FetchedManifest, RegistryClient, RegistryError};

/// A source or destination of images.
#[derive(Debug, Clone)]
pub enum Store {
    Registry {
        client: Arc<RegistryClient>,
        reference: Reference,
    },
    Layout {
        layout: OciLayout,
        tag: Option<String>,
    },
}

impl Store {
    /// Opens `loc` for reading (a layout must exist).
    pub fn open(loc: &ImageLocation, client: &Arc<RegistryClient>) -> Result<Store, Error> {
        Ok(match loc {
            ImageLocation::Registry(r) => Store::Registry {
                client: Arc::clone(client),
                reference: r.clone(),
            },
            ImageLocation::Layout { dir, tag } => Store::Layout {
                layout: OciLayout::open(dir)?,
                tag: tag.clone(),
            },
        })
    }

    /// Opens `loc` for writing (a layout is created if missing).
    pub fn open_for_write(
        loc: &ImageLocation,
        client: &Arc<RegistryClient>,
    ) -> Result<Store, Error> {
        match loc {
            ImageLocation::Layout { dir, tag } => Ok(Store::Layout {
                layout: OciLayout::open_or_create(dir)?,
                tag: tag.clone(),
            }),
            _ => Store::open(loc, client),
        }
    }

    /// Human name for messages.
    pub fn name(&self) -> String {
        match self {
            Store::Registry { reference, .. } => reference.to_string(),
            Store::Layout { layout, tag: None } => format!("oci:{}", layout.root().display()),
            Store::Layout {
                layout,
                tag: Some(t),
            } => format!("oci:{}:{t}", layout.root().display()),
        }
    }

    /// The top-level manifest the location names.
    pub async fn resolve(&self) -> Result<FetchedManifest, Error> {
        match self {
            Store::Registry { client, reference } => Ok(client.resolve_manifest(reference).await?),
            Store::Layout { layout, tag } => Ok(layout.resolve(tag.as_deref())?),
        }
    }

    /// The top-level manifest, or `None` if the tag does not exist yet.
    pub async fn resolve_existing(&self) -> Result<Option<FetchedManifest>, Error> {
        match self.resolve().await {
            Ok(m) => Ok(Some(m)),
            Err(Error::Registry(RegistryError::NotFound { .. }))
            | Err(Error::Layout(crate::oci_layout::LayoutError::TagNotFound { .. }))
            | Err(Error::Layout(crate::oci_layout::LayoutError::Ambiguous { .. })) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// A child manifest of an index, by descriptor.
    pub async fn fetch_manifest(&self, desc: &Descriptor) -> Result<FetchedManifest, Error> {
        let mut m = match self {
            Store::Registry { client, reference } => {
                client.fetch_manifest(reference, &desc.digest).await?
            }
            Store::Layout { layout, .. } => {
                layout.fetch_manifest(&desc.digest, Some(&desc.media_type))?
            }
        };
        if m.media_type.is_empty() {
            m.media_type = desc.media_type.clone();
        }
        Ok(m)
    }

    /// Streams a blob; the caller checks the digest.
    pub async fn open_blob(&self, digest: &str) -> Result<BlobStream, Error> {
        match self {
            Store::Registry { client, reference } => {
                Ok(client.fetch_blob_stream(reference, digest).await?)
            }
            Store::Layout { layout, .. } => {
                let path = layout.blob_path(digest)?;
                let file = tokio::fs::File::open(&path).await.map_err(|e| {
                    crate::oci_layout::LayoutError::Blob {
                        dir: layout.root().to_path_buf(),
                        digest: digest.to_string(),
                        detail: e.to_string(),
                    }
                })?;
                Ok(file_stream(file))
            }
        }
    }

    /// Reads a whole small blob, digest checked.
    pub async fn read_blob(&self, digest: &str, max: usize) -> Result<Vec<u8>, Error> {
        match self {
            Store::Registry { client, reference } => {
                Ok(client.fetch_blob(reference, digest, max).await?)
            }
            Store::Layout { layout, .. } => Ok(layout.read_blob(digest, max as u64)?),
        }
    }

    /// Reads `len` bytes of a blob from `offset`.
    pub async fn read_range(&self, digest: &str, offset: u64, len: u64) -> Result<Bytes, Error> {
        match self {
            Store::Registry { client, reference } => Ok(client
                .fetch_blob_range(reference, digest, offset, len)
                .await?),
            Store::Layout { layout, .. } => {
                let mut f = tokio::fs::File::open(layout.blob_path(digest)?).await?;
                f.seek(io::SeekFrom::Start(offset)).await?;
                let mut buf = vec![0u8; len as usize];
                f.read_exact(&mut buf).await?;
                Ok(Bytes::from(buf))
            }
        }
    }

    /// Size of a blob, or `None` if absent.
    pub async fn blob_size(&self, digest: &str) -> Result<Option<u64>, Error> {
        match self {
            Store::Registry { client, reference } => {
                Ok(client.blob_size(reference, digest).await?)
            }
            Store::Layout { layout, .. } => Ok(layout.blob_size(digest)?),
        }
    }

    /// Stores the verified file at `path` as blob `digest`.
    pub async fn push_blob_file(&self, path: &Path, digest: &str, size: u64) -> Result<(), Error> {
        match self {
            Store::Registry { client, reference } => {
                Ok(client.push_blob_file(reference, path, digest, size).await?)
            }
            Store::Layout { layout, .. } => Ok(layout.put_blob_file(path, digest)?),
        }
    }

    /// Stores a small blob.
    pub async fn push_blob_bytes(&self, data: Vec<u8>, digest: &str) -> Result<(), Error> {
        match self {
            Store::Registry { client, reference } => Ok(client
                .push_blob_bytes(reference, Bytes::from(data), digest)
                .await?),
            Store::Layout { layout, .. } => {
                layout.put_blob_bytes(&data)?;
                Ok(())
            }
        }
    }

    /// Stores a manifest by digest only (an index's children). Returns its descriptor.
    pub async fn push_manifest_untagged(
        &self,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Descriptor, Error> {
        let digest = faasnet_format::sha256_digest(bytes);
        match self {
            Store::Registry { client, reference } => {
                client
                    .push_manifest(reference, &digest, media_type, bytes)
                    .await?;
            }
            Store::Layout { layout, .. } => {
                layout.put_blob_bytes(bytes)?;
            }
        }
        Ok(descriptor(media_type, &digest, bytes.len() as u64))
    }

    /// Stores a manifest and points the location's tag at it: the very last step of a
    /// conversion. Returns its digest.
    pub async fn push_manifest_tagged(
        &self,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<String, Error> {
        let digest = faasnet_format::sha256_digest(bytes);
        match self {
            Store::Registry { client, reference } => {
                let tag = reference.digest.as_deref().unwrap_or(reference.reference());
                client
                    .push_manifest(reference, tag, media_type, bytes)
                    .await?;
            }
            Store::Layout { layout, tag } => {
                layout.put_blob_bytes(bytes)?;
                let desc = descriptor(media_type, &digest, bytes.len() as u64);
                layout.set_tag(tag.as_deref().unwrap_or("latest"), desc)?;
            }
        }
        Ok(digest)
    }
}

fn descriptor(media_type: &str, digest: &str, size: u64) -> Descriptor {
    Descriptor {
        media_type: media_type.to_string(),
        digest: digest.to_string(),
        size,
        annotations: Default::default(),
        platform: None,
        extra: Default::default(),
    }
}

/// A file as a stream of 256 KiB chunks.
fn file_stream(file: tokio::fs::File) -> BlobStream {
    Box::pin(
        futures::stream::unfold(file, |mut f| async move {
            let mut buf = vec![0u8; 256 * 1024];
            match f.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((Ok(Bytes::from(buf)), f))
                }
                Err(e) => Some((Err(e), f)),
            }
        })
        .fuse(),
    )
}
