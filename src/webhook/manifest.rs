//! The MutatingWebhookConfiguration this webhook expects, generated from the same defaults
//! the server uses and checked in under `deploy/webhook/`.
//!
//! It is written so that `failurePolicy: Fail` can only ever hold up peer pods: the
//! namespace selector skips the named system namespaces, and CEL match conditions skip
//! prefixed system namespaces and every pod whose runtime class is not the target.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MatchCondition, MutatingWebhook, MutatingWebhookConfiguration, RuleWithOperations,
    ServiceReference, WebhookClientConfig,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta,
};

use super::policy::DEFAULT_NEVER_MUTATE;
use crate::api::names::{DEFAULT_NAMESPACE, RUNTIME_CLASS, WEBHOOK, WEBHOOK_SERVICE};

/// The webhook's name inside the configuration.
pub(crate) const WEBHOOK_NAME: &str = "mwebhook.peerpods.io";
/// OpenShift's service CA: the annotation asking it to inject the caBundle.
pub(crate) const SERVICE_CA_INJECT_ANNOTATION: &str = "service.beta.openshift.io/inject-cabundle";
/// The HTTP path of the mutation endpoint.
pub const MUTATE_PATH: &str = "/mutate-v1-pod";
/// The checked-in file, relative to the repository root.
#[cfg(test)]
pub(crate) const CHECKED_IN_PATH: &str = "deploy/webhook/mutating-webhook-configuration.yaml";

/// How the configuration reaches the webhook and what it skips.
#[derive(Debug, Clone)]
pub struct Options {
    /// Where the webhook runs: `Service(namespace)` or a URL (tests, out-of-cluster runs).
    pub endpoint: Endpoint,
    /// PEM of the CA that signed the serving certificate, if known now.
    pub ca_bundle: Option<String>,
    /// The target runtime class.
    pub target_runtime_class: String,
    /// The operator's namespace (still sent here, so such pods get a clear refusal).
    pub operator_namespace: String,
    /// Namespaces never sent here: exact names go into the namespace selector, `prefix-*`
    /// patterns into a match condition.
    pub never_mutate: Vec<String>,
    /// Extra namespace selector requirements (tests scope the webhook to one namespace).
    pub extra_namespace_requirements: Vec<LabelSelectorRequirement>,
}

/// Where the API server calls the webhook.
#[derive(Debug, Clone)]
pub enum Endpoint {
    /// The in-cluster Service in this namespace.
    Service(String),
    /// A URL ending in [`MUTATE_PATH`].
    Url(String),
}

impl Default for Options {
    fn default() -> Self {
        Self {
            endpoint: Endpoint::Service(DEFAULT_NAMESPACE.into()),
            ca_bundle: None,
            target_runtime_class: RUNTIME_CLASS.into(),
            operator_namespace: DEFAULT_NAMESPACE.into(),
            never_mutate: DEFAULT_NEVER_MUTATE.iter().map(|s| s.to_string()).collect(),
            extra_namespace_requirements: Vec::new(),
        }
    }
}

impl Endpoint {
    /// How the API server reaches the webhook's `path` here (the Service's port 443, or the
    /// development URL's host), trusting `ca_bundle`.
    pub(crate) fn client_config(&self, path: &str, ca_bundle: Option<&str>) -> WebhookClientConfig {
        WebhookClientConfig {
            ca_bundle: ca_bundle.map(|pem| k8s_openapi::ByteString(pem.as_bytes().to_vec())),
            service: match self {
                Endpoint::Service(ns) => Some(ServiceReference {
                    name: WEBHOOK_SERVICE.into(),
                    namespace: ns.clone(),
                    path: Some(path.into()),
                    port: Some(443),
                }),
                Endpoint::Url(_) => None,
            },
            url: match self {
                Endpoint::Url(u) => Some(format!("{}{path}", u.trim_end_matches(MUTATE_PATH))),
                Endpoint::Service(_) => None,
            },
        }
    }
}

