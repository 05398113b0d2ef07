//! The peer pods webhook rollout: with peer pods on, the operator applies the webhook
//! Deployment, WEBHOOK, Service, ServiceAccount, the serving Secret and the
//! MutatingWebhookConfiguration with a caBundle that verifies the serving certificate; the
//! real API server then sends `kata-remote` pods to a `sandboxd webhook` process started
//! with the Deployment's own arguments (no kubelet runs here: the test copies the Secret
//! into the process's certificate directory the way the kubelet's secret volume does). A
//! forced certificate and CA rotation in the middle of a stream of creates loses none, and
//! turning peer pods off removes everything.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Pod, Secret, Service, ServiceAccount};
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use sandboxd::api::kataconfig::KataConfig;
use sandboxd::api::names::{PEER_POD_LABEL, WEBHOOK, WEBHOOK_SERVICE};
use sandboxd::operator::peerpods::webhook::{CA_SECRET, SERVING_SECRET, Settings};
use sandboxd::webhook::manifest::MUTATE_PATH;
use serde_json::json;

use super::support::{Fixture, WAIT};
use crate::harness::process::{Process, free_port, run_dir};
use crate::harness::{self, Case, Env, eventually};

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster_exclusive(
            "peerpods::enabling_peer_pods_rolls_out_a_trusted_webhook_that_mutates_peer_pods_and_disabling_or_uninstalling_removes_it",
            rollout,
        ),
        Case::cluster_exclusive(
            "peerpods::webhook_certificate_and_ca_rotation_during_a_stream_of_creates_fails_no_admission",
            rotation,
        ),
    ]
}

/// Copies `tls.crt` / `tls.key` of the serving Secret into a directory the way the
/// kubelet's secret volume does: a new timestamped directory, then one atomic swap of the
/// `..data` symlink the files point through.
pub(crate) struct CertMirror {
    dir: PathBuf,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn publish(dir: &Path, generation: u64, crt: &[u8], key: &[u8]) -> Result<()> {
    let gen_name = format!("..gen-{generation}");
    let gen_dir = dir.join(&gen_name);
    std::fs::create_dir_all(&gen_dir)?;
    std::fs::write(gen_dir.join("tls.crt"), crt)?;
    std::fs::write(gen_dir.join("tls.key"), key)?;
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&gen_name, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for f in ["tls.crt", "tls.key"] {
        let link = dir.join(f);
        if std::fs::symlink_metadata(&link).is_err() {
            std::os::unix::fs::symlink(format!("..data/{f}"), &link)?;
        }
    }
    Ok(())
}

impl CertMirror {
    pub(crate) async fn start(admin: &Client, ns: &str, dir: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&dir)?;
        let secrets: Api<Secret> = Api::namespaced(admin.clone(), ns);
        let pair = |s: &Secret| {
            let d = s.data.clone().unwrap_or_default();
            Some((d.get("tls.crt")?.0.clone(), d.get("tls.key")?.0.clone()))
        };
        let first = eventually("the serving Secret", WAIT, || async {
            Ok(secrets
                .get_opt(SERVING_SECRET)
                .await?
                .as_ref()
                .and_then(pair))
        })
        .await?;
        publish(&dir, 0, &first.0, &first.1)?;
        let stop = Arc::new(AtomicBool::new(false));
        let (stop2, dir2) = (stop.clone(), dir.clone());
        let task = tokio::spawn(async move {
            let mut last = first;
            let mut generation = 0;
            while !stop2.load(Ordering::Relaxed) {
                tokio::time::sleep(Duration::from_millis(100)).await;
                let Ok(Some(s)) = secrets.get_opt(SERVING_SECRET).await else {
                    continue;
                };
                if let Some(p) = pair(&s)
                    && p != last
                {
                    generation += 1;
                    if publish(&dir2, generation, &p.0, &p.1).is_ok() {
                        last = p;
                    }
                }
            }
        });
        Ok(Self { dir, stop, task })
    }

    pub(crate) async fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
    }
}

