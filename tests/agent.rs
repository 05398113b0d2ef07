//! `sandboxd agent`: the kata agent protocol driven by a client that spells method paths
//! literally, against the agent on this host in a throwaway mount/pid/uts/ipc/net namespace
//! (fast cases) and, through the forwarder over mTLS, in the pod VM under qemu (tests/image).

pub mod client;
pub mod host;
pub mod registry;
pub mod sequence;

use crate::harness::Case;

pub fn cases() -> Vec<Case> {
    host::cases()
}
