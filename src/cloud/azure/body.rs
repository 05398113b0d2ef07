//! The VM create body (DESIGN §6), built as `azure_mgmt_compute` models: NIC inline with
//! `deleteOption: Delete`, OS disk from image with `deleteOption: Delete`, image by id
//! (managed, gallery, or community gallery), SSH key with password login disabled,
//! `userData`, tags, and the Confidential VM profile when `DISABLECVM=false`.

use azure_mgmt_compute::package_2024_07_01::models as m;
use base64::Engine;

use super::AzureConfig;
use crate::cloud::VmSpec;

/// A fresh SSH public key (`ssh-ed25519`) whose private half is dropped at once: for a CAA
/// given no key, so that `disablePasswordAuthentication` always carries one (ARM refuses
/// it without) and nobody can log in. Nothing is written anywhere.
pub fn throwaway_ssh_key() -> String {
    use ring::signature::KeyPair;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng)
        .expect("the system's random source works");
    let pair = ring::signature::Ed25519KeyPair::from_pkcs8(pkcs8.as_ref())
        .expect("a key ring just generated");
    let mut blob = Vec::with_capacity(51);
    for part in [b"ssh-ed25519".as_slice(), pair.public_key().as_ref()] {
        blob.extend_from_slice(&(part.len() as u32).to_be_bytes());
        blob.extend_from_slice(part);
    }
    format!(
        "ssh-ed25519 {} sandboxd-no-login",
        base64::engine::general_purpose::STANDARD.encode(blob)
    )
}

/// The `SecurityType` a gallery image definition declares in its `features`: which VM
/// security types ARM lets a VM from it have.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ImageSecurity {
    /// No `SecurityType` (managed images, definitions without it): standard VMs only.
    #[default]
    Standard,
    /// `TrustedLaunchSupported`: standard or Trusted Launch VMs.
    TrustedLaunchSupported,
    /// `TrustedLaunch`: Trusted Launch VMs only.
    TrustedLaunch,
    /// `ConfidentialVMSupported`.
    ConfidentialVmSupported,
    /// `ConfidentialVM`.
    ConfidentialVm,
    /// `TrustedLaunchAndConfidentialVmSupported`.
    TrustedLaunchAndConfidentialVmSupported,
}

impl ImageSecurity {
    /// The value of a `SecurityType` feature.
    pub fn from_feature(v: &str) -> Self {
        match v.to_ascii_lowercase().as_str() {
            "trustedlaunchsupported" => Self::TrustedLaunchSupported,
            "trustedlaunch" => Self::TrustedLaunch,
            "confidentialvmsupported" => Self::ConfidentialVmSupported,
            "confidentialvm" => Self::ConfidentialVm,
            "trustedlaunchandconfidentialvmsupported" => {
                Self::TrustedLaunchAndConfidentialVmSupported
            }
            _ => Self::Standard,
        }
    }

    /// What a gallery image definition (as ARM answers it) declares.
    pub fn of_definition(def: &serde_json::Value) -> Self {
        def["properties"]["features"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["name"].as_str() == Some("SecurityType"))
            .and_then(|f| f["value"].as_str())
            .map(Self::from_feature)
            .unwrap_or_default()
    }

    /// Whether a Trusted Launch VM may boot from it.
    pub fn allows_trusted_launch(self) -> bool {
        matches!(
            self,
            Self::TrustedLaunch
                | Self::TrustedLaunchSupported
                | Self::TrustedLaunchAndConfidentialVmSupported
        )
    }
}

/// Azure's limit on `userData`, counted on its base64 text.
pub const USER_DATA_MAX: usize = 64 * 1024;

/// Refuses userData that ARM would refuse, before anything is created: its base64 text
/// must fit in [`USER_DATA_MAX`].
pub fn check_user_data(spec: &VmSpec) -> Result<(), String> {
    let Some(ud) = &spec.user_data else {
        return Ok(());
    };
    let encoded = ud.len().div_ceil(3) * 4;
    if encoded > USER_DATA_MAX {
        return Err(format!(
            "the pod VM's userData is {} bytes, {encoded} in base64; Azure accepts at most {USER_DATA_MAX} (64 KiB) of base64, that is {} bytes",
            ud.len(),
            USER_DATA_MAX / 4 * 3
        ));
    }
    Ok(())
}

