//! The pod VM image Job: started when `AZURE_IMAGE_ID` is empty, watched (the real Job
//! controller decides when it failed or completed; the test acts as the kubelet), its
//! failure kept visible until the user acts, a built image recorded and deleted on
//! uninstall, a user's image never. Also: the seed's manual `REBOOT=` env on the CAA
//! DaemonSet survives the operator.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams};
use sandboxd::api::kataconfig::KataConfig;
use sandboxd::api::names::{CAA_DAEMONSET, IMAGE_CREATION_JOB, IMAGE_DELETION_JOB};
use sandboxd::api::peerpodconfig::CONDITION_POD_VM_IMAGE_READY;
use sandboxd::operator::peerpods::caa::CONFIG_HASH_ANNOTATION;
use sandboxd::operator::peerpods::image_job::{
    ANN_BUILT_IMAGE, FINALIZER, IMAGE_JOB_FIELD_MANAGER, SERVICE_ACCOUNT, Settings,
};
use serde_json::json;

use super::support::{Fixture, WAIT};
use crate::harness::{self, Case, Phase, eventually};

const KC: &str = "example-kataconfig";
const SUBNET: &str = "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/vnet/subnets/worker-subnet";
/// The image the test, acting as the Job, publishes.
pub const BUILT: &str = "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg/providers/Microsoft.Compute/galleries/sandboxd/images/podvm/versions/0.1.0";
/// An image the user brings.
pub const USERS: &str = "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg/providers/Microsoft.Compute/images/my-podvm";

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster_exclusive(
            "peerpods::a_failed_image_job_keeps_pod_vm_image_ready_false_until_the_configmap_gets_an_image_id",
            |env| async move {
                let fx = Fixture::start_with(&env, fail_fast()).await?;
                let r = failure_stays_until_image_id(&fx).await;
                let t = fx.teardown().await;
                r.and(t)
            },
        ),
        Case::cluster_exclusive(
            "peerpods::an_image_the_job_built_is_recorded_and_deleted_by_the_uninstall",
            |env| async move {
                let fx = Fixture::start_with(&env, fail_fast()).await?;
                let r = built_image_deleted_on_uninstall(&fx).await;
                let t = fx.teardown().await;
                r.and(t)
            },
        ),
        Case::cluster_exclusive(
            "peerpods::a_manual_reboot_env_on_the_caa_daemonset_survives_reconciles_and_rollouts",
            |env| async move {
                let fx = Fixture::start(&env).await?;
                let r = reboot_env_survives(&fx).await;
                let t = fx.teardown().await;
                r.and(t)
            },
        ),
    ]
}

fn fail_fast() -> Settings {
    Settings {
        backoff_limit: 0,
        ..Default::default()
    }
}

fn secret(name: &str, data: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        data: Some(
            data.iter()
                .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// The ssh key secret and the configmap (with `image_id`) as the user applies them.
pub async fn user_config(fx: &Fixture, image_id: &str, vxlan_port: &str) -> Result<()> {
    let ssa = PatchParams::apply("sandboxd-test").force();
    let secrets: Api<Secret> = Api::namespaced(fx.admin.clone(), &fx.ns);
    secrets
        .patch(
            "ssh-key-secret",
            &ssa,
            &Patch::Apply(&secret(
                "ssh-key-secret",
                &[(
                    "id_rsa.pub",
                    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl peerpod",
                )],
            )),
        )
        .await?;
    let cm: ConfigMap = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "peer-pods-cm"},
        "data": {
            "CLOUD_PROVIDER": "azure",
            "VXLAN_PORT": vxlan_port,
            "AZURE_INSTANCE_SIZE": "Standard_B2als_v2",
            "AZURE_INSTANCE_SIZES": "Standard_B2als_v2,Standard_D2as_v5",
            "AZURE_SUBNET_ID": SUBNET,
            "AZURE_IMAGE_ID": image_id,
            "AZURE_REGION": "eastus",
            "AZURE_RESOURCE_GROUP": "rg",
        },
    }))?;
    let cms: Api<ConfigMap> = Api::namespaced(fx.admin.clone(), &fx.ns);
    cms.patch("peer-pods-cm", &ssa, &Patch::Apply(&cm)).await?;
    Ok(())
}

