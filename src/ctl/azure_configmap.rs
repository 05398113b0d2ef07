//! `sandboxd ctl azure configmap`: the seed's configmap step in one validated command.
//!
//! Subscription and resource group come from the nodes' `providerID` (or flags), the region
//! from their `topology.kubernetes.io/region` label (or the resource group's location), the
//! VNet, worker subnet and NSG from ARM as the seed finds them with `az`. When the choice is
//! not clear (several candidates, or no subnet named like `worker` as on AKS) the candidates
//! are listed and `--subnet` / `--nsg` decide. Every instance size is checked against the
//! region. `peer-pods-cm` is written with server-side apply, keeping every key already set
//! (`AZURE_IMAGE_ID` above all); flags override, the seed's values fill the rest.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Node};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use serde_json::json;

use super::azure_arm::{self, Azure, EndpointArgs, Subnet, Vnet};
use super::{Ctx, Output};
use crate::api::names::CONFIG_MAP;
use crate::cloud::azure::AzureCloud;
use crate::cloud::azure::cloud::CLOUD_KEY;
use crate::config::PeerPodsConfig;

/// The seed's default instance size.
pub(crate) const SEED_INSTANCE_SIZE: &str = "Standard_B2als_v2";
/// The seed's allowed instance sizes.
pub(crate) const SEED_INSTANCE_SIZES: &str =
    "Standard_B2als_v2,Standard_D2as_v5,Standard_D4as_v5,Standard_D2ads_v5";
/// The seed's VXLAN port (the upstream 4789 collides with Calico).
pub(crate) const SEED_VXLAN_PORT: &str = "9000";
/// The seed's proxy timeout.
pub(crate) const SEED_PROXY_TIMEOUT: &str = "5m";
/// Node label holding the region.
pub(crate) const REGION_LABEL: &str = "topology.kubernetes.io/region";

/// Flags of `ctl azure configmap` (boxed: they are many, and the command enum stays small).
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The flags.
    #[command(flatten)]
    pub(crate) flags: Box<Flags>,
}

/// The flags of `ctl azure configmap`.
#[derive(Debug, clap::Args)]
pub(crate) struct Flags {
    /// Subscription id; default: from the nodes' providerID, else the credentials'.
    #[arg(long)]
    pub(crate) subscription: Option<String>,
    /// Resource group holding the cluster's network; default: from the nodes' providerID.
    #[arg(long)]
    pub(crate) resource_group: Option<String>,
    /// Azure region; default: the nodes' topology.kubernetes.io/region label, else the
    /// resource group's location.
    #[arg(long)]
    pub(crate) region: Option<String>,
    /// Only consider subnets of this virtual network.
    #[arg(long)]
    pub(crate) vnet: Option<String>,
    /// The subnet for pod VMs: a name, `<vnet>/<name>`, or a full subnet id.
    #[arg(long)]
    pub(crate) subnet: Option<String>,
    /// The NSG for pod VMs: a name (in the resource group) or a full id.
    #[arg(long)]
    pub(crate) nsg: Option<String>,
    /// Default instance size (AZURE_INSTANCE_SIZE).
    #[arg(long)]
    pub(crate) instance_size: Option<String>,
    /// Comma-separated allowed instance sizes (AZURE_INSTANCE_SIZES).
    #[arg(long)]
    pub(crate) instance_sizes: Option<String>,
    /// VXLAN port (VXLAN_PORT).
    #[arg(long)]
    pub(crate) vxlan_port: Option<u16>,
    /// Pod VM image id (AZURE_IMAGE_ID); default: keep the current one (the image job fills
    /// it when empty).
    #[arg(long)]
    pub(crate) image_id: Option<String>,
    /// Create Confidential VMs (DISABLECVM=false).
    #[arg(long)]
    pub(crate) confidential: bool,
    /// Label selector of the nodes whose providerID and region are read (default: all).
    #[arg(long, default_value = "")]
    pub(crate) node_selector: String,
    /// Print the ConfigMap instead of writing it.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// ARM and Entra ID endpoints.
    #[command(flatten)]
    pub(crate) endpoints: EndpointArgs,
}

