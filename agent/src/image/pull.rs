//! Talking to the registry: manifests and blobs, every byte checked against its digest here
//! rather than trusting the registry or the client library.

use std::io;
use std::path::Path;

use futures::{Stream, StreamExt};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use serde::Deserialize;
use sha2::{Digest as _, Sha256};
use tokio::io::AsyncWriteExt;

use super::cache::Digest;
use super::PullError;

/// Manifest media types we ask for; Docker schema 1 is deliberately absent.
const ACCEPTED_MANIFESTS: &[&str] = &[
    OCI_MANIFEST,
    OCI_INDEX,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
];
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// Config blobs are small JSON documents; anything bigger is refused before downloading.
pub(crate) const MAX_CONFIG_SIZE: u64 = 16 * 1024 * 1024;

/// A content descriptor, as found in manifests.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Descriptor {
    #[serde(default)]
    pub(crate) media_type: String,
    pub(crate) digest: String,
    pub(crate) size: i64,
    #[serde(default)]
    pub(crate) platform: Option<Platform>,
}

#[derive(Debug, Clone, Deserialize)]
pub(crate) struct Platform {
    pub(crate) architecture: String,
    pub(crate) os: String,
}

/// An image manifest or an index, told apart by media type or, when absent, by shape.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct RawManifest {
    schema_version: u32,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
}

/// A platform-specific image manifest.
#[derive(Debug, Clone)]
pub(crate) struct ImageManifest {
    pub(crate) config: Descriptor,
    pub(crate) layers: Vec<Descriptor>,
}

#[derive(Debug)]
enum Parsed {
    Image(ImageManifest),
    Index(Vec<Descriptor>),
}

/// The registry side of the store.
#[derive(Clone)]
pub(crate) struct Registry {
    client: Client,
}

impl Registry {
    /// `insecure`: `HOST:PORT` registries spoken over plain HTTP.
    pub(crate) fn new(insecure: Vec<String>) -> Self {
        let config = ClientConfig {
            protocol: ClientProtocol::HttpsExcept(insecure),
            // Indexes are resolved here, not by the client.
            platform_resolver: None,
            connect_timeout: Some(std::time::Duration::from_secs(5)),
            read_timeout: Some(std::time::Duration::from_secs(60)),
            ..ClientConfig::default()
        };
        Self {
            client: Client::new(config),
        }
    }

    /// Resolves `reference` to a platform-specific image manifest for linux on this machine's
    /// architecture. Returns the manifest, its digest (the pin) and the raw manifest bytes.
    pub(crate) async fn resolve(
        &self,
        reference: &Reference,
    ) -> Result<(ImageManifest, Digest, Vec<u8>), PullError> {
        let whole = reference.whole();
        let (bytes, digest) = self.fetch_manifest(reference, reference.digest()).await?;
        match parse_manifest(&whole, &bytes)? {
            Parsed::Image(manifest) => Ok((manifest, digest, bytes)),
            Parsed::Index(entries) => {
                let arch = host_arch();
                let entry = entries
                    .iter()
                    .find(|e| {
                        e.platform
                            .as_ref()
                            .is_some_and(|p| p.os == "linux" && p.architecture == arch)
                    })
                    .ok_or_else(|| PullError::NoPlatform {
                        reference: whole.clone(),
                        platform: format!("linux/{arch}"),
                    })?;
                tracing::debug!(reference = %whole, index = %digest, manifest = %entry.digest, "picked platform manifest");
                let by_digest = reference.clone_with_digest(entry.digest.clone());
                let (bytes, digest) = self.fetch_manifest(&by_digest, Some(&entry.digest)).await?;
                match parse_manifest(&whole, &bytes)? {
                    Parsed::Image(manifest) => Ok((manifest, digest, bytes)),
                    Parsed::Index(_) => Err(PullError::UnsupportedManifest {
                        reference: whole,
                        reason: "an index entry points at another index".to_owned(),
                    }),
                }
            }
        }
    }

    /// Fetches a manifest and checks it against `expected` when the caller knows its digest.
    async fn fetch_manifest(
        &self,
        reference: &Reference,
        expected: Option<&str>,
    ) -> Result<(Vec<u8>, Digest), PullError> {
        let whole = reference.whole();
        let (body, _) = self
            .client
            .pull_manifest_raw(reference, &RegistryAuth::Anonymous, ACCEPTED_MANIFESTS)
            .await
            .map_err(|source| PullError::Registry {
                reference: whole.clone(),
                source: Box::new(source),
            })?;
        let digest = Digest::of(&body);
        if let Some(expected) = expected {
            if expected != digest.to_string() {
                return Err(PullError::DigestMismatch {
                    digest: expected.to_owned(),
                    actual: digest.to_string(),
                });
            }
        }
        Ok((body.to_vec(), digest))
    }

