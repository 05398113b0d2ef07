use axum::body::Body;
use axum::http::Request;
use serde_json::{Value, json};
use tower::ServiceExt;

use super::*;

const SUB: &str = "11111111-2222-3333-4444-555555555555";

async fn call(
    router: &Router,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Value,
) -> (u16, HeaderMap, Value) {
    let mut req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", "arm.test");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let req = if method == "POST" && path.contains("oauth2") {
        req.body(Body::from(body.as_str().unwrap_or_default().to_string()))
            .unwrap()
    } else {
        req.header("content-type", "application/json")
            .body(Body::from(body.to_string()))
            .unwrap()
    };
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20)
        .await
        .unwrap();
    (
        status,
        headers,
        serde_json::from_slice(&bytes).unwrap_or(Value::Null),
    )
}

async fn token(router: &Router) -> String {
    let (s, _, v) = call(router, "POST", "/tenant/oauth2/v2.0/token", None,
        json!("grant_type=client_credentials&client_id=a&client_secret=b&scope=https%3A%2F%2Fmanagement.azure.com%2F.default")).await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["token_type"], "Bearer");
    v["access_token"].as_str().unwrap().to_string()
}

fn vm_body(h: &Handle) -> Value {
    let (subnet, nsg, image) = h.seed_peer_pods(SUB, "rg", "eastus");
    json!({"location": "eastus", "properties": {
        "hardwareProfile": {"vmSize": "Standard_D2as_v5"},
        "storageProfile": {"imageReference": {"id": image}, "osDisk": {"createOption": "FromImage", "deleteOption": "Delete"}},
        "osProfile": {"computerName": "vm1", "adminUsername": "peerpod",
            "linuxConfiguration": {"disablePasswordAuthentication": true, "ssh": {"publicKeys": [{"path": "/home/peerpod/.ssh/authorized_keys", "keyData": "ssh-ed25519 AAAA"}]}}},
        "networkProfile": {"networkApiVersion": "2020-11-01", "networkInterfaceConfigurations": [{"name": "vm1-nic",
            "properties": {"deleteOption": "Delete", "networkSecurityGroup": {"id": nsg},
                "ipConfigurations": [{"name": "ip", "properties": {"subnet": {"id": subnet}}}]}}]}
    }})
}

const VM: &str = "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1";

#[tokio::test]
async fn requests_need_a_token_and_an_api_version() {
    let (r, h) = router(Config::default());
    h.seed_peer_pods(SUB, "rg", "eastus");
    let (s, _, v) = call(
        &r,
        "GET",
        &format!("{VM}?api-version=2024-07-01"),
        None,
        Value::Null,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("AuthenticationFailed"))
    );
    let t = token(&r).await;
    let (s, _, v) = call(&r, "GET", VM, Some(&t), Value::Null).await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("MissingApiVersionParameter"))
    );
    let (s, _, v) = call(
        &r,
        "GET",
        &format!("{VM}?api-version=2010-01-01"),
        Some(&t),
        Value::Null,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("NoRegisteredProviderFound")),
        "{v}"
    );
}

#[tokio::test]
async fn a_vm_put_is_a_long_running_operation_followed_through_azure_asyncoperation() {
    let (r, h) = router(Config {
        lro_duration: std::time::Duration::from_millis(100),
        ..Config::default()
    });
    let t = token(&r).await;
    let body = vm_body(&h);
    let (s, headers, v) = call(
        &r,
        "PUT",
        &format!("{VM}?api-version=2024-07-01"),
        Some(&t),
        body.clone(),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["properties"]["provisioningState"], "Creating");
    let op = headers["azure-asyncoperation"]
        .to_str()
        .unwrap()
        .replace("http://arm.test", "");
    let (_, _, st) = call(&r, "GET", &op, Some(&t), Value::Null).await;
    assert_eq!(st["status"], "InProgress");
    // A repeated PUT is idempotent: same VM, no second NIC.
    let (s, _, _) = call(
        &r,
        "PUT",
        &format!("{VM}?api-version=2024-07-01"),
        Some(&t),
        body,
    )
    .await;
    assert_eq!(s, 200);
    tokio::time::sleep(std::time::Duration::from_millis(150)).await;
    let (_, _, st) = call(&r, "GET", &op, Some(&t), Value::Null).await;
    assert_eq!(st["status"], "Succeeded");
    let (_, _, v) = call(
        &r,
        "GET",
        &format!("{VM}?api-version=2024-07-01"),
        Some(&t),
        Value::Null,
    )
    .await;
    assert_eq!(v["properties"]["provisioningState"], "Succeeded");
    let nic = v["properties"]["networkProfile"]["networkInterfaces"][0]["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, _, n) = call(
        &r,
        "GET",
        &format!("{nic}?api-version=2020-11-01"),
        Some(&t),
        Value::Null,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(
        n["properties"]["ipConfigurations"][0]["properties"]["privateIPAddress"],
        "10.0.1.4"
    );
    assert_eq!(h.vms().len(), 1);
}

#[tokio::test]
async fn invalid_vm_bodies_are_rejected_naming_the_field() {
    let (r, h) = router(Config::default());
    let t = token(&r).await;
    let mut body = vm_body(&h);
    body["properties"]["networkProfile"]
        .as_object_mut()
        .unwrap()
        .remove("networkApiVersion");
    let (s, _, v) = call(
        &r,
        "PUT",
        &format!("{VM}?api-version=2024-07-01"),
        Some(&t),
        body,
    )
    .await;
    assert_eq!(s, 400);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("networkApiVersion"),
        "{v}"
    );
    let mut body = vm_body(&h);
    body["properties"]["networkProfile"]["networkInterfaceConfigurations"][0]["properties"]["ipConfigurations"]
        [0]["properties"]["subnet"]["id"] = json!(
        "/subscriptions/x/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v/subnets/missing"
    );
    let (s, _, v) = call(
        &r,
        "PUT",
        &format!("{VM}?api-version=2024-07-01"),
        Some(&t),
        body,
    )
    .await;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (400, Some("InvalidResourceReference"))
    );
    assert!(h.vms().is_empty());
}

