//! `deploy/monitoring` against what the components really export: the operator, the
//! webhook and CAA run as the other suites run them (the built binary; CAA under its
//! deployed RBAC against the ARM test server), each `/metrics` is scraped live, and every
//! metric named in a PromQL expression of the Grafana dashboard or the PrometheusRule must
//! be among the scraped ones (`up`, which Prometheus writes itself, aside).

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use sandboxd::pki::{Ca, Usage};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::process::{Process, free_port, run_dir};
use crate::harness::{self, Case, Env, eventually};

/// Series Prometheus makes itself for every target.
const PROMETHEUS_OWN: [&str; 1] = ["up"];

pub fn cases() -> Vec<Case> {
    vec![
        Case::plain(
            "monitoring::promql_metric_names_are_found_in_selectors_and_not_in_labels_functions_or_strings",
            promql_names_self_check,
        ),
        Case::cluster_exclusive(
            "monitoring::every_metric_of_the_dashboard_and_the_alerts_is_exported_live_by_operator_webhook_and_caa",
            every_metric_is_exported,
        ),
        Case::plain(
            "monitoring::kustomized_service_monitors_select_services_whose_ports_reach_the_metrics_ports_deployed",
            service_monitors_reach_what_is_deployed,
        ),
    ]
}

/// The YAML documents of a file under deploy/.
fn docs(path: &str) -> Result<Vec<Value>> {
    let text = std::fs::read_to_string(root().join(path))?;
    Ok(serde_saphyr::from_multiple::<Value>(&text)?
        .into_iter()
        .filter(|v| !v.is_null())
        .collect())
}

/// `kubectl kustomize DIR` as documents.
async fn kustomize(dir: &str) -> Result<Vec<Value>> {
    let out = tokio::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(root().join(dir))
        .output()
        .await?;
    ensure!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(
        serde_saphyr::from_multiple::<Value>(&String::from_utf8(out.stdout)?)?
            .into_iter()
            .filter(|v| !v.is_null())
            .collect(),
    )
}

fn labels_match(selector: &Value, labels: &Value) -> bool {
    selector
        .as_object()
        .is_some_and(|m| !m.is_empty() && m.iter().all(|(k, v)| labels.get(k) == Some(v)))
}

