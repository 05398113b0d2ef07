//! End to end as root, with the CAA the operator deploys: the operator (in-process, under
//! its ServiceAccount) creates the CAA DaemonSet in the real control plane, the DaemonSet
//! controller and the scheduler place its Pod on a fake node, and the harness runs that
//! Pod's container as the kubelet would (environment with the downward API resolved from
//! the Pod, envFrom the Secret and ConfigMap, mounts, user; see `harness::pod_launch`). The
//! node's network is a namespace with a bridge; pod namespaces are made the way a CNI plugin
//! makes them, under the node's `/run/netns`. A hypervisor client does CreateVM/StartVM/StopVM
//! as the kata shim does; the pod VMs are the local provider's (`CLOUD_PROVIDER=local` in the
//! ConfigMap) or the ARM test server's; the test agent answers inside each VM.

use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams, PostParams};
use sandboxd::api::names::annotations;
use sandboxd::api::names::{CAA_DAEMONSET, RELAY_DAEMONSET};
use sandboxd::api::peerpod::{PeerPod, PeerPodStatus};
use sandboxd::cloud::net::{self, Netlink};
use sandboxd::protocol::{hypervisor, hypervisor_ttrpc};
use serde_json::json;

use crate::harness::pod_launch::{self, Container, ImageConfig, Launch, NodeHost};
use crate::harness::process::Process;
use crate::harness::{self, Case, Env};
use crate::peerpods::support::Fixture;

mod restarts;

fn root_skip() -> Option<String> {
    (!nix::unistd::Uid::effective().is_root()).then(|| "needs root".to_string())
}

pub fn cases() -> Vec<Case> {
    let mut v = restarts::cases();
    v.extend([
        Case::cluster_exclusive(
            "datapath::a_local_pod_vm_relays_agent_calls_and_carries_pod_traffic_then_leaves_nothing",
            lifecycle,
        )
        .skip_if(root_skip()),
        Case::cluster_exclusive(
            "datapath::through_caas_relay_sandboxd_agent_in_a_local_pod_vm_runs_containers_in_the_pod_network",
            agent_through_relay,
        )
        .skip_if(root_skip().or_else(crate::agent::host::skip_reason)),
        Case::cluster_exclusive(
            "datapath::two_local_pod_vms_at_once_each_answer_on_their_own_pod_ip_and_agent",
            two_vms,
        )
        .skip_if(root_skip()),
        Case::cluster_exclusive(
            "datapath::relay_and_tunnel_survive_a_caa_restart_and_stopvm_still_cleans_up",
            restart,
        )
        .skip_if(root_skip()),
        Case::cluster_exclusive(
            "datapath::a_forwarder_that_never_answers_fails_startvm_after_proxy_timeout_and_deletes_the_vm",
            silent_forwarder,
        )
        .skip_if(root_skip()),
        Case::cluster_exclusive(
            "datapath::azure_vms_of_the_arm_test_server_are_local_pod_vms_reached_by_agent_and_vxlan",
            azure_local_vms,
        )
        .skip_if(root_skip()),
        Case::cluster_exclusive(
            "datapath::the_deployed_caa_serves_var_run_and_run_netns_paths_and_containerd_and_crio_sandbox_names",
            netns_and_runtime_forms,
        )
        .skip_if(root_skip()),
        Case::cluster_exclusive(
            "datapath::startvm_answers_only_once_the_kata_agent_answers_a_health_check_through_the_forwarder",
            readiness_agent,
        )
        .skip_if(root_skip()),
        Case::cluster_exclusive(
            "datapath::the_deployed_caa_refuses_to_start_when_the_node_ip_is_not_the_nodes",
            wrong_node_ip,
        )
        .skip_if(root_skip()),
    ]);
    v
}

/// Runs `f` on a thread inside the network namespace at `ns`.
fn in_netns<T: Send + 'static>(
    ns: &Path,
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> std::thread::JoinHandle<Result<T>> {
    let ns = ns.to_path_buf();
    std::thread::spawn(move || {
        let file = std::fs::File::open(&ns)?;
        nix::sched::setns(&file, nix::sched::CloneFlags::CLONE_NEWNET)?;
        f()
    })
}

/// The node's IP on its bridge.
const NODE_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

struct Net {
    /// The node's network namespace (host path; `/run/netns/node` on the node).
    node: PathBuf,
    /// Pod namespaces (host paths), pod `i` at 10.77.0.(2+i), `/run/netns/pod<i>` on the
    /// node.
    pods: Vec<PathBuf>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for p in &self.pods {
            net::remove_named_netns(p);
        }
        net::remove_named_netns(&self.node);
    }
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 2 + i as u8)
}

/// The node's `/run/netns` path of pod namespace `i`.
fn pod_netns(i: usize) -> String {
    format!("/run/netns/pod{i}")
}

/// Node namespace with bridge `br0` ([`NODE_IP`]/24) and `pods` pod namespaces, each with
/// eth0 on it (pod `i` at [`pod_ip`]), made the way a CNI bridge plugin makes them, all
/// under the node's `/run/netns`.
async fn network(host: &NodeHost, pods: usize) -> Result<Net> {
    let n = Net {
        node: host.path("/run/netns/node"),
        pods: (0..pods).map(|i| host.path(&pod_netns(i))).collect(),
    };
    net::create_named_netns(&n.node)?;
    let node = Netlink::in_netns(&n.node).await?;
    let lo = node.index_of("lo").await?.context("lo")?;
    node.up(lo).await?;
    node.handle
        .link()
        .add(rtnetlink::LinkBridge::new("br0").build())
        .execute()
        .await?;
    let br = node.index_of("br0").await?.context("br0")?;
    node.add_addr(br, NODE_IP, 24).await?;
    node.up(br).await?;
    for (i, path) in n.pods.iter().enumerate() {
        net::create_named_netns(path)?;
        let (host_end, peer_name) = (format!("vpod{i}"), format!("vpodp{i}"));
        let host_end = node.add_veth(&host_end, &peer_name).await?;
        node.handle
            .link()
            .set(
                rtnetlink::LinkUnspec::new_with_index(host_end)
                    .controller(br)
                    .build(),
            )
            .execute()
            .await?;
        node.up(host_end).await?;
        let peer = node.index_of(&peer_name).await?.context("peer")?;
        node.move_to(peer, &std::fs::File::open(path)?).await?;
        let pod = Netlink::in_netns(path).await?;
        let eth = pod.index_of(&peer_name).await?.context("pod end")?;
        let ip = pod_ip(i);
        pod.configure(
            eth,
            "eth0",
            1500,
            Some([0x0a, 0x58, 10, 77, 0, ip.octets()[3]]),
        )
        .await?;
        pod.add_addr(eth, ip, 24).await?;
        pod.up(eth).await?;
        let lo = pod.index_of("lo").await?.context("lo")?;
        pod.up(lo).await?;
        pod.add_route(Ipv4Addr::UNSPECIFIED, 0, Some(NODE_IP), eth)
            .await?;
    }
    Ok(n)
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}

const SSH_KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl peerpod";

