//! VM sizes from the Resource SKUs list (`GET …/providers/Microsoft.Compute/skus` with
//! `$filter=location eq '<region>'`; the `vmSizes` list is deprecated in the spec): vCPUs,
//! memory, GPUs, Premium storage, the zones a size is offered in, and the restrictions that
//! make a size unusable for the subscription, in the region or in some zones. Sizes that
//! cannot be used are refused when CAA starts, before any create.

use serde_json::Value;

/// The api-version of the Resource SKUs list.
pub(crate) const SKUS_API: &str = "2021-07-01";

/// A VM size as the Resource SKUs list describes it for one region.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Sku {
    /// `Standard_D2as_v5`.
    pub(crate) name: String,
    /// `vCPUs`.
    pub(crate) vcpus: u32,
    /// `MemoryGB`, in MiB.
    pub(crate) memory_mib: u64,
    /// `GPUs` (0 when absent).
    pub(crate) gpus: u32,
    /// `PremiumIO`: whether Premium SSD disks may be attached.
    pub(crate) premium_io: bool,
    /// Zones the size is offered in, in the region.
    pub(crate) zones: Vec<String>,
    /// Why the size is unusable in the whole region, if it is (`reasonCode`).
    pub(crate) location_restriction: Option<String>,
    /// Zones where it is unusable.
    pub(crate) restricted_zones: Vec<String>,
}

/// One entry of the list, if it is a VM size offered in `region`.
pub(crate) fn parse(v: &Value, region: &str) -> Option<Sku> {
    if !v["resourceType"]
        .as_str()
        .is_some_and(|t| t.eq_ignore_ascii_case("virtualMachines"))
    {
        return None;
    }
    let in_region = |l: &Value| l.as_str().is_some_and(|l| l.eq_ignore_ascii_case(region));
    if !v["locations"]
        .as_array()
        .is_some_and(|ls| ls.iter().any(in_region))
    {
        return None;
    }
    let cap = |n: &str| {
        v["capabilities"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|c| c["name"].as_str() == Some(n))
            .and_then(|c| c["value"].as_str())
    };
    let strings = |a: &Value| -> Vec<String> {
        a.as_array()
            .into_iter()
            .flatten()
            .filter_map(|z| z.as_str().map(str::to_string))
            .collect()
    };
    let zones = v["locationInfo"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|i| in_region(&i["location"]))
        .map(|i| strings(&i["zones"]))
        .unwrap_or_default();
    let mut location_restriction = None;
    let mut restricted_zones = Vec::new();
    for r in v["restrictions"].as_array().into_iter().flatten() {
        let reason = r["reasonCode"].as_str().unwrap_or("restricted").to_string();
        match r["type"].as_str() {
            Some("Location")
                if r["values"]
                    .as_array()
                    .is_some_and(|vs| vs.iter().any(in_region)) =>
            {
                location_restriction = Some(reason)
            }
            Some("Zone") => restricted_zones.extend(strings(&r["restrictionInfo"]["zones"])),
            _ => {}
        }
    }
    let memory_gb: f64 = cap("MemoryGB").and_then(|m| m.parse().ok()).unwrap_or(0.0);
    Some(Sku {
        name: v["name"].as_str()?.to_string(),
        vcpus: cap("vCPUs").and_then(|c| c.parse().ok()).unwrap_or(0),
        memory_mib: (memory_gb * 1024.0).round() as u64,
        gpus: cap("GPUs").and_then(|c| c.parse().ok()).unwrap_or(0),
        premium_io: cap("PremiumIO").is_some_and(|p| p.eq_ignore_ascii_case("true")),
        zones,
        location_restriction,
        restricted_zones,
    })
}

