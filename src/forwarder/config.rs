//! The forwarder's configuration (upstream's `apf.json`) and how it travels: as JSON, or
//! inside a `#cloud-config` user-data document (`write_files` entry ending in `apf.json`,
//! plain or `encoding: b64`) from Azure IMDS or a NoCloud seed.

use base64::Engine;
use serde::{Deserialize, Serialize};

use super::Error;

/// Where the config file lands in the VM, as named in the cloud-config.
pub(crate) const APF_PATH: &str = "/run/peerpod/apf.json";
/// Largest user data Azure accepts.
#[cfg(test)]
pub(crate) const MAX_USER_DATA: usize = 64 * 1024;
/// Largest MTU of the pod interface in the VM (VXLAN overhead on a 1500 underlay).
pub(crate) const MAX_MTU: u32 = 1450;

/// `apf.json`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
pub struct Config {
    /// The pod network inside the VM.
    #[serde(rename = "pod-network")]
    pub pod_network: PodNetwork,
    /// The pod's namespace.
    #[serde(rename = "pod-namespace", default)]
    pub pod_namespace: String,
    /// The pod's name.
    #[serde(rename = "pod-name", default)]
    pub pod_name: String,
    /// PEM private key of the forwarder's server certificate.
    #[serde(rename = "tls-server-key")]
    pub tls_server_key: String,
    /// PEM server certificate (CN/SAN = VM name), issued by the CAA CA.
    #[serde(rename = "tls-server-cert")]
    pub tls_server_cert: String,
    /// PEM CA whose client certificates the forwarder accepts.
    #[serde(rename = "tls-client-ca")]
    pub tls_client_ca: String,
}

/// The pod's interface, as the worker's CNI configured it, to recreate in the VM.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct PodNetwork {
    /// Pod IP with prefix length, e.g. `10.128.2.14/23`.
    pub podip: String,
    /// The pod interface's MAC address.
    #[serde(rename = "pod-hw-addr")]
    pub pod_hw_addr: String,
    /// The pod interface's name (`eth0`).
    pub interface: String,
    /// The worker's IP: the remote end of the VXLAN tunnel.
    #[serde(rename = "worker-node-ip")]
    pub worker_node_ip: String,
    /// Always `vxlan`.
    #[serde(rename = "tunnel-type")]
    pub tunnel_type: String,
    /// MTU of the pod interface (capped at 1450).
    pub mtu: u32,
    /// UDP port of the tunnel (`VXLAN_PORT`).
    #[serde(rename = "vxlan-port")]
    pub vxlan_port: u16,
    /// VXLAN network identifier of this pod.
    #[serde(rename = "vxlan-id")]
    pub vxlan_id: u32,
    /// Routes of the pod namespace.
    #[serde(default)]
    pub routes: Vec<Route>,
    /// Static neighbours of the pod namespace.
    #[serde(default)]
    pub neighbors: Vec<Neighbor>,
}

/// One route: destination CIDR, optional gateway, device.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Route {
    /// Destination with prefix length (`0.0.0.0/0` for the default route).
    pub(crate) dst: String,
    /// Gateway, empty for on-link routes.
    #[serde(default)]
    pub(crate) gw: String,
    /// Device name.
    #[serde(default)]
    pub(crate) dev: String,
}

/// One permanent neighbour entry.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
pub struct Neighbor {
    /// IP address.
    pub(crate) ip: String,
    /// MAC address.
    #[serde(rename = "hw-addr")]
    pub(crate) hw_addr: String,
    /// Device name.
    #[serde(default)]
    pub(crate) dev: String,
}

#[derive(Deserialize)]
struct CloudConfig {
    #[serde(default)]
    write_files: Vec<WriteFile>,
}

#[derive(Deserialize)]
struct WriteFile {
    path: String,
    #[serde(default)]
    content: String,
    #[serde(default)]
    encoding: Option<String>,
}

/// Registry credentials in the VM (a container `auth.json`), as CAA writes them from the
/// pod's pull secrets; `sandboxd agent` reads them at each pull.
pub(crate) const AUTH_PATH: &str = "/run/peerpod/auth.json";

