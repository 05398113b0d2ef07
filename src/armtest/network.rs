//! Microsoft.Network reads as ARM answers them (virtual networks with their subnets, network
//! security groups with their custom and default security rules) and region-aware VM size
//! lists (`locations/{region}/vmSizes` and `Microsoft.Compute/skus`), plus the seeding API
//! a scenario uses to lay out several VNets, subnets and NSGs, or a region that lacks a size.
//!
//! Writes of these resources stay with the generic handler (inline subnets become child
//! resources there); this module assembles what a GET returns from the stored resources.

use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::store::{Inner, Store};
use super::{Handle, arm_error};

/// A subnet to seed.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct SubnetSeed {
    /// Subnet name, e.g. `worker-subnet`.
    pub name: String,
    /// Its address prefix, e.g. `10.0.1.0/24`.
    pub prefix: String,
    /// Name of an NSG (same resource group) attached to the subnet.
    #[serde(default)]
    pub nsg: Option<String>,
}

/// A virtual network to seed.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct VnetSeed {
    /// VNet name.
    pub name: String,
    /// Address space.
    pub prefixes: Vec<String>,
    /// Subnets.
    #[serde(default)]
    pub subnets: Vec<SubnetSeed>,
}

/// One NSG security rule to seed (single prefix / port range forms).
#[derive(Clone, Debug, serde::Deserialize)]
pub struct RuleSeed {
    /// Rule name.
    pub(crate) name: String,
    /// 100-4096.
    pub(crate) priority: u32,
    /// `Inbound` or `Outbound`.
    pub(crate) direction: String,
    /// `Allow` or `Deny`.
    pub(crate) access: String,
    /// `Tcp`, `Udp`, `Icmp` or `*`.
    pub(crate) protocol: String,
    /// Source address prefix (CIDR, service tag or `*`).
    pub(crate) source: String,
    /// Destination address prefix.
    pub(crate) destination: String,
    /// Destination port or range (`9000`, `8000-9999`, `*`).
    pub(crate) ports: String,
}

impl RuleSeed {
    /// A rule with the given fields.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        name: &str,
        priority: u32,
        direction: &str,
        access: &str,
        protocol: &str,
        source: &str,
        destination: &str,
        ports: &str,
    ) -> Self {
        Self {
            name: name.into(),
            priority,
            direction: direction.into(),
            access: access.into(),
            protocol: protocol.into(),
            source: source.into(),
            destination: destination.into(),
            ports: ports.into(),
        }
    }
}

fn rule_properties(r: &RuleSeed) -> Value {
    json!({
        "protocol": r.protocol,
        "sourcePortRange": "*",
        "destinationPortRange": r.ports,
        "sourceAddressPrefix": r.source,
        "destinationAddressPrefix": r.destination,
        "access": r.access,
        "priority": r.priority,
        "direction": r.direction,
        "provisioningState": "Succeeded",
    })
}

fn rg_id(subscription: &str, rg: &str) -> String {
    format!("/subscriptions/{subscription}/resourceGroups/{rg}")
}

fn insert(g: &mut Inner, id: &str, ty: &str, location: Option<&str>, props: Value) {
    let name = id.rsplit('/').next().unwrap_or_default();
    let mut v = json!({"id": id, "name": name, "type": ty, "properties": props});
    if let Some(l) = location {
        v["location"] = l.into();
    }
    v["properties"]["provisioningState"] = "Succeeded".into();
    g.resources.insert(id.to_ascii_lowercase(), v);
}

/// Key under which the sizes offered in one region are kept (a pseudo resource).
fn offered_key(subscription: &str, region: &str) -> String {
    format!(
        "/subscriptions/{subscription}/providers/microsoft.compute/locations/{region}/armtest-offered-sizes"
    )
    .to_ascii_lowercase()
}

/// An NSG to seed.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct NsgSeed {
    /// Name.
    pub(crate) name: String,
    /// Custom rules.
    #[serde(default)]
    pub(crate) rules: Vec<RuleSeed>,
}

