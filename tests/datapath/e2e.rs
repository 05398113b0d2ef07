//! End to end as root: a node network namespace with a bridge, a pod namespace made the way
//! a CNI plugin makes it (veth on the bridge, pod IP), a CAA process inside the node
//! namespace with `CLOUD_PROVIDER=local` and readiness `agent`, a hypervisor client doing
//! CreateVM/StartVM/StopVM, the test agent inside the VM, and TCP through the tunnel.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PostParams};
use sandboxd::api::peerpod::{PeerPod, PeerPodStatus};
use sandboxd::cloud::net::{self, Netlink};
use sandboxd::protocol::{annotations, hypervisor, hypervisor_ttrpc};

use crate::harness::process::{Process, run_dir};
use crate::harness::{self, Case, Env};

fn root_skip() -> Option<String> {
    (!nix::unistd::Uid::effective().is_root()).then(|| "needs root".to_string())
}

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster(
            "datapath::a_local_pod_vm_relays_agent_calls_and_carries_pod_traffic_then_leaves_nothing",
            lifecycle,
        )
        .skip_if(root_skip()),
        Case::cluster(
            "datapath::through_caas_relay_sandboxd_agent_in_a_local_pod_vm_runs_containers_in_the_pod_network",
            agent_through_relay,
        )
        .skip_if(root_skip().or_else(crate::agent::host::skip_reason)),
        Case::cluster(
            "datapath::two_local_pod_vms_at_once_each_answer_on_their_own_pod_ip_and_agent",
            two_vms,
        )
        .skip_if(root_skip()),
        Case::cluster(
            "datapath::relay_and_tunnel_survive_a_caa_restart_and_stopvm_still_cleans_up",
            restart,
        )
        .skip_if(root_skip()),
        Case::cluster(
            "datapath::a_forwarder_that_never_answers_fails_startvm_after_proxy_timeout_and_deletes_the_vm",
            silent_forwarder,
        )
        .skip_if(root_skip()),
        Case::cluster(
            "datapath::azure_vms_of_the_arm_test_server_are_local_pod_vms_reached_by_agent_and_vxlan",
            azure_local_vms,
        )
        .skip_if(root_skip()),
    ]
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

struct Net {
    dir: PathBuf,
    node: PathBuf,
    /// Pod namespaces, pod `i` at 10.77.0.(2+i).
    pods: Vec<PathBuf>,
}

