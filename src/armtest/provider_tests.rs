//! The Azure provider against the in-repo ARM test server. These live here rather than in
//! `cloud::azure`, which imports nothing else of the crate.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use base64::Engine;
use serde_json::json;

use azure_core::Url;

use crate::armtest::{self, Fault, FaultKind};
use crate::cloud::azure::{
    AzureConfig, AzureCredentials, AzureProvider, Endpoints, Manners, Polling,
};
use crate::cloud::{Error, Provider, SecretString, VmSize, VmSpec, VmState};

const SUB: &str = "11111111-2222-3333-4444-555555555555";

struct Fixture {
    handle: armtest::Handle,
    base: String,
    _shutdown: tokio_util::sync::DropGuard,
}

impl Fixture {
    async fn start(config: armtest::Config) -> Self {
        let token = tokio_util::sync::CancellationToken::new();
        let (addr, handle, _task) =
            armtest::serve("127.0.0.1:0".parse().unwrap(), config, token.clone())
                .await
                .unwrap();
        let f = Fixture {
            handle,
            base: format!("http://{addr}"),
            _shutdown: token.drop_guard(),
        };
        f.seed().await;
        f
    }

    /// Resource group, VNet with the worker subnet, NSG, gallery image version.
    async fn seed(&self) {
        let http = reqwest_free_put;
        let token = self.token().await;
        let rg = format!("/subscriptions/{SUB}/resourceGroups/rg");
        for (path, body) in [
            (rg.clone(), json!({"location": "eastus"})),
            (
                format!("{rg}/providers/Microsoft.Network/virtualNetworks/vnet"),
                json!({"location": "eastus", "properties": {"addressSpace": {"addressPrefixes": ["10.0.0.0/16"]},
                       "subnets": [{"name": "worker", "properties": {"addressPrefix": "10.0.1.0/24"}}]}}),
            ),
            (
                format!("{rg}/providers/Microsoft.Network/networkSecurityGroups/nsg"),
                json!({"location": "eastus"}),
            ),
        ] {
            let status = http(
                &self.base,
                &token,
                &format!("{path}?api-version=2024-03-01"),
                &body,
            )
            .await;
            assert!(status == 200 || status == 201, "{path}: {status}");
        }
        // The gallery image version (what the gallery API requires of it is not this test's
        // subject): seeded as the dev server seeds it.
        self.handle.seed_peer_pods(SUB, "rg", "eastus");
    }

    async fn token(&self) -> String {
        let body = "grant_type=client_credentials&client_id=app&client_secret=s&scope=x";
        let v = raw(
            &self.base,
            "POST",
            "/tenant/oauth2/v2.0/token",
            None,
            body.as_bytes(),
            "application/x-www-form-urlencoded",
        )
        .await;
        serde_json::from_slice::<serde_json::Value>(&v.1).unwrap()["access_token"]
            .as_str()
            .unwrap()
            .to_string()
    }

    fn provider(&self, cvm: bool, secret: &str) -> AzureProvider {
        self.provider_as(
            cvm,
            &AzureCredentials::ClientSecret {
                tenant_id: "0a1b2c3d-0000-4000-8000-00000000000e".into(),
                client_id: "0a1b2c3d-0000-4000-8000-00000000000c".into(),
                client_secret: SecretString::new(secret),
            },
        )
    }

    fn provider_as(&self, cvm: bool, credentials: &AzureCredentials) -> AzureProvider {
        self.provider_with(cvm, credentials, |_| {})
    }

    fn provider_with(
        &self,
        cvm: bool,
        credentials: &AzureCredentials,
        edit: impl FnOnce(&mut AzureConfig),
    ) -> AzureProvider {
        let rg = format!("/subscriptions/{SUB}/resourceGroups/rg");
        let cfg = AzureConfig {
            instance_size: "Standard_DC2as_v5".into(),
            instance_sizes: vec!["Standard_DC2as_v5".into(), "Standard_D4as_v5".into()],
            subnet_id: format!(
                "{rg}/providers/Microsoft.Network/virtualNetworks/vnet/subnets/worker"
            ),
            nsg_id: Some(format!(
                "{rg}/providers/Microsoft.Network/networkSecurityGroups/nsg"
            )),
            image_id: Some(format!(
                "{rg}/providers/Microsoft.Compute/galleries/g/images/podvm/versions/1.0.0"
            )),
            region: "eastus".into(),
            resource_group: "rg".into(),
            disable_cvm: !cvm,
            secure_boot: false,
            ssh_username: "peerpod".into(),
            root_volume_gb: None,
            use_public_ip: false,
            os_disk_type: "Premium_LRS".into(),
            os_disk_caching: "ReadWrite".into(),
            zones: Vec::new(),
            image_ids: Vec::new(),
        };
        let mut cfg = cfg;
        edit(&mut cfg);
        let endpoints = Endpoints::development(
            Default::default(),
            Url::parse(&format!("{}/", self.base)).unwrap(),
            None,
        );
        AzureProvider::new(
            SUB,
            credentials,
            cfg,
            endpoints,
            Manners {
                backoff: Duration::from_millis(20),
                max_total: Duration::from_secs(20),
                attempt_timeout: Duration::from_secs(5),
                ..Manners::default()
            },
            Polling {
                min_interval: Duration::from_millis(20),
                default_interval: Duration::from_millis(50),
                timeout: Duration::from_secs(20),
            },
        )
        .unwrap()
    }

    fn image(&self) -> String {
        format!(
            "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/podvm/versions/1.0.0"
        )
    }

    fn spec(&self, name: &str, size: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            size: size.into(),
            image_id: self.image(),
            user_data: Some("#cloud-config\nwrite_files: []\n".into()),
            ssh_public_key: Some("ssh-ed25519 AAAAC3Nza test".into()),
            tags: BTreeMap::from([("sandboxd-node".to_string(), "n1".to_string())]),
        }
    }
}

