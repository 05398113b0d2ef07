//! `Microsoft.Storage/storageAccounts`: create (202 + `Location` polling, as the Storage
//! resource provider does), get, delete, `listKeys`; the account's blob endpoint points at a
//! real Blob service (Azurite in tests) when [`StorageConfig::blob_endpoint`] is set. Also the
//! helpers the image resources share: pending operations, tag checks, presentation.

// Handlers answer ARM error responses directly; boxing them buys nothing in a test server.
#![allow(clippy::result_large_err)]

use std::time::{Instant, SystemTime};

use axum::body::Bytes;
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Value, json};

use super::arm_error;
use super::store::{Inner, Op, Store, rfc3339};

/// Storage settings of the test server.
#[derive(Clone, Debug, Default)]
pub struct StorageConfig {
    /// Base URL of the Blob service behind the accounts (path style: an account's endpoint
    /// is `<base><account>/`), e.g. Azurite's `http://127.0.0.1:10000/`. When unset, accounts
    /// report `https://<account>.blob.core.windows.net/`.
    pub blob_endpoint: Option<url::Url>,
}

/// api-versions of `Microsoft.Storage` this server understands.
const STORAGE_API_VERSIONS: &[&str] = &["2022-09-01", "2023-01-01", "2023-05-01", "2024-01-01"];

/// The key `listKeys` hands out for the account `name` (key1; key2 is derived the same way):
/// 64 bytes, base64, stable for a name, so a test can configure its Blob service with it
/// before the account exists.
pub fn storage_account_key(name: &str) -> String {
    key_of(name, 1)
}

