//! The webhook's objects as pure functions of the settings: the Deployment, its
//! PodDisruptionBudget, ServiceAccount and Service, the admission configurations pointed at
//! them, and the Secrets' shape. Each is hash-stamped, so [`super::ensure`] applies only what
//! changed.

use std::collections::BTreeMap;

use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration,
};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Secret, Service, ServiceAccount};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::{
    CERT_DIR, PORT, SERVICE_CA_SECRET_ANNOTATION, SERVING_SECRET, Settings, TLS_CRT, TLS_KEY,
    TlsSource, endpoint,
};
use crate::api::names::{LABEL_MANAGED_BY, MANAGED_BY, WEBHOOK, WEBHOOK_SERVICE};
use crate::k8s::apply;
use crate::webhook::manifest::{self, SERVICE_CA_INJECT_ANNOTATION};

fn labels() -> serde_json::Value {
    json!({"app": WEBHOOK, LABEL_MANAGED_BY: MANAGED_BY})
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
        "metadata": {"name": WEBHOOK, "namespace": namespace, "labels": labels(), "ownerReferences": [owner]},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": WEBHOOK}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": labels()},
                "spec": {
                    "serviceAccountName": WEBHOOK,
                    "automountServiceAccountToken": false,
                    // No fixed UID: see the image Job.
                    "securityContext": {
                        "runAsNonRoot": true,
                        "seccompProfile": {"type": "RuntimeDefault"},
                    },
                    "affinity": {"podAntiAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [{
                        "weight": 100,
                        "podAffinityTerm": {
                            "labelSelector": {"matchLabels": {"app": WEBHOOK}},
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
pub(crate) fn pdb(namespace: &str, owner: &OwnerReference) -> PodDisruptionBudget {
    stamped(json!({
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": WEBHOOK, "namespace": namespace, "labels": labels(), "ownerReferences": [owner]},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": WEBHOOK}}},
    }))
}

/// The Service: 443 → the webhook's 9443. With the service CA, it asks for the Secret.
pub fn service(namespace: &str, tls: TlsSource, owner: &OwnerReference) -> Service {
    let mut meta = json!({"name": WEBHOOK_SERVICE, "namespace": namespace, "labels": labels(), "ownerReferences": [owner]});
    if tls == TlsSource::ServiceCa {
        meta["annotations"] = json!({SERVICE_CA_SECRET_ANNOTATION: SERVING_SECRET});
    }
    stamped(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": meta,
        "spec": {
            "selector": {"app": WEBHOOK},
            "ports": [{"name": "https", "port": 443, "targetPort": "https", "protocol": "TCP"}],
        },
    }))
}

/// The webhook pods' ServiceAccount: no token mounted, no permissions.
pub(crate) fn service_account(namespace: &str, owner: &OwnerReference) -> ServiceAccount {
    stamped(json!({
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {"name": WEBHOOK, "namespace": namespace, "labels": labels(), "ownerReferences": [owner]},
        "automountServiceAccountToken": false,
    }))
}

/// The MutatingWebhookConfiguration of [`manifest`], pointed at the Service (or the
/// development URL) with `ca_bundle`.
pub(crate) fn webhook_configuration(
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
        LABEL_MANAGED_BY.to_string(),
        MANAGED_BY.to_string(),
    )]));
    mwc.metadata.owner_references = Some(vec![owner.clone()]);
    apply::stamp_hash(&mut mwc);
    mwc
}

/// The ValidatingWebhookConfiguration of the one-KataConfig rule for `active`, pointed at
/// the webhook like [`webhook_configuration`].
pub(crate) fn singleton_configuration(
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

/// A Secret of sandboxd's webhook: `data` as text, labelled and owned like the rest.
pub(super) fn secret(
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

#[cfg(test)]
mod tests {
    use super::*;
    use kube::ResourceExt;

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
        assert_eq!(pod.service_account_name.as_deref(), Some(WEBHOOK));
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
