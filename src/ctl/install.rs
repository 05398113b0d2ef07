//! `sandboxd ctl install|uninstall`: the CRDs, namespace, RBAC and operator Deployment of
//! `deploy/` (embedded in the binary), rendered like the kustomize overlays
//! `deploy/overlays/{vanilla,openshift}` and applied with server-side apply.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use kube::api::{Api, ApiResource, DeleteParams, DynamicObject, ListParams, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::{Ctx, Output};
use crate::api::kataconfig::KataConfig;
use crate::api::names::{DEFAULT_NAMESPACE, OPERATOR};
use crate::api::peerpod::PeerPod;
use crate::k8s::FIELD_MANAGER;
use crate::k8s::apply::is_not_found;

/// The CRDs, in the order of `deploy/crds/kustomization.yaml`.
const CRDS: [&str; 3] = [
    include_str!("../../deploy/crds/kataconfigs.kataconfiguration.openshift.io.yaml"),
    include_str!("../../deploy/crds/peerpodconfigs.confidentialcontainers.org.yaml"),
    include_str!("../../deploy/crds/peerpods.confidentialcontainers.org.yaml"),
];
/// The rest of `deploy/base`, in its order.
const BASE: [&str; 3] = [
    include_str!("../../deploy/operator/operator.yaml"),
    include_str!("../../deploy/operator/rbac.yaml"),
    include_str!("../../deploy/caa/rbac.yaml"),
];
/// The patches of `deploy/overlays/vanilla`.
const VANILLA: [&str; 2] = [
    include_str!("../../deploy/overlays/vanilla/namespace.yaml"),
    include_str!("../../deploy/overlays/vanilla/operator-args.yaml"),
];
/// The patches of `deploy/overlays/openshift`.
const OPENSHIFT: [&str; 2] = [
    include_str!("../../deploy/overlays/openshift/namespace.yaml"),
    include_str!("../../deploy/overlays/openshift/operator-args.yaml"),
];

/// The objects `deploy/overlays/openshift` adds.
const OPENSHIFT_RESOURCES: [&str; 1] =
    [include_str!("../../deploy/overlays/openshift/caa-scc.yaml")];

/// OLM package names of an operator serving the same API groups.
const OLM_PACKAGES: [&str; 2] = ["sandboxed-containers-operator", "sandboxd"];

/// Errors of install and uninstall.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An embedded manifest does not parse (a build defect).
    #[error("embedded manifest: {0}")]
    Manifest(String),
    /// The API server refused a request.
    #[error("{what}: {source}")]
    Api {
        /// What was attempted.
        what: String,
        /// Why.
        source: kube::Error,
    },
    /// Another installation of the same API groups exists.
    #[error("{0}")]
    ExistingInstall(String),
    /// Uninstall is refused while objects that need the operator exist.
    #[error("{0}")]
    InUse(String),
    /// `--wait` ran out of time.
    #[error(
        "the operator Deployment {namespace}/{OPERATOR} is not available after {secs}s \
         ({ready}/{want} replicas ready); look at `kubectl -n {namespace} describe deployment \
         {OPERATOR}` and its pods' events"
    )]
    WaitTimeout {
        /// Namespace.
        namespace: String,
        /// How long it waited.
        secs: u64,
        /// Ready replicas.
        ready: i32,
        /// Wanted replicas.
        want: i32,
    },
}

fn api_err(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
    let what = what.into();
    move |source| Error::Api { what, source }
}

/// Which overlay to render.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Platform {
    /// `deploy/overlays/vanilla`.
    Vanilla,
    /// `deploy/overlays/openshift`.
    Openshift,
}

/// Flags of `install`.
#[derive(Debug, clap::Args)]
pub(crate) struct InstallArgs {
    /// Install for OpenShift (default: detected from the `machineconfiguration.openshift.io` API).
    #[arg(long, conflicts_with = "vanilla")]
    pub(crate) openshift: bool,
    /// Install for plain Kubernetes.
    #[arg(long)]
    pub(crate) vanilla: bool,
    /// Print what would be applied (`-o yaml` for the manifests) and change nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// Wait until the operator Deployment is available.
    #[arg(long)]
    pub(crate) wait: bool,
    /// How long `--wait` waits, in seconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout: u64,
    /// The sandboxd image the operator runs (default: the manifest's).
    #[arg(long)]
    pub(crate) image: Option<String>,
    /// Azure flags added to the operator's command line, which hands them on to the CAA
    /// DaemonSet and the image Jobs (the development endpoints exist only as flags).
    #[command(flatten)]
    pub(crate) azure: crate::cloud::azure::EndpointArgs,
}

