//! The OpenShift path (pure). When the `machineconfiguration.openshift.io` API exists the
//! machine-config operator (MCO) installs the runtime, as OpenShift sandboxed containers
//! does: a MachineConfig for the `kata-oc` pool carries the CRI-O drop-in and the kata
//! configuration (and enables the `sandboxed-containers` extension, which brings the kata
//! shim), and a MachineConfigPool `kata-oc` selects the nodes with the kata label. Progress
//! comes from the MCO: its per-node annotations and the pool's status.
//!
//! The MCO's per-node state is translated into the node installer's protocol
//! ([`translate`]), so the same plan and status code serve both platforms.

use base64::Engine;
use kube::Resource;
use kube::api::DynamicObject;
use kube::core::GroupVersionKind;
use kube::discovery::ApiResource;
use serde_json::json;

use super::kataconfig::plan::NodeView;
use super::node_install::{InstallConfig, crio, kata_config};
use crate::api::kataconfig::KataConfig;
use crate::api::names::*;
use crate::k8s::apply::stamp_hash;

/// The API group of MachineConfigs and MachineConfigPools.
pub const GROUP: &str = "machineconfiguration.openshift.io";
/// The MachineConfigPool of the kata nodes.
pub const POOL: &str = "kata-oc";
/// The MachineConfig carrying the runtime configuration.
pub const MACHINE_CONFIG: &str = "50-kata-remote";
/// The label that assigns a MachineConfig to a pool's role.
pub const ROLE_LABEL: &str = "machineconfiguration.openshift.io/role";
/// MCO node annotation: the rendered config the node runs.
pub const ANN_MCO_CURRENT: &str = "machineconfiguration.openshift.io/currentConfig";
/// MCO node annotation: the rendered config the node is moving to.
pub const ANN_MCO_DESIRED: &str = "machineconfiguration.openshift.io/desiredConfig";
/// MCO node annotation: `Done`, `Working`, `Degraded` or `Unreconcilable`.
pub const ANN_MCO_STATE: &str = "machineconfiguration.openshift.io/state";
/// MCO node annotation: why the node is degraded.
pub const ANN_MCO_REASON: &str = "machineconfiguration.openshift.io/reason";
/// Where the RHCOS `sandboxed-containers` extension installs the kata shim.
pub(crate) const SHIM: &str = "/usr/bin/containerd-shim-kata-v2";
/// The RHCOS extension that installs Kata Containers.
pub const EXTENSION: &str = "sandboxed-containers";
/// The prefix of the kata pool's rendered configs.
const RENDERED_PREFIX: &str = "rendered-kata-oc-";

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(GROUP, "v1", kind), plural)
}

/// The MachineConfig API resource.
pub fn machine_config_resource() -> ApiResource {
    resource("MachineConfig", "machineconfigs")
}

/// The MachineConfigPool API resource.
pub fn pool_resource() -> ApiResource {
    resource("MachineConfigPool", "machineconfigpools")
}

fn data_url(content: &str) -> String {
    format!(
        "data:text/plain;charset=utf-8;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(content)
    )
}

fn owned(owner: &KataConfig, mut v: serde_json::Value) -> DynamicObject {
    let owner_ref = owner.controller_owner_ref(&());
    v["metadata"]["ownerReferences"] = json!(owner_ref.into_iter().collect::<Vec<_>>());
    v["metadata"]["labels"][LABEL_MANAGED_BY] = json!(MANAGED_BY);
    let mut obj: DynamicObject =
        serde_json::from_value(v).expect("a static object always deserialises");
    stamp_hash(&mut obj);
    obj
}