/// Minimal HTTP/1.1 client over a TcpStream: the test must not depend on the client under test.
async fn raw(
    base: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &[u8],
    ctype: &str,
) -> (u16, Vec<u8>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = base.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let auth = token
        .map(|t| format!("authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}content-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out).to_string();
    let status: u16 = text[9..12].parse().unwrap();
    let body_start = text.find("\r\n\r\n").map(|i| i + 4).unwrap_or(text.len());
    let mut body = out[body_start..].to_vec();
    if text[..body_start]
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, body)
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(i) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let n =
            usize::from_str_radix(std::str::from_utf8(&b[..i]).unwrap().trim(), 16).unwrap_or(0);
        if n == 0 {
            return out;
        }
        out.extend_from_slice(&b[i + 2..i + 2 + n]);
        b = &b[i + 2 + n + 2..];
    }
}

async fn reqwest_free_put(base: &str, token: &str, path: &str, body: &serde_json::Value) -> u16 {
    raw(
        base,
        "PUT",
        path,
        Some(token),
        body.to_string().as_bytes(),
        "application/json",
    )
    .await
    .0
}

#[tokio::test]
async fn create_sends_the_documented_body_and_returns_the_nic_ip() {
    let f = Fixture::start(armtest::Config::default()).await;
    let p = f.provider(false, "s");
    let vm = p
        .create(&f.spec("podvm-web-3c1f0c0e", "Standard_D4as_v5"))
        .await
        .unwrap();
    assert_eq!(vm.state, VmState::Succeeded);
    assert_eq!(vm.private_ip.unwrap().to_string(), "10.0.1.4");
    assert_eq!(vm.tags["sandboxd-node"], "n1");
    let body = f.handle.vm_request("podvm-web-3c1f0c0e").unwrap();
    let props = &body["properties"];
    assert_eq!(body["location"], "eastus");
    assert_eq!(props["hardwareProfile"]["vmSize"], "Standard_D4as_v5");
    assert_eq!(props["networkProfile"]["networkApiVersion"], "2020-11-01");
    let nic = &props["networkProfile"]["networkInterfaceConfigurations"][0];
    assert_eq!(nic["properties"]["deleteOption"], "Delete");
    assert!(
        nic["properties"]["networkSecurityGroup"]["id"]
            .as_str()
            .unwrap()
            .ends_with("/nsg")
    );
    assert_eq!(props["storageProfile"]["osDisk"]["deleteOption"], "Delete");
    assert_eq!(
        props["storageProfile"]["osDisk"]["createOption"],
        "FromImage"
    );
    assert_eq!(props["storageProfile"]["imageReference"]["id"], f.image());
    let linux = &props["osProfile"]["linuxConfiguration"];
    assert_eq!(linux["disablePasswordAuthentication"], true);
    assert_eq!(
        linux["ssh"]["publicKeys"][0]["path"],
        "/home/peerpod/.ssh/authorized_keys"
    );
    let ud = base64::engine::general_purpose::STANDARD
        .decode(props["userData"].as_str().unwrap())
        .unwrap();
    assert!(ud.starts_with(b"#cloud-config"));
    assert!(
        props.get("securityProfile").is_none(),
        "DISABLECVM=true creates a plain VM"
    );
}

#[tokio::test]
async fn the_nic_ip_is_found_through_the_vm_whatever_arm_named_the_nic() {
    let f = Fixture::start(armtest::Config::default()).await;
    let p = f.provider(false, "s");
    let name = "podvm-nic-00000001";
    let vm = p.create(&f.spec(name, "Standard_D4as_v5")).await.unwrap();
    let nics: Vec<String> = f
        .handle
        .resource_ids()
        .into_iter()
        .filter(|id| id.contains("/networkinterfaces/"))
        .collect();
    assert_eq!(nics.len(), 1, "{nics:?}");
    assert!(
        !nics[0].ends_with(&format!("/{name}-nic")),
        "the server names NICs as ARM may, not after the VM: {nics:?}"
    );
    assert_eq!(vm.private_ip.unwrap().to_string(), "10.0.1.4");
    let got = p.get(name).await.unwrap().unwrap();
    assert_eq!(got.private_ip, vm.private_ip);
}

/// ARM refuses `disablePasswordAuthentication` without a key: a CAA given none sends a
/// generated one (the same for every VM, its private half never kept).
#[tokio::test]
async fn a_caa_without_an_ssh_key_sends_a_generated_public_key() {
    let f = Fixture::start(armtest::Config::default()).await;
    let p = f.provider(false, "s");
    let mut keys = Vec::new();
    for name in ["podvm-nokey-00000001", "podvm-nokey-00000002"] {
        let mut spec = f.spec(name, "Standard_D4as_v5");
        spec.ssh_public_key = None;
        p.create(&spec).await.unwrap();
        let body = f.handle.vm_request(name).unwrap();
        let linux = &body["properties"]["osProfile"]["linuxConfiguration"];
        assert_eq!(linux["disablePasswordAuthentication"], true);
        let key = linux["ssh"]["publicKeys"][0]["keyData"]
            .as_str()
            .unwrap()
            .to_string();
        let blob = base64::engine::general_purpose::STANDARD
            .decode(key.split(' ').nth(1).unwrap())
            .unwrap();
        assert!(key.starts_with("ssh-ed25519 "), "{key}");
        assert_eq!(&blob[4..15], b"ssh-ed25519");
        assert_eq!(blob.len(), 4 + 11 + 4 + 32);
        keys.push(key);
    }
    assert_eq!(keys[0], keys[1]);
    // Another provider (another CAA start) has another key.
    let other = crate::cloud::azure::body::throwaway_ssh_key();
    assert_ne!(other, keys[0]);
}

/// userData beyond Azure's 64 KiB is a clear, permanent error before any create.
#[tokio::test]
async fn oversized_user_data_is_refused_before_any_create() {
    let f = Fixture::start(armtest::Config::default()).await;
    let p = f.provider(false, "s");
    let mut spec = f.spec("podvm-big-00000001", "Standard_D4as_v5");
    spec.user_data = Some("#cloud-config\n".to_string() + &"a".repeat(64 * 1024));
    let before = f.handle.requests().len();
    let err = p.create(&spec).await.unwrap_err();
    assert!(matches!(err, Error::Permanent(_)), "{err}");
    assert!(err.to_string().contains("userData"), "{err}");
    assert!(err.to_string().contains("64 KiB"), "{err}");
    assert!(
        f.handle.requests()[before..]
            .iter()
            .all(|r| !r.path.to_ascii_lowercase().contains("/virtualmachines/")),
        "nothing was sent to ARM"
    );
    assert!(f.handle.vms().is_empty());
}

