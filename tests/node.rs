//! The real node (`harness::node`): kubelet, containerd, runc, CNI and kube-proxy run what
//! sandboxd deploys. The seed guide's workflow end to end, installed from `deploy/` with the
//! image `make image` built, as a user would; `kata-remote` pods run in pod VMs through
//! sandboxd's shim ([`peer_pods`]).

mod peer_pods;
mod restart;

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use kube::{Client, ResourceExt};
use sandboxd::armtest;
use serde_json::json;

use crate::harness::node::{REAL_NODE_LABEL, TestNode, image_archive};
use crate::harness::{Case, Env, eventually};

const NS: &str = "openshift-sandboxed-containers-operator";
const SUB: &str = "11111111-2222-3333-4444-555555555555";
const KATA_CONFIG: &str = "cluster-kataconfig";

pub fn cases() -> Vec<Case> {
    let skip = crate::harness::node::unavailable().or_else(|| {
        image_archive().is_none().then(|| {
            "no image from `make image` (target/oci/sandboxd.tar or SANDBOXD_IMAGE_ARCHIVE)"
                .to_string()
        })
    });
    vec![
        Case::node(
            "node::a_pod_runs_with_logs_exec_and_a_service_on_the_real_node",
            basics,
        )
        .skip_if(skip.clone()),
        Case::node(
            "node::the_guide_runs_kata_remote_pods_in_qemu_pod_vms_through_sandboxds_shim",
            peer_pods::guide,
        )
        .skip_if(skip.clone().or_else(peer_pods::skip_reason)),
        Case::node(
            "node::peer_pods_keep_running_with_logs_and_exec_through_caa_sigkill_image_rollout_and_configmap_rollout",
            restart::survive,
        )
        .skip_if(skip.clone().or_else(peer_pods::skip_reason)),
        Case::node(
            "node::bench_pod_start_kata_remote_vs_runc",
            peer_pods::bench_pod_start,
        )
        .skip_if(skip.clone().or_else(peer_pods::skip_reason).or_else(|| {
            std::env::var_os("SANDBOXD_BENCH_PODSTART")
                .is_none()
                .then(|| "a benchmark: make bench-podstart runs it".to_string())
        })),
        Case::node(
            "node::the_image_job_runs_as_a_pod_on_the_node_and_records_the_image_id",
            image_job,
        )
        .skip_if(skip.or_else(|| {
            (!azurite_bin().exists())
                .then(|| "azurite is missing: run scripts/bootstrap.sh".to_string())
        })),
    ]
}

fn azurite_bin() -> std::path::PathBuf {
    let cache = std::env::var_os("SANDBOXD_CACHE")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::PathBuf::from(std::env::var_os("HOME").unwrap_or_default())
                .join(".cache/sandboxd")
        });
    cache.join("azurite/node_modules/.bin/azurite-blob")
}

/// The storage account the image Job uploads to (Azurite knows it with the ARM test
/// server's key).
const JOB_ACCOUNT: &str = "acctnodejob";

/// `AZURE_IMAGE_ID` left empty: the operator's image Job runs as a pod on the real node (the
/// image's own build inputs, its security context, its service account), builds the pod VM
/// image, uploads it to Azurite through the ARM test server's storage account (both on the
/// control plane's bridge, where the node's pods reach them), publishes it and records the
/// id in `peer-pods-cm`; uninstall runs the deletion Job as a pod too.
async fn image_job(env: Env) -> Result<()> {
    let node = env.node();
    let client = env.admin().await?;
    let host = node.net.host_ip;
    // Azurite on the bridge, knowing the account with the key the ARM test server hands out.
    let port = crate::harness::process::free_port();
    let azurite = crate::harness::process::Process::start(
        &format!("azurite-{}", env.ns),
        &azurite_bin(),
        &[
            "--blobHost".into(),
            host.to_string(),
            "--blobPort".into(),
            port.to_string(),
            "--inMemoryPersistence".into(),
            "--disableTelemetry".into(),
            "--skipApiVersionCheck".into(),
        ],
        &[(
            "AZURITE_ACCOUNTS",
            &format!(
                "{JOB_ACCOUNT}:{}",
                armtest::storage_account_key(JOB_ACCOUNT)
            ),
        )],
    )?;
    let azurite_addr = std::net::SocketAddr::from((host, port));
    eventually("Azurite listening", Duration::from_secs(90), || async {
        Ok(tokio::net::TcpStream::connect(azurite_addr)
            .await
            .ok()
            .map(|_| ()))
    })
    .await?;
    let original = node.read_file("/etc/containerd/config.toml")?;
    let open = node.open(&client).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let result = image_job_on(&env, node, &client, azurite_addr, stop.clone()).await;
    if result.is_err() {
        print_pod_logs(&client, NS).await;
    }
    let cleanup = uninstall(&env, node, &client, &original).await;
    stop.cancel();
    drop(azurite);
    open.close().await?;
    match (result, cleanup) {
        (Err(r), Err(c)) => Err(r.context(format!("and the uninstall failed too: {c:#}"))),
        (r, c) => r.and(c),
    }
}

