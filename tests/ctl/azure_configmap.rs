//! `sandboxd ctl azure configmap` as users run it: the built binary against the test
//! control plane and an ARM test server laid out like an OpenShift or AKS cluster's
//! network, with fake nodes carrying Azure provider ids.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Secret};
use kube::Api;
use kube::api::{Patch, PatchParams, PostParams};
use sandboxd::armtest::{self, RuleSeed, SubnetSeed, VnetSeed};
use serde_json::json;

use crate::harness::{self, Case, Env};

/// Subscription of every scenario.
pub const SUB: &str = "6f1d2c3b-4a5e-4f60-9a7b-8c9d0e1f2a3b";
/// A client secret value that must never show up in any output.
pub const CLIENT_SECRET: &str = "doNotPrint-7c1e9b";

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster(
            "ctl::azure_configmap_discovers_group_region_worker_subnet_and_nsg_from_nodes_and_arm",
            discovers,
        ),
        Case::cluster(
            "ctl::azure_configmap_lists_the_subnets_and_fails_until_subnet_is_given_when_none_is_named_worker",
            needs_subnet,
        ),
        Case::cluster(
            "ctl::azure_configmap_names_a_subnet_that_does_not_exist",
            subnet_not_found,
        ),
        Case::cluster(
            "ctl::azure_configmap_names_the_sizes_the_region_does_not_offer",
            size_not_offered,
        ),
        Case::cluster(
            "ctl::azure_configmap_dry_run_prints_the_configmap_and_writes_nothing",
            dry_run,
        ),
        Case::cluster(
            "ctl::azure_configmap_keeps_the_image_id_and_other_keys_already_set",
            keeps_existing,
        ),
        Case::cluster(
            "ctl::azure_configmap_without_credentials_says_how_to_provide_them",
            no_credentials,
        ),
        Case::cluster(
            "ctl::azure_configmap_takes_group_and_subscription_from_flags_for_the_dev_arm_servers_seed",
            dev_seed,
        ),
        Case::cluster(
            "ctl::vm_console_prints_the_serial_log_of_a_pods_vm_from_boot_diagnostics",
            vm_console,
        ),
    ]
}

