//! What `ctl azure configmap` and `ctl doctor` read from Azure Resource Manager: resource
//! group location, virtual networks with their subnets, network security groups with their
//! rules, and the VM sizes a region offers. Credentials come as CAA gets them
//! (`peer-pods-secret`, overridden by `AZURE_*` in the environment); no secret value is
//! ever printed.

use std::collections::BTreeMap;

use azure_core::Method;
use k8s_openapi::api::core::v1::Secret;
use kube::Api;
use serde_json::Value;

use crate::api::names::CLOUD_SECRET;
use crate::cloud::azure::{Arm, ArmError, Endpoints, Manners, ResourceId};
use crate::config::{AzureCredentials, CloudSecret};

const NETWORK_API: &str = "2023-09-01";
const COMPUTE_API: &str = "2024-07-01";
const RESOURCES_API: &str = "2021-04-01";
const GALLERY_API: &str = "2023-07-03";

/// Environment keys read for credentials, overriding `peer-pods-secret`.
const CREDENTIAL_KEYS: [&str; 5] = [
    "AZURE_SUBSCRIPTION_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_FEDERATED_TOKEN_FILE",
];

/// Errors talking to Azure.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// An ARM call failed.
    #[error("Azure: {0}")]
    Arm(#[from] ArmError),
    /// ARM answered something this tool cannot read.
    #[error("unexpected ARM answer for {what}: {detail}")]
    Unexpected {
        /// What was read.
        what: String,
        /// Why it could not be used.
        detail: String,
    },
    /// No usable credentials.
    #[error(
        "no Azure credentials: create {CLOUD_SECRET} (sandboxd ctl azure secret) or set \
         AZURE_CLIENT_ID, AZURE_CLIENT_SECRET and AZURE_TENANT_ID{0}"
    )]
    NoCredentials(String),
    /// The credentials are invalid (the problems name keys, never values).
    #[error("Azure credentials: {0}")]
    Credentials(#[from] crate::config::Error),
    /// Reading the secret from the cluster failed.
    #[error("reading {CLOUD_SECRET}: {0}")]
    Kube(#[from] kube::Error),
    /// `AZURE_CLOUD` names no Azure cloud, or the configmap holds an endpoint key.
    #[error("{key} in peer-pods-cm: {detail}")]
    Endpoint {
        /// Which key.
        key: &'static str,
        /// What is wrong.
        detail: String,
    },
}

pub(crate) use crate::cloud::azure::EndpointArgs;

/// The endpoints `args` and `peer-pods-cm` (`cm`) give: the flag's cloud, else
/// `AZURE_CLOUD` of the configmap, else the public cloud; only the development flags move
/// them. A configmap that names an endpoint is refused, never followed.
pub(crate) fn resolve_endpoints(
    args: &EndpointArgs,
    cm: &BTreeMap<String, String>,
) -> Result<Endpoints, Error> {
    use crate::cloud::azure::cloud::{CLOUD_KEY, REFUSED_ENDPOINT_KEYS};
    for key in REFUSED_ENDPOINT_KEYS {
        if cm.get(key).is_some_and(|v| !v.trim().is_empty()) {
            return Err(Error::Endpoint {
                key,
                detail: format!(
                    "not read: endpoints follow {CLOUD_KEY}; remove the key (another endpoint \
                     is only the development flag --dev-arm-endpoint)"
                ),
            });
        }
    }
    let configured = match cm
        .get(CLOUD_KEY)
        .map(|v| v.trim())
        .filter(|v| !v.is_empty())
    {
        Some(v) => Some(v.parse().map_err(|detail| Error::Endpoint {
            key: CLOUD_KEY,
            detail,
        })?),
        None => None,
    };
    Ok(args.resolve(configured))
}

/// The credential map: `peer-pods-secret` in `namespace` (if present) overlaid with the
/// `AZURE_*` environment; `subscription` fills `AZURE_SUBSCRIPTION_ID` when neither has it.
pub(crate) async fn credentials(
    client: &kube::Client,
    namespace: &str,
    subscription: Option<&str>,
) -> Result<CloudSecret, Error> {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let mut map: BTreeMap<String, String> = match api.get_opt(CLOUD_SECRET).await? {
        Some(s) => secret_map(&s),
        None => BTreeMap::new(),
    };
    let from_secret = !map.is_empty();
    for k in CREDENTIAL_KEYS {
        if let Ok(v) = std::env::var(k)
            && !v.trim().is_empty()
        {
            map.insert(k.to_string(), v);
        }
    }
    if let Some(s) = subscription
        && map
            .get("AZURE_SUBSCRIPTION_ID")
            .is_none_or(|v| v.trim().is_empty())
    {
        map.insert("AZURE_SUBSCRIPTION_ID".into(), s.to_string());
    }
    let given = |k: &str| map.get(k).is_some_and(|v| !v.trim().is_empty());
    if !given("AZURE_CLIENT_SECRET")
        && !given("AZURE_FEDERATED_TOKEN_FILE")
        && !given(crate::config::AUTH_METHOD_KEY)
    {
        return Err(Error::NoCredentials(if from_secret {
            format!(" ({CLOUD_SECRET} in namespace {namespace} has no AZURE_CLIENT_SECRET)")
        } else {
            format!(" (no {CLOUD_SECRET} in namespace {namespace})")
        }));
    }
    let secret = CloudSecret::from_map(&map)?;
    if let AzureCredentials::ManagedIdentity { .. } = secret.credentials {
        // A workstation has no managed identity; do not hang on the metadata endpoint.
        return Err(Error::NoCredentials(if from_secret {
            format!(" ({CLOUD_SECRET} in namespace {namespace} has no AZURE_CLIENT_SECRET)")
        } else {
            format!(" (no {CLOUD_SECRET} in namespace {namespace})")
        }));
    }
    Ok(secret)
}

/// The data of a Secret as strings (`stringData` included, for objects not yet stored).
pub(crate) fn secret_map(s: &Secret) -> BTreeMap<String, String> {
    let mut map: BTreeMap<String, String> = s
        .data
        .iter()
        .flatten()
        .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
        .collect();
    for (k, v) in s.string_data.iter().flatten() {
        map.insert(k.clone(), v.clone());
    }
    map
}

/// A subnet of a virtual network.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub(crate) struct Subnet {
    /// ARM id.
    pub(crate) id: String,
    /// Subnet name.
    pub(crate) name: String,
    /// Name of its virtual network.
    pub(crate) vnet: String,
    /// Address prefixes (`addressPrefix` or `addressPrefixes`).
    pub(crate) prefixes: Vec<String>,
    /// The NSG attached to the subnet, if any.
    pub(crate) nsg_id: Option<String>,
}

