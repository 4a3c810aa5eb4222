//! Image references: `host[:port]/repo[:tag][@digest]` for registries and `oci:DIR[:tag]` for
//! OCI image layout directories.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::registry::RegistryError;

/// The registry host Docker Hub references (`ubuntu`, `library/ubuntu`) resolve to.
pub const DOCKER_HUB_HOST: &str = "registry-1.docker.io";

/// A reference to an image (or an image index) in a registry.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// Registry host, with port when one was given (`127.0.0.1:5000`).
    pub registry: String,
    /// Repository path inside the registry (`library/busybox`).
    pub repository: String,
    /// Tag, if any.
    pub tag: Option<String>,
    /// Digest (`sha256:...`), if any; it wins over the tag when both are given.
    pub digest: Option<String>,
}

impl Reference {
    /// Parses `host[:port]/repo[:tag][@digest]` with Docker's normalization rules (a first
    /// component without `.` or `:` that is not `localhost` is a Docker Hub path).
    pub fn parse(s: &str) -> Result<Reference, RegistryError> {
        let bad = |why: &str| RegistryError::BadReference {
            reference: s.to_string(),
            reason: why.to_string(),
        };
        let (rest, digest) = match s.split_once('@') {
            Some((r, d)) => {
                if !is_digest(d) {
                    return Err(bad("digest must be sha256:<64 hex digits>"));
                }
                (r, Some(d.to_string()))
            }
            None => (s, None),
        };
        let (name, tag) = match rest.rsplit_once(':') {
            Some((n, t)) if !t.contains('/') => (n, Some(t.to_string())),
            _ => (rest, None),
        };
        if let Some(t) = &tag {
            let ok = !t.is_empty()
                && t.len() <= 128
                && t.chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
                && t.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
            if !ok {
                return Err(bad("tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
            }
        }
        let (registry, repository) = match name.split_once('/') {
            Some((first, path))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), path.to_string())
            }
            _ if name.contains('/') => (DOCKER_HUB_HOST.to_string(), name.to_string()),
            _ => (DOCKER_HUB_HOST.to_string(), format!("library/{name}")),
        };
        let registry = if registry == "docker.io" || registry == "index.docker.io" {
            DOCKER_HUB_HOST.to_string()
        } else {
            registry
        };
        if repository.is_empty()
            || !repository.split('/').all(|c| {
                !c.is_empty()
                    && c.chars().all(|ch| {
                        ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch)
                    })
            })
        {
            return Err(bad(
                "repository must be lowercase letters, digits and . _ - separated by /",
            ));
        }
        Ok(Reference {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The tag or digest to ask the registry for (`latest` when neither was given).
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }

    /// The same repository, pointing at `digest`.
    pub fn with_digest(&self, digest: &str) -> Reference {
        Reference {
            digest: Some(digest.to_string()),
            ..self.clone()
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

/// Where an image lives: a registry or an OCI layout directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageLocation {
    /// An image in a registry.
    Registry(Reference),
    /// An image in an OCI image layout directory, selected by its
    /// `org.opencontainers.image.ref.name` (or the only image when no tag is given).
    Layout { dir: PathBuf, tag: Option<String> },
}

impl FromStr for ImageLocation {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(rest) = s.strip_prefix("oci:") {
            // The tag is what follows the last ':' when it holds no '/': `oci:/a/b:v1`.
            let (dir, tag) = match rest.rsplit_once(':') {
                Some((d, t)) if !t.contains('/') && !d.is_empty() => (d, Some(t.to_string())),
                _ => (rest, None),
            };
            if dir.is_empty() {
                return Err(RegistryError::BadReference {
                    reference: s.to_string(),
                    reason: "oci: needs a directory".into(),
                });
            }
            return Ok(ImageLocation::Layout {
                dir: PathBuf::from(dir),
                tag: tag.filter(|t| !t.is_empty()),
            });
        }
        Reference::parse(s).map(ImageLocation::Registry)
    }
}

impl fmt::Display for ImageLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageLocation::Registry(r) => r.fmt(f),
            ImageLocation::Layout { dir, tag: None } => write!(f, "oci:{}", dir.display()),
            ImageLocation::Layout { dir, tag: Some(t) } => write!(f, "oci:{}:{t}", dir.display()),
        }
    }
}

/// True for `sha256:<64 lowercase hex>`.
pub fn is_digest(d: &str) -> bool {
    d.strip_prefix("sha256:").is_some_and(|h| {
        h.len() == 64
            && h.bytes()
                .all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_registry_references() {
        let r = Reference::parse("127.0.0.1:5000/repo/x:v1").unwrap();
        assert_eq!(r.registry, "127.0.0.1:5000");
        assert_eq!(r.repository, "repo/x");
        assert_eq!(r.reference(), "v1");
        let r = Reference::parse("busybox").unwrap();
        assert_eq!(r.registry, DOCKER_HUB_HOST);
        assert_eq!(r.repository, "library/busybox");
        assert_eq!(r.reference(), "latest");
        let d = format!("sha256:{}", "a".repeat(64));
        let r = Reference::parse(&format!("localhost/a@{d}")).unwrap();
        assert_eq!(r.reference(), d);
        assert!(Reference::parse("localhost:5000/UPPER:x").is_err());
        assert!(Reference::parse("localhost:5000/a:bad tag").is_err());
    }

    #[test]
    fn parses_layout_locations() {
        let l: ImageLocation = "oci:/tmp/x:v1".parse().unwrap();
        assert_eq!(
            l,
            ImageLocation::Layout {
                dir: "/tmp/x".into(),
                tag: Some("v1".into())
            }
        );
        let l: ImageLocation = "oci:dir".parse().unwrap();
        assert_eq!(
            l,
            ImageLocation::Layout {
                dir: "dir".into(),
                tag: None
            }
        );
    }
}
