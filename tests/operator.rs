//! Integration tests of `sandboxd operator`: the KataConfig lifecycle against the real
//! control plane, with the operator in-process under its own ServiceAccount's RBAC.

mod bench;
mod installer;
mod lifecycle;
mod novap;
mod openshift;
mod rbac;
mod scc;
pub(crate) mod support;
mod telemetry;
mod writes;

use crate::harness::Case;

pub fn cases() -> Vec<Case> {
    [
        lifecycle::cases(),
        novap::cases(),
        rbac::cases(),
        scc::cases(),
        openshift::cases(),
        installer::cases(),
        telemetry::cases(),
        bench::cases(),
    ]
    .into_iter()
    .flatten()
    .collect()
}
