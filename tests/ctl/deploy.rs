//! `deploy/`: the kustomize overlays render exactly what `ctl install` applies, and those
//! manifests, the OLM bundle and the Subscription path pass a server-side dry run (OLM kinds
//! through the harness's stand-in CRDs).

use std::path::Path;

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::rbac::v1::{ClusterRole, Role};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::support::{Run, ctl, raw};
use crate::harness::{self, Case, Env};

const DEFAULT_NS: &str = "openshift-sandboxed-containers-operator";

pub fn cases() -> Vec<Case> {
    let no_kubectl = which("kubectl")
        .is_none()
        .then(|| "kubectl (for kustomize) is not installed".to_string());
    vec![
        Case::cluster(
            "ctl::install_manifests_equal_the_kustomize_overlays_and_pass_a_server_dry_run",
            overlays,
        )
        .skip_if(no_kubectl),
        Case::cluster(
            "ctl::olm_bundle_and_subscription_pass_a_server_dry_run",
            olm_bundle,
        ),
    ]
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(program))
            .find(|p| p.is_file())
    })
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

fn docs(text: &str) -> Result<Vec<Value>> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text)?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// YAML writers differ in how they print whole numbers (`0` or `0.0`): compare values.
fn normalise(v: Value) -> Value {
    match v {
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && !n.is_i64() && !n.is_u64() => json!(f as i64),
            _ => Value::Number(n),
        },
        Value::Array(a) => Value::Array(a.into_iter().map(normalise).collect()),
        Value::Object(o) => Value::Object(o.into_iter().map(|(k, v)| (k, normalise(v))).collect()),
        other => other,
    }
}

fn key(d: &Value) -> String {
    format!(
        "{}/{}/{}",
        d["kind"].as_str().unwrap_or_default(),
        d["metadata"]["namespace"].as_str().unwrap_or_default(),
        d["metadata"]["name"].as_str().unwrap_or_default()
    )
}

fn by_key(docs: Vec<Value>) -> std::collections::BTreeMap<String, Value> {
    docs.into_iter().map(|d| (key(&d), normalise(d))).collect()
}

/// Server-side dry-run apply of one object, through a dynamic API of its kind.
async fn dry_run_apply(client: &Client, doc: &Value, plural: &str, ns: Option<&str>) -> Result<()> {
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let kind = doc["kind"].as_str().unwrap_or_default();
    let api = harness::dynamic_api(
        client,
        &GroupVersionKind::gvk(group, version, kind),
        plural,
        ns,
    );
    let mut doc = doc.clone();
    if let Some(ns) = ns {
        doc["metadata"]["namespace"] = json!(ns);
    }
    let obj: DynamicObject = serde_json::from_value(doc)?;
    let mut pp = PatchParams::apply("sandboxd-test").force();
    pp.dry_run = true;
    api.patch(&obj.name_any(), &pp, &Patch::Apply(&obj))
        .await
        .with_context(|| format!("server dry run of {kind} {}", obj.name_any()))?;
    Ok(())
}

