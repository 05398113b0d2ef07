//! OpenShift's default credentials path against the stand-in CredentialsRequest CRD: a
//! user's `peer-pods-secret` is left alone; without one, a CredentialsRequest with the
//! Azure roles is made and the Secret the cloud-credential-operator writes (here: the test)
//! becomes `peer-pods-secret`, following rotations.

use std::time::Duration;

use anyhow::{Context, Result, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use sandboxd::api::peerpodconfig::CONDITION_CONFIG_VALID;
use sandboxd::operator::peerpods::credentials::{
    CCO_NAMESPACE, CCO_SECRET, CREDENTIALS_REQUEST, LABEL_DERIVED_FROM, resource,
};
use serde_json::json;

use super::image_job::{USERS, user_config, user_secret};

use super::support::{Fixture, WAIT};
use crate::harness::{self, Case, eventually};

/// The client id the cloud-credential-operator's Secret carries (a GUID, as Azure has it).
const CCO_CLIENT_ID: &str = "0a1b2c3d-0000-4000-8000-0000000000cc";

pub fn cases() -> Vec<Case> {
    vec![Case::cluster_exclusive(
        "peerpods::a_users_secret_is_kept_and_without_one_a_credentials_request_yields_peer_pods_secret",
        |env| async move {
            let admin = env.admin().await?;
            for f in harness::fixture_crds() {
                if f.to_string_lossy().contains("cloudcredential") {
                    harness::install_crds(&admin, &f).await?;
                }
            }
            let nss: Api<Namespace> = Api::all(admin.clone());
            if nss.get_opt(CCO_NAMESPACE).await?.is_none() {
                harness::create_namespace(&admin, CCO_NAMESPACE).await?;
            }
            let fx = Fixture::start(&env).await?;
            let r = credentials(&fx).await;
            let crs: Api<kube::api::DynamicObject> =
                Api::namespaced_with(admin.clone(), CCO_NAMESPACE, &resource());
            let _ = crs
                .delete(CREDENTIALS_REQUEST, &DeleteParams::default())
                .await;
            let t = fx.teardown().await;
            r.and(t)
        },
    )]
}

fn bytes(s: &str) -> ByteString {
    ByteString(s.as_bytes().to_vec())
}

fn data_of(s: &Secret, key: &str) -> Option<String> {
    s.data
        .as_ref()?
        .get(key)
        .map(|v| String::from_utf8_lossy(&v.0).into_owned())
}

async fn write_cco_secret(fx: &Fixture, client_secret: &str) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(fx.admin.clone(), &fx.ns);
    let s = Secret {
        metadata: kube::api::ObjectMeta {
            name: Some(CCO_SECRET.into()),
            ..Default::default()
        },
        data: Some(
            [
                ("azure_client_id", CCO_CLIENT_ID),
                ("azure_client_secret", client_secret),
                ("azure_tenant_id", "0a1b2c3d-0000-4000-8000-0000000000ee"),
                (
                    "azure_subscription_id",
                    "11111111-2222-3333-4444-555555555555",
                ),
                ("azure_region", "eastus"),
                ("azure_resourcegroup", "rg"),
            ]
            .iter()
            .map(|(k, v)| (k.to_string(), bytes(v)))
            .collect(),
        ),
        ..Default::default()
    };
    secrets
        .patch(
            CCO_SECRET,
            &PatchParams::apply("cloud-credential-operator").force(),
            &Patch::Apply(&s),
        )
        .await?;
    Ok(())
}

