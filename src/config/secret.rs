//! `peer-pods-secret`: cloud credentials. Values are held in [`SecretString`], whose
//! `Debug` and `Display` never show them, and no error of this module quotes one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{AzureCredentials, Error, Reader, SECRET_NAME, SecretString};

/// Validated `peer-pods-secret`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloudSecret {
    /// `AZURE_SUBSCRIPTION_ID`.
    pub subscription_id: String,
    /// The credential to use.
    pub credentials: AzureCredentials,
}

impl CloudSecret {
    /// Parses the data of `peer-pods-secret` (or the same keys from the environment).
    ///
    /// With `AZURE_CLIENT_SECRET` set: client secret (needs tenant and client id); else with
    /// `AZURE_FEDERATED_TOKEN_FILE`: workload identity; else managed identity.
    pub fn from_map(map: &BTreeMap<String, String>) -> Result<Self, Error> {
        let mut r = Reader::new(map);
        let subscription_id = r.required("AZURE_SUBSCRIPTION_ID", "a subscription id (GUID)");
        if !subscription_id.is_empty() && !is_guid(&subscription_id) {
            // A subscription id is not secret; quoting it helps find typos.
            r.problem(
                "AZURE_SUBSCRIPTION_ID",
                "a GUID like 00000000-0000-0000-0000-000000000000",
                Some(&subscription_id.clone()),
            );
        }
        let secret = r.get("AZURE_CLIENT_SECRET").map(SecretString::new);
        let token_file = r.get("AZURE_FEDERATED_TOKEN_FILE").map(PathBuf::from);
        let credentials = if let Some(client_secret) = secret {
            let tenant_id = r.required("AZURE_TENANT_ID", "the tenant id of the service principal");
            let client_id = r.required("AZURE_CLIENT_ID", "the application (client) id");
            AzureCredentials::ClientSecret {
                tenant_id,
                client_id,
                client_secret,
            }
        } else if let Some(token_file) = token_file {
            let tenant_id = r.required("AZURE_TENANT_ID", "the tenant id for workload identity");
            let client_id = r.required("AZURE_CLIENT_ID", "the client id for workload identity");
            AzureCredentials::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
            }
        } else {
            AzureCredentials::ManagedIdentity {
                client_id: r.get("AZURE_CLIENT_ID").map(str::to_string),
            }
        };
        r.finish(
            SECRET_NAME,
            CloudSecret {
                subscription_id,
                credentials,
            },
        )
    }
}

fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}