/// A whole network scenario, as `POST /armtest/network` takes it (JSON, camelCase):
/// `{"subscription", "resourceGroup", "location", "vnets": [{"name", "prefixes",
/// "subnets": [{"name", "prefix", "nsg"}]}], "nsgs": [{"name", "rules": [{"name",
/// "priority", "direction", "access", "protocol", "source", "destination", "ports"}]}],
/// "offeredSizes": {"<region>": ["Standard_..."]}}`.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NetworkSeed {
    /// Subscription id.
    pub(crate) subscription: String,
    /// Resource group (created in `location`).
    pub(crate) resource_group: String,
    /// Region of the group and its resources.
    pub(crate) location: String,
    /// Virtual networks.
    #[serde(default)]
    pub(crate) vnets: Vec<VnetSeed>,
    /// Network security groups.
    #[serde(default)]
    pub(crate) nsgs: Vec<NsgSeed>,
    /// Regions offering only some sizes.
    #[serde(default)]
    pub(crate) offered_sizes: std::collections::BTreeMap<String, Vec<String>>,
}

/// Seeds `seed` into the store (`POST /armtest/network`).
pub(crate) fn seed(store: &Store, body: &[u8]) -> Response {
    let seed: NetworkSeed = match serde_json::from_slice(body) {
        Ok(s) => s,
        Err(e) => return arm_error(StatusCode::BAD_REQUEST, "InvalidSeed", e.to_string()),
    };
    seed_network(store, &seed);
    StatusCode::NO_CONTENT.into_response()
}

fn seed_network(store: &Store, seed: &NetworkSeed) {
    let (sub, rg, loc) = (&seed.subscription, &seed.resource_group, &seed.location);
    seed_resource_group(store, sub, rg, loc);
    for n in &seed.nsgs {
        seed_nsg(store, sub, rg, loc, &n.name, &n.rules);
    }
    for v in &seed.vnets {
        seed_vnet(store, sub, rg, loc, v);
    }
    for (region, sizes) in &seed.offered_sizes {
        let sizes: Vec<&str> = sizes.iter().map(String::as_str).collect();
        offer_sizes(store, sub, region, &sizes);
    }
}

fn seed_resource_group(store: &Store, subscription: &str, rg: &str, location: &str) -> String {
    let id = rg_id(subscription, rg);
    let mut g = store.lock();
    insert(
        &mut g,
        &id,
        "Microsoft.Resources/resourceGroups",
        Some(location),
        json!({}),
    );
    id
}

fn seed_vnet(
    store: &Store,
    subscription: &str,
    rg: &str,
    location: &str,
    vnet: &VnetSeed,
) -> Vec<String> {
    let rg = rg_id(subscription, rg);
    let vnet_id = format!(
        "{rg}/providers/Microsoft.Network/virtualNetworks/{}",
        vnet.name
    );
    let mut g = store.lock();
    insert(
        &mut g,
        &vnet_id,
        "Microsoft.Network/virtualNetworks",
        Some(location),
        json!({"addressSpace": {"addressPrefixes": vnet.prefixes}}),
    );
    let mut ids = Vec::new();
    for s in &vnet.subnets {
        let id = format!("{vnet_id}/subnets/{}", s.name);
        let mut props = json!({"addressPrefix": s.prefix});
        if let Some(nsg) = &s.nsg {
            props["networkSecurityGroup"] = json!({
                "id": format!("{rg}/providers/Microsoft.Network/networkSecurityGroups/{nsg}")
            });
        }
        insert(
            &mut g,
            &id,
            "Microsoft.Network/virtualNetworks/subnets",
            None,
            props,
        );
        ids.push(id);
    }
    ids
}

fn seed_nsg(
    store: &Store,
    subscription: &str,
    rg: &str,
    location: &str,
    name: &str,
    rules: &[RuleSeed],
) -> String {
    let id = format!(
        "{}/providers/Microsoft.Network/networkSecurityGroups/{name}",
        rg_id(subscription, rg)
    );
    let mut g = store.lock();
    insert(
        &mut g,
        &id,
        "Microsoft.Network/networkSecurityGroups",
        Some(location),
        json!({}),
    );
    for r in rules {
        insert(
            &mut g,
            &format!("{id}/securityRules/{}", r.name),
            "Microsoft.Network/networkSecurityGroups/securityRules",
            None,
            rule_properties(r),
        );
    }
    id
}