/// `ctl vm console POD`: the pod's PeerPod names the VM, `peer-pods-cm` the resource group,
/// boot diagnostics the serial log (read through its SAS URI).
async fn vm_console(env: Env) -> Result<()> {
    let arm = Arm::start().await?;
    let (subnet, _, image) = arm.handle.seed_peer_pods(SUB, "rg", "eastus");
    let admin = env.admin().await?;
    let crd = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("deploy/crds/peerpods.confidentialcontainers.org.yaml");
    harness::install_crds(&admin, &crd).await?;
    create_secret(&env, &good_secret()).await?;
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), &env.ns);
    cms.create(
        &PostParams::default(),
        &serde_json::from_value(json!({
            "metadata": {"name": "peer-pods-cm"},
            "data": {"CLOUD_PROVIDER": "azure", "AZURE_RESOURCE_GROUP": "rg", "AZURE_REGION": "eastus",
                     "AZURE_SUBNET_ID": subnet, "AZURE_IMAGE_ID": image},
        }))?,
    )
    .await?;
    // The VM, created as CAA creates it.
    let vm = "podvm-web-0a1b2c3d";
    let url = url::Url::parse(&arm.base)?;
    let cfg = sandboxd::config::PeerPodsConfig::from_map(
        &cms.get("peer-pods-cm").await?.data.unwrap_or_default(),
    )?
    .azure
    .context("azure settings")?;
    let provider = sandboxd::cloud::azure::AzureProvider::new(
        SUB,
        &sandboxd::config::AzureCredentials::ClientSecret {
            tenant_id: "0a1b2c3d-0000-4000-8000-000000000002".into(),
            client_id: "0a1b2c3d-0000-4000-8000-000000000001".into(),
            client_secret: sandboxd::config::SecretString::new(CLIENT_SECRET),
        },
        cfg,
        sandboxd::cloud::azure::Endpoints::development(Default::default(), url, None),
        Default::default(),
        sandboxd::cloud::azure::Polling {
            min_interval: Duration::from_millis(20),
            ..Default::default()
        },
    )?;
    use sandboxd::cloud::Provider as _;
    provider
        .create(&sandboxd::cloud::VmSpec {
            name: vm.into(),
            size: "Standard_DC2as_v5".into(),
            image_id: image,
            user_data: None,
            ssh_public_key: None,
            tags: Default::default(),
        })
        .await?;
    // Pod `web` (held unscheduled by a gate) and its PeerPod. The owner must exist: the
    // controller-manager's garbage collector deletes a PeerPod whose owner uid is unknown.
    let pod: k8s_openapi::api::core::v1::Pod = Api::namespaced(admin.clone(), &env.ns)
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "web"},
                "spec": {"schedulingGates": [{"name": "sandboxd.test/hold"}],
                         "containers": [{"name": "c", "image": "registry.invalid/none"}]},
            }))?,
        )
        .await?;
    let uid = pod.metadata.uid.context("pod uid")?;
    let pp: sandboxd::api::peerpod::PeerPod = serde_json::from_value(json!({
        "apiVersion": "confidentialcontainers.org/v1alpha1", "kind": "PeerPod",
        "metadata": {"name": vm, "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": "web",
                     "uid": uid}]},
        "spec": {"cloudProvider": "azure", "instanceID": "", "vmName": vm, "nodeName": "n1",
                 "podUID": uid, "sandboxId": "0a1b2c3d"},
    }))?;
    Api::<sandboxd::api::peerpod::PeerPod>::namespaced(admin.clone(), &env.ns)
        .create(&PostParams::default(), &pp)
        .await?;
    let pod = format!("{}/web", env.ns);
    let run = ctl(&env, Some(&arm), &["vm", "console", &pod]).await?;
    ensure!(run.code == 0, "{run}");
    ensure!(run.stdout.contains(&format!("{vm} login:")), "{run}");
    let run = ctl(
        &env,
        Some(&arm),
        &["vm", "console", &format!("{}/nope", env.ns)],
    )
    .await?;
    ensure!(
        run.code != 0 && run.stderr.contains("has no peer-pod VM"),
        "{run}"
    );
    Ok(())
}

/// An in-process ARM test server, stopped when dropped.
pub struct Arm {
    /// `http://127.0.0.1:<port>/`.
    pub base: String,
    /// Its state.
    pub handle: armtest::Handle,
    _stop: tokio_util::sync::DropGuard,
}

impl Arm {
    /// Starts a server offering the default sizes in every region.
    pub async fn start() -> Result<Self> {
        let token = tokio_util::sync::CancellationToken::new();
        let (addr, handle, _task) = armtest::serve(
            "127.0.0.1:0".parse()?,
            armtest::Config::default(),
            token.clone(),
        )
        .await?;
        Ok(Self {
            base: format!("http://{addr}/"),
            handle,
            _stop: token.drop_guard(),
        })
    }

    /// The ARM id of resource group `rg`.
    pub fn rg_id(rg: &str) -> String {
        format!("/subscriptions/{SUB}/resourceGroups/{rg}")
    }

