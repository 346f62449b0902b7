//! The built-in image registry's records and rules (OCI Distribution): repository names, tags
//! and digests as the spec writes them, what a manifest refers to, and the error codes clients
//! expect. The bytes of blobs and manifests live in the blob store; these records say which
//! repository holds which, and where each tag points.

use serde::{Deserialize, Serialize};

/// Longest repository name taken (the spec's advice: a host and name fit in 255).
pub const MAX_NAME_LEN: usize = 255;
/// Largest manifest taken: manifests are small JSON; a bigger one is refused, not buffered.
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";

/// The error codes of the OCI Distribution spec, each with the status it is answered with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
}

impl Code {
    pub fn as_str(self) -> &'static str {
        match self {
            Code::BlobUnknown => "BLOB_UNKNOWN",
            Code::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            Code::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            Code::DigestInvalid => "DIGEST_INVALID",
            Code::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            Code::ManifestInvalid => "MANIFEST_INVALID",
            Code::ManifestUnknown => "MANIFEST_UNKNOWN",
            Code::NameInvalid => "NAME_INVALID",
            Code::NameUnknown => "NAME_UNKNOWN",
            Code::SizeInvalid => "SIZE_INVALID",
            Code::Unauthorized => "UNAUTHORIZED",
            Code::Denied => "DENIED",
            Code::Unsupported => "UNSUPPORTED",
            Code::TooManyRequests => "TOOMANYREQUESTS",
        }
    }

    /// The HTTP status the spec (or, where it is silent, the reference registry) gives.
    pub fn status(self) -> u16 {
        match self {
            Code::BlobUnknown
            | Code::BlobUploadUnknown
            | Code::ManifestUnknown
            | Code::NameUnknown => 404,
            Code::Unauthorized => 401,
            Code::Denied => 403,
            Code::Unsupported => 405,
            Code::TooManyRequests => 429,
            Code::BlobUploadInvalid
            | Code::DigestInvalid
            | Code::ManifestBlobUnknown
            | Code::ManifestInvalid
            | Code::NameInvalid
            | Code::SizeInvalid => 400,
        }
    }
}

/// A refusal in the spec's terms: the code a client acts on and a sentence a person reads.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", code.as_str())]
pub struct RegistryError {
    pub code: Code,
    pub message: String,
}

impl RegistryError {
    pub fn new(code: Code, message: impl Into<String>) -> Self {
        RegistryError {
            code,
            message: message.into(),
        }
    }
}

/// Checks a repository name against the spec's grammar: lowercase components of letters and
/// digits, joined inside by `.`, `_`, `__` or dashes, separated by `/`.
pub fn check_name(name: &str) -> Result<(), RegistryError> {
    let bad = |why: &str| {
        RegistryError::new(
            Code::NameInvalid,
            format!("`{name}` is not a repository name: {why}"),
        )
    };
    if name.is_empty() {
        return Err(bad("it is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(bad(&format!("it is over {MAX_NAME_LEN} characters")));
    }
    for component in name.split('/') {
        let bytes = component.as_bytes();
        let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
        if bytes.is_empty() {
            return Err(bad("a path component is empty"));
        }
        if !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
            return Err(bad(
                "each component starts and ends with a lowercase letter or digit",
            ));
        }
        let mut i = 0;
        while i < bytes.len() {
            if alnum(bytes[i]) {
                i += 1;
                continue;
            }
            // A separator: `.`, `_`, `__`, or any run of dashes, between two alphanumerics.
            let start = i;
            while i < bytes.len() && !alnum(bytes[i]) {
                i += 1;
            }
            let sep = &component[start..i];
            let fine = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|b| b == b'-');
            if !fine {
                return Err(bad(&format!(
                    "`{sep}` may not join two parts (use lowercase letters, digits, `.`, `_`, `__`, `-` and `/`)"
                )));
            }
        }
    }
    Ok(())
}

/// Checks a tag: up to 128 of letters, digits, `_`, `.` and `-`, not starting with `.` or `-`.
pub fn check_tag(tag: &str) -> Result<(), RegistryError> {
    let first_ok = tag
        .bytes()
        .next()
        .is_some_and(|b| b.is_ascii_alphanumeric() || b == b'_');
    let rest_ok = tag
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
    if first_ok && rest_ok && tag.len() <= 128 {
        Ok(())
    } else {
        Err(RegistryError::new(
            Code::ManifestInvalid,
            format!(
                "`{tag}` is not a tag: up to 128 letters, digits, `_`, `.` and `-`, not starting with `.` or `-`"
            ),
        ))
    }
}