    /// Streams blob `digest` of `reference`'s repository into `dest` via a temp file in `tmp`,
    /// verifying size and sha256 on the way.
    pub(crate) async fn download(
        &self,
        reference: &Reference,
        digest: &Digest,
        size: u64,
        tmp: &Path,
        dest: &Path,
    ) -> Result<(), PullError> {
        let digest_str = digest.to_string();
        let stream = self
            .client
            .pull_blob_stream(reference, digest_str.as_str())
            .await
            .map_err(|source| PullError::Registry {
                reference: reference.whole(),
                source: Box::new(source),
            })?;
        if let Some(len) = stream.content_length {
            if len != size {
                return Err(PullError::BlobSize {
                    digest: digest_str,
                    expected: size,
                    actual: len,
                });
            }
        }
        write_verified(stream.stream, digest, size, tmp, dest).await
    }
}

/// Writes `stream` to `tmp`, checks it is exactly `size` bytes hashing to `digest`, then renames
/// it to `dest`. On any failure the partial file is deleted and `dest` is untouched.
pub(crate) async fn write_verified<S, B>(
    stream: S,
    digest: &Digest,
    size: u64,
    tmp: &Path,
    dest: &Path,
) -> Result<(), PullError>
where
    S: Stream<Item = Result<B, io::Error>> + Unpin,
    B: AsRef<[u8]>,
{
    // Removes the partial file on error and also when this future is dropped mid-download
    // (a sibling layer failed, or the caller gave up).
    let mut partial = RemoveOnDrop(Some(tmp.to_owned()));
    write_checked(stream, digest, size, tmp).await?;
    tokio::fs::rename(tmp, dest)
        .await
        .map_err(|source| PullError::Io {
            op: "rename blob to",
            path: dest.to_owned(),
            source,
        })?;
    partial.0 = None;
    Ok(())
}

/// Deletes a staging file when dropped, unless disarmed by taking the path out.
struct RemoveOnDrop(Option<std::path::PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            if let Err(e) = std::fs::remove_file(&path) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %path.display(), error = %e, "could not remove partial blob");
                }
            }
        }
    }
}

async fn write_checked<S, B>(
    mut stream: S,
    digest: &Digest,
    size: u64,
    tmp: &Path,
) -> Result<(), PullError>
where
    S: Stream<Item = Result<B, io::Error>> + Unpin,
    B: AsRef<[u8]>,
{
    let io_err = |op: &'static str| {
        move |source| PullError::Io {
            op,
            path: tmp.to_owned(),
            source,
        }
    };
    let mut file = tokio::fs::File::create(tmp)
        .await
        .map_err(io_err("create"))?;
    let mut hasher = Sha256::new();
    let mut written: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| PullError::Download {
            digest: digest.to_string(),
            source,
        })?;
        let chunk = chunk.as_ref();
        written += chunk.len() as u64;
        // A registry that sends more than the manifest promised is cut off, not trusted with disk.
        if written > size {
            return Err(PullError::BlobSize {
                digest: digest.to_string(),
                expected: size,
                actual: written,
            });
        }
        hasher.update(chunk);
        file.write_all(chunk).await.map_err(io_err("write"))?;
    }
    if written != size {
        return Err(PullError::BlobSize {
            digest: digest.to_string(),
            expected: size,
            actual: written,
        });
    }
    let actual = Digest::from_hasher(hasher);
    if &actual != digest {
        return Err(PullError::DigestMismatch {
            digest: digest.to_string(),
            actual: actual.to_string(),
        });
    }
    file.sync_all().await.map_err(io_err("sync"))?;
    Ok(())
}

