//! Writes: server-side apply under [`FIELD_MANAGER`], a content hash so unchanged objects
//! are never re-applied, a finalizer added guarded by `resourceVersion` and removed by a
//! JSON patch that tests it first (the one way every finalizer of sandboxd goes).

use std::fmt::Debug;

use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::discovery::ApiResource;
use kube::{Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::FIELD_MANAGER;

/// The annotation holding the hash of what sandboxd last applied to an object.
pub(crate) const HASH_ANNOTATION: &str = "sandboxd.io/applied-hash";

/// Errors of apply and finalizer helpers.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The API server refused or failed a write.
    #[error("{verb} {kind} {name}: {source}")]
    Api {
        /// What was attempted.
        verb: &'static str,
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// The object could not be serialised.
    #[error("serialising {kind} {name}: {source}")]
    Serialise {
        /// The object's kind.
        kind: String,
        /// The object's name.
        name: String,
        /// Why.
        source: serde_json::Error,
    },
}

impl Error {
    /// A short, stable label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Api { source, .. } if is_conflict(source) => "conflict",
            Error::Api { .. } => "api",
            Error::Serialise { .. } => "serialise",
        }
    }
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

/// Whether a kube error is a 404.
pub(crate) fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

/// SHA-256 (hex, first 16 bytes) of a value's JSON: a stable content hash.
pub(crate) fn content_hash<T: Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes);
    digest.as_ref()[..16]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Sets [`HASH_ANNOTATION`] on `obj` to the hash of its content (without that annotation).
pub(crate) fn stamp_hash<K: Resource + Serialize>(obj: &mut K) -> String {
    obj.annotations_mut().remove(HASH_ANNOTATION);
    let hash = content_hash(obj);
    obj.annotations_mut()
        .insert(HASH_ANNOTATION.to_string(), hash.clone());
    hash
}

/// Whether an observed object carries the hash `desired` was stamped with (so applying it
/// again would change nothing sandboxd owns).
pub(crate) fn hash_matches<K: Resource>(observed: Option<&K>, desired: &K) -> bool {
    match (observed, desired.annotations().get(HASH_ANNOTATION)) {
        (Some(o), Some(h)) => o.annotations().get(HASH_ANNOTATION) == Some(h),
        _ => false,
    }
}

/// Server-side applies `obj` (forcing ownership of its fields) under [`FIELD_MANAGER`].
pub(crate) async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    apply_kind(api, obj, &K::kind(&Default::default())).await
}

/// [`apply`] for an object of a kind known at run time (`ar`).
pub(crate) async fn apply_dynamic(
    api: &Api<DynamicObject>,
    ar: &ApiResource,
    obj: &DynamicObject,
) -> Result<DynamicObject, Error> {
    apply_kind(api, obj, &ar.kind).await
}

async fn apply_kind<K>(api: &Api<K>, obj: &K, kind: &str) -> Result<K, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + Debug,
{
    let name = obj.name_any();
    api.patch(
        &name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(obj),
    )
    .await
    .map_err(|source| Error::Api {
        verb: "applying",
        kind: kind.to_string(),
        name,
        source,
    })
}

/// Server-side applies a partial object given as JSON (must carry apiVersion, kind and
/// metadata.name) under `manager`.
pub(crate) async fn apply_json<K>(
    api: &Api<K>,
    name: &str,
    manager: &str,
    body: serde_json::Value,
) -> Result<K, Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    api.patch(
        name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::Api {
        verb: "applying",
        kind: K::kind(&Default::default()).to_string(),
        name: name.to_string(),
        source,
    })
}

/// Server-side applies the status of `name` (a JSON object with apiVersion, kind and
/// status) through the status subresource under [`FIELD_MANAGER`].
pub(crate) async fn apply_status<K>(
    api: &Api<K>,
    name: &str,
    body: serde_json::Value,
) -> Result<K, Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await
    .map_err(|source| Error::Api {
        verb: "applying status of",
        kind: K::kind(&Default::default()).to_string(),
        name: name.to_string(),
        source,
    })
}

/// Deletes an object; an object already gone is success.
pub(crate) async fn delete_if_exists<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    delete_kind(api, name, &K::kind(&Default::default())).await
}

/// [`delete_if_exists`] for an object of a kind known at run time (`ar`).
pub(crate) async fn delete_dynamic(
    api: &Api<DynamicObject>,
    ar: &ApiResource,
    name: &str,
) -> Result<(), Error> {
    delete_kind(api, name, &ar.kind).await
}

