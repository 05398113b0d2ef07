//! `sandboxd image publish|delete|job`: the pod VM image in Azure.
//!
//! `publish` uploads a fixed VHD as a page blob (storage account created or reused through
//! ARM, key from `listKeys`, Shared Key signed requests, non-zero ranges only, in parallel,
//! resumable) and creates a managed image or an Azure Compute Gallery image version from it
//! (gallery and definition created when missing, a Confidential-VM-capable definition when
//! asked), then prints the image id. Everything it creates carries the tag
//! [`TAG_CREATED_BY`]; `delete` removes an image, and its blob, only when it carries it.
//! `--update-configmap` writes `AZURE_IMAGE_ID` into `peer-pods-cm` by server-side apply and
//! records the id in the annotation [`ANNOTATION_BUILT_IMAGE_ID`], which tells uninstall the
//! image is sandboxd's to delete. `job` is the in-cluster image Job.

pub mod arm;
pub mod blob;
pub mod sharedkey;
pub mod upload;
pub mod vhd;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::cloud::azure::{EndpointArgs, Endpoints, Manners};
use crate::config::CloudSecret;

use arm::{Arm, ArmError, Polling};
use blob::BlobClient;

/// Tag on every ARM resource `publish` creates; `delete` only touches resources with it.
pub const TAG_CREATED_BY: &str = "sandboxd-created-by";
/// Value of [`TAG_CREATED_BY`].
pub const CREATED_BY: &str = "sandboxd";
/// Tag on images: the id of the storage account holding their source blob.
pub const TAG_STORAGE_ACCOUNT: &str = "sandboxd-storage-account";
/// Annotation on `peer-pods-cm`: the image id sandboxd built and wrote as `AZURE_IMAGE_ID`.
/// When it equals `AZURE_IMAGE_ID`, uninstall may delete the image; otherwise the image is
/// the user's and stays.
pub const ANNOTATION_BUILT_IMAGE_ID: &str = "sandboxd.io/built-image-id";
/// The operator's namespace (default of `--namespace`).
pub const DEFAULT_NAMESPACE: &str = "openshift-sandboxed-containers-operator";

/// `Microsoft.Storage` api-version.
pub const STORAGE_API: &str = "2023-05-01";
/// `Microsoft.Compute/images` api-version.
pub const COMPUTE_API: &str = "2024-07-01";
/// `Microsoft.Compute/galleries` api-version.
pub const GALLERY_API: &str = "2024-03-03";
/// Resource groups api-version.
pub const RESOURCES_API: &str = "2021-04-01";

/// Errors of the image tools.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A flag or the environment is wrong.
    #[error("{0}")]
    Input(String),
    /// `peer-pods-secret` keys (from the environment) are missing or invalid.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// The VHD is not usable.
    #[error(transparent)]
    Vhd(#[from] vhd::VhdError),
    /// An ARM call failed.
    #[error(transparent)]
    Arm(#[from] ArmError),
    /// The upload failed; a rerun resumes it.
    #[error("uploading the VHD failed (run the same command again to resume)")]
    Upload(#[from] upload::UploadError),
    /// A Blob service call (other than the upload) failed.
    #[error(transparent)]
    Blob(#[from] blob::BlobError),
    /// Something exists that this command must not overwrite or delete.
    #[error("{0}")]
    Refused(String),
    /// A Kubernetes call failed.
    #[error("{0}")]
    Kube(String),
}

impl Error {
    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Input(_) => "input",
            Error::Config(_) => "config",
            Error::Vhd(_) => "vhd",
            Error::Arm(_) => "arm",
            Error::Upload(_) => "upload",
            Error::Blob(_) => "blob",
            Error::Refused(_) => "refused",
            Error::Kube(_) => "kube",
        }
    }
}

/// How to reach Azure; shared by every image tool.
#[derive(Debug, Clone, clap::Args)]
pub struct AzureArgs {
    /// The Azure cloud (`--azure-cloud`, else `AZURE_CLOUD` of the environment, which the
    /// image Job gets from `peer-pods-cm`) and the development endpoint flags.
    #[command(flatten)]
    pub endpoints: EndpointArgs,
    /// Fastest LRO polling interval in milliseconds (tests lower it).
    #[arg(
        long,
        env = "SANDBOXD_IMAGE_MIN_POLL_MS",
        default_value_t = 1000,
        hide = true
    )]
    pub min_poll_ms: u64,
}