/// The user's configuration for the local provider, plus `cm_extra`.
fn local_config(cm_extra: &[(&str, String)]) -> Vec<(String, String)> {
    let mut cm: Vec<(String, String)> = [
        ("CLOUD_PROVIDER", "local"),
        ("VXLAN_PORT", "9000"),
        ("PROXY_TIMEOUT", "30s"),
        ("LOCAL_VM_SUBNET", "10.250.0.0"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    for (k, v) in cm_extra {
        cm.retain(|(x, _)| x != k);
        cm.push((k.to_string(), v.clone()));
    }
    cm
}

/// The CAA the operator deploys, running on a fake node whose network is [`Net`], behind
/// the node agent relay the operator deploys beside it.
struct CaaProc {
    fx: Option<Fixture>,
    container: Option<Container>,
    launch: Launch,
    /// The CAA pod now running.
    pod: Pod,
    /// The node agent relay's container, its launch and pod.
    relay: Option<Container>,
    relay_launch: Launch,
    relay_pod: Pod,
    /// Host path of CAA's own hypervisor socket (behind the relay's).
    caa_socket: PathBuf,
    /// Host path of the node's network namespace.
    node_netns: PathBuf,
    name: String,
    /// Added to the container's environment: `SANDBOXD_NODE_NETNS` (the stand-in for
    /// `hostNetwork`: the node's network is a namespace here) and what a test adds.
    extra: Vec<(&'static str, String)>,
    /// Host paths of the hypervisor socket, the agent sockets' directory and the local
    /// provider's VM directory (all under the node's `/run/peerpod`).
    socket: PathBuf,
    pods_dir: PathBuf,
    local_dir: PathBuf,
    restarts: u32,
    relay_restarts: u32,
    // Dropped last: the node's file system.
    host: NodeHost,
}

/// The node, its host root and its network.
async fn node(env: &Env, fx: &mut Fixture, pods: usize, ip: Ipv4Addr) -> Result<(NodeHost, Net)> {
    let name = fx.node("dp", true).await?;
    let host = NodeHost::new(
        &name,
        &format!("h{}", &env.ns[env.ns.len() - 6..]),
        vec![IpAddr::V4(ip)],
    )?;
    host.report_addresses(&fx.admin).await?;
    let n = network(&host, pods).await?;
    Ok((host, n))
}

impl CaaProc {
    /// The operator's CAA with the user's ConfigMap `cm` on a node of `pods` pod namespaces
    /// whose kubelet reports `node_ip`. Returns it (not yet started when `start` is false)
    /// and the node's network.
    async fn deploy(
        env: &Env,
        cm: Vec<(String, String)>,
        extra: &[(&'static str, String)],
        pods: usize,
        node_ip: Ipv4Addr,
        start: bool,
    ) -> Result<(Self, Net)> {
        let mut fx = Fixture::start(env).await?;
        let r = Self::deploy_with(env, &mut fx, cm, extra, pods, node_ip, start).await;
        match r {
            Ok((mut c, n)) => {
                c.fx = Some(fx);
                Ok((c, n))
            }
            Err(e) => {
                let _ = fx.teardown().await;
                Err(e)
            }
        }
    }

    async fn deploy_with(
        env: &Env,
        fx: &mut Fixture,
        cm: Vec<(String, String)>,
        extra: &[(&'static str, String)],
        pods: usize,
        node_ip: Ipv4Addr,
        start: bool,
    ) -> Result<(Self, Net)> {
        let admin = fx.admin.clone();
        let crd = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/crds/peerpods.confidentialcontainers.org.yaml");
        harness::install_crds(&admin, &crd).await?;
        // The CAA's ServiceAccount and its RBAC as deployed (deploy/caa/rbac.yaml).
        crate::caa::caa_kubeconfig(env, &admin).await?;
        // Every ServiceAccount deploy/caa/rbac.yaml ships (the node agent relay's too).
        let text = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/caa/rbac.yaml"),
        )?;
        let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)?;
        let sas: Api<k8s_openapi::api::core::v1::ServiceAccount> =
            Api::namespaced(admin.clone(), &env.ns);
        for doc in docs.iter().filter(|d| d["kind"] == "ServiceAccount") {
            let mut sa: k8s_openapi::api::core::v1::ServiceAccount =
                serde_json::from_value(doc.clone())?;
            sa.metadata.namespace = Some(env.ns.clone());
            let _ = sas.create(&PostParams::default(), &sa).await;
        }
        let (host, n) = node(env, fx, pods, node_ip).await?;
        let ssa = PatchParams::apply("sandboxd-test").force();
        let secret = |name: &str, data: &[(&str, &str)]| -> Secret {
            Secret {
                metadata: kube::api::ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                data: Some(
                    data.iter()
                        .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                        .collect(),
                ),
                ..Default::default()
            }
        };
        let secrets: Api<Secret> = Api::namespaced(admin.clone(), &env.ns);
        secrets
            .patch(
                "peer-pods-secret",
                &ssa,
                &Patch::Apply(&secret(
                    "peer-pods-secret",
                    &[
                        ("AZURE_CLIENT_ID", "0a1b2c3d-0000-4000-8000-00000000000c"),
                        ("AZURE_CLIENT_SECRET", "s3cret"),
                        ("AZURE_TENANT_ID", "0a1b2c3d-0000-4000-8000-00000000000e"),
                        (
                            "AZURE_SUBSCRIPTION_ID",
                            "00000000-0000-0000-0000-00000000d901",
                        ),
                    ],
                )),
            )
            .await?;
        secrets
            .patch(
                "ssh-key-secret",
                &ssa,
                &Patch::Apply(&secret("ssh-key-secret", &[("id_rsa.pub", SSH_KEY)])),
            )
            .await?;
        let cm_obj: ConfigMap = serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": "peer-pods-cm"},
            "data": cm.iter().cloned().collect::<std::collections::BTreeMap<_, _>>(),
        }))?;
        Api::<ConfigMap>::namespaced(admin.clone(), &env.ns)
            .patch("peer-pods-cm", &ssa, &Patch::Apply(&cm_obj))
            .await?;
        fx.enable().await?;
        fx.wait_ppc().await?;
        fx.select_mine("10").await?;
        let dss: Api<DaemonSet> = Api::namespaced(admin.clone(), &env.ns);
        let ds = harness::eventually(
            "the operator's CAA DaemonSet",
            Duration::from_secs(60),
            || {
                let dss = dss.clone();
                async move { Ok(dss.get_opt(CAA_DAEMONSET).await?) }
            },
        )
        .await?;
        let (pod, launch) = run_daemonset_pod(env, &admin, &ds, &host).await?;
        let relay_ds = dss
            .get_opt(RELAY_DAEMONSET)
            .await?
            .context("the operator deployed no node agent relay beside CAA")?;
        let (relay_pod, relay_launch) = run_daemonset_pod(env, &admin, &relay_ds, &host).await?;
        ensure!(
            relay_launch.host_network,
            "the relay pod is not on the host's network"
        );
        ensure!(
            launch.host_network,
            "the CAA pod is not on the host's network"
        );
        let path = |p: &str| {
            launch
                .host_path(p)
                .with_context(|| format!("{p} is not mounted from the node"))
        };
        let mut extra_env: Vec<(&'static str, String)> =
            vec![("SANDBOXD_NODE_NETNS", "/run/netns/node".into())];
        extra_env.extend(extra.iter().cloned());
        let caa_socket = path(launch.var("CAA_SOCKET").context("CAA_SOCKET")?)?;
        let mut c = Self {
            fx: None,
            container: None,
            pod,
            relay: None,
            relay_launch,
            relay_pod,
            caa_socket,
            node_netns: n.node.clone(),
            name: format!("dp-caa-{}", env.ns),
            extra: extra_env,
            socket: path("/run/peerpod/hypervisor.sock")?,
            pods_dir: path("/run/peerpod/pods")?,
            local_dir: path(sandboxd::cloud::local::DEFAULT_DIR)?,
            restarts: 0,
            relay_restarts: 0,
            launch,
            host,
        };
        if start {
            c.spawn().await?;
        }
        Ok((c, n))
    }

    /// Starts the container: the image's binary is the shipped static one when the run has
    /// it (`SANDBOXD_STATIC_BINARY`, as `make integration` sets), else this build's.
    fn start_container(&mut self) -> Result<()> {
        let name = format!("{}-{}", self.name, self.restarts);
        let binary = image_binary();
        self.container = Some(Container::start(&name, &self.launch, &binary, &self.extra)?);
        Ok(())
    }

    /// Starts the relay (when it is not running) and CAA, and waits for CAA's own socket.
    async fn spawn(&mut self) -> Result<()> {
        if self.relay.is_none() {
            self.spawn_relay()?;
        }
        self.start_container()?;
        let socket = self.caa_socket.clone();
        let r = harness::eventually("CAA socket", Duration::from_secs(60), || {
            let socket = socket.clone();
            async move {
                Ok(tokio::net::UnixStream::connect(&socket)
                    .await
                    .ok()
                    .map(|_| ()))
            }
        })
        .await;
        r.map_err(|e| anyhow::anyhow!("{e:#}\nCAA log:\n{}", self.log_tail(30)))
    }

    /// Starts the node agent relay's container (hostNetwork: in the node's network
    /// namespace).
    fn spawn_relay(&mut self) -> Result<()> {
        self.relay_restarts += 1;
        self.relay = Some(Container::start_in(
            &format!("{}-relay-{}", self.name, self.relay_restarts),
            &self.relay_launch,
            &image_binary(),
            &[],
            Some(&self.node_netns),
        )?);
        Ok(())
    }

    fn log_tail(&self, n: usize) -> String {
        let caa = self
            .container
            .as_ref()
            .map(|c| c.process.log_tail(n))
            .unwrap_or_default();
        let relay = self
            .relay
            .as_ref()
            .map(|c| c.process.log_tail(n / 2))
            .unwrap_or_default();
        format!("{caa}\nnode agent relay log:\n{relay}")
    }

    /// Kills CAA without a chance to clean up, then starts it again.
    async fn crash_and_restart(&mut self) -> Result<()> {
        if let Some(mut c) = self.container.take() {
            c.process.signal(nix::sys::signal::Signal::SIGKILL);
            c.process.stop(Duration::from_secs(5));
        }
        self.restarts += 1;
        self.spawn().await
    }

    async fn hypervisor(&self) -> Result<hypervisor_ttrpc::HypervisorClient> {
        let c =
            ttrpc::r#async::Client::connect(&format!("unix://{}", self.socket.display())).await?;
        Ok(hypervisor_ttrpc::HypervisorClient::new(c))
    }

    /// Stops CAA and the operator and removes what the test made in the cluster. Local pod
    /// VMs outlive CAA by design (as cloud VMs do); those a failed test left are killed.
    async fn teardown(mut self) -> Result<()> {
        if let Some(mut c) = self.container.take() {
            c.process.stop(Duration::from_secs(5));
        }
        if let Some(mut c) = self.relay.take() {
            c.process.stop(Duration::from_secs(5));
        }
        for e in std::fs::read_dir(&self.local_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            let Ok(text) = std::fs::read_to_string(e.path().join("vm.json")) else {
                continue;
            };
            let Ok(vm) = serde_json::from_str::<sandboxd::cloud::local::LocalVm>(&text) else {
                continue;
            };
            if sandboxd::cloud::local::start_time(vm.pid) == Some(vm.start_time) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(vm.pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
        match self.fx.take() {
            Some(fx) => fx.teardown().await,
            None => Ok(()),
        }
    }
}

/// The image's entrypoint binary: the shipped static one when the run has it
/// (`SANDBOXD_STATIC_BINARY`, as `make integration` sets), else this build's.
fn image_binary() -> PathBuf {
    std::env::var_os("SANDBOXD_STATIC_BINARY")
        .map(PathBuf::from)
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sandboxd")))
}

/// As the kubelet: the DaemonSet's pod on `host` runs; its container's launch resolved
/// from the pod (environment, mounts, user).
async fn run_daemonset_pod(
    env: &Env,
    admin: &kube::Client,
    ds: &DaemonSet,
    host: &NodeHost,
) -> Result<(Pod, Launch)> {
    let pod = pod_launch::daemonset_pod(admin, ds, &host.name).await?;
    let pod = host.run_pod(admin, &pod).await?;
    let container = pod
        .spec
        .as_ref()
        .map(|s| s.containers[0].name.clone())
        .context("the pod's container")?;
    let launch = pod_launch::resolve(
        admin,
        env.cp(),
        &pod,
        &container,
        host,
        &ImageConfig::shipped()?,
    )
    .await?;
    Ok((pod, launch))
}

/// One peer pod: its pod object, sandbox id and VM.
struct PodVm {
    name: String,
    id: String,
    vm_name: String,
    agent_socket: PathBuf,
    vm_dir: PathBuf,
}

impl PodVm {
    fn pid(&self) -> Result<i32> {
        let rec: serde_json::Value =
            serde_json::from_slice(&std::fs::read(self.vm_dir.join("vm.json"))?)?;
        Ok(rec["pid"].as_i64().context("pid")? as i32)
    }
}

/// The pod object a sandbox belongs to.
async fn make_pod(env: &Env, name: &str) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(env.admin().await?, &env.ns);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))?;
    Ok(pods.create(&PostParams::default(), &pod).await?)
}

/// Creates the pod object and does CreateVM (containerd's plain sandbox name) with `netns`
/// as the node names it; StartVM is left to the caller.
async fn create_vm(
    env: &Env,
    caa: &CaaProc,
    hv: &hypervisor_ttrpc::HypervisorClient,
    name: &str,
    id: &str,
    netns: &str,
) -> Result<PodVm> {
    make_pod(env, name).await?;
    create_vm_named(env, caa, hv, name, name, id, netns).await
}

/// CreateVM with `sandbox_name` as the shim sends it for pod `name`.
async fn create_vm_named(
    env: &Env,
    caa: &CaaProc,
    hv: &hypervisor_ttrpc::HypervisorClient,
    name: &str,
    sandbox_name: &str,
    id: &str,
    netns: &str,
) -> Result<PodVm> {
    let mut req = hypervisor::CreateVMRequest::new();
    req.id = id.to_string();
    req.annotations
        .insert(annotations::SANDBOX_NAME.into(), sandbox_name.into());
    req.annotations
        .insert(annotations::SANDBOX_NAMESPACE.into(), env.ns.clone());
    req.networkNamespacePath = netns.to_string();
    let created = hv.create_vm(ctx(), &req).await?;
    // The shim connects to the path CAA answers, on the node.
    let agent_socket = caa
        .launch
        .host_path(&created.agentSocketPath)
        .context("the agent socket is not on a node path")?;
    ensure!(agent_socket == caa.pods_dir.join(id).join("agent.ttrpc"));
    let vm_name = sandboxd::cloud::vm_name(name, id);
    Ok(PodVm {
        name: name.to_string(),
        id: id.to_string(),
        vm_dir: caa.local_dir.join(&vm_name),
        vm_name,
        agent_socket,
    })
}

/// The test agent, started inside the VM at `vm_dir` as soon as the VM exists (after
/// `delay`): readiness `agent` waits for it. Returns it with when it started answering.
fn agent_in_vm(
    vm_dir: &Path,
    delay: Duration,
) -> tokio::task::JoinHandle<Result<(ttrpc::r#async::Server, super::agent::Log, Instant)>> {
    let dir = vm_dir.to_path_buf();
    tokio::spawn(async move {
        harness::eventually("the VM", Duration::from_secs(60), || {
            let rec = dir.join("vm.json");
            async move { Ok(rec.exists().then_some(())) }
        })
        .await?;
        tokio::time::sleep(delay).await;
        let (server, log) =
            super::agent::start(&dir.join("run/kata-containers/agent.sock")).await?;
        Ok((server, log, Instant::now()))
    })
}

/// StartVM with the test agent coming up inside the VM; the agent and its log.
async fn start_with_agent(
    hv: &hypervisor_ttrpc::HypervisorClient,
    vm: &PodVm,
) -> Result<(ttrpc::r#async::Server, super::agent::Log)> {
    let agent = agent_in_vm(&vm.vm_dir, Duration::ZERO);
    if let Err(e) = start_vm(hv, &vm.id).await {
        agent.abort();
        return Err(e);
    }
    let (server, log, _) = agent.await??;
    Ok((server, log))
}

/// StartVM of `vm` with `sandboxd agent` started inside it (as `name`) as soon as the VM's
/// process is recorded: with readiness `agent`, StartVM answers only once the agent does.
async fn start_vm_with_agent(
    hv: &hypervisor_ttrpc::HypervisorClient,
    vm: &PodVm,
    name: &'static str,
) -> Result<crate::agent::host::HostAgent> {
    let dir = vm.vm_dir.clone();
    let starting = tokio::spawn(async move {
        let rec = dir.join(sandboxd::cloud::local::store::RECORD);
        harness::eventually("the VM", Duration::from_secs(60), || {
            let rec = rec.clone();
            async move { Ok(rec.exists().then_some(())) }
        })
        .await?;
        let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&rec)?)?;
        let pid = v["pid"].as_i64().context("pid")? as i32;
        crate::agent::host::HostAgent::start_in(
            name,
            &[],
            Some((pid, dir.join("run/kata-containers/agent.sock"))),
        )
        .await
    });
    if let Err(e) = start_vm(hv, &vm.id).await {
        starting.abort();
        return Err(e);
    }
    starting.await?
}

