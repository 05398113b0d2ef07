//! The server's state: resources, VMs and their operations, tokens, faults, the request log.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use axum::body::Bytes;
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};

use super::faults::{Fault, FaultKind};
use super::{Config, arm_error};

/// One served request.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct RequestLog {
    /// HTTP method.
    pub method: String,
    /// Path.
    pub path: String,
    /// Status answered.
    pub status: u16,
    /// The injected fault, if one hit.
    pub fault: Option<String>,
    /// Time the server spent on it (including injected latency), µs.
    pub micros: u64,
    /// When it arrived, µs since the server started.
    pub at_micros: u64,
}

/// A VM as the inspection endpoint shows it.
#[derive(Clone, Debug, Serialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmView {
    /// ARM id.
    pub(crate) id: String,
    /// Name.
    pub name: String,
    /// Resource group.
    pub(crate) resource_group: String,
    /// Size.
    pub size: String,
    /// `Creating`, `Succeeded`, `Failed` or `Deleting`.
    pub provisioning_state: String,
    /// Tags.
    pub tags: BTreeMap<String, String>,
    /// Private IP of its NIC.
    pub private_ip: String,
}

pub(crate) struct Vm {
    pub(crate) id: String,
    pub(crate) name: String,
    pub(crate) rg: String,
    pub(crate) location: String,
    pub(crate) size: String,
    pub(crate) vcpus: u32,
    pub(crate) request: Value,
    pub(crate) response: Value,
    pub(crate) created_until: Instant,
    pub(crate) failure: Option<String>,
    pub(crate) create_op: String,
    pub(crate) deleting: Option<(Instant, String)>,
    pub(crate) nic_id: String,
    pub(crate) disk_id: String,
    pub(crate) delete_nic: bool,
    pub(crate) delete_disk: bool,
    pub(crate) private_ip: String,
    /// The public IP created from the NIC's configuration, and whether it goes with the VM.
    pub(crate) public_ip: Option<(String, bool)>,
}

impl Vm {
    pub(crate) fn state(&self, now: Instant) -> &'static str {
        if self.deleting.is_some() {
            "Deleting"
        } else if now < self.created_until {
            "Creating"
        } else if self.failure.is_some() {
            "Failed"
        } else {
            "Succeeded"
        }
    }
}

pub(crate) struct Op {
    pub(crate) until: Instant,
    pub(crate) failure: Option<String>,
    pub(crate) start: String,
}

pub(crate) struct Inner {
    pub(crate) config: Config,
    /// Issued access tokens and when each expires.
    pub(crate) tokens: HashMap<String, SystemTime>,
    /// The `scope` of every token request, in order.
    pub(crate) token_scopes: Vec<String>,
    /// Who each issued token was for, in order (`app:{client id}`, `msi:system`,
    /// `msi:{client id}`).
    pub(crate) token_subjects: Vec<String>,
    /// Every federated assertion presented, in order.
    pub(crate) assertions: Vec<String>,
    pub(crate) resources: BTreeMap<String, Value>,
    pub(crate) vms: BTreeMap<String, Vm>,
    pub(crate) ops: HashMap<String, Op>,
    pub(crate) faults: Vec<Fault>,
    pub(crate) log: Vec<RequestLog>,
    pub(crate) windows: HashMap<(String, bool), VecDeque<Instant>>,
    pub(crate) fail_next: Option<String>,
    pub(crate) next_ip: HashMap<String, u32>,
    pub(crate) counter: u64,
}

impl Inner {
    /// Applies time: finishes deletes whose operation is over.
    pub(crate) fn advance(&mut self, now: Instant) {
        let done: Vec<String> = self
            .vms
            .iter()
            .filter(|(_, v)| v.deleting.as_ref().is_some_and(|(t, _)| now >= *t))
            .map(|(k, _)| k.clone())
            .collect();
        for k in done {
            if let Some(vm) = self.vms.remove(&k) {
                if vm.delete_nic {
                    self.resources.remove(&vm.nic_id.to_ascii_lowercase());
                }
                if vm.delete_disk {
                    self.resources.remove(&vm.disk_id.to_ascii_lowercase());
                }
                if let Some((pip, true)) = &vm.public_ip {
                    self.resources.remove(&pip.to_ascii_lowercase());
                }
            }
        }
    }

