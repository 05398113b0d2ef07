//! Pure planning of the peer-pods controller: the effective per-node limit, which nodes
//! must change their `kata.peerpods.io/vm` capacity, the JSON patches doing it, and the
//! verdict on the user's secret, configmap and ssh key secret.

use std::collections::BTreeMap;

use crate::api::names::{SSH_KEY_SECRET, SSH_PUBLIC_KEY, VM_RESOURCE};
use crate::config::{CloudSecret, Error as ConfigError, PeerPodsConfig, Problem};

/// What the controller knows of one node.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct NodeView {
    /// The node name.
    pub(crate) name: String,
    /// Its labels.
    pub(crate) labels: BTreeMap<String, String>,
    /// `status.capacity[kata.peerpods.io/vm]`.
    pub(crate) capacity: Option<String>,
    /// `status.allocatable[kata.peerpods.io/vm]`.
    pub(crate) allocatable: Option<String>,
    /// Whether `status.capacity` / `status.allocatable` exist at all.
    pub(crate) has_maps: (bool, bool),
}

/// A change to one node's advertised VM resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NodeAction {
    /// Advertise this many VMs in capacity and allocatable.
    Set(u32),
    /// Stop advertising the resource.
    Remove,
}

/// Whether `labels` carry every pair of `selector` (an empty selector selects nothing, so a
/// PeerPodConfig emptied by mistake never spreads the resource over the whole cluster).
pub(crate) fn selects(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The limit in force: `PeerPodConfig.spec.limit` when set, else the configmap's
/// `PEERPODS_LIMIT_PER_NODE`, else the default. A limit that is not a non-negative integer
/// is refused, naming the key and the value.
pub(crate) fn effective_limit(
    spec_limit: &str,
    configmap_limit: Option<u32>,
) -> Result<u32, Problem> {
    let v = spec_limit.trim();
    if v.is_empty() {
        return Ok(configmap_limit.unwrap_or(crate::config::DEFAULT_LIMIT_PER_NODE));
    }
    v.parse::<u32>().map_err(|_| Problem {
        key: "spec.limit",
        expected: "a non-negative integer as a string, e.g. \"10\"".into(),
        found: Some(spec_limit.to_string()),
    })
}

/// The node changes: with `limit` Some, selected nodes advertise it and the others lose it;
/// with None (peer pods off), every node loses it. Sorted by node name.
pub(crate) fn node_actions(
    nodes: &[NodeView],
    selector: &BTreeMap<String, String>,
    limit: Option<u32>,
) -> Vec<(String, NodeAction)> {
    let mut out: Vec<_> = nodes
        .iter()
        .filter_map(|n| {
            let has = n.capacity.is_some() || n.allocatable.is_some();
            match limit {
                Some(l) if selects(selector, &n.labels) => {
                    let want = l.to_string();
                    let ok = n.capacity.as_deref() == Some(want.as_str())
                        && n.allocatable.as_deref() == Some(want.as_str());
                    (!ok).then(|| (n.name.clone(), NodeAction::Set(l)))
                }
                _ => has.then(|| (n.name.clone(), NodeAction::Remove)),
            }
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

fn pointer(map: &str) -> String {
    format!(
        "/status/{map}/{}",
        VM_RESOURCE.replace('~', "~0").replace('/', "~1")
    )
}

/// The JSON patch (RFC 6902) for `nodes/<name>/status` carrying out `action` on `node`.
pub(crate) fn json_patch(node: &NodeView, action: &NodeAction) -> serde_json::Value {
    let mut ops = Vec::new();
    for (map, present, exists) in [
        ("capacity", node.capacity.is_some(), node.has_maps.0),
        ("allocatable", node.allocatable.is_some(), node.has_maps.1),
    ] {
        match action {
            NodeAction::Set(l) if exists => ops.push(
                serde_json::json!({"op": "add", "path": pointer(map), "value": l.to_string()}),
            ),
            NodeAction::Set(l) => ops.push(serde_json::json!({
                "op": "add", "path": format!("/status/{map}"), "value": {VM_RESOURCE: l.to_string()}
            })),
            NodeAction::Remove if present => {
                ops.push(serde_json::json!({"op": "remove", "path": pointer(map)}))
            }
            NodeAction::Remove => {}
        }
    }
    serde_json::Value::Array(ops)
}

/// What the controller read for the config verdict: `None` when the object does not exist.
#[derive(Clone, Debug, Default)]
pub(crate) struct ConfigInputs {
    /// Name and data of the cloud secret.
    pub(crate) secret: (String, Option<BTreeMap<String, String>>),
    /// Name and data of the configmap.
    pub(crate) configmap: (String, Option<BTreeMap<String, String>>),
    /// Data of `ssh-key-secret`.
    pub(crate) ssh: Option<BTreeMap<String, String>>,
}

/// The verdict on the user's configuration: `Ok(configmap)` or every problem, each naming
/// the object, the key and the expectation (never a secret value).
pub(crate) fn config_verdict(inputs: &ConfigInputs) -> Result<PeerPodsConfig, Vec<String>> {
    let mut problems = Vec::new();
    let cfg = match &inputs.configmap {
        (name, None) => {
            problems.push(format!("ConfigMap {name} not found"));
            None
        }
        (name, Some(data)) => match PeerPodsConfig::from_map(data) {
            Ok(c) => Some(c),
            Err(e) => {
                problems.extend(describe(name, e));
                None
            }
        },
    };
    match &inputs.secret {
        (name, None) => problems.push(format!("Secret {name} not found")),
        (name, Some(data)) => {
            if let Err(e) = CloudSecret::from_map(data) {
                // The secret validator never quotes secret values; keys and expectations only.
                problems.extend(describe(name, e));
            }
        }
    }
    match &inputs.ssh {
        None => problems.push(format!("Secret {SSH_KEY_SECRET} not found")),
        Some(data) => {
            let key = data.get(SSH_PUBLIC_KEY).map(|s| s.trim()).unwrap_or("");
            if !is_ssh_public_key(key) {
                problems.push(format!(
                    "{SSH_KEY_SECRET}: {SSH_PUBLIC_KEY}: expected an OpenSSH public key \
                     (ssh-ed25519, ssh-rsa or ecdsa-sha2-*)"
                ));
            }
        }
    }
    match cfg {
        Some(c) if problems.is_empty() => Ok(c),
        _ => Err(problems),
    }
}

fn describe(name: &str, e: ConfigError) -> Vec<String> {
    match e {
        ConfigError::Invalid { problems, .. } => {
            problems.iter().map(|p| format!("{name}: {p}")).collect()
        }
    }
}

fn is_ssh_public_key(s: &str) -> bool {
    let mut parts = s.split_whitespace();
    let (Some(kind), Some(body)) = (parts.next(), parts.next()) else {
        return false;
    };
    (kind.starts_with("ssh-") || kind.starts_with("ecdsa-sha2-") || kind.starts_with("sk-"))
        && body.len() > 16
        && body
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '+' || c == '/' || c == '=')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(name: &str, labels: &[(&str, &str)], cap: Option<&str>) -> NodeView {
        NodeView {
            name: name.into(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            capacity: cap.map(Into::into),
            allocatable: cap.map(Into::into),
            has_maps: (true, true),
        }
    }

    fn sel() -> BTreeMap<String, String> {
        BTreeMap::from([("kata".to_string(), String::new())])
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn spec_limit_wins_over_the_configmap_and_empty_falls_back() {
        assert_eq!(effective_limit("3", Some(7)), Ok(3));
        assert_eq!(effective_limit("", Some(7)), Ok(7));
        assert_eq!(effective_limit(" ", None), Ok(10));
        assert_eq!(effective_limit("0", None), Ok(0));
    }

    #[test]
    fn invalid_limits_are_refused_naming_the_value() {
        for bad in ["-1", "ten", "1.5", "99999999999"] {
            let p = effective_limit(bad, None).unwrap_err();
            assert_eq!(p.key, "spec.limit");
            assert_eq!(p.found.as_deref(), Some(bad));
        }
    }

    #[test]
    fn selected_nodes_get_the_limit_and_others_lose_it() {
        let nodes = [
            node("a", &[("kata", "")], None),
            node("b", &[("kata", "")], Some("2")),
            node("c", &[], Some("2")),
            node("d", &[], None),
            node("e", &[("kata", "")], Some("3")),
        ];
        assert_eq!(
            node_actions(&nodes, &sel(), Some(3)),
            vec![
                ("a".to_string(), NodeAction::Set(3)),
                ("b".to_string(), NodeAction::Set(3)),
                ("c".to_string(), NodeAction::Remove),
            ]
        );
    }

    #[test]
    fn nothing_to_do_when_every_node_is_right() {
        let nodes = [node("a", &[("kata", "")], Some("3")), node("b", &[], None)];
        assert!(node_actions(&nodes, &sel(), Some(3)).is_empty());
    }

    #[test]
    fn disabling_removes_from_every_node_and_an_empty_selector_selects_none() {
        let nodes = [node("a", &[("kata", "")], Some("3")), node("b", &[], None)];
        assert_eq!(
            node_actions(&nodes, &sel(), None),
            vec![("a".to_string(), NodeAction::Remove)]
        );
        assert_eq!(
            node_actions(&nodes, &BTreeMap::new(), Some(3)),
            vec![("a".to_string(), NodeAction::Remove)]
        );
    }

    #[test]
    fn only_one_map_out_of_date_is_repaired() {
        let mut n = node("a", &[("kata", "")], Some("3"));
        n.allocatable = None;
        assert_eq!(node_actions(&[n], &sel(), Some(3)).len(), 1);
    }

    #[test]
    fn patches_escape_the_resource_name() {
        let n = node("a", &[], Some("2"));
        let p = json_patch(&n, &NodeAction::Set(4));
        assert_eq!(
            p[0],
            serde_json::json!({"op": "add", "path": "/status/capacity/kata.peerpods.io~1vm", "value": "4"})
        );
        assert_eq!(p[1]["path"], "/status/allocatable/kata.peerpods.io~1vm");
        let p = json_patch(&n, &NodeAction::Remove);
        assert_eq!(p.as_array().unwrap().len(), 2);
        assert_eq!(p[0]["op"], "remove");
        let bare = NodeView {
            name: "x".into(),
            ..Default::default()
        };
        assert_eq!(
            json_patch(&bare, &NodeAction::Set(1))[0]["value"],
            serde_json::json!({"kata.peerpods.io/vm": "1"})
        );
    }

    fn good() -> ConfigInputs {
        ConfigInputs {
            secret: (
                "peer-pods-secret".into(),
                Some(map(&[
                    (
                        "AZURE_SUBSCRIPTION_ID",
                        "00000000-0000-0000-0000-000000000000",
                    ),
                    ("AZURE_CLIENT_SECRET", "hunter2-very-secret"),
                    ("AZURE_TENANT_ID", "0a1b2c3d-0000-4000-8000-00000000000e"),
                    ("AZURE_CLIENT_ID", "0a1b2c3d-0000-4000-8000-00000000000c"),
                ])),
            ),
            configmap: (
                "peer-pods-cm".into(),
                Some(map(&[("CLOUD_PROVIDER", "local")])),
            ),
            ssh: Some(map(&[(
                "id_rsa.pub",
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl user@host",
            )])),
        }
    }

    #[test]
    fn a_complete_configuration_is_valid() {
        assert!(config_verdict(&good()).is_ok());
    }

    #[test]
    fn a_missing_secret_key_is_named_without_any_secret_value() {
        let mut i = good();
        i.secret.1.as_mut().unwrap().remove("AZURE_TENANT_ID");
        let problems = config_verdict(&i).unwrap_err();
        let all = problems.join("; ");
        assert!(all.contains("peer-pods-secret: AZURE_TENANT_ID"), "{all}");
        assert!(!all.contains("hunter2"), "{all}");
    }

    #[test]
    fn missing_objects_and_bad_ssh_keys_are_each_reported() {
        let i = ConfigInputs {
            secret: ("s".into(), None),
            configmap: ("cm".into(), None),
            ssh: Some(map(&[("id_rsa.pub", "not a key")])),
        };
        let p = config_verdict(&i).unwrap_err();
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(p[0].contains("ConfigMap cm not found"));
        assert!(p[1].contains("Secret s not found"));
        assert!(p[2].contains("id_rsa.pub"));
    }
}