async fn image_job_on(
    env: &Env,
    node: &'static TestNode,
    client: &Client,
    azurite_addr: std::net::SocketAddr,
    stop: tokio_util::sync::CancellationToken,
) -> Result<()> {
    let image = image(node)?;
    let host = node.net.host_ip;
    let config = armtest::Config {
        lro_duration: Duration::from_millis(300),
        storage: armtest::StorageConfig {
            blob_endpoint: Some(url::Url::parse(&format!("http://{azurite_addr}/"))?),
        },
        ..armtest::Config::default()
    };
    let (addr, _arm, _task) = armtest::serve((host, 0).into(), config, stop).await?;
    _arm.seed_peer_pods(SUB, "rg", "eastus");
    let arm_url = format!("http://{addr}/");

    // The ARM test server is a development endpoint: a flag on the operator's command line,
    // which the operator hands on to the CAA and the image Jobs (never the ConfigMap).
    ctl_ok(
        env,
        &[
            "install",
            "--vanilla",
            "--image",
            &image,
            "--wait",
            "--timeout",
            "180",
            "--dev-arm-endpoint",
            &arm_url,
        ],
    )
    .await?;
    azure_secret(env).await?;
    // No --image-id: the image Job makes one.
    azure_configmap(env, &arm_url, None).await?;
    // The Job's storage account (an optional peer-pods-cm key the Job reads).
    let cms: Api<k8s_openapi::api::core::v1::ConfigMap> = Api::namespaced(client.clone(), NS);
    cms.patch(
        "peer-pods-cm",
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(json!({"data": {"IMAGE_STORAGE_ACCOUNT": JOB_ACCOUNT}})),
    )
    .await?;
    ctl_ok(env, &["ssh-key"]).await?;
    kataconfig_create(env).await?;
    let id = eventually(
        "AZURE_IMAGE_ID recorded by the image Job",
        Duration::from_secs(400),
        || async {
            let cm = cms.get("peer-pods-cm").await?;
            Ok(cm
                .data
                .unwrap_or_default()
                .get("AZURE_IMAGE_ID")
                .filter(|v| !v.is_empty())
                .cloned())
        },
    )
    .await?;
    ensure!(id.contains("/galleries/"), "image id {id}");
    // The Job ran as a pod on the node and succeeded (it records the id just before it ends).
    let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    eventually(
        "the image Job's pod Succeeded on the node",
        Duration::from_secs(60),
        || async {
            let job_pods = pods
                .list(&ListParams::default().labels("job-name=osc-podvm-image-creation"))
                .await?;
            Ok(job_pods
                .items
                .iter()
                .any(|p| {
                    phase(p) == "Succeeded"
                        && p.spec.as_ref().and_then(|s| s.node_name.as_deref())
                            == Some(node.name.as_str())
                })
                .then_some(()))
        },
    )
    .await?;
    Ok(())
}

/// `sandboxd <args>` (the binary under test), with a timeout.
async fn sandboxd(env: &Env, args: &[&str]) -> Result<(bool, String)> {
    let kubeconfig = env.cp().kubeconfig_path.display().to_string();
    let mut full = vec!["ctl", "--kubeconfig", kubeconfig.as_str()];
    full.extend_from_slice(args);
    let out = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(env!("CARGO_BIN_EXE_sandboxd"))
            .args(&full)
            .env_remove("KUBECONFIG")
            .kill_on_drop(true)
            .output(),
    )
    .await
    .with_context(|| format!("sandboxd {} did not finish", full.join(" ")))??;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((out.status.success(), text))
}

/// `ctl kataconfig create --peer-pods` for the real node (selected by its label).
async fn kataconfig_create(env: &Env) -> Result<()> {
    let selector = format!("{REAL_NODE_LABEL}=true");
    ctl_ok(
        env,
        &[
            "kataconfig",
            "create",
            "--name",
            KATA_CONFIG,
            "--peer-pods",
            "--selector",
            &selector,
        ],
    )
    .await
    .map(drop)
}

