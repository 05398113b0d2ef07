//! The kata runtime configuration for the remote hypervisor (`configuration-remote.toml`)
//! and where the kata shim is.

use std::path::Path;

use super::InstallConfig;

/// Where sandboxd writes the kata configuration on the host.
pub const KATA_CONFIG: &str = "/etc/sandboxd/configuration-remote.toml";
/// The directory of [`KATA_CONFIG`] (removed on uninstall when empty).
pub(crate) const KATA_CONFIG_DIR: &str = "/etc/sandboxd";

/// Where the kata shim may be on a host, in order of preference: kata-deploy's location,
/// then a local install, then the distribution package.
pub(crate) const SHIM_CANDIDATES: [&str; 3] = [
    "/opt/kata/bin/containerd-shim-kata-v2",
    "/usr/local/bin/containerd-shim-kata-v2",
    "/usr/bin/containerd-shim-kata-v2",
];

/// Where the node installer puts sandboxd's own shim (a copy of the sandboxd binary).
pub const SANDBOXD_SHIM: &str = "/opt/sandboxd/bin/containerd-shim-sandboxd-v2";

/// The host path of the kata shim, if installed under `root`.
pub(crate) fn find_shim(root: &Path) -> Option<&'static str> {
    SHIM_CANDIDATES
        .into_iter()
        .find(|p| super::files::host_path(root, p).is_file())
}

/// Whether a `logLevel` turns on the runtime's debug output.
pub(crate) fn debug_enabled(log_level: &str) -> bool {
    matches!(log_level, "debug" | "trace")
}

/// How the pod's images reach the pod VM on this node's runtime: always pulled inside the
/// VM (guest pull) — the node never needs the image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GuestPull {
    /// containerd without nydus-snapshotter: kata itself forces guest pull
    /// (`experimental_force_guest_pull`).
    Kata,
    /// CRI-O hands the image to the runtime (`runtime_pull_image` in its drop-in); kata
    /// needs nothing.
    Runtime,
}

