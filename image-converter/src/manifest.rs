//! OCI and Docker schema2 manifests, indexes and image configs: just the fields the
//! converter reads or changes; every other field is carried through untouched.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Media type constants and their classification.
pub mod media_types {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
    pub const DOCKER_SCHEMA1_SIGNED: &str =
        "application/vnd.docker.distribution.manifest.v1+prettyjws";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";

    /// True for the manifest and index media types this tool reads.
    pub fn is_manifest(mt: &str) -> bool {
        is_image_manifest(mt) || is_index(mt)
    }

    /// An image manifest (OCI or Docker schema2).
    pub fn is_image_manifest(mt: &str) -> bool {
        mt == OCI_MANIFEST || mt == DOCKER_MANIFEST
    }

    /// An index or manifest list.
    pub fn is_index(mt: &str) -> bool {
        mt == OCI_INDEX || mt == DOCKER_MANIFEST_LIST
    }
}

/// How a source layer blob is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayerCompression {
    /// A plain tar (sniffed anyway: Docker sometimes labels gzip layers as plain tar).
    None,
    Gzip,
    Zstd,
    /// Already in the FaaSNet block format.
    Converted,
}

impl LayerCompression {
    /// Classifies a layer media type; `None` for a media type that is not a layer we know.
    pub fn from_media_type(mt: &str) -> Option<LayerCompression> {
        use media_types::*;
        match mt {
            _ if mt == faasnet_format::LAYER_MEDIA_TYPE => Some(LayerCompression::Converted),
            OCI_LAYER | DOCKER_LAYER => Some(LayerCompression::None),
            OCI_LAYER_GZIP | DOCKER_LAYER_GZIP => Some(LayerCompression::Gzip),
            OCI_LAYER_ZSTD => Some(LayerCompression::Zstd),
            _ => None,
        }
    }

    /// Name for messages.
    pub fn name(self) -> &'static str {
        match self {
            LayerCompression::None => "tar",
            LayerCompression::Gzip => "gzip",
            LayerCompression::Zstd => "zstd",
            LayerCompression::Converted => "faasnet",
        }
    }
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Value>,
    /// Any other field (`urls`, `artifactType`, ...), kept as is.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Descriptor {
    /// `os/arch[/variant]` of a platform-specific manifest descriptor, for messages.
    pub fn platform_name(&self) -> String {
        let p = self.platform.as_ref();
        let field = |k: &str| p.and_then(|p| p.get(k)).and_then(Value::as_str);
        let mut s = format!(
            "{}/{}",
            field("os").unwrap_or("?"),
            field("architecture").unwrap_or("?")
        );
        if let Some(v) = field("variant") {
            s.push('/');
            s.push_str(v);
        }
        s
    }
}

/// An image manifest (OCI, or Docker schema2 which has the same shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageManifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// An image index (OCI) or manifest list (Docker).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ImageIndex {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// The parts of an image config the converter checks.
#[derive(Debug, Clone, Deserialize)]
pub struct ImageConfig {
    pub rootfs: RootFs,
}

/// `rootfs` of an image config.
#[derive(Debug, Clone, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    pub diff_ids: Vec<String>,
}

/// The image config `config` with `rootfs.diff_ids` replaced by `diff_ids`, every other
/// byte kept as it is: the `diff_ids` array's text is cut out of the original JSON and a new
/// one written in its place (compact), so unknown fields, their order, numbers and
/// formatting survive exactly. The result is checked to parse to the original config with
/// only the diffIDs changed.
pub fn replace_diff_ids(config: &[u8], diff_ids: &[String]) -> Result<Vec<u8>, String> {
    use serde_json::value::RawValue;
    #[derive(Deserialize)]
    struct Top<'a> {
        #[serde(borrow)]
        rootfs: &'a RawValue,
    }
    #[derive(Deserialize)]
    struct Fs<'a> {
        #[serde(borrow)]
        diff_ids: &'a RawValue,
    }
    let text = std::str::from_utf8(config).map_err(|e| format!("config is not UTF-8: {e}"))?;
    let top: Top = serde_json::from_str(text).map_err(|e| format!("config: {e}"))?;
    let fs: Fs = serde_json::from_str(top.rootfs.get()).map_err(|e| format!("rootfs: {e}"))?;
    let old = fs.diff_ids.get();
    let start = (old.as_ptr() as usize)
        .checked_sub(text.as_ptr() as usize)
        .filter(|&s| text.get(s..s + old.len()) == Some(old))
        .ok_or("cannot locate rootfs.diff_ids in the config")?;
    let mut out = Vec::with_capacity(config.len() + 16);
    out.extend_from_slice(&config[..start]);
    out.extend_from_slice(&serde_json::to_vec(diff_ids).expect("strings serialize"));
    out.extend_from_slice(&config[start + old.len()..]);
    let mut want: Value = serde_json::from_slice(config).map_err(|e| format!("config: {e}"))?;
    want["rootfs"]["diff_ids"] = serde_json::json!(diff_ids);
    let got: Value = serde_json::from_slice(&out).map_err(|e| format!("new config: {e}"))?;
    if got != want {
        return Err("rewriting rootfs.diff_ids changed other fields of the config".into());
    }
    Ok(out)
}