impl Sku {
    /// The zones among `wanted` this size can be created in (empty `wanted`: no zones), or
    /// why it cannot be used at all in `region` with an OS disk of `os_disk_type`.
    pub(crate) fn usable_zones(
        &self,
        region: &str,
        wanted: &[String],
        os_disk_type: &str,
    ) -> Result<Vec<String>, String> {
        if let Some(reason) = &self.location_restriction {
            return Err(format!(
                "size {} is restricted for this subscription in {region} ({reason})",
                self.name
            ));
        }
        if os_disk_type.starts_with("Premium") && !self.premium_io {
            return Err(format!(
                "size {} cannot use {os_disk_type} disks (no Premium storage): choose a size with Premium storage or set AZURE_OS_DISK_TYPE=StandardSSD_LRS",
                self.name
            ));
        }
        if wanted.is_empty() {
            return Ok(Vec::new());
        }
        let usable: Vec<String> = wanted
            .iter()
            .filter(|z| self.zones.contains(z) && !self.restricted_zones.contains(z))
            .cloned()
            .collect();
        if usable.is_empty() {
            return Err(format!(
                "size {} is not available in zones {} of {region} for this subscription (offered in: {})",
                self.name,
                wanted.join(", "),
                match self
                    .zones
                    .iter()
                    .filter(|z| !self.restricted_zones.contains(z))
                    .cloned()
                    .collect::<Vec<_>>()
                {
                    z if z.is_empty() => "none".to_string(),
                    z => z.join(", "),
                }
            ));
        }
        Ok(usable)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries shaped like the spec's `ListAvailableResourceSkusForARegion` example, with
    /// the `restrictions` and `GPUs` the model defines.
    fn list() -> Value {
        serde_json::json!({"value": [
            {"resourceType": "virtualMachines", "locations": ["westus"],
             "capabilities": [{"name": "vCPUs", "value": "1"}, {"name": "MemoryGB", "value": "0.75"},
                              {"name": "PremiumIO", "value": "False"}],
             "locationInfo": [{"location": "westus", "zones": ["2", "1"],
                               "zoneDetails": [{"name": ["2"], "capabilities": [{"name": "UltraSSDAvailable", "value": "True"}]}]}],
             "name": "Standard_A0", "tier": "Standard", "size": "A0", "family": "standardA0_A7Family"},
            {"resourceType": "virtualMachines", "locations": ["westus"],
             "capabilities": [{"name": "vCPUs", "value": "6"}, {"name": "MemoryGB", "value": "112"},
                              {"name": "GPUs", "value": "1"}, {"name": "PremiumIO", "value": "True"}],
             "locationInfo": [{"location": "westus", "zones": ["1", "2", "3"]}],
             "restrictions": [{"type": "Zone", "values": ["westus"],
                               "restrictionInfo": {"locations": ["westus"], "zones": ["3"]},
                               "reasonCode": "NotAvailableForSubscription"}],
             "name": "Standard_NC6s_v3", "tier": "Standard", "size": "NC6s_v3", "family": "standardNCSv3Family"},
            {"resourceType": "virtualMachines", "locations": ["westus"],
             "capabilities": [{"name": "vCPUs", "value": "2"}, {"name": "MemoryGB", "value": "8"},
                              {"name": "PremiumIO", "value": "True"}],
             "locationInfo": [{"location": "westus", "zones": ["1", "2", "3"]}],
             "restrictions": [{"type": "Location", "values": ["westus"],
                               "restrictionInfo": {"locations": ["westus"]},
                               "reasonCode": "NotAvailableForSubscription"}],
             "name": "Standard_D2as_v5", "tier": "Standard", "size": "D2as_v5", "family": "standardDASv5Family"},
            {"resourceType": "disks", "locations": ["westus"], "name": "Premium_LRS"}
        ], "nextLink": null})
    }

    #[test]
    fn skus_give_size_zones_gpus_and_restrictions() {
        let skus: Vec<Sku> = list()["value"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| parse(v, "westus"))
            .collect();
        assert_eq!(skus.len(), 3, "disks are not VM sizes");
        assert_eq!(skus[0].memory_mib, 768);
        assert!(!skus[0].premium_io);
        let gpu = &skus[1];
        assert_eq!((gpu.vcpus, gpu.gpus, gpu.memory_mib), (6, 1, 112 * 1024));
        let z = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            gpu.usable_zones("westus", &z(&["2", "3"]), "Premium_LRS"),
            Ok(z(&["2"]))
        );
        let err = gpu
            .usable_zones("westus", &z(&["3"]), "Premium_LRS")
            .unwrap_err();
        assert!(
            err.contains("zones 3") && err.contains("offered in: 1, 2"),
            "{err}"
        );
        let err = skus[2]
            .usable_zones("westus", &[], "Premium_LRS")
            .unwrap_err();
        assert!(err.contains("NotAvailableForSubscription"), "{err}");
        let err = skus[0]
            .usable_zones("westus", &[], "Premium_LRS")
            .unwrap_err();
        assert!(err.contains("AZURE_OS_DISK_TYPE"), "{err}");
        assert_eq!(
            skus[0].usable_zones("westus", &[], "StandardSSD_LRS"),
            Ok(vec![])
        );
        assert!(parse(&list()["value"][0], "eastus").is_none());
    }
}