/// Why the configmap cannot be written.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Nodes or flags do not tell the subscription/resource group.
    #[error("cannot tell the resource group: {0}; pass --resource-group (and --subscription)")]
    ResourceGroupUnknown(String),
    /// Nodes disagree.
    #[error("nodes disagree on the {what}: {}; pass --{flag}", .values.join(", "))]
    Conflicting {
        /// What.
        what: &'static str,
        /// The flag that settles it.
        flag: &'static str,
        /// The distinct values.
        values: Vec<String>,
    },
    /// `--subnet` (or the configmap's subnet) names no subnet.
    #[error("subnet {wanted:?} not found in resource group {rg}; subnets there:\n{}", list(.candidates))]
    SubnetNotFound {
        /// What was asked for.
        wanted: String,
        /// The resource group searched.
        rg: String,
        /// The subnets there.
        candidates: Vec<String>,
    },
    /// Several or no candidate subnets.
    #[error("{reason}; choose one with --subnet:\n{}", list(.candidates))]
    SubnetChoice {
        /// Why no subnet was chosen.
        reason: String,
        /// The subnets.
        candidates: Vec<String>,
    },
    /// `--nsg` (or the configmap's NSG) names no NSG.
    #[error("network security group {wanted:?} not found in resource group {rg}; NSGs there:\n{}", list(.candidates))]
    NsgNotFound {
        /// What was asked for.
        wanted: String,
        /// The resource group searched.
        rg: String,
        /// The NSGs there.
        candidates: Vec<String>,
    },
    /// Several NSGs and none attached to the subnet.
    #[error("{reason}; choose one with --nsg:\n{}", list(.candidates))]
    NsgChoice {
        /// Why no NSG was chosen.
        reason: String,
        /// The NSGs.
        candidates: Vec<String>,
    },
    /// Sizes the region does not offer.
    #[error(
        "instance size{} {} not offered in region {region}; pick sizes the region offers \
         (az vm list-sizes -l {region}) with --instance-size / --instance-sizes",
        if .sizes.len() > 1 { "s" } else { "" }, .sizes.join(", ")
    )]
    SizesNotOffered {
        /// The missing sizes.
        sizes: Vec<String>,
        /// The region.
        region: String,
    },
    /// The resulting map fails the shared validator.
    #[error(transparent)]
    Invalid(#[from] crate::config::Error),
    /// Azure.
    #[error(transparent)]
    Azure(#[from] azure_arm::Error),
    /// Kubernetes.
    #[error("Kubernetes: {0}")]
    Kube(#[from] kube::Error),
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        return "  (none)".into();
    }
    items
        .iter()
        .map(|i| format!("  {i}"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn describe_subnet(s: &Subnet) -> String {
    format!("{}/{}  {}  {}", s.vnet, s.name, s.prefixes.join(","), s.id)
}

/// What the nodes tell: distinct (subscription, resource group) pairs and regions.
#[derive(Debug, Default, PartialEq)]
pub(crate) struct NodeFacts {
    /// `(subscription, resource group)` from `azure://` provider ids.
    pub(crate) groups: Vec<(String, String)>,
    /// Region labels.
    pub(crate) regions: Vec<String>,
}

/// Reads the facts of `nodes`.
pub(crate) fn node_facts(nodes: &[Node]) -> NodeFacts {
    let mut f = NodeFacts::default();
    for n in nodes {
        if let Some(id) = n
            .spec
            .as_ref()
            .and_then(|s| s.provider_id.as_deref())
            .filter(|p| p.starts_with("azure://"))
            .and_then(azure_arm::parse_arm_id)
        {
            // Scale set provider ids are lower-cased: compare without case, keep the first.
            if !f.groups.iter().any(|(s, r)| {
                s.eq_ignore_ascii_case(&id.subscription)
                    && r.eq_ignore_ascii_case(&id.resource_group)
            }) {
                f.groups.push((id.subscription, id.resource_group));
            }
        }
        if let Some(r) = n.metadata.labels.as_ref().and_then(|l| l.get(REGION_LABEL))
            && !f.regions.contains(r)
        {
            f.regions.push(r.clone());
        }
    }
    f
}

/// Picks the subnet: `wanted` (name, `vnet/name` or id) when given, else the only subnet
/// named like `worker`.
pub(crate) fn choose_subnet(
    vnets: &[Vnet],
    wanted: Option<&str>,
    only_vnet: Option<&str>,
    rg: &str,
) -> Result<Subnet, Error> {
    let all: Vec<&Subnet> = vnets
        .iter()
        .filter(|v| only_vnet.is_none_or(|o| v.name.eq_ignore_ascii_case(o)))
        .flat_map(|v| v.subnets.iter())
        .collect();
    let candidates = || all.iter().map(|s| describe_subnet(s)).collect::<Vec<_>>();
    if let Some(w) = wanted {
        let hits: Vec<&&Subnet> = all
            .iter()
            .filter(|s| {
                s.id.eq_ignore_ascii_case(w)
                    || format!("{}/{}", s.vnet, s.name).eq_ignore_ascii_case(w)
                    || s.name.eq_ignore_ascii_case(w)
            })
            .collect();
        return match hits.as_slice() {
            [one] => Ok((**one).clone()),
            [] => Err(Error::SubnetNotFound {
                wanted: w.to_string(),
                rg: rg.to_string(),
                candidates: candidates(),
            }),
            many => Err(Error::SubnetChoice {
                reason: format!("{} subnets are named {w:?}", many.len()),
                candidates: many.iter().map(|s| describe_subnet(s)).collect(),
            }),
        };
    }
    if all.is_empty() {
        return Err(Error::SubnetChoice {
            reason: format!("no virtual network with subnets in resource group {rg}"),
            candidates: Vec::new(),
        });
    }
    let workers: Vec<&&Subnet> = all
        .iter()
        .filter(|s| s.name.to_ascii_lowercase().contains("worker"))
        .collect();
    match workers.as_slice() {
        [one] => Ok((**one).clone()),
        [] => Err(Error::SubnetChoice {
            reason: format!(
                "no subnet named like \"worker\" among the {} subnets of resource group {rg}",
                all.len()
            ),
            candidates: candidates(),
        }),
        many => Err(Error::SubnetChoice {
            reason: format!(
                "{} subnets named like \"worker\" in resource group {rg}",
                many.len()
            ),
            candidates: candidates(),
        }),
    }
}

/// Picks the NSG: `wanted` (name or id), else the subnet's own, else the only one in the
/// resource group; `None` when there is none.
pub(crate) fn choose_nsg(
    nsgs: &[(String, String)],
    wanted: Option<&str>,
    subnet: &Subnet,
    rg: &str,
) -> Result<Option<String>, Error> {
    let describe = || {
        nsgs.iter()
            .map(|(name, id)| format!("{name}  {id}"))
            .collect::<Vec<_>>()
    };
    if let Some(w) = wanted {
        return nsgs
            .iter()
            .find(|(name, id)| name.eq_ignore_ascii_case(w) || id.eq_ignore_ascii_case(w))
            .map(|(_, id)| Some(id.clone()))
            .ok_or_else(|| Error::NsgNotFound {
                wanted: w.to_string(),
                rg: rg.to_string(),
                candidates: describe(),
            });
    }
    if let Some(id) = &subnet.nsg_id {
        return Ok(Some(id.clone()));
    }
    match nsgs {
        [] => Ok(None),
        [(_, id)] => Ok(Some(id.clone())),
        _ => Err(Error::NsgChoice {
            reason: format!(
                "subnet {} has no NSG attached and resource group {rg} has {}",
                subnet.name,
                nsgs.len()
            ),
            candidates: describe(),
        }),
    }
}

/// Where a value came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Source {
    /// A flag.
    Flag,
    /// Already in `peer-pods-cm`.
    Existing,
    /// Found through the nodes or ARM.
    Discovered,
    /// The seed's default.
    Default,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Flag => "flag",
            Source::Existing => "kept",
            Source::Discovered => "discovered",
            Source::Default => "default",
        }
    }
}

/// The existing value of `key` when non-empty.
fn existing<'a>(cm: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
    cm.get(key).map(|v| v.trim()).filter(|v| !v.is_empty())
}