/// Flags of `sandboxd image publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Publish to Azure (the only target so far).
    #[arg(long)]
    pub azure: bool,
    /// The fixed VHD to upload (`sandboxd image build` writes one).
    #[arg(long)]
    pub vhd: PathBuf,
    /// Resource group of the storage account and the image (must exist).
    #[arg(long, env = "AZURE_RESOURCE_GROUP")]
    pub resource_group: String,
    /// Region of the storage account and the image.
    #[arg(long, env = "AZURE_REGION")]
    pub region: String,
    /// Storage account to upload to: reused when it exists, created otherwise. Default: a
    /// name derived from the subscription and resource group.
    #[arg(long)]
    pub storage_account: Option<String>,
    /// Blob container.
    #[arg(long, default_value = "vhds")]
    pub container: String,
    /// Name of the managed image (and of the blob). Default: `sandboxd-podvm-<content hash>`.
    #[arg(long)]
    pub image_name: Option<String>,
    /// Azure Compute Gallery to publish to (created when missing) instead of a managed image.
    #[arg(long, requires = "gallery_image_definition")]
    pub gallery: Option<String>,
    /// Image definition in the gallery (created when missing).
    #[arg(long, requires = "gallery")]
    pub gallery_image_definition: Option<String>,
    /// Image version (`MAJOR.MINOR.PATCH`). Default: `0.0.<unix seconds>`.
    #[arg(long, requires = "gallery")]
    pub gallery_image_version: Option<String>,
    /// Make the gallery image definition Confidential-VM capable
    /// (`SecurityType=ConfidentialVMSupported`). Needs `--gallery`.
    #[arg(long)]
    pub confidential: bool,
    /// Write `AZURE_IMAGE_ID` into `peer-pods-cm` (server-side apply).
    #[arg(long)]
    pub update_configmap: bool,
    /// Namespace of `peer-pods-cm`.
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Parallel Put Page requests.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Azure endpoints.
    #[command(flatten)]
    pub azure_args: AzureArgs,
    /// Kubernetes client flags (for `--update-configmap`).
    #[command(flatten)]
    pub kube: crate::k8s::KubeArgs,
}

/// Flags of `sandboxd image delete`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeleteArgs {
    /// The image to delete: a managed image or a gallery image version id.
    #[arg(long)]
    pub image_id: String,
    /// Azure endpoints.
    #[command(flatten)]
    pub azure_args: AzureArgs,
}

/// Flags of `sandboxd image job`, mostly from the environment (`envFrom` `peer-pods-cm` and
/// `peer-pods-secret`).
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    /// A prebuilt VHD to publish; without it the Job builds one from the inputs below.
    #[arg(long, env = "PODVM_VHD")]
    pub vhd: Option<PathBuf>,
    /// Kernel to build the image from (see `sandboxd image build --kernel`).
    #[arg(long, env = "PODVM_KERNEL")]
    pub kernel: Option<PathBuf>,
    /// The kernel's module tree (see `sandboxd image build --modules-dir`).
    #[arg(long, env = "PODVM_MODULES_DIR")]
    pub modules_dir: Option<PathBuf>,
    /// systemd-boot's EFI binary (see `sandboxd image build --systemd-boot`).
    #[arg(long, env = "PODVM_SYSTEMD_BOOT")]
    pub systemd_boot: Option<PathBuf>,
    /// kata-agent to put in the image.
    #[arg(long, env = "PODVM_KATA_AGENT")]
    pub kata_agent: Option<PathBuf>,
    /// Where the OCI image carries the build inputs (`sandboxd image stage-inputs`); used for
    /// each of `--kernel`, `--modules-dir` and `--systemd-boot` not given.
    #[arg(long, env = "PODVM_INPUTS_DIR", default_value = crate::image::build::inputs::DEFAULT_DIR)]
    pub inputs_dir: PathBuf,
    /// Publish even when `AZURE_IMAGE_ID` is already set.
    #[arg(long)]
    pub force: bool,
    /// Gallery of the image.
    #[arg(long, env = "IMAGE_GALLERY_NAME", default_value = "PodVMGallery")]
    pub gallery: String,
    /// Image definition.
    #[arg(long, env = "IMAGE_DEFINITION_NAME", default_value = "podvm-image")]
    pub gallery_image_definition: String,
    /// `MAJOR.MINOR` of the version; the patch is the Unix time.
    #[arg(long, env = "IMAGE_VERSION_MAJ_MIN", default_value = "0.0")]
    pub version_major_minor: String,
    /// Storage account (default: derived, as for `publish`).
    #[arg(long, env = "IMAGE_STORAGE_ACCOUNT")]
    pub storage_account: Option<String>,
    /// Namespace of `peer-pods-cm`.
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub namespace: String,
    /// Azure endpoints.
    #[command(flatten)]
    pub azure_args: AzureArgs,
    /// Kubernetes client flags.
    #[command(flatten)]
    pub kube: crate::k8s::KubeArgs,
}

/// Publish an image.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let id = publish(&args).await?;
    println!("{id}");
    Ok(())
}

/// Delete a published image.
pub async fn run_delete(args: DeleteArgs) -> anyhow::Result<()> {
    for line in delete(&args).await? {
        println!("{line}");
    }
    Ok(())
}

