//! Integration tests of `sandboxd image publish|delete|job`: the binary uploads to Azurite
//! (Microsoft's storage emulator, started per test, blob service only, in memory, on
//! loopback) through storage accounts the in-repo ARM test server hands out, creates images
//! through the ARM test server's LROs, and writes `peer-pods-cm` on the real control plane.

mod fixture;

use std::time::Duration;

use anyhow::{Context, Result, anyhow, ensure};
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{Api, PostParams};
use sandboxd::api::names::ANNOTATION_BUILT_IMAGE_ID;
use sandboxd::armtest::{Fault, FaultKind};
use sandboxd::image::publish::TAG_CREATED_BY;

use crate::harness::{Case, Env};
use fixture::{Fixture, Run, SUB, sparse_vhd};

pub fn cases() -> Vec<Case> {
    let skip = fixture::azurite_missing();
    vec![
        Case::plain(
            "image_publish::a_sparse_vhd_becomes_a_page_blob_of_only_its_non_zero_ranges_and_a_managed_image",
            sparse_upload_and_managed_image,
        )
        .skip_if(skip.clone()),
        Case::plain(
            "image_publish::publish_sends_its_blob_token_and_arm_calls_through_the_proxy_the_environment_names",
            through_http_proxy,
        )
        .skip_if(skip.clone()),
        Case::plain(
            "image_publish::an_upload_killed_midway_resumes_sending_only_the_missing_ranges",
            interrupted_upload_resumes,
        )
        .skip_if(skip.clone()),
        Case::plain(
            "image_publish::a_confidential_gallery_image_version_is_created_with_gallery_and_definition",
            gallery_version,
        )
        .skip_if(skip.clone()),
        Case::plain(
            "image_publish::arm_429s_and_5xx_on_every_step_are_retried_and_publish_succeeds",
            arm_faults,
        )
        .skip_if(skip.clone()),
        Case::plain(
            "image_publish::delete_removes_what_publish_created_and_refuses_a_foreign_image",
            delete_only_ours,
        )
        .skip_if(skip.clone()),
        Case::cluster(
            "image_publish::update_configmap_applies_azure_image_id_and_the_built_by_annotation",
            update_configmap,
        )
        .skip_if(skip.clone()),
        Case::cluster(
            "image_publish::the_image_job_publishes_a_prebuilt_vhd_once_and_records_it",
            image_job,
        )
        .skip_if(skip),
        Case::cluster(
            "image_publish::the_image_job_builds_from_the_inputs_the_oci_image_carries_with_nothing_else_given",
            image_job_from_carried_inputs,
        )
        .skip_if(fixture::azurite_missing().or_else(crate::image::inputs_skip)),
        Case::plain(
            "image_publish::bad_input_is_refused_with_a_clear_message_before_any_cloud_call",
            bad_input,
        ),
        Case::plain(
            "image_publish::bench_upload_throughput_to_azurite",
            bench_upload,
        )
        .skip_if(fixture::azurite_missing().or_else(|| {
            (std::env::var("SANDBOXD_BENCH_IMAGE").as_deref() != Ok("1"))
                .then(|| "benchmark: set SANDBOXD_BENCH_IMAGE=1 (make bench-image)".to_string())
        })),
    ]
}

const MIB: usize = 1 << 20;

/// Behind a corporate proxy: with `HTTP_PROXY` set (every endpoint here is plain http on
/// loopback; https ones take `HTTPS_PROXY` the same way), the page uploads, the token
/// exchange and the ARM calls all go through it, and the image is published; with
/// `NO_PROXY` naming the hosts, nothing does.
async fn through_http_proxy(_env: Env) -> Result<()> {
    let fx = Fixture::start("proxy", &["acctproxy"]).await?;
    let proxy = fixture::HttpProxy::start().await?;
    let (vhd, data) = sparse_vhd(&fx.dir, "disk.vhd", 8)?;
    let args = |name: &'static str| {
        [
            "--vhd",
            vhd.to_str().unwrap(),
            "--storage-account",
            "acctproxy",
            "--image-name",
            name,
        ]
    };
    let out = fx
        .publish_with_env(
            &args("podvm-proxied"),
            &[("HTTP_PROXY", &proxy.url), ("NO_PROXY", "")],
        )
        .await?;
    out.ok()?;
    let seen = proxy.seen();
    let blob = format!(
        "127.0.0.1:{}/acctproxy/vhds/podvm-proxied.vhd",
        fx.azurite_port
    );
    let arm = fx.arm.trim_start_matches("http://").trim_end_matches('/');
    ensure!(
        seen.iter()
            .any(|r| r.starts_with("PUT http://") && r.contains(&blob) && r.contains("comp=page")),
        "no page upload went through the proxy: {seen:?}"
    );
    ensure!(
        seen.iter().any(|r| r.starts_with("POST http://")
            && r.contains(arm)
            && r.ends_with("/oauth2/v2.0/token")),
        "the token exchange did not go through the proxy: {seen:?}"
    );
    ensure!(
        seen.iter().any(|r| r.starts_with("PUT http://")
            && r.contains(arm)
            && r.contains("/providers/Microsoft.Compute/images/podvm-proxied")),
        "the image's ARM call did not go through the proxy: {seen:?}"
    );
    // What went through arrived whole.
    let ranges = fx
        .blob_client("acctproxy")?
        .page_ranges("vhds", "podvm-proxied.vhd")
        .await?;
    ensure!(fixture::merged(ranges) == fixture::non_zero_ranges(&data));

    // NO_PROXY names the host: straight there.
    let before = proxy.seen().len();
    fx.publish_with_env(
        &args("podvm-direct"),
        &[("HTTP_PROXY", &proxy.url), ("NO_PROXY", "127.0.0.1")],
    )
    .await?
    .ok()?;
    ensure!(
        proxy.seen().len() == before,
        "NO_PROXY=127.0.0.1 still used the proxy: {:?}",
        &proxy.seen()[before..]
    );
    Ok(())
}

