//! The peer pods webhook rollout: Deployment `peer-pods-webhook`, its PodDisruptionBudget,
//! ServiceAccount and Service `peer-pods-webhook-svc`, the MutatingWebhookConfiguration of
//! [`crate::webhook::manifest`], and the serving TLS without cert-manager.
//!
//! TLS: the operator keeps a CA in Secret [`CA_SECRET`] and the serving certificate in the
//! `kubernetes.io/tls` Secret [`SERVING_SECRET`] (with `ca.crt`, the caBundle); only the
//! latter is mounted into the webhook pods. The serving certificate is renewed at 2/3 of its
//! life. The CA is renewed at 2/3 of its life with overlap: the new CA joins the caBundle
//! beside the old one, the serving certificate moves to the new CA only after a propagation
//! grace (so the API server trusts it before it is served), and the old CA leaves the bundle
//! when it expires. No admission fails across a rotation.
//!
//! The decisions are pure functions of the observed certificates and `now`
//! ([`ca_step`], [`serving_due`], [`ca_bundle`], [`next_check`]); [`ensure`] and
//! [`remove`] apply them with server-side apply, writing nothing when nothing changed.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::Api;
use kube::{Resource, ResourceExt};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;
use time::OffsetDateTime;

use crate::k8s::apply;
use crate::pki::{self, Ca, Usage};
use crate::webhook::manifest::{self, Endpoint};

/// The webhook Deployment.
pub const DEPLOYMENT: &str = "peer-pods-webhook";
/// The webhook pods' ServiceAccount (no API permissions: the webhook never calls the API).
pub const SERVICE_ACCOUNT: &str = "peer-pods-webhook";
/// The PodDisruptionBudget (minAvailable 1).
pub const PDB: &str = "peer-pods-webhook";
/// The Service in front of the Deployment (443 → 9443).
pub const SERVICE: &str = manifest::SERVICE_NAME;
/// The `kubernetes.io/tls` Secret mounted by the webhook pods: `tls.crt`, `tls.key` and
/// `ca.crt` (the caBundle).
pub const SERVING_SECRET: &str = "peer-pods-webhook-cert";
/// The CA Secret (operator only): `ca.crt`, `ca.key` and, during a CA rotation,
/// `previous-ca.crt`.
pub const CA_SECRET: &str = "peer-pods-webhook-ca";
/// Annotation on [`CA_SECRET`]: when the current CA joined the caBundle (RFC 3339).
pub const CA_SINCE_ANNOTATION: &str = "peerpods.sandboxd.io/ca-in-bundle-since";
/// The HTTPS port of the webhook container.
pub const PORT: i32 = 9443;
/// Where the serving Secret is mounted in the webhook pods.
pub const CERT_DIR: &str = "/etc/webhook/certs";
/// OpenShift service-CA: Service annotation naming the Secret to create.
pub const SERVICE_CA_SECRET_ANNOTATION: &str = "service.beta.openshift.io/serving-cert-secret-name";
/// OpenShift service-CA: annotation asking for the caBundle to be injected.
pub const SERVICE_CA_INJECT_ANNOTATION: &str = "service.beta.openshift.io/inject-cabundle";

const CA_CERT_KEY: &str = "ca.crt";
const CA_KEY_KEY: &str = "ca.key";
const PREVIOUS_CA_KEY: &str = "previous-ca.crt";
const TLS_CRT: &str = "tls.crt";
const TLS_KEY: &str = "tls.key";
const CA_COMMON_NAME: &str = "peer-pods-webhook-ca";

/// Who provides the webhook's serving certificate.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum TlsSource {
    /// The operator keeps a CA and the serving certificate and rotates both.
    #[default]
    Operator,
    /// OpenShift's service CA signs the serving certificate and injects the caBundle.
    ServiceCa,
}

/// How the webhook is rolled out (operator flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Development only: `https://IP:PORT` of a webhook running outside the cluster; the
    /// configuration then uses `clientConfig.url` and the certificate gets that IP as SAN.
    pub url: Option<String>,
    /// Validity of a serving certificate (renewed at 2/3 of it).
    pub cert_validity: std::time::Duration,
    /// Validity of the CA (renewed at 2/3 of it, the old one kept in the bundle until it
    /// expires).
    pub ca_validity: std::time::Duration,
    /// Who provides the serving certificate.
    pub tls: TlsSource,
    /// Keep the one-KataConfig rule with this webhook (the cluster has no
    /// ValidatingAdmissionPolicy): the webhook runs while any KataConfig exists.
    pub kataconfig_singleton: bool,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            url: None,
            cert_validity: std::time::Duration::from_secs(365 * 24 * 3600),
            ca_validity: std::time::Duration::from_secs(10 * 365 * 24 * 3600),
            tls: TlsSource::Operator,
            kataconfig_singleton: false,
        }
    }
}

/// What the rolled-out webhook serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Targets {
    /// Peer pods are on: the MutatingWebhookConfiguration sends `kata-remote` pods.
    pub mutate: bool,
    /// The one-KataConfig rule on a cluster without ValidatingAdmissionPolicy: the
    /// ValidatingWebhookConfiguration refusing every KataConfig but this one.
    pub singleton_for: Option<String>,
}

impl Targets {
    /// Whether the webhook is needed at all.
    pub fn any(&self) -> bool {
        self.mutate || self.singleton_for.is_some()
    }
}

