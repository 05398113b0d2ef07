//! `peer-pods-cm` and `peer-pods-secret`: parsing and validation shared by every component
//! that reads them (CAA, the operator's checks and PeerPod collector, `ctl`, the image Job).
//!
//! One validator for all: every problem names the key and what was expected, every problem
//! in a map is reported at once, and secret values never appear in errors, logs or `Debug`.
//! It builds the settings types `cloud` owns ([`AzureConfig`], [`AzureCredentials`],
//! [`SecretString`]) and imports nothing else of the crate but `cloud` and the shared names
//! of `api`.

mod duration;
mod secret;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::api::names::CONFIG_MAP;
pub use crate::cloud::SecretString;
use crate::cloud::azure::ResourceId;
pub use crate::cloud::azure::{AzureCloud, AzureConfig, AzureCredentials, TAG_NAME_FORBIDDEN};
pub(crate) use duration::parse_duration;
#[cfg(test)]
pub(crate) use secret::is_guid;
pub(crate) use secret::{AUTH_METHOD_KEY, CloudSecret};

/// Upstream default of `VXLAN_PORT` (collides with Calico; the seed uses 9000).
pub(crate) const DEFAULT_VXLAN_PORT: u16 = 4789;
/// Upstream default of `AZURE_INSTANCE_SIZE`.
pub(crate) const DEFAULT_INSTANCE_SIZE: &str = "Standard_DC2as_v5";
/// Upstream default of `SSH_USERNAME`.
pub(crate) const DEFAULT_SSH_USERNAME: &str = "peerpod";
/// Upstream default of `PROXY_TIMEOUT`.
pub(crate) const DEFAULT_PROXY_TIMEOUT: Duration = Duration::from_secs(300);
/// Upstream default of `PEERPODS_LIMIT_PER_NODE` (and of `PeerPodConfig.spec.limit`).
pub(crate) const DEFAULT_LIMIT_PER_NODE: u32 = 10;

/// The cloud behind the peer pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CloudProvider {
    /// Microsoft Azure through ARM.
    Azure,
    /// Local "VMs" (namespaces on the worker), for development and tests.
    Local,
}

impl CloudProvider {
    /// The value as written in `CLOUD_PROVIDER`.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            CloudProvider::Azure => "azure",
            CloudProvider::Local => "local",
        }
    }
}

impl fmt::Display for CloudProvider {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One invalid or missing key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The key, e.g. `VXLAN_PORT`.
    pub(crate) key: &'static str,
    /// What the key must hold.
    pub(crate) expected: String,
    /// The value found, or `None` when the key is missing or its value is secret.
    pub(crate) found: Option<String>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.found {
            Some(v) => write!(f, "{}: expected {}, found {v:?}", self.key, self.expected),
            None => write!(f, "{}: expected {}", self.key, self.expected),
        }
    }
}

/// Errors of this module.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// One or more keys of the named source are missing or invalid.
    #[error("invalid {source_name}: {}", join(.problems))]
    Invalid {
        /// `peer-pods-cm`, `peer-pods-secret` or `PeerPodConfig`.
        source_name: &'static str,
        /// Every problem found.
        problems: Vec<Problem>,
    },
}

impl Error {
    /// Low-cardinality label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::Invalid { .. } => "invalid_config",
        }
    }

    /// The keys with problems.
    #[cfg(test)]
    pub(crate) fn keys(&self) -> Vec<&'static str> {
        match self {
            Error::Invalid { problems, .. } => problems.iter().map(|p| p.key).collect(),
        }
    }
}

fn join(problems: &[Problem]) -> String {
    problems
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ")
}

/// Validated `peer-pods-cm`.
#[derive(Clone, Debug, PartialEq)]
pub struct PeerPodsConfig {
    /// `CLOUD_PROVIDER`.
    pub(crate) cloud_provider: CloudProvider,
    /// `VXLAN_PORT`.
    pub(crate) vxlan_port: u16,
    /// `PROXY_TIMEOUT`.
    pub(crate) proxy_timeout: Duration,
    /// `PEERPODS_LIMIT_PER_NODE`.
    pub(crate) limit_per_node: u32,
    /// `TAGS`, in the order written.
    pub(crate) tags: Vec<(String, String)>,
    /// Azure settings, present when `cloud_provider` is Azure.
    pub azure: Option<AzureConfig>,
    /// `AZURE_CLOUD`: which Azure cloud (endpoints, authority and token audience together).
    pub(crate) azure_cloud: AzureCloud,
}

/// Reads keys of one source and collects every problem.
struct Reader<'a> {
    map: &'a BTreeMap<String, String>,
    problems: Vec<Problem>,
}

