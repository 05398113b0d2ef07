//! `/healthz`, `/readyz` and `/metrics` for every daemon.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use super::Error;

/// Named readiness checks; `/readyz` is ready when every registered check is.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<Vec<Check>>>,
}

type Check = (String, Arc<AtomicBool>);

/// One readiness check, flipped by the component that owns it.
#[derive(Clone)]
pub(crate) struct ReadyFlag(Arc<AtomicBool>);

impl ReadyFlag {
    /// Marks the check ready (`true`) or not.
    pub(crate) fn set(&self, ready: bool) {
        self.0.store(ready, Ordering::Release);
    }
}

impl Readiness {
    /// An empty set of checks (ready until a check is registered).
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Registers a check, initially not ready.
    pub(crate) fn register(&self, name: &str) -> ReadyFlag {
        let flag = Arc::new(AtomicBool::new(false));
        self.checks
            .lock()
            .expect("readiness lock")
            .push((name.to_string(), flag.clone()));
        ReadyFlag(flag)
    }

    /// Whether every check is ready, and a line per check as the API server prints them.
    pub(crate) fn report(&self) -> (bool, String) {
        let checks = self.checks.lock().expect("readiness lock");
        let mut ok = true;
        let mut text = String::new();
        for (name, flag) in checks.iter() {
            if flag.load(Ordering::Acquire) {
                text.push_str(&format!("[+]{name} ok\n"));
            } else {
                ok = false;
                text.push_str(&format!("[-]{name} not ready\n"));
            }
        }
        text.push_str(if ok {
            "readyz check passed\n"
        } else {
            "readyz check failed\n"
        });
        (ok, text)
    }
}

#[derive(Clone)]
struct AppState {
    registry: Arc<Registry>,
    readiness: Readiness,
}

/// The health and metrics routes, for serving alone or merging into a component's router.
pub fn router(registry: Arc<Registry>, readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/livez", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AppState {
            registry,
            readiness,
        })
}

async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let (ok, text) = state.readiness.report();
    let code = if ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, text)
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    let mut body = String::new();
    match prometheus_client::encoding::text::encode(&mut body, &state.registry) {
        Ok(()) => (
            StatusCode::OK,
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// Binds the server's address (separate from [`serve`] so callers learn the port of `:0`).
pub(crate) async fn bind(addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { addr, source })
}

/// Serves `router` until `shutdown` is cancelled, then finishes in-flight requests.
pub(crate) async fn serve(
    listener: TcpListener,
    router: Router,
    shutdown: CancellationToken,
) -> Result<(), Error> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving /healthz, /readyz and /metrics");
    }
    axum::serve(listener, router)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
        .map_err(Error::Serve)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::Metrics;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    async fn get(router: &Router, path: &str) -> (StatusCode, String) {
        let resp = router
            .clone()
            .oneshot(Request::get(path).body(Body::empty()).unwrap())
            .await
            .unwrap();
        let status = resp.status();
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (status, String::from_utf8(body.to_vec()).unwrap())
    }

    #[tokio::test]
    async fn readyz_fails_until_every_check_is_ready_and_names_the_laggard() {
        let readiness = Readiness::new();
        let informers = readiness.register("informers");
        let leader = readiness.register("leader-election");
        let r = router(Metrics::new().finish(), readiness);

        informers.set(true);
        let (code, body) = get(&r, "/readyz").await;
        assert_eq!(code, StatusCode::SERVICE_UNAVAILABLE);
        assert!(body.contains("[+]informers ok"), "{body}");
        assert!(body.contains("[-]leader-election not ready"), "{body}");

        leader.set(true);
        let (code, _) = get(&r, "/readyz").await;
        assert_eq!(code, StatusCode::OK);
        let (code, body) = get(&r, "/healthz").await;
        assert_eq!((code, body.as_str()), (StatusCode::OK, "ok\n"));
    }

    #[tokio::test]
    async fn metrics_are_prometheus_text_with_build_info() {
        let r = router(Metrics::for_component("webhook").finish(), Readiness::new());
        let (code, body) = get(&r, "/metrics").await;
        assert_eq!(code, StatusCode::OK);
        assert!(
            body.contains("sandboxd_build_info{version=\"")
                && body.contains("component=\"webhook\"} 1"),
            "{body}"
        );
        assert!(body.ends_with("# EOF\n"), "{body}");
    }
}