    /// An OpenShift-like layout in `rg` (eastus): VNet `<rg>-vnet` with `master-subnet`
    /// and `<rg>-worker-subnet` (10.0.1.0/24, NSG `<rg>-nsg` attached), plus a second,
    /// unattached NSG. Returns (worker subnet id, NSG id).
    pub fn openshift_layout(&self, rg: &str, rules: &[RuleSeed]) -> (String, String) {
        self.handle.seed_resource_group(SUB, rg, "eastus");
        let nsg = self
            .handle
            .seed_nsg(SUB, rg, "eastus", &format!("{rg}-nsg"), rules);
        self.handle
            .seed_nsg(SUB, rg, "eastus", &format!("{rg}-bastion-nsg"), &[]);
        let ids = self.handle.seed_vnet(
            SUB,
            rg,
            "eastus",
            &VnetSeed {
                name: format!("{rg}-vnet"),
                prefixes: vec!["10.0.0.0/16".into()],
                subnets: vec![
                    SubnetSeed {
                        name: "master-subnet".into(),
                        prefix: "10.0.0.0/24".into(),
                        nsg: None,
                    },
                    SubnetSeed {
                        name: format!("{rg}-worker-subnet"),
                        prefix: "10.0.1.0/24".into(),
                        nsg: Some(format!("{rg}-nsg")),
                    },
                ],
            },
        );
        (ids[1].clone(), nsg)
    }
}

/// What a `sandboxd` run left: exit code and output.
pub struct Run {
    /// Exit code.
    pub code: i32,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}\n--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `sandboxd ctl --kubeconfig <test> -n <ns> <args>` with ARM at `arm` (if any) and no
/// `AZURE_*` from the test's own environment.
pub async fn ctl(env: &Env, arm: Option<&Arm>, args: &[&str]) -> Result<Run> {
    let mut cmd = tokio::process::Command::new(Path::new(env!("CARGO_BIN_EXE_sandboxd")));
    cmd.arg("ctl")
        .arg("--kubeconfig")
        .arg(&env.cp().kubeconfig_path)
        .arg("-n")
        .arg(&env.ns)
        .args(args)
        .kill_on_drop(true);
    for (k, _) in std::env::vars() {
        if k.starts_with("AZURE_") {
            cmd.env_remove(k);
        }
    }
    if let Some(arm) = arm {
        // A development endpoint is a command-line flag, never the environment or the
        // configmap.
        cmd.arg("--dev-arm-endpoint").arg(&arm.base);
    }
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .context("sandboxd ctl did not finish in 120 s")??;
    let run = Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    };
    ensure!(
        !run.stdout.contains(CLIENT_SECRET) && !run.stderr.contains(CLIENT_SECRET),
        "the client secret was printed:\n{run}"
    );
    Ok(run)
}

/// `peer-pods-secret` in the test namespace (client secret credential).
pub async fn create_secret(env: &Env, data: &[(&str, &str)]) -> Result<()> {
    let client = env.admin().await?;
    let api: Api<Secret> = Api::namespaced(client, &env.ns);
    let map: BTreeMap<String, String> = data
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let s: Secret = serde_json::from_value(json!({
        "metadata": {"name": "peer-pods-secret"},
        "type": "Opaque",
        "stringData": map,
    }))?;
    api.create(&PostParams::default(), &s).await?;
    Ok(())
}

/// A complete client-secret credential for [`SUB`].
pub fn good_secret() -> Vec<(&'static str, &'static str)> {
    vec![
        ("AZURE_CLIENT_ID", "0a1b2c3d-0000-4000-8000-000000000001"),
        ("AZURE_CLIENT_SECRET", CLIENT_SECRET),
        ("AZURE_TENANT_ID", "0a1b2c3d-0000-4000-8000-000000000002"),
        ("AZURE_SUBSCRIPTION_ID", SUB),
    ]
}

/// Two fake workers labelled `sandboxd.test/ctl=<selector value>` with Azure provider ids in
/// `rg` (one VM, one scale set instance) and `region` as their topology label. Returns the
/// selector.
pub async fn azure_nodes(env: &Env, rg: &str, region: Option<&str>) -> Result<String> {
    let client = env.admin().await?;
    let tag = env.unique("az");
    let nodes: Api<Node> = Api::all(client.clone());
    for (i, pid) in [
        format!(
            "azure:///subscriptions/{SUB}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{tag}-worker-0"
        ),
        format!(
            "azure:///subscriptions/{SUB}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachineScaleSets/{tag}-vmss/virtualMachines/1",
            rg.to_ascii_lowercase()
        ),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("{tag}-{i}");
        let mut labels = vec![("sandboxd.test/ctl", tag.as_str())];
        if let Some(r) = region {
            labels.push(("topology.kubernetes.io/region", r));
        }
        harness::fake_node(&client, &name, &labels, &[]).await?;
        nodes
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"providerID": pid}})),
            )
            .await?;
    }
    Ok(format!("sandboxd.test/ctl={tag}"))
}

