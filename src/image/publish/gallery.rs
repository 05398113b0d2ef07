//! The images `publish` makes and `delete` removes: a managed image, or an Azure Compute
//! Gallery image version (the gallery and a Generation 2 definition made when missing, one
//! that allows Confidential VMs when asked). An image that exists is reused only when
//! sandboxd made it from the same blob; anything else is refused, never overwritten.

use serde_json::json;

use super::{COMPUTE_API, Error, GALLERY_API, TAG_STORAGE_ACCOUNT, created_by_us, tags};
use crate::cloud::azure::{Arm, ResourceId};

/// A managed image `name` from the blob at `blob_url`; returns its id.
pub(super) async fn managed_image(
    arm: &Arm,
    sub: &str,
    rg: &str,
    region: &str,
    name: &str,
    storage_id: &str,
    blob_url: &str,
) -> Result<String, Error> {
    let path = format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/images/{name}?api-version={COMPUTE_API}"
    );
    if let Some(existing) = arm.get(&path).await? {
        let same = existing["properties"]["storageProfile"]["osDisk"]["blobUri"].as_str()
            == Some(blob_url);
        if created_by_us(&existing) && same {
            return Ok(existing["id"].as_str().unwrap_or_default().to_string());
        }
        return Err(Error::Refused(format!(
            "managed image {name} already exists and was not made from this VHD; pass another --image-name"
        )));
    }
    let body = json!({
        "location": region,
        "tags": tags(&[(TAG_STORAGE_ACCOUNT, storage_id)]),
        "properties": {
            "hyperVGeneration": "V2",
            "storageProfile": {
                "osDisk": {
                    "osType": "Linux",
                    "osState": "Generalized",
                    "blobUri": blob_url,
                    "caching": "ReadWrite",
                    "storageAccountType": "Standard_LRS"
                }
            }
        }
    });
    let v = arm
        .put(&format!("managed image {name}"), &path, &body)
        .await?;
    Ok(v["id"].as_str().unwrap_or_default().to_string())
}

/// A version of the gallery image `definition` from the blob at `blob_url`; returns its id.
#[allow(clippy::too_many_arguments)]
pub(super) async fn gallery_version(
    arm: &Arm,
    sub: &str,
    rg: &str,
    region: &str,
    gallery: &str,
    definition: &str,
    version: &str,
    confidential: bool,
    storage_id: &str,
    blob_url: &str,
) -> Result<String, Error> {
    let g_path = format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/galleries/{gallery}"
    );
    let q = format!("?api-version={GALLERY_API}");
    if arm.get(&format!("{g_path}{q}")).await?.is_none() {
        eprintln!("creating gallery {gallery}");
        let body = json!({
            "location": region,
            "tags": tags(&[]),
            "properties": {"description": "Pod VM images published by sandboxd"}
        });
        arm.put(
            &format!("gallery {gallery}"),
            &format!("{g_path}{q}"),
            &body,
        )
        .await?;
    }
    let d_path = format!("{g_path}/images/{definition}");
    match arm.get(&format!("{d_path}{q}")).await? {
        Some(d) => {
            let features = d["properties"]["features"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let cvm = features.iter().any(|f| {
                f["name"].as_str() == Some("SecurityType")
                    && f["value"]
                        .as_str()
                        .is_some_and(|v| v.to_ascii_lowercase().contains("confidentialvm"))
            });
            if confidential && !cvm {
                return Err(Error::Refused(format!(
                    "gallery image definition {definition} exists without SecurityType ConfidentialVMSupported (features cannot change); pass another --gallery-image-definition"
                )));
            }
            if d["properties"]["hyperVGeneration"].as_str() != Some("V2") {
                return Err(Error::Refused(format!(
                    "gallery image definition {definition} is not Generation 2 (hyperVGeneration V2); the pod VM image boots with UEFI only"
                )));
            }
        }
        None => {
            eprintln!("creating gallery image definition {definition}");
            let mut props = json!({
                "osType": "Linux",
                "osState": "Generalized",
                "hyperVGeneration": "V2",
                "architecture": "x64",
                "identifier": {"publisher": "sandboxd", "offer": "podvm", "sku": definition}
            });
            // What CAA will ask of VMs from it: Confidential VMs, or plain VMs with
            // Trusted Launch when secure boot is enabled (or none).
            props["features"] = if confidential {
                json!([{"name": "SecurityType", "value": "ConfidentialVMSupported"}])
            } else {
                json!([{"name": "SecurityType", "value": "TrustedLaunchSupported"}])
            };
            let body = json!({"location": region, "tags": tags(&[]), "properties": props});
            arm.put(
                &format!("gallery image definition {definition}"),
                &format!("{d_path}{q}"),
                &body,
            )
            .await?;
        }
    }
    let v_path = format!("{d_path}/versions/{version}{q}");
    if let Some(existing) = arm.get(&v_path).await? {
        let same = existing["properties"]["storageProfile"]["osDiskImage"]["source"]["uri"]
            .as_str()
            == Some(blob_url);
        if created_by_us(&existing) && same {
            return Ok(existing["id"].as_str().unwrap_or_default().to_string());
        }
        return Err(Error::Refused(format!(
            "gallery image version {version} of {definition} already exists and was not made from this VHD; pass another --gallery-image-version"
        )));
    }
    eprintln!("creating gallery image version {definition}/{version} (replicating takes a while)");
    let body = json!({
        "location": region,
        "tags": tags(&[(TAG_STORAGE_ACCOUNT, storage_id)]),
        "properties": {
            "publishingProfile": {
                "targetRegions": [{"name": region, "regionalReplicaCount": 1, "storageAccountType": "Standard_LRS"}],
                "excludeFromLatest": false
            },
            "storageProfile": {
                "osDiskImage": {
                    "hostCaching": "ReadOnly",
                    "source": {"storageAccountId": storage_id, "uri": blob_url}
                }
            }
        }
    });
    let v = arm
        .put(&format!("gallery image version {version}"), &v_path, &body)
        .await?;
    Ok(v["id"].as_str().unwrap_or_default().to_string())
}