/// flag > existing > fallback.
fn pick(
    flag: Option<String>,
    cm: &BTreeMap<String, String>,
    key: &str,
    fallback: Option<(String, Source)>,
) -> Option<(String, Source)> {
    flag.map(|f| (f, Source::Flag))
        .or_else(|| existing(cm, key).map(|v| (v.to_string(), Source::Existing)))
        .or(fallback)
}

/// Where the cluster runs, as the flags, `peer-pods-cm` and the nodes tell it (no ARM).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Location {
    /// `AZURE_RESOURCE_GROUP`.
    pub(crate) resource_group: (String, Source),
    /// The subscription to read: the flag, else the nodes'; `None`: the credentials'.
    pub(crate) subscription: Option<String>,
    /// `AZURE_REGION` when known without ARM; `None`: the resource group's location.
    pub(crate) region: Option<(String, Source)>,
}

/// Decides the location: a flag, then `peer-pods-cm`, then the nodes (whose
/// `providerID`s and region labels must agree unless a flag settles it).
pub(crate) fn locate(
    flags: &Flags,
    current: &BTreeMap<String, String>,
    facts: &NodeFacts,
) -> Result<Location, Error> {
    let node_group = match facts.groups.as_slice() {
        [] => None,
        [one] => Some(one.clone()),
        many => {
            if flags.resource_group.is_none() {
                return Err(Error::Conflicting {
                    what: "subscription and resource group (providerID)",
                    flag: "resource-group",
                    values: many.iter().map(|(s, r)| format!("{s}/{r}")).collect(),
                });
            }
            None
        }
    };
    let resource_group = pick(
        flags.resource_group.clone(),
        current,
        "AZURE_RESOURCE_GROUP",
        node_group
            .as_ref()
            .map(|(_, rg)| (rg.clone(), Source::Discovered)),
    )
    .ok_or_else(|| {
        Error::ResourceGroupUnknown(
            "no node has an azure:// providerID and peer-pods-cm has no AZURE_RESOURCE_GROUP"
                .into(),
        )
    })?;
    let subscription = flags
        .subscription
        .clone()
        .or_else(|| node_group.map(|(s, _)| s));
    let region = match pick(flags.region.clone(), current, "AZURE_REGION", None) {
        Some(v) => Some(v),
        None => match facts.regions.as_slice() {
            [one] => Some((one.clone(), Source::Discovered)),
            [] => None,
            many => {
                return Err(Error::Conflicting {
                    what: "region (topology.kubernetes.io/region)",
                    flag: "region",
                    values: many.to_vec(),
                });
            }
        },
    };
    Ok(Location {
        resource_group,
        subscription,
        region,
    })
}

