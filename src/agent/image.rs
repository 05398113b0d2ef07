//! Images pulled inside the VM with `oci-client`: the manifest for linux/amd64, each layer
//! fetched once (its digest verified while it streams), unpacked into its own directory of
//! the store with OCI whiteouts turned into overlayfs ones (`.wh.<name>` → a 0/0 character
//! device, `.wh..wh..opq` → the `trusted.overlay.opaque` attribute), and a container's root
//! mounted as overlayfs over its layers with a writable layer of its own in the store.
//! Layers are shared between the containers of the pod and kept for the VM's life.
//!
//! Registry credentials come from an `auth.json` (`{"auths": {"<registry>": {"auth":
//! base64("user:password")}}}`) that CAA writes from the pod's pull secrets; without an
//! entry for the registry the pull is anonymous. Failures name what went wrong: an invalid
//! reference, no such image or tag, the registry refusing the credentials, a digest mismatch.

use std::collections::HashMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use nix::mount::{MsFlags, mount};
use oci_client::client::{ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::sync::Mutex;

use super::Error;

/// Media types of layers this agent unpacks.
const GZIP: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar.gzip",
];
const TAR: &[&str] = &[
    "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.docker.image.rootfs.diff.tar",
];

/// What the image's config says about its process.
#[derive(Clone, Debug, Default)]
pub(crate) struct ImageConfig {
    /// Entrypoint.
    pub entrypoint: Vec<String>,
    /// Cmd.
    pub cmd: Vec<String>,
    /// Env.
    pub env: Vec<String>,
    /// WorkingDir.
    pub working_dir: String,
}

/// How long a registry client is kept after a pull: the containers of a pod are created
/// within seconds of each other, and each re-reads its image's manifest.
const CLIENT_IDLE: std::time::Duration = std::time::Duration::from_secs(30);

/// The registry client of the last pull, for the next pull from the same registry with the
/// same credentials: its connection, TLS session and root store are reused.
struct Kept {
    /// The registry and a digest of the credentials (`oci-client` keeps the first
    /// credentials it saw for a registry: other credentials need another client).
    key: Vec<u8>,
    client: Client,
    /// For a pull without credentials: a plain HTTP client for the digest check (see
    /// [`Store::plain_digest`]); none once the registry asked for a token.
    plain: Option<oci_http::Client>,
    used: std::time::Instant,
}

/// The manifest media types a digest check accepts: those `oci-client` asks for, so the
/// registry answers with the digest of the same document (an image index's for a
/// multi-platform tag).
const MANIFEST_TYPES: &[&str] = &[
    oci_client::manifest::IMAGE_MANIFEST_MEDIA_TYPE,
    oci_client::manifest::IMAGE_MANIFEST_LIST_MEDIA_TYPE,
    oci_client::manifest::OCI_IMAGE_MEDIA_TYPE,
    oci_client::manifest::OCI_IMAGE_INDEX_MEDIA_TYPE,
];

/// What a plain digest check learnt.
enum Plain {
    /// The registry's digest for the reference.
    Digest(String),
    /// The registry wants credentials or a token: `oci-client` asks from now on.
    Refused,
    /// No digest (no plain client, an error, another status, no header): `oci-client`
    /// asks this time.
    Unknown,
}

/// The image store of the VM.
pub(crate) struct Store {
    dir: PathBuf,
    auth_file: PathBuf,
    /// Registries (`host:port`) reached over plain HTTP.
    insecure: Vec<String>,
    // One pull at a time (two containers of one image share its layers), and the client the
    // last one used, dropped [`CLIENT_IDLE`] after it: an idle agent keeps no connection
    // pools or root stores.
    pulls: std::sync::Arc<Mutex<Option<Kept>>>,
    /// What each reference pulled in this VM resolved to: the registry's digest for it (the
    /// image index's when it has one), its layer directories and config.
    resolved: std::sync::Mutex<HashMap<String, Resolved>>,
}

/// A reference as its last pull resolved it.
#[derive(Clone)]
struct Resolved {
    digest: String,
    layers: Vec<PathBuf>,
    config: ImageConfig,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("dir", &self.dir).finish()
    }
}

