//! CRI-O: a drop-in under `/etc/crio/crio.conf.d` (read natively) that adds the
//! `kata-remote` runtime handler, with images pulled in the pod VM (`runtime_pull_image`).

use super::kata_config::KATA_CONFIG;
use crate::api::names::RUNTIME_CLASS;

/// sandboxd's drop-in.
pub(crate) const DROPIN: &str = "/etc/crio/crio.conf.d/50-sandboxd-kata-remote.conf";
/// The systemd unit to restart.
pub(crate) const UNIT: &str = "crio.service";

/// The drop-in body.
pub(crate) fn dropin(shim: &str) -> String {
    format!(
        r#"[crio.runtime.runtimes.{RUNTIME_CLASS}]
runtime_path = "{shim}"
runtime_type = "vm"
runtime_root = "/run/vc"
runtime_config_path = "{KATA_CONFIG}"
privileged_without_host_devices = true
allowed_annotations = ["io.kubernetes.cri-o.Devices", "io.katacontainers.*"]
# Images are pulled inside the pod VM, not on the node (CRI-O 1.29 and later).
runtime_pull_image = true
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropin_declares_a_vm_runtime_using_our_kata_config() {
        let doc: toml_edit::DocumentMut =
            dropin("/usr/bin/containerd-shim-kata-v2").parse().unwrap();
        let rt = &doc["crio"]["runtime"]["runtimes"]["kata-remote"];
        assert_eq!(rt["runtime_type"].as_str(), Some("vm"));
        assert_eq!(rt["runtime_config_path"].as_str(), Some(KATA_CONFIG));
        assert_eq!(rt["runtime_pull_image"].as_bool(), Some(true));
        assert_eq!(
            rt["runtime_path"].as_str(),
            Some("/usr/bin/containerd-shim-kata-v2")
        );
    }
}