async fn start_vm(hv: &hypervisor_ttrpc::HypervisorClient, id: &str) -> Result<()> {
    let mut start = hypervisor::StartVMRequest::new();
    start.id = id.to_string();
    hv.start_vm(ctx(), &start)
        .await
        .context("StartVM with readiness agent")?;
    Ok(())
}

async fn stop_vm(hv: &hypervisor_ttrpc::HypervisorClient, id: &str) -> Result<()> {
    let mut stop = hypervisor::StopVMRequest::new();
    stop.id = id.to_string();
    hv.stop_vm(ctx(), &stop).await?;
    Ok(())
}

/// A TCP server inside the VM's podns on `ip:8080` answering `<tag>:<5 bytes read>`, and a
/// client on the node's bridge: checks the answer came through the tunnel.
async fn tcp_through_tunnel(n: &Net, pid: i32, ip: Ipv4Addr, tag: &'static str) -> Result<()> {
    let podns = PathBuf::from(format!("/proc/{pid}/root/run/netns/podns"));
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let server = in_netns(&podns, move || {
        let l = std::net::TcpListener::bind((ip, 8080))?;
        let _ = tx.send(());
        let (mut s, _) = l.accept()?;
        use std::io::{Read, Write};
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        s.write_all(&[tag.as_bytes(), b":", &buf].concat())?;
        Ok(())
    });
    tokio::task::spawn_blocking(move || rx.recv_timeout(Duration::from_secs(10)))
        .await?
        .map_err(|_| anyhow::anyhow!("the server in the VM did not start"))?;
    let client = in_netns(&n.node, move || {
        use std::io::{Read, Write};
        let mut s =
            std::net::TcpStream::connect_timeout(&(ip, 8080).into(), Duration::from_secs(10))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"hello")?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    });
    let got = tokio::task::spawn_blocking(move || client.join())
        .await?
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    let want = format!("{tag}:hello");
    ensure!(
        got == want.as_bytes(),
        "through the tunnel to {ip}: {:?}",
        String::from_utf8_lossy(&got)
    );
    let _ = tokio::task::spawn_blocking(move || server.join()).await?;
    Ok(())
}