impl Drop for Net {
    fn drop(&mut self) {
        for p in &self.pods {
            net::remove_named_netns(p);
        }
        net::remove_named_netns(&self.node);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn pod_ip(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 2 + i as u8)
}

/// Node namespace with bridge `br0` 10.77.0.1/24; `pods` pod namespaces, each with eth0 on
/// it (pod `i` at [`pod_ip`]), made the way a CNI bridge plugin makes them.
async fn network(tag: &str, pods: usize) -> Result<Net> {
    let dir = run_dir().join(format!("n{}", &tag[tag.len() - 6..]));
    std::fs::create_dir_all(&dir)?;
    let n = Net {
        node: dir.join("node"),
        pods: (0..pods).map(|i| dir.join(format!("pod{i}"))).collect(),
        dir,
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
    node.add_addr(br, Ipv4Addr::new(10, 77, 0, 1), 24).await?;
    node.up(br).await?;
    for (i, path) in n.pods.iter().enumerate() {
        net::create_named_netns(path)?;
        let (host, peer_name) = (format!("vpod{i}"), format!("vpodp{i}"));
        let host_end = node.add_veth(&host, &peer_name).await?;
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
        pod.add_route(
            Ipv4Addr::UNSPECIFIED,
            0,
            Some(Ipv4Addr::new(10, 77, 0, 1)),
            eth,
        )
        .await?;
    }
    Ok(n)
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}

/// A CAA process in the node namespace with the local provider and readiness `agent`.
struct CaaProc {
    proc: Option<Process>,
    name: String,
    args: Vec<String>,
    envs: Vec<(&'static str, String)>,
    socket: PathBuf,
    pods_dir: PathBuf,
    local_dir: PathBuf,
    restarts: u32,
}

impl CaaProc {
    /// `as_deployed`: run under the ServiceAccount and RBAC of `deploy/caa/rbac.yaml`.
    async fn start(
        env: &Env,
        n: &Net,
        extra: &[(&'static str, String)],
        as_deployed: bool,
    ) -> Result<Self> {
        let admin = env.admin().await?;
        let crd = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("deploy/crds/peerpods.confidentialcontainers.org.yaml");
        harness::install_crds(&admin, &crd).await?;
        // Unix socket paths must stay short.
        let dir = run_dir().join(format!("d{}", &env.ns[env.ns.len() - 6..]));
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("hypervisor.sock");
        let pods_dir = dir.join("pods");
        let local_dir = dir.join("vms");
        let mut envs: Vec<(&'static str, String)> = vec![
            ("CLOUD_PROVIDER", "local".into()),
            ("VXLAN_PORT", "9000".into()),
            ("PROXY_TIMEOUT", "30s".into()),
            ("NODE_NAME", env.unique("dp-node")),
            ("SANDBOXD_NODE_NETNS", n.node.display().to_string()),
            ("NODE_IP", "10.77.0.1".into()),
            ("POD_NAMESPACE", env.ns.clone()),
            ("LOCAL_VM_DIR", local_dir.display().to_string()),
            ("LOCAL_VM_SUBNET", "10.250.0.0".into()),
            ("RUST_LOG", "info".into()),
        ];
        for (k, v) in extra {
            envs.retain(|(x, _)| x != k);
            envs.push((k, v.clone()));
        }
        let kubeconfig = if as_deployed {
            crate::caa::caa_kubeconfig(env, &admin).await?
        } else {
            env.cp().kubeconfig_path.clone()
        };
        let ssh_key = extra
            .iter()
            .find(|(k, _)| *k == "CAA_SSH_PUBLIC_KEY")
            .map_or_else(|| "/nonexistent".to_string(), |(_, v)| v.clone());
        let args: Vec<String> = [
            "caa",
            "--kubeconfig",
            &kubeconfig.display().to_string(),
            "--socket",
            &socket.display().to_string(),
            "--pods-dir",
            &pods_dir.display().to_string(),
            "--readiness",
            "agent",
            "--ssh-public-key",
            &ssh_key,
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let mut c = Self {
            proc: None,
            name: format!("dp-caa-{}", env.ns),
            args,
            envs,
            socket,
            pods_dir,
            local_dir,
            restarts: 0,
        };
        c.spawn().await?;
        Ok(c)
    }

    async fn spawn(&mut self) -> Result<()> {
        let envs_ref: Vec<(&str, &str)> = self.envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let name = format!("{}-{}", self.name, self.restarts);
        self.proc = Some(Process::start(
            &name,
            Path::new(env!("CARGO_BIN_EXE_sandboxd")),
            &self.args,
            &envs_ref,
        )?);
        let socket = self.socket.clone();
        harness::eventually("CAA socket", Duration::from_secs(60), || {
            let socket = socket.clone();
            async move {
                Ok(tokio::net::UnixStream::connect(&socket)
                    .await
                    .ok()
                    .map(|_| ()))
            }
        })
        .await
    }

    /// Kills CAA without a chance to clean up, then starts it again.
    async fn crash_and_restart(&mut self) -> Result<()> {
        if let Some(mut p) = self.proc.take() {
            p.signal(nix::sys::signal::Signal::SIGKILL);
            p.stop(Duration::from_secs(5));
        }
        self.restarts += 1;
        self.spawn().await
    }

    async fn hypervisor(&self) -> Result<hypervisor_ttrpc::HypervisorClient> {
        let c =
            ttrpc::r#async::Client::connect(&format!("unix://{}", self.socket.display())).await?;
        Ok(hypervisor_ttrpc::HypervisorClient::new(c))
    }
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

/// Creates the pod object and does CreateVM; StartVM is left to the caller.
async fn create_vm(
    env: &Env,
    caa: &CaaProc,
    hv: &hypervisor_ttrpc::HypervisorClient,
    name: &str,
    id: &str,
    netns: &Path,
) -> Result<PodVm> {
    let pods: Api<Pod> = Api::namespaced(env.admin().await?, &env.ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))?;
    pods.create(&PostParams::default(), &pod).await?;
    let mut req = hypervisor::CreateVMRequest::new();
    req.id = id.to_string();
    req.annotations
        .insert(annotations::SANDBOX_NAME.into(), name.into());
    req.annotations
        .insert(annotations::SANDBOX_NAMESPACE.into(), env.ns.clone());
    req.networkNamespacePath = netns.display().to_string();
    let created = hv.create_vm(ctx(), &req).await?;
    let agent_socket = PathBuf::from(&created.agentSocketPath);
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

async fn lifecycle(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    let n = network(&env.ns, 1).await?;
    let caa = CaaProc::start(&env, &n, &[], false).await?;
    let hv = caa.hypervisor().await?;
    let vm = create_vm(&env, &caa, &hv, "web", "0123abcd4567ef89", &n.pods[0]).await?;
    start_vm(&hv, &vm.id).await?;
    let pid = vm.pid()?;
    // The PeerPod records the VNI and the VM IP.
    let st = status_with_ip(&admin, &env.ns, &vm.vm_name).await?;
    ensure!(st.vni == Some(555000), "vni: {:?}", st.vni);
    ensure!(
        st.vm_ip.as_deref() == Some("10.250.0.2"),
        "ip {:?}",
        st.vm_ip
    );

    // The test agent inside the VM.
    let (_agent, log) =
        super::agent::start(&vm.vm_dir.join("run/kata-containers/agent.sock")).await?;
    super::check_agent_calls(&vm.agent_socket, &log).await?;
    tcp_through_tunnel(&n, pid, pod_ip(0), "pong").await?;

    // StopVM leaves nothing behind.
    stop_vm(&hv, &vm.id).await?;
    assert_vm_gone(&env, &vm, Some(pid)).await?;
    assert_links_gone(&n).await
}

/// The peer-pod sequence through CAA's agent socket: CAA's relay, mutual TLS, the forwarder
/// (which rewrites CreateContainer into the pod network namespace) and `sandboxd agent`
/// running inside the local pod VM's namespaces; a container answers on the pod IP.
async fn agent_through_relay(env: Env) -> Result<()> {
    use crate::agent::host::{HostAgent, busybox_rootfs};
    use crate::agent::sequence::{self, Rootfs, Setup};
    let n = network(&env.ns, 1).await?;
    let caa = CaaProc::start(&env, &n, &[], false).await?;
    let hv = caa.hypervisor().await?;
    let vm = create_vm(&env, &caa, &hv, "app", "a1b2c3d4e5f60718", &n.pods[0]).await?;
    start_vm(&hv, &vm.id).await?;
    let pid = vm.pid()?;
    let agent = HostAgent::start_in(
        "dp-agent",
        &[],
        Some((pid, vm.vm_dir.join("run/kata-containers/agent.sock"))),
    )
    .await?;
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
    assert_vm_gone(&env, &vm, Some(pid)).await
}

async fn two_vms(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    let n = network(&env.ns, 2).await?;
    let caa = CaaProc::start(&env, &n, &[], false).await?;
    let hv = caa.hypervisor().await?;
    let a = create_vm(&env, &caa, &hv, "web", "aaaa0000aaaa0000", &n.pods[0]).await?;
    let b = create_vm(&env, &caa, &hv, "db", "bbbb1111bbbb1111", &n.pods[1]).await?;
    // Both start at once.
    let (ra, rb) = tokio::join!(start_vm(&hv, &a.id), start_vm(&hv, &b.id));
    ra?;
    rb?;
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
    let (_agent_a, log_a) =
        super::agent::start(&a.vm_dir.join("run/kata-containers/agent.sock")).await?;
    let (_agent_b, log_b) =
        super::agent::start(&b.vm_dir.join("run/kata-containers/agent.sock")).await?;
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
    tcp_through_tunnel(&n, pa, pod_ip(0), "web").await?;
    tcp_through_tunnel(&n, pb, pod_ip(1), "db").await?;
    // Stopping one leaves the other working.
    stop_vm(&hv, &a.id).await?;
    assert_vm_gone(&env, &a, Some(pa)).await?;
    log_b.lock().unwrap().clear();
    super::check_agent_calls(&b.agent_socket, &log_b).await?;
    tcp_through_tunnel(&n, pb, pod_ip(1), "db").await?;
    stop_vm(&hv, &b.id).await?;
    assert_vm_gone(&env, &b, Some(pb)).await?;
    assert_links_gone(&n).await
}

async fn restart(env: Env) -> Result<()> {
    let n = network(&env.ns, 1).await?;
    // Under the deployed RBAC: the certificates must survive the restart through the Secret.
    let mut caa = CaaProc::start(&env, &n, &[], true).await?;
    let hv = caa.hypervisor().await?;
    let vm = create_vm(&env, &caa, &hv, "web", "c0ffee00c0ffee00", &n.pods[0]).await?;
    start_vm(&hv, &vm.id).await?;
    let pid = vm.pid()?;
    let (_agent, log) =
        super::agent::start(&vm.vm_dir.join("run/kata-containers/agent.sock")).await?;
    super::check_agent_calls(&vm.agent_socket, &log).await?;

    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(env.admin().await?, &env.ns);
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
    tcp_through_tunnel(&n, pid, pod_ip(0), "pong").await?;

    let kept = secrets.get("peerpod-caa-tls").await?;
    ensure!(
        kept.metadata.uid == tls.metadata.uid && kept.data == tls.data,
        "the TLS Secret changed across the restart"
    );
    let hv = caa.hypervisor().await?;
    stop_vm(&hv, &vm.id).await?;
    assert_vm_gone(&env, &vm, Some(pid)).await?;
    assert_links_gone(&n).await
}

async fn silent_forwarder(env: Env) -> Result<()> {
    let n = network(&env.ns, 1).await?;
    // A "forwarder" that takes its own network namespace (so the VM gets its link and
    // address) and then never listens.
    let dir = run_dir().join(format!("s{}", &env.ns[env.ns.len() - 6..]));
    std::fs::create_dir_all(&dir)?;
    let exe = dir.join("silent-forwarder");
    // A unique argument, to find the process again.
    let nap = format!(
        "600.{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_nanos()
    );
    std::fs::write(&exe, format!("#!/bin/sh\nexec unshare --net sleep {nap}\n"))?;
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755))?;
    }
    let timeout = Duration::from_secs(3);
    let caa = CaaProc::start(
        &env,
        &n,
        &[
            ("PROXY_TIMEOUT", "3s".into()),
            ("LOCAL_VM_FORWARDER", exe.display().to_string()),
        ],
        false,
    )
    .await?;
    let hv = caa.hypervisor().await?;
    let vm = create_vm(&env, &caa, &hv, "web", "dead0000beef0000", &n.pods[0]).await?;
    let t0 = std::time::Instant::now();
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
    assert_links_gone(&n).await?;
    stop_vm(&hv, &vm.id).await?;
    assert_vm_gone(&env, &vm, None).await?;
    ensure!(
        !std::process::Command::new("pgrep")
            .args(["-x", "-f", &format!("sleep {nap}")])
            .status()?
            .success(),
        "the silent forwarder still runs"
    );
    Ok(())
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
    let admin = env.admin().await?;
    let n = network(&env.ns, 1).await?;
    // The same VM directory CaaProc uses, so the PodVm helpers find the VM's state.
    let dir = run_dir().join(format!("d{}", &env.ns[env.ns.len() - 6..]));
    let vms_dir = dir.join("vms");
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
    let rg = format!("/subscriptions/{SUB}/resourceGroups/rg");
    // Azure wants an SSH key when password authentication is off.
    std::fs::create_dir_all(&dir)?;
    let key = dir.join("id.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHRlc3Qta2V5LW5vdC1yZWFs test\n",
    )?;
    let base = format!("http://{addr}/");
    let extra: Vec<(&'static str, String)> = vec![
        ("CLOUD_PROVIDER", "azure".into()),
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
        ("AZURE_CLIENT_ID", "app".into()),
        ("AZURE_CLIENT_SECRET", "s3cret".into()),
        ("AZURE_TENANT_ID", "tenant".into()),
        ("AZURE_SUBSCRIPTION_ID", SUB.into()),
        ("AZURE_RESOURCE_MANAGER_ENDPOINT", base.clone()),
        ("AZURE_AUTHORITY_HOST", base),
        ("CAA_MIN_POLL_MS", "20".into()),
        ("CAA_SSH_PUBLIC_KEY", key.display().to_string()),
    ];
    let caa = CaaProc::start(&env, &n, &extra, false).await?;
    ensure!(caa.local_dir == vms_dir, "VM directory differs");
    let hv = caa.hypervisor().await?;
    let vm = create_vm(&env, &caa, &hv, "azweb", "9876abcd4567ef01", &n.pods[0]).await?;
    start_vm(&hv, &vm.id).await?;
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

    let (_agent, log) =
        super::agent::start(&vm.vm_dir.join("run/kata-containers/agent.sock")).await?;
    super::check_agent_calls(&vm.agent_socket, &log).await?;
    tcp_through_tunnel(&n, pid, pod_ip(0), "azure").await?;

    // StopVM: no VM in ARM, no local VM process, directory or link.
    stop_vm(&hv, &vm.id).await?;
    harness::eventually("ARM VM deleted", Duration::from_secs(20), || async move {
        let vms = arm_inspect(addr, "/armtest/vms").await?;
        Ok(vms.as_array().is_some_and(|a| a.is_empty()).then_some(()))
    })
    .await?;
    assert_vm_gone(&env, &vm, Some(pid)).await?;
    assert_links_gone(&n).await?;
    arm.stop(Duration::from_secs(5));
    Ok(())
}