/// `peer-pods-cm` of the test namespace, if any.
pub async fn configmap(env: &Env) -> Result<Option<BTreeMap<String, String>>> {
    let api: Api<ConfigMap> = Api::namespaced(env.admin().await?, &env.ns);
    Ok(api
        .get_opt("peer-pods-cm")
        .await?
        .map(|c| c.data.unwrap_or_default()))
}

/// Runs `ctl azure configmap --node-selector SELECTOR EXTRA...`, expects success and returns
/// the `peer-pods-cm` it wrote.
async fn written(
    env: &Env,
    arm: &Arm,
    selector: &str,
    extra: &[&str],
) -> Result<BTreeMap<String, String>> {
    let mut args = vec!["azure", "configmap", "--node-selector", selector];
    args.extend_from_slice(extra);
    let run = ctl(env, Some(arm), &args).await?;
    ensure!(run.code == 0, "{run}");
    configmap(env).await?.context("peer-pods-cm written")
}

fn get<'a>(m: &'a BTreeMap<String, String>, k: &str) -> &'a str {
    m.get(k).map(String::as_str).unwrap_or("<unset>")
}

async fn discovers(env: Env) -> Result<()> {
    let arm = Arm::start().await?;
    let (subnet, nsg) = arm.openshift_layout("ocp-7x2k-rg", &[]);
    let selector = azure_nodes(&env, "ocp-7x2k-rg", Some("eastus")).await?;
    create_secret(&env, &good_secret()).await?;

    let run = ctl(
        &env,
        Some(&arm),
        &["azure", "configmap", "--node-selector", &selector],
    )
    .await?;
    ensure!(run.code == 0, "{run}");
    let cm = configmap(&env).await?.context("peer-pods-cm written")?;
    for (k, v) in [
        ("CLOUD_PROVIDER", "azure"),
        ("VXLAN_PORT", "9000"),
        ("PROXY_TIMEOUT", "5m"),
        ("DISABLECVM", "true"),
        ("AZURE_INSTANCE_SIZE", "Standard_B2als_v2"),
        (
            "AZURE_INSTANCE_SIZES",
            "Standard_B2als_v2,Standard_D2as_v5,Standard_D4as_v5,Standard_D2ads_v5",
        ),
        ("AZURE_REGION", "eastus"),
        ("AZURE_RESOURCE_GROUP", "ocp-7x2k-rg"),
        ("AZURE_SUBNET_ID", subnet.as_str()),
        ("AZURE_NSG_ID", nsg.as_str()),
    ] {
        ensure!(
            get(&cm, k) == v,
            "{k}: {} != {v}\n{cm:#?}\n{run}",
            get(&cm, k)
        );
    }
    // The development endpoint stays on the command line: nothing in the configmap points
    // CAA (and its credentials) anywhere but an Azure cloud.
    for key in [
        "AZURE_RESOURCE_MANAGER_ENDPOINT",
        "AZURE_AUTHORITY_HOST",
        "AZURE_CLOUD",
    ] {
        ensure!(!cm.contains_key(key), "{key} written\n{cm:#?}");
    }
    // The shared validator accepts what was written.
    sandboxd::config::PeerPodsConfig::from_map(&cm)?;
    // Written by sandboxd's field manager with server-side apply.
    let api: Api<ConfigMap> = Api::namespaced(env.admin().await?, &env.ns);
    let stored = api.get("peer-pods-cm").await?;
    let managers: Vec<_> = stored
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            (
                m.manager.unwrap_or_default(),
                m.operation.unwrap_or_default(),
            )
        })
        .collect();
    ensure!(
        managers.contains(&("sandboxd".into(), "Apply".into())),
        "{managers:?}"
    );
    ensure!(
        run.stdout.contains("AZURE_SUBNET_ID") && run.stdout.contains("discovered"),
        "{run}"
    );
    Ok(())
}