/// Nothing of `vm` is left: process, directory, agent socket, PeerPod.
async fn assert_vm_gone(env: &Env, vm: &PodVm, pid: Option<i32>) -> Result<()> {
    if let Some(pid) = pid {
        ensure!(
            sandboxd::cloud::local::start_time(pid).is_none(),
            "forwarder of {} still runs",
            vm.name
        );
    }
    ensure!(!vm.vm_dir.exists(), "VM directory of {} left", vm.name);
    ensure!(
        !vm.agent_socket.exists(),
        "agent socket of {} left",
        vm.name
    );
    // StopVM answers once the VM is gone; its record is released right after.
    let api: Api<PeerPod> = Api::namespaced(env.admin().await?, &env.ns);
    let left = harness::eventually("PeerPod released", Duration::from_secs(10), || {
        let (api, name) = (api.clone(), vm.vm_name.clone());
        async move { Ok(api.get_opt(&name).await?.is_none().then_some(())) }
    })
    .await;
    ensure!(left.is_ok(), "PeerPod {} left", vm.vm_name);
    Ok(())
}

/// The record's status once it shows the VM IP (written just after StartVM answers).
async fn status_with_ip(admin: &kube::Client, ns: &str, vm: &str) -> Result<PeerPodStatus> {
    let api: Api<PeerPod> = Api::namespaced(admin.clone(), ns);
    harness::eventually("PeerPod shows the VM IP", Duration::from_secs(10), || {
        let (api, vm) = (api.clone(), vm.to_string());
        async move {
            let st = api.get(&vm).await?.status.unwrap_or_default();
            Ok(st.vm_ip.is_some().then_some(st))
        }
    })
    .await
}

