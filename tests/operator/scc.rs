//! OpenShift's SecurityContextConstraints admission, for every pod sandboxd ships: the
//! operator Deployment of the OpenShift overlay, and the webhook Deployment, the pod VM
//! image Jobs and the CAA DaemonSet the operator generates. The SCC CRD and OpenShift's
//! default SCCs (`tests/fixtures/openshift/default-sccs.yaml`) are installed into the test
//! control plane with the deployed RBAC (the OpenShift overlay included); which SCCs a pod's
//! ServiceAccount may use is asked of the real authorizer (SubjectAccessReview, verb `use`),
//! as OpenShift's admission does, and each pod is checked against them in OpenShift's order
//! (priority, then the most restrictive first).
//!
//! The check covers the fields sandboxd's pods set: privileged containers, host network,
//! PID, IPC and ports, volume types (hostPath needs `allowHostDirVolumePlugin`), added
//! capabilities, privilege escalation, `runAsUser` against the strategy (MustRunAsRange
//! against the namespace's `openshift.io/sa.scc.uid-range`, MustRunAsNonRoot, RunAsAny),
//! `fsGroup` and supplemental groups against MustRunAs, seccomp profiles and a read-only
//! root filesystem requirement. SELinux and sysctls are not checked (sandboxd sets none).

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SubjectAccessReview, SubjectAccessReviewSpec,
};
use k8s_openapi::api::core::v1::{Namespace, PodSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::discovery::ApiResource;
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use crate::harness::{self, Case, Env};

const UID_RANGE: (i64, i64) = (1_000_650_000, 10_000);

pub fn cases() -> Vec<Case> {
    vec![Case::cluster(
        "operator::every_shipped_pod_is_admitted_by_openshifts_default_sccs_caa_by_privileged_the_rest_by_restricted_v2",
        scc_admission,
    )]
}

fn scc_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &kube::core::GroupVersionKind::gvk(
            "security.openshift.io",
            "v1",
            "SecurityContextConstraints",
        ),
        "securitycontextconstraints",
    )
}

/// Whether `list` (SCC strings; `*` = any) holds `item`.
fn allows(scc: &Value, field: &str, item: &str) -> bool {
    scc[field]
        .as_array()
        .is_some_and(|l| l.iter().any(|v| v == "*" || v.as_str() == Some(item)))
}

fn flag(scc: &Value, field: &str) -> bool {
    scc[field].as_bool().unwrap_or(false)
}

fn in_range(v: i64, (min, size): (i64, i64)) -> bool {
    v >= min && v < min + size
}

/// The volume type of a pod volume, as SCCs name it.
fn volume_type(v: &Value) -> String {
    v.as_object()
        .and_then(|o| o.keys().find(|k| *k != "name").cloned())
        .unwrap_or_default()
}

