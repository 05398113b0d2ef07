//! The status of a KataConfig, rebuilt from a plan (pure), and the comparison that keeps
//! the operator from writing an unchanged status.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use super::plan::{Plan, PodRef};
use crate::api::kataconfig::{CONDITION_IN_PROGRESS, KataConfigStatus, reasons};
use crate::api::names::RUNTIME_CLASS;
use crate::k8s::conditions;

/// How many pods or nodes a message names before it only counts the rest.
const NAMED: usize = 5;

/// Where the KataConfig is in its life.
#[derive(Clone, Debug)]
pub(crate) enum Phase<'a> {
    /// Installed or installing on the selected nodes.
    Active,
    /// Another KataConfig is the active one; this one is ignored.
    Duplicate {
        /// The active KataConfig.
        active: &'a str,
    },
    /// The selector is invalid.
    InvalidSpec(String),
    /// Deleted, waiting for pods that use the runtime.
    Blocked(&'a [PodRef]),
    /// Deleted, cleaning nodes.
    Uninstalling,
}

fn list(names: &[String]) -> String {
    let mut s = names
        .iter()
        .take(NAMED)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMED {
        s.push_str(&format!(" and {} more", names.len() - NAMED));
    }
    s
}

fn pods_list(pods: &[PodRef]) -> String {
    let names: Vec<String> = pods.iter().map(ToString::to_string).collect();
    list(&names)
}

fn failures(plan: &Plan) -> Option<String> {
    if plan.failures.is_empty() {
        return None;
    }
    let mut parts: Vec<String> = plan
        .failures
        .iter()
        .take(NAMED)
        .map(|(n, why)| format!("{n}: {why}"))
        .collect();
    if plan.failures.len() > NAMED {
        parts.push(format!("{} more", plan.failures.len() - NAMED));
    }
    Some(format!("failed on {}", parts.join("; ")))
}

/// The `InProgress` condition for a plan.
pub(crate) fn in_progress(plan: &Plan, phase: &Phase<'_>, generation: Option<i64>) -> Condition {
    let k = &plan.nodes;
    let cond = |status, reason: &str, message: String| {
        conditions::new(CONDITION_IN_PROGRESS, status, reason, message, generation)
    };
    match phase {
        Phase::Duplicate { active } => cond(
            false,
            reasons::FAILED,
            format!(
                "ignored: KataConfig {active} already exists and only one KataConfig may exist; \
                 delete this one"
            ),
        ),
        Phase::InvalidSpec(why) => cond(false, reasons::FAILED, why.clone()),
        Phase::Blocked(pods) => cond(
            true,
            reasons::BLOCKED_BY_EXISTING_KATA_PODS,
            format!(
                "uninstall waits for {} pod(s) using runtime class {RUNTIME_CLASS}: {}",
                pods.len(),
                pods_list(pods)
            ),
        ),
        Phase::Uninstalling => {
            let mut parts = Vec::new();
            if !k.uninstalling.is_empty() {
                parts.push(format!(
                    "waiting for the node installer on {}",
                    list(&k.uninstalling)
                ));
            }
            parts.extend(plan.pending.iter().cloned());
            if let Some(f) = failures(plan) {
                parts.push(f);
            }
            if parts.is_empty() {
                parts.push("removing the runtime class and the node installer".into());
            }
            cond(true, reasons::UNINSTALLING, parts.join("; "))
        }
        Phase::Active => {
            let busy = !k.waiting_to_install.is_empty()
                || !k.installing.is_empty()
                || !k.uninstalling.is_empty()
                || !k.waiting_to_uninstall.is_empty()
                || !plan.pending.is_empty();
            let mut parts = vec![format!(
                "installed on {} of {} node(s)",
                k.ready_node_count, k.node_count
            )];
            if !k.installing.is_empty() {
                parts.push(format!("installing on {}", list(&k.installing)));
            }
            if !k.waiting_to_install.is_empty() {
                parts.push(format!(
                    "waiting for the node installer on {}",
                    list(&k.waiting_to_install)
                ));
            }
            if !k.uninstalling.is_empty() {
                parts.push(format!("removing from {}", list(&k.uninstalling)));
            }
            for (node, pods) in &plan.held_by_pods {
                parts.push(format!(
                    "node {node} keeps the runtime while {} pod(s) run there: {}",
                    pods.len(),
                    pods_list(pods)
                ));
            }
            parts.extend(plan.pending.iter().cloned());
            if let Some(f) = failures(plan) {
                parts.push(f);
            }
            let message = parts.join("; ");
            if busy {
                let update = plan.had_installed
                    || !k.uninstalling.is_empty()
                    || !k.waiting_to_uninstall.is_empty();
                let reason = if update {
                    reasons::UPDATING
                } else {
                    reasons::INSTALLING
                };
                cond(true, reason, message)
            } else if !plan.failures.is_empty() {
                cond(false, reasons::FAILED, message)
            } else if let Some((running, reason, why)) = &plan.pod_vm_image {
                cond(*running, reason, format!("{message}; {why}"))
            } else {
                // Done: False with no reason, as the seed guide reads it.
                cond(false, "", message)
            }
        }
    }
}

