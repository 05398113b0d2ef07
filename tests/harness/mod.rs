//! Test support: one real control plane per test run, namespaces per test, and the
//! stand-ins for what no kubelet does here (node readiness, pod phases).

pub mod control_plane;
pub mod kube_helpers;
pub mod node;
pub mod pod_launch;
pub mod process;
pub mod ttrpc_wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};
use kube::Client;

pub use control_plane::{ControlPlane, Options};
pub use kube_helpers::*;

/// A test's future.
pub type TestFuture = Pin<Box<dyn Future<Output = Result<()>> + Send>>;

/// What a test needs before it can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Needs {
    /// Nothing beyond the process.
    Nothing,
    /// The shared control plane; the test gets a fresh namespace in it.
    Cluster,
    /// The shared control plane, with no other test running: for tests of cluster-wide
    /// singletons and cluster-wide scans (the KataConfig, every peer pod in the cluster).
    ClusterExclusive,
    /// The shared control plane and the real node ([`node::node`]), with no other test
    /// running.
    Node,
}

/// One integration test.
pub struct Case {
    /// `suite::behaviour`.
    pub name: String,
    /// What it needs.
    pub needs: Needs,
    /// Why it must be skipped on this machine, if it must.
    pub skip: Option<String>,
    /// The test body.
    pub run: Box<dyn Fn(Env) -> TestFuture + Send + Sync>,
}

impl Case {
    /// A test that needs the control plane.
    pub fn cluster<F, Fut>(name: &str, f: F) -> Self
    where
        F: Fn(Env) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        Self {
            name: name.to_string(),
            needs: Needs::Cluster,
            skip: None,
            run: Box::new(move |env| Box::pin(f(env))),
        }
    }

    /// A test that needs the control plane to itself (see [`Needs::ClusterExclusive`]).
    pub fn cluster_exclusive<F, Fut>(name: &str, f: F) -> Self
    where
        F: Fn(Env) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        Self {
            needs: Needs::ClusterExclusive,
            ..Self::cluster(name, f)
        }
    }

    /// A test that needs the real node (and the control plane to itself).
    pub fn node<F, Fut>(name: &str, f: F) -> Self
    where
        F: Fn(Env) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        Self {
            needs: Needs::Node,
            ..Self::cluster(name, f)
        }
        .skip_if(node::unavailable())
    }

    /// A test that needs no control plane.
    pub fn plain<F, Fut>(name: &str, f: F) -> Self
    where
        F: Fn(Env) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<()>> + Send + 'static,
    {
        Self {
            name: name.to_string(),
            needs: Needs::Nothing,
            skip: None,
            run: Box::new(move |env| Box::pin(f(env))),
        }
    }

    /// Skips the test with a reason when `reason` is `Some`.
    pub fn skip_if(mut self, reason: Option<String>) -> Self {
        self.skip = reason;
        self
    }
}

/// What a running test gets.
pub struct Env {
    /// The test's name (used for unique object names).
    pub name: String,
    /// The control plane, for `Needs::Cluster` tests.
    pub cp: Option<&'static ControlPlane>,
    /// Its own namespace, for `Needs::Cluster` tests.
    pub ns: String,
    /// The real node, for `Needs::Node` tests.
    pub node: Option<&'static node::TestNode>,
}

impl Env {
    /// The control plane (panics for tests that did not ask for it).
    pub fn cp(&self) -> &'static ControlPlane {
        self.cp.expect("this test did not declare Needs::Cluster")
    }

    /// The real node (panics for tests that did not ask for it).
    pub fn node(&self) -> &'static node::TestNode {
        self.node.expect("this test did not declare Needs::Node")
    }

    /// A cluster-admin client.
    pub async fn admin(&self) -> Result<Client> {
        self.cp().admin_client().await
    }

    /// A name unique to this test, for cluster-scoped objects (`<prefix>-<ns suffix>`).
    pub fn unique(&self, prefix: &str) -> String {
        let suffix = self.ns.rsplit('-').next().unwrap_or("x");
        format!("{prefix}-{suffix}")
    }
}

static CLUSTER: OnceLock<std::result::Result<ControlPlane, String>> = OnceLock::new();
static CLUSTER_INIT: Mutex<()> = Mutex::new(());

/// The shared control plane, started on first use (blocking; call outside async code). A
/// failed start is remembered, so every test reports it without trying again.
pub fn cluster() -> Result<&'static ControlPlane> {
    let _guard = CLUSTER_INIT.lock().unwrap_or_else(|e| e.into_inner());
    let started = CLUSTER
        .get_or_init(|| ControlPlane::start(Options::default()).map_err(|e| format!("{e:#}")));
    started.as_ref().map_err(|e| anyhow!("{e}"))
}

/// Stops the shared control plane, if it was started, and removes its files. On failure
/// the files stay for inspection.
pub fn shutdown(success: bool) {
    node::shutdown();
    if let Some(Ok(cp)) = CLUSTER.get() {
        cp.stop();
    }
    if success {
        let _ = std::fs::remove_dir_all(process::run_dir());
    } else {
        eprintln!("harness: logs kept in {}", process::run_dir().display());
    }
}

/// Whether `program` is on PATH.
/// The longest time inside `[from, to]` between two of `times` (the window's edges count
/// as events): the longest a user watching those events waited.
pub fn longest_gap(
    times: impl IntoIterator<Item = std::time::Instant>,
    from: std::time::Instant,
    to: std::time::Instant,
) -> Duration {
    let mut inside: Vec<std::time::Instant> = times
        .into_iter()
        .filter(|t| *t >= from && *t <= to)
        .collect();
    inside.sort();
    inside.insert(0, from);
    inside.push(to);
    inside
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default()
}

pub fn which(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).is_file()))
}

/// Polls `check` until it returns `Ok(Some(v))`, failing after `timeout` with the last
/// error or `what`.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = String::from("condition never held");
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() >= deadline {
            return Err(anyhow!(
                "timed out after {timeout:?} waiting for {what}: {last}"
            ));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
