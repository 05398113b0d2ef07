//! The two peers of the shim: CAA's remote hypervisor API (a new connection per call, as
//! kata's `remote.go` dials it) and the kata agent API in the pod VM (one long-lived
//! connection to the socket CreateVM returned, every call multiplexed on it).
//!
//! The agent connection is made by [`AgentClient::connect`] from any byte stream: today the
//! unix socket CAA relays, later (restart safety) a direct mTLS connection to the VM's
//! forwarder needs no other change here.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use super::Error;
use super::config::Config;
use crate::api::names::annotations;
use crate::protocol::hypervisor_ttrpc;
use crate::protocol::{agent, agent_ttrpc, health, health_ttrpc, hypervisor};

/// A ttrpc context with `timeout` (zero: no deadline, for long polls).
pub(crate) fn ctx(timeout: Duration) -> ttrpc::context::Context {
    let mut c = ttrpc::context::with_timeout(timeout.as_nanos() as i64);
    if timeout.is_zero() {
        c.timeout_nano = 0;
    }
    c
}

async fn hypervisor(
    socket: &Path,
    call: &'static str,
) -> Result<hypervisor_ttrpc::HypervisorClient, Error> {
    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
        .await
        .map_err(|e| Error::Hypervisor {
            call,
            socket: socket.display().to_string(),
            detail: format!("connecting: {e}"),
        })?;
    Ok(hypervisor_ttrpc::HypervisorClient::new(c))
}

fn hv_err(call: &'static str, socket: &Path) -> impl Fn(ttrpc::Error) -> Error + use<> {
    let socket = socket.display().to_string();
    move |e| Error::Hypervisor {
        call,
        socket: socket.clone(),
        detail: match e {
            ttrpc::Error::RpcStatus(s) => format!("{:?}: {}", s.code(), s.message),
            e => e.to_string(),
        },
    }
}

/// The annotations kata's shim sends in CreateVM: always these nine keys; a pod's
/// `io.katacontainers.config.hypervisor.*` value only where the configuration enables it,
/// else `"0"` for numbers and `""` for the rest.
pub(crate) fn create_vm_annotations(
    spec_annotations: &HashMap<String, String>,
    config: &Config,
) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for key in [annotations::SANDBOX_NAME, annotations::SANDBOX_NAMESPACE] {
        out.insert(
            key.to_string(),
            spec_annotations.get(key).cloned().unwrap_or_default(),
        );
    }
    for (key, unset) in [
        (annotations::MACHINE_TYPE, ""),
        (annotations::IMAGE, ""),
        (annotations::DEFAULT_VCPUS, "0"),
        (annotations::DEFAULT_MEMORY, "0"),
        (annotations::CC_INIT_DATA, ""),
        (annotations::DEFAULT_GPUS, "0"),
        (annotations::DEFAULT_GPU_MODEL, ""),
    ] {
        let short = key.rsplit('.').next().unwrap_or(key);
        // kata's Rust runtime spells the GPU model `gpu_model` in enable_annotations.
        let enabled = config.annotation_enabled(short)
            || (short == "default_gpu_model" && config.annotation_enabled("gpu_model"));
        let v = spec_annotations
            .get(key)
            .filter(|v| enabled && !v.is_empty())
            .cloned()
            .unwrap_or_else(|| unset.to_string());
        out.insert(key.to_string(), v);
    }
    out
}

/// `CreateVM`: the agent socket CAA serves for the VM.
pub(crate) async fn create_vm(
    socket: &Path,
    id: &str,
    annotations: HashMap<String, String>,
    netns: &str,
    timeout: Duration,
) -> Result<String, Error> {
    let c = hypervisor(socket, "CreateVM").await?;
    let mut req = hypervisor::CreateVMRequest::new();
    req.id = id.to_string();
    req.annotations = annotations;
    req.networkNamespacePath = netns.to_string();
    let r = c
        .create_vm(ctx(timeout), &req)
        .await
        .map_err(hv_err("CreateVM", socket))?;
    // kata prefixes `remote://` and splits on `:`: a plain absolute path is what works.
    if !r.agentSocketPath.starts_with('/') {
        return Err(Error::Hypervisor {
            call: "CreateVM",
            socket: socket.display().to_string(),
            detail: format!(
                "agent socket {:?} is not an absolute path",
                r.agentSocketPath
            ),
        });
    }
    Ok(r.agentSocketPath)
}

/// `StartVM` (may take minutes: a cloud VM boots and CAA waits for its agent).
pub(crate) async fn start_vm(socket: &Path, id: &str, timeout: Duration) -> Result<(), Error> {
    let c = hypervisor(socket, "StartVM").await?;
    let mut req = hypervisor::StartVMRequest::new();
    req.id = id.to_string();
    c.start_vm(ctx(timeout), &req)
        .await
        .map_err(hv_err("StartVM", socket))?;
    Ok(())
}