fn image_err(reference: &str, detail: impl Into<String>) -> Error {
    Error::Image {
        image: reference.into(),
        detail: detail.into(),
    }
}

/// A failure of the registry client in the words a user needs.
fn describe(e: &OciDistributionError) -> String {
    use OciDistributionError as E;
    match e {
        E::AuthenticationFailure(m) => format!("the registry refused the credentials: {m}"),
        E::UnauthorizedError { url } => {
            format!("the registry refused the credentials (401 Unauthorized for {url})")
        }
        E::ImageManifestNotFoundError(m) => format!("no such image or tag: {m}"),
        E::DigestError(d) => format!("digest mismatch: {d}"),
        E::RegistryError { envelope, url } => {
            let codes: Vec<String> = envelope
                .errors
                .iter()
                .map(|x| format!("{:?}", x.code))
                .collect();
            let text = codes.join(",");
            if text.contains("ManifestUnknown") || text.contains("NameUnknown") {
                format!("no such image or tag ({text} at {url})")
            } else if text.contains("Unauthorized") || text.contains("Denied") {
                format!("the registry refused the credentials ({text} at {url})")
            } else {
                format!("registry error {text} at {url}: {envelope}")
            }
        }
        E::ServerError { code, url, message } if *code == 404 => {
            format!("no such image or tag (404 at {url}: {message})")
        }
        E::ServerError { code, url, message } if *code == 401 || *code == 403 => {
            format!("the registry refused the credentials ({code} at {url}: {message})")
        }
        other => {
            let mut s = other.to_string();
            let mut src = std::error::Error::source(other);
            while let Some(c) = src {
                s.push_str(": ");
                s.push_str(&c.to_string());
                src = c.source();
            }
            s
        }
    }
}

/// The credentials for `registry` in an `auth.json`.
pub(crate) fn auth_for(auth_json: &str, registry: &str) -> Result<RegistryAuth, String> {
    #[derive(serde::Deserialize)]
    struct Entry {
        #[serde(default)]
        auth: String,
        #[serde(default)]
        username: String,
        #[serde(default)]
        password: String,
    }
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        auths: HashMap<String, Entry>,
    }
    let f: File = serde_json::from_str(auth_json).map_err(|e| format!("auth file: {e}"))?;
    let docker_hub = ["docker.io", "index.docker.io", "registry-1.docker.io"];
    let matches = |key: &str| {
        let k = key
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default();
        k == registry || (docker_hub.contains(&k) && docker_hub.contains(&registry))
    };
    let Some((_, e)) = f.auths.iter().find(|(k, _)| matches(k)) else {
        return Ok(RegistryAuth::Anonymous);
    };
    if !e.username.is_empty() {
        return Ok(RegistryAuth::Basic(e.username.clone(), e.password.clone()));
    }
    use base64::Engine;
    let raw = base64::engine::general_purpose::STANDARD
        .decode(e.auth.trim())
        .map_err(|_| format!("auth file: the entry for {registry} is not base64"))?;
    let text = String::from_utf8(raw)
        .map_err(|_| format!("auth file: the entry for {registry} is not UTF-8"))?;
    let (u, p) = text
        .split_once(':')
        .ok_or_else(|| format!("auth file: the entry for {registry} is not user:password"))?;
    Ok(RegistryAuth::Basic(u.into(), p.into()))
}

/// Whether `c` is a path component of an image name: lowercase alphanumeric runs joined by
/// `.`, `_`, `__` or dashes.
fn path_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if !b.first().is_some_and(|&x| alnum(x)) || !b.last().is_some_and(|&x| alnum(x)) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        if !(sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-')) {
            return false;
        }
    }
    true
}

/// Whether `d` is a registry host: dot-separated labels of letters, digits and inner
/// dashes, with an optional `:port`.
fn domain(d: &str) -> bool {
    let (host, port) = match d.split_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (d, None),
    };
    let label = |l: &str| {
        let b = l.as_bytes();
        !b.is_empty()
            && b.iter().all(|x| x.is_ascii_alphanumeric() || *x == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-'
    };
    host.split('.').all(label)
        && port.is_none_or(|p| !p.is_empty() && p.bytes().all(|x| x.is_ascii_digit()))
}