fn secret() -> AzureCredentials {
    AzureCredentials::ClientSecret {
        tenant_id: "0a1b2c3d-0000-4000-8000-00000000000e".into(),
        client_id: "0a1b2c3d-0000-4000-8000-00000000000c".into(),
        client_secret: SecretString::new("s"),
    }
}

/// The OS disk: Premium SSD by default (Standard HDDs boot pod VMs in minutes), the
/// configured caching, and a name that says whose disk it is.
#[tokio::test]
async fn the_os_disk_is_premium_by_default_with_its_caching_and_an_explicit_name() {
    let f = Fixture::start(armtest::Config::default()).await;
    let p = f.provider(false, "s");
    p.create(&f.spec("podvm-disk-00000001", "Standard_D4as_v5"))
        .await
        .unwrap();
    let body = f.handle.vm_request("podvm-disk-00000001").unwrap();
    let disk = &body["properties"]["storageProfile"]["osDisk"];
    assert_eq!(disk["managedDisk"]["storageAccountType"], "Premium_LRS");
    assert_eq!(disk["caching"], "ReadWrite");
    assert_eq!(disk["name"], "podvm-disk-00000001-osdisk");
    assert!(
        f.handle
            .resource_ids()
            .iter()
            .any(|id| id.ends_with("/disks/podvm-disk-00000001-osdisk"))
    );
    let p = f.provider_with(false, &secret(), |c| {
        c.os_disk_type = "StandardSSD_LRS".into();
        c.os_disk_caching = "None".into();
    });
    p.create(&f.spec("podvm-disk-00000002", "Standard_D4as_v5"))
        .await
        .unwrap();
    let body = f.handle.vm_request("podvm-disk-00000002").unwrap();
    let disk = &body["properties"]["storageProfile"]["osDisk"];
    assert_eq!(disk["managedDisk"]["storageAccountType"], "StandardSSD_LRS");
    assert_eq!(disk["caching"], "None");
}

/// A plain VM is Trusted Launch only when its image declares it: secure boot asked of an
/// image without the feature sends no security profile (ARM would refuse the VM), and an
/// image that supports it gets Trusted Launch with secure boot.
#[tokio::test]
async fn plain_vms_get_trusted_launch_only_when_the_image_declares_it() {
    let f = Fixture::start(armtest::Config::default()).await;
    let standard = f
        .handle
        .seed_gallery_image(SUB, "rg", "eastus", "plain", None);
    let tl = f
        .handle
        .seed_gallery_image(SUB, "rg", "eastus", "tl", Some("TrustedLaunchSupported"));
    let secure = f.provider_with(false, &secret(), |c| c.secure_boot = true);
    let mut spec = f.spec("podvm-tl-00000001", "Standard_D4as_v5");
    spec.image_id = standard.clone();
    secure.create(&spec).await.unwrap();
    let body = f.handle.vm_request("podvm-tl-00000001").unwrap();
    assert!(
        body["properties"].get("securityProfile").is_none(),
        "{body}"
    );

    let mut spec = f.spec("podvm-tl-00000002", "Standard_D4as_v5");
    spec.image_id = tl.clone();
    secure.create(&spec).await.unwrap();
    let sp = &f.handle.vm_request("podvm-tl-00000002").unwrap()["properties"]["securityProfile"];
    assert_eq!(sp["securityType"], "TrustedLaunch");
    assert_eq!(sp["uefiSettings"]["secureBootEnabled"], true);
    assert_eq!(sp["uefiSettings"]["vTpmEnabled"], true);

    // Without secure boot, a Trusted-Launch-capable image gives a standard VM.
    let plain = f.provider(false, "s");
    let mut spec = f.spec("podvm-tl-00000003", "Standard_D4as_v5");
    spec.image_id = tl;
    plain.create(&spec).await.unwrap();
    let body = f.handle.vm_request("podvm-tl-00000003").unwrap();
    assert!(
        body["properties"].get("securityProfile").is_none(),
        "{body}"
    );
}

#[tokio::test]
async fn confidential_vms_carry_the_cvm_profile_and_need_a_cvm_size() {
    let f = Fixture::start(armtest::Config::default()).await;
    let p = f.provider(true, "s");
    p.create(&f.spec("podvm-cvm-00000001", "Standard_DC2as_v5"))
        .await
        .unwrap();
    let body = f.handle.vm_request("podvm-cvm-00000001").unwrap();
    let sp = &body["properties"]["securityProfile"];
    assert_eq!(sp["securityType"], "ConfidentialVM");
    assert_eq!(sp["uefiSettings"]["vTpmEnabled"], true);
    assert_eq!(
        body["properties"]["storageProfile"]["osDisk"]["managedDisk"]["securityProfile"]["securityEncryptionType"],
        "VMGuestStateOnly"
    );
    let err = p
        .create(&f.spec("podvm-cvm-00000002", "Standard_D4as_v5"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Permanent(_)), "{err}");
    assert!(err.to_string().contains("ConfidentialVM"), "{err}");
}

