//! ARM resource handlers: resource groups, VMs with their LROs, NICs, disks, VM sizes, and
//! generic tracked resources (VNets/subnets, NSGs, storage accounts, galleries, images).

// Handlers answer ARM error responses directly; boxing them buys nothing in a test server.
#![allow(clippy::result_large_err)]

use std::sync::Arc;
use std::time::{Instant, SystemTime};

use axum::body::Bytes;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

use super::arm_error;
use super::store::{Inner, Op, Store, Vm, rfc3339};

/// API versions of `Microsoft.Compute/virtualMachines` this server understands.
const VM_API_VERSIONS: &[&str] = &["2023-09-01", "2024-03-01", "2024-07-01", "2024-11-01"];

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

pub(crate) async fn route(
    store: &Arc<Store>,
    base: &str,
    method: &Method,
    segs: &[String],
    query: &[(String, String)],
    api_version: &str,
    body: Bytes,
) -> Response {
    let Some(local) = store.local.clone() else {
        return route_locked(store, base, method, segs, query, api_version, body, None);
    };
    let l: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let vm_path = l.len() == 8
        && l[0] == "subscriptions"
        && l[2] == "resourcegroups"
        && l[4] == "providers"
        && l[5] == "microsoft.compute"
        && l[6] == "virtualmachines"
        && VM_API_VERSIONS.contains(&api_version);
    if !vm_path {
        return route_locked(store, base, method, segs, query, api_version, body, None);
    }
    let name = segs[7].clone();
    let key = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
        segs[1], segs[3], segs[7]
    )
    .to_ascii_lowercase();
    let exists = store.lock().vms.contains_key(&key);
    match *method {
        // A new VM: its local VM first (outside the store lock), then the record.
        Method::PUT if !exists => {
            let ip = match start_local_vm(&local, &name, &body).await {
                Ok(ip) => ip,
                Err(r) => return r,
            };
            let resp = route_locked(
                store,
                base,
                method,
                segs,
                query,
                api_version,
                body,
                Some(ip),
            );
            if !resp.status().is_success() {
                let _ = local.delete(&name).await;
            }
            resp
        }
        Method::DELETE => {
            if let Err(e) = local.delete(&name).await {
                return arm_error(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalServerError",
                    format!("deleting the local VM: {e}"),
                );
            }
            route_locked(store, base, method, segs, query, api_version, body, None)
        }
        _ => route_locked(store, base, method, segs, query, api_version, body, None),
    }
}

/// Starts the local VM backing `name` from the base64 `userData` of a VM PUT body; returns
/// its address.
async fn start_local_vm(
    local: &Arc<dyn crate::cloud::Provider>,
    name: &str,
    body: &Bytes,
) -> Result<String, Response> {
    let req = parse_body(body)?;
    let user_data = req["properties"]["userData"]
        .as_str()
        .and_then(|ud| base64::engine::general_purpose::STANDARD.decode(ud).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .ok_or_else(|| bad("InvalidParameter", "a local VM needs base64 userData"))?;
    let tags = req["tags"]
        .as_object()
        .map(|o| {
            o.iter()
                .filter_map(|(k, v)| Some((k.clone(), v.as_str()?.to_string())))
                .collect()
        })
        .unwrap_or_default();
    let spec = crate::cloud::VmSpec {
        name: name.to_string(),
        size: req["properties"]["hardwareProfile"]["vmSize"]
            .as_str()
            .unwrap_or_default()
            .to_string(),
        image_id: String::new(),
        user_data: Some(user_data),
        ssh_public_key: None,
        tags,
    };
    let vm = local.create(&spec).await.map_err(|e| {
        arm_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            format!("starting the local VM: {e}"),
        )
    })?;
    vm.private_ip.map(|ip| ip.to_string()).ok_or_else(|| {
        arm_error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "InternalServerError",
            "the local VM has no address",
        )
    })
}

