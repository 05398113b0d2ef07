//! `sandboxd image job`, the in-cluster pod VM image Job: builds the image when it is given
//! the build inputs (else takes a prebuilt VHD), publishes it into the gallery and records
//! its id in `peer-pods-cm`, unless `AZURE_IMAGE_ID` is already set.

use std::collections::BTreeMap;

use serde_json::json;

use super::{Args, Error, JobArgs, publish, unix_secs};
use crate::api::names::ANNOTATION_BUILT_IMAGE_ID;

/// Writes `AZURE_IMAGE_ID` (and the annotation that sandboxd built it) into `peer-pods-cm`
/// with server-side apply under the field manager `sandboxd`. The ConfigMap must exist.
pub(crate) async fn update_configmap(
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
    let name = crate::api::names::CONFIG_MAP;
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
pub(crate) async fn job(args: &JobArgs) -> Result<Option<String>, Error> {
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