/// The kinds of image id `delete` understands.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum ImageKind {
    Managed,
    GalleryVersion {
        definition_path: String,
        gallery_path: String,
    },
}

/// The kind of `id`, `None` when `delete` does not know it.
pub(super) fn image_kind(id: &str) -> Option<ImageKind> {
    let id = ResourceId::parse(id)?;
    if id.is_exactly("Microsoft.Compute/images") {
        return Some(ImageKind::Managed);
    }
    if !id.is_exactly("Microsoft.Compute/galleries/images/versions") {
        return None;
    }
    Some(ImageKind::GalleryVersion {
        definition_path: id.ancestor(1)?.to_string(),
        gallery_path: id.ancestor(2)?.to_string(),
    })
}

/// After a gallery image version is deleted: its definition, then its gallery, each when
/// sandboxd made it and nothing is left in it. Says what it deleted, one line each.
pub(super) async fn delete_empty_parents(
    arm: &Arm,
    definition_path: &str,
    gallery_path: &str,
) -> Result<Vec<String>, Error> {
    let mut done = Vec::new();
    let q = format!("?api-version={GALLERY_API}");
    for (parent, children) in [
        (definition_path, format!("{definition_path}/versions")),
        (gallery_path, format!("{gallery_path}/images")),
    ] {
        let Some(p) = arm.get(&format!("{parent}{q}")).await? else {
            continue;
        };
        if !created_by_us(&p) {
            break;
        }
        let left = arm
            .get(&format!("{children}{q}"))
            .await?
            .and_then(|v| v["value"].as_array().map(Vec::len))
            .unwrap_or(0);
        if left > 0 {
            break;
        }
        arm.delete(parent, &format!("{parent}{q}")).await?;
        done.push(format!("deleted {parent}"));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_ids_are_classified_case_insensitively() {
        assert_eq!(
            image_kind("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images/i"),
            Some(ImageKind::Managed)
        );
        assert_eq!(
            image_kind("/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/galleries/g/images/d/versions/1.0.0"),
            Some(ImageKind::GalleryVersion {
                definition_path: "/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/galleries/g/images/d".into(),
                gallery_path: "/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/galleries/g".into(),
            })
        );
        assert_eq!(image_kind("/subscriptions/s/resourceGroups/rg"), None);
    }
}
