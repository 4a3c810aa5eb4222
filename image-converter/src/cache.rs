//! A small local cache of finished conversions: original layer digest (+ block size) →
//! converted layer descriptor. Lets a re-conversion skip layers whose converted blob the
//! destination already has (checked with a HEAD before use). Stored as JSON under
//! `$XDG_CACHE_HOME/faasnet` (default `~/.cache/faasnet`); losing it only costs time.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::manifest::Descriptor;

/// File name of the cache inside the cache directory.
const FILE_NAME: &str = "converted-layers.json";

/// Original-digest → converted descriptor map, persisted on [`LayerCache::save`].
#[derive(Debug, Default)]
pub struct LayerCache {
    path: Option<PathBuf>,
    entries: Mutex<BTreeMap<String, Descriptor>>,
    dirty: Mutex<bool>,
}

/// Cache key of an original layer converted with `block_size` (and no start profile, or
/// one that moved nothing in this layer).
pub fn key(original_digest: &str, block_size: u32) -> String {
    format!("{original_digest}@{block_size}")
}

/// Cache key of an original layer converted with `block_size`, reordered by a start
/// profile when `start_profile` (the `io.faasnet.layer.start-profile` digest of the paths
/// moved first) is given. Conversions with and without a profile never share a key.
pub fn profiled_key(original_digest: &str, block_size: u32, start_profile: Option<&str>) -> String {
    match start_profile {
        None => key(original_digest, block_size),
        Some(p) => format!("{}@start-profile={p}", key(original_digest, block_size)),
    }
}

/// True when `k` is a key of `original_digest` converted with `block_size`, with or
/// without a start profile.
pub fn key_matches(k: &str, original_digest: &str, block_size: u32) -> bool {
    let base = key(original_digest, block_size);
    k.strip_prefix(&base)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with("@start-profile="))
}

/// The default cache directory.
pub fn default_dir() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("XDG_CACHE_HOME").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d).join("faasnet"));
    }
    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/faasnet"))
}

impl LayerCache {
    /// Loads the cache in `dir` (an unreadable or corrupt file starts an empty cache).
    pub fn load(dir: Option<&Path>) -> LayerCache {
        let path = dir.map(|d| d.join(FILE_NAME));
        let entries = path
            .as_deref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        LayerCache {
            path,
            entries: Mutex::new(entries),
            dirty: Mutex::new(false),
        }
    }

    /// A cache that remembers nothing across runs.
    pub fn in_memory() -> LayerCache {
        LayerCache::default()
    }

    /// The converted descriptor recorded for `key`.
    pub fn get(&self, key: &str) -> Option<Descriptor> {
        self.entries.lock().expect("cache").get(key).cloned()
    }

    /// Every conversion of `original_digest` with `block_size`, with or without a start
    /// profile, by key.
    pub fn candidates(&self, original_digest: &str, block_size: u32) -> Vec<(String, Descriptor)> {
        self.entries
            .lock()
            .expect("cache")
            .iter()
            .filter(|(k, _)| key_matches(k, original_digest, block_size))
            .map(|(k, d)| (k.clone(), d.clone()))
            .collect()
    }

    /// Records a conversion.
    pub fn insert(&self, key: String, desc: Descriptor) {
        self.entries.lock().expect("cache").insert(key, desc);
        *self.dirty.lock().expect("cache") = true;
    }

    /// Writes the cache back (merged with what other runs wrote meanwhile), atomically.
    pub fn save(&self) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if !*self.dirty.lock().expect("cache") {
            return Ok(());
        }
        let mut merged: BTreeMap<String, Descriptor> = std::fs::read(path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        merged.extend(self.entries.lock().expect("cache").clone());
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, serde_json::to_vec_pretty(&merged)?)?;
        std::fs::rename(&tmp, path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn desc(d: &str) -> Descriptor {
        serde_json::from_value(serde_json::json!({"mediaType": "x", "digest": d, "size": 1}))
            .unwrap()
    }

    #[test]
    fn profiled_and_plain_keys_never_collide() {
        let plain = key("sha256:aa", 65536);
        let prof = profiled_key("sha256:aa", 65536, Some("sha256:pp"));
        assert_eq!(profiled_key("sha256:aa", 65536, None), plain);
        assert_ne!(prof, plain);
        assert!(key_matches(&plain, "sha256:aa", 65536));
        assert!(key_matches(&prof, "sha256:aa", 65536));
        // Another block size whose digits start the same, another layer.
        assert!(!key_matches(&key("sha256:aa", 655360), "sha256:aa", 65536));
        assert!(!key_matches(&key("sha256:aab", 65536), "sha256:aa", 65536));
        let c = LayerCache::in_memory();
        c.insert(plain.clone(), desc("sha256:1"));
        c.insert(prof.clone(), desc("sha256:2"));
        c.insert(key("sha256:aa", 655360), desc("sha256:3"));
        let found: Vec<String> = c
            .candidates("sha256:aa", 65536)
            .into_iter()
            .map(|(_, d)| d.digest)
            .collect();
        assert_eq!(found, ["sha256:1", "sha256:2"]);
        assert_eq!(c.get(&plain).unwrap().digest, "sha256:1");
    }
}
