//! Pulls from a real local registry through `ImageStore`: digest pinning, layer cache reuse,
//! single-flight under concurrency, overlay mount and release. Needs root (see `image_support`).

#![allow(clippy::unwrap_used)] // tests may unwrap (COMMON.md)

mod image_support;

use std::time::Duration;

use berth_agent::image::{ImageStore, PullError};
use image_support::{
    build_busybox_image, is_mountpoint, raw_manifest, require_root_and_tools, scratch, MountGuard,
    Registry,
};
use sha2::Digest as _;

fn sha256(bytes: &[u8]) -> String {
    format!("sha256:{}", hex::encode(sha2::Sha256::digest(bytes)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_pins_caches_and_mounts() {
    require_root_and_tools();
    let mut registry = Registry::start();
    let (_scratch, dir) = scratch("berth-image-test-");
    let reference =
        build_busybox_image(&dir.join("build"), &registry.addr, "demo/httpd", "1", "one");
    let root = dir.join("images");
    let insecure = vec![registry.addr.clone()];

    // Cold pull: manifest digest pinned to exactly what the registry serves.
    let store = ImageStore::new(&root, insecure.clone()).unwrap();
    let image = store.pull(&reference).await.unwrap();
    assert_eq!(image.digest, sha256(&raw_manifest(&reference)));
    assert_eq!(image.layers.len(), 2);
    assert!(!image.timing.cached);
    assert_eq!(image.config.entrypoint, ["/bin/httpd"]);
    assert_eq!(image.config.cmd, ["-f", "-p", "80", "-h", "/www"]);
    assert!(
        image.config.env.iter().any(|e| e == "BERTH_TEST=1"),
        "{:?}",
        image.config.env
    );
    let cold = store.counters();
    assert_eq!(
        (
            cold.manifest_fetches,
            cold.blob_downloads,
            cold.layer_unpacks
        ),
        (1, 3, 2),
        "{cold:?}"
    );
    assert!(image.layers[0].join("bin/busybox").is_file());

    // Warm pull in the same process: no registry, no disk work, fast.
    let warm = store.pull(&reference).await.unwrap();
    assert_eq!(warm.digest, image.digest);
    assert!(warm.timing.cached);
    assert!(
        warm.timing.total < Duration::from_millis(20),
        "{:?}",
        warm.timing
    );
    eprintln!("cold pull {:?}\nwarm pull {:?}", image.timing, warm.timing);
    assert_eq!(store.counters(), cold);

    // By digest: served from the store without the registry.
    let by_digest = format!("{}/demo/httpd@{}", registry.addr, image.digest);
    assert_eq!(store.pull(&by_digest).await.unwrap().layers, image.layers);
    assert_eq!(store.counters(), cold);

    // A restarted agent (new store, same root) re-resolves the tag but downloads nothing.
    let restarted = ImageStore::new(&root, insecure.clone()).unwrap();
    let again = restarted.pull(&reference).await.unwrap();
    assert_eq!(again.digest, image.digest);
    let c = restarted.counters();
    assert_eq!(
        (c.manifest_fetches, c.blob_downloads, c.layer_unpacks),
        (1, 0, 0),
        "{c:?}"
    );

    // Two instances on the same image, each with its own writable upper.
    let a = dir.join("instances/a");
    let b = dir.join("instances/b");
    let _mounts = MountGuard(vec![a.join("rootfs"), b.join("rootfs")]);
    let rootfs_a = store.mount_rootfs(&image, &a).unwrap();
    let rootfs_b = store.mount_rootfs(&image, &b).unwrap();
    assert_eq!(rootfs_a, a.join("rootfs"));
    assert!(is_mountpoint(&rootfs_a) && is_mountpoint(&rootfs_b));
    assert!(rootfs_a.join("bin/busybox").is_file());
    assert_eq!(
        std::fs::read_link(rootfs_a.join("bin/sh")).unwrap(),
        std::path::Path::new("busybox")
    );
    assert_eq!(
        std::fs::read_to_string(rootfs_a.join("www/index.html")).unwrap(),
        "one"
    );
    assert!(
        !rootfs_a.join("etc/removed").exists(),
        "layer 2's whiteout must hide /etc/removed"
    );
    std::fs::write(rootfs_a.join("tmp/scratch"), "a only").unwrap();
    assert!(a.join("upper/tmp/scratch").is_file());
    assert!(!rootfs_b.join("tmp/scratch").exists());
    assert!(!image.layers.iter().any(|l| l.join("tmp/scratch").exists()));
    // Mounting again (agent restart) reuses the mount.
    assert_eq!(store.mount_rootfs(&image, &a).unwrap(), rootfs_a);

    store.release_rootfs(&a).unwrap();
    assert!(!is_mountpoint(&rootfs_a));
    for d in ["rootfs", "upper", "work"] {
        assert!(!a.join(d).exists(), "{d} left behind");
    }
    assert!(
        image.layers[0].join("bin/busybox").is_file(),
        "release must not touch the layers"
    );
    store.release_rootfs(&a).unwrap(); // idempotent
    store
        .release_rootfs(&dir.join("instances/never-mounted"))
        .unwrap();
    store.release_rootfs(&b).unwrap();
    assert!(!is_mountpoint(&rootfs_b));

    // The tag moves: this process keeps its pin; a restarted agent sees the new digest.
    build_busybox_image(&dir.join("build"), &registry.addr, "demo/httpd", "1", "two");
    let new_digest = sha256(&raw_manifest(&reference));
    assert_ne!(new_digest, image.digest);
    assert_eq!(store.pull(&reference).await.unwrap().digest, image.digest);
    let moved = ImageStore::new(&root, insecure.clone())
        .unwrap()
        .pull(&reference)
        .await
        .unwrap();
    assert_eq!(moved.digest, new_digest);

    // Registry gone: a restarted agent falls back to the digest it recorded for the tag.
    registry.stop();
    let offline = ImageStore::new(&root, insecure.clone()).unwrap();
    assert_eq!(offline.pull(&reference).await.unwrap().digest, new_digest);
    // …but cannot invent an image it never had.
    let err = offline
        .pull(&format!("{}/demo/other:1", registry.addr))
        .await
        .unwrap_err();
    assert!(matches!(err, PullError::Registry { .. }), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_pulls_download_once() {
    require_root_and_tools();
    let registry = Registry::start();
    let (_scratch, dir) = scratch("berth-image-test-");
    let reference = build_busybox_image(
        &dir.join("build"),
        &registry.addr,
        "demo/replicas",
        "1",
        "x",
    );
    let store = ImageStore::new(&dir.join("images"), vec![registry.addr.clone()]).unwrap();

    let pulls = (0..5).map(|_| {
        let store = store.clone();
        let reference = reference.clone();
        tokio::spawn(async move { store.pull(&reference).await })
    });
    let images: Vec<_> = futures::future::join_all(pulls)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap())
        .collect();
    assert!(images
        .iter()
        .all(|i| i.digest == images[0].digest && i.layers == images[0].layers));
    let c = store.counters();
    assert_eq!(
        (c.manifest_fetches, c.blob_downloads, c.layer_unpacks),
        (1, 3, 2),
        "{c:?}"
    );
    // Nothing left in staging.
    assert_eq!(
        std::fs::read_dir(dir.join("images/tmp")).unwrap().count(),
        0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupted_blob_is_rejected_and_never_cached() {
    require_root_and_tools();
    let registry = Registry::start();
    let (_scratch, dir) = scratch("berth-image-test-");
    let reference =
        build_busybox_image(&dir.join("build"), &registry.addr, "demo/corrupt", "1", "c");
    // Flip bytes of the biggest blob (the busybox layer) in the registry's own storage.
    let blobs = registry.storage().join("docker/registry/v2/blobs/sha256");
    let mut biggest: Option<(u64, std::path::PathBuf)> = None;
    for prefix in std::fs::read_dir(&blobs).unwrap() {
        for blob in std::fs::read_dir(prefix.unwrap().path()).unwrap() {
            let data = blob.unwrap().path().join("data");
            let len = std::fs::metadata(&data).unwrap().len();
            if biggest.as_ref().is_none_or(|(l, _)| len > *l) {
                biggest = Some((len, data));
            }
        }
    }
    let (_, data) = biggest.unwrap();
    let digest = format!(
        "sha256:{}",
        data.parent()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
    );
    let mut bytes = std::fs::read(&data).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&data, bytes).unwrap();

    let root = dir.join("images");
    let store = ImageStore::new(&root, vec![registry.addr.clone()]).unwrap();
    let err = store.pull(&reference).await.unwrap_err();
    assert!(err.to_string().contains(&digest), "{err}");
    let hex = digest.trim_start_matches("sha256:");
    assert!(!root.join("blobs/sha256").join(hex).exists());
    assert!(!root.join("layers").join(hex).exists());
    // Sibling layers still in flight when the pull failed clean up after themselves.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::fs::read_dir(root.join("tmp")).unwrap().count() != 0 {
        assert!(std::time::Instant::now() < deadline, "staging not cleaned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("corrupted blob error: {err}");
}

#[tokio::test]
async fn bad_references_and_unknown_images_fail_clearly() {
    let (_scratch, dir) = scratch("berth-image-test-");
    let store = ImageStore::new(&dir.join("images"), vec![]).unwrap();
    let err = store.pull("UPPER/case::").await.unwrap_err();
    assert!(matches!(err, PullError::Reference(_)), "{err}");
    assert!(
        err.to_string()
            .contains("invalid image reference \"UPPER/case::\""),
        "{err}"
    );
}