/// Build and publish as the in-cluster Job.
pub async fn run_job(args: JobArgs) -> anyhow::Result<()> {
    if let Some(id) = job(&args).await? {
        println!("{id}");
    }
    Ok(())
}

fn sha_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn valid_storage_account(n: &str) -> bool {
    (3..=24).contains(&n.len())
        && n.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
}

fn valid_version(v: &str) -> bool {
    let parts: Vec<&str> = v.split('.').collect();
    parts.len() == 3 && parts.iter().all(|p| p.parse::<i32>().is_ok_and(|n| n >= 0))
}

fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 80
        && n.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// The checks on `publish` flags that need no cloud.
pub fn check_args(args: &Args) -> Result<(), Error> {
    let mut problems = Vec::new();
    if !args.azure {
        problems.push("pass --azure (Azure is the only publish target)".to_string());
    }
    if args.region.trim().is_empty() {
        problems
            .push("--region (AZURE_REGION) is empty; give an Azure region such as eastus".into());
    }
    if args.resource_group.trim().is_empty() {
        problems.push("--resource-group (AZURE_RESOURCE_GROUP) is empty".into());
    }
    if let Some(sa) = &args.storage_account
        && !valid_storage_account(sa)
    {
        problems.push(format!(
            "--storage-account {sa:?}: 3-24 lower-case letters and digits"
        ));
    }
    if !args
        .container
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        || !(3..=63).contains(&args.container.len())
    {
        problems.push(format!(
            "--container {:?}: 3-63 lower-case letters, digits and '-'",
            args.container
        ));
    }
    for (flag, v) in [
        ("--image-name", &args.image_name),
        ("--gallery", &args.gallery),
        ("--gallery-image-definition", &args.gallery_image_definition),
    ] {
        if let Some(v) = v
            && !valid_name(v)
        {
            problems.push(format!(
                "{flag} {v:?}: letters, digits, '-', '_' and '.', at most 80"
            ));
        }
    }
    if let Some(v) = &args.gallery_image_version
        && !valid_version(v)
    {
        problems.push(format!(
            "--gallery-image-version {v:?}: MAJOR.MINOR.PATCH with non-negative 32-bit integers"
        ));
    }
    if args.confidential && args.gallery.is_none() {
        problems.push(
            "--confidential needs --gallery: Confidential VMs boot from gallery images, not managed images"
                .into(),
        );
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Error::Input(problems.join("; ")))
    }
}

/// The endpoints: `--azure-cloud`, else `AZURE_CLOUD` of the environment (the image Job gets
/// `peer-pods-cm` through `envFrom`), else the public cloud; only the development flags
/// move them. An endpoint key in the environment is refused, never followed.
fn endpoints(azure: &AzureArgs) -> Result<Endpoints, Error> {
    use crate::cloud::azure::cloud::{CLOUD_KEY, REFUSED_ENDPOINT_KEYS};
    for key in REFUSED_ENDPOINT_KEYS {
        if std::env::var(key).is_ok_and(|v| !v.trim().is_empty()) {
            return Err(Error::Input(format!(
                "{key} is not read: endpoints follow {CLOUD_KEY}; another endpoint is only \
                 the development flag --dev-arm-endpoint"
            )));
        }
    }
    let configured = match std::env::var(CLOUD_KEY) {
        Ok(v) if !v.trim().is_empty() => Some(
            v.parse::<crate::cloud::azure::AzureCloud>()
                .map_err(|e| Error::Input(format!("{CLOUD_KEY}: {e}")))?,
        ),
        _ => None,
    };
    Ok(azure.endpoints.resolve(configured))
}

fn arm_client(azure: &AzureArgs, secret: &CloudSecret) -> Result<Arm, Error> {
    Ok(Arm::new(
        &secret.credentials,
        &endpoints(azure)?,
        Manners::default(),
        Polling {
            min_interval: Duration::from_millis(azure.min_poll_ms),
            default_interval: Duration::from_secs(5).max(Duration::from_millis(azure.min_poll_ms)),
            timeout: Duration::from_secs(3600),
        },
    )?)
}

fn tags(extra: &[(&str, &str)]) -> Value {
    let mut m = serde_json::Map::new();
    m.insert(TAG_CREATED_BY.into(), CREATED_BY.into());
    for (k, v) in extra {
        m.insert((*k).into(), (*v).into());
    }
    Value::Object(m)
}

fn created_by_us(v: &Value) -> bool {
    v["tags"][TAG_CREATED_BY].as_str() == Some(CREATED_BY)
}

/// A storage account ready for upload: its id, blob endpoint and a signer.
struct Storage {
    id: String,
    client: BlobClient,
}