/// `ctl azure secret` as the guide has it, the client secret from the environment.
async fn azure_secret(env: &Env) -> Result<()> {
    let kubeconfig = env.cp().kubeconfig_path.display().to_string();
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_sandboxd"))
        .args(["ctl", "--kubeconfig", &kubeconfig, "azure", "secret"])
        .args(["--client-id", "aaaaaaaa-0000-0000-0000-000000000001"])
        .args(["--tenant-id", "aaaaaaaa-0000-0000-0000-000000000002"])
        .args(["--subscription-id", SUB])
        .env("AZURE_CLIENT_SECRET", "node-test-secret")
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "azure secret: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `ctl azure configmap` against the ARM test server at `arm_url`, in eastus (fake nodes of
/// other tests carry other regions), with `image_id` or without (the image Job makes one).
async fn azure_configmap(env: &Env, arm_url: &str, image_id: Option<&str>) -> Result<()> {
    let mut args = vec![
        "azure",
        "configmap",
        "--subscription",
        SUB,
        "--resource-group",
        "rg",
        "--region",
        "eastus",
        "--dev-arm-endpoint",
        arm_url,
    ];
    if let Some(id) = image_id {
        args.extend(["--image-id", id]);
    }
    ctl_ok(env, &args).await.map(drop)
}

async fn ctl_ok(env: &Env, args: &[&str]) -> Result<String> {
    let (ok, text) = sandboxd(env, args).await?;
    ensure!(ok, "sandboxd ctl {} failed:\n{text}", args.join(" "));
    Ok(text)
}

fn image(node: &TestNode) -> Result<String> {
    node.image
        .clone()
        .context("the node has no sandboxd image (make image)")
}

/// Events of `pod`, as "Reason: message" lines.
async fn pod_events(client: &Client, ns: &str, pod: &str) -> Result<Vec<String>> {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    let lp = ListParams::default().fields(&format!("involvedObject.name={pod}"));
    Ok(events
        .list(&lp)
        .await?
        .items
        .into_iter()
        .map(|e| {
            format!(
                "{}: {}",
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        })
        .collect())
}

fn phase(p: &Pod) -> String {
    p.status
        .as_ref()
        .and_then(|s| s.phase.clone())
        .unwrap_or_default()
}

/// A pod of the sandboxd image on the real node: it runs, `logs` and `exec` work through the
/// kubelet (the API server's kubelet client certificate), a ClusterIP Service reaches it
/// through kube-proxy from the host, and from another pod through the `kubernetes` Service.
async fn basics(env: Env) -> Result<()> {
    let node = env.node();
    let client = env.admin().await?;
    let open = node.open(&client).await?;
    let result = basics_on(&env, node, &client).await;
    open.close().await?;
    result
}

async fn basics_on(env: &Env, node: &'static TestNode, client: &Client) -> Result<()> {
    let image = image(node)?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &env.ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "arm", "labels": {"app": "arm"}},
        "spec": {
            "nodeName": node.name,
            "containers": [{
                "name": "arm",
                "image": image,
                "args": ["dev", "arm-server", "--addr", "0.0.0.0:8080",
                         "--seed-subscription", SUB],
            }],
        },
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let svc: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "metadata": {"name": "arm"},
        "spec": {"selector": {"app": "arm"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }))?;
    let svcs: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), &env.ns);
    let svc = svcs.create(&PostParams::default(), &svc).await?;
    let ip = eventually(
        "the pod Running with an IP",
        Duration::from_secs(90),
        || async {
            let p = pods.get("arm").await?;
            let ip = p.status.as_ref().and_then(|s| s.pod_ip.clone());
            Ok((phase(&p) == "Running").then_some(ip).flatten())
        },
    )
    .await;
    let ip = match ip {
        Ok(ip) => ip,
        Err(e) => {
            let ev = pod_events(client, &env.ns, "arm").await.unwrap_or_default();
            return Err(e.context(format!("pod events: {ev:?}")));
        }
    };
    ensure!(
        ip.starts_with(&node.net.pod_cidr[..node.net.pod_cidr.len() - 4]),
        "pod IP {ip} is not in the node's pod CIDR {}",
        node.net.pod_cidr
    );
    // logs and exec go through the kubelet's API.
    let logs = eventually(
        "the container's output",
        Duration::from_secs(30),
        || async {
            let logs = pods.logs("arm", &Default::default()).await?;
            Ok(logs.contains("AZURE_IMAGE_ID=").then_some(logs))
        },
    )
    .await?;
    ensure!(logs.contains(SUB), "logs: {logs}");
    let kubeconfig = env.cp().kubeconfig_path.display().to_string();
    let exec = tokio::process::Command::new(node.bin.join("kubectl"))
        .args([
            "--kubeconfig",
            &kubeconfig,
            "-n",
            &env.ns,
            "exec",
            "arm",
            "--",
        ])
        .args(["/sandboxd", "version"])
        .output()
        .await
        .context("kubectl exec")?;
    ensure!(
        exec.status.success(),
        "kubectl exec failed: {}",
        String::from_utf8_lossy(&exec.stderr)
    );
    let out = String::from_utf8_lossy(&exec.stdout).to_string();
    ensure!(out.starts_with("sandboxd "), "exec printed {out:?}");
    // The Service from the host (the API server's side), through the node's kube-proxy.
    let cluster_ip = svc
        .spec
        .and_then(|s| s.cluster_ip)
        .context("the Service has no ClusterIP")?;
    let url = format!("http://{cluster_ip}:80/subscriptions");
    // The ARM test server in the pod answers with an ARM-shaped JSON body (a list or an
    // error object), so the answer is known to come from the container.
    let body = eventually("the Service answering", Duration::from_secs(30), || {
        let url = url.clone();
        async move {
            let out = tokio::process::Command::new("curl")
                .args(["-sS", "-m", "2", &url])
                .output()
                .await?;
            Ok(out
                .status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).to_string()))
        }
    })
    .await?;
    let json: serde_json::Value =
        serde_json::from_str(&body).with_context(|| format!("GET {url} answered {body:?}"))?;
    ensure!(
        json.get("value").is_some() || json.get("error").is_some(),
        "GET {url} answered {json}"
    );
    pods.delete("arm", &DeleteParams::default()).await?;
    Ok(())
}