async fn sparse_upload_and_managed_image(_env: Env) -> Result<()> {
    let fx = Fixture::start("sparse", &["acctsparse"]).await?;
    let (vhd, data) = sparse_vhd(&fx.dir, "disk.vhd", 24)?;
    let started = std::time::Instant::now();
    let out = fx
        .publish(&[
            "--vhd",
            vhd.to_str().unwrap(),
            "--storage-account",
            "acctsparse",
            "--image-name",
            "podvm-a",
        ])
        .await?;
    let took = started.elapsed();
    out.ok()?;
    let id = out.stdout.trim();
    ensure!(
        id == format!(
            "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/images/podvm-a"
        ),
        "stdout is the image id only, got {:?}",
        out.stdout
    );
    // The page blob holds exactly the non-zero ranges and reads back as the file.
    let blob = fx.blob_client("acctsparse")?;
    let ranges = blob.page_ranges("vhds", "podvm-a.vhd").await?;
    let expected = fixture::non_zero_ranges(&data);
    ensure!(
        fixture::merged(ranges.clone()) == expected,
        "page ranges {ranges:?} != non-zero ranges {expected:?}"
    );
    let props = blob
        .properties("vhds", "podvm-a.vhd")
        .await?
        .context("blob")?;
    ensure!(props.blob_type == "PageBlob" && props.length == data.len() as u64);
    let back = blob
        .read("vhds", "podvm-a.vhd", 0..data.len() as u64)
        .await?;
    ensure!(
        back.as_ref() == data.as_slice(),
        "blob bytes differ from the file"
    );
    // The managed image exists, Generation 2, from that blob, tagged.
    let image = fx.arm_get(&format!("{id}?api-version=2024-07-01")).await?;
    ensure!(image["properties"]["provisioningState"] == "Succeeded");
    ensure!(image["properties"]["hyperVGeneration"] == "V2");
    ensure!(image["tags"][TAG_CREATED_BY] == "sandboxd");
    ensure!(
        image["properties"]["storageProfile"]["osDisk"]["blobUri"]
            .as_str()
            .is_some_and(|u| u.ends_with("/acctsparse/vhds/podvm-a.vhd")),
        "{image}"
    );
    ensure!(out.stderr.contains("upload done"), "{}", out.stderr);
    eprintln!(
        "publish of a {} MiB VHD ({} MiB non-zero) took {took:?}",
        data.len() / MIB,
        expected.iter().map(|r| r.end - r.start).sum::<u64>() / MIB as u64
    );
    // A rerun changes nothing and prints the same id.
    let again = fx
        .publish(&[
            "--vhd",
            vhd.to_str().unwrap(),
            "--storage-account",
            "acctsparse",
            "--image-name",
            "podvm-a",
        ])
        .await?;
    again.ok()?;
    ensure!(again.stdout.trim() == id);
    ensure!(
        again.summary()?.0 == 0,
        "a rerun sent bytes: {}",
        again.stderr
    );
    fx.ensure_arm_calls_granted()?;
    Ok(())
}