async fn storage(
    arm: &Arm,
    sub: &str,
    rg: &str,
    region: &str,
    name: &str,
) -> Result<Storage, Error> {
    let path = format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Storage/storageAccounts/{name}?api-version={STORAGE_API}"
    );
    let account = match arm.get(&path).await? {
        Some(a) => {
            tracing::info!(account = name, "reusing the storage account");
            a
        }
        None => {
            eprintln!("creating storage account {name} in {region}");
            let body = json!({
                "location": region,
                "sku": {"name": "Standard_LRS"},
                "kind": "StorageV2",
                "tags": tags(&[]),
                "properties": {
                    "minimumTlsVersion": "TLS1_2",
                    "allowBlobPublicAccess": false,
                    "allowSharedKeyAccess": true,
                    "supportsHttpsTrafficOnly": true
                }
            });
            arm.put(&format!("storage account {name}"), &path, &body)
                .await
                .map_err(|e| match e.status() {
                    Some(409) => Error::Refused(format!(
                        "storage account name {name} is taken (names are global); pass another --storage-account: {e}"
                    )),
                    _ => Error::Arm(e),
                })?
        }
    };
    let id = account["id"].as_str().unwrap_or_default().to_string();
    let endpoint = account["properties"]["primaryEndpoints"]["blob"]
        .as_str()
        .ok_or_else(|| {
            Error::Arm(ArmError::Other(format!(
                "storage account {name} has no blob endpoint (properties.primaryEndpoints.blob)"
            )))
        })?;
    let endpoint = url::Url::parse(endpoint)
        .map_err(|e| Error::Arm(ArmError::Other(format!("blob endpoint {endpoint}: {e}"))))?;
    let keys = arm
        .post(&format!(
            "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Storage/storageAccounts/{name}/listKeys?api-version={STORAGE_API}"
        ))
        .await?;
    let key = keys["keys"][0]["value"].as_str().ok_or_else(|| {
        Error::Arm(ArmError::Other(format!(
            "listKeys of {name} returned no key"
        )))
    })?;
    let signer = sharedkey::SharedKey::new(name, key)
        .map_err(|e| Error::Arm(ArmError::Other(e.to_string())))?;
    Ok(Storage {
        id,
        client: BlobClient::new(endpoint, signer),
    })
}

/// `publish`: returns the image id.
pub async fn publish(args: &Args) -> Result<String, Error> {
    check_args(args)?;
    let secret = CloudSecret::from_map(&crate::config::env_map())?;
    let vhd_path = args.vhd.clone();
    let plan = tokio::task::spawn_blocking(move || vhd::scan(&vhd_path))
        .await
        .map_err(|e| Error::Input(format!("scanning the VHD: {e}")))??;
    eprintln!(
        "{}: {:.1} MiB, {:.1} MiB of it non-zero in {} ranges",
        args.vhd.display(),
        upload::mib(plan.size),
        upload::mib(plan.data_bytes()),
        plan.ranges.len()
    );
    let sub = secret.subscription_id.clone();
    let rg = args.resource_group.trim();
    let region = args.region.trim();
    let arm = arm_client(&args.azure_args, &secret)?;
    if arm
        .get(&format!(
            "/subscriptions/{sub}/resourceGroups/{rg}?api-version={RESOURCES_API}"
        ))
        .await?
        .is_none()
    {
        return Err(Error::Input(format!(
            "resource group {rg} does not exist in subscription {sub}"
        )));
    }
    let account = args
        .storage_account
        .clone()
        .unwrap_or_else(|| format!("sbxd{}", &sha_hex(&format!("{sub}/{rg}"))[..16]));
    let storage = storage(&arm, &sub, rg, region, &account).await?;
    let image_name = args
        .image_name
        .clone()
        .unwrap_or_else(|| format!("sandboxd-podvm-{}", &plan.sha256[..12]));
    let blob_name = format!("{image_name}.vhd");
    storage.client.create_container(&args.container).await?;
    let started = std::time::Instant::now();
    let report = upload::upload(
        &storage.client,
        &args.container,
        &blob_name,
        &args.vhd,
        &plan,
        args.concurrency,
    )
    .await?;
    let secs = started.elapsed().as_secs_f64().max(0.001);
    eprintln!(
        "upload done: sent {} bytes in {} ranges ({:.1} MiB/s), {} bytes were already there{}, {} zero bytes skipped",
        report.sent_bytes,
        report.sent_ranges,
        upload::mib(report.sent_bytes) / secs,
        report.present_bytes,
        if report.resumed { " (resumed)" } else { "" },
        report.skipped_zero_bytes
    );
    let blob_url = storage.client.blob_url(&args.container, &blob_name);
    let id = match (&args.gallery, &args.gallery_image_definition) {
        (Some(g), Some(d)) => {
            let version = args
                .gallery_image_version
                .clone()
                .unwrap_or_else(|| format!("0.0.{}", unix_secs()));
            gallery_version(
                &arm,
                &sub,
                rg,
                region,
                g,
                d,
                &version,
                args.confidential,
                &storage.id,
                blob_url.as_str(),
            )
            .await?
        }
        _ => {
            managed_image(
                &arm,
                &sub,
                rg,
                region,
                &image_name,
                &storage.id,
                blob_url.as_str(),
            )
            .await?
        }
    };
    eprintln!("image {id}");
    if args.update_configmap {
        update_configmap(&args.kube, &args.namespace, &id).await?;
        eprintln!(
            "{} AZURE_IMAGE_ID set in namespace {}",
            crate::config::CONFIG_MAP_NAME,
            args.namespace
        );
    }
    Ok(id)
}