/// The `PUT virtualMachines/{name}` body for `spec`; `fallback_ssh_key` when the spec has
/// no key; `image` is what the image declares. A plain VM carries a security profile only
/// when the image declares Trusted Launch (as upstream, nothing otherwise): Trusted Launch
/// when the image requires it or secure boot is asked of an image that supports it.
pub fn vm_model(
    spec: &VmSpec,
    cfg: &AzureConfig,
    fallback_ssh_key: &str,
    image_security: ImageSecurity,
) -> m::VirtualMachine {
    let mut resource = m::Resource::new(cfg.region.clone());
    resource.tags = Some(serde_json::to_value(&spec.tags).unwrap_or_default());

    let mut ip = m::VirtualMachineNetworkInterfaceIpConfiguration::new(format!("{}-ip", spec.name));
    ip.properties = Some(m::VirtualMachineNetworkInterfaceIpConfigurationProperties {
        subnet: Some(m::SubResource {
            id: Some(cfg.subnet_id.clone()),
        }),
        primary: Some(true),
        // A Standard static public IP that goes with the VM.
        public_ip_address_configuration: cfg.use_public_ip.then(|| {
            serde_json::from_value(serde_json::json!({
                "name": format!("{}-pip", spec.name),
                "properties": {"deleteOption": "Delete", "publicIPAllocationMethod": "Static"},
                "sku": {"name": "Standard", "tier": "Regional"}
            }))
            .expect("a public IP configuration the model reads")
        }),
        ..Default::default()
    });
    let mut nic_props = m::VirtualMachineNetworkInterfaceConfigurationProperties::new(vec![ip]);
    nic_props.primary = Some(true);
    nic_props.delete_option =
        Some(m::virtual_machine_network_interface_configuration_properties::DeleteOption::Delete);
    nic_props.network_security_group = cfg.nsg_id.clone().map(|id| m::SubResource { id: Some(id) });
    let mut nic = m::VirtualMachineNetworkInterfaceConfiguration::new(nic_name(&spec.name));
    nic.properties = Some(nic_props);

    let mut image = m::ImageReference::new();
    let lower = spec.image_id.to_ascii_lowercase();
    if lower.starts_with("/communitygalleries/") {
        image.community_gallery_image_id = Some(spec.image_id.clone());
    } else if lower.starts_with("/sharedgalleries/") {
        image.shared_gallery_image_id = Some(spec.image_id.clone());
    } else {
        image.sub_resource.id = Some(spec.image_id.clone());
    }

    let mut os_disk = m::OsDisk::new(m::CreateOption::FromImage);
    os_disk.name = Some(os_disk_name(&spec.name));
    os_disk.delete_option = Some(m::DeleteOption::Delete);
    os_disk.disk_size_gb = cfg.root_volume_gb.map(|g| g as i32);
    os_disk.caching = serde_json::from_value(serde_json::json!(cfg.os_disk_caching)).ok();
    let mut managed = m::ManagedDiskParameters::new();
    managed.storage_account_type = Some(
        serde_json::from_value(serde_json::json!(cfg.os_disk_type))
            .unwrap_or_else(|_| m::StorageAccountType::UnknownValue(cfg.os_disk_type.clone())),
    );
    let mut security_profile = None;
    if !cfg.disable_cvm {
        managed.security_profile = Some(m::VmDiskSecurityProfile {
            security_encryption_type: Some(
                m::vm_disk_security_profile::SecurityEncryptionType::VmGuestStateOnly,
            ),
            disk_encryption_set: None,
        });
        security_profile = Some(m::SecurityProfile {
            security_type: Some(m::security_profile::SecurityType::ConfidentialVm),
            uefi_settings: Some(m::UefiSettings {
                secure_boot_enabled: Some(cfg.secure_boot),
                v_tpm_enabled: Some(true),
            }),
            ..Default::default()
        });
    } else if image_security == ImageSecurity::TrustedLaunch
        || (cfg.secure_boot && image_security.allows_trusted_launch())
    {
        security_profile = Some(m::SecurityProfile {
            security_type: Some(m::security_profile::SecurityType::TrustedLaunch),
            uefi_settings: Some(m::UefiSettings {
                secure_boot_enabled: Some(cfg.secure_boot),
                v_tpm_enabled: Some(true),
            }),
            ..Default::default()
        });
    }
    os_disk.managed_disk = Some(managed);

    let key = spec
        .ssh_public_key
        .as_deref()
        .map(str::trim)
        .filter(|k| !k.is_empty())
        .unwrap_or(fallback_ssh_key);
    let ssh = Some(m::SshConfiguration {
        public_keys: vec![m::SshPublicKey {
            path: Some(format!("/home/{}/.ssh/authorized_keys", cfg.ssh_username)),
            key_data: Some(key.to_string()),
        }],
    });
    let os_profile = m::OsProfile {
        computer_name: Some(spec.name.clone()),
        admin_username: Some(cfg.ssh_username.clone()),
        linux_configuration: Some(m::LinuxConfiguration {
            disable_password_authentication: Some(true),
            ssh,
            ..Default::default()
        }),
        ..Default::default()
    };

    let properties = m::VirtualMachineProperties {
        hardware_profile: Some(m::HardwareProfile {
            vm_size: Some(m::hardware_profile::VmSize::UnknownValue(spec.size.clone())),
            vm_size_properties: None,
        }),
        storage_profile: Some(m::StorageProfile {
            image_reference: Some(image),
            os_disk: Some(os_disk),
            ..Default::default()
        }),
        os_profile: Some(os_profile),
        network_profile: Some(m::NetworkProfile {
            network_api_version: Some(m::network_profile::NetworkApiVersion::N2020_11_01),
            network_interface_configurations: vec![nic],
            ..Default::default()
        }),
        security_profile,
        // Boot diagnostics in managed storage: the serial log of a VM that never reaches
        // the forwarder (`sandboxd ctl vm console`).
        diagnostics_profile: serde_json::from_value(
            serde_json::json!({"bootDiagnostics": {"enabled": true}}),
        )
        .ok(),
        user_data: spec
            .user_data
            .as_ref()
            .map(|u| base64::engine::general_purpose::STANDARD.encode(u)),
        ..Default::default()
    };
    let mut vm = m::VirtualMachine::new(resource);
    vm.properties = Some(properties);
    vm
}