async fn interrupted_upload_resumes(_env: Env) -> Result<()> {
    let fx = Fixture::start_with_proxy("resume", &["acctresume"]).await?;
    let (vhd, data) = sparse_vhd(&fx.dir, "disk.vhd", 24)?;
    let non_zero: u64 = fixture::non_zero_ranges(&data)
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    let proxy = fx.proxy.clone().context("proxy")?;
    // Let about half the data through, then stall every connection and kill the upload.
    proxy.stall_after(non_zero / 2);
    let args = [
        "--vhd",
        vhd.to_str().unwrap(),
        "--storage-account",
        "acctresume",
        "--image-name",
        "podvm-r",
        "--concurrency",
        "2",
    ];
    let mut child = fx.spawn_publish(&args)?;
    crate::harness::eventually(
        "the proxy stalls the upload",
        Duration::from_secs(60),
        || {
            let stalled = proxy.stalled();
            async move { Ok(stalled.then_some(())) }
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    child.kill().await?;
    let first = fixture::collect(child).await?;
    ensure!(first.code != Some(0), "the killed upload exited 0");
    let blob = fx.blob_client("acctresume")?;
    // Writes whose bytes crossed before the stall may still land: wait until it settles.
    let mut present = u64::MAX;
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now: u64 = blob
            .page_ranges("vhds", "podvm-r.vhd")
            .await?
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        if now == present {
            break;
        }
        present = now;
    }
    ensure!(
        present > 0 && present < non_zero,
        "after the kill the blob holds {present} of {non_zero} bytes"
    );
    // Rerun through the same (now open) proxy: only what is missing crosses it.
    proxy.stall_after(u64::MAX);
    proxy.reset_count();
    let out = fx.publish(&args).await?;
    out.ok()?;
    let (sent, already, resumed) = out.summary()?;
    ensure!(resumed, "the rerun did not resume: {}", out.stderr);
    ensure!(
        already == present && sent + already == non_zero,
        "sent {sent} + already {already} != {non_zero} (present before: {present})"
    );
    let crossed = proxy.count();
    ensure!(
        crossed < non_zero - present / 2,
        "the rerun pushed {crossed} bytes through the proxy for {sent} missing"
    );
    let back = blob
        .read("vhds", "podvm-r.vhd", 0..data.len() as u64)
        .await?;
    ensure!(
        back.as_ref() == data.as_slice(),
        "blob bytes differ from the file"
    );
    ensure!(
        fixture::merged(blob.page_ranges("vhds", "podvm-r.vhd").await?)
            == fixture::non_zero_ranges(&data)
    );
    Ok(())
}

async fn gallery_version(_env: Env) -> Result<()> {
    let fx = Fixture::start("gallery", &["acctgallery"]).await?;
    let (vhd, _) = sparse_vhd(&fx.dir, "disk.vhd", 8)?;
    let out = fx
        .publish(&[
            "--vhd",
            vhd.to_str().unwrap(),
            "--storage-account",
            "acctgallery",
            "--gallery",
            "sbxgallery",
            "--gallery-image-definition",
            "podvm-cvm",
            "--gallery-image-version",
            "1.2.3",
            "--confidential",
        ])
        .await?;
    out.ok()?;
    let id = out.stdout.trim();
    let base = format!(
        "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/galleries/sbxgallery"
    );
    ensure!(
        id == format!("{base}/images/podvm-cvm/versions/1.2.3"),
        "{id}"
    );
    let def = fx
        .arm_get(&format!("{base}/images/podvm-cvm?api-version=2024-03-03"))
        .await?;
    ensure!(def["properties"]["hyperVGeneration"] == "V2", "{def}");
    ensure!(
        def["properties"]["features"].as_array().is_some_and(|f| f
            .iter()
            .any(|f| f["name"] == "SecurityType" && f["value"] == "ConfidentialVMSupported")),
        "{def}"
    );
    let ver = fx.arm_get(&format!("{id}?api-version=2024-03-03")).await?;
    ensure!(ver["properties"]["provisioningState"] == "Succeeded");
    ensure!(
        ver["properties"]["storageProfile"]["osDiskImage"]["source"]["storageAccountId"]
            .as_str()
            .is_some_and(|s| s.ends_with("/storageAccounts/acctgallery")),
        "{ver}"
    );
    // Every ARM write of publish followed an LRO to its end: operations were polled.
    let polled = fx
        .handle
        .requests()
        .iter()
        .filter(|r| r.method == "GET" && r.path.to_ascii_lowercase().contains("/operations/"))
        .count();
    ensure!(polled >= 3, "only {polled} operation polls");
    // A second version into the now existing gallery and definition.
    let out = fx
        .publish(&[
            "--vhd",
            vhd.to_str().unwrap(),
            "--storage-account",
            "acctgallery",
            "--gallery",
            "sbxgallery",
            "--gallery-image-definition",
            "podvm-cvm",
            "--gallery-image-version",
            "1.2.4",
            "--confidential",
        ])
        .await?;
    out.ok()?;
    // A definition without the CVM feature is refused for --confidential.
    fx.handle
        .seed_gallery_image(SUB, "rg", "eastus", "podvm-plain", None);
    let out = fx
        .publish(&[
            "--vhd",
            vhd.to_str().unwrap(),
            "--storage-account",
            "acctgallery",
            "--gallery",
            "g",
            "--gallery-image-definition",
            "podvm-plain",
            "--gallery-image-version",
            "2.0.0",
            "--confidential",
        ])
        .await?;
    ensure!(out.code != Some(0));
    ensure!(
        out.stderr.contains("ConfidentialVMSupported"),
        "{}",
        out.stderr
    );
    // Without --confidential the definition declares what CAA asks of plain VMs: Trusted
    // Launch when secure boot is on, nothing otherwise.
    let out = fx
        .publish(&[
            "--vhd",
            vhd.to_str().unwrap(),
            "--storage-account",
            "acctgallery",
            "--gallery",
            "sbxgallery",
            "--gallery-image-definition",
            "podvm-plain",
            "--gallery-image-version",
            "1.0.0",
        ])
        .await?;
    out.ok()?;
    let id = out.stdout.trim().to_string();
    let def = fx
        .arm_get(&format!(
            "{}?api-version=2024-03-03",
            id.split("/versions/").next().unwrap()
        ))
        .await?;
    ensure!(
        def["properties"]["features"][0]["value"] == "TrustedLaunchSupported",
        "{def}"
    );
    fx.ensure_arm_calls_granted()?;
    Ok(())
}

async fn arm_faults(_env: Env) -> Result<()> {
    let fx = Fixture::start("faults", &["acctfaults"]).await?;
    let (vhd, _) = sparse_vhd(&fx.dir, "disk.vhd", 8)?;
    let status = |status: u16, code: &str, retry: Option<u64>| FaultKind::Status {
        status,
        code: code.into(),
        retry_after_secs: retry,
        retry_after_ms: None,
    };
    for f in [
        Fault::new(
            "GET",
            "/resourceGroups/rg",
            1,
            status(429, "SubscriptionRequestsThrottled", Some(1)),
        ),
        Fault::new(
            "PUT",
            "storageAccounts/acctfaults",
            1,
            status(500, "InternalServerError", None),
        ),
        Fault::new(
            "GET",
            "asyncoperations",
            1,
            status(503, "ServiceUnavailable", None),
        ),
        Fault::new(
            "POST",
            "listKeys",
            1,
            status(429, "TooManyRequests", Some(1)),
        ),
        Fault::new(
            "PUT",
            "Microsoft.Compute/images/",
            1,
            status(502, "BadGateway", None),
        ),
        Fault::new(
            "GET",
            "/operations/",
            1,
            status(500, "InternalServerError", None),
        ),
    ] {
        fx.handle.inject(f);
    }
    let out = fx
        .publish(&[
            "--vhd",
            vhd.to_str().unwrap(),
            "--storage-account",
            "acctfaults",
            "--image-name",
            "podvm-f",
        ])
        .await?;
    out.ok()?;
    let faults: Vec<String> = fx
        .handle
        .requests()
        .into_iter()
        .filter_map(|r| r.fault)
        .collect();
    for want in ["status_429", "status_500", "status_502", "status_503"] {
        ensure!(
            faults.iter().any(|f| f == want),
            "no {want} hit: {faults:?}"
        );
    }
    ensure!(
        faults.len() == 6,
        "every injected fault fired once: {faults:?}"
    );
    let image = fx
        .arm_get(&format!("{}?api-version=2024-07-01", out.stdout.trim()))
        .await?;
    ensure!(image["properties"]["provisioningState"] == "Succeeded");
    Ok(())
}

async fn delete_only_ours(_env: Env) -> Result<()> {
    let fx = Fixture::start("delete", &["acctdelete"]).await?;
    let (vhd, _) = sparse_vhd(&fx.dir, "disk.vhd", 8)?;
    let managed = fx
        .publish(&[
            "--vhd",
            vhd.to_str().unwrap(),
            "--storage-account",
            "acctdelete",
            "--image-name",
            "podvm-d",
        ])
        .await?;
    managed.ok()?;
    let version = fx
        .publish(&[
            "--vhd",
            vhd.to_str().unwrap(),
            "--storage-account",
            "acctdelete",
            "--image-name",
            "podvm-v",
            "--gallery",
            "delgallery",
            "--gallery-image-definition",
            "deldef",
            "--gallery-image-version",
            "1.0.0",
        ])
        .await?;
    version.ok()?;
    let blob = fx.blob_client("acctdelete")?;
    ensure!(blob.properties("vhds", "podvm-d.vhd").await?.is_some());
    // A foreign image (the seeded gallery version, no sandboxd tag) is refused.
    let foreign = format!(
        "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/podvm/versions/1.0.0"
    );
    let out = fx
        .run(&["image", "delete", "--image-id", &foreign], &[])
        .await?;
    ensure!(out.code != Some(0), "deleting a foreign image exited 0");
    ensure!(
        out.stderr.contains("not created by sandboxd"),
        "{}",
        out.stderr
    );
    ensure!(
        fx.handle
            .resource_ids()
            .contains(&foreign.to_ascii_lowercase()),
        "the foreign image is gone"
    );
    // Ours: the managed image and its blob.
    let id = managed.stdout.trim().to_string();
    let out = fx.run(&["image", "delete", "--image-id", &id], &[]).await?;
    out.ok()?;
    ensure!(
        fx.arm_get_opt(&format!("{id}?api-version=2024-07-01"))
            .await?
            .is_none(),
        "the managed image is still there"
    );
    ensure!(
        blob.properties("vhds", "podvm-d.vhd").await?.is_none(),
        "its blob is still there"
    );
    // The gallery version, its blob, and the definition and gallery sandboxd created.
    let vid = version.stdout.trim().to_string();
    let out = fx
        .run(&["image", "delete", "--image-id", &vid], &[])
        .await?;
    out.ok()?;
    let gallery = vid.split("/images/").next().unwrap().to_string();
    ensure!(
        fx.arm_get_opt(&format!("{gallery}?api-version=2024-03-03"))
            .await?
            .is_none(),
        "the gallery sandboxd created is still there: {}",
        out.stdout
    );
    ensure!(blob.properties("vhds", "podvm-v.vhd").await?.is_none());
    // Deleting again is fine.
    let out = fx.run(&["image", "delete", "--image-id", &id], &[]).await?;
    out.ok()?;
    ensure!(out.stdout.contains("does not exist"), "{}", out.stdout);
    fx.ensure_arm_calls_granted()?;
    Ok(())
}

async fn seed_configmap(env: &Env) -> Result<Api<ConfigMap>> {
    let client = env.admin().await?;
    let api: Api<ConfigMap> = Api::namespaced(client, &env.ns);
    let cm: ConfigMap = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "peer-pods-cm"},
        "data": {"CLOUD_PROVIDER": "azure", "AZURE_REGION": "eastus", "AZURE_IMAGE_ID": "", "VXLAN_PORT": "9000"}
    }))?;
    api.create(&PostParams::default(), &cm).await?;
    Ok(api)
}

