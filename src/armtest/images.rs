//! `Microsoft.Compute` images (managed images from a VHD blob), galleries, gallery image
//! definitions (with the `SecurityType` feature) and gallery image versions from a VHD: PUT
//! answers 201 `Creating` with an `Azure-AsyncOperation` served by the compute operations
//! endpoint, DELETE answers 202, 404 for missing parents, 409 for property changes and for
//! deleting a parent that has children, as ARM does.

// Handlers answer ARM error responses directly; boxing them buys nothing in a test server.
#![allow(clippy::result_large_err)]

use axum::body::Bytes;
use axum::http::{Method, StatusCode};
use axum::response::Response;
use serde_json::{Value, json};

use super::arm_error;
use super::storage::{
    bad, check_tags, json_response, not_found, parse_body, present, region_key, start_delete,
    start_op, sweep, unsupported_api,
};
use super::store::{Inner, Store};

/// api-versions of `Microsoft.Compute/images`.
const IMAGE_API_VERSIONS: &[&str] = &["2023-09-01", "2024-03-01", "2024-07-01", "2024-11-01"];
/// api-versions of `Microsoft.Compute/galleries` and their children.
const GALLERY_API_VERSIONS: &[&str] = &["2022-03-03", "2022-08-03", "2023-07-03", "2024-03-03"];
/// `SecurityType` feature values of gallery image definitions.
const SECURITY_TYPES: &[&str] = &[
    "Standard",
    "TrustedLaunch",
    "TrustedLaunchSupported",
    "ConfidentialVM",
    "ConfidentialVMSupported",
    "TrustedLaunchAndConfidentialVmSupported",
];

struct Ctx<'a> {
    base: &'a str,
    api: &'a str,
    sub: &'a str,
    rg: &'a str,
}

impl Ctx<'_> {
    fn async_url(&self, location: &str, op: &str) -> String {
        format!(
            "{}/subscriptions/{}/providers/Microsoft.Compute/locations/{}/operations/{op}?api-version={}",
            self.base,
            self.sub,
            region_key(location),
            self.api
        )
    }
}

