//! Where peer pods may run: the namespace rules applied before a pod is mutated.
//!
//! A policy answers for a peer pod (a pod of the target runtime class) only; pods of other
//! runtime classes never reach it.

use crate::api::names::DEFAULT_NAMESPACE;

/// Namespaces never mutated, even when the webhook configuration sends their pods here.
pub(crate) const DEFAULT_NEVER_MUTATE: &[&str] = &[
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "openshift-*",
];

/// What to do with a peer pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Turn it into a peer pod.
    Mutate,
    /// Admit it unchanged; the reason is for logs.
    LeaveAlone(String),
    /// Refuse it; the message is shown to the user.
    Refuse(String),
}

/// Decides, per namespace, what happens to a peer pod.
pub(crate) trait AdmissionPolicy: Send + Sync {
    /// The decision for a peer pod created in `namespace`.
    fn decide(&self, namespace: &str) -> Decision;
}

/// A namespace name, or a prefix when it ends with `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct NamespacePattern(String);

impl NamespacePattern {
    /// A pattern from its text (`kube-system`, `openshift-*`).
    pub(crate) fn new(text: &str) -> Self {
        Self(text.trim().to_string())
    }

    /// Whether `namespace` matches.
    pub(crate) fn matches(&self, namespace: &str) -> bool {
        match self.0.strip_suffix('*') {
            Some(prefix) => namespace.starts_with(prefix),
            None => namespace == self.0,
        }
    }

    /// The text of the pattern.
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// The namespace policy from the seed's advice: no peer pods in the operator's namespace,
/// optionally only in an allow-list, and never touch system namespaces.
#[derive(Debug, Clone)]
pub(crate) struct NamespacePolicy {
    /// The operator's namespace: peer pods there are refused.
    pub(crate) operator_namespace: String,
    /// When non-empty, peer pods are refused outside these namespaces.
    pub(crate) allowed: Vec<NamespacePattern>,
    /// Namespaces whose pods are admitted unchanged.
    pub(crate) never_mutate: Vec<NamespacePattern>,
}

impl Default for NamespacePolicy {
    fn default() -> Self {
        Self {
            operator_namespace: DEFAULT_NAMESPACE.to_string(),
            allowed: Vec::new(),
            never_mutate: DEFAULT_NEVER_MUTATE
                .iter()
                .map(|p| NamespacePattern::new(p))
                .collect(),
        }
    }
}

impl AdmissionPolicy for NamespacePolicy {
    fn decide(&self, namespace: &str) -> Decision {
        if namespace == self.operator_namespace {
            return Decision::Refuse(format!(
                "peer pods must not run in the operator namespace {namespace:?}: its pods \
                 are not accounted against the per-node VM limit; create the pod in an \
                 application namespace"
            ));
        }
        if let Some(p) = self.never_mutate.iter().find(|p| p.matches(namespace)) {
            return Decision::LeaveAlone(format!(
                "namespace matches the never-mutate entry {:?}",
                p.as_str()
            ));
        }
        if !self.allowed.is_empty() && !self.allowed.iter().any(|p| p.matches(namespace)) {
            let list: Vec<&str> = self.allowed.iter().map(NamespacePattern::as_str).collect();
            return Decision::Refuse(format!(
                "peer pods are only allowed in the namespaces [{}], not in {namespace:?}",
                list.join(", ")
            ));
        }
        Decision::Mutate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(d: &Decision, needle: &str) -> bool {
        matches!(d, Decision::Refuse(m) if m.contains(needle))
    }

    #[test]
    fn operator_namespace_is_refused_with_the_reason() {
        let p = NamespacePolicy::default();
        let d = p.decide(DEFAULT_NAMESPACE);
        assert!(refused(&d, "operator namespace"), "{d:?}");
        assert!(refused(&d, "VM limit"), "{d:?}");
    }

    #[test]
    fn system_namespaces_are_left_alone_by_default() {
        let p = NamespacePolicy::default();
        for ns in [
            "kube-system",
            "kube-public",
            "kube-node-lease",
            "openshift-monitoring",
        ] {
            assert!(matches!(p.decide(ns), Decision::LeaveAlone(_)), "{ns}");
        }
        for ns in ["default", "kube-systemx", "team-openshift-a"] {
            assert_eq!(p.decide(ns), Decision::Mutate, "{ns}");
        }
    }

    #[test]
    fn an_allow_list_refuses_peer_pods_elsewhere_and_names_the_list() {
        let p = NamespacePolicy {
            allowed: vec![
                NamespacePattern::new("apps"),
                NamespacePattern::new("team-*"),
            ],
            ..Default::default()
        };
        assert_eq!(p.decide("apps"), Decision::Mutate);
        assert_eq!(p.decide("team-blue"), Decision::Mutate);
        let d = p.decide("default");
        assert!(refused(&d, "[apps, team-*]"), "{d:?}");
        assert!(refused(&d, "\"default\""), "{d:?}");
        // The never-mutate list still wins over the allow-list refusal.
        assert!(matches!(p.decide("kube-system"), Decision::LeaveAlone(_)));
    }

    #[test]
    fn a_custom_operator_namespace_is_refused_even_inside_never_mutate_prefixes() {
        let p = NamespacePolicy {
            operator_namespace: "openshift-osc".into(),
            ..Default::default()
        };
        assert!(refused(&p.decide("openshift-osc"), "operator namespace"));
        assert!(matches!(
            p.decide(DEFAULT_NAMESPACE),
            Decision::LeaveAlone(_)
        ));
    }
}
