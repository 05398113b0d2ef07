//! Every ARM action sandboxd performs with the cloud credentials, what performs it, and the
//! built-in Azure role that grants it. One table feeds the OpenShift CredentialsRequest
//! (its `permissions`, the custom role the cloud-credential-operator or `ccoctl` makes) and
//! the docs; tests map every request the ARM test server served to an action with
//! [`action_of`] and check [`granted`].

/// One ARM action.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permission {
    /// The ARM action (`Microsoft.Compute/virtualMachines/write`).
    pub action: &'static str,
    /// What in sandboxd needs it.
    pub used_by: &'static str,
    /// The built-in role that grants it (for a service principal made by hand).
    pub role: &'static str,
}

const VMC: &str = "Virtual Machine Contributor";
const NC: &str = "Network Contributor";
const SAC: &str = "Storage Account Contributor";
const READER: &str = "Reader";
const CONTRIB: &str = "Contributor";

/// Every ARM action sandboxd performs.
pub const PERMISSIONS: &[Permission] = &[
    Permission {
        action: "Microsoft.Compute/virtualMachines/read",
        used_by: "CAA (VM state, sweep), operator PeerPod GC, ctl vm list",
        role: VMC,
    },
    Permission {
        action: "Microsoft.Compute/virtualMachines/write",
        used_by: "CAA: create a pod VM",
        role: VMC,
    },
    Permission {
        action: "Microsoft.Compute/virtualMachines/delete",
        used_by: "CAA, operator PeerPod GC: delete a pod VM (NIC and disk go with it)",
        role: VMC,
    },
    Permission {
        action: "Microsoft.Compute/virtualMachines/retrieveBootDiagnosticsData/action",
        used_by: "ctl vm console: the serial log of a pod VM (boot diagnostics)",
        role: VMC,
    },
    Permission {
        action: "Microsoft.Compute/skus/read",
        used_by: "CAA at start, ctl azure configmap: the allowed sizes' vCPUs, memory, GPUs, zones and restrictions (Resource SKUs)",
        role: READER,
    },
    Permission {
        action: "Microsoft.Compute/locations/operations/read",
        used_by: "CAA, image publish: long-running operation status",
        role: VMC,
    },
    Permission {
        action: "Microsoft.Compute/disks/read",
        used_by: "CAA: the VM's OS disk (deleted with the VM)",
        role: VMC,
    },
    Permission {
        action: "Microsoft.Compute/disks/write",
        used_by: "CAA: the OS disk created with the VM",
        role: VMC,
    },
    Permission {
        action: "Microsoft.Compute/disks/delete",
        used_by: "CAA: the OS disk deleted with the VM",
        role: VMC,
    },
    Permission {
        action: "Microsoft.Network/publicIPAddresses/read",
        used_by: "CAA with USE_PUBLIC_IP: the pod VM's public address",
        role: NC,
    },
    Permission {
        action: "Microsoft.Network/publicIPAddresses/write",
        used_by: "CAA with USE_PUBLIC_IP: the public IP created with the VM",
        role: NC,
    },
    Permission {
        action: "Microsoft.Network/publicIPAddresses/join/action",
        used_by: "CAA with USE_PUBLIC_IP: attach the public IP to the VM's NIC",
        role: NC,
    },
    Permission {
        action: "Microsoft.Network/publicIPAddresses/delete",
        used_by: "CAA with USE_PUBLIC_IP: the public IP goes with the VM",
        role: NC,
    },
    Permission {
        action: "Microsoft.Network/networkInterfaces/read",
        used_by: "CAA: the pod VM's private IP",
        role: NC,
    },
    Permission {
        action: "Microsoft.Network/networkInterfaces/write",
        used_by: "CAA: the NIC created with the VM",
        role: NC,
    },
    Permission {
        action: "Microsoft.Network/networkInterfaces/delete",
        used_by: "CAA: the NIC deleted with the VM",
        role: NC,
    },
    Permission {
        action: "Microsoft.Network/networkInterfaces/join/action",
        used_by: "CAA: attach the NIC to the VM",
        role: NC,
    },
    Permission {
        action: "Microsoft.Network/virtualNetworks/read",
        used_by: "ctl azure configmap, doctor: the VNet and its subnets",
        role: NC,
    },
    Permission {
        action: "Microsoft.Network/virtualNetworks/subnets/read",
        used_by: "CAA, ctl: the worker subnet",
        role: NC,
    },
    Permission {
        action: "Microsoft.Network/virtualNetworks/subnets/join/action",
        used_by: "CAA: the NIC joins AZURE_SUBNET_ID",
        role: NC,
    },
    Permission {
        action: "Microsoft.Network/networkSecurityGroups/read",
        used_by: "ctl azure configmap, doctor: the NSG and its rules",
        role: NC,
    },
    Permission {
        action: "Microsoft.Network/networkSecurityGroups/join/action",
        used_by: "CAA: the NIC joins AZURE_NSG_ID",
        role: NC,
    },
    Permission {
        action: "Microsoft.Resources/subscriptions/resourceGroups/read",
        used_by: "ctl azure configmap, image publish: the resource group's region",
        role: READER,
    },
    Permission {
        action: "Microsoft.Storage/storageAccounts/read",
        used_by: "image publish: the storage account for the VHD",
        role: SAC,
    },
    Permission {
        action: "Microsoft.Storage/storageAccounts/write",
        used_by: "image publish: create the storage account when missing",
        role: SAC,
    },
    Permission {
        action: "Microsoft.Storage/locations/asyncoperations/read",
        used_by: "image publish: the storage account create's operation status",
        role: READER,
    },
    Permission {
        action: "Microsoft.Storage/storageAccounts/listKeys/action",
        used_by: "image publish: a shared key for the page blob upload",
        role: SAC,
    },
    Permission {
        action: "Microsoft.Storage/storageAccounts/delete",
        used_by: "image delete: the storage account sandboxd created",
        role: SAC,
    },
    Permission {
        action: "Microsoft.Compute/images/read",
        used_by: "image publish, image delete, CAA: a managed image",
        role: CONTRIB,
    },
    Permission {
        action: "Microsoft.Compute/images/write",
        used_by: "image publish: the managed image from the VHD",
        role: CONTRIB,
    },
    Permission {
        action: "Microsoft.Compute/images/delete",
        used_by: "image delete: an image sandboxd published",
        role: CONTRIB,
    },
    Permission {
        action: "Microsoft.Compute/galleries/read",
        used_by: "image publish, image job: the gallery",
        role: CONTRIB,
    },
    Permission {
        action: "Microsoft.Compute/galleries/write",
        used_by: "image job: create the gallery when missing",
        role: CONTRIB,
    },
    Permission {
        action: "Microsoft.Compute/galleries/delete",
        used_by: "image delete: a gallery sandboxd created, once empty",
        role: CONTRIB,
    },
    Permission {
        action: "Microsoft.Compute/galleries/images/read",
        used_by: "image publish, image job, CAA: the image definition",
        role: CONTRIB,
    },
    Permission {
        action: "Microsoft.Compute/locations/sharedGalleries/images/read",
        used_by: "CAA: the definition of an image shared with the subscription (Trusted Launch)",
        role: VMC,
    },
    Permission {
        action: "Microsoft.Compute/locations/communityGalleries/images/read",
        used_by: "CAA: the definition of a community gallery image (Trusted Launch)",
        role: VMC,
    },
    Permission {
        action: "Microsoft.Compute/galleries/images/write",
        used_by: "image job: create the image definition when missing",
        role: CONTRIB,
    },
    Permission {
        action: "Microsoft.Compute/galleries/images/delete",
        used_by: "image delete: a definition sandboxd created, once empty",
        role: CONTRIB,
    },
    Permission {
        action: "Microsoft.Compute/galleries/images/versions/read",
        used_by: "image publish, CAA: the image version",
        role: CONTRIB,
    },
    Permission {
        action: "Microsoft.Compute/galleries/images/versions/write",
        used_by: "image job: the image version from the VHD",
        role: CONTRIB,
    },
    Permission {
        action: "Microsoft.Compute/galleries/images/versions/delete",
        used_by: "image delete: a version sandboxd published",
        role: CONTRIB,
    },
];