fn offer_sizes(store: &Store, subscription: &str, region: &str, sizes: &[&str]) {
    let mut g = store.lock();
    g.resources.insert(
        offered_key(subscription, region),
        json!({"type": "armtest/offeredSizes", "sizes": sizes}),
    );
}

impl Handle {
    /// Creates (or replaces) resource group `rg` in `location`; returns its id.
    pub fn seed_resource_group(&self, subscription: &str, rg: &str, location: &str) -> String {
        seed_resource_group(&self.store, subscription, rg, location)
    }

    /// Creates VNet `vnet` with its subnets in `rg` (which must be seeded); returns the
    /// subnet ids in the order given.
    pub fn seed_vnet(
        &self,
        subscription: &str,
        rg: &str,
        location: &str,
        vnet: &VnetSeed,
    ) -> Vec<String> {
        seed_vnet(&self.store, subscription, rg, location, vnet)
    }

    /// Creates NSG `name` with these custom rules in `rg`; returns its id.
    pub fn seed_nsg(
        &self,
        subscription: &str,
        rg: &str,
        location: &str,
        name: &str,
        rules: &[RuleSeed],
    ) -> String {
        seed_nsg(&self.store, subscription, rg, location, name, rules)
    }

    /// Restricts the VM sizes offered in `region` to `sizes` (a subset of
    /// [`super::Config::sizes`]); other regions keep offering every size.
    pub fn offer_sizes(&self, subscription: &str, region: &str, sizes: &[&str]) {
        offer_sizes(&self.store, subscription, region, sizes)
    }
}

/// The six rules Azure puts in every NSG.
fn default_rules(nsg_id: &str) -> Vec<Value> {
    let rule = |name: &str, prio: u32, dir: &str, access: &str, src: &str, dst: &str| {
        json!({
            "id": format!("{nsg_id}/defaultSecurityRules/{name}"),
            "name": name,
            "type": "Microsoft.Network/networkSecurityGroups/defaultSecurityRules",
            "properties": {
                "description": "Default rule",
                "protocol": "*",
                "sourcePortRange": "*",
                "destinationPortRange": "*",
                "sourceAddressPrefix": src,
                "destinationAddressPrefix": dst,
                "access": access,
                "priority": prio,
                "direction": dir,
                "provisioningState": "Succeeded",
            }
        })
    };
    vec![
        rule(
            "AllowVnetInBound",
            65000,
            "Inbound",
            "Allow",
            "VirtualNetwork",
            "VirtualNetwork",
        ),
        rule(
            "AllowAzureLoadBalancerInBound",
            65001,
            "Inbound",
            "Allow",
            "AzureLoadBalancer",
            "*",
        ),
        rule("DenyAllInBound", 65500, "Inbound", "Deny", "*", "*"),
        rule(
            "AllowVnetOutBound",
            65000,
            "Outbound",
            "Allow",
            "VirtualNetwork",
            "VirtualNetwork",
        ),
        rule(
            "AllowInternetOutBound",
            65001,
            "Outbound",
            "Allow",
            "*",
            "Internet",
        ),
        rule("DenyAllOutBound", 65500, "Outbound", "Deny", "*", "*"),
    ]
}

/// Stored children of `parent_key` of type segment `child` (lower-case), direct only.
fn children(g: &Inner, parent_key: &str, child: &str) -> Vec<Value> {
    let prefix = format!("{parent_key}/{child}/");
    g.resources
        .range(prefix.clone()..)
        .take_while(|(k, _)| k.starts_with(&prefix))
        .filter(|(k, _)| !k[prefix.len()..].contains('/'))
        .map(|(_, v)| v.clone())
        .collect()
}

fn vnet_body(g: &Inner, key: &str, stored: &Value) -> Value {
    let mut v = stored.clone();
    if !v["properties"].is_object() {
        v["properties"] = json!({});
    }
    v["properties"]["subnets"] = Value::Array(children(g, key, "subnets"));
    v
}

