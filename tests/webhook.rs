//! Integration tests of `sandboxd webhook`: the real API server calls the webhook process
//! over HTTPS through a MutatingWebhookConfiguration scoped to the test's namespaces.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::node::v1::RuntimeClass;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;
use kube::api::{Api, DeleteParams, PostParams};
use kube::{Client, ResourceExt};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sandboxd::api::names::{PEER_POD_LABEL, annotations};
use sandboxd::pki::{Ca, CertKey, Usage};
use sandboxd::webhook::manifest::{self, Endpoint};
use serde_json::json;

use crate::harness::process::{Process, free_port, run_dir};
use crate::harness::{self, Case, Env, eventually};

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster(
            "webhook::the_api_server_stores_kata_remote_pods_as_peer_pods_and_leaves_runc_pods_alone",
            stores_peer_pods,
        ),
        Case::cluster(
            "webhook::excluded_namespaces_are_untouched_and_the_operator_namespace_is_refused",
            excluded_namespaces,
        ),
        Case::cluster(
            "webhook::certificate_rotation_during_a_stream_of_creates_loses_no_request",
            rotation,
        ),
    ]
}

/// A `sandboxd webhook` process with its own CA and certificate directory.
struct Webhook {
    process: Process,
    ca: Ca,
    cert_dir: PathBuf,
    port: u16,
}

fn issue(ca: &Ca, cn: &str) -> Result<CertKey> {
    Ok(ca.issue(
        cn,
        &[],
        &["127.0.0.1", "localhost"],
        Usage::Server,
        time::Duration::hours(1),
    )?)
}

/// Writes a certificate pair the way a rotation does: each file replaced atomically.
fn write_certs(dir: &Path, pair: &CertKey) -> Result<()> {
    for (name, text) in [("tls.crt", &pair.cert_pem), ("tls.key", &pair.key_pem)] {
        let tmp = dir.join(format!(".{name}.tmp"));
        std::fs::write(&tmp, text)?;
        std::fs::rename(&tmp, dir.join(name))?;
    }
    Ok(())
}

impl Webhook {
    async fn start(env: &Env, extra: &[&str]) -> Result<Self> {
        let ca = Ca::new(&format!("webhook-ca-{}", env.ns), time::Duration::hours(1))?;
        let cert_dir = run_dir().join(format!("webhook-certs-{}", env.ns));
        std::fs::create_dir_all(&cert_dir)?;
        write_certs(&cert_dir, &issue(&ca, "first")?)?;
        let port = free_port();
        let mut args: Vec<String> = [
            "webhook",
            "--cert-dir",
            &cert_dir.to_string_lossy(),
            "--port",
            &port.to_string(),
            "--bind-address",
            "127.0.0.1",
            "--cert-reload-interval-ms",
            "100",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let process = Process::start(
            &format!("webhook-{}", env.ns),
            Path::new(env!("CARGO_BIN_EXE_sandboxd")),
            &args,
            &[("SANDBOXD_LOG_LEVEL", "info")],
        )?;
        let mut hook = Self {
            process,
            ca,
            cert_dir,
            port,
        };
        eventually("the webhook to serve TLS", Duration::from_secs(20), || {
            let r = hook.served_certificate();
            async move { Ok(r.await.ok()) }
        })
        .await
        .with_context(|| hook.process.log_tail(20))?;
        hook.process.check_running()?;
        Ok(hook)
    }

    /// The leaf certificate a fresh TLS connection is served.
    fn served_certificate(&self) -> impl Future<Output = Result<Vec<u8>>> + use<> {
        let ca_pem = self.ca.cert_pem();
        let port = self.port;
        async move {
            let mut roots = rustls::RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
                roots.add(c?)?;
            }
            let config = rustls::ClientConfig::builder()
                .with_root_certificates(roots)
                .with_no_client_auth();
            let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
            let tls = connector
                .connect(rustls_pki_types::ServerName::try_from("127.0.0.1")?, tcp)
                .await?;
            let leaf = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .context("no certificate served")?;
            Ok(leaf.as_ref().to_vec())
        }
    }

