use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

const SUBNET: &str = "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/vnet/subnets/worker-subnet";
const NSG: &str = "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/nsg";
const IMAGE: &str = "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/podvm/versions/1.0.0";

fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// The keys of the seed guide's `peer-pods-cm`.
fn seed_cm() -> BTreeMap<String, String> {
    map(&[
        ("CLOUD_PROVIDER", "azure"),
        ("VXLAN_PORT", "9000"),
        ("AZURE_INSTANCE_SIZE", "Standard_B2als_v2"),
        (
            "AZURE_INSTANCE_SIZES",
            "Standard_B2als_v2,Standard_D2as_v5,Standard_D4as_v5",
        ),
        ("AZURE_SUBNET_ID", SUBNET),
        ("AZURE_NSG_ID", NSG),
        ("PROXY_TIMEOUT", "5m"),
        ("DISABLECVM", "true"),
        ("AZURE_IMAGE_ID", ""),
        ("AZURE_REGION", "eastus"),
        ("AZURE_RESOURCE_GROUP", "rg"),
    ])
}

#[test]
fn the_seed_config_map_parses_with_its_values() {
    let cfg = PeerPodsConfig::from_map(&seed_cm()).unwrap();
    assert_eq!(cfg.cloud_provider, CloudProvider::Azure);
    assert_eq!(cfg.vxlan_port, 9000);
    assert_eq!(cfg.proxy_timeout, Duration::from_secs(300));
    let az = cfg.azure.unwrap();
    assert_eq!(az.instance_size, "Standard_B2als_v2");
    assert_eq!(az.instance_sizes.len(), 3);
    assert!(az.disable_cvm);
    assert_eq!(
        az.image_id, None,
        "empty AZURE_IMAGE_ID waits for the image job"
    );
    assert_eq!(az.nsg_id.as_deref(), Some(NSG));
    assert_eq!(az.region, "eastus");
}

#[test]
fn unset_optional_keys_take_the_upstream_defaults() {
    let cfg = PeerPodsConfig::from_map(&map(&[
        ("CLOUD_PROVIDER", "azure"),
        ("AZURE_SUBNET_ID", SUBNET),
        ("AZURE_REGION", "westeurope"),
        ("AZURE_RESOURCE_GROUP", "rg"),
    ]))
    .unwrap();
    assert_eq!(cfg.vxlan_port, DEFAULT_VXLAN_PORT);
    assert_eq!(cfg.limit_per_node, 10);
    assert_eq!(cfg.proxy_timeout, DEFAULT_PROXY_TIMEOUT);
    let az = cfg.azure.unwrap();
    assert_eq!(az.instance_size, DEFAULT_INSTANCE_SIZE);
    assert_eq!(az.ssh_username, "peerpod");
    assert!(
        !az.disable_cvm,
        "upstream creates confidential VMs by default"
    );
    assert!(!az.use_public_ip);
    assert_eq!(az.root_volume_gb, None);
    assert_eq!(az.os_disk_type, "Premium_LRS");
    assert_eq!(az.os_disk_caching, "ReadWrite");
}

#[test]
fn os_disk_type_and_caching_are_checked_against_what_azure_offers() {
    let mut m = seed_cm();
    m.insert("AZURE_OS_DISK_TYPE".into(), "standardssd_lrs".into());
    m.insert("AZURE_OS_DISK_CACHING".into(), "ReadOnly".into());
    let az = PeerPodsConfig::from_map(&m).unwrap().azure.unwrap();
    assert_eq!(az.os_disk_type, "StandardSSD_LRS");
    assert_eq!(az.os_disk_caching, "ReadOnly");
    m.insert("AZURE_OS_DISK_TYPE".into(), "UltraSSD_LRS".into());
    m.insert("AZURE_OS_DISK_CACHING".into(), "WriteBack".into());
    let err = PeerPodsConfig::from_map(&m).unwrap_err();
    assert_eq!(err.keys(), ["AZURE_OS_DISK_TYPE", "AZURE_OS_DISK_CACHING"]);
    assert!(err.to_string().contains("Premium_LRS"), "{err}");
}

#[test]
fn zones_are_a_list_of_azure_zone_numbers() {
    let mut m = seed_cm();
    m.insert("AZURE_ZONES".into(), " 1, 3,1 ".into());
    let az = PeerPodsConfig::from_map(&m).unwrap().azure.unwrap();
    assert_eq!(az.zones, ["1", "3"]);
    m.insert("AZURE_ZONES".into(), "eastus-1".into());
    assert_eq!(
        PeerPodsConfig::from_map(&m).unwrap_err().keys(),
        ["AZURE_ZONES"]
    );
    assert!(
        PeerPodsConfig::from_map(&seed_cm())
            .unwrap()
            .azure
            .unwrap()
            .zones
            .is_empty()
    );
}