/// No tunnel or VM link is left in the node or pod namespaces.
async fn assert_links_gone(n: &Net) -> Result<()> {
    let node = Netlink::in_netns(&n.node).await?;
    let names: Vec<String> = node
        .interfaces()
        .await?
        .into_iter()
        .map(|i| i.name)
        .collect();
    ensure!(
        !names.iter().any(|x| x.starts_with("sbx")),
        "node links left: {names:?}"
    );
    for p in &n.pods {
        let pod = Netlink::in_netns(p).await?;
        let names: Vec<String> = pod
            .interfaces()
            .await?
            .into_iter()
            .map(|i| i.name)
            .collect();
        ensure!(names.len() == 2, "pod links left: {names:?}");
    }
    Ok(())
}

/// Tears the deployed CAA down (also after a failure), adding CAA's log to an error; the
/// network goes first, the node's file system last.
async fn finish(caa: CaaProc, n: Net, r: Result<()>) -> Result<()> {
    let r = r.map_err(|e| anyhow::anyhow!("{e:#}\nCAA log:\n{}", caa.log_tail(40)));
    drop(n);
    let t = caa.teardown().await;
    r.and(t)
}

async fn lifecycle(env: Env) -> Result<()> {
    let (caa, n) = CaaProc::deploy(&env, local_config(&[]), &[], 1, NODE_IP, true).await?;
    let r = lifecycle_on(&env, &caa, &n).await;
    finish(caa, n, r).await
}

async fn lifecycle_on(env: &Env, caa: &CaaProc, n: &Net) -> Result<()> {
    let admin = env.admin().await?;
    let hv = caa.hypervisor().await?;
    let vm = create_vm(env, caa, &hv, "web", "0123abcd4567ef89", &pod_netns(0)).await?;
    let (_agent, log) = start_with_agent(&hv, &vm).await?;
    let pid = vm.pid()?;
    // The PeerPod records the VNI and the VM IP.
    let st = status_with_ip(&admin, &env.ns, &vm.vm_name).await?;
    ensure!(st.vni == Some(555000), "vni: {:?}", st.vni);
    ensure!(
        st.vm_ip.as_deref() == Some("10.250.0.2"),
        "ip {:?}",
        st.vm_ip
    );
    // The agent behind the forwarder got the readiness check, then the calls.
    super::check_agent_calls(&vm.agent_socket, &log).await?;
    tcp_through_tunnel(n, pid, pod_ip(0), "pong").await?;

    // StopVM leaves nothing behind.
    stop_vm(&hv, &vm.id).await?;
    assert_vm_gone(env, &vm, Some(pid)).await?;
    assert_links_gone(n).await
}

/// The peer-pod sequence through CAA's agent socket: CAA's relay, mutual TLS, the forwarder
/// (which rewrites CreateContainer into the pod network namespace) and `sandboxd agent`
/// running inside the local pod VM's namespaces; a container answers on the pod IP.
async fn agent_through_relay(env: Env) -> Result<()> {
    let (caa, n) = CaaProc::deploy(&env, local_config(&[]), &[], 1, NODE_IP, true).await?;
    let r = agent_through_relay_on(&env, &caa, &n).await;
    finish(caa, n, r).await
}

