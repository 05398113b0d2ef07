//! The peer pods webhook rollout: Deployment `peer-pods-webhook`, its PodDisruptionBudget,
//! ServiceAccount and Service `peer-pods-webhook-svc`, the MutatingWebhookConfiguration of
//! [`crate::webhook::manifest`] (and, on clusters without ValidatingAdmissionPolicy, the
//! one-KataConfig ValidatingWebhookConfiguration), and the serving TLS without cert-manager.
//!
//! [`objects`] are the desired objects, pure; [`ca`] keeps the CA and the serving
//! certificate and rotates them; [`ensure`] and [`remove`] apply them with server-side
//! apply, writing nothing when nothing changed, and [`Rollout`] spares the controller's
//! frequent passes the reads in between.

pub mod ca;
pub mod objects;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::Api;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;

use self::objects::{
    deployment, pdb, service, service_account, singleton_configuration, webhook_configuration,
};
use crate::api::names::{KATACONFIG_SINGLETON, WEBHOOK, WEBHOOK_SERVICE};
use crate::k8s::apply;
use crate::pki;
use crate::webhook::manifest::{self, Endpoint};

/// The `kubernetes.io/tls` Secret mounted by the webhook pods: `tls.crt`, `tls.key` and
/// `ca.crt` (the caBundle).
pub const SERVING_SECRET: &str = "peer-pods-webhook-cert";
/// The serving certificate's key in [`SERVING_SECRET`].
pub(crate) const TLS_CRT: &str = "tls.crt";
/// The serving key's key in [`SERVING_SECRET`].
pub(crate) const TLS_KEY: &str = "tls.key";
/// The CA Secret (operator only): `ca.crt`, `ca.key` and, during a CA rotation,
/// `previous-ca.crt`.
pub const CA_SECRET: &str = "peer-pods-webhook-ca";
/// Annotation on [`CA_SECRET`]: when the current CA joined the caBundle (RFC 3339).
pub(crate) const CA_SINCE_ANNOTATION: &str = "peerpods.sandboxd.io/ca-in-bundle-since";
/// The HTTPS port of the webhook container.
pub(crate) const PORT: i32 = 9443;
/// Where the serving Secret is mounted in the webhook pods.
pub(crate) const CERT_DIR: &str = "/etc/webhook/certs";
/// OpenShift service-CA: Service annotation naming the Secret to create.
pub(crate) const SERVICE_CA_SECRET_ANNOTATION: &str =
    "service.beta.openshift.io/serving-cert-secret-name";

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
pub(crate) struct Targets {
    /// Peer pods are on: the MutatingWebhookConfiguration sends `kata-remote` pods.
    pub(crate) mutate: bool,
    /// The one-KataConfig rule on a cluster without ValidatingAdmissionPolicy: the
    /// ValidatingWebhookConfiguration refusing every KataConfig but this one.
    pub(crate) singleton_for: Option<String>,
}

impl Targets {}

/// Errors of the webhook rollout.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
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
    pub(crate) url: String,
    /// What is wrong.
    pub(crate) reason: &'static str,
}

impl Error {
    /// A short, stable label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Apply(e) => e.metric_label(),
            Error::Read { .. } => "read",
            Error::Pki(e) => e.metric_label(),
            Error::Url(_) => "webhook_url",
        }
    }
}

/// The names the serving certificate is valid for: the Service's DNS names and, with a
/// development URL, its host.
pub fn serving_names(namespace: &str, url: Option<&str>) -> Result<Vec<String>, UrlError> {
    let mut names = vec![
        WEBHOOK_SERVICE.to_string(),
        format!("{WEBHOOK_SERVICE}.{namespace}"),
        format!("{WEBHOOK_SERVICE}.{namespace}.svc"),
        format!("{WEBHOOK_SERVICE}.{namespace}.svc.cluster.local"),
    ];
    if let Some(u) = url {
        names.push(url_host(u)?);
    }
    Ok(names)
}

/// Checks a `--webhook-url` value (`https://HOST:PORT`, no path).
pub(crate) fn check_url(u: &str) -> Result<String, String> {
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
pub(crate) fn endpoint(namespace: &str, url: Option<&str>) -> Endpoint {
    match url {
        Some(u) => Endpoint::Url(format!(
            "{}{}",
            u.trim_end_matches('/'),
            manifest::MUTATE_PATH
        )),
        None => Endpoint::Service(namespace.to_string()),
    }
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

/// Rolls out (or keeps) everything the webhook needs. Returns when the next certificate
/// decision is due.
pub(crate) async fn ensure(
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
        TlsSource::Operator => ca::ensure_tls(client, namespace, settings, owner, &configs).await?,
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
        } else if get(&mwcs, "MutatingWebhookConfiguration", WEBHOOK)
            .await?
            .is_some()
        {
            apply::delete_if_exists(&mwcs, WEBHOOK).await?;
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
                    KATACONFIG_SINGLETON,
                )
                .await?
                .is_some()
                {
                    apply::delete_if_exists(&vwcs, KATACONFIG_SINGLETON).await?;
                }
            }
        }
        Ok(())
    }
}

/// Removes every webhook object, the configuration first (so no pod create is sent to a
/// webhook that is going away) and the ServiceAccount last: [`ensure`] applies it first, so
/// while it exists something may be left, and without it there is nothing to do (one read).
pub(crate) async fn remove(client: &kube::Client, namespace: &str) -> Result<(), Error> {
    let sas = Api::<ServiceAccount>::namespaced(client.clone(), namespace);
    if get(&sas, "ServiceAccount", WEBHOOK).await?.is_none() {
        return Ok(());
    }
    apply::delete_if_exists(
        &Api::<MutatingWebhookConfiguration>::all(client.clone()),
        WEBHOOK,
    )
    .await?;
    apply::delete_if_exists(
        &Api::<ValidatingWebhookConfiguration>::all(client.clone()),
        KATACONFIG_SINGLETON,
    )
    .await?;
    apply::delete_if_exists(
        &Api::<Deployment>::namespaced(client.clone(), namespace),
        WEBHOOK,
    )
    .await?;
    apply::delete_if_exists(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), namespace),
        WEBHOOK,
    )
    .await?;
    apply::delete_if_exists(
        &Api::<Service>::namespaced(client.clone(), namespace),
        WEBHOOK_SERVICE,
    )
    .await?;
    let secrets = Api::<Secret>::namespaced(client.clone(), namespace);
    apply::delete_if_exists(&secrets, SERVING_SECRET).await?;
    apply::delete_if_exists(&secrets, CA_SECRET).await?;
    apply::delete_if_exists(&sas, WEBHOOK).await?;
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
pub(crate) struct Rollout {
    settings: Settings,
    last: std::sync::Mutex<Last>,
}

impl Rollout {
    /// A rollout with `settings` that has done nothing yet.
    pub(crate) fn new(settings: Settings) -> Self {
        Self {
            settings,
            last: std::sync::Mutex::new(Last::Unknown),
        }
    }

    /// The settings this rollout applies.
    pub(crate) fn settings(&self) -> &Settings {
        &self.settings
    }

    fn set(&self, last: Last) {
        *self.last.lock().expect("rollout state") = last;
    }

    /// [`ensure`], unless it completed for this owner less than a few seconds ago and no
    /// decision is due. Returns when the next pass is wanted.
    pub(crate) async fn ensure(
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
    pub(crate) async fn remove(&self, client: &kube::Client, namespace: &str) -> Result<(), Error> {
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
}
