//! Pinned image references (`registry/app:tag@sha256:…` and `registry/app@sha256:…`), as the hub
//! sends them for rollbacks and revisions, pulled from a real local registry. Needs root (see
//! `image_support`).

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod image_support;

use berth_agent::image::{ImageStore, PullError};
use image_support::{build_busybox_image, raw_manifest, require_root_and_tools, scratch, Registry};
use sha2::Digest as _;

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

/// The marker file the image fixture puts in its first layer.
fn marker(image: &berth_agent::image::PulledImage) -> String {
    std::fs::read_to_string(image.layers[0].join("www/index.html")).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pinned_references_pull_by_digest_even_after_the_tag_moved() {
    require_root_and_tools();
    let registry = Registry::start();
    let (_scratch, dir) = scratch("berth-pinned-test-");
    let tag = build_busybox_image(&dir.join("build1"), &registry.addr, "app", "v1", "one");
    let first = sha256(&raw_manifest(&tag));
    // The tag moves on to other content; the pin must not follow it.
    build_busybox_image(&dir.join("build2"), &registry.addr, "app", "v1", "two");
    let second = sha256(&raw_manifest(&tag));
    assert_ne!(first, second);

    let insecure = vec![registry.addr.clone()];
    let store = ImageStore::new(&dir.join("images"), insecure.clone()).unwrap();
    let pinned = format!("{tag}@{first}");
    let image = store.pull(&pinned).await.unwrap();
    assert_eq!(image.digest, first);
    assert_eq!(marker(&image), "one", "the pinned content, not the tag's");
    assert_eq!(image.reference, pinned);
    assert_eq!(store.counters().manifest_fetches, 1);

    // The digest-only form of the same pin: from the store, no registry round trip.
    let bare = format!("{}/app@{first}", registry.addr);
    let again = store.pull(&bare).await.unwrap();
    assert_eq!(again.digest, first);
    assert_eq!(again.layers, image.layers);
    assert_eq!(
        store.counters().manifest_fetches,
        1,
        "a known digest never touches the registry"
    );

    // The tag alone still means what the registry says now.
    let moved = store.pull(&tag).await.unwrap();
    assert_eq!(moved.digest, second);
    assert_eq!(marker(&moved), "two");

    // A fresh store pulls the digest-only pin from the registry.
    let fresh = ImageStore::new(&dir.join("images-fresh"), insecure).unwrap();
    let cold = fresh.pull(&bare).await.unwrap();
    assert_eq!(cold.digest, first);
    assert_eq!(marker(&cold), "one");
    assert_eq!(fresh.counters().manifest_fetches, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pin_the_registry_serves_other_content_for_is_refused() {
    require_root_and_tools();
    let registry = Registry::start();
    let (_scratch, dir) = scratch("berth-pinned-test-");
    let tag = build_busybox_image(&dir.join("build1"), &registry.addr, "app", "v1", "one");
    let first = sha256(&raw_manifest(&tag));
    build_busybox_image(&dir.join("build2"), &registry.addr, "app", "v1", "two");
    let other = raw_manifest(&tag);
    // The registry's copy of the pinned manifest now holds another (valid) manifest.
    let hex = first.trim_start_matches("sha256:");
    let data = registry
        .storage()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    assert!(data.exists(), "{}", data.display());
    std::fs::write(&data, &other).unwrap();

    let root = dir.join("images");
    let store = ImageStore::new(&root, vec![registry.addr.clone()]).unwrap();
    let err = store.pull(&format!("{tag}@{first}")).await.unwrap_err();
    assert!(
        matches!(
            err,
            PullError::DigestMismatch { .. } | PullError::Registry { .. }
        ),
        "{err}"
    );
    assert!(err.to_string().contains(&first), "{err}");
    assert!(
        !root.join("blobs/sha256").join(hex).exists(),
        "nothing cached under the pin"
    );
    eprintln!("mismatched pin error: {err}");
}