#[tokio::test]
async fn delete_removes_vm_nic_and_disk_and_succeeds_when_already_gone() {
    let f = Fixture::start(armtest::Config::default()).await;
    let p = f.provider(false, "s");
    p.create(&f.spec("podvm-del-00000001", "Standard_D4as_v5"))
        .await
        .unwrap();
    assert!(
        f.handle
            .resource_ids()
            .iter()
            .any(|r| r.contains("networkinterfaces/podvm-del"))
    );
    p.delete("podvm-del-00000001").await.unwrap();
    assert!(f.handle.vms().is_empty());
    let leftovers: Vec<String> = f
        .handle
        .resource_ids()
        .into_iter()
        .filter(|r| r.contains("podvm-del"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    p.delete("podvm-del-00000001").await.unwrap();
    assert_eq!(p.get("podvm-del-00000001").await.unwrap(), None);
}

#[tokio::test]
async fn throttled_creates_complete_after_the_wait_arm_asks_for() {
    let f = Fixture::start(armtest::Config::default()).await;
    f.handle.inject(Fault::new(
        "PUT",
        "virtualMachines/podvm-thr",
        2,
        FaultKind::Status {
            status: 429,
            code: "SubscriptionRequestsThrottled".into(),
            retry_after_secs: None,
            retry_after_ms: Some(150),
        },
    ));
    let p = f.provider(false, "s");
    let start = Instant::now();
    p.create(&f.spec("podvm-thr-00000001", "Standard_D4as_v5"))
        .await
        .unwrap();
    assert!(
        start.elapsed() >= Duration::from_millis(300),
        "waited {:?}",
        start.elapsed()
    );
    assert_eq!(p.counters().throttled.load(Ordering::Relaxed), 2);
    let puts = f
        .handle
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.path.contains("podvm-thr"))
        .count();
    assert_eq!(puts, 3);
}

#[tokio::test]
async fn server_errors_and_dropped_connections_are_retried_without_duplicates() {
    let f = Fixture::start(armtest::Config::default()).await;
    f.handle.inject(Fault::new(
        "PUT",
        "podvm-flaky",
        1,
        FaultKind::Status {
            status: 500,
            code: "InternalServerError".into(),
            retry_after_secs: None,
            retry_after_ms: None,
        },
    ));
    f.handle.inject(Fault::new(
        "PUT",
        "podvm-flaky",
        1,
        FaultKind::Drop { apply: true },
    ));
    f.handle.inject(Fault::new(
        "GET",
        "operations",
        1,
        FaultKind::Drop { apply: false },
    ));
    let p = f.provider(false, "s");
    p.create(&f.spec("podvm-flaky-00000001", "Standard_D4as_v5"))
        .await
        .unwrap();
    assert_eq!(f.handle.vms().len(), 1);
    assert!(p.counters().transient_retries.load(Ordering::Relaxed) >= 3);
}

#[tokio::test]
async fn lro_polling_follows_the_retry_after_header() {
    let f = Fixture::start(armtest::Config {
        lro_duration: Duration::from_millis(2200),
        lro_retry_after_secs: 1,
        ..armtest::Config::default()
    })
    .await;
    let p = f.provider(false, "s");
    p.create(&f.spec("podvm-slow-00000001", "Standard_D4as_v5"))
        .await
        .unwrap();
    let polls = f
        .handle
        .requests()
        .iter()
        .filter(|r| r.path.contains("/operations/"))
        .count();
    // 2.2 s at 1 s intervals: 3 polls (a 50 ms default would be ~44).
    assert!((2..=4).contains(&polls), "{polls} polls");
}

#[tokio::test]
async fn later_creates_poll_once_after_the_time_earlier_creates_took() {
    let f = Fixture::start(armtest::Config {
        lro_duration: Duration::from_millis(1500),
        lro_retry_after_secs: 1,
        ..armtest::Config::default()
    })
    .await;
    let p = f.provider(false, "s");
    let reads = |f: &Fixture| {
        f.handle
            .requests()
            .iter()
            .filter(|r| r.method == "GET")
            .count()
    };
    let before = reads(&f);
    p.create(&f.spec("podvm-learn-00000001", "Standard_D4as_v5"))
        .await
        .unwrap();
    let first = reads(&f) - before;
    let before = reads(&f);
    let t = Instant::now();
    let vm = p
        .create(&f.spec("podvm-learn-00000002", "Standard_D4as_v5"))
        .await
        .unwrap();
    let second = reads(&f) - before;
    // First create: the image definition (read once per image), polls at 1 s (running)
    // and 2 s (done), then the NIC. Second: one poll at the learned ~2 s, then the NIC;
    // and it still returns as soon as that poll says done, with the IP.
    assert_eq!(first, 4, "reads of the first create");
    assert_eq!(second, 2, "reads of the second create");
    assert!(
        t.elapsed() < Duration::from_millis(2900),
        "{:?}",
        t.elapsed()
    );
    assert!(vm.private_ip.is_some());
    assert_eq!(vm.state, VmState::Succeeded);
}

#[tokio::test]
async fn quota_failures_are_typed_and_unknown_vms_are_none() {
    let f = Fixture::start(armtest::Config {
        core_quota: Some(4),
        ..armtest::Config::default()
    })
    .await;
    let p = f.provider(false, "s");
    p.create(&f.spec("podvm-q-00000001", "Standard_D4as_v5"))
        .await
        .unwrap();
    let err = p
        .create(&f.spec("podvm-q-00000002", "Standard_D4as_v5"))
        .await
        .unwrap_err();
    assert!(matches!(err, Error::Quota(_)), "{err}");
    assert_eq!(p.get("podvm-none").await.unwrap(), None);
    f.handle.inject(Fault::new(
        "PUT",
        "podvm-fail",
        1,
        FaultKind::FailProvisioning {
            code: "AllocationFailed".into(),
        },
    ));
    let err = p
        .create(&f.spec("podvm-fail-00000001", "Standard_D2as_v5"))
        .await
        .unwrap_err();
    assert!(
        matches!(err, Error::Quota(_)),
        "allocation failure is capacity: {err}"
    );
}

#[tokio::test]
async fn list_owned_returns_only_vms_with_every_tag() {
    let f = Fixture::start(armtest::Config::default()).await;
    let p = f.provider(false, "s");
    let mut a = f.spec("podvm-a-00000001", "Standard_D2as_v5");
    a.tags.insert("sandboxd-cluster".into(), "c1".into());
    let mut b = f.spec("podvm-b-00000001", "Standard_D2as_v5");
    b.tags.insert("sandboxd-cluster".into(), "c2".into());
    p.create(&a).await.unwrap();
    p.create(&b).await.unwrap();
    let owned = p
        .list_owned(&BTreeMap::from([(
            "sandboxd-cluster".to_string(),
            "c1".to_string(),
        )]))
        .await
        .unwrap();
    assert_eq!(
        owned.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        vec!["podvm-a-00000001"]
    );
}

#[tokio::test]
async fn sizes_come_from_the_region_and_unknown_sizes_are_named() {
    let f = Fixture::start(armtest::Config::default()).await;
    let p = f.provider(false, "s");
    let sizes = p.sizes(&["Standard_D4as_v5".to_string()]).await.unwrap();
    assert_eq!(
        sizes,
        vec![VmSize {
            name: "Standard_D4as_v5".into(),
            vcpus: 4,
            memory_mib: 16384,
            gpus: 0,
        }]
    );
    // A GPU size: its GPUs from the SKU's `GPUs` capability.
    let f = Fixture::start(armtest::Config {
        sizes: vec![("Standard_NC4as_T4_v3".into(), 4, 28672)],
        gpus: vec![("Standard_NC4as_T4_v3".into(), 1)],
        ..Default::default()
    })
    .await;
    let sizes = f
        .provider(false, "s")
        .sizes(&["Standard_NC4as_T4_v3".to_string()])
        .await
        .unwrap();
    assert_eq!(sizes[0].gpus, 1);
    let err = p
        .sizes(&["Standard_Z9".to_string()])
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("Standard_Z9") && err.contains("eastus"),
        "{err}"
    );
}

