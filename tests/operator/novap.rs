//! A cluster without ValidatingAdmissionPolicy (Kubernetes before 1.30, e.g. OpenShift 4.15
//! and 4.16): a second, separate control plane whose API server has the API turned off with
//! `--runtime-config` (and its admission plugin off). The shipped `sandboxd operator` binary, under its deployed RBAC, must
//! keep running, say in its log and in the KataConfig's status that the webhook keeps the
//! one-KataConfig rule, and a `sandboxd webhook` started with the Deployment's arguments
//! must make the real API server refuse a second KataConfig.
//!
//! The same operator runs at `trace` with a canary client secret in `peer-pods-secret`: its
//! PeerPod GC calls the ARM test server (given as `--dev-arm-endpoint`), and neither the
//! canary, nor a bearer token the test server issued, nor the operator's own API token
//! appears in its log, the Events or the KataConfig's status.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::{Api, PostParams};
use sandboxd::api::kataconfig::{KataConfig, KataConfigSpec};
use sandboxd::api::names::WEBHOOK;
use sandboxd::armtest;
use serde_json::json;

use crate::harness::process::{Process, free_port, run_dir};
use crate::harness::{self, Case, ControlPlane, Env, eventually};

const WAIT: Duration = Duration::from_secs(60);
const CANARY: &str = "CanaryOperatorSecret4Hq8ZpTnoLog";
const SUB: &str = "11111111-2222-3333-4444-555555555555";
const RUNTIME_CONFIG: &str = "--runtime-config=admissionregistration.k8s.io/v1/validatingadmissionpolicies=false,admissionregistration.k8s.io/v1/validatingadmissionpolicybindings=false";
/// Without the API its admission plugin never becomes ready (the API server would refuse
/// every request): a cluster before 1.30 has neither.
const NO_PLUGIN: &str = "--disable-admission-plugins=ValidatingAdmissionPolicy";

pub fn cases() -> Vec<Case> {
    vec![Case::plain(
        "operator::without_validating_admission_policy_the_webhook_refuses_a_second_kataconfig_and_the_log_and_status_say_so_and_a_trace_log_holds_no_secret",
        without_vap,
    )]
}

