//! Access tokens for ARM: the client-credential flow against the cloud's Entra ID authority
//! (a client secret, or workload identity's federated token) and the managed identity of
//! the VM through IMDS (system-assigned, or the user-assigned one `AZURE_CLIENT_ID` names).
//!
//! Every exchange goes through the same retry policy as ARM's calls ([`ArmPolicy`]): 429,
//! 408, 5xx, timeouts and dropped connections are retried with backoff; any other 4xx is
//! final. Workload identity's token file is read for every exchange: the kubelet rotates a
//! projected service account token well before it expires, and Entra ID refuses an expired
//! assertion. Tokens are cached per scope and renewed before they expire.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use azure_core::auth::{AccessToken, Secret, TokenCredential};
use azure_core::error::{Error as CoreError, ErrorKind};
use azure_core::{Context, Method, Policy, Request, Url};
use serde::Deserialize;

use super::policy::ArmPolicy;
use super::{AzureCredentials, Endpoints};
use crate::cloud::SecretString;

/// The IMDS token endpoint of an Azure VM (link-local, never through a proxy).
pub(crate) const IMDS_TOKEN_URL: &str = "http://169.254.169.254/metadata/identity/oauth2/token";
/// The IMDS API version of the token request.
pub(crate) const IMDS_API_VERSION: &str = "2018-02-01";
/// The path of the IMDS token endpoint, also served by the ARM test server.
pub(crate) const IMDS_TOKEN_PATH: &str = "/metadata/identity/oauth2/token";

/// How a token is obtained.
enum Source {
    /// `POST {authority}{tenant}/oauth2/v2.0/token`, `grant_type=client_credentials`.
    Entra {
        url: Url,
        client_id: String,
        proof: Proof,
    },
    /// `GET` IMDS with `Metadata: true`.
    Imds { url: Url, client_id: Option<String> },
}

/// What proves the application's identity to Entra ID.
enum Proof {
    Secret(SecretString),
    /// The federated token file, read per exchange.
    TokenFile(PathBuf),
}

/// A cached token and when to renew it.
#[derive(Clone)]
struct Cached {
    token: AccessToken,
    renew_at: SystemTime,
}

/// sandboxd's token credential (see the module documentation).
pub(crate) struct Credential {
    source: Source,
    policy: Arc<ArmPolicy>,
    transport: Arc<dyn Policy>,
    cache: tokio::sync::Mutex<HashMap<String, Cached>>,
}

impl std::fmt::Debug for Credential {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match &self.source {
            Source::Entra {
                proof: Proof::Secret(_),
                ..
            } => "client secret",
            Source::Entra {
                proof: Proof::TokenFile(_),
                ..
            } => "workload identity",
            Source::Imds { .. } => "managed identity",
        };
        write!(f, "Credential({kind})")
    }
}

/// The token endpoint's answer (Entra ID: numbers; IMDS: numbers as strings).
#[derive(Deserialize)]
struct TokenAnswer {
    access_token: String,
    #[serde(default, deserialize_with = "number_or_string")]
    expires_in: Option<u64>,
    #[serde(default, deserialize_with = "number_or_string")]
    expires_on: Option<u64>,
}

fn number_or_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum N {
        N(u64),
        S(String),
    }
    Ok(match Option::<N>::deserialize(d)? {
        Some(N::N(n)) => Some(n),
        Some(N::S(s)) => s.trim().parse().ok(),
        None => None,
    })
}

/// The error answer of Entra ID (`error`, `error_description`) or IMDS (the same, or ARM's).
fn error_text(body: &[u8]) -> String {
    let v: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let code = v["error"]
        .as_str()
        .or(v["error"]["code"].as_str())
        .unwrap_or("no error code");
    let text = v["error_description"]
        .as_str()
        .or(v["error"]["message"].as_str())
        .unwrap_or_default();
    // Entra ID's description ends with trace and correlation ids: the first line says it.
    let text = text.lines().next().unwrap_or_default().trim();
    if text.is_empty() {
        code.to_string()
    } else {
        format!("{code}: {text}")
    }
}

