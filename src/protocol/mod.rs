//! Wire protocols generated from `proto/` by `build.rs`: the remote hypervisor service the
//! kata shim calls (`hypervisor.Hypervisor`) and `podvminfo.PodVMInfo`. Messages use
//! rust-protobuf (keeps unknown fields); services are async ttrpc. This module imports
//! nothing else of the crate.

include!(concat!(env!("OUT_DIR"), "/protocol.rs"));

pub mod frame;

/// ttrpc service and method names, exactly as the shim sends them. ttrpc-codegen camel-cases
/// service names (`podvminfo.PodVmInfo`); `build.rs` puts the proto's names back into the
/// generated servers and clients, and CAA registers its services under these.
pub mod methods {
    /// The remote hypervisor service.
    pub(crate) const HYPERVISOR_SERVICE: &str = "hypervisor.Hypervisor";
    /// The pod VM info service.
    pub(crate) const PODVMINFO_SERVICE: &str = "podvminfo.PodVMInfo";
    /// `/hypervisor.Hypervisor/CreateVM`.
    #[cfg(test)]
    pub(crate) const CREATE_VM: &str = "/hypervisor.Hypervisor/CreateVM";
    /// `/hypervisor.Hypervisor/StartVM`.
    #[cfg(test)]
    pub(crate) const START_VM: &str = "/hypervisor.Hypervisor/StartVM";
    /// `/hypervisor.Hypervisor/StopVM`.
    #[cfg(test)]
    pub(crate) const STOP_VM: &str = "/hypervisor.Hypervisor/StopVM";
    /// `/hypervisor.Hypervisor/Version`.
    #[cfg(test)]
    pub(crate) const VERSION: &str = "/hypervisor.Hypervisor/Version";
    /// `/podvminfo.PodVMInfo/GetInfo`.
    #[cfg(test)]
    pub(crate) const GET_INFO: &str = "/podvminfo.PodVMInfo/GetInfo";
}

/// kata's health service (`grpc.Health`, health.proto) as CAA calls it through the forwarder
/// for readiness `agent`: the names and a reader of the one field it needs, for a relay
/// that handles raw frames (the generated messages are in [`health`]).
pub mod health_wire {
    /// The service.
    pub(crate) const SERVICE: &str = "grpc.Health";
    /// Its check method.
    pub(crate) const CHECK: &str = "Check";
    /// `HealthCheckResponse.ServingStatus.SERVING`.
    pub(crate) const SERVING: u64 = 1;

    /// The `status` (field 1, varint) of a `HealthCheckResponse` payload; 0 (UNKNOWN) when
    /// absent, `None` when the payload is not protobuf.
    pub(crate) fn status(payload: &[u8]) -> Option<u64> {
        let mut is = protobuf::CodedInputStream::from_bytes(payload);
        let mut status = 0;
        while !is.eof().ok()? {
            let tag = is.read_raw_varint32().ok()?;
            let (field, wire) = (tag >> 3, tag & 7);
            match wire {
                0 => {
                    let v = is.read_raw_varint64().ok()?;
                    if field == 1 {
                        status = v;
                    }
                }
                2 => {
                    let n = is.read_raw_varint32().ok()?;
                    is.skip_raw_bytes(n).ok()?;
                }
                1 => is.skip_raw_bytes(8).ok()?,
                5 => is.skip_raw_bytes(4).ok()?,
                _ => return None,
            }
        }
        Some(status)
    }
}

#[cfg(test)]
mod tests {
    use protobuf::Message;

    use super::hypervisor::{CreateVMRequest, CreateVMResponse};
    use super::podvminfo::GetInfoRequest;

    #[test]
    fn a_create_vm_request_round_trips_through_the_wire_format() {
        let mut req = CreateVMRequest::new();
        req.id = "3c1f0c0e7a9b4c8d".into();
        req.annotations
            .insert("io.kubernetes.cri.sandbox-name".into(), "web".into());
        req.annotations.insert(
            "io.katacontainers.config.hypervisor.default_vcpus".into(),
            "2".into(),
        );
        req.networkNamespacePath = "/var/run/netns/cni-1".into();
        let bytes = req.write_to_bytes().unwrap();
        let back = CreateVMRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!(back, req);
    }

    #[test]
    fn field_numbers_match_the_shim() {
        // Field 1 (id) as a length-delimited string: tag 0x0a; field 3 (netns): tag 0x1a.
        let mut req = CreateVMRequest::new();
        req.id = "a".into();
        req.networkNamespacePath = "b".into();
        assert_eq!(
            req.write_to_bytes().unwrap(),
            vec![0x0a, 1, b'a', 0x1a, 1, b'b']
        );
        let mut resp = CreateVMResponse::new();
        resp.agentSocketPath = "p".into();
        assert_eq!(resp.write_to_bytes().unwrap(), vec![0x0a, 1, b'p']);
        let mut info = GetInfoRequest::new();
        info.Wait = true;
        assert_eq!(info.write_to_bytes().unwrap(), vec![0x18, 1]);
    }

    #[test]
    fn unknown_fields_survive_a_decode_and_encode() {
        // Field 9, varint 7: a field this build does not know.
        let bytes = vec![0x0a, 1, b'x', 0x48, 7];
        let req = CreateVMRequest::parse_from_bytes(&bytes).unwrap();
        assert_eq!(req.write_to_bytes().unwrap(), bytes);
    }
}