/// Sizes come from Resource SKUs: a size restricted for the subscription (in the region, or
/// in every configured zone) or unable to take the Premium OS disk is refused when CAA
/// starts, before any create; `AZURE_ZONES` spreads VMs over the zones a size may use.
#[tokio::test]
async fn restricted_sizes_are_refused_before_any_create_and_vms_spread_over_zones() {
    let f = Fixture::start(armtest::Config {
        restrictions: vec![
            ("Standard_D8as_v5".into(), vec![]),
            ("Standard_D4as_v5".into(), vec!["3".into()]),
        ],
        sizes: armtest::Config::default()
            .sizes
            .into_iter()
            .chain([("Standard_A1_v2".to_string(), 1, 2048)])
            .collect(),
        ..Default::default()
    })
    .await;
    let zoned = f.provider_with(false, &secret(), |c| c.zones = vec!["2".into(), "3".into()]);
    let before = f.handle.requests().len();
    for (size, words) in [
        (
            "Standard_D8as_v5",
            &[
                "Standard_D8as_v5",
                "restricted",
                "NotAvailableForSubscription",
            ][..],
        ),
        (
            "Standard_A1_v2",
            &["Standard_A1_v2", "Premium_LRS", "AZURE_OS_DISK_TYPE"][..],
        ),
    ] {
        let err = zoned.sizes(&[size.to_string()]).await.unwrap_err();
        assert!(matches!(err, Error::Permanent(_)), "{err}");
        for w in words {
            assert!(err.to_string().contains(w), "{w}: {err}");
        }
    }
    let pinned3 = f.provider_with(false, &secret(), |c| c.zones = vec!["3".into()]);
    let err = pinned3
        .sizes(&["Standard_D4as_v5".to_string()])
        .await
        .unwrap_err();
    assert!(err.to_string().contains("zones 3"), "{err}");
    assert!(
        f.handle.requests()[before..]
            .iter()
            .all(
                |r| r.method == "GET" && r.path.to_ascii_lowercase().contains("/skus")
                    || r.path.ends_with("/token")
            ),
        "only Resource SKUs were read"
    );

    // D4as_v5 may use zone 2 only of {2, 3}; E2as_v5 both, in turn.
    zoned
        .sizes(&[
            "Standard_D4as_v5".to_string(),
            "Standard_E2as_v5".to_string(),
        ])
        .await
        .unwrap();
    let mut zones = Vec::new();
    for (i, size) in [
        "Standard_D4as_v5",
        "Standard_D4as_v5",
        "Standard_E2as_v5",
        "Standard_E2as_v5",
    ]
    .iter()
    .enumerate()
    {
        let name = format!("podvm-zone-0000000{i}");
        zoned.create(&f.spec(&name, size)).await.unwrap();
        zones.push(
            f.handle.vm_request(&name).unwrap()["zones"][0]
                .as_str()
                .unwrap()
                .to_string(),
        );
    }
    assert_eq!(zones[..2], ["2", "2"]);
    assert_ne!(zones[2], zones[3], "{zones:?}");
    // Without AZURE_ZONES: regional VMs.
    let p = f.provider(false, "s");
    p.create(&f.spec("podvm-zone-regional", "Standard_D4as_v5"))
        .await
        .unwrap();
    assert!(
        f.handle
            .vm_request("podvm-zone-regional")
            .unwrap()
            .get("zones")
            .is_none()
    );
}

/// Images shared with the subscription (`/SharedGalleries/…`) and community images go as
/// the spec's `sharedGalleryImageId` / `communityGalleryImageId`, not as an `id`.
#[tokio::test]
async fn shared_and_community_gallery_images_use_their_own_reference_fields() {
    let f = Fixture::start(armtest::Config::default()).await;
    let p = f.provider(false, "s");
    for (i, (image, field)) in [
        (
            "/SharedGalleries/0a1b-shared/Images/podvm/Versions/1.0.0",
            "sharedGalleryImageId",
        ),
        (
            "/CommunityGalleries/podvm-1a2b/Images/podvm/Versions/latest",
            "communityGalleryImageId",
        ),
    ]
    .iter()
    .enumerate()
    {
        let name = format!("podvm-gallery-0000000{i}");
        let mut spec = f.spec(&name, "Standard_D4as_v5");
        spec.image_id = image.to_string();
        p.create(&spec).await.unwrap();
        let r =
            &f.handle.vm_request(&name).unwrap()["properties"]["storageProfile"]["imageReference"];
        assert_eq!(r[*field], *image);
        assert!(r.get("id").is_none(), "{r}");
    }
}