/// The actions of [`PERMISSIONS`].
pub fn actions() -> Vec<&'static str> {
    PERMISSIONS.iter().map(|p| p.action).collect()
}

/// The ARM action that authorises `method path` (a path as sent to ARM, query allowed), or
/// `None` for a path that is not an ARM resource path (token endpoint, blob data plane).
pub fn action_of(method: &str, path: &str) -> Option<String> {
    let path = path.split('?').next().unwrap_or_default();
    let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
    if !segs.first()?.eq_ignore_ascii_case("subscriptions") || segs.len() < 2 {
        return None;
    }
    let verb = |m: &str| match m.to_ascii_uppercase().as_str() {
        "GET" | "HEAD" => Some("read"),
        "PUT" | "PATCH" => Some("write"),
        "DELETE" => Some("delete"),
        _ => None,
    };
    // The resource provider's part, or the resource group / subscription itself.
    let Some(p) = segs
        .iter()
        .rposition(|s| s.eq_ignore_ascii_case("providers"))
    else {
        return match segs.len() {
            2 => Some(format!(
                "Microsoft.Resources/subscriptions/{}",
                verb(method)?
            )),
            3 | 4 if segs[2].eq_ignore_ascii_case("resourceGroups") => Some(format!(
                "Microsoft.Resources/subscriptions/resourceGroups/{}",
                verb(method)?
            )),
            _ => None,
        };
    };
    let namespace = segs.get(p + 1)?;
    let rest = &segs[p + 2..];
    if rest.is_empty() {
        return None;
    }
    let is_action = method.eq_ignore_ascii_case("POST") && rest.len() % 2 == 1 && rest.len() >= 3;
    let types: Vec<&str> = if is_action {
        rest[..rest.len() - 1].iter().step_by(2).copied().collect()
    } else {
        rest.iter().step_by(2).copied().collect()
    };
    let suffix = if is_action {
        format!("{}/action", rest[rest.len() - 1])
    } else {
        verb(method)?.to_string()
    };
    Some(format!("{namespace}/{}/{suffix}", types.join("/")))
}