impl<'a> Reader<'a> {
    fn new(map: &'a BTreeMap<String, String>) -> Self {
        Self {
            map,
            problems: Vec::new(),
        }
    }

    /// The trimmed value; empty counts as unset.
    fn get(&self, key: &str) -> Option<&'a str> {
        self.map
            .get(key)
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
    }

    fn problem(&mut self, key: &'static str, expected: impl Into<String>, found: Option<&str>) {
        self.problems.push(Problem {
            key,
            expected: expected.into(),
            found: found.map(str::to_string),
        });
    }

    fn required(&mut self, key: &'static str, expected: &str) -> String {
        match self.get(key) {
            Some(v) => v.to_string(),
            None => {
                self.problem(key, format!("{expected} (required)"), None);
                String::new()
            }
        }
    }

    fn bool(&mut self, key: &'static str, default: bool) -> bool {
        match self.get(key) {
            None => default,
            Some(v) => match parse_bool(v) {
                Some(b) => b,
                None => {
                    self.problem(key, "a boolean (true or false)", Some(v));
                    default
                }
            },
        }
    }

    fn number<T: std::str::FromStr + Copy>(
        &mut self,
        key: &'static str,
        default: T,
        expected: &str,
        valid: impl Fn(T) -> bool,
    ) -> T {
        match self.get(key) {
            None => default,
            Some(v) => match v.parse::<T>() {
                Ok(n) if valid(n) => n,
                _ => {
                    self.problem(key, expected.to_string(), Some(v));
                    default
                }
            },
        }
    }

    fn arm_id(&mut self, key: &'static str, kind: &str, required: bool) -> Option<String> {
        let v = match self.get(key) {
            Some(v) => v,
            None => {
                if required {
                    self.problem(
                        key,
                        format!("an Azure resource id of {kind} (required)"),
                        None,
                    );
                }
                return None;
            }
        };
        if is_arm_id_of(v, kind) {
            Some(v.to_string())
        } else {
            self.problem(
                key,
                format!("an Azure resource id of {kind} (/subscriptions/<id>/resourceGroups/<group>/providers/{kind}/...)"),
                Some(v),
            );
            None
        }
    }

    fn finish<T>(self, source_name: &'static str, value: T) -> Result<T, Error> {
        if self.problems.is_empty() {
            Ok(value)
        } else {
            Err(Error::Invalid {
                source_name,
                problems: self.problems,
            })
        }
    }
}

/// Go's `strconv.ParseBool` spellings, which the upstream components accept.
fn parse_bool(v: &str) -> Option<bool> {
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Whether `id` is an ARM resource id of `kind` (e.g. `Microsoft.Network/virtualNetworks`)
/// or of a child of it, compared case-insensitively as ARM does.
fn is_arm_id_of(id: &str, kind: &str) -> bool {
    ResourceId::parse(id).is_some_and(|r| r.is(kind))
}

/// Parses `k=v,k2=v2`; a name Azure would refuse is a problem of `TAGS` here rather than a
/// failed create later.
fn parse_tags(r: &mut Reader<'_>) -> Vec<(String, String)> {
    let Some(v) = r.get("TAGS") else {
        return Vec::new();
    };
    let mut tags = Vec::new();
    for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        match item.split_once('=') {
            Some((k, _)) if k.contains(TAG_NAME_FORBIDDEN) => {
                r.problem(
                    "TAGS",
                    "tag names without any of < > % & \\ ? / (Azure refuses them)",
                    Some(v),
                );
                return Vec::new();
            }
            Some((k, val)) if !k.trim().is_empty() => {
                tags.push((k.trim().to_string(), val.trim().to_string()))
            }
            _ => {
                r.problem(
                    "TAGS",
                    "comma-separated key=value pairs (k=v,k2=v2)",
                    Some(v),
                );
                return Vec::new();
            }
        }
    }
    tags
}

