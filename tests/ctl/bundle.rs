//! `sandboxd ctl support-bundle`, `ctl must-gather` and the kubectl/oc plugin names, as a
//! user runs them: the built binary against the test control plane. Canary credentials are
//! planted where a careless bundle would copy them (a Secret, a credential-named and a
//! connection-string ConfigMap value, a pod's environment, an annotation, an Event, a
//! private key); none may appear anywhere in what the bundle writes, in any encoding.
//!
//! No kubelet runs here: the API server answers log requests with an error, which the
//! manifest must record (the log text's redaction is unit-tested in
//! `ctl::support_bundle::redact`).

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, ensure};
use base64::Engine;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Event, ServiceAccount};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use super::support::{Run, ctl, ctl_with, raw};
use crate::harness::control_plane::{UserAuth, kubeconfig_yaml};
use crate::harness::process::run_dir;
use crate::harness::{self, Case, Env};

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster(
            "ctl::support_bundle_collects_objects_nodes_events_doctor_and_versions_and_leaks_no_canary",
            bundle_without_canaries,
        ),
        Case::cluster(
            "ctl::support_bundle_records_what_rbac_refuses_and_still_writes_the_bundle",
            bundle_under_narrow_rbac,
        ),
        Case::cluster(
            "ctl::support_bundle_past_its_size_bound_keeps_the_manifest_and_lists_what_it_left_out",
            bundle_past_size_bound,
        ),
        Case::cluster(
            "ctl::must_gather_writes_the_bundle_tree_into_its_directory_when_invoked_as_gather",
            must_gather_as_gather,
        ),
        // Exclusive: the gather command finds the operator's namespace by looking at all.
        Case::cluster_exclusive(
            "ctl::the_must_gather_pod_s_bash_and_tar_are_answered_by_the_binary_in_the_operator_s_namespace",
            must_gather_pod,
        ),
        Case::cluster(
            "ctl::kubectl_sandboxd_and_oc_sandboxd_are_ctl",
            plugin_names,
        ),
        Case::node(
            "ctl::support_bundle_on_the_real_node_keeps_current_and_previous_logs_with_tokens_redacted",
            real_node_logs,
        )
        .skip_if(crate::harness::node::unavailable().or_else(|| {
            crate::harness::node::image_archive().is_none().then(|| {
                "no image from `make image` (target/oci/sandboxd.tar or SANDBOXD_IMAGE_ARCHIVE)"
                    .to_string()
            })
        })),
    ]
}

/// A container on the real node that logs a bearer token and a learnt secret value, then
/// exits (so the kubelet restarts it: there is a previous log); the bundle fetches both logs
/// through the API server and the kubelet, and neither canary survives.
async fn real_node_logs(env: Env) -> Result<()> {
    let node = env.node();
    let client = env.admin().await?;
    let open = node.open(&client).await?;
    let result = real_node_logs_on(&env, node, &client).await;
    open.close().await?;
    result
}