fn parse_manifest(reference: &str, bytes: &[u8]) -> Result<Parsed, PullError> {
    let unsupported = |reason: String| PullError::UnsupportedManifest {
        reference: reference.to_owned(),
        reason,
    };
    let raw: RawManifest =
        serde_json::from_slice(bytes).map_err(|e| unsupported(format!("unreadable: {e}")))?;
    if raw.schema_version != 2 {
        return Err(unsupported(format!(
            "schema version {}",
            raw.schema_version
        )));
    }
    let is_index = match raw.media_type.as_deref() {
        Some(OCI_MANIFEST | DOCKER_MANIFEST) => false,
        Some(OCI_INDEX | DOCKER_MANIFEST_LIST) => true,
        Some(other) => return Err(unsupported(format!("media type {other}"))),
        None => raw.manifests.is_some(),
    };
    if is_index {
        let entries = raw
            .manifests
            .ok_or_else(|| unsupported("index without manifests".to_owned()))?;
        return Ok(Parsed::Index(entries));
    }
    let config = raw
        .config
        .ok_or_else(|| unsupported("manifest without config".to_owned()))?;
    Ok(Parsed::Image(ImageManifest {
        config,
        layers: raw.layers.unwrap_or_default(),
    }))
}

/// The OCI name of this machine's architecture.
fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        "powerpc64" => "ppc64le",
        other => other,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn chunks(
        parts: &[&'static [u8]],
    ) -> impl Stream<Item = Result<&'static [u8], io::Error>> + Unpin {
        futures::stream::iter(parts.iter().map(|p| Ok(*p)).collect::<Vec<_>>())
    }

    #[tokio::test]
    async fn verified_write_lands_only_when_the_digest_matches() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("blob.partial");
        let dest = dir.path().join("blob");
        let content: &[u8] = b"hello layer";
        let digest = Digest::of(content);

        write_verified(chunks(&[b"hello ", b"layer"]), &digest, 11, &tmp, &dest)
            .await
            .unwrap();
        assert_eq!(std::fs::read(&dest).unwrap(), content);
        assert!(!tmp.exists());
    }

    #[tokio::test]
    async fn digest_mismatch_deletes_the_partial_file_and_names_the_digest() {
        let dir = tempfile::tempdir().unwrap();
        let tmp = dir.path().join("blob.partial");
        let dest = dir.path().join("blob");
        let digest = Digest::of(b"what the manifest promised");

        let err = write_verified(
            chunks(&[b"something else entirely!!"]),
            &digest,
            25,
            &tmp,
            &dest,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, PullError::DigestMismatch { .. }), "{err}");
        assert!(err.to_string().contains(&digest.to_string()), "{err}");
        assert!(!tmp.exists() && !dest.exists());

        // Too long: cut off before the end, nothing left behind.
        let err = write_verified(chunks(&[b"0123456789", b"abc"]), &digest, 10, &tmp, &dest)
            .await
            .unwrap_err();
        assert!(matches!(err, PullError::BlobSize { .. }), "{err}");
        assert!(!tmp.exists() && !dest.exists());

        // A broken stream is an error too.
        let broken =
            futures::stream::iter(vec![Ok::<&[u8], _>(b"abc"), Err(io::Error::other("reset"))]);
        let err = write_verified(broken, &digest, 25, &tmp, &dest)
            .await
            .unwrap_err();
        assert!(matches!(err, PullError::Download { .. }), "{err}");
        assert!(!tmp.exists() && !dest.exists());
    }

    #[test]
    fn manifests_and_indexes_are_told_apart() {
        let d = format!("sha256:{}", "a".repeat(64));
        let oci = format!(
            r#"{{"schemaVersion":2,"mediaType":"{OCI_MANIFEST}","config":{{"mediaType":"x","digest":"{d}","size":1}},"layers":[{{"mediaType":"y","digest":"{d}","size":2}}]}}"#
        );
        assert!(
            matches!(parse_manifest("r", oci.as_bytes()).unwrap(), Parsed::Image(m) if m.layers.len() == 1)
        );
        let no_type =
            format!(r#"{{"schemaVersion":2,"config":{{"digest":"{d}","size":1}},"layers":[]}}"#);
        assert!(matches!(
            parse_manifest("r", no_type.as_bytes()).unwrap(),
            Parsed::Image(_)
        ));
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST_LIST}","manifests":[{{"mediaType":"{DOCKER_MANIFEST}","digest":"{d}","size":3,"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#
        );
        assert!(
            matches!(parse_manifest("r", index.as_bytes()).unwrap(), Parsed::Index(e) if e.len() == 1)
        );
        let v1 = br#"{"schemaVersion":1,"name":"x"}"#;
        assert!(parse_manifest("r", v1).is_err());
        let weird = br#"{"schemaVersion":2,"mediaType":"text/plain"}"#;
        assert!(parse_manifest("r", weird)
            .unwrap_err()
            .to_string()
            .contains("text/plain"));
    }
}
