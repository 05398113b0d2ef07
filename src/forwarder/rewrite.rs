//! The two agent requests the forwarder changes, as upstream does; every other frame passes
//! byte for byte. Messages are decoded with rust-protobuf, which keeps fields this build
//! does not know, so only the rewritten field changes:
//! - `grpc.AgentService/CreateSandbox`: `dns` is dropped (the VM keeps its own resolver);
//! - `grpc.AgentService/CreateContainer`: the OCI spec's `network` namespace gets the path of
//!   the pod network namespace (appended when the spec has none).

use protobuf::Message;

use crate::protocol::agent::{CreateContainerRequest, CreateSandboxRequest};
use crate::protocol::frame::{Frame, TYPE_REQUEST};
use crate::protocol::oci::{Linux, LinuxNamespace, Spec};

/// The agent service name in `ttrpc.Request.service`.
pub(crate) const AGENT_SERVICE: &str = "grpc.AgentService";
/// The agent methods [`rewrite`] changes; every other request passes byte for byte.
pub(crate) const REWRITTEN: &[&str] = &["CreateSandbox", "CreateContainer"];

/// Why a request could not be rewritten.
#[derive(Debug, thiserror::Error)]
pub(crate) enum RewriteError {
    /// The ttrpc request envelope is not valid protobuf.
    #[error("malformed ttrpc request on stream {stream_id}: {source}")]
    Envelope {
        /// The stream.
        stream_id: u32,
        /// The decode error.
        source: protobuf::Error,
    },
    /// The agent request inside is not valid protobuf.
    #[error("malformed {method} request on stream {stream_id}: {source}")]
    Body {
        /// The method.
        method: String,
        /// The stream.
        stream_id: u32,
        /// The decode error.
        source: protobuf::Error,
    },
}

/// Rewrites `f` when it is a CreateSandbox or CreateContainer request; `Ok(None)` when the
/// frame passes unchanged.
pub(crate) fn rewrite(f: &Frame, netns: &str) -> Result<Option<Frame>, RewriteError> {
    if f.kind != TYPE_REQUEST {
        return Ok(None);
    }
    let mut req = ttrpc::proto::Request::parse_from_bytes(&f.payload).map_err(|source| {
        RewriteError::Envelope {
            stream_id: f.stream_id,
            source,
        }
    })?;
    if req.service != AGENT_SERVICE {
        return Ok(None);
    }
    let body_err = |source| RewriteError::Body {
        method: req.method.clone(),
        stream_id: f.stream_id,
        source,
    };
    let new_payload = match req.method.as_str() {
        "CreateSandbox" => {
            let mut m = CreateSandboxRequest::parse_from_bytes(&req.payload).map_err(body_err)?;
            if m.dns.is_empty() {
                return Ok(None);
            }
            tracing::info!(sandbox = %m.sandbox_id, dropped = m.dns.len(), "CreateSandbox: dropping DNS servers so the VM keeps its resolver");
            m.dns.clear();
            m.write_to_bytes().map_err(body_err)?
        }
        "CreateContainer" => {
            let mut m = CreateContainerRequest::parse_from_bytes(&req.payload).map_err(body_err)?;
            add_network_namespace(&mut m, netns);
            tracing::debug!(container = %m.container_id, netns, "CreateContainer: joining the pod network namespace");
            m.write_to_bytes().map_err(body_err)?
        }
        _ => return Ok(None),
    };
    req.payload = new_payload;
    let payload = req
        .write_to_bytes()
        .map_err(|source| RewriteError::Envelope {
            stream_id: f.stream_id,
            source,
        })?;
    Ok(Some(Frame {
        payload,
        ..f.clone()
    }))
}