/// `sandboxd webhook` started with the Deployment's container arguments, its certificate
/// directory and port swapped for the test's.
pub(crate) fn start_webhook(
    deployment: &Deployment,
    cert_dir: &Path,
    port: u16,
    name: &str,
) -> Result<Process> {
    let container = &deployment
        .spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .context("pod template")?
        .containers[0];
    let mut args = container.args.clone().context("container args")?;
    for (flag, value) in [
        ("--cert-dir", cert_dir.to_string_lossy().into_owned()),
        ("--port", port.to_string()),
    ] {
        let i = args
            .iter()
            .position(|a| a == flag)
            .with_context(|| format!("{flag} in the Deployment's args {args:?}"))?;
        args[i + 1] = value;
    }
    args.extend(
        [
            "--bind-address",
            "127.0.0.1",
            "--cert-reload-interval-ms",
            "100",
        ]
        .map(String::from),
    );
    Process::start(
        name,
        Path::new(env!("CARGO_BIN_EXE_sandboxd")),
        &args,
        &[("SANDBOXD_LOG_LEVEL", "info")],
    )
}

fn pems(text: &[u8]) -> Result<Vec<CertificateDer<'static>>> {
    CertificateDer::pem_slice_iter(text)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow!("parsing PEM: {e:?}"))
}

/// Whether `bundle` (the caBundle) verifies `leaf` for every name, as the API server would.
fn verifies(bundle: &[u8], leaf: &[u8], names: &[String]) -> Result<()> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pems(bundle)? {
        roots.add(c)?;
    }
    let leaf = pems(leaf)?
        .into_iter()
        .next()
        .context("no leaf certificate")?;
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        roots.into(),
        Arc::new(rustls::crypto::ring::default_provider()),
    )
    .build()?;
    for n in names {
        verifier
            .verify_server_cert(
                &leaf,
                &[],
                &ServerName::try_from(n.as_str())?,
                &[],
                UnixTime::now(),
            )
            .with_context(|| format!("the caBundle does not verify the certificate for {n}"))?;
    }
    Ok(())
}

/// The leaf certificate the process serves on a fresh connection (DER).
async fn served_certificate(bundle: &[u8], port: u16) -> Result<Vec<u8>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in pems(bundle)? {
        roots.add(c)?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let tls = connector
        .connect(ServerName::try_from("127.0.0.1")?, tcp)
        .await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .context("no certificate served")?;
    Ok(leaf.as_ref().to_vec())
}

async fn ensure_kata_remote(client: &Client) -> Result<()> {
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

fn peer_pod(name: &str) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "runtimeClassName": "kata-remote",
            "containers": [{
                "name": "c", "image": "registry.example.com/app:1",
                "resources": {"requests": {"cpu": "1", "memory": "1Gi"}},
            }],
        },
    }))?)
}

fn is_mutated(p: &Pod) -> bool {
    let vm = p
        .spec
        .as_ref()
        .and_then(|s| s.containers[0].resources.as_ref())
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("kata.peerpods.io/vm"))
        .map(|q| q.0.as_str());
    p.labels().get(PEER_POD_LABEL).map(String::as_str) == Some("true") && vm == Some("1")
}

/// One test's webhook world: the operator with `--webhook-url`, the process at that URL, a
/// namespace for peer pods.
struct World {
    fx: Fixture,
    port: u16,
    pods_ns: String,
    mirror: Option<CertMirror>,
    process: Option<Process>,
}