impl PeerPodsConfig {
    /// Parses and validates the data of `peer-pods-cm` (or the same keys from the
    /// environment of the CAA DaemonSet).
    pub fn from_map(map: &BTreeMap<String, String>) -> Result<Self, Error> {
        let mut r = Reader::new(map);
        let cloud_provider = match r.get("CLOUD_PROVIDER") {
            Some("azure") => Some(CloudProvider::Azure),
            Some("local") => Some(CloudProvider::Local),
            Some(other) => {
                r.problem("CLOUD_PROVIDER", "one of azure, local", Some(other));
                None
            }
            None => {
                r.problem("CLOUD_PROVIDER", "one of azure, local (required)", None);
                None
            }
        };
        let vxlan_port = r.number(
            "VXLAN_PORT",
            DEFAULT_VXLAN_PORT,
            "a UDP port number 1-65535",
            |p: u16| p > 0,
        );
        let proxy_timeout = match r.get("PROXY_TIMEOUT") {
            None => DEFAULT_PROXY_TIMEOUT,
            Some(v) => match parse_duration(v) {
                Some(d) if !d.is_zero() => d,
                _ => {
                    r.problem(
                        "PROXY_TIMEOUT",
                        "a positive duration such as 5m, 90s or 1h30m",
                        Some(v),
                    );
                    DEFAULT_PROXY_TIMEOUT
                }
            },
        };
        let limit_per_node = r.number(
            "PEERPODS_LIMIT_PER_NODE",
            DEFAULT_LIMIT_PER_NODE,
            "a non-negative integer",
            |_: u32| true,
        );
        let tags = parse_tags(&mut r);
        let azure = if cloud_provider == Some(CloudProvider::Azure) {
            Some(azure_config(&mut r))
        } else {
            None
        };
        let azure_cloud = match r.get(crate::cloud::azure::cloud::CLOUD_KEY) {
            None => AzureCloud::default(),
            Some(v) => v.parse().unwrap_or_else(|_| {
                r.problem(
                    crate::cloud::azure::cloud::CLOUD_KEY,
                    AzureCloud::EXPECTED,
                    Some(v),
                );
                AzureCloud::default()
            }),
        };
        // Endpoints come only from the cloud's name: a ConfigMap edit must not send the
        // credentials to another host (development endpoints are a command-line flag).
        for key in crate::cloud::azure::cloud::REFUSED_ENDPOINT_KEYS {
            if let Some(v) = r.get(key) {
                r.problem(
                    key,
                    format!(
                        "nothing: endpoints follow {} ({}); another endpoint is only a \
                         development flag on the command line (--dev-arm-endpoint)",
                        crate::cloud::azure::cloud::CLOUD_KEY,
                        AzureCloud::EXPECTED
                    ),
                    Some(v),
                );
            }
        }
        let cfg = PeerPodsConfig {
            cloud_provider: cloud_provider.unwrap_or(CloudProvider::Azure),
            vxlan_port,
            proxy_timeout,
            limit_per_node,
            tags,
            azure,
            azure_cloud,
        };
        r.finish(CONFIG_MAP, cfg)
    }

    /// The per-node VM limit: `PeerPodConfig.spec.limit` when set, else
    /// `PEERPODS_LIMIT_PER_NODE`.
    #[cfg(test)]
    pub(crate) fn effective_limit(&self, peerpodconfig_limit: Option<&str>) -> Result<u32, Error> {
        match peerpodconfig_limit.map(str::trim).filter(|s| !s.is_empty()) {
            None => Ok(self.limit_per_node),
            Some(v) => v.parse::<u32>().map_err(|_| Error::Invalid {
                source_name: "PeerPodConfig",
                problems: vec![Problem {
                    key: "spec.limit",
                    expected: "a non-negative integer as a string, e.g. \"10\"".into(),
                    found: Some(v.to_string()),
                }],
            }),
        }
    }
}

