//! Integration tests of `sandboxd caa`: a ttrpc hypervisor client (the generated client of
//! sandboxd's protos) drives the CAA process, which runs under its own ServiceAccount's RBAC
//! against the real API server and talks ARM to the in-repo ARM test server.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Pod, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use sandboxd::api::names::annotations;
use sandboxd::api::peerpod::PeerPod;
use sandboxd::armtest;
use sandboxd::protocol::{hypervisor, hypervisor_ttrpc, podvminfo, podvminfo_ttrpc};
use serde_json::json;

use crate::harness::control_plane::{UserAuth, kubeconfig_yaml};
use crate::harness::process::{Process, run_dir};
use crate::harness::{self, Case, Env};

const SUB: &str = "11111111-2222-3333-4444-555555555555";

mod bench;
mod crash;
mod dev;
mod faults;
mod gc;
mod secrets;
mod shim;

pub fn cases() -> Vec<Case> {
    vec![
        Case::plain(
            "caa::the_hidden_dev_arm_server_subcommand_serves_arm_to_the_azure_provider",
            dev::arm_server_subcommand,
        ),
        Case::cluster_exclusive(
            "caa::operator_deletes_the_vm_and_finalizer_of_a_pod_deleted_while_its_caa_is_down",
            gc::pod_deleted_while_caa_down,
        ),
        Case::cluster_exclusive(
            "caa::operator_deletes_the_vms_of_a_deleted_node",
            gc::vms_of_a_deleted_node_are_deleted,
        ),
        Case::cluster(
            "caa::sigkill_at_every_create_and_delete_step_leaks_no_vm_and_no_finalizer",
            crash::every_step_boundary,
        ),
        Case::cluster(
            "caa::a_sigkill_before_the_background_writes_still_records_the_vm_and_releases_the_record",
            crash::answered_before_background_writes,
        ),
        Case::cluster(
            "caa::sigkill_at_random_points_leaks_no_vm_and_no_finalizer",
            crash::random_points,
        ),
        Case::cluster(
            "caa::create_delete_cycles_with_10pct_arm_faults_leak_nothing_time_boxed_or_env_cycles",
            faults::cycles,
        ),
        Case::cluster(
            "caa::with_429s_injected_creates_complete_and_arm_sees_at_most_the_limiter_rate",
            faults::throttling,
        ),
        Case::cluster(
            "caa::bench_overhead_per_pod_and_100_concurrent_pods_vs_one",
            bench::run,
        )
        .skip_if(bench::skip()),
        Case::cluster(
            "caa::a_pod_vm_is_recorded_created_tagged_and_deleted_through_the_hypervisor_api",
            lifecycle,
        ),
        Case::cluster(
            "caa::a_vm_whose_pod_went_away_while_caa_was_down_is_deleted_on_restart",
            crash_restart,
        ),
        Case::cluster(
            "caa::tagged_vms_that_no_peerpod_references_are_swept",
            sweep,
        ),
        Case::cluster(
            "caa::no_client_secret_or_bearer_token_in_logs_events_or_records_at_trace",
            secrets::no_secret_in_logs_at_trace,
        ),
    ]
    .into_iter()
    .chain(shim::cases())
    .collect()
}