async fn real_node_logs_on(
    env: &Env,
    node: &'static crate::harness::node::TestNode,
    client: &kube::Client,
) -> Result<()> {
    let c = Canaries::new(env);
    let image = node
        .image
        .clone()
        .context("the node has no sandboxd image")?;
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = Api::namespaced(client.clone(), &env.ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "peer-pods-secret"},
                "stringData": {"AZURE_CLIENT_SECRET": c.secret},
            }))?,
        )
        .await?;
    // `sandboxd ctl` names the kubeconfig it cannot read, tokens and all, on stderr.
    let path = format!("/run/x Authorization: Bearer {} note {}", c.event, c.secret);
    let pods: Api<k8s_openapi::api::core::v1::Pod> = Api::namespaced(client.clone(), &env.ns);
    pods.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "token-printer"},
            "spec": {
                "nodeName": node.name,
                "containers": [{
                    "name": "printer",
                    "image": image,
                    // Imported into the node's containerd, never pulled.
                    "imagePullPolicy": "Never",
                    "args": ["ctl", "--kubeconfig", path, "limit", "get"],
                }],
            },
        }))?,
    )
    .await?;
    crate::harness::eventually(
        "the container restarted once",
        std::time::Duration::from_secs(120),
        || {
            let pods = pods.clone();
            async move {
                let p = pods.get("token-printer").await?;
                let restarts = p
                    .status
                    .and_then(|s| s.container_statuses)
                    .and_then(|cs| cs.first().map(|c| c.restart_count))
                    .unwrap_or(0);
                Ok((restarts >= 1).then_some(()))
            }
        },
    )
    .await?;
    let raw_log = pods
        .logs(
            "token-printer",
            &kube::api::LogParams {
                previous: true,
                ..Default::default()
            },
        )
        .await?;
    ensure!(
        raw_log.contains(&c.event),
        "the container logs the token: {raw_log}"
    );

    let dir = run_dir().join(format!("bundle-node-{}", env.ns));
    std::fs::create_dir_all(&dir)?;
    let archive = dir.join("bundle.tar.gz");
    ctl(
        env,
        &env.ns,
        &[
            "support-bundle",
            "-f",
            &archive.display().to_string(),
            "--timeout",
            "90s",
            "--no-azure",
            "--probe-namespace",
            &env.ns,
        ],
    )
    .await?
    .ok()?;
    let root = top(&extract(&archive)?)?;
    let logs = root.join(format!(
        "namespaces/{}/pods/token-printer/printer/logs",
        env.ns
    ));
    for f in ["current.log", "previous.log"] {
        let text = std::fs::read_to_string(logs.join(f)).with_context(|| f.to_string())?;
        ensure!(
            text.contains("Bearer [REDACTED]") && text.contains("note [REDACTED]"),
            "{f}: {text}"
        );
    }
    for (p, data) in files(&root)? {
        assert_no_canary(&c, &p.display().to_string(), &data)?;
    }
    Ok(())
}

/// Canaries, unique per run, each planted in one place.
struct Canaries {
    secret: String,
    configmap_named: String,
    connection_string: String,
    env: String,
    annotation: String,
    event: String,
    private_key: String,
}

impl Canaries {
    fn new(env: &Env) -> Self {
        let tag = env.unique("cn").replace('-', "");
        let c = |what: &str| format!("Canary{what}{tag}Zq9");
        Self {
            secret: c("Secret"),
            configmap_named: c("CmNamed"),
            connection_string: c("ConnStr"),
            env: c("Env"),
            annotation: c("Annot"),
            event: c("Event"),
            private_key: c("PrivKey"),
        }
    }

    fn all(&self) -> Vec<&str> {
        vec![
            &self.secret,
            &self.configmap_named,
            &self.connection_string,
            &self.env,
            &self.annotation,
            &self.event,
            &self.private_key,
        ]
    }
}

