//! Router tests: AdmissionReview JSON in, HTTP answer out, no sockets.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use base64::Engine;
use proptest::prelude::*;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::pod;
use super::review::ReviewOut;
use super::*;
use crate::api::names::{self, PEER_POD_LABEL, annotations};

/// A realistic peer pod from a Deployment: three containers and an init container.
pub(crate) const KATA_POD_REVIEW: &str = include_str!("fixtures/kata-remote-pod.json");

fn fixture() -> Value {
    serde_json::from_str(KATA_POD_REVIEW).unwrap()
}

fn app_with(settings: Settings, policy: NamespacePolicy, max_body: usize) -> Router {
    let mut metrics = Metrics::for_component("webhook");
    let wm = WebhookMetrics::register(metrics.registry_mut());
    let webhook = Webhook::new(settings, Arc::new(policy), wm);
    router(webhook, metrics.finish(), Readiness::new(), max_body)
}

fn app() -> Router {
    app_with(
        Settings::default(),
        NamespacePolicy::default(),
        DEFAULT_MAX_BODY_BYTES,
    )
}

async fn post(app: &Router, body: impl Into<Body>) -> (StatusCode, String) {
    let resp = app
        .clone()
        .oneshot(
            Request::post(manifest::MUTATE_PATH)
                .header("content-type", "application/json")
                .body(body.into())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = resp.status();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 24)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn review(app: &Router, body: &Value) -> ReviewOut {
    let (status, text) = post(app, body.to_string()).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn patched(body: &Value, out: &ReviewOut) -> Value {
    let patch = base64::engine::general_purpose::STANDARD
        .decode(out.response.patch.as_ref().expect("a patch"))
        .unwrap();
    let patch: json_patch::Patch = serde_json::from_slice(&patch).unwrap();
    let mut pod = body["request"]["object"].clone();
    json_patch::patch(&mut pod, &patch).unwrap();
    pod
}

#[tokio::test]
async fn a_kata_remote_pod_is_answered_with_a_patch_making_it_a_peer_pod() {
    let app = app();
    let body = fixture();
    let out = review(&app, &body).await;
    assert_eq!(out.api_version, "admission.k8s.io/v1");
    assert_eq!(out.kind, "AdmissionReview");
    assert_eq!(out.response.uid, "7f0e4a4c-3a0b-4d6e-9a57-2b1c8f3d5e10");
    assert!(out.response.allowed);
    assert_eq!(out.response.patch_type.as_deref(), Some("JSONPatch"));
    let pod = patched(&body, &out);
    let spec = &pod["spec"];
    assert_eq!(
        spec["containers"][0]["resources"],
        json!({"requests": {"kata.peerpods.io/vm": "1"}, "limits": {"kata.peerpods.io/vm": "1"}})
    );
    for c in spec["containers"].as_array().unwrap()[1..]
        .iter()
        .chain(spec["initContainers"].as_array().unwrap())
    {
        assert!(c.get("resources").is_none(), "{c}");
    }
    // Limits of the app containers (2 + 1 + 0.2 CPU, 2Gi + 1Gi + 128Mi) outweigh the init
    // container (1 CPU, 512Mi), which runs before them, not beside them.
    let a = &pod["metadata"]["annotations"];
    assert_eq!(a[annotations::DEFAULT_VCPUS], "4");
    assert_eq!(a[annotations::DEFAULT_MEMORY], "3200");
    assert_eq!(a["prometheus.io/scrape"], "true");
    assert_eq!(pod["metadata"]["labels"][PEER_POD_LABEL], "true");
    assert_eq!(pod["metadata"]["labels"]["app"], "shop");
    assert!(
        out.response.warnings[0].contains("4 vCPU, 3200 MiB"),
        "{:?}",
        out.response.warnings
    );
}

#[tokio::test]
async fn pods_of_other_runtime_classes_and_other_operations_pass_untouched() {
    let app = app();
    let mut runc = fixture();
    runc["request"]["object"]["spec"]["runtimeClassName"] = "runc".into();
    let mut none = fixture();
    none["request"]["object"]["spec"]
        .as_object_mut()
        .unwrap()
        .remove("runtimeClassName");
    let mut update = fixture();
    update["request"]["operation"] = "UPDATE".into();
    let mut status = fixture();
    status["request"]["subResource"] = "status".into();
    let mut deployment = fixture();
    deployment["request"]["kind"] = json!({"group": "apps", "version": "v1", "kind": "Deployment"});
    let mut system = fixture();
    system["request"]["namespace"] = "kube-system".into();
    for body in [runc, none, update, status, deployment, system] {
        let out = review(&app, &body).await;
        assert!(out.response.allowed, "{body}");
        assert_eq!(out.response.patch, None, "{body}");
        assert_eq!(out.response.uid, "7f0e4a4c-3a0b-4d6e-9a57-2b1c8f3d5e10");
    }
}

#[tokio::test]
async fn the_target_runtime_class_and_extended_resource_are_configurable() {
    let app = app_with(
        Settings {
            target_runtime_class: "kata-cloud".into(),
            extended_resource: "example.org/vm".into(),
        },
        NamespacePolicy::default(),
        DEFAULT_MAX_BODY_BYTES,
    );
    let out = review(&app, &fixture()).await;
    assert_eq!(
        out.response.patch, None,
        "kata-remote is not the target here"
    );
    let mut body = fixture();
    body["request"]["object"]["spec"]["runtimeClassName"] = "kata-cloud".into();
    let pod = patched(&body, &review(&app, &body).await);
    assert_eq!(
        pod["spec"]["containers"][0]["resources"]["requests"],
        json!({"example.org/vm": "1"})
    );
}

#[tokio::test]
async fn peer_pods_in_the_operator_namespace_or_outside_the_allow_list_are_refused() {
    let app = app_with(
        Settings::default(),
        NamespacePolicy {
            allowed: vec![NamespacePattern::new("shop")],
            ..Default::default()
        },
        DEFAULT_MAX_BODY_BYTES,
    );
    assert!(review(&app, &fixture()).await.response.patch.is_some());

    let mut body = fixture();
    body["request"]["namespace"] = names::DEFAULT_NAMESPACE.into();
    let out = review(&app, &body).await;
    assert!(!out.response.allowed);
    let status = out.response.status.unwrap();
    assert_eq!((status.code, status.reason.as_str()), (403, "Forbidden"));
    assert!(status.message.contains("operator namespace"), "{status:?}");

    body["request"]["namespace"] = "default".into();
    let out = review(&app, &body).await;
    assert!(!out.response.allowed);
    assert!(
        out.response.status.unwrap().message.contains("[shop]"),
        "the refusal names the allowed namespaces"
    );
}

#[tokio::test]
async fn bodies_that_are_not_admission_reviews_get_http_400_saying_why() {
    let app = app();
    let (status, text) = post(&app, "{not json").await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("malformed AdmissionReview"), "{text}");

    let mut v1beta1 = fixture();
    v1beta1["apiVersion"] = "admission.k8s.io/v1beta1".into();
    let (status, text) = post(&app, v1beta1.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("admission.k8s.io/v1beta1"), "{text}");

    let mut pod = fixture();
    pod["kind"] = "Pod".into();
    let (status, text) = post(&app, pod.to_string()).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("kind \"Pod\""), "{text}");

    let (status, text) = post(
        &app,
        json!({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}).to_string(),
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(text.contains("no request"), "{text}");
}

#[tokio::test]
async fn a_pod_that_does_not_parse_or_cannot_be_sized_is_refused_in_the_review() {
    let app = app();
    let mut body = fixture();
    body["request"]["object"]["spec"]["containers"] = "web".into();
    let out = review(&app, &body).await;
    assert!(!out.response.allowed);
    let status = out.response.status.unwrap();
    assert_eq!(status.code, 400);
    assert!(status.message.contains("does not parse"), "{status:?}");
    assert!(status.message.contains("spec.containers"), "{status:?}");

    let mut body = fixture();
    body["request"]["object"]["spec"]["initContainers"][0]["resources"]["requests"] =
        json!(["cpu"]);
    let status = review(&app, &body).await.response.status.unwrap();
    assert_eq!(status.code, 400);
    assert!(
        status.message.contains("spec.initContainers[0]"),
        "{status:?}"
    );

    let mut body = fixture();
    body["request"]["object"]["spec"]["containers"][1]["resources"]["limits"]["memory"] =
        "a lot".into();
    let out = review(&app, &body).await;
    assert!(!out.response.allowed);
    let message = out.response.status.unwrap().message;
    assert!(
        message.contains("\"worker\"") && message.contains("a lot"),
        "{message}"
    );

    let mut body = fixture();
    body["request"]["object"] = Value::Null;
    let out = review(&app, &body).await;
    assert!(!out.response.allowed);
}

#[tokio::test]
async fn pods_of_other_runtime_classes_are_admitted_whatever_their_other_fields_hold() {
    let app = app();
    let mut body = fixture();
    let pod = &mut body["request"]["object"];
    pod["spec"]["runtimeClassName"] = "runc".into();
    pod["spec"]["containers"] = "web".into();
    pod["metadata"]["labels"] = json!(["not", "a", "map"]);
    let out = review(&app, &body).await;
    assert!(out.response.allowed, "{:?}", out.response);
    assert_eq!(out.response.patch, None);
    assert_eq!(out.response.status, None);
}

#[tokio::test]
async fn a_peer_pod_with_escaped_strings_and_unknown_fields_is_mutated() {
    let app = app();
    let mut body = fixture();
    let pod = &mut body["request"]["object"];
    pod["spec"]["containers"][0]["name"] = "web \"main\"".into();
    pod["spec"]["containers"][0]["someFutureField"] = json!({"nested": [1, null, {"a": true}]});
    pod["spec"]["containers"][2]["resources"] = Value::Null;
    pod["metadata"]
        .as_object_mut()
        .unwrap()
        .remove("annotations");
    pod["spec"]["runtimeClassName"] = r"kata\u002dremote".into();
    // The runtime class written with a JSON escape in the body.
    let text = body
        .to_string()
        .replace(r"kata\\u002dremote", r"kata\u002dremote");
    assert!(text.contains(r#""kata\u002dremote""#), "{text}");
    let (status, text) = post(&app, text).await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let out: ReviewOut = serde_json::from_str(&text).unwrap();
    let pod = patched(&body, &out);
    assert_eq!(pod["metadata"]["labels"][PEER_POD_LABEL], "true");
    // 2 + 1 CPU limits (the third container has no resources), 2Gi + 1Gi.
    assert_eq!(
        pod["metadata"]["annotations"][annotations::DEFAULT_VCPUS],
        "3"
    );
    assert_eq!(
        pod["metadata"]["annotations"][annotations::DEFAULT_MEMORY],
        "3072"
    );
    assert_eq!(
        pod["spec"]["containers"][0]["someFutureField"]["nested"][2]["a"],
        true
    );
}

#[tokio::test]
async fn oversized_bodies_are_refused_before_parsing() {
    let app = app_with(Settings::default(), NamespacePolicy::default(), 64 << 10);
    let mut body = fixture();
    body["request"]["object"]["metadata"]["annotations"]["big"] = "x".repeat(128 << 10).into();
    let (status, _) = post(&app, body.to_string()).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
    // The same webhook still answers normal requests.
    assert!(review(&app, &fixture()).await.response.allowed);
}

#[tokio::test]
async fn metrics_count_admissions_by_outcome_and_time_them() {
    let app = app();
    review(&app, &fixture()).await;
    let mut runc = fixture();
    runc["request"]["object"]["spec"]["runtimeClassName"] = "runc".into();
    review(&app, &runc).await;
    post(&app, "[]").await;
    let resp = app
        .clone()
        .oneshot(Request::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(
        axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    for line in [
        "sandboxd_webhook_admissions_total{outcome=\"mutated\"} 1",
        "sandboxd_webhook_admissions_total{outcome=\"ignored\"} 1",
        "sandboxd_webhook_admissions_total{outcome=\"invalid\"} 1",
        "sandboxd_webhook_mutations_total 1",
        "sandboxd_webhook_errors_total{reason=\"malformed\"} 1",
        "sandboxd_webhook_admission_duration_seconds_count 3",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}

/// Replaces the value at a random place in `v` (walking `path` choices) with `new`.
fn replace_at(v: &mut Value, path: &[usize], new: Value) {
    let mut cur = v;
    for (depth, &choice) in path.iter().enumerate() {
        let next = match cur {
            Value::Object(m) if !m.is_empty() => {
                let key = m.keys().nth(choice % m.len()).unwrap().clone();
                m.get_mut(&key).unwrap()
            }
            Value::Array(a) if !a.is_empty() => {
                let n = a.len();
                &mut a[choice % n]
            }
            _ => break,
        };
        if depth + 1 == path.len() {
            *next = new;
            return;
        }
        cur = next;
    }
}

fn json_leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        "[0-9]{0,4}(\\.[0-9]{0,3})?(m|k|Ki|Mi|Gi|M|G|e3|Ei|E)?".prop_map(Value::from),
        ".{0,12}".prop_map(Value::from),
        Just(json!({})),
        Just(json!([])),
        Just(json!([{"name": "x"}])),
    ]
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(f)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Arbitrary bytes never crash the webhook: they get an answer, never a 5xx.
    #[test]
    fn arbitrary_bodies_get_a_400_or_a_review(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        let app = app();
        let (status, _) = block_on(post(&app, bytes));
        prop_assert!(status == StatusCode::BAD_REQUEST || status == StatusCode::OK, "{status}");
    }

    /// A review with any one field replaced gets an answer; a patch, when given, applies
    /// to the submitted pod and leaves the first container asking for one pod VM.
    #[test]
    fn damaged_reviews_get_answers_and_every_patch_applies(
        path in proptest::collection::vec(any::<usize>(), 1..8),
        leaf in json_leaf(),
    ) {
        let app = app();
        let mut body = fixture();
        replace_at(&mut body, &path, leaf);
        let (status, text) = block_on(post(&app, body.to_string()));
        prop_assert!(status == StatusCode::BAD_REQUEST || status == StatusCode::OK, "{status}");
        if status == StatusCode::OK {
            let out: ReviewOut = serde_json::from_str(&text).unwrap();
            if out.response.patch.is_some() {
                let pod = patched(&body, &out);
                prop_assert_eq!(
                    &pod["spec"]["containers"][0]["resources"]["limits"]["kata.peerpods.io/vm"],
                    "1"
                );
                prop_assert_eq!(&pod["metadata"]["labels"][PEER_POD_LABEL], "true");
            }
        }
    }
}

/// Timing harness, run by hand (not a timing assertion):
/// `cargo test --release --lib webhook::tests::time_ -- --ignored --nocapture`.
#[test]
#[ignore = "timing harness: run by hand in a release build"]
fn time_admissions_of_the_benchmark_pod() {
    let webhook = Webhook::new(
        Settings::default(),
        Arc::new(NamespacePolicy::default()),
        WebhookMetrics::default(),
    );
    let mut runc = fixture();
    runc["request"]["object"]["spec"]["runtimeClassName"] = "runc".into();
    let runc = runc.to_string();
    const N: u32 = 20_000;
    let time = |what: &str, once: &dyn Fn() -> Vec<u8>| {
        for _ in 0..2_000 {
            std::hint::black_box(once());
        }
        let start = std::time::Instant::now();
        for _ in 0..N {
            std::hint::black_box(once());
        }
        let per = start.elapsed().as_secs_f64() * 1e6 / f64::from(N);
        println!("{what}: {per:.2} µs/admission ({N} admissions)");
    };
    // Where the time of a mutation goes.
    let body = KATA_POD_REVIEW.as_bytes();
    time("  scan of the body (serde IgnoredAny)", &|| {
        serde_json::from_slice::<serde::de::IgnoredAny>(body).unwrap();
        Vec::new()
    });
    let object = serde_json::to_string(&fixture()["request"]["object"]).unwrap();
    time("  pod read in one pass (PodFull)", &|| {
        let pod = serde_json::from_str::<pod::Obj<pod::PodFull>>(&object).unwrap();
        std::hint::black_box(pod::PodParts::Full(pod.0.unwrap()).peer().unwrap());
        Vec::new()
    });
    let pod = serde_json::from_str::<pod::Obj<pod::PodFull>>(&object).unwrap();
    let peer = pod::PodParts::Full(pod.0.unwrap()).peer().unwrap();
    time("  mutate::mutate", &|| {
        std::hint::black_box(mutate::mutate(&peer, "kata.peerpods.io/vm").unwrap());
        Vec::new()
    });
    let out = webhook.review(body).unwrap();
    time("  response serialisation", &|| {
        serde_json::to_vec(&out).unwrap()
    });
    for (what, body) in [
        ("kata-remote pod (mutated)", KATA_POD_REVIEW),
        ("runc pod (ignored)", runc.as_str()),
    ] {
        time(what, &|| {
            serde_json::to_vec(&webhook.review(body.as_bytes()).unwrap()).unwrap()
        });
    }
}

/// Load harness, run by hand: serves the webhook on 127.0.0.1:`SANDBOXD_SERVE_PORT` (9555)
/// for `SANDBOXD_SERVE_SECS` (60) on a `SANDBOXD_RUNTIME` (`current` or `multi`) tokio
/// runtime, so a load generator (wrk) can compare runtime flavours. Prints the cert dir.
#[test]
#[ignore = "load harness: run by hand in a release build"]
fn serve_for_a_load_generator() {
    let env = |k: &str, d: &str| std::env::var(k).unwrap_or_else(|_| d.to_string());
    let _ = rustls::crypto::ring::default_provider().install_default();
    let ca = crate::pki::Ca::new("bench-ca", time::Duration::days(1)).unwrap();
    let ck = ca
        .issue(
            "bench",
            &[],
            &["127.0.0.1"],
            crate::pki::Usage::Server,
            time::Duration::days(1),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("tls.crt"), &ck.cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &ck.key_pem).unwrap();
    let args = Args {
        cert_dir: dir.path().to_path_buf(),
        port: env("SANDBOXD_SERVE_PORT", "9555").parse().unwrap(),
        bind_address: "127.0.0.1".parse().unwrap(),
        target_runtime_class: None,
        pod_vm_extended_resource: names::VM_RESOURCE.into(),
        operator_namespace: names::DEFAULT_NAMESPACE.into(),
        allowed_namespaces: Vec::new(),
        never_mutate_namespaces: Vec::new(),
        tls_min_version: None,
        tls_cipher_suites: Vec::new(),
        max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        cert_reload_interval_ms: 1000,
    };
    let secs: u64 = env("SANDBOXD_SERVE_SECS", "60").parse().unwrap();
    let runtime = match env("SANDBOXD_RUNTIME", "current").as_str() {
        "multi" => tokio::runtime::Builder::new_multi_thread(),
        _ => tokio::runtime::Builder::new_current_thread(),
    }
    .enable_all()
    .build()
    .unwrap();
    println!("serving for {secs} s, pid {}", std::process::id());
    runtime.block_on(async move {
        let token = CancellationToken::new();
        let stop = token.clone();
        tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_secs(secs)).await;
            stop.cancel();
        });
        serve(args, token).await.unwrap();
    });
}