#[allow(clippy::too_many_arguments)]
fn route_locked(
    store: &Arc<Store>,
    base: &str,
    method: &Method,
    segs: &[String],
    query: &[(String, String)],
    api_version: &str,
    body: Bytes,
    local_ip: Option<String>,
) -> Response {
    let l: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = l.iter().map(String::as_str).collect();
    let mut g = store.lock();
    match l.as_slice() {
        ["subscriptions", _, "resourcegroups", _] => resource_group(&mut g, method, segs, body),
        // Boot diagnostics: SAS URIs of the screenshot and the serial log (managed storage).
        [
            "subscriptions",
            _,
            "resourcegroups",
            _,
            "providers",
            "microsoft.compute",
            "virtualmachines",
            _,
            "retrievebootdiagnosticsdata",
        ] if method == Method::POST => {
            let id = format!(
                "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
                segs[1], segs[3], segs[7]
            );
            match g.vms.get(&id.to_ascii_lowercase()) {
                None => arm_error(
                    StatusCode::NOT_FOUND,
                    "ResourceNotFound",
                    format!(
                        "The Resource 'Microsoft.Compute/virtualMachines/{}' under resource group '{}' was not found.",
                        segs[7], segs[3]
                    ),
                ),
                Some(vm)
                    if vm.request["properties"]["diagnosticsProfile"]["bootDiagnostics"]["enabled"]
                        .as_bool() != Some(true) =>
                {
                    arm_error(
                        StatusCode::CONFLICT,
                        "OperationNotAllowed",
                        "Boot diagnostics is not enabled for this virtual machine.",
                    )
                }
                Some(_) => {
                    let sas = "sv=2021-08-06&sr=b&sp=r&se=2030-01-01T00%3A00%3A00Z&sig=armtest";
                    json_response(
                        StatusCode::OK,
                        json!({
                            "consoleScreenshotBlobUri": format!("{base}/armtest/bootdiagnostics/{}/screenshot.bmp?{sas}", segs[7]),
                            "serialConsoleLogBlobUri": format!("{base}/armtest/bootdiagnostics/{}/serial.log?{sas}", segs[7]),
                        }),
                    )
                }
            }
        }
        [
            "subscriptions",
            _,
            "providers",
            "microsoft.compute",
            "locations",
            _,
            "vmsizes",
        ] if method == Method::GET => {
            let sizes: Vec<Value> = g
                .config
                .sizes
                .iter()
                .map(|(n, c, m)| {
                    json!({"name": n, "numberOfCores": c, "osDiskSizeInMB": 1047552,
                           "resourceDiskSizeInMB": 0, "memoryInMB": m, "maxDataDiskCount": 4})
                })
                .collect();
            json_response(StatusCode::OK, json!({"value": sizes}))
        }
        [
            "subscriptions",
            _,
            "providers",
            "microsoft.compute",
            "locations",
            _,
            "operations",
            id,
        ] if method == Method::GET => match g.ops.get(*id) {
            None => arm_error(StatusCode::NOT_FOUND, "NotFound", "operation not found"),
            Some(op) => {
                let now = Instant::now();
                let mut body = json!({"name": id, "startTime": op.start});
                if now < op.until {
                    body["status"] = "InProgress".into();
                } else {
                    body["endTime"] = rfc3339(SystemTime::now()).into();
                    match &op.failure {
                        None => body["status"] = "Succeeded".into(),
                        Some(code) => {
                            body["status"] = "Failed".into();
                            body["error"] = json!({"code": code, "message": format!("Provisioning failed: {code}")});
                        }
                    }
                }
                let mut resp = json_response(StatusCode::OK, body);
                if now < op.until {
                    resp.headers_mut()
                        .insert("retry-after", g.config.lro_retry_after_secs.into());
                }
                resp
            }
        },
        [
            "subscriptions",
            sub,
            "resourcegroups",
            rg,
            "providers",
            ns,
            ty,
            rest @ ..,
        ] => {
            let rg_id = format!("/subscriptions/{sub}/resourcegroups/{rg}");
            if !g.resources.contains_key(&rg_id) {
                return arm_error(
                    StatusCode::NOT_FOUND,
                    "ResourceGroupNotFound",
                    format!("Resource group '{}' could not be found.", segs[3]),
                );
            }
            match (*ns, *ty, rest) {
                ("microsoft.compute", "virtualmachines", []) if method == Method::GET => {
                    let now = Instant::now();
                    let value: Vec<Value> = g
                        .vms
                        .values()
                        .filter(|v| v.rg.eq_ignore_ascii_case(rg))
                        .map(|v| vm_body(v, now, false))
                        .collect();
                    json_response(StatusCode::OK, json!({"value": value}))
                }
                ("microsoft.compute", "virtualmachines", [_]) => {
                    if !VM_API_VERSIONS.contains(&api_version) {
                        return arm_error(
                            StatusCode::BAD_REQUEST,
                            "NoRegisteredProviderFound",
                            format!(
                                "No registered resource provider found for API version '{api_version}' and type 'virtualMachines'. Supported: {}",
                                VM_API_VERSIONS.join(", ")
                            ),
                        );
                    }
                    let id = format!(
                        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
                        segs[1], segs[3], segs[7]
                    );
                    let expand_user_data = query
                        .iter()
                        .any(|(k, v)| k == "$expand" && v.eq_ignore_ascii_case("userData"));
                    match *method {
                        Method::GET => match g.vms.get(&id.to_ascii_lowercase()) {
                            Some(vm) => json_response(
                                StatusCode::OK,
                                vm_body(vm, Instant::now(), expand_user_data),
                            ),
                            None => {
                                not_found("Microsoft.Compute/virtualMachines", &segs[7], &segs[3])
                            }
                        },
                        Method::PUT => put_vm(&mut g, base, api_version, &id, segs, body, local_ip),
                        Method::DELETE => delete_vm(&mut g, base, api_version, &id, segs),
                        _ => method_not_allowed(),
                    }
                }
                ("microsoft.storage", "storageaccounts", [name, "listkeys"])
                    if method == Method::POST =>
                {
                    let id = format!("{rg_id}/providers/microsoft.storage/storageaccounts/{name}");
                    if !g.resources.contains_key(&id) {
                        return not_found("Microsoft.Storage/storageAccounts", &segs[7], &segs[3]);
                    }
                    let key = base64::engine::general_purpose::STANDARD
                        .encode(format!("armtest-key-{id}").as_bytes());
                    json_response(
                        StatusCode::OK,
                        json!({"keys": [
                            {"keyName": "key1", "value": key, "permissions": "FULL"},
                            {"keyName": "key2", "value": key.chars().rev().collect::<String>(), "permissions": "FULL"}
                        ]}),
                    )
                }
                (_, _, []) if method == Method::GET => {
                    let prefix = format!("{rg_id}/providers/{ns}/{ty}/");
                    let value: Vec<Value> = g
                        .resources
                        .range(prefix.clone()..)
                        .take_while(|(k, _)| k.starts_with(&prefix))
                        .filter(|(k, _)| !k[prefix.len()..].contains('/'))
                        .map(|(_, v)| v.clone())
                        .collect();
                    json_response(StatusCode::OK, json!({"value": value}))
                }
                (_, _, rest) if rest.len() % 2 == 1 => generic(&mut g, method, segs, body),
                _ => arm_error(
                    StatusCode::BAD_REQUEST,
                    "InvalidResourceType",
                    "unsupported path",
                ),
            }
        }
        _ => arm_error(
            StatusCode::NOT_FOUND,
            "InvalidResourceType",
            format!(
                "path {} is not served by the ARM test server",
                segs.join("/")
            ),
        ),
    }
}

