//! The one Azure Resource Manager client of sandboxd: the credential and its token, URLs
//! from ARM paths, the pipeline with sandboxd's retry and rate manners
//! ([`ArmPolicy`](super::policy::ArmPolicy), the SDK's own retries off), long-running
//! operations followed to their end, and one error type. CAA's provider (through the
//! compute SDK built on the same pipeline, [`Arm::compute`]), the operator's PeerPod
//! collector, the image publisher and `ctl` all talk to ARM through it.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_core::auth::TokenCredential;
use azure_core::headers::{HeaderName, Headers};
use azure_core::{
    ClientOptions, Context, Method, Pipeline, Request, RetryOptions, StatusCode, Url,
};
use azure_mgmt_compute::package_2024_07_01 as compute;
use serde_json::Value;

use super::http::HttpSettings;
use super::identity::Credential;
use super::policy::{ArmPolicy, Counters, Manners, retry_after};
use super::{AzureCredentials, Endpoints};
use crate::cloud::Error;

/// How long-running operations are followed.
#[derive(Clone, Debug)]
pub struct Polling {
    /// Never poll faster than this, whatever the headers say.
    pub min_interval: Duration,
    /// Interval when the headers give none.
    pub default_interval: Duration,
    /// Bound on one operation.
    pub timeout: Duration,
}

impl Default for Polling {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(1),
            default_interval: Duration::from_secs(5),
            timeout: Duration::from_secs(900),
        }
    }
}

impl Polling {
    /// The wait before the next poll: what the answer's `Retry-After` asks, at least
    /// `min_interval`, `default_interval` when it asks nothing.
    fn interval(&self, headers: &Headers) -> Duration {
        retry_after(headers)
            .unwrap_or(self.default_interval)
            .max(self.min_interval)
    }
}

/// ARM failures.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ArmError {
    /// ARM answered with an error status.
    #[error("{method} {path}: HTTP {status} {code}: {message}")]
    Status {
        /// Method.
        method: String,
        /// Path without query.
        path: String,
        /// HTTP status.
        status: u16,
        /// ARM error code.
        code: String,
        /// ARM error message.
        message: String,
    },
    /// A long-running operation ended in failure.
    #[error("{what}: operation {status}: {code}: {message}")]
    Operation {
        /// What was being done.
        what: String,
        /// `Failed` or `Canceled`.
        status: String,
        /// ARM error code.
        code: String,
        /// ARM error message.
        message: String,
    },
    /// A long-running operation outlived [`Polling::timeout`].
    #[error("{what}: still running after {after:?}")]
    Timeout {
        /// What was being done.
        what: String,
        /// The bound.
        after: Duration,
    },
    /// No token: the credential is unusable or Entra ID refused it.
    #[error("{0}")]
    Credential(String),
    /// No answer (transport, timeout after the retries).
    #[error("{0}")]
    Transport(String),
    /// An answer that is not what ARM documents (not JSON, a field missing).
    #[error("{0}")]
    Unexpected(String),
}

impl ArmError {
    /// The HTTP status of an ARM error answer.
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            ArmError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What CAA and the collector make of an ARM failure: the same sentences as for the
/// compute SDK's errors ([`super::map_error`]), by the same kinds.
impl From<ArmError> for Error {
    fn from(e: ArmError) -> Self {
        match e {
            ArmError::Status {
                status,
                code,
                message,
                ..
            } => {
                let detail = match message.trim() {
                    "" => format!("ARM answered {status} ({code})"),
                    m => format!("ARM answered {status} ({code}): {m}"),
                };
                match status {
                    404 => Error::NotFound(detail),
                    429 => Error::Throttled {
                        retry_after: None,
                        message: detail,
                    },
                    _ if is_quota_code(&code, &detail) => Error::Quota(detail),
                    408 | 409 | 500..=599 => Error::Transient(detail),
                    _ => Error::Permanent(detail),
                }
            }
            ArmError::Operation {
                ref code,
                ref message,
                ..
            } if is_quota_code(code, message) => Error::Quota(e.to_string()),
            ArmError::Operation { .. } | ArmError::Credential(_) => Error::Permanent(e.to_string()),
            ArmError::Timeout { .. } | ArmError::Transport(_) | ArmError::Unexpected(_) => {
                Error::Transient(e.to_string())
            }
        }
    }
}

/// Whether an ARM error code means quota or capacity.
pub(crate) fn is_quota_code(code: &str, message: &str) -> bool {
    matches!(
        code,
        "QuotaExceeded"
            | "SkuNotAvailable"
            | "AllocationFailed"
            | "ZonalAllocationFailed"
            | "OverconstrainedAllocationRequest"
    ) || (code == "OperationNotAllowed" && message.to_ascii_lowercase().contains("quota"))
}

/// One ARM answer.
#[derive(Debug)]
pub(crate) struct Answer {
    /// The status (a success: errors are [`ArmError::Status`]).
    pub(crate) status: StatusCode,
    /// The headers (`Azure-AsyncOperation`, `Location`, `Retry-After`).
    pub(crate) headers: Headers,
    /// The JSON body; `null` when empty.
    pub(crate) body: Value,
}

/// The client: cheap to clone, every clone shares the token cache and the rate buckets.
#[derive(Clone)]
pub struct Arm {
    pipeline: Pipeline,
    /// The pipeline's options (the policy), for the compute SDK's client.
    options: ClientOptions,
    endpoint: Url,
    credential: Arc<dyn TokenCredential>,
    /// The cloud's ARM audience + `/.default`.
    scope: String,
    policy: Arc<ArmPolicy>,
    polling: Polling,
    /// The HTTP client, for URLs that carry their own authorisation (SAS).
    http: Arc<dyn azure_core::HttpClient>,
}

impl Arm {
    /// A client for `endpoints.arm` authenticating with `credentials`, sending with
    /// `manners` and following operations with the default [`Polling`].
    pub fn new(
        credentials: &AzureCredentials,
        endpoints: &Endpoints,
        manners: Manners,
    ) -> Result<Self, ArmError> {
        Self::with_http(credentials, endpoints, manners, &HttpSettings::from_env())
    }