async fn credentials(fx: &Fixture) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(fx.admin.clone(), &fx.ns);
    let crs: Api<kube::api::DynamicObject> =
        Api::namespaced_with(fx.admin.clone(), CCO_NAMESPACE, &resource());
    let _ = crs
        .delete(CREDENTIALS_REQUEST, &DeleteParams::default())
        .await;

    // A user's secret, with the credentials Secret around too: both left alone.
    user_secret(fx, "users-own-secret").await?;
    write_cco_secret(fx, "cco-secret-v1").await?;
    user_config(fx, USERS, "9000").await?;
    fx.enable().await?;
    fx.wait_ppc().await?;
    fx.wait_condition(CONDITION_CONFIG_VALID, "True", "Valid")
        .await?;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let s = secrets.get("peer-pods-secret").await?;
    ensure!(
        data_of(&s, "AZURE_CLIENT_SECRET").as_deref() == Some("users-own-secret"),
        "the user's secret was overwritten"
    );
    ensure!(!s.labels().contains_key(LABEL_DERIVED_FROM));
    ensure!(
        crs.get_opt(CREDENTIALS_REQUEST).await?.is_none(),
        "a CredentialsRequest was made although the user has a secret"
    );

    // No secret: the operator requests credentials.
    secrets.delete(CCO_SECRET, &DeleteParams::default()).await?;
    secrets
        .delete("peer-pods-secret", &DeleteParams::default())
        .await?;
    let cr = eventually("CredentialsRequest created", WAIT, || async {
        Ok(crs.get_opt(CREDENTIALS_REQUEST).await?)
    })
    .await?;
    let spec = &cr.data["spec"];
    ensure!(
        spec["secretRef"] == json!({"name": CCO_SECRET, "namespace": fx.ns}),
        "{spec}"
    );
    ensure!(
        spec["providerSpec"]["kind"] == "AzureProviderSpec",
        "{spec}"
    );
    let granted: Vec<&str> = spec["providerSpec"]["permissions"]
        .as_array()
        .context("permissions")?
        .iter()
        .filter_map(|r| r.as_str())
        .collect();
    ensure!(
        granted == sandboxd::cloud::azure::permissions::actions(),
        "{granted:?}"
    );
    ensure!(
        cr.owner_references().iter().any(|o| o.kind == "KataConfig"),
        "not owned by the KataConfig"
    );
    let c = fx
        .wait_condition(CONDITION_CONFIG_VALID, "False", "InvalidConfig")
        .await?;
    ensure!(
        c.message.contains("cloud-credential-operator") && c.message.contains(CCO_SECRET),
        "{}",
        c.message
    );

    // The cloud-credential-operator (the test) writes its Secret: peer-pods-secret follows.
    write_cco_secret(fx, "cco-secret-v1").await?;
    let derived = eventually("peer-pods-secret derived", WAIT, || async {
        Ok(secrets.get_opt("peer-pods-secret").await?)
    })
    .await?;
    let mut keys: Vec<&String> = derived.data.as_ref().context("data")?.keys().collect();
    keys.sort();
    ensure!(
        keys == [
            "AZURE_CLIENT_ID",
            "AZURE_CLIENT_SECRET",
            "AZURE_SUBSCRIPTION_ID",
            "AZURE_TENANT_ID"
        ],
        "{keys:?}"
    );
    ensure!(data_of(&derived, "AZURE_CLIENT_ID").as_deref() == Some(CCO_CLIENT_ID));
    ensure!(
        derived
            .owner_references()
            .iter()
            .any(|o| o.kind == "Secret" && o.name == CCO_SECRET),
        "not owned by {CCO_SECRET}"
    );
    fx.wait_condition(CONDITION_CONFIG_VALID, "True", "Valid")
        .await?;

    // Rotation.
    write_cco_secret(fx, "cco-secret-v2").await?;
    eventually("peer-pods-secret rotated", WAIT, || async {
        let s = secrets.get("peer-pods-secret").await?;
        Ok((data_of(&s, "AZURE_CLIENT_SECRET").as_deref() == Some("cco-secret-v2")).then_some(()))
    })
    .await?;

    // Peer pods disabled: the CredentialsRequest goes.
    fx.kcs()
        .patch(
            "example-kataconfig",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"enablePeerPods": false}})),
        )
        .await?;
    eventually("CredentialsRequest deleted", WAIT, || async {
        Ok(crs
            .get_opt(CREDENTIALS_REQUEST)
            .await?
            .is_none()
            .then_some(()))
    })
    .await?;
    Ok(())
}