async fn update_configmap(env: Env) -> Result<()> {
    let fx = Fixture::start("configmap", &["acctcm"]).await?;
    let api = seed_configmap(&env).await?;
    let (vhd, _) = sparse_vhd(&fx.dir, "disk.vhd", 8)?;
    let kubeconfig = env.cp().kubeconfig_path.to_string_lossy().to_string();
    let out = fx
        .publish(&[
            "--vhd",
            vhd.to_str().unwrap(),
            "--storage-account",
            "acctcm",
            "--image-name",
            "podvm-cm",
            "--update-configmap",
            "--namespace",
            &env.ns,
            "--kubeconfig",
            &kubeconfig,
        ])
        .await?;
    out.ok()?;
    let id = out.stdout.trim();
    let cm = api.get("peer-pods-cm").await?;
    let data = cm.data.clone().unwrap_or_default();
    ensure!(
        data.get("AZURE_IMAGE_ID").map(String::as_str) == Some(id),
        "{data:?}"
    );
    ensure!(
        data.get("VXLAN_PORT").map(String::as_str) == Some("9000"),
        "other keys kept"
    );
    ensure!(
        cm.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(ANNOTATION_BUILT_IMAGE_ID))
            .map(String::as_str)
            == Some(id)
    );
    let managers: Vec<String> = cm
        .metadata
        .managed_fields
        .unwrap_or_default()
        .into_iter()
        .filter(|m| m.operation.as_deref() == Some("Apply"))
        .filter_map(|m| m.manager)
        .collect();
    ensure!(managers == ["sandboxd"], "{managers:?}");
    // Without the ConfigMap: a clear error after the publish.
    let out = fx
        .publish(&[
            "--vhd",
            vhd.to_str().unwrap(),
            "--storage-account",
            "acctcm",
            "--image-name",
            "podvm-cm",
            "--update-configmap",
            "--namespace",
            "no-such-namespace",
            "--kubeconfig",
            &kubeconfig,
        ])
        .await?;
    ensure!(
        out.code != Some(0) && out.stderr.contains("does not exist"),
        "{}",
        out.stderr
    );
    Ok(())
}