    /// [`Arm::new`] sending through `http` (proxy, CA bundles) instead of the process's.
    pub(crate) fn with_http(
        credentials: &AzureCredentials,
        endpoints: &Endpoints,
        manners: Manners,
        http: &HttpSettings,
    ) -> Result<Self, ArmError> {
        let policy = Arc::new(ArmPolicy::new(manners));
        let client = http.client().map_err(ArmError::Unexpected)?;
        let credential: Arc<dyn TokenCredential> = Arc::new(
            Credential::new(
                credentials,
                endpoints,
                policy.clone(),
                client.clone(),
                http.imds_client().map_err(ArmError::Unexpected)?,
            )
            .map_err(ArmError::Credential)?,
        );
        let mut options = ClientOptions::new(azure_core::TransportOptions::new(client.clone()))
            .retry(RetryOptions::none());
        options
            .per_retry_policies_mut()
            .push(policy.clone() as Arc<dyn azure_core::Policy>);
        let pipeline = Pipeline::new(
            Some("sandboxd"),
            Some(env!("CARGO_PKG_VERSION")),
            options.clone(),
            Vec::new(),
            Vec::new(),
        );
        Ok(Self {
            pipeline,
            options,
            endpoint: endpoints.arm().clone(),
            // Tokens carry the cloud's ARM audience (a development endpoint keeps the cloud's).
            scope: endpoints.arm_scope(),
            credential,
            policy,
            polling: Polling::default(),
            http: client,
        })
    }

    /// The same client following operations with `polling`.
    pub fn with_polling(self, polling: Polling) -> Self {
        Self { polling, ..self }
    }

    /// What the retry policy did so far.
    pub(crate) fn counters(&self) -> Arc<Counters> {
        self.policy.counters.clone()
    }

    /// The compute SDK's client on this client's pipeline policy, credential and endpoint.
    pub(crate) fn compute(&self) -> compute::Client {
        compute::Client::new(
            self.endpoint.clone(),
            self.credential.clone(),
            vec![self.scope.clone()],
            self.options.clone(),
        )
    }

    fn url(&self, url_or_path: &str) -> Result<Url, ArmError> {
        if url_or_path.starts_with("http") {
            Url::parse(url_or_path)
        } else {
            self.endpoint.join(url_or_path)
        }
        .map_err(|e| ArmError::Unexpected(format!("bad ARM URL {url_or_path}: {e}")))
    }