#[test]
fn empty_instance_sizes_allow_only_the_default_size() {
    let mut m = seed_cm();
    m.insert("AZURE_INSTANCE_SIZES".into(), " ".into());
    let az = PeerPodsConfig::from_map(&m).unwrap().azure.unwrap();
    assert_eq!(az.instance_sizes, vec!["Standard_B2als_v2".to_string()]);
}

#[test]
fn a_default_size_outside_the_allowed_list_is_rejected_naming_both() {
    let mut m = seed_cm();
    m.insert("AZURE_INSTANCE_SIZE".into(), "Standard_D8as_v5".into());
    let err = PeerPodsConfig::from_map(&m).unwrap_err().to_string();
    assert!(err.contains("AZURE_INSTANCE_SIZE"), "{err}");
    assert!(err.contains("Standard_D8as_v5"), "{err}");
    assert!(err.contains("Standard_D4as_v5"), "{err}");
}

#[test]
fn every_invalid_key_is_reported_at_once_with_what_was_expected() {
    let mut m = seed_cm();
    m.insert("CLOUD_PROVIDER".into(), "aws".into());
    let err = PeerPodsConfig::from_map(&m).unwrap_err();
    assert_eq!(err.keys(), vec!["CLOUD_PROVIDER"]);
    assert!(err.to_string().contains("one of azure, local"), "{err}");

    let mut m = seed_cm();
    m.insert("VXLAN_PORT".into(), "70000".into());
    m.insert("PROXY_TIMEOUT".into(), "5 minutes".into());
    m.insert("DISABLECVM".into(), "yes".into());
    m.insert("AZURE_SUBNET_ID".into(), "worker".into());
    m.insert("TAGS".into(), "a=1,b".into());
    m.remove("AZURE_REGION");
    let err = PeerPodsConfig::from_map(&m).unwrap_err();
    let keys = err.keys();
    for k in [
        "VXLAN_PORT",
        "PROXY_TIMEOUT",
        "DISABLECVM",
        "AZURE_SUBNET_ID",
        "TAGS",
        "AZURE_REGION",
    ] {
        assert!(keys.contains(&k), "{k} missing from {err}");
    }
    let text = err.to_string();
    assert!(
        text.contains("VXLAN_PORT: expected a UDP port number 1-65535, found \"70000\""),
        "{text}"
    );
    assert!(
        text.contains("AZURE_REGION: expected an Azure region"),
        "{text}"
    );
    assert_eq!(err.metric_label(), "invalid_config");
}

#[test]
fn a_nsg_id_of_another_resource_type_is_rejected() {
    let mut m = seed_cm();
    m.insert("AZURE_NSG_ID".into(), SUBNET.into());
    let err = PeerPodsConfig::from_map(&m).unwrap_err();
    assert_eq!(err.keys(), vec!["AZURE_NSG_ID"]);
}

#[test]
fn image_ids_of_every_kind_are_accepted_and_others_rejected() {
    for ok in [
        IMAGE,
        "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images/podvm",
        "/CommunityGalleries/cocopodvm-1234/Images/podvm_image0/Versions/0.8.0",
    ] {
        assert!(is_image_id(ok), "{ok}");
        let mut m = seed_cm();
        m.insert("AZURE_IMAGE_ID".into(), ok.into());
        PeerPodsConfig::from_map(&m).unwrap();
    }
    for bad in ["podvm", SUBNET, "/CommunityGalleries/x"] {
        assert!(!is_image_id(bad), "{bad}");
    }
}

#[test]
fn tags_keep_their_order_and_trim_spaces() {
    let mut m = seed_cm();
    m.insert("TAGS".into(), "team=infra, cost-center = 42,".into());
    let cfg = PeerPodsConfig::from_map(&m).unwrap();
    assert_eq!(
        cfg.tags,
        vec![
            ("team".to_string(), "infra".to_string()),
            ("cost-center".to_string(), "42".to_string())
        ]
    );
}

#[test]
fn the_peerpodconfig_limit_wins_over_the_config_map() {
    let mut m = seed_cm();
    m.insert("PEERPODS_LIMIT_PER_NODE".into(), "3".into());
    let cfg = PeerPodsConfig::from_map(&m).unwrap();
    assert_eq!(cfg.effective_limit(None).unwrap(), 3);
    assert_eq!(cfg.effective_limit(Some("")).unwrap(), 3);
    assert_eq!(cfg.effective_limit(Some("20")).unwrap(), 20);
    let err = cfg.effective_limit(Some("ten")).unwrap_err().to_string();
    assert!(
        err.contains("spec.limit") && err.contains("\"ten\""),
        "{err}"
    );
}

