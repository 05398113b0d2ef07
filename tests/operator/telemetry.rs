//! What the operator tells people besides the status: Events on each transition of its
//! condition, and `/metrics` with reconcile counts, errors and durations.

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Event;
use k8s_openapi::api::rbac::v1::ClusterRoleBinding;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use sandboxd::api::names::*;
use serde_json::json;
use tower::ServiceExt;

use super::support::*;
use crate::harness::{Case, Env, eventually};

pub fn cases() -> Vec<Case> {
    vec![Case::cluster_exclusive(
        "operator::transitions_publish_events_and_metrics_count_reconciles_errors_and_durations",
        events_and_metrics,
    )]
}

/// The body of a response as text.
async fn body_text(body: axum::body::Body) -> Result<String> {
    let bytes = axum::body::to_bytes(body, 1 << 20).await?;
    Ok(String::from_utf8(bytes.to_vec())?)
}

/// The operator's Events about KataConfig `name`, oldest first, as (type, reason).
async fn events(f: &Fixture, name: &str) -> Result<Vec<(String, String, String)>> {
    let api: Api<Event> = Api::all(f.admin.clone());
    let list = api
        .list(&ListParams::default().fields(&format!(
            "involvedObject.kind=KataConfig,involvedObject.name={name}"
        )))
        .await?;
    let mut items: Vec<_> = list
        .items
        .into_iter()
        .filter(|e| e.reporting_component.as_deref() == Some("sandboxd-operator"))
        .collect();
    items.sort_by_key(|e| {
        e.event_time
            .as_ref()
            .map(|t| t.0)
            .or(e.first_timestamp.as_ref().map(|t| t.0))
    });
    Ok(items
        .into_iter()
        .map(|e| {
            (
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default(),
            )
        })
        .collect())
}

/// A metric's value from the text exposition (`name{labels} value`).
fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

async fn events_and_metrics(env: Env) -> Result<()> {
    let mut f = Fixture::new(&env).await?;
    let a = f.node("ev-a", true).await?;
    let op = f.start();
    let name = env.unique("kc");
    f.create(&f.kataconfig(&name)).await?;
    f.wait_status(&name, "waiting", |kc| {
        kata_nodes(kc).waiting_to_install.len() == 1
    })
    .await?;
    f.report(
        &a,
        STATE_FAILED,
        Some("kata shim containerd-shim-kata-v2 not found"),
    )
    .await?;
    f.wait_status(&name, "failed", |kc| {
        in_progress(kc).is_some_and(|(_, r, _)| r == "Failed")
    })
    .await?;
    f.report(&a, STATE_INSTALLED, None).await?;
    f.wait_status(&name, "done", |kc| {
        in_progress(kc).is_some_and(|(s, r, _)| s == "False" && r.is_empty())
    })
    .await?;
    let seen = eventually("the three transition Events", WAIT, || async {
        let ev = events(&f, &name).await?;
        Ok((ev.len() >= 3).then_some(ev))
    })
    .await?;
    let kinds: Vec<(&str, &str)> = seen
        .iter()
        .map(|(t, r, _)| (t.as_str(), r.as_str()))
        .collect();
    ensure!(
        kinds
            == [
                ("Normal", "Installing"),
                ("Warning", "Failed"),
                ("Normal", "Installed")
            ],
        "{seen:?}"
    );
    ensure!(seen[1].2.contains("not found"), "{seen:?}");

    // A reconcile that cannot write counts as an error: take the operator's cluster
    // permissions away, change the spec, give them back.
    let errors_before = op.metrics.reconcile_count("api");
    let bindings: Api<ClusterRoleBinding> = Api::all(f.admin.clone());
    bindings
        .delete(
            &f.cluster_rbac_name("sandboxd-operator"),
            &DeleteParams::default(),
        )
        .await?;
    f.kcs()
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"checkNodeEligibility": false, "logLevel": "warn"}})),
        )
        .await?;
    let failed = eventually("a failed reconcile", WAIT, || async {
        let n = op.metrics.reconcile_count("api");
        Ok((n > errors_before).then_some(n))
    })
    .await;
    f.restore_rbac().await?;
    failed?;
    let kc = f
        .wait_status(&name, "the new generation observed", |kc| {
            kc.status.as_ref().and_then(|s| s.observed_generation) == kc.metadata.generation
        })
        .await?;
    ensure!(kc.metadata.generation.unwrap_or_default() >= 2);

    // /metrics, through the same router the operator serves.
    let mut registry = sandboxd::telemetry::Metrics::for_component("operator");
    op.metrics.register(registry.registry_mut());
    let router =
        sandboxd::telemetry::router(registry.finish(), sandboxd::telemetry::Readiness::default());
    let resp = router
        .oneshot(
            http::Request::get("/metrics")
                .body(axum::body::Body::empty())
                .context("request")?,
        )
        .await?;
    ensure!(resp.status() == 200);
    let text = body_text(resp.into_body()).await?;
    let ok = metric(&text, "sandboxd_operator_reconciles_total{result=\"ok\"}").unwrap_or(0.0);
    let api_errors =
        metric(&text, "sandboxd_operator_reconciles_total{result=\"api\"}").unwrap_or(0.0);
    let passes = metric(&text, "sandboxd_operator_reconcile_duration_seconds_count").unwrap_or(0.0);
    let sum = metric(&text, "sandboxd_operator_reconcile_duration_seconds_sum").unwrap_or(0.0);
    ensure!(ok >= 3.0 && api_errors >= 1.0, "{text}");
    ensure!(passes == ok + api_errors + other_errors(&text), "{text}");
    ensure!(sum > 0.0, "{text}");
    ensure!(
        metric(&text, "sandboxd_operator_writes_total{kind=\"status\"}").unwrap_or(0.0) >= 3.0,
        "{text}"
    );
    ensure!(
        metric(
            &text,
            "sandboxd_operator_writes_total{kind=\"RuntimeClass\"}"
        ) == Some(1.0),
        "{text}"
    );

    f.kcs().delete(&name, &DeleteParams::default()).await?;
    f.uninstall_as_installer(&name).await?;
    f.assert_clean().await?;
    op.stop().await?;
    f.teardown().await
}

/// Reconcile errors other than `api` (conflicts, for example).
fn other_errors(text: &str) -> f64 {
    text.lines()
        .filter(|l| {
            l.starts_with("sandboxd_operator_reconciles_total{")
                && !l.contains("result=\"ok\"")
                && !l.contains("result=\"api\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}