/// Parses an image reference (`[registry/]path[:tag][@digest]`) by the distribution
/// project's grammar, normalised as Docker does (`busybox` is
/// `docker.io/library/busybox:latest`).
///
/// `oci-client`'s own parser (`str::parse::<Reference>`) matches one regular expression
/// whose Unicode classes compile into some 8 MiB that stay in the process for its whole life:
/// more than the rest of the agent's heap. This one allocates only the parts.
pub(crate) fn parse_reference(s: &str) -> Result<Reference, String> {
    if s.is_empty() {
        return Err("the reference is empty".into());
    }
    let (rest, digest) = match s.split_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (s, None),
    };
    let (name, tag) = match rest.rsplit_once(':') {
        Some((n, t)) if !t.contains('/') => (n, Some(t)),
        _ => (rest, None),
    };
    let bad = |what: &str| Err(format!("{what} in {s:?}"));
    if let Some(t) = tag {
        let b = t.as_bytes();
        let word = |x: u8| x.is_ascii_alphanumeric() || x == b'_';
        if b.is_empty()
            || b.len() > 128
            || !word(b[0])
            || !b.iter().all(|&x| word(x) || x == b'.' || x == b'-')
        {
            return bad("invalid tag");
        }
    }
    if let Some(d) = digest {
        let Some((alg, hex)) = d.split_once(':') else {
            return bad("invalid digest");
        };
        let alg_ok = alg.split(['-', '_', '+', '.']).all(|part| {
            part.as_bytes()
                .first()
                .is_some_and(|x| x.is_ascii_alphabetic())
                && part.bytes().all(|x| x.is_ascii_alphanumeric())
        });
        if !alg_ok || hex.len() < 32 || !hex.bytes().all(|x| x.is_ascii_hexdigit()) {
            return bad("invalid digest");
        }
        let want = match alg {
            "sha256" => 64,
            "sha384" => 96,
            "sha512" => 128,
            _ => return bad("unsupported digest algorithm"),
        };
        if hex.len() != want {
            return bad("invalid digest length");
        }
    }
    let parts: Vec<&str> = name.split('/').collect();
    let (first, path) = (parts[0], &parts[1..]);
    let has_domain = !path.is_empty() && domain(first);
    let path_ok = path.iter().all(|c| path_component(c));
    if !path_ok || !(has_domain || path_component(first)) {
        return bad("invalid name");
    }
    // Docker's normalisation: a first part with no `.` or `:` (and not `localhost`) is a
    // path on Docker Hub; Docker Hub's official images live under `library/`.
    let (mut registry, mut repository) = if path.is_empty()
        || (!(first.contains('.') || first.contains(':')) && first != "localhost")
    {
        ("docker.io".to_string(), name.to_string())
    } else {
        (first.to_string(), path.join("/"))
    };
    if registry == "index.docker.io" {
        registry = "docker.io".into();
    }
    if registry == "docker.io" && !repository.contains('/') {
        repository = format!("library/{repository}");
    }
    if repository.len() > 255 {
        return bad("repository name longer than 255 characters");
    }
    Ok(match (tag, digest) {
        (Some(t), Some(d)) => {
            Reference::with_tag_and_digest(registry, repository, t.into(), d.into())
        }
        (None, Some(d)) => Reference::with_digest(registry, repository, d.into()),
        (t, None) => Reference::with_tag(registry, repository, t.unwrap_or("latest").into()),
    })
}

fn hex_of(digest: &str) -> Result<&str, String> {
    let hex = digest
        .strip_prefix("sha256:")
        .ok_or_else(|| format!("digest {digest:?} is not sha256"))?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!("digest {digest:?} is malformed"));
    }
    Ok(hex)
}