/// Errors of the webhook rollout.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A write failed.
    #[error(transparent)]
    Apply(#[from] apply::Error),
    /// A read by name failed.
    #[error("reading {kind} {name}: {source}")]
    Read {
        /// The kind read.
        kind: &'static str,
        /// The object name.
        name: String,
        /// The API error.
        #[source]
        source: kube::Error,
    },
    /// Issuing a certificate failed.
    #[error(transparent)]
    Pki(#[from] pki::Error),
    /// `--webhook-url` is not `https://HOST:PORT`.
    #[error(transparent)]
    Url(#[from] UrlError),
}

/// A `--webhook-url` that is not `https://HOST:PORT`.
#[derive(Debug, thiserror::Error)]
#[error("--webhook-url {url:?}: {reason}")]
pub struct UrlError {
    /// The flag's value.
    pub url: String,
    /// What is wrong.
    pub reason: &'static str,
}

impl Error {
    /// A short, stable label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply(e) => e.metric_label(),
            Error::Read { .. } => "read",
            Error::Pki(e) => e.metric_label(),
            Error::Url(_) => "webhook_url",
        }
    }
}

// ---------------------------------------------------------------------------------------
// Pure rotation decisions.

/// The validity window of a certificate.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Validity {
    /// Not valid before.
    pub not_before: OffsetDateTime,
    /// Not valid after.
    pub not_after: OffsetDateTime,
}

/// The validity of the first certificate in `pem`, `None` when it is not a certificate.
pub fn validity_of(pem: &str) -> Option<Validity> {
    let der = CertificateDer::from_pem_slice(pem.as_bytes()).ok()?;
    let (_, cert) = x509_parser::parse_x509_certificate(der.as_ref()).ok()?;
    let v = cert.validity();
    Some(Validity {
        not_before: v.not_before.to_datetime(),
        not_after: v.not_after.to_datetime(),
    })
}

fn to_time(d: std::time::Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// When a certificate with `validity`, issued for `configured`, is renewed: once less than
/// a third of its life is left (its life counted as at most `configured`, so a back-dated
/// start does not make it renew early).
pub fn renew_at(validity: &Validity, configured: std::time::Duration) -> OffsetDateTime {
    let span = (validity.not_after - validity.not_before).min(to_time(configured));
    validity.not_after - span / 3
}

/// What to do with the CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CaStep {
    /// Keep it.
    Keep,
    /// Make a new CA (none usable, or the current one is due): the current certificate, if
    /// still valid, stays in the bundle as the previous CA.
    New,
    /// The previous CA expired: drop it from the bundle.
    DropPrevious,
}

/// The CA decision for the usable current CA (`None`: missing or unusable) and the previous
/// CA kept for overlap.
pub fn ca_step(
    current: Option<&Validity>,
    previous: Option<&Validity>,
    configured: std::time::Duration,
    now: OffsetDateTime,
) -> CaStep {
    match current {
        None => CaStep::New,
        Some(c) if now >= renew_at(c, configured) => CaStep::New,
        Some(_) if previous.is_some_and(|p| now >= p.not_after) => CaStep::DropPrevious,
        Some(_) => CaStep::Keep,
    }
}

/// The caBundle: the current CA, then the previous one while it is still valid.
pub fn ca_bundle(
    current: &str,
    previous: Option<(&str, &Validity)>,
    now: OffsetDateTime,
) -> String {
    let mut out = current.trim_end().to_string();
    out.push('\n');
    if let Some((pem, v)) = previous
        && now < v.not_after
    {
        out.push_str(pem.trim_end());
        out.push('\n');
    }
    out
}

/// Which CA of the bundle the serving certificate verifies against (for every name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Signer {
    /// The current CA.
    Current,
    /// The previous CA (a CA rotation is under way).
    Previous,
}

/// How long after a new CA joined the bundle the serving certificate moves to it: time for
/// every API server to see the new caBundle. A twelfth of the CA's validity, 1 s to 60 s.
pub fn propagation_grace(ca_validity: std::time::Duration) -> std::time::Duration {
    (ca_validity / 12).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    )
}

/// Whether the serving certificate must be (re)issued now. `serving` is its validity and
/// signer (`None`: missing, unreadable, or not valid for the names under either CA);
/// `ca_since` is when the current CA joined the bundle.
pub fn serving_due(
    serving: Option<(&Validity, Signer)>,
    ca_since: Option<OffsetDateTime>,
    settings: &Settings,
    now: OffsetDateTime,
) -> bool {
    let Some((v, signer)) = serving else {
        return true;
    };
    if now >= v.not_after {
        return true;
    }
    match signer {
        Signer::Current => now >= renew_at(v, settings.cert_validity),
        // Move to the new CA once every API server trusts it.
        Signer::Previous => {
            ca_since.is_none_or(|s| now >= s + to_time(propagation_grace(settings.ca_validity)))
        }
    }
}

/// When the next decision is due: the earliest renewal, expiry or grace end still ahead.
pub fn next_check(
    ca: &Validity,
    previous: Option<&Validity>,
    serving: &Validity,
    signer: Signer,
    ca_since: Option<OffsetDateTime>,
    settings: &Settings,
    now: OffsetDateTime,
) -> std::time::Duration {
    let mut points = vec![
        renew_at(ca, settings.ca_validity),
        renew_at(serving, settings.cert_validity),
    ];
    if let Some(p) = previous {
        points.push(p.not_after);
    }
    if let (Signer::Previous, Some(s)) = (signer, ca_since) {
        points.push(s + to_time(propagation_grace(settings.ca_validity)));
    }
    let next = points.into_iter().filter(|t| *t > now).min();
    next.map_or(std::time::Duration::from_secs(1), |t| {
        std::time::Duration::try_from(t - now).unwrap_or_default()
            + std::time::Duration::from_millis(200)
    })
}