/// A parsed manifest: either an image or an index.
#[derive(Debug, Clone)]
pub enum Manifest {
    Image(ImageManifest),
    Index(ImageIndex),
}

impl Manifest {
    /// Parses manifest bytes of media type `media_type`.
    pub fn parse(bytes: &[u8], media_type: &str) -> Result<Manifest, String> {
        if media_type == media_types::DOCKER_SCHEMA1
            || media_type == media_types::DOCKER_SCHEMA1_SIGNED
        {
            return Err(
                "Docker schema 1 manifests are not supported; re-push the image with a \
                 current tool"
                    .into(),
            );
        }
        if media_types::is_index(media_type) {
            serde_json::from_slice(bytes)
                .map(Manifest::Index)
                .map_err(|e| format!("invalid image index: {e}"))
        } else if media_types::is_image_manifest(media_type) {
            serde_json::from_slice(bytes)
                .map(Manifest::Image)
                .map_err(|e| format!("invalid image manifest: {e}"))
        } else {
            Err(format!("unsupported manifest media type {media_type:?}"))
        }
    }
}

/// The media type of manifest bytes: the `mediaType` field if present, else inferred from
/// the shape (an index has `manifests`, an image `layers`), else the registry's header.
pub fn detect_media_type(bytes: &[u8], header: Option<&str>) -> Option<String> {
    let v: Value = serde_json::from_slice(bytes).ok()?;
    if let Some(mt) = v.get("mediaType").and_then(Value::as_str) {
        return Some(mt.to_string());
    }
    if v.get("schemaVersion").and_then(Value::as_u64) == Some(1) {
        return Some(media_types::DOCKER_SCHEMA1.to_string());
    }
    if let Some(h) = header {
        return Some(h.to_string());
    }
    if v.get("manifests").is_some() {
        Some(media_types::OCI_INDEX.to_string())
    } else if v.get("layers").is_some() {
        Some(media_types::OCI_MANIFEST.to_string())
    } else {
        None
    }
}

/// Serializes a manifest the way registries like it: compact JSON. The digest is computed
/// over exactly these bytes.
pub fn to_bytes<T: Serialize>(m: &T) -> Vec<u8> {
    serde_json::to_vec(m).expect("manifest serializes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_survive_a_roundtrip() {
        let json = r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"sha256:aa","size":3},"layers":[{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"sha256:bb","size":4,"urls":["x"]}],"subject":{"a":1}}"#;
        let m: ImageManifest = serde_json::from_str(json).unwrap();
        let back: Value = serde_json::from_slice(&to_bytes(&m)).unwrap();
        assert_eq!(back["subject"]["a"], 1);
        assert_eq!(back["layers"][0]["urls"][0], "x");
    }

    #[test]
    fn replacing_diff_ids_keeps_every_other_byte() {
        let a = format!("sha256:{}", "a".repeat(64));
        let b = format!("sha256:{}", "b".repeat(64));
        let c = format!("sha256:{}", "c".repeat(64));
        // Odd formatting, unknown fields, key order, a big number and a float, escapes, a
        // "diff_ids" key elsewhere: all must survive.
        let config = format!(
            "{{\n  \"zeta\": 1,\n  \"config\": {{\"Labels\": {{\"diff_ids\": \"{a}\"}}}},\n               \"rootfs\" : {{ \"type\": \"layers\",\n    \"diff_ids\" : [ \"{a}\",\n \"{b}\" ] ,\n              \"x\": 18446744073709551615 }},\n  \"f\": 1.50, \"s\": \"\\u00e9\"\n}}\n"
        );
        let out = replace_diff_ids(config.as_bytes(), &[a.clone(), c.clone()]).unwrap();
        let out = String::from_utf8(out).unwrap();
        let expected = config.replace(
            &format!("[ \"{a}\",\n \"{b}\" ]"),
            &format!("[\"{a}\",\"{c}\"]"),
        );
        assert_ne!(expected, config);
        assert_eq!(out, expected);
        let v: Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["rootfs"]["diff_ids"][1], c.as_str());
        assert_eq!(v["config"]["Labels"]["diff_ids"], a.as_str());
        // No rootfs, or a duplicate one: refused.
        assert!(replace_diff_ids(b"{\"a\":1}", std::slice::from_ref(&a)).is_err());
        let dup = format!(
            "{{\"rootfs\":{{\"diff_ids\":[\"{a}\"]}},\"rootfs\":{{\"diff_ids\":[\"{b}\"]}}}}"
        );
        assert!(replace_diff_ids(dup.as_bytes(), &[c]).is_err());
    }

    #[test]
    fn classifies_layers() {
        assert_eq!(
            LayerCompression::from_media_type(media_types::DOCKER_LAYER_GZIP),
            Some(LayerCompression::Gzip)
        );
        assert_eq!(
            LayerCompression::from_media_type(faasnet_format::LAYER_MEDIA_TYPE),
            Some(LayerCompression::Converted)
        );
        assert_eq!(LayerCompression::from_media_type("text/plain"), None);
    }
}