/// Checks a digest (sha256, the only algorithm this registry computes).
pub fn check_digest(digest: &str) -> Result<(), RegistryError> {
    if digest.starts_with("sha256:") {
        dozen_digest::check(digest)
            .map(|_| ())
            .map_err(|e| RegistryError::new(Code::DigestInvalid, e.to_string()))
    } else {
        Err(RegistryError::new(
            Code::DigestInvalid,
            format!("`{digest}`: this registry takes sha256 digests only"),
        ))
    }
}

/// What a manifest request names: a tag or a digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(String),
}

impl Reference {
    pub fn parse(reference: &str) -> Result<Self, RegistryError> {
        if reference.contains(':') {
            check_digest(reference)?;
            Ok(Reference::Digest(reference.to_string()))
        } else {
            check_tag(reference)?;
            Ok(Reference::Tag(reference.to_string()))
        }
    }
}

/// What a pushed manifest is and what it needs the repository to hold already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedManifest {
    pub media_type: String,
    /// Blobs it names (an image's config and layers), which must be in the repository.
    pub blobs: Vec<String>,
    /// Manifests it names (an index's images), which must be in the repository.
    pub manifests: Vec<String>,
    /// The config blob's digest (an image's id in the engine), for an image manifest.
    pub config: Option<String>,
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
}

#[derive(Deserialize)]
struct RawManifest {
    #[serde(rename = "schemaVersion")]
    schema_version: Option<u32>,
    #[serde(rename = "mediaType")]
    media_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
}

/// Reads a manifest pushed with `content_type`: an OCI image manifest or index, or a Docker
/// schema 2 manifest or list. Schema 1 and anything else are refused by name.
pub fn parse_manifest(
    content_type: Option<&str>,
    bytes: &[u8],
) -> Result<ParsedManifest, RegistryError> {
    let invalid = |why: String| RegistryError::new(Code::ManifestInvalid, why);
    let raw: RawManifest = serde_json::from_slice(bytes)
        .map_err(|e| invalid(format!("the manifest is not valid JSON of a manifest: {e}")))?;
    if raw.schema_version != Some(2) {
        return Err(invalid(format!(
            "schemaVersion is {}; this registry takes schema 2 (OCI, or Docker v2 schema 2)",
            raw.schema_version
                .map_or_else(|| "missing".to_string(), |v| v.to_string())
        )));
    }
    let header = content_type
        .map(|c| c.split(';').next().unwrap_or("").trim())
        .filter(|c| !c.is_empty() && *c != "application/json" && *c != "application/octet-stream");
    let media_type = match (header, raw.media_type.as_deref()) {
        (Some(h), Some(b)) if h != b => {
            return Err(invalid(format!("sent as {h} but its mediaType says {b}")))
        }
        (_, Some(b)) => b.to_string(),
        (Some(h), None) => h.to_string(),
        // OCI allows leaving the type out: what it holds says which it is.
        (None, None) if raw.manifests.is_some() => OCI_INDEX.to_string(),
        (None, None) => OCI_MANIFEST.to_string(),
    };
    let check = |d: &Descriptor| {
        check_digest(&d.digest).map_err(|e| invalid(format!("it names a bad digest: {e}")))
    };
    match media_type.as_str() {
        OCI_MANIFEST | DOCKER_MANIFEST => {
            let config = raw
                .config
                .ok_or_else(|| invalid(format!("{media_type} without a config")))?;
            check(&config)?;
            let layers = raw.layers.unwrap_or_default();
            let mut blobs = vec![config.digest.clone()];
            for layer in &layers {
                check(layer)?;
                // Foreign layers live elsewhere by design; they are not expected here.
                if !layer.media_type.contains("foreign")
                    && !layer.media_type.contains("nondistributable")
                {
                    blobs.push(layer.digest.clone());
                }
            }
            Ok(ParsedManifest {
                media_type,
                blobs,
                manifests: Vec::new(),
                config: Some(config.digest),
            })
        }
        OCI_INDEX | DOCKER_LIST => {
            let children = raw
                .manifests
                .ok_or_else(|| invalid(format!("{media_type} without manifests")))?;
            for child in &children {
                check(child)?;
            }
            Ok(ParsedManifest {
                media_type,
                blobs: Vec::new(),
                manifests: children.into_iter().map(|c| c.digest).collect(),
                config: None,
            })
        }
        other if other.contains("manifest.v1") => Err(invalid(format!(
            "{other} is Docker's schema 1, which this registry does not take; push with a current client"
        ))),
        other => Err(invalid(format!("unknown manifest type {other}"))),
    }
}