/// Plants the canaries in the test namespace (standing in for the operator namespace) and
/// a node labelled for peer pods with its VM capacity; returns the node's name.
async fn plant(env: &Env, c: &Canaries) -> Result<String> {
    let client = env.admin().await?;
    let post = |v: Value| async move {
        let kind = v["kind"].as_str().unwrap_or("").to_string();
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(client_for(env).await?, &env.ns, &resource_of(&kind));
        api.create(&PostParams::default(), &serde_json::from_value(v)?)
            .await
            .with_context(|| format!("creating {kind}"))?;
        anyhow::Ok(())
    };
    post(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "peer-pods-secret"},
        "stringData": {
            "AZURE_CLIENT_ID": "11111111-2222-3333-4444-555555555555",
            "AZURE_CLIENT_SECRET": c.secret,
            "AZURE_TENANT_ID": "66666666-7777-8888-9999-000000000000",
            "AZURE_SUBSCRIPTION_ID": "aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee",
        }
    }))
    .await?;
    post(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "ssh-key-secret"},
        "stringData": {
            "id_rsa.pub": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHRlc3Qta2V5 sandboxd",
            "id_rsa": format!("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjE{}\n-----END OPENSSH PRIVATE KEY-----\n", c.private_key),
        }
    }))
    .await?;
    post(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "peer-pods-cm"},
        "data": {
            "CLOUD_PROVIDER": "azure",
            "AZURE_REGION": "eastus",
            "VXLAN_PORT": "9000",
            // A credential where it does not belong: its key says so.
            "AZURE_CLIENT_SECRET": c.configmap_named,
            // A connection string: its content says so.
            "storage.conf": format!("DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={};EndpointSuffix=core.windows.net", c.connection_string),
            // The Secret's value pasted as a note: only knowing the Secret finds it.
            "notes": format!("client secret was {} before rotation", c.secret),
        }
    }))
    .await?;
    post(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        // As deploy/operator/operator.yaml labels it.
        "metadata": {
            "name": "sandboxd-operator",
            "labels": {"app.kubernetes.io/name": "sandboxd-operator"},
            "annotations": {"debug": format!("Authorization: Bearer {}", c.annotation)},
        },
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app.kubernetes.io/name": "sandboxd-operator"}},
            "template": {
                "metadata": {"labels": {"app.kubernetes.io/name": "sandboxd-operator"}},
                "spec": {"containers": [{
                    "name": "operator", "image": "sandboxd:test",
                    "env": [{"name": "DB_PASSWORD", "value": c.env}, {"name": "MODE", "value": "debug"}]
                }]}
            }
        }
    }))
    .await?;
    let node = env.unique("bundle-node");
    harness::fake_node(
        &client,
        &node,
        &[
            ("sandboxd.test/bundle", env.ns.as_str()),
            ("node-role.kubernetes.io/kata-oc", ""),
        ],
        &[("kata.peerpods.io/vm", "4")],
    )
    .await?;
    // A pod on that node whose logs the API server cannot fetch (no kubelet).
    post(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "caa-probe", "labels": {"app": "peerpodconfig-ctrl-caa-daemon"}},
        "spec": {"nodeName": node, "containers": [{"name": "cloud-api-adaptor", "image": "sandboxd:test"}]}
    }))
    .await?;
    let events: Api<Event> = Api::namespaced(client.clone(), &env.ns);
    events
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": env.unique("ev")},
                "involvedObject": {"kind": "Pod", "name": "caa-probe", "namespace": env.ns},
                "reason": "TokenRefreshFailed",
                "message": format!("refreshing failed: Authorization: Bearer {}", c.event),
                "type": "Warning",
                "firstTimestamp": "2026-01-01T00:00:00Z",
                "lastTimestamp": "2026-01-01T00:00:00Z",
                "source": {"component": "test"},
            }))?,
        )
        .await?;
    Ok(node)
}

async fn client_for(env: &Env) -> Result<kube::Client> {
    env.admin().await
}

fn resource_of(kind: &str) -> kube::api::ApiResource {
    let (group, version, plural) = match kind {
        "Deployment" => ("apps", "v1", "deployments"),
        "Secret" => ("", "v1", "secrets"),
        "ConfigMap" => ("", "v1", "configmaps"),
        "Pod" => ("", "v1", "pods"),
        other => panic!("no resource for {other}"),
    };
    kube::api::ApiResource {
        group: group.into(),
        version: version.into(),
        api_version: if group.is_empty() {
            version.into()
        } else {
            format!("{group}/{version}")
        },
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// Extracts a `.tar.gz` with the system's tar into a new directory; returns it.
fn extract(archive: &Path) -> Result<PathBuf> {
    let dir = archive.with_extension("d");
    std::fs::create_dir_all(&dir)?;
    let out = std::process::Command::new("tar")
        .arg("-xzf")
        .arg(archive)
        .arg("-C")
        .arg(&dir)
        .output()?;
    ensure!(
        out.status.success(),
        "tar: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(dir)
}

/// Every file under `dir`, with its content.
fn files(dir: &Path) -> Result<Vec<(PathBuf, Vec<u8>)>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d)? {
            let p = e?.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                let data = std::fs::read(&p)?;
                out.push((p, data));
            }
        }
    }
    Ok(out)
}