/// Shared and community gallery images are Trusted Launch when their definition says so,
/// read where they are offered (`locations/{region}/sharedGalleries|communityGalleries`);
/// one not offered in the VM's region declares nothing, and the VM gets no security
/// profile (which ARM then accepts). Every read is an action the CredentialsRequest grants.
#[tokio::test]
async fn shared_and_community_gallery_images_get_trusted_launch_when_their_definition_declares_it()
{
    let f = Fixture::start(armtest::Config::default()).await;
    let seeded = f.handle.requests().len();
    let shared = f.handle.seed_shared_gallery_image(
        SUB,
        false,
        "eastus",
        "0a1b-shared",
        "tl",
        Some("TrustedLaunchSupported"),
    );
    let community = f.handle.seed_shared_gallery_image(
        SUB,
        true,
        "East US",
        "podvm-1a2b",
        "tl",
        Some("TrustedLaunchSupported"),
    );
    let elsewhere = f.handle.seed_shared_gallery_image(
        SUB,
        true,
        "westus",
        "podvm-3c4d",
        "tl",
        Some("TrustedLaunch"),
    );
    let secure = f.provider_with(false, &secret(), |c| c.secure_boot = true);
    for (i, image) in [&shared, &community].into_iter().enumerate() {
        let name = format!("podvm-sgtl-0000000{i}");
        let mut spec = f.spec(&name, "Standard_D4as_v5");
        spec.image_id = image.clone();
        secure.create(&spec).await.unwrap();
        let sp = &f.handle.vm_request(&name).unwrap()["properties"]["securityProfile"];
        assert_eq!(sp["securityType"], "TrustedLaunch", "{image}");
        assert_eq!(sp["uefiSettings"]["secureBootEnabled"], true);
    }
    let mut spec = f.spec("podvm-sgtl-00000009", "Standard_D4as_v5");
    spec.image_id = elsewhere;
    secure.create(&spec).await.unwrap();
    let body = f.handle.vm_request("podvm-sgtl-00000009").unwrap();
    assert!(
        body["properties"].get("securityProfile").is_none(),
        "{body}"
    );
    let reads: Vec<String> = f
        .handle
        .requests()
        .iter()
        .filter(|r| r.path.contains("Galleries/"))
        .map(|r| r.path.clone())
        .collect();
    assert!(
        reads
            .iter()
            .any(|p| p.contains("/locations/eastus/sharedGalleries/0a1b-shared/images/tl"))
            && reads
                .iter()
                .any(|p| p.contains("/locations/eastus/communityGalleries/podvm-1a2b/images/tl")),
        "{reads:?}"
    );
    let missing = crate::cloud::azure::permissions::ungranted(
        f.handle.requests()[seeded..]
            .iter()
            .map(|r| (r.method.as_str(), r.path.as_str())),
    );
    assert!(missing.is_empty(), "not granted: {missing:?}");
}

/// Boot diagnostics are on (managed storage), so the serial log of a VM that never reached
/// its forwarder can be read: through `retrieveBootDiagnosticsData`'s SAS URI.
#[tokio::test]
async fn boot_diagnostics_are_on_and_the_serial_log_is_read_through_its_sas_uri() {
    let f = Fixture::start(armtest::Config::default()).await;
    let seeded = f.handle.requests().len();
    let p = f.provider(false, "s");
    let name = "podvm-boot-00000001";
    p.create(&f.spec(name, "Standard_D4as_v5")).await.unwrap();
    let body = f.handle.vm_request(name).unwrap();
    assert_eq!(
        body["properties"]["diagnosticsProfile"]["bootDiagnostics"]["enabled"],
        true
    );
    assert!(
        body["properties"]["diagnosticsProfile"]["bootDiagnostics"]
            .get("storageUri")
            .is_none(),
        "managed storage"
    );
    let log = p.serial_log(name).await.unwrap();
    assert!(log.contains(&format!("{name} login:")), "{log}");
    let err = p.serial_log("podvm-none-00000000").await.unwrap_err();
    assert!(matches!(err, Error::NotFound(_)), "{err}");
    let served = f.handle.requests();
    let missing = crate::cloud::azure::permissions::ungranted(
        served[seeded..]
            .iter()
            .map(|r| (r.method.as_str(), r.path.as_str())),
    );
    assert!(missing.is_empty(), "not granted: {missing:?}");
}

/// `USE_PUBLIC_IP`: the VM gets a Standard static public IP that goes with it, and its
/// address is the one the tunnel and relay use.
#[tokio::test]
async fn use_public_ip_creates_a_public_ip_deleted_with_the_vm_and_prefers_it() {
    let f = Fixture::start(armtest::Config::default()).await;
    let p = f.provider_with(false, &secret(), |c| c.use_public_ip = true);
    let name = "podvm-pip-00000001";
    let vm = p.create(&f.spec(name, "Standard_D4as_v5")).await.unwrap();
    let body = f.handle.vm_request(name).unwrap();
    let pip = &body["properties"]["networkProfile"]["networkInterfaceConfigurations"][0]["properties"]
        ["ipConfigurations"][0]["properties"]["publicIPAddressConfiguration"];
    assert_eq!(pip["properties"]["deleteOption"], "Delete");
    assert_eq!(pip["properties"]["publicIPAllocationMethod"], "Static");
    assert_eq!(pip["sku"]["name"], "Standard");
    let public = vm.public_ip.expect("a public IP");
    assert!(public.to_string().starts_with("203.0.113."), "{public}");
    assert_eq!(vm.address(), Some(public));
    assert_eq!(vm.private_ip.unwrap().to_string(), "10.0.1.4");
    assert_eq!(p.get(name).await.unwrap().unwrap().address(), Some(public));
    let pips = |f: &Fixture| {
        f.handle
            .resource_ids()
            .into_iter()
            .filter(|id| id.contains("/publicipaddresses/"))
            .count()
    };
    assert_eq!(pips(&f), 1);
    p.delete(name).await.unwrap();
    assert_eq!(pips(&f), 0, "the public IP went with the VM");
    // Without USE_PUBLIC_IP: the private address, no public IP.
    let vm = f
        .provider(false, "s")
        .create(&f.spec("podvm-pip-00000002", "Standard_D4as_v5"))
        .await
        .unwrap();
    assert_eq!(vm.public_ip, None);
    assert_eq!(vm.address(), vm.private_ip);
    assert_eq!(pips(&f), 0);
}

#[tokio::test]
async fn a_wrong_client_secret_is_a_permanent_error_without_the_secret() {
    let f = Fixture::start(armtest::Config::default()).await;
    let p = f.provider(false, "wrong");
    let err = p.get("x").await.unwrap_err();
    assert!(matches!(err, Error::Permanent(_)), "{err}");
    assert!(!err.to_string().contains("client_secret=wrong"), "{err}");
}