/// The names the serving certificate is valid for: the Service's DNS names and, with a
/// development URL, its host.
pub fn serving_names(namespace: &str, url: Option<&str>) -> Result<Vec<String>, UrlError> {
    let mut names = vec![
        SERVICE.to_string(),
        format!("{SERVICE}.{namespace}"),
        format!("{SERVICE}.{namespace}.svc"),
        format!("{SERVICE}.{namespace}.svc.cluster.local"),
    ];
    if let Some(u) = url {
        names.push(url_host(u)?);
    }
    Ok(names)
}

/// Checks a `--webhook-url` value (`https://HOST:PORT`, no path).
pub fn check_url(u: &str) -> Result<String, String> {
    url_host(u)
        .map(|_| u.to_string())
        .map_err(|e| e.to_string())
}

fn url_host(u: &str) -> Result<String, UrlError> {
    let bad = |reason| UrlError {
        url: u.to_string(),
        reason,
    };
    let parsed = url::Url::parse(u).map_err(|_| bad("not a URL"))?;
    if parsed.scheme() != "https" {
        return Err(bad("the scheme must be https"));
    }
    if parsed.path() != "/" && !parsed.path().is_empty() {
        return Err(bad(
            "give only https://HOST:PORT; the path is /mutate-v1-pod",
        ));
    }
    match parsed.host() {
        Some(url::Host::Ipv4(ip)) => Ok(ip.to_string()),
        Some(url::Host::Ipv6(ip)) => Ok(ip.to_string()),
        Some(url::Host::Domain(d)) => Ok(d.to_string()),
        None => Err(bad("no host")),
    }
}

/// The webhook endpoint the configuration points at.
pub fn endpoint(namespace: &str, url: Option<&str>) -> Endpoint {
    match url {
        Some(u) => Endpoint::Url(format!(
            "{}{}",
            u.trim_end_matches('/'),
            manifest::MUTATE_PATH
        )),
        None => Endpoint::Service(namespace.to_string()),
    }
}

/// Which CA (current first) `cert_pem` verifies against for every one of `names` at `now`.
pub fn signer_of(
    cert_pem: &str,
    current_ca: &str,
    previous_ca: Option<&str>,
    names: &[String],
    now: OffsetDateTime,
) -> Option<Signer> {
    let leaf = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let when = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(now.unix_timestamp()).ok()?,
    ));
    let verifies = |ca_pem: &str| -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let Ok(c) = c else { return false };
            if roots.add(c).is_err() {
                return false;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let Ok(verifier) =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
        else {
            return false;
        };
        names.iter().all(|n| {
            ServerName::try_from(n.as_str()).is_ok_and(|name| {
                verifier
                    .verify_server_cert(&leaf, &[], &name, &[], when)
                    .is_ok()
            })
        })
    };
    if verifies(current_ca) {
        Some(Signer::Current)
    } else if previous_ca.is_some_and(verifies) {
        Some(Signer::Previous)
    } else {
        None
    }
}

// ---------------------------------------------------------------------------------------
// Desired objects (pure).

fn labels() -> serde_json::Value {
    json!({"app": DEPLOYMENT, "app.kubernetes.io/managed-by": "sandboxd"})
}

fn stamped<K: Resource + Serialize + DeserializeOwned>(value: serde_json::Value) -> K {
    let mut obj: K = serde_json::from_value(value).expect("a valid webhook object");
    apply::stamp_hash(&mut obj);
    obj
}

/// The webhook Deployment: two replicas of `image` running `sandboxd webhook`.
pub fn deployment(namespace: &str, image: &str, owner: &OwnerReference) -> Deployment {
    stamped(json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": DEPLOYMENT, "namespace": namespace, "labels": labels(), "ownerReferences": [owner]},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": DEPLOYMENT}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels()},
                "spec": {
                    "serviceAccountName": SERVICE_ACCOUNT,
                    "automountServiceAccountToken": false,
                    // No fixed UID: see the image Job.
                    "securityContext": {
                        "runAsNonRoot": true,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": {"app": DEPLOYMENT}},
                            "topologyKey": "kubernetes.io/hostname",
                        },
                    }]}},
                    "containers": [{
                        "name": "webhook",
                        "image": image,
                        "args": ["webhook", "--cert-dir", CERT_DIR, "--port", PORT.to_string(),
                                 "--operator-namespace", namespace],
                        "ports": [{"name": "https", "containerPort": PORT}],
                        "readinessProbe": {"httpGet": {"path": "/readyz", "port": "https", "scheme": "HTTPS"}, "periodSeconds": 5},
                        "livenessProbe": {"httpGet": {"path": "/livez", "port": "https", "scheme": "HTTPS"}, "periodSeconds": 10},
                        "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                        "securityContext": {
                            "allowPrivilegeEscalation": false,
                            "readOnlyRootFilesystem": true,
                            "capabilities": {"drop": ["ALL"]},
                        },
                        "volumeMounts": [{"name": "certs", "mountPath": CERT_DIR, "readOnly": true}],
                    }],
                    "volumes": [{"name": "certs", "secret": {
                        "secretName": SERVING_SECRET,
                        "items": [{"key": TLS_CRT, "path": TLS_CRT}, {"key": TLS_KEY, "path": TLS_KEY}],
                    }}],
                },
            },
        },
    }))
}

/// The PodDisruptionBudget: at least one webhook pod stays through voluntary disruptions.
pub fn pdb(namespace: &str, owner: &OwnerReference) -> PodDisruptionBudget {
    stamped(json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": PDB, "namespace": namespace, "labels": labels(), "ownerReferences": [owner]},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": DEPLOYMENT}}},
    }))
}

