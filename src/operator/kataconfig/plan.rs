//! The pure plan: from the nodes as observed (labels and the installer's annotations), the
//! selection and the pods that use the runtime, what to change on each node and which
//! state bucket it is in.

use std::collections::BTreeMap;

use crate::api::kataconfig::KataNodesStatus;
use crate::api::names::*;
use crate::operator::nodes::Selection;

/// What the plan needs of a node.
#[derive(Clone, Debug, Default)]
pub(crate) struct NodeView {
    /// Node name.
    pub(crate) name: String,
    /// Its labels.
    pub(crate) labels: BTreeMap<String, String>,
    /// Its annotations.
    pub(crate) annotations: BTreeMap<String, String>,
}

impl NodeView {
    fn label(&self, k: &str) -> Option<&str> {
        self.labels.get(k).map(String::as_str)
    }
    fn ann(&self, k: &str) -> Option<&str> {
        self.annotations.get(k).map(String::as_str)
    }
    /// Whether the operator or installer left anything of theirs on this node.
    pub(crate) fn has_ours(&self) -> bool {
        self.labels.contains_key(LABEL_NODE_INSTALL)
            || self.labels.contains_key(LABEL_KATA)
            || self.annotations.contains_key(ANN_STATE)
    }
}

/// A pod that uses the runtime (not finished).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct PodRef {
    /// Namespace.
    pub(crate) namespace: String,
    /// Name.
    pub(crate) name: String,
    /// The node it is bound to, if any.
    pub(crate) node: Option<String>,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A change to one node's labels.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NodeAction {
    /// Set the kata label and `node-install=install`.
    Install,
    /// Drop the kata label, set `node-install=uninstall`.
    Uninstall,
    /// Remove every label and annotation of ours (the node is clean).
    Clean,
}

