//! OpenShift's default path to the cloud secret: when no `peer-pods-secret` exists and the
//! cluster serves `cloudcredential.openshift.io/v1`, the operator asks the
//! cloud-credential-operator for Azure credentials with a CredentialsRequest (the exact ARM
//! actions sandboxd performs, image build included:
//! [`crate::cloud::azure::permissions::PERMISSIONS`]) and derives `peer-pods-secret` from
//! the Secret it writes. A Secret the user made is never touched; a derived one follows the
//! credentials when the cloud-credential-operator rotates them, and is owned by that Secret
//! (it goes when the credentials go). Secret values are never logged.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::{ApiResource, GroupVersionKind};
use serde_json::json;

use super::Ctx;
use super::plan::ConfigInputs;
use crate::api::kataconfig::KataConfig;
use crate::api::names::{LABEL_MANAGED_BY, MANAGED_BY};
use crate::api::peerpodconfig::PeerPodConfigSpec;
use crate::k8s::{FIELD_MANAGER, apply};

/// The API group and version of CredentialsRequest.
pub(crate) const API_VERSION: &str = "cloudcredential.openshift.io/v1";
/// Name of the CredentialsRequest the operator creates.
pub const CREDENTIALS_REQUEST: &str = "openshift-sandboxed-containers-azure";
/// Namespace the cloud-credential-operator reads CredentialsRequests from.
pub const CCO_NAMESPACE: &str = "openshift-cloud-credential-operator";
/// The Secret (in the operator namespace) the cloud-credential-operator writes.
pub const CCO_SECRET: &str = "cco-secret";
/// Label on a `peer-pods-secret` the operator derived (value: the source Secret's name).
pub const LABEL_DERIVED_FROM: &str = "peerpods.sandboxd.io/derived-from";

/// The keys of the cloud-credential-operator's Secret and their `peer-pods-secret` names.
pub(crate) const KEY_MAP: [(&str, &str); 4] = [
    ("azure_client_id", "AZURE_CLIENT_ID"),
    ("azure_client_secret", "AZURE_CLIENT_SECRET"),
    ("azure_tenant_id", "AZURE_TENANT_ID"),
    ("azure_subscription_id", "AZURE_SUBSCRIPTION_ID"),
];

/// Errors of the credentials path (reported in `ConfigValid`, never fatal to a pass).
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// An API call failed.
    #[error("{what}: {source}")]
    Api {
        /// What was attempted.
        what: &'static str,
        /// The API error.
        #[source]
        source: kube::Error,
    },
}

fn api_err(what: &'static str) -> impl FnOnce(kube::Error) -> Error {
    move |source| Error::Api { what, source }
}

/// What the credentials path found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    /// The cloud secret exists and the user made it: left alone.
    UserSecret,
    /// The cloud secret is derived from the cloud-credential-operator's Secret (and up to date).
    Derived,
    /// No cloud secret, and no CredentialsRequest API (or not Azure): the user must create it.
    NotApplicable,
    /// The CredentialsRequest exists; its Secret does not yet.
    Waiting,
    /// Something failed; the message says what (no secret value).
    Failed(String),
}

impl Outcome {
    /// What `ConfigValid` adds to its problems, if anything.
    pub(crate) fn note(&self) -> Option<String> {
        match self {
            Outcome::Waiting => Some(format!(
                "waiting for the cloud-credential-operator to write Secret {CCO_SECRET} for \
                 CredentialsRequest {CCO_NAMESPACE}/{CREDENTIALS_REQUEST}"
            )),
            Outcome::Failed(m) => Some(format!("requesting cloud credentials: {m}")),
            _ => None,
        }
    }

    /// `problems` of `ConfigValid` with this outcome's note added.
    pub(crate) fn explain(&self, mut problems: Vec<String>) -> Vec<String> {
        problems.extend(self.note());
        problems
    }
}

/// The `peer-pods-secret` data derived from the cloud-credential-operator's Secret data.
pub(crate) fn derive(cco: &BTreeMap<String, ByteString>) -> BTreeMap<String, ByteString> {
    KEY_MAP
        .iter()
        .filter_map(|(from, to)| cco.get(*from).map(|v| (to.to_string(), v.clone())))
        .collect()
}

/// The CredentialsRequest resource.
pub fn resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("cloudcredential.openshift.io", "v1", "CredentialsRequest"),
        "credentialsrequests",
    )
}

/// The CredentialsRequest asking for Azure credentials written to Secret [`CCO_SECRET`] in
/// `namespace`.
pub(crate) fn credentials_request(
    namespace: &str,
    owner: k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference,
) -> DynamicObject {
    let permissions = crate::cloud::azure::permissions::actions();
    serde_json::from_value(json!({
        "apiVersion": API_VERSION,
        "kind": "CredentialsRequest",
        "metadata": {
            "name": CREDENTIALS_REQUEST,
            "namespace": CCO_NAMESPACE,
            "labels": {LABEL_MANAGED_BY: MANAGED_BY},
            "ownerReferences": [owner],
        },
        "spec": {
            "secretRef": {"name": CCO_SECRET, "namespace": namespace},
            "providerSpec": {
                "apiVersion": API_VERSION,
                "kind": "AzureProviderSpec",
                // The custom role of exactly what sandboxd calls (CAA, PeerPod GC, image
                // build): no built-in role covers images and galleries short of Contributor.
                "permissions": permissions,
            },
        },
    }))
    .expect("the CredentialsRequest is a valid object")
}