/// The full status for a plan, merged into the previous conditions (transition times kept).
pub(crate) fn build(
    previous: Option<&KataConfigStatus>,
    plan: &Plan,
    phase: &Phase<'_>,
    generation: Option<i64>,
) -> KataConfigStatus {
    let mut conds = previous.map(|s| s.conditions.clone()).unwrap_or_default();
    conditions::merge(&mut conds, in_progress(plan, phase, generation));
    let runtime_classes = match phase {
        Phase::Active => vec![RUNTIME_CLASS.to_string()],
        _ => Vec::new(),
    };
    let kata_nodes = match phase {
        Phase::Duplicate { .. } | Phase::InvalidSpec(_) => None,
        _ => Some(plan.nodes.clone()),
    };
    KataConfigStatus {
        runtime_classes,
        kata_nodes,
        conditions: conds,
        observed_generation: generation,
    }
}

/// Whether two statuses differ in anything but condition timestamps.
pub(crate) fn differs(a: Option<&KataConfigStatus>, b: &KataConfigStatus) -> bool {
    let Some(a) = a else { return true };
    a.runtime_classes != b.runtime_classes
        || a.kata_nodes != b.kata_nodes
        || a.observed_generation != b.observed_generation
        || !conditions::lists_equal_ignoring_time(&a.conditions, &b.conditions)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_with(f: impl FnOnce(&mut Plan)) -> Plan {
        let mut p = Plan::default();
        f(&mut p);
        p
    }

    #[test]
    fn done_is_false_without_reason_and_rebuilding_is_not_a_change() {
        let p = plan_with(|p| {
            p.nodes.installed = vec!["a".into()];
            p.nodes.node_count = 1;
            p.nodes.ready_node_count = 1;
        });
        let s1 = build(None, &p, &Phase::Active, Some(3));
        let c = &s1.conditions[0];
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", ""));
        assert_eq!(s1.runtime_classes, ["kata-remote"]);
        let s2 = build(Some(&s1), &p, &Phase::Active, Some(3));
        assert!(!differs(Some(&s1), &s2));
        let s3 = build(Some(&s1), &p, &Phase::Active, Some(4));
        assert!(differs(Some(&s1), &s3));
    }

    #[test]
    fn first_install_is_installing_later_changes_are_updating() {
        let p = plan_with(|p| p.nodes.waiting_to_install = vec!["a".into()]);
        let c = in_progress(&p, &Phase::Active, None);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "Installing")
        );
        assert!(
            c.message.contains("waiting for the node installer on a"),
            "{}",
            c.message
        );
        let p = plan_with(|p| {
            p.nodes.waiting_to_install = vec!["b".into()];
            p.had_installed = true;
        });
        assert_eq!(in_progress(&p, &Phase::Active, None).reason, "Updating");
    }

    #[test]
    fn the_pod_vm_image_job_shows_once_the_nodes_are_done() {
        let image = Some((true, "PodVMImageJobRunning", "Job x runs".to_string()));
        let p = plan_with(|p| {
            p.nodes.waiting_to_install = vec!["a".into()];
            p.pod_vm_image = image.clone();
        });
        assert_eq!(in_progress(&p, &Phase::Active, None).reason, "Installing");
        let p = plan_with(|p| p.pod_vm_image = image.clone());
        let c = in_progress(&p, &Phase::Active, None);
        assert_eq!(
            (c.status.as_str(), c.reason.as_str()),
            ("True", "PodVMImageJobRunning")
        );
        assert!(c.message.contains("Job x runs"), "{}", c.message);
    }

    #[test]
    fn failures_name_node_and_reason() {
        let p = plan_with(|p| {
            p.nodes.failed_to_install = vec!["a".into()];
            p.failures = vec![("a".into(), "kata shim not found".into())];
        });
        let c = in_progress(&p, &Phase::Active, None);
        assert_eq!((c.status.as_str(), c.reason.as_str()), ("False", "Failed"));
        assert!(
            c.message.contains("a: kata shim not found"),
            "{}",
            c.message
        );
    }

    #[test]
    fn blocked_uninstall_names_first_pods_and_count() {
        let pods: Vec<PodRef> = (0..7)
            .map(|i| PodRef {
                namespace: "ns".into(),
                name: format!("p{i}"),
                node: None,
            })
            .collect();
        let c = in_progress(&Plan::default(), &Phase::Blocked(&pods), None);
        assert_eq!(c.reason, "BlockedByExistingKataPods");
        assert!(c.message.contains("7 pod(s)"), "{}", c.message);
        assert!(
            c.message.contains("ns/p0") && c.message.contains("2 more"),
            "{}",
            c.message
        );
    }
}