/// Every ARM call the provider makes in a pod VM's life (sizes, create of a plain and a
/// Confidential VM, LRO polls, the NIC's IP, get, list, delete) is an action the OpenShift
/// CredentialsRequest grants; and the tokens carry the cloud's ARM audience.
#[tokio::test]
async fn every_arm_call_of_the_provider_is_granted_by_the_credentials_request() {
    let f = Fixture::start(armtest::Config::default()).await;
    let seeded = f.handle.requests().len();
    let seeded_tokens = f.handle.token_scopes().len();
    for cvm in [false, true] {
        let p = f.provider(cvm, "s");
        let size = if cvm {
            "Standard_DC2as_v5"
        } else {
            "Standard_D4as_v5"
        };
        let name = if cvm {
            "podvm-perm-00000002"
        } else {
            "podvm-perm-00000001"
        };
        p.sizes(&[size.to_string()]).await.unwrap();
        p.create(&f.spec(name, size)).await.unwrap();
        p.get(name).await.unwrap();
        p.list_owned(&BTreeMap::new()).await.unwrap();
        p.delete(name).await.unwrap();
    }
    let served = f.handle.requests();
    let served = &served[seeded..];
    assert!(served.len() > 10, "{served:?}");
    let missing = crate::cloud::azure::permissions::ungranted(
        served.iter().map(|r| (r.method.as_str(), r.path.as_str())),
    );
    assert!(missing.is_empty(), "not granted: {missing:?}");
    let scopes = f.handle.token_scopes().split_off(seeded_tokens);
    assert!(
        !scopes.is_empty()
            && scopes
                .iter()
                .all(|s| s == "https://management.azure.com/.default"),
        "{scopes:?}"
    );
}

/// A US Government cloud setting asks for that cloud's ARM audience, whatever endpoint the
/// development flag points at.
#[tokio::test]
async fn a_sovereign_cloud_setting_asks_tokens_for_that_clouds_arm_audience() {
    let f = Fixture::start(armtest::Config::default()).await;
    let endpoints = crate::cloud::azure::Endpoints::development(
        crate::cloud::azure::AzureCloud::UsGovernment,
        Url::parse(&format!("{}/", f.base)).unwrap(),
        None,
    );
    let p = AzureProvider::new(
        SUB,
        &AzureCredentials::ClientSecret {
            tenant_id: "0a1b2c3d-0000-4000-8000-00000000000e".into(),
            client_id: "0a1b2c3d-0000-4000-8000-00000000000c".into(),
            client_secret: SecretString::new("s"),
        },
        f.provider(false, "s").config().clone(),
        endpoints,
        Manners::default(),
        Polling::default(),
    )
    .unwrap();
    p.sizes(&["Standard_D4as_v5".to_string()]).await.unwrap();
    assert_eq!(
        f.handle.token_scopes().last().map(String::as_str),
        Some("https://management.core.usgovcloudapi.net/.default")
    );
}

/// A projected service account token (a JWT) that expires `secs` from now.
fn federated_token(secs: u64, n: u32) -> String {
    let b64 = |v: serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + secs;
    format!(
        "{}.{}.c2lnbmF0dXJl",
        b64(json!({"alg": "RS256", "kid": "k"})),
        b64(
            json!({"aud": ["api://AzureADTokenExchange"], "exp": exp, "iss": "https://oidc.example",
                   "sub": "system:serviceaccount:openshift-sandboxed-containers-operator:cloud-api-adaptor",
                   "jti": n})
        )
    )
}

fn workload_identity(file: &std::path::Path) -> AzureCredentials {
    AzureCredentials::WorkloadIdentity {
        tenant_id: "0a1b2c3d-0000-4000-8000-00000000000e".into(),
        client_id: "0a1b2c3d-0000-4000-8000-00000000000c".into(),
        token_file: file.to_path_buf(),
    }
}

/// The kubelet rotates the projected token in place; Entra ID refuses an expired assertion
/// and ARM an expired access token. With one-second access tokens and a first assertion that
/// expires, the provider keeps working only by reading the file again for each exchange.
#[tokio::test]
async fn workload_identity_reads_the_rotated_token_file_for_every_exchange() {
    let f = Fixture::start(armtest::Config {
        token_lifetime: Duration::from_secs(1),
        ..Default::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    let first = federated_token(2, 1);
    std::fs::write(&file, &first).unwrap();
    let p = f.provider_as(false, &workload_identity(&file));
    let size = ["Standard_D4as_v5".to_string()];
    p.sizes(&size).await.unwrap();
    // The first assertion and the access token expire; the kubelet writes a new token.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let second = federated_token(3600, 2);
    std::fs::write(&file, &second).unwrap();
    p.sizes(&size).await.unwrap();
    let seen = f.handle.assertions();
    assert_eq!(seen.first(), Some(&first));
    assert_eq!(seen.last(), Some(&second), "the rotated token was not read");
    assert!(
        f.handle
            .token_subjects()
            .iter()
            .any(|s| s == "app:0a1b2c3d-0000-4000-8000-00000000000c")
    );
}

/// Transient identity-endpoint failures (5xx, a dropped connection) are retried like ARM's
/// calls; an answer that cannot change (an expired assertion, 400) is final at once.
#[tokio::test]
async fn identity_endpoint_failures_are_retried_unless_permanent() {
    let f = Fixture::start(armtest::Config::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("token");
    std::fs::write(&file, federated_token(3600, 1)).unwrap();
    let token_path = "/oauth2/v2.0/token";
    f.handle.inject(Fault::new(
        "POST",
        token_path,
        2,
        FaultKind::Status {
            status: 503,
            code: "temporarily_unavailable".into(),
            retry_after_secs: None,
            retry_after_ms: None,
        },
    ));
    f.handle.inject(Fault::new(
        "POST",
        token_path,
        1,
        FaultKind::Drop { apply: false },
    ));
    let p = f.provider_as(false, &workload_identity(&file));
    p.sizes(&["Standard_D4as_v5".to_string()]).await.unwrap();
    let tries = |f: &Fixture| {
        f.handle
            .requests()
            .iter()
            .filter(|r| r.path.ends_with(token_path))
            .count()
    };
    // The fixture's own token, three failures, the success.
    assert_eq!(tries(&f), 5);

    // An expired assertion: one try, a permanent error naming Entra ID's answer.
    std::fs::write(&file, federated_token(0, 2)).unwrap();
    let before = tries(&f);
    let p = f.provider_as(false, &workload_identity(&file));
    let err = p.get("x").await.unwrap_err();
    assert!(matches!(err, Error::Permanent(_)), "{err}");
    assert!(err.to_string().contains("AADSTS700024"), "{err}");
    assert_eq!(tries(&f), before + 1);
}

/// Nodes with only user-assigned identities (the common AKS/ARO case): `AZURE_CLIENT_ID`
/// picks one through IMDS; without it IMDS cannot choose and says so.
#[tokio::test]
async fn a_user_assigned_managed_identity_is_chosen_by_its_client_id() {
    let ua = [
        "5b0c7a59-0000-4000-8000-0000000000a1",
        "5b0c7a59-0000-4000-8000-0000000000a2",
    ];
    let f = Fixture::start(armtest::Config {
        managed_identities: armtest::ManagedIdentities {
            system_assigned: false,
            user_assigned: ua.iter().map(|s| s.to_string()).collect(),
        },
        ..Default::default()
    })
    .await;
    f.handle.inject(Fault::new(
        "GET",
        "/metadata/identity",
        1,
        FaultKind::Status {
            status: 500,
            code: "unknown_error".into(),
            retry_after_secs: None,
            retry_after_ms: None,
        },
    ));
    let p = f.provider_as(
        false,
        &AzureCredentials::ManagedIdentity {
            client_id: Some(ua[1].to_string()),
        },
    );
    p.sizes(&["Standard_D4as_v5".to_string()]).await.unwrap();
    assert_eq!(
        f.handle.token_subjects().last().map(String::as_str),
        Some(format!("msi:{}", ua[1]).as_str())
    );
    assert_eq!(
        f.handle.token_scopes().last().map(String::as_str),
        Some("https://management.azure.com/.default"),
        "IMDS is asked for the cloud's ARM audience as its resource"
    );

    let p = f.provider_as(
        false,
        &AzureCredentials::ManagedIdentity { client_id: None },
    );
    let err = p.get("x").await.unwrap_err();
    assert!(matches!(err, Error::Permanent(_)), "{err}");
    assert!(
        err.to_string()
            .contains("Multiple user assigned identities"),
        "{err}"
    );
}

/// A CONNECT proxy on loopback that records each tunnel's target.
async fn connect_proxy() -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let log = log.clone();
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read_exact(&mut byte).await.is_err() {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_string();
                let Some(target) = head
                    .strip_prefix("CONNECT ")
                    .and_then(|r| r.split(' ').next())
                    .map(str::to_string)
                else {
                    let _ = client
                        .write_all(b"HTTP/1.1 405 Method Not Allowed\r\n\r\n")
                        .await;
                    return;
                };
                log.lock().unwrap().push(target.clone());
                let Ok(mut upstream) = tokio::net::TcpStream::connect(&target).await else {
                    let _ = client.write_all(b"HTTP/1.1 502 Bad Gateway\r\n\r\n").await;
                    return;
                };
                let _ = client
                    .write_all(b"HTTP/1.1 200 Connection Established\r\n\r\n")
                    .await;
                let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
            });
        }
    });
    (format!("http://{addr}"), seen)
}

