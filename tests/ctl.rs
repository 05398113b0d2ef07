//! Integration tests of `sandboxd ctl`: the built binary run against the real control plane
//! (and the ARM test server for `azure`), each command and its bad inputs (clear message,
//! non-zero exit).

mod azure_configmap;
mod bundle;
mod config;
mod deploy;
mod doctor;
mod inspect;
mod install;
mod kataconfig;
pub(crate) mod support;
mod vm;

use crate::harness::Case;

pub fn cases() -> Vec<Case> {
    [
        install::cases(),
        deploy::cases(),
        config::cases(),
        kataconfig::cases(),
        inspect::cases(),
        azure_configmap::cases(),
        doctor::cases(),
        vm::cases(),
        bundle::cases(),
    ]
    .into_iter()
    .flatten()
    .collect()
}