/// Whether `granted` (actions, `*` wildcards allowed) allows `action`, compared
/// case-insensitively as Azure RBAC does.
pub fn granted(granted: &[&str], action: &str) -> bool {
    let action = action.to_ascii_lowercase();
    granted.iter().any(|g| {
        let g = g.to_ascii_lowercase();
        match g.split_once('*') {
            None => g == action,
            Some((head, tail)) => action.starts_with(head) && action[head.len()..].ends_with(tail),
        }
    })
}

/// The requests (`method`, `path`) whose action [`PERMISSIONS`] does not grant.
pub fn ungranted<'a>(
    requests: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Vec<(String, String)> {
    let actions = actions();
    requests
        .into_iter()
        .filter_map(|(m, p)| {
            let action = action_of(m, p)?;
            (!granted(&actions, &action)).then(|| (format!("{m} {p}"), action))
        })
        .collect()
}

/// The actions of the built-in roles named in [`PERMISSIONS`] that sandboxd relies on
/// (from Azure's built-in role definitions; only the entries that matter here).
pub fn role_actions(role: &str) -> &'static [&'static str] {
    match role {
        "Virtual Machine Contributor" => &[
            "Microsoft.Compute/virtualMachines/*",
            "Microsoft.Compute/locations/*",
            "Microsoft.Compute/disks/read",
            "Microsoft.Compute/disks/write",
            "Microsoft.Compute/disks/delete",
            "Microsoft.Network/networkInterfaces/*",
            "Microsoft.Network/networkSecurityGroups/join/action",
            "Microsoft.Network/networkSecurityGroups/read",
            "Microsoft.Network/virtualNetworks/read",
            "Microsoft.Network/virtualNetworks/subnets/join/action",
            "Microsoft.Storage/storageAccounts/listKeys/action",
            "Microsoft.Storage/storageAccounts/read",
        ],
        "Network Contributor" => &["Microsoft.Network/*"],
        "Storage Account Contributor" => &["Microsoft.Storage/storageAccounts/*"],
        "Reader" => &["*/read"],
        "Contributor" => &["*"],
        _ => &[],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arm_paths_map_to_their_rbac_actions() {
        let sub = "/subscriptions/s/resourceGroups/rg/providers";
        for (m, p, want) in [
            (
                "PUT",
                format!("{sub}/Microsoft.Compute/virtualMachines/vm?api-version=2024-07-01"),
                "Microsoft.Compute/virtualMachines/write",
            ),
            (
                "GET",
                format!("{sub}/Microsoft.Compute/virtualMachines"),
                "Microsoft.Compute/virtualMachines/read",
            ),
            (
                "DELETE",
                format!("{sub}/Microsoft.Compute/virtualMachines/vm"),
                "Microsoft.Compute/virtualMachines/delete",
            ),
            (
                "GET",
                "/subscriptions/s/providers/Microsoft.Compute/locations/eastus/operations/op-1"
                    .into(),
                "Microsoft.Compute/locations/operations/read",
            ),
            (
                "GET",
                "/subscriptions/s/providers/Microsoft.Compute/locations/eastus/vmSizes".into(),
                "Microsoft.Compute/locations/vmSizes/read",
            ),
            (
                "POST",
                format!("{sub}/Microsoft.Storage/storageAccounts/acct/listKeys"),
                "Microsoft.Storage/storageAccounts/listKeys/action",
            ),
            (
                "PUT",
                format!("{sub}/Microsoft.Compute/galleries/g/images/d/versions/1.0.0"),
                "Microsoft.Compute/galleries/images/versions/write",
            ),
            (
                "GET",
                "/subscriptions/s/providers/Microsoft.Compute/locations/eastus/communityGalleries/pub-1/images/podvm?api-version=2023-07-03"
                    .into(),
                "Microsoft.Compute/locations/communityGalleries/images/read",
            ),
            (
                "GET",
                "/subscriptions/s/resourceGroups/rg".into(),
                "Microsoft.Resources/subscriptions/resourceGroups/read",
            ),
        ] {
            assert_eq!(action_of(m, &p).as_deref(), Some(want), "{m} {p}");
        }
        assert_eq!(action_of("POST", "/tenant/oauth2/v2.0/token"), None);
    }

    #[test]
    fn every_permission_is_granted_by_the_role_the_docs_name() {
        for p in PERMISSIONS {
            assert!(
                granted(role_actions(p.role), p.action),
                "{} is not granted by {}",
                p.action,
                p.role
            );
        }
        assert!(!granted(
            &["Microsoft.Network/*"],
            "Microsoft.Compute/images/write"
        ));
        assert!(granted(&["*/read"], "Microsoft.Compute/images/read"));
    }
}
