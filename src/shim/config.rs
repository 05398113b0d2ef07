//! The kata configuration the `kata-remote` handler names (`ConfigPath` in its runtime
//! options, the file the node installer writes): the shim reads the keys kata's shim reads
//! for a remote hypervisor, so one drop-in serves kata's shim and sandboxd's alike.

use std::path::Path;
use std::time::Duration;

use toml_edit::DocumentMut;

use super::Error;

/// Where the node installer writes the configuration (used when containerd passes none).
pub(crate) const DEFAULT_PATH: &str = crate::operator::node_install::kata_config::KATA_CONFIG;
/// kata's remote hypervisor socket default.
pub(crate) const DEFAULT_HYPERVISOR_SOCKET: &str = "/run/peerpod/hypervisor.sock";

/// What the shim takes from the configuration.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Config {
    /// `hypervisor.remote.remote_hypervisor_socket`.
    pub(crate) hypervisor_socket: String,
    /// `hypervisor.remote.remote_hypervisor_timeout` (s); StartVM gets max(this, 600 s).
    pub(crate) hypervisor_timeout: Duration,
    /// `hypervisor.remote.enable_annotations`: which pod annotations reach CreateVM.
    pub(crate) enable_annotations: Vec<String>,
    /// `agent.kata.dial_timeout` (s): how long the agent may take to answer its first check.
    pub(crate) dial_timeout: Duration,
    /// `runtime.create_container_timeout` (s): CreateContainer's deadline (includes the
    /// image pull in the VM).
    pub(crate) create_container_timeout: Duration,
    /// `runtime.disable_guest_seccomp`: the spec's seccomp profile is not sent.
    pub(crate) disable_guest_seccomp: bool,
    /// `runtime.sandbox_bind_mounts`-free remote VMs copy files; this is the period at which
    /// copied directories are checked for changes (sandboxd's own key
    /// `runtime.sandboxd_watch_interval_ms`, default 1000).
    pub(crate) watch_interval: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            hypervisor_socket: DEFAULT_HYPERVISOR_SOCKET.into(),
            hypervisor_timeout: Duration::from_secs(600),
            enable_annotations: Vec::new(),
            dial_timeout: Duration::from_secs(30),
            create_container_timeout: Duration::from_secs(60),
            disable_guest_seccomp: true,
            watch_interval: Duration::from_secs(1),
        }
    }
}

impl Config {
    /// Parses the configuration text (`path` names it in errors).
    pub(crate) fn parse(path: &str, text: &str) -> Result<Self, Error> {
        let doc: DocumentMut = text.parse().map_err(|e| Error::Config {
            path: path.into(),
            detail: format!("{e}"),
        })?;
        let mut c = Config::default();
        let get = |path: &[&str]| -> Option<&toml_edit::Item> {
            let mut it = doc.as_item();
            for k in path {
                it = it.get(k)?;
            }
            Some(it)
        };
        let hv = |k: &str| get(&["hypervisor", "remote", k]);
        if let Some(s) = hv("remote_hypervisor_socket").and_then(|i| i.as_str()) {
            c.hypervisor_socket = s.to_string();
        }
        if let Some(t) = hv("remote_hypervisor_timeout").and_then(|i| i.as_integer()) {
            c.hypervisor_timeout = Duration::from_secs(t.max(0) as u64);
        }
        if let Some(a) = hv("enable_annotations").and_then(|i| i.as_array()) {
            c.enable_annotations = a
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
        }
        if let Some(t) = get(&["agent", "kata", "dial_timeout"]).and_then(|i| i.as_integer()) {
            c.dial_timeout = Duration::from_secs(t.max(1) as u64);
        }
        let rt = |k: &str| get(&["runtime", k]);
        // kata reads this without a default: 0 is what a missing key means there, which times
        // every CreateContainer out; sandboxd keeps kata's upstream value instead.
        if let Some(t) = rt("create_container_timeout").and_then(|i| i.as_integer())
            && t > 0
        {
            c.create_container_timeout = Duration::from_secs(t as u64);
        }
        if let Some(b) = rt("disable_guest_seccomp").and_then(|i| i.as_bool()) {
            c.disable_guest_seccomp = b;
        }
        if let Some(ms) = rt("sandboxd_watch_interval_ms").and_then(|i| i.as_integer())
            && ms > 0
        {
            c.watch_interval = Duration::from_millis(ms as u64);
        }
        Ok(c)
    }