/// The user's complete `peer-pods-secret`.
pub async fn user_secret(fx: &Fixture, client_secret: &str) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(fx.admin.clone(), &fx.ns);
    secrets
        .patch(
            "peer-pods-secret",
            &PatchParams::apply("sandboxd-test").force(),
            &Patch::Apply(&secret(
                "peer-pods-secret",
                &[
                    (
                        "AZURE_SUBSCRIPTION_ID",
                        "11111111-2222-3333-4444-555555555555",
                    ),
                    ("AZURE_CLIENT_ID", "0a1b2c3d-0000-4000-8000-00000000000c"),
                    ("AZURE_CLIENT_SECRET", client_secret),
                    ("AZURE_TENANT_ID", "0a1b2c3d-0000-4000-8000-00000000000e"),
                ],
            )),
        )
        .await?;
    Ok(())
}

async fn kc_in_progress(fx: &Fixture, status: &str, reason: &str) -> Result<Condition> {
    kc_in_progress_saying(fx, status, reason, "").await
}

async fn kc_in_progress_saying(
    fx: &Fixture,
    status: &str,
    reason: &str,
    says: &str,
) -> Result<Condition> {
    let kcs = fx.kcs();
    eventually(
        &format!("KataConfig InProgress={status} ({reason})"),
        WAIT,
        || async {
            let Some(kc) = kcs.get_opt(KC).await? else {
                return Ok(None);
            };
            Ok(kc
                .status
                .unwrap_or_default()
                .conditions
                .into_iter()
                .find(|c| {
                    c.type_ == "InProgress"
                        && c.status == status
                        && c.reason == reason
                        && c.message.contains(says)
                }))
        },
    )
    .await
}

async fn wait_job(fx: &Fixture, name: &str) -> Result<Job> {
    let jobs: Api<Job> = Api::namespaced(fx.admin.clone(), &fx.ns);
    eventually(&format!("Job {name}"), WAIT, || async {
        Ok(jobs.get_opt(name).await?)
    })
    .await
}

/// Acts as the kubelet for the Job's pod (made by the real Job controller).
async fn finish_job_pod(fx: &Fixture, job: &str, phase: Phase) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(fx.admin.clone(), &fx.ns);
    let pod = eventually(&format!("a pod of Job {job}"), WAIT, || async {
        let lp = ListParams::default().labels(&format!("batch.kubernetes.io/job-name={job}"));
        Ok(pods.list(&lp).await?.items.into_iter().next())
    })
    .await?;
    harness::set_pod_phase(&fx.admin, &fx.ns, &pod.name_any(), phase, None).await?;
    Ok(())
}

async fn no_caa(fx: &Fixture) -> Result<()> {
    let dss: Api<DaemonSet> = Api::namespaced(fx.admin.clone(), &fx.ns);
    ensure!(
        dss.get_opt(CAA_DAEMONSET).await?.is_none(),
        "the CAA started without a pod VM image"
    );
    Ok(())
}

async fn wait_caa(fx: &Fixture) -> Result<DaemonSet> {
    let dss: Api<DaemonSet> = Api::namespaced(fx.admin.clone(), &fx.ns);
    eventually("CAA DaemonSet created", WAIT, || async {
        Ok(dss.get_opt(CAA_DAEMONSET).await?)
    })
    .await
}

async fn delete_kc_and_wait_gone(fx: &Fixture) -> Result<()> {
    let kcs = fx.kcs();
    kcs.delete(KC, &DeleteParams::default()).await?;
    eventually("KataConfig gone", Duration::from_secs(60), || async {
        Ok(kcs.get_opt(KC).await?.is_none().then_some(()))
    })
    .await
}