fn method_not_allowed() -> Response {
    arm_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "method not allowed",
    )
}

fn not_found(ty: &str, name: &str, rg: &str) -> Response {
    arm_error(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        format!("The Resource '{ty}/{name}' under resource group '{rg}' was not found."),
    )
}

fn bad(code: &str, message: impl Into<String>) -> Response {
    arm_error(StatusCode::BAD_REQUEST, code, message)
}

fn parse_body(body: &Bytes) -> Result<Value, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(bad(
            "InvalidRequestContent",
            "The request content was invalid and could not be deserialized.",
        )),
    }
}

fn resource_group(g: &mut Inner, method: &Method, segs: &[String], body: Bytes) -> Response {
    let id = format!("/subscriptions/{}/resourceGroups/{}", segs[1], segs[3]);
    let key = id.to_ascii_lowercase();
    match *method {
        Method::GET | Method::HEAD => match g.resources.get(&key) {
            Some(v) => json_response(StatusCode::OK, v.clone()),
            None => arm_error(
                StatusCode::NOT_FOUND,
                "ResourceGroupNotFound",
                format!("Resource group '{}' could not be found.", segs[3]),
            ),
        },
        Method::PUT => {
            let req = match parse_body(&body) {
                Ok(v) => v,
                Err(r) => return r,
            };
            let Some(location) = req["location"].as_str() else {
                return bad(
                    "LocationRequired",
                    "The location property is required for this definition.",
                );
            };
            let existed = g.resources.contains_key(&key);
            let v = json!({"id": id, "name": segs[3], "type": "Microsoft.Resources/resourceGroups",
                           "location": location, "tags": req.get("tags").cloned().unwrap_or(json!({})),
                           "properties": {"provisioningState": "Succeeded"}});
            g.resources.insert(key, v.clone());
            json_response(
                if existed {
                    StatusCode::OK
                } else {
                    StatusCode::CREATED
                },
                v,
            )
        }
        Method::DELETE => {
            if g.resources.remove(&key).is_none() {
                return StatusCode::NO_CONTENT.into_response();
            }
            let prefix = format!("{key}/");
            g.resources.retain(|k, _| !k.starts_with(&prefix));
            g.vms.retain(|k, _| !k.starts_with(&prefix));
            StatusCode::OK.into_response()
        }
        _ => method_not_allowed(),
    }
}

