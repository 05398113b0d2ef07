//! Node selection: which nodes a KataConfig targets (pure).

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use crate::api::names::LABEL_KATA_ELIGIBLE;

/// The labels that mark control-plane nodes on plain Kubernetes.
const CONTROL_PLANE_ROLES: [&str; 2] = [
    "node-role.kubernetes.io/control-plane",
    "node-role.kubernetes.io/master",
];
/// The OpenShift worker role label.
const WORKER_ROLE: &str = "node-role.kubernetes.io/worker";

/// Errors of node selection.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub(crate) enum Error {
    /// A matchExpressions entry uses an operator Kubernetes does not define.
    #[error(
        "kataConfigPoolSelector: unknown operator {0:?} (expected In, NotIn, Exists, DoesNotExist)"
    )]
    Operator(String),
    /// In/NotIn without values, or Exists/DoesNotExist with values.
    #[error("kataConfigPoolSelector: {operator} on {key:?} {problem}")]
    Values {
        /// The operator.
        operator: String,
        /// The label key.
        key: String,
        /// What is wrong.
        problem: &'static str,
    },
}

/// Which platform defaults apply to an empty selector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Flavor {
    /// Plain Kubernetes: workers are nodes without a control-plane role.
    Kubernetes,
    /// OpenShift: workers carry `node-role.kubernetes.io/worker`.
    OpenShift,
}

/// A compiled `kataConfigPoolSelector` plus `checkNodeEligibility`.
#[derive(Clone, Debug)]
pub(crate) struct Selection {
    selector: Option<LabelSelector>,
    check_eligibility: bool,
    flavor: Flavor,
}

impl Selection {
    /// Validates the selector.
    pub(crate) fn new(
        selector: Option<&LabelSelector>,
        check_eligibility: bool,
        flavor: Flavor,
    ) -> Result<Self, Error> {
        if let Some(sel) = selector {
            for e in sel.match_expressions.iter().flatten() {
                let has_values = e.values.as_ref().is_some_and(|v| !v.is_empty());
                match e.operator.as_str() {
                    "In" | "NotIn" if !has_values => {
                        return Err(Error::Values {
                            operator: e.operator.clone(),
                            key: e.key.clone(),
                            problem: "needs values",
                        });
                    }
                    "Exists" | "DoesNotExist" if has_values => {
                        return Err(Error::Values {
                            operator: e.operator.clone(),
                            key: e.key.clone(),
                            problem: "takes no values",
                        });
                    }
                    "In" | "NotIn" | "Exists" | "DoesNotExist" => {}
                    other => return Err(Error::Operator(other.to_string())),
                }
            }
        }
        let empty = selector.is_none_or(|s| {
            s.match_labels.as_ref().is_none_or(|m| m.is_empty())
                && s.match_expressions.as_ref().is_none_or(|m| m.is_empty())
        });
        Ok(Self {
            selector: if empty { None } else { selector.cloned() },
            check_eligibility,
            flavor,
        })
    }

    /// Whether a node with these labels is selected.
    pub(crate) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        if self.check_eligibility
            && labels.get(LABEL_KATA_ELIGIBLE).map(String::as_str) != Some("true")
        {
            return false;
        }
        match &self.selector {
            None => match self.flavor {
                Flavor::Kubernetes => !CONTROL_PLANE_ROLES.iter().any(|r| labels.contains_key(*r)),
                Flavor::OpenShift => labels.contains_key(WORKER_ROLE),
            },
            Some(sel) => {
                let labels_ok = sel
                    .match_labels
                    .iter()
                    .flatten()
                    .all(|(k, v)| labels.get(k) == Some(v));
                let exprs_ok = sel.match_expressions.iter().flatten().all(|e| {
                    let values = e.values.as_deref().unwrap_or_default();
                    let have = labels.get(&e.key);
                    match e.operator.as_str() {
                        "In" => have.is_some_and(|v| values.contains(v)),
                        "NotIn" => have.is_none_or(|v| !values.contains(v)),
                        "Exists" => have.is_some(),
                        "DoesNotExist" => have.is_none(),
                        _ => false,
                    }
                });
                labels_ok && exprs_ok
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: (!values.is_empty()).then(|| values.iter().map(|v| v.to_string()).collect()),
        }
    }

    #[test]
    fn empty_selector_picks_workers_on_kubernetes() {
        let s = Selection::new(None, false, Flavor::Kubernetes).unwrap();
        assert!(s.matches(&labels(&[("kubernetes.io/hostname", "w1")])));
        assert!(!s.matches(&labels(&[("node-role.kubernetes.io/control-plane", "")])));
        assert!(!s.matches(&labels(&[("node-role.kubernetes.io/master", "")])));
        let empty = LabelSelector::default();
        let s = Selection::new(Some(&empty), false, Flavor::Kubernetes).unwrap();
        assert!(s.matches(&labels(&[])));
    }

    #[test]
    fn empty_selector_picks_worker_role_on_openshift() {
        let s = Selection::new(None, false, Flavor::OpenShift).unwrap();
        assert!(s.matches(&labels(&[("node-role.kubernetes.io/worker", "")])));
        assert!(!s.matches(&labels(&[("kubernetes.io/hostname", "x")])));
    }

    #[test]
    fn match_labels_and_every_expression_operator() {
        let sel = LabelSelector {
            match_labels: Some([("pool".to_string(), "kata".to_string())].into()),
            match_expressions: Some(vec![
                expr("zone", "In", &["a", "b"]),
                expr("tier", "NotIn", &["db"]),
                expr("ssd", "Exists", &[]),
                expr("tainted", "DoesNotExist", &[]),
            ]),
        };
        let s = Selection::new(Some(&sel), false, Flavor::Kubernetes).unwrap();
        let good = [("pool", "kata"), ("zone", "a"), ("ssd", "")];
        assert!(s.matches(&labels(&good)));
        assert!(!s.matches(&labels(&[("pool", "kata"), ("zone", "c"), ("ssd", "")])));
        assert!(!s.matches(&labels(&[("pool", "x"), ("zone", "a"), ("ssd", "")])));
        assert!(!s.matches(&labels(&[("pool", "kata"), ("zone", "a")])));
        assert!(!s.matches(&labels(&[
            ("pool", "kata"),
            ("zone", "a"),
            ("ssd", ""),
            ("tier", "db")
        ])));
        assert!(!s.matches(&labels(&[
            ("pool", "kata"),
            ("zone", "a"),
            ("ssd", ""),
            ("tainted", "yes")
        ])));
        // A selector may pick control-plane nodes explicitly.
        assert!(s.matches(&labels(&[
            ("pool", "kata"),
            ("zone", "b"),
            ("ssd", ""),
            ("node-role.kubernetes.io/control-plane", "")
        ])));
    }

    #[test]
    fn eligibility_requires_the_nfd_label() {
        let s = Selection::new(None, true, Flavor::Kubernetes).unwrap();
        assert!(!s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[(LABEL_KATA_ELIGIBLE, "true")])));
    }

    #[test]
    fn malformed_expressions_are_named() {
        let sel = LabelSelector {
            match_expressions: Some(vec![expr("k", "Gt", &["1"])]),
            ..Default::default()
        };
        assert_eq!(
            Selection::new(Some(&sel), false, Flavor::Kubernetes).unwrap_err(),
            Error::Operator("Gt".into())
        );
        let sel = LabelSelector {
            match_expressions: Some(vec![expr("k", "In", &[])]),
            ..Default::default()
        };
        let err = Selection::new(Some(&sel), false, Flavor::Kubernetes).unwrap_err();
        assert!(err.to_string().contains("needs values"), "{err}");
    }
}