/// Fails when any canary (plain, base64 or URL-encoded) is in any of `bytes`.
fn assert_no_canary(c: &Canaries, what: &str, bytes: &[u8]) -> Result<()> {
    let text = String::from_utf8_lossy(bytes);
    for canary in c.all() {
        let b64 = base64::engine::general_purpose::STANDARD.encode(canary);
        for form in [canary.to_string(), b64] {
            ensure!(!text.contains(&form), "{what} holds a canary ({form})");
        }
    }
    Ok(())
}

/// The single top directory of an extracted bundle.
fn top(dir: &Path) -> Result<PathBuf> {
    let entries: Vec<_> = std::fs::read_dir(dir)?.collect::<Result<_, _>>()?;
    ensure!(entries.len() == 1, "one top directory: {entries:?}");
    Ok(entries[0].path())
}

async fn bundle_without_canaries(env: Env) -> Result<()> {
    let c = Canaries::new(&env);
    let node = plant(&env, &c).await?;
    let dir = run_dir().join(format!("bundle-{}", env.ns));
    std::fs::create_dir_all(&dir)?;
    let archive = dir.join("bundle.tar.gz");
    let selector = format!("sandboxd.test/bundle={}", env.ns);
    let out = ctl(
        &env,
        &env.ns,
        &[
            "support-bundle",
            "-f",
            &archive.display().to_string(),
            "--timeout",
            "90s",
            "--no-azure",
            "--node-selector",
            &selector,
            "--probe-namespace",
            &env.ns,
        ],
    )
    .await?
    .ok()?;
    // Progress on the terminal, a summary at the end.
    ensure!(
        out.stderr.contains("support-bundle: [1/8]"),
        "{}",
        out.all()
    );
    ensure!(
        out.stderr.contains("support-bundle: wrote"),
        "{}",
        out.all()
    );
    assert_no_canary(&c, "the command's output", out.all().as_bytes())?;

    // The archive itself, decompressed, and every extracted file.
    let gz = std::fs::read(&archive)?;
    let mut tar = Vec::new();
    std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&gz[..]), &mut tar)?;
    assert_no_canary(&c, "the tar stream", &tar)?;
    let root = top(&extract(&archive)?)?;
    let all = files(&root)?;
    for (p, data) in &all {
        assert_no_canary(&c, &p.display().to_string(), data)?;
    }
    let read = |rel: &str| {
        std::fs::read_to_string(root.join(rel)).with_context(|| format!("{rel} in the bundle"))
    };
    let ns = env.ns.as_str();

    // Secrets: keys and sizes, no values.
    let secret = read(&format!(
        "namespaces/{ns}/core/secrets/peer-pods-secret.yaml"
    ))?;
    ensure!(
        secret.contains("AZURE_CLIENT_SECRET") && secret.contains("[REDACTED] ("),
        "{secret}"
    );
    // The ConfigMap stays readable where it is not a credential.
    let cm = read(&format!(
        "namespaces/{ns}/core/configmaps/peer-pods-cm.yaml"
    ))?;
    ensure!(cm.contains("eastus") && cm.contains("VXLAN_PORT"), "{cm}");
    ensure!(cm.contains("AccountName=acct"), "{cm}");
    let dep = read(&format!(
        "namespaces/{ns}/apps/deployments/sandboxd-operator.yaml"
    ))?;
    ensure!(
        dep.contains("DB_PASSWORD") && dep.contains("debug"),
        "{dep}"
    );
    // Events of the namespace, the credential in one redacted.
    let events = read(&format!("namespaces/{ns}/core/events.yaml"))?;
    ensure!(
        events.contains("TokenRefreshFailed") && events.contains("Bearer [REDACTED]"),
        "{events}"
    );
    // The selected node: labels, capacity, conditions.
    let node_yaml = read(&format!("cluster-scoped-resources/core/nodes/{node}.yaml"))?;
    ensure!(
        node_yaml.contains("kata.peerpods.io/vm") && node_yaml.contains("Ready"),
        "{node_yaml}"
    );
    ensure!(read("doctor.txt")?.contains("operator"), "doctor.txt");
    let versions = read("versions.yaml")?;
    ensure!(
        versions.contains(sandboxd::VERSION) && versions.contains("sandboxd:test"),
        "{versions}"
    );

    // The manifest: what is there, and the log nobody could fetch without a kubelet.
    let manifest: Value = serde_json::from_str(&read("manifest.json")?)?;
    let collected: Vec<&str> = manifest["collected"]
        .as_array()
        .context("collected")?
        .iter()
        .filter_map(|c| c["path"].as_str())
        .collect();
    for (p, _) in &all {
        let rel = p.strip_prefix(&root)?.to_string_lossy().to_string();
        ensure!(
            rel == "manifest.json" || collected.contains(&rel.as_str()),
            "{rel} is in the bundle but not in the manifest"
        );
    }
    let errors = manifest["errors"].to_string();
    ensure!(
        errors.contains(&format!(
            "log of {ns}/caa-probe container cloud-api-adaptor"
        )),
        "the failed log request is recorded: {manifest:#}"
    );
    ensure!(
        manifest["refused"].as_array().is_some_and(Vec::is_empty),
        "the admin is refused nothing: {manifest:#}"
    );
    Ok(())
}

