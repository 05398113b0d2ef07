//! The node installer's watch loop against the real API server: `node_install::follow` runs
//! in-process for two fake nodes, each with a temporary host root and a recording
//! service-manager stand-in, under the installer's own ServiceAccount (RBAC from
//! `deploy/operator/rbac.yaml`), next to the operator.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::Node;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use sandboxd::api::names::*;
use sandboxd::operator::node_install::systemd::Recorded;
use sandboxd::operator::node_install::{self, InstallConfig, containerd, kata_config};
use serde_json::json;
use tokio_util::sync::CancellationToken;

use super::support::*;
use crate::harness::{self, Case, Env, eventually};

pub fn cases() -> Vec<Case> {
    vec![Case::cluster_exclusive(
        "operator::node_installer_configures_hosts_follows_log_level_and_undoes_everything",
        installer_end_to_end,
    )]
}

/// One host: its root, the restarts it saw, the installer running on it.
struct Host {
    node: String,
    root: tempfile::TempDir,
    restarts: Arc<Recorded>,
    token: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), node_install::Error>>,
}

impl Host {
    fn start(client: &Client, node: &str, root: tempfile::TempDir, log_level: &str) -> Self {
        Self::run(client, node, root, Arc::new(Recorded::default()), log_level)
    }

    fn run(
        client: &Client,
        node: &str,
        root: tempfile::TempDir,
        restarts: Arc<Recorded>,
        log_level: &str,
    ) -> Self {
        let token = CancellationToken::new();
        let (c, n, r, sm, t) = (
            client.clone(),
            node.to_string(),
            root.path().to_path_buf(),
            restarts.clone(),
            token.clone(),
        );
        let cfg = InstallConfig::new(log_level);
        let task =
            tokio::spawn(
                async move { node_install::follow(c, &n, &r, &cfg, sm.as_ref(), t).await },
            );
        Self {
            node: node.to_string(),
            root,
            restarts,
            token,
            task,
        }
    }

    /// Stops the installer (as a DaemonSet rollout does) and starts it with `log_level`.
    async fn roll(self, client: &Client, log_level: &str) -> Result<Self> {
        self.token.cancel();
        self.task.await??;
        Ok(Self::run(
            client,
            &self.node,
            self.root,
            self.restarts,
            log_level,
        ))
    }

    fn file(&self, abs: &str) -> Option<String> {
        std::fs::read_to_string(node_install::files::host_path(self.root.path(), abs)).ok()
    }

    fn restarts(&self) -> Vec<String> {
        self.restarts.restarted.lock().unwrap().clone()
    }
}

fn snapshot(root: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<PathBuf, Vec<u8>>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            let p = e.path();
            let key = p.strip_prefix(base).unwrap().to_path_buf();
            if p.is_dir() {
                out.insert(key, b"<dir>".to_vec());
                walk(base, &p, out);
            } else {
                out.insert(key, std::fs::read(&p).unwrap());
            }
        }
    }
    let mut out = BTreeMap::new();
    walk(root, root, &mut out);
    out
}