async fn agent_through_relay_on(env: &Env, caa: &CaaProc, n: &Net) -> Result<()> {
    use crate::agent::host::busybox_rootfs;
    use crate::agent::sequence::{self, Rootfs, Setup};
    let hv = caa.hypervisor().await?;
    let vm = create_vm(env, caa, &hv, "app", "a1b2c3d4e5f60718", &pod_netns(0)).await?;
    // Readiness `agent`: StartVM answers once the agent in the VM does, so `sandboxd agent`
    // starts inside the VM as soon as the VM exists.
    let agent = start_vm_with_agent(&hv, &vm, "dp-agent").await?;
    let pid = vm.pid()?;
    let rootfs = agent.root.join("busybox-rootfs");
    busybox_rootfs(&rootfs)?;
    let setup = Setup {
        base: agent.root.join("kata").display().to_string(),
        rootfs: Rootfs::Path(rootfs.display().to_string()),
        cgroup_prefix: agent.cgroup_prefix.clone(),
        oom: false,
        pause: crate::agent::host::agent_binary().1,
    };
    let relay = vm.agent_socket.clone();
    let connect = || {
        let s = relay.clone();
        async move { Ok(tokio::net::UnixStream::connect(&s).await?) }
    };
    if let Err(e) = sequence::run(&setup, connect).await {
        anyhow::bail!("{e:#}\nagent log:\n{}", agent.process.log_tail(40));
    }
    // A container in the pod network namespace answers on the pod IP from the node.
    {
        use protobuf::well_known_types::empty::Empty;
        use sandboxd::protocol::agent::*;
        let mut w = crate::agent::client::Wire::new(connect().await?);
        let _: Empty = w
            .ok(
                "/grpc.AgentService/CreateSandbox",
                &CreateSandboxRequest {
                    sandbox_id: "web".into(),
                    ..Default::default()
                },
            )
            .await?;
        let spec = sequence::spec(
            &setup,
            "web",
            &[
                "sh",
                "-c",
                "while true; do echo served-by-container | nc -l -p 8080; done",
            ],
            false,
        );
        let _: Empty = w
            .ok(
                "/grpc.AgentService/CreateContainer",
                &sequence::create_request(&setup, "web", spec, false),
            )
            .await?;
        let _: Empty = w
            .ok(
                "/grpc.AgentService/StartContainer",
                &StartContainerRequest {
                    container_id: "web".into(),
                    ..Default::default()
                },
            )
            .await?;
        let node = n.node.clone();
        let ip = pod_ip(0);
        let got = in_netns(&node, move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                use std::io::Read;
                if let Ok(mut c) =
                    std::net::TcpStream::connect_timeout(&(ip, 8080).into(), Duration::from_secs(2))
                {
                    c.set_read_timeout(Some(Duration::from_secs(5)))?;
                    let mut buf = [0u8; 64];
                    if let Ok(k) = c.read(&mut buf)
                        && k > 0
                    {
                        return Ok(String::from_utf8_lossy(&buf[..k]).into_owned());
                    }
                }
                if std::time::Instant::now() > deadline {
                    anyhow::bail!("nothing answered on {ip}:8080");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the client thread panicked"))??;
        ensure!(
            got.trim() == "served-by-container",
            "answer from the pod IP: {got:?}"
        );
        let _: Empty = w
            .ok(
                "/grpc.AgentService/DestroySandbox",
                &DestroySandboxRequest::new(),
            )
            .await?;
    }
    let left = agent.leftovers();
    ensure!(left.is_empty(), "left behind in the VM: {left:?}");
    drop(agent);
    stop_vm(&hv, &vm.id).await?;
    assert_vm_gone(env, &vm, Some(pid)).await
}

async fn two_vms(env: Env) -> Result<()> {
    let (caa, n) = CaaProc::deploy(&env, local_config(&[]), &[], 2, NODE_IP, true).await?;
    let r = two_vms_on(&env, &caa, &n).await;
    finish(caa, n, r).await
}

async fn two_vms_on(env: &Env, caa: &CaaProc, n: &Net) -> Result<()> {
    let admin = env.admin().await?;
    let hv = caa.hypervisor().await?;
    let a = create_vm(env, caa, &hv, "web", "aaaa0000aaaa0000", &pod_netns(0)).await?;
    let b = create_vm(env, caa, &hv, "db", "bbbb1111bbbb1111", &pod_netns(1)).await?;
    // Both start at once.
    let (ra, rb) = tokio::join!(start_with_agent(&hv, &a), start_with_agent(&hv, &b));
    let (_agent_a, log_a) = ra?;
    let (_agent_b, log_b) = rb?;
    let (pa, pb) = (a.pid()?, b.pid()?);
    let (sa, sb) = (
        status_with_ip(&admin, &env.ns, &a.vm_name).await?,
        status_with_ip(&admin, &env.ns, &b.vm_name).await?,
    );
    ensure!(
        sa.vni.is_some() && sb.vni.is_some() && sa.vni != sb.vni,
        "VNIs {:?} {:?}",
        sa.vni,
        sb.vni
    );
    ensure!(
        sa.vm_ip.is_some() && sa.vm_ip != sb.vm_ip,
        "VM IPs {:?} {:?}",
        sa.vm_ip,
        sb.vm_ip
    );
    log_a.lock().unwrap().clear();
    log_b.lock().unwrap().clear();
    // Calls through each agent socket arrive at that VM's agent only.
    super::check_agent_calls(&a.agent_socket, &log_a).await?;
    ensure!(
        log_b.lock().unwrap().is_empty(),
        "calls for VM a reached the agent of VM b"
    );
    let seen_a = log_a.lock().unwrap().len();
    super::check_agent_calls(&b.agent_socket, &log_b).await?;
    ensure!(
        log_a.lock().unwrap().len() == seen_a,
        "calls for VM b reached the agent of VM a"
    );
    // Each pod IP answers from its own VM.
    tcp_through_tunnel(n, pa, pod_ip(0), "web").await?;
    tcp_through_tunnel(n, pb, pod_ip(1), "db").await?;
    // Stopping one leaves the other working.
    stop_vm(&hv, &a.id).await?;
    assert_vm_gone(env, &a, Some(pa)).await?;
    log_b.lock().unwrap().clear();
    super::check_agent_calls(&b.agent_socket, &log_b).await?;
    tcp_through_tunnel(n, pb, pod_ip(1), "db").await?;
    stop_vm(&hv, &b.id).await?;
    assert_vm_gone(env, &b, Some(pb)).await?;
    assert_links_gone(n).await
}

async fn restart(env: Env) -> Result<()> {
    let (mut caa, n) = CaaProc::deploy(&env, local_config(&[]), &[], 1, NODE_IP, true).await?;
    let r = restart_on(&env, &mut caa, &n).await;
    finish(caa, n, r).await
}

async fn restart_on(env: &Env, caa: &mut CaaProc, n: &Net) -> Result<()> {
    let hv = caa.hypervisor().await?;
    let vm = create_vm(env, caa, &hv, "web", "c0ffee00c0ffee00", &pod_netns(0)).await?;
    let (_agent, log) = start_with_agent(&hv, &vm).await?;
    let pid = vm.pid()?;
    log.lock().unwrap().clear();
    super::check_agent_calls(&vm.agent_socket, &log).await?;

    // Under the deployed RBAC the certificates survive the restart through the Secret.
    let secrets: Api<Secret> = Api::namespaced(env.admin().await?, &env.ns);
    let tls = secrets
        .get_opt("peerpod-caa-tls")
        .await?
        .context("CAA did not create its TLS Secret under its ServiceAccount")?;
    caa.crash_and_restart().await?;
    ensure!(
        sandboxd::cloud::local::start_time(pid).is_some(),
        "the VM died with CAA"
    );
    // The new CAA serves the agent socket again, with the same certificates.
    let sock = vm.agent_socket.clone();
    harness::eventually("agent socket served again", Duration::from_secs(30), || {
        let sock = sock.clone();
        async move {
            Ok(tokio::net::UnixStream::connect(&sock)
                .await
                .ok()
                .map(|_| ()))
        }
    })
    .await?;
    log.lock().unwrap().clear();
    super::check_agent_calls(&vm.agent_socket, &log).await?;
    tcp_through_tunnel(n, pid, pod_ip(0), "pong").await?;

    let kept = secrets.get("peerpod-caa-tls").await?;
    ensure!(
        kept.metadata.uid == tls.metadata.uid && kept.data == tls.data,
        "the TLS Secret changed across the restart"
    );
    let hv = caa.hypervisor().await?;
    stop_vm(&hv, &vm.id).await?;
    assert_vm_gone(env, &vm, Some(pid)).await?;
    assert_links_gone(n).await
}

/// Where the silent forwarder lives on the node (and in the CAA container).
const SILENT_FORWARDER: &str = "/run/peerpod/silent-forwarder";

async fn silent_forwarder(env: Env) -> Result<()> {
    let cm = local_config(&[
        ("PROXY_TIMEOUT", "3s".into()),
        ("LOCAL_VM_FORWARDER", SILENT_FORWARDER.into()),
    ]);
    let (mut caa, n) = CaaProc::deploy(&env, cm, &[], 1, NODE_IP, false).await?;
    let r = silent_forwarder_on(&env, &mut caa, &n).await;
    finish(caa, n, r).await
}

async fn silent_forwarder_on(env: &Env, caa: &mut CaaProc, n: &Net) -> Result<()> {
    // A "forwarder" that takes its own network namespace (so the VM gets its link and
    // address) and then never listens.
    let exe = caa.host.path(SILENT_FORWARDER);
    // A unique argument, to find the process again.
    let nap = format!(
        "600.{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    std::fs::write(
        &exe,
        format!("#!/bin/sh\nexec /usr/bin/unshare --net /usr/bin/sleep {nap}\n"),
    )?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))?;
    }
    caa.spawn().await?;
    let timeout = Duration::from_secs(3);
    let hv = caa.hypervisor().await?;
    let vm = create_vm(env, caa, &hv, "web", "dead0000beef0000", &pod_netns(0)).await?;
    let t0 = Instant::now();
    let e = start_vm(&hv, &vm.id)
        .await
        .err()
        .context("StartVM succeeded without a forwarder")?;
    let took = t0.elapsed();
    let msg = format!("{e:#}");
    ensure!(
        msg.contains("not reachable within"),
        "StartVM error does not say the forwarder was unreachable: {msg}"
    );
    ensure!(
        took >= timeout && took < timeout + Duration::from_secs(15),
        "StartVM failed after {took:?}, PROXY_TIMEOUT is {timeout:?}"
    );
    // The VM is deleted at once; the PeerPod stays, Failed, until StopVM.
    ensure!(!vm.vm_dir.exists(), "the VM was not deleted");
    let pp: PeerPod = Api::namespaced(env.admin().await?, &env.ns)
        .get(&vm.vm_name)
        .await?;
    let st = pp.status.unwrap_or_default();
    ensure!(
        st.phase.as_deref() == Some("Failed")
            && st
                .message
                .as_deref()
                .is_some_and(|m| m.contains("not reachable within")),
        "PeerPod status: {:?} {:?}",
        st.phase,
        st.message
    );
    assert_links_gone(n).await?;
    stop_vm(&hv, &vm.id).await?;
    assert_vm_gone(env, &vm, None).await?;
    ensure!(
        !std::process::Command::new("pgrep")
            .args(["-x", "-f", &format!("/usr/bin/sleep {nap}")])
            .status()?
            .success(),
        "the silent forwarder still runs"
    );
    Ok(())
}

