//! The ARM test server: the subset of Azure Resource Manager sandboxd uses, in process, for
//! tests, demos and `ctl` dry runs. No cloud is reachable from tests; this reproduces what
//! the provider depends on: `Azure-AsyncOperation` LROs, 404/409/429 + `Retry-After`/5xx,
//! request checks (api-version, required fields, referenced resources), a token endpoint
//! for the client-credential flow, fault and latency injection, and inspection endpoints
//! (`/armtest/vms`, `/armtest/resources`, `/armtest/requests`).
//!
//! Paths are matched case-insensitively, as ARM does. Response bodies follow the shapes of
//! the REST API specification examples.

mod compute;
mod dhcp;
mod faults;
mod images;
mod network;
pub mod qemu;
mod storage;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

pub use faults::{Fault, FaultKind};
pub use network::{NetworkSeed, NsgSeed, RuleSeed, SubnetSeed, VnetSeed};
pub use storage::{StorageConfig, storage_account_key};
pub use store::{RequestLog, VmView};

use store::Store;

/// Errors of the test server itself (binding, serving).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Binding or serving failed.
    #[error("ARM test server: {0}")]
    Io(#[from] std::io::Error),
}

impl Error {
    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        "io"
    }
}

/// Behaviour of the server.
#[derive(Clone, Debug)]
pub struct Config {
    /// How long a VM create or delete takes before its operation succeeds.
    pub lro_duration: Duration,
    /// `Retry-After` (seconds) sent with LRO responses.
    pub lro_retry_after_secs: u64,
    /// Delay added to every ARM request.
    pub latency: Duration,
    /// VM sizes offered in every region: (name, vCPUs, memory MiB).
    pub sizes: Vec<(String, u32, u64)>,
    /// ARM write requests allowed per second per subscription before 429 (0 = no limit).
    pub writes_per_second: u32,
    /// ARM read requests allowed per second per subscription before 429 (0 = no limit).
    pub reads_per_second: u32,
    /// Regional core quota; a create beyond it fails with `OperationNotAllowed`.
    pub core_quota: Option<u32>,
    /// Back every created VM with a local pod VM (`CLOUD_PROVIDER=local`'s kind), started
    /// from the request's `userData`; its address becomes the NIC's private IP. Deleting
    /// the VM (or [`Handle::delete_local_vms`]) deletes it. `None`: VMs are records only.
    pub local_vms: Option<LocalVms>,
    /// Storage accounts' Blob service (see [`StorageConfig`]).
    pub storage: StorageConfig,
    /// Lifetime of the access tokens the token endpoints issue; ARM refuses a token after
    /// it (`ExpiredAuthenticationToken`). Entra ID's are about an hour.
    pub token_lifetime: Duration,
    /// The managed identities of "the VM" whose IMDS this server plays.
    pub managed_identities: ManagedIdentities,
    /// Availability zones of every region and size.
    pub zones: Vec<String>,
    /// Sizes restricted for the subscription (Resource SKUs `restrictions`): with no zones,
    /// in the whole region (`Location`); else in those zones (`Zone`).
    pub restrictions: Vec<(String, Vec<String>)>,
    /// GPUs of GPU sizes (the `GPUs` capability).
    pub gpus: Vec<(String, u32)>,
    /// Whether clients reach the server over TLS (a test serving its [`router`] with a
    /// certificate): operation URLs it answers are then `https`.
    pub https: bool,
}

/// The managed identities IMDS can give tokens for.
#[derive(Clone, Debug)]
pub struct ManagedIdentities {
    /// Whether the VM has a system-assigned identity.
    pub system_assigned: bool,
    /// Client ids of its user-assigned identities.
    pub user_assigned: Vec<String>,
}

impl Default for ManagedIdentities {
    fn default() -> Self {
        Self {
            system_assigned: true,
            user_assigned: Vec::new(),
        }
    }
}

/// Where and how the server runs local pod VMs (see [`Config::local_vms`]).
#[derive(Clone, Debug)]
pub struct LocalVms {
    /// State directory of the local VMs.
    pub dir: std::path::PathBuf,
    /// First address of the /16 the VM links are taken from.
    pub subnet: std::net::Ipv4Addr,
    /// The `sandboxd` executable started as `<exe> forwarder ...` for each VM.
    pub exe: std::path::PathBuf,
    /// Boot each VM from the pod VM image under qemu instead ([`qemu`]).
    pub qemu: Option<qemu::QemuVms>,
}