/// A ServiceAccount that may read the namespace's ordinary objects, but not its Secrets,
/// nodes or anything cluster-wide.
async fn narrow_kubeconfig(env: &Env) -> Result<PathBuf> {
    let client = env.admin().await?;
    let sa = "bundle-reader";
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &env.ns);
    sas.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": sa}}))?,
    )
    .await?;
    let roles: Api<k8s_openapi::api::rbac::v1::Role> = Api::namespaced(client.clone(), &env.ns);
    roles
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "bundle-reader"},
                "rules": [
                    {"apiGroups": [""], "resources": ["pods", "pods/log", "configmaps", "events", "services", "serviceaccounts"], "verbs": ["get", "list"]},
                    {"apiGroups": ["apps"], "resources": ["deployments", "daemonsets", "replicasets"], "verbs": ["get", "list"]},
                ]
            }))?,
        )
        .await?;
    let bindings: Api<k8s_openapi::api::rbac::v1::RoleBinding> =
        Api::namespaced(client.clone(), &env.ns);
    bindings
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "bundle-reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "bundle-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": env.ns}]
            }))?,
        )
        .await?;
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token: TokenRequest = sas
        .create_subresource("token", sa, &PostParams::default(), &req)
        .await?;
    let token = token.status.and_then(|s| s.token).context("no token")?;
    let cp = env.cp();
    let path = run_dir().join(format!("{}-bundle-reader.kubeconfig", env.ns));
    std::fs::write(
        &path,
        kubeconfig_yaml(&cp.server, &cp.ca_pem, &UserAuth::Token(token)),
    )?;
    Ok(path)
}