fn unix_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

async fn managed_image(
    arm: &Arm,
    sub: &str,
    rg: &str,
    region: &str,
    name: &str,
    storage_id: &str,
    blob_url: &str,
) -> Result<String, Error> {
    let path = format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/images/{name}?api-version={COMPUTE_API}"
    );
    if let Some(existing) = arm.get(&path).await? {
        let same = existing["properties"]["storageProfile"]["osDisk"]["blobUri"].as_str()
            == Some(blob_url);
        if created_by_us(&existing) && same {
            return Ok(existing["id"].as_str().unwrap_or_default().to_string());
        }
        return Err(Error::Refused(format!(
            "managed image {name} already exists and was not made from this VHD; pass another --image-name"
        )));
    }
    let body = json!({
        "location": region,
        "tags": tags(&[(TAG_STORAGE_ACCOUNT, storage_id)]),
        "properties": {
            "hyperVGeneration": "V2",
            "storageProfile": {
                "osDisk": {
                    "osType": "Linux",
                    "osState": "Generalized",
                    "blobUri": blob_url,
                    "caching": "ReadWrite",
                    "storageAccountType": "Standard_LRS"
                }
            }
        }
    });
    let v = arm
        .put(&format!("managed image {name}"), &path, &body)
        .await?;
    Ok(v["id"].as_str().unwrap_or_default().to_string())
}

