//! On-disk layout of the image store and the single-flight locks that guard it.
//!
//! ```text
//! <root>/blobs/sha256/<hex>   verified blobs: manifests, configs, compressed layers
//! <root>/layers/<hex>/        one unpacked layer, named by its blob digest
//! <root>/images/<hex>.json    resolved image (layers + config), named by its manifest digest
//! <root>/refs.json            reference → manifest digest
//! <root>/tmp/                 staging for downloads and unpacks; emptied at startup
//! ```
//!
//! Everything under `blobs/`, `layers/` and `images/` appears by `rename` from `tmp/` once it is
//! complete and verified, so a crash never leaves a bad entry under a digest name.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use super::config::ImageConfig;

/// A validated `sha256:<64 lower-case hex>` digest. Validation matters: the hex part names files.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct Digest {
    hex: String,
}

impl Digest {
    /// Parses `sha256:<hex>`; `None` for any other algorithm or malformed hex.
    pub(crate) fn parse(s: &str) -> Option<Self> {
        let hex = s.strip_prefix("sha256:")?;
        let valid = hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        valid.then(|| Self {
            hex: hex.to_owned(),
        })
    }

    /// The digest of `bytes`.
    pub(crate) fn of(bytes: &[u8]) -> Self {
        Self::from_hasher(Sha256::new_with_prefix(bytes))
    }

    /// The digest a hasher has accumulated.
    pub(crate) fn from_hasher(hasher: Sha256) -> Self {
        Self {
            hex: hex::encode(hasher.finalize()),
        }
    }

    /// The 64 hex digits alone.
    pub(crate) fn hex(&self) -> &str {
        &self.hex
    }
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "sha256:{}", self.hex)
    }
}

/// Paths of everything the store keeps.
#[derive(Debug, Clone)]
pub(crate) struct Layout {
    root: PathBuf,
}

impl Layout {
    pub(crate) fn new(root: &Path) -> Self {
        Self {
            root: root.to_owned(),
        }
    }

    /// Creates the directories and empties `tmp/` (leftovers of a crash are never trusted).
    pub(crate) fn prepare(&self) -> std::io::Result<()> {
        let tmp = self.tmp();
        match std::fs::remove_dir_all(&tmp) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
        for dir in [
            self.root.join("blobs/sha256"),
            self.root.join("layers"),
            self.root.join("images"),
            tmp,
        ] {
            std::fs::create_dir_all(dir)?;
        }
        Ok(())
    }

    pub(crate) fn root(&self) -> &Path {
        &self.root
    }

    pub(crate) fn blob(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs/sha256").join(digest.hex())
    }

    pub(crate) fn layer(&self, digest: &Digest) -> PathBuf {
        self.root.join("layers").join(digest.hex())
    }

    /// An empty directory, used as the only lower layer of an image without layers.
    pub(crate) fn empty_layer(&self) -> PathBuf {
        self.root.join("layers/empty")
    }

    pub(crate) fn image_record(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("images")
            .join(format!("{}.json", digest.hex()))
    }

    pub(crate) fn refs(&self) -> PathBuf {
        self.root.join("refs.json")
    }

    pub(crate) fn tmp(&self) -> PathBuf {
        self.root.join("tmp")
    }

    /// A fresh, unique staging path under `tmp/` (not created).
    pub(crate) fn tmp_path(&self, hint: &str) -> PathBuf {
        self.tmp()
            .join(format!("{hint}.{:016x}", rand::random::<u64>()))
    }
}

/// One layer of a resolved image, as recorded on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct LayerRecord {
    /// Digest of the (possibly compressed) layer blob: the cache key.
    pub(crate) digest: String,
    pub(crate) media_type: String,
    pub(crate) size: u64,
    /// Digest of the uncompressed tar, from the image config; checked while unpacking.
    pub(crate) diff_id: Option<String>,
}

/// A resolved image: what a cached pull needs without asking the registry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ImageRecord {
    /// Digest of the platform-specific image manifest (what we pin).
    pub(crate) digest: String,
    pub(crate) layers: Vec<LayerRecord>,
    pub(crate) config: ImageConfig,
}

/// Writes `bytes` to `path` through a temp file and a rename, so readers never see half a file.
pub(crate) fn write_atomic(layout: &Layout, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = layout.tmp_path("write");
    let result = (|| {
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads an image record; `None` when absent or unreadable (it is then rebuilt from the registry).
pub(crate) fn read_record(layout: &Layout, digest: &Digest) -> Option<ImageRecord> {
    let path = layout.image_record(digest);
    let bytes = std::fs::read(&path).ok()?;
    match serde_json::from_slice::<ImageRecord>(&bytes) {
        Ok(record) if record.digest == digest.to_string() => Some(record),
        Ok(_) | Err(_) => {
            tracing::warn!(path = %path.display(), "ignoring unreadable image record");
            None
        }
    }
}

/// Reference → manifest digest, persisted in `refs.json`.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(crate) struct RefIndex {
    pub(crate) refs: BTreeMap<String, String>,
}

impl RefIndex {
    pub(crate) fn load(layout: &Layout) -> Self {
        let path = layout.refs();
        match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable reference index");
                Self::default()
            }),
            Err(_) => Self::default(),
        }
    }

    pub(crate) fn save(&self, layout: &Layout) -> std::io::Result<()> {
        let bytes = serde_json::to_vec_pretty(self).map_err(std::io::Error::other)?;
        write_atomic(layout, &layout.refs(), &bytes)
    }
}

/// Per-key async locks: concurrent pulls of one reference, or downloads/unpacks of one layer,
/// run once while the others wait and then find the result on disk.
#[derive(Debug, Default)]
pub(crate) struct KeyedLocks {
    map: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl KeyedLocks {
    pub(crate) async fn lock(&self, key: &str) -> tokio::sync::OwnedMutexGuard<()> {
        let lock = {
            let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
            // Drop entries nobody holds or waits for, so the map stays as small as the work in flight.
            map.retain(|_, m| Arc::strong_count(m) > 1);
            map.entry(key.to_owned()).or_default().clone()
        };
        lock.lock_owned().await
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn digest_parsing_rejects_path_tricks() {
        let good = format!("sha256:{}", "a".repeat(64));
        assert!(Digest::parse(&good).is_some());
        for bad in [
            "sha256:../../etc/passwd".to_owned(),
            format!("sha256:{}", "A".repeat(64)),
            format!("sha512:{}", "a".repeat(64)),
            format!("sha256:{}", "a".repeat(63)),
            "a".repeat(64),
        ] {
            assert!(Digest::parse(&bad).is_none(), "{bad}");
        }
        assert_eq!(
            Digest::of(b"").to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }

    #[tokio::test]
    async fn keyed_locks_serialise_one_key_only() {
        let locks = Arc::new(KeyedLocks::default());
        let a = locks.lock("a").await;
        // Another key is free while "a" is held.
        let _b = locks.lock("b").await;
        let l2 = locks.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock("a").await;
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!waiter.is_finished());
        drop(a);
        waiter.await.unwrap();
    }
}
