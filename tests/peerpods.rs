//! Integration tests of the operator's peer-pods controller: the default PeerPodConfig, the
//! per-node `kata.peerpods.io/vm` limit as the real kube-scheduler enforces it, and the
//! `ConfigValid` verdict. The operator runs in-process under its own ServiceAccount.

mod config;
mod limit;
mod support;

use crate::harness::Case;

pub fn cases() -> Vec<Case> {
    [limit::cases(), config::cases()]
        .into_iter()
        .flatten()
        .collect()
}
