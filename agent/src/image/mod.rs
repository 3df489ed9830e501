//! Images: pull by reference, verify, cache content-addressed, unpack safely, mount per instance.
//!
//! [`ImageStore::pull`] resolves a reference to a platform manifest (the pinned digest), then
//! makes sure every layer is downloaded (streamed to disk, size and sha256 checked here) and
//! unpacked once into its own directory. [`ImageStore::mount_rootfs`] stacks those directories
//! under a private overlayfs upper for one instance. The on-disk layout is described in
//! the `cache` submodule.
//!
//! Architecture invariant: an entry under `blobs/`, `layers/` or `images/` is complete and
//! verified; anything in flight lives in `tmp/`.
//!
//! # Resolution policy
//! - A digest reference (`repo@sha256:…`) already in the store never touches the registry.
//! - A tag is resolved with the registry once per agent process; later pulls of that tag in the
//!   same process reuse the pinned digest without any network round trip (the cached path is a
//!   map lookup plus a `stat` per layer). A restarted agent resolves each tag again on first use
//!   and, if the registry is unreachable, falls back to the digest recorded in `refs.json`.
//!   A `pull_policy: Always` would bypass the in-memory map; it is not wired up yet.
//!
//! # Single flight
//! Concurrent pulls of one reference wait for the first one; concurrent needs for one layer
//! (from different references) download and unpack it once. Both use per-key async locks.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use oci_client::Reference;

mod cache;
pub mod config;
mod overlay;
mod pull;
pub mod reference;
pub mod unpack;

use cache::{Digest, ImageRecord, KeyedLocks, LayerRecord, Layout, RefIndex};
pub use config::ImageConfig;
use pull::Registry;
pub use reference::ReferenceError;
pub use unpack::UnpackError;

/// Errors of the store itself: opening it, mounting and releasing rootfs.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// A filesystem operation failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A path the store cannot use (overlayfs option syntax forbids some characters).
    #[error("unusable path {path}: {reason}")]
    UnusablePath {
        /// The path.
        path: PathBuf,
        /// Why.
        reason: &'static str,
    },
    /// The overlay mount failed.
    #[error("mount overlay rootfs at {path}: {source}")]
    Mount {
        /// The rootfs mount point.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The overlay could not be unmounted.
    #[error("unmount rootfs at {path}: {source}")]
    Unmount {
        /// The rootfs mount point.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The lowerdir list does not fit in one page of mount data.
    #[error("image has too many layers for one overlay mount ({layers} layers, {bytes} bytes of options)")]
    TooManyLayers {
        /// Number of layers.
        layers: usize,
        /// Length of the mount options.
        bytes: usize,
    },
}

/// Errors of [`ImageStore::pull`].
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The reference does not parse.
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    /// The registry refused or could not be reached.
    #[error("registry request for {reference} failed: {source}")]
    Registry {
        /// The reference being pulled.
        reference: String,
        /// The client error.
        #[source]
        source: Box<oci_client::errors::OciDistributionError>,
    },
    /// Content does not hash to the digest that names it.
    #[error("digest mismatch for {digest}: content hashes to {actual}")]
    DigestMismatch {
        /// The expected digest.
        digest: String,
        /// What the content hashed to.
        actual: String,
    },
    /// A blob is not the size its descriptor declares.
    #[error("size mismatch for blob {digest}: expected {expected} bytes, got {actual}")]
    BlobSize {
        /// The blob digest.
        digest: String,
        /// Size from the descriptor.
        expected: u64,
        /// Bytes received (so far).
        actual: u64,
    },
    /// The stream broke while downloading a blob.
    #[error("downloading blob {digest}: {source}")]
    Download {
        /// The blob digest.
        digest: String,
        /// The transport error.
        #[source]
        source: std::io::Error,
    },
    /// A digest in a manifest is not `sha256:<64 hex>`.
    #[error("invalid digest {digest:?} in manifest of {reference}")]
    InvalidDigest {
        /// The reference being pulled.
        reference: String,
        /// The digest as written.
        digest: String,
    },
    /// The manifest is of a kind we do not run.
    #[error("unsupported manifest for {reference}: {reason}")]
    UnsupportedManifest {
        /// The reference being pulled.
        reference: String,
        /// Why.
        reason: String,
    },
    /// The index has no entry for this platform.
    #[error("no {platform} image in the index of {reference}")]
    NoPlatform {
        /// The reference being pulled.
        reference: String,
        /// `os/arch` looked for.
        platform: String,
    },
    /// A layer is compressed in a way we do not unpack (zstd, …).
    #[error("unsupported layer media type {media_type:?} for layer {digest}")]
    UnsupportedLayerMediaType {
        /// The layer digest.
        digest: String,
        /// Its media type.
        media_type: String,
    },
    /// The image config blob is unreadable or too large.
    #[error("image config {digest}: {reason}")]
    Config {
        /// The config digest.
        digest: String,
        /// Why.
        reason: String,
    },
    /// A layer failed to unpack.
    #[error("unpacking layer {digest}: {source}")]
    Unpack {
        /// The layer digest.
        digest: String,
        /// Why.
        #[source]
        source: UnpackError,
    },
    /// A filesystem operation on the store failed.
    #[error("{op} {path}: {source}")]
    Io {
        /// What was attempted.
        op: &'static str,
        /// On what.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A blocking task (unpack) panicked or was cancelled.
    #[error("unpack task for layer {digest} failed: {reason}")]
    Task {
        /// The layer digest.
        digest: String,
        /// The join error.
        reason: String,
    },
}

/// An image ready to mount.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// The reference as asked for.
    pub reference: String,
    /// `sha256:…` of the platform-specific image manifest: the pin.
    pub digest: String,
    /// Unpacked layer directories, bottom first.
    pub layers: Vec<PathBuf>,
    /// Process defaults from the image config.
    pub config: ImageConfig,
    /// Where the time of this pull went (for the deploy breakdown).
    pub timing: PullTiming,
}