/// The files of a `#cloud-config` for the VM besides `apf.json`: those init writes for the
/// agent ([`AUTH_PATH`]). Anything else is ignored.
pub(crate) fn extra_files(text: &str) -> Result<Vec<(String, Vec<u8>)>, Error> {
    let t = text.trim_start();
    if !t.starts_with("#cloud-config") {
        return Ok(Vec::new());
    }
    let cc: CloudConfig =
        serde_saphyr::from_str(t).map_err(|e| Error::Config(format!("user data: {e}")))?;
    let mut out = Vec::new();
    for f in cc.write_files.into_iter().filter(|f| f.path == AUTH_PATH) {
        let data = match f.encoding.as_deref() {
            None | Some("text/plain") => f.content.into_bytes(),
            Some("b64" | "base64") => base64::engine::general_purpose::STANDARD
                .decode(f.content.trim())
                .map_err(|e| Error::Config(format!("{}: not valid base64: {e}", f.path)))?,
            Some(other) => {
                return Err(Error::Config(format!(
                    "{}: unsupported write_files encoding {other:?}",
                    f.path
                )));
            }
        };
        out.push((f.path, data));
    }
    Ok(out)
}

impl Config {
    /// The `#cloud-config` document that delivers this config and registry credentials
    /// (an `auth.json`) with it.
    pub fn to_user_data_with_auth(&self, auth_json: &str) -> String {
        let b64 = base64::engine::general_purpose::STANDARD.encode(auth_json);
        format!(
            "{}- path: {AUTH_PATH}\n  permissions: '0600'\n  encoding: b64\n  content: {b64}\n",
            self.to_user_data()
        )
    }

    /// Parses JSON or a `#cloud-config` document carrying `apf.json`.
    pub(crate) fn from_user_data(text: &str) -> Result<Self, Error> {
        let bad = |m: String| Error::Config(m);
        let t = text.trim_start();
        let json = if t.starts_with('{') {
            t.to_string()
        } else if t.starts_with("#cloud-config") {
            let cc: CloudConfig = serde_saphyr::from_str(t)
                .map_err(|e| bad(format!("user data is not a valid #cloud-config: {e}")))?;
            let f = cc
                .write_files
                .into_iter()
                .find(|f| f.path.ends_with("apf.json"))
                .ok_or_else(|| {
                    bad("the #cloud-config has no write_files entry for apf.json".into())
                })?;
            match f.encoding.as_deref() {
                None | Some("text/plain") => f.content,
                Some("b64" | "base64") => {
                    let raw = base64::engine::general_purpose::STANDARD
                        .decode(f.content.trim())
                        .map_err(|e| bad(format!("apf.json is not valid base64: {e}")))?;
                    String::from_utf8(raw).map_err(|_| bad("apf.json is not UTF-8".into()))?
                }
                Some(other) => {
                    return Err(bad(format!("unsupported write_files encoding {other:?}")));
                }
            }
        } else {
            return Err(bad(
                "user data is neither JSON nor a #cloud-config document".into(),
            ));
        };
        let c: Config = serde_json::from_str(&json).map_err(|e| bad(format!("apf.json: {e}")))?;
        c.validate()?;
        Ok(c)
    }

    /// The `#cloud-config` document that delivers this config.
    pub fn to_user_data(&self) -> String {
        let json = serde_json::to_vec(self).expect("config serialises");
        let b64 = base64::engine::general_purpose::STANDARD.encode(json);
        format!(
            "#cloud-config\nwrite_files:\n- path: {APF_PATH}\n  permissions: '0600'\n  encoding: b64\n  content: {b64}\n"
        )
    }

