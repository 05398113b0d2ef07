//! The kata runtime configuration for the remote hypervisor (`configuration-remote.toml`)
//! and where the kata shim is.

use std::path::Path;

use super::InstallConfig;

/// Where sandboxd writes the kata configuration on the host.
pub const KATA_CONFIG: &str = "/etc/sandboxd/configuration-remote.toml";
/// The directory of [`KATA_CONFIG`] (removed on uninstall when empty).
pub const KATA_CONFIG_DIR: &str = "/etc/sandboxd";

/// Where the kata shim may be on a host, in order of preference: kata-deploy's location,
/// then a local install, then the distribution package.
pub const SHIM_CANDIDATES: [&str; 3] = [
    "/opt/kata/bin/containerd-shim-kata-v2",
    "/usr/local/bin/containerd-shim-kata-v2",
    "/usr/bin/containerd-shim-kata-v2",
];

/// The host path of the kata shim, if installed under `root`.
pub fn find_shim(root: &Path) -> Option<&'static str> {
    SHIM_CANDIDATES
        .into_iter()
        .find(|p| super::files::host_path(root, p).is_file())
}

/// Whether a `logLevel` turns on the runtime's debug output.
pub fn debug_enabled(log_level: &str) -> bool {
    matches!(log_level, "debug" | "trace")
}

/// The configuration: the remote hypervisor talks to the CAA's socket; debug follows
/// `logLevel`.
pub fn render(cfg: &InstallConfig) -> String {
    let debug = debug_enabled(&cfg.log_level);
    format!(
        r#"# kata runtime configuration for peer pods (runtime class {rc}).
# logLevel {level:?}: debug output of runtime, agent and hypervisor client {onoff}.

[hypervisor.remote]
remote_hypervisor_socket = "{socket}"
remote_hypervisor_timeout = 600
disable_guest_selinux = true
enable_annotations = ["machine_type", "default_memory", "default_vcpus", "default_gpus", "image"]
default_vcpus = 1
default_memory = 2048
enable_debug = {debug}

[agent.kata]
enable_debug = {debug}
dial_timeout = 90

[runtime]
enable_debug = {debug}
internetworking_model = "none"
disable_guest_seccomp = true
disable_new_netns = false
sandbox_cgroup_only = false
static_sandbox_resource_mgmt = true
enable_pprof = false
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
        let info = render(&InstallConfig::new("info"));
        assert!(info.contains("remote_hypervisor_socket = \"/run/peerpod/hypervisor.sock\""));
        assert!(info.contains("enable_debug = false") && !info.contains("enable_debug = true"));
        let debug = render(&InstallConfig::new("debug"));
        assert!(!debug.contains("enable_debug = false"));
        // The rendered file is valid TOML.
        debug.parse::<toml_edit::DocumentMut>().unwrap();
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