async fn overlays(env: Env) -> Result<()> {
    for (overlay, flag) in [("vanilla", "--vanilla"), ("openshift", "--openshift")] {
        let dir = root().join("deploy/overlays").join(overlay);
        let out = tokio::process::Command::new("kubectl")
            .arg("kustomize")
            .arg(&dir)
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "kubectl kustomize {overlay}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let kustomized = String::from_utf8(out.stdout)?;
        // No cluster needed to print the manifests.
        let printed = raw(
            &["ctl", "install", flag, "--dry-run", "-o", "yaml"],
            Run::default(),
        )
        .await?
        .ok()?;
        let want = by_key(docs(&kustomized)?);
        let have = by_key(docs(&printed.stdout)?);
        ensure!(
            want.keys().collect::<Vec<_>>() == have.keys().collect::<Vec<_>>(),
            "{overlay}: objects differ: kustomize {:?} vs ctl {:?}",
            want.keys().collect::<Vec<_>>(),
            have.keys().collect::<Vec<_>>()
        );
        for (k, v) in &want {
            ensure!(
                have[k] == *v,
                "{overlay}: {k} differs from the kustomize output"
            );
        }

        // The same manifests, in this test's namespace, pass a server-side dry run.
        let text = kustomized.replace(DEFAULT_NS, &env.ns);
        let file = harness::process::run_dir().join(format!("{}-{overlay}.yaml", env.ns));
        std::fs::write(&file, &text)?;
        let out = tokio::process::Command::new("kubectl")
            .arg("--kubeconfig")
            .arg(&env.cp().kubeconfig_path)
            .args([
                "apply",
                "--server-side",
                "--dry-run=server",
                "--force-conflicts",
                "--field-manager=sandboxd-test",
                "-f",
            ])
            .arg(&file)
            .output()
            .await?;
        ensure!(
            out.status.success(),
            "server dry run of the {overlay} overlay: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let applied = String::from_utf8_lossy(&out.stdout);
        ensure!(
            applied
                .contains("deployment.apps/sandboxd-operator serverside-applied (server dry run)"),
            "{applied}"
        );
    }
    // -n changes every namespace of the printed manifests.
    let printed = ctl(
        &env,
        "elsewhere",
        &["install", "--vanilla", "--dry-run", "-o", "yaml"],
    )
    .await?
    .ok()?;
    ensure!(!printed.stdout.contains(DEFAULT_NS));
    Ok(())
}

async fn olm_bundle(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    super::install::install_olm_crds(&admin).await?;
    let bundle = root().join("deploy/olm/bundle/manifests");
    let mut csv = None;
    for entry in std::fs::read_dir(&bundle)? {
        let path = entry?.path();
        for doc in docs(&std::fs::read_to_string(&path)?)? {
            match doc["kind"].as_str() {
                Some("CustomResourceDefinition") => {
                    dry_run_apply(&admin, &doc, "customresourcedefinitions", None).await?
                }
                Some("ClusterServiceVersion") => {
                    dry_run_apply(&admin, &doc, "clusterserviceversions", Some(&env.ns)).await?;
                    csv = Some(doc);
                }
                other => return Err(anyhow!("unexpected {other:?} in {}", path.display())),
            }
        }
    }
    let csv = csv.context("no ClusterServiceVersion in the bundle")?;
    // What OLM would create from the install strategy is valid for the API server too.
    let strategy = &csv["spec"]["install"]["spec"];
    let deploys: Api<Deployment> = Api::namespaced(admin.clone(), &env.ns);
    let pp = PostParams {
        dry_run: true,
        ..Default::default()
    };
    for d in strategy["deployments"].as_array().context("deployments")? {
        let dep: Deployment = serde_json::from_value(json!({
            "metadata": {"name": d["name"], "labels": d["label"]},
            "spec": d["spec"],
        }))?;
        deploys
            .create(&pp, &dep)
            .await
            .context("the CSV's Deployment")?;
    }
    let croles: Api<ClusterRole> = Api::all(admin.clone());
    for p in strategy["clusterPermissions"]
        .as_array()
        .context("clusterPermissions")?
    {
        let role: ClusterRole = serde_json::from_value(json!({
            "metadata": {"name": env.unique(&format!("csv-{}", p["serviceAccountName"].as_str().unwrap_or("x")))},
            "rules": p["rules"],
        }))?;
        croles
            .create(&pp, &role)
            .await
            .context("the CSV's cluster permissions")?;
    }
    let roles: Api<Role> = Api::namespaced(admin.clone(), &env.ns);
    for p in strategy["permissions"].as_array().context("permissions")? {
        let role: Role = serde_json::from_value(json!({
            "metadata": {"name": format!("csv-{}", p["serviceAccountName"].as_str().unwrap_or("x"))},
            "rules": p["rules"],
        }))?;
        roles
            .create(&pp, &role)
            .await
            .context("the CSV's permissions")?;
    }
    // The seed's Namespace/OperatorGroup/Subscription path and the CatalogSource.
    for file in [
        "deploy/olm/subscription.yaml",
        "deploy/olm/catalog-source.yaml",
    ] {
        for doc in docs(&std::fs::read_to_string(root().join(file))?)? {
            match doc["kind"].as_str() {
                Some("Namespace") => {
                    let mut ns = doc.clone();
                    ns["metadata"]["name"] = json!(env.ns);
                    dry_run_apply(&admin, &ns, "namespaces", None).await?
                }
                Some("OperatorGroup") => {
                    let mut og = doc.clone();
                    og["spec"]["targetNamespaces"] = json!([env.ns]);
                    dry_run_apply(&admin, &og, "operatorgroups", Some(&env.ns)).await?
                }
                Some("Subscription") => {
                    dry_run_apply(&admin, &doc, "subscriptions", Some(&env.ns)).await?
                }
                Some("CatalogSource") => {
                    dry_run_apply(&admin, &doc, "catalogsources", Some(&env.ns)).await?
                }
                other => return Err(anyhow!("unexpected {other:?} in {file}")),
            }
        }
    }
    Ok(())
}
