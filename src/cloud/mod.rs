//! Cloud providers: the [`Provider`] trait CAA drives, the VM description it passes, typed
//! errors, and instance size selection; the settings types each provider is built from
//! (the `config` module fills them from `peer-pods-cm`/`peer-pods-secret`); and the netlink
//! plumbing ([`net`]) the local provider's VM links need and that the forwarder and CAA's
//! tunnel share. This module imports nothing else of the crate (a unit test checks it).

pub mod azure;
#[cfg(feature = "dev")]
pub mod local;
pub mod net;
pub mod secret;
pub mod sizes;

pub use secret::SecretString;

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

/// Everything a provider needs to create one pod VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSpec {
    /// The deterministic VM name (see [`vm_name`]).
    pub name: String,
    /// The instance size, one of the allowed sizes.
    pub size: String,
    /// The image to boot.
    pub image_id: String,
    /// Cloud-init user data (plain text; the provider encodes it).
    pub user_data: Option<String>,
    /// OpenSSH public key for the admin user, if any.
    pub ssh_public_key: Option<String>,
    /// Tags; ownership tags already merged over the user's.
    pub tags: BTreeMap<String, String>,
}

/// Provisioning state of a VM as the cloud reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum VmState {
    /// Being created or updated.
    Creating,
    /// Created and running.
    Succeeded,
    /// Creation failed; the VM must be deleted.
    Failed,
    /// Being deleted.
    Deleting,
    /// Any other state the cloud reports.
    Other(String),
}

/// A VM as the cloud knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vm {
    /// The VM name.
    pub(crate) name: String,
    /// The cloud's id (ARM resource id on Azure).
    pub(crate) id: String,
    /// Provisioning state.
    pub(crate) state: VmState,
    /// Private IP of the primary NIC, once known.
    pub private_ip: Option<IpAddr>,
    /// Public IP, when the VM has one (`USE_PUBLIC_IP`).
    pub(crate) public_ip: Option<IpAddr>,
    /// Tags.
    pub(crate) tags: BTreeMap<String, String>,
}

impl Vm {
    /// The address the tunnel and the agent relay use: the public IP when the VM has one,
    /// else the private one.
    pub(crate) fn address(&self) -> Option<IpAddr> {
        self.public_ip.or(self.private_ip)
    }
}

/// An instance size with its resources.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmSize {
    /// Name, e.g. `Standard_D2as_v5`.
    pub(crate) name: String,
    /// vCPUs.
    pub(crate) vcpus: u32,
    /// Memory in MiB.
    pub(crate) memory_mib: u64,
    /// GPUs (0: none).
    pub(crate) gpus: u32,
}

/// Errors of cloud calls, typed by what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The resource does not exist.
    #[error("the cloud resource does not exist: {0}")]
    NotFound(String),
    /// The cloud throttled us past the retry budget.
    #[error("the cloud throttled the request{}: {message}", retry_hint(.retry_after))]
    Throttled {
        /// What the cloud asked us to wait, if it said.
        retry_after: Option<Duration>,
        /// The cloud's message.
        message: String,
    },
    /// A quota or capacity limit refuses the request; retrying will not help soon.
    #[error("a cloud quota or capacity limit refused the request: {0}")]
    Quota(String),
    /// A failure that may pass (5xx, timeouts, dropped connections, conflicts).
    #[error("the cloud failed (retrying may help): {0}")]
    Transient(String),
    /// A failure retrying cannot fix (bad request, forbidden, failed provisioning).
    #[error("the cloud refused the request: {0}")]
    Permanent(String),
}

fn retry_hint(after: &Option<Duration>) -> String {
    match after {
        Some(d) => format!(" and asked to retry after {} s", d.as_secs().max(1)),
        None => String::new(),
    }
}

impl Error {
    /// Low-cardinality label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "not_found",
            Error::Throttled { .. } => "throttled",
            Error::Quota(_) => "quota",
            Error::Transient(_) => "transient",
            Error::Permanent(_) => "permanent",
        }
    }

    /// Whether the same call may succeed later.
    pub(crate) fn is_retryable(&self) -> bool {
        matches!(self, Error::Throttled { .. } | Error::Transient(_))
    }
}