/// Runtimes name the pod's network namespace `/var/run/netns/<id>` (CRI-O, containerd) or
/// `/run/netns/<id>`; the image has no `/var` and the DaemonSet mounts the node's
/// `/run/netns`. containerd's sandbox name is the pod's; CRI-O's (which kata copies over the
/// cri key) is `k8s_<pod>_<namespace>_<uid>_<attempt>`. One pod of each, each carrying
/// traffic through its tunnel.
async fn netns_and_runtime_forms(env: Env) -> Result<()> {
    let (caa, n) = CaaProc::deploy(&env, local_config(&[]), &[], 2, NODE_IP, true).await?;
    let r = netns_and_runtime_forms_on(&env, &caa, &n).await;
    finish(caa, n, r).await
}

async fn netns_and_runtime_forms_on(env: &Env, caa: &CaaProc, n: &Net) -> Result<()> {
    let admin = env.admin().await?;
    let hv = caa.hypervisor().await?;
    // containerd: the pod name, /var/run/netns.
    let a = create_vm(
        env,
        caa,
        &hv,
        "ctrd",
        "c0c0c0c0c0c0c0c0",
        "/var/run/netns/pod0",
    )
    .await?;
    let (_agent_a, _) = start_with_agent(&hv, &a).await?;
    // CRI-O: k8s_<pod>_<namespace>_<uid>_<attempt>, /run/netns.
    let pod = make_pod(env, "crio").await?;
    let uid = pod.uid().context("pod uid")?;
    let b = create_vm_named(
        env,
        caa,
        &hv,
        "crio",
        &format!("k8s_crio_{}_{uid}_0", env.ns),
        "c1c1c1c1c1c1c1c1",
        "/run/netns/pod1",
    )
    .await?;
    let (_agent_b, _) = start_with_agent(&hv, &b).await?;
    for (vm, i, tag) in [(&a, 0, "containerd"), (&b, 1, "crio")] {
        // The record belongs to the pod the sandbox name names.
        let pp: PeerPod = Api::namespaced(admin.clone(), &env.ns)
            .get(&vm.vm_name)
            .await?;
        let owner = pp.owner_references().first().cloned().context("owner")?;
        ensure!(owner.name == vm.name, "{tag}: owner {}", owner.name);
        let pod: Pod = Api::namespaced(admin.clone(), &env.ns)
            .get(&vm.name)
            .await?;
        ensure!(Some(owner.uid) == pod.uid(), "{tag}: owner uid");
        status_with_ip(&admin, &env.ns, &vm.vm_name).await?;
        tcp_through_tunnel(n, vm.pid()?, pod_ip(i), tag).await?;
    }
    // A CRI-O name whose uid is not the pod's (a pod deleted and made again) is refused.
    let mut req = hypervisor::CreateVMRequest::new();
    req.id = "c2c2c2c2c2c2c2c2".into();
    req.annotations.insert(
        annotations::SANDBOX_NAME.into(),
        format!("k8s_crio_{}_00000000-0000-0000-0000-000000000000_1", env.ns),
    );
    req.annotations
        .insert(annotations::SANDBOX_NAMESPACE.into(), env.ns.clone());
    let e = hv
        .create_vm(ctx(), &req)
        .await
        .err()
        .context("a CRI-O sandbox of a gone pod uid was accepted")?;
    ensure!(
        format!("{e}").contains("no longer exists"),
        "unexpected error: {e}"
    );
    for vm in [&a, &b] {
        stop_vm(&hv, &vm.id).await?;
        assert_vm_gone(env, vm, None).await?;
    }
    assert_links_gone(n).await
}

/// The kata shim's first agent call is a health check with a fixed 30 s deadline: StartVM
/// answers only once the agent itself answers one through the forwarder (readiness `agent`,
/// the DaemonSet's default), and fails naming the agent when it never does.
async fn readiness_agent(env: Env) -> Result<()> {
    let cm = local_config(&[("PROXY_TIMEOUT", "8s".into())]);
    let (caa, n) = CaaProc::deploy(&env, cm, &[], 2, NODE_IP, true).await?;
    let r = readiness_agent_on(&env, &caa, &n).await;
    finish(caa, n, r).await
}

async fn readiness_agent_on(env: &Env, caa: &CaaProc, n: &Net) -> Result<()> {
    ensure!(
        !caa.launch.argv.iter().any(|a| a.contains("readiness"))
            && caa.launch.var("CAA_READINESS").is_none(),
        "the test is about the default readiness: {:?}",
        caa.launch.argv
    );
    let hv = caa.hypervisor().await?;
    // The agent comes up 3 s after the VM exists.
    let vm = create_vm(env, caa, &hv, "late", "1a1e1a1e1a1e1a1e", &pod_netns(0)).await?;
    let agent = agent_in_vm(&vm.vm_dir, Duration::from_secs(3));
    start_vm(&hv, &vm.id).await?;
    let answered = Instant::now();
    let (_agent, log, agent_up) = agent.await??;
    ensure!(
        agent_up <= answered,
        "StartVM answered before the agent was up"
    );
    ensure!(
        log.lock().unwrap().iter().any(|(m, _)| m == "Check"),
        "the agent never saw a health check"
    );
    tcp_through_tunnel(n, vm.pid()?, pod_ip(0), "late").await?;
    stop_vm(&hv, &vm.id).await?;
    assert_vm_gone(env, &vm, None).await?;

    // No agent ever: StartVM fails after PROXY_TIMEOUT naming the agent, the VM goes.
    let vm = create_vm(env, caa, &hv, "mute", "3a3e3a3e3a3e3a3e", &pod_netns(1)).await?;
    let e = start_vm(&hv, &vm.id)
        .await
        .err()
        .context("StartVM succeeded without an agent")?;
    let msg = format!("{e:#}");
    ensure!(
        msg.contains("kata agent") && msg.contains("health check"),
        "StartVM error does not name the agent: {msg}"
    );
    ensure!(!vm.vm_dir.exists(), "the VM was not deleted");
    stop_vm(&hv, &vm.id).await?;
    assert_vm_gone(env, &vm, None).await?;
    assert_links_gone(n).await
}