    /// Checks what the forwarder relies on.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        let n = &self.pod_network;
        let mut problems = Vec::new();
        if n.tunnel_type != "vxlan" {
            problems.push(format!(
                "tunnel-type must be vxlan, found {:?}",
                n.tunnel_type
            ));
        }
        if crate::cloud::net::parse_cidr(&n.podip).is_none() {
            problems.push(format!("podip must be an IPv4 CIDR, found {:?}", n.podip));
        }
        if crate::cloud::net::parse_mac(&n.pod_hw_addr).is_none() {
            problems.push(format!(
                "pod-hw-addr must be a MAC address, found {:?}",
                n.pod_hw_addr
            ));
        }
        if n.worker_node_ip.parse::<std::net::Ipv4Addr>().is_err() {
            problems.push(format!(
                "worker-node-ip must be an IPv4 address, found {:?}",
                n.worker_node_ip
            ));
        }
        if n.vxlan_id == 0 || n.vxlan_id >= 1 << 24 {
            problems.push(format!(
                "vxlan-id must be in 1..16777215, found {}",
                n.vxlan_id
            ));
        }
        if n.vxlan_port == 0 {
            problems.push("vxlan-port must not be 0".into());
        }
        if n.interface.is_empty() || n.interface.len() > 15 {
            problems.push(format!(
                "interface must be a link name, found {:?}",
                n.interface
            ));
        }
        for (what, v) in [
            ("tls-server-key", &self.tls_server_key),
            ("tls-server-cert", &self.tls_server_cert),
            ("tls-client-ca", &self.tls_client_ca),
        ] {
            if !v.contains("-----BEGIN") {
                problems.push(format!("{what} must be PEM"));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Config(problems.join("; ")))
        }
    }

    /// The MTU the pod interface gets: the configured one, at most 1450.
    pub(crate) fn mtu(&self) -> u32 {
        match self.pod_network.mtu {
            0 => MAX_MTU,
            m => m.min(MAX_MTU),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample() -> Config {
        Config {
            pod_network: PodNetwork {
                podip: "10.244.1.5/24".into(),
                pod_hw_addr: "0a:58:0a:f4:01:05".into(),
                interface: "eth0".into(),
                worker_node_ip: "10.0.1.4".into(),
                tunnel_type: "vxlan".into(),
                mtu: 1500,
                vxlan_port: 9000,
                vxlan_id: 555000,
                routes: vec![Route {
                    dst: "0.0.0.0/0".into(),
                    gw: "10.244.1.1".into(),
                    dev: "eth0".into(),
                }],
                neighbors: vec![],
            },
            pod_namespace: "default".into(),
            pod_name: "web".into(),
            tls_server_key: "-----BEGIN PRIVATE KEY-----\nx\n-----END PRIVATE KEY-----\n".into(),
            tls_server_cert: "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n".into(),
            tls_client_ca: "-----BEGIN CERTIFICATE-----\nx\n-----END CERTIFICATE-----\n".into(),
        }
    }

    #[test]
    fn the_config_travels_inside_a_cloud_config_and_back() {
        let c = sample();
        let ud = c.to_user_data();
        assert!(ud.starts_with("#cloud-config\n"));
        assert!(ud.len() < MAX_USER_DATA);
        assert_eq!(Config::from_user_data(&ud).unwrap(), c);
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(Config::from_user_data(&json).unwrap(), c);
        assert!(json.contains("\"pod-network\"") && json.contains("\"worker-node-ip\""));
    }

    #[test]
    fn a_plain_text_write_files_entry_is_read_too() {
        let json = serde_json::to_string(&sample()).unwrap();
        let ud = format!(
            "#cloud-config\nwrite_files:\n- path: /etc/other\n  content: hi\n- path: /run/peerpod/apf.json\n  content: '{json}'\n"
        );
        assert_eq!(Config::from_user_data(&ud).unwrap(), sample());
    }

    #[test]
    fn the_mtu_is_capped_at_1450() {
        let mut c = sample();
        assert_eq!(c.mtu(), 1450);
        c.pod_network.mtu = 1400;
        assert_eq!(c.mtu(), 1400);
    }

    #[test]
    fn invalid_configs_name_every_problem() {
        let mut c = sample();
        c.pod_network.podip = "10.0.0.5".into();
        c.pod_network.tunnel_type = "geneve".into();
        c.tls_server_key = "secret-not-pem".into();
        let e = Config::from_user_data(&serde_json::to_string(&c).unwrap())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("podip") && e.contains("tunnel-type") && e.contains("tls-server-key"),
            "{e}"
        );
        assert!(!e.contains("secret-not-pem"), "secret value leaked: {e}");
        assert!(Config::from_user_data("hello").is_err());
        assert!(Config::from_user_data("#cloud-config\nwrite_files: []\n").is_err());
    }

    #[test]
    fn registry_credentials_travel_beside_apf_json_and_nothing_else_is_written() {
        let c = Config::default();
        let text = c.to_user_data_with_auth(r#"{"auths":{"r:5000":{"auth":"dTpw"}}}"#);
        let files = extra_files(&text).unwrap();
        assert_eq!(files.len(), 1);
        assert_eq!(files[0].0, AUTH_PATH);
        assert_eq!(files[0].1, br#"{"auths":{"r:5000":{"auth":"dTpw"}}}"#);
        let other = "#cloud-config\nwrite_files:\n- path: /etc/passwd\n  content: x\n";
        assert!(extra_files(other).unwrap().is_empty());
        assert!(extra_files("{}").unwrap().is_empty());
    }
}