fn is_derived(s: &Secret) -> bool {
    s.labels().contains_key(LABEL_DERIVED_FROM)
}

fn derived_secret(name: &str, namespace: &str, cco: &Secret) -> Secret {
    let owner = k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference {
        api_version: "v1".into(),
        kind: "Secret".into(),
        name: cco.name_any(),
        uid: cco.uid().unwrap_or_default(),
        controller: Some(true),
        block_owner_deletion: None,
    };
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            namespace: Some(namespace.into()),
            labels: Some(BTreeMap::from([
                (LABEL_DERIVED_FROM.to_string(), CCO_SECRET.to_string()),
                (LABEL_MANAGED_BY.to_string(), MANAGED_BY.into()),
            ])),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(derive(&cco.data.clone().unwrap_or_default())),
        ..Default::default()
    }
}

/// Whether the cluster serves CredentialsRequests.
async fn served(ctx: &Ctx) -> bool {
    match ctx.client.list_api_group_resources(API_VERSION).await {
        Ok(list) => list
            .resources
            .iter()
            .any(|r| r.name == "credentialsrequests"),
        Err(_) => false,
    }
}

/// One pass while peer pods are on, given what the pass read: requests credentials when the
/// cloud secret is missing, derives it once they exist (then the inputs are read again), and
/// keeps a derived secret up to date. Failures are reported, never fatal.
pub(super) async fn ensure(
    ctx: &Ctx,
    kc: &KataConfig,
    spec: &PeerPodConfigSpec,
    inputs: ConfigInputs,
) -> Result<(ConfigInputs, Outcome), super::Error> {
    let provider = inputs
        .configmap
        .1
        .as_ref()
        .and_then(|m| m.get("CLOUD_PROVIDER"))
        .map(String::as_str);
    let outcome = match try_ensure(ctx, kc, spec, provider).await {
        Ok(o) => o,
        Err(e) => {
            tracing::warn!(error = %e, "requesting cloud credentials failed; retrying");
            Outcome::Failed(e.to_string())
        }
    };
    if outcome == Outcome::Derived && inputs.secret.1.is_none() {
        return Ok((super::read_config(ctx, spec).await?, outcome));
    }
    Ok((inputs, outcome))
}

async fn try_ensure(
    ctx: &Ctx,
    kc: &KataConfig,
    spec: &PeerPodConfigSpec,
    provider: Option<&str>,
) -> Result<Outcome, Error> {
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ctx.namespace);
    let name = &spec.cloud_secret_name;
    let current = secrets
        .get_opt(name)
        .await
        .map_err(api_err("reading the cloud secret"))?;
    match &current {
        Some(s) if !is_derived(s) => return Ok(Outcome::UserSecret),
        Some(s) => {
            // Ours: follow the credentials (rotation).
            let Some(cco) = secrets
                .get_opt(CCO_SECRET)
                .await
                .map_err(api_err("reading the credentials Secret"))?
            else {
                return Ok(Outcome::Derived);
            };
            let want = derived_secret(name, &ctx.namespace, &cco);
            if want.data != s.data {
                secrets
                    .patch(
                        name,
                        &PatchParams::apply(FIELD_MANAGER).force(),
                        &Patch::Apply(&want),
                    )
                    .await
                    .map_err(api_err("updating the derived cloud secret"))?;
                tracing::info!(secret = %name, "cloud secret updated from rotated credentials");
            }
            return Ok(Outcome::Derived);
        }
        None => {}
    }
    if provider.is_some_and(|p| !p.trim().eq_ignore_ascii_case("azure")) || !served(ctx).await {
        return Ok(Outcome::NotApplicable);
    }
    let crs: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), CCO_NAMESPACE, &resource());
    if crs
        .get_opt(CREDENTIALS_REQUEST)
        .await
        .map_err(api_err("reading the CredentialsRequest"))?
        .is_none()
    {
        let cr = credentials_request(&ctx.namespace, super::owner(kc));
        let pp = PostParams {
            field_manager: Some(FIELD_MANAGER.into()),
            ..Default::default()
        };
        match crs.create(&pp, &cr).await {
            Ok(_) => {
                tracing::info!("created CredentialsRequest {CCO_NAMESPACE}/{CREDENTIALS_REQUEST}")
            }
            Err(kube::Error::Api(s)) if s.code == 409 => {}
            Err(source) => {
                return Err(Error::Api {
                    what: "creating the CredentialsRequest",
                    source,
                });
            }
        }
    }
    let Some(cco) = secrets
        .get_opt(CCO_SECRET)
        .await
        .map_err(api_err("reading the credentials Secret"))?
    else {
        return Ok(Outcome::Waiting);
    };
    let pp = PostParams {
        field_manager: Some(FIELD_MANAGER.into()),
        ..Default::default()
    };
    match secrets
        .create(&pp, &derived_secret(name, &ctx.namespace, &cco))
        .await
    {
        Ok(_) => tracing::info!(secret = %name, "cloud secret derived from {CCO_SECRET}"),
        // The user made one meanwhile: theirs wins.
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        Err(source) => {
            return Err(Error::Api {
                what: "creating the cloud secret",
                source,
            });
        }
    }
    Ok(Outcome::Derived)
}