impl Credential {
    /// The credential `credentials` describe, against `endpoints` (Entra ID authority; IMDS,
    /// moved only by the development flags), sending through `policy`.
    pub(crate) fn new(
        credentials: &AzureCredentials,
        endpoints: &Endpoints,
        policy: Arc<ArmPolicy>,
        http: Arc<dyn azure_core::HttpClient>,
        imds_http: Arc<dyn azure_core::HttpClient>,
    ) -> Result<Self, String> {
        let entra = |tenant: &str| {
            endpoints
                .authority()
                .join(&format!("{tenant}/oauth2/v2.0/token"))
                .map_err(|e| format!("bad Entra ID token URL for tenant {tenant:?}: {e}"))
        };
        let (source, http) = match credentials {
            AzureCredentials::ClientSecret {
                tenant_id,
                client_id,
                client_secret,
            } => (
                Source::Entra {
                    url: entra(tenant_id)?,
                    client_id: client_id.clone(),
                    proof: Proof::Secret(client_secret.clone()),
                },
                http,
            ),
            AzureCredentials::WorkloadIdentity {
                tenant_id,
                client_id,
                token_file,
            } => (
                Source::Entra {
                    url: entra(tenant_id)?,
                    client_id: client_id.clone(),
                    proof: Proof::TokenFile(token_file.clone()),
                },
                http,
            ),
            AzureCredentials::ManagedIdentity { client_id } => (
                Source::Imds {
                    url: endpoints.imds_token_url(),
                    client_id: client_id.clone().filter(|c| !c.trim().is_empty()),
                },
                imds_http,
            ),
        };
        // The policy straight onto the transport: no SDK retry policy above it, which
        // would turn the error answers into errors without their OAuth `error_description`.
        let transport: Arc<dyn Policy> = Arc::new(Transport(http));
        Ok(Self {
            source,
            policy,
            transport,
            cache: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// The request of one exchange for `scope`.
    fn request(&self, scope: &str) -> azure_core::Result<Request> {
        match &self.source {
            Source::Entra {
                url,
                client_id,
                proof,
            } => {
                let mut form = url::form_urlencoded::Serializer::new(String::new());
                form.append_pair("grant_type", "client_credentials")
                    .append_pair("client_id", client_id)
                    .append_pair("scope", scope);
                match proof {
                    Proof::Secret(s) => {
                        form.append_pair("client_secret", s.expose());
                    }
                    Proof::TokenFile(path) => {
                        // Read now: the kubelet rotates the projected token in place.
                        let token = std::fs::read_to_string(path).map_err(|e| {
                            CoreError::message(
                                ErrorKind::Credential,
                                format!(
                                    "reading AZURE_FEDERATED_TOKEN_FILE {}: {e}",
                                    path.display()
                                ),
                            )
                        })?;
                        form.append_pair(
                            "client_assertion_type",
                            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
                        )
                        .append_pair("client_assertion", token.trim());
                    }
                }
                let mut req = Request::new(url.clone(), Method::Post);
                req.insert_header(
                    azure_core::headers::CONTENT_TYPE,
                    "application/x-www-form-urlencoded",
                );
                req.set_body(form.finish());
                Ok(req)
            }
            Source::Imds { url, client_id } => {
                let mut url = url.clone();
                {
                    let mut q = url.query_pairs_mut();
                    q.append_pair("api-version", IMDS_API_VERSION)
                        .append_pair("resource", resource_of(scope));
                    if let Some(c) = client_id {
                        q.append_pair("client_id", c);
                    }
                }
                let mut req = Request::new(url, Method::Get);
                req.insert_header("metadata", "true");
                Ok(req)
            }
        }
    }

    /// One exchange (retried by the policy).
    async fn exchange(&self, scope: &str) -> azure_core::Result<Cached> {
        let mut req = self.request(scope)?;
        let what = match self.source {
            Source::Entra { .. } => "Entra ID",
            Source::Imds { .. } => "the managed identity endpoint (IMDS)",
        };
        let resp = self
            .policy
            .send(
                &Context::default(),
                &mut req,
                std::slice::from_ref(&self.transport),
            )
            .await
            .map_err(|e| {
                CoreError::message(
                    ErrorKind::Io,
                    format!("{what} did not answer: {}", super::sentence(&e)),
                )
            })?;
        let (status, _headers, body) = resp.deconstruct();
        let bytes = body.collect().await?;
        if !status.is_success() {
            let code = u16::from(status);
            // What the policy gave up on (it retries 408, 429 and 5xx) may pass later;
            // any other answer is final.
            let kind = if matches!(code, 408 | 429 | 500..=599) {
                ErrorKind::Io
            } else {
                ErrorKind::Credential
            };
            return Err(CoreError::message(
                kind,
                format!("{what} answered {code}: {}", error_text(&bytes)),
            ));
        }
        let answer: TokenAnswer = serde_json::from_slice(&bytes).map_err(|e| {
            CoreError::message(
                ErrorKind::DataConversion,
                format!("{what} answered a token that is not one: {e}"),
            )
        })?;
        let now = SystemTime::now();
        let expires = answer
            .expires_on
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s))
            .or(answer.expires_in.map(|s| now + Duration::from_secs(s)))
            .unwrap_or(now + Duration::from_secs(300));
        let lifetime = expires.duration_since(now).unwrap_or_default();
        // Renew 5 minutes before the end, or half-way for short-lived tokens.
        let renew_at = expires - lifetime.min(Duration::from_secs(600)) / 2;
        Ok(Cached {
            token: AccessToken::new(
                Secret::new(answer.access_token),
                time::OffsetDateTime::from(expires),
            ),
            renew_at,
        })
    }
}

/// The last policy: the HTTP client itself.
#[derive(Debug)]
struct Transport(Arc<dyn azure_core::HttpClient>);

#[async_trait::async_trait]
impl Policy for Transport {
    async fn send(
        &self,
        _ctx: &Context,
        request: &mut Request,
        _next: &[Arc<dyn Policy>],
    ) -> azure_core::PolicyResult {
        self.0.execute_request(request).await
    }
}

/// An AADv2 scope as the AADv1 resource IMDS wants (`…/.default` → `…`).
fn resource_of(scope: &str) -> &str {
    scope.strip_suffix("/.default").unwrap_or(scope)
}

#[async_trait::async_trait]
impl TokenCredential for Credential {
    async fn get_token(&self, scopes: &[&str]) -> azure_core::Result<AccessToken> {
        let scope = scopes.join(" ");
        // One exchange at a time: concurrent callers wait for it and share its token.
        let mut cache = self.cache.lock().await;
        if let Some(c) = cache.get(&scope)
            && SystemTime::now() < c.renew_at
        {
            return Ok(c.token.clone());
        }
        let fresh = self.exchange(&scope).await?;
        cache.insert(scope, fresh.clone());
        Ok(fresh.token)
    }

    async fn clear_cache(&self) -> azure_core::Result<()> {
        self.cache.lock().await.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_answers_of_entra_id_and_imds_are_both_read() {
        // Entra ID v2 (numbers).
        let a: TokenAnswer = serde_json::from_str(
            r#"{"token_type":"Bearer","expires_in":3599,"ext_expires_in":3599,"access_token":"eyJ0"}"#,
        )
        .unwrap();
        assert_eq!(a.expires_in, Some(3599));
        // IMDS (strings).
        let a: TokenAnswer = serde_json::from_str(
            r#"{"access_token":"eyJ0","refresh_token":"","expires_in":"3599","expires_on":"1506484173","not_before":"1506480273","resource":"https://management.azure.com/","token_type":"Bearer"}"#,
        )
        .unwrap();
        assert_eq!(a.expires_on, Some(1506484173));
        assert_eq!(
            resource_of("https://management.azure.com/.default"),
            "https://management.azure.com"
        );
        assert_eq!(
            error_text(br#"{"error":"invalid_client","error_description":"AADSTS700024: Client assertion is not within its valid time range.\r\nTrace ID: x"}"#),
            "invalid_client: AADSTS700024: Client assertion is not within its valid time range."
        );
    }
}