/// A cloud that runs pod VMs. Every method is idempotent and safe to retry.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// `azure` or `local`, as in `CLOUD_PROVIDER`.
    fn name(&self) -> &'static str;

    /// The resources of each of `names` in this region; an error names any size the region
    /// lacks.
    async fn sizes(&self, names: &[String]) -> Result<Vec<VmSize>, Error>;

    /// Creates the VM (or adopts the one of the same name) and returns once the cloud says it
    /// is provisioned and it has a private IP.
    async fn create(&self, spec: &VmSpec) -> Result<Vm, Error>;

    /// The VM of that name, or `None`.
    async fn get(&self, name: &str) -> Result<Option<Vm>, Error>;

    /// Deletes the VM and what was created with it; succeeds when it is already gone.
    async fn delete(&self, name: &str) -> Result<(), Error>;

    /// Every VM carrying all of `tags`.
    async fn list_owned(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Vm>, Error>;
}

/// Tag keys sandboxd puts on every VM; user tags cannot override them. Azure refuses tag
/// names containing any of [`azure::TAG_NAME_FORBIDDEN`], hence no `sandboxd.io/`
/// prefix here.
pub mod tags {
    /// The `kube-system` namespace UID: one value per cluster.
    pub(crate) const CLUSTER: &str = "sandboxd-cluster";
    /// The worker node whose CAA owns the VM.
    pub(crate) const NODE: &str = "sandboxd-node";
    /// Pod namespace.
    pub(crate) const POD_NAMESPACE: &str = "sandboxd-pod-namespace";
    /// Pod name.
    pub(crate) const POD_NAME: &str = "sandboxd-pod-name";
    /// Pod uid.
    pub(crate) const POD_UID: &str = "sandboxd-pod-uid";
    /// Sandbox id the shim gave.
    pub(crate) const SANDBOX: &str = "sandboxd-sandbox-id";
}

/// The VM name of a pod sandbox: `podvm-<pod name, sanitized>-<first 8 of sandbox id>`, at
/// most 63 characters, lower-case letters, digits and `-`.
pub fn vm_name(pod_name: &str, sandbox_id: &str) -> String {
    let suffix: String = sandbox_id
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .take(8)
        .collect::<String>()
        .to_ascii_lowercase();
    let mut pod: String = pod_name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '-'
            }
        })
        .collect();
    // "podvm-" + pod + "-" + suffix <= 63.
    let room = 63 - "podvm-".len() - 1 - suffix.len();
    pod.truncate(room);
    let pod = pod.trim_matches('-');
    if pod.is_empty() {
        format!("podvm-{suffix}")
    } else {
        format!("podvm-{pod}-{suffix}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_are_deterministic_sanitized_and_at_most_63_chars() {
        assert_eq!(vm_name("web", "3c1f0c0e7a9b4c8d9e"), "podvm-web-3c1f0c0e");
        assert_eq!(
            vm_name("My_Pod.v2", "ABCDEF0123"),
            "podvm-my-pod-v2-abcdef01"
        );
        let long = "a".repeat(200);
        let n = vm_name(&long, "0123456789abcdef");
        assert_eq!(n.len(), 63);
        assert!(n.ends_with("-01234567"));
        let n = vm_name(&format!("{}.x", "b".repeat(47)), "0123456789");
        assert!(!n.contains("--") && n.len() <= 63, "{n}");
        assert_eq!(
            vm_name("web", "3c1f0c0e7a9b"),
            vm_name("web", "3c1f0c0e7a9b")
        );
    }

    #[test]
    fn only_throttling_and_transient_errors_are_retryable() {
        assert!(Error::Transient("x".into()).is_retryable());
        assert!(
            Error::Throttled {
                retry_after: None,
                message: String::new()
            }
            .is_retryable()
        );
        assert!(!Error::Quota("x".into()).is_retryable());
        assert!(!Error::Permanent("x".into()).is_retryable());
        assert!(!Error::NotFound("x".into()).is_retryable());
    }
}