async fn bundle_under_narrow_rbac(env: Env) -> Result<()> {
    let c = Canaries::new(&env);
    plant(&env, &c).await?;
    let kubeconfig = narrow_kubeconfig(&env).await?;
    let dir = run_dir().join(format!("bundle-rbac-{}", env.ns));
    std::fs::create_dir_all(&dir)?;
    let archive = dir.join("bundle.tar.gz");
    let kc = kubeconfig.display().to_string();
    let file = archive.display().to_string();
    let out = raw(
        &[
            "ctl",
            "--kubeconfig",
            &kc,
            "-n",
            &env.ns,
            "support-bundle",
            "-f",
            &file,
            "--timeout",
            "90s",
            "--no-azure",
            "--probe-namespace",
            &env.ns,
        ],
        Run::default(),
    )
    .await?
    .ok()?;
    ensure!(out.stderr.contains("refused by RBAC"), "{}", out.all());
    let root = top(&extract(&archive)?)?;
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("manifest.json"))?)?;
    let refused = manifest["refused"].to_string();
    for what in [
        format!("list core/secrets in namespace {}", env.ns),
        "list core/nodes".to_string(),
        "list kataconfiguration.openshift.io/kataconfigs".to_string(),
    ] {
        ensure!(
            refused.contains(&what),
            "{what} not recorded as refused: {manifest:#}"
        );
    }
    ensure!(refused.contains("403"), "{refused}");
    // What it could read is there.
    ensure!(
        root.join(format!(
            "namespaces/{}/core/configmaps/peer-pods-cm.yaml",
            env.ns
        ))
        .exists(),
        "the ConfigMap is in the bundle"
    );
    // Without the Secret, its value cannot be learnt; every canary that does not depend
    // on knowing it must still be gone.
    for (p, data) in files(&root)? {
        let text = String::from_utf8_lossy(&data);
        for canary in [
            &c.configmap_named,
            &c.connection_string,
            &c.env,
            &c.annotation,
            &c.event,
        ] {
            ensure!(
                !text.contains(canary.as_str()),
                "{} holds {canary}",
                p.display()
            );
        }
    }
    Ok(())
}

async fn must_gather_as_gather(env: Env) -> Result<()> {
    let c = Canaries::new(&env);
    plant(&env, &c).await?;
    let dir = run_dir().join(format!("must-gather-{}", env.ns));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    // `oc adm must-gather` runs /usr/bin/gather in the image: the same binary by that name.
    let gather = dir.join("gather");
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_sandboxd"), &gather)?;
    let out_dir = dir.join("must-gather");
    let kubeconfig = env.cp().kubeconfig_path.display().to_string();
    let out = tokio::process::Command::new(&gather)
        .args([
            "--kubeconfig",
            &kubeconfig,
            "-n",
            &env.ns,
            "--dir",
            &out_dir.display().to_string(),
            "--timeout",
            "90s",
            "--no-azure",
            "--probe-namespace",
            &env.ns,
        ])
        .env_remove("KUBECONFIG")
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.success(), "gather failed: {stderr}");
    ensure!(stderr.contains("support-bundle: [8/8]"), "{stderr}");
    let version = std::fs::read_to_string(out_dir.join("version"))?;
    ensure!(version.starts_with("sandboxd-must-gather\n"), "{version}");
    ensure!(out_dir.join("manifest.json").exists(), "manifest.json");
    ensure!(
        out_dir
            .join(format!(
                "namespaces/{}/core/configmaps/peer-pods-cm.yaml",
                env.ns
            ))
            .exists(),
        "the tree is written into the directory"
    );
    for (p, data) in files(&out_dir)? {
        assert_no_canary(&c, &p.display().to_string(), &data)?;
    }
    Ok(())
}