/// Points the spec's `network` namespace at `netns` (appending one when absent).
fn add_network_namespace(m: &mut CreateContainerRequest, netns: &str) {
    let spec: &mut Spec = m.OCI.mut_or_insert_default();
    let linux: &mut Linux = spec.Linux.mut_or_insert_default();
    match linux.Namespaces.iter_mut().find(|n| n.Type == "network") {
        Some(n) => n.Path = netns.to_string(),
        None => linux.Namespaces.push(LinuxNamespace {
            Type: "network".into(),
            Path: netns.into(),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::names::POD_NETNS;

    fn request(method: &str, payload: Vec<u8>) -> Frame {
        let mut r = ttrpc::proto::Request::new();
        r.service = AGENT_SERVICE.into();
        r.method = method.into();
        r.payload = payload;
        r.timeout_nano = 5_000_000_000;
        Frame {
            stream_id: 5,
            kind: TYPE_REQUEST,
            flags: 0,
            payload: r.write_to_bytes().unwrap(),
        }
    }

    fn body(f: &Frame) -> Vec<u8> {
        ttrpc::proto::Request::parse_from_bytes(&f.payload)
            .unwrap()
            .payload
    }

    #[test]
    fn create_sandbox_loses_its_dns_servers_and_keeps_unknown_fields() {
        let mut m = CreateSandboxRequest::new();
        m.hostname = "web".into();
        m.dns = vec!["nameserver 10.96.0.10".into()];
        m.sandbox_id = "abc".into();
        let mut bytes = m.write_to_bytes().unwrap();
        // Fields 50 and 51 (varints): fields no release of the protocol has.
        bytes.extend([0x90, 0x03, 1, 0x98, 0x03, 1]);
        let out = rewrite(&request("CreateSandbox", bytes), POD_NETNS)
            .unwrap()
            .expect("rewritten");
        let back = CreateSandboxRequest::parse_from_bytes(&body(&out)).unwrap();
        assert!(back.dns.is_empty());
        assert_eq!(back.hostname, "web");
        assert_eq!(back.sandbox_id, "abc");
        let raw = body(&out);
        assert!(
            raw.ends_with(&[0x90, 0x03, 1, 0x98, 0x03, 1]),
            "unknown fields kept: {raw:?}"
        );
        let env = ttrpc::proto::Request::parse_from_bytes(&out.payload).unwrap();
        assert_eq!(env.timeout_nano, 5_000_000_000);
        assert_eq!(out.stream_id, 5);
    }

    #[test]
    fn create_sandbox_without_dns_passes_byte_for_byte() {
        let mut m = CreateSandboxRequest::new();
        m.hostname = "web".into();
        let f = request("CreateSandbox", m.write_to_bytes().unwrap());
        assert!(rewrite(&f, POD_NETNS).unwrap().is_none());
    }

    #[test]
    fn create_container_joins_the_pod_network_namespace() {
        let mut m = CreateContainerRequest::new();
        m.container_id = "c1".into();
        let spec = m.OCI.mut_or_insert_default();
        spec.Version = "1.1.0".into();
        let linux = spec.Linux.mut_or_insert_default();
        linux.Namespaces.push(LinuxNamespace {
            Type: "pid".into(),
            ..Default::default()
        });
        let mut bytes = m.write_to_bytes().unwrap();
        bytes.extend([0xa0, 0x06, 1]); // field 100: unknown to every release
        let out = rewrite(&request("CreateContainer", bytes), POD_NETNS)
            .unwrap()
            .unwrap();
        let raw = body(&out);
        let back = CreateContainerRequest::parse_from_bytes(&raw).unwrap();
        let ns = &back.OCI.Linux.Namespaces;
        assert_eq!(ns.len(), 2);
        assert_eq!((ns[0].Type.as_str(), ns[0].Path.as_str()), ("pid", ""));
        assert_eq!(
            (ns[1].Type.as_str(), ns[1].Path.as_str()),
            ("network", POD_NETNS)
        );
        assert_eq!(back.OCI.Version, "1.1.0");
        assert!(raw.ends_with(&[0xa0, 0x06, 1]));
    }

    #[test]
    fn an_existing_network_namespace_gets_the_pod_path_and_no_duplicate() {
        let mut m = CreateContainerRequest::new();
        m.OCI
            .mut_or_insert_default()
            .Linux
            .mut_or_insert_default()
            .Namespaces
            .push(LinuxNamespace {
                Type: "network".into(),
                Path: "/var/run/netns/cni-1".into(),
                ..Default::default()
            });
        let out = rewrite(
            &request("CreateContainer", m.write_to_bytes().unwrap()),
            POD_NETNS,
        )
        .unwrap()
        .unwrap();
        let back = CreateContainerRequest::parse_from_bytes(&body(&out)).unwrap();
        assert_eq!(back.OCI.Linux.Namespaces.len(), 1);
        assert_eq!(back.OCI.Linux.Namespaces[0].Path, POD_NETNS);
    }

    #[test]
    fn other_calls_and_frames_pass_unchanged() {
        let f = request("StartContainer", vec![0x0a, 2, b'c', b'1']);
        assert!(rewrite(&f, POD_NETNS).unwrap().is_none());
        let mut r = ttrpc::proto::Request::new();
        r.service = "grpc.Health".into();
        r.method = "Check".into();
        let f = Frame {
            payload: r.write_to_bytes().unwrap(),
            ..f
        };
        assert!(rewrite(&f, POD_NETNS).unwrap().is_none());
        let data = Frame {
            stream_id: 1,
            kind: crate::protocol::frame::TYPE_DATA,
            flags: 0,
            payload: vec![0xff; 8],
        };
        assert!(rewrite(&data, POD_NETNS).unwrap().is_none());
    }

    #[test]
    fn a_garbled_request_is_a_clear_error() {
        let f = Frame {
            stream_id: 9,
            kind: TYPE_REQUEST,
            flags: 0,
            payload: vec![0xff, 0xff, 0xff],
        };
        let e = rewrite(&f, POD_NETNS).unwrap_err().to_string();
        assert!(e.contains("malformed ttrpc request on stream 9"), "{e}");
        let g = request("CreateContainer", vec![0x32, 50, 1]);
        let e = rewrite(&g, POD_NETNS).unwrap_err().to_string();
        assert!(e.contains("malformed CreateContainer request"), "{e}");
    }
}