async fn without_vap(_env: Env) -> Result<()> {
    let cp = tokio::task::spawn_blocking(|| {
        ControlPlane::start_with(
            // The controller manager makes namespaces' default ServiceAccounts.
            harness::Options {
                controller_manager: true,
                scheduler: false,
            },
            &[RUNTIME_CONFIG, NO_PLUGIN],
        )
    })
    .await??;
    let admin = cp.admin_client().await?;
    // The API is really off.
    let resources = admin
        .list_api_group_resources("admissionregistration.k8s.io/v1")
        .await?;
    ensure!(
        !resources
            .resources
            .iter()
            .any(|r| r.name == "validatingadmissionpolicies"),
        "the API server still serves validatingadmissionpolicies"
    );
    let ns = "sandboxd-novap";
    harness::create_namespace(&admin, ns).await?;
    for f in [
        "kataconfigs.kataconfiguration.openshift.io.yaml",
        "peerpodconfigs.confidentialcontainers.org.yaml",
        "peerpods.confidentialcontainers.org.yaml",
    ] {
        harness::install_crds(
            &admin,
            &Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("deploy/crds")
                .join(f),
        )
        .await?;
    }
    crate::operator::support::apply_rbac(&admin, ns, "novap").await?;
    let dir = run_dir().join(format!("novap-{}", free_port()));
    std::fs::create_dir_all(&dir)?;
    let kubeconfig = dir.join("operator.kubeconfig");
    let kubeconfig_yaml = harness::service_account_kubeconfig(&cp, ns, "sandboxd-operator").await?;
    std::fs::write(&kubeconfig, &kubeconfig_yaml)?;
    let api_token = kubeconfig_yaml
        .lines()
        .find_map(|l| l.trim().strip_prefix("token:"))
        .map(|t| t.trim().trim_matches('"').to_string())
        .context("the operator's token")?;
    // The ARM test server and a peer-pods setup whose secret carries the canary.
    let stop = tokio_util::sync::CancellationToken::new();
    let _stop = stop.clone().drop_guard();
    let (addr, arm, _task) =
        armtest::serve("127.0.0.1:0".parse()?, armtest::Config::default(), stop).await?;
    let (subnet, _nsg, image) = arm.seed_peer_pods(SUB, "rg", "eastus");
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "peer-pods-cm"},
        "data": {
            "CLOUD_PROVIDER": "azure", "AZURE_INSTANCE_SIZE": "Standard_D2as_v5",
            "AZURE_SUBNET_ID": subnet, "AZURE_IMAGE_ID": image,
            "AZURE_REGION": "eastus", "AZURE_RESOURCE_GROUP": "rg",
        },
    }))?;
    Api::<ConfigMap>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &cm)
        .await?;
    let secret: Secret = serde_json::from_value(json!({
        "metadata": {"name": "peer-pods-secret"},
        "stringData": {
            "AZURE_CLIENT_ID": "0a1b2c3d-0000-4000-8000-00000000000c",
            "AZURE_TENANT_ID": "0a1b2c3d-0000-4000-8000-00000000000e",
            "AZURE_SUBSCRIPTION_ID": SUB,
            "AZURE_CLIENT_SECRET": CANARY,
        },
    }))?;
    Api::<Secret>::namespaced(admin.clone(), ns)
        .create(&PostParams::default(), &secret)
        .await?;
    let wh_port = free_port();
    let metrics_port = free_port();
    let args: Vec<String> = [
        "operator",
        "--kubeconfig",
        &kubeconfig.display().to_string(),
        "--namespace",
        ns,
        "--platform",
        "kubernetes",
        "--no-leader-election",
        "--metrics-addr",
        &format!("127.0.0.1:{metrics_port}"),
        "--webhook-url",
        &format!("https://127.0.0.1:{wh_port}"),
        "--dev-arm-endpoint",
        &format!("http://{addr}/"),
    ]
    .map(String::from)
    .to_vec();
    let mut operator = Process::start(
        "novap-operator",
        Path::new(env!("CARGO_BIN_EXE_sandboxd")),
        &args,
        &[("SANDBOXD_LOG_LEVEL", "trace")],
    )?;
    let mut result = body(&cp, &admin, ns, &dir, wh_port, &mut operator).await;
    if result.is_ok() {
        result = no_secret_at_trace(&admin, ns, &operator, &arm, &api_token).await;
    }
    let tail = operator.log_tail(30);
    operator.stop(Duration::from_secs(5));
    result.map_err(|e| anyhow!("{e:#}\noperator log:\n{tail}"))
}

/// The operator ran at trace and its GC called ARM: no secret anywhere a user looks.
async fn no_secret_at_trace(
    admin: &kube::Client,
    ns: &str,
    operator: &Process,
    arm: &armtest::Handle,
    api_token: &str,
) -> Result<()> {
    let log_path = operator.log_path().to_path_buf();
    eventually("the PeerPod GC's ARM calls", WAIT, || async {
        Ok((!arm.issued_tokens().is_empty()
            && std::fs::read_to_string(&log_path)
                .unwrap_or_default()
                .contains("transport policy"))
        .then_some(()))
    })
    .await?;
    let log = std::fs::read_to_string(&log_path)?;
    ensure!(log.contains("[redacted]"), "nothing was redacted at trace");
    let mut needles = vec![CANARY.to_string(), api_token.to_string()];
    needles.extend(arm.issued_tokens());
    let events = Api::<k8s_openapi::api::core::v1::Event>::namespaced(admin.clone(), ns)
        .list(&Default::default())
        .await?;
    let kcs = Api::<KataConfig>::all(admin.clone())
        .list(&Default::default())
        .await?;
    for (what, text) in [
        ("the operator's log", log),
        ("Events", serde_json::to_string(&events.items)?),
        ("KataConfigs", serde_json::to_string(&kcs.items)?),
    ] {
        for n in &needles {
            ensure!(
                !text.contains(n.as_str()),
                "{what} contains a secret ({n:.12}…)"
            );
        }
    }
    Ok(())
}