/// Every pod in `ns` with its node, the namespace's last events, and the last lines of each
/// container's log (for a failure's diagnosis).
async fn print_pod_logs(client: &Client, ns: &str) {
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    if let Ok(list) = events.list(&ListParams::default()).await {
        for e in list.items.iter().rev().take(20) {
            eprintln!(
                "event {}: {} {}",
                e.involved_object.name.clone().unwrap_or_default(),
                e.reason.clone().unwrap_or_default(),
                e.message.clone().unwrap_or_default()
            );
        }
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let Ok(list) = pods.list(&ListParams::default()).await else {
        return;
    };
    for p in list.items {
        let name = p.name_any();
        let lp = kube::api::LogParams {
            tail_lines: Some(20),
            ..Default::default()
        };
        let logs = pods
            .logs(&name, &lp)
            .await
            .unwrap_or_else(|e| e.to_string());
        let on = p
            .spec
            .as_ref()
            .and_then(|s| s.node_name.clone())
            .unwrap_or_default();
        eprintln!("--- {ns}/{name} ({} on {on:?})\n{logs}", phase(&p));
    }
}

async fn uninstall(env: &Env, node: &TestNode, client: &Client, original: &[u8]) -> Result<()> {
    let kcs: Api<sandboxd::api::kataconfig::KataConfig> = Api::all(client.clone());
    if kcs.get_opt(KATA_CONFIG).await?.is_some() {
        kcs.delete(KATA_CONFIG, &DeleteParams::default()).await?;
        eventually("the KataConfig gone", Duration::from_secs(180), || async {
            Ok(kcs.get_opt(KATA_CONFIG).await?.is_none().then_some(()))
        })
        .await?;
    }
    // The CRDs stay: the test cluster is shared, and other tests' PeerPod records would
    // (rightly) refuse their removal.
    let (ok, text) = sandboxd(env, &["uninstall", "--keep-crds"]).await?;
    ensure!(ok, "ctl uninstall failed:\n{text}");
    let namespaces: Api<k8s_openapi::api::core::v1::Namespace> = Api::all(client.clone());
    eventually(
        "the operator namespace gone",
        Duration::from_secs(120),
        || async { Ok(namespaces.get_opt(NS).await?.is_none().then_some(())) },
    )
    .await?;
    let now = node.read_file("/etc/containerd/config.toml")?;
    ensure!(
        now == original,
        "uninstall left the node's containerd configuration changed:\n{}",
        String::from_utf8_lossy(&now)
    );
    Ok(())
}