/// An image of this registry as a release runs it: the repository and the manifest digest its
/// tag pointed at when the release was made (a tag moved later changes nothing that runs).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
pub struct ImagePin {
    pub repository: String,
    pub digest: String,
}

impl std::fmt::Display for ImagePin {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.repository, self.digest)
    }
}

/// What an image reference in a stack file names in this registry: `repo`, `repo:tag` or
/// `repo@sha256:…`, without a host. `None` when it is not such a name (it has a host, or is
/// not a valid repository name), so the engine resolves it itself.
pub fn local_reference(image: &str) -> Option<(String, Reference)> {
    let (name, reference) = match image.split_once('@') {
        Some((name, digest)) => (name, Reference::parse(digest).ok()?),
        None => {
            // A `:` after the last `/` starts the tag; one before it is a host's port.
            let last = image.rfind('/').map_or(0, |i| i + 1);
            match image[last..].rfind(':') {
                Some(i) => (
                    &image[..last + i],
                    Reference::parse(&image[last + i + 1..]).ok()?,
                ),
                None => (image, Reference::Tag("latest".into())),
            }
        }
    };
    let first = name.split('/').next().unwrap_or("");
    let has_host = name.contains('/') && (first.contains(['.', ':']) || first == "localhost");
    if has_host || check_name(name).is_err() {
        return None;
    }
    Some((name.to_string(), reference))
}

/// A repository's manifest: the bytes are the blob under `digest`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ManifestRecord {
    pub schema: u32,
    pub repository: String,
    pub digest: String,
    pub media_type: String,
    pub size: u64,
    /// Blobs and manifests it names: kept while it is.
    pub references: Vec<String>,
    /// An image's config digest (what the engine calls the image id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<String>,
    pub pushed_at_ms: u64,
}
record!(ManifestRecord, "registry manifest");

/// Where a tag points.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct TagRecord {
    pub schema: u32,
    pub digest: String,
    pub pushed_at_ms: u64,
}
record!(TagRecord, "registry tag");

/// A blob a repository holds (pushed into it, or mounted from another).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BlobLink {
    pub schema: u32,
    pub size: u64,
    pub linked_at_ms: u64,
}
record!(BlobLink, "registry blob link");

/// A repository the catalog lists (it holds at least one manifest, or did).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct RepositoryRecord {
    pub schema: u32,
    pub created_at_ms: u64,
}
record!(RepositoryRecord, "registry repository");

/// The registry's keys: beside the control records, not under `/dozen/v1/`, so a push never
/// wakes a controller. `_tags`, `_manifests` and `_blobs` cannot be repository components
/// (those start with a letter or digit), so one repository's prefix never takes in another's.
pub mod keys {
    pub const ROOT: &str = "/dozen/registry/v1/";