impl Default for Config {
    fn default() -> Self {
        let sizes = [
            ("Standard_B2als_v2", 2, 4096),
            ("Standard_D2as_v5", 2, 8192),
            ("Standard_D4as_v5", 4, 16384),
            ("Standard_D2ads_v5", 2, 8192),
            ("Standard_D8as_v5", 8, 32768),
            ("Standard_DC2as_v5", 2, 8192),
            ("Standard_DC4as_v5", 4, 16384),
            ("Standard_DC8as_v5", 8, 32768),
            ("Standard_E2as_v5", 2, 16384),
            ("Standard_F4s_v2", 4, 8192),
        ];
        Self {
            lro_duration: Duration::from_millis(300),
            lro_retry_after_secs: 0,
            latency: Duration::ZERO,
            sizes: sizes
                .iter()
                .map(|(n, c, m)| (n.to_string(), *c, *m))
                .collect(),
            writes_per_second: 0,
            reads_per_second: 0,
            core_quota: None,
            local_vms: None,
            storage: StorageConfig::default(),
            token_lifetime: Duration::from_secs(3599),
            managed_identities: ManagedIdentities::default(),
            https: false,
            zones: ["1", "2", "3"].iter().map(|z| z.to_string()).collect(),
            restrictions: Vec::new(),
            gpus: Vec::new(),
        }
    }
}

/// A handle on a server's state: inspect it and inject faults from tests.
#[derive(Clone)]
pub struct Handle {
    store: Arc<Store>,
}

impl Handle {
    /// Live VMs (any provisioning state).
    pub fn vms(&self) -> Vec<VmView> {
        self.store.vms()
    }

    /// Every request served, in order.
    pub fn requests(&self) -> Vec<RequestLog> {
        self.store.requests()
    }

    /// The `scope` of every token request, in order (the audience tokens were asked for).
    pub fn token_scopes(&self) -> Vec<String> {
        self.store.token_scopes()
    }

    /// Who each issued token was for, in order: `app:{client id}` (client credentials),
    /// `msi:system` or `msi:{client id}` (managed identity).
    pub fn token_subjects(&self) -> Vec<String> {
        self.store.token_subjects()
    }

    /// Every federated assertion presented to the token endpoint, in order.
    pub fn assertions(&self) -> Vec<String> {
        self.store.assertions()
    }