/// PUT/GET/DELETE of a resource without special behaviour (provisioned synchronously).
fn generic(g: &mut Inner, method: &Method, segs: &[String], body: Bytes) -> Response {
    // segs: subscriptions/<s>/resourceGroups/<rg>/providers/<ns>/<type>/<name>[/<child>/<name>]...
    let mut ty = segs[5].clone();
    for (i, s) in segs[6..].iter().enumerate() {
        if i % 2 == 0 {
            ty.push('/');
            ty.push_str(s);
        }
    }
    let id = format!("/{}", segs.join("/"));
    let key = id.to_ascii_lowercase();
    let name = segs.last().cloned().unwrap_or_default();
    let is_child = segs.len() > 8;
    match *method {
        Method::GET => match g.resources.get(&key) {
            Some(v) => json_response(StatusCode::OK, v.clone()),
            None => not_found(&ty, &name, &segs[3]),
        },
        Method::PUT => {
            let mut req = match parse_body(&body) {
                Ok(v) => v,
                Err(r) => return r,
            };
            if is_child {
                let parent = format!("/{}", segs[..segs.len() - 2].join("/")).to_ascii_lowercase();
                if !g.resources.contains_key(&parent) {
                    return not_found(&ty, &segs[segs.len() - 3], &segs[3]);
                }
            }
            let lty = ty.to_ascii_lowercase();
            if !lty.ends_with("/subnets") && req["location"].as_str().is_none() {
                return bad(
                    "LocationRequired",
                    "The location property is required for this definition.",
                );
            }
            if lty == "microsoft.storage/storageaccounts"
                && (req["sku"]["name"].as_str().is_none() || req["kind"].as_str().is_none())
            {
                return bad(
                    "InvalidRequestContent",
                    "A storage account needs sku.name and kind.",
                );
            }
            if lty.ends_with("/subnets") && req["properties"]["addressPrefix"].as_str().is_none() {
                return bad(
                    "InvalidRequestFormat",
                    "A subnet needs properties.addressPrefix.",
                );
            }
            req["id"] = id.clone().into();
            req["name"] = name.clone().into();
            req["type"] = ty.clone().into();
            if !req["properties"].is_object() {
                req["properties"] = json!({});
            }
            req["properties"]["provisioningState"] = "Succeeded".into();
            if lty == "microsoft.network/virtualnetworks" {
                // Inline subnets become child resources too.
                if let Some(subnets) = req["properties"]["subnets"].as_array_mut() {
                    for s in subnets.iter_mut() {
                        let sname = s["name"].as_str().unwrap_or_default().to_string();
                        let sid = format!("{id}/subnets/{sname}");
                        s["id"] = sid.clone().into();
                        s["type"] = "Microsoft.Network/virtualNetworks/subnets".into();
                        g.resources.insert(sid.to_ascii_lowercase(), s.clone());
                    }
                }
            }
            let existed = g.resources.insert(key, req.clone()).is_some();
            json_response(
                if existed {
                    StatusCode::OK
                } else {
                    StatusCode::CREATED
                },
                req,
            )
        }
        Method::DELETE => {
            if g.resources.remove(&key).is_none() {
                return StatusCode::NO_CONTENT.into_response();
            }
            let prefix = format!("{key}/");
            g.resources.retain(|k, _| !k.starts_with(&prefix));
            StatusCode::OK.into_response()
        }
        _ => method_not_allowed(),
    }
}

fn async_headers(
    resp: &mut Response,
    base: &str,
    sub: &str,
    location: &str,
    op: &str,
    api: &str,
    retry_after: u64,
) {
    let url = format!(
        "{base}/subscriptions/{sub}/providers/Microsoft.Compute/locations/{location}/operations/{op}?api-version={api}"
    );
    let h = resp.headers_mut();
    if let Ok(v) = url.parse() {
        h.insert("azure-asyncoperation", v);
    }
    if let Ok(v) = format!("{url}&monitor=true").parse() {
        h.insert("location", v);
    }
    h.insert("retry-after", retry_after.into());
}

