//! What the Azure provider needs to be told: the settings it creates VMs with, how it
//! authenticates, and the tag names Azure accepts. The `config` module builds these from
//! `peer-pods-cm` and `peer-pods-secret`.

use std::path::PathBuf;

use crate::cloud::SecretString;

/// Characters Azure refuses in a tag name.
pub const TAG_NAME_FORBIDDEN: &[char] = &['<', '>', '%', '&', '\\', '?', '/'];

/// The Azure keys of `peer-pods-cm`.
#[derive(Clone, Debug, PartialEq)]
pub struct AzureConfig {
    /// `AZURE_INSTANCE_SIZE`: the size used when a pod asks for none.
    pub instance_size: String,
    /// `AZURE_INSTANCE_SIZES`: the sizes pods may use; always contains `instance_size`.
    pub instance_sizes: Vec<String>,
    /// `AZURE_SUBNET_ID`.
    pub subnet_id: String,
    /// `AZURE_NSG_ID`, optional.
    pub nsg_id: Option<String>,
    /// `AZURE_IMAGE_ID`; empty until the image job fills it.
    pub image_id: Option<String>,
    /// `AZURE_REGION`.
    pub region: String,
    /// `AZURE_RESOURCE_GROUP`.
    pub resource_group: String,
    /// `DISABLECVM`: `true` creates plain VMs, `false` Confidential VMs.
    pub disable_cvm: bool,
    /// `ENABLE_SECURE_BOOT`.
    pub secure_boot: bool,
    /// `SSH_USERNAME`.
    pub ssh_username: String,
    /// `ROOT_VOLUME_SIZE` in GB; `None` keeps the image's size.
    pub root_volume_gb: Option<u32>,
    /// `USE_PUBLIC_IP`.
    pub use_public_ip: bool,
    /// `AZURE_OS_DISK_TYPE`: the OS disk's storage account type ([`OS_DISK_TYPES`]).
    pub os_disk_type: String,
    /// `AZURE_OS_DISK_CACHING`: `None`, `ReadOnly` or `ReadWrite`.
    pub os_disk_caching: String,
    /// `AZURE_ZONES`: availability zones pod VMs are spread over (one: pinned); empty:
    /// regional VMs, no zone.
    pub zones: Vec<String>,
    /// `AZURE_IMAGE_IDS`: images a pod may ask for with the
    /// `io.katacontainers.config.hypervisor.image` annotation (besides `AZURE_IMAGE_ID`).
    pub image_ids: Vec<String>,
}

/// The OS disk storage types a pod VM may use; the first is the default (Standard disks
/// made pod VMs boot in 1 to 4 minutes, Premium in under one).
pub(crate) const OS_DISK_TYPES: &[&str] = &[
    "Premium_LRS",
    "Premium_ZRS",
    "StandardSSD_LRS",
    "StandardSSD_ZRS",
    "Standard_LRS",
];

/// OS disk host caching modes; the first is the default.
pub(crate) const OS_DISK_CACHING: &[&str] = &["ReadWrite", "ReadOnly", "None"];

/// How sandboxd authenticates to Azure.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AzureCredentials {
    /// A service principal with a client secret (`az ad sp create-for-rbac`).
    ClientSecret {
        /// `AZURE_TENANT_ID`.
        tenant_id: String,
        /// `AZURE_CLIENT_ID`.
        client_id: String,
        /// `AZURE_CLIENT_SECRET`.
        client_secret: SecretString,
    },
    /// Workload identity: a federated token file projected into the pod.
    WorkloadIdentity {
        /// `AZURE_TENANT_ID`.
        tenant_id: String,
        /// `AZURE_CLIENT_ID`.
        client_id: String,
        /// `AZURE_FEDERATED_TOKEN_FILE`.
        token_file: PathBuf,
    },
    /// The VM's managed identity through IMDS; `client_id` picks a user-assigned one.
    ManagedIdentity {
        /// `AZURE_CLIENT_ID`, optional.
        client_id: Option<String>,
    },
}