/// Unpacks a layer (a tar stream) into `dir`, whiteouts turned into overlayfs ones.
pub(crate) fn unpack(reader: impl Read, dir: &Path) -> Result<(), String> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(true);
    archive.set_preserve_ownerships(true);
    archive.set_unpack_xattrs(true);
    archive.set_overwrite(true);
    for entry in archive.entries().map_err(|e| e.to_string())? {
        let mut entry = entry.map_err(|e| format!("reading the layer: {e}"))?;
        let path = entry.path().map_err(|e| e.to_string())?.into_owned();
        if path.components().any(|c| {
            !matches!(
                c,
                std::path::Component::Normal(_) | std::path::Component::CurDir
            )
        }) {
            return Err(format!("layer entry {} leaves the layer", path.display()));
        }
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if let Some(hidden) = name.strip_prefix(".wh.") {
            let parent = dir.join(path.parent().unwrap_or(Path::new("")));
            std::fs::create_dir_all(&parent).map_err(|e| format!("{}: {e}", parent.display()))?;
            if hidden == ".wh..opq" {
                xattr::set(&parent, "trusted.overlay.opaque", b"y")
                    .map_err(|e| format!("opaque whiteout on {}: {e}", parent.display()))?;
            } else {
                let target = parent.join(hidden);
                let _ = std::fs::remove_file(&target);
                let _ = std::fs::remove_dir_all(&target);
                nix::sys::stat::mknod(
                    &target,
                    nix::sys::stat::SFlag::S_IFCHR,
                    nix::sys::stat::Mode::empty(),
                    0,
                )
                .map_err(|e| format!("whiteout {}: {e}", target.display()))?;
            }
            continue;
        }
        entry.unpack_in(dir).map_err(|e| {
            let mut m = format!("unpacking {}: {e}", path.display());
            let mut src = std::error::Error::source(&e);
            while let Some(c) = src {
                m.push_str(&format!(": {c}"));
                src = c.source();
            }
            m
        })?;
    }
    Ok(())
}

impl Store {
    /// A store in `dir`; `auth_file` holds registry credentials (absent: anonymous);
    /// `insecure` registries (`host:port`) are reached over plain HTTP.
    pub(crate) fn new(dir: &Path, auth_file: &Path, insecure: Vec<String>) -> Self {
        // The registry clients' TLS takes the process-wide provider (ring, its cipher suites
        // in the order this CPU runs fastest: `pki::tls_provider`).
        let _ = crate::pki::tls_provider().install_default();
        Self {
            dir: dir.into(),
            auth_file: auth_file.into(),
            insecure,
            pulls: std::sync::Arc::default(),
            resolved: std::sync::Mutex::default(),
        }
    }

    /// The client for `registry` with `auth`: the one kept from the last pull when it was
    /// for the same, else a new one.
    fn client(&self, kept: &mut Option<Kept>, registry: &str, auth: &RegistryAuth) -> Kept {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        for part in match auth {
            RegistryAuth::Anonymous => vec![registry, "anonymous"],
            RegistryAuth::Basic(u, p) => vec![registry, "basic", u, p],
            RegistryAuth::Bearer(t) => vec![registry, "bearer", t],
        } {
            ctx.update(part.as_bytes());
            ctx.update(b"\0");
        }
        let key = ctx.finish().as_ref().to_vec();
        match kept.take() {
            Some(k) if k.key == key => k,
            _ => Kept {
                key,
                client: Client::new(ClientConfig {
                    protocol: ClientProtocol::HttpsExcept(self.insecure.clone()),
                    ..Default::default()
                }),
                // Built as oci-client builds its own (same roots, proxies from the
                // environment); a client that cannot be built only costs the faster check.
                plain: matches!(auth, RegistryAuth::Anonymous)
                    .then(|| {
                        oci_http::Client::builder()
                            .user_agent(concat!("sandboxd/", env!("CARGO_PKG_VERSION")))
                            .build()
                            .ok()
                    })
                    .flatten(),
                used: std::time::Instant::now(),
            },
        }
    }

    /// Keeps `client` for the next pull, and drops it once unused for [`CLIENT_IDLE`].
    fn keep(&self, slot: &mut Option<Kept>, mut client: Kept) {
        client.used = std::time::Instant::now();
        *slot = Some(client);
        let pulls = std::sync::Arc::downgrade(&self.pulls);
        tokio::spawn(async move {
            tokio::time::sleep(CLIENT_IDLE).await;
            if let Some(p) = pulls.upgrade() {
                let mut slot = p.lock().await;
                if slot
                    .as_ref()
                    .is_some_and(|k| k.used.elapsed() >= CLIENT_IDLE)
                {
                    *slot = None;
                }
            }
        });
    }