impl World {
    async fn start(env: &Env, mut settings: Settings) -> Result<Self> {
        let port = free_port();
        settings.url = Some(format!("https://127.0.0.1:{port}"));
        let fx = Fixture::start_with_webhook(env, settings).await?;
        let pods_ns = env.unique("ppw");
        harness::create_namespace(&fx.admin, &pods_ns).await?;
        ensure_kata_remote(&fx.admin).await?;
        Ok(Self {
            fx,
            port,
            pods_ns,
            mirror: None,
            process: None,
        })
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.fx.admin.clone(), &self.fx.ns)
    }

    fn mwcs(&self) -> Api<MutatingWebhookConfiguration> {
        Api::all(self.fx.admin.clone())
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.fx.admin.clone(), &self.pods_ns)
    }

    async fn ca_bundle(&self) -> Result<Vec<u8>> {
        let m = self.mwcs().get(WEBHOOK).await?;
        m.webhooks
            .unwrap_or_default()
            .first()
            .and_then(|w| w.client_config.ca_bundle.clone())
            .map(|b| b.0)
            .context("no caBundle")
    }

    async fn serving_cert(&self) -> Result<Vec<u8>> {
        let s = self.secrets().get(SERVING_SECRET).await?;
        Ok(s.data
            .unwrap_or_default()
            .get("tls.crt")
            .context("no tls.crt")?
            .0
            .clone())
    }

    /// Enables peer pods, waits for the Deployment, starts the mirror and the process, and
    /// waits until a dry-run peer pod comes back mutated (the configuration reached the
    /// API server's admission chain).
    async fn enable_and_serve(&mut self, env: &Env) -> Result<Deployment> {
        self.fx.enable().await?;
        let deps: Api<Deployment> = Api::namespaced(self.fx.admin.clone(), &self.fx.ns);
        let dep = eventually("the webhook Deployment", WAIT, || async {
            Ok(deps.get_opt(WEBHOOK).await?)
        })
        .await?;
        let dir = run_dir().join(format!("peerpods-webhook-certs-{}", env.ns));
        let mirror = CertMirror::start(&self.fx.admin, &self.fx.ns, dir).await?;
        let process = start_webhook(&dep, &mirror.dir, self.port, &format!("webhook-{}", env.ns))?;
        self.mirror = Some(mirror);
        self.process = Some(process);
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        let pods = self.pods();
        eventually("a dry-run peer pod comes back mutated", WAIT, || async {
            Ok(pods
                .create(&dry, &peer_pod("probe")?)
                .await
                .ok()
                .filter(is_mutated))
        })
        .await
        .with_context(|| {
            self.process
                .as_ref()
                .map(|p| p.log_tail(20))
                .unwrap_or_default()
        })?;
        Ok(dep)
    }

    /// Deletes the test's pods (no kubelet: they go at once), so uninstall is not blocked.
    async fn delete_pods(&self) -> Result<()> {
        self.pods()
            .delete_collection(
                &kube::api::DeleteParams::default().grace_period(0),
                &Default::default(),
            )
            .await?;
        Ok(())
    }

    async fn teardown(mut self) -> Result<()> {
        if let Some(m) = self.mirror.take() {
            m.stop().await;
        }
        // The configuration goes before the process, whatever happened.
        let _ = self.mwcs().delete(WEBHOOK, &Default::default()).await;
        if let Some(mut p) = self.process.take() {
            p.stop(Duration::from_secs(5));
        }
        let _ = self.delete_pods().await;
        let _ = harness::delete_namespace(&self.fx.admin, &self.pods_ns).await;
        self.fx.teardown().await
    }
}

async fn with_world<F, Fut>(env: Env, settings: Settings, body: F) -> Result<()>
where
    F: FnOnce(Env, World) -> Fut,
    Fut: Future<Output = (World, Result<()>)>,
{
    let w = World::start(&env, settings).await?;
    let (w, r) = body(env, w).await;
    let t = w.teardown().await;
    r.and(t)
}

async fn rollout(env: Env) -> Result<()> {
    with_world(env, Settings::default(), |env, mut w| async move {
        let r = rollout_body(&env, &mut w).await;
        (w, r)
    })
    .await
}