    /// Sends one request (an absolute URL, or an ARM path with its query) and reads the
    /// answer; an error status is [`ArmError::Status`].
    pub(crate) async fn send(
        &self,
        method: Method,
        url_or_path: &str,
        body: Option<&Value>,
    ) -> Result<Answer, ArmError> {
        let url = self.url(url_or_path)?;
        let token = self
            .credential
            .get_token(&[self.scope.as_str()])
            .await
            .map_err(|e| {
                let text = format!(
                    "getting an Azure access token failed: {}",
                    super::sentence(&e)
                );
                // The identity endpoint did not answer, or gave up answering 5xx: may pass.
                match e.kind() {
                    azure_core::error::ErrorKind::Io => ArmError::Transport(text),
                    _ => ArmError::Credential(text),
                }
            })?;
        let mut req = Request::new(url.clone(), method);
        req.insert_header(
            azure_core::headers::AUTHORIZATION,
            format!("Bearer {}", token.token.secret()),
        );
        if let Some(b) = body {
            req.insert_header(azure_core::headers::CONTENT_TYPE, "application/json");
            req.set_body(serde_json::to_vec(b).unwrap_or_default());
        }
        let failed = |status: u16, code: Option<&str>, message: Option<&str>| ArmError::Status {
            method: method.to_string(),
            path: url.path().to_string(),
            status,
            code: code.unwrap_or("Unknown").to_string(),
            message: message.unwrap_or_default().to_string(),
        };
        let resp = self
            .pipeline
            .send(&Context::default(), &mut req)
            .await
            .map_err(|e| match e.as_http_error() {
                // The transport turns error statuses into errors: keep them typed.
                Some(h) => failed(u16::from(h.status()), h.error_code(), h.error_message()),
                None => {
                    ArmError::Transport(format!("{method} {}: {}", url.path(), super::sentence(&e)))
                }
            })?;
        let (status, headers, body) = resp.deconstruct();
        let bytes = body.collect().await.map_err(|e| {
            ArmError::Transport(format!("{method} {}: {}", url.path(), super::sentence(&e)))
        })?;
        let value: Value = match serde_json::from_slice(&bytes) {
            _ if bytes.is_empty() => Value::Null,
            Ok(v) => v,
            Err(e) if status.is_success() => {
                return Err(ArmError::Unexpected(format!(
                    "{method} {}: ARM answered invalid JSON: {e}",
                    url.path()
                )));
            }
            Err(_) => Value::Null,
        };
        if !status.is_success() {
            let error = &value["error"];
            return Err(failed(
                u16::from(status),
                error["code"].as_str(),
                error["message"].as_str(),
            ));
        }
        Ok(Answer {
            status,
            headers,
            body: value,
        })
    }