/// The Service: 443 → the webhook's 9443. With the service CA, it asks for the Secret.
pub fn service(namespace: &str, tls: TlsSource, owner: &OwnerReference) -> Service {
    let mut meta = json!({"name": SERVICE, "namespace": namespace, "labels": labels(), "ownerReferences": [owner]});
    if tls == TlsSource::ServiceCa {
        meta["annotations"] = json!({SERVICE_CA_SECRET_ANNOTATION: SERVING_SECRET});
    }
    stamped(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": {"app": DEPLOYMENT},
            "ports": [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}],
        },
    }))
}

/// The webhook pods' ServiceAccount: no token mounted, no permissions.
pub fn service_account(namespace: &str, owner: &OwnerReference) -> ServiceAccount {
    stamped(json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": SERVICE_ACCOUNT, "namespace": namespace, "labels": labels(), "ownerReferences": [owner]},
        "automountServiceAccountToken": false,
    }))
}

/// The MutatingWebhookConfiguration of [`manifest`], pointed at the Service (or the
/// development URL) with `ca_bundle`.
pub fn webhook_configuration(
    namespace: &str,
    settings: &Settings,
    ca_bundle: Option<String>,
    owner: &OwnerReference,
) -> MutatingWebhookConfiguration {
    let options = manifest::Options {
        endpoint: endpoint(namespace, settings.url.as_deref()),
        ca_bundle,
        operator_namespace: namespace.to_string(),
        ..Default::default()
    };
    let mut mwc = manifest::webhook_configuration(&options);
    let annotations = mwc.metadata.annotations.get_or_insert_default();
    if settings.tls == TlsSource::Operator {
        // The operator's caBundle; OpenShift's injector must not replace it.
        annotations.remove(SERVICE_CA_INJECT_ANNOTATION);
    }
    if annotations.is_empty() {
        mwc.metadata.annotations = None;
    }
    mwc.metadata.labels = Some(BTreeMap::from([(
        "app.kubernetes.io/managed-by".to_string(),
        "sandboxd".to_string(),
    )]));
    mwc.metadata.owner_references = Some(vec![owner.clone()]);
    apply::stamp_hash(&mut mwc);
    mwc
}

/// The ValidatingWebhookConfiguration of the one-KataConfig rule for `active`, pointed at
/// the webhook like [`webhook_configuration`].
pub fn singleton_configuration(
    namespace: &str,
    settings: &Settings,
    active: &str,
    ca_bundle: Option<String>,
    owner: &OwnerReference,
) -> ValidatingWebhookConfiguration {
    let mut vwc = crate::webhook::singleton::configuration(
        active,
        &endpoint(namespace, settings.url.as_deref()),
        ca_bundle,
    );
    if settings.tls == TlsSource::ServiceCa {
        vwc.metadata.annotations = Some(BTreeMap::from([(
            SERVICE_CA_INJECT_ANNOTATION.to_string(),
            "true".to_string(),
        )]));
    }
    vwc.metadata.owner_references = Some(vec![owner.clone()]);
    apply::stamp_hash(&mut vwc);
    vwc
}

// ---------------------------------------------------------------------------------------
// Apply.

async fn get<K>(api: &Api<K>, kind: &'static str, name: &str) -> Result<Option<K>, Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    api.get_opt(name).await.map_err(|source| Error::Read {
        kind,
        name: name.to_string(),
        source,
    })
}

/// Applies a hash-stamped object unless what is there carries the same hash.
async fn ensure_stamped<K>(api: &Api<K>, kind: &'static str, desired: &K) -> Result<bool, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let name = desired.name_any();
    if apply::hash_matches(get(api, kind, &name).await?.as_ref(), desired) {
        return Ok(false);
    }
    apply::apply(api, desired).await?;
    tracing::info!(kind, name, "peer pods webhook object applied");
    Ok(true)
}

fn secret_text(s: &Secret) -> BTreeMap<String, String> {
    s.data
        .as_ref()
        .map(|d| {
            d.iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

fn secret(
    namespace: &str,
    name: &str,
    type_: &str,
    data: &BTreeMap<String, String>,
    annotations: BTreeMap<String, String>,
    owner: &OwnerReference,
) -> Secret {
    let mut s: Secret = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name, "namespace": namespace, "labels": labels(),
            "annotations": annotations, "ownerReferences": [owner],
        },
        "type": type_,
    }))
    .expect("a valid Secret");
    s.data = Some(
        data.iter()
            .map(|(k, v)| (k.clone(), k8s_openapi::ByteString(v.as_bytes().to_vec())))
            .collect(),
    );
    s
}

/// The CA as observed: usable current CA, its validity and PEM, the previous CA.
struct CaState {
    ca: Ca,
    cert_pem: String,
    validity: Validity,
    previous: Option<(String, Validity)>,
    since: Option<OffsetDateTime>,
}

fn read_ca(s: Option<&Secret>) -> (Option<CaState>, Option<(String, Validity)>) {
    let Some(s) = s else { return (None, None) };
    let data = secret_text(s);
    let since = s.annotations().get(CA_SINCE_ANNOTATION).and_then(|t| {
        OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
    });
    let previous = data
        .get(PREVIOUS_CA_KEY)
        .and_then(|p| validity_of(p).map(|v| (p.clone(), v)));
    let current_cert = data
        .get(CA_CERT_KEY)
        .and_then(|p| validity_of(p).map(|v| (p.clone(), v)));
    let usable = match (&current_cert, data.get(CA_KEY_KEY)) {
        (Some((pem, v)), Some(key)) => Ca::from_pem(pem, key).ok().map(|ca| CaState {
            ca,
            cert_pem: pem.clone(),
            validity: *v,
            previous: previous.clone(),
            since,
        }),
        _ => None,
    };
    // An unusable CA whose certificate is still valid may have signed the certificate being
    // served: it stays in the bundle as the previous CA.
    (usable, current_cert)
}