/// Flags of `uninstall`.
#[derive(Debug, clap::Args)]
pub(crate) struct UninstallArgs {
    /// Keep the CRDs (and with them every KataConfig, PeerPodConfig and PeerPod record).
    #[arg(long)]
    pub(crate) keep_crds: bool,
    /// Keep the namespace (and with it `peer-pods-secret`, `peer-pods-cm`, `ssh-key-secret`).
    #[arg(long)]
    pub(crate) keep_namespace: bool,
}

fn parse_docs(text: &str) -> Result<Vec<Value>, Error> {
    let docs: Vec<Value> =
        serde_saphyr::from_multiple(text).map_err(|e| Error::Manifest(e.to_string()))?;
    Ok(docs.into_iter().filter(|d| !d.is_null()).collect())
}

/// A strategic merge as kustomize does it for these manifests: maps merge, lists of maps
/// with a `name` merge by name, anything else is replaced.
pub(crate) fn strategic_merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                match b.get_mut(k) {
                    Some(existing) => strategic_merge(existing, v),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (Value::Array(b), Value::Array(p))
            if p.iter().all(|i| i.get("name").is_some())
                && b.iter().all(|i| i.get("name").is_some()) =>
        {
            for item in p {
                match b.iter_mut().find(|i| i["name"] == item["name"]) {
                    Some(existing) => strategic_merge(existing, item),
                    None => b.push(item.clone()),
                }
            }
        }
        (b, p) => *b = p.clone(),
    }
}

fn key(doc: &Value) -> (String, String) {
    (
        doc["kind"].as_str().unwrap_or_default().to_string(),
        doc["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
    )
}

/// Every object `install` applies for `platform`, in apply order, with the namespace set to
/// `namespace` and the operator image to `image`.
pub fn render(
    platform: Platform,
    namespace: &str,
    image: Option<&str>,
) -> Result<Vec<Value>, Error> {
    let mut docs = Vec::new();
    let extra: &[&str] = match platform {
        Platform::Vanilla => &[],
        Platform::Openshift => &OPENSHIFT_RESOURCES,
    };
    for text in CRDS.iter().chain(BASE.iter()).chain(extra.iter()) {
        docs.extend(parse_docs(text)?);
    }
    let patches = match platform {
        Platform::Vanilla => VANILLA,
        Platform::Openshift => OPENSHIFT,
    };
    for text in patches {
        for patch in parse_docs(text)? {
            let k = key(&patch);
            let target = docs
                .iter_mut()
                .find(|d| key(d) == k)
                .ok_or_else(|| Error::Manifest(format!("overlay patch matches nothing: {k:?}")))?;
            strategic_merge(target, &patch);
        }
    }
    for doc in &mut docs {
        let kind = doc["kind"].as_str().unwrap_or_default().to_string();
        if kind == "Namespace" {
            doc["metadata"]["name"] = json!(namespace);
        } else if doc["metadata"].get("namespace").is_some() {
            doc["metadata"]["namespace"] = json!(namespace);
        }
        if let Some(subjects) = doc.get_mut("subjects").and_then(Value::as_array_mut) {
            for s in subjects {
                if s.get("namespace").is_some() {
                    s["namespace"] = json!(namespace);
                }
            }
        }
        if let (Some(image), "Deployment") = (image, kind.as_str())
            && let Some(containers) = doc["spec"]["template"]["spec"]["containers"].as_array_mut()
        {
            for c in containers {
                c["image"] = json!(image);
                if let Some(env) = c.get_mut("env").and_then(Value::as_array_mut) {
                    for e in env {
                        if e["name"] == "SANDBOXD_IMAGE" {
                            e["value"] = json!(image);
                        }
                    }
                }
            }
        }
    }
    docs.sort_by_key(|d| kind_order(d["kind"].as_str().unwrap_or_default()));
    Ok(docs)
}

/// Appends `extra` to the operator container's arguments.
fn add_operator_args(docs: &mut [Value], extra: &[String]) {
    if extra.is_empty() {
        return;
    }
    for doc in docs.iter_mut() {
        if doc["kind"] != "Deployment" || doc["metadata"]["name"] != OPERATOR {
            continue;
        }
        if let Some(containers) = doc["spec"]["template"]["spec"]["containers"].as_array_mut() {
            for c in containers {
                if let Some(a) = c.get_mut("args").and_then(Value::as_array_mut) {
                    a.extend(extra.iter().map(|x| json!(x)));
                }
            }
        }
    }
}

fn kind_order(kind: &str) -> u8 {
    match kind {
        "CustomResourceDefinition" => 0,
        "Namespace" => 1,
        "ServiceAccount" => 2,
        "ClusterRole" | "Role" => 3,
        "ClusterRoleBinding" | "RoleBinding" => 4,
        _ => 5,
    }
}

/// The API resource of an object of `deploy/` and whether it is namespaced.
fn resource_of(doc: &Value) -> Result<(ApiResource, bool), Error> {
    let kind = doc["kind"].as_str().unwrap_or_default();
    let api_version = doc["apiVersion"].as_str().unwrap_or_default();
    let (group, version) = api_version.split_once('/').unwrap_or(("", api_version));
    let (plural, namespaced) = match kind {
        "CustomResourceDefinition" => ("customresourcedefinitions", false),
        "Namespace" => ("namespaces", false),
        "ServiceAccount" => ("serviceaccounts", true),
        "ClusterRole" => ("clusterroles", false),
        "ClusterRoleBinding" => ("clusterrolebindings", false),
        "Role" => ("roles", true),
        "RoleBinding" => ("rolebindings", true),
        "Deployment" => ("deployments", true),
        other => return Err(Error::Manifest(format!("unexpected kind {other}"))),
    };
    let gvk = GroupVersionKind::gvk(group, version, kind);
    Ok((ApiResource::from_gvk_with_plural(&gvk, plural), namespaced))
}

fn api_for(client: &Client, doc: &Value) -> Result<Api<DynamicObject>, Error> {
    let (ar, namespaced) = resource_of(doc)?;
    Ok(if namespaced {
        let ns = doc["metadata"]["namespace"].as_str().unwrap_or_default();
        Api::namespaced_with(client.clone(), ns, &ar)
    } else {
        Api::all_with(client.clone(), &ar)
    })
}

fn describe(doc: &Value) -> String {
    let (kind, name) = key(doc);
    match doc["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{kind} {ns}/{name}"),
        None => format!("{kind} {name}"),
    }
}