async fn image_job(env: Env) -> Result<()> {
    let fx = Fixture::start("job", &["acctjob"]).await?;
    let api = seed_configmap(&env).await?;
    let (vhd, _) = sparse_vhd(&fx.dir, "disk.vhd", 8)?;
    let kubeconfig = env.cp().kubeconfig_path.to_string_lossy().to_string();
    // No build inputs laid out where the OCI image would carry them.
    let no_inputs = fx.dir.join("no-inputs").to_string_lossy().to_string();
    // What envFrom peer-pods-cm gives the Job.
    let cm_env = [
        ("PODVM_INPUTS_DIR", no_inputs.as_str()),
        ("CLOUD_PROVIDER", "azure"),
        ("AZURE_REGION", "eastus"),
        ("AZURE_RESOURCE_GROUP", "rg"),
        ("AZURE_IMAGE_ID", ""),
        ("DISABLECVM", "false"),
        ("POD_NAMESPACE", env.ns.as_str()),
        ("PODVM_VHD", vhd.to_str().unwrap()),
        ("IMAGE_STORAGE_ACCOUNT", "acctjob"),
    ];
    let out = fx
        .run(&["image", "job", "--kubeconfig", &kubeconfig], &cm_env)
        .await?;
    out.ok()?;
    let id = out.stdout.trim().to_string();
    ensure!(
        id.contains("/galleries/PodVMGallery/images/podvm-image/versions/0.0."),
        "{id}"
    );
    let cm = api.get("peer-pods-cm").await?;
    ensure!(cm.data.unwrap_or_default().get("AZURE_IMAGE_ID") == Some(&id));
    let def = fx
        .arm_get(&format!(
            "{}?api-version=2024-03-03",
            id.split("/versions/").next().unwrap()
        ))
        .await?;
    ensure!(
        def["properties"]["features"][0]["value"] == "ConfidentialVMSupported",
        "DISABLECVM=false wants a CVM-capable definition: {def}"
    );
    // The next Job run sees AZURE_IMAGE_ID and publishes nothing.
    let mut with_id: Vec<(&str, &str)> = cm_env
        .iter()
        .filter(|(k, _)| *k != "AZURE_IMAGE_ID")
        .copied()
        .collect();
    with_id.push(("AZURE_IMAGE_ID", &id));
    let versions_before = fx.handle.resource_ids().len();
    let out = fx
        .run(&["image", "job", "--kubeconfig", &kubeconfig], &with_id)
        .await?;
    out.ok()?;
    ensure!(
        out.stdout.trim().is_empty() && out.stderr.contains("already set"),
        "{}",
        out.stderr
    );
    ensure!(fx.handle.resource_ids().len() == versions_before);
    // Neither a VHD nor build inputs: the Job names both ways.
    let no_vhd: Vec<(&str, &str)> = cm_env
        .iter()
        .filter(|(k, _)| *k != "PODVM_VHD")
        .copied()
        .collect();
    let out = fx
        .run(&["image", "job", "--kubeconfig", &kubeconfig], &no_vhd)
        .await?;
    ensure!(
        out.code != Some(0) && out.stderr.contains("--vhd") && out.stderr.contains("--kernel"),
        "{}",
        out.stderr
    );
    // With the build inputs (as the image carries them) the Job builds and publishes in one
    // process, and leaves no build directory behind.
    let Ok(inputs) = crate::image::inputs().await else {
        eprintln!("image_publish: build inputs unavailable; the build-in-Job step is not run");
        return Ok(());
    };
    let (kernel, modules, boot) = (
        inputs.kernel.to_string_lossy().to_string(),
        inputs.modules_dir.to_string_lossy().to_string(),
        inputs.systemd_boot.to_string_lossy().to_string(),
    );
    let mut build_env = no_vhd.clone();
    build_env.extend([
        ("PODVM_KERNEL", kernel.as_str()),
        ("PODVM_MODULES_DIR", modules.as_str()),
        ("PODVM_SYSTEMD_BOOT", boot.as_str()),
    ]);
    let out = fx
        .run(&["image", "job", "--kubeconfig", &kubeconfig], &build_env)
        .await?;
    out.ok()?;
    let built = out.stdout.trim().to_string();
    ensure!(
        built.contains("/versions/0.0.") && built != id,
        "a new gallery version: {built}"
    );
    let cm = api.get("peer-pods-cm").await?;
    ensure!(cm.data.unwrap_or_default().get("AZURE_IMAGE_ID") == Some(&built));
    fx.ensure_arm_calls_granted()?;
    Ok(())
}