async fn body(
    cp: &ControlPlane,
    admin: &kube::Client,
    ns: &str,
    dir: &Path,
    wh_port: u16,
    operator: &mut Process,
) -> Result<()> {
    // The operator says which mechanism keeps the rule, and keeps running (it used to exit
    // failing to install the policy).
    let log = operator.log_path().to_path_buf();
    eventually("the operator's log names the webhook", WAIT, || async {
        Ok(std::fs::read_to_string(&log)
            .unwrap_or_default()
            .contains("ValidatingWebhookConfiguration sandboxd-kataconfig-singleton")
            .then_some(()))
    })
    .await?;
    let _ = cp;
    // A KataConfig without peer pods that selects no node: the webhook still runs for it.
    let kcs: Api<KataConfig> = Api::all(admin.clone());
    let spec: KataConfigSpec = serde_json::from_value(json!({
        "kataConfigPoolSelector": {"matchLabels": {"sandboxd.test/none": "x"}},
    }))?;
    kcs.create(
        &PostParams::default(),
        &KataConfig::new("cluster-kataconfig", spec.clone()),
    )
    .await?;
    let kc = eventually("the SingleKataConfig condition", WAIT, || async {
        let kc = kcs.get("cluster-kataconfig").await?;
        let found = kc.status.as_ref().and_then(|s| {
            s.conditions
                .iter()
                .find(|c| c.type_ == "SingleKataConfig")
                .cloned()
        });
        Ok(found)
    })
    .await?;
    ensure!(
        kc.status == "True" && kc.reason == "Webhook",
        "condition {kc:?}"
    );
    ensure!(
        kc.message.contains("no ValidatingAdmissionPolicy"),
        "{}",
        kc.message
    );
    // The webhook, as the Deployment runs it, with the operator's serving certificate.
    let deployment = eventually("the webhook Deployment", WAIT, || async {
        Ok(Api::<Deployment>::namespaced(admin.clone(), ns)
            .get_opt(WEBHOOK)
            .await?)
    })
    .await?;
    let mirror = crate::peerpods::webhook::CertMirror::start(admin, ns, dir.join("certs")).await?;
    let mut webhook = crate::peerpods::webhook::start_webhook(
        &deployment,
        &dir.join("certs"),
        wh_port,
        "novap-webhook",
    )?;
    let vwcs: Api<ValidatingWebhookConfiguration> = Api::all(admin.clone());
    eventually("the ValidatingWebhookConfiguration", WAIT, || async {
        Ok(vwcs.get_opt("sandboxd-kataconfig-singleton").await?)
    })
    .await?;
    // Dry runs until the API server calls the webhook (no second KataConfig is stored by
    // a create racing the rollout).
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    let second = KataConfig::new("second-kataconfig", spec.clone());
    let refused = eventually("a second KataConfig refused", WAIT, || async {
        match kcs.create(&dry, &second).await {
            Err(kube::Error::Api(s)) if s.code == 403 => Ok(Some(s)),
            Err(kube::Error::Api(s)) if s.message.contains("failed calling webhook") => Ok(None),
            Ok(_) => Ok(None),
            Err(e) => Err(e.into()),
        }
    })
    .await;
    let refused = refused.map_err(|e| anyhow!("{e:#}\nwebhook log:\n{}", webhook.log_tail(20)))?;
    ensure!(
        refused.message.contains("only one KataConfig may exist")
            && refused.message.contains("cluster-kataconfig"),
        "{}",
        refused.message
    );
    match kcs.create(&PostParams::default(), &second).await {
        Err(kube::Error::Api(s)) if s.code == 403 => {}
        other => return Err(anyhow!("a real create of a second KataConfig: {other:?}")),
    }
    // The one in force is untouched: its own name reaches the API server's AlreadyExists.
    match kcs
        .create(
            &PostParams::default(),
            &KataConfig::new("cluster-kataconfig", spec),
        )
        .await
    {
        Err(kube::Error::Api(s)) if s.code == 409 => {}
        other => return Err(anyhow!("re-creating the KataConfig in force: {other:?}")),
    }
    operator
        .check_running()
        .context("the operator exited on a cluster without ValidatingAdmissionPolicy")?;
    webhook.stop(Duration::from_secs(5));
    mirror.stop().await;
    Ok(())
}