#[allow(clippy::too_many_arguments)]
async fn gallery_version(
    arm: &Arm,
    sub: &str,
    rg: &str,
    region: &str,
    gallery: &str,
    definition: &str,
    version: &str,
    confidential: bool,
    storage_id: &str,
    blob_url: &str,
) -> Result<String, Error> {
    let g_path = format!(
        "/subscriptions/{sub}/resourceGroups/{rg}/providers/Microsoft.Compute/galleries/{gallery}"
    );
    let q = format!("?api-version={GALLERY_API}");
    if arm.get(&format!("{g_path}{q}")).await?.is_none() {
        eprintln!("creating gallery {gallery}");
        let body = json!({
            "location": region,
            "tags": tags(&[]),
            "properties": {"description": "Pod VM images published by sandboxd"}
        });
        arm.put(
            &format!("gallery {gallery}"),
            &format!("{g_path}{q}"),
            &body,
        )
        .await?;
    }
    let d_path = format!("{g_path}/images/{definition}");
    match arm.get(&format!("{d_path}{q}")).await? {
        Some(d) => {
            let features = d["properties"]["features"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let cvm = features.iter().any(|f| {
                f["name"].as_str() == Some("SecurityType")
                    && f["value"]
                        .as_str()
                        .is_some_and(|v| v.to_ascii_lowercase().contains("confidentialvm"))
            });
            if confidential && !cvm {
                return Err(Error::Refused(format!(
                    "gallery image definition {definition} exists without SecurityType ConfidentialVMSupported (features cannot change); pass another --gallery-image-definition"
                )));
            }
            if d["properties"]["hyperVGeneration"].as_str() != Some("V2") {
                return Err(Error::Refused(format!(
                    "gallery image definition {definition} is not Generation 2 (hyperVGeneration V2); the pod VM image boots with UEFI only"
                )));
            }
        }
        None => {
            eprintln!("creating gallery image definition {definition}");
            let mut props = json!({
                "osType": "Linux",
                "osState": "Generalized",
                "hyperVGeneration": "V2",
                "architecture": "x64",
                "identifier": {"publisher": "sandboxd", "offer": "podvm", "sku": definition}
            });
            if confidential {
                props["features"] =
                    json!([{"name": "SecurityType", "value": "ConfidentialVMSupported"}]);
            }
            let body = json!({"location": region, "tags": tags(&[]), "properties": props});
            arm.put(
                &format!("gallery image definition {definition}"),
                &format!("{d_path}{q}"),
                &body,
            )
            .await?;
        }
    }
    let v_path = format!("{d_path}/versions/{version}{q}");
    if let Some(existing) = arm.get(&v_path).await? {
        let same = existing["properties"]["storageProfile"]["osDiskImage"]["source"]["uri"]
            .as_str()
            == Some(blob_url);
        if created_by_us(&existing) && same {
            return Ok(existing["id"].as_str().unwrap_or_default().to_string());
        }
        return Err(Error::Refused(format!(
            "gallery image version {version} of {definition} already exists and was not made from this VHD; pass another --gallery-image-version"
        )));
    }
    eprintln!("creating gallery image version {definition}/{version} (replicating takes a while)");
    let body = json!({
        "location": region,
        "tags": tags(&[(TAG_STORAGE_ACCOUNT, storage_id)]),
        "properties": {
            "publishingProfile": {
                "targetRegions": [{"name": region, "regionalReplicaCount": 1, "storageAccountType": "Standard_LRS"}],
                "excludeFromLatest": false
            },
            "storageProfile": {
                "osDiskImage": {
                    "hostCaching": "ReadOnly",
                    "source": {"storageAccountId": storage_id, "uri": blob_url}
                }
            }
        }
    });
    let v = arm
        .put(&format!("gallery image version {version}"), &v_path, &body)
        .await?;
    Ok(v["id"].as_str().unwrap_or_default().to_string())
}

/// The kinds of image id `delete` understands.
#[derive(Debug, PartialEq, Eq)]
enum ImageKind {
    Managed,
    GalleryVersion {
        definition_path: String,
        gallery_path: String,
    },
}

fn image_kind(id: &str) -> Option<ImageKind> {
    let segs: Vec<&str> = id.trim_matches('/').split('/').collect();
    let l: Vec<String> = segs.iter().map(|s| s.to_ascii_lowercase()).collect();
    let l: Vec<&str> = l.iter().map(String::as_str).collect();
    match l.as_slice() {
        [
            "subscriptions",
            _,
            "resourcegroups",
            _,
            "providers",
            "microsoft.compute",
            "images",
            _,
        ] => Some(ImageKind::Managed),
        [
            "subscriptions",
            _,
            "resourcegroups",
            _,
            "providers",
            "microsoft.compute",
            "galleries",
            _,
            "images",
            _,
            "versions",
            _,
        ] => Some(ImageKind::GalleryVersion {
            definition_path: format!("/{}", segs[..10].join("/")),
            gallery_path: format!("/{}", segs[..8].join("/")),
        }),
        _ => None,
    }
}

/// `delete`: what it did, one line per resource.
pub async fn delete(args: &DeleteArgs) -> Result<Vec<String>, Error> {
    let id = args.image_id.trim().trim_end_matches('/').to_string();
    let kind = image_kind(&id).ok_or_else(|| {
        Error::Input(format!(
            "--image-id {id:?} is neither a managed image id (.../providers/Microsoft.Compute/images/<name>) nor a gallery image version id (.../galleries/<g>/images/<d>/versions/<v>)"
        ))
    })?;
    let secret = CloudSecret::from_map(&crate::config::env_map())?;
    let arm = arm_client(&args.azure_args, &secret)?;
    let api = match kind {
        ImageKind::Managed => COMPUTE_API,
        ImageKind::GalleryVersion { .. } => GALLERY_API,
    };
    let path = format!("{id}?api-version={api}");
    let Some(image) = arm.get(&path).await? else {
        return Ok(vec![format!("{id} does not exist; nothing to delete")]);
    };
    if !created_by_us(&image) {
        return Err(Error::Refused(format!(
            "{id} was not created by sandboxd (it has no tag {TAG_CREATED_BY}={CREATED_BY}); refusing to delete it"
        )));
    }
    let blob_uri = match kind {
        ImageKind::Managed => image["properties"]["storageProfile"]["osDisk"]["blobUri"].as_str(),
        ImageKind::GalleryVersion { .. } => {
            image["properties"]["storageProfile"]["osDiskImage"]["source"]["uri"].as_str()
        }
    }
    .map(str::to_string);
    let storage_id = image["tags"][TAG_STORAGE_ACCOUNT]
        .as_str()
        .map(str::to_string);
    let mut done = Vec::new();
    arm.delete(&format!("image {id}"), &path).await?;
    done.push(format!("deleted {id}"));
    if let (Some(uri), Some(sa)) = (blob_uri, storage_id) {
        done.extend(delete_blob(&arm, &sa, &uri).await?);
    }
    if let ImageKind::GalleryVersion {
        definition_path,
        gallery_path,
    } = kind
    {
        let q = format!("?api-version={GALLERY_API}");
        for (parent, children) in [
            (
                definition_path.clone(),
                format!("{definition_path}/versions"),
            ),
            (gallery_path.clone(), format!("{gallery_path}/images")),
        ] {
            let Some(p) = arm.get(&format!("{parent}{q}")).await? else {
                continue;
            };
            if !created_by_us(&p) {
                break;
            }
            let left = arm
                .get(&format!("{children}{q}"))
                .await?
                .and_then(|v| v["value"].as_array().map(Vec::len))
                .unwrap_or(0);
            if left > 0 {
                break;
            }
            arm.delete(&parent, &format!("{parent}{q}")).await?;
            done.push(format!("deleted {parent}"));
        }
    }
    Ok(done)
}

async fn delete_blob(arm: &Arm, storage_id: &str, uri: &str) -> Result<Vec<String>, Error> {
    let q = format!("?api-version={STORAGE_API}");
    let Some(account) = arm.get(&format!("{storage_id}{q}")).await? else {
        return Ok(vec![format!(
            "storage account {storage_id} is gone; no blob to delete"
        )]);
    };
    let name = account["name"].as_str().unwrap_or_default().to_string();
    let keys = arm.post(&format!("{storage_id}/listKeys{q}")).await?;
    let key = keys["keys"][0]["value"].as_str().unwrap_or_default();
    let signer = sharedkey::SharedKey::new(&name, key)
        .map_err(|e| Error::Arm(ArmError::Other(e.to_string())))?;
    let url = url::Url::parse(uri).map_err(|e| Error::Input(format!("blob URI {uri}: {e}")))?;
    let Some((endpoint, container, blob)) = blob::split_blob_url(&url, &name) else {
        return Ok(vec![format!("{uri} is not a blob URL; left alone")]);
    };
    let client = BlobClient::new(endpoint, signer);
    match client.properties(&container, &blob).await? {
        None => Ok(vec![format!("blob {uri} is already gone")]),
        Some(p)
            if p.metadata.get(upload::META_CREATED_BY).map(String::as_str) != Some("sandboxd") =>
        {
            Ok(vec![format!(
                "blob {uri} was not written by sandboxd; left alone"
            )])
        }
        Some(_) => {
            client.delete(&container, &blob).await?;
            Ok(vec![format!("deleted blob {uri}")])
        }
    }
}

/// Writes `AZURE_IMAGE_ID` (and the annotation that sandboxd built it) into `peer-pods-cm`
/// with server-side apply under the field manager `sandboxd`. The ConfigMap must exist.
pub async fn update_configmap(
    kube: &crate::k8s::KubeArgs,
    namespace: &str,
    image_id: &str,
) -> Result<(), Error> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{Api, Patch, PatchParams};
    let client = kube
        .client()
        .await
        .map_err(|e| Error::Kube(e.to_string()))?;
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let name = crate::config::CONFIG_MAP_NAME;
    if api
        .get_opt(name)
        .await
        .map_err(|e| Error::Kube(format!("reading {namespace}/{name}: {e}")))?
        .is_none()
    {
        return Err(Error::Kube(format!(
            "ConfigMap {namespace}/{name} does not exist; create it first (it holds the other peer-pods settings)"
        )));
    }
    let patch = json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "annotations": {ANNOTATION_BUILT_IMAGE_ID: image_id}
        },
        "data": {"AZURE_IMAGE_ID": image_id}
    });
    api.patch(
        name,
        &PatchParams::apply(crate::k8s::FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await
    .map_err(|e| {
        Error::Kube(format!(
            "applying AZURE_IMAGE_ID to {namespace}/{name}: {e}"
        ))
    })?;
    Ok(())
}

/// The image Job: publishes the prebuilt VHD into the gallery and records the id, unless
/// `AZURE_IMAGE_ID` is already set. Returns the id it published.
pub async fn job(args: &JobArgs) -> Result<Option<String>, Error> {
    let env: BTreeMap<String, String> = crate::config::env_map();
    if let Some(id) = env.get("AZURE_IMAGE_ID").filter(|v| !v.trim().is_empty())
        && !args.force
    {
        eprintln!(
            "AZURE_IMAGE_ID is already set ({id}); nothing to do (pass --force to publish anyway)"
        );
        return Ok(None);
    }
    let inputs = || {
        crate::image::build::inputs::choose(
            args.kernel.as_deref(),
            args.modules_dir.as_deref(),
            args.systemd_boot.as_deref(),
            &args.inputs_dir,
        )
    };
    let (vhd, built_dir) = match (&args.vhd, args.vhd.is_none().then(inputs).flatten()) {
        (Some(vhd), _) => (vhd.clone(), None),
        (None, Some(i)) => {
            let out = std::env::temp_dir().join(format!("sandboxd-podvm-{}", std::process::id()));
            eprintln!(
                "[job] build inputs: kernel {}, modules {}, systemd-boot {}",
                i.kernel.display(),
                i.modules_dir.display(),
                i.systemd_boot.display()
            );
            let mut build =
                crate::image::build::Args::new(&i.kernel, &i.modules_dir, &i.systemd_boot, &out);
            build.format = vec![crate::image::build::Format::Vhd];
            build.kata_agent = args.kata_agent.clone();
            eprintln!("[job] building the pod VM image");
            let built = tokio::task::spawn_blocking(move || crate::image::build::build(&build))
                .await
                .map_err(|e| Error::Input(format!("building the image: {e}")))?
                .map_err(|e| Error::Input(format!("building the image: {e}")))?;
            let vhd = built
                .outputs
                .into_iter()
                .find(|(f, _)| *f == crate::image::build::Format::Vhd)
                .map(|(_, p)| p)
                .ok_or_else(|| Error::Input("the build wrote no VHD".into()))?;
            (vhd, Some(out))
        }
        _ => {
            return Err(Error::Input(format!(
                "nothing to publish: give a prebuilt VHD with --vhd (env PODVM_VHD), or the build inputs --kernel, --modules-dir and --systemd-boot (env PODVM_KERNEL, PODVM_MODULES_DIR, PODVM_SYSTEMD_BOOT), or lay them out under {} (--inputs-dir, env PODVM_INPUTS_DIR; `sandboxd image stage-inputs`, which the OCI image built with --podvm-inputs carries)",
                args.inputs_dir.display()
            )));
        }
    };
    let mm: Vec<&str> = args.version_major_minor.split('.').collect();
    if mm.len() != 2 || mm.iter().any(|p| p.parse::<u16>().is_err()) {
        return Err(Error::Input(format!(
            "IMAGE_VERSION_MAJ_MIN {:?}: expected MAJOR.MINOR such as 0.0",
            args.version_major_minor
        )));
    }
    // DISABLECVM=false (the default) means Confidential VMs: the image must allow them.
    let confidential = !matches!(
        env.get("DISABLECVM").map(|s| s.trim()),
        Some("true" | "TRUE" | "True" | "1" | "t" | "T")
    );
    let publish_args = Args {
        azure: true,
        vhd,
        resource_group: env.get("AZURE_RESOURCE_GROUP").cloned().unwrap_or_default(),
        region: env.get("AZURE_REGION").cloned().unwrap_or_default(),
        storage_account: args.storage_account.clone(),
        container: "vhds".into(),
        image_name: None,
        gallery: Some(args.gallery.clone()),
        gallery_image_definition: Some(args.gallery_image_definition.clone()),
        gallery_image_version: Some(format!("{}.{}", args.version_major_minor, unix_secs())),
        confidential,
        update_configmap: true,
        namespace: args.namespace.clone(),
        concurrency: 8,
        azure_args: args.azure_args.clone(),
        kube: args.kube.clone(),
    };
    let result = publish(&publish_args).await.map(Some);
    if let Some(dir) = built_dir {
        let _ = std::fs::remove_dir_all(dir);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> Args {
        Args {
            azure: true,
            vhd: "x.vhd".into(),
            resource_group: "rg".into(),
            region: "eastus".into(),
            storage_account: None,
            container: "vhds".into(),
            image_name: None,
            gallery: None,
            gallery_image_definition: None,
            gallery_image_version: None,
            confidential: false,
            update_configmap: false,
            namespace: DEFAULT_NAMESPACE.into(),
            concurrency: 8,
            azure_args: AzureArgs {
                endpoints: Default::default(),
                min_poll_ms: 1000,
            },
            kube: Default::default(),
        }
    }

    #[test]
    fn flag_problems_are_all_reported_together() {
        assert!(check_args(&args()).is_ok());
        let mut a = args();
        a.region = "  ".into();
        a.storage_account = Some("Bad_Name".into());
        a.confidential = true;
        a.gallery_image_version = Some("1.0".into());
        let e = check_args(&a).unwrap_err().to_string();
        for want in [
            "--region",
            "--storage-account",
            "--confidential needs --gallery",
            "MAJOR.MINOR.PATCH",
        ] {
            assert!(e.contains(want), "{want} missing in {e}");
        }
    }

    #[test]
    fn image_ids_are_classified_case_insensitively() {
        assert_eq!(
            image_kind("/subscriptions/s/resourceGroups/rg/providers/Microsoft.Compute/images/i"),
            Some(ImageKind::Managed)
        );
        assert_eq!(
            image_kind("/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/galleries/g/images/d/versions/1.0.0"),
            Some(ImageKind::GalleryVersion {
                definition_path: "/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/galleries/g/images/d".into(),
                gallery_path: "/subscriptions/s/resourcegroups/rg/providers/microsoft.compute/galleries/g".into(),
            })
        );
        assert_eq!(image_kind("/subscriptions/s/resourceGroups/rg"), None);
    }

    #[test]
    fn tag_names_are_ones_arm_accepts() {
        for t in [TAG_CREATED_BY, TAG_STORAGE_ACCOUNT] {
            assert!(!t.chars().any(|c| "<>%&\\?/".contains(c)), "{t}");
        }
    }
}