/// The Job given neither a VHD nor input paths builds from the inputs laid out as the OCI
/// image carries them (`sandboxd image stage-inputs`, what `scripts/oci-image.sh
/// --podvm-inputs` runs), here below a temporary root instead of `/usr/share/sandboxd/podvm`.
async fn image_job_from_carried_inputs(env: Env) -> Result<()> {
    let fx = Fixture::start("jobcarried", &["acctcarried"]).await?;
    let api = seed_configmap(&env).await?;
    let inputs = crate::image::inputs().await?;
    let layout = fx.dir.join("root/usr/share/sandboxd/podvm");
    let layout_s = layout.to_string_lossy().to_string();
    let staged = fixture::run_sandboxd(
        &[
            "image".into(),
            "stage-inputs".into(),
            "--kernel".into(),
            inputs.kernel.to_string_lossy().into(),
            "--modules-dir".into(),
            inputs.modules_dir.to_string_lossy().into(),
            "--systemd-boot".into(),
            inputs.systemd_boot.to_string_lossy().into(),
            "--out".into(),
            layout_s.clone(),
        ],
        &[],
    )
    .await?;
    staged.ok()?;
    let kubeconfig = env.cp().kubeconfig_path.to_string_lossy().to_string();
    let job_env = [
        ("CLOUD_PROVIDER", "azure"),
        ("AZURE_REGION", "eastus"),
        ("AZURE_RESOURCE_GROUP", "rg"),
        ("AZURE_IMAGE_ID", ""),
        ("POD_NAMESPACE", env.ns.as_str()),
        ("IMAGE_STORAGE_ACCOUNT", "acctcarried"),
        ("PODVM_INPUTS_DIR", layout_s.as_str()),
    ];
    let out = fx
        .run(&["image", "job", "--kubeconfig", &kubeconfig], &job_env)
        .await?;
    out.ok()?;
    ensure!(
        out.stderr.contains(&format!("kernel {layout_s}/vmlinuz")),
        "the Job did not build from the laid-out inputs:\n{}",
        out.stderr
    );
    let id = out.stdout.trim().to_string();
    ensure!(id.contains("/versions/0.0."), "{id}");
    let cm = api.get("peer-pods-cm").await?;
    ensure!(cm.data.unwrap_or_default().get("AZURE_IMAGE_ID") == Some(&id));
    // The uploaded blob is a bootable disk: a fixed VHD whose EFI system partition holds the
    // laid-out kernel.
    let blob = fx.blob_client("acctcarried")?;
    let version = fx.arm_get(&format!("{id}?api-version=2024-03-03")).await?;
    let uri = version["properties"]["storageProfile"]["osDiskImage"]["source"]["uri"]
        .as_str()
        .context("the version names no source blob")?;
    let name = uri.rsplit('/').next().unwrap_or_default().to_string();
    let props = blob
        .properties("vhds", &name)
        .await?
        .context("no blob uploaded")?;
    let bytes = blob.read("vhds", &name, 0..props.length).await?;
    let footer = sandboxd::image::build::vhd::parse_footer(&bytes).map_err(anyhow::Error::msg)?;
    ensure!(footer.size % (1 << 20) == 0 && footer.size + 512 == props.length);
    let disk = &bytes[..footer.size as usize];
    let table = sandboxd::image::build::gpt::parse(disk).map_err(anyhow::Error::msg)?;
    let p = &table.partitions[0];
    let esp = &disk[p.first_lba as usize * 512..(p.last_lba as usize + 1) * 512];
    let kernel = sandboxd::image::build::fat::read_file(esp, "sandboxd/vmlinuz")
        .map_err(anyhow::Error::msg)?;
    ensure!(kernel == std::fs::read(layout.join("vmlinuz"))?);
    Ok(())
}

