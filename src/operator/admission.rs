//! The admission policy that allows only one KataConfig: a ValidatingAdmissionPolicy whose
//! params are every existing KataConfig, so a CREATE fails while any other exists.

use k8s_openapi::api::admissionregistration::v1::{
    ValidatingAdmissionPolicy, ValidatingAdmissionPolicyBinding,
};
use kube::Api;
use serde_json::json;

use crate::k8s::apply::{self, hash_matches, stamp_hash};

/// The policy's (and binding's) name.
pub const POLICY_NAME: &str = "sandboxd-kataconfig-singleton";

/// The policy (hash-stamped).
pub fn policy() -> ValidatingAdmissionPolicy {
    let mut p: ValidatingAdmissionPolicy = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": POLICY_NAME, "labels": {"app.kubernetes.io/managed-by": "sandboxd"}},
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
pub fn binding() -> ValidatingAdmissionPolicyBinding {
    let mut b: ValidatingAdmissionPolicyBinding = serde_json::from_value(json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": POLICY_NAME, "labels": {"app.kubernetes.io/managed-by": "sandboxd"}},
        "spec": {
            "policyName": POLICY_NAME,
            "validationActions": ["Deny"],
            "paramRef": {"selector": {}, "parameterNotFoundAction": "Allow"},
        }
    }))
    .expect("a static binding always deserialises");
    stamp_hash(&mut b);
    b
}

/// Applies the policy and binding unless they are already current.
pub async fn ensure(client: &kube::Client) -> Result<(), apply::Error> {
    let policies: Api<ValidatingAdmissionPolicy> = Api::all(client.clone());
    let want = policy();
    let have = policies
        .get_opt(POLICY_NAME)
        .await
        .map_err(|source| apply::Error::Api {
            verb: "reading",
            kind: "ValidatingAdmissionPolicy".into(),
            name: POLICY_NAME.into(),
            source,
        })?;
    if !hash_matches(have.as_ref(), &want) {
        apply::apply(&policies, &want).await?;
    }
    let bindings: Api<ValidatingAdmissionPolicyBinding> = Api::all(client.clone());
    let want = binding();
    let have = bindings
        .get_opt(POLICY_NAME)
        .await
        .map_err(|source| apply::Error::Api {
            verb: "reading",
            kind: "ValidatingAdmissionPolicyBinding".into(),
            name: POLICY_NAME.into(),
            source,
        })?;
    if !hash_matches(have.as_ref(), &want) {
        apply::apply(&bindings, &want).await?;
    }
    Ok(())
}
