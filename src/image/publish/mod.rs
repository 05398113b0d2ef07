//! `sandboxd image publish|delete|job`: the pod VM image in Azure.
//!
//! `publish` uploads a fixed VHD as a page blob ([`storage`]: the account created or reused
//! through ARM, key from `listKeys`; [`upload`]: Shared Key signed requests, non-zero
//! [`pages`] only, in parallel, resumable) and makes a managed image or an Azure Compute
//! Gallery image version from it ([`gallery`]), then prints the image id. Everything it
//! creates carries the tag [`TAG_CREATED_BY`]; `delete` removes an image, and its blob, only
//! when it carries it. `--update-configmap` writes `AZURE_IMAGE_ID` into `peer-pods-cm` and
//! records that sandboxd built it ([`job::update_configmap`]); [`job`] is the in-cluster
//! image Job.

pub mod blob;
pub(crate) mod gallery;
pub(crate) mod job;
pub(crate) mod pages;
pub mod sharedkey;
pub(crate) mod storage;
pub(crate) mod upload;

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::api::names::DEFAULT_NAMESPACE;
use crate::cloud::azure::{Arm, ArmError, EndpointArgs, Endpoints, Manners, Polling};
use crate::config::CloudSecret;

use gallery::ImageKind;

/// Tag on every ARM resource `publish` creates; `delete` only touches resources with it.
pub const TAG_CREATED_BY: &str = "sandboxd-created-by";
/// Value of [`TAG_CREATED_BY`].
pub(crate) const CREATED_BY: &str = "sandboxd";
/// Tag on images: the id of the storage account holding their source blob.
pub(crate) const TAG_STORAGE_ACCOUNT: &str = "sandboxd-storage-account";

/// `Microsoft.Storage` api-version.
pub(crate) const STORAGE_API: &str = "2023-05-01";
/// `Microsoft.Compute/images` api-version.
pub(crate) const COMPUTE_API: &str = "2024-07-01";
/// `Microsoft.Compute/galleries` api-version.
pub(crate) const GALLERY_API: &str = "2024-03-03";
/// Resource groups api-version.
pub(crate) const RESOURCES_API: &str = "2021-04-01";

/// Errors of the image tools.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// A flag or the environment is wrong.
    #[error("{0}")]
    Input(String),
    /// `peer-pods-secret` keys (from the environment) are missing or invalid.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// The VHD is not usable.
    #[error(transparent)]
    Vhd(#[from] pages::VhdError),
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

/// How to reach Azure; shared by every image tool.
#[derive(Debug, Clone, clap::Args)]
pub(crate) struct AzureArgs {
    /// The Azure cloud (`--azure-cloud`, else `AZURE_CLOUD` of the environment, which the
    /// image Job gets from `peer-pods-cm`) and the development endpoint flags.
    #[command(flatten)]
    pub(crate) endpoints: EndpointArgs,
    /// Fastest LRO polling interval in milliseconds (tests lower it).
    #[arg(
        long,
        env = "SANDBOXD_IMAGE_MIN_POLL_MS",
        default_value_t = 1000,
        hide = true
    )]
    pub(crate) min_poll_ms: u64,
}

/// Flags of `sandboxd image publish`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Publish to Azure (the only target so far).
    #[arg(long)]
    pub(crate) azure: bool,
    /// The fixed VHD to upload (`sandboxd image build` writes one).
    #[arg(long)]
    pub(crate) vhd: PathBuf,
    /// Resource group of the storage account and the image (must exist).
    #[arg(long, env = "AZURE_RESOURCE_GROUP")]
    pub(crate) resource_group: String,
    /// Region of the storage account and the image.
    #[arg(long, env = "AZURE_REGION")]
    pub(crate) region: String,
    /// Storage account to upload to: reused when it exists, created otherwise. Default: a
    /// name derived from the subscription and resource group.
    #[arg(long)]
    pub(crate) storage_account: Option<String>,
    /// Blob container.
    #[arg(long, default_value = "vhds")]
    pub(crate) container: String,
    /// Name of the managed image (and of the blob). Default: `sandboxd-podvm-<content hash>`.
    #[arg(long)]
    pub(crate) image_name: Option<String>,
    /// Azure Compute Gallery to publish to (created when missing) instead of a managed image.
    #[arg(long, requires = "gallery_image_definition")]
    pub(crate) gallery: Option<String>,
    /// Image definition in the gallery (created when missing).
    #[arg(long, requires = "gallery")]
    pub(crate) gallery_image_definition: Option<String>,
    /// Image version (`MAJOR.MINOR.PATCH`). Default: `0.0.<unix seconds>`.
    #[arg(long, requires = "gallery")]
    pub(crate) gallery_image_version: Option<String>,
    /// Make the gallery image definition Confidential-VM capable
    /// (`SecurityType=ConfidentialVMSupported`). Needs `--gallery`.
    #[arg(long)]
    pub(crate) confidential: bool,
    /// Write `AZURE_IMAGE_ID` into `peer-pods-cm` (server-side apply).
    #[arg(long)]
    pub(crate) update_configmap: bool,
    /// Namespace of `peer-pods-cm`.
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub(crate) namespace: String,
    /// Parallel Put Page requests.
    #[arg(long, default_value_t = 8)]
    pub(crate) concurrency: usize,
    /// Azure endpoints.
    #[command(flatten)]
    pub(crate) azure_args: AzureArgs,
    /// Kubernetes client flags (for `--update-configmap`).
    #[command(flatten)]
    pub(crate) kube: crate::k8s::KubeArgs,
}