    /// GET; `None` on 404.
    pub async fn get(&self, path: &str) -> Result<Option<Value>, ArmError> {
        match self.send(Method::Get, path, None).await {
            Ok(a) => Ok(Some(a.body)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every item of a list, following `nextLink`.
    pub(crate) async fn list(&self, path: &str) -> Result<Vec<Value>, ArmError> {
        let mut out = Vec::new();
        let mut next = Some(path.to_string());
        while let Some(url) = next.take() {
            let page = self.send(Method::Get, &url, None).await?.body;
            let Some(items) = page["value"].as_array() else {
                return Err(ArmError::Unexpected(format!(
                    "listing {path}: the answer has no value array"
                )));
            };
            out.extend(items.iter().cloned());
            next = page["nextLink"].as_str().map(str::to_string);
        }
        Ok(out)
    }

    /// POST (actions such as `listKeys`).
    pub(crate) async fn post(&self, path: &str) -> Result<Value, ArmError> {
        Ok(self
            .send(Method::Post, path, Some(&Value::Null))
            .await?
            .body)
    }

    /// PUT, then follows the operation to its end; returns the resource as a final GET
    /// shows it.
    pub(crate) async fn put(
        &self,
        what: &str,
        path: &str,
        body: &Value,
    ) -> Result<Value, ArmError> {
        let answer = self.send(Method::Put, path, Some(body)).await?;
        self.wait(what, &answer, None).await?;
        match self.get(path).await? {
            Some(v) => Ok(v),
            None if !answer.body.is_null() => Ok(answer.body),
            None => Err(ArmError::Unexpected(format!(
                "{what}: gone after its create"
            ))),
        }
    }

    /// DELETE, then follows the operation to its end. A resource already gone is fine:
    /// answers whether there was one to delete.
    pub(crate) async fn delete(&self, what: &str, path: &str) -> Result<bool, ArmError> {
        match self.send(Method::Delete, path, None).await {
            Ok(a) if a.status == StatusCode::NoContent => Ok(false),
            Ok(a) => {
                self.wait(what, &a, None).await?;
                Ok(true)
            }
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits for the operation an answer started: its `Azure-AsyncOperation` status
    /// document until it ends, else (202) its `Location` until that stops answering 202.
    /// The first poll waits `first_wait` when given (else what the answer asks); later
    /// ones what each answer asks ([`Polling`]). Answers how many polls it took, `None`
    /// when the answer started no operation to follow.
    pub(crate) async fn wait(
        &self,
        what: &str,
        answer: &Answer,
        first_wait: Option<Duration>,
    ) -> Result<Option<u32>, ArmError> {
        let header =
            |h: &Headers, n: &'static str| h.get_optional_string(&HeaderName::from_static(n));
        let deadline = Instant::now() + self.polling.timeout;
        let mut wait = first_wait
            .unwrap_or_else(|| self.polling.interval(&answer.headers))
            .max(self.polling.min_interval);
        let mut polls = 0;
        if let Some(op) = header(&answer.headers, "azure-asyncoperation") {
            loop {
                self.sleep_until(what, wait, deadline).await?;
                let status = self.send(Method::Get, &op, None).await?;
                polls += 1;
                let doc = &status.body;
                match doc["status"].as_str() {
                    Some("Succeeded") => return Ok(Some(polls)),
                    Some(s @ ("Failed" | "Canceled")) => {
                        return Err(ArmError::Operation {
                            what: what.to_string(),
                            status: s.to_string(),
                            code: doc["error"]["code"].as_str().unwrap_or("Unknown").into(),
                            message: doc["error"]["message"].as_str().unwrap_or_default().into(),
                        });
                    }
                    Some(_) => wait = self.polling.interval(&status.headers),
                    None => {
                        return Err(ArmError::Unexpected(format!(
                            "{what}: an operation status document without status: {doc}"
                        )));
                    }
                }
            }
        }
        if answer.status == StatusCode::Accepted
            && let Some(mut location) = header(&answer.headers, "location")
        {
            loop {
                self.sleep_until(what, wait, deadline).await?;
                let next = self.send(Method::Get, &location, None).await?;
                polls += 1;
                if next.status != StatusCode::Accepted {
                    return Ok(Some(polls));
                }
                if let Some(l) = header(&next.headers, "location") {
                    location = l;
                }
                wait = self.polling.interval(&next.headers);
            }
        }
        Ok(None)
    }

    async fn sleep_until(
        &self,
        what: &str,
        wait: Duration,
        deadline: Instant,
    ) -> Result<(), ArmError> {
        if Instant::now() + wait > deadline {
            return Err(ArmError::Timeout {
                what: what.to_string(),
                after: self.polling.timeout,
            });
        }
        tokio::time::sleep(wait).await;
        Ok(())
    }

    /// The serial console log of VM `vm_id` from its boot diagnostics: ARM's
    /// `retrieveBootDiagnosticsData` gives a short-lived SAS URI, read without the token.
    pub(crate) async fn serial_log(&self, vm_id: &str) -> Result<String, ArmError> {
        let uris = self
            .send(
                Method::Post,
                &format!(
                    "{vm_id}/retrieveBootDiagnosticsData?api-version=2024-07-01&sasUriExpirationTimeInMinutes=5"
                ),
                Some(&Value::Null),
            )
            .await?
            .body;
        let Some(uri) = uris["serialConsoleLogBlobUri"].as_str() else {
            return Err(ArmError::Unexpected(format!(
                "{vm_id}: boot diagnostics gave no serial log URI"
            )));
        };
        let url = Url::parse(uri)
            .map_err(|e| ArmError::Unexpected(format!("bad serial log URI: {e}")))?;
        let what = format!("GET {}", url.path());
        let resp = self
            .http
            .execute_request(&Request::new(url, Method::Get))
            .await
            .map_err(|e| ArmError::Transport(format!("{what}: {}", super::sentence(&e))))?;
        let (status, _, body) = resp.deconstruct();
        let bytes = body
            .collect()
            .await
            .map_err(|e| ArmError::Transport(format!("{what}: {}", super::sentence(&e))))?;
        if !status.is_success() {
            return Err(ArmError::Unexpected(format!(
                "{what}: the serial log blob answered {}",
                u16::from(status)
            )));
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// The private IP of the NIC `nic_id` (its primary IP configuration) and, with
    /// `public`, the address of the public IP attached to it (one more read).
    pub(crate) async fn nic_addresses(
        &self,
        nic_id: &str,
        public: bool,
    ) -> Result<(Option<IpAddr>, Option<IpAddr>), ArmError> {
        let nic = self
            .send(
                Method::Get,
                &format!("{nic_id}?api-version=2020-11-01"),
                None,
            )
            .await?
            .body;
        let cfgs = nic["properties"]["ipConfigurations"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        let primary = cfgs
            .iter()
            .find(|c| c["properties"]["primary"].as_bool() == Some(true))
            .or(cfgs.first());
        let private = primary
            .and_then(|c| c["properties"]["privateIPAddress"].as_str())
            .and_then(|s| s.parse().ok());
        let pip = primary.and_then(|c| c["properties"]["publicIPAddress"]["id"].as_str());
        let public_ip = match pip {
            Some(id) if public => self
                .get(&format!("{id}?api-version=2020-11-01"))
                .await?
                .and_then(|p| {
                    p["properties"]["ipAddress"]
                        .as_str()
                        .and_then(|s| s.parse().ok())
                }),
            _ => None,
        };
        Ok((private, public_ip))
    }
}