    /// Every bearer token the token endpoint issued (tests look for them in logs).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.store.issued_tokens()
    }

    /// Ids of every stored resource (resource groups, NICs, disks, ...), lower-case.
    pub fn resource_ids(&self) -> Vec<String> {
        self.store.resource_ids()
    }

    /// Adds a fault rule.
    pub fn inject(&self, fault: Fault) {
        self.store.inject(fault);
    }

    /// Removes every fault rule.
    pub fn clear_faults(&self) {
        self.store.clear_faults();
    }

    /// Changes the behaviour (latency, LRO duration, limits) from now on.
    pub fn set_config(&self, f: impl FnOnce(&mut Config)) {
        self.store.set_config(f);
    }

    /// Seeds gallery image version `{definition}/1.0.0` in gallery `g` of `rg` whose
    /// definition declares `security_type` (`SecurityType` feature; none: standard VMs only).
    /// Returns the version's id.
    pub fn seed_gallery_image(
        &self,
        subscription: &str,
        rg: &str,
        location: &str,
        definition: &str,
        security_type: Option<&str>,
    ) -> String {
        let gallery = format!(
            "/subscriptions/{subscription}/resourceGroups/{rg}/providers/Microsoft.Compute/galleries/g"
        );
        let def = format!("{gallery}/images/{definition}");
        let version = format!("{def}/versions/1.0.0");
        let mut props = serde_json::json!({"osType": "Linux", "osState": "Generalized",
            "hyperVGeneration": "V2", "provisioningState": "Succeeded"});
        if let Some(t) = security_type {
            props["features"] = serde_json::json!([{"name": "SecurityType", "value": t}]);
        }
        let mut g = self.store.lock();
        for (id, ty, props) in [
            (&def, "Microsoft.Compute/galleries/images", props),
            (
                &version,
                "Microsoft.Compute/galleries/images/versions",
                serde_json::json!({"provisioningState": "Succeeded"}),
            ),
        ] {
            let name = id.rsplit('/').next().unwrap_or_default();
            g.resources.insert(
                id.to_ascii_lowercase(),
                serde_json::json!({"id": id, "name": name, "type": ty, "location": location, "properties": props}),
            );
        }
        version
    }

    /// Seeds an image of a gallery shared directly with `subscription` (`community`:
    /// false; read as `sharedGalleries`) or of a community gallery (`community`: true),
    /// offered in `location`, whose definition declares `security_type` (none: standard VMs
    /// only). Returns the version's id as VMs name it (`/SharedGalleries/{gallery}/Images/
    /// {image}/Versions/1.0.0`, or `/CommunityGalleries/…`).
    pub fn seed_shared_gallery_image(
        &self,
        subscription: &str,
        community: bool,
        location: &str,
        gallery: &str,
        image: &str,
        security_type: Option<&str>,
    ) -> String {
        let (kind, prefix, ty) = if community {
            (
                "communityGalleries",
                "CommunityGalleries",
                "Microsoft.Compute/locations/communityGalleryImage",
            )
        } else {
            (
                "sharedGalleries",
                "SharedGalleries",
                "Microsoft.Compute/locations/sharedGalleryImage",
            )
        };
        let unique = format!("/{prefix}/{gallery}/Images/{image}");
        let mut props = serde_json::json!({"osType": "Linux", "osState": "Generalized",
            "hyperVGeneration": "V2",
            "identifier": {"publisher": "sandboxd", "offer": "podvm", "sku": image}});
        if let Some(t) = security_type {
            props["features"] = serde_json::json!([{"name": "SecurityType", "value": t}]);
        }
        let path = format!(
            "/subscriptions/{subscription}/providers/Microsoft.Compute/locations/{}/{kind}/{gallery}/images/{image}",
            storage::region_key(location)
        );
        self.store.lock().resources.insert(
            path.to_ascii_lowercase(),
            serde_json::json!({"name": image, "type": ty, "location": location,
                "identifier": {"uniqueId": unique}, "properties": props}),
        );
        format!("{unique}/Versions/1.0.0")
    }

    /// Seeds what a peer-pods setup needs in `subscription`: resource group `rg` in
    /// `location`, VNet `vnet` with subnet `worker` (10.0.1.0/24), NSG `nsg`, and gallery
    /// image version `g/podvm/1.0.0`. Returns (subnet id, NSG id, image id).
    pub fn seed_peer_pods(
        &self,
        subscription: &str,
        rg: &str,
        location: &str,
    ) -> (String, String, String) {
        let rg_id = format!("/subscriptions/{subscription}/resourceGroups/{rg}");
        let vnet = format!("{rg_id}/providers/Microsoft.Network/virtualNetworks/vnet");
        let subnet = format!("{vnet}/subnets/worker");
        let nsg = format!("{rg_id}/providers/Microsoft.Network/networkSecurityGroups/nsg");
        let gallery = format!("{rg_id}/providers/Microsoft.Compute/galleries/g");
        let image = format!("{gallery}/images/podvm/versions/1.0.0");
        let mut g = self.store.lock();
        let loc = serde_json::json!(location);
        for (id, ty, extra) in [
            (
                rg_id.clone(),
                "Microsoft.Resources/resourceGroups",
                serde_json::json!({}),
            ),
            (
                vnet.clone(),
                "Microsoft.Network/virtualNetworks",
                serde_json::json!({"addressSpace": {"addressPrefixes": ["10.0.0.0/16"]}}),
            ),
            (
                subnet.clone(),
                "Microsoft.Network/virtualNetworks/subnets",
                serde_json::json!({"addressPrefix": "10.0.1.0/24"}),
            ),
            (
                nsg.clone(),
                "Microsoft.Network/networkSecurityGroups",
                serde_json::json!({}),
            ),
            (
                gallery.clone(),
                "Microsoft.Compute/galleries",
                serde_json::json!({}),
            ),
            (
                format!("{gallery}/images/podvm"),
                "Microsoft.Compute/galleries/images",
                serde_json::json!({"osType": "Linux", "osState": "Generalized", "hyperVGeneration": "V2",
                    "features": [{"name": "SecurityType", "value": "TrustedLaunchAndConfidentialVmSupported"}]}),
            ),
            (
                image.clone(),
                "Microsoft.Compute/galleries/images/versions",
                serde_json::json!({}),
            ),
        ] {
            let mut props = extra;
            props["provisioningState"] = "Succeeded".into();
            let name = id.rsplit('/').next().unwrap_or_default().to_string();
            g.resources.insert(
                id.to_ascii_lowercase(),
                serde_json::json!({"id": id, "name": name, "type": ty, "location": loc, "properties": props}),
            );
        }
        (subnet, nsg, image)
    }

    /// Deletes every local pod VM the server started (see [`Config::local_vms`]).
    pub async fn delete_local_vms(&self) {
        let Some(local) = self.store.local.clone() else {
            return;
        };
        let all = local
            .list_owned(&std::collections::BTreeMap::new())
            .await
            .unwrap_or_default();
        for vm in all {
            if let Err(e) = local.delete(&vm.name).await {
                tracing::warn!(vm = %vm.name, error = %e, "deleting a local VM");
            }
        }
    }

    /// The request body last sent for the VM `name`, as ARM received it.
    pub fn vm_request(&self, name: &str) -> Option<Value> {
        self.store.vm_request(name)
    }
}