async fn rollout_body(env: &Env, w: &mut World) -> Result<()> {
    let dep = w.enable_and_serve(env).await?;
    let ns = w.fx.ns.clone();
    let admin = w.fx.admin.clone();
    let kc_uid = Api::<KataConfig>::all(admin.clone())
        .get("example-kataconfig")
        .await?
        .uid();
    let owned = |o: &kube::api::ObjectMeta| -> bool {
        o.owner_references
            .iter()
            .flatten()
            .any(|r| r.kind == "KataConfig" && Some(&r.uid) == kc_uid.as_ref())
    };

    // The Deployment: two replicas of the operator's image, locked down, health-probed.
    let spec = dep.spec.clone().context("spec")?;
    ensure!(spec.replicas == Some(2), "replicas {:?}", spec.replicas);
    let pod = spec.template.spec.clone().context("pod spec")?;
    ensure!(pod.service_account_name.as_deref() == Some(WEBHOOK));
    let psc = pod.security_context.clone().unwrap_or_default();
    ensure!(psc.run_as_non_root == Some(true), "runAsNonRoot: {psc:?}");
    ensure!(
        psc.seccomp_profile.map(|s| s.type_).as_deref() == Some("RuntimeDefault"),
        "seccomp"
    );
    ensure!(
        pod.affinity
            .and_then(|a| a.pod_anti_affinity)
            .is_some_and(|a| a
                .preferred_during_scheduling_ignored_during_execution
                .is_some()),
        "replicas spread over nodes"
    );
    let c = &pod.containers[0];
    ensure!(
        c.image.as_deref() == Some("sandboxd:latest"),
        "image {:?}",
        c.image
    );
    ensure!(c.args.as_ref().is_some_and(|a| a[0] == "webhook"));
    let sc = c.security_context.clone().unwrap_or_default();
    ensure!(
        sc.allow_privilege_escalation == Some(false)
            && sc.read_only_root_filesystem == Some(true)
            && sc
                .capabilities
                .and_then(|c| c.drop)
                .is_some_and(|d| d == ["ALL"]),
        "container security context {:?}",
        c.security_context
    );
    for (what, probe) in [
        ("readiness", &c.readiness_probe),
        ("liveness", &c.liveness_probe),
    ] {
        let get = probe.as_ref().and_then(|p| p.http_get.clone());
        ensure!(
            get.as_ref()
                .is_some_and(|g| g.scheme.as_deref() == Some("HTTPS")),
            "{what} probe over HTTPS: {get:?}"
        );
    }
    ensure!(
        c.resources.as_ref().is_some_and(|r| r.requests.is_some()),
        "resource requests"
    );
    ensure!(owned(&dep.metadata), "Deployment owned by the KataConfig");
    let managers: Vec<_> = dep
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.clone())
        .collect();
    ensure!(
        managers.iter().any(|m| m == "sandboxd"),
        "applied by field manager sandboxd: {managers:?}"
    );

    let pdb = Api::<PodDisruptionBudget>::namespaced(admin.clone(), &ns)
        .get(WEBHOOK)
        .await?;
    ensure!(pdb.spec.as_ref().and_then(|s| s.min_available.clone()) == Some(IntOrString::Int(1)));
    ensure!(owned(&pdb.metadata));
    let svc = Api::<Service>::namespaced(admin.clone(), &ns)
        .get(WEBHOOK_SERVICE)
        .await?;
    let port = svc
        .spec
        .as_ref()
        .and_then(|s| s.ports.clone())
        .unwrap_or_default();
    ensure!(
        port.len() == 1
            && port[0].port == 443
            && port[0].target_port == Some(IntOrString::String("https".into())),
        "service ports {port:?}"
    );
    ensure!(
        c.ports.as_ref().is_some_and(|p| p
            .iter()
            .any(|p| p.name.as_deref() == Some("https") && p.container_port == 9443)),
        "the Service's target port is the container's 9443"
    );
    let sa = Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
        .get(WEBHOOK)
        .await?;
    ensure!(sa.automount_service_account_token == Some(false));

    // The Secret and the configuration: the caBundle verifies the serving certificate for
    // the development URL's IP and every Service name.
    let secret = w.secrets().get(SERVING_SECRET).await?;
    ensure!(secret.type_.as_deref() == Some("kubernetes.io/tls"));
    let data = secret.data.clone().unwrap_or_default();
    ensure!(data.contains_key("tls.key") && data.contains_key("ca.crt"));
    let mwc = w.mwcs().get(WEBHOOK).await?;
    ensure!(owned(&mwc.metadata));
    let hook = &mwc.webhooks.clone().unwrap_or_default()[0];
    ensure!(
        hook.client_config.url.as_deref()
            == Some(format!("https://127.0.0.1:{}{MUTATE_PATH}", w.port).as_str()),
        "clientConfig.url {:?}",
        hook.client_config.url
    );
    let bundle = w.ca_bundle().await?;
    ensure!(data["ca.crt"].0 == bundle, "ca.crt is the caBundle");
    let names: Vec<String> = [
        "127.0.0.1".to_string(),
        WEBHOOK_SERVICE.to_string(),
        format!("{WEBHOOK_SERVICE}.{ns}"),
        format!("{WEBHOOK_SERVICE}.{ns}.svc"),
        format!("{WEBHOOK_SERVICE}.{ns}.svc.cluster.local"),
    ]
    .into();
    verifies(&bundle, &data["tls.crt"].0, &names)?;

    // A real create comes back mutated through the process the operator pointed the API
    // server at.
    let stored = w
        .pods()
        .create(&PostParams::default(), &peer_pod("peer")?)
        .await?;
    ensure!(
        is_mutated(&stored),
        "stored pod not mutated: {:?}",
        stored.metadata
    );

    // Nothing changed → nothing written.
    let versions = |w: &World| {
        let (secrets, mwcs) = (w.secrets(), w.mwcs());
        let deps: Api<Deployment> = Api::namespaced(admin.clone(), &ns);
        async move {
            Ok::<_, anyhow::Error>((
                secrets.get(SERVING_SECRET).await?.resource_version(),
                secrets.get(CA_SECRET).await?.resource_version(),
                mwcs.get(WEBHOOK).await?.resource_version(),
                deps.get(WEBHOOK).await?.metadata.generation,
            ))
        }
    };
    let before = versions(w).await?;
    tokio::time::sleep(Duration::from_secs(12)).await;
    ensure!(
        versions(w).await? == before,
        "a reconcile without change wrote"
    );

    // Peer pods off → every webhook object goes, the configuration included.
    let kcs = Api::<KataConfig>::all(admin.clone());
    let set_peer_pods = |on: bool| {
        let kcs = kcs.clone();
        async move {
            kcs.patch(
                "example-kataconfig",
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"enablePeerPods": on}})),
            )
            .await
        }
    };
    set_peer_pods(false).await?;
    wait_all_gone(w, "peer pods disabled").await?;

    // On again → back; the KataConfig deleted (uninstall) → gone again.
    set_peer_pods(true).await?;
    eventually("the webhook configuration back", WAIT, || async {
        Ok(w.mwcs().get_opt(WEBHOOK).await?)
    })
    .await?;
    w.delete_pods().await?;
    kcs.delete("example-kataconfig", &Default::default())
        .await?;
    wait_all_gone(w, "uninstall").await?;
    w.process.as_mut().context("process")?.check_running()?;
    Ok(())
}