/// The `kata-remote` configuration, as kata's upstream `configuration-remote.toml` (Go
/// runtime) has it, with these differences (docs/operator.md lists them with the reasons):
/// `enable_debug` follows `logLevel`; `enable_annotations` also names `default_gpu_model`
/// (what kata's Rust runtime calls `gpu_model`); `experimental_force_guest_pull = true` on
/// containerd; every key kata reads without a default (a missing one is 0 or empty) is
/// written with upstream's value rather than left out.
pub(crate) fn render(cfg: &InstallConfig, pull: GuestPull) -> String {
    let debug = debug_enabled(&cfg.log_level);
    let force_guest_pull = pull == GuestPull::Kata;
    format!(
        r#"# kata runtime configuration for peer pods (runtime class {rc}), after kata's
# configuration-remote.toml. logLevel {level:?}: debug output of runtime, agent and
# hypervisor client {onoff}.

[hypervisor.remote]
remote_hypervisor_socket = "{socket}"
# StartVM may take minutes (a cloud VM boots; CAA waits until its agent answers).
remote_hypervisor_timeout = 600
# Pod annotations a user may set; CAA sizes the VM from them.
enable_annotations = ["machine_type", "default_memory", "default_vcpus", "image", "default_gpus", "gpu_model", "default_gpu_model", "cc_init_data"]
firmware = ""
default_vcpus = 1
default_memory = 2048
default_bridges = 1
memory_slots = 10
enable_debug = {debug}
guest_hook_path = ""
disable_selinux = false
# The pod VM is another guest: the host's guest SELinux settings do not apply.
disable_guest_selinux = true

[agent.kata]
enable_debug = {debug}
enable_tracing = false
debug_console_enabled = false
dial_timeout = 30

[runtime]
enable_debug = {debug}
# The pod's network lives in the pod VM (CAA's VXLAN tunnel), not in kata's netns.
internetworking_model = "none"
disable_new_netns = true
disable_guest_seccomp = true
guest_selinux_label = ""
enable_tracing = false
jaeger_endpoint = ""
jaeger_user = ""
jaeger_password = ""
sandbox_cgroup_only = false
static_sandbox_resource_mgmt = true
vfio_mode = "guest-kernel"
disable_guest_empty_dir = false
emptydir_mode = "shared-fs"
experimental = []
enable_pprof = false
# Read without a default: 0 would time every CreateContainer out at once. With guest pull it
# includes pulling the image in the VM.
create_container_timeout = 60
dan_conf = "/run/kata-containers/dans"
kubelet_root_dir = "/var/lib/kubelet"
pod_resource_api_sock = ""
# Images are pulled inside the pod VM.
experimental_force_guest_pull = {force_guest_pull}
"#,
        rc = cfg.runtime_class,
        level = cfg.log_level,
        onoff = if debug { "on" } else { "off" },
        socket = cfg.hypervisor_socket,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn points_at_the_caa_socket_and_debug_follows_log_level() {
        let info = render(&InstallConfig::new("info"), GuestPull::Kata);
        assert!(info.contains("remote_hypervisor_socket = \"/run/peerpod/hypervisor.sock\""));
        assert!(info.contains("enable_debug = false") && !info.contains("enable_debug = true"));
        let debug = render(&InstallConfig::new("debug"), GuestPull::Kata);
        assert!(!debug.contains("enable_debug = false"));
        // The rendered file is valid TOML.
        debug.parse::<toml_edit::DocumentMut>().unwrap();
    }

    fn parsed(pull: GuestPull) -> toml_edit::DocumentMut {
        render(&InstallConfig::new("info"), pull).parse().unwrap()
    }

    #[test]
    fn the_remote_configuration_has_upstreams_values_for_keys_kata_reads_without_default() {
        let doc = parsed(GuestPull::Kata);
        let int = |t: &str, k: &str| doc[t][k].as_integer();
        let hv = &doc["hypervisor"]["remote"];
        assert_eq!(hv["remote_hypervisor_timeout"].as_integer(), Some(600));
        assert_eq!(hv["disable_guest_selinux"].as_bool(), Some(true));
        let annotations: Vec<&str> = hv["enable_annotations"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        for a in [
            "machine_type",
            "default_memory",
            "default_vcpus",
            "image",
            "default_gpus",
            "gpu_model",
            "default_gpu_model",
            "cc_init_data",
        ] {
            assert!(annotations.contains(&a), "enable_annotations lacks {a}");
        }
        let agent = &doc["agent"]["kata"];
        assert_eq!(agent["dial_timeout"].as_integer(), Some(30));
        // kata: "disable_new_netns only works with 'none' internetworking_model", and with
        // false the shim fails every pod ("Invalid internetworking model").
        assert_eq!(doc["runtime"]["disable_new_netns"].as_bool(), Some(true));
        assert_eq!(
            doc["runtime"]["internetworking_model"].as_str(),
            Some("none")
        );
        assert_eq!(int("runtime", "create_container_timeout"), Some(60));
        assert_eq!(
            doc["runtime"]["static_sandbox_resource_mgmt"].as_bool(),
            Some(true)
        );
        assert_eq!(doc["runtime"]["sandbox_cgroup_only"].as_bool(), Some(false));
        assert_eq!(
            doc["runtime"]["kubelet_root_dir"].as_str(),
            Some("/var/lib/kubelet")
        );
        assert_eq!(doc["runtime"]["emptydir_mode"].as_str(), Some("shared-fs"));
        assert_eq!(doc["runtime"]["vfio_mode"].as_str(), Some("guest-kernel"));
        assert!(
            doc["runtime"]["experimental"]
                .as_array()
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn containerd_nodes_force_guest_pull_in_kata_and_crio_nodes_leave_it_to_crio() {
        let pull = |p| parsed(p)["runtime"]["experimental_force_guest_pull"].as_bool();
        assert_eq!(pull(GuestPull::Kata), Some(true));
        assert_eq!(pull(GuestPull::Runtime), Some(false));
    }

    #[test]
    fn shim_is_found_under_the_root() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(find_shim(dir.path()), None);
        let p = dir.path().join("usr/bin");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::write(p.join("containerd-shim-kata-v2"), "").unwrap();
        assert_eq!(
            find_shim(dir.path()),
            Some("/usr/bin/containerd-shim-kata-v2")
        );
    }
}