/// Flags of `sandboxd image delete`.
#[derive(Debug, Clone, clap::Args)]
pub struct DeleteArgs {
    /// The image to delete: a managed image or a gallery image version id.
    #[arg(long)]
    pub(crate) image_id: String,
    /// Azure endpoints.
    #[command(flatten)]
    pub(crate) azure_args: AzureArgs,
}

/// Flags of `sandboxd image job`, mostly from the environment (`envFrom` `peer-pods-cm` and
/// `peer-pods-secret`).
#[derive(Debug, Clone, clap::Args)]
pub struct JobArgs {
    /// A prebuilt VHD to publish; without it the Job builds one from the inputs below.
    #[arg(long, env = "PODVM_VHD")]
    pub(crate) vhd: Option<PathBuf>,
    /// Kernel to build the image from (see `sandboxd image build --kernel`).
    #[arg(long, env = "PODVM_KERNEL")]
    pub(crate) kernel: Option<PathBuf>,
    /// The kernel's module tree (see `sandboxd image build --modules-dir`).
    #[arg(long, env = "PODVM_MODULES_DIR")]
    pub(crate) modules_dir: Option<PathBuf>,
    /// systemd-boot's EFI binary (see `sandboxd image build --systemd-boot`).
    #[arg(long, env = "PODVM_SYSTEMD_BOOT")]
    pub(crate) systemd_boot: Option<PathBuf>,
    /// kata-agent to put in the image.
    #[arg(long, env = "PODVM_KATA_AGENT")]
    pub(crate) kata_agent: Option<PathBuf>,
    /// Where the OCI image carries the build inputs (`sandboxd image stage-inputs`); used for
    /// each of `--kernel`, `--modules-dir` and `--systemd-boot` not given.
    #[arg(long, env = "PODVM_INPUTS_DIR", default_value = crate::image::build::inputs::DEFAULT_DIR)]
    pub(crate) inputs_dir: PathBuf,
    /// Publish even when `AZURE_IMAGE_ID` is already set.
    #[arg(long)]
    pub(crate) force: bool,
    /// Gallery of the image.
    #[arg(long, env = "IMAGE_GALLERY_NAME", default_value = "PodVMGallery")]
    pub(crate) gallery: String,
    /// Image definition.
    #[arg(long, env = "IMAGE_DEFINITION_NAME", default_value = "podvm-image")]
    pub(crate) gallery_image_definition: String,
    /// `MAJOR.MINOR` of the version; the patch is the Unix time.
    #[arg(long, env = "IMAGE_VERSION_MAJ_MIN", default_value = "0.0")]
    pub(crate) version_major_minor: String,
    /// Storage account (default: derived, as for `publish`).
    #[arg(long, env = "IMAGE_STORAGE_ACCOUNT")]
    pub(crate) storage_account: Option<String>,
    /// Namespace of `peer-pods-cm`.
    #[arg(long, env = "POD_NAMESPACE", default_value = DEFAULT_NAMESPACE)]
    pub(crate) namespace: String,
    /// Azure endpoints.
    #[command(flatten)]
    pub(crate) azure_args: AzureArgs,
    /// Kubernetes client flags.
    #[command(flatten)]
    pub(crate) kube: crate::k8s::KubeArgs,
}

/// Publish an image.
pub(crate) async fn run(args: Args) -> anyhow::Result<()> {
    let id = publish(&args).await?;
    println!("{id}");
    Ok(())
}

/// Delete a published image.
pub(crate) async fn run_delete(args: DeleteArgs) -> anyhow::Result<()> {
    for line in delete(&args).await? {
        println!("{line}");
    }
    Ok(())
}

/// Build and publish as the in-cluster Job.
pub(crate) async fn run_job(args: JobArgs) -> anyhow::Result<()> {
    if let Some(id) = job::job(&args).await? {
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
pub(crate) fn check_args(args: &Args) -> Result<(), Error> {
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
    let arm = Arm::new(&secret.credentials, &endpoints(azure)?, Manners::default())?;
    Ok(arm.with_polling(Polling {
        min_interval: Duration::from_millis(azure.min_poll_ms),
        default_interval: Duration::from_secs(5).max(Duration::from_millis(azure.min_poll_ms)),
        timeout: Duration::from_secs(3600),
    }))
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

/// `publish`: returns the image id.
pub(crate) async fn publish(args: &Args) -> Result<String, Error> {
    check_args(args)?;
    let secret = CloudSecret::from_map(&crate::config::env_map())?;
    let vhd_path = args.vhd.clone();
    let plan = tokio::task::spawn_blocking(move || pages::scan(&vhd_path))
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
    let storage = storage::account(&arm, &sub, rg, region, &account).await?;
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
            gallery::gallery_version(
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
            gallery::managed_image(
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
        job::update_configmap(&args.kube, &args.namespace, &id).await?;
        eprintln!(
            "{} AZURE_IMAGE_ID set in namespace {}",
            crate::api::names::CONFIG_MAP,
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

/// `delete`: what it did, one line per resource.
pub(crate) async fn delete(args: &DeleteArgs) -> Result<Vec<String>, Error> {
    let id = format!("/{}", args.image_id.trim().trim_matches('/'));
    let kind = gallery::image_kind(&id).ok_or_else(|| {
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
        done.extend(storage::delete_blob(&arm, &sa, &uri).await?);
    }
    if let ImageKind::GalleryVersion {
        definition_path,
        gallery_path,
    } = kind
    {
        done.extend(gallery::delete_empty_parents(&arm, &definition_path, &gallery_path).await?);
    }
    Ok(done)
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
    fn tag_names_are_ones_arm_accepts() {
        for t in [TAG_CREATED_BY, TAG_STORAGE_ACCOUNT] {
            assert!(!t.chars().any(|c| "<>%&\\?/".contains(c)), "{t}");
        }
    }
}