    /// Registers a webhook configuration sending pods of `namespaces` here, built by the
    /// same generator as the checked-in one.
    async fn register(
        &self,
        client: &Client,
        name: &str,
        namespaces: &[&str],
        options: manifest::Options,
    ) -> Result<Registration> {
        let mut options = manifest::Options {
            endpoint: Endpoint::Url(format!(
                "https://127.0.0.1:{}{}",
                self.port,
                manifest::MUTATE_PATH
            )),
            ca_bundle: Some(self.ca.cert_pem()),
            ..options
        };
        options
            .extra_namespace_requirements
            .push(LabelSelectorRequirement {
                key: "kubernetes.io/metadata.name".into(),
                operator: "In".into(),
                values: Some(namespaces.iter().map(|s| s.to_string()).collect()),
            });
        let mut config = manifest::webhook_configuration(&options);
        config.metadata.name = Some(name.to_string());
        let api: Api<MutatingWebhookConfiguration> = Api::all(client.clone());
        api.create(&PostParams::default(), &config).await?;
        Ok(Registration {
            api,
            name: name.to_string(),
        })
    }
}

/// Deletes the cluster-wide webhook configuration when the test ends, however it ends.
struct Registration {
    api: Api<MutatingWebhookConfiguration>,
    name: String,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let api = self.api.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            let _ = api.delete(&name, &DeleteParams::default()).await;
        });
    }
}

async fn ensure_runtime_class(client: &Client, name: &str, peer: bool) -> Result<()> {
    let api: Api<RuntimeClass> = Api::all(client.clone());
    let rc: RuntimeClass = serde_json::from_value(if peer {
        // As DESIGN §3 defines it, so other suites creating it agree.
        json!({
            "metadata": {"name": name},
            "handler": name,
            "overhead": {"podFixed": {"cpu": "250m", "memory": "350Mi"}},
            "scheduling": {"nodeSelector": {"node-role.kubernetes.io/kata-oc": ""}}
        })
    } else {
        json!({"metadata": {"name": name}, "handler": name})
    })?;
    match api.create(&PostParams::default(), &rc).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn pod(name: &str, runtime_class: Option<&str>) -> Result<Pod> {
    let mut v = json!({
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {"name": "web", "image": "registry.example.com/web:1",
                 "resources": {"requests": {"cpu": "1", "memory": "1Gi"},
                               "limits": {"cpu": "2", "memory": "2Gi"}}},
                {"name": "sidecar", "image": "registry.example.com/proxy:1",
                 "resources": {"requests": {"cpu": "250m", "memory": "100Mi"}}}
            ]
        }
    });
    if let Some(rc) = runtime_class {
        v["spec"]["runtimeClassName"] = rc.into();
    }
    Ok(serde_json::from_value(v)?)
}

fn is_peer_pod(p: &Pod) -> bool {
    p.labels().get(PEER_POD_LABEL).map(String::as_str) == Some("true")
}

/// Waits until the API server sends this namespace's peer pods to the webhook (webhook
/// configurations reach the admission chain asynchronously), using dry-run creates.
async fn wait_for_registration(client: &Client, ns: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let dry = PostParams {
        dry_run: true,
        ..Default::default()
    };
    eventually(
        "the webhook configuration to take effect",
        Duration::from_secs(30),
        || async {
            let p = pods
                .create(&dry, &pod("probe", Some("kata-remote"))?)
                .await?;
            Ok(is_peer_pod(&p).then_some(()))
        },
    )
    .await
}