/// An AKS-like layout: no subnet named like worker.
fn aks_layout(arm: &Arm, rg: &str) -> Vec<String> {
    arm.handle.seed_resource_group(SUB, rg, "eastus");
    arm.handle
        .seed_nsg(SUB, rg, "eastus", "aks-agentpool-31337-nsg", &[]);
    arm.handle.seed_vnet(
        SUB,
        rg,
        "eastus",
        &VnetSeed {
            name: "aks-vnet-31337".into(),
            prefixes: vec!["10.224.0.0/12".into()],
            subnets: vec![
                SubnetSeed {
                    name: "aks-subnet".into(),
                    prefix: "10.224.0.0/16".into(),
                    nsg: None,
                },
                SubnetSeed {
                    name: "virtual-node-subnet".into(),
                    prefix: "10.225.0.0/16".into(),
                    nsg: None,
                },
            ],
        },
    )
}

async fn needs_subnet(env: Env) -> Result<()> {
    let arm = Arm::start().await?;
    let rg = "mc_aks-rg_demo_eastus";
    let ids = aks_layout(&arm, rg);
    let selector = azure_nodes(&env, rg, None).await?;
    create_secret(&env, &good_secret()).await?;

    let run = ctl(
        &env,
        Some(&arm),
        &["azure", "configmap", "--node-selector", &selector],
    )
    .await?;
    ensure!(run.code != 0, "{run}");
    ensure!(
        run.stderr.contains("no subnet named like \"worker\"")
            && run.stderr.contains("aks-vnet-31337/aks-subnet")
            && run.stderr.contains("aks-vnet-31337/virtual-node-subnet")
            && run.stderr.contains("--subnet"),
        "{run}"
    );
    ensure!(configmap(&env).await?.is_none(), "nothing written");

    let cm = written(&env, &arm, &selector, &["--subnet", "aks-subnet"]).await?;
    ensure!(get(&cm, "AZURE_SUBNET_ID") == ids[0], "{cm:#?}");
    // The only NSG of the group; the region is the resource group's location.
    ensure!(
        get(&cm, "AZURE_NSG_ID").ends_with("/aks-agentpool-31337-nsg"),
        "{cm:#?}"
    );
    ensure!(get(&cm, "AZURE_REGION") == "eastus", "{cm:#?}");
    Ok(())
}

async fn subnet_not_found(env: Env) -> Result<()> {
    let arm = Arm::start().await?;
    arm.openshift_layout("ocp-nf-rg", &[]);
    let selector = azure_nodes(&env, "ocp-nf-rg", Some("eastus")).await?;
    create_secret(&env, &good_secret()).await?;
    let run = ctl(
        &env,
        Some(&arm),
        &[
            "azure",
            "configmap",
            "--node-selector",
            &selector,
            "--subnet",
            "pods-subnet",
        ],
    )
    .await?;
    ensure!(run.code != 0, "{run}");
    ensure!(
        run.stderr
            .contains("subnet \"pods-subnet\" not found in resource group ocp-nf-rg")
            && run
                .stderr
                .contains("ocp-nf-rg-vnet/ocp-nf-rg-worker-subnet"),
        "{run}"
    );
    ensure!(configmap(&env).await?.is_none(), "nothing written");
    Ok(())
}