    /// Reads the configuration at `path`.
    pub(crate) fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::Config {
            path: path.display().to_string(),
            detail: e.to_string(),
        })?;
        Self::parse(&path.display().to_string(), &text)
    }

    /// StartVM's deadline: kata gives it max(remote_hypervisor_timeout, 600 s).
    pub(crate) fn start_vm_timeout(&self) -> Duration {
        self.hypervisor_timeout.max(Duration::from_secs(600))
    }

    /// Whether the pod annotation `io.katacontainers.config.hypervisor.<key>` may be used.
    pub(crate) fn annotation_enabled(&self, key: &str) -> bool {
        self.enable_annotations.iter().any(|a| a == key)
    }
}

/// The configuration file named by the runtime options containerd passes in Create
/// (`runtimeoptions.v1.Options`: field 1 `type_url`, field 2 `config_path`), else
/// `KATA_CONF_FILE`, else [`DEFAULT_PATH`].
pub(crate) fn path_from_options(options: Option<&protobuf::well_known_types::any::Any>) -> String {
    if let Some(any) = options
        && let Some(p) = config_path_field(&any.value)
        && !p.is_empty()
    {
        return p;
    }
    std::env::var("KATA_CONF_FILE").unwrap_or_else(|_| DEFAULT_PATH.into())
}

/// Field 2 (a string) of a protobuf message, skipping everything else.
fn config_path_field(bytes: &[u8]) -> Option<String> {
    let mut is = protobuf::CodedInputStream::from_bytes(bytes);
    let mut found = None;
    while !is.eof().ok()? {
        let tag = is.read_raw_varint32().ok()?;
        match tag & 7 {
            0 => {
                is.read_raw_varint64().ok()?;
            }
            1 => is.skip_raw_bytes(8).ok()?,
            2 => {
                let n = is.read_raw_varint32().ok()?;
                let b = is.read_raw_bytes(n).ok()?;
                if tag >> 3 == 2 {
                    found = Some(String::from_utf8(b).ok()?);
                }
            }
            5 => is.skip_raw_bytes(4).ok()?,
            _ => return None,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operator::node_install::{InstallConfig, kata_config};

    #[test]
    fn reads_what_the_node_installer_writes() {
        let text = kata_config::render(&InstallConfig::new("info"), kata_config::GuestPull::Kata);
        let c = Config::parse("x", &text).unwrap();
        assert_eq!(c.hypervisor_socket, "/run/peerpod/hypervisor.sock");
        assert_eq!(c.start_vm_timeout(), Duration::from_secs(600));
        assert_eq!(c.dial_timeout, Duration::from_secs(30));
        assert_eq!(c.create_container_timeout, Duration::from_secs(60));
        assert!(c.annotation_enabled("machine_type"));
        assert!(c.annotation_enabled("default_vcpus"));
        assert!(!c.annotation_enabled("kernel_params"));
        assert!(c.disable_guest_seccomp);
    }

    #[test]
    fn start_vm_gets_at_least_600_seconds_and_a_bad_file_names_itself() {
        let c = Config::parse(
            "f",
            "[hypervisor.remote]\nremote_hypervisor_timeout = 30\n[runtime]\ncreate_container_timeout = 0\n",
        )
        .unwrap();
        assert_eq!(c.start_vm_timeout(), Duration::from_secs(600));
        assert_eq!(c.create_container_timeout, Duration::from_secs(60));
        let e = Config::parse("/etc/x.toml", "[[[").unwrap_err();
        assert!(e.to_string().contains("/etc/x.toml"), "{e}");
    }

    #[test]
    fn the_config_path_comes_from_containerds_runtime_options() {
        use protobuf::Message;
        // runtimeoptions.v1.Options{type_url = "x", config_path = "/etc/k.toml"}.
        let mut out = Vec::new();
        {
            let mut os = protobuf::CodedOutputStream::vec(&mut out);
            os.write_string(1, "x").unwrap();
            os.write_string(2, "/etc/k.toml").unwrap();
            os.flush().unwrap();
        }
        let mut any = protobuf::well_known_types::any::Any::new();
        any.type_url = "runtimeoptions.v1.Options".into();
        any.value = out;
        assert_eq!(path_from_options(Some(&any)), "/etc/k.toml");
        let _ = any.write_to_bytes().unwrap();
    }
}
