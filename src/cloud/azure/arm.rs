//! A thin typed ARM client on the same `azure_core` pipeline and policy: what
//! `azure_mgmt_compute` lacks (the NIC's private IP, LRO status documents).

use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_core::auth::TokenCredential;
use azure_core::{Context, Method, Pipeline, Request, Url};
use serde::Deserialize;
use serde_json::Value;

use crate::cloud::Error;

use super::map_error;

/// Client for plain ARM GETs.
#[derive(Clone)]
pub struct ArmClient {
    pipeline: Pipeline,
    endpoint: Url,
    credential: Arc<dyn TokenCredential>,
    scopes: Vec<String>,
}

/// An `Azure-AsyncOperation` status document.
#[derive(Debug, Deserialize)]
struct OperationStatus {
    status: String,
    #[serde(default)]
    error: Option<Value>,
}

/// The private IP of a NIC (`properties.ipConfigurations[].properties.privateIPAddress`).
#[derive(Debug, Deserialize)]
struct Nic {
    properties: NicProperties,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct NicProperties {
    #[serde(default)]
    ip_configurations: Vec<IpConfiguration>,
}

#[derive(Debug, Deserialize)]
struct IpConfiguration {
    properties: IpConfigurationProperties,
}

#[derive(Debug, Deserialize)]
struct IpConfigurationProperties {
    #[serde(rename = "privateIPAddress", default)]
    private_ip_address: Option<String>,
    #[serde(default)]
    primary: Option<bool>,
}

impl ArmClient {
    /// A client sending through `pipeline` to `endpoint`.
    pub fn new(
        pipeline: Pipeline,
        endpoint: Url,
        credential: Arc<dyn TokenCredential>,
        scopes: Vec<String>,
    ) -> Self {
        Self {
            pipeline,
            endpoint,
            credential,
            scopes,
        }
    }

    /// GET of an absolute URL or an ARM path (with its query); returns headers and JSON.
    pub async fn get(
        &self,
        url_or_path: &str,
    ) -> Result<(azure_core::headers::Headers, Value), Error> {
        let url = if url_or_path.starts_with("http") {
            Url::parse(url_or_path).map_err(|e| Error::Permanent(format!("bad URL: {e}")))?
        } else {
            self.endpoint
                .join(url_or_path)
                .map_err(|e| Error::Permanent(format!("bad path: {e}")))?
        };
        let scopes: Vec<&str> = self.scopes.iter().map(String::as_str).collect();
        let token = self
            .credential
            .get_token(&scopes)
            .await
            .map_err(map_error)?;
        let mut req = Request::new(url, Method::Get);
        req.insert_header(
            azure_core::headers::AUTHORIZATION,
            format!("Bearer {}", token.token.secret()),
        );
        let resp = self
            .pipeline
            .send(&Context::default(), &mut req)
            .await
            .map_err(map_error)?;
        let (_, headers, body) = resp.deconstruct();
        let bytes = body.collect().await.map_err(map_error)?;
        let value = serde_json::from_slice(&bytes)
            .map_err(|e| Error::Transient(format!("ARM answered invalid JSON: {e}")))?;
        Ok((headers, value))
    }

    /// Private IP of the NIC `nic_id` (its primary IP configuration).
    pub async fn nic_private_ip(&self, nic_id: &str) -> Result<Option<std::net::IpAddr>, Error> {
        let (_, v) = self
            .get(&format!("{nic_id}?api-version=2020-11-01"))
            .await?;
        let nic: Nic = serde_json::from_value(v)
            .map_err(|e| Error::Transient(format!("unexpected NIC document: {e}")))?;
        let cfgs = nic.properties.ip_configurations;
        let ip = cfgs
            .iter()
            .find(|c| c.properties.primary == Some(true))
            .or(cfgs.first())
            .and_then(|c| c.properties.private_ip_address.as_deref())
            .and_then(|s| s.parse().ok());
        Ok(ip)
    }

    /// Polls an `Azure-AsyncOperation` URL until the operation ends, waiting what each
    /// answer's `Retry-After` says (at least `min_interval`, `default_interval` when absent).
    /// Returns how many polls it took.
    pub async fn wait_operation(
        &self,
        url: &str,
        first_wait: Option<Duration>,
        min_interval: Duration,
        default_interval: Duration,
        timeout: Duration,
    ) -> Result<u32, Error> {
        let deadline = Instant::now() + timeout;
        let mut wait = first_wait.unwrap_or(default_interval).max(min_interval);
        let mut polls = 0;
        loop {
            if Instant::now() + wait > deadline {
                return Err(Error::Transient(format!(
                    "operation still running after {timeout:?}"
                )));
            }
            tokio::time::sleep(wait).await;
            let (headers, v) = self.get(url).await?;
            polls += 1;
            let status: OperationStatus = serde_json::from_value(v)
                .map_err(|e| Error::Transient(format!("unexpected operation document: {e}")))?;
            match status.status.as_str() {
                "Succeeded" => return Ok(polls),
                "Failed" | "Canceled" => {
                    let err = status.error.unwrap_or_default();
                    let code = err["code"].as_str().unwrap_or("Unknown").to_string();
                    let message = err["message"].as_str().unwrap_or_default();
                    let e = format!("operation {}: {code}: {message}", status.status);
                    return Err(if is_quota_code(&code, message) {
                        Error::Quota(e)
                    } else {
                        Error::Permanent(e)
                    });
                }
                _ => {
                    wait = super::policy::retry_after(&headers)
                        .unwrap_or(default_interval)
                        .max(min_interval);
                }
            }
        }
    }
}

/// Whether an ARM error code means quota or capacity.
pub fn is_quota_code(code: &str, message: &str) -> bool {
    matches!(
        code,
        "QuotaExceeded"
            | "SkuNotAvailable"
            | "AllocationFailed"
            | "ZonalAllocationFailed"
            | "OverconstrainedAllocationRequest"
    ) || (code == "OperationNotAllowed" && message.to_ascii_lowercase().contains("quota"))
}