    fn auth(&self, registry: &str) -> Result<RegistryAuth, String> {
        match std::fs::read_to_string(&self.auth_file) {
            Ok(text) => auth_for(&text, registry),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RegistryAuth::Anonymous),
            Err(e) => Err(format!("{}: {e}", self.auth_file.display())),
        }
    }

    /// The writable layer of the container whose root is `target`.
    pub(crate) fn rw_dir(&self, target: &Path) -> PathBuf {
        let digest =
            ring::digest::digest(&ring::digest::SHA256, target.as_os_str().as_encoded_bytes());
        let name: String = digest.as_ref()[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        self.dir.join("rw").join(name)
    }

    /// Pulls `reference` (layers not in the store yet) and mounts it at `target`.
    pub(crate) async fn mount(&self, reference: &str, target: &Path) -> Result<ImageConfig, Error> {
        let layers_and_config = self.pull(reference).await?;
        let (layers, config) = layers_and_config;
        let rw = self.rw_dir(target);
        let _ = std::fs::remove_dir_all(&rw);
        let (upper, work) = (rw.join("upper"), rw.join("work"));
        for d in [&upper, &work, &target.to_path_buf()] {
            std::fs::create_dir_all(d).map_err(super::io(format!("creating {}", d.display())))?;
        }
        // overlayfs lists the top layer first.
        let lower: Vec<String> = layers
            .iter()
            .rev()
            .map(|p| p.display().to_string())
            .collect();
        let data = format!(
            "lowerdir={},upperdir={},workdir={}",
            lower.join(":"),
            upper.display(),
            work.display()
        );
        mount(
            Some("overlay"),
            target,
            Some("overlay"),
            MsFlags::empty(),
            Some(data.as_str()),
        )
        .map_err(|e| {
            image_err(
                reference,
                format!("mounting overlayfs on {}: {e}", target.display()),
            )
        })?;
        Ok(config)
    }

    /// Forgets the writable layer of `target` (after its unmount).
    pub(crate) fn release(&self, target: &Path) {
        let _ = std::fs::remove_dir_all(self.rw_dir(target));
    }

    /// Pulls the image: its layer directories (bottom first) and its config.
    async fn pull(&self, reference: &str) -> Result<(Vec<PathBuf>, ImageConfig), Error> {
        let r = parse_reference(reference)
            .map_err(|e| image_err(reference, format!("invalid image reference: {e}")))?;
        let auth = self
            .auth(r.resolve_registry())
            .map_err(|e| image_err(reference, e))?;
        let mut slot = self.pulls.lock().await;
        let start = std::time::Instant::now();
        let mut kept = self.client(&mut slot, r.resolve_registry(), &auth);
        let pulled = self.pull_with(&mut kept, reference, &r, &auth, start).await;
        // A client whose pull failed is not kept (credentials refused, a broken connection).
        if pulled.is_ok() {
            self.keep(&mut slot, kept);
        }
        pulled
    }

    /// The registry's digest for `r` by one `HEAD` without credentials.
    ///
    /// `oci-client` asks a registry's `/v2/` for a challenge before every request when it
    /// holds no token for it, which is always for a registry that needs no credentials: two
    /// round trips for one answer. A registry that wants a token answers 401 here, and
    /// `oci-client` (which fetches tokens) asks it from then on.
    async fn plain_digest(&self, kept: &Kept, r: &Reference) -> Plain {
        let Some(http) = &kept.plain else {
            return Plain::Unknown;
        };
        let registry = r.resolve_registry();
        let scheme = if self.insecure.iter().any(|i| i == registry) {
            "http"
        } else {
            "https"
        };
        let url = format!(
            "{scheme}://{registry}/v2/{}/manifests/{}",
            r.repository(),
            r.digest().or(r.tag()).unwrap_or("latest")
        );
        let res = match http
            .head(&url)
            .header("Accept", MANIFEST_TYPES.join(", "))
            .send()
            .await
        {
            Ok(res) => res,
            Err(_) => return Plain::Unknown,
        };
        match res.status().as_u16() {
            200 => res
                .headers()
                .get("Docker-Content-Digest")
                .and_then(|v| v.to_str().ok())
                .filter(|d| !d.is_empty())
                .map_or(Plain::Unknown, |d| Plain::Digest(d.to_string())),
            401 | 403 => Plain::Refused,
            _ => Plain::Unknown,
        }
    }

    /// The registry's current digest for `r`: the plain check when the kept client has one,
    /// else (or when it knew nothing) `oci-client`'s.
    async fn current_digest(
        &self,
        kept: &mut Kept,
        r: &Reference,
        auth: &RegistryAuth,
    ) -> Option<String> {
        match self.plain_digest(kept, r).await {
            Plain::Digest(d) => return Some(d),
            Plain::Refused => kept.plain = None,
            Plain::Unknown => {}
        }
        kept.client.fetch_manifest_digest(r, auth).await.ok()
    }

    async fn pull_with(
        &self,
        kept: &mut Kept,
        reference: &str,
        r: &Reference,
        auth: &RegistryAuth,
        start: std::time::Instant,
    ) -> Result<(Vec<PathBuf>, ImageConfig), Error> {
        // Pulled before in this VM: the tag may have moved since, so the registry is asked
        // for the reference's current digest (one HEAD request); when it is the one pulled,
        // its layers and config are here already. Any other answer (or none) pulls anew.
        let known = self
            .resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(reference)
            .cloned();
        if let Some(k) = known
            && k.layers.iter().all(|d| d.is_dir())
            && self
                .current_digest(kept, r, auth)
                .await
                .is_some_and(|d| d == k.digest)
        {
            tracing::debug!(image = %reference, digest = %k.digest, layers = k.layers.len(), fetched = 0, seconds = start.elapsed().as_secs_f64(), "image ready (the registry's digest is the one pulled)");
            return Ok((k.layers, k.config));
        }
        // The plain client's first check (its connection and TLS session) goes with the
        // pull, so that the next check of this image is one round trip.
        let (pulled, warmed) = tokio::join!(
            kept.client
                .pull_manifest_and_config_and_list_digest(r, auth),
            self.plain_digest(kept, r)
        );
        if let Plain::Refused = warmed {
            kept.plain = None;
        }
        let client = &kept.client;
        let (manifest, digest, config, list_digest) =
            pulled.map_err(|e| image_err(reference, describe(&e)))?;
        let manifest_seconds = start.elapsed().as_secs_f64();
        let config = parse_config(&config).map_err(|e| image_err(reference, e))?;
        let layers_dir = self.dir.join("layers");
        std::fs::create_dir_all(&layers_dir)
            .map_err(super::io(format!("creating {}", layers_dir.display())))?;
        let mut dirs = Vec::new();
        let mut fetched = 0;
        for layer in &manifest.layers {
            let hex = hex_of(&layer.digest).map_err(|e| image_err(reference, e))?;
            let dir = layers_dir.join(hex);
            dirs.push(dir.clone());
            if dir.exists() {
                continue;
            }
            let gzip = if GZIP.contains(&layer.media_type.as_str()) {
                true
            } else if TAR.contains(&layer.media_type.as_str()) {
                false
            } else {
                return Err(image_err(
                    reference,
                    format!(
                        "layer {} has media type {}, which this agent does not unpack",
                        layer.digest, layer.media_type
                    ),
                ));
            };
            let blob = layers_dir.join(format!("{hex}.blob"));
            let file = std::fs::File::create(&blob)
                .map(BlockingFile)
                .map_err(super::io(format!("creating {}", blob.display())))?;
            let pulled = client.pull_blob(r, layer, file).await;
            if let Err(e) = pulled {
                let _ = std::fs::remove_file(&blob);
                return Err(image_err(
                    reference,
                    format!("layer {}: {}", layer.digest, describe(&e)),
                ));
            }
            let tmp = layers_dir.join(format!("{hex}.tmp"));
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp)
                .map_err(super::io(format!("creating {}", tmp.display())))?;
            let unpacked = std::fs::File::open(&blob)
                .map_err(|e| e.to_string())
                .and_then(|f| {
                    let f = std::io::BufReader::new(f);
                    if gzip {
                        unpack(flate2::read::GzDecoder::new(f), &tmp)
                    } else {
                        unpack(f, &tmp)
                    }
                });
            let _ = std::fs::remove_file(&blob);
            if let Err(e) = unpacked {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(image_err(reference, format!("layer {}: {e}", layer.digest)));
            }
            std::fs::rename(&tmp, &dir)
                .map_err(super::io(format!("renaming {}", tmp.display())))?;
            fetched += 1;
        }
        tracing::info!(image = %reference, %digest, layers = dirs.len(), fetched, manifest_seconds, seconds = start.elapsed().as_secs_f64(), "image ready");
        self.resolved
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(
                reference.to_string(),
                Resolved {
                    digest: list_digest.unwrap_or(digest),
                    layers: dirs.clone(),
                    config: config.clone(),
                },
            );
        Ok((dirs, config))
    }
}