/// What ARM told about the network and the region.
#[derive(Clone, Debug)]
pub(crate) struct Found {
    /// `AZURE_REGION`.
    pub(crate) region: (String, Source),
    /// The subnet of `AZURE_SUBNET_ID`.
    pub(crate) subnet: (Subnet, Source),
    /// `AZURE_NSG_ID`, if any.
    pub(crate) nsg: Option<(String, Source)>,
    /// The sizes the region offers.
    pub(crate) offered_sizes: Vec<String>,
    /// The cloud the endpoints point at.
    pub(crate) cloud: AzureCloud,
}

/// The configmap to write: every key, and where each value came from.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Planned {
    /// The data of `peer-pods-cm`.
    pub(crate) data: BTreeMap<String, String>,
    /// Where each value of [`Self::data`] came from (keys absent here were kept as they were).
    pub(crate) sources: BTreeMap<String, Source>,
}

/// The configmap for `found` at `resource_group`: every key of `current` kept, flags
/// override, the seed's values fill the rest. Fails on an instance size the region does not
/// offer and on a map the shared validator refuses.
pub(crate) fn plan(
    flags: &Flags,
    current: &BTreeMap<String, String>,
    resource_group: (String, Source),
    found: Found,
) -> Result<Planned, Error> {
    let mut planned = Planned {
        data: current.clone(),
        sources: BTreeMap::new(),
    };
    let mut set = |key: &str, (value, source): (String, Source)| {
        planned.data.insert(key.to_string(), value);
        planned.sources.insert(key.to_string(), source);
    };
    let region = found.region.0.clone();
    set("AZURE_RESOURCE_GROUP", resource_group);
    set("AZURE_REGION", found.region);
    set("AZURE_SUBNET_ID", (found.subnet.0.id, found.subnet.1));
    if let Some(nsg) = found.nsg {
        set("AZURE_NSG_ID", nsg);
    }

    // Sizes, checked against the region.
    let size = pick(
        flags.instance_size.clone(),
        current,
        "AZURE_INSTANCE_SIZE",
        Some((SEED_INSTANCE_SIZE.into(), Source::Default)),
    )
    .expect("fallback given");
    let sizes = pick(
        flags.instance_sizes.clone(),
        current,
        "AZURE_INSTANCE_SIZES",
        Some((SEED_INSTANCE_SIZES.into(), Source::Default)),
    )
    .expect("fallback given");
    let mut missing: Vec<String> = Vec::new();
    for s in std::iter::once(size.0.as_str()).chain(sizes.0.split(',')) {
        let s = s.trim();
        if !s.is_empty()
            && !found
                .offered_sizes
                .iter()
                .any(|o| o.eq_ignore_ascii_case(s))
            && !missing.iter().any(|m| m.eq_ignore_ascii_case(s))
        {
            missing.push(s.to_string());
        }
    }
    if !missing.is_empty() {
        return Err(Error::SizesNotOffered {
            sizes: missing,
            region,
        });
    }
    set("AZURE_INSTANCE_SIZE", size);
    set("AZURE_INSTANCE_SIZES", sizes);

    // The seed's defaults for everything else the user has not set.
    set("CLOUD_PROVIDER", ("azure".into(), Source::Default));
    let defaults = [
        (
            "VXLAN_PORT",
            flags.vxlan_port.map(|p| p.to_string()),
            SEED_VXLAN_PORT,
        ),
        ("PROXY_TIMEOUT", None, SEED_PROXY_TIMEOUT),
        (
            "DISABLECVM",
            flags.confidential.then(|| "false".to_string()),
            "true",
        ),
        ("AZURE_IMAGE_ID", flags.image_id.clone(), ""),
    ];
    for (key, flag, default) in defaults {
        let v = pick(flag, current, key, Some((default.into(), Source::Default)));
        set(key, v.expect("fallback given"));
    }
    // The cloud (never an endpoint: a development endpoint stays a flag of each command).
    if found.cloud != AzureCloud::Public {
        let source = if flags.endpoints.cloud.is_some() {
            Source::Flag
        } else {
            Source::Existing
        };
        set(CLOUD_KEY, (found.cloud.name().to_string(), source));
    }
    PeerPodsConfig::from_map(&planned.data).map_err(Error::Invalid)?;
    Ok(planned)
}