/// The MachineConfig for the `kata-oc` pool: the CRI-O drop-in for the `kata-remote`
/// handler, the kata configuration (debug follows `logLevel`), and the extension that
/// installs the shim (hash-stamped).
pub(crate) fn desired_machine_config(owner: &KataConfig, cfg: &InstallConfig) -> DynamicObject {
    let file = |path: &str, content: String| {
        json!({"path": path, "mode": 420, "overwrite": true,
               "contents": {"source": data_url(&content)}})
    };
    owned(
        owner,
        json!({
            "apiVersion": format!("{GROUP}/v1"),
            "kind": "MachineConfig",
            "metadata": {"name": MACHINE_CONFIG, "labels": {ROLE_LABEL: POOL}},
            "spec": {
                "extensions": [EXTENSION],
                "config": {
                    "ignition": {"version": "3.2.0"},
                    "storage": {"files": [
                        file(crio::DROPIN, crio::dropin(SHIM)),
                        file(
                            kata_config::KATA_CONFIG,
                            kata_config::render(cfg, kata_config::GuestPull::Runtime),
                        ),
                    ]},
                },
            },
        }),
    )
}

/// The MachineConfigPool `kata-oc`: the worker configs plus ours, on the kata nodes
/// (hash-stamped).
pub(crate) fn desired_pool(owner: &KataConfig) -> DynamicObject {
    owned(
        owner,
        json!({
            "apiVersion": format!("{GROUP}/v1"),
            "kind": "MachineConfigPool",
            "metadata": {"name": POOL},
            "spec": {
                "machineConfigSelector": {"matchExpressions": [
                    {"key": ROLE_LABEL, "operator": "In", "values": ["worker", POOL]},
                ]},
                "nodeSelector": {"matchLabels": {LABEL_KATA: ""}},
                "paused": false,
            },
        }),
    )
}

/// What the plan needs of the pool's status (written by the MCO).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct PoolView {
    /// The rendered config the pool targets.
    pub(crate) rendered: Option<String>,
    /// Whether that rendered config includes [`MACHINE_CONFIG`].
    pub(crate) includes_ours: bool,
    /// `machineCount`.
    pub(crate) machines: i64,
    /// `updatedMachineCount`.
    pub(crate) updated: i64,
    /// `readyMachineCount`.
    pub(crate) ready: i64,
    /// `degradedMachineCount`.
    pub(crate) degraded: i64,
    /// The message of the pool's `Degraded`/`NodeDegraded` condition, when true.
    pub(crate) degraded_message: Option<String>,
}

impl PoolView {
    /// Reads the pool's status.
    pub(crate) fn from_object(pool: &DynamicObject) -> Self {
        let s = &pool.data["status"];
        let count = |k: &str| s[k].as_i64().unwrap_or(0);
        let includes_ours = s["configuration"]["source"]
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["name"] == MACHINE_CONFIG));
        let degraded_message = s["conditions"].as_array().and_then(|cs| {
            cs.iter()
                .filter(|c| {
                    (c["type"] == "NodeDegraded" || c["type"] == "Degraded")
                        && c["status"] == "True"
                })
                .find_map(|c| c["message"].as_str().map(str::to_string))
        });
        Self {
            rendered: s["configuration"]["name"].as_str().map(str::to_string),
            includes_ours,
            machines: count("machineCount"),
            updated: count("updatedMachineCount"),
            ready: count("readyMachineCount"),
            degraded: count("degradedMachineCount"),
            degraded_message,
        }
    }

    /// What the install still waits on according to the pool, if anything: its rendered
    /// config must include ours and every machine (`selected` of them) be updated and
    /// ready, none degraded.
    pub(crate) fn pending(&self, selected: usize) -> Option<String> {
        if selected == 0 {
            return None;
        }
        if !self.includes_ours {
            return Some(format!(
                "waiting for the machine-config operator to render pool {POOL} with \
                 MachineConfig {MACHINE_CONFIG}"
            ));
        }
        let done = self.machines == selected as i64
            && self.updated == self.machines
            && self.ready == self.machines
            && self.degraded == 0;
        (!done).then(|| {
            let mut s = format!(
                "machine-config pool {POOL}: {} of {} machine(s) updated, {} ready, {} degraded",
                self.updated, self.machines, self.ready, self.degraded
            );
            if let Some(m) = &self.degraded_message {
                s.push_str(&format!(" ({m})"));
            }
            s
        })
    }
}