/// Upload throughput of a dense 256 MiB VHD at 1, 4 and 8 parallel Put Page requests.
async fn bench_upload(_env: Env) -> Result<()> {
    let fx = Fixture::start("bench", &["acctbench"]).await?;
    let size = 256 * MIB;
    let mut data = vec![0u8; size];
    let mut rng = fastrand::Rng::with_seed(7);
    for chunk in data.chunks_mut(8) {
        chunk.copy_from_slice(&(rng.u64(..) | 1).to_le_bytes());
    }
    data.extend_from_slice(&sandboxd::image::build::vhd::footer(
        size as u64,
        [9; 16],
        0,
    ));
    let vhd = fx.dir.join("dense.vhd");
    std::fs::write(&vhd, &data)?;
    drop(data);
    for concurrency in ["1", "4", "8"] {
        let name = format!("bench-{concurrency}");
        let started = std::time::Instant::now();
        let out = fx
            .publish(&[
                "--vhd",
                vhd.to_str().unwrap(),
                "--storage-account",
                "acctbench",
                "--image-name",
                &name,
                "--concurrency",
                concurrency,
            ])
            .await?;
        out.ok()?;
        let line = out
            .stderr
            .lines()
            .find(|l| l.starts_with("upload done:"))
            .unwrap_or_default()
            .to_string();
        eprintln!(
            "bench: concurrency {concurrency}: publish {:?} total; {line}",
            started.elapsed()
        );
        fx.blob_client("acctbench")?
            .delete("vhds", &format!("{name}.vhd"))
            .await?;
    }
    Ok(())
}