#[test]
fn the_local_provider_needs_no_azure_keys() {
    let cfg = PeerPodsConfig::from_map(&map(&[("CLOUD_PROVIDER", "local")])).unwrap();
    assert_eq!(cfg.cloud_provider, CloudProvider::Local);
    assert!(cfg.azure.is_none());
}

#[test]
fn go_durations_parse_like_upstream() {
    assert_eq!(parse_duration("5m"), Some(Duration::from_secs(300)));
    assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
    assert_eq!(parse_duration("250ms"), Some(Duration::from_millis(250)));
    assert_eq!(parse_duration("1.5s"), Some(Duration::from_millis(1500)));
    assert_eq!(parse_duration("0"), Some(Duration::ZERO));
    for bad in ["", "5", "m", "5 m", "5d", "-1s"] {
        assert_eq!(parse_duration(bad), None, "{bad}");
    }
}

const SECRET_VALUE: &str = "s3cr3t~value-Do-Not-Print";
const CLIENT: &str = "0a1b2c3d-0000-4000-8000-00000000000c";
const TENANT: &str = "0a1b2c3d-0000-4000-8000-00000000000e";

#[test]
fn a_service_principal_secret_parses_and_never_prints_its_value() {
    let s = CloudSecret::from_map(&map(&[
        ("AZURE_CLIENT_ID", CLIENT),
        ("AZURE_CLIENT_SECRET", SECRET_VALUE),
        ("AZURE_TENANT_ID", TENANT),
        (
            "AZURE_SUBSCRIPTION_ID",
            "11111111-2222-3333-4444-555555555555",
        ),
    ]))
    .unwrap();
    match &s.credentials {
        AzureCredentials::ClientSecret { client_secret, .. } => {
            assert_eq!(client_secret.expose(), SECRET_VALUE)
        }
        other => panic!("{other:?}"),
    }
    assert!(!format!("{s:?}").contains(SECRET_VALUE));
}

#[test]
fn secret_errors_name_keys_but_never_values() {
    let err = CloudSecret::from_map(&map(&[
        ("AZURE_CLIENT_SECRET", SECRET_VALUE),
        ("AZURE_SUBSCRIPTION_ID", "not-a-guid"),
    ]))
    .unwrap_err();
    let text = format!("{err} {err:?}");
    assert!(!text.contains(SECRET_VALUE), "{text}");
    for k in [
        "AZURE_TENANT_ID",
        "AZURE_CLIENT_ID",
        "AZURE_SUBSCRIPTION_ID",
    ] {
        assert!(err.keys().contains(&k), "{k}: {text}");
    }
}

#[test]
fn without_a_secret_the_credential_is_workload_or_managed_identity() {
    let sub = (
        "AZURE_SUBSCRIPTION_ID",
        "11111111-2222-3333-4444-555555555555",
    );
    let s = CloudSecret::from_map(&map(&[
        sub,
        ("AZURE_CLIENT_ID", CLIENT),
        ("AZURE_TENANT_ID", TENANT),
        (
            "AZURE_FEDERATED_TOKEN_FILE",
            "/var/run/secrets/azure/tokens/azure-identity-token",
        ),
    ]))
    .unwrap();
    assert!(matches!(
        s.credentials,
        AzureCredentials::WorkloadIdentity { .. }
    ));
    let s = CloudSecret::from_map(&map(&[sub, ("AZURE_AUTH_METHOD", "managed-identity")])).unwrap();
    assert_eq!(
        s.credentials,
        AzureCredentials::ManagedIdentity { client_id: None }
    );
    let s = CloudSecret::from_map(&map(&[
        sub,
        ("AZURE_AUTH_METHOD", "managed-identity"),
        ("AZURE_CLIENT_ID", CLIENT),
    ]))
    .unwrap();
    assert_eq!(
        s.credentials,
        AzureCredentials::ManagedIdentity {
            client_id: Some(CLIENT.into())
        }
    );
}

#[test]
fn an_empty_client_secret_is_an_error_unless_an_identity_is_chosen_explicitly() {
    let sub = (
        "AZURE_SUBSCRIPTION_ID",
        "11111111-2222-3333-4444-555555555555",
    );
    for secret in ["", "  "] {
        let err = CloudSecret::from_map(&map(&[
            sub,
            ("AZURE_CLIENT_ID", CLIENT),
            ("AZURE_TENANT_ID", TENANT),
            ("AZURE_CLIENT_SECRET", secret),
        ]))
        .unwrap_err();
        assert_eq!(err.keys(), ["AZURE_CLIENT_SECRET"], "{err}");
        assert!(err.to_string().contains("managed-identity"), "{err}");
    }
    let err =
        CloudSecret::from_map(&map(&[sub, ("AZURE_AUTH_METHOD", "client-secret")])).unwrap_err();
    assert!(err.keys().contains(&"AZURE_CLIENT_SECRET"), "{err}");
    let err = CloudSecret::from_map(&map(&[sub, ("AZURE_AUTH_METHOD", "msi")])).unwrap_err();
    assert_eq!(err.keys(), ["AZURE_AUTH_METHOD"], "{err}");
    let err = CloudSecret::from_map(&map(&[sub, ("AZURE_AUTH_METHOD", "workload-identity")]))
        .unwrap_err();
    assert!(err.keys().contains(&"AZURE_FEDERATED_TOKEN_FILE"), "{err}");
}

