//! The storage account `publish` uploads to: reused when it exists, created otherwise
//! (StorageV2, TLS 1.2, no public blob access), its key from `listKeys` for Shared Key
//! requests; and the removal of a blob sandboxd wrote.

use serde_json::json;

use super::blob::{self, BlobClient};
use super::{Error, STORAGE_API, sharedkey, tags, upload};
use crate::cloud::azure::{Arm, ArmError};

/// A storage account ready for upload: its id, blob endpoint and a signer.
pub(super) struct Storage {
    /// The account's ARM id.
    pub(crate) id: String,
    /// Its Blob service, signed with its key.
    pub(crate) client: BlobClient,
}

/// The account `name` in `rg`, created in `region` when missing.
pub(super) async fn account(
    arm: &Arm,
    sub: &str,
    rg: &str,
    region: &str,
    name: &str,
) -> Result<Storage, Error> {
    let path = format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Storage/storageAccounts/{name}?api-version={STORAGE_API}"
    );
    let account = match arm.get(&path).await? {
        Some(a) => {
            tracing::info!(account = name, "reusing the storage account");
            a
        }
        None => {
            eprintln!("creating storage account {name} in {region}");
            let body = json!({
                "location": region,
                "sku": {"name": "Standard_LRS"},
                "kind": "StorageV2",
                "tags": tags(&[]),
                "properties": {
                    "minimumTlsVersion": "TLS1_2",
                    "allowBlobPublicAccess": false,
                    "allowSharedKeyAccess": true,
                    "supportsHttpsTrafficOnly": true
                }
            });
            arm.put(&format!("storage account {name}"), &path, &body)
                .await
                .map_err(|e| match e.status() {
                    Some(409) => Error::Refused(format!(
                        "storage account name {name} is taken (names are global); pass another --storage-account: {e}"
                    )),
                    _ => Error::Arm(e),
                })?
        }
    };
    let id = account["id"].as_str().unwrap_or_default().to_string();
    let endpoint = account["properties"]["primaryEndpoints"]["blob"]
        .as_str()
        .ok_or_else(|| {
            Error::Arm(ArmError::Unexpected(format!(
                "storage account {name} has no blob endpoint (properties.primaryEndpoints.blob)"
            )))
        })?;
    let endpoint = url::Url::parse(endpoint).map_err(|e| {
        Error::Arm(ArmError::Unexpected(format!(
            "blob endpoint {endpoint}: {e}"
        )))
    })?;
    let keys = arm
        .post(&format!(
            "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Storage/storageAccounts/{name}/listKeys?api-version={STORAGE_API}"
        ))
        .await?;
    let key = keys["keys"][0]["value"].as_str().ok_or_else(|| {
        Error::Arm(ArmError::Unexpected(format!(
            "listKeys of {name} returned no key"
        )))
    })?;
    let signer = sharedkey::SharedKey::new(name, key)
        .map_err(|e| Error::Arm(ArmError::Unexpected(e.to_string())))?;
    Ok(Storage {
        id,
        client: BlobClient::new(endpoint, signer),
    })
}

/// Deletes the blob at `uri` of the account `storage_id` when sandboxd wrote it. Says what
/// it did, one line each.
pub(super) async fn delete_blob(
    arm: &Arm,
    storage_id: &str,
    uri: &str,
) -> Result<Vec<String>, Error> {
    let q = format!("?api-version={STORAGE_API}");
    let Some(account) = arm.get(&format!("{storage_id}{q}")).await? else {
        return Ok(vec![format!(
            "storage account {storage_id} is gone; no blob to delete"
        )]);
    };
    let name = account["name"].as_str().unwrap_or_default().to_string();
    let keys = arm.post(&format!("{storage_id}/listKeys{q}")).await?;
    let key = keys["keys"][0]["value"].as_str().unwrap_or_default();
    let signer = sharedkey::SharedKey::new(&name, key)
        .map_err(|e| Error::Arm(ArmError::Unexpected(e.to_string())))?;
    let url = url::Url::parse(uri).map_err(|e| Error::Input(format!("blob URI {uri}: {e}")))?;
    let Some((endpoint, container, blob)) = blob::split_blob_url(&url, &name) else {
        return Ok(vec![format!("{uri} is not a blob URL; left alone")]);
    };
    let client = BlobClient::new(endpoint, signer);
    match client.properties(&container, &blob).await? {
        None => Ok(vec![format!("blob {uri} is already gone")]),
        Some(p)
            if p.metadata.get(upload::META_CREATED_BY).map(String::as_str) != Some("sandboxd") =>
        {
            Ok(vec![format!(
                "blob {uri} was not written by sandboxd; left alone"
            )])
        }
        Some(_) => {
            client.delete(&container, &blob).await?;
            Ok(vec![format!("deleted blob {uri}")])
        }
    }
}
