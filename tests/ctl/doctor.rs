//! `sandboxd ctl doctor` as users run it: the built binary against the test control plane
//! (objects created by the test stand in for an installation) and the ARM test server.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, Client};
use sandboxd::armtest::RuleSeed;
use sandboxd::pki::{Ca, Usage};
use sandboxd::webhook::manifest::{self, Endpoint};
use serde_json::{Value, json};

use super::azure_configmap::{Arm, SUB, azure_nodes, create_secret, ctl, good_secret};
use crate::harness::process::{Process, free_port, run_dir};
use crate::harness::{self, Case, Env, Phase, eventually};

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster(
            "ctl::doctor_without_sandboxd_installed_fails_naming_each_missing_piece_and_its_fix",
            empty,
        ),
        Case::cluster(
            "ctl::doctor_on_a_prepared_cluster_reports_what_is_ready_and_what_is_not",
            prepared,
        ),
        Case::cluster(
            "ctl::doctor_fails_when_the_nsg_denies_vxlan_and_prints_the_rule_to_add",
            nsg_denies_vxlan,
        ),
    ]
}

fn findings(stdout: &str) -> Result<Vec<Value>> {
    let v: Value = serde_json::from_str(stdout).context("doctor -o json prints JSON")?;
    v.as_array().cloned().context("an array of findings")
}

/// The findings of `check`.
fn of<'a>(all: &'a [Value], check: &str) -> Vec<&'a Value> {
    all.iter().filter(|f| f["check"] == check).collect()
}

fn has(all: &[Value], check: &str, status: &str, text: &str) -> bool {
    of(all, check)
        .iter()
        .any(|f| f["status"] == status && f["message"].as_str().unwrap_or("").contains(text))
}

async fn empty(env: Env) -> Result<()> {
    let selector = format!("sandboxd.test/doctor={}", env.unique("none"));
    let args = [
        "doctor",
        "--node-selector",
        selector.as_str(),
        "--probe-namespace",
        env.ns.as_str(),
    ];
    let mut json_args = vec!["-o", "json"];
    json_args.extend(args);
    let run = ctl(&env, None, &json_args).await?;
    ensure!(run.code != 0, "{run}");
    let all = findings(&run.stdout)?;
    ensure!(
        has(&all, "operator", "fail", "operator not installed"),
        "{run}"
    );
    ensure!(
        of(&all, "operator")[0]["fix"] == "sandboxd ctl install --wait",
        "{run}"
    );
    ensure!(
        has(&all, "configmap", "fail", "peer-pods-cm missing"),
        "{run}"
    );
    ensure!(
        has(&all, "secret", "fail", "peer-pods-secret missing"),
        "{run}"
    );
    ensure!(has(&all, "image", "fail", "AZURE_IMAGE_ID"), "{run}");
    ensure!(has(&all, "nodes", "fail", "no node matches"), "{run}");
    ensure!(
        has(
            &all,
            "caa",
            "fail",
            "DaemonSet peerpodconfig-ctrl-caa-daemon missing"
        ),
        "{run}"
    );
    ensure!(
        of(&all, "webhook").iter().all(|f| f["status"] == "fail"),
        "{run}"
    );
    ensure!(has(&all, "nsg", "warn", "not checked"), "{run}");
    // Every failure carries its fix.
    ensure!(
        all.iter()
            .filter(|f| f["status"] != "ok")
            .all(|f| f["fix"].as_str().is_some_and(|s| !s.is_empty())),
        "{run}"
    );

    // The table a user reads says the same.
    let run = ctl(&env, None, &args).await?;
    ensure!(run.code != 0, "{run}");
    ensure!(
        run.stdout.contains("[FAIL] operator")
            && run.stdout.contains("fix: sandboxd ctl install --wait"),
        "{run}"
    );
    ensure!(run.stderr.contains("check(s) failed"), "{run}");
    Ok(())
}

/// Waits for `n` pods matching `labels` in the test namespace; returns them.
async fn pods(env: &Env, labels: &str, n: usize) -> Result<Vec<Pod>> {
    let api: Api<Pod> = Api::namespaced(env.admin().await?, &env.ns);
    let lp = ListParams::default().labels(labels);
    eventually(
        &format!("{n} pods {labels}"),
        Duration::from_secs(60),
        || {
            let api = api.clone();
            let lp = lp.clone();
            async move {
                let items = api.list(&lp).await?.items;
                Ok((items.len() >= n).then_some(items))
            }
        },
    )
    .await
}