    pub fn repositories() -> String {
        format!("{ROOT}catalog/")
    }
    pub fn repository(name: &str) -> String {
        format!("{ROOT}catalog/{name}")
    }
    pub fn tags(repo: &str) -> String {
        format!("{ROOT}r/{repo}/_tags/")
    }
    pub fn tag(repo: &str, tag: &str) -> String {
        format!("{ROOT}r/{repo}/_tags/{tag}")
    }
    pub fn manifests(repo: &str) -> String {
        format!("{ROOT}r/{repo}/_manifests/")
    }
    pub fn manifest(repo: &str, digest: &str) -> String {
        format!("{ROOT}r/{repo}/_manifests/{digest}")
    }
    pub fn blobs(repo: &str) -> String {
        format!("{ROOT}r/{repo}/_blobs/")
    }
    pub fn blob(repo: &str, digest: &str) -> String {
        format!("{ROOT}r/{repo}/_blobs/{digest}")
    }
    /// Every repository's records (the collector reads the manifests among them).
    pub fn all() -> String {
        format!("{ROOT}r/")
    }
    /// `(repository, kind, name)` of a key under [`all`], kind being `_tags`, `_manifests` or
    /// `_blobs`.
    pub fn parse(key: &str) -> Option<(&str, &str, &str)> {
        let rest = key.strip_prefix(ROOT)?.strip_prefix("r/")?;
        let (head, name) = rest.rsplit_once('/')?;
        let (repo, kind) = head.rsplit_once('/')?;
        kind.starts_with('_').then_some((repo, kind, name))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_spec_grammar() {
        for good in [
            "a",
            "shop/web",
            "a.b/c_d/e__f/g--h",
            "x1/2y",
            "library/busybox",
        ] {
            assert_eq!(check_name(good), Ok(()), "{good}");
        }
        for bad in [
            "", "Shop", "a//b", "/a", "a/", "a_", "-a", "a___b", "a._b", "a/../b", "a b",
        ] {
            let e = check_name(bad).unwrap_err();
            assert_eq!(e.code, Code::NameInvalid, "{bad}");
        }
        assert!(check_name(&"a".repeat(256)).is_err());
    }

    #[test]
    fn references_are_tags_or_sha256_digests() {
        let d = dozen_digest::sha256_digest(b"x");
        assert_eq!(Reference::parse(&d), Ok(Reference::Digest(d.clone())));
        assert_eq!(
            Reference::parse("v1.2-rc_3"),
            Ok(Reference::Tag("v1.2-rc_3".into()))
        );
        assert_eq!(
            Reference::parse(".x").unwrap_err().code,
            Code::ManifestInvalid
        );
        assert_eq!(
            Reference::parse("sha256:zz").unwrap_err().code,
            Code::DigestInvalid
        );
        assert_eq!(
            Reference::parse("sha512:ab").unwrap_err().code,
            Code::DigestInvalid
        );
        assert!(Reference::parse(&"t".repeat(129)).is_err());
    }

    #[test]
    fn manifests_say_what_they_need() {
        let c = dozen_digest::sha256_digest(b"config");
        let l = dozen_digest::sha256_digest(b"layer");
        let image = format!(
            r#"{{"schemaVersion":2,"mediaType":"{DOCKER_MANIFEST}","config":{{"mediaType":"x","digest":"{c}","size":1}},"layers":[{{"mediaType":"y","digest":"{l}","size":2}}]}}"#
        );
        let parsed = parse_manifest(Some(DOCKER_MANIFEST), image.as_bytes()).unwrap();
        assert_eq!(parsed.blobs, vec![c.clone(), l.clone()]);
        assert_eq!(parsed.config, Some(c.clone()));
        // Header and body disagree.
        let e = parse_manifest(Some(OCI_MANIFEST), image.as_bytes()).unwrap_err();
        assert_eq!(e.code, Code::ManifestInvalid);
        // An index without a media type is known by its manifests.
        let index = format!(r#"{{"schemaVersion":2,"manifests":[{{"digest":"{c}","size":1}}]}}"#);
        let parsed = parse_manifest(None, index.as_bytes()).unwrap();
        assert_eq!(
            (parsed.media_type.as_str(), parsed.manifests),
            (OCI_INDEX, vec![c])
        );
        for bad in [
            "not json",
            r#"{"schemaVersion":1,"name":"x"}"#,
            r#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json"}"#,
            r#"{"schemaVersion":2,"config":{"digest":"sha256:nothex"},"layers":[]}"#,
        ] {
            let e = parse_manifest(None, bad.as_bytes()).unwrap_err();
            assert_eq!(e.code, Code::ManifestInvalid, "{bad}");
        }
    }

    #[test]
    fn stack_file_images_name_this_registry_only_without_a_host() {
        let d = dozen_digest::sha256_digest(b"m");
        assert_eq!(
            local_reference("shop/web:1.2"),
            Some(("shop/web".into(), Reference::Tag("1.2".into())))
        );
        assert_eq!(
            local_reference("web"),
            Some(("web".into(), Reference::Tag("latest".into())))
        );
        assert_eq!(
            local_reference(&format!("web@{d}")),
            Some(("web".into(), Reference::Digest(d)))
        );
        for elsewhere in [
            "registry.example.com/web:1",
            "localhost:5000/web",
            "127.0.0.1:7700/web:2",
            "Web:1",
        ] {
            assert_eq!(local_reference(elsewhere), None, "{elsewhere}");
        }
    }

    #[test]
    fn keys_of_one_repository_never_take_in_another() {
        let d = dozen_digest::sha256_digest(b"x");
        let key = keys::tag("a/manifests/b", "latest");
        assert_eq!(
            keys::parse(&key),
            Some(("a/manifests/b", "_tags", "latest"))
        );
        assert!(!keys::tag("a/b", "t").starts_with(&keys::tags("a")));
        assert_eq!(
            keys::parse(&keys::blob("x", &d)),
            Some(("x", "_blobs", d.as_str()))
        );
    }
}