/// An ARM test server, a node, the CRD, the CAA RBAC and a running CAA.
pub(crate) struct Setup {
    pub(crate) arm: armtest::Handle,
    _arm_stop: tokio_util::sync::DropGuard,
    caa: Process,
    args: Vec<String>,
    envs: Vec<(&'static str, String)>,
    name: String,
    pub(crate) socket: PathBuf,
    pub(crate) node: String,
    admin: Client,
    kubeconfig: PathBuf,
    dir: PathBuf,
    /// The ARM test server's URL, given to every CAA as `--dev-arm-endpoint`.
    pub(crate) arm_base: String,
}

/// A further CAA (own node, own socket) sharing a [`Setup`]'s ARM test server.
struct NodeCaa {
    caa: Process,
    args: Vec<String>,
    envs: Vec<(&'static str, String)>,
    name: String,
    socket: PathBuf,
    node: String,
}

/// An ARM test server seeded for peer pods, a fake node and a CAA process (Azure provider,
/// the deployed RBAC) serving `socket`.
pub(crate) async fn setup(env: &Env, tags: &str) -> Result<Setup> {
    setup_with(env, tags, armtest::Config::default(), &[]).await
}

/// [`setup`] with an ARM test server configuration and extra CAA environment (which
/// override the defaults).
pub(crate) async fn setup_with(
    env: &Env,
    tags: &str,
    config: armtest::Config,
    extra: &[(&'static str, String)],
) -> Result<Setup> {
    let admin = env.admin().await?;
    let crd = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/crds/peerpods.confidentialcontainers.org.yaml");
    harness::install_crds(&admin, &crd).await?;
    let stop = tokio_util::sync::CancellationToken::new();
    let (addr, arm, _task) = armtest::serve("127.0.0.1:0".parse()?, config, stop.clone()).await?;
    let (subnet, nsg, image) = arm.seed_peer_pods(SUB, "rg", "eastus");
    let node = env.unique("caa-node");
    harness::fake_node(&admin, &node, &[], &[]).await?;
    let kubeconfig = caa_kubeconfig(env, &admin).await?;
    let dir = run_dir().join(&env.ns);
    std::fs::create_dir_all(&dir)?;
    let socket = dir.join("hypervisor.sock");
    let key = dir.join("id_rsa.pub");
    std::fs::write(
        &key,
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHRlc3Qta2V5LW5vdC1yZWFs test\n",
    )?;
    let base = format!("http://{addr}/");
    let mut envs: Vec<(&'static str, String)> = vec![
        ("CAA_SWEEP_SECONDS", "1".into()),
        ("CAA_SWEEP_GRACE_SECONDS", "1".into()),
        ("CLOUD_PROVIDER", "azure".into()),
        ("AZURE_INSTANCE_SIZE", "Standard_D2as_v5".into()),
        (
            "AZURE_INSTANCE_SIZES",
            "Standard_D2as_v5,Standard_D4as_v5,Standard_F4s_v2".into(),
        ),
        ("AZURE_SUBNET_ID", subnet),
        ("AZURE_NSG_ID", nsg),
        ("AZURE_IMAGE_ID", image),
        ("AZURE_REGION", "eastus".into()),
        ("AZURE_RESOURCE_GROUP", "rg".into()),
        ("DISABLECVM", "true".into()),
        ("TAGS", tags.into()),
        ("AZURE_CLIENT_ID", CLIENT_ID.into()),
        ("AZURE_CLIENT_SECRET", "s3cret".into()),
        ("AZURE_TENANT_ID", TENANT_ID.into()),
        ("AZURE_SUBSCRIPTION_ID", SUB.into()),
        ("CAA_MIN_POLL_MS", "20".into()),
        ("NODE_NAME", node.clone()),
        // The DaemonSet gives CAA the node's IP from the downward API (test
        // `datapath::the_deployed_caa_serves_var_run_and_run_netns_paths_and_containerd_and_crio_sandbox_names`
        // runs CAA from it); this process runs in the host's network, on loopback.
        ("NODE_IP", "127.0.0.1".into()),
        ("POD_NAMESPACE", env.ns.clone()),
        ("CAA_SSH_PUBLIC_KEY", key.display().to_string()),
        ("RUST_LOG", "info".into()),
    ];
    for (k, v) in extra {
        envs.retain(|(k2, _)| k2 != k);
        envs.push((k, v.clone()));
    }
    let args = caa_args(&kubeconfig, &socket, &dir.join("pods"), &base);
    let name = format!("caa-{}", env.ns);
    let caa = start_caa(&name, &args, &envs, &socket).await?;
    Ok(Setup {
        arm,
        _arm_stop: stop.drop_guard(),
        caa,
        args,
        envs,
        name,
        socket,
        node,
        admin,
        kubeconfig,
        dir,
        arm_base: base,
    })
}

/// The service principal's ids in every test secret (GUIDs, as `peer-pods-secret` requires).
pub(crate) const CLIENT_ID: &str = "0a1b2c3d-0000-4000-8000-00000000000c";
pub(crate) const TENANT_ID: &str = "0a1b2c3d-0000-4000-8000-00000000000e";

/// CAA's command line; the ARM test server is a development endpoint, which only the
/// command line can give (never `peer-pods-cm`).
fn caa_args(kubeconfig: &Path, socket: &Path, pods: &Path, arm: &str) -> Vec<String> {
    vec![
        "caa".to_string(),
        "--kubeconfig".into(),
        kubeconfig.display().to_string(),
        "--socket".into(),
        socket.display().to_string(),
        "--pods-dir".into(),
        pods.display().to_string(),
        "--dev-arm-endpoint".into(),
        arm.to_string(),
    ]
}

async fn start_caa(
    name: &str,
    args: &[String],
    envs: &[(&'static str, String)],
    socket: &Path,
) -> Result<Process> {
    let _ = std::fs::remove_file(socket);
    let envs_ref: Vec<(&str, &str)> = envs.iter().map(|(k, v)| (*k, v.as_str())).collect();
    // The benchmark measures a release CAA when given one.
    let bin = std::env::var_os(bench::BIN_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_sandboxd")));
    let caa = Process::start(name, &bin, args, &envs_ref)?;
    let s = socket.to_path_buf();
    harness::eventually("the hypervisor socket", Duration::from_secs(30), || {
        let s = s.clone();
        async move { Ok(s.exists().then_some(())) }
    })
    .await
    .map_err(|e| anyhow!("{e:#}\n{}", caa.log_tail(30)))?;
    Ok(caa)
}

impl Setup {
    /// Kills CAA (no shutdown path runs) and starts a new one.
    async fn crash_and_restart(&mut self) -> Result<()> {
        self.caa.signal(nix::sys::signal::Signal::SIGKILL);
        self.caa.stop(Duration::from_secs(5));
        self.caa = start_caa(
            &format!("{}-r", self.name),
            &self.args,
            &self.envs,
            &self.socket,
        )
        .await?;
        Ok(())
    }

    /// A new node with its own CAA (same ARM test server, same settings plus `extra`).
    async fn node_caa(
        &self,
        env: &Env,
        label: &str,
        extra: &[(&'static str, String)],
    ) -> Result<NodeCaa> {
        let node = env.unique(&format!("caa-{label}"));
        harness::fake_node(&self.admin, &node, &[], &[]).await?;
        let dir = self.dir.join(label);
        std::fs::create_dir_all(&dir)?;
        let socket = dir.join("hypervisor.sock");
        let mut envs = self.envs.clone();
        envs.retain(|(k, _)| *k != "NODE_NAME" && !extra.iter().any(|(k2, _)| k2 == k));
        envs.push(("NODE_NAME", node.clone()));
        envs.extend(extra.iter().cloned());
        let args = caa_args(&self.kubeconfig, &socket, &dir.join("pods"), &self.arm_base);
        let name = format!("caa-{}-{label}", env.ns);
        let caa = start_caa(&name, &args, &envs, &socket).await?;
        Ok(NodeCaa {
            caa,
            args,
            envs,
            name,
            socket,
            node,
        })
    }
}

impl NodeCaa {
    /// SIGKILLs CAA and starts a new one whose environment is changed by `set` (`None`
    /// removes the variable).
    async fn kill_and_restart(&mut self, set: &[(&'static str, Option<&str>)]) -> Result<()> {
        self.caa.signal(nix::sys::signal::Signal::SIGKILL);
        self.caa.stop(Duration::from_secs(5));
        for (k, v) in set {
            self.envs.retain(|(k2, _)| k2 != k);
            if let Some(v) = v {
                self.envs.push((k, v.to_string()));
            }
        }
        self.name = format!("{}-r", self.name);
        self.caa = start_caa(&self.name, &self.args, &self.envs, &self.socket).await?;
        Ok(())
    }
}

/// A kubeconfig of a ServiceAccount bound to the ClusterRole of `deploy/caa/rbac.yaml`
/// (under a per-test name) and to its namespaced Roles (in the test namespace).
pub(crate) async fn caa_kubeconfig(env: &Env, admin: &Client) -> Result<PathBuf> {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/caa/rbac.yaml"),
    )?;
    let docs: Vec<serde_json::Value> = serde_saphyr::from_multiple(&text)?;
    let role_doc = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .context("ClusterRole in rbac.yaml")?;
    let name = env.unique("sandboxd-caa");
    let mut role: ClusterRole = serde_json::from_value(role_doc.clone())?;
    role.metadata.name = Some(name.clone());
    Api::<ClusterRole>::all(admin.clone())
        .patch(
            &name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&role),
        )
        .await?;
    let binding: ClusterRoleBinding = serde_json::from_value(json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": "sandboxd-caa", "namespace": env.ns}]
    }))?;
    Api::<ClusterRoleBinding>::all(admin.clone())
        .patch(
            &name,
            &PatchParams::apply("test").force(),
            &Patch::Apply(&binding),
        )
        .await?;
    for doc in docs.iter().filter(|d| d["kind"] == "Role") {
        let mut role: Role = serde_json::from_value(doc.clone())?;
        role.metadata.namespace = Some(env.ns.clone());
        let role_name = role.metadata.name.clone().context("Role name")?;
        Api::<Role>::namespaced(admin.clone(), &env.ns)
            .patch(
                &role_name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&role),
            )
            .await?;
        let binding: RoleBinding = serde_json::from_value(json!({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": {"name": role_name, "namespace": env.ns},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role_name},
            "subjects": [{"kind": "ServiceAccount", "name": "sandboxd-caa", "namespace": env.ns}]
        }))?;
        Api::<RoleBinding>::namespaced(admin.clone(), &env.ns)
            .patch(
                &role_name,
                &PatchParams::apply("test").force(),
                &Patch::Apply(&binding),
            )
            .await?;
    }
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), &env.ns);
    let sa: ServiceAccount = serde_json::from_value(json!({"metadata": {"name": "sandboxd-caa"}}))?;
    let _ = sas.create(&PostParams::default(), &sa).await;
    let req = TokenRequest {
        spec: Some(TokenRequestSpec {
            expiration_seconds: Some(3600),
            ..Default::default()
        }),
        ..Default::default()
    };
    let token: TokenRequest = sas
        .create_subresource("token", "sandboxd-caa", &PostParams::default(), &req)
        .await?;
    let token = token.status.and_then(|s| s.token).context("no token")?;
    let path = run_dir().join(format!("{}-caa.kubeconfig", env.ns));
    std::fs::write(
        &path,
        kubeconfig_yaml(&env.cp().server, &env.cp().ca_pem, &UserAuth::Token(token)),
    )?;
    Ok(path)
}

async fn pod(admin: &Client, ns: &str, name: &str, node: &str) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(admin.clone(), ns);
    let p: Pod = serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}
    }))?;
    Ok(pods.create(&PostParams::default(), &p).await?)
}