fn put_vm(
    g: &mut Inner,
    base: &str,
    api: &str,
    id: &str,
    segs: &[String],
    body: Bytes,
    local_ip: Option<String>,
) -> Response {
    let key = id.to_ascii_lowercase();
    let req = match parse_body(&body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    // As ARM: tag names with these characters are refused.
    if let Some(bad) = req["tags"].as_object().and_then(|t| {
        t.keys()
            .find(|k| k.contains(crate::config::TAG_NAME_FORBIDDEN))
    }) {
        return arm_error(
            StatusCode::BAD_REQUEST,
            "InvalidTagNameCharacters",
            format!(
                "The tag names '{bad}' have reserved characters '<,>,%,&,\\,?,/' or control characters."
            ),
        );
    }
    if let Some(vm) = g.vms.get(&key) {
        if vm.deleting.is_some() {
            return arm_error(
                StatusCode::CONFLICT,
                "OperationNotAllowed",
                format!(
                    "Operation 'PUT' is not allowed on VM '{}' since the VM is marked for deletion.",
                    vm.name
                ),
            );
        }
        // Idempotent re-PUT: same VM, same operation while it is still running.
        let now = Instant::now();
        let creating = now < vm.created_until;
        let mut resp = json_response(StatusCode::OK, vm_body(vm, now, false));
        if creating {
            async_headers(
                &mut resp,
                base,
                &segs[1],
                &vm.location,
                &vm.create_op,
                api,
                g.config.lro_retry_after_secs,
            );
        }
        return resp;
    }
    if let Err(r) = check_vm(g, &req, id) {
        return r;
    }
    let props = &req["properties"];
    let size = props["hardwareProfile"]["vmSize"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let vcpus = g
        .config
        .sizes
        .iter()
        .find(|(n, _, _)| n.eq_ignore_ascii_case(&size))
        .map(|(_, c, _)| *c)
        .unwrap_or(0);
    if let Some(quota) = g.config_core_quota() {
        let used: u32 = g.vms.values().map(|v| v.vcpus).sum();
        if used + vcpus > quota {
            return arm_error(
                StatusCode::CONFLICT,
                "OperationNotAllowed",
                format!(
                    "Operation could not be completed as it results in exceeding approved Total Regional Cores quota. Location: {}, Current Limit: {quota}, Current Usage: {used}, Additional Required: {vcpus}.",
                    req["location"].as_str().unwrap_or_default()
                ),
            );
        }
    }
    let location = req["location"].as_str().unwrap_or_default().to_string();
    let nic_cfg = &props["networkProfile"]["networkInterfaceConfigurations"][0];
    // ARM does not promise the name of a NIC it creates from a NIC configuration (the
    // spec's create example answers `toBeCreatedNetworkInterface`): the VM's
    // `networkProfile.networkInterfaces` is the only way to it. A suffix nobody can
    // guess keeps clients honest.
    let nic_name = format!(
        "{}-{}",
        nic_cfg["name"].as_str().unwrap_or_default(),
        &g.next_id()[..8]
    );
    let nic_id = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/networkInterfaces/{nic_name}",
        segs[1], segs[3]
    );
    if g.resources.contains_key(&nic_id.to_ascii_lowercase()) {
        return arm_error(
            StatusCode::CONFLICT,
            "NicInUse",
            format!("Network interface {nic_id} already exists and is used by another VM."),
        );
    }
    let subnet_id = nic_cfg["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let prefix = g
        .resources
        .get(&subnet_id.to_ascii_lowercase())
        .and_then(|s| {
            s["properties"]["addressPrefix"]
                .as_str()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "10.0.0.0/24".into());
    let is_local = local_ip.is_some();
    let ip = match local_ip {
        Some(ip) => ip,
        None => {
            let n = g.next_ip.entry(subnet_id.to_ascii_lowercase()).or_insert(3);
            *n += 1;
            ip_in(&prefix, *n)
        }
    };
    let op = g.next_id();
    let disk_name = props["storageProfile"]["osDisk"]["name"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| format!("{}_OsDisk_1_{}", segs[7], &op[..8]));
    let disk_id = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/disks/{disk_name}",
        segs[1], segs[3]
    );
    let delete_nic = nic_cfg["properties"]["deleteOption"].as_str() == Some("Delete");
    let delete_disk = props["storageProfile"]["osDisk"]["deleteOption"].as_str() == Some("Delete");
    // A public IP from the IP configuration's publicIPAddressConfiguration (named, like the
    // NIC, as ARM likes).
    let pip_cfg =
        &nic_cfg["properties"]["ipConfigurations"][0]["properties"]["publicIPAddressConfiguration"];
    let public_ip = if pip_cfg.is_object() {
        let standard = pip_cfg["sku"]["name"].as_str() == Some("Standard");
        let method = pip_cfg["properties"]["publicIPAllocationMethod"]
            .as_str()
            .unwrap_or("Dynamic");
        if standard && method != "Static" {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "StandardSkuPublicIPAddressesMustBeStatic",
                "Standard sku publicIp addresses must use Static allocation method.",
            );
        }
        let name = format!(
            "{}-{}",
            pip_cfg["name"].as_str().unwrap_or("pip"),
            &g.next_id()[..8]
        );
        let pip_id = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/publicIPAddresses/{name}",
            segs[1], segs[3]
        );
        // A local VM is reachable at its one address only.
        let address = if is_local {
            ip.clone()
        } else {
            let n = g.next_ip.entry("public".into()).or_insert(0);
            *n += 1;
            format!("203.0.113.{}", *n % 250 + 1)
        };
        g.resources.insert(
            pip_id.to_ascii_lowercase(),
            json!({"name": name, "id": pip_id, "type": "Microsoft.Network/publicIPAddresses",
                   "location": location, "sku": pip_cfg["sku"],
                   "properties": {"provisioningState": "Succeeded", "ipAddress": address,
                                  "publicIPAddressVersion": "IPv4", "publicIPAllocationMethod": method,
                                  "ipConfiguration": {"id": format!("{nic_id}/ipConfigurations/ipconfig1")}}}),
        );
        let delete = pip_cfg["properties"]["deleteOption"].as_str() == Some("Delete");
        Some((pip_id, delete))
    } else {
        None
    };
    let nic = json!({
        "name": nic_name, "id": nic_id, "type": "Microsoft.Network/networkInterfaces", "location": location,
        "properties": {
            "provisioningState": "Succeeded",
            "ipConfigurations": [{
                "name": nic_cfg["properties"]["ipConfigurations"][0]["name"], "id": format!("{nic_id}/ipConfigurations/ipconfig1"),
                "properties": {"privateIPAddress": ip, "privateIPAllocationMethod": "Dynamic",
                               "subnet": {"id": subnet_id}, "primary": true, "privateIPAddressVersion": "IPv4",
                               "publicIPAddress": public_ip.as_ref().map(|(id, _)| json!({"id": id}))}
            }],
            "networkSecurityGroup": nic_cfg["properties"]["networkSecurityGroup"],
            "virtualMachine": {"id": id},
            "primary": true,
        }
    });
    let mut nic = nic;
    if public_ip.is_none()
        && let Some(c) = nic["properties"]["ipConfigurations"][0]["properties"].as_object_mut()
    {
        c.remove("publicIPAddress");
    }
    g.resources.insert(nic_id.to_ascii_lowercase(), nic);
    g.resources.insert(
        disk_id.to_ascii_lowercase(),
        json!({"name": disk_name, "id": disk_id, "type": "Microsoft.Compute/disks", "location": location,
               "managedBy": id, "properties": {"provisioningState": "Succeeded"}}),
    );
    let now = Instant::now();
    let until = now + g.config.lro_duration;
    let failure = g.fail_next.take();
    g.ops.insert(
        op.clone(),
        Op {
            until,
            failure: failure.clone(),
            start: rfc3339(SystemTime::now()),
        },
    );
    let mut response = req.clone();
    response["id"] = id.into();
    response["name"] = segs[7].clone().into();
    response["type"] = "Microsoft.Compute/virtualMachines".into();
    if !response["tags"].is_object() {
        response["tags"] = json!({});
    }
    let rp = &mut response["properties"];
    if let Some(o) = rp.as_object_mut() {
        o.remove("userData");
    }
    if let Some(o) = rp["osProfile"].as_object_mut() {
        o.remove("customData");
        o.remove("adminPassword");
    }
    rp["vmId"] = g.next_id().into();
    rp["timeCreated"] = rfc3339(SystemTime::now()).into();
    rp["storageProfile"]["osDisk"]["name"] = disk_name.into();
    rp["storageProfile"]["osDisk"]["managedDisk"]["id"] = disk_id.clone().into();
    rp["networkProfile"]["networkInterfaces"] = json!([{"id": nic_id, "properties": {"primary": true, "deleteOption": if delete_nic {"Delete"} else {"Detach"}}}]);
    let vm = Vm {
        id: id.to_string(),
        name: segs[7].clone(),
        rg: segs[3].clone(),
        location: location.clone(),
        size,
        vcpus,
        request: req,
        response,
        created_until: until,
        failure,
        create_op: op.clone(),
        deleting: None,
        nic_id,
        disk_id,
        delete_nic,
        delete_disk,
        private_ip: ip,
        public_ip,
    };
    let mut resp = json_response(StatusCode::CREATED, vm_body(&vm, now, false));
    async_headers(
        &mut resp,
        base,
        &segs[1],
        &location,
        &op,
        api,
        g.config.lro_retry_after_secs,
    );
    g.vms.insert(key, vm);
    resp
}