/// Time spent by one [`ImageStore::pull`] call.
#[derive(Debug, Clone, Copy, Default)]
pub struct PullTiming {
    /// True when served from memory without registry or disk work.
    pub cached: bool,
    /// Whole call, wall clock.
    pub total: Duration,
    /// Manifest and config resolution (registry round trips or reading the record).
    pub resolve: Duration,
    /// Blob downloads, summed over layers (they run concurrently).
    pub download: Duration,
    /// Layer unpacks, summed over layers.
    pub unpack: Duration,
}

/// Counters over the store's lifetime, for tests and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoreCounters {
    /// Manifests fetched from a registry (an index and its platform manifest count as two).
    pub manifest_fetches: u64,
    /// Blobs (configs and layers) downloaded.
    pub blob_downloads: u64,
    /// Layers unpacked.
    pub layer_unpacks: u64,
}

/// The agent's image store. Cheap to clone; all clones share caches and locks.
///
/// Open one store per root per process: opening empties the root's `tmp/`.
#[derive(Clone)]
pub struct ImageStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for ImageStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ImageStore")
            .field("root", &self.inner.layout.root())
            .finish_non_exhaustive()
    }
}

struct Inner {
    layout: Layout,
    registry: Registry,
    /// Normalised reference → image, for references resolved by this process.
    resolved: RwLock<HashMap<String, PulledImage>>,
    /// What `refs.json` says, loaded at startup and kept in step with it.
    refs: Mutex<RefIndex>,
    locks: KeyedLocks,
    manifest_fetches: AtomicU64,
    blob_downloads: AtomicU64,
    layer_unpacks: AtomicU64,
}