/// Why `scc` refuses `pod` (empty: admitted).
fn refusals(scc: &Value, pod: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let name = scc["metadata"]["name"].as_str().unwrap_or_default();
    let mut no = |why: String| out.push(format!("{name}: {why}"));
    for (field, allow) in [
        ("hostNetwork", "allowHostNetwork"),
        ("hostPID", "allowHostPID"),
        ("hostIPC", "allowHostIPC"),
    ] {
        if pod[field] == true && !flag(scc, allow) {
            no(format!("{field} is not allowed"));
        }
    }
    for v in pod["volumes"].as_array().cloned().unwrap_or_default() {
        let t = volume_type(&v);
        if !allows(scc, "volumes", &t) {
            no(format!("volume type {t} is not allowed"));
        }
        if t == "hostPath" && !flag(scc, "allowHostDirVolumePlugin") {
            no("hostPath volumes are not allowed".into());
        }
    }
    let pod_sc = &pod["securityContext"];
    let uid_strategy = scc["runAsUser"]["type"].as_str().unwrap_or("RunAsAny");
    let fs_strategy = scc["fsGroup"]["type"].as_str().unwrap_or("RunAsAny");
    if let Some(g) = pod_sc["fsGroup"].as_i64()
        && fs_strategy == "MustRunAs"
        && !in_range(g, UID_RANGE)
    {
        no(format!("fsGroup {g} is outside the namespace's range"));
    }
    if scc["supplementalGroups"]["type"] == "MustRunAs" {
        for g in pod_sc["supplementalGroups"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            if !in_range(g.as_i64().unwrap_or(-1), UID_RANGE) {
                no(format!(
                    "supplemental group {g} is outside the namespace's range"
                ));
            }
        }
    }
    let containers = pod["initContainers"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .chain(pod["containers"].as_array().cloned().unwrap_or_default());
    for c in containers {
        let cname = c["name"].as_str().unwrap_or_default().to_string();
        let sc = &c["securityContext"];
        let privileged = sc["privileged"] == true;
        if privileged && !flag(scc, "allowPrivilegedContainer") {
            no(format!("{cname}: privileged containers are not allowed"));
        }
        let escalation = sc["allowPrivilegeEscalation"] == true || privileged;
        if escalation && !flag(scc, "allowPrivilegeEscalation") {
            no(format!("{cname}: privilege escalation is not allowed"));
        }
        for cap in sc["capabilities"]["add"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let cap = cap.as_str().unwrap_or_default();
            if !allows(scc, "allowedCapabilities", cap)
                && !allows(scc, "defaultAddCapabilities", cap)
            {
                no(format!("{cname}: capability {cap} is not allowed"));
            }
        }
        for p in c["ports"].as_array().cloned().unwrap_or_default() {
            if p["hostPort"].as_i64().unwrap_or(0) > 0 && !flag(scc, "allowHostPorts") {
                no(format!("{cname}: host ports are not allowed"));
            }
        }
        let uid = sc["runAsUser"]
            .as_i64()
            .or_else(|| pod_sc["runAsUser"].as_i64());
        match (uid_strategy, uid) {
            ("MustRunAsRange", Some(u)) if !in_range(u, UID_RANGE) => no(format!(
                "{cname}: runAsUser {u} is not in the namespace's range {}/{}",
                UID_RANGE.0, UID_RANGE.1
            )),
            ("MustRunAsNonRoot", Some(0)) => no(format!("{cname}: runAsUser 0")),
            ("MustRunAs", Some(u)) if Some(u) != scc["runAsUser"]["uid"].as_i64() => {
                no(format!("{cname}: runAsUser {u} is not the SCC's uid"))
            }
            _ => {}
        }
        let seccomp = c["securityContext"]["seccompProfile"]["type"]
            .as_str()
            .or_else(|| pod_sc["seccompProfile"]["type"].as_str());
        if let Some(t) = seccomp {
            let name = match t {
                "RuntimeDefault" => "runtime/default",
                "Unconfined" => "unconfined",
                other => other,
            };
            if scc["seccompProfiles"].is_array() && !allows(scc, "seccompProfiles", name) {
                no(format!("{cname}: seccomp profile {name} is not allowed"));
            }
        }
        if flag(scc, "readOnlyRootFilesystem") && sc["readOnlyRootFilesystem"] != true {
            no(format!("{cname}: the root filesystem must be read-only"));
        }
    }
    out
}

/// OpenShift's restrictiveness order for SCCs of equal priority (fewer points first): a
/// privileged SCC scores highest, then host access, then the looser user strategies.
fn points(scc: &Value) -> i64 {
    let mut p = 0;
    if flag(scc, "allowPrivilegedContainer") {
        p += 200_000;
    }
    if allows(scc, "volumes", "hostPath") || flag(scc, "allowHostDirVolumePlugin") {
        p += 100_000;
    }
    if flag(scc, "allowHostNetwork") || flag(scc, "allowHostPorts") {
        p += 50_000;
    }
    p += match scc["runAsUser"]["type"].as_str().unwrap_or("RunAsAny") {
        "RunAsAny" => 40_000,
        "MustRunAsNonRoot" => 30_000,
        "MustRunAsRange" => 20_000,
        _ => 10_000,
    };
    p
}

/// The SCCs `account` in `ns` may use: named in its users or groups, or granted `use`.
async fn usable(admin: &Client, sccs: &[Value], ns: &str, account: &str) -> Result<Vec<Value>> {
    let user = format!("system:serviceaccount:{ns}:{account}");
    let groups = [
        "system:serviceaccounts".to_string(),
        format!("system:serviceaccounts:{ns}"),
        "system:authenticated".to_string(),
    ];
    let sars: Api<SubjectAccessReview> = Api::all(admin.clone());
    let mut out = Vec::new();
    for scc in sccs {
        let name = scc["metadata"]["name"].as_str().unwrap_or_default();
        let listed = scc["users"]
            .as_array()
            .is_some_and(|u| u.iter().any(|x| x == &json!(user)))
            || scc["groups"]
                .as_array()
                .is_some_and(|g| g.iter().any(|x| groups.iter().any(|mine| x == mine)));
        let review = SubjectAccessReview {
            spec: SubjectAccessReviewSpec {
                user: Some(user.clone()),
                groups: Some(groups.to_vec()),
                resource_attributes: Some(ResourceAttributes {
                    verb: Some("use".into()),
                    group: Some("security.openshift.io".into()),
                    resource: Some("securitycontextconstraints".into()),
                    name: Some(name.into()),
                    namespace: Some(ns.into()),
                    ..Default::default()
                }),
                ..Default::default()
            },
            ..Default::default()
        };
        let granted = sars
            .create(&PostParams::default(), &review)
            .await?
            .status
            .is_some_and(|s| s.allowed);
        if listed || granted {
            out.push(scc.clone());
        }
    }
    out.sort_by_key(|s| {
        (
            -s["priority"].as_i64().unwrap_or(0),
            points(s),
            s["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string(),
        )
    });
    Ok(out)
}

/// The SCC that admits `pod` of `account`, or every refusal.
async fn admit(
    admin: &Client,
    sccs: &[Value],
    ns: &str,
    account: &str,
    pod: &Value,
) -> Result<String, Vec<String>> {
    let usable = usable(admin, sccs, ns, account)
        .await
        .map_err(|e| vec![format!("{e:#}")])?;
    let mut why = Vec::new();
    for scc in &usable {
        let r = refusals(scc, pod);
        if r.is_empty() {
            return Ok(scc["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_string());
        }
        why.extend(r);
    }
    if usable.is_empty() {
        why.push(format!("{account} may use no SCC"));
    }
    Err(why)
}

fn pod_spec(template_spec: Option<&PodSpec>) -> Result<Value> {
    Ok(serde_json::to_value(
        template_spec.context("pod template spec")?,
    )?)
}

async fn scc_admission(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    harness::install_crds(
        &admin,
        &root.join("tests/fixtures/crds/security.openshift.io.yaml"),
    )
    .await?;
    // OpenShift's defaults (cluster-scoped, shared by every test that applies them).
    let text = std::fs::read_to_string(root.join("tests/fixtures/openshift/default-sccs.yaml"))?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(&text)?;
    let mut sccs = Vec::new();
    for doc in &docs {
        let kind = doc["kind"].as_str().unwrap_or_default();
        let obj: DynamicObject = serde_json::from_value(doc.clone())?;
        let name = obj.name_any();
        let api: Api<DynamicObject> = match kind {
            "SecurityContextConstraints" => {
                sccs.push(doc.clone());
                Api::all_with(admin.clone(), &scc_resource())
            }
            "ClusterRole" => harness::dynamic_api(
                &admin,
                &kube::core::GroupVersionKind::gvk(
                    "rbac.authorization.k8s.io",
                    "v1",
                    "ClusterRole",
                ),
                "clusterroles",
                None,
            ),
            "ClusterRoleBinding" => harness::dynamic_api(
                &admin,
                &kube::core::GroupVersionKind::gvk(
                    "rbac.authorization.k8s.io",
                    "v1",
                    "ClusterRoleBinding",
                ),
                "clusterrolebindings",
                None,
            ),
            other => return Err(anyhow!("unexpected {other} in default-sccs.yaml")),
        };
        api.patch(
            &name,
            &PatchParams::apply("sandboxd-test").force(),
            &Patch::Apply(&obj),
        )
        .await
        .with_context(|| format!("applying {kind} {name}"))?;
    }
    // The namespace as OpenShift annotates it.
    let range = format!("{}/{}", UID_RANGE.0, UID_RANGE.1);
    Api::<Namespace>::all(admin.clone())
        .patch(
            &env.ns,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {
                "openshift.io/sa.scc.uid-range": range,
                "openshift.io/sa.scc.supplemental-groups": range,
                "openshift.io/sa.scc.mcs": "s0:c26,c5",
            }}})),
        )
        .await?;
    // The deployed RBAC, the OpenShift overlay's objects included.
    let suffix = env.unique("scc").trim_start_matches("scc-").to_string();
    for file in [
        "deploy/operator/rbac.yaml",
        "deploy/caa/rbac.yaml",
        "deploy/overlays/openshift/caa-scc.yaml",
    ] {
        crate::operator::support::apply_rbac_file(&admin, file, &env.ns, &suffix).await?;
    }

    // Every pod sandboxd ships.
    let rendered =
        sandboxd::ctl::install::render(sandboxd::ctl::install::Platform::Openshift, &env.ns, None)?;
    let operator = rendered
        .iter()
        .find(|d| d["kind"] == "Deployment")
        .context("operator Deployment")?;
    let owner = OwnerReference {
        api_version: "kataconfiguration.openshift.io/v1".into(),
        kind: "KataConfig".into(),
        name: "kc".into(),
        uid: "u".into(),
        ..Default::default()
    };
    let ppc = sandboxd::api::peerpodconfig::PeerPodConfigSpec::default();
    let webhook = sandboxd::operator::peerpods::webhook::objects::deployment(
        &env.ns,
        "sandboxd:test",
        &owner,
    );
    let job_settings = sandboxd::operator::peerpods::image_job::Settings::default();
    let creation = sandboxd::operator::peerpods::image_job::creation_job(
        &env.ns,
        "sandboxd:test",
        &ppc,
        &job_settings,
        owner.clone(),
    );
    let deletion = sandboxd::operator::peerpods::image_job::deletion_job(
        &env.ns,
        "sandboxd:test",
        &ppc,
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images/i",
        &job_settings,
        owner.clone(),
    );
    let caa = sandboxd::operator::peerpods::caa::daemonset(
        &env.ns,
        "sandboxd:test",
        &ppc.cloud_secret_name,
        &ppc.config_map_name,
        &ppc.node_selector,
        "hash",
        owner,
        // What the operator decides for the test control plane (1.36: `status.hostIPs`).
        sandboxd::operator::peerpods::caa::Cluster { host_ips: true },
        &Default::default(),
    );
    let relay = sandboxd::operator::peerpods::caa::relay_daemonset(
        &env.ns,
        "sandboxd:test",
        &ppc.node_selector,
        OwnerReference::default(),
    );
    let pods: Vec<(&str, Value, &str)> = vec![
        (
            "operator Deployment",
            operator["spec"]["template"]["spec"].clone(),
            "restricted-v2",
        ),
        (
            "webhook Deployment",
            pod_spec(webhook.spec.as_ref().and_then(|s| s.template.spec.as_ref()))?,
            "restricted-v2",
        ),
        (
            "image creation Job",
            pod_spec(
                creation
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.spec.as_ref()),
            )?,
            "restricted-v2",
        ),
        (
            "image deletion Job",
            pod_spec(
                deletion
                    .spec
                    .as_ref()
                    .and_then(|s| s.template.spec.as_ref()),
            )?,
            "restricted-v2",
        ),
        (
            "CAA DaemonSet",
            pod_spec(caa.spec.as_ref().and_then(|s| s.template.spec.as_ref()))?,
            "privileged",
        ),
        (
            "node agent relay DaemonSet",
            pod_spec(relay.spec.as_ref().and_then(|s| s.template.spec.as_ref()))?,
            "privileged",
        ),
    ];
    let mut failures = BTreeMap::new();
    for (what, pod, want) in &pods {
        let account = pod["serviceAccountName"].as_str().unwrap_or("default");
        match admit(&admin, &sccs, &env.ns, account, pod).await {
            Ok(scc) if scc == *want => {}
            Ok(scc) => {
                failures.insert(*what, vec![format!("admitted by {scc}, expected {want}")]);
            }
            Err(why) => {
                failures.insert(*what, why);
            }
        }
    }
    ensure!(failures.is_empty(), "SCC admission: {failures:#?}");
    // The check refuses what OpenShift refuses: a fixed UID outside the range, and the CAA
    // pod for an account without `use` on privileged.
    let mut fixed = pods[0].1.clone();
    fixed["securityContext"]["runAsUser"] = json!(65532);
    ensure!(
        admit(&admin, &sccs, &env.ns, "sandboxd-operator", &fixed)
            .await
            .is_err(),
        "a fixed runAsUser 65532 was admitted"
    );
    ensure!(
        admit(&admin, &sccs, &env.ns, "sandboxd-operator", &pods[4].1)
            .await
            .is_err(),
        "the CAA pod was admitted for an account without privileged"
    );
    Ok(())
}
