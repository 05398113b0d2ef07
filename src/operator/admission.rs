//! The admission policy that allows only one KataConfig: a ValidatingAdmissionPolicy whose
//! params are every existing KataConfig, so a CREATE fails while any other exists. Where the
//! API server does not serve ValidatingAdmissionPolicy (before Kubernetes 1.30), the peer
//! pods webhook keeps the rule instead ([`crate::webhook::singleton`]); [`detect`] decides,
//! and the operator says which in its log and in each KataConfig's `SingleKataConfig`
//! condition.

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use kube::Api;
use serde_json::json;

use crate::api::names::{KATACONFIG_SINGLETON, LABEL_MANAGED_BY, MANAGED_BY};
use crate::k8s::apply::{self, hash_matches, stamp_hash};

/// The policy (hash-stamped).
pub(crate) fn policy() -> ValidatingAdmissionPolicy {
    let mut p: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": KATACONFIG_SINGLETON, "labels": {LABEL_MANAGED_BY: MANAGED_BY}},
        "spec": {
            "failurePolicy": "Fail",
            "paramKind": {"apiVersion": "kataconfiguration.openshift.io/v1", "kind": "KataConfig"},
            "matchConstraints": {"resourceRules": [{
                "apiGroups": ["kataconfiguration.openshift.io"],
                "apiVersions": ["*"],
                "operations": ["CREATE"],
                "resources": ["kataconfigs"],
            }]},
            "validations": [{
                "expression": "object.metadata.name == params.metadata.name",
                "messageExpression": "'only one KataConfig may exist: ' + params.metadata.name + ' already does'",
                "reason": "Forbidden",
            }],
        }
    }))
    .expect("a static policy always deserialises");
    stamp_hash(&mut p);
    p
}

/// The binding: every KataConfig is a param; none at all allows the create.
pub(crate) fn binding() -> ValidatingAdmissionPolicyBinding {
    let mut b: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": KATACONFIG_SINGLETON, "labels": {LABEL_MANAGED_BY: MANAGED_BY}},
        "spec": {
            "policyName": KATACONFIG_SINGLETON,
            "validationActions": ["Deny"],
            "paramRef": {"selector": {}, "parameterNotFoundAction": "Allow"},
        }
    }))
    .expect("a static binding always deserialises");
    stamp_hash(&mut b);
    b
}

/// How the one-KataConfig rule is kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Mechanism {
    /// The ValidatingAdmissionPolicy [`KATACONFIG_SINGLETON`] (Kubernetes ≥ 1.30).
    ValidatingAdmissionPolicy,
    /// The peer pods webhook, through the ValidatingWebhookConfiguration
    /// [`KATACONFIG_SINGLETON`].
    Webhook,
}

/// The condition type on the KataConfig that says how the rule is kept.
pub(crate) const CONDITION: &str = "SingleKataConfig";

impl Mechanism {
    /// The condition reason (and log field).
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Mechanism::ValidatingAdmissionPolicy => "ValidatingAdmissionPolicy",
            Mechanism::Webhook => "Webhook",
        }
    }

    /// What the log and the condition say.
    pub(crate) fn message(self) -> String {
        match self {
            Mechanism::ValidatingAdmissionPolicy => format!(
                "only one KataConfig may exist: enforced by ValidatingAdmissionPolicy {KATACONFIG_SINGLETON}"
            ),
            Mechanism::Webhook => format!(
                "only one KataConfig may exist: the API server has no ValidatingAdmissionPolicy \
                 (Kubernetes before 1.30), so the peer pods webhook enforces it through \
                 ValidatingWebhookConfiguration {}",
                KATACONFIG_SINGLETON
            ),
        }
    }
}

/// Whether the API server serves `admissionregistration.k8s.io/v1`
/// `validatingadmissionpolicies` (discovery).
pub(crate) async fn detect(client: &kube::Client) -> Result<Mechanism, kube::Error> {
    let list = client
        .list_api_group_resources("admissionregistration.k8s.io/v1")
        .await?;
    Ok(
        if list
            .resources
            .iter()
            .any(|r| r.name == "validatingadmissionpolicies")
        {
            Mechanism::ValidatingAdmissionPolicy
        } else {
            Mechanism::Webhook
        },
    )
}

/// The policy (and binding) that lets a node installer change only its own Node.
pub(crate) const INSTALLER_POLICY_NAME: &str = "sandboxd-node-installer-own-node";

/// The node installer may change only the Node it runs on: its ServiceAccount token is bound
/// to its pod, so the API server puts the pod's node in the token's
/// `authentication.kubernetes.io/node-name` extra (Kubernetes ≥ 1.30). RBAC cannot say "its
/// own Node"; this policy refuses an update of any other Node (or from a token that names
/// no node) by a `sandboxd-node-installer` ServiceAccount of any namespace.
pub(crate) fn installer_policy() -> ValidatingAdmissionPolicy {
    let mut p: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": INSTALLER_POLICY_NAME, "labels": {LABEL_MANAGED_BY: MANAGED_BY}},
        "spec": {
            "failurePolicy": "Fail",
            "matchConstraints": {"resourceRules": [{
                "apiGroups": [""],
                "apiVersions": ["v1"],
                "operations": ["UPDATE", "DELETE"],
                "resources": ["nodes", "nodes/status"],
            }]},
            "matchConditions": [{
                "name": "node-installer",
                "expression": format!(
                    "request.userInfo.username.startsWith('system:serviceaccount:') && \
                     request.userInfo.username.endsWith(':{}')",
                    crate::api::names::INSTALLER_SERVICE_ACCOUNT
                ),
            }],
            "validations": [{
                "expression": "request.operation == 'UPDATE' && has(request.userInfo.extra) && \
                    'authentication.kubernetes.io/node-name' in request.userInfo.extra && \
                    request.userInfo.extra['authentication.kubernetes.io/node-name'].exists(n, n == object.metadata.name)",
                "messageExpression": "'the node installer may change only the Node it runs on, not ' + oldObject.metadata.name",
                "reason": "Forbidden",
            }],
        }
    }))
    .expect("a static policy always deserialises");
    stamp_hash(&mut p);
    p
}

/// The binding of [`installer_policy`].
pub(crate) fn installer_binding() -> ValidatingAdmissionPolicyBinding {
    let mut b: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": INSTALLER_POLICY_NAME, "labels": {LABEL_MANAGED_BY: MANAGED_BY}},
        "spec": {"policyName": INSTALLER_POLICY_NAME, "validationActions": ["Deny"]}
    }))
    .expect("a static binding always deserialises");
    stamp_hash(&mut b);
    b
}

async fn ensure_one<K>(api: &Api<K>, kind: &str, want: &K) -> Result<(), apply::Error>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + serde::Serialize
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let name = kube::ResourceExt::name_any(want);
    let have = api
        .get_opt(&name)
        .await
        .map_err(|source| apply::Error::Api {
            verb: "reading",
            kind: kind.into(),
            name: name.clone(),
            source,
        })?;
    if !hash_matches(have.as_ref(), want) {
        apply::apply(api, want).await?;
    }
    Ok(())
}

/// Applies the policies (one KataConfig; the node installer's own Node) and their bindings
/// unless they are already current.
pub async fn ensure(client: &kube::Client) -> Result<(), apply::Error> {
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    for (p, b) in [
        (policy(), binding()),
        (installer_policy(), installer_binding()),
    ] {
        ensure_one(&policies, "ValidatingAdmissionPolicy", &p).await?;
        ensure_one(&bindings, "ValidatingAdmissionPolicyBinding", &b).await?;
    }
    Ok(())
}