/// Follows each ServiceMonitor of deploy/monitoring to its Service and the pods it selects,
/// as shipped: the operator Deployment of deploy/operator, and the CAA DaemonSet and
/// webhook Service the operator generates. The endpoint's port must be a named port of the
/// Service whose target is a named container port of those pods.
async fn service_monitors_reach_what_is_deployed(_env: Env) -> Result<()> {
    use sandboxd::operator::peerpods::{caa, webhook};
    let ns = sandboxd::api::names::DEFAULT_NAMESPACE;
    let owner = Default::default();
    let caa_ds = serde_json::to_value(caa::daemonset(
        ns,
        "img",
        "peer-pods-secret",
        "peer-pods-cm",
        &Default::default(),
        "h",
        Default::default(),
        caa::Cluster { host_ips: true },
        &Default::default(),
    ))?;
    let hook_svc = serde_json::to_value(webhook::objects::service(
        ns,
        webhook::TlsSource::Operator,
        &owner,
    ))?;
    let hook_dep = serde_json::to_value(webhook::objects::deployment(ns, "img", &owner))?;
    let operator = docs("deploy/operator/operator.yaml")?
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .context("the operator Deployment")?;
    // What `kubectl apply -k deploy/monitoring` applies.
    let shipped = kustomize("deploy/monitoring").await?;
    let of_kind =
        |k: &str| -> Vec<Value> { shipped.iter().filter(|d| d["kind"] == k).cloned().collect() };
    let mut services = of_kind("Service");
    services.push(hook_svc);
    let workloads = [operator, caa_ds, hook_dep];
    let monitors = of_kind("ServiceMonitor");
    ensure!(of_kind("PrometheusRule").len() == 1, "one PrometheusRule");
    let dashboard = of_kind("ConfigMap");
    ensure!(
        dashboard.len() == 1
            && dashboard[0]["metadata"]["labels"]["grafana_dashboard"] == "1"
            && dashboard[0]["data"]["peer-pods.json"].as_str()
                == Some(
                    std::fs::read_to_string(
                        root().join("deploy/monitoring/dashboards/peer-pods.json")
                    )?
                    .as_str()
                ),
        "the dashboard ConfigMap carries the dashboard for Grafana's sidecar"
    );
    // OpenShift: the platform Prometheus' account may read the endpoints and /metrics.
    let openshift = kustomize("deploy/overlays/openshift-monitoring").await?;
    for kind in ["RoleBinding", "ClusterRoleBinding"] {
        ensure!(
            openshift.iter().any(|d| d["kind"] == kind
                && d["subjects"][0]["name"] == "prometheus-k8s"
                && d["subjects"][0]["namespace"] == "openshift-monitoring"),
            "no {kind} for openshift-monitoring/prometheus-k8s"
        );
    }
    ensure!(monitors.len() == 3, "three ServiceMonitors");
    for m in &monitors {
        let name = m["metadata"]["name"].as_str().unwrap_or("?");
        let selected: Vec<&Value> = services
            .iter()
            .filter(|s| {
                labels_match(
                    &m["spec"]["selector"]["matchLabels"],
                    &s["metadata"]["labels"],
                )
            })
            .collect();
        ensure!(
            selected.len() == 1,
            "{name} selects {} Services",
            selected.len()
        );
        let svc = selected[0];
        let pods: Vec<&Value> = workloads
            .iter()
            .filter(|w| {
                labels_match(
                    &svc["spec"]["selector"],
                    &w["spec"]["template"]["metadata"]["labels"],
                )
            })
            .collect();
        ensure!(
            pods.len() == 1,
            "{name}: its Service selects {} workloads",
            pods.len()
        );
        let containers = pods[0]["spec"]["template"]["spec"]["containers"]
            .as_array()
            .context("containers")?;
        for ep in m["spec"]["endpoints"].as_array().context("endpoints")? {
            ensure!(
                ep["bearerTokenFile"] == "/var/run/secrets/kubernetes.io/serviceaccount/token",
                "{name} scrapes with Prometheus' own token"
            );
            let port = svc["spec"]["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .find(|p| p["name"] == ep["port"])
                .with_context(|| format!("{name}: the Service has no port {}", ep["port"]))?;
            let target = &port["targetPort"];
            let served = containers
                .iter()
                .flat_map(|c| c["ports"].as_array().cloned().unwrap_or_default())
                .any(|p| p["name"] == *target);
            ensure!(served, "{name}: no container port named {target}");
        }
    }
    // The webhook is scraped over TLS, verified against the CA the operator keeps.
    let hook = monitors
        .iter()
        .find(|m| m["metadata"]["name"] == "sandboxd-webhook")
        .context("sandboxd-webhook")?;
    let tls = &hook["spec"]["endpoints"][0]["tlsConfig"];
    ensure!(
        tls["ca"]["secret"]["name"] == webhook::SERVING_SECRET,
        "{tls}"
    );
    ensure!(
        tls["serverName"] == format!("{}.{ns}.svc", sandboxd::api::names::WEBHOOK_SERVICE).as_str(),
        "{tls}"
    );
    ensure!(
        webhook::serving_names(ns, None)?
            .contains(&tls["serverName"].as_str().unwrap_or("").to_string()),
        "the serving certificate names {}",
        tls["serverName"]
    );
    Ok(())
}

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The metric names a PromQL expression selects (a small lexer: strings, label matchers,
/// ranges and grouping clauses are skipped, functions and operators are not names).
pub fn promql_metric_names(expr: &str) -> BTreeSet<String> {
    const KEYWORDS: [&str; 13] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "and",
        "or",
        "unless",
        "offset",
        "inf",
        "nan",
    ];
    // Aggregations may put their grouping clause before the parenthesis.
    const AGGREGATIONS: [&str; 13] = [
        "sum",
        "min",
        "max",
        "avg",
        "group",
        "stddev",
        "stdvar",
        "count",
        "count_values",
        "bottomk",
        "topk",
        "quantile",
        "limitk",
    ];
    const GROUPING: [&str; 6] = [
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
    ];
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    let mut skip_group = false;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => {
                i += 1;
                while i < chars.len() && chars[i] != c {
                    if chars[i] == '\\' {
                        i += 1;
                    }
                    i += 1;
                }
                i += 1;
            }
            '{' | '[' => {
                let close = if c == '{' { '}' } else { ']' };
                while i < chars.len() && chars[i] != close {
                    if chars[i] == '"' {
                        i += 1;
                        while i < chars.len() && chars[i] != '"' {
                            i += 1;
                        }
                    }
                    i += 1;
                }
                i += 1;
            }
            '(' if skip_group => {
                // The label list of by/on/without/ignoring/group_x.
                while i < chars.len() && chars[i] != ')' {
                    i += 1;
                }
                i += 1;
                skip_group = false;
            }
            '$' => {
                // A Grafana variable.
                i += 1;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut j = i;
                while j < chars.len() && chars[j].is_whitespace() {
                    j += 1;
                }
                let lower = word.to_ascii_lowercase();
                if GROUPING.contains(&lower.as_str()) {
                    skip_group = true;
                }
                // Keywords, functions and aggregations (followed by '(') are not names.
                if !KEYWORDS.contains(&lower.as_str())
                    && !AGGREGATIONS.contains(&lower.as_str())
                    && chars.get(j) != Some(&'(')
                {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    names
}

async fn promql_names_self_check(_env: Env) -> Result<()> {
    let got = promql_metric_names(
        r#"histogram_quantile(0.95, sum by (le, node) (rate(a_bucket{result!="ok", x=~"b|c"}[$__rate_interval])))
           / on() group_left(node) max(b_total offset 5m) unless c and d > bool 0 or sum without (phase) (e{phase="Running"})
           + label_replace(f, "dst", "$1", "src", "(.*)") * 1e3"#,
    );
    let want: BTreeSet<String> = ["a_bucket", "b_total", "c", "d", "e", "f"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    ensure!(got == want, "{got:?}");
    Ok(())
}

/// Every PromQL expression of the dashboard (panel targets, in rows too) and the rules.
fn expressions() -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(
        root().join("deploy/monitoring/dashboards/peer-pods.json"),
    )?)?;
    fn panels(v: &Value, out: &mut Vec<(String, String)>) {
        for p in v["panels"].as_array().into_iter().flatten() {
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((format!("panel {:?}", p["title"]), e.to_string()));
                }
            }
            panels(p, out);
        }
    }
    panels(&dash, &mut out);
    let rule: Value = serde_saphyr::from_str(&std::fs::read_to_string(
        root().join("deploy/monitoring/prometheus-rule.yaml"),
    )?)?;
    for g in rule["spec"]["groups"].as_array().into_iter().flatten() {
        for r in g["rules"].as_array().into_iter().flatten() {
            let name = r["alert"].as_str().or(r["record"].as_str()).unwrap_or("?");
            out.push((
                format!("rule {name}"),
                r["expr"].as_str().context("a rule expr")?.to_string(),
            ));
        }
    }
    Ok(out)
}