/// Run the command: read the cluster and ARM, [`plan`], write (or print) the configmap.
pub(crate) async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<()> {
    let args = *args.flags;
    let client = ctx.client().await?;
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), &ctx.namespace);
    let current: BTreeMap<String, String> = cms
        .get_opt(CONFIG_MAP)
        .await
        .map_err(Error::Kube)?
        .and_then(|c| c.data)
        .unwrap_or_default();

    // Subscription, resource group and region: flags, the configmap, the nodes.
    let nodes: Api<Node> = Api::all(client.clone());
    let mut lp = ListParams::default();
    if !args.node_selector.is_empty() {
        lp = lp.labels(&args.node_selector);
    }
    let facts = node_facts(&nodes.list(&lp).await.map_err(Error::Kube)?.items);
    let location = locate(&args, &current, &facts)?;
    let subscription = location.subscription.clone();
    let secret = azure_arm::credentials(&client, &ctx.namespace, subscription.as_deref()).await?;
    let endpoints = super::azure_arm::resolve_endpoints(&args.endpoints, &current)?;
    let mut secret = secret;
    if let Some(s) = &subscription {
        if !secret.subscription_id.eq_ignore_ascii_case(s) {
            eprintln!(
                "warning: the credentials name subscription {} but the cluster runs in {s}; reading {s}",
                secret.subscription_id
            );
        }
        secret.subscription_id = s.clone();
    }
    let azure = Azure::new(&secret, &endpoints)?;
    let rg_name = location.resource_group.0.clone();
    let region = match location.region {
        Some(r) => r,
        None => (
            azure.resource_group_location(&rg_name).await?,
            Source::Discovered,
        ),
    };

    // Subnet: flag, configmap (must still exist), the one named like worker.
    let vnets = azure.vnets(&rg_name).await?;
    let subnet = match (&args.subnet, existing(&current, "AZURE_SUBNET_ID")) {
        (Some(w), _) => (
            resolve_subnet(&azure, &vnets, w, args.vnet.as_deref(), &rg_name).await?,
            Source::Flag,
        ),
        (None, Some(id)) => (
            resolve_subnet(&azure, &vnets, id, None, &rg_name).await?,
            Source::Existing,
        ),
        (None, None) => (
            choose_subnet(&vnets, None, args.vnet.as_deref(), &rg_name)?,
            Source::Discovered,
        ),
    };
    let nsg_names = || async {
        Ok::<_, Error>(
            azure
                .nsgs(&rg_name)
                .await?
                .into_iter()
                .map(|n| (n.name, n.id))
                .collect::<Vec<_>>(),
        )
    };
    let nsg = match (&args.nsg, existing(&current, "AZURE_NSG_ID")) {
        (Some(w), _) => resolve_nsg(&azure, &nsg_names().await?, w, &subnet.0, &rg_name)
            .await?
            .map(|id| (id, Source::Flag)),
        (None, Some(id)) => resolve_nsg(&azure, &nsg_names().await?, id, &subnet.0, &rg_name)
            .await?
            .map(|id| (id, Source::Existing)),
        (None, None) => choose_nsg(&nsg_names().await?, None, &subnet.0, &rg_name)?
            .map(|id| (id, Source::Discovered)),
    };
    if nsg.is_none() {
        eprintln!(
            "warning: no network security group in resource group {rg_name}; AZURE_NSG_ID left unset"
        );
    }
    let offered_sizes = azure.sizes(&region.0).await?;
    let found = Found {
        region,
        subnet,
        nsg,
        offered_sizes,
        cloud: endpoints.azure_cloud(),
    };
    let Planned { data, sources } = plan(&args, &current, location.resource_group, found)?;

    let cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": CONFIG_MAP, "namespace": ctx.namespace},
        "data": data,
    }))?;
    let shown = if args.dry_run {
        cm.clone()
    } else {
        // Forced: the keys the user wrote with another manager are carried over unchanged
        // (they are in `data`), so taking them over loses nothing.
        cms.patch(
            CONFIG_MAP,
            &PatchParams::apply(crate::k8s::FIELD_MANAGER).force(),
            &Patch::Apply(&cm),
        )
        .await
        .map_err(Error::Kube)?
    };
    match ctx.output {
        Output::Yaml => print!("{}", to_yaml(&shown)?),
        Output::Json => println!("{}", serde_json::to_string_pretty(&shown)?),
        Output::Table => {
            let width = data.keys().map(String::len).max().unwrap_or(0);
            for (k, v) in &data {
                let src = sources.get(k).copied().unwrap_or(Source::Existing);
                println!("{k:width$}  {v}  ({})", src.as_str());
            }
            if args.dry_run {
                println!(
                    "dry run: {CONFIG_MAP} not written (namespace {})",
                    ctx.namespace
                );
            } else {
                println!("{CONFIG_MAP} applied in namespace {}", ctx.namespace);
            }
        }
    }
    Ok(())
}