/// Where a gallery image shared with the subscription (`/SharedGalleries/…`) or published
/// to the community (`/CommunityGalleries/…`) is read: `GET /subscriptions/{sub}/providers/
/// Microsoft.Compute/locations/{location}/{sharedGalleries|communityGalleries}/{gallery}/
/// images/{image}` (read only; 404 where the image is not offered in that location).
pub(crate) fn route_shared(
    store: &Store,
    method: &Method,
    segs: &[String],
    api: &str,
) -> Option<Response> {
    let l: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = l.iter().map(String::as_str).collect();
    let [
        "subscriptions",
        _,
        "providers",
        "microsoft.compute",
        "locations",
        _,
        kind @ ("sharedgalleries" | "communitygalleries"),
        _,
        "images",
        _,
    ] = l.as_slice()
    else {
        return None;
    };
    if !GALLERY_API_VERSIONS.contains(&api) {
        return Some(unsupported_api(api, kind, GALLERY_API_VERSIONS));
    }
    if *method != Method::GET {
        return Some(method_not_allowed());
    }
    let key = format!("/{}", l.join("/"));
    match store.lock().resources.get(&key) {
        Some(r) => Some(json_response(StatusCode::OK, r.clone())),
        None => Some(arm_error(
            StatusCode::NOT_FOUND,
            "ResourceNotFound",
            format!(
                "The gallery image '{}' of gallery '{}' is not available in '{}'.",
                segs[9], segs[7], segs[5]
            ),
        )),
    }
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
    let [
        "subscriptions",
        _,
        "resourcegroups",
        _,
        "providers",
        "microsoft.compute",
        ty,
        rest @ ..,
    ] = l.as_slice()
    else {
        return None;
    };
    let gallery = match *ty {
        "images" if rest.len() == 1 => false,
        "galleries" if (1..=5).contains(&rest.len()) => true,
        _ => return None,
    };
    // Only the resource types of this module: galleries/g[/images[/d[/versions[/v]]]].
    if gallery
        && ((rest.len() >= 2 && rest[1] != "images") || (rest.len() >= 4 && rest[3] != "versions"))
    {
        return None;
    }
    let versions = if gallery {
        GALLERY_API_VERSIONS
    } else {
        IMAGE_API_VERSIONS
    };
    if !versions.contains(&api) {
        return Some(unsupported_api(api, ty, versions));
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
    let ctx = Ctx {
        base,
        api,
        sub: &segs[1],
        rg: &segs[3],
    };
    // Canonical id: provider casing, the caller's names.
    let mut id = format!(
        "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/{}",
        segs[1],
        segs[3],
        if gallery { "galleries" } else { "images" }
    );
    for (i, s) in segs[7..].iter().enumerate() {
        id.push('/');
        id.push_str(if i % 2 == 1 { l[7 + i] } else { s });
    }
    let key = id.to_ascii_lowercase();
    let kind = match (gallery, rest.len()) {
        (false, _) => "Microsoft.Compute/images",
        (true, 1) => "Microsoft.Compute/galleries",
        (true, 2 | 3) => "Microsoft.Compute/galleries/images",
        _ => "Microsoft.Compute/galleries/images/versions",
    };
    // Lists: galleries/g/images, galleries/g/images/d/versions.
    if rest.len() % 2 == 0 {
        if *method != Method::GET {
            return Some(method_not_allowed());
        }
        let parent = key
            .rsplit_once('/')
            .map(|(p, _)| p.to_string())
            .unwrap_or_default();
        if !g.resources.contains_key(&parent) {
            return Some(not_found(kind, &segs[segs.len() - 2], ctx.rg));
        }
        let prefix = format!("{key}/");
        let value: Vec<Value> = g
            .resources
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .filter(|(k, v)| {
                !k[prefix.len()..].contains('/') && v["__deleting"].as_bool() != Some(true)
            })
            .map(|(_, v)| present(&g, v))
            .collect();
        return Some(json_response(StatusCode::OK, json!({"value": value})));
    }
    let name = segs.last().cloned().unwrap_or_default();
    Some(match *method {
        Method::GET => match g.resources.get(&key) {
            Some(v) if v["__deleting"].as_bool() != Some(true) => {
                json_response(StatusCode::OK, present(&g, v))
            }
            _ => not_found(kind, &name, ctx.rg),
        },
        Method::DELETE => {
            let prefix = format!("{key}/");
            let has_children = g
                .resources
                .iter()
                .any(|(k, v)| k.starts_with(&prefix) && v["__deleting"].as_bool() != Some(true));
            if has_children {
                return Some(arm_error(
                    StatusCode::CONFLICT,
                    "CannotDeleteResource",
                    format!("Can not delete resource before nested resources are deleted: {id}"),
                ));
            }
            let location = g
                .resources
                .get(&key)
                .and_then(|v| v["location"].as_str().map(str::to_string))
                .unwrap_or_default();
            start_delete(&mut g, &key, |op| ctx.async_url(&location, op), true)
        }
        Method::PUT => {
            let req = match parse_body(body) {
                Ok(v) => v,
                Err(r) => return Some(r),
            };
            put(&mut g, &ctx, kind, &id, &name, req)
        }
        _ => method_not_allowed(),
    })
}

fn method_not_allowed() -> Response {
    arm_error(
        StatusCode::METHOD_NOT_ALLOWED,
        "MethodNotAllowed",
        "method not allowed",
    )
}

fn invalid(target: &str, msg: impl Into<String>) -> Response {
    bad(
        "InvalidParameter",
        format!("{} (target: {target})", msg.into()),
    )
}

/// The blob endpoint of the storage account `uri` lives in, if one in `sub` serves it.
fn account_of_blob<'a>(g: &'a Inner, sub: &str, uri: &str) -> Option<&'a Value> {
    let prefix = format!("/subscriptions/{}/", sub.to_ascii_lowercase());
    g.resources.iter().find_map(|(k, v)| {
        let ep = v["properties"]["primaryEndpoints"]["blob"].as_str()?;
        (k.starts_with(&prefix)
            && k.contains("/providers/microsoft.storage/storageaccounts/")
            && uri.starts_with(ep)
            && uri.len() > ep.len())
        .then_some(v)
    })
}

