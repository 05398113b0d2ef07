//! `ConfigValid`: the shared validator's verdict on the user's secret, configmap and ssh key
//! secret, on the PeerPodConfig and as an Event, naming keys but never secret values.

use std::time::Duration;

use anyhow::{Result, ensure};
use k8s_openapi::ByteString;
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::api::events::v1::Event;
use kube::api::{Api, ListParams, Patch, PatchParams};
use sandboxd::api::names::CAA_DAEMONSET;
use sandboxd::api::names::PEER_POD_CONFIG;
use sandboxd::api::peerpodconfig::CONDITION_CONFIG_VALID;
use sandboxd::operator::peerpods::caa::CONFIG_HASH_ANNOTATION;
use serde_json::json;

use super::support::{Fixture, WAIT};
use crate::harness::{Case, eventually};

const CLIENT_SECRET: &str = "s3cr3t-value-never-shown";
const SUBNET: &str = "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/vnet/subnets/worker-subnet";
/// A pod VM image the user provides (the CAA only starts once an image id is known).
const IMAGE: &str = "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg/providers/Microsoft.Compute/galleries/g/images/podvm/versions/1.0.0";
const NSG: &str = "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg/providers/Microsoft.Network/networkSecurityGroups/nsg";

pub fn cases() -> Vec<Case> {
    vec![
        Case::cluster_exclusive(
            "peerpods::a_missing_secret_key_or_a_size_not_in_the_list_makes_config_invalid_with_an_event",
            |env| async move {
                let fx = Fixture::start(&env).await?;
                let r = config_valid(&fx).await;
                let t = fx.teardown().await;
                r.and(t)
            },
        ),
        Case::cluster_exclusive(
            "peerpods::the_caa_daemonset_rolls_once_per_real_config_change_and_never_on_an_invalid_one",
            |env| async move {
                let fx = Fixture::start(&env).await?;
                let r = caa_daemonset_rolls_only_on_real_change(&fx).await;
                let t = fx.teardown().await;
                r.and(t)
            },
        ),
    ]
}

fn apply_secret(name: &str, data: &[(&str, &str)]) -> Secret {
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

fn cm(size: &str) -> ConfigMap {
    serde_json::from_value::<ConfigMap>(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": "peer-pods-cm"},
        "data": {
            "CLOUD_PROVIDER": "azure",
            "VXLAN_PORT": "9000",
            "AZURE_INSTANCE_SIZE": size,
            "AZURE_INSTANCE_SIZES": "Standard_B2als_v2,Standard_D2as_v5",
            "AZURE_SUBNET_ID": SUBNET,
            "AZURE_NSG_ID": NSG,
            "AZURE_IMAGE_ID": IMAGE,
            "AZURE_REGION": "eastus",
            "AZURE_RESOURCE_GROUP": "rg",
        },
    }))
    .unwrap()
}

async fn config_valid(fx: &Fixture) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(fx.admin.clone(), &fx.ns);
    let cms: Api<ConfigMap> = Api::namespaced(fx.admin.clone(), &fx.ns);
    let ssa = PatchParams::apply("sandboxd-test").force();
    let mut secret = apply_secret(
        "peer-pods-secret",
        &[
            (
                "AZURE_SUBSCRIPTION_ID",
                "11111111-2222-3333-4444-555555555555",
            ),
            ("AZURE_CLIENT_ID", "0a1b2c3d-0000-4000-8000-00000000000c"),
            ("AZURE_CLIENT_SECRET", CLIENT_SECRET),
        ],
    );
    secrets
        .patch("peer-pods-secret", &ssa, &Patch::Apply(&secret))
        .await?;
    secrets
        .patch(
            "ssh-key-secret",
            &ssa,
            &Patch::Apply(&apply_secret(
                "ssh-key-secret",
                &[(
                    "id_rsa.pub",
                    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOMqqnkVzrm0SdG6UOoqKLsabgH5C9okWi0dh2l9GKJl peerpod",
                )],
            )),
        )
        .await?;
    let mut cm_obj = cm("Standard_D8as_v5");
    cm_obj.metadata.namespace = None;
    cms.patch("peer-pods-cm", &ssa, &Patch::Apply(&cm_obj))
        .await?;

    fx.enable().await?;
    fx.wait_ppc().await?;
    let c = fx
        .wait_condition(CONDITION_CONFIG_VALID, "False", "InvalidConfig")
        .await?;
    ensure!(
        c.message.contains("peer-pods-secret: AZURE_TENANT_ID"),
        "message {:?}",
        c.message
    );
    ensure!(
        c.message.contains("AZURE_INSTANCE_SIZE")
            && c.message.contains("Standard_B2als_v2, Standard_D2as_v5"),
        "message {:?}",
        c.message
    );
    ensure!(!c.message.contains(CLIENT_SECRET), "secret value leaked");

    let events: Api<Event> = Api::namespaced(fx.admin.clone(), &fx.ns);
    let ev = eventually("ConfigValid warning Event", WAIT, || async {
        let list = events
            .list(&ListParams::default().fields(&format!("regarding.name={PEER_POD_CONFIG}")))
            .await?;
        Ok(list.items.into_iter().find(|e| {
            e.reason.as_deref() == Some("InvalidConfig") && e.type_.as_deref() == Some("Warning")
        }))
    })
    .await?;
    let note = ev.note.unwrap_or_default();
    ensure!(note.contains("AZURE_TENANT_ID"), "event note {note:?}");
    ensure!(
        !note.contains(CLIENT_SECRET),
        "secret value leaked into an event"
    );

    // The user fixes both: the condition turns True.
    secret.data.as_mut().unwrap().insert(
        "AZURE_TENANT_ID".into(),
        ByteString(b"0a1b2c3d-0000-4000-8000-00000000000e".to_vec()),
    );
    secrets
        .patch("peer-pods-secret", &ssa, &Patch::Apply(&secret))
        .await?;
    let mut cm_obj = cm("Standard_D2as_v5");
    cm_obj.metadata.namespace = None;
    cms.patch("peer-pods-cm", &ssa, &Patch::Apply(&cm_obj))
        .await?;
    fx.wait_condition(CONDITION_CONFIG_VALID, "True", "Valid")
        .await?;
    Ok(())
}