/// Behind a corporate proxy with its own CA: token and ARM calls go through `HTTPS_PROXY`
/// (unless `NO_PROXY` names the host) and trust the system CA bundle besides the built-in
/// roots; without that bundle the TLS-inspecting CA is not trusted.
#[tokio::test]
async fn arm_and_identity_calls_honour_the_proxy_and_the_system_ca_bundle() {
    let ca = crate::pki::Ca::new("corporate-ca", time::Duration::hours(1)).unwrap();
    let leaf = ca
        .issue(
            "127.0.0.1",
            &[],
            &["127.0.0.1"],
            crate::pki::Usage::Server,
            time::Duration::hours(1),
        )
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("tls-ca-bundle.pem");
    std::fs::write(&bundle, ca.cert_pem()).unwrap();
    let (router, handle) = armtest::router(armtest::Config {
        https: true,
        ..Default::default()
    });
    let tls = axum_server::tls_rustls::RustlsConfig::from_pem(
        leaf.cert_pem.into_bytes(),
        leaf.key_pem.into_bytes(),
    )
    .await
    .unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let server = axum_server::from_tcp_rustls(listener, tls).unwrap();
    let task = tokio::spawn(async move {
        let _ = server.serve(router.into_make_service()).await;
    });
    handle.seed_peer_pods(SUB, "rg", "eastus");
    let (proxy, seen) = connect_proxy().await;

    // The configuration of the plain fixture, pointed at the TLS server.
    let f = Fixture::start(armtest::Config::default()).await;
    let cfg = f.provider(false, "s").config().clone();
    let provider = |http: &crate::cloud::azure::HttpSettings| {
        AzureProvider::with_http(
            SUB,
            &secret(),
            cfg.clone(),
            Endpoints::development(
                Default::default(),
                Url::parse(&format!("https://{addr}/")).unwrap(),
                None,
            ),
            Manners {
                backoff: Duration::from_millis(20),
                max_total: Duration::from_secs(2),
                ..Manners::default()
            },
            Polling {
                min_interval: Duration::from_millis(20),
                default_interval: Duration::from_millis(50),
                timeout: Duration::from_secs(20),
            },
            http,
        )
        .unwrap()
    };
    let through_proxy = crate::cloud::azure::HttpSettings {
        https_proxy: Some(proxy.clone()),
        ca_bundles: vec![bundle.clone()],
        ..Default::default()
    };
    let p = provider(&through_proxy);
    let vm = p
        .create(&f.spec("podvm-proxy-00000001", "Standard_D4as_v5"))
        .await
        .unwrap();
    assert!(vm.private_ip.is_some());
    let tunnels = seen.lock().unwrap().clone();
    assert!(!tunnels.is_empty(), "nothing went through the proxy");
    assert!(
        tunnels.iter().all(|t| *t == addr.to_string()),
        "{tunnels:?}"
    );
    assert!(
        handle
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/oauth2/v2.0/token")),
        "the token exchange went to the authority through the proxy too"
    );

    // NO_PROXY names the host: straight there.
    let direct = provider(&crate::cloud::azure::HttpSettings {
        no_proxy: Some("127.0.0.1".into()),
        ..through_proxy.clone()
    });
    let before = seen.lock().unwrap().len();
    direct.get("podvm-proxy-00000001").await.unwrap().unwrap();
    assert_eq!(seen.lock().unwrap().len(), before);

    // Without the bundle, the proxy's CA is not trusted.
    let untrusted = provider(&crate::cloud::azure::HttpSettings {
        ca_bundles: Vec::new(),
        ..through_proxy
    });
    let err = untrusted.get("podvm-proxy-00000001").await.unwrap_err();
    assert!(
        err.to_string().to_ascii_lowercase().contains("certificate"),
        "{err}"
    );
    task.abort();
}
