//! The one-KataConfig rule where the API server has no ValidatingAdmissionPolicy (before
//! Kubernetes 1.30, e.g. OpenShift 4.15 and 4.16): a ValidatingWebhookConfiguration that
//! the operator points at `/validate-kataconfig/<name of the KataConfig in force>` while one
//! exists. The webhook needs no API access: the path names the KataConfig in force, and a
//! CREATE of any other name is refused (the same name is allowed through, so the API
//! server answers `AlreadyExists` as it would without the rule).

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, RuleWithOperations, ValidatingWebhook, ValidatingWebhookConfiguration,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde_json::{Value, json};

use super::manifest::{Endpoint, cel_string};
use crate::api::names::{KATACONFIG_SINGLETON, LABEL_MANAGED_BY, MANAGED_BY};

/// The path prefix; the KataConfig in force follows it.
pub(crate) const PATH_PREFIX: &str = "/validate-kataconfig";
/// The webhook's name in it.
pub(crate) const WEBHOOK_NAME: &str = "kataconfig-singleton.sandboxd.io";

/// Why a review could not be answered.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The body is not an `admission.k8s.io/v1` AdmissionReview with a request and a uid.
    #[error("not an admission.k8s.io/v1 AdmissionReview request: {0}")]
    Malformed(String),
}

impl Error {
    /// A short, stable label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        "malformed"
    }
}

/// The message of a refusal.
pub(crate) fn refusal(active: &str, name: &str) -> String {
    format!("only one KataConfig may exist: {active} already does (refused {name})")
}

/// Answers the AdmissionReview `body` for a cluster whose KataConfig in force is `active`.
pub(crate) fn review(active: &str, body: &[u8]) -> Result<Value, Error> {
    let review: Value =
        serde_json::from_slice(body).map_err(|e| Error::Malformed(e.to_string()))?;
    if review["apiVersion"] != "admission.k8s.io/v1" || review["kind"] != "AdmissionReview" {
        return Err(Error::Malformed("wrong apiVersion or kind".into()));
    }
    let req = &review["request"];
    let uid = req["uid"]
        .as_str()
        .filter(|u| !u.is_empty())
        .ok_or_else(|| Error::Malformed("no request.uid".into()))?;
    let name = req["object"]["metadata"]["name"]
        .as_str()
        .or_else(|| req["name"].as_str())
        .unwrap_or_default();
    let allowed = req["operation"] != "CREATE" || name == active;
    let mut response = json!({"uid": uid, "allowed": allowed});
    if !allowed {
        response["status"] = json!({
            "code": 403,
            "reason": "Forbidden",
            "message": refusal(active, name),
        });
    }
    Ok(json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// The configuration refusing every KataConfig CREATE but `active`'s, sent to the webhook at
/// `endpoint` (the peer pods webhook's Service, or its development URL).
pub(crate) fn configuration(
    active: &str,
    endpoint: &Endpoint,
    ca_bundle: Option<String>,
) -> ValidatingWebhookConfiguration {
    let path = format!("{PATH_PREFIX}/{active}");
    let client_config = endpoint.client_config(&path, ca_bundle.as_deref());
    ValidatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(KATACONFIG_SINGLETON.into()),
            labels: Some(BTreeMap::from([(
                LABEL_MANAGED_BY.to_string(),
                MANAGED_BY.to_string(),
            )])),
            ..Default::default()
        },
        webhooks: Some(vec![ValidatingWebhook {
            name: WEBHOOK_NAME.into(),
            admission_review_versions: vec!["v1".into()],
            client_config,
            failure_policy: Some("Fail".into()),
            match_policy: Some("Equivalent".into()),
            side_effects: "None".into(),
            timeout_seconds: Some(5),
            // Only another name is sent at all.
            match_conditions: Some(vec![MatchCondition {
                name: "another-kataconfig".into(),
                expression: format!("object.metadata.name != {}", cel_string(active)),
            }]),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec!["kataconfiguration.openshift.io".into()]),
                api_versions: Some(vec!["*".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["kataconfigs".into()]),
                scope: Some("Cluster".into()),
            }]),
            namespace_selector: None,
            object_selector: None,
        }]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::names::WEBHOOK_SERVICE;
    use crate::webhook::manifest::MUTATE_PATH;

    fn body(op: &str, name: &str) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
            "request": {"uid": "u-1", "operation": op, "name": name,
                        "object": {"metadata": {"name": name}}},
        }))
        .unwrap()
    }

    #[test]
    fn another_kataconfig_is_refused_and_the_one_in_force_passes_through() {
        let r = review("cluster-kataconfig", &body("CREATE", "second")).unwrap();
        assert_eq!(r["response"]["uid"], "u-1");
        assert_eq!(r["response"]["allowed"], false);
        assert_eq!(r["response"]["status"]["code"], 403);
        let m = r["response"]["status"]["message"].as_str().unwrap();
        assert!(
            m.contains("only one KataConfig") && m.contains("cluster-kataconfig"),
            "{m}"
        );
        let r = review("cluster-kataconfig", &body("CREATE", "cluster-kataconfig")).unwrap();
        assert_eq!(r["response"]["allowed"], true);
        assert!(review("x", b"{}").is_err());
    }

    #[test]
    fn the_configuration_sends_only_other_names_to_the_path_of_the_one_in_force() {
        let c = configuration("kc", &Endpoint::Service("ns".into()), Some("CA".into()));
        let w = &c.webhooks.as_ref().unwrap()[0];
        let svc = w.client_config.service.as_ref().unwrap();
        assert_eq!(svc.path.as_deref(), Some("/validate-kataconfig/kc"));
        assert_eq!(svc.name, WEBHOOK_SERVICE);
        assert_eq!(
            w.match_conditions.as_ref().unwrap()[0].expression,
            "object.metadata.name != 'kc'"
        );
        let c = configuration(
            "kc",
            &Endpoint::Url(format!("https://127.0.0.1:9443{MUTATE_PATH}")),
            None,
        );
        let w = &c.webhooks.as_ref().unwrap()[0];
        assert_eq!(
            w.client_config.url.as_deref(),
            Some("https://127.0.0.1:9443/validate-kataconfig/kc")
        );
    }
}