/// Waits until none of the webhook objects exists.
async fn wait_all_gone(w: &World, after: &str) -> Result<()> {
    let (admin, ns) = (w.fx.admin.clone(), w.fx.ns.clone());
    eventually(
        &format!("every webhook object removed ({after})"),
        WAIT,
        || async {
            let mut left = Vec::new();
            if w.mwcs().get_opt(WEBHOOK).await?.is_some() {
                left.push("MutatingWebhookConfiguration");
            }
            if Api::<Deployment>::namespaced(admin.clone(), &ns)
                .get_opt(WEBHOOK)
                .await?
                .is_some()
            {
                left.push("Deployment");
            }
            if Api::<PodDisruptionBudget>::namespaced(admin.clone(), &ns)
                .get_opt(WEBHOOK)
                .await?
                .is_some()
            {
                left.push("PodDisruptionBudget");
            }
            if Api::<Service>::namespaced(admin.clone(), &ns)
                .get_opt(WEBHOOK_SERVICE)
                .await?
                .is_some()
            {
                left.push("Service");
            }
            if Api::<ServiceAccount>::namespaced(admin.clone(), &ns)
                .get_opt(WEBHOOK)
                .await?
                .is_some()
            {
                left.push("ServiceAccount");
            }
            for name in [SERVING_SECRET, CA_SECRET] {
                if w.secrets().get_opt(name).await?.is_some() {
                    left.push(name);
                }
            }
            if left.is_empty() {
                Ok(Some(()))
            } else {
                Err(anyhow!("still there: {left:?}"))
            }
        },
    )
    .await
}