async fn plugin_names(env: Env) -> Result<()> {
    let dir = run_dir().join(format!("plugin-{}", env.ns));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = env.cp().kubeconfig_path.display().to_string();
    for name in ["kubectl-sandboxd", "oc-sandboxd"] {
        let link = dir.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_sandboxd"), &link)?;
        // kubectl runs `kubectl-sandboxd <args>` for `kubectl sandboxd <args>`.
        let out = tokio::process::Command::new(&link)
            .args(["--kubeconfig", &kubeconfig, "-n", &env.ns, "limit", "get"])
            .env_remove("KUBECONFIG")
            .output()
            .await?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        // No PeerPodConfig in this namespace: ctl's own answer, not a usage error.
        ensure!(
            !stderr.contains("unrecognized subcommand") && !stderr.contains("Usage: "),
            "{name}: {stdout}{stderr}"
        );
        let help = tokio::process::Command::new(&link)
            .arg("--help")
            .output()
            .await?;
        let help = String::from_utf8_lossy(&help.stdout);
        ensure!(
            help.contains("support-bundle") && help.contains("doctor"),
            "{name} --help: {help}"
        );
        let host = name.trim_end_matches("-sandboxd");
        ensure!(
            help.contains(&format!("Usage: {host} sandboxd ")),
            "{name} --help names the command as typed: {help}"
        );
    }
    // The same command through the plain binary says the same.
    let plain = ctl_with(&env, &env.ns, &["limit", "get"], Run::default()).await?;
    let via = tokio::process::Command::new(dir.join("kubectl-sandboxd"))
        .args(["--kubeconfig", &kubeconfig, "-n", &env.ns, "limit", "get"])
        .env_remove("KUBECONFIG")
        .output()
        .await?;
    ensure!(
        via.status.code() == Some(plain.code)
            && String::from_utf8_lossy(&via.stdout) == plain.stdout,
        "kubectl-sandboxd and sandboxd ctl differ: {plain:?} vs {via:?}"
    );
    Ok(())
}

/// The binary under `name` in `dir` (a symlink, as the image links it).
fn linked(dir: &Path, name: &str) -> Result<PathBuf> {
    let link = dir.join(name);
    let _ = std::fs::remove_file(&link);
    std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_sandboxd"), &link)?;
    Ok(link)
}

/// The must-gather pod's containers as oc runs them: `bash -c` with a gather script (a
/// background watcher, the gather command, `sync`), `bash -c` waiting in the copy
/// container, then `tar --version` and `tar -C DIR/ -c .` streaming the result.
async fn must_gather_pod(env: Env) -> Result<()> {
    let c = Canaries::new(&env);
    plant(&env, &c).await?;
    // Where an operator runs (namespaces being deleted aside): this namespace, unless
    // another suite left one running elsewhere (then the gather command cannot choose and
    // keeps the default namespace).
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> = Api::all(env.admin().await?);
    let lp = kube::api::ListParams::default().labels("app.kubernetes.io/name=sandboxd-operator");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(env.admin().await?);
    let mut running = std::collections::BTreeSet::new();
    for d in deployments.list(&lp).await?.items {
        let Some(ns) = d.metadata.namespace.clone() else {
            continue;
        };
        let going = namespaces
            .get_opt(&ns)
            .await?
            .is_none_or(|n| n.metadata.deletion_timestamp.is_some());
        if d.metadata.deletion_timestamp.is_none() && !going {
            running.insert(ns);
        }
    }
    let expected = if running.len() == 1 {
        env.ns.clone()
    } else {
        eprintln!(
            "note: operators run in {running:?}; the gather command keeps the default namespace"
        );
        sandboxd::api::names::DEFAULT_NAMESPACE.to_string()
    };
    let dir = run_dir().join(format!("must-gather-pod-{}", env.ns));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let bash = linked(&dir, "bash")?;
    let tar = linked(&dir, "tar")?;
    let out_dir = dir.join("must-gather");
    std::fs::create_dir_all(&out_dir)?;
    let kubeconfig = env.cp().kubeconfig_path.display().to_string();
    let script = "while true; do sleep 5; done & /usr/bin/gather; sync && echo written";
    let gather = tokio::process::Command::new(&bash)
        .args(["-c", script])
        .env("KUBECONFIG", &kubeconfig)
        .env("BASE_COLLECTION_PATH", &out_dir)
        .output()
        .await?;
    let stderr = String::from_utf8_lossy(&gather.stderr);
    ensure!(gather.status.success(), "gather container failed: {stderr}");
    ensure!(stderr.contains("support-bundle: wrote"), "{stderr}");
    // No flags: the namespace the operator runs in, found, not the default one.
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("manifest.json"))?)?;
    ensure!(
        manifest["namespace"] == expected.as_str(),
        "{stderr}\n{manifest:#}"
    );
    ensure!(
        expected != env.ns
            || out_dir
                .join(format!(
                    "namespaces/{}/core/configmaps/peer-pods-cm.yaml",
                    env.ns
                ))
                .exists(),
        "the operator namespace's objects are collected"
    );
    for (p, data) in files(&out_dir)? {
        assert_no_canary(&c, &p.display().to_string(), &data)?;
    }

    // Anything else is not run.
    let other = tokio::process::Command::new(&bash)
        .args(["-c", "ls /"])
        .output()
        .await?;
    ensure!(
        !other.status.success() && String::from_utf8_lossy(&other.stderr).contains("not a shell"),
        "{other:?}"
    );

    // The copy container waits until terminated.
    let mut copy = tokio::process::Command::new(&bash)
        .args(["-c", "trap : TERM INT; sleep infinity & wait"])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()?;
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    ensure!(
        copy.try_wait()?.is_none(),
        "the copy container exited early"
    );
    let pid = nix::unistd::Pid::from_raw(copy.id().context("pid")? as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
    let status = tokio::time::timeout(std::time::Duration::from_secs(10), copy.wait()).await??;
    ensure!(status.success(), "{status}");

    // oc's tar strategy: probe, then stream the directory.
    let version = tokio::process::Command::new(&tar)
        .arg("--version")
        .output()
        .await?;
    ensure!(version.status.success(), "{version:?}");
    let stream = tokio::process::Command::new(&tar)
        .args(["-C", &format!("{}/", out_dir.display()), "-c", "."])
        .output()
        .await?;
    ensure!(
        stream.status.success(),
        "{}",
        String::from_utf8_lossy(&stream.stderr)
    );
    let copied = dir.join("copied");
    std::fs::create_dir_all(&copied)?;
    let mut untar = std::process::Command::new("tar")
        .arg("-x")
        .arg("-C")
        .arg(&copied)
        .stdin(std::process::Stdio::piped())
        .spawn()?;
    std::io::Write::write_all(&mut untar.stdin.take().context("stdin")?, &stream.stdout)?;
    ensure!(untar.wait()?.success(), "system tar reads the stream");
    for f in ["manifest.json", "version", "versions.yaml"] {
        ensure!(
            std::fs::read(copied.join(f))? == std::fs::read(out_dir.join(f))?,
            "{f} copied unchanged"
        );
    }
    Ok(())
}