async fn stores_peer_pods(env: Env) -> Result<()> {
    let client = env.admin().await?;
    ensure_runtime_class(&client, "kata-remote", true).await?;
    ensure_runtime_class(&client, "runc", false).await?;
    let mut hook = Webhook::start(&env, &[]).await?;
    let _reg = hook
        .register(
            &client,
            &env.unique("peer-pods-webhook"),
            &[&env.ns],
            Default::default(),
        )
        .await?;
    wait_for_registration(&client, &env.ns).await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &env.ns);
    pods.create(&PostParams::default(), &pod("peer", Some("kata-remote"))?)
        .await?;
    let stored = pods.get("peer").await?;
    let spec = stored.spec.as_ref().context("spec")?;
    let first = spec.containers[0].resources.as_ref().context("resources")?;
    let vm = |m: &Option<std::collections::BTreeMap<_, _>>| {
        m.as_ref()
            .and_then(|m: &std::collections::BTreeMap<String, _>| m.get("kata.peerpods.io/vm"))
            .map(|q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity| q.0.clone())
    };
    ensure!(
        vm(&first.requests).as_deref() == Some("1") && vm(&first.limits).as_deref() == Some("1"),
        "first container asks for one pod VM: {first:?}"
    );
    ensure!(
        first.requests.as_ref().unwrap().len() == 1,
        "no cpu/memory left on the worker: {first:?}"
    );
    ensure!(
        spec.containers[1]
            .resources
            .as_ref()
            .is_none_or(|r| r.requests.is_none() && r.limits.is_none()),
        "second container's resources removed: {:?}",
        spec.containers[1].resources
    );
    ensure!(is_peer_pod(&stored), "labelled: {:?}", stored.labels());
    // Limits 2 CPU / 2Gi on web; the sidecar has requests only (its request counts where a
    // limit is missing): cpu limits 2 ≥ requests 1.25 → 2; memory limits 2Gi ≥ 1124Mi.
    let a = stored.annotations();
    ensure!(
        a.get(annotations::DEFAULT_VCPUS).map(String::as_str) == Some("2")
            && a.get(annotations::DEFAULT_MEMORY).map(String::as_str) == Some("2048"),
        "size annotations: {a:?}"
    );

    pods.create(&PostParams::default(), &pod("plain", Some("runc"))?)
        .await?;
    let plain = pods.get("plain").await?;
    ensure!(!is_peer_pod(&plain), "runc pod not labelled");
    let r = plain.spec.as_ref().unwrap().containers[0]
        .resources
        .clone()
        .unwrap_or_default();
    ensure!(
        r.requests.unwrap_or_default().contains_key("cpu"),
        "runc pod keeps its resources"
    );
    hook.process.check_running()?;
    Ok(())
}

async fn excluded_namespaces(env: Env) -> Result<()> {
    let client = env.admin().await?;
    ensure_runtime_class(&client, "kata-remote", true).await?;
    // A prefixed system namespace (skipped by the configuration's match condition), one the
    // webhook itself refuses to touch (defence in depth), and a stand-in operator namespace.
    let system = format!("openshift-{}", env.ns);
    let guarded = format!("{}-guarded", env.ns);
    let operator = format!("{}-operator", env.ns);
    for ns in [&system, &guarded, &operator] {
        harness::create_namespace(&client, ns).await?;
    }
    let result = async {
        let hook = Webhook::start(
            &env,
            &[
                "--never-mutate-namespaces",
                &guarded,
                "--operator-namespace",
                &operator,
            ],
        )
        .await?;
        // The generated configuration, as deployed, for `system` and `operator`: its
        // `openshift-` condition must keep `system` away from the webhook (which, with this
        // never-mutate list, would otherwise mutate it).
        let _generated = hook
            .register(
                &client,
                &env.unique("peer-pods-webhook"),
                &[&env.ns, &system, &operator],
                manifest::Options {
                    operator_namespace: operator.clone(),
                    ..Default::default()
                },
            )
            .await?;
        // A wrong configuration that sends `guarded` anyway.
        let _wrong = hook
            .register(
                &client,
                &env.unique("wrong-webhook"),
                &[&guarded],
                manifest::Options {
                    never_mutate: vec![],
                    ..Default::default()
                },
            )
            .await?;
        wait_for_registration(&client, &env.ns).await?;

        // The wrong configuration takes effect asynchronously: wait until the webhook has
        // seen (and left alone) a dry-run peer pod from `guarded`.
        let guarded_pods: Api<Pod> = Api::namespaced(client.clone(), &guarded);
        let dry = PostParams {
            dry_run: true,
            ..Default::default()
        };
        eventually(
            "the webhook to see a pod from the guarded namespace",
            Duration::from_secs(30),
            || async {
                let p = guarded_pods
                    .create(&dry, &pod("probe", Some("kata-remote"))?)
                    .await?;
                ensure!(!is_peer_pod(&p), "guarded pod mutated");
                let log = std::fs::read_to_string(hook.process.log_path())?;
                Ok(log
                    .lines()
                    .any(|l| l.contains(&guarded) && l.contains("unchanged"))
                    .then_some(()))
            },
        )
        .await?;

        for ns in [&system, &guarded] {
            let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
            let p = pods
                .create(&PostParams::default(), &pod("peer", Some("kata-remote"))?)
                .await?;
            ensure!(
                !is_peer_pod(&p),
                "pod in {ns} was mutated: {:?}",
                p.labels()
            );
            let r = p.spec.unwrap().containers[0].resources.clone().unwrap();
            ensure!(
                r.requests.unwrap().contains_key("cpu"),
                "resources kept in {ns}"
            );
        }

        let pods: Api<Pod> = Api::namespaced(client.clone(), &operator);
        let err = pods
            .create(&PostParams::default(), &pod("peer", Some("kata-remote"))?)
            .await
            .expect_err("a peer pod in the operator namespace is refused");
        let text = err.to_string();
        ensure!(
            text.contains("operator namespace"),
            "refusal says why: {text}"
        );
        // Ordinary pods there are fine (the configuration only sends peer pods).
        pods.create(&PostParams::default(), &pod("plain", None)?)
            .await?;
        Ok(())
    }
    .await;
    for ns in [&system, &guarded, &operator] {
        let _ = harness::delete_namespace(&client, ns).await;
    }
    result
}