async fn failure_stays_until_image_id(fx: &Fixture) -> Result<()> {
    user_secret(fx, "s3cr3t").await?;
    user_config(fx, "", "9000").await?;
    fx.enable().await?;
    fx.wait_ppc().await?;

    // The Job, as specified.
    let job = wait_job(fx, IMAGE_CREATION_JOB).await?;
    let spec = job.spec.clone().context("job spec")?;
    ensure!(spec.backoff_limit == Some(0), "{:?}", spec.backoff_limit);
    let owner = job.owner_references().first().cloned().context("owner")?;
    ensure!(owner.kind == "KataConfig" && owner.name == KC, "{owner:?}");
    let pod = spec.template.spec.context("pod spec")?;
    ensure!(pod.restart_policy.as_deref() == Some("Never"));
    ensure!(pod.service_account_name.as_deref() == Some(SERVICE_ACCOUNT));
    ensure!(pod.security_context.and_then(|s| s.run_as_non_root) == Some(true));
    let c = &pod.containers[0];
    ensure!(
        c.image.as_deref() == Some("sandboxd:latest"),
        "{:?}",
        c.image
    );
    ensure!(
        c.args.clone().unwrap_or_default() == ["image", "job"],
        "{:?}",
        c.args
    );
    let env_from: Vec<String> = c
        .env_from
        .clone()
        .unwrap_or_default()
        .into_iter()
        .filter_map(|e| {
            e.secret_ref
                .map(|r| r.name)
                .or(e.config_map_ref.map(|r| r.name))
        })
        .collect();
    ensure!(
        env_from == ["peer-pods-secret", "peer-pods-cm"],
        "{env_from:?}"
    );
    fx.wait_condition(CONDITION_POD_VM_IMAGE_READY, "False", "ImageJobRunning")
        .await?;
    kc_in_progress(fx, "True", "PodVMImageJobRunning").await?;
    no_caa(fx).await?;

    // The kubelet reports the pod failed; the Job controller fails the Job.
    finish_job_pod(fx, IMAGE_CREATION_JOB, Phase::Failed).await?;
    let c = fx
        .wait_condition(CONDITION_POD_VM_IMAGE_READY, "False", "ImageJobFailed")
        .await?;
    ensure!(
        c.message.contains(IMAGE_CREATION_JOB) && c.message.contains("BackoffLimitExceeded"),
        "{}",
        c.message
    );
    ensure!(!c.message.contains("s3cr3t"), "secret value leaked");
    let k = kc_in_progress(fx, "False", "PodVMImageJobFailed").await?;
    ensure!(k.message.contains(IMAGE_CREATION_JOB), "{}", k.message);

    // It stays: not reset, not retried, across passes.
    tokio::time::sleep(Duration::from_secs(8)).await;
    fx.wait_condition(CONDITION_POD_VM_IMAGE_READY, "False", "ImageJobFailed")
        .await?;
    let again = wait_job(fx, IMAGE_CREATION_JOB).await?;
    ensure!(again.uid() == job.uid(), "the failed Job was replaced");
    no_caa(fx).await?;

    // The user deletes the failed Job: a new one runs.
    let jobs: Api<Job> = Api::namespaced(fx.admin.clone(), &fx.ns);
    jobs.delete(IMAGE_CREATION_JOB, &DeleteParams::background())
        .await?;
    let second = eventually("a new creation Job", WAIT, || async {
        Ok(jobs
            .get_opt(IMAGE_CREATION_JOB)
            .await?
            .filter(|j| j.uid() != job.uid()))
    })
    .await?;
    fx.wait_condition(CONDITION_POD_VM_IMAGE_READY, "False", "ImageJobRunning")
        .await?;

    // The user provides an image meanwhile: ready, the running Job is stopped, the CAA
    // starts, nothing is recorded as built.
    let cms: Api<ConfigMap> = Api::namespaced(fx.admin.clone(), &fx.ns);
    cms.patch(
        "peer-pods-cm",
        &PatchParams {
            field_manager: Some("kubectl-edit".into()),
            ..Default::default()
        },
        &Patch::Merge(json!({"data": {"AZURE_IMAGE_ID": USERS}})),
    )
    .await?;
    fx.wait_condition(CONDITION_POD_VM_IMAGE_READY, "True", "ImageProvided")
        .await?;
    wait_caa(fx).await?;
    eventually("the running Job stopped", WAIT, || async {
        let j = jobs.get_opt(IMAGE_CREATION_JOB).await?;
        Ok(j.is_none_or(|j| j.uid() != second.uid()).then_some(()))
    })
    .await?;
    let kc = fx.kcs().get(KC).await?;
    ensure!(!kc.annotations().contains_key(ANN_BUILT_IMAGE));
    ensure!(!kc.finalizers().iter().any(|f| f == FINALIZER));

    // Uninstall never deletes the user's image.
    delete_kc_and_wait_gone(fx).await?;
    ensure!(
        jobs.get_opt(IMAGE_DELETION_JOB).await?.is_none(),
        "a deletion Job ran for a user's image"
    );
    Ok(())
}

