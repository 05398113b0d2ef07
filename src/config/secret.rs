//! `peer-pods-secret`: cloud credentials. Values are held in [`SecretString`], whose
//! `Debug` and `Display` never show them, and no error of this module quotes one.

use std::collections::BTreeMap;
use std::path::PathBuf;

use super::{AzureCredentials, Error, Reader, SecretString};
use crate::api::names::CLOUD_SECRET;

/// Validated `peer-pods-secret`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct CloudSecret {
    /// `AZURE_SUBSCRIPTION_ID`.
    pub(crate) subscription_id: String,
    /// The credential to use.
    pub(crate) credentials: AzureCredentials,
}

impl CloudSecret {
    /// Parses the data of `peer-pods-secret` (or the same keys from the environment).
    ///
    /// The credential is chosen by [`AUTH_METHOD_KEY`] when set; else `AZURE_CLIENT_SECRET`
    /// means a service principal and `AZURE_FEDERATED_TOKEN_FILE` (which the workload
    /// identity webhook injects) workload identity. Neither is an error naming
    /// `AZURE_CLIENT_SECRET`: an empty secret never silently falls back to the node's
    /// managed identity, which must be chosen with `AZURE_AUTH_METHOD=managed-identity`.
    /// Client and tenant ids must be GUIDs (the guide's `<azure_client_id>` placeholder is
    /// refused, quoted: ids are not secret).
    pub(crate) fn from_map(map: &BTreeMap<String, String>) -> Result<Self, Error> {
        let mut r = Reader::new(map);
        let subscription_id = r.required("AZURE_SUBSCRIPTION_ID", "a subscription id (GUID)");
        guid(&mut r, "AZURE_SUBSCRIPTION_ID", &subscription_id);
        let secret = r.get("AZURE_CLIENT_SECRET").map(SecretString::new);
        let token_file = r.get("AZURE_FEDERATED_TOKEN_FILE").map(PathBuf::from);
        let method = match r.get(AUTH_METHOD_KEY) {
            None => None,
            Some(v) => match AuthMethod::parse(v) {
                Some(m) => Some(m),
                None => {
                    r.problem(AUTH_METHOD_KEY, AuthMethod::EXPECTED, Some(v));
                    return r.finish(CLOUD_SECRET, Self::placeholder(subscription_id));
                }
            },
        };
        let method = match (method, &secret, &token_file) {
            (Some(m), _, _) => m,
            (None, Some(_), _) => AuthMethod::ClientSecret,
            (None, None, Some(_)) => AuthMethod::WorkloadIdentity,
            (None, None, None) => {
                r.problem(
                    "AZURE_CLIENT_SECRET",
                    format!(
                        "the service principal's client secret (required; empty only with \
                         {AUTH_METHOD_KEY}=managed-identity, or workload identity through \
                         AZURE_FEDERATED_TOKEN_FILE)"
                    ),
                    None,
                );
                AuthMethod::ClientSecret
            }
        };
        let credentials = match method {
            AuthMethod::ClientSecret => {
                let tenant_id =
                    r.required("AZURE_TENANT_ID", "the tenant id of the service principal");
                guid(&mut r, "AZURE_TENANT_ID", &tenant_id);
                let client_id = r.required("AZURE_CLIENT_ID", "the application (client) id");
                guid(&mut r, "AZURE_CLIENT_ID", &client_id);
                let client_secret = match secret {
                    Some(s) => s,
                    None => {
                        if method_was_explicit(map) {
                            r.problem(
                                "AZURE_CLIENT_SECRET",
                                "the service principal's client secret (required)",
                                None,
                            );
                        }
                        SecretString::new("")
                    }
                };
                AzureCredentials::ClientSecret {
                    tenant_id,
                    client_id,
                    client_secret,
                }
            }
            AuthMethod::WorkloadIdentity => {
                let tenant_id =
                    r.required("AZURE_TENANT_ID", "the tenant id for workload identity");
                guid(&mut r, "AZURE_TENANT_ID", &tenant_id);
                let client_id =
                    r.required("AZURE_CLIENT_ID", "the client id for workload identity");
                guid(&mut r, "AZURE_CLIENT_ID", &client_id);
                let token_file = match token_file {
                    Some(f) => f,
                    None => {
                        r.problem(
                            "AZURE_FEDERATED_TOKEN_FILE",
                            "the projected service account token file (required for workload identity)",
                            None,
                        );
                        PathBuf::new()
                    }
                };
                AzureCredentials::WorkloadIdentity {
                    tenant_id,
                    client_id,
                    token_file,
                }
            }
            AuthMethod::ManagedIdentity => {
                let client_id = r.get("AZURE_CLIENT_ID").map(str::to_string);
                if let Some(id) = &client_id {
                    guid(&mut r, "AZURE_CLIENT_ID", id);
                }
                AzureCredentials::ManagedIdentity { client_id }
            }
        };
        r.finish(
            CLOUD_SECRET,
            CloudSecret {
                subscription_id,
                credentials,
            },
        )
    }

    fn placeholder(subscription_id: String) -> Self {
        CloudSecret {
            subscription_id,
            credentials: AzureCredentials::ManagedIdentity { client_id: None },
        }
    }
}

/// The `peer-pods-secret` key that chooses how sandboxd authenticates to Azure.
pub(crate) const AUTH_METHOD_KEY: &str = "AZURE_AUTH_METHOD";

/// The values of [`AUTH_METHOD_KEY`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum AuthMethod {
    ClientSecret,
    WorkloadIdentity,
    ManagedIdentity,
}

impl AuthMethod {
    const EXPECTED: &'static str = "one of client-secret, workload-identity, managed-identity";

    fn parse(v: &str) -> Option<Self> {
        match v {
            "client-secret" => Some(Self::ClientSecret),
            "workload-identity" => Some(Self::WorkloadIdentity),
            "managed-identity" => Some(Self::ManagedIdentity),
            _ => None,
        }
    }
}

fn method_was_explicit(map: &BTreeMap<String, String>) -> bool {
    map.get(AUTH_METHOD_KEY)
        .is_some_and(|v| !v.trim().is_empty())
}

/// A problem of `key` unless `value` (when present) is a GUID. Ids are not secret: quoting
/// the value helps find a typo or a placeholder left in.
fn guid(r: &mut Reader<'_>, key: &'static str, value: &str) {
    if !value.is_empty() && !is_guid(value) {
        r.problem(
            key,
            "a GUID like 00000000-0000-0000-0000-000000000000",
            Some(value),
        );
    }
}

/// Whether `s` is a GUID (8-4-4-4-12 hex digits).
pub(crate) fn is_guid(s: &str) -> bool {
    let groups: Vec<&str> = s.split('-').collect();
    groups.len() == 5
        && groups
            .iter()
            .zip([8, 4, 4, 4, 12])
            .all(|(g, n)| g.len() == n && g.chars().all(|c| c.is_ascii_hexdigit()))
}