/// A Trusted Launch VM from a shared or community gallery image is refused unless the
/// image's definition declares Trusted Launch, as for the subscription's own galleries.
#[tokio::test]
async fn a_trusted_launch_vm_needs_a_shared_or_community_image_that_declares_it() {
    let (r, h) = router(Config::default());
    let t = token(&r).await;
    for (community, declared, status) in [
        (false, None, 400),
        (true, Some("ConfidentialVMSupported"), 400),
        (false, Some("TrustedLaunchSupported"), 201),
        (true, Some("TrustedLaunch"), 201),
    ] {
        let image = h.seed_shared_gallery_image(SUB, community, "eastus", "g1", "podvm", declared);
        let mut body = vm_body(&h);
        body["properties"]["storageProfile"]["imageReference"] = if community {
            json!({"communityGalleryImageId": image})
        } else {
            json!({"sharedGalleryImageId": image})
        };
        body["properties"]["securityProfile"] = json!({"securityType": "TrustedLaunch",
            "uefiSettings": {"secureBootEnabled": true, "vTpmEnabled": true}});
        let vm = format!("{VM}-{community}-{status}-{}", declared.unwrap_or("none"));
        let (s, _, v) = call(
            &r,
            "PUT",
            &format!("{vm}?api-version=2024-07-01"),
            Some(&t),
            body,
        )
        .await;
        assert_eq!(s, status, "{image} declaring {declared:?}: {v}");
        if s == 400 {
            assert!(
                v["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("security type")),
                "{v}"
            );
        }
    }
}

#[tokio::test]
async fn injected_throttling_answers_429_with_retry_after_then_expires() {
    let (r, h) = router(Config::default());
    let t = token(&r).await;
    h.inject(Fault::new(
        "GET",
        "virtualMachines",
        1,
        FaultKind::Status {
            status: 429,
            code: "TooManyRequests".into(),
            retry_after_secs: Some(3),
            retry_after_ms: None,
        },
    ));
    let (s, headers, _) = call(
        &r,
        "GET",
        &format!("{VM}?api-version=2024-07-01"),
        Some(&t),
        Value::Null,
    )
    .await;
    assert_eq!(s, 429);
    assert_eq!(headers["retry-after"], "3");
    let (s, _, _) = call(
        &r,
        "GET",
        &format!("{VM}?api-version=2024-07-01"),
        Some(&t),
        Value::Null,
    )
    .await;
    assert_eq!(s, 404);
    let log = h.requests();
    assert_eq!(
        log.iter()
            .filter(|l| l.fault.as_deref() == Some("status_429"))
            .count(),
        1
    );
}

#[tokio::test]
async fn the_write_limit_throttles_a_burst() {
    let (r, _) = router(Config {
        writes_per_second: 2,
        ..Config::default()
    });
    let t = token(&r).await;
    let mut statuses = Vec::new();
    for i in 0..4 {
        let (s, _, _) = call(
            &r,
            "PUT",
            &format!("/subscriptions/{SUB}/resourceGroups/rg{i}?api-version=2021-04-01"),
            Some(&t),
            json!({"location": "eastus"}),
        )
        .await;
        statuses.push(s);
    }
    assert_eq!(statuses, vec![201, 201, 429, 429]);
}

#[tokio::test]
async fn storage_account_keys_are_listed() {
    let (r, h) = router(Config {
        lro_duration: std::time::Duration::ZERO,
        ..Config::default()
    });
    let t = token(&r).await;
    h.seed_peer_pods(SUB, "rg", "eastus");
    let sa = format!(
        "/subscriptions/{SUB}/resourceGroups/rg/providers/Microsoft.Storage/storageAccounts/podvmimages"
    );
    let (s, _, v) = call(
        &r,
        "PUT",
        &format!("{sa}?api-version=2023-01-01"),
        Some(&t),
        json!({"location": "eastus"}),
    )
    .await;
    assert_eq!(s, 400, "sku and kind are required: {v}");
    let (s, _, _) = call(
        &r,
        "PUT",
        &format!("{sa}?api-version=2023-01-01"),
        Some(&t),
        json!({"location": "eastus", "sku": {"name": "Standard_LRS"}, "kind": "StorageV2"}),
    )
    .await;
    // Storage creates are long-running: 202 and a Location to poll.
    assert_eq!(s, 202);
    let (s, _, v) = call(
        &r,
        "POST",
        &format!("{sa}/listKeys?api-version=2023-01-01"),
        Some(&t),
        Value::Null,
    )
    .await;
    assert_eq!(s, 200);
    assert_eq!(v["keys"][0]["keyName"], "key1");
}