/// Rolls out (or keeps) everything the webhook needs. Returns when the next certificate
/// decision is due.
pub async fn ensure(
    client: &kube::Client,
    namespace: &str,
    image: &str,
    settings: &Settings,
    owner: &OwnerReference,
    targets: &Targets,
) -> Result<std::time::Duration, Error> {
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), namespace);
    ensure_stamped(&sas, "ServiceAccount", &service_account(namespace, owner)).await?;
    let configs = Configurations {
        client,
        namespace,
        settings,
        owner,
        targets,
    };
    let next = match settings.tls {
        TlsSource::ServiceCa => {
            configs.ensure(None).await?;
            std::time::Duration::from_secs(300)
        }
        TlsSource::Operator => ensure_tls(client, namespace, settings, owner, &configs).await?,
    };
    let svcs: Api<Service> = Api::namespaced(client.clone(), namespace);
    ensure_stamped(&svcs, "Service", &service(namespace, settings.tls, owner)).await?;
    let deps: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    ensure_stamped(&deps, "Deployment", &deployment(namespace, image, owner)).await?;
    let pdbs: Api<PodDisruptionBudget> = Api::namespaced(client.clone(), namespace);
    ensure_stamped(&pdbs, "PodDisruptionBudget", &pdb(namespace, owner)).await?;
    Ok(next)
}

/// The admission configurations the webhook serves, applied or removed by [`Targets`].
struct Configurations<'a> {
    client: &'a kube::Client,
    namespace: &'a str,
    settings: &'a Settings,
    owner: &'a OwnerReference,
    targets: &'a Targets,
}

impl Configurations<'_> {
    async fn ensure(&self, bundle: Option<String>) -> Result<(), Error> {
        let mwcs: Api<MutatingWebhookConfiguration> = Api::all(self.client.clone());
        if self.targets.mutate {
            let mwc =
                webhook_configuration(self.namespace, self.settings, bundle.clone(), self.owner);
            ensure_stamped(&mwcs, "MutatingWebhookConfiguration", &mwc).await?;
        } else if get(
            &mwcs,
            "MutatingWebhookConfiguration",
            manifest::CONFIGURATION_NAME,
        )
        .await?
        .is_some()
        {
            apply::delete_if_exists(&mwcs, manifest::CONFIGURATION_NAME).await?;
        }
        let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(self.client.clone());
        match &self.targets.singleton_for {
            Some(active) => {
                let vwc = singleton_configuration(
                    self.namespace,
                    self.settings,
                    active,
                    bundle,
                    self.owner,
                );
                ensure_stamped(&vwcs, "ValidatingWebhookConfiguration", &vwc).await?;
            }
            None => {
                if get(
                    &vwcs,
                    "ValidatingWebhookConfiguration",
                    crate::webhook::singleton::CONFIGURATION_NAME,
                )
                .await?
                .is_some()
                {
                    apply::delete_if_exists(&vwcs, crate::webhook::singleton::CONFIGURATION_NAME)
                        .await?;
                }
            }
        }
        Ok(())
    }
}

async fn ensure_tls(
    client: &kube::Client,
    namespace: &str,
    settings: &Settings,
    owner: &OwnerReference,
    configs: &Configurations<'_>,
) -> Result<std::time::Duration, Error> {
    let now = OffsetDateTime::now_utc();
    let names = serving_names(namespace, settings.url.as_deref())?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);

    // 1. The CA (persisted before anything it signs is handed out).
    let observed_ca = get(&secrets, "Secret", CA_SECRET).await?;
    let (usable, current_cert) = read_ca(observed_ca.as_ref());
    let step = ca_step(
        usable.as_ref().map(|c| &c.validity),
        usable
            .as_ref()
            .and_then(|c| c.previous.as_ref().map(|p| &p.1)),
        settings.ca_validity,
        now,
    );
    let state = match (step, usable) {
        (CaStep::Keep, Some(state)) => state,
        (CaStep::DropPrevious, Some(state)) => {
            let state = CaState {
                previous: None,
                ..state
            };
            write_ca(&secrets, namespace, &state, owner).await?;
            tracing::info!("the previous webhook CA expired and left the caBundle");
            state
        }
        (_, _) => {
            let ca = Ca::new(CA_COMMON_NAME, to_time(settings.ca_validity))?;
            let cert_pem = ca.cert_pem();
            let validity = validity_of(&cert_pem).expect("a CA we just made parses");
            let previous = current_cert.filter(|(_, v)| now < v.not_after);
            let state = CaState {
                ca,
                cert_pem,
                validity,
                previous,
                since: Some(now),
            };
            write_ca(&secrets, namespace, &state, owner).await?;
            tracing::info!(
                overlap = state.previous.is_some(),
                "new webhook CA in the caBundle"
            );
            state
        }
    };
    let previous = state.previous.as_ref().map(|(p, v)| (p.as_str(), v));
    let bundle = ca_bundle(&state.cert_pem, previous, now);

    // 2. The caBundle, before any certificate of a new CA is served.
    configs.ensure(Some(bundle.clone())).await?;

    // 3. The serving certificate.
    let observed = get(&secrets, "Secret", SERVING_SECRET).await?;
    let observed_data = observed.as_ref().map(secret_text).unwrap_or_default();
    let serving = observed_data.get(TLS_CRT).and_then(|crt| {
        let v = validity_of(crt)?;
        let signer = signer_of(crt, &state.cert_pem, previous.map(|p| p.0), &names, now)?;
        observed_data.get(TLS_KEY)?;
        Some((v, signer))
    });
    let due = serving_due(
        serving.as_ref().map(|(v, s)| (v, *s)),
        state.since,
        settings,
        now,
    );
    let (cert, key, validity, signer) = if due {
        let left =
            std::time::Duration::try_from(state.validity.not_after - now).unwrap_or_default();
        let sans: Vec<&str> = names.iter().map(String::as_str).collect();
        let pair = state.ca.issue(
            &format!("{SERVICE}.{namespace}.svc"),
            &[],
            &sans,
            Usage::Server,
            to_time(settings.cert_validity.min(left)),
        )?;
        let v = validity_of(&pair.cert_pem).expect("a certificate we just issued parses");
        tracing::info!(not_after = %v.not_after, "issued a new webhook serving certificate");
        (pair.cert_pem, pair.key_pem, v, Signer::Current)
    } else {
        let (v, s) = serving.expect("not due means present");
        (
            observed_data[TLS_CRT].clone(),
            observed_data[TLS_KEY].clone(),
            v,
            s,
        )
    };
    let data = BTreeMap::from([
        (TLS_CRT.to_string(), cert),
        (TLS_KEY.to_string(), key),
        (CA_CERT_KEY.to_string(), bundle),
    ]);
    let owned = observed
        .as_ref()
        .is_some_and(|s| s.owner_references().iter().any(|o| o.uid == owner.uid));
    if data != observed_data || !owned {
        let s = secret(
            namespace,
            SERVING_SECRET,
            "kubernetes.io/tls",
            &data,
            BTreeMap::new(),
            owner,
        );
        apply::apply(&secrets, &s).await?;
    }
    Ok(next_check(
        &state.validity,
        state.previous.as_ref().map(|p| &p.1),
        &validity,
        signer,
        state.since,
        settings,
        now,
    ))
}