/// `StopVM`: CAA deletes the VM.
pub(crate) async fn stop_vm(socket: &Path, id: &str, timeout: Duration) -> Result<(), Error> {
    let c = hypervisor(socket, "StopVM").await?;
    let mut req = hypervisor::StopVMRequest::new();
    req.id = id.to_string();
    c.stop_vm(ctx(timeout), &req)
        .await
        .map_err(hv_err("StopVM", socket))?;
    Ok(())
}

/// The agent API over one connection.
#[derive(Clone)]
pub(crate) struct AgentClient {
    agent: agent_ttrpc::AgentServiceClient,
    health: health_ttrpc::HealthClient,
}

fn agent_err(call: &'static str) -> impl Fn(ttrpc::Error) -> Error {
    move |e| match e {
        ttrpc::Error::RpcStatus(s) => Error::Agent {
            call,
            code: Some(s.code()),
            detail: s.message,
        },
        e => Error::Agent {
            call,
            code: None,
            detail: e.to_string(),
        },
    }
}

impl AgentClient {
    /// Over an established ttrpc client.
    pub(crate) fn new(c: ttrpc::r#async::Client) -> Self {
        Self {
            agent: agent_ttrpc::AgentServiceClient::new(c.clone()),
            health: health_ttrpc::HealthClient::new(c),
        }
    }

    /// Dials the unix socket CAA returned and waits until the agent answers its health
    /// check (every 500 ms, for at most `dial_timeout`), as kata's shim checks it.
    pub(crate) async fn connect(socket: &str, dial_timeout: Duration) -> Result<Self, Error> {
        let deadline = Instant::now() + dial_timeout;
        loop {
            let last = match ttrpc::r#async::Client::connect(&format!("unix://{socket}")).await {
                Ok(c) => {
                    let a = Self::new(c);
                    match a.check(Duration::from_secs(5)).await {
                        Ok(()) => return Ok(a),
                        Err(e) => e.to_string(),
                    }
                }
                Err(e) => format!("connecting to {socket}: {e}"),
            };
            if Instant::now() > deadline {
                return Err(Error::Agent {
                    call: "Check",
                    code: None,
                    detail: format!("the agent did not answer within {dial_timeout:?}: {last}"),
                });
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// `grpc.Health/Check`.
    pub(crate) async fn check(&self, timeout: Duration) -> Result<(), Error> {
        let r = self
            .health
            .check(ctx(timeout), &health::CheckRequest::new())
            .await
            .map_err(agent_err("Check"))?;
        if r.status.value() != crate::protocol::health_wire::SERVING as i32 {
            return Err(Error::Agent {
                call: "Check",
                code: None,
                detail: format!("agent status {:?}", r.status),
            });
        }
        Ok(())
    }

    /// The generated client of `grpc.AgentService`.
    pub(crate) fn api(&self) -> &agent_ttrpc::AgentServiceClient {
        &self.agent
    }
}

/// Maps a ttrpc error of agent method `call`.
pub(crate) fn agent_error(call: &'static str) -> impl Fn(ttrpc::Error) -> Error {
    agent_err(call)
}

/// `GetGuestDetails` as kata asks it.
pub(crate) fn guest_details_request() -> agent::GuestDetailsRequest {
    agent::GuestDetailsRequest {
        mem_block_size: true,
        mem_hotplug_probe: true,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn create_vm_carries_nine_annotations_enabled_ones_from_the_pod() {
        let config = Config {
            enable_annotations: vec!["default_vcpus".into(), "machine_type".into()],
            ..Config::default()
        };
        let mut pod = HashMap::new();
        pod.insert(annotations::SANDBOX_NAME.to_string(), "web".to_string());
        pod.insert(
            annotations::SANDBOX_NAMESPACE.to_string(),
            "team".to_string(),
        );
        pod.insert(annotations::DEFAULT_VCPUS.to_string(), "2".to_string());
        pod.insert(annotations::DEFAULT_MEMORY.to_string(), "4096".to_string());
        pod.insert(
            annotations::MACHINE_TYPE.to_string(),
            "Standard_D2as_v5".to_string(),
        );
        let a = create_vm_annotations(&pod, &config);
        assert_eq!(a.len(), 9);
        assert_eq!(a[annotations::SANDBOX_NAME], "web");
        assert_eq!(a[annotations::SANDBOX_NAMESPACE], "team");
        assert_eq!(a[annotations::DEFAULT_VCPUS], "2");
        assert_eq!(a[annotations::MACHINE_TYPE], "Standard_D2as_v5");
        // Not enabled: the unset value.
        assert_eq!(a[annotations::DEFAULT_MEMORY], "0");
        assert_eq!(a[annotations::DEFAULT_GPUS], "0");
        assert_eq!(a[annotations::IMAGE], "");
        assert_eq!(a[annotations::CC_INIT_DATA], "");
        assert_eq!(a[annotations::DEFAULT_GPU_MODEL], "");
    }
}