fn ip_in(prefix: &str, n: u32) -> String {
    let addr = prefix.split('/').next().unwrap_or("10.0.0.0");
    let base: std::net::Ipv4Addr = addr.parse().unwrap_or(std::net::Ipv4Addr::new(10, 0, 0, 0));
    std::net::Ipv4Addr::from(u32::from(base) + n).to_string()
}

impl Inner {
    fn config_core_quota(&self) -> Option<u32> {
        self.config.core_quota
    }
}

/// The resource group id (`/subscriptions/{s}/resourceGroups/{rg}`) of a resource id.
fn rg_id_of(id: &str) -> Option<String> {
    let segs: Vec<&str> = id.split('/').collect();
    (segs.len() > 4).then(|| segs[..5].join("/"))
}

/// The subscription of a resource id.
fn sub_of(id: &str) -> &str {
    id.split('/').nth(2).unwrap_or_default()
}

/// The checks ARM and Compute make on a VM PUT that sandboxd's bodies must pass.
fn check_vm(g: &Inner, req: &Value, vm_id: &str) -> Result<(), Response> {
    let invalid = |target: &str, msg: &str| {
        Err(arm_error(
            StatusCode::BAD_REQUEST,
            "InvalidParameter",
            format!("{msg} (target: {target})"),
        ))
    };
    if req["location"].as_str().is_none_or(str::is_empty) {
        return Err(bad(
            "LocationRequired",
            "The location property is required for this definition.",
        ));
    }
    let p = &req["properties"];
    let size = p["hardwareProfile"]["vmSize"].as_str().unwrap_or_default();
    if !g
        .config
        .sizes
        .iter()
        .any(|(n, _, _)| n.eq_ignore_ascii_case(size))
    {
        return Err(arm_error(
            StatusCode::CONFLICT,
            "SkuNotAvailable",
            format!("The requested VM size {size} is not available in the current region."),
        ));
    }
    // Resource SKUs restrictions and zones, as ARM applies them to a create.
    let zones: Vec<&str> = req["zones"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    for (restricted, rzones) in &g.config.restrictions {
        if !restricted.eq_ignore_ascii_case(size) {
            continue;
        }
        if rzones.is_empty() || zones.iter().any(|z| rzones.iter().any(|r| r == z)) {
            return Err(arm_error(
                StatusCode::CONFLICT,
                "SkuNotAvailable",
                format!(
                    "The requested VM size {size} is currently not available in location '{}'{}. Please try another size or deploy to a different location or different zone.",
                    req["location"].as_str().unwrap_or_default(),
                    if zones.is_empty() {
                        String::new()
                    } else {
                        format!(" zones '{}'", zones.join(","))
                    }
                ),
            ));
        }
    }
    if let Some(z) = zones
        .iter()
        .find(|z| !g.config.zones.iter().any(|o| o == *z))
    {
        return invalid(
            "zones",
            &format!("The zone(s) '{z}' for resource 'virtualMachines' is not supported."),
        );
    }
    let disk_type = p["storageProfile"]["osDisk"]["managedDisk"]["storageAccountType"]
        .as_str()
        .unwrap_or_default();
    if disk_type.starts_with("Premium") && !super::network::premium_io(size) {
        return Err(arm_error(
            StatusCode::CONFLICT,
            "OperationNotAllowed",
            format!(
                "Requested operation cannot be performed because the VM size {size} does not support the storage account type {disk_type} of disk. Consider updating the VM to a size that supports Premium storage."
            ),
        ));
    }
    let image = &p["storageProfile"]["imageReference"];
    if let Some(id) = image["id"].as_str() {
        if !g.resources.contains_key(&id.to_ascii_lowercase()) {
            return Err(arm_error(
                StatusCode::NOT_FOUND,
                "ImageNotFound",
                format!("The platform image or managed image '{id}' is not available."),
            ));
        }
    } else if image["communityGalleryImageId"]
        .as_str()
        .is_none_or(|c| !c.to_ascii_lowercase().starts_with("/communitygalleries/"))
        && image["sharedGalleryImageId"]
            .as_str()
            .is_none_or(|c| !c.to_ascii_lowercase().starts_with("/sharedgalleries/"))
    {
        return invalid(
            "imageReference",
            "An image id, a community gallery image id or a shared gallery image id is required",
        );
    }
    let os_disk = &p["storageProfile"]["osDisk"];
    if os_disk["createOption"].as_str() != Some("FromImage") {
        return invalid("osDisk.createOption", "createOption must be FromImage");
    }
    if let Some(t) = os_disk["managedDisk"]["storageAccountType"].as_str()
        && !matches!(
            t,
            "Standard_LRS" | "Premium_LRS" | "StandardSSD_LRS" | "Premium_ZRS" | "StandardSSD_ZRS"
        )
    {
        return invalid(
            "osDisk.managedDisk.storageAccountType",
            &format!("Storage account type {t} is not supported for OS disks."),
        );
    }
    if let Some(c) = os_disk["caching"].as_str()
        && !matches!(c, "None" | "ReadOnly" | "ReadWrite")
    {
        return invalid("osDisk.caching", &format!("Caching type {c} is not valid."));
    }
    if let Some(name) = os_disk["name"].as_str() {
        let id = format!(
            "{}/providers/Microsoft.Compute/disks/{name}",
            rg_id_of(vm_id).unwrap_or_default()
        );
        if !name.is_empty() && g.resources.contains_key(&id.to_ascii_lowercase()) {
            return Err(arm_error(
                StatusCode::CONFLICT,
                "ConflictingUserInput",
                format!(
                    "Disk {name} already exists in resource group. Only CreateOption.Attach is supported."
                ),
            ));
        }
    }
    // The VM's security type must be one its gallery image definition declares (in one of
    // the subscription's galleries, or shared with it, or a community gallery's).
    let location = req["location"].as_str().unwrap_or_default();
    if let Some(def) = ["id", "sharedGalleryImageId", "communityGalleryImageId"]
        .iter()
        .find_map(|k| image[*k].as_str())
        .and_then(|id| crate::cloud::azure::body::gallery_definition(id, sub_of(vm_id), location))
        .and_then(|d| g.resources.get(&d.to_ascii_lowercase()))
    {
        let declared = def["properties"]["features"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["name"].as_str() == Some("SecurityType"))
            .and_then(|f| f["value"].as_str())
            .unwrap_or("Standard")
            .to_string();
        let vm = p["securityProfile"]["securityType"]
            .as_str()
            .unwrap_or("Standard");
        let ok = match vm {
            "TrustedLaunch" => matches!(
                declared.as_str(),
                "TrustedLaunch"
                    | "TrustedLaunchSupported"
                    | "TrustedLaunchAndConfidentialVmSupported"
            ),
            "ConfidentialVM" => matches!(
                declared.as_str(),
                "ConfidentialVM"
                    | "ConfidentialVMSupported"
                    | "TrustedLaunchAndConfidentialVmSupported"
            ),
            _ => !matches!(declared.as_str(), "TrustedLaunch" | "ConfidentialVM"),
        };
        if !ok {
            return Err(bad(
                "BadRequest",
                format!(
                    "The gallery image's security type {declared} does not support creating a VM with security type {vm}."
                ),
            ));
        }
    }
    let os = &p["osProfile"];
    if os["adminUsername"].as_str().is_none_or(str::is_empty) {
        return invalid(
            "adminUsername",
            "Required parameter 'adminUsername' is missing (null).",
        );
    }
    if os["computerName"].as_str().is_none_or(str::is_empty) {
        return invalid(
            "computerName",
            "Required parameter 'computerName' is missing (null).",
        );
    }
    let linux = &os["linuxConfiguration"];
    if linux["disablePasswordAuthentication"].as_bool() == Some(true)
        && linux["ssh"]["publicKeys"]
            .as_array()
            .is_none_or(Vec::is_empty)
        && os["adminPassword"].is_null()
    {
        return invalid(
            "linuxConfiguration",
            "Authentication requires an SSH public key when password authentication is disabled.",
        );
    }
    let net = &p["networkProfile"];
    let cfgs = net["networkInterfaceConfigurations"].as_array();
    let Some(cfgs) = cfgs.filter(|c| !c.is_empty()) else {
        return invalid(
            "networkProfile",
            "At least one network interface configuration is required.",
        );
    };
    if net["networkApiVersion"].as_str().is_none() {
        return invalid(
            "networkApiVersion",
            "networkApiVersion is required with networkInterfaceConfigurations.",
        );
    }
    for c in cfgs {
        if c["name"].as_str().is_none_or(str::is_empty) {
            return invalid("networkInterfaceConfigurations.name", "name is required");
        }
        let subnet = c["properties"]["ipConfigurations"][0]["properties"]["subnet"]["id"]
            .as_str()
            .unwrap_or_default();
        if !g.resources.contains_key(&subnet.to_ascii_lowercase()) {
            return Err(bad(
                "InvalidResourceReference",
                format!(
                    "Resource {subnet} referenced by resource {} was not found.",
                    c["name"]
                ),
            ));
        }
        if let Some(nsg) = c["properties"]["networkSecurityGroup"]["id"].as_str()
            && !g.resources.contains_key(&nsg.to_ascii_lowercase())
        {
            return Err(bad(
                "InvalidResourceReference",
                format!(
                    "Resource {nsg} referenced by resource {} was not found.",
                    c["name"]
                ),
            ));
        }
    }
    if let Some(ud) = p["userData"].as_str() {
        // The limit counts the base64 text.
        match base64::engine::general_purpose::STANDARD.decode(ud) {
            Ok(_) if ud.len() <= 64 * 1024 => {}
            _ => return invalid("userData", "userData must be base64 and at most 64 KB."),
        }
    }
    if p["securityProfile"]["securityType"].as_str() == Some("ConfidentialVM") {
        let l = size.to_ascii_lowercase();
        if !(l.starts_with("standard_dc") || l.starts_with("standard_ec")) {
            return Err(bad(
                "BadRequest",
                format!(
                    "The VM size '{size}' is not supported for creation of VMs with security type ConfidentialVM."
                ),
            ));
        }
        if p["securityProfile"]["uefiSettings"]["vTpmEnabled"].as_bool() != Some(true) {
            return invalid(
                "securityProfile.uefiSettings.vTpmEnabled",
                "ConfidentialVM requires vTpmEnabled true.",
            );
        }
        let enc = os_disk["managedDisk"]["securityProfile"]["securityEncryptionType"].as_str();
        if !matches!(enc, Some("VMGuestStateOnly" | "DiskWithVMGuestState")) {
            return invalid(
                "osDisk.managedDisk.securityProfile.securityEncryptionType",
                "ConfidentialVM requires securityEncryptionType.",
            );
        }
    }
    Ok(())
}

fn vm_body(vm: &Vm, now: Instant, user_data: bool) -> Value {
    let mut b = vm.response.clone();
    b["properties"]["provisioningState"] = vm.state(now).into();
    if user_data && let Some(ud) = vm.request["properties"].get("userData") {
        b["properties"]["userData"] = ud.clone();
    }
    b
}

fn delete_vm(g: &mut Inner, base: &str, api: &str, id: &str, segs: &[String]) -> Response {
    let key = id.to_ascii_lowercase();
    let retry_after = g.config.lro_retry_after_secs;
    let duration = g.config.lro_duration;
    let new_op = g.next_id();
    let Some(vm) = g.vms.get_mut(&key) else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let location = vm.location.clone();
    let op = match &vm.deleting {
        Some((_, op)) => op.clone(),
        None => {
            let until = Instant::now() + duration;
            vm.deleting = Some((until, new_op.clone()));
            g.ops.insert(
                new_op.clone(),
                Op {
                    until,
                    failure: None,
                    start: rfc3339(SystemTime::now()),
                },
            );
            new_op
        }
    };
    let mut resp = StatusCode::ACCEPTED.into_response();
    async_headers(&mut resp, base, &segs[1], &location, &op, api, retry_after);
    resp
}