/// Peer pods disabled on a KataConfig that stays: the CredentialsRequest goes (the
/// cloud-credential-operator then removes its Secret, and with it the derived one). On
/// uninstall the KataConfig's deletion takes it (owner reference).
pub(super) async fn teardown(ctx: &Ctx) {
    let disabled = ctx
        .kcs
        .state()
        .iter()
        .any(|k| k.metadata.deletion_timestamp.is_none() && !k.spec.enable_peer_pods);
    // Only on the way from on to off (the default PeerPodConfig goes in the same pass): no
    // discovery call on every pass of a cluster that never enabled peer pods.
    let was_on = ctx
        .ppcs
        .state()
        .iter()
        .any(|p| p.name_any() == crate::api::names::PEER_POD_CONFIG);
    if !disabled || !was_on || !served(ctx).await {
        return;
    }
    let crs: Api<DynamicObject> =
        Api::namespaced_with(ctx.client.clone(), CCO_NAMESPACE, &resource());
    match crs.get_opt(CREDENTIALS_REQUEST).await {
        Ok(Some(cr))
            if cr.labels().get(LABEL_MANAGED_BY).map(String::as_str) == Some(MANAGED_BY) =>
        {
            match crs.delete(CREDENTIALS_REQUEST, &Default::default()).await {
                Ok(_) => tracing::info!("deleted CredentialsRequest {CREDENTIALS_REQUEST}"),
                Err(e) if apply::is_not_found(&e) => {}
                Err(e) => tracing::warn!(error = %e, "deleting the CredentialsRequest"),
            }
        }
        Ok(_) => {}
        Err(e) => tracing::debug!(error = %e, "reading the CredentialsRequest"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn derived_secrets_carry_exactly_the_four_peer_pods_keys() {
        let cco: BTreeMap<String, ByteString> = [
            ("azure_client_id", "c"),
            ("azure_client_secret", "s"),
            ("azure_tenant_id", "t"),
            ("azure_subscription_id", "sub"),
            ("azure_region", "eastus"),
            ("azure_resourcegroup", "rg"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
        .collect();
        let d = derive(&cco);
        let keys: Vec<_> = d.keys().map(String::as_str).collect();
        assert_eq!(
            keys,
            [
                "AZURE_CLIENT_ID",
                "AZURE_CLIENT_SECRET",
                "AZURE_SUBSCRIPTION_ID",
                "AZURE_TENANT_ID"
            ]
        );
        assert_eq!(d["AZURE_CLIENT_SECRET"].0, b"s");
    }

    #[test]
    fn the_request_asks_for_every_action_sandboxd_performs_into_the_operator_namespace() {
        let cr = credentials_request("ns", Default::default());
        assert_eq!(cr.types.as_ref().unwrap().kind, "CredentialsRequest");
        assert_eq!(cr.name_any(), CREDENTIALS_REQUEST);
        assert_eq!(cr.namespace().as_deref(), Some(CCO_NAMESPACE));
        let spec = &cr.data["spec"];
        assert_eq!(
            spec["secretRef"],
            json!({"name": CCO_SECRET, "namespace": "ns"})
        );
        assert_eq!(spec["providerSpec"]["kind"], "AzureProviderSpec");
        let granted: Vec<&str> = spec["providerSpec"]["permissions"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r.as_str().unwrap())
            .collect();
        // Image build included (the old roles granted no storage account write, images or
        // galleries).
        for action in [
            "Microsoft.Compute/virtualMachines/write",
            "Microsoft.Storage/storageAccounts/write",
            "Microsoft.Storage/storageAccounts/listKeys/action",
            "Microsoft.Compute/images/write",
            "Microsoft.Compute/galleries/images/versions/write",
        ] {
            assert!(
                crate::cloud::azure::permissions::granted(&granted, action),
                "{action}"
            );
        }
        assert!(spec["providerSpec"]["roleBindings"].is_null());
    }

    #[test]
    fn only_waiting_and_failure_add_to_config_valid() {
        assert!(Outcome::Waiting.note().unwrap().contains(CCO_SECRET));
        assert!(Outcome::UserSecret.note().is_none());
        assert!(Outcome::Derived.note().is_none());
        assert!(Outcome::NotApplicable.note().is_none());
    }
}