/// `sandboxd webhook` serving this test's namespace, registered under a per-test name.
struct Hook {
    process: Process,
    api: Api<MutatingWebhookConfiguration>,
    name: String,
}

impl Hook {
    async fn start(env: &Env, client: &Client) -> Result<Self> {
        let ca = Ca::new(&format!("doctor-ca-{}", env.ns), time::Duration::hours(1))?;
        let pair = ca.issue(
            "webhook",
            &[],
            &["127.0.0.1"],
            Usage::Server,
            time::Duration::hours(1),
        )?;
        let dir = run_dir().join(format!("doctor-webhook-{}", env.ns));
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("tls.crt"), &pair.cert_pem)?;
        std::fs::write(dir.join("tls.key"), &pair.key_pem)?;
        let port = free_port();
        let args: Vec<String> = [
            "webhook",
            "--cert-dir",
            &dir.to_string_lossy(),
            "--port",
            &port.to_string(),
            "--bind-address",
            "127.0.0.1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let process = Process::start(
            &format!("doctor-webhook-{}", env.ns),
            std::path::Path::new(env!("CARGO_BIN_EXE_sandboxd")),
            &args,
            &[],
        )?;
        let mut options = manifest::Options {
            endpoint: Endpoint::Url(format!("https://127.0.0.1:{port}{}", manifest::MUTATE_PATH)),
            ca_bundle: Some(ca.cert_pem()),
            ..Default::default()
        };
        options
            .extra_namespace_requirements
            .push(LabelSelectorRequirement {
                key: "kubernetes.io/metadata.name".into(),
                operator: "In".into(),
                values: Some(vec![env.ns.clone()]),
            });
        let mut config = manifest::webhook_configuration(&options);
        let name = env.unique("doctor-webhook");
        config.metadata.name = Some(name.clone());
        let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        api.create(&PostParams::default(), &config).await?;
        Ok(Self { process, api, name })
    }

    async fn stop(self) {
        let _ = self.api.delete(&self.name, &DeleteParams::default()).await;
    }
}