/// Whether the cluster serves OpenShift's `machineconfiguration.openshift.io` API.
async fn is_openshift(client: &Client) -> Result<bool, Error> {
    let groups = client
        .list_api_groups()
        .await
        .map_err(api_err("discovering API groups"))?;
    Ok(groups
        .groups
        .iter()
        .any(|g| g.name == "machineconfiguration.openshift.io"))
}

fn olm_api(client: &Client, kind: &str, plural: &str) -> Api<DynamicObject> {
    let gvk = GroupVersionKind::gvk("operators.coreos.com", "v1alpha1", kind);
    Api::all_with(
        client.clone(),
        &ApiResource::from_gvk_with_plural(&gvk, plural),
    )
}

async fn list_or_empty(api: &Api<DynamicObject>, what: &str) -> Result<Vec<DynamicObject>, Error> {
    match api.list(&ListParams::default()).await {
        Ok(l) => Ok(l.items),
        Err(e) if is_not_found(&e) => Ok(Vec::new()),
        Err(e) => Err(api_err(format!("listing {what}"))(e)),
    }
}

/// Finds an OLM-managed installation of the same API groups: a Subscription or CSV of the
/// sandboxed containers operator, or one of our CRDs owned by OLM.
pub(crate) async fn find_olm_install(client: &Client) -> Result<Vec<String>, Error> {
    let mut found = Vec::new();
    let subs = list_or_empty(
        &olm_api(client, "Subscription", "subscriptions"),
        "Subscriptions",
    )
    .await?;
    for s in subs {
        let package = s.data["spec"]["name"].as_str().unwrap_or_default();
        if OLM_PACKAGES.contains(&package) {
            found.push(format!(
                "Subscription {}/{} (package {package})",
                s.namespace().unwrap_or_default(),
                s.name_any()
            ));
        }
    }
    let csvs = list_or_empty(
        &olm_api(client, "ClusterServiceVersion", "clusterserviceversions"),
        "ClusterServiceVersions",
    )
    .await?;
    for c in csvs {
        let name = c.name_any();
        if OLM_PACKAGES.iter().any(|p| name.starts_with(&format!("{p}.")))
            // OLM copies a CSV into every watched namespace; report the original.
            && !c.labels().contains_key("olm.copiedFrom")
        {
            found.push(format!(
                "ClusterServiceVersion {}/{name}",
                c.namespace().unwrap_or_default()
            ));
        }
    }
    let crds: Api<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition> =
        Api::all(client.clone());
    for doc in CRDS.iter().flat_map(|t| parse_docs(t).unwrap_or_default()) {
        let name = key(&doc).1;
        let Some(crd) = crds
            .get_opt(&name)
            .await
            .map_err(api_err(format!("reading CRD {name}")))?
        else {
            continue;
        };
        let olm_label = crd
            .labels()
            .keys()
            .any(|k| k == "olm.managed" || k.starts_with("operators.coreos.com/"));
        let csv_owner = crd
            .owner_references()
            .iter()
            .any(|o| o.kind == "ClusterServiceVersion");
        if olm_label || csv_owner {
            found.push(format!("CRD {name} (managed by OLM)"));
        }
    }
    Ok(found)
}