/// A node whose IP is not the node's own (the pod tunnel could not work): the CAA the
/// operator deploys exits at start saying so, instead of failing every pod later.
async fn wrong_node_ip(env: Env) -> Result<()> {
    let ip = Ipv4Addr::new(10, 77, 0, 99);
    let (mut caa, n) = CaaProc::deploy(&env, local_config(&[]), &[], 0, ip, false).await?;
    let r = async {
        ensure!(
            caa.launch.var("NODE_IP") == Some("10.77.0.99"),
            "NODE_IP from the downward API: {:?}",
            caa.launch.var("NODE_IP")
        );
        caa.start_container()?;
        let c = caa.container.as_mut().context("container")?;
        let exited = harness::eventually("CAA to exit", Duration::from_secs(60), || {
            let gone = c.process.check_running().is_err();
            async move { Ok(gone.then_some(())) }
        })
        .await;
        let log = c.process.log_tail(20);
        exited.map_err(|e| anyhow::anyhow!("{e:#}; CAA kept running:\n{log}"))?;
        ensure!(
            log.contains("10.77.0.99 is not an address of this node"),
            "CAA's exit does not say why:\n{log}"
        );
        ensure!(
            !caa.socket.exists(),
            "CAA served although the tunnel cannot work"
        );
        Ok(())
    }
    .await;
    finish(caa, n, r).await
}

/// `GET` of an ARM test server inspection endpoint, as JSON.
async fn arm_inspect(addr: std::net::SocketAddr, path: &str) -> Result<serde_json::Value> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await?;
    s.write_all(
        format!("GET {path} HTTP/1.1\r\nHost: arm\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await?;
    let text = String::from_utf8(out)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no HTTP body")?;
    ensure!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
    Ok(serde_json::from_str(body)?)
}

/// CAA with `CLOUD_PROVIDER=azure` against `sandboxd dev arm-server --local-vms`: the
/// Azure provider path end to end with readiness `agent`.
async fn azure_local_vms(env: Env) -> Result<()> {
    const SUB: &str = "00000000-0000-0000-0000-00000000d901";
    let rg = format!("/subscriptions/{SUB}/resourceGroups/rg");
    let cm: Vec<(String, String)> = [
        ("CLOUD_PROVIDER", "azure".to_string()),
        ("VXLAN_PORT", "9000".into()),
        ("PROXY_TIMEOUT", "30s".into()),
        ("AZURE_INSTANCE_SIZE", "Standard_D2as_v5".into()),
        ("AZURE_INSTANCE_SIZES", "Standard_D2as_v5".into()),
        (
            "AZURE_SUBNET_ID",
            format!("{rg}/providers/Microsoft.Network/virtualNetworks/vnet/subnets/worker"),
        ),
        (
            "AZURE_NSG_ID",
            format!("{rg}/providers/Microsoft.Network/networkSecurityGroups/nsg"),
        ),
        (
            "AZURE_IMAGE_ID",
            format!("{rg}/providers/Microsoft.Compute/galleries/g/images/podvm/versions/1.0.0"),
        ),
        ("AZURE_REGION", "eastus".into()),
        ("AZURE_RESOURCE_GROUP", "rg".into()),
        ("DISABLECVM", "true".into()),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.clone()))
    .collect();
    let (mut caa, n) = CaaProc::deploy(&env, cm, &[], 1, NODE_IP, false).await?;
    let r = azure_local_vms_on(&env, &mut caa, &n).await;
    finish(caa, n, r).await
}

async fn azure_local_vms_on(env: &Env, caa: &mut CaaProc, n: &Net) -> Result<()> {
    const SUB: &str = "00000000-0000-0000-0000-00000000d901";
    let admin = env.admin().await?;
    // The ARM test server backs its VMs with local pod VMs in the node's network, kept where
    // the PodVm helpers look.
    let vms_dir = caa.local_dir.clone();
    let port = harness::process::free_port();
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
    let arm_args: Vec<String> = [
        "dev",
        "arm-server",
        "--addr",
        &addr.to_string(),
        "--lro-ms",
        "200",
        "--seed-subscription",
        SUB,
        "--local-vms",
        &vms_dir.display().to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let node_ns = n.node.display().to_string();
    let mut arm = Process::start(
        &format!("dp-arm-{}", env.ns),
        Path::new(env!("CARGO_BIN_EXE_sandboxd")),
        &arm_args,
        &[
            ("SANDBOXD_NODE_NETNS", node_ns.as_str()),
            ("RUST_LOG", "info"),
        ],
    )?;
    harness::eventually("ARM test server", Duration::from_secs(30), || async move {
        Ok(arm_inspect(addr, "/armtest/vms").await.ok().map(|_| ()))
    })
    .await?;
    // The ARM test server through CAA's development flags (command line only, never part of
    // a deployment: no ConfigMap or environment can point CAA elsewhere) and a faster
    // polling floor.
    let base = format!("http://{addr}/");
    caa.launch.argv.extend([
        "--dev-arm-endpoint".to_string(),
        base.clone(),
        "--dev-authority-host".to_string(),
        base,
    ]);
    caa.extra.push(("CAA_MIN_POLL_MS", "20".into()));
    caa.spawn().await?;
    let hv = caa.hypervisor().await?;
    let vm = create_vm(env, caa, &hv, "azweb", "9876abcd4567ef01", &pod_netns(0)).await?;
    let (_agent, log) = start_with_agent(&hv, &vm).await?;
    let pid = vm.pid()?;
    // ARM holds the VM, its NIC carrying the local VM's address; the PeerPod records it.
    let vms = arm_inspect(addr, "/armtest/vms").await?;
    let listed: Vec<&str> = vms
        .as_array()
        .context("vms")?
        .iter()
        .filter_map(|v| v["name"].as_str())
        .collect();
    ensure!(listed == [vm.vm_name.as_str()], "ARM VMs: {vms}");
    ensure!(vms[0]["privateIp"] == "10.250.0.2", "ARM VM: {vms}");
    let st = status_with_ip(&admin, &env.ns, &vm.vm_name).await?;
    ensure!(
        st.vm_ip.as_deref() == Some("10.250.0.2"),
        "ip {:?}",
        st.vm_ip
    );
    log.lock().unwrap().clear();
    super::check_agent_calls(&vm.agent_socket, &log).await?;
    tcp_through_tunnel(n, pid, pod_ip(0), "azure").await?;

    // StopVM: no VM in ARM, no local VM process, directory or link.
    stop_vm(&hv, &vm.id).await?;
    harness::eventually("ARM VM deleted", Duration::from_secs(20), || async move {
        let vms = arm_inspect(addr, "/armtest/vms").await?;
        Ok(vms.as_array().is_some_and(|a| a.is_empty()).then_some(()))
    })
    .await?;
    assert_vm_gone(env, &vm, Some(pid)).await?;
    assert_links_gone(n).await?;
    arm.stop(Duration::from_secs(5));
    Ok(())
}