fn host(containerd_config: Option<&str>) -> Result<tempfile::TempDir> {
    let dir = tempfile::tempdir()?;
    let bin = dir.path().join("opt/kata/bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::write(bin.join("containerd-shim-kata-v2"), "shim")?;
    if let Some(text) = containerd_config {
        let p = node_install::files::host_path(dir.path(), containerd::MAIN_CONFIG);
        std::fs::create_dir_all(p.parent().unwrap())?;
        std::fs::write(p, text)?;
    }
    Ok(dir)
}

const CONTAINERD_2X: &str = "version = 3\n# kept byte for byte\n\n[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]\n  runtime_type = 'io.containerd.runc.v2'\n";

async fn installer_end_to_end(env: Env) -> Result<()> {
    let mut f = Fixture::new(&env).await?;
    // The fake nodes report containerd 2.0 (config version 3).
    let a = f.node("inst-a", true).await?;
    let b = f.node("inst-b", true).await?;
    // Each installer with its DaemonSet pod's kind of token: bound to a pod on its node.
    let client_a =
        harness::pod_bound_service_account_client(env.cp(), &f.ns, INSTALLER_SERVICE_ACCOUNT, &a)
            .await?;
    let client_b =
        harness::pod_bound_service_account_client(env.cp(), &f.ns, INSTALLER_SERVICE_ACCOUNT, &b)
            .await?;
    let root_a = host(Some(CONTAINERD_2X))?;
    let root_b = host(None)?;
    let before_a = snapshot(root_a.path());
    let before_b = snapshot(root_b.path());
    let mut hosts = vec![
        Host::start(&client_a, &a, root_a, "info"),
        Host::start(&client_b, &b, root_b, "info"),
    ];

    let op = f.start();
    let name = env.unique("kc");
    f.create(&f.kataconfig(&name)).await?;
    let kc = f
        .wait_status(&name, "both nodes installed by the installer", |kc| {
            kata_nodes(kc).ready_node_count == 2
                && in_progress(kc).is_some_and(|(s, r, _)| s == "False" && r.is_empty())
        })
        .await?;
    ensure!(sorted(&kata_nodes(&kc).installed) == sorted(&[a.clone(), b.clone()]));
    for h in &hosts {
        let kata = h
            .file(kata_config::KATA_CONFIG)
            .context("kata configuration written")?;
        ensure!(kata.contains("remote_hypervisor_socket = \"/run/peerpod/hypervisor.sock\""));
        ensure!(
            kata.contains("enable_debug = false"),
            "logLevel info: {kata}"
        );
        let dropin = h.file(containerd::DROPIN).context("containerd drop-in")?;
        ensure!(dropin.contains("kata-remote"), "{dropin}");
        let main = h.file(containerd::MAIN_CONFIG).context("main config")?;
        ensure!(
            main.contains(containerd::DROPIN),
            "drop-in not imported: {main}"
        );
        ensure!(
            h.restarts() == [containerd::UNIT],
            "{}: {:?}",
            h.node,
            h.restarts()
        );
    }
    ensure!(
        hosts[0]
            .file(containerd::MAIN_CONFIG)
            .unwrap()
            .contains("# kept byte for byte")
    );

    // logLevel debug: the DaemonSet carries it, nodes show as updating until the rolled
    // installers report the new configuration, which turns on the runtime's debug output.
    f.kcs()
        .patch(
            &name,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"logLevel": "debug"}})),
        )
        .await?;
    let dss: Api<DaemonSet> = Api::namespaced(f.admin.clone(), &f.ns);
    eventually(
        "the installer DaemonSet to carry logLevel debug",
        WAIT,
        || async {
            let ds = dss.get(INSTALLER_DAEMONSET).await?;
            let env = ds
                .spec
                .and_then(|s| s.template.spec)
                .map(|s| s.containers[0].env.clone());
            Ok(env
                .flatten()
                .unwrap_or_default()
                .iter()
                .any(|e| e.name == "KATA_LOG_LEVEL" && e.value.as_deref() == Some("debug"))
                .then_some(()))
        },
    )
    .await?;
    f.wait_status(&name, "nodes updating to the new configuration", |kc| {
        kata_nodes(kc).installing.len() == 2
            && in_progress(kc).is_some_and(|(s, r, _)| s == "True" && r == "Updating")
    })
    .await?;
    // The node installer may change only its own Node (the admission policy on the token's
    // node name): node a's installer cannot write node b.
    let refused = Api::<Node>::all(client_a.clone())
        .patch(
            &b,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"annotations": {"sandboxd.test/forged": "x"}}})),
        )
        .await;
    match refused {
        Err(kube::Error::Api(s)) if s.code == 403 || s.code == 422 => ensure!(
            s.message.contains("only the Node it runs on"),
            "{}",
            s.message
        ),
        other => anyhow::bail!("node a's installer changed node b: {other:?}"),
    }
    let mut rolled = Vec::new();
    for (h, c) in hosts.into_iter().zip([&client_a, &client_b]) {
        rolled.push(h.roll(c, "debug").await?);
    }
    hosts = rolled;
    f.wait_status(&name, "both nodes on the debug configuration", |kc| {
        kata_nodes(kc).ready_node_count == 2
            && in_progress(kc).is_some_and(|(s, _, _)| s == "False")
    })
    .await?;
    for h in &hosts {
        let kata = h.file(kata_config::KATA_CONFIG).unwrap();
        ensure!(
            kata.contains("enable_debug = true"),
            "logLevel debug: {kata}"
        );
        // New shims read the new configuration: containerd is not restarted (it would end
        // the node's open exec sessions).
        ensure!(h.restarts().len() == 1, "{:?}", h.restarts());
    }

    // Uninstall: every host file is undone, byte for byte.
    f.kcs().delete(&name, &DeleteParams::default()).await?;
    eventually("the KataConfig gone", Duration::from_secs(60), || async {
        Ok(f.kcs().get_opt(&name).await?.is_none().then_some(()))
    })
    .await?;
    f.assert_clean().await?;
    for (h, before) in hosts.iter().zip([before_a, before_b]) {
        let after = snapshot(h.root.path());
        ensure!(
            after == before,
            "{}: host not restored: {:?}",
            h.node,
            after.keys().collect::<Vec<_>>()
        );
        ensure!(h.restarts().len() == 2, "{:?}", h.restarts());
    }
    for h in hosts {
        h.token.cancel();
        h.task
            .await?
            .map_err(|e| anyhow!("installer on {} failed: {e}", h.node))?;
    }
    op.stop().await?;
    f.teardown().await
}
