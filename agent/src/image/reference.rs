//! Image references: parsing and validation before anything touches the network or the disk.

use oci_client::Reference;

/// Why a string is not a usable image reference.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    /// The string does not parse as `[registry/]repository[:tag][@digest]`.
    #[error("invalid image reference {reference:?}: {reason}")]
    Invalid {
        /// The string as given.
        reference: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// Parses and validates an image reference such as `127.0.0.1:5000/demo/httpd:1` or
/// `registry.example/app@sha256:…`.
///
/// Short names are normalised the way Docker does (`busybox` → `docker.io/library/busybox:latest`).
/// Only `sha256` digests are accepted, because digests name files in the image store.
pub fn parse(reference: &str) -> Result<Reference, ReferenceError> {
    let invalid = |reason: String| ReferenceError::Invalid {
        reference: reference.to_owned(),
        reason,
    };
    if reference.is_empty() {
        return Err(invalid("empty reference".to_owned()));
    }
    if reference.trim() != reference || reference.chars().any(char::is_whitespace) {
        return Err(invalid("contains whitespace".to_owned()));
    }
    let parsed: Reference = reference.parse().map_err(|e| invalid(format!("{e}")))?;
    if let Some(digest) = parsed.digest() {
        if super::cache::Digest::parse(digest).is_none() {
            return Err(invalid(format!(
                "digest {digest:?} is not sha256:<64 lower-case hex digits>"
            )));
        }
    }
    Ok(parsed)
}

/// Checks that `reference` is a valid image reference, without keeping the parsed form.
pub fn validate(reference: &str) -> Result<(), ReferenceError> {
    parse(reference).map(|_| ())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn accepts_common_forms() {
        for ok in [
            "busybox",
            "127.0.0.1:5000/demo/httpd:1",
            "localhost:5000/a/b/c:latest",
            "registry.example/app@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            validate(ok).unwrap_or_else(|e| panic!("{ok} rejected: {e}"));
        }
        let parsed = parse("busybox").unwrap();
        assert_eq!(parsed.whole(), "docker.io/library/busybox:latest");
    }

    #[test]
    fn pinned_references_keep_tag_and_digest_and_fetch_by_digest() {
        let digest = format!("sha256:{}", "ab".repeat(32));
        let pinned = parse(&format!("127.0.0.1:5000/app:v1@{digest}")).unwrap();
        assert_eq!(pinned.registry(), "127.0.0.1:5000");
        assert_eq!(pinned.repository(), "app");
        assert_eq!(pinned.tag(), Some("v1"));
        assert_eq!(pinned.digest(), Some(digest.as_str()));
        // The cache key keeps both, so a pin never shares an entry with its moving tag.
        assert_eq!(pinned.whole(), format!("127.0.0.1:5000/app:v1@{digest}"));

        let bare = parse(&format!("127.0.0.1:5000/app@{digest}")).unwrap();
        assert_eq!(bare.tag(), None);
        assert_eq!(bare.digest(), Some(digest.as_str()));
        assert_eq!(bare.whole(), format!("127.0.0.1:5000/app@{digest}"));

        let nested = parse(&format!("localhost:5000/team/app:1.2@{digest}")).unwrap();
        assert_eq!(nested.repository(), "team/app");
        assert_eq!(nested.digest(), Some(digest.as_str()));

        // A pin must be a full sha256.
        assert!(validate("127.0.0.1:5000/app:v1@sha256:abc").is_err());
        assert!(validate(&format!("127.0.0.1:5000/app:v1@{}", digest.to_uppercase())).is_err());
    }

    #[test]
    fn rejects_garbage_with_a_clear_message() {
        for bad in [
            "",
            "UPPER/case::",
            "a b",
            "demo:tag:extra",
            "x@sha256:short",
            "x@md5:0123456789abcdef0123456789abcdef",
        ] {
            let err = validate(bad).expect_err(bad);
            let msg = err.to_string();
            assert!(msg.starts_with("invalid image reference"), "{msg}");
            assert!(msg.contains(&format!("{bad:?}")), "{msg}");
        }
    }
}