/// A virtual network.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Vnet {
    /// ARM id.
    pub(crate) id: String,
    /// Name.
    pub(crate) name: String,
    /// Address space.
    pub(crate) prefixes: Vec<String>,
    /// Its subnets.
    pub(crate) subnets: Vec<Subnet>,
}

/// Rule direction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Direction {
    /// Traffic into the NIC or subnet.
    Inbound,
    /// Traffic out of it.
    Outbound,
}

/// One NSG security rule (custom or default).
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Rule {
    /// Rule name.
    pub(crate) name: String,
    /// Lower is evaluated first.
    pub(crate) priority: u32,
    /// Direction.
    pub(crate) direction: Direction,
    /// `true` for Allow.
    pub(crate) allow: bool,
    /// `Tcp`, `Udp`, `*`, ...
    pub(crate) protocol: String,
    /// Source prefixes or service tags.
    pub(crate) sources: Vec<String>,
    /// Destination prefixes or service tags.
    pub(crate) destinations: Vec<String>,
    /// Destination ports or ranges.
    pub(crate) ports: Vec<String>,
}

/// A network security group.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Nsg {
    /// ARM id.
    pub(crate) id: String,
    /// Name.
    pub(crate) name: String,
    /// Custom and default rules.
    pub(crate) rules: Vec<Rule>,
}

/// The parts of an ARM id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ArmId {
    /// Subscription id.
    pub(crate) subscription: String,
    /// Resource group.
    pub(crate) resource_group: String,
}

/// Subscription and resource group of an ARM id (or an `azure://` provider id).
pub(crate) fn parse_arm_id(id: &str) -> Option<ArmId> {
    let id = ResourceId::parse(id.strip_prefix("azure://").unwrap_or(id))?;
    Some(ArmId {
        subscription: id.subscription().to_string(),
        resource_group: id.resource_group().to_string(),
    })
}

fn strings(v: &Value, one: &str, many: &str) -> Vec<String> {
    let mut out: Vec<String> = v[many]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|x| x.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    if let Some(s) = v[one].as_str()
        && !s.is_empty()
    {
        out.insert(0, s.to_string());
    }
    out
}