/// The router and a handle on its state.
pub fn router(config: Config) -> (Router, Handle) {
    let store = Arc::new(Store::new(config));
    let router = Router::new().fallback(dispatch).with_state(store.clone());
    (router, Handle { store })
}

/// Binds `addr` and serves until `shutdown` fires; returns the bound address and a handle.
pub async fn serve(
    addr: SocketAddr,
    config: Config,
    shutdown: tokio_util::sync::CancellationToken,
) -> Result<(SocketAddr, Handle, tokio::task::JoinHandle<()>), Error> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let (router, handle) = router(config);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, router)
            .with_graceful_shutdown(shutdown.cancelled_owned())
            .await;
    });
    Ok((local, handle, task))
}

/// Flags of `sandboxd dev arm-server`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8443")]
    pub addr: SocketAddr,
    /// Milliseconds a VM create or delete takes.
    #[arg(long, default_value_t = 2000)]
    pub lro_ms: u64,
    /// Milliseconds added to every request.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Seed a peer-pods setup in this subscription (resource group, VNet with subnet
    /// `worker`, NSG, gallery image); its ids are printed as `peer-pods-cm` keys.
    #[arg(long)]
    pub seed_subscription: Option<String>,
    /// Resource group of the seeded setup.
    #[arg(long, default_value = "rg")]
    pub seed_resource_group: String,
    /// Region of the seeded setup.
    #[arg(long, default_value = "eastus")]
    pub seed_region: String,
    /// Back each created VM with a local pod VM (a `sandboxd forwarder` in its own network
    /// namespace, as `CLOUD_PROVIDER=local` runs them) kept in this state directory; the
    /// VM's NIC gets the local VM's address. Needs root. Deleted with the VM and on exit.
    #[arg(long)]
    pub local_vms: Option<std::path::PathBuf>,
    /// First address of the /16 local VM links are taken from.
    #[arg(long, default_value = "10.250.0.0")]
    pub local_vm_subnet: std::net::Ipv4Addr,
    /// Boot each local VM from this pod VM disk (`sandboxd image build`'s qcow2, raw or VHD)
    /// under qemu with OVMF, its NIC a tap in the node's network namespace, instead of a
    /// `sandboxd forwarder` in namespaces. Needs qemu-system-x86_64 and OVMF.
    #[arg(long, requires = "local_vms")]
    pub local_vm_image: Option<std::path::PathBuf>,
    /// Memory of each qemu VM (MiB).
    #[arg(long, default_value_t = 1024)]
    pub local_vm_memory: u32,
    /// vCPUs of each qemu VM.
    #[arg(long, default_value_t = 1)]
    pub local_vm_cpus: u32,
    /// qemu's accelerator: `tcg`, or `kvm` where it boots the kernel (nested KVM often
    /// does not).
    #[arg(long, default_value = "tcg", value_parser = ["tcg", "kvm"])]
    pub local_vm_accel: String,
}