fn put(g: &mut Inner, ctx: &Ctx<'_>, kind: &str, id: &str, name: &str, req: Value) -> Response {
    let key = id.to_ascii_lowercase();
    let Some(location) = req["location"]
        .as_str()
        .filter(|l| !l.is_empty())
        .map(str::to_string)
    else {
        return bad(
            "LocationRequired",
            "The location property is required for this definition.",
        );
    };
    if let Err(r) = check_tags(&req) {
        return r;
    }
    let parent = key
        .rsplit_once('/')
        .and_then(|(p, _)| p.rsplit_once('/'))
        .map(|(p, _)| p.to_string())
        .unwrap_or_default();
    let props = &req["properties"];
    let existing = g.resources.get(&key).cloned();
    // What must not change once created.
    let identity: Value = match kind {
        "Microsoft.Compute/images" => {
            let os = &props["storageProfile"]["osDisk"];
            if !matches!(os["osType"].as_str(), Some("Linux" | "Windows")) {
                return invalid("osDisk.osType", "osType must be Linux or Windows");
            }
            if !matches!(os["osState"].as_str(), Some("Generalized" | "Specialized")) {
                return invalid(
                    "osDisk.osState",
                    "osState must be Generalized or Specialized",
                );
            }
            let Some(uri) = os["blobUri"].as_str() else {
                return invalid(
                    "osDisk.blobUri",
                    "One of blobUri, managedDisk or snapshot is required",
                );
            };
            if account_of_blob(g, ctx.sub, uri).is_none() {
                return invalid(
                    "osDisk.blobUri",
                    format!("The blob {uri} is not in a storage account of this subscription"),
                );
            }
            let gen_ = props["hyperVGeneration"].as_str().unwrap_or("V1");
            if !matches!(gen_, "V1" | "V2") {
                return invalid("hyperVGeneration", "hyperVGeneration must be V1 or V2");
            }
            json!([uri, gen_, os["osType"]])
        }
        "Microsoft.Compute/galleries" => {
            json!(null)
        }
        "Microsoft.Compute/galleries/images" => {
            if !g.resources.contains_key(&parent) {
                return arm_error(
                    StatusCode::NOT_FOUND,
                    "ParentResourceNotFound",
                    format!(
                        "Can not perform requested operation on nested resource. Parent resource '{}' not found.",
                        ctx_parent_name(id, 2)
                    ),
                );
            }
            if !matches!(props["osType"].as_str(), Some("Linux" | "Windows")) {
                return invalid("osType", "osType must be Linux or Windows");
            }
            if !matches!(
                props["osState"].as_str(),
                Some("Generalized" | "Specialized")
            ) {
                return invalid("osState", "osState must be Generalized or Specialized");
            }
            let idf = &props["identifier"];
            if ["publisher", "offer", "sku"]
                .iter()
                .any(|f| idf[f].as_str().is_none_or(str::is_empty))
            {
                return invalid(
                    "identifier",
                    "identifier.publisher, identifier.offer and identifier.sku are required",
                );
            }
            let gen_ = props["hyperVGeneration"].as_str().unwrap_or("V1");
            for f in props["features"].as_array().cloned().unwrap_or_default() {
                if f["name"].as_str() == Some("SecurityType") {
                    let v = f["value"].as_str().unwrap_or_default();
                    if !SECURITY_TYPES.iter().any(|s| s.eq_ignore_ascii_case(v)) {
                        return invalid(
                            "features",
                            format!(
                                "SecurityType '{v}' is not one of {}",
                                SECURITY_TYPES.join(", ")
                            ),
                        );
                    }
                    if v != "Standard" && gen_ != "V2" {
                        return invalid(
                            "hyperVGeneration",
                            format!("SecurityType {v} needs hyperVGeneration V2"),
                        );
                    }
                }
            }
            json!([
                props["osType"],
                props["osState"],
                gen_,
                props["features"],
                idf
            ])
        }
        _ => {
            if !g.resources.contains_key(&parent) {
                return arm_error(
                    StatusCode::NOT_FOUND,
                    "ParentResourceNotFound",
                    format!(
                        "Can not perform requested operation on nested resource. Parent resource '{}' not found.",
                        ctx_parent_name(id, 2)
                    ),
                );
            }
            let parts: Vec<&str> = name.split('.').collect();
            if parts.len() != 3 || parts.iter().any(|p| p.parse::<i32>().is_err()) {
                return invalid(
                    "galleryImageVersionName",
                    "The gallery image version name must be MajorVersion.MinorVersion.Patch with 32-bit integers",
                );
            }
            let src = &props["storageProfile"]["osDiskImage"]["source"];
            let (Some(uri), Some(sa)) = (src["uri"].as_str(), src["storageAccountId"].as_str())
            else {
                return invalid(
                    "storageProfile.osDiskImage.source",
                    "A VHD source needs uri and storageAccountId",
                );
            };
            let Some(account) = g.resources.get(&sa.to_ascii_lowercase()) else {
                return invalid(
                    "storageProfile.osDiskImage.source.storageAccountId",
                    format!("Storage account {sa} was not found"),
                );
            };
            let ep = account["properties"]["primaryEndpoints"]["blob"]
                .as_str()
                .unwrap_or_default();
            if !uri.starts_with(ep) || uri.len() <= ep.len() {
                return invalid(
                    "storageProfile.osDiskImage.source.uri",
                    format!("The blob {uri} is not in storage account {sa}"),
                );
            }
            json!([uri, sa])
        }
    };
    if let Some(old) = existing {
        if old["__deleting"].as_bool() == Some(true) {
            return arm_error(
                StatusCode::CONFLICT,
                "OperationNotAllowed",
                format!("{id} is being deleted"),
            );
        }
        if old["__identity"] != identity {
            return arm_error(
                StatusCode::CONFLICT,
                "PropertyChangeNotAllowed",
                format!("Changing the source or type of {id} is not allowed."),
            );
        }
        let mut v = old;
        if let Some(t) = req.get("tags") {
            v["tags"] = t.clone();
        }
        g.resources.insert(key, v.clone());
        let mut out = present(g, &v);
        strip_identity(&mut out);
        return json_response(StatusCode::OK, out);
    }
    let op = start_op(g);
    let mut stored = req.clone();
    stored["id"] = id.into();
    stored["name"] = name.into();
    stored["type"] = kind.into();
    if !stored["tags"].is_object() {
        stored["tags"] = json!({});
    }
    stored["__op"] = op.clone().into();
    stored["__identity"] = identity;
    if kind == "Microsoft.Compute/galleries" {
        stored["properties"]["identifier"] =
            json!({"uniqueName": format!("{}-{}", ctx.sub, name.to_ascii_uppercase())});
    }
    if kind == "Microsoft.Compute/galleries/images/versions" {
        stored["properties"]["publishingProfile"]["publishedDate"] =
            super::store::rfc3339(std::time::SystemTime::now()).into();
    }
    g.resources.insert(key, stored.clone());
    let mut out = present(g, &stored);
    strip_identity(&mut out);
    let mut resp = json_response(StatusCode::CREATED, out);
    let url = ctx.async_url(&location, &op);
    if let Ok(v) = url.parse() {
        resp.headers_mut().insert("azure-asyncoperation", v);
    }
    resp.headers_mut()
        .insert("retry-after", g.config.lro_retry_after_secs.into());
    resp
}

fn strip_identity(v: &mut Value) {
    if let Some(o) = v.as_object_mut() {
        o.remove("__identity");
    }
}

fn ctx_parent_name(id: &str, up: usize) -> String {
    id.rsplit('/').nth(up).unwrap_or_default().to_string()
}
