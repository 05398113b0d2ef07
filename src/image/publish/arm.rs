//! ARM calls of the image tools as plain JSON REST on the `azure_core` pipeline, through the
//! same [`ArmPolicy`](crate::cloud::azure::policy::ArmPolicy) the CAA uses (429 with
//! `Retry-After`, jittered backoff on 5xx and dropped connections, token buckets), plus the
//! two LRO styles these resource providers use: `Azure-AsyncOperation` status documents
//! (Compute, galleries) and `Location` polling until the final answer (Storage).

use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_core::auth::TokenCredential;
use azure_core::{ClientOptions, Context, Method, Pipeline, Request, RetryOptions, StatusCode};
use serde_json::Value;

use crate::cloud::azure::Endpoints;
use crate::cloud::azure::policy::{ArmPolicy, Counters, Manners, retry_after};
use crate::config::AzureCredentials;

/// ARM failures.
#[derive(Debug, thiserror::Error)]
pub enum ArmError {
    /// ARM answered with an error.
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
    /// No answer (transport, credential, timeout) or one that is not JSON.
    #[error("{0}")]
    Other(String),
}

impl ArmError {
    /// The HTTP status of an ARM error answer.
    pub fn status(&self) -> Option<u16> {
        match self {
            ArmError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// LRO polling settings.
#[derive(Clone, Debug)]
pub struct Polling {
    /// Never poll faster than this.
    pub min_interval: Duration,
    /// Interval when the answer gives none.
    pub default_interval: Duration,
    /// Bound on one operation.
    pub timeout: Duration,
}

/// The client.
#[derive(Clone)]
pub struct Arm {
    pipeline: Pipeline,
    endpoint: url::Url,
    credential: Arc<dyn TokenCredential>,
    /// The cloud's ARM audience + `/.default`.
    scope: String,
    policy: Arc<ArmPolicy>,
    polling: Polling,
}

impl Arm {
    /// A client for `endpoints.arm` authenticating with `credentials`.
    pub fn new(
        credentials: &AzureCredentials,
        endpoints: &Endpoints,
        manners: Manners,
        polling: Polling,
    ) -> Result<Self, ArmError> {
        let credential = crate::cloud::azure::credential(credentials, endpoints)
            .map_err(|e| ArmError::Other(e.to_string()))?;
        let policy = Arc::new(ArmPolicy::new(manners));
        let mut options = ClientOptions::default().retry(RetryOptions::none());
        options
            .per_retry_policies_mut()
            .push(policy.clone() as Arc<dyn azure_core::Policy>);
        let pipeline = Pipeline::new(
            Some("sandboxd"),
            Some(crate::VERSION),
            options,
            Vec::new(),
            Vec::new(),
        );
        Ok(Self {
            pipeline,
            endpoint: endpoints.arm().clone(),
            scope: endpoints.arm_scope(),
            credential,
            policy,
            polling,
        })
    }

    /// What the retry policy did.
    pub fn counters(&self) -> Arc<Counters> {
        self.policy.counters.clone()
    }

    async fn send(
        &self,
        method: Method,
        url_or_path: &str,
        body: Option<&Value>,
    ) -> Result<(StatusCode, azure_core::headers::Headers, Value), ArmError> {
        let url = if url_or_path.starts_with("http") {
            url::Url::parse(url_or_path)
        } else {
            self.endpoint.join(url_or_path)
        }
        .map_err(|e| ArmError::Other(format!("bad ARM URL {url_or_path}: {e}")))?;
        let token = self
            .credential
            .get_token(&[self.scope.as_str()])
            .await
            .map_err(|e| ArmError::Other(format!("getting an ARM token: {e}")))?;
        let mut req = Request::new(url.clone(), method);
        req.insert_header(
            azure_core::headers::AUTHORIZATION,
            format!("Bearer {}", token.token.secret()),
        );
        if let Some(b) = body {
            req.insert_header(azure_core::headers::CONTENT_TYPE, "application/json");
            req.set_body(serde_json::to_vec(b).unwrap_or_default());
        }
        let resp = self
            .pipeline
            .send(&Context::default(), &mut req)
            .await
            .map_err(|e| match e.as_http_error() {
                // The transport turns error statuses into errors: keep them typed.
                Some(h) => ArmError::Status {
                    method: method.to_string(),
                    path: url.path().to_string(),
                    status: u16::from(h.status()),
                    code: h.error_code().unwrap_or("Unknown").to_string(),
                    message: h.error_message().unwrap_or_default().to_string(),
                },
                None => ArmError::Other(format!("{method} {}: {e}", url.path())),
            })?;
        let (status, headers, body) = resp.deconstruct();
        let bytes = body
            .collect()
            .await
            .map_err(|e| ArmError::Other(format!("{method} {}: {e}", url.path())))?;
        let value: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        if !status.is_success() {
            return Err(ArmError::Status {
                method: method.to_string(),
                path: url.path().to_string(),
                status: u16::from(status),
                code: value["error"]["code"]
                    .as_str()
                    .unwrap_or("Unknown")
                    .to_string(),
                message: value["error"]["message"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            });
        }
        Ok((status, headers, value))
    }

    /// GET; `None` on 404.
    pub async fn get(&self, path: &str) -> Result<Option<Value>, ArmError> {
        match self.send(Method::Get, path, None).await {
            Ok((_, _, v)) => Ok(Some(v)),
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// POST (actions such as `listKeys`).
    pub async fn post(&self, path: &str) -> Result<Value, ArmError> {
        Ok(self.send(Method::Post, path, Some(&Value::Null)).await?.2)
    }

    /// PUT, then follows the operation to its end; returns the resource as a final GET
    /// shows it.
    pub async fn put(&self, what: &str, path: &str, body: &Value) -> Result<Value, ArmError> {
        let (status, headers, value) = self.send(Method::Put, path, Some(body)).await?;
        self.follow(what, status, &headers).await?;
        match self.get(path).await? {
            Some(v) => Ok(v),
            None if !value.is_null() => Ok(value),
            None => Err(ArmError::Other(format!("{what}: gone after its create"))),
        }
    }

    /// DELETE, then follows the operation to its end. A resource already gone is fine.
    pub async fn delete(&self, what: &str, path: &str) -> Result<bool, ArmError> {
        match self.send(Method::Delete, path, None).await {
            Ok((StatusCode::NoContent, _, _)) => Ok(false),
            Ok((status, headers, _)) => {
                self.follow(what, status, &headers).await?;
                Ok(true)
            }
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Waits for the operation an answer started: its `Azure-AsyncOperation` status
    /// document, else (202) its `Location` until that stops answering 202.
    async fn follow(
        &self,
        what: &str,
        status: StatusCode,
        headers: &azure_core::headers::Headers,
    ) -> Result<(), ArmError> {
        let header = |n: &'static str| {
            headers.get_optional_string(&azure_core::headers::HeaderName::from_static(n))
        };
        let deadline = Instant::now() + self.polling.timeout;
        let mut wait = self.interval(headers);
        if let Some(op) = header("azure-asyncoperation") {
            loop {
                self.sleep_until(what, wait, deadline).await?;
                let (_, h, v) = self.send(Method::Get, &op, None).await?;
                match v["status"].as_str().unwrap_or("InProgress") {
                    "Succeeded" => return Ok(()),
                    s @ ("Failed" | "Canceled") => {
                        return Err(ArmError::Operation {
                            what: what.to_string(),
                            status: s.to_string(),
                            code: v["error"]["code"].as_str().unwrap_or("Unknown").into(),
                            message: v["error"]["message"].as_str().unwrap_or_default().into(),
                        });
                    }
                    _ => wait = self.interval(&h),
                }
            }
        }
        if status == StatusCode::Accepted
            && let Some(mut location) = header("location")
        {
            loop {
                self.sleep_until(what, wait, deadline).await?;
                let (s, h, _) = self.send(Method::Get, &location, None).await?;
                if s != StatusCode::Accepted {
                    return Ok(());
                }
                if let Some(l) =
                    h.get_optional_string(&azure_core::headers::HeaderName::from_static("location"))
                {
                    location = l;
                }
                wait = self.interval(&h);
            }
        }
        Ok(())
    }

    fn interval(&self, headers: &azure_core::headers::Headers) -> Duration {
        retry_after(headers)
            .unwrap_or(self.polling.default_interval)
            .max(self.polling.min_interval)
    }

    async fn sleep_until(
        &self,
        what: &str,
        wait: Duration,
        deadline: Instant,
    ) -> Result<(), ArmError> {
        if Instant::now() + wait > deadline {
            return Err(ArmError::Other(format!(
                "{what}: still running after {:?}",
                self.polling.timeout
            )));
        }
        tokio::time::sleep(wait).await;
        Ok(())
    }
}