/// Runs the ARM test server until a signal arrives.
pub async fn run(args: Args, shutdown: tokio_util::sync::CancellationToken) -> Result<(), Error> {
    let config = Config {
        lro_duration: Duration::from_millis(args.lro_ms),
        latency: Duration::from_millis(args.latency_ms),
        lro_retry_after_secs: 1,
        local_vms: match &args.local_vms {
            Some(dir) => Some(LocalVms {
                dir: dir.clone(),
                subnet: args.local_vm_subnet,
                exe: std::env::current_exe()?,
                qemu: args.local_vm_image.as_ref().map(|image| qemu::QemuVms {
                    image: image.clone(),
                    memory_mib: args.local_vm_memory,
                    cpus: args.local_vm_cpus,
                    accel: args.local_vm_accel.clone(),
                }),
            }),
            None => None,
        },
        ..Config::default()
    };
    let (addr, handle, task) = serve(args.addr, config, shutdown).await?;
    if let Some(sub) = &args.seed_subscription {
        let (subnet, nsg, image) =
            handle.seed_peer_pods(sub, &args.seed_resource_group, &args.seed_region);
        // What a `peer-pods-cm` pointing here needs (stdout, for scripts).
        println!("AZURE_SUBSCRIPTION_ID={sub}");
        println!("AZURE_RESOURCE_GROUP={}", args.seed_resource_group);
        println!("AZURE_REGION={}", args.seed_region);
        println!("AZURE_SUBNET_ID={subnet}");
        println!("AZURE_NSG_ID={nsg}");
        println!("AZURE_IMAGE_ID={image}");
        // Not a `peer-pods-cm` key: endpoints outside Azure's clouds are a command-line
        // flag of each component (`--dev-arm-endpoint`).
        println!("DEV_ARM_ENDPOINT=http://{addr}/");
    }
    tracing::info!(%addr, "ARM test server listening");
    let _ = task.await;
    handle.delete_local_vms().await;
    Ok(())
}

/// An ARM error response.
pub(crate) fn arm_error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (
        status,
        axum::Json(json!({"error": {"code": code, "message": message.into()}})),
    )
        .into_response()
}

async fn dispatch(State(store): State<Arc<Store>>, req: Request) -> Response {
    let started = Instant::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let headers = req.headers().clone();
    let body = match axum::body::to_bytes(req.into_body(), 4 << 20).await {
        Ok(b) => b,
        Err(_) => {
            return arm_error(
                StatusCode::BAD_REQUEST,
                "InvalidRequestContent",
                "body too large or unreadable",
            );
        }
    };
    let path = uri.path().to_string();
    if path.starts_with("/armtest/") {
        return inspect(&store, &method, &path, &body);
    }
    let latency = store.config().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (response, fault) = handle(&store, &method, &uri, &headers, body).await;
    let status = response.status().as_u16();
    store.log(RequestLog {
        method: method.to_string(),
        path,
        status,
        fault,
        micros: started.elapsed().as_micros() as u64,
        at_micros: started.duration_since(store.started).as_micros() as u64,
    });
    response
}