fn template_hash(ds: &DaemonSet) -> String {
    ds.spec
        .as_ref()
        .and_then(|s| s.template.metadata.as_ref())
        .and_then(|m| m.annotations.as_ref())
        .and_then(|a| a.get(CONFIG_HASH_ANNOTATION).cloned())
        .unwrap_or_default()
}

async fn caa_daemonset_rolls_only_on_real_change(fx: &Fixture) -> Result<()> {
    config_valid(fx).await?;
    let cms: Api<ConfigMap> = Api::namespaced(fx.admin.clone(), &fx.ns);
    let dss: Api<DaemonSet> = Api::namespaced(fx.admin.clone(), &fx.ns);
    let ds = eventually("CAA DaemonSet created", WAIT, || async {
        Ok(dss.get_opt(CAA_DAEMONSET).await?)
    })
    .await?;
    let pod = ds.spec.clone().unwrap().template.spec.unwrap();
    ensure!(pod.host_network == Some(true));
    ensure!(pod.service_account_name.as_deref() == Some("sandboxd-caa"));
    let c = &pod.containers[0];
    ensure!(c.security_context.as_ref().and_then(|s| s.privileged) == Some(true));
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
        "envFrom {env_from:?}"
    );
    let (g1, h1) = (ds.metadata.generation, template_hash(&ds));

    // Passes without a change never touch it.
    tokio::time::sleep(Duration::from_secs(7)).await;
    ensure!(
        dss.get(CAA_DAEMONSET).await?.metadata.generation == g1,
        "rewritten without a change"
    );

    // A real configmap change rolls it, exactly once.
    let ssa = PatchParams::apply("sandboxd-test").force();
    let mut changed = cm("Standard_D2as_v5");
    changed
        .data
        .as_mut()
        .unwrap()
        .insert("VXLAN_PORT".into(), "9001".into());
    changed.metadata.namespace = None;
    cms.patch("peer-pods-cm", &ssa, &Patch::Apply(&changed))
        .await?;
    let ds = eventually("CAA template hash changed", WAIT, || async {
        let ds = dss.get(CAA_DAEMONSET).await?;
        Ok((template_hash(&ds) != h1).then_some(ds))
    })
    .await?;
    ensure!(
        ds.metadata.generation == g1.map(|g| g + 1),
        "generation {:?} after {g1:?}",
        ds.metadata.generation
    );
    let (g2, h2) = (ds.metadata.generation, template_hash(&ds));
    tokio::time::sleep(Duration::from_secs(7)).await;
    ensure!(
        dss.get(CAA_DAEMONSET).await?.metadata.generation == g2,
        "rolled more than once"
    );

    // An invalid configuration never restarts the CAA.
    let mut broken = changed.clone();
    broken
        .data
        .as_mut()
        .unwrap()
        .insert("VXLAN_PORT".into(), "0".into());
    cms.patch("peer-pods-cm", &ssa, &Patch::Apply(&broken))
        .await?;
    fx.wait_condition(CONDITION_CONFIG_VALID, "False", "InvalidConfig")
        .await?;
    tokio::time::sleep(Duration::from_secs(7)).await;
    let ds = dss.get(CAA_DAEMONSET).await?;
    ensure!(
        ds.metadata.generation == g2 && template_hash(&ds) == h2,
        "the CAA was touched on an invalid configuration"
    );
    Ok(())
}
