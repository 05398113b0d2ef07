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
use sandboxd::api::peerpod::PeerPod;
use sandboxd::forwarder::net::{self, Netlink};
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
    pod: PathBuf,
}

impl Drop for Net {
    fn drop(&mut self) {
        net::remove_named_netns(&self.pod);
        net::remove_named_netns(&self.node);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Node namespace with bridge `br0` 10.77.0.1/24; pod namespace with eth0 10.77.0.2/24 on it.
async fn network(tag: &str) -> Result<Net> {
    let dir = run_dir().join(format!("n{}", &tag[tag.len() - 6..]));
    std::fs::create_dir_all(&dir)?;
    let n = Net {
        node: dir.join("node"),
        pod: dir.join("pod"),
        dir,
    };
    net::create_named_netns(&n.node)?;
    net::create_named_netns(&n.pod)?;
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
    let host_end = node.add_veth("vpod0", "vpodp").await?;
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
    let peer = node.index_of("vpodp").await?.context("peer")?;
    node.move_to(peer, &std::fs::File::open(&n.pod)?).await?;
    let pod = Netlink::in_netns(&n.pod).await?;
    let eth = pod.index_of("vpodp").await?.context("pod end")?;
    pod.configure(eth, "eth0", 1500, Some([0x0a, 0x58, 10, 77, 0, 2]))
        .await?;
    pod.add_addr(eth, Ipv4Addr::new(10, 77, 0, 2), 24).await?;
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
    Ok(n)
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}

async fn lifecycle(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    let crd = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/crds/peerpods.confidentialcontainers.org.yaml");
    harness::install_crds(&admin, &crd).await?;
    let n = network(&env.ns).await?;
    let node_name = env.unique("dp-node");
    // Unix socket paths must stay short.
    let dir = run_dir().join(format!("d{}", &env.ns[env.ns.len() - 6..]));
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("hypervisor.sock");
    let pods_dir = dir.join("pods");
    let local_dir = dir.join("vms");
    let envs: Vec<(&str, String)> = vec![
        ("CLOUD_PROVIDER", "local".into()),
        ("VXLAN_PORT", "9000".into()),
        ("PROXY_TIMEOUT", "30s".into()),
        ("NODE_NAME", node_name.clone()),
        ("SANDBOXD_NODE_NETNS", n.node.display().to_string()),
        ("NODE_IP", "10.77.0.1".into()),
        ("POD_NAMESPACE", env.ns.clone()),
        ("LOCAL_VM_DIR", local_dir.display().to_string()),
        ("LOCAL_VM_SUBNET", "10.250.0.0".into()),
        ("RUST_LOG", "info".into()),
    ];
    let args: Vec<String> = [
        "caa",
        "--kubeconfig",
        &env.cp().kubeconfig_path.display().to_string(),
        "--socket",
        &socket.display().to_string(),
        "--pods-dir",
        &pods_dir.display().to_string(),
        "--readiness",
        "agent",
        "--ssh-public-key",
        "/nonexistent",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let envs_ref: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let _caa = Process::start(
        &format!("dp-caa-{}", env.ns),
        Path::new(env!("CARGO_BIN_EXE_sandboxd")),
        &args,
        &envs_ref,
    )?;
    harness::eventually("CAA socket", Duration::from_secs(60), || async {
        Ok(socket.exists().then_some(()))
    })
    .await?;
    let pods: Api<Pod> = Api::namespaced(admin.clone(), &env.ns);
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": "web"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}
    }))?;
    pods.create(&PostParams::default(), &pod).await?;

    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display())).await?;
    let hv = hypervisor_ttrpc::HypervisorClient::new(c);
    let id = "0123abcd4567ef89".to_string();
    let mut req = hypervisor::CreateVMRequest::new();
    req.id = id.clone();
    req.annotations
        .insert(annotations::SANDBOX_NAME.into(), "web".into());
    req.annotations
        .insert(annotations::SANDBOX_NAMESPACE.into(), env.ns.clone());
    req.networkNamespacePath = n.pod.display().to_string();
    let created = hv.create_vm(ctx(), &req).await?;
    let agent_socket = PathBuf::from(&created.agentSocketPath);
    ensure!(agent_socket == pods_dir.join(&id).join("agent.ttrpc"));
    let mut start = hypervisor::StartVMRequest::new();
    start.id = id.clone();
    hv.start_vm(ctx(), &start)
        .await
        .context("StartVM with readiness agent")?;

    let vm_name = sandboxd::cloud::vm_name("web", &id);
    let vm_dir = local_dir.join(&vm_name);
    let rec: serde_json::Value = serde_json::from_slice(&std::fs::read(vm_dir.join("vm.json"))?)?;
    let pid = rec["pid"].as_i64().context("pid")? as i32;
    // The PeerPod records the VNI and the VM IP.
    let pp: PeerPod = Api::namespaced(admin.clone(), &env.ns)
        .get(&vm_name)
        .await?;
    let st = pp.status.clone().unwrap_or_default();
    ensure!(st.vni == Some(555000), "vni: {:?}", st.vni);
    ensure!(
        st.vm_ip.as_deref() == Some("10.250.0.2"),
        "ip {:?}",
        st.vm_ip
    );

    // The test agent inside the VM.
    let (_agent, log) = super::agent::start(&vm_dir.join("run/kata-containers/agent.sock")).await?;
    super::check_agent_calls(&agent_socket, &log).await?;

    // TCP through the tunnel: a server in the VM's podns on the pod IP, a client on the
    // node's bridge.
    let podns = PathBuf::from(format!("/proc/{pid}/root/run/netns/podns"));
    let server = in_netns(&podns, || {
        let l = std::net::TcpListener::bind("10.77.0.2:8080")?;
        let (mut s, _) = l.accept()?;
        use std::io::{Read, Write};
        let mut buf = [0u8; 5];
        s.read_exact(&mut buf)?;
        s.write_all(&[b"pong:".as_slice(), &buf].concat())?;
        Ok(())
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = in_netns(&n.node, || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect_timeout(
            &"10.77.0.2:8080".parse()?,
            Duration::from_secs(10),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"hello")?;
        let mut out = Vec::new();
        s.read_to_end(&mut out)?;
        Ok(out)
    });
    let got = tokio::task::spawn_blocking(move || client.join())
        .await?
        .map_err(|_| anyhow::anyhow!("client panicked"))??;
    ensure!(got == b"pong:hello", "through the tunnel: {got:?}");
    let _ = tokio::task::spawn_blocking(move || server.join()).await?;

    // StopVM leaves nothing behind.
    let mut stop = hypervisor::StopVMRequest::new();
    stop.id = id.clone();
    hv.stop_vm(ctx(), &stop).await?;
    ensure!(
        sandboxd::cloud::local::start_time(pid).is_none(),
        "forwarder still runs"
    );
    ensure!(!vm_dir.exists(), "VM directory left");
    ensure!(!agent_socket.exists(), "agent socket left");
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
    let pod = Netlink::in_netns(&n.pod).await?;
    let names: Vec<String> = pod
        .interfaces()
        .await?
        .into_iter()
        .map(|i| i.name)
        .collect();
    ensure!(names.len() == 2, "pod links left: {names:?}");
    let left: Option<PeerPod> = Api::namespaced(admin.clone(), &env.ns)
        .get_opt(&vm_name)
        .await?;
    ensure!(left.is_none(), "PeerPod left");
    Ok(())
}