async fn bundle_past_size_bound(env: Env) -> Result<()> {
    let c = Canaries::new(&env);
    plant(&env, &c).await?;
    let dir = run_dir().join(format!("bundle-bound-{}", env.ns));
    std::fs::create_dir_all(&dir)?;
    let archive = dir.join("bundle.tar.gz");
    let out = ctl(
        &env,
        &env.ns,
        &[
            "support-bundle",
            "-f",
            &archive.display().to_string(),
            "--max-size-mib",
            "0",
            "--no-azure",
            "--probe-namespace",
            &env.ns,
        ],
    )
    .await?
    .ok()?;
    ensure!(out.stderr.contains("0 files"), "{}", out.all());
    let root = top(&extract(&archive)?)?;
    let all = files(&root)?;
    ensure!(
        all.len() == 1 && all[0].0.ends_with("manifest.json"),
        "only the manifest: {:?}",
        all.iter().map(|f| &f.0).collect::<Vec<_>>()
    );
    let manifest: Value = serde_json::from_slice(&all[0].1)?;
    let skipped = manifest["skipped"].as_array().context("skipped")?;
    ensure!(
        skipped.iter().any(|s| s["what"]
            .as_str()
            .is_some_and(|w| w.ends_with("core/configmaps/peer-pods-cm.yaml"))
            && s["reason"]
                .as_str()
                .is_some_and(|r| r.contains("size bound"))),
        "{manifest:#}"
    );
    assert_no_canary(&c, "the manifest", &all[0].1)
}