/// Arguments, environment, and what stderr must say.
type BadCase<'a> = (Vec<String>, Vec<(&'a str, &'a str)>, &'a str);

async fn bad_input(_env: Env) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (good, _) = sparse_vhd(dir.path(), "good.vhd", 2)?;
    let good = good.to_str().unwrap().to_string();
    let odd = dir.path().join("odd.vhd");
    std::fs::write(&odd, vec![1u8; 1000])?;
    let raw = dir.path().join("raw.img");
    std::fs::write(&raw, vec![1u8; 2 * MIB])?;
    let creds: Vec<(&str, &str)> = vec![
        ("AZURE_SUBSCRIPTION_ID", SUB),
        ("AZURE_CLIENT_ID", "0a1b2c3d-0000-4000-8000-00000000000c"),
        ("AZURE_CLIENT_SECRET", "s"),
        ("AZURE_TENANT_ID", "0a1b2c3d-0000-4000-8000-00000000000e"),
    ];
    let base = |vhd: &str, region: &str| {
        vec![
            "image".to_string(),
            "publish".into(),
            "--azure".into(),
            "--vhd".into(),
            vhd.to_string(),
            "--resource-group".into(),
            "rg".into(),
            "--region".into(),
            region.to_string(),
            // Nothing listens here: a cloud call would fail differently.
            "--dev-arm-endpoint".into(),
            "http://127.0.0.1:9/".into(),
        ]
    };
    let cases: Vec<BadCase> = vec![
        (
            base(&good, "eastus"),
            creds
                .iter()
                .filter(|(k, _)| *k != "AZURE_TENANT_ID")
                .copied()
                .collect(),
            "AZURE_TENANT_ID",
        ),
        (
            base(&good, "eastus"),
            creds
                .iter()
                .filter(|(k, _)| *k != "AZURE_SUBSCRIPTION_ID")
                .copied()
                .collect(),
            "AZURE_SUBSCRIPTION_ID",
        ),
        (base(&good, ""), creds.clone(), "--region"),
        (
            base(odd.to_str().unwrap(), "eastus"),
            creds.clone(),
            "multiple of 512",
        ),
        (
            base(raw.to_str().unwrap(), "eastus"),
            creds.clone(),
            "conectix",
        ),
    ];
    for (args, env, want) in cases {
        let out = fixture::run_sandboxd(&args, &env).await?;
        ensure!(out.code == Some(1), "{args:?}: exit {:?}", out.code);
        ensure!(out.stdout.is_empty(), "{args:?}: stdout {:?}", out.stdout);
        ensure!(
            out.stderr.contains(want) && !out.stderr.contains("127.0.0.1:9"),
            "{args:?}: stderr lacks {want:?} or tried the cloud: {}",
            out.stderr
        );
        ensure!(!out.stderr.contains("\"s\""), "the client secret leaked");
    }
    Ok(())
}

impl Run {
    /// Fails with the output unless the command exited 0.
    pub fn ok(&self) -> Result<()> {
        if self.code == Some(0) {
            Ok(())
        } else {
            Err(anyhow!(
                "exit {:?}\nstdout:\n{}\nstderr:\n{}",
                self.code,
                self.stdout,
                self.stderr
            ))
        }
    }

    /// (sent bytes, bytes already there, resumed) from the upload summary line.
    pub fn summary(&self) -> Result<(u64, u64, bool)> {
        let line = self
            .stderr
            .lines()
            .find(|l| l.starts_with("upload done:"))
            .with_context(|| format!("no upload summary in:\n{}", self.stderr))?;
        let num_after = |key: &str| -> Result<u64> {
            let i = line.find(key).context("summary format")? + key.len();
            Ok(line[i..]
                .trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()
                .unwrap_or_default()
                .parse()?)
        };
        let sent = num_after("sent ")?;
        let rest = line.split("MiB/s), ").nth(1).context("summary format")?;
        let already: u64 = rest.split_whitespace().next().unwrap_or_default().parse()?;
        Ok((sent, already, line.contains("(resumed)")))
    }
}