/// The RuntimeClass as the operator creates it (DESIGN §3); shared by suites, so only
/// created when missing.
pub(super) async fn ensure_runtime_class(client: &Client) -> Result<()> {
    let api: Api<RuntimeClass> = Api::all(client.clone());
    let rc: RuntimeClass = serde_json::from_value(json!({
        "metadata": {"name": "kata-remote"},
        "handler": "kata-remote",
        "overhead": {"podFixed": {"cpu": "250m", "memory": "350Mi"}},
        "scheduling": {"nodeSelector": {"node-role.kubernetes.io/kata-oc": ""}}
    }))?;
    match api.create(&PostParams::default(), &rc).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn prepared(env: Env) -> Result<()> {
    let client = env.admin().await?;
    ensure_runtime_class(&client).await?;
    let hook = Hook::start(&env, &client).await?;
    let result = prepared_with_webhook(&env, &client).await;
    let result =
        result.map_err(|e| anyhow::anyhow!("{e:#}\nwebhook log:\n{}", hook.process.log_tail(20)));
    hook.stop().await;
    result
}

async fn prepared_with_webhook(env: &Env, client: &Client) -> Result<()> {
    let client = client.clone();
    let arm = Arm::start().await?;
    let (subnet, nsg) = arm.openshift_layout("ocp-pr-rg", &[]);
    create_secret(env, &good_secret()).await?;
    // A valid configmap without an image yet.
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &env.ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "peer-pods-cm"},
            "data": {
                "CLOUD_PROVIDER": "azure", "VXLAN_PORT": "9000", "PROXY_TIMEOUT": "5m",
                "DISABLECVM": "true", "AZURE_INSTANCE_SIZE": "Standard_B2als_v2",
                "AZURE_INSTANCE_SIZES": "Standard_B2als_v2,Standard_D2as_v5",
                "AZURE_SUBNET_ID": subnet, "AZURE_NSG_ID": nsg, "AZURE_IMAGE_ID": "",
                "AZURE_REGION": "eastus", "AZURE_RESOURCE_GROUP": "ocp-pr-rg",
            }
        }))?,
    )
    .await?;

    // Two nodes meant for peer pods: one labelled with VM capacity, one not labelled.
    let tag = env.unique("dr");
    let sel = ("sandboxd.test/doctor", tag.as_str());
    let good = format!("{tag}-a");
    let bare = format!("{tag}-b");
    harness::fake_node(
        &client,
        &good,
        &[sel, ("node-role.kubernetes.io/kata-oc", "")],
        &[("kata.peerpods.io/vm", "3")],
    )
    .await?;
    harness::fake_node(&client, &bare, &[sel], &[]).await?;

    // The operator Deployment, made ready by the kubelet stand-in.
    let deployments: Api<Deployment> = Api::namespaced(client.clone(), &env.ns);
    deployments
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "sandboxd-operator"},
                "spec": {
                    "replicas": 1,
                    "selector": {"matchLabels": {"app": "op"}},
                    "template": {
                        "metadata": {"labels": {"app": "op"}},
                        "spec": {"nodeName": good, "containers": [{"name": "operator", "image": "sandboxd:test"}]}
                    }
                }
            }))?,
        )
        .await?;
    // The CAA DaemonSet (behind the node agent relay) and the relay's on both nodes; only
    // the pods on the first become ready.
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), &env.ns);
    for (name, app, env_var) in [
        (
            "peerpodconfig-ctrl-caa-daemon",
            "caa",
            Some("CAA_RELAY_SOCKET"),
        ),
        ("peerpodconfig-ctrl-caa-relay", "relay", None),
    ] {
        let env_list: Vec<serde_json::Value> = env_var
            .map(|n| json!({"name": n, "value": "/run/peerpod/relay/control.sock"}))
            .into_iter()
            .collect();
        daemonsets
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {
                        "selector": {"matchLabels": {"app": app}},
                        "template": {
                            "metadata": {"labels": {"app": app}},
                            "spec": {
                                "nodeSelector": {"sandboxd.test/doctor": tag},
                                "containers": [{"name": app, "image": "sandboxd:test", "env": env_list}]
                            }
                        }
                    }
                }))?,
            )
            .await?;
    }
    let op = pods(env, "app=op", 1).await?;
    harness::set_pod_phase(
        &client,
        &env.ns,
        op[0].metadata.name.as_deref().context("name")?,
        Phase::Running,
        Some("10.0.1.4"),
    )
    .await?;
    let caa = pods(env, "app=caa", 2).await?;
    let on_good = caa
        .iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(good.as_str()))
        .context("a CAA pod on the labelled node")?;
    harness::set_pod_phase(
        &client,
        &env.ns,
        on_good.metadata.name.as_deref().context("name")?,
        Phase::Running,
        Some("10.0.1.5"),
    )
    .await?;
    let relay = pods(env, "app=relay", 2).await?;
    let relay_on_good = relay
        .iter()
        .find(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(good.as_str()))
        .context("a relay pod on the labelled node")?;
    harness::set_pod_phase(
        &client,
        &env.ns,
        relay_on_good.metadata.name.as_deref().context("name")?,
        Phase::Running,
        Some("10.0.1.5"),
    )
    .await?;
    eventually(
        "the operator Deployment ready",
        Duration::from_secs(60),
        || {
            let d = deployments.clone();
            async move {
                let d = d.get("sandboxd-operator").await?;
                Ok((d.status.and_then(|s| s.ready_replicas) == Some(1)).then_some(()))
            }
        },
    )
    .await?;

    let selector = format!("sandboxd.test/doctor={tag}");
    let args = [
        "-o",
        "json",
        "doctor",
        "--node-selector",
        &selector,
        "--probe-namespace",
        &env.ns,
    ];
    // Webhook configurations reach the admission chain asynchronously.
    let (run, all) = eventually(
        "doctor to see the webhook mutate its probe",
        Duration::from_secs(30),
        || async {
            let run = ctl(env, Some(&arm), &args).await?;
            let all = findings(&run.stdout)?;
            Ok(
                has(&all, "webhook", "ok", "came back with kata.peerpods.io/vm")
                    .then_some((run, all)),
            )
        },
    )
    .await?;
    ensure!(run.code != 0, "{run}");
    ensure!(has(&all, "runtimeclass", "ok", "kata-remote"), "{run}");
    // The probe was a dry run: nothing stored.
    let stored = Api::<Pod>::namespaced(client.clone(), &env.ns)
        .list(&ListParams::default())
        .await?
        .items;
    ensure!(
        stored.iter().all(|p| !p
            .metadata
            .name
            .as_deref()
            .unwrap_or("")
            .starts_with("sandboxd-doctor-probe")),
        "probe pod stored"
    );
    ensure!(
        has(&all, "operator", "ok", "sandboxd-operator ready"),
        "{run}"
    );
    ensure!(has(&all, "configmap", "ok", "valid"), "{run}");
    ensure!(has(&all, "secret", "ok", "client secret"), "{run}");
    ensure!(
        has(&all, "image", "fail", "AZURE_IMAGE_ID is empty"),
        "{run}"
    );
    ensure!(
        has(
            &all,
            "nodes",
            "fail",
            &format!("node {bare} is not labelled")
        ),
        "{run}"
    );
    ensure!(
        has(&all, "nodes", "ok", &format!("{good} (3 VMs)")),
        "{run}"
    );
    ensure!(
        has(
            &all,
            "caa",
            "fail",
            &format!("no ready CAA pod on node {bare}")
        ),
        "{run}"
    );
    ensure!(
        has(
            &all,
            "caa",
            "fail",
            &format!("no ready node agent relay pod on node {bare}")
        ),
        "{run}"
    );
    ensure!(
        !has(
            &all,
            "caa",
            "fail",
            &format!("no ready node agent relay pod on node {good}")
        ),
        "{run}"
    );
    ensure!(
        !has(&all, "caa", "fail", &format!("node {good}:")),
        "the ready CAA pod counts: {run}"
    );
    // Default NSG rules let the subnet talk to itself.
    ensure!(
        has(
            &all,
            "nsg",
            "ok",
            "allows 9000/UDP inbound, 15150/TCP inbound, 9000/UDP outbound"
        ),
        "{run}"
    );
    Ok(())
}