fn existing_install_message(found: &[String]) -> String {
    format!(
        "an OLM-managed installation of OpenShift sandboxed containers already serves the \
         KataConfig and peer-pods APIs: {}. sandboxd uses the same API groups, so two operators \
         would fight over every KataConfig. Either keep using that installation (manage it \
         through OLM), or remove it first: delete every KataConfig and wait until it is gone, \
         then `oc delete subscription <name> -n <namespace>` and `oc delete csv <name> -n \
         <namespace>`, then run `sandboxd ctl install` again",
        found.join(", ")
    )
}

/// `sandboxd ctl install`.
pub(crate) async fn install(ctx: &Ctx, args: InstallArgs) -> anyhow::Result<()> {
    let explicit = if args.openshift {
        Some(Platform::Openshift)
    } else if args.vanilla {
        Some(Platform::Vanilla)
    } else {
        None
    };
    if args.dry_run && ctx.output != Output::Table {
        let platform = match explicit {
            Some(p) => p,
            None => detect(&ctx.client().await?).await?,
        };
        let mut docs = render(platform, &ctx.namespace, args.image.as_deref())?;
        add_operator_args(&mut docs, &args.azure.to_args());
        print!("{}", manifests_text(ctx.output, &docs)?);
        return Ok(());
    }
    let client = ctx.client().await?;
    let platform = match explicit {
        Some(p) => p,
        None => detect(&client).await?,
    };
    let mut docs = render(platform, &ctx.namespace, args.image.as_deref())?;
    add_operator_args(&mut docs, &args.azure.to_args());
    if args.dry_run {
        println!("would apply ({platform:?}):");
        for doc in &docs {
            println!("  {}", describe(doc));
        }
        return Ok(());
    }
    let found = find_olm_install(&client).await?;
    if !found.is_empty() {
        return Err(Error::ExistingInstall(existing_install_message(&found)).into());
    }
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    for doc in &docs {
        let api = api_for(&client, doc)?;
        let name = key(doc).1;
        api.patch(&name, &pp, &Patch::Apply(doc))
            .await
            .map_err(api_err(format!("applying {}", describe(doc))))?;
        println!("applied {}", describe(doc));
        if doc["kind"] == "CustomResourceDefinition" {
            wait_established(&client, &name).await?;
        }
    }
    println!(
        "installed sandboxd ({}) in namespace {}",
        match platform {
            Platform::Vanilla => "Kubernetes",
            Platform::Openshift => "OpenShift",
        },
        ctx.namespace
    );
    if args.wait {
        wait_available(&client, &ctx.namespace, Duration::from_secs(args.timeout)).await?;
    }
    Ok(())
}

async fn detect(client: &Client) -> Result<Platform, Error> {
    Ok(if is_openshift(client).await? {
        Platform::Openshift
    } else {
        Platform::Vanilla
    })
}

/// The manifests as multi-document YAML or a JSON `List`.
pub(crate) fn manifests_text(output: Output, docs: &[Value]) -> anyhow::Result<String> {
    Ok(match output {
        Output::Json => {
            serde_json::to_string_pretty(
                &json!({"apiVersion": "v1", "kind": "List", "items": docs}),
            )? + "\n"
        }
        _ => {
            let mut s = String::new();
            for d in docs {
                s.push_str("---\n");
                s.push_str(&serde_saphyr::to_string(d)?);
            }
            s
        }
    })
}