/// Metric names in a text exposition: each sample's name, and for each `# TYPE` the names
/// its samples take (a family without children yet still exists).
fn exported(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            let (Some(name), Some(kind)) = (it.next(), it.next()) else {
                continue;
            };
            let suffixes: &[&str] = match kind {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                "summary" => &["_sum", "_count", ""],
                "info" => &["_info"],
                _ => &[""],
            };
            for s in suffixes {
                names.insert(format!("{name}{s}"));
            }
        } else if !line.starts_with('#') && !line.is_empty() {
            let end = line.find(['{', ' ']).unwrap_or(line.len());
            names.insert(line[..end].to_string());
        }
    }
    names
}

/// GET `path` over plain HTTP.
async fn http_get(port: u16, path: &str) -> Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    request(&mut s, path).await
}

/// GET `path` over HTTPS, trusting `ca_pem`.
async fn https_get(port: u16, ca_pem: &str, path: &str) -> Result<String> {
    let mut s = tls(port, ca_pem).await?;
    request(&mut s, path).await
}

async fn tls(
    port: u16,
    ca_pem: &str,
) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c?)?;
    }
    let config = rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    Ok(connector
        .connect(rustls_pki_types::ServerName::try_from("127.0.0.1")?, tcp)
        .await?)
}

/// POSTs `body` over HTTPS; returns the whole answer (status line first).
async fn https_post(port: u16, ca_pem: &str, path: &str, body: &str) -> Result<String> {
    let mut s = tls(port, ca_pem).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await?;
    s.write_all(body.as_bytes()).await?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    Ok(String::from_utf8_lossy(&raw).into_owned())
}