/// The name of a pod VM's NIC configuration. ARM names the NIC it creates from it as it
/// likes: the NIC is found through the VM's `networkProfile.networkInterfaces`.
pub fn nic_name(vm: &str) -> String {
    format!("{vm}-nic")
}

/// The name of a pod VM's OS disk (given explicitly: the VM's name says whose it is).
pub fn os_disk_name(vm: &str) -> String {
    format!("{vm}-osdisk")
}

/// Where the definition of a gallery image (version) is read, for a VM in `region` of
/// `subscription`: the definition in one of the subscription's galleries, or the image of
/// a gallery shared with the subscription (`/SharedGalleries/{g}/Images/{i}/…`) or of a
/// community gallery (`/CommunityGalleries/{g}/Images/{i}/…`) as offered in `region`.
/// `None` for managed images.
pub fn gallery_definition(image_id: &str, subscription: &str, region: &str) -> Option<String> {
    let segs: Vec<&str> = image_id.split('/').collect();
    let lower = image_id.to_ascii_lowercase();
    for (prefix, kind) in [
        ("/sharedgalleries/", "sharedGalleries"),
        ("/communitygalleries/", "communityGalleries"),
    ] {
        if lower.starts_with(prefix) {
            // ["", "SharedGalleries", g, "Images", i, …]
            return (segs.len() >= 5 && segs[3].eq_ignore_ascii_case("images") && !segs[2].is_empty() && !segs[4].is_empty())
                .then(|| {
                    format!(
                        "/subscriptions/{subscription}/providers/Microsoft.Compute/locations/{}/{kind}/{}/images/{}",
                        region.to_ascii_lowercase().replace(' ', ""),
                        segs[2],
                        segs[4]
                    )
                });
        }
    }
    let i = segs
        .iter()
        .position(|s| s.eq_ignore_ascii_case("galleries"))?;
    if segs.len() > i + 3 && segs[i + 2].eq_ignore_ascii_case("images") && !segs[i + 3].is_empty() {
        Some(segs[..=i + 3].join("/"))
    } else {
        None
    }
}