async fn write_ca(
    secrets: &Api<Secret>,
    namespace: &str,
    state: &CaState,
    owner: &OwnerReference,
) -> Result<(), Error> {
    let key = state.ca.cert_key();
    let mut data = BTreeMap::from([
        (CA_CERT_KEY.to_string(), state.cert_pem.clone()),
        (CA_KEY_KEY.to_string(), key.key_pem),
    ]);
    if let Some((p, _)) = &state.previous {
        data.insert(PREVIOUS_CA_KEY.to_string(), p.clone());
    }
    let mut annotations = BTreeMap::new();
    if let Some(since) = state.since
        && let Ok(t) = since.format(&time::format_description::well_known::Rfc3339)
    {
        annotations.insert(CA_SINCE_ANNOTATION.to_string(), t);
    }
    let s = secret(namespace, CA_SECRET, "Opaque", &data, annotations, owner);
    // Server-side apply replaces `data` as a whole: `previous-ca.crt` goes when it is left
    // out (this manager owns every key).
    apply::apply(secrets, &s).await?;
    Ok(())
}

/// Removes every webhook object, the configuration first (so no pod create is sent to a
/// webhook that is going away) and the ServiceAccount last: [`ensure`] applies it first, so
/// while it exists something may be left, and without it there is nothing to do (one read).
pub async fn remove(client: &kube::Client, namespace: &str) -> Result<(), Error> {
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    if get(&sas, "ServiceAccount", SERVICE_ACCOUNT)
        .await?
        .is_none()
    {
        return Ok(());
    }
    apply::delete_if_exists(
        &Api::<MutatingWebhookConfiguration>::all(client.clone()),
        manifest::CONFIGURATION_NAME,
    )
    .await?;
    apply::delete_if_exists(
        &Api::<ValidatingWebhookConfiguration>::all(client.clone()),
        crate::webhook::singleton::CONFIGURATION_NAME,
    )
    .await?;
    apply::delete_if_exists(
        &Api::<Deployment>::namespaced(client.clone(), namespace),
        DEPLOYMENT,
    )
    .await?;
    apply::delete_if_exists(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace),
        PDB,
    )
    .await?;
    apply::delete_if_exists(
        &Api::<Service>::namespaced(client.clone(), namespace),
        SERVICE,
    )
    .await?;
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    apply::delete_if_exists(&secrets, SERVING_SECRET).await?;
    apply::delete_if_exists(&secrets, CA_SECRET).await?;
    apply::delete_if_exists(&sas, SERVICE_ACCOUNT).await?;
    tracing::info!("peer pods webhook removed");
    Ok(())
}

/// How often a rollout that is in place is re-read to repair drift.
const RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

#[derive(Debug)]
enum Last {
    Unknown,
    Removed,
    Ensured {
        owner_uid: String,
        targets: Targets,
        at: std::time::Instant,
        due: std::time::Instant,
    },
}

/// The webhook rollout of one controller: its [`Settings`] and what it last did, so that the
/// controller's frequent passes (every node event) cost no request in between: a rollout in
/// place is re-read every few seconds or when a certificate decision is due, a removal is
/// done once.
#[derive(Debug)]
pub struct Rollout {
    settings: Settings,
    last: std::sync::Mutex<Last>,
}

impl Rollout {
    /// A rollout with `settings` that has done nothing yet.
    pub fn new(settings: Settings) -> Self {
        Self {
            settings,
            last: std::sync::Mutex::new(Last::Unknown),
        }
    }