async fn request<S>(s: &mut S, path: &str) -> Result<String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").context("an HTTP answer")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "GET {path}: {head}");
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        let mut out = String::new();
        let mut rest = body;
        while let Some((size, tail)) = rest.split_once("\r\n") {
            let n = usize::from_str_radix(size.trim(), 16)?;
            if n == 0 {
                break;
            }
            out.push_str(&tail[..n]);
            rest = &tail[n + 2..];
        }
        return Ok(out);
    }
    Ok(body.to_string())
}

/// The operator, the webhook and CAA, each with its metrics endpoint on loopback.
async fn every_metric_is_exported(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    for crd in [
        "kataconfigs.kataconfiguration.openshift.io",
        "peerpodconfigs.confidentialcontainers.org",
        "peerpods.confidentialcontainers.org",
    ] {
        harness::install_crds(&admin, &root().join(format!("deploy/crds/{crd}.yaml"))).await?;
    }
    let bin = Path::new(env!("CARGO_BIN_EXE_sandboxd"));

    // The operator as deployed runs it (leader election off: one replica here).
    let op_port = free_port();
    let kubeconfig = env.cp().kubeconfig_path.display().to_string();
    let op_args: Vec<String> = [
        "operator",
        "--kubeconfig",
        &kubeconfig,
        "--namespace",
        &env.ns,
        "--platform",
        "kubernetes",
        "--no-leader-election",
        "--metrics-addr",
        &format!("127.0.0.1:{op_port}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut operator = Process::start(
        &format!("monitoring-operator-{}", env.ns),
        bin,
        &op_args,
        &[],
    )?;

    // The webhook with a serving certificate; its /metrics is on its TLS port.
    let ca = Ca::new(
        &format!("monitoring-ca-{}", env.ns),
        time::Duration::hours(1),
    )?;
    let pair = ca.issue(
        "webhook",
        &[],
        &["127.0.0.1"],
        Usage::Server,
        time::Duration::hours(1),
    )?;
    let dir = run_dir().join(format!("monitoring-webhook-{}", env.ns));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("tls.crt"), &pair.cert_pem)?;
    std::fs::write(dir.join("tls.key"), &pair.key_pem)?;
    let hook_port = free_port();
    let hook_args: Vec<String> = [
        "webhook",
        "--cert-dir",
        &dir.to_string_lossy(),
        "--port",
        &hook_port.to_string(),
        "--bind-address",
        "127.0.0.1",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let mut webhook = Process::start(
        &format!("monitoring-webhook-{}", env.ns),
        bin,
        &hook_args,
        &[],
    )?;

    // CAA as the CAA suite runs it (Azure provider, ARM test server, deployed RBAC).
    let caa_port = free_port();
    let caa = crate::caa::setup_with(
        &env,
        "",
        sandboxd::armtest::Config::default(),
        &[("CAA_METRICS_ADDR", format!("127.0.0.1:{caa_port}"))],
    )
    .await?;

    let ca_pem = ca.cert_pem();
    let scraped = async {
        // A request the webhook cannot read: answered 400 and counted by reason.
        let refused = eventually("the webhook to answer", Duration::from_secs(30), || {
            let ca_pem = ca_pem.clone();
            async move {
                Ok(
                    https_post(hook_port, &ca_pem, "/mutate-v1-pod", "not a review")
                        .await
                        .ok(),
                )
            }
        })
        .await?;
        ensure!(refused.starts_with("HTTP/1.1 400"), "{refused}");
        let op = eventually(
            "the operator's /metrics",
            Duration::from_secs(60),
            || async move { Ok(http_get(op_port, "/metrics").await.ok()) },
        )
        .await?;
        let hook = eventually("the webhook's /metrics", Duration::from_secs(30), || {
            let ca_pem = ca_pem.clone();
            async move { Ok(https_get(hook_port, &ca_pem, "/metrics").await.ok()) }
        })
        .await?;
        let caa_text = eventually("CAA's /metrics", Duration::from_secs(30), || async move {
            Ok(http_get(caa_port, "/metrics").await.ok())
        })
        .await?;
        // CAA is ready once it serves its hypervisor socket.
        http_get(caa_port, "/readyz").await?;
        // A pod VM started and stopped as the shim does: counted, timed, and the node's
        // slot in use while it runs.
        let sample = |text: &str, series: &str| -> Option<f64> {
            text.lines()
                .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|v| v.parse().ok())
        };
        ensure!(
            sample(&caa_text, "sandboxd_caa_vm_creates_total{result=\"ok\"}") == Some(0.0),
            "{caa_text}"
        );
        let id = "0a1b2c3d4e5f6071";
        crate::caa::start_pod_vm(&caa, &env.ns, "metered", id).await?;
        let running = http_get(caa_port, "/metrics").await?;
        crate::caa::stop_via(&caa.socket, id).await?;
        let stopped = http_get(caa_port, "/metrics").await?;
        for (text, series, want) in [
            (
                &running,
                "sandboxd_caa_vm_creates_total{result=\"ok\"}",
                1.0,
            ),
            (
                &running,
                "sandboxd_caa_vm_create_duration_seconds_count",
                1.0,
            ),
            (&running, "sandboxd_caa_pod_vms", 1.0),
            (
                &stopped,
                "sandboxd_caa_vm_deletes_total{result=\"ok\"}",
                1.0,
            ),
            (
                &stopped,
                "sandboxd_caa_vm_delete_duration_seconds_count",
                1.0,
            ),
            (&stopped, "sandboxd_caa_pod_vms", 0.0),
        ] {
            ensure!(
                sample(text, series) == Some(want),
                "{series} != {want}:\n{text}"
            );
        }
        ensure!(
            sample(&stopped, "sandboxd_caa_arm_requests_total").is_some_and(|n| n > 0.0),
            "ARM requests counted:\n{stopped}"
        );
        anyhow::Ok(vec![("operator", op), ("webhook", hook), ("caa", stopped)])
    }
    .await;
    let scraped = match scraped {
        Ok(s) => s,
        Err(e) => {
            let logs = format!(
                "operator:\n{}\nwebhook:\n{}",
                operator.log_tail(20),
                webhook.log_tail(20)
            );
            operator.stop(Duration::from_secs(5));
            webhook.stop(Duration::from_secs(5));
            drop(caa);
            return Err(e.context(logs));
        }
    };
    operator.stop(Duration::from_secs(5));
    webhook.stop(Duration::from_secs(5));
    drop(caa);

    let mut all = BTreeSet::new();
    for (component, text) in &scraped {
        ensure!(
            text.contains(&format!("component=\"{component}\"")),
            "{component}'s /metrics carries its build info:\n{text}"
        );
        all.extend(exported(text));
    }
    let exprs = expressions()?;
    ensure!(exprs.len() >= 20, "only {} expressions found", exprs.len());
    let mut used = BTreeSet::new();
    let mut unknown = Vec::new();
    for (whence, expr) in &exprs {
        let names = promql_metric_names(expr);
        ensure!(!names.is_empty(), "{whence}: no metric in {expr}");
        for n in names {
            if !all.contains(&n) && !PROMETHEUS_OWN.contains(&n.as_str()) {
                unknown.push(format!("{whence}: {n}"));
            }
            used.insert(n);
        }
    }
    ensure!(
        unknown.is_empty(),
        "metrics used but exported by no component:\n{}\nexported: {all:?}",
        unknown.join("\n")
    );
    // Each component's own metrics appear in the dashboard.
    for prefix in ["sandboxd_operator_", "sandboxd_webhook_", "sandboxd_caa_"] {
        ensure!(
            used.iter().any(|n| n.starts_with(prefix)),
            "no {prefix}* metric used"
        );
    }
    eprintln!(
        "monitoring: {} expressions use {} metric names, all exported",
        exprs.len(),
        used.len()
    );
    Ok(())
}
