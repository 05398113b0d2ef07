//! The one integration test binary (`harness = false`): it owns the shared control plane,
//! so no process outlives the run, and runs every suite against it.

mod agent;
mod caa;
mod ctl;
mod datapath;
mod harness;
mod image;
mod image_publish;
mod monitoring;
mod node;
mod operator;
mod peerpods;
mod smoke;
mod static_binary;
mod webhook;

use std::sync::OnceLock;
use std::time::Duration;

use harness::{Case, Env, Needs};
use libtest_mimic::{Arguments, Failed, Trial};

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("tokio runtime")
    })
}

/// Held shared by cluster tests and exclusively by `Needs::ClusterExclusive` tests.
static CLUSTER_LOCK: tokio::sync::RwLock<()> = tokio::sync::RwLock::const_new(());

fn namespace_for(name: &str) -> String {
    let short: String = name
        .rsplit("::")
        .next()
        .unwrap_or(name)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .take(40)
        .collect();
    let nonce = format!("{:06x}", rand_u32() & 0xff_ffff);
    format!("t-{}-{nonce}", short.trim_matches('-'))
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos(),
    );
    h.finish() as u32
}

fn run_case(case: &Case) -> Result<(), Failed> {
    let mut env = Env {
        name: case.name.clone(),
        cp: None,
        ns: namespace_for(&case.name),
        node: None,
    };
    let needs_ns = case.needs != Needs::Nothing;
    if needs_ns {
        let cp = harness::cluster().map_err(|e| Failed::from(format!("control plane: {e:#}")))?;
        env.cp = Some(cp);
    }
    if case.needs == Needs::Node {
        let node = harness::node::node().map_err(|e| Failed::from(format!("node: {e:#}")))?;
        env.node = Some(node);
    }
    let ns = env.ns.clone();
    let fut = (case.run)(env);
    let exclusive = matches!(case.needs, Needs::ClusterExclusive | Needs::Node);
    // The real node's end-to-end tests install, configure and uninstall a whole release.
    let limit = if case.needs == Needs::Node { 600 } else { 300 };
    runtime().block_on(async move {
        // Exclusive tests run alone; the others share the control plane.
        let _read;
        let _write;
        if exclusive {
            _write = CLUSTER_LOCK.write().await;
        } else {
            _read = CLUSTER_LOCK.read().await;
        }
        let client = if needs_ns {
            let cp = harness::cluster().map_err(|e| Failed::from(format!("{e:#}")))?;
            let client = cp
                .admin_client()
                .await
                .map_err(|e| Failed::from(format!("{e:#}")))?;
            harness::create_namespace(&client, &ns)
                .await
                .map_err(|e| Failed::from(format!("creating namespace {ns}: {e:#}")))?;
            Some(client)
        } else {
            None
        };
        let result = tokio::time::timeout(Duration::from_secs(limit), fut).await;
        if let Some(client) = client {
            // Best effort; the namespace controller finishes it in the background.
            let _ = harness::delete_namespace(&client, &ns).await;
        }
        match result {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failed::from(format!("{e:#}"))),
            Err(_) => Err(Failed::from(format!("timed out after {limit}s"))),
        }
    })
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut args = Arguments::from_args();
    if args.test_threads.is_none() {
        // Integration tests mostly wait on the API server: run several at once.
        args.test_threads = Some(6);
    }
    let cases: Vec<Case> = [
        smoke::cases(),
        agent::cases(),
        static_binary::cases(),
        webhook::cases(),
        operator::cases(),
        peerpods::cases(),
        caa::cases(),
        ctl::cases(),
        datapath::cases(),
        image::cases(),
        image_publish::cases(),
        monitoring::cases(),
        node::cases(),
    ]
    .into_iter()
    .flatten()
    .collect();
    let trials = cases
        .into_iter()
        .map(|case| {
            let name = case.name.clone();
            let skip = case.skip.clone();
            let trial = Trial::test(name, move || run_case(&case));
            match skip {
                Some(reason) => {
                    eprintln!("skipped: {} ({reason})", trial.name());
                    trial.with_ignored_flag(true)
                }
                None => trial,
            }
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    harness::shutdown(!conclusion.has_failed());
    conclusion.exit();
}