/// `s` as a CEL string literal.
pub(crate) fn cel_string(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The configuration for `options`.
pub fn webhook_configuration(options: &Options) -> MutatingWebhookConfiguration {
    let client_config = options
        .endpoint
        .client_config(MUTATE_PATH, options.ca_bundle.as_deref());
    let (prefixes, names): (Vec<&String>, Vec<&String>) =
        options.never_mutate.iter().partition(|p| p.ends_with('*'));
    let mut requirements = Vec::new();
    let names: Vec<String> = names
        .into_iter()
        .filter(|n| **n != options.operator_namespace)
        .cloned()
        .collect();
    if !names.is_empty() {
        requirements.push(LabelSelectorRequirement {
            key: "kubernetes.io/metadata.name".into(),
            operator: "NotIn".into(),
            values: Some(names),
        });
    }
    requirements.extend(options.extra_namespace_requirements.iter().cloned());
    let mut match_conditions = vec![MatchCondition {
        name: "peer-pods-only".into(),
        expression: format!(
            "has(object.spec.runtimeClassName) && object.spec.runtimeClassName == {}",
            cel_string(&options.target_runtime_class)
        ),
    }];
    if !prefixes.is_empty() {
        let list: Vec<String> = prefixes
            .iter()
            .map(|p| cel_string(p.trim_end_matches('*')))
            .collect();
        match_conditions.push(MatchCondition {
            name: "not-system-namespaces".into(),
            expression: format!(
                "request.namespace == {} || ![{}].exists(p, request.namespace.startsWith(p))",
                cel_string(&options.operator_namespace),
                list.join(", ")
            ),
        });
    }
    MutatingWebhookConfiguration {
        metadata: ObjectMeta {
            name: Some(WEBHOOK.into()),
            annotations: matches!(options.endpoint, Endpoint::Service(_)).then(|| {
                // OpenShift's service CA fills the caBundle; elsewhere the operator does.
                BTreeMap::from([(SERVICE_CA_INJECT_ANNOTATION.to_string(), "true".to_string())])
            }),
            ..Default::default()
        },
        webhooks: Some(vec![MutatingWebhook {
            name: WEBHOOK_NAME.into(),
            admission_review_versions: vec!["v1".into()],
            client_config,
            failure_policy: Some("Fail".into()),
            match_policy: Some("Equivalent".into()),
            side_effects: "None".into(),
            timeout_seconds: Some(10),
            reinvocation_policy: Some("Never".into()),
            namespace_selector: Some(LabelSelector {
                match_expressions: Some(requirements),
                match_labels: None,
            }),
            match_conditions: Some(match_conditions),
            rules: Some(vec![RuleWithOperations {
                api_groups: Some(vec!["".into()]),
                api_versions: Some(vec!["v1".into()]),
                operations: Some(vec!["CREATE".into()]),
                resources: Some(vec!["pods".into()]),
                scope: Some("Namespaced".into()),
            }]),
            object_selector: None,
        }]),
    }
}

/// The YAML checked in at [`CHECKED_IN_PATH`].
#[cfg(test)]
pub(crate) fn checked_in_yaml() -> String {
    let body = serde_saphyr::to_string(&webhook_configuration(&Options::default()))
        .expect("a webhook configuration always serialises");
    format!(
        "# Generated from src/webhook/manifest.rs (`sandboxd webhook` defaults); do not edit.\n\
         # caBundle is filled in by the operator (or OpenShift's service CA).\n---\n{body}"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The checked-in configuration is exactly what the code generates. Set
    /// `SANDBOXD_UPDATE_GENERATED=1` to rewrite it after a change.
    #[test]
    fn checked_in_webhook_configuration_matches_the_generator() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(CHECKED_IN_PATH);
        let want = checked_in_yaml();
        if std::env::var_os("SANDBOXD_UPDATE_GENERATED").is_some() {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &want).unwrap();
        }
        let have = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            have == want,
            "{} differs from the generator; run `SANDBOXD_UPDATE_GENERATED=1 cargo test --lib \
             webhook::` and review the diff",
            path.display()
        );
    }

    #[test]
    fn only_peer_pods_outside_system_namespaces_are_sent_and_failures_fail_closed() {
        let c = webhook_configuration(&Options::default());
        let w = &c.webhooks.as_ref().unwrap()[0];
        assert_eq!(w.name, WEBHOOK_NAME);
        assert_eq!(w.failure_policy.as_deref(), Some("Fail"));
        assert_eq!(w.side_effects, "None");
        let svc = w.client_config.service.as_ref().unwrap();
        assert_eq!(
            (svc.name.as_str(), svc.path.as_deref(), svc.port),
            (WEBHOOK_SERVICE, Some(MUTATE_PATH), Some(443))
        );
        let req = &w
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_expressions
            .as_ref()
            .unwrap()[0];
        assert_eq!(req.operator, "NotIn");
        assert_eq!(
            req.values.as_deref().unwrap(),
            ["kube-system", "kube-public", "kube-node-lease"]
        );
        let conds = w.match_conditions.as_ref().unwrap();
        assert!(
            conds[0].expression.ends_with("== 'kata-remote'"),
            "{conds:?}"
        );
        assert!(conds[1].expression.contains("['openshift-']"), "{conds:?}");
        assert!(
            conds[1]
                .expression
                .starts_with("request.namespace == 'openshift-sandboxed-containers-operator'"),
            "{conds:?}"
        );
    }
}