async fn handle(
    store: &Arc<Store>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> (Response, Option<String>) {
    let path = uri.path();
    let segs: Vec<String> = path
        .trim_matches('/')
        .split('/')
        .map(str::to_string)
        .collect();
    let query: Vec<(String, String)> =
        url::form_urlencoded::parse(uri.query().unwrap_or("").as_bytes())
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
    // Token endpoints: Entra ID's `POST /{tenant}/oauth2/v2.0/token` and IMDS's
    // `GET /metadata/identity/oauth2/token`; injected faults apply to them too.
    let entra =
        segs.len() == 4 && segs[1] == "oauth2" && segs[3] == "token" && method == Method::POST;
    let imds = path.eq_ignore_ascii_case(crate::cloud::azure::identity::IMDS_TOKEN_PATH)
        && method == Method::GET;
    if entra || imds {
        let fault = store.take_fault(method, path);
        let label = fault.as_ref().map(FaultKind::label);
        match fault {
            Some(FaultKind::Status { status, code, .. }) => {
                let resp = (
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    axum::Json(json!({"error": code, "error_description": "injected fault"})),
                )
                    .into_response();
                return (resp, label);
            }
            Some(FaultKind::Drop { .. }) => return (dropped(), label),
            Some(FaultKind::Delay { millis }) => {
                tokio::time::sleep(Duration::from_millis(millis)).await
            }
            _ => {}
        }
        let resp = if entra {
            store.token(&segs[0], &body)
        } else {
            store.imds_token(headers, &query.iter().cloned().collect())
        };
        return (resp, label);
    }
    if let Some(refused) = store.unauthorized(headers) {
        return (refused, None);
    }
    let api_version = query
        .iter()
        .find(|(k, _)| k == "api-version")
        .map(|(_, v)| v.clone());
    let Some(api_version) = api_version else {
        return (
            arm_error(
                StatusCode::BAD_REQUEST,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            ),
            None,
        );
    };
    if !faults::valid_api_version(&api_version) {
        return (
            arm_error(
                StatusCode::BAD_REQUEST,
                "InvalidApiVersionParameter",
                format!("The api-version '{api_version}' is invalid."),
            ),
            None,
        );
    }
    let base = format!(
        "{}://{}",
        if store.config().https {
            "https"
        } else {
            "http"
        },
        headers
            .get("host")
            .and_then(|h| h.to_str().ok())
            .unwrap_or("localhost")
    );
    let write = *method != Method::GET;
    if let Some(resp) = store.rate_limited(&segs, write) {
        return (resp, Some("rate_limit".into()));
    }
    if let Some(fault) = store.take_fault(method, path) {
        let label = fault.label();
        return match fault {
            FaultKind::Status {
                status,
                code,
                retry_after_secs,
                retry_after_ms,
            } => {
                let mut resp = arm_error(
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
                    &code,
                    "injected fault",
                );
                if let Some(s) = retry_after_secs {
                    resp.headers_mut().insert("retry-after", s.into());
                }
                if let Some(ms) = retry_after_ms {
                    resp.headers_mut().insert("retry-after-ms", ms.into());
                }
                (resp, Some(label))
            }
            FaultKind::Drop { apply } => {
                if apply {
                    let _ = compute::route(store, &base, method, &segs, &query, &api_version, body)
                        .await;
                }
                (dropped(), Some(label))
            }
            FaultKind::Delay { millis } => {
                tokio::time::sleep(Duration::from_millis(millis)).await;
                (
                    compute::route(store, &base, method, &segs, &query, &api_version, body).await,
                    Some(label),
                )
            }
            FaultKind::FailProvisioning { code } => {
                store.fail_next_provisioning(code);
                (
                    compute::route(store, &base, method, &segs, &query, &api_version, body).await,
                    Some(label),
                )
            }
        };
    }
    if let Some(resp) = network::route(store, method, &segs, &query) {
        return (resp, None);
    }
    if let Some(resp) = storage::route(store, &base, method, &segs, &api_version, &body)
        .or_else(|| images::route(store, &base, method, &segs, &api_version, &body))
        .or_else(|| images::route_shared(store, method, &segs, &api_version))
    {
        return (resp, None);
    }
    (
        compute::route(store, &base, method, &segs, &query, &api_version, body).await,
        None,
    )
}

/// A response whose body fails after the headers: the client sees the connection drop.
fn dropped() -> Response {
    let stream = futures::stream::once(async {
        Err::<Bytes, std::io::Error>(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "injected connection drop",
        ))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Body::from_stream(stream))
        .expect("static response")
}

fn inspect(store: &Store, method: &Method, path: &str, body: &Bytes) -> Response {
    match (method.as_str(), path) {
        ("GET", "/armtest/vms") => axum::Json(json!(store.vms())).into_response(),
        ("GET", "/armtest/resources") => axum::Json(json!(store.resource_ids())).into_response(),
        ("GET", "/armtest/requests") => axum::Json(json!(store.requests())).into_response(),
        ("POST", "/armtest/network") => network::seed(store, body),
        ("POST", "/armtest/faults") => match serde_json::from_slice::<Fault>(body) {
            Ok(f) => {
                store.inject(f);
                StatusCode::NO_CONTENT.into_response()
            }
            Err(e) => arm_error(StatusCode::BAD_REQUEST, "InvalidFault", e.to_string()),
        },
        // The serial log blob a boot diagnostics SAS URI names (no bearer token: the SAS is
        // the authorisation).
        ("GET", p) if p.starts_with("/armtest/bootdiagnostics/") && p.ends_with("/serial.log") => {
            let vm = p
                .trim_start_matches("/armtest/bootdiagnostics/")
                .trim_end_matches("/serial.log");
            match store.vms().iter().find(|v| v.name.eq_ignore_ascii_case(vm)) {
                Some(v) => (
                    [("content-type", "text/plain")],
                    format!(
                        "[    0.000000] Linux version 6.1.0 (armtest)\n[    1.234567] systemd[1]: Started sandboxd forwarder.\n{} login: \n",
                        v.name
                    ),
                )
                    .into_response(),
                None => (StatusCode::NOT_FOUND, "BlobNotFound").into_response(),
            }
        }
        ("DELETE", "/armtest/faults") => {
            store.clear_faults();
            StatusCode::NO_CONTENT.into_response()
        }
        _ => arm_error(
            StatusCode::NOT_FOUND,
            "NotFound",
            "unknown inspection endpoint",
        ),
    }
}

#[cfg(test)]
mod provider_tests;
#[cfg(test)]
mod tests;