fn to_yaml(cm: &ConfigMap) -> anyhow::Result<String> {
    let mut v = serde_json::to_value(cm)?;
    if let Some(m) = v["metadata"].as_object_mut() {
        m.remove("managedFields");
    }
    Ok(serde_saphyr::to_string(&v)?)
}

/// `wanted` among the resource group's subnets, or by id anywhere.
async fn resolve_subnet(
    azure: &Azure,
    vnets: &[Vnet],
    wanted: &str,
    only_vnet: Option<&str>,
    rg: &str,
) -> Result<Subnet, Error> {
    match choose_subnet(vnets, Some(wanted), only_vnet, rg) {
        Err(Error::SubnetNotFound { .. }) if wanted.starts_with('/') => {
            // A subnet in another resource group (a shared VNet).
            let found = azure.vnet_of_subnet(wanted).await?.and_then(|v| {
                v.subnets
                    .into_iter()
                    .find(|s| s.id.eq_ignore_ascii_case(wanted))
            });
            found.ok_or_else(|| Error::SubnetNotFound {
                wanted: wanted.to_string(),
                rg: rg.to_string(),
                candidates: vnets
                    .iter()
                    .flat_map(|v| v.subnets.iter())
                    .map(describe_subnet)
                    .collect(),
            })
        }
        other => other,
    }
}

