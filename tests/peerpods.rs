//! Integration tests of the operator's peer-pods controller: the default PeerPodConfig, the
//! per-node `kata.peerpods.io/vm` limit as the real kube-scheduler enforces it, and the
//! `ConfigValid` verdict. The operator runs in-process under its own ServiceAccount.

mod config;
mod credentials;
mod image_job;
mod limit;
pub(crate) mod support;
pub(crate) mod webhook;

use crate::harness::Case;

pub fn cases() -> Vec<Case> {
    [
        limit::cases(),
        config::cases(),
        webhook::cases(),
        image_job::cases(),
        credentials::cases(),
    ]
    .into_iter()
    .flatten()
    .collect()
}