/// The plan for one reconcile.
#[derive(Clone, Debug, Default)]
pub(crate) struct Plan {
    /// Label changes, by node name.
    pub(crate) actions: Vec<(String, NodeAction)>,
    /// Nodes by state.
    pub(crate) nodes: KataNodesStatus,
    /// Failed nodes with their reasons.
    pub(crate) failures: Vec<(String, String)>,
    /// Deselected nodes that keep the runtime while peer pods run on them.
    pub(crate) held_by_pods: Vec<(String, Vec<PodRef>)>,
    /// Some node's fate depends on its pods, and none were given: list them and plan again.
    pub(crate) needs_pods: bool,
    /// Nodes that still carry something of ours once the actions are done (not counting
    /// those the plan cleans).
    pub(crate) remaining: usize,
    /// Some node already had the runtime (so a change is an update, not a first install).
    pub(crate) had_installed: bool,
    /// What else the install waits on besides the nodes (OpenShift: the machine-config
    /// pool's rollout). Non-empty keeps `InProgress` true.
    pub(crate) pending: Vec<String>,
    /// Peer pods: the pod VM image Job's `InProgress` (status, reason, message), shown once
    /// the nodes are done.
    pub(crate) pod_vm_image: Option<(bool, &'static str, String)>,
}

/// Plans every node. `selection` is `None` while the KataConfig is being deleted (no node
/// is selected). `pods` are the pods using the runtime, when listed.
pub(crate) fn plan(
    nodes: &[NodeView],
    selection: Option<&Selection>,
    desired_config: &str,
    pods: Option<&[PodRef]>,
) -> Plan {
    let mut p = Plan::default();
    let mut pods_by_node: BTreeMap<&str, Vec<PodRef>> = BTreeMap::new();
    for pod in pods.unwrap_or_default() {
        if let Some(n) = &pod.node {
            pods_by_node
                .entry(n.as_str())
                .or_default()
                .push(pod.clone());
        }
    }
    let mut sorted: Vec<&NodeView> = nodes.iter().collect();
    sorted.sort_by(|a, b| a.name.cmp(&b.name));
    let k = &mut p.nodes;
    for node in sorted {
        let selected = selection.is_some_and(|s| s.matches(&node.labels));
        let state = node.ann(ANN_STATE);
        let install_label = node.label(LABEL_NODE_INSTALL);
        if state == Some(STATE_INSTALLED) {
            p.had_installed = true;
        }
        let name = node.name.clone();
        if selected {
            k.node_count += 1;
            p.remaining += 1;
            if install_label != Some(INSTALL) || node.label(LABEL_KATA) != Some("") {
                p.actions.push((name.clone(), NodeAction::Install));
            }
            let current = node.ann(ANN_CONFIG) == Some(desired_config);
            match state {
                Some(STATE_INSTALLED) if current && install_label == Some(INSTALL) => {
                    k.installed.push(name)
                }
                Some(STATE_INSTALLED) | Some(STATE_INSTALLING) => k.installing.push(name),
                Some(STATE_FAILED) if install_label == Some(INSTALL) => {
                    p.failures.push((
                        name.clone(),
                        node.ann(ANN_MESSAGE)
                            .unwrap_or("no reason given")
                            .to_string(),
                    ));
                    k.failed_to_install.push(name);
                }
                _ => k.waiting_to_install.push(name),
            }
            continue;
        }
        if !node.has_ours() {
            continue;
        }
        // Deselected (or deleting) and carrying our labels or state.
        match (install_label, state) {
            // Nothing was ever reported: nothing to undo.
            (_, None) => p.actions.push((name, NodeAction::Clean)),
            (_, Some(STATE_UNINSTALLED)) => p.actions.push((name, NodeAction::Clean)),
            (Some(UNINSTALL), Some(STATE_UNINSTALL_FAILED)) => {
                p.remaining += 1;
                p.failures.push((
                    name.clone(),
                    node.ann(ANN_MESSAGE)
                        .unwrap_or("no reason given")
                        .to_string(),
                ));
                k.failed_to_uninstall.push(name);
            }
            (Some(UNINSTALL), _) => {
                p.remaining += 1;
                k.uninstalling.push(name);
            }
            // Still installed (or installing): only take it away when no pod runs there.
            _ => {
                p.remaining += 1;
                match pods {
                    None => {
                        p.needs_pods = true;
                        k.waiting_to_uninstall.push(name);
                    }
                    Some(_) => match pods_by_node.remove(node.name.as_str()) {
                        Some(held) => {
                            k.waiting_to_uninstall.push(name.clone());
                            p.held_by_pods.push((name, held));
                        }
                        None => {
                            p.actions.push((name.clone(), NodeAction::Uninstall));
                            k.uninstalling.push(name);
                        }
                    },
                }
            }
        }
    }
    k.ready_node_count = k.installed.len() as i64;
    p
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::nodes::Flavor;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    fn node(name: &str, labels: &[(&str, &str)], anns: &[(&str, &str)]) -> NodeView {
        NodeView {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            annotations: anns
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn pool() -> Selection {
        let sel = LabelSelector {
            match_labels: Some([("pool".to_string(), "kata".to_string())].into()),
            ..Default::default()
        };
        Selection::new(Some(&sel), false, Flavor::Kubernetes).unwrap()
    }

    const INSTALLED: [(&str, &str); 2] = [(ANN_STATE, STATE_INSTALLED), (ANN_CONFIG, "h1")];
    const LABELLED: [(&str, &str); 3] = [
        ("pool", "kata"),
        (LABEL_KATA, ""),
        (LABEL_NODE_INSTALL, INSTALL),
    ];

    #[test]
    fn new_selected_nodes_wait_and_get_labels_others_are_untouched() {
        let nodes = [
            node("a", &[("pool", "kata")], &[]),
            node("b", &[("pool", "other")], &[]),
        ];
        let p = plan(&nodes, Some(&pool()), "h1", None);
        assert_eq!(p.actions, vec![("a".to_string(), NodeAction::Install)]);
        assert_eq!(p.nodes.waiting_to_install, ["a"]);
        assert_eq!(p.nodes.node_count, 1);
        assert_eq!(p.nodes.ready_node_count, 0);
        assert!(!p.needs_pods);
    }

    #[test]
    fn installer_reports_drive_buckets_and_stale_config_is_installing() {
        let nodes = [
            node("a", &LABELLED, &INSTALLED),
            node("b", &LABELLED, &[(ANN_STATE, STATE_INSTALLING)]),
            node(
                "c",
                &LABELLED,
                &[(ANN_STATE, STATE_FAILED), (ANN_MESSAGE, "no shim")],
            ),
            node(
                "d",
                &LABELLED,
                &[(ANN_STATE, STATE_INSTALLED), (ANN_CONFIG, "old")],
            ),
        ];
        let p = plan(&nodes, Some(&pool()), "h1", None);
        assert!(p.actions.is_empty(), "{:?}", p.actions);
        assert_eq!(p.nodes.installed, ["a"]);
        assert_eq!(p.nodes.installing, ["b", "d"]);
        assert_eq!(p.nodes.failed_to_install, ["c"]);
        assert_eq!(p.failures, [("c".to_string(), "no shim".to_string())]);
        assert_eq!(p.nodes.ready_node_count, 1);
        assert_eq!(p.nodes.node_count, 4);
    }

    #[test]
    fn deselected_node_waits_for_its_peer_pods() {
        let nodes = [node(
            "a",
            &[(LABEL_KATA, ""), (LABEL_NODE_INSTALL, INSTALL)],
            &INSTALLED,
        )];
        let p = plan(&nodes, Some(&pool()), "h1", None);
        assert!(p.needs_pods);
        assert!(p.actions.is_empty());
        let pods = [PodRef {
            namespace: "ns".into(),
            name: "p".into(),
            node: Some("a".into()),
        }];
        let p = plan(&nodes, Some(&pool()), "h1", Some(&pods));
        assert!(p.actions.is_empty());
        assert_eq!(p.nodes.waiting_to_uninstall, ["a"]);
        assert_eq!(p.held_by_pods[0].1[0].to_string(), "ns/p");
        let p = plan(&nodes, Some(&pool()), "h1", Some(&[]));
        assert_eq!(p.actions, vec![("a".to_string(), NodeAction::Uninstall)]);
        assert_eq!(p.nodes.uninstalling, ["a"]);
        assert_eq!(p.remaining, 1);
    }

    #[test]
    fn uninstall_progress_and_clean_up() {
        let nodes = [
            node(
                "a",
                &[(LABEL_NODE_INSTALL, UNINSTALL)],
                &[(ANN_STATE, STATE_UNINSTALLING)],
            ),
            node(
                "b",
                &[(LABEL_NODE_INSTALL, UNINSTALL)],
                &[(ANN_STATE, STATE_UNINSTALLED)],
            ),
            node(
                "c",
                &[(LABEL_NODE_INSTALL, UNINSTALL)],
                &[(ANN_STATE, STATE_UNINSTALL_FAILED), (ANN_MESSAGE, "busy")],
            ),
            node("d", &[(LABEL_KATA, ""), (LABEL_NODE_INSTALL, INSTALL)], &[]),
        ];
        let p = plan(&nodes, None, "h1", Some(&[]));
        assert_eq!(
            p.actions,
            vec![
                ("b".to_string(), NodeAction::Clean),
                ("d".to_string(), NodeAction::Clean)
            ]
        );
        assert_eq!(p.nodes.uninstalling, ["a"]);
        assert_eq!(p.nodes.failed_to_uninstall, ["c"]);
        assert_eq!(p.remaining, 2);
        assert_eq!(p.nodes.node_count, 0);
    }

    #[test]
    fn reselected_node_during_uninstall_installs_again() {
        let nodes = [node(
            "a",
            &[("pool", "kata"), (LABEL_NODE_INSTALL, UNINSTALL)],
            &[(ANN_STATE, STATE_UNINSTALLED)],
        )];
        let p = plan(&nodes, Some(&pool()), "h1", None);
        assert_eq!(p.actions, vec![("a".to_string(), NodeAction::Install)]);
        assert_eq!(p.nodes.waiting_to_install, ["a"]);
    }
}