async fn built_image_deleted_on_uninstall(fx: &Fixture) -> Result<()> {
    user_secret(fx, "s3cr3t").await?;
    user_config(fx, "", "9000").await?;
    fx.enable().await?;
    let job = wait_job(fx, IMAGE_CREATION_JOB).await?;
    no_caa(fx).await?;

    // Acting as the Job: publish, write the id as its field manager, exit 0.
    let cms: Api<ConfigMap> = Api::namespaced(fx.admin.clone(), &fx.ns);
    cms.patch(
        "peer-pods-cm",
        &PatchParams {
            field_manager: Some(IMAGE_JOB_FIELD_MANAGER.into()),
            ..Default::default()
        },
        &Patch::Merge(json!({"data": {"AZURE_IMAGE_ID": BUILT}})),
    )
    .await?;
    finish_job_pod(fx, IMAGE_CREATION_JOB, Phase::Succeeded).await?;
    let c = fx
        .wait_condition(CONDITION_POD_VM_IMAGE_READY, "True", "ImageBuilt")
        .await?;
    ensure!(c.message.contains(BUILT), "{}", c.message);
    kc_in_progress(fx, "False", "PodVMImageJobCompleted").await?;
    let kc: KataConfig = fx.kcs().get(KC).await?;
    ensure!(
        kc.annotations().get(ANN_BUILT_IMAGE).map(String::as_str) == Some(BUILT),
        "{:?}",
        kc.annotations()
    );
    ensure!(kc.finalizers().iter().any(|f| f == FINALIZER));
    wait_caa(fx).await?;

    // A completed Job is never run again.
    tokio::time::sleep(Duration::from_secs(7)).await;
    ensure!(wait_job(fx, IMAGE_CREATION_JOB).await?.uid() == job.uid());

    // Uninstall: the deletion Job for exactly that image; the KataConfig waits for it.
    fx.kcs().delete(KC, &DeleteParams::default()).await?;
    let del = wait_job(fx, IMAGE_DELETION_JOB).await?;
    let args = del.spec.clone().unwrap().template.spec.unwrap().containers[0]
        .args
        .clone()
        .unwrap_or_default();
    ensure!(args == ["image", "delete", "--image-id", BUILT], "{args:?}");
    let waiting = kc_in_progress_saying(fx, "True", "Uninstalling", BUILT).await?;
    ensure!(
        waiting.message.contains(IMAGE_DELETION_JOB),
        "{}",
        waiting.message
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    ensure!(
        fx.kcs().get_opt(KC).await?.is_some(),
        "the KataConfig went before the image"
    );
    finish_job_pod(fx, IMAGE_DELETION_JOB, Phase::Succeeded).await?;
    eventually("KataConfig gone", Duration::from_secs(60), || async {
        Ok(fx.kcs().get_opt(KC).await?.is_none().then_some(()))
    })
    .await?;
    Ok(())
}

fn has_reboot(ds: &DaemonSet) -> bool {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.spec.as_ref())
        .and_then(|p| p.containers[0].env.as_ref())
        .is_some_and(|env| env.iter().any(|e| e.name == "REBOOT"))
}

fn template_hash(ds: &DaemonSet) -> String {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(CONFIG_HASH_ANNOTATION).cloned())
        .unwrap_or_default()
}

async fn reboot_env_survives(fx: &Fixture) -> Result<()> {
    user_secret(fx, "s3cr3t").await?;
    user_config(fx, USERS, "9000").await?;
    fx.enable().await?;
    let ds = wait_caa(fx).await?;
    let h1 = template_hash(&ds);

    // `oc set env ds/peerpodconfig-ctrl-caa-daemon REBOOT="$(date)"`
    let dss: Api<DaemonSet> = Api::namespaced(fx.admin.clone(), &fx.ns);
    let patched = dss
        .patch(
            CAA_DAEMONSET,
            &PatchParams {
                field_manager: Some("kubectl-set".into()),
                ..Default::default()
            },
            &Patch::Strategic(json!({"spec": {"template": {"spec": {"containers": [
                {"name": "cloud-api-adaptor", "env": [{"name": "REBOOT", "value": "Fri Nov 27"}]}
            ]}}}})),
        )
        .await?;
    ensure!(has_reboot(&patched));
    let g = patched.metadata.generation;

    // The operator's next passes neither revert nor rewrite it.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let ds = dss.get(CAA_DAEMONSET).await?;
    ensure!(has_reboot(&ds), "REBOOT reverted");
    ensure!(
        ds.metadata.generation == g,
        "rewritten after the manual env"
    );

    // A real configuration change rolls the CAA and keeps the user's env.
    user_config(fx, USERS, "9001").await?;
    let ds = eventually("CAA template hash changed", WAIT, || async {
        let ds = dss.get(CAA_DAEMONSET).await?;
        Ok((template_hash(&ds) != h1).then_some(ds))
    })
    .await?;
    ensure!(has_reboot(&ds), "REBOOT dropped by the rollout");
    Ok(())
}