fn azure_config(r: &mut Reader<'_>) -> AzureConfig {
    let instance_size = r
        .get("AZURE_INSTANCE_SIZE")
        .unwrap_or(DEFAULT_INSTANCE_SIZE)
        .to_string();
    let mut instance_sizes: Vec<String> = Vec::new();
    if let Some(v) = r.get("AZURE_INSTANCE_SIZES") {
        for s in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if !instance_sizes.iter().any(|x| x.eq_ignore_ascii_case(s)) {
                instance_sizes.push(s.to_string());
            }
        }
    }
    if instance_sizes.is_empty() {
        instance_sizes.push(instance_size.clone());
    } else if !instance_sizes
        .iter()
        .any(|s| s.eq_ignore_ascii_case(&instance_size))
    {
        r.problem(
            "AZURE_INSTANCE_SIZE",
            format!(
                "one of AZURE_INSTANCE_SIZES ({})",
                instance_sizes.join(", ")
            ),
            Some(&instance_size),
        );
    }
    let subnet_id = r
        .arm_id("AZURE_SUBNET_ID", "Microsoft.Network/virtualNetworks", true)
        .unwrap_or_default();
    if !subnet_id.is_empty() && !subnet_id.to_ascii_lowercase().contains("/subnets/") {
        r.problem(
            "AZURE_SUBNET_ID",
            "a subnet id (.../virtualNetworks/<vnet>/subnets/<subnet>)",
            Some(&subnet_id),
        );
    }
    let nsg_id = r.arm_id(
        "AZURE_NSG_ID",
        "Microsoft.Network/networkSecurityGroups",
        false,
    );
    let image_id = r.get("AZURE_IMAGE_ID").map(str::to_string);
    if let Some(id) = &image_id
        && !is_image_id(id)
    {
        r.problem(
            "AZURE_IMAGE_ID",
            "a managed image id, a gallery image (version) id, /CommunityGalleries/<gallery>/Images/<image>[/Versions/<version>] or /SharedGalleries/<gallery>/Images/<image>[/Versions/<version>]",
            Some(id),
        );
    }
    let mut image_ids: Vec<String> = Vec::new();
    if let Some(v) = r.get("AZURE_IMAGE_IDS") {
        for id in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            if !is_image_id(id) {
                r.problem(
                    "AZURE_IMAGE_IDS",
                    "image ids (managed, gallery, /CommunityGalleries/…, /SharedGalleries/…), comma separated",
                    Some(id),
                );
            } else if !image_ids.iter().any(|x| x.eq_ignore_ascii_case(id)) {
                image_ids.push(id.to_string());
            }
        }
    }
    let region = r.required("AZURE_REGION", "an Azure region such as eastus");
    let resource_group = r.required("AZURE_RESOURCE_GROUP", "a resource group name");
    let disable_cvm = r.bool("DISABLECVM", false);
    let secure_boot = r.bool("ENABLE_SECURE_BOOT", false);
    let ssh_username = r
        .get("SSH_USERNAME")
        .unwrap_or(DEFAULT_SSH_USERNAME)
        .to_string();
    if !ssh_username
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
    {
        r.problem(
            "SSH_USERNAME",
            "a Linux user name (letters, digits, '.', '_', '-')",
            Some(&ssh_username),
        );
    }
    let root_volume_gb = match r.number(
        "ROOT_VOLUME_SIZE",
        0u32,
        "a disk size in GB between 1 and 4095",
        |n| (1..=4095).contains(&n),
    ) {
        0 => None,
        n => Some(n),
    };
    let use_public_ip = r.bool("USE_PUBLIC_IP", false);
    let mut one_of = |key: &'static str, allowed: &[&str]| {
        let v = r.get(key).unwrap_or(allowed[0]).to_string();
        match allowed.iter().find(|a| a.eq_ignore_ascii_case(&v)) {
            Some(a) => a.to_string(),
            None => {
                r.problem(key, format!("one of {}", allowed.join(", ")), Some(&v));
                allowed[0].to_string()
            }
        }
    };
    let os_disk_type = one_of("AZURE_OS_DISK_TYPE", crate::cloud::azure::OS_DISK_TYPES);
    let os_disk_caching = one_of(
        "AZURE_OS_DISK_CACHING",
        crate::cloud::azure::OS_DISK_CACHING,
    );
    let mut zones: Vec<String> = Vec::new();
    if let Some(v) = r.get("AZURE_ZONES") {
        for z in v.split(',').map(str::trim).filter(|z| !z.is_empty()) {
            if !matches!(z, "1" | "2" | "3") {
                r.problem(
                    "AZURE_ZONES",
                    "availability zones among 1, 2, 3, comma separated",
                    Some(v),
                );
                break;
            }
            if !zones.iter().any(|x| x == z) {
                zones.push(z.to_string());
            }
        }
    }
    AzureConfig {
        instance_size,
        instance_sizes,
        subnet_id,
        nsg_id,
        image_id,
        region,
        resource_group,
        disable_cvm,
        secure_boot,
        ssh_username,
        root_volume_gb,
        use_public_ip,
        os_disk_type,
        os_disk_caching,
        zones,
        image_ids,
    }
}

/// Whether `id` names an image Azure can boot a VM from: a managed image, a gallery image or
/// image version, a community gallery image, or a gallery image shared with the subscription
/// (`/SharedGalleries/…`).
pub(crate) fn is_image_id(id: &str) -> bool {
    let lower = id.to_ascii_lowercase();
    if lower.starts_with("/communitygalleries/") || lower.starts_with("/sharedgalleries/") {
        return lower.contains("/images/");
    }
    is_arm_id_of(id, "Microsoft.Compute/images") || is_arm_id_of(id, "Microsoft.Compute/galleries")
}

/// The process environment as a map, for components that get the keys through `envFrom`.
pub(crate) fn env_map() -> BTreeMap<String, String> {
    std::env::vars().collect()
}

#[cfg(test)]
mod tests;