    /// The settings this rollout applies.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    fn set(&self, last: Last) {
        *self.last.lock().expect("rollout state") = last;
    }

    /// [`ensure`], unless it completed for this owner less than a few seconds ago and no
    /// decision is due. Returns when the next pass is wanted.
    pub async fn ensure(
        &self,
        client: &kube::Client,
        namespace: &str,
        image: &str,
        owner: &OwnerReference,
        targets: &Targets,
    ) -> Result<std::time::Duration, Error> {
        let now = std::time::Instant::now();
        if let Last::Ensured {
            owner_uid,
            targets: last,
            at,
            due,
        } = &*self.last.lock().expect("rollout state")
            && *owner_uid == owner.uid
            && last == targets
        {
            let until = (*at + RECHECK).min(*due);
            if now < until {
                return Ok(until - now);
            }
        }
        self.set(Last::Unknown);
        let next = ensure(client, namespace, image, &self.settings, owner, targets).await?;
        self.set(Last::Ensured {
            owner_uid: owner.uid.clone(),
            targets: targets.clone(),
            at: now,
            due: now + next,
        });
        Ok(next.min(RECHECK))
    }

    /// [`remove`], once.
    pub async fn remove(&self, client: &kube::Client, namespace: &str) -> Result<(), Error> {
        if matches!(*self.last.lock().expect("rollout state"), Last::Removed) {
            return Ok(());
        }
        self.set(Last::Unknown);
        remove(client, namespace).await?;
        self.set(Last::Removed);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: std::time::Duration = std::time::Duration::from_secs(1);

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + secs).unwrap()
    }

    /// Issued at `issued` for `secs`, back-dated five minutes as [`pki`] does.
    fn window(issued: i64, secs: i64) -> Validity {
        Validity {
            not_before: at(issued - 300),
            not_after: at(issued + secs),
        }
    }

    fn settings(cert: u64, ca: u64) -> Settings {
        Settings {
            cert_validity: SEC * cert as u32,
            ca_validity: SEC * ca as u32,
            ..Default::default()
        }
    }

    #[test]
    fn a_certificate_renews_at_two_thirds_of_its_configured_life_despite_back_dating() {
        let v = window(0, 30);
        assert_eq!(renew_at(&v, SEC * 30), at(20));
        // A certificate shorter than configured (made elsewhere) renews at 2/3 of its own.
        let short = Validity {
            not_before: at(0),
            not_after: at(9),
        };
        assert_eq!(renew_at(&short, SEC * 3600), at(6));
    }

    #[test]
    fn the_ca_is_made_when_missing_renewed_when_due_and_the_old_one_dropped_when_expired() {
        let ca = window(0, 90);
        assert_eq!(ca_step(None, None, SEC * 90, at(0)), CaStep::New);
        assert_eq!(ca_step(Some(&ca), None, SEC * 90, at(59)), CaStep::Keep);
        assert_eq!(ca_step(Some(&ca), None, SEC * 90, at(60)), CaStep::New);
        let new = window(60, 90);
        assert_eq!(
            ca_step(Some(&new), Some(&ca), SEC * 90, at(89)),
            CaStep::Keep
        );
        assert_eq!(
            ca_step(Some(&new), Some(&ca), SEC * 90, at(90)),
            CaStep::DropPrevious
        );
    }

    #[test]
    fn the_bundle_holds_the_new_ca_first_and_the_old_one_only_while_it_is_valid() {
        let old = window(0, 90);
        let b = ca_bundle("NEW\n", Some(("OLD", &old)), at(70));
        assert_eq!(b, "NEW\nOLD\n");
        assert_eq!(ca_bundle("NEW", Some(("OLD", &old)), at(90)), "NEW\n");
        assert_eq!(ca_bundle("NEW", None, at(0)), "NEW\n");
    }

    #[test]
    fn the_serving_certificate_moves_to_a_new_ca_only_after_the_bundle_had_time_to_spread() {
        let s = settings(30, 120); // grace = 10 s
        assert_eq!(propagation_grace(s.ca_validity), SEC * 10);
        let cert = window(0, 30);
        assert!(serving_due(None, None, &s, at(0)), "missing → issue");
        assert!(!serving_due(
            Some((&cert, Signer::Current)),
            Some(at(-100)),
            &s,
            at(19)
        ));
        assert!(serving_due(
            Some((&cert, Signer::Current)),
            None,
            &s,
            at(20)
        ));
        // A CA rotation at t=5: the certificate signed by the old CA stays until t=15.
        assert!(!serving_due(
            Some((&cert, Signer::Previous)),
            Some(at(5)),
            &s,
            at(14)
        ));
        assert!(serving_due(
            Some((&cert, Signer::Previous)),
            Some(at(5)),
            &s,
            at(15)
        ));
        // Expired: always re-issued.
        assert!(serving_due(
            Some((&cert, Signer::Previous)),
            Some(at(25)),
            &s,
            at(30)
        ));
        // Grace bounds.
        assert_eq!(propagation_grace(SEC * 3), SEC);
        assert_eq!(propagation_grace(SEC * 3600 * 24 * 365), SEC * 60);
    }

    #[test]
    fn the_next_check_is_the_earliest_decision_ahead() {
        let s = settings(30, 120);
        let ca = window(0, 120); // renew at 80
        let cert = window(0, 30); // renew at 20
        let d = next_check(&ca, None, &cert, Signer::Current, None, &s, at(1));
        assert_eq!(d, SEC * 19 + std::time::Duration::from_millis(200));
        let old = window(-100, 120); // expires at 20, then…
        let d = next_check(
            &ca,
            Some(&old),
            &cert,
            Signer::Previous,
            Some(at(0)),
            &s,
            at(1),
        );
        // …the grace ends at 10.
        assert_eq!(d, SEC * 9 + std::time::Duration::from_millis(200));
    }

    #[test]
    fn a_real_rotation_keeps_the_served_certificate_trusted_at_every_step() {
        let names = serving_names("ns", Some("https://127.0.0.1:9443")).unwrap();
        assert_eq!(
            names,
            [
                "peer-pods-webhook-svc",
                "peer-pods-webhook-svc.ns",
                "peer-pods-webhook-svc.ns.svc",
                "peer-pods-webhook-svc.ns.svc.cluster.local",
                "127.0.0.1"
            ]
        );
        let sans: Vec<&str> = names.iter().map(String::as_str).collect();
        let now = OffsetDateTime::now_utc();
        let old = Ca::new("old", time::Duration::hours(1)).unwrap();
        let new = Ca::new("new", time::Duration::hours(1)).unwrap();
        let leaf = old
            .issue("x", &[], &sans, Usage::Server, time::Duration::minutes(10))
            .unwrap();
        let (o, n) = (old.cert_pem(), new.cert_pem());
        assert_eq!(
            signer_of(&leaf.cert_pem, &o, None, &names, now),
            Some(Signer::Current)
        );
        // After the CA rotation the old leaf is still trusted through the previous CA.
        assert_eq!(
            signer_of(&leaf.cert_pem, &n, Some(&o), &names, now),
            Some(Signer::Previous)
        );
        assert_eq!(signer_of(&leaf.cert_pem, &n, None, &names, now), None);
        // A certificate missing a name is not accepted.
        let partial = old
            .issue(
                "x",
                &[],
                &sans[..2],
                Usage::Server,
                time::Duration::minutes(10),
            )
            .unwrap();
        assert_eq!(signer_of(&partial.cert_pem, &o, None, &names, now), None);
        // Expired by `now`.
        assert_eq!(
            signer_of(
                &leaf.cert_pem,
                &o,
                None,
                &names,
                now + time::Duration::hours(2)
            ),
            None
        );
        let v = validity_of(&leaf.cert_pem).unwrap();
        assert!(v.not_after > now + time::Duration::minutes(9));
    }

    #[test]
    fn only_an_https_host_and_port_is_accepted_as_development_url() {
        assert!(check_url("https://10.0.0.5:9443").is_ok());
        assert!(check_url("http://10.0.0.5:9443").is_err());
        assert!(check_url("https://10.0.0.5:9443/mutate-v1-pod").is_err());
        assert!(check_url("10.0.0.5:9443").is_err());
        match endpoint("ns", Some("https://10.0.0.5:9443/")) {
            Endpoint::Url(u) => assert_eq!(u, "https://10.0.0.5:9443/mutate-v1-pod"),
            e => panic!("{e:?}"),
        }
    }

    #[test]
    fn the_rollout_objects_follow_the_design_and_run_without_privileges() {
        let owner = OwnerReference {
            name: "kc".into(),
            uid: "u".into(),
            ..Default::default()
        };
        let d = deployment("ns", "img:1", &owner);
        let spec = d.spec.as_ref().unwrap();
        assert_eq!(spec.replicas, Some(2));
        let pod = spec.template.spec.as_ref().unwrap();
        assert_eq!(pod.service_account_name.as_deref(), Some(SERVICE_ACCOUNT));
        assert_eq!(
            pod.security_context.as_ref().unwrap().run_as_non_root,
            Some(true)
        );
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some("img:1"));
        assert_eq!(
            c.args.as_ref().unwrap()[..3],
            ["webhook", "--cert-dir", CERT_DIR]
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        let p = pdb("ns", &owner);
        assert_eq!(
            p.spec.unwrap().min_available,
            Some(k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(1))
        );
        let svc = service("ns", TlsSource::Operator, &owner);
        let port = &svc.spec.as_ref().unwrap().ports.as_ref().unwrap()[0];
        assert_eq!(port.port, 443);
        assert!(
            svc.annotations()
                .get(SERVICE_CA_SECRET_ANNOTATION)
                .is_none()
        );
        let svc = service("ns", TlsSource::ServiceCa, &owner);
        assert_eq!(
            svc.annotations()[SERVICE_CA_SECRET_ANNOTATION],
            SERVING_SECRET
        );

        // The operator's bundle is not to be replaced by OpenShift's injector; with the
        // service CA it is.
        let s = Settings::default();
        let m = webhook_configuration("ns", &s, Some("CA".into()), &owner);
        assert!(m.annotations().get(SERVICE_CA_INJECT_ANNOTATION).is_none());
        let w = &m.webhooks.as_ref().unwrap()[0];
        assert_eq!(w.client_config.service.as_ref().unwrap().namespace, "ns");
        assert_eq!(w.client_config.ca_bundle.as_ref().unwrap().0, b"CA");
        let s = Settings {
            tls: TlsSource::ServiceCa,
            ..Default::default()
        };
        let m = webhook_configuration("ns", &s, None, &owner);
        assert_eq!(m.annotations()[SERVICE_CA_INJECT_ANNOTATION], "true");
        // A new bundle changes the hash (so it is applied); the same one does not.
        let a = webhook_configuration("ns", &Settings::default(), Some("A".into()), &owner);
        let b = webhook_configuration("ns", &Settings::default(), Some("B".into()), &owner);
        let a2 = webhook_configuration("ns", &Settings::default(), Some("A".into()), &owner);
        assert!(!apply::hash_matches(Some(&a), &b));
        assert!(apply::hash_matches(Some(&a), &a2));
    }
}