async fn size_not_offered(env: Env) -> Result<()> {
    let arm = Arm::start().await?;
    arm.openshift_layout("ocp-sz-rg", &[]);
    arm.handle.offer_sizes(
        SUB,
        "westeurope",
        &["Standard_B2als_v2", "Standard_D2as_v5"],
    );
    let selector = azure_nodes(&env, "ocp-sz-rg", Some("westeurope")).await?;
    create_secret(&env, &good_secret()).await?;
    let run = ctl(
        &env,
        Some(&arm),
        &["azure", "configmap", "--node-selector", &selector],
    )
    .await?;
    ensure!(run.code != 0, "{run}");
    ensure!(
        run.stderr.contains(
            "instance sizes Standard_D4as_v5, Standard_D2ads_v5 not offered in region westeurope"
        ),
        "{run}"
    );
    ensure!(configmap(&env).await?.is_none(), "nothing written");

    let cm = written(
        &env,
        &arm,
        &selector,
        &["--instance-sizes", "Standard_B2als_v2,Standard_D2as_v5"],
    )
    .await?;
    ensure!(
        get(&cm, "AZURE_INSTANCE_SIZES") == "Standard_B2als_v2,Standard_D2as_v5"
            && get(&cm, "AZURE_REGION") == "westeurope",
        "{cm:#?}"
    );
    Ok(())
}

async fn dry_run(env: Env) -> Result<()> {
    let arm = Arm::start().await?;
    let (subnet, _) = arm.openshift_layout("ocp-dr-rg", &[]);
    let selector = azure_nodes(&env, "ocp-dr-rg", Some("eastus")).await?;
    create_secret(&env, &good_secret()).await?;
    let run = ctl(
        &env,
        Some(&arm),
        &[
            "-o",
            "yaml",
            "azure",
            "configmap",
            "--node-selector",
            &selector,
            "--dry-run",
        ],
    )
    .await?;
    ensure!(run.code == 0, "{run}");
    let printed: ConfigMap =
        serde_saphyr::from_str(&run.stdout).context("stdout is a ConfigMap")?;
    ensure!(
        printed.metadata.name.as_deref() == Some("peer-pods-cm"),
        "{run}"
    );
    ensure!(
        printed.metadata.namespace.as_deref() == Some(env.ns.as_str()),
        "{run}"
    );
    let data = printed.data.unwrap_or_default();
    ensure!(get(&data, "AZURE_SUBNET_ID") == subnet, "{run}");
    ensure!(get(&data, "VXLAN_PORT") == "9000", "{run}");
    ensure!(configmap(&env).await?.is_none(), "dry run wrote nothing");

    let run = ctl(
        &env,
        Some(&arm),
        &[
            "-o",
            "json",
            "azure",
            "configmap",
            "--node-selector",
            &selector,
            "--dry-run",
        ],
    )
    .await?;
    ensure!(run.code == 0, "{run}");
    let v: serde_json::Value = serde_json::from_str(&run.stdout)?;
    ensure!(v["data"]["AZURE_SUBNET_ID"] == subnet.as_str(), "{run}");
    ensure!(configmap(&env).await?.is_none(), "dry run wrote nothing");
    Ok(())
}