/// A file written in place from async code. `tokio::fs` would start blocking-pool threads,
/// and the agent stays single-threaded: libcontainer clones container processes from it, and
/// a clone must not inherit a lock another thread holds.
struct BlockingFile(std::fs::File);

impl tokio::io::AsyncWrite for BlockingFile {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::task::Poll::Ready(std::io::Write::write(&mut self.0, buf))
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(std::io::Write::flush(&mut self.0))
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}

/// The process part of an image config.
pub(crate) fn parse_config(json: &str) -> Result<ImageConfig, String> {
    #[derive(serde::Deserialize, Default)]
    #[serde(rename_all = "PascalCase")]
    struct Process {
        #[serde(default)]
        entrypoint: Option<Vec<String>>,
        #[serde(default)]
        cmd: Option<Vec<String>>,
        #[serde(default)]
        env: Option<Vec<String>>,
        #[serde(default)]
        working_dir: Option<String>,
    }
    #[derive(serde::Deserialize)]
    struct Config {
        #[serde(default)]
        config: Option<Process>,
    }
    let c: Config = serde_json::from_str(json).map_err(|e| format!("image config: {e}"))?;
    let p = c.config.unwrap_or_default();
    Ok(ImageConfig {
        entrypoint: p.entrypoint.unwrap_or_default(),
        cmd: p.cmd.unwrap_or_default(),
        env: p.env.unwrap_or_default(),
        working_dir: p.working_dir.unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_found_by_registry_and_absent_ones_mean_anonymous() {
        let json = r#"{"auths": {"127.0.0.1:5000": {"auth": "dXNlcjpwYXNz"}, "https://index.docker.io/v1/": {"username": "d", "password": "p"}}}"#;
        assert!(
            matches!(auth_for(json, "127.0.0.1:5000").unwrap(), RegistryAuth::Basic(u, p) if u == "user" && p == "pass")
        );
        assert!(
            matches!(auth_for(json, "index.docker.io").unwrap(), RegistryAuth::Basic(u, _) if u == "d")
        );
        assert!(matches!(
            auth_for(json, "quay.io").unwrap(),
            RegistryAuth::Anonymous
        ));
        assert!(auth_for(r#"{"auths": {"r": {"auth": "!!"}}}"#, "r").is_err());
    }

    #[test]
    fn whiteouts_become_overlayfs_whiteouts_and_escapes_are_refused() {
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(2);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h.clone(), "etc/keep", &b"ok"[..])
            .unwrap();
        h.set_size(0);
        b.append_data(&mut h.clone(), "etc/.wh.gone", &b""[..])
            .unwrap();
        b.append_data(&mut h.clone(), "var/.wh..wh..opq", &b""[..])
            .unwrap();
        let bytes = b.into_inner().unwrap();
        let d = tempfile::tempdir().unwrap();
        unpack(&bytes[..], d.path()).unwrap();
        assert_eq!(std::fs::read(d.path().join("etc/keep")).unwrap(), b"ok");
        use std::os::unix::fs::FileTypeExt;
        let gone = std::fs::symlink_metadata(d.path().join("etc/gone")).unwrap();
        assert!(gone.file_type().is_char_device());
        assert!(!d.path().join("etc/.wh.gone").exists());
        let opq = xattr::get(d.path().join("var"), "trusted.overlay.opaque").unwrap();
        assert_eq!(opq.as_deref(), Some(&b"y"[..]));

        // A raw header naming `../x`: the tar builder refuses to write one, so patch it in.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        b.append_data(&mut h, "aa/x", &b"x"[..]).unwrap();
        let mut bytes = b.into_inner().unwrap();
        bytes[..4].copy_from_slice(b"../x");
        let mut sum: u32 = bytes[..512]
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    c as u32
                }
            })
            .sum();
        sum &= 0o777777;
        bytes[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
        let e = unpack(&bytes[..], d.path()).unwrap_err();
        assert!(e.contains("leaves the layer"), "{e}");
    }

    #[test]
    fn references_parse_as_oci_clients_parser_reads_them_without_its_regex() {
        let valid = [
            "busybox",
            "busybox:1.36",
            "library/busybox",
            "docker.io/busybox",
            "index.docker.io/library/busybox:latest",
            "quay.io/kata-containers/agent:3.2.0",
            "localhost/foo",
            "localhost:5000/foo/bar:t_1.x-2",
            "10.0.2.100:36221/busybox:1",
            "127.0.0.1:5000/private/busybox:1",
            "test.com:tag",
            "test.com:5000",
            "test.com/repo:tag",
            "a-b.example/x__y/z.w/u-v---w:Tag_",
            "ghcr.io/o/r@sha256:8bdf8ecf96ef0e9bec596ad090c58c420fc335d3aff142d01ef95428d0accdb4",
            "ghcr.io/o/r:v1@sha256:8bdf8ecf96ef0e9bec596ad090c58c420fc335d3aff142d01ef95428d0accdb4",
        ];
        for s in valid {
            let ours = parse_reference(s).unwrap_or_else(|e| panic!("{s}: {e}"));
            let theirs: Reference = s.parse().unwrap();
            assert_eq!(ours, theirs, "{s}");
            assert_eq!(ours.whole(), theirs.whole(), "{s}");
        }
        let long_tag = format!("busybox:{}", "a".repeat(129));
        let long_name = format!("r.io/{}", "a".repeat(256));
        let invalid = [
            "",
            "Not A Reference//",
            "Busybox",
            "r.io/Repo",
            "busybox:",
            "busybox:-x",
            long_tag.as_str(),
            long_name.as_str(),
            "a//b",
            "a/b/",
            "r.io:/x",
            "-r.io/x",
            "r.io/x..y",
            "r.io/x_-y",
            "busybox@sha256:abc",
            "busybox@sha256:8bdf8ecf96ef0e9bec596ad090c58c420fc335d3aff142d01ef95428d0accdb",
            "busybox@md5:8bdf8ecf96ef0e9bec596ad090c58c42",
            "busybox@sha256",
        ];
        for s in invalid {
            assert!(parse_reference(s).is_err(), "{s} was accepted");
            assert!(s.parse::<Reference>().is_err(), "oci-client accepts {s}");
        }
        // The grammar's `\w` is ASCII (Go's regexp); `oci-client`'s Unicode one is wider.
        assert!(parse_reference("busybox:é").is_err());
    }

    #[test]
    fn an_image_config_gives_entrypoint_cmd_env_and_workdir() {
        let c = parse_config(r#"{"architecture":"amd64","config":{"Entrypoint":["/bin/sh"],"Cmd":["-c","echo hi"],"Env":["PATH=/bin"],"WorkingDir":"/w"}}"#).unwrap();
        assert_eq!(c.entrypoint, ["/bin/sh"]);
        assert_eq!(c.cmd, ["-c", "echo hi"]);
        assert_eq!(c.env, ["PATH=/bin"]);
        assert_eq!(c.working_dir, "/w");
        assert!(parse_config("{}").unwrap().cmd.is_empty());
    }
}