async fn wait_established(client: &Client, name: &str) -> Result<(), Error> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for _ in 0..60 {
        let crd = api
            .get(name)
            .await
            .map_err(api_err(format!("reading CRD {name}")))?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(())
}

/// Waits until the operator Deployment is available, printing progress as it changes.
pub(crate) async fn wait_available(
    client: &Client,
    namespace: &str,
    timeout: Duration,
) -> Result<(), Error> {
    let api: Api<Deployment> = Api::namespaced(client.clone(), namespace);
    let start = std::time::Instant::now();
    let mut last = None;
    loop {
        let d = api
            .get_opt(OPERATOR)
            .await
            .map_err(api_err("reading the operator Deployment"))?;
        let want = d
            .as_ref()
            .and_then(|d| d.spec.as_ref())
            .and_then(|s| s.replicas)
            .unwrap_or(1);
        let status = d
            .as_ref()
            .and_then(|d| d.status.clone())
            .unwrap_or_default();
        let ready = status.ready_replicas.unwrap_or(0);
        let available = status
            .conditions
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Available" && c.status == "True")
            && status.updated_replicas.unwrap_or(0) >= want
            && status.available_replicas.unwrap_or(0) >= want;
        if last != Some(ready) {
            eprintln!(
                "waiting for the operator: {} ready",
                super::output::progress_bar(ready.into(), want.into(), 20)
            );
            last = Some(ready);
        }
        if available {
            println!("operator available ({ready}/{want} replicas ready)");
            return Ok(());
        }
        if start.elapsed() >= timeout {
            return Err(Error::WaitTimeout {
                namespace: namespace.to_string(),
                secs: timeout.as_secs(),
                ready,
                want,
            });
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// `sandboxd ctl uninstall`.
pub(crate) async fn uninstall(ctx: &Ctx, args: UninstallArgs) -> anyhow::Result<()> {
    let client = ctx.client().await?;
    let kataconfigs: Api<KataConfig> = Api::all(client.clone());
    match kataconfigs.list(&ListParams::default()).await {
        Ok(list) if !list.items.is_empty() => {
            let names: Vec<String> = list.items.iter().map(|k| k.name_any()).collect();
            return Err(Error::InUse(format!(
                "KataConfig {} still exists: the operator must first remove kata from the nodes. \
                 Delete it (`kubectl delete kataconfig {}`), wait until it is gone \
                 (`sandboxd ctl status --watch`), then run `sandboxd ctl uninstall` again",
                names.join(", "),
                names[0]
            ))
            .into());
        }
        Ok(_) => {}
        Err(e) if is_not_found(&e) => {}
        Err(e) => return Err(api_err("listing KataConfigs")(e).into()),
    }
    if !args.keep_crds {
        let peerpods: Api<PeerPod> = Api::all(client.clone());
        match peerpods.list(&ListParams::default()).await {
            Ok(list) if !list.items.is_empty() => {
                return Err(Error::InUse(format!(
                    "{} PeerPod record(s) still exist, so pod VMs may still run: delete the peer \
                     pods (pods with runtimeClassName kata-remote) and wait until `sandboxd ctl \
                     vm list` is empty, or pass --keep-crds",
                    list.items.len()
                ))
                .into());
            }
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_err("listing PeerPods")(e).into()),
        }
    }
    let docs = render(Platform::Vanilla, &ctx.namespace, None)?;
    let dp = DeleteParams::background();
    for doc in docs.iter().rev() {
        match doc["kind"].as_str().unwrap_or_default() {
            "CustomResourceDefinition" if args.keep_crds => continue,
            "Namespace" if args.keep_namespace => continue,
            _ => {}
        }
        let api = api_for(&client, doc)?;
        let name = key(doc).1;
        match api.delete(&name, &dp).await {
            Ok(_) => println!("deleted {}", describe(doc)),
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(api_err(format!("deleting {}", describe(doc)))(e).into()),
        }
    }
    println!("uninstalled sandboxd from namespace {}", ctx.namespace);
    if ctx.namespace != DEFAULT_NAMESPACE && args.keep_namespace {
        println!("kept namespace {}", ctx.namespace);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
        docs.iter()
            .find(|d| key(d) == (kind.to_string(), name.to_string()))
            .unwrap_or_else(|| panic!("{kind} {name} missing"))
    }

    #[test]
    fn overlays_set_the_platform_flag_and_namespace_labels() {
        let v = render(Platform::Vanilla, DEFAULT_NAMESPACE, None).unwrap();
        let o = render(Platform::Openshift, DEFAULT_NAMESPACE, None).unwrap();
        let args = |docs: &[Value]| {
            find(docs, "Deployment", OPERATOR)["spec"]["template"]["spec"]["containers"][0]["args"]
                .clone()
        };
        assert_eq!(args(&v), json!(["operator", "--platform=kubernetes"]));
        assert_eq!(args(&o), json!(["operator", "--platform=openshift"]));
        let labels = |docs: &[Value]| {
            find(docs, "Namespace", DEFAULT_NAMESPACE)["metadata"]["labels"].clone()
        };
        assert_eq!(
            labels(&v)["pod-security.kubernetes.io/enforce"],
            "privileged"
        );
        assert_eq!(labels(&o)["openshift.io/cluster-monitoring"], "true");
        assert!(labels(&v).get("openshift.io/cluster-monitoring").is_none());
        // Everything else is the same, but OpenShift's CAA and node agent relay may use the
        // privileged SCC.
        assert_eq!(v.len() + 4, o.len());
        for name in ["sandboxd-caa-scc", "sandboxd-caa-relay-scc"] {
            let scc = find(&o, "ClusterRole", name);
            assert_eq!(scc["rules"][0]["resourceNames"], json!(["privileged"]));
            assert_eq!(scc["rules"][0]["verbs"], json!(["use"]));
            assert!(v.iter().all(|d| d["metadata"]["name"] != name));
        }
    }

    #[test]
    fn namespace_and_image_are_rewritten_everywhere() {
        let docs = render(
            Platform::Vanilla,
            "other",
            Some("registry.example/sandboxd:1"),
        )
        .unwrap();
        let text = serde_json::to_string(&docs).unwrap();
        assert!(!text.contains(DEFAULT_NAMESPACE), "{text}");
        let d = find(&docs, "Deployment", OPERATOR);
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        assert_eq!(c["image"], "registry.example/sandboxd:1");
        assert!(
            c["env"]
                .as_array()
                .unwrap()
                .iter()
                .any(|e| e["name"] == "SANDBOXD_IMAGE"
                    && e["value"] == "registry.example/sandboxd:1")
        );
        find(&docs, "Namespace", "other");
    }

    #[test]
    fn development_endpoint_flags_reach_only_the_operators_command_line() {
        let mut docs = render(Platform::Vanilla, DEFAULT_NAMESPACE, None).unwrap();
        let azure = crate::cloud::azure::EndpointArgs::development("http://10.0.0.1:8080/");
        add_operator_args(&mut docs, &azure.to_args());
        let d = find(&docs, "Deployment", OPERATOR);
        let c = &d["spec"]["template"]["spec"]["containers"][0];
        let args: Vec<&str> = c["args"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert_eq!(
            args[args.len() - 2..],
            ["--dev-arm-endpoint", "http://10.0.0.1:8080/"]
        );
        assert_eq!(args[0], "operator");
        let text = serde_json::to_string(&docs).unwrap();
        assert_eq!(text.matches("10.0.0.1:8080").count(), 1, "{text}");
    }

    #[test]
    fn crds_come_first_and_the_deployment_last() {
        let docs = render(Platform::Vanilla, DEFAULT_NAMESPACE, None).unwrap();
        assert_eq!(docs[0]["kind"], "CustomResourceDefinition");
        assert_eq!(docs.last().unwrap()["kind"], "Deployment");
        assert_eq!(
            docs.iter()
                .filter(|d| d["kind"] == "CustomResourceDefinition")
                .count(),
            crate::api::all_crds().len()
        );
    }

    #[test]
    fn strategic_merge_merges_named_lists() {
        let mut base = json!({"c": [{"name": "a", "args": ["x"], "image": "i"}, {"name": "b"}]});
        strategic_merge(
            &mut base,
            &json!({"c": [{"name": "a", "args": ["y", "z"]}]}),
        );
        assert_eq!(
            base,
            json!({"c": [{"name": "a", "args": ["y", "z"], "image": "i"}, {"name": "b"}]})
        );
    }
}