fn nsg_body(g: &Inner, key: &str, stored: &Value) -> Value {
    let mut v = stored.clone();
    if !v["properties"].is_object() {
        v["properties"] = json!({});
    }
    let id = v["id"].as_str().unwrap_or_default().to_string();
    let mut rules: Vec<Value> = v["properties"]["securityRules"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    for child in children(g, key, "securityrules") {
        rules.retain(|r| r["name"] != child["name"]);
        rules.push(child);
    }
    for r in rules.iter_mut() {
        if r["id"].is_null() {
            r["id"] = format!("{id}/securityRules/{}", r["name"].as_str().unwrap_or("")).into();
        }
    }
    v["properties"]["securityRules"] = Value::Array(rules);
    v["properties"]["defaultSecurityRules"] = Value::Array(default_rules(&id));
    // Subnets this NSG is attached to, as ARM reports them.
    let nsg_lower = id.to_ascii_lowercase();
    let subnets: Vec<Value> = g
        .resources
        .values()
        .filter(|r| {
            r["type"].as_str().is_some_and(|t| {
                t.eq_ignore_ascii_case("Microsoft.Network/virtualNetworks/subnets")
            }) && r["properties"]["networkSecurityGroup"]["id"]
                .as_str()
                .is_some_and(|n| n.to_ascii_lowercase() == nsg_lower)
        })
        .map(|r| json!({"id": r["id"]}))
        .collect();
    if !subnets.is_empty() {
        v["properties"]["subnets"] = Value::Array(subnets);
    }
    v
}

fn ok(body: Value) -> Response {
    (StatusCode::OK, axum::Json(body)).into_response()
}

fn not_found(ty: &str, name: &str, rg: &str) -> Response {
    arm_error(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        format!("The Resource '{ty}/{name}' under resource group '{rg}' was not found."),
    )
}

/// The sizes offered in `region` as (name, vCPUs, memory MiB).
/// Whether a size takes Premium SSD disks: Azure names those with an `s` among the
/// letters after the vCPU count (`D4as_v5`, `F4s_v2`; not `A1_v2`).
pub(crate) fn premium_io(size: &str) -> bool {
    let part = size
        .trim_start_matches("Standard_")
        .split('_')
        .next()
        .unwrap_or_default();
    let letters = part.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    letters
        .trim_start_matches(|c: char| c.is_ascii_digit())
        .to_ascii_lowercase()
        .contains('s')
}

fn offered(g: &Inner, subscription: &str, region: &str) -> Vec<(String, u32, u64)> {
    let only: Option<Vec<String>> = g
        .resources
        .get(&offered_key(subscription, region))
        .and_then(|v| serde_json::from_value(v["sizes"].clone()).ok());
    g.config
        .sizes
        .iter()
        .filter(|(n, _, _)| {
            only.as_ref()
                .is_none_or(|o| o.iter().any(|x| x.eq_ignore_ascii_case(n)))
        })
        .cloned()
        .collect()
}

/// Serves the reads this module owns; `None` leaves the request to the other handlers.
pub(crate) fn route(
    store: &Store,
    method: &Method,
    segs: &[String],
    query: &[(String, String)],
) -> Option<Response> {
    if *method != Method::GET {
        return None;
    }
    let l: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = l.iter().map(String::as_str).collect();
    let g = store.lock();
    match l.as_slice() {
        [
            "subscriptions",
            sub,
            "providers",
            "microsoft.compute",
            "locations",
            region,
            "vmsizes",
        ] => {
            let sizes: Vec<Value> = offered(&g, sub, region)
                .iter()
                .map(|(n, c, m)| {
                    json!({"name": n, "numberOfCores": c, "osDiskSizeInMB": 1047552,
                           "resourceDiskSizeInMB": 0, "memoryInMB": m, "maxDataDiskCount": 4})
                })
                .collect();
            Some(ok(json!({"value": sizes})))
        }
        [
            "subscriptions",
            sub,
            "providers",
            "microsoft.compute",
            "skus",
        ] => {
            // `$filter=location eq 'eastus'` narrows to one region; else every seeded region.
            let filter = query
                .iter()
                .find(|(k, _)| k == "$filter")
                .map(|(_, v)| v.clone());
            let region = filter.as_deref().and_then(|f| {
                let f = f.trim();
                let rest = f.strip_prefix("location eq ")?;
                Some(rest.trim_matches('\'').to_ascii_lowercase())
            });
            let Some(region) = region else {
                return Some(arm_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidFilter",
                    "this server lists resource SKUs for one location: $filter=location eq '<region>'",
                ));
            };
            let value: Vec<Value> = offered(&g, sub, &region)
                .iter()
                .map(|(n, c, m)| {
                    let mut capabilities = vec![
                        json!({"name": "vCPUs", "value": c.to_string()}),
                        json!({"name": "MemoryGB", "value": format!("{}", *m as f64 / 1024.0)}),
                        json!({"name": "PremiumIO", "value": if premium_io(n) {"True"} else {"False"}}),
                    ];
                    if let Some((_, gpus)) =
                        g.config.gpus.iter().find(|(s, _)| s.eq_ignore_ascii_case(n))
                    {
                        capabilities.push(json!({"name": "GPUs", "value": gpus.to_string()}));
                    }
                    let restrictions: Vec<Value> = g
                        .config
                        .restrictions
                        .iter()
                        .filter(|(s, _)| s.eq_ignore_ascii_case(n))
                        .map(|(_, zones)| {
                            if zones.is_empty() {
                                json!({"type": "Location", "values": [region],
                                       "restrictionInfo": {"locations": [region]},
                                       "reasonCode": "NotAvailableForSubscription"})
                            } else {
                                json!({"type": "Zone", "values": [region],
                                       "restrictionInfo": {"locations": [region], "zones": zones},
                                       "reasonCode": "NotAvailableForSubscription"})
                            }
                        })
                        .collect();
                    json!({
                        "resourceType": "virtualMachines",
                        "name": n,
                        "tier": "Standard",
                        "size": n.trim_start_matches("Standard_"),
                        "locations": [region],
                        "locationInfo": [{"location": region, "zones": g.config.zones}],
                        "capabilities": capabilities,
                        "restrictions": restrictions,
                    })
                })
                .collect();
            Some(ok(json!({"value": value})))
        }
        [
            "subscriptions",
            sub,
            "resourcegroups",
            rg,
            "providers",
            "microsoft.network",
            ty @ ("virtualnetworks" | "networksecuritygroups"),
            rest @ ..,
        ] => {
            let rg_key = format!("/subscriptions/{sub}/resourcegroups/{rg}");
            if !g.resources.contains_key(&rg_key) {
                return Some(arm_error(
                    StatusCode::NOT_FOUND,
                    "ResourceGroupNotFound",
                    format!("Resource group '{}' could not be found.", segs[3]),
                ));
            }
            let type_prefix = format!("{rg_key}/providers/microsoft.network/{ty}");
            let vnet = *ty == "virtualnetworks";
            let body = |key: &str, v: &Value| {
                if vnet {
                    vnet_body(&g, key, v)
                } else {
                    nsg_body(&g, key, v)
                }
            };
            let kind = if vnet {
                "Microsoft.Network/virtualNetworks"
            } else {
                "Microsoft.Network/networkSecurityGroups"
            };
            match rest {
                [] => {
                    let value: Vec<Value> =
                        children(&g, &rg_key, &format!("providers/microsoft.network/{ty}"))
                            .iter()
                            .map(|v| {
                                let key = v["id"].as_str().unwrap_or_default().to_ascii_lowercase();
                                body(&key, v)
                            })
                            .collect();
                    Some(ok(json!({"value": value})))
                }
                [name] => {
                    let key = format!("{type_prefix}/{name}");
                    Some(match g.resources.get(&key) {
                        Some(v) => ok(body(&key, v)),
                        None => not_found(kind, &segs[7], &segs[3]),
                    })
                }
                [name, "subnets"] if vnet => {
                    let key = format!("{type_prefix}/{name}");
                    Some(if g.resources.contains_key(&key) {
                        ok(json!({"value": children(&g, &key, "subnets")}))
                    } else {
                        not_found(kind, &segs[7], &segs[3])
                    })
                }
                _ => None,
            }
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    use super::super::{Config, router};
    use super::*;

    const SUB: &str = "11111111-2222-3333-4444-555555555555";

    async fn call(
        r: &axum::Router,
        method: &str,
        path: &str,
        token: &str,
        body: String,
    ) -> (u16, Value) {
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header("authorization", format!("Bearer {token}"))
            .header(
                "content-type",
                if path.contains("oauth2") {
                    "application/x-www-form-urlencoded"
                } else {
                    "application/json"
                },
            )
            .body(Body::from(body))
            .unwrap();
        let resp = r.clone().oneshot(req).await.unwrap();
        let status = resp.status().as_u16();
        let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
            .await
            .unwrap();
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    async fn token(r: &axum::Router) -> String {
        let (s, v) = call(
            r,
            "POST",
            "/t/oauth2/v2.0/token",
            "",
            "grant_type=client_credentials&client_id=a&client_secret=b&scope=x".into(),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        v["access_token"].as_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn a_seeded_scenario_lists_vnets_with_subnets_and_nsgs_with_default_rules() {
        let (r, _) = router(Config::default());
        let seed = json!({
            "subscription": SUB, "resourceGroup": "rg", "location": "westeurope",
            "vnets": [{"name": "a", "prefixes": ["10.0.0.0/16"], "subnets": [
                {"name": "master", "prefix": "10.0.0.0/24"},
                {"name": "worker", "prefix": "10.0.1.0/24", "nsg": "n"}]},
                {"name": "b", "prefixes": ["10.1.0.0/16"], "subnets": [{"name": "x", "prefix": "10.1.0.0/24"}]}],
            "nsgs": [{"name": "n", "rules": [{"name": "deny", "priority": 4000, "direction": "Inbound",
                "access": "Deny", "protocol": "*", "source": "*", "destination": "*", "ports": "*"}]}],
            "offeredSizes": {"westeurope": ["Standard_B2als_v2"]}
        });
        let (s, _) = call(&r, "POST", "/armtest/network", "", seed.to_string()).await;
        assert_eq!(s, 204);
        let t = token(&r).await;
        let base = format!("/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Network");
        let (s, v) = call(
            &r,
            "GET",
            &format!("{base}/virtualNetworks?api-version=2023-09-01"),
            &t,
            String::new(),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let vnets = v["value"].as_array().unwrap();
        assert_eq!(vnets.len(), 2, "{v}");
        let a = vnets.iter().find(|x| x["name"] == "a").unwrap();
        let subnets = a["properties"]["subnets"].as_array().unwrap();
        assert_eq!(subnets.len(), 2, "{a}");
        let worker = subnets.iter().find(|x| x["name"] == "worker").unwrap();
        assert_eq!(worker["properties"]["addressPrefix"], "10.0.1.0/24");
        assert!(
            worker["properties"]["networkSecurityGroup"]["id"]
                .as_str()
                .unwrap()
                .ends_with("/networkSecurityGroups/n")
        );

        let (s, v) = call(
            &r,
            "GET",
            &format!("{base}/networkSecurityGroups/N?api-version=2023-09-01"),
            &t,
            String::new(),
        )
        .await;
        assert_eq!(s, 200, "{v}");
        let p = &v["properties"];
        assert_eq!(p["securityRules"][0]["properties"]["priority"], 4000);
        let defaults: Vec<&str> = p["defaultSecurityRules"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["name"].as_str().unwrap())
            .collect();
        assert!(
            defaults.contains(&"AllowVnetInBound") && defaults.contains(&"DenyAllInBound"),
            "{defaults:?}"
        );
        assert_eq!(p["subnets"][0]["id"], worker["id"]);

        let (s, _) = call(
            &r,
            "GET",
            &format!("{base}/virtualNetworks/nope?api-version=2023-09-01"),
            &t,
            String::new(),
        )
        .await;
        assert_eq!(s, 404);

        // Sizes are per region once a region is restricted.
        let sizes = |region: &str| {
            format!(
                "/subscriptions/{SUB}/providers/Microsoft.Compute/locations/{region}/vmSizes?api-version=2024-07-01"
            )
        };
        let (_, v) = call(&r, "GET", &sizes("westeurope"), &t, String::new()).await;
        assert_eq!(v["value"].as_array().unwrap().len(), 1, "{v}");
        let (_, v) = call(&r, "GET", &sizes("eastus"), &t, String::new()).await;
        assert!(v["value"].as_array().unwrap().len() > 1, "{v}");
        let (_, v) = call(&r, "GET", &format!("/subscriptions/{SUB}/providers/Microsoft.Compute/skus?api-version=2021-07-01&$filter=location%20eq%20%27westeurope%27"), &t, String::new()).await;
        assert_eq!(v["value"][0]["name"], "Standard_B2als_v2", "{v}");
    }
}