/// `wanted` among the resource group's NSGs, or by id anywhere.
async fn resolve_nsg(
    azure: &Azure,
    nsgs: &[(String, String)],
    wanted: &str,
    subnet: &Subnet,
    rg: &str,
) -> Result<Option<String>, Error> {
    match choose_nsg(nsgs, Some(wanted), subnet, rg) {
        Err(e @ Error::NsgNotFound { .. }) if wanted.starts_with('/') => {
            match azure.nsg(wanted).await? {
                Some(n) => Ok(Some(n.id)),
                None => Err(e),
            }
        }
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subnet(vnet: &str, name: &str, nsg: Option<&str>) -> Subnet {
        Subnet {
            id: format!(
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/{vnet}/subnets/{name}"
            ),
            name: name.into(),
            vnet: vnet.into(),
            prefixes: vec!["10.0.1.0/24".into()],
            nsg_id: nsg.map(str::to_string),
        }
    }

    fn vnet(name: &str, subnets: Vec<Subnet>) -> Vnet {
        Vnet {
            id: format!("/x/{name}"),
            name: name.into(),
            prefixes: vec!["10.0.0.0/16".into()],
            subnets,
        }
    }

    #[test]
    fn the_one_subnet_named_like_worker_is_chosen() {
        let v = vec![vnet(
            "cluster-vnet",
            vec![
                subnet("cluster-vnet", "master-subnet", None),
                subnet("cluster-vnet", "cluster-worker-subnet", None),
            ],
        )];
        assert_eq!(
            choose_subnet(&v, None, None, "rg").unwrap().name,
            "cluster-worker-subnet"
        );
    }

    #[test]
    fn without_a_worker_subnet_every_subnet_is_listed() {
        let v = vec![vnet(
            "aks-vnet",
            vec![
                subnet("aks-vnet", "aks-subnet", None),
                subnet("aks-vnet", "other", None),
            ],
        )];
        let e = choose_subnet(&v, None, None, "rg").unwrap_err().to_string();
        assert!(e.contains("no subnet named like \"worker\""), "{e}");
        assert!(
            e.contains("aks-vnet/aks-subnet") && e.contains("aks-vnet/other"),
            "{e}"
        );
        assert!(e.contains("--subnet"), "{e}");
        // `--subnet` settles it, by name, vnet/name or id.
        assert_eq!(
            choose_subnet(&v, Some("other"), None, "rg").unwrap().name,
            "other"
        );
        assert_eq!(
            choose_subnet(&v, Some("AKS-VNET/aks-subnet"), None, "rg")
                .unwrap()
                .name,
            "aks-subnet"
        );
        let id = v[0].subnets[1].id.clone();
        assert_eq!(
            choose_subnet(&v, Some(&id), None, "rg").unwrap().name,
            "other"
        );
    }

    #[test]
    fn a_subnet_name_in_two_vnets_needs_the_vnet() {
        let v = vec![
            vnet("a", vec![subnet("a", "worker", None)]),
            vnet("b", vec![subnet("b", "worker", None)]),
        ];
        assert!(matches!(
            choose_subnet(&v, Some("worker"), None, "rg"),
            Err(Error::SubnetChoice { .. })
        ));
        assert_eq!(choose_subnet(&v, None, Some("b"), "rg").unwrap().vnet, "b");
        let e = choose_subnet(&v, Some("nope"), None, "rg").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("subnet \"nope\" not found in resource group rg"),
            "{e}"
        );
    }

    #[test]
    fn the_subnets_own_nsg_wins_then_the_only_one() {
        let nsgs = vec![
            ("a".to_string(), "/id/a".to_string()),
            ("b".to_string(), "/id/b".to_string()),
        ];
        let attached = subnet("v", "worker", Some("/id/b"));
        assert_eq!(
            choose_nsg(&nsgs, None, &attached, "rg").unwrap(),
            Some("/id/b".into())
        );
        let bare = subnet("v", "worker", None);
        assert!(matches!(
            choose_nsg(&nsgs, None, &bare, "rg"),
            Err(Error::NsgChoice { .. })
        ));
        assert_eq!(
            choose_nsg(&nsgs[..1], None, &bare, "rg").unwrap(),
            Some("/id/a".into())
        );
        assert_eq!(choose_nsg(&[], None, &bare, "rg").unwrap(), None);
        assert_eq!(
            choose_nsg(&nsgs, Some("A"), &bare, "rg").unwrap(),
            Some("/id/a".into())
        );
        assert!(matches!(
            choose_nsg(&nsgs, Some("c"), &bare, "rg"),
            Err(Error::NsgNotFound { .. })
        ));
    }

    fn flags() -> Flags {
        Flags {
            subscription: None,
            resource_group: None,
            region: None,
            vnet: None,
            subnet: None,
            nsg: None,
            instance_size: None,
            instance_sizes: None,
            vxlan_port: None,
            image_id: None,
            confidential: false,
            node_selector: String::new(),
            dry_run: false,
            endpoints: Default::default(),
        }
    }

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn facts(groups: &[(&str, &str)], regions: &[&str]) -> NodeFacts {
        NodeFacts {
            groups: groups
                .iter()
                .map(|(s, r)| (s.to_string(), r.to_string()))
                .collect(),
            regions: regions.iter().map(|r| r.to_string()).collect(),
        }
    }

    #[test]
    fn the_location_comes_from_a_flag_then_the_configmap_then_the_nodes() {
        let nodes = facts(&[("S", "RG")], &["eastus"]);
        let found = locate(&flags(), &BTreeMap::new(), &nodes).unwrap();
        assert_eq!(
            found,
            Location {
                resource_group: ("RG".into(), Source::Discovered),
                subscription: Some("S".into()),
                region: Some(("eastus".into(), Source::Discovered)),
            }
        );
        let cm = map(&[
            ("AZURE_RESOURCE_GROUP", "cm-rg"),
            ("AZURE_REGION", " westus "),
        ]);
        let kept = locate(&flags(), &cm, &nodes).unwrap();
        assert_eq!(kept.resource_group, ("cm-rg".into(), Source::Existing));
        assert_eq!(kept.region, Some(("westus".into(), Source::Existing)));
        let f = Flags {
            resource_group: Some("flag-rg".into()),
            region: Some("northeurope".into()),
            subscription: Some("T".into()),
            ..flags()
        };
        let flagged = locate(&f, &cm, &nodes).unwrap();
        assert_eq!(flagged.resource_group, ("flag-rg".into(), Source::Flag));
        assert_eq!(flagged.region, Some(("northeurope".into(), Source::Flag)));
        assert_eq!(flagged.subscription.as_deref(), Some("T"));
        // Neither nodes nor the configmap know a region: ARM is asked.
        assert_eq!(
            locate(&flags(), &BTreeMap::new(), &facts(&[("S", "RG")], &[]))
                .unwrap()
                .region,
            None
        );
    }

    #[test]
    fn nodes_that_disagree_or_say_nothing_ask_for_a_flag() {
        let none = locate(&flags(), &BTreeMap::new(), &facts(&[], &[])).unwrap_err();
        assert!(none.to_string().contains("--resource-group"), "{none}");
        let two = facts(&[("S", "a"), ("S", "b")], &["eastus"]);
        let e = locate(&flags(), &BTreeMap::new(), &two).unwrap_err();
        assert!(
            e.to_string().contains("S/a, S/b") && e.to_string().contains("--resource-group"),
            "{e}"
        );
        // The flag settles it; the subscription is then the credentials'.
        let f = Flags {
            resource_group: Some("a".into()),
            ..flags()
        };
        let l = locate(&f, &BTreeMap::new(), &two).unwrap();
        assert_eq!(l.subscription, None);
        let regions = facts(&[("S", "RG")], &["eastus", "westus"]);
        let e = locate(&flags(), &BTreeMap::new(), &regions).unwrap_err();
        assert!(e.to_string().contains("--region"), "{e}");
    }

    fn found(offered: &[&str]) -> Found {
        Found {
            region: ("eastus".into(), Source::Discovered),
            subnet: (subnet("v", "worker", None), Source::Discovered),
            nsg: Some((
                "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/n"
                    .into(),
                Source::Discovered,
            )),
            offered_sizes: offered.iter().map(|s| s.to_string()).collect(),
            cloud: AzureCloud::Public,
        }
    }

    const SEED_OFFERED: [&str; 4] = [
        "Standard_B2als_v2",
        "Standard_D2as_v5",
        "Standard_D4as_v5",
        "Standard_D2ads_v5",
    ];

    #[test]
    fn the_plan_keeps_every_key_lets_flags_win_and_fills_the_seed_defaults() {
        let rg = ("rg".to_string(), Source::Discovered);
        let cm = map(&[("VXLAN_PORT", "4789"), ("TAGS", "team=a")]);
        let p = plan(&flags(), &cm, rg.clone(), found(&SEED_OFFERED)).unwrap();
        assert_eq!(p.data["TAGS"], "team=a");
        assert!(!p.sources.contains_key("TAGS"));
        assert_eq!(p.data["VXLAN_PORT"], "4789");
        assert_eq!(p.sources["VXLAN_PORT"], Source::Existing);
        for (key, value) in [
            ("CLOUD_PROVIDER", "azure"),
            ("PROXY_TIMEOUT", "5m"),
            ("DISABLECVM", "true"),
            ("AZURE_IMAGE_ID", ""),
            ("AZURE_INSTANCE_SIZE", SEED_INSTANCE_SIZE),
            ("AZURE_INSTANCE_SIZES", SEED_INSTANCE_SIZES),
        ] {
            assert_eq!(p.data[key], value, "{key}");
            assert_eq!(p.sources[key], Source::Default, "{key}");
        }
        assert_eq!(p.sources["AZURE_SUBNET_ID"], Source::Discovered);
        assert!(p.data["AZURE_NSG_ID"].ends_with("/networkSecurityGroups/n"));
        assert!(!p.data.contains_key("AZURE_CLOUD"));
        let f = Flags {
            vxlan_port: Some(9000),
            confidential: true,
            ..flags()
        };
        let p = plan(&f, &cm, rg.clone(), found(&SEED_OFFERED)).unwrap();
        assert_eq!(
            (p.data["VXLAN_PORT"].as_str(), p.sources["VXLAN_PORT"]),
            ("9000", Source::Flag)
        );
        assert_eq!(p.data["DISABLECVM"], "false");
        // A cloud other than the public one is written; no NSG leaves the key unset.
        let mut china = found(&SEED_OFFERED);
        china.cloud = AzureCloud::China;
        china.nsg = None;
        let p = plan(&flags(), &BTreeMap::new(), rg, china).unwrap();
        assert_eq!(p.data[CLOUD_KEY], "AzureChinaCloud");
        assert_eq!(p.sources[CLOUD_KEY], Source::Existing);
        assert!(!p.data.contains_key("AZURE_NSG_ID"));
    }

    #[test]
    fn sizes_the_region_does_not_offer_are_refused_each_once() {
        let f = Flags {
            instance_size: Some("Standard_X1".into()),
            instance_sizes: Some("Standard_X1,standard_d2as_v5, Standard_Y2".into()),
            ..flags()
        };
        let rg = ("rg".to_string(), Source::Flag);
        let e = plan(&f, &BTreeMap::new(), rg, found(&SEED_OFFERED)).unwrap_err();
        assert!(
            matches!(&e, Error::SizesNotOffered { sizes, region }
                if sizes == &["Standard_X1", "Standard_Y2"] && region == "eastus"),
            "{e}"
        );
    }

    #[test]
    fn nodes_give_subscription_group_and_region() {
        let node = |pid: &str, region: &str| -> Node {
            serde_json::from_value(json!({
                "metadata": {"name": "n", "labels": {REGION_LABEL: region}},
                "spec": {"providerID": pid}
            }))
            .unwrap()
        };
        let f = node_facts(&[
            node(
                "azure:///subscriptions/S/resourceGroups/RG/providers/Microsoft.Compute/virtualMachines/a",
                "eastus",
            ),
            node(
                "azure:///subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/virtualMachineScaleSets/x/virtualMachines/0",
                "eastus",
            ),
            node("kind://docker/k/n", "eastus"),
        ]);
        assert_eq!(f.groups, vec![("S".to_string(), "RG".to_string())]);
        assert_eq!(f.regions, vec!["eastus".to_string()]);
    }
}