async fn nsg_denies_vxlan(env: Env) -> Result<()> {
    let arm = Arm::start().await?;
    let rg = "ocp-ns-rg";
    // A hardened NSG: the agent port is allowed, everything else inbound denied.
    let rules = [
        RuleSeed::new(
            "allow-agent",
            200,
            "Inbound",
            "Allow",
            "Tcp",
            "10.0.1.0/24",
            "*",
            "15150",
        ),
        RuleSeed::new("deny-all-in", 4000, "Inbound", "Deny", "*", "*", "*", "*"),
    ];
    arm.openshift_layout(rg, &rules);
    let selector = azure_nodes(&env, rg, Some("eastus")).await?;
    create_secret(&env, &good_secret()).await?;
    // An image id that names no image (deleted since, or a typo).
    let image = format!(
        "{}/providers/Microsoft.Compute/galleries/g/images/podvm/versions/9.9.9",
        Arm::rg_id(rg)
    );
    let run = ctl(
        &env,
        Some(&arm),
        &[
            "azure",
            "configmap",
            "--node-selector",
            &selector,
            "--image-id",
            &image,
        ],
    )
    .await?;
    ensure!(run.code == 0, "{run}");

    let doctor = ["-o", "json", "doctor", "--node-selector", &selector];
    let run = ctl(&env, Some(&arm), &doctor).await?;
    ensure!(run.code != 0, "{run}");
    let all = findings(&run.stdout)?;
    ensure!(
        has(
            &all,
            "image",
            "fail",
            "AZURE_IMAGE_ID names an image that does not exist"
        ),
        "{run}"
    );
    let nsg = of(&all, "nsg");
    ensure!(nsg.len() == 1, "one finding for the one NSG: {run}");
    let f = nsg[0];
    ensure!(f["status"] == "fail", "{run}");
    let msg = f["message"].as_str().unwrap_or_default();
    ensure!(
        msg.contains("NSG ocp-ns-rg-nsg denies VXLAN 9000/UDP from the worker subnet 10.0.1.0/24")
            && msg.contains("rule deny-all-in, priority 4000"),
        "{run}"
    );
    let fix = f["fix"].as_str().unwrap_or_default();
    for part in [
        "az network nsg rule create -g ocp-ns-rg --nsg-name ocp-ns-rg-nsg",
        "--priority 3999",
        "--direction Inbound",
        "--access Allow",
        "--protocol Udp",
        "--source-address-prefixes 10.0.1.0/24",
        "--destination-port-ranges 9000",
    ] {
        ensure!(fix.contains(part), "fix lacks {part:?}: {run}");
    }

    // With the rule the fix names, the check passes.
    arm.handle.seed_nsg(
        SUB,
        rg,
        "eastus",
        "ocp-ns-rg-nsg",
        &[
            rules[0].clone(),
            rules[1].clone(),
            RuleSeed::new(
                "allow-peerpods-udp-9000-in",
                3999,
                "Inbound",
                "Allow",
                "Udp",
                "10.0.1.0/24",
                "*",
                "9000",
            ),
        ],
    );
    let run = ctl(&env, Some(&arm), &doctor).await?;
    let all = findings(&run.stdout)?;
    ensure!(
        has(
            &all,
            "nsg",
            "ok",
            "NSG ocp-ns-rg-nsg allows 9000/UDP inbound"
        ),
        "{run}"
    );
    Ok(())
}