async fn rotation(env: Env) -> Result<()> {
    let client = env.admin().await?;
    ensure_runtime_class(&client, "kata-remote", true).await?;
    let mut hook = Webhook::start(&env, &[]).await?;
    let _reg = hook
        .register(
            &client,
            &env.unique("peer-pods-webhook"),
            &[&env.ns],
            Default::default(),
        )
        .await?;
    wait_for_registration(&client, &env.ns).await?;
    let before = hook.served_certificate().await?;

    let pods: Api<Pod> = Api::namespaced(client.clone(), &env.ns);
    let total = 120usize;
    let mut workers = Vec::new();
    for w in 0..4 {
        let pods = pods.clone();
        workers.push(tokio::spawn(async move {
            let mut created = Vec::new();
            for i in (w..total).step_by(4) {
                let name = format!("stream-{i}");
                let p = pods
                    .create(&PostParams::default(), &pod(&name, Some("kata-remote"))?)
                    .await
                    .with_context(|| format!("creating {name}"))?;
                created.push(p);
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            anyhow::Ok(created)
        }));
    }
    // Rotate while the stream runs.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let second = issue(&hook.ca, "second")?;
    write_certs(&hook.cert_dir, &second)?;
    let want = CertificateDer::from_pem_slice(second.cert_pem.as_bytes())?;

    let after = eventually(
        "the rotated certificate to be served",
        Duration::from_secs(10),
        || {
            let served = hook.served_certificate();
            let want = want.as_ref().to_vec();
            async move {
                let served = served.await?;
                Ok((served == want).then_some(served))
            }
        },
    )
    .await?;
    ensure!(
        workers.iter().any(|w| !w.is_finished()),
        "the rotation landed in the middle of the stream"
    );

    let mut created = Vec::new();
    for w in workers {
        created.extend(w.await??);
    }
    ensure!(created.len() == total, "every create answered");
    let unmutated: Vec<String> = created
        .iter()
        .filter(|p| !is_peer_pod(p))
        .map(|p| p.name_any())
        .collect();
    ensure!(unmutated.is_empty(), "pods not mutated: {unmutated:?}");

    ensure!(after != before, "a new certificate is served");
    // And the API server keeps getting answers with it.
    pods.create(&PostParams::default(), &pod("after", Some("kata-remote"))?)
        .await?;
    ensure!(
        is_peer_pod(&pods.get("after").await?),
        "mutated after rotation"
    );
    hook.process.check_running()?;
    Ok(())
}
