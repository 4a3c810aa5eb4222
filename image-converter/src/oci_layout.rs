//! OCI image layout directories (`oci-layout`, `index.json`, `blobs/sha256/...`), as source
//! or destination of a conversion.

use std::io;
use std::path::{Path, PathBuf};

use serde_json::Value;

use crate::manifest::{Descriptor, ImageIndex};
use crate::reference::is_digest;
use crate::registry::FetchedManifest;

/// Annotation naming an image in `index.json`.
pub const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Errors reading or writing a layout directory.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("{dir}: not an OCI image layout ({detail})")]
    NotLayout { dir: PathBuf, detail: String },
    #[error("{dir}: no image tagged {tag:?} in index.json (tags: {known})")]
    TagNotFound {
        dir: PathBuf,
        tag: String,
        known: String,
    },
    #[error("{dir}: index.json holds {count} images; name one with oci:DIR:TAG (tags: {known})")]
    Ambiguous {
        dir: PathBuf,
        count: usize,
        known: String,
    },
    #[error("{dir}: blob {digest}: {detail}")]
    Blob {
        dir: PathBuf,
        digest: String,
        detail: String,
    },
    #[error("{dir}: {detail}")]
    Io { dir: PathBuf, detail: String },
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
}

impl OciLayout {
    /// Opens an existing layout.
    pub fn open(dir: &Path) -> Result<OciLayout, LayoutError> {
        let marker = dir.join("oci-layout");
        if !marker.is_file() || !dir.join("index.json").is_file() {
            return Err(LayoutError::NotLayout {
                dir: dir.to_path_buf(),
                detail: "oci-layout or index.json is missing".into(),
            });
        }
        Ok(OciLayout {
            root: dir.to_path_buf(),
        })
    }

    /// Opens a layout, creating an empty one if `dir` does not hold one yet.
    pub fn open_or_create(dir: &Path) -> Result<OciLayout, LayoutError> {
        if dir.join("oci-layout").is_file() {
            return OciLayout::open(dir);
        }
        let io_err = |e: io::Error| LayoutError::Io {
            dir: dir.to_path_buf(),
            detail: e.to_string(),
        };
        std::fs::create_dir_all(dir.join("blobs/sha256")).map_err(io_err)?;
        std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#)
            .map_err(io_err)?;
        if !dir.join("index.json").exists() {
            let empty = ImageIndex {
                schema_version: 2,
                media_type: Some(crate::manifest::media_types::OCI_INDEX.into()),
                manifests: vec![],
                annotations: Default::default(),
                extra: Default::default(),
            };
            std::fs::write(dir.join("index.json"), crate::manifest::to_bytes(&empty))
                .map_err(io_err)?;
        }
        OciLayout::open(dir)
    }

