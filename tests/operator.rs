//! Integration tests of `sandboxd operator`: the KataConfig lifecycle against the real
//! control plane, with the operator in-process under its own ServiceAccount's RBAC.

mod lifecycle;
mod support;

use crate::harness::Case;

pub fn cases() -> Vec<Case> {
    lifecycle::cases()
}