async fn keeps_existing(env: Env) -> Result<()> {
    let arm = Arm::start().await?;
    let (subnet, _) = arm.openshift_layout("ocp-ke-rg", &[]);
    let selector = azure_nodes(&env, "ocp-ke-rg", Some("eastus")).await?;
    create_secret(&env, &good_secret()).await?;
    let image = format!(
        "{}/providers/Microsoft.Compute/galleries/g/images/podvm/versions/1.2.3",
        Arm::rg_id("ocp-ke-rg")
    );
    // Written by the user (another field manager), as the seed's YAML would be.
    let api: Api<ConfigMap> = Api::namespaced(env.admin().await?, &env.ns);
    let cm: ConfigMap = serde_json::from_value(json!({
        "metadata": {"name": "peer-pods-cm"},
        "data": {"AZURE_IMAGE_ID": image, "VXLAN_PORT": "4790", "TAGS": "team=peerpods"}
    }))?;
    api.create(&PostParams::default(), &cm).await?;

    let cm = written(&env, &arm, &selector, &[]).await?;
    ensure!(get(&cm, "AZURE_IMAGE_ID") == image, "{cm:#?}");
    ensure!(get(&cm, "VXLAN_PORT") == "4790", "{cm:#?}");
    ensure!(get(&cm, "TAGS") == "team=peerpods", "{cm:#?}");
    ensure!(get(&cm, "AZURE_SUBNET_ID") == subnet, "{cm:#?}");
    ensure!(get(&cm, "PROXY_TIMEOUT") == "5m", "{cm:#?}");

    // A flag still wins over what is kept.
    let cm = written(&env, &arm, &selector, &["--vxlan-port", "9000"]).await?;
    ensure!(
        get(&cm, "VXLAN_PORT") == "9000" && get(&cm, "AZURE_IMAGE_ID") == image,
        "{cm:#?}"
    );
    Ok(())
}

async fn no_credentials(env: Env) -> Result<()> {
    let arm = Arm::start().await?;
    arm.openshift_layout("ocp-nc-rg", &[]);
    let selector = azure_nodes(&env, "ocp-nc-rg", Some("eastus")).await?;
    let run = ctl(
        &env,
        Some(&arm),
        &["azure", "configmap", "--node-selector", &selector],
    )
    .await?;
    ensure!(run.code != 0, "{run}");
    ensure!(
        run.stderr.contains("no Azure credentials")
            && run.stderr.contains("sandboxd ctl azure secret"),
        "{run}"
    );
    // A secret missing a key is named by key.
    create_secret(
        &env,
        &[
            ("AZURE_CLIENT_SECRET", CLIENT_SECRET),
            ("AZURE_SUBSCRIPTION_ID", SUB),
        ],
    )
    .await?;
    let run = ctl(
        &env,
        Some(&arm),
        &["azure", "configmap", "--node-selector", &selector],
    )
    .await?;
    ensure!(run.code != 0, "{run}");
    ensure!(
        run.stderr.contains("AZURE_TENANT_ID") && run.stderr.contains("AZURE_CLIENT_ID"),
        "{run}"
    );
    Ok(())
}

/// What `sandboxd dev arm-server --seed-subscription` lays out (the demo's Azure), with
/// nodes that carry no Azure provider id: the group and subscription come from flags, the
/// region from the group, the subnet is the one named `worker`, the NSG the only one.
async fn dev_seed(env: Env) -> Result<()> {
    let arm = Arm::start().await?;
    let (subnet, nsg, _) = arm.handle.seed_peer_pods(SUB, "rg", "eastus");
    create_secret(&env, &good_secret()).await?;
    let none = format!("sandboxd.test/ctl={}", env.unique("nobody"));
    // Without flags there is nothing to go on.
    let run = ctl(
        &env,
        Some(&arm),
        &["azure", "configmap", "--node-selector", &none],
    )
    .await?;
    ensure!(run.code != 0, "{run}");
    ensure!(
        run.stderr.contains("cannot tell the resource group")
            && run.stderr.contains("--resource-group"),
        "{run}"
    );
    let run = ctl(
        &env,
        Some(&arm),
        &[
            "azure",
            "configmap",
            "--node-selector",
            &none,
            "--resource-group",
            "rg",
            "--subscription",
            SUB,
        ],
    )
    .await?;
    ensure!(run.code == 0, "{run}");
    let cm = configmap(&env).await?.context("written")?;
    ensure!(
        get(&cm, "AZURE_SUBNET_ID") == subnet
            && get(&cm, "AZURE_NSG_ID") == nsg
            && get(&cm, "AZURE_REGION") == "eastus"
            && get(&cm, "AZURE_RESOURCE_GROUP") == "rg",
        "{cm:#?}"
    );
    Ok(())
}