async fn rotation(env: Env) -> Result<()> {
    // The serving certificate renews every ~10 s, the CA at ~24 s (old CA kept until 36 s).
    let settings = Settings {
        cert_validity: Duration::from_secs(15),
        ca_validity: Duration::from_secs(36),
        ..Default::default()
    };
    with_world(env, settings, |env, mut w| async move {
        let r = rotation_body(&env, &mut w).await;
        (w, r)
    })
    .await
}

async fn rotation_body(env: &Env, w: &mut World) -> Result<()> {
    w.enable_and_serve(env).await?;
    let first_cert = w.serving_cert().await?;
    let first_bundle = w.ca_bundle().await?;
    let first_ca = pems(&first_bundle)?[0].as_ref().to_vec();

    // Watch the Secret and the configuration while pods are created one after another.
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (secrets, mwcs, stop) = (w.secrets(), w.mwcs(), stop.clone());
        tokio::spawn(async move {
            let mut certs = BTreeSet::new();
            let mut bundles = BTreeSet::new();
            let mut max_cas = 0;
            while !stop.load(Ordering::Relaxed) {
                if let Ok(s) = secrets.get(SERVING_SECRET).await
                    && let Some(c) = s.data.unwrap_or_default().get("tls.crt")
                {
                    certs.insert(c.0.clone());
                }
                if let Ok(m) = mwcs.get(WEBHOOK).await
                    && let Some(b) = m
                        .webhooks
                        .unwrap_or_default()
                        .first()
                        .and_then(|w| w.client_config.ca_bundle.clone())
                {
                    max_cas = max_cas.max(pems(&b.0).map(|v| v.len()).unwrap_or(0));
                    bundles.insert(b.0);
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            (certs, bundles, max_cas)
        })
    };
    let pods = w.pods();
    let started = Instant::now();
    let mut failures = Vec::new();
    let mut created = 0;
    while started.elapsed() < Duration::from_secs(45) {
        let name = format!("stream-{created}");
        match pods.create(&PostParams::default(), &peer_pod(&name)?).await {
            Ok(p) if is_mutated(&p) => {}
            Ok(_) => failures.push(format!("{name}: admitted without mutation")),
            Err(e) => failures.push(format!("{name} at {:?}: {e}", started.elapsed())),
        }
        created += 1;
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let (certs, bundles, max_cas) = sampler.await?;
    ensure!(
        failures.is_empty(),
        "{} of {created} creates failed: {failures:?}\nwebhook log:\n{}",
        failures.len(),
        w.process
            .as_ref()
            .map(|p| p.log_tail(30))
            .unwrap_or_default()
    );
    ensure!(created >= 100, "only {created} creates in the stream");

    // The serving certificate and the CA both rotated, with the overlap bundle seen.
    let last_cert = w.serving_cert().await?;
    let last_bundle = w.ca_bundle().await?;
    ensure!(
        last_cert != first_cert,
        "the serving certificate never rotated"
    );
    ensure!(
        certs.len() >= 3,
        "expected several serving certificates, saw {}",
        certs.len()
    );
    ensure!(
        pems(&last_bundle)?[0].as_ref() != first_ca.as_slice(),
        "the CA never rotated"
    );
    ensure!(
        max_cas == 2,
        "the old and new CA were never in the caBundle together"
    );
    ensure!(bundles.len() >= 3, "bundles seen: {}", bundles.len());
    // The process serves the current certificate, which the current caBundle verifies.
    verifies(&last_bundle, &last_cert, &["127.0.0.1".to_string()])?;
    eventually(
        "the process serves the current certificate",
        WAIT,
        || async {
            let (cert, bundle) = (w.serving_cert().await?, w.ca_bundle().await?);
            let current = pems(&cert)?[0].as_ref().to_vec();
            Ok((served_certificate(&bundle, w.port).await? == current).then_some(()))
        },
    )
    .await?;
    w.process.as_mut().context("process")?.check_running()?;
    Ok(())
}
