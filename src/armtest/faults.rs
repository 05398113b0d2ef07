//! Fault and latency injection rules.

use serde::{Deserialize, Serialize};

/// What an injected fault does to a matching request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "kind")]
pub enum FaultKind {
    /// Answer with this status and ARM error code, without doing the request.
    Status {
        /// HTTP status (404, 409, 429, 500, ...).
        status: u16,
        /// ARM error code.
        code: String,
        /// `Retry-After` in seconds.
        #[serde(default)]
        retry_after_secs: Option<u64>,
        /// `retry-after-ms`.
        #[serde(default)]
        retry_after_ms: Option<u64>,
    },
    /// Drop the connection after the headers; with `apply` the request takes effect first
    /// (a lost response).
    Drop {
        /// Whether the request is carried out before the drop.
        #[serde(default)]
        apply: bool,
    },
    /// Delay this request.
    Delay {
        /// Milliseconds.
        millis: u64,
    },
    /// Accept a VM create whose provisioning then fails with this code.
    FailProvisioning {
        /// ARM error code of the failed operation, e.g. `AllocationFailed`.
        code: String,
    },
}

impl FaultKind {
    /// Label for the request log.
    pub(crate) fn label(&self) -> String {
        match self {
            FaultKind::Status { status, .. } => format!("status_{status}"),
            FaultKind::Drop { apply } => format!("drop{}", if *apply { "_applied" } else { "" }),
            FaultKind::Delay { .. } => "delay".into(),
            FaultKind::FailProvisioning { .. } => "fail_provisioning".into(),
        }
    }
}

/// A fault rule: which requests it hits, how often, and what it does.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Fault {
    /// HTTP method to match (any when unset).
    #[serde(default)]
    pub method: Option<String>,
    /// Case-insensitive substring of the path to match (any when unset).
    #[serde(default)]
    pub path_contains: Option<String>,
    /// How many matching requests it hits before it expires (forever when unset).
    #[serde(default)]
    pub times: Option<u32>,
    /// Probability of hitting a matching request (1.0 when unset).
    #[serde(default)]
    pub probability: Option<f64>,
    /// What it does.
    pub kind: FaultKind,
}

impl Fault {
    /// A fault hitting `method` requests whose path contains `path`, `times` times.
    pub fn new(method: &str, path: &str, times: u32, kind: FaultKind) -> Self {
        Self {
            method: Some(method.to_string()),
            path_contains: Some(path.to_string()),
            times: Some(times),
            probability: None,
            kind,
        }
    }

    /// Whether this rule applies to the request.
    pub(crate) fn matches(&self, method: &str, path: &str) -> bool {
        self.method
            .as_deref()
            .is_none_or(|m| m.eq_ignore_ascii_case(method))
            && self
                .path_contains
                .as_deref()
                .is_none_or(|p| path.to_ascii_lowercase().contains(&p.to_ascii_lowercase()))
            && self.times.is_none_or(|t| t > 0)
    }
}

/// `YYYY-MM-DD` or `YYYY-MM-DD-preview`.
pub(crate) fn valid_api_version(v: &str) -> bool {
    let date = v.strip_suffix("-preview").unwrap_or(v);
    let b = date.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}