    /// The layout directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    fn err(&self, detail: impl ToString) -> LayoutError {
        LayoutError::Io {
            dir: self.root.clone(),
            detail: detail.to_string(),
        }
    }

    fn read_index(&self) -> Result<ImageIndex, LayoutError> {
        let bytes = std::fs::read(self.root.join("index.json")).map_err(|e| self.err(e))?;
        serde_json::from_slice(&bytes).map_err(|e| LayoutError::NotLayout {
            dir: self.root.clone(),
            detail: format!("index.json: {e}"),
        })
    }

    /// The descriptor of the image tagged `tag` (or the only image when `tag` is `None`).
    pub fn descriptor(&self, tag: Option<&str>) -> Result<Descriptor, LayoutError> {
        let index = self.read_index()?;
        let known = || {
            let tags: Vec<&str> = index
                .manifests
                .iter()
                .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
                .collect();
            if tags.is_empty() {
                "none".to_string()
            } else {
                tags.join(", ")
            }
        };
        match tag {
            Some(t) => index
                .manifests
                .iter()
                .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(t))
                .cloned()
                .ok_or_else(|| LayoutError::TagNotFound {
                    dir: self.root.clone(),
                    tag: t.to_string(),
                    known: known(),
                }),
            None if index.manifests.len() == 1 => Ok(index.manifests[0].clone()),
            None => Err(LayoutError::Ambiguous {
                dir: self.root.clone(),
                count: index.manifests.len(),
                known: known(),
            }),
        }
    }

    /// Reads the manifest tagged `tag` (see [`OciLayout::descriptor`]).
    pub fn resolve(&self, tag: Option<&str>) -> Result<FetchedManifest, LayoutError> {
        let desc = self.descriptor(tag)?;
        self.fetch_manifest(&desc.digest, Some(&desc.media_type))
    }

    /// Reads manifest blob `digest`; the media type comes from the descriptor, else from the
    /// manifest's own `mediaType` field.
    pub fn fetch_manifest(
        &self,
        digest: &str,
        media_type: Option<&str>,
    ) -> Result<FetchedManifest, LayoutError> {
        let bytes = self.read_blob(digest, crate::registry::MAX_MANIFEST_SIZE as u64)?;
        let media_type = crate::manifest::detect_media_type(&bytes, media_type)
            .or(media_type.map(str::to_string))
            .unwrap_or_default();
        Ok(FetchedManifest {
            bytes,
            media_type,
            digest: digest.to_string(),
        })
    }

    /// Path of blob `digest`.
    pub fn blob_path(&self, digest: &str) -> Result<PathBuf, LayoutError> {
        if !is_digest(digest) {
            return Err(LayoutError::Blob {
                dir: self.root.clone(),
                digest: digest.to_string(),
                detail: "not a sha256 digest".into(),
            });
        }
        Ok(self.root.join("blobs/sha256").join(&digest[7..]))
    }

    /// Reads a whole small blob and checks its digest.
    pub fn read_blob(&self, digest: &str, max: u64) -> Result<Vec<u8>, LayoutError> {
        let path = self.blob_path(digest)?;
        let blob_err = |detail: String| LayoutError::Blob {
            dir: self.root.clone(),
            digest: digest.to_string(),
            detail,
        };
        let len = std::fs::metadata(&path)
            .map_err(|e| blob_err(e.to_string()))?
            .len();
        if len > max {
            return Err(blob_err(format!(
                "{len} bytes, more than the {max} allowed"
            )));
        }
        let bytes = std::fs::read(&path).map_err(|e| blob_err(e.to_string()))?;
        let actual = faasnet_format::sha256_digest(&bytes);
        if actual != digest {
            return Err(blob_err(format!("content has digest {actual}")));
        }
        Ok(bytes)
    }

    /// Size of blob `digest`, if present.
    pub fn blob_size(&self, digest: &str) -> Result<Option<u64>, LayoutError> {
        match std::fs::metadata(self.blob_path(digest)?) {
            Ok(m) => Ok(Some(m.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(self.err(e)),
        }
    }

    /// Copies the (already verified) file at `path` in as blob `digest`.
    pub fn put_blob_file(&self, path: &Path, digest: &str) -> Result<(), LayoutError> {
        let dest = self.blob_path(digest)?;
        if dest.exists() {
            return Ok(());
        }
        // Copy to a temporary name in the same directory, then rename, so a reader never
        // sees a partial blob.
        let tmp = dest.with_extension("partial");
        std::fs::copy(path, &tmp).map_err(|e| self.err(e))?;
        // The source is a private temp file (0600); blobs are world-readable like the rest.
        let world_readable = std::os::unix::fs::PermissionsExt::from_mode(0o644);
        std::fs::set_permissions(&tmp, world_readable).map_err(|e| self.err(e))?;
        std::fs::rename(&tmp, &dest).map_err(|e| self.err(e))
    }

    /// Writes a small blob; returns its digest.
    pub fn put_blob_bytes(&self, bytes: &[u8]) -> Result<String, LayoutError> {
        let digest = faasnet_format::sha256_digest(bytes);
        let dest = self.blob_path(&digest)?;
        if !dest.exists() {
            let tmp = dest.with_extension("partial");
            std::fs::write(&tmp, bytes).map_err(|e| self.err(e))?;
            std::fs::rename(&tmp, &dest).map_err(|e| self.err(e))?;
        }
        Ok(digest)
    }

    /// Points `tag` at `desc` in index.json (replacing what it pointed at before), atomically.
    pub fn set_tag(&self, tag: &str, mut desc: Descriptor) -> Result<(), LayoutError> {
        let mut index = self.read_index()?;
        index
            .manifests
            .retain(|d| d.annotations.get(REF_NAME).map(String::as_str) != Some(tag));
        desc.annotations.insert(REF_NAME.into(), tag.into());
        index.manifests.push(desc);
        let tmp = self.root.join("index.json.partial");
        std::fs::write(&tmp, crate::manifest::to_bytes(&index)).map_err(|e| self.err(e))?;
        std::fs::rename(&tmp, self.root.join("index.json")).map_err(|e| self.err(e))
    }
}

/// True if a descriptor's platform is `unknown/unknown` (BuildKit attestation manifests).
pub fn is_unknown_platform(desc: &Descriptor) -> bool {
    desc.platform
        .as_ref()
        .and_then(|p| p.get("os"))
        .and_then(Value::as_str)
        == Some("unknown")
}