/// Translates a node as the MCO reports it into the installer protocol the plan reads:
/// the kata label is the install instruction, the MCO's state and rendered configs are the
/// installer's report. A node without the kata label that still runs a rendered config of
/// the kata pool is being moved back to the worker pool (uninstalling).
pub(crate) fn translate(node: &NodeView, pool: Option<&PoolView>, desired_hash: &str) -> NodeView {
    let mut out = NodeView {
        name: node.name.clone(),
        labels: node.labels.clone(),
        annotations: Default::default(),
    };
    let ann = |k: &str| node.annotations.get(k).map(String::as_str);
    let current = ann(ANN_MCO_CURRENT);
    let mut set = |k: &str, v: &str| {
        out.annotations.insert(k.to_string(), v.to_string());
    };
    let target = pool
        .filter(|p| p.includes_ours)
        .and_then(|p| p.rendered.as_deref());
    if node.labels.get(LABEL_KATA).map(String::as_str) == Some("") {
        out.labels.insert(LABEL_NODE_INSTALL.into(), INSTALL.into());
        match ann(ANN_MCO_STATE) {
            Some("Degraded") | Some("Unreconcilable") => {
                set(ANN_STATE, STATE_FAILED);
                set(
                    ANN_MESSAGE,
                    ann(ANN_MCO_REASON)
                        .filter(|r| !r.is_empty())
                        .unwrap_or("the machine-config operator reports the node degraded"),
                );
            }
            Some("Done") if target.is_some() && current == target => {
                set(ANN_STATE, STATE_INSTALLED);
                set(ANN_CONFIG, desired_hash);
            }
            _ if target.is_some() && ann(ANN_MCO_DESIRED) == target => {
                set(ANN_STATE, STATE_INSTALLING)
            }
            _ => {}
        }
    } else if current.is_some_and(|c| c.starts_with(RENDERED_PREFIX)) {
        out.labels
            .insert(LABEL_NODE_INSTALL.into(), UNINSTALL.into());
        set(ANN_STATE, STATE_UNINSTALLING);
    } else if node.labels.contains_key(LABEL_NODE_INSTALL) {
        // Left over from the node installer (platform changed): cleaned.
        set(ANN_STATE, STATE_UNINSTALLED);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::kataconfig::plan::{NodeAction, plan};
    use crate::operator::nodes::{Flavor, Selection};

    fn node(name: &str, kata: bool, anns: &[(&str, &str)]) -> NodeView {
        let mut labels: std::collections::BTreeMap<String, String> =
            [("node-role.kubernetes.io/worker".to_string(), String::new())].into();
        if kata {
            labels.insert(LABEL_KATA.into(), String::new());
        }
        NodeView {
            name: name.into(),
            labels,
            annotations: anns
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    fn pool(json: serde_json::Value) -> PoolView {
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "machineconfiguration.openshift.io/v1", "kind": "MachineConfigPool",
            "metadata": {"name": POOL}, "status": json,
        }))
        .unwrap();
        PoolView::from_object(&obj)
    }

    #[test]
    fn machine_config_carries_crio_dropin_and_kata_config_for_the_pool() {
        let kc = KataConfig::new("k", Default::default());
        let mc = desired_machine_config(&kc, &InstallConfig::new("debug"));
        assert_eq!(mc.data["spec"]["extensions"][0], EXTENSION);
        let labels = mc.metadata.labels.as_ref().unwrap();
        assert_eq!(labels[ROLE_LABEL], POOL);
        let files = mc.data["spec"]["config"]["storage"]["files"]
            .as_array()
            .unwrap();
        let decode = |i: usize| {
            let src = files[i]["contents"]["source"].as_str().unwrap();
            let b64 = src.split_once("base64,").unwrap().1;
            String::from_utf8(
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .unwrap(),
            )
            .unwrap()
        };
        assert_eq!(files[0]["path"], crio::DROPIN);
        assert!(decode(0).contains("[crio.runtime.runtimes.kata-remote]"));
        assert_eq!(files[1]["path"], kata_config::KATA_CONFIG);
        assert!(decode(1).contains("enable_debug = true"));
        let info = desired_machine_config(&kc, &InstallConfig::new("info"));
        assert_ne!(
            info.metadata.annotations.as_ref().unwrap()[crate::k8s::apply::HASH_ANNOTATION],
            mc.metadata.annotations.as_ref().unwrap()[crate::k8s::apply::HASH_ANNOTATION]
        );
        let p = desired_pool(&kc);
        assert_eq!(
            p.data["spec"]["nodeSelector"]["matchLabels"][LABEL_KATA],
            ""
        );
    }

    #[test]
    fn mco_reports_become_node_states_and_the_pool_gates_completion() {
        let p = pool(json!({
            "configuration": {"name": "rendered-kata-oc-1", "source": [{"name": MACHINE_CONFIG}]},
            "machineCount": 3, "updatedMachineCount": 1, "readyMachineCount": 1,
            "degradedMachineCount": 1,
            "conditions": [{"type": "NodeDegraded", "status": "True", "message": "c: disk full"}],
        }));
        let done = [
            (ANN_MCO_CURRENT, "rendered-kata-oc-1"),
            (ANN_MCO_DESIRED, "rendered-kata-oc-1"),
            (ANN_MCO_STATE, "Done"),
        ];
        let nodes = [
            node("a", true, &done),
            node(
                "b",
                true,
                &[
                    (ANN_MCO_CURRENT, "rendered-worker-1"),
                    (ANN_MCO_DESIRED, "rendered-kata-oc-1"),
                    (ANN_MCO_STATE, "Working"),
                ],
            ),
            node(
                "c",
                true,
                &[(ANN_MCO_STATE, "Degraded"), (ANN_MCO_REASON, "disk full")],
            ),
            node("d", false, &[(ANN_MCO_CURRENT, "rendered-kata-oc-1")]),
            node("e", false, &[(ANN_MCO_CURRENT, "rendered-worker-1")]),
        ];
        let views: Vec<NodeView> = nodes.iter().map(|n| translate(n, Some(&p), "h")).collect();
        let sel = Selection::new(None, false, Flavor::OpenShift).unwrap();
        // Only a, b, c are selected: d and e are workers without the pool label here.
        let sel_views: Vec<NodeView> = views
            .into_iter()
            .map(|mut v| {
                if v.labels.contains_key(LABEL_KATA) {
                    v.labels.insert("pool".into(), "kata".into());
                } else {
                    v.labels.remove("node-role.kubernetes.io/worker");
                }
                v
            })
            .collect();
        let pl = plan(&sel_views, Some(&sel), "h", Some(&[]));
        assert_eq!(pl.nodes.installed, ["a"]);
        assert_eq!(pl.nodes.installing, ["b"]);
        assert_eq!(pl.nodes.failed_to_install, ["c"]);
        assert_eq!(pl.failures[0].1, "disk full");
        assert_eq!(pl.nodes.uninstalling, ["d"]);
        assert!(pl.actions.is_empty(), "{:?}", pl.actions);
        let pending = p.pending(3).unwrap();
        assert!(
            pending.contains("1 of 3") && pending.contains("disk full"),
            "{pending}"
        );

        let settled = pool(json!({
            "configuration": {"name": "rendered-kata-oc-1", "source": [{"name": MACHINE_CONFIG}]},
            "machineCount": 3, "updatedMachineCount": 3, "readyMachineCount": 3,
        }));
        assert_eq!(settled.pending(3), None);
        assert!(
            pool(json!({})).pending(1).unwrap().contains("render"),
            "a pool without our config is not done"
        );
        // Before the pool includes our config, a node the MCO says is Done is not installed.
        let v = translate(&node("a", true, &done), Some(&pool(json!({}))), "h");
        assert_eq!(v.annotations.get(ANN_STATE), None);
        // A deselected node still on the kata pool's config loses its label.
        let v = translate(&node("x", true, &done), Some(&p), "h");
        let none = Selection::new(
            Some(
                &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector {
                    match_labels: Some([("pool".to_string(), "kata".to_string())].into()),
                    ..Default::default()
                },
            ),
            false,
            Flavor::OpenShift,
        )
        .unwrap();
        let pl = plan(&[v], Some(&none), "h", Some(&[]));
        assert_eq!(pl.actions, [("x".to_string(), NodeAction::Uninstall)]);
    }
}
