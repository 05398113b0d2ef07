//! No secret in any log at any level: a CAA at `trace` with a canary client secret creates,
//! starts and stops a pod VM through the ARM test server; neither the canary nor any bearer
//! token the test server issued appears in CAA's log, the namespace's Events, the PeerPod
//! records (status, annotations) or the node. The Azure SDK's debug request log, which
//! prints the `Authorization` header, must have run (something was redacted), so the test
//! can fail.

use anyhow::{Result, ensure};
use k8s_openapi::api::core::v1::{Event, Node};
use kube::Api;
use sandboxd::api::peerpod::PeerPod;
use sandboxd::armtest;

use crate::harness::Env;

const CANARY: &str = "CanarySecret7Q9xZ2kLwVdoNotLog";

fn check(what: &str, text: &str, needles: &[String]) -> Result<()> {
    for n in needles {
        ensure!(
            !text.contains(n.as_str()),
            "{what} contains a secret ({n:.12}…)"
        );
    }
    Ok(())
}

pub(crate) async fn no_secret_in_logs_at_trace(env: Env) -> Result<()> {
    let s = super::setup_with(
        &env,
        "",
        armtest::Config::default(),
        &[
            ("AZURE_CLIENT_SECRET", CANARY.into()),
            ("RUST_LOG", "trace".into()),
        ],
    )
    .await?;
    let id = "5ec7e75ec7e75ec7e75ec7e7";
    super::start_pod_vm(&s, &env.ns, "secretive", id).await?;
    super::stop_via(&s.socket, id).await?;
    let tokens = s.arm.issued_tokens();
    ensure!(!tokens.is_empty(), "no token was issued");
    let mut needles = vec![CANARY.to_string()];
    needles.extend(tokens);
    let log = std::fs::read_to_string(s.caa.log_path())?;
    ensure!(
        log.contains("transport policy") && log.contains("[redacted]"),
        "the SDK's request log did not run at trace:\n{}",
        s.caa.log_tail(20)
    );
    check("CAA's log", &log, &needles)?;
    let events = Api::<Event>::namespaced(s.admin.clone(), &env.ns)
        .list(&Default::default())
        .await?;
    check("Events", &serde_json::to_string(&events.items)?, &needles)?;
    let records = Api::<PeerPod>::namespaced(s.admin.clone(), &env.ns)
        .list(&Default::default())
        .await?;
    check(
        "PeerPods",
        &serde_json::to_string(&records.items)?,
        &needles,
    )?;
    let node = Api::<Node>::all(s.admin.clone()).get(&s.node).await?;
    check("the node", &serde_json::to_string(&node)?, &needles)?;
    Ok(())
}