impl ImageStore {
    /// Opens (creating if needed) the store at `root` (`<agent data dir>/images`).
    /// `insecure` lists `HOST:PORT` registries spoken over plain HTTP.
    pub fn new(root: &Path, insecure: Vec<String>) -> Result<Self, ImageError> {
        let root = std::path::absolute(root).map_err(|source| ImageError::Io {
            op: "resolve",
            path: root.to_owned(),
            source,
        })?;
        overlay::check_path(&root)?;
        let layout = Layout::new(&root);
        layout.prepare().map_err(|source| ImageError::Io {
            op: "prepare image store at",
            path: root.clone(),
            source,
        })?;
        let refs = RefIndex::load(&layout);
        tracing::info!(root = %root.display(), known_refs = refs.refs.len(), "image store opened");
        Ok(Self {
            inner: Arc::new(Inner {
                layout,
                registry: Registry::new(insecure),
                resolved: RwLock::new(HashMap::new()),
                refs: Mutex::new(refs),
                locks: KeyedLocks::default(),
                manifest_fetches: AtomicU64::new(0),
                blob_downloads: AtomicU64::new(0),
                layer_unpacks: AtomicU64::new(0),
            }),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        self.inner.layout.root()
    }

    /// Counters since this store was opened.
    pub fn counters(&self) -> StoreCounters {
        StoreCounters {
            manifest_fetches: self.inner.manifest_fetches.load(Ordering::Relaxed),
            blob_downloads: self.inner.blob_downloads.load(Ordering::Relaxed),
            layer_unpacks: self.inner.layer_unpacks.load(Ordering::Relaxed),
        }
    }

    /// Pulls `reference` (tag or digest): pins the manifest digest, downloads and verifies
    /// missing blobs, unpacks missing layers. See the module docs for the resolution policy.
    #[tracing::instrument(skip(self), fields(digest))]
    pub async fn pull(&self, reference: &str) -> Result<PulledImage, PullError> {
        let start = Instant::now();
        let parsed = reference::parse(reference)?;
        let key = parsed.whole();
        if let Some(image) = self.cached(&key, reference, start) {
            return Ok(image);
        }
        let _flight = self.inner.locks.lock(&format!("ref:{key}")).await;
        if let Some(image) = self.cached(&key, reference, start) {
            return Ok(image);
        }

        let resolve_start = Instant::now();
        let record = self.resolve(&parsed, &key).await?;
        let mut timing = PullTiming {
            resolve: resolve_start.elapsed(),
            ..PullTiming::default()
        };
        tracing::Span::current().record("digest", record.digest.as_str());

        let results = futures::future::try_join_all(
            record
                .layers
                .iter()
                .map(|layer| self.ensure_layer(&parsed, layer)),
        )
        .await?;
        let mut layers = Vec::with_capacity(results.len());
        for (path, download, unpack) in results {
            layers.push(path);
            timing.download += download;
            timing.unpack += unpack;
        }
        timing.total = start.elapsed();
        let image = PulledImage {
            reference: reference.to_owned(),
            digest: record.digest.clone(),
            layers,
            config: record.config,
            timing,
        };
        self.remember(&key, &image);
        tracing::info!(
            digest = %image.digest,
            layers = image.layers.len(),
            total_ms = timing.total.as_millis() as u64,
            download_ms = timing.download.as_millis() as u64,
            unpack_ms = timing.unpack.as_millis() as u64,
            "image pulled"
        );
        Ok(image)
    }

    /// Mounts an overlayfs rootfs for one instance at `<instance_dir>/rootfs`, with `upper/`
    /// and `work/` beside it. If that rootfs is already mounted (agent restart), it is reused.
    pub fn mount_rootfs(
        &self,
        image: &PulledImage,
        instance_dir: &Path,
    ) -> Result<PathBuf, ImageError> {
        let instance_dir = std::path::absolute(instance_dir).map_err(|source| ImageError::Io {
            op: "resolve",
            path: instance_dir.to_owned(),
            source,
        })?;
        let dirs = overlay::InstanceDirs::new(&instance_dir);
        let lowers = if image.layers.is_empty() {
            let empty = self.inner.layout.empty_layer();
            std::fs::create_dir_all(&empty).map_err(|source| ImageError::Io {
                op: "create",
                path: empty.clone(),
                source,
            })?;
            vec![empty]
        } else {
            image.layers.clone()
        };
        overlay::mount_overlay(&lowers, &dirs)?;
        tracing::debug!(rootfs = %dirs.rootfs.display(), digest = %image.digest, "rootfs mounted");
        Ok(dirs.rootfs)
    }

    /// The writable layer [`Self::mount_rootfs`] stacks for an instance: `<instance_dir>/upper`.
    /// A live migration carries it over; a directory already there when the rootfs is mounted
    /// becomes the upper as it is (the target puts the received one there first).
    pub fn upper_dir(instance_dir: &Path) -> PathBuf {
        overlay::InstanceDirs::new(instance_dir).upper
    }

    /// Unmounts and removes the instance's rootfs, upper and work directories. Idempotent.
    pub fn release_rootfs(&self, instance_dir: &Path) -> Result<(), ImageError> {
        let instance_dir = std::path::absolute(instance_dir).map_err(|source| ImageError::Io {
            op: "resolve",
            path: instance_dir.to_owned(),
            source,
        })?;
        overlay::release(&overlay::InstanceDirs::new(&instance_dir))
    }

    /// The in-memory fast path: a reference this process resolved whose layers are still there.
    fn cached(&self, key: &str, reference: &str, start: Instant) -> Option<PulledImage> {
        let resolved = self
            .inner
            .resolved
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let image = resolved.get(key)?;
        if !image.layers.iter().all(|l| l.is_dir()) {
            return None;
        }
        let mut image = image.clone();
        image.reference = reference.to_owned();
        image.timing = PullTiming {
            cached: true,
            total: start.elapsed(),
            ..PullTiming::default()
        };
        Some(image)
    }

    fn remember(&self, key: &str, image: &PulledImage) {
        self.inner
            .resolved
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.to_owned(), image.clone());
        let mut refs = self.inner.refs.lock().unwrap_or_else(|p| p.into_inner());
        if refs.refs.get(key) != Some(&image.digest) {
            refs.refs.insert(key.to_owned(), image.digest.clone());
            if let Err(e) = refs.save(&self.inner.layout) {
                tracing::warn!(error = %e, "could not persist the reference index");
            }
        }
    }

    /// Finds the image record for a reference: from disk for known digests, else from the
    /// registry (falling back to `refs.json` when the registry is unreachable).
    async fn resolve(&self, parsed: &Reference, key: &str) -> Result<ImageRecord, PullError> {
        let layout = &self.inner.layout;
        if let Some(digest) = parsed.digest().and_then(Digest::parse) {
            // Content-addressed, so immutable: the digest itself or the platform manifest it
            // was resolved to earlier (when it names an index) can be served from disk.
            let earlier = self.known_digest(key);
            for candidate in [Some(digest), earlier].into_iter().flatten() {
                if let Some(record) = cache::read_record(layout, &candidate) {
                    return Ok(record);
                }
            }
        }
        match self.resolve_remote(parsed).await {
            Ok(record) => Ok(record),
            Err(err @ PullError::Registry { .. }) => {
                match self
                    .known_digest(key)
                    .and_then(|d| cache::read_record(layout, &d))
                {
                    Some(record) => {
                        tracing::warn!(reference = key, digest = %record.digest, error = %err,
                            "registry unavailable, using the digest this tag had before");
                        Ok(record)
                    }
                    None => Err(err),
                }
            }
            Err(err) => Err(err),
        }
    }

    /// The digest `refs.json` recorded for a normalised reference.
    fn known_digest(&self, key: &str) -> Option<Digest> {
        let refs = self.inner.refs.lock().unwrap_or_else(|p| p.into_inner());
        refs.refs.get(key).and_then(|d| Digest::parse(d))
    }

    async fn resolve_remote(&self, parsed: &Reference) -> Result<ImageRecord, PullError> {
        let inner = &self.inner;
        let whole = parsed.whole();
        let (manifest, digest, bytes) = inner.registry.resolve(parsed).await?;
        // The index (if any) plus the image manifest; counted as fetches, for tests.
        inner.manifest_fetches.fetch_add(1, Ordering::Relaxed);
        self.store_blob(&digest, &bytes)?;

        let invalid = |d: &str| PullError::InvalidDigest {
            reference: whole.clone(),
            digest: d.to_owned(),
        };
        let config_digest = Digest::parse(&manifest.config.digest)
            .ok_or_else(|| invalid(&manifest.config.digest))?;
        let config_size = u64::try_from(manifest.config.size).unwrap_or(u64::MAX);
        if config_size > pull::MAX_CONFIG_SIZE {
            return Err(PullError::Config {
                digest: config_digest.to_string(),
                reason: format!("{config_size} bytes is too large"),
            });
        }
        let config_path = self
            .ensure_blob(parsed, &config_digest, config_size)
            .await?
            .0;
        let config_bytes = tokio::fs::read(&config_path)
            .await
            .map_err(|source| PullError::Io {
                op: "read",
                path: config_path.clone(),
                source,
            })?;
        let parsed_config = config::parse(&config_bytes).map_err(|e| PullError::Config {
            digest: config_digest.to_string(),
            reason: e.to_string(),
        })?;
        // diff_ids line up with layers; if the counts disagree they cannot be trusted to.
        let diff_ids = (parsed_config.diff_ids.len() == manifest.layers.len())
            .then_some(parsed_config.diff_ids);
        let mut layers = Vec::with_capacity(manifest.layers.len());
        for (i, layer) in manifest.layers.iter().enumerate() {
            let layer_digest =
                Digest::parse(&layer.digest).ok_or_else(|| invalid(&layer.digest))?;
            if unpack::Compression::for_media_type(&layer.media_type).is_none() {
                return Err(PullError::UnsupportedLayerMediaType {
                    digest: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                });
            }
            layers.push(LayerRecord {
                digest: layer_digest.to_string(),
                media_type: layer.media_type.clone(),
                size: u64::try_from(layer.size).unwrap_or(u64::MAX),
                diff_id: diff_ids.as_ref().map(|d| d[i].clone()),
            });
        }
        let record = ImageRecord {
            digest: digest.to_string(),
            layers,
            config: parsed_config.config,
        };
        let json = serde_json::to_vec_pretty(&record).map_err(|e| PullError::Config {
            digest: config_digest.to_string(),
            reason: e.to_string(),
        })?;
        let path = inner.layout.image_record(&digest);
        cache::write_atomic(&inner.layout, &path, &json).map_err(|source| PullError::Io {
            op: "write",
            path,
            source,
        })?;
        Ok(record)
    }

    /// Keeps an already-verified small blob (a manifest) under its digest.
    fn store_blob(&self, digest: &Digest, bytes: &[u8]) -> Result<(), PullError> {
        let layout = &self.inner.layout;
        let path = layout.blob(digest);
        if path.exists() {
            return Ok(());
        }
        cache::write_atomic(layout, &path, bytes).map_err(|source| PullError::Io {
            op: "write",
            path,
            source,
        })
    }

    /// Makes sure blob `digest` is on disk; returns its path and the download time.
    async fn ensure_blob(
        &self,
        parsed: &Reference,
        digest: &Digest,
        size: u64,
    ) -> Result<(PathBuf, Duration), PullError> {
        let inner = &self.inner;
        let path = inner.layout.blob(digest);
        if path.exists() {
            return Ok((path, Duration::ZERO));
        }
        let _flight = inner.locks.lock(&format!("blob:{digest}")).await;
        if path.exists() {
            return Ok((path, Duration::ZERO));
        }
        let start = Instant::now();
        let tmp = inner.layout.tmp_path(digest.hex());
        inner
            .registry
            .download(parsed, digest, size, &tmp, &path)
            .await?;
        inner.blob_downloads.fetch_add(1, Ordering::Relaxed);
        tracing::debug!(%digest, size, ms = start.elapsed().as_millis() as u64, "blob downloaded");
        Ok((path, start.elapsed()))
    }

    /// Makes sure a layer is unpacked; returns its directory, download and unpack times.
    async fn ensure_layer(
        &self,
        parsed: &Reference,
        layer: &LayerRecord,
    ) -> Result<(PathBuf, Duration, Duration), PullError> {
        let inner = &self.inner;
        let digest = Digest::parse(&layer.digest).ok_or_else(|| PullError::InvalidDigest {
            reference: parsed.whole(),
            digest: layer.digest.clone(),
        })?;
        let dir = inner.layout.layer(&digest);
        if dir.is_dir() {
            return Ok((dir, Duration::ZERO, Duration::ZERO));
        }
        let flight = inner.locks.lock(&format!("layer:{digest}")).await;
        if dir.is_dir() {
            return Ok((dir, Duration::ZERO, Duration::ZERO));
        }
        let compression =
            unpack::Compression::for_media_type(&layer.media_type).ok_or_else(|| {
                PullError::UnsupportedLayerMediaType {
                    digest: layer.digest.clone(),
                    media_type: layer.media_type.clone(),
                }
            })?;
        let (blob, download) = self.ensure_blob(parsed, &digest, layer.size).await?;

        let start = Instant::now();
        let staging = inner.layout.tmp_path(&format!("layer-{}", digest.hex()));
        let diff_id = layer.diff_id.clone();
        let dest = dir.clone();
        // The blocking task owns the lock and its cleanup: if this future is dropped, the unpack
        // still finishes (or cleans up) before anyone else may start on the same layer.
        let joined = tokio::task::spawn_blocking(move || {
            let result = unpack_staged(&blob, compression, diff_id.as_deref(), &staging, &dest);
            if result.is_err() {
                if let Err(e) = std::fs::remove_dir_all(&staging) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %staging.display(), error = %e, "could not clean failed unpack");
                    }
                }
            }
            drop(flight);
            result
        })
        .await;
        let result = match joined {
            Ok(result) => result,
            Err(e) => Err(PullError::Task {
                digest: layer.digest.clone(),
                reason: e.to_string(),
            }),
        };
        if let Err(err) = result {
            return Err(match err {
                PullError::Unpack { source, .. } => PullError::Unpack {
                    digest: layer.digest.clone(),
                    source,
                },
                other => other,
            });
        }
        inner.layer_unpacks.fetch_add(1, Ordering::Relaxed);
        let unpack = start.elapsed();
        tracing::debug!(%digest, ms = unpack.as_millis() as u64, "layer unpacked");
        Ok((dir, download, unpack))
    }
}

/// Unpacks into `staging`, then renames it to `dest`: a layer directory is whole or absent.
fn unpack_staged(
    blob: &Path,
    compression: unpack::Compression,
    diff_id: Option<&str>,
    staging: &Path,
    dest: &Path,
) -> Result<(), PullError> {
    std::fs::create_dir(staging).map_err(|source| PullError::Io {
        op: "create",
        path: staging.to_owned(),
        source,
    })?;
    let stats = unpack::unpack_blob(blob, compression, diff_id, staging).map_err(|source| {
        PullError::Unpack {
            digest: String::new(),
            source,
        }
    })?;
    tracing::debug!(
        entries = stats.entries,
        bytes = stats.bytes,
        whiteouts = stats.whiteouts,
        skipped = stats.skipped,
        "layer contents written"
    );
    std::fs::rename(staging, dest).map_err(|source| PullError::Io {
        op: "rename layer to",
        path: dest.to_owned(),
        source,
    })
}