async fn delete_kind<K>(api: &Api<K>, name: &str, kind: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, &Default::default()).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(source) => Err(Error::Api {
            verb: "deleting",
            kind: kind.to_string(),
            name: name.to_string(),
            source,
        }),
    }
}

async fn set_finalizers<K>(api: &Api<K>, obj: &K, finalizers: Vec<String>) -> Result<K, Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    let name = obj.name_any();
    // The resourceVersion makes the merge patch fail with 409 if someone else changed the
    // list in between, instead of silently dropping their finalizer.
    let body = json!({"metadata": {
        "resourceVersion": obj.resource_version(),
        "finalizers": finalizers,
    }});
    api.patch(&name, &PatchParams::default(), &Patch::Merge(&body))
        .await
        .map_err(|source| Error::Api {
            verb: "updating finalizers of",
            kind: K::kind(&Default::default()).to_string(),
            name,
            source,
        })
}

/// Adds `finalizer` to `obj` unless present. Returns whether it wrote.
pub(crate) async fn add_finalizer<K>(api: &Api<K>, obj: &K, finalizer: &str) -> Result<bool, Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    if obj.finalizers().iter().any(|f| f == finalizer) {
        return Ok(false);
    }
    let mut list = obj.finalizers().to_vec();
    list.push(finalizer.to_string());
    set_finalizers(api, obj, list).await?;
    Ok(true)
}

/// Removes `finalizer` from `obj` (its last known state) if present. Returns whether it
/// wrote. An object that is already gone counts as done.
///
/// The finalizer is removed by position with a JSON patch that first tests it is still
/// there: one call and no read in the common case, and another writer's finalizer is never
/// dropped. When the list changed meanwhile, it is read again and the removal retried.
pub(crate) async fn remove_finalizer<K>(
    api: &Api<K>,
    obj: &K,
    finalizer: &str,
) -> Result<bool, Error>
where
    K: Resource + Clone + DeserializeOwned + Debug,
    K::DynamicType: Default,
{
    let name = obj.name_any();
    let failed = |source| Error::Api {
        verb: "removing the finalizer of",
        kind: K::kind(&Default::default()).to_string(),
        name: name.clone(),
        source,
    };
    let mut finalizers = obj.finalizers().to_vec();
    for _ in 0..5 {
        let Some(i) = finalizers.iter().position(|f| f == finalizer) else {
            return Ok(false);
        };
        let path = format!("/metadata/finalizers/{i}");
        let patch: json_patch::Patch = serde_json::from_value(json!([
            {"op": "test", "path": path, "value": finalizer},
            {"op": "remove", "path": path},
        ]))
        .expect("a valid JSON patch");
        match api
            .patch(&name, &PatchParams::default(), &Patch::<()>::Json(patch))
            .await
        {
            Ok(_) => return Ok(true),
            Err(e) if is_not_found(&e) => return Ok(true),
            // The finalizers changed since they were read: read them and retry.
            Err(kube::Error::Api(s)) if s.code == 422 || s.code == 409 => {
                match api.get_opt(&name).await.map_err(failed)? {
                    Some(current) => finalizers = current.finalizers().to_vec(),
                    None => return Ok(true),
                }
            }
            Err(e) => return Err(failed(e)),
        }
    }
    Err(failed(kube::Error::Api(
        kube::core::Status::failure(
            &format!("the finalizers of {name} kept changing"),
            "Conflict",
        )
        .with_code(409)
        .boxed(),
    )))
}

impl From<Error> for kube::Error {
    /// The API error behind a failed write, for callers that speak `kube::Error`.
    fn from(e: Error) -> Self {
        match e {
            Error::Api { source, .. } => source,
            Error::Serialise { source, .. } => kube::Error::SerdeError(source),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::node::v1::RuntimeClass;

    #[test]
    fn hash_ignores_its_own_annotation_and_tracks_content() {
        let mut a = RuntimeClass {
            handler: "kata-remote".into(),
            ..Default::default()
        };
        a.metadata.name = Some("kata-remote".into());
        let h1 = stamp_hash(&mut a);
        let h1_again = stamp_hash(&mut a);
        assert_eq!(h1, h1_again, "stamping twice is stable");
        let mut b = a.clone();
        b.handler = "other".into();
        let h2 = stamp_hash(&mut b);
        assert_ne!(h1, h2);
        assert!(hash_matches(Some(&a), &a));
        assert!(!hash_matches(Some(&a), &b));
        assert!(!hash_matches(None, &a));
    }
}
