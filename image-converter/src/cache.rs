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

/// Cache key of an original layer converted with `block_size`.
pub fn key(original_digest: &str, block_size: u32) -> String {
    format!("{original_digest}@{block_size}")
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