fn key_of(name: &str, n: u8) -> String {
    let d = ring::digest::digest(
        &ring::digest::SHA512,
        format!("armtest-storage-key{n}:{}", name.to_ascii_lowercase()).as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(d.as_ref())
}

pub(crate) fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

pub(crate) fn bad(code: &str, message: impl Into<String>) -> Response {
    arm_error(StatusCode::BAD_REQUEST, code, message)
}

pub(crate) fn parse_body(body: &Bytes) -> Result<Value, Response> {
    match serde_json::from_slice::<Value>(body) {
        Ok(v @ Value::Object(_)) => Ok(v),
        _ => Err(bad(
            "InvalidRequestContent",
            "The request content was invalid and could not be deserialized.",
        )),
    }
}

pub(crate) fn not_found(ty: &str, name: &str, rg: &str) -> Response {
    arm_error(
        StatusCode::NOT_FOUND,
        "ResourceNotFound",
        format!("The Resource '{ty}/{name}' under resource group '{rg}' was not found."),
    )
}

pub(crate) fn unsupported_api(api: &str, ty: &str, supported: &[&str]) -> Response {
    bad(
        "NoRegisteredProviderFound",
        format!(
            "No registered resource provider found for API version '{api}' and type '{ty}'. Supported: {}",
            supported.join(", ")
        ),
    )
}

/// ARM refuses tag names with these characters.
pub(crate) fn check_tags(req: &Value) -> Result<(), Response> {
    if let Some(tags) = req["tags"].as_object() {
        for (k, v) in tags {
            if k.is_empty() || k.len() > 512 || k.chars().any(|c| "<>%&\\?/".contains(c)) {
                return Err(bad(
                    "InvalidTagNameCharacters",
                    format!(
                        "The tag names '{k}' have reserved characters '<,>,%,&,\\,?,/' or control characters."
                    ),
                ));
            }
            if !v.is_string() || v.as_str().is_some_and(|s| s.len() > 256) {
                return Err(bad(
                    "InvalidTag",
                    format!("The value of tag '{k}' must be a string of at most 256 characters."),
                ));
            }
        }
    }
    Ok(())
}

/// Region names as ARM normalises them for operation URLs (`West US` → `westus`).
pub(crate) fn region_key(location: &str) -> String {
    location
        .chars()
        .filter(|c| !c.is_whitespace())
        .collect::<String>()
        .to_ascii_lowercase()
}

/// Starts an operation of the configured duration; returns its id.
pub(crate) fn start_op(g: &mut Inner) -> String {
    let op = g.next_id();
    let until = Instant::now() + g.config.lro_duration;
    g.ops.insert(
        op.clone(),
        Op {
            until,
            failure: None,
            start: rfc3339(SystemTime::now()),
        },
    );
    op
}

/// Whether the operation recorded in a stored resource (`__op`) is still running.
pub(crate) fn running(g: &Inner, v: &Value, now: Instant) -> bool {
    v["__op"]
        .as_str()
        .and_then(|op| g.ops.get(op))
        .is_some_and(|op| now < op.until)
}

/// Drops resources whose delete operation is over (with their children).
pub(crate) fn sweep(g: &mut Inner) {
    let now = Instant::now();
    let done: Vec<String> = g
        .resources
        .iter()
        .filter(|(_, v)| v["__deleting"].as_bool() == Some(true) && !running(g, v, now))
        .map(|(k, _)| k.clone())
        .collect();
    for k in done {
        g.resources.remove(&k);
        let prefix = format!("{k}/");
        g.resources.retain(|r, _| !r.starts_with(&prefix));
    }
}

/// A stored resource as ARM shows it: provisioning state from its operation, private
/// fields removed.
pub(crate) fn present(g: &Inner, v: &Value) -> Value {
    let now = Instant::now();
    let mut out = v.clone();
    let state = if v["__deleting"].as_bool() == Some(true) {
        "Deleting"
    } else if running(g, v, now) {
        "Creating"
    } else {
        "Succeeded"
    };
    if let Some(o) = out.as_object_mut() {
        o.remove("__op");
        o.remove("__deleting");
        o.remove("__identity");
    }
    if !out["properties"].is_object() {
        out["properties"] = json!({});
    }
    out["properties"]["provisioningState"] = state.into();
    out
}

/// Marks `key` deleting; answers 202 with the operation headers (`async_url` builds the
/// status URL from the operation id), or 204 when it does not exist.
pub(crate) fn start_delete(
    g: &mut Inner,
    key: &str,
    async_url: impl Fn(&str) -> String,
    azure_async: bool,
) -> Response {
    let Some(v) = g.resources.get(key).cloned() else {
        return StatusCode::NO_CONTENT.into_response();
    };
    let op = if v["__deleting"].as_bool() == Some(true) {
        v["__op"].as_str().unwrap_or_default().to_string()
    } else {
        let op = start_op(g);
        if let Some(r) = g.resources.get_mut(key) {
            r["__op"] = op.clone().into();
            r["__deleting"] = true.into();
        }
        op
    };
    let mut resp = StatusCode::ACCEPTED.into_response();
    let url = async_url(&op);
    let retry = g.config.lro_retry_after_secs;
    let h = resp.headers_mut();
    if azure_async && let Ok(v) = url.parse() {
        h.insert("azure-asyncoperation", v);
    }
    if let Ok(v) = url.parse() {
        h.insert("location", v);
    }
    h.insert("retry-after", retry.into());
    resp
}

pub(crate) fn route(
    store: &Store,
    base: &str,
    method: &Method,
    segs: &[String],
    api: &str,
    body: &Bytes,
) -> Option<Response> {
    let l: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = l.iter().map(String::as_str).collect();
    match l.as_slice() {
        [
            "subscriptions",
            _,
            "providers",
            "microsoft.storage",
            "locations",
            _,
            "asyncoperations",
            op,
        ] if *method == Method::GET => {
            let mut g = store.lock();
            sweep(&mut g);
            let now = Instant::now();
            let Some(info) = g.ops.get(*op).map(|o| now < o.until) else {
                return Some(arm_error(
                    StatusCode::NOT_FOUND,
                    "NotFound",
                    "operation not found",
                ));
            };
            if info {
                let mut resp = StatusCode::ACCEPTED.into_response();
                let url = format!("{base}/{}?monitor=true&api-version={api}", segs.join("/"));
                if let Ok(v) = url.parse() {
                    resp.headers_mut().insert("location", v);
                }
                resp.headers_mut()
                    .insert("retry-after", g.config.lro_retry_after_secs.into());
                return Some(resp);
            }
            let account = g
                .resources
                .values()
                .find(|v| v["__op"].as_str() == Some(*op))
                .cloned();
            Some(match account {
                Some(a) if a["__deleting"].as_bool() != Some(true) => {
                    json_response(StatusCode::OK, present(&g, &a))
                }
                _ => StatusCode::OK.into_response(),
            })
        }
        [
            "subscriptions",
            _,
            "resourcegroups",
            _,
            "providers",
            "microsoft.storage",
            "storageaccounts",
            rest @ ..,
        ] if !rest.is_empty() && rest.len() <= 2 => {
            if !STORAGE_API_VERSIONS.contains(&api) {
                return Some(unsupported_api(
                    api,
                    "storageAccounts",
                    STORAGE_API_VERSIONS,
                ));
            }
            let mut g = store.lock();
            sweep(&mut g);
            let rg_key = format!("/subscriptions/{}/resourcegroups/{}", l[1], l[3]);
            if !g.resources.contains_key(&rg_key) {
                return Some(arm_error(
                    StatusCode::NOT_FOUND,
                    "ResourceGroupNotFound",
                    format!("Resource group '{}' could not be found.", segs[3]),
                ));
            }
            let name = segs[7].clone();
            let id = format!(
                "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Storage/storageAccounts/{name}",
                segs[1], segs[3]
            );
            let key = id.to_ascii_lowercase();
            Some(match (rest, method.clone()) {
                ([_], Method::GET) => match g.resources.get(&key) {
                    Some(v) if v["__deleting"].as_bool() != Some(true) => {
                        json_response(StatusCode::OK, present(&g, v))
                    }
                    _ => not_found("Microsoft.Storage/storageAccounts", &name, &segs[3]),
                },
                ([_], Method::PUT) => put_account(&mut g, base, api, &segs[1], &id, &name, body),
                ([_], Method::DELETE) => {
                    if g.resources.remove(&key).is_some() {
                        StatusCode::OK.into_response()
                    } else {
                        StatusCode::NO_CONTENT.into_response()
                    }
                }
                ([_, action], Method::POST) if *action == "listkeys" => {
                    match g.resources.get(&key) {
                        None => not_found("Microsoft.Storage/storageAccounts", &name, &segs[3]),
                        Some(v) if running(&g, v, Instant::now()) => arm_error(
                            StatusCode::CONFLICT,
                            "StorageAccountIsNotProvisioned",
                            format!(
                                "The storage account provisioning state must be 'Succeeded' before executing the operation. Account: {name}"
                            ),
                        ),
                        Some(_) => json_response(
                            StatusCode::OK,
                            json!({"keys": [
                                {"keyName": "key1", "value": key_of(&name, 1), "permissions": "FULL", "creationTime": rfc3339(SystemTime::now())},
                                {"keyName": "key2", "value": key_of(&name, 2), "permissions": "FULL", "creationTime": rfc3339(SystemTime::now())}
                            ]}),
                        ),
                    }
                }
                _ => arm_error(
                    StatusCode::METHOD_NOT_ALLOWED,
                    "MethodNotAllowed",
                    "method not allowed",
                ),
            })
        }
        _ => None,
    }
}

fn put_account(
    g: &mut Inner,
    base: &str,
    api: &str,
    sub: &str,
    id: &str,
    name: &str,
    body: &Bytes,
) -> Response {
    let key = id.to_ascii_lowercase();
    let req = match parse_body(body) {
        Ok(v) => v,
        Err(r) => return r,
    };
    if !(3..=24).contains(&name.len())
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
    {
        return bad(
            "AccountNameInvalid",
            format!(
                "{name} is not a valid storage account name. Storage account name must be between 3 and 24 characters in length and use numbers and lower-case letters only."
            ),
        );
    }
    let Some(location) = req["location"].as_str().filter(|l| !l.is_empty()) else {
        return bad(
            "LocationRequired",
            "The location property is required for this definition.",
        );
    };
    if req["sku"]["name"].as_str().is_none() || req["kind"].as_str().is_none() {
        return bad(
            "InvalidRequestContent",
            "A storage account needs sku.name and kind.",
        );
    }
    if let Err(r) = check_tags(&req) {
        return r;
    }
    // Names are global: the same name elsewhere is taken.
    let suffix = format!(
        "/providers/microsoft.storage/storageaccounts/{}",
        name.to_ascii_lowercase()
    );
    if g.resources
        .keys()
        .any(|k| k.ends_with(&suffix) && *k != key)
    {
        return arm_error(
            StatusCode::CONFLICT,
            "StorageAccountAlreadyTaken",
            format!("The storage account named {name} is already taken."),
        );
    }
    let blob = match &g.config.storage.blob_endpoint {
        Some(b) => format!("{}{name}/", ensure_slash(b.as_str())),
        None => format!("https://{name}.blob.core.windows.net/"),
    };
    if let Some(existing) = g.resources.get(&key).cloned() {
        // An update: same account, new tags.
        let mut v = existing;
        if let Some(t) = req.get("tags") {
            v["tags"] = t.clone();
        }
        g.resources.insert(key, v.clone());
        return json_response(StatusCode::OK, present(g, &v));
    }
    let op = start_op(g);
    let account = json!({
        "id": id,
        "name": name,
        "type": "Microsoft.Storage/storageAccounts",
        "location": location,
        "kind": req["kind"],
        "sku": {"name": req["sku"]["name"], "tier": "Standard"},
        "tags": req.get("tags").cloned().unwrap_or(json!({})),
        "__op": op,
        "properties": {
            "creationTime": rfc3339(SystemTime::now()),
            "primaryLocation": location,
            "statusOfPrimary": "available",
            "minimumTlsVersion": req["properties"]["minimumTlsVersion"],
            "allowBlobPublicAccess": req["properties"]["allowBlobPublicAccess"],
            "allowSharedKeyAccess": req["properties"]["allowSharedKeyAccess"],
            "supportsHttpsTrafficOnly": true,
            "primaryEndpoints": {"blob": blob}
        }
    });
    g.resources.insert(key, account);
    let mut resp = StatusCode::ACCEPTED.into_response();
    let url = format!(
        "{base}/subscriptions/{sub}/providers/Microsoft.Storage/locations/{}/asyncoperations/{op}?monitor=true&api-version={api}",
        region_key(location)
    );
    if let Ok(v) = url.parse() {
        resp.headers_mut().insert("location", v);
    }
    resp.headers_mut()
        .insert("retry-after", g.config.lro_retry_after_secs.into());
    resp
}

fn ensure_slash(s: &str) -> String {
    if s.ends_with('/') {
        s.to_string()
    } else {
        format!("{s}/")
    }
}