fn create_request(
    id: &str,
    ns: &str,
    pod: &str,
    extra: &[(&str, &str)],
) -> hypervisor::CreateVMRequest {
    let mut r = hypervisor::CreateVMRequest::new();
    r.id = id.into();
    r.annotations
        .insert(annotations::SANDBOX_NAME.into(), pod.into());
    r.annotations
        .insert(annotations::SANDBOX_NAMESPACE.into(), ns.into());
    for k in [
        annotations::DEFAULT_VCPUS,
        annotations::DEFAULT_MEMORY,
        annotations::DEFAULT_GPUS,
    ] {
        r.annotations.insert(k.into(), "0".into());
    }
    for (k, v) in extra {
        r.annotations.insert(k.to_string(), v.to_string());
    }
    // No pod network namespace: these tests cover the VM lifecycle; the data path (tunnel,
    // agent socket) has its own suite.
    r.networkNamespacePath = String::new();
    r
}

/// A new connection per call, as the shim does.
/// Names of the PeerPod records in `api`'s namespace.
pub(crate) async fn record_names(api: &Api<PeerPod>) -> Result<Vec<String>> {
    Ok(api
        .list(&Default::default())
        .await?
        .items
        .iter()
        .map(|p| p.name_any())
        .collect())
}

async fn hv(socket: &Path) -> Result<hypervisor_ttrpc::HypervisorClient> {
    let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display())).await?;
    Ok(hypervisor_ttrpc::HypervisorClient::new(c))
}