fn subnet_of(v: &Value, vnet: &str) -> Subnet {
    let p = &v["properties"];
    Subnet {
        id: v["id"].as_str().unwrap_or_default().to_string(),
        name: v["name"].as_str().unwrap_or_default().to_string(),
        vnet: vnet.to_string(),
        prefixes: strings(p, "addressPrefix", "addressPrefixes"),
        nsg_id: p["networkSecurityGroup"]["id"].as_str().map(str::to_string),
    }
}

fn vnet_of(v: &Value) -> Vnet {
    let name = v["name"].as_str().unwrap_or_default().to_string();
    let subnets = v["properties"]["subnets"]
        .as_array()
        .map(|a| a.iter().map(|s| subnet_of(s, &name)).collect())
        .unwrap_or_default();
    Vnet {
        id: v["id"].as_str().unwrap_or_default().to_string(),
        prefixes: v["properties"]["addressSpace"]["addressPrefixes"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default(),
        name,
        subnets,
    }
}

fn rule_of(v: &Value) -> Rule {
    let p = &v["properties"];
    Rule {
        name: v["name"].as_str().unwrap_or_default().to_string(),
        priority: p["priority"].as_u64().unwrap_or(u64::from(u32::MAX)) as u32,
        direction: if p["direction"]
            .as_str()
            .is_some_and(|d| d.eq_ignore_ascii_case("Outbound"))
        {
            Direction::Outbound
        } else {
            Direction::Inbound
        },
        allow: p["access"]
            .as_str()
            .is_some_and(|a| a.eq_ignore_ascii_case("Allow")),
        protocol: p["protocol"].as_str().unwrap_or("*").to_string(),
        sources: strings(p, "sourceAddressPrefix", "sourceAddressPrefixes"),
        destinations: strings(p, "destinationAddressPrefix", "destinationAddressPrefixes"),
        ports: strings(p, "destinationPortRange", "destinationPortRanges"),
    }
}

fn nsg_of(v: &Value) -> Nsg {
    let p = &v["properties"];
    let rules = ["securityRules", "defaultSecurityRules"]
        .iter()
        .flat_map(|k| p[*k].as_array().cloned().unwrap_or_default())
        .map(|r| rule_of(&r))
        .collect();
    Nsg {
        id: v["id"].as_str().unwrap_or_default().to_string(),
        name: v["name"].as_str().unwrap_or_default().to_string(),
        rules,
    }
}

/// ARM reads for one subscription.
pub(crate) struct Azure {
    client: Arm,
    /// The subscription.
    pub(crate) subscription: String,
}

impl Azure {
    /// A reader authenticated with `secret` at `endpoints`.
    pub(crate) fn new(secret: &CloudSecret, endpoints: &Endpoints) -> Result<Self, Error> {
        let manners = Manners {
            // An interactive tool: give up within a minute rather than five.
            max_total: std::time::Duration::from_secs(60),
            ..Manners::default()
        };
        Ok(Self {
            client: Arm::new(&secret.credentials, endpoints, manners)?,
            subscription: secret.subscription_id.clone(),
        })
    }

    async fn list(&self, path: &str) -> Result<Vec<Value>, Error> {
        Ok(self.client.list(path).await?)
    }

    /// The location of resource group `rg` (the seed's `az group show`).
    pub(crate) async fn resource_group_location(&self, rg: &str) -> Result<String, Error> {
        let path = format!(
            "/subscriptions/{}/resourceGroups/{rg}?api-version={RESOURCES_API}",
            self.subscription
        );
        let v = self.client.send(Method::Get, &path, None).await?.body;
        v["location"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Error::Unexpected {
                what: format!("resource group {rg}"),
                detail: "no location".into(),
            })
    }

    /// The virtual networks of `rg` with their subnets (the seed's `az network vnet list`).
    pub(crate) async fn vnets(&self, rg: &str) -> Result<Vec<Vnet>, Error> {
        Ok(self
            .list(&format!(
                "/subscriptions/{}/resourceGroups/{rg}/providers/Microsoft.Network/virtualNetworks?api-version={NETWORK_API}",
                self.subscription
            ))
            .await?
            .iter()
            .map(vnet_of)
            .collect())
    }

    /// The NSGs of `rg` (the seed's `az network nsg list`).
    pub(crate) async fn nsgs(&self, rg: &str) -> Result<Vec<Nsg>, Error> {
        Ok(self
            .list(&format!(
                "/subscriptions/{}/resourceGroups/{rg}/providers/Microsoft.Network/networkSecurityGroups?api-version={NETWORK_API}",
                self.subscription
            ))
            .await?
            .iter()
            .map(nsg_of)
            .collect())
    }

    /// One NSG by id; `None` when it does not exist.
    pub(crate) async fn nsg(&self, id: &str) -> Result<Option<Nsg>, Error> {
        let nsg = self
            .client
            .get(&format!("{id}?api-version={NETWORK_API}"))
            .await?;
        Ok(nsg.as_ref().map(nsg_of))
    }

    /// The virtual network holding subnet `subnet_id`, with every subnet; `None` when the
    /// VNet does not exist.
    pub(crate) async fn vnet_of_subnet(&self, subnet_id: &str) -> Result<Option<Vnet>, Error> {
        let Some(vnet) = ResourceId::parse(subnet_id)
            .filter(|id| id.is_exactly("Microsoft.Network/virtualNetworks/subnets"))
            .and_then(|id| id.ancestor(1))
        else {
            return Ok(None);
        };
        let vnet = self
            .client
            .get(&format!("{vnet}?api-version={NETWORK_API}"))
            .await?;
        Ok(vnet.as_ref().map(vnet_of))
    }

    /// Whether the image `id` (managed image or gallery image/version) exists; `None` for
    /// ids that are not ARM paths (community gallery images).
    pub(crate) async fn image_exists(&self, id: &str) -> Result<Option<bool>, Error> {
        let api = match ResourceId::parse(id) {
            Some(r) if r.is("Microsoft.Compute/galleries") => GALLERY_API,
            Some(r) if r.is("Microsoft.Compute/images") => COMPUTE_API,
            _ => return Ok(None),
        };
        let image = self.client.get(&format!("{id}?api-version={api}")).await?;
        Ok(Some(image.is_some()))
    }

    /// The serial console log of VM `vm` in resource group `rg` (boot diagnostics).
    pub(crate) async fn serial_log(&self, rg: &str, vm: &str) -> Result<String, Error> {
        Ok(self
            .client
            .serial_log(&format!(
                "/subscriptions/{}/resourceGroups/{rg}/providers/Microsoft.Compute/virtualMachines/{vm}",
                self.subscription
            ))
            .await?)
    }

    /// Names of the VM sizes `region` offers this subscription (Resource SKUs; a size
    /// restricted for the subscription in the region is not offered).
    pub(crate) async fn sizes(&self, region: &str) -> Result<Vec<String>, Error> {
        use crate::cloud::azure::skus;
        let filter: String =
            url::form_urlencoded::byte_serialize(format!("location eq '{region}'").as_bytes())
                .collect();
        Ok(self
            .list(&format!(
                "/subscriptions/{}/providers/Microsoft.Compute/skus?api-version={}&$filter={filter}",
                self.subscription,
                skus::SKUS_API
            ))
            .await?
            .iter()
            .filter_map(|v| skus::parse(v, region))
            .filter(|s| s.location_restriction.is_none())
            .map(|s| s.name)
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provider_ids_of_vms_and_scale_set_instances_name_subscription_and_group() {
        assert_eq!(
            parse_arm_id(
                "azure:///subscriptions/S1/resourceGroups/RG-a/providers/Microsoft.Compute/virtualMachines/w-1"
            ),
            Some(ArmId {
                subscription: "S1".into(),
                resource_group: "RG-a".into()
            })
        );
        assert_eq!(
            parse_arm_id(
                "azure:///subscriptions/S2/resourceGroups/mc_rg_aks/providers/Microsoft.Compute/virtualMachineScaleSets/aks-np-vmss/virtualMachines/3"
            )
            .map(|a| a.resource_group),
            Some("mc_rg_aks".into())
        );
        assert_eq!(parse_arm_id("kind://docker/kind/node"), None);
    }

    #[test]
    fn rules_read_single_and_plural_prefix_and_port_forms() {
        let r = rule_of(&serde_json::json!({
            "name": "r",
            "properties": {"priority": 200, "direction": "Outbound", "access": "Deny",
                "protocol": "Udp", "sourceAddressPrefixes": ["10.0.0.0/24", "10.1.0.0/24"],
                "destinationAddressPrefix": "*", "destinationPortRanges": ["9000", "15150"]}
        }));
        assert_eq!(r.direction, Direction::Outbound);
        assert!(!r.allow);
        assert_eq!(r.sources, vec!["10.0.0.0/24", "10.1.0.0/24"]);
        assert_eq!(r.destinations, vec!["*"]);
        assert_eq!(r.ports, vec!["9000", "15150"]);
    }
}