    pub(crate) fn next_id(&mut self) -> String {
        self.counter += 1;
        let r = fastrand::u64(..);
        format!(
            "{:08x}-{:04x}-4{:03x}-a{:03x}-{:012x}",
            r >> 32,
            self.counter & 0xffff,
            (r >> 8) & 0xfff,
            r & 0xfff,
            self.counter
        )
    }
}

pub(crate) struct Store {
    pub(crate) inner: Mutex<Inner>,
    /// Local pod VMs backing created VMs, when configured.
    pub(crate) local: Option<Arc<dyn crate::cloud::Provider>>,
    /// When the server started (the origin of [`RequestLog::at_micros`]).
    pub(crate) started: Instant,
}

impl Store {
    pub(crate) fn new(config: Config) -> Self {
        let local = config
            .local_vms
            .as_ref()
            .map(|l| -> Arc<dyn crate::cloud::Provider> {
                match &l.qemu {
                    Some(q) => Arc::new(super::qemu::QemuProvider::new(
                        l.dir.clone(),
                        l.subnet,
                        q.clone(),
                    )),
                    None => Arc::new(crate::cloud::local::LocalProvider::new(
                        l.dir.clone(),
                        l.subnet,
                        l.exe.clone(),
                    )),
                }
            });
        Self {
            local,
            inner: Mutex::new(Inner {
                config,
                tokens: HashMap::new(),
                token_subjects: Vec::new(),
                assertions: Vec::new(),
                token_scopes: Vec::new(),
                resources: BTreeMap::new(),
                vms: BTreeMap::new(),
                ops: HashMap::new(),
                faults: Vec::new(),
                log: Vec::new(),
                windows: HashMap::new(),
                fail_next: None,
                next_ip: HashMap::new(),
                counter: 0,
            }),
            started: Instant::now(),
        }
    }

    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        let mut g = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        g.advance(Instant::now());
        g
    }

    pub(crate) fn config(&self) -> Config {
        self.lock().config.clone()
    }

    pub(crate) fn set_config(&self, f: impl FnOnce(&mut Config)) {
        f(&mut self.lock().config);
    }

    pub(crate) fn vms(&self) -> Vec<VmView> {
        let g = self.lock();
        let now = Instant::now();
        g.vms
            .values()
            .map(|v| VmView {
                id: v.id.clone(),
                name: v.name.clone(),
                resource_group: v.rg.clone(),
                size: v.size.clone(),
                provisioning_state: v.state(now).to_string(),
                tags: serde_json::from_value(v.response["tags"].clone()).unwrap_or_default(),
                private_ip: v.private_ip.clone(),
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn vm_request(&self, name: &str) -> Option<Value> {
        let g = self.lock();
        g.vms
            .values()
            .find(|v| v.name.eq_ignore_ascii_case(name))
            .map(|v| v.request.clone())
    }

    pub(crate) fn resource_ids(&self) -> Vec<String> {
        self.lock().resources.keys().cloned().collect()
    }

    pub(crate) fn requests(&self) -> Vec<RequestLog> {
        self.lock().log.clone()
    }

    #[cfg(test)]
    pub(crate) fn token_scopes(&self) -> Vec<String> {
        self.lock().token_scopes.clone()
    }

    pub(crate) fn issued_tokens(&self) -> Vec<String> {
        self.lock().tokens.keys().cloned().collect()
    }

    #[cfg(test)]
    pub(crate) fn token_subjects(&self) -> Vec<String> {
        self.lock().token_subjects.clone()
    }

    #[cfg(test)]
    pub(crate) fn assertions(&self) -> Vec<String> {
        self.lock().assertions.clone()
    }

    pub(crate) fn log(&self, entry: RequestLog) {
        self.lock().log.push(entry);
    }

    pub(crate) fn inject(&self, fault: Fault) {
        self.lock().faults.push(fault);
    }

    pub(crate) fn clear_faults(&self) {
        self.lock().faults.clear();
    }

    pub(crate) fn fail_next_provisioning(&self, code: String) {
        self.lock().fail_next = Some(code);
    }

    /// The first matching fault rule that fires for this request, if any.
    pub(crate) fn take_fault(&self, method: &Method, path: &str) -> Option<FaultKind> {
        let mut g = self.lock();
        for f in g.faults.iter_mut() {
            if !f.matches(method.as_str(), path) {
                continue;
            }
            if let Some(p) = f.probability
                && fastrand::f64() >= p
            {
                continue;
            }
            if let Some(t) = f.times.as_mut() {
                *t -= 1;
            }
            return Some(f.kind.clone());
        }
        None
    }

    /// 429 when the subscription's read or write budget of the last second is spent.
    pub(crate) fn rate_limited(&self, segs: &[String], write: bool) -> Option<Response> {
        let mut g = self.lock();
        let limit = if write {
            g.config.writes_per_second
        } else {
            g.config.reads_per_second
        };
        if limit == 0 || segs.len() < 2 {
            return None;
        }
        let now = Instant::now();
        let window = g
            .windows
            .entry((segs[1].to_ascii_lowercase(), write))
            .or_default();
        while window
            .front()
            .is_some_and(|t| now.duration_since(*t) >= Duration::from_secs(1))
        {
            window.pop_front();
        }
        if window.len() as u32 >= limit {
            let mut resp = arm_error(
                StatusCode::TOO_MANY_REQUESTS,
                "SubscriptionRequestsThrottled",
                format!(
                    "Number of {} requests for subscription exceeded the limit",
                    if write { "write" } else { "read" }
                ),
            );
            resp.headers_mut().insert("retry-after", 1.into());
            return Some(resp);
        }
        window.push_back(now);
        None
    }

    /// Client-credential (secret or federated assertion) token endpoint, as Entra ID's v2
    /// endpoint answers it. A federated assertion must be a JWT within its validity
    /// (`exp`), as Entra ID checks (AADSTS700024).
    pub(crate) fn token(&self, tenant: &str, body: &Bytes) -> Response {
        let form: HashMap<String, String> = url::form_urlencoded::parse(body)
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let has = |k: &str| form.get(k).is_some_and(|v| !v.is_empty());
        let refuse = |status: StatusCode, error: &str, description: &str| {
            (
                status,
                axum::Json(json!({
                    "error": error,
                    "error_description": format!("{description}\r\nTrace ID: 00000000-0000-0000-0000-000000000000"),
                    "error_codes": [description.get(6..12).and_then(|c| c.trim_end_matches(':').parse::<u64>().ok()).unwrap_or(0)],
                })),
            )
                .into_response()
        };
        if form.get("grant_type").map(String::as_str) != Some("client_credentials")
            || !has("client_id")
            || !has("scope")
            || !(has("client_secret") || has("client_assertion"))
            || tenant.is_empty()
        {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "AADSTS900144: The request body must contain grant_type=client_credentials, client_id, scope and a client secret or assertion.",
            );
        }
        if form.get("client_secret").map(String::as_str) == Some("wrong") {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "invalid_client",
                "AADSTS7000215: Invalid client secret provided.",
            );
        }
        if let Some(assertion) = form.get("client_assertion").filter(|a| !a.is_empty()) {
            if form.get("client_assertion_type").map(String::as_str)
                != Some("urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
            {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "AADSTS90014: The required field 'client_assertion_type' is missing from the credential.",
                );
            }
            self.lock().assertions.push(assertion.clone());
            match jwt_exp(assertion) {
                None => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        "invalid_request",
                        "AADSTS50027: JWT token is invalid or malformed.",
                    );
                }
                Some(exp) if exp <= SystemTime::now() => {
                    return refuse(
                        StatusCode::BAD_REQUEST,
                        "invalid_client",
                        "AADSTS700024: Client assertion is not within its valid time range.",
                    );
                }
                Some(_) => {}
            }
        }
        let subject = format!("app:{}", form["client_id"]);
        let lifetime = self.lock().config.token_lifetime;
        let token = self.issue(form.get("scope").cloned().unwrap_or_default(), subject);
        axum::Json(json!({
            "token_type": "Bearer",
            "expires_in": lifetime.as_secs(),
            "ext_expires_in": lifetime.as_secs(),
            "access_token": token,
        }))
        .into_response()
    }

    /// Records and returns a new access token for `scope`, valid for the configured time.
    fn issue(&self, scope: String, subject: String) -> String {
        let mut g = self.lock();
        let expires = SystemTime::now() + g.config.token_lifetime;
        g.token_scopes.push(scope);
        g.token_subjects.push(subject);
        let token = format!("armtest-{}", g.next_id());
        g.tokens.insert(token.clone(), expires);
        token
    }

    /// The managed identity endpoint of IMDS: `GET /metadata/identity/oauth2/token` with
    /// `Metadata: true`, `api-version`, `resource`, and `client_id` for a user-assigned
    /// identity (required when the VM has several and no system-assigned one).
    pub(crate) fn imds_token(
        &self,
        headers: &HeaderMap,
        query: &HashMap<String, String>,
    ) -> Response {
        let refuse = |status: StatusCode, error: &str, description: &str| {
            (
                status,
                axum::Json(json!({"error": error, "error_description": description})),
            )
                .into_response()
        };
        if headers.get("metadata").and_then(|v| v.to_str().ok()) != Some("true") {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Required metadata header not specified",
            );
        }
        let (Some(_), Some(resource)) = (query.get("api-version"), query.get("resource")) else {
            return refuse(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "Required query variable 'resource' or 'api-version' is missing",
            );
        };
        let ids = self.lock().config.managed_identities.clone();
        let subject = match query.get("client_id") {
            Some(c) if ids.user_assigned.iter().any(|u| u.eq_ignore_ascii_case(c)) => {
                format!("msi:{}", c.to_ascii_lowercase())
            }
            Some(_) => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Identity not found",
                );
            }
            None if ids.system_assigned => "msi:system".to_string(),
            None if ids.user_assigned.len() == 1 => {
                format!("msi:{}", ids.user_assigned[0].to_ascii_lowercase())
            }
            None if ids.user_assigned.is_empty() => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Identity not found",
                );
            }
            None => {
                return refuse(
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    "Multiple user assigned identities exist, please specify the clientId / resourceId of the identity in the token request",
                );
            }
        };
        let lifetime = self.lock().config.token_lifetime;
        let token = self.issue(format!("{resource}/.default"), subject);
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default()
            .as_secs();
        axum::Json(json!({
            "access_token": token,
            "refresh_token": "",
            "expires_in": lifetime.as_secs().to_string(),
            "expires_on": (now + lifetime.as_secs()).to_string(),
            "not_before": now.to_string(),
            "resource": resource,
            "token_type": "Bearer",
        }))
        .into_response()
    }

    /// `None` when the request carries a token this server issued and that is still
    /// valid; else ARM's answer (`ExpiredAuthenticationToken` once it expired).
    pub(crate) fn unauthorized(&self, headers: &HeaderMap) -> Option<Response> {
        let token = headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match token.and_then(|t| self.lock().tokens.get(t).copied()) {
            Some(exp) if exp > SystemTime::now() => None,
            Some(_) => Some(arm_error(
                StatusCode::UNAUTHORIZED,
                "ExpiredAuthenticationToken",
                "The access token expiry UTC time is earlier than current UTC time.",
            )),
            None => Some(arm_error(
                StatusCode::UNAUTHORIZED,
                "AuthenticationFailed",
                "missing or invalid bearer token",
            )),
        }
    }
}

/// The `exp` of a JWT (no signature check: the test server trusts its tests).
fn jwt_exp(jwt: &str) -> Option<SystemTime> {
    use base64::Engine;
    let payload = jwt.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload.trim_end_matches('='))
        .ok()?;
    let claims: Value = serde_json::from_slice(&bytes).ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(claims["exp"].as_u64()?))
}

/// RFC 3339 UTC time for response bodies.
pub(crate) fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.0000000+00:00",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}