fn ctx() -> ttrpc::context::Context {
    ttrpc::context::with_timeout(Duration::from_secs(120).as_nanos() as i64)
}

async fn lifecycle(env: Env) -> Result<()> {
    let s = setup(&env, "team=infra,sandboxd-node=spoofed").await?;
    let ns = env.ns.as_str();
    let result = async {
        let mut v = hypervisor::VersionRequest::new();
        v.version = "0.0.1".into();
        let version = hv(&s.socket).await?.version(ctx(), &v).await?;
        assert_eq!(version.version, sandboxd::VERSION);

        // Three size paths: resources, machine type, default.
        let cases = [
            (
                "web",
                "0123456789abcdef",
                vec![
                    (annotations::DEFAULT_VCPUS, "4"),
                    (annotations::DEFAULT_MEMORY, "6000"),
                ],
                "Standard_F4s_v2",
            ),
            (
                "api",
                "fedcba9876543210",
                vec![(annotations::MACHINE_TYPE, "Standard_D4as_v5")],
                "Standard_D4as_v5",
            ),
            ("db", "00aa11bb22cc33dd", vec![], "Standard_D2as_v5"),
        ];
        for (name, id, extra, size) in &cases {
            let p = pod(&s.admin, ns, name, &s.node).await?;
            let created = hv(&s.socket)
                .await?
                .create_vm(ctx(), &create_request(id, ns, name, extra))
                .await?;
            assert!(
                created
                    .agentSocketPath
                    .ends_with(&format!("{id}/agent.ttrpc")),
                "{}",
                created.agentSocketPath
            );
            // CreateVM writes nothing: a shim giving up now leaves nothing behind.
            let vm = format!("podvm-{name}-{}", &id[..8]);
            let pps: Api<PeerPod> = Api::namespaced(s.admin.clone(), ns);
            assert!(pps.get_opt(&vm).await?.is_none(), "recorded at CreateVM");
            assert!(!s.arm.vms().iter().any(|v| v.name == vm));
            let mut start = hypervisor::StartVMRequest::new();
            start.id = id.to_string();
            hv(&s.socket).await?.start_vm(ctx(), &start).await?;
            // StartVM recorded the VM (before its create: the crash tests stop CAA there).
            let pp: PeerPod = pps.get(&vm).await?;
            assert_eq!(pp.finalizers(), &["peer.pod/finalizer".to_string()]);
            assert_eq!(pp.owner_references()[0].uid, p.uid().unwrap());
            let view = s
                .arm
                .vms()
                .into_iter()
                .find(|v| v.name == vm)
                .context("VM exists after StartVM")?;
            assert_eq!(&view.size, size, "{name}");
            assert_eq!(view.provisioning_state, "Succeeded");
            assert_eq!(
                view.tags["sandboxd-node"], s.node,
                "user TAGS cannot override ownership tags"
            );
            assert_eq!(view.tags["team"], "infra");
            assert_eq!(view.tags["sandboxd-pod-uid"], p.uid().unwrap());
            assert_eq!(view.tags["sandboxd-sandbox-id"], *id);
            assert!(!view.tags["sandboxd-cluster"].is_empty());
            // Instance id, IP and phase follow StartVM's answer (a background write).
            let pps: Api<PeerPod> = Api::namespaced(s.admin.clone(), ns);
            let pp = harness::eventually(
                "the record shows the running VM",
                Duration::from_secs(10),
                || {
                    let (pps, vm) = (pps.clone(), vm.clone());
                    async move {
                        let pp = pps.get(&vm).await?;
                        let running =
                            pp.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                        Ok((running && !pp.spec.instance_id.is_empty()).then_some(pp))
                    }
                },
            )
            .await?;
            let st = pp.status.clone().unwrap_or_default();
            assert_eq!(st.vm_ip.as_deref(), Some(view.private_ip.as_str()));
            assert!(
                pp.spec
                    .instance_id
                    .ends_with(&format!("/virtualMachines/{vm}"))
            );
        }

        // A machine type outside the allowed list is refused naming both.
        pod(&s.admin, ns, "big", &s.node).await?;
        let err = hv(&s.socket)
            .await?
            .create_vm(
                ctx(),
                &create_request(
                    "9999999999",
                    ns,
                    "big",
                    &[(annotations::MACHINE_TYPE, "Standard_D8as_v5")],
                ),
            )
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("Standard_D8as_v5") && err.contains("Standard_F4s_v2"),
            "{err}"
        );

        let mut info = podvminfo::GetInfoRequest::new();
        info.PodName = "web".into();
        info.PodNamespace = ns.into();
        info.Wait = true;
        let c = ttrpc::r#async::Client::connect(&format!("unix://{}", s.socket.display())).await?;
        let got = podvminfo_ttrpc::PodVmInfoClient::new(c)
            .get_info(ctx(), &info)
            .await?;
        assert!(
            got.VMID.ends_with("/virtualMachines/podvm-web-01234567"),
            "{}",
            got.VMID
        );

        for (_, id, _, _) in &cases {
            let mut stop = hypervisor::StopVMRequest::new();
            stop.id = id.to_string();
            hv(&s.socket).await?.stop_vm(ctx(), &stop).await?;
            // Idempotent: a second StopVM succeeds.
            hv(&s.socket).await?.stop_vm(ctx(), &stop).await?;
        }
        // The VMs are gone when StopVM answers; the records are released right after.
        assert!(s.arm.vms().is_empty(), "{:?}", s.arm.vms());
        let pps: Api<PeerPod> = Api::namespaced(s.admin.clone(), ns);
        let left = harness::eventually("no record left", Duration::from_secs(10), || {
            let pps = pps.clone();
            async move {
                let left = record_names(&pps).await?;
                Ok(left.is_empty().then_some(left))
            }
        })
        .await;
        assert!(
            left.is_ok(),
            "records left: {:?}",
            record_names(&pps).await?
        );
        assert!(
            !s.arm
                .resource_ids()
                .iter()
                .any(|r| r.contains("networkinterfaces") || r.contains("/disks/"))
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    result.map_err(|e| anyhow!("{e:#}\nCAA log:\n{}", s.caa.log_tail(40)))
}

pub(crate) async fn start_pod_vm(s: &Setup, ns: &str, name: &str, id: &str) -> Result<String> {
    pod(&s.admin, ns, name, &s.node).await?;
    start_via(&s.socket, ns, name, id).await
}

/// CreateVM and StartVM of sandbox `id` for pod `ns/name` through `socket`; the VM name.
async fn start_via(socket: &Path, ns: &str, name: &str, id: &str) -> Result<String> {
    hv(socket)
        .await?
        .create_vm(ctx(), &create_request(id, ns, name, &[]))
        .await?;
    let mut start = hypervisor::StartVMRequest::new();
    start.id = id.to_string();
    hv(socket).await?.start_vm(ctx(), &start).await?;
    Ok(format!("podvm-{name}-{}", &id[..8]))
}

/// StopVM of sandbox `id` through `socket`.
pub(crate) async fn stop_via(socket: &Path, id: &str) -> Result<()> {
    let mut stop = hypervisor::StopVMRequest::new();
    stop.id = id.to_string();
    hv(socket).await?.stop_vm(ctx(), &stop).await?;
    Ok(())
}

async fn crash_restart(env: Env) -> Result<()> {
    let mut s = setup(&env, "").await?;
    let ns = env.ns.clone();
    let result =
        async {
            let gone = start_pod_vm(&s, &ns, "gone", "aaaaaaaa00000001").await?;
            let kept = start_pod_vm(&s, &ns, "kept", "bbbbbbbb00000002").await?;
            // A sandbox recorded (CreateVM) but never started when CAA dies.
            pod(&s.admin, &ns, "half", &s.node).await?;
            hv(&s.socket)
                .await?
                .create_vm(ctx(), &create_request("cccccccc00000003", &ns, "half", &[]))
                .await?;
            assert_eq!(s.arm.vms().len(), 2);
            s.caa.signal(nix::sys::signal::Signal::SIGKILL);
            s.caa.stop(Duration::from_secs(5));
            let pods: Api<Pod> = Api::namespaced(s.admin.clone(), &ns);
            for p in ["gone", "half"] {
                pods.delete(
                    p,
                    &kube::api::DeleteParams {
                        grace_period_seconds: Some(0),
                        ..Default::default()
                    },
                )
                .await?;
            }
            harness::eventually("pods gone", Duration::from_secs(30), || {
                let pods = pods.clone();
                async move {
                    Ok((pods.get_opt("gone").await?.is_none()
                        && pods.get_opt("half").await?.is_none())
                    .then_some(()))
                }
            })
            .await?;
            s.crash_and_restart().await?;
            let arm = s.arm.clone();
            let pp: Api<PeerPod> = Api::namespaced(s.admin.clone(), &ns);
            harness::eventually(
                "only the live pod's VM and record remain",
                Duration::from_secs(60),
                || {
                    let (arm, pp, kept, gone) =
                        (arm.clone(), pp.clone(), kept.clone(), gone.clone());
                    async move {
                        let vms: Vec<String> = arm.vms().into_iter().map(|v| v.name).collect();
                        let records = record_names(&pp).await?;
                        Ok((vms == vec![kept.clone()]
                            && records == vec![kept]
                            && !vms.contains(&gone))
                        .then_some(()))
                    }
                },
            )
            .await?;
            // The resumed sandbox still stops cleanly after the restart.
            let mut stop = hypervisor::StopVMRequest::new();
            stop.id = "bbbbbbbb00000002".into();
            hv(&s.socket).await?.stop_vm(ctx(), &stop).await?;
            assert!(s.arm.vms().is_empty());
            Ok::<(), anyhow::Error>(())
        }
        .await;
    result.map_err(|e| anyhow!("{e:#}\nCAA log:\n{}", s.caa.log_tail(40)))
}

async fn sweep(env: Env) -> Result<()> {
    let s = setup(&env, "").await?;
    let ns = env.ns.clone();
    let result = async {
        let owned = start_pod_vm(&s, &ns, "owned", "dddddddd00000004").await?;
        // A VM with this cluster's and node's tags that nothing records (as a CAA that
        // crashed between PUT and record would leave, were records not written first).
        let cluster = Api::<k8s_openapi::api::core::v1::Namespace>::all(s.admin.clone())
            .get("kube-system")
            .await?
            .uid()
            .unwrap();
        let stray = "podvm-stray-eeeeeeee";
        let (subnet, _, image) = s.arm.seed_peer_pods(SUB, "rg", "eastus");
        let provider = stray_provider(&s, subnet)?;
        use sandboxd::cloud::Provider;
        provider
            .create(&sandboxd::cloud::VmSpec {
                name: stray.into(),
                size: "Standard_D2as_v5".into(),
                image_id: image,
                user_data: None,
                ssh_public_key: Some("ssh-ed25519 AAAA test".into()),
                tags: [
                    ("sandboxd-cluster", cluster.as_str()),
                    ("sandboxd-node", s.node.as_str()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            })
            .await?;
        let arm = s.arm.clone();
        harness::eventually("the stray VM swept", Duration::from_secs(30), || {
            let arm = arm.clone();
            async move { Ok((!arm.vms().iter().any(|v| v.name == stray)).then_some(())) }
        })
        .await?;
        assert!(
            s.arm.vms().iter().any(|v| v.name == owned),
            "a recorded VM was swept"
        );
        Ok::<(), anyhow::Error>(())
    }
    .await;
    result.map_err(|e| anyhow!("{e:#}\nCAA log:\n{}", s.caa.log_tail(40)))
}

fn stray_provider(s: &Setup, subnet: String) -> Result<sandboxd::cloud::azure::AzureProvider> {
    provider_at(&s.arm_base, subnet)
}

/// An Azure provider (subscription [`SUB`], resource group `rg`) talking to `base`.
fn provider_at(base: &str, subnet: String) -> Result<sandboxd::cloud::azure::AzureProvider> {
    let url = url::Url::parse(base)?;
    let cfg = sandboxd::config::AzureConfig {
        instance_size: "Standard_D2as_v5".into(),
        instance_sizes: vec!["Standard_D2as_v5".into()],
        subnet_id: subnet,
        nsg_id: None,
        image_id: None,
        region: "eastus".into(),
        resource_group: "rg".into(),
        disable_cvm: true,
        secure_boot: false,
        ssh_username: "peerpod".into(),
        root_volume_gb: None,
        use_public_ip: false,
        os_disk_type: "Premium_LRS".into(),
        os_disk_caching: "ReadWrite".into(),
        zones: Vec::new(),
        image_ids: Vec::new(),
    };
    Ok(sandboxd::cloud::azure::AzureProvider::new(
        SUB,
        &sandboxd::config::AzureCredentials::ClientSecret {
            tenant_id: TENANT_ID.into(),
            client_id: CLIENT_ID.into(),
            client_secret: sandboxd::config::SecretString::new("x"),
        },
        cfg,
        sandboxd::cloud::azure::Endpoints::development(Default::default(), url, None),
        Default::default(),
        sandboxd::cloud::azure::Polling {
            min_interval: Duration::from_millis(20),
            ..Default::default()
        },
    )?)
}