#[test]
fn client_and_tenant_ids_must_be_guids_and_the_guides_placeholder_is_named() {
    let err = CloudSecret::from_map(&map(&[
        (
            "AZURE_SUBSCRIPTION_ID",
            "11111111-2222-3333-4444-555555555555",
        ),
        ("AZURE_CLIENT_ID", "<azure_client_id>"),
        ("AZURE_CLIENT_SECRET", SECRET_VALUE),
        ("AZURE_TENANT_ID", "<azure_tenant_id>"),
    ]))
    .unwrap_err();
    let text = err.to_string();
    assert_eq!(err.keys(), ["AZURE_TENANT_ID", "AZURE_CLIENT_ID"], "{text}");
    assert!(text.contains("AZURE_CLIENT_ID: expected a GUID"), "{text}");
    assert!(text.contains("\"<azure_client_id>\""), "{text}");
    assert!(!text.contains(SECRET_VALUE), "{text}");
    // Workload identity and a user-assigned managed identity are checked the same way.
    let err = CloudSecret::from_map(&map(&[
        (
            "AZURE_SUBSCRIPTION_ID",
            "11111111-2222-3333-4444-555555555555",
        ),
        ("AZURE_AUTH_METHOD", "managed-identity"),
        ("AZURE_CLIENT_ID", "my-identity"),
    ]))
    .unwrap_err();
    assert_eq!(err.keys(), ["AZURE_CLIENT_ID"]);
    assert!(is_guid("0A1B2C3D-0000-4000-8000-00000000000C"));
    assert!(!is_guid("0a1b2c3d00004000800000000000000c"));
}

#[test]
fn a_tag_name_azure_refuses_is_named_as_a_tags_problem() {
    let mut m = seed_cm();
    m.insert("TAGS".into(), "team=infra,example.com/owner=me".into());
    let e = PeerPodsConfig::from_map(&m).unwrap_err().to_string();
    assert!(e.contains("TAGS"), "{e}");
    assert!(e.contains("Azure refuses"), "{e}");
}

#[test]
fn the_cloud_is_chosen_by_name_and_endpoint_keys_in_the_configmap_are_refused() {
    let mut m = seed_cm();
    assert_eq!(
        PeerPodsConfig::from_map(&m).unwrap().azure_cloud,
        AzureCloud::Public
    );
    m.insert("AZURE_CLOUD".into(), "AzureUSGovernmentCloud".into());
    assert_eq!(
        PeerPodsConfig::from_map(&m).unwrap().azure_cloud,
        AzureCloud::UsGovernment
    );
    m.insert("AZURE_CLOUD".into(), "https://attacker.example/".into());
    let e = PeerPodsConfig::from_map(&m).unwrap_err();
    assert_eq!(e.keys(), ["AZURE_CLOUD"], "{e}");
    m.remove("AZURE_CLOUD");
    for key in ["AZURE_RESOURCE_MANAGER_ENDPOINT", "AZURE_AUTHORITY_HOST"] {
        let mut m = m.clone();
        m.insert(key.into(), "http://127.0.0.1:8443/".into());
        let e = PeerPodsConfig::from_map(&m).unwrap_err();
        assert_eq!(e.keys(), [key], "{e}");
        assert!(e.to_string().contains("--dev-arm-endpoint"), "{e}");
    }
}

/// docs/caa.md lists every key the Azure settings read (a key added without its line fails).
#[test]
fn every_azure_setting_is_documented() {
    let doc = include_str!("../../docs/caa.md");
    let source = include_str!("mod.rs");
    let start = source.find("fn azure_config(").unwrap();
    let body = &source[start..start + source[start..].find("\n}\n").unwrap()];
    let keys: Vec<&str> = body
        .split('"')
        .skip(1)
        .step_by(2)
        .filter(|k| {
            k.len() > 3
                && k.chars()
                    .all(|c| c.is_ascii_uppercase() || c == '_' || c.is_ascii_digit())
        })
        .collect();
    assert!(keys.len() >= 15, "{keys:?}");
    for k in keys.iter().chain(&["TAGS", "AZURE_CLOUD"]) {
        assert!(
            doc.contains(&format!("| `{k}` |")),
            "docs/caa.md has no row for {k}"
        );
    }
}
