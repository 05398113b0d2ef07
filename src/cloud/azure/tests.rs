//! Pure logic of the provider. Its behaviour against ARM is tested against the in-repo ARM
//! test server in `armtest` (this module imports nothing else of the crate).

use std::time::Duration;

use super::*;

#[test]
fn the_first_wait_follows_recent_operations_but_never_precedes_retry_after() {
    let l = Learned::default();
    let ra = Some(Duration::from_secs(1));
    assert_eq!(l.first_wait(ra), ra, "nothing learned yet: what ARM asks");
    // Seen running at the 1 s poll, done at the 2 s one.
    l.observe(Duration::from_millis(2000), 2, ra);
    assert_eq!(l.first_wait(ra), Some(Duration::from_millis(2000)));
    // Done at every first poll: the guess drifts down (it only knows "at most")...
    for _ in 0..12 {
        let w = l.first_wait(ra);
        l.observe(w.unwrap() + Duration::from_millis(5), 1, w);
    }
    let w = l.first_wait(ra).unwrap();
    assert!(w < Duration::from_millis(2000), "{w:?}");
    // ...but never below what ARM asks for.
    assert!(w >= Duration::from_secs(1), "{w:?}");
}

/// A create answer shaped like the spec's `VirtualMachine_Create_WithNetworkInterfaceConfiguration*`
/// examples: ARM answers the NIC id it chose, under a name the NIC configuration did not give.
#[test]
fn the_nic_is_the_one_the_vm_names_not_one_derived_from_the_vm_name() {
    let v: compute::models::VirtualMachine = serde_json::from_value(serde_json::json!({
        "id": "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/myVM",
        "type": "Microsoft.Compute/virtualMachines",
        "name": "myVM",
        "location": "westus",
        "properties": {
            "networkProfile": {"networkInterfaces": [
                {"id": "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/secondary",
                 "properties": {"primary": false}},
                {"id": "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/toBeCreatedNetworkInterface",
                 "properties": {"primary": true}}
            ]},
            "hardwareProfile": {"vmSize": "Standard_D1_v2"},
            "provisioningState": "Creating"
        }
    }))
    .unwrap();
    assert_eq!(
        primary_nic(&v).unwrap(),
        "/subscriptions/sub/resourceGroups/rg/providers/Microsoft.Network/networkInterfaces/toBeCreatedNetworkInterface"
    );
    let mut none = v.clone();
    none.properties
        .as_mut()
        .unwrap()
        .network_profile
        .as_mut()
        .unwrap()
        .network_interfaces
        .clear();
    assert_eq!(primary_nic(&none), None);
}

#[test]
fn user_data_is_refused_beyond_64_kib_of_base64_naming_both_sizes() {
    let spec = |n: usize| crate::cloud::VmSpec {
        name: "podvm-a-00000001".into(),
        size: "Standard_D2as_v5".into(),
        image_id: "/id".into(),
        user_data: Some("x".repeat(n)),
        ssh_public_key: None,
        tags: Default::default(),
    };
    // 49152 bytes are exactly 65536 base64 characters.
    assert_eq!(body::check_user_data(&spec(49152)), Ok(()));
    let err = body::check_user_data(&spec(49153)).unwrap_err();
    assert!(
        err.contains("49153 bytes") && err.contains("65540 in base64"),
        "{err}"
    );
    assert!(
        err.contains("at most 65536") && err.contains("49152 bytes"),
        "{err}"
    );
}
