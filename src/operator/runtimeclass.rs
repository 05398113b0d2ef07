//! The `kata-remote` RuntimeClass a KataConfig provides (pure).

use k8s_openapi::api::node::v1::RuntimeClass;
use serde_json::json;

use crate::api::kataconfig::KataConfig;
use crate::api::names::{LABEL_KATA, LABEL_MANAGED_BY, MANAGED_BY, RUNTIME_CLASS};
use crate::k8s::apply::stamp_hash;
use kube::Resource;

/// The RuntimeClass: handler `kata-remote`, pod overhead 250m CPU / 350Mi memory,
/// scheduled onto nodes with the kata label, owned by the KataConfig (hash-stamped).
pub(crate) fn desired(owner: &KataConfig) -> RuntimeClass {
    let owner_ref = owner.controller_owner_ref(&());
    let mut rc: RuntimeClass = serde_json::from_value(json!({
        "apiVersion": "node.k8s.io/v1",
        "kind": "RuntimeClass",
        "metadata": {
            "name": RUNTIME_CLASS,
            "labels": {LABEL_MANAGED_BY: MANAGED_BY},
            "ownerReferences": owner_ref.into_iter().collect::<Vec<_>>(),
        },
        "handler": RUNTIME_CLASS,
        "overhead": {"podFixed": {"cpu": "250m", "memory": "350Mi"}},
        "scheduling": {"nodeSelector": {LABEL_KATA: ""}},
    }))
    .expect("a static RuntimeClass always deserialises");
    stamp_hash(&mut rc);
    rc
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::api::resource::Quantity;

    #[test]
    fn runtime_class_matches_the_seed() {
        let mut kc = KataConfig::new("example-kataconfig", Default::default());
        kc.metadata.uid = Some("u1".into());
        let rc = desired(&kc);
        assert_eq!(rc.handler, "kata-remote");
        let pf = rc.overhead.unwrap().pod_fixed.unwrap();
        assert_eq!(pf["cpu"], Quantity("250m".into()));
        assert_eq!(pf["memory"], Quantity("350Mi".into()));
        let sel = rc.scheduling.unwrap().node_selector.unwrap();
        assert_eq!(sel[LABEL_KATA], "");
        let owner = &rc.metadata.owner_references.unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str()),
            ("KataConfig", "u1")
        );
    }
}
