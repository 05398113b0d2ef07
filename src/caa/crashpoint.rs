//! Test-only crash points. In a build with the `dev` feature, `SANDBOXD_CAA_PAUSE_AT=<step>`
//! makes CAA log `paused at crash point <step>` when it reaches that step boundary and make
//! no further progress on that call, so a test can SIGKILL the process exactly there (one
//! environment read per process). The shipped binary has no such variable: [`reached`] is
//! empty there, and no production CAA can be made to hang by its environment.

#[cfg(feature = "dev")]
use std::sync::OnceLock;

/// The environment variable naming the step to pause at.
#[cfg(feature = "dev")]
pub const ENV: &str = "SANDBOXD_CAA_PAUSE_AT";

/// Every step boundary of create (StartVM; CreateVM writes nothing) and delete (StopVM), in
/// order.
pub const STEPS: &[&str] = &[
    START_BEFORE_RECORD,
    START_RECORDED,
    START_BEFORE_CREATE,
    START_CREATED,
    START_ANSWERED,
    STOP_BEFORE_DELETE,
    STOP_VM_DELETED,
    STOP_ANSWERED,
];

/// StartVM: before the PeerPod is written.
pub(crate) const START_BEFORE_RECORD: &str = "start-vm:before-record";
/// StartVM: PeerPod written, before the VM's user data and the cloud create.
pub(crate) const START_RECORDED: &str = "start-vm:recorded";
/// StartVM: before the cloud create call (phase Creating is written alongside it).
pub(crate) const START_BEFORE_CREATE: &str = "start-vm:before-create";
/// StartVM: the VM is ready, before its instance id, IP and phase are queued and the answer.
pub(crate) const START_CREATED: &str = "start-vm:created";
/// StartVM answered; the background write of instance id, IP and phase Running has not run.
pub const START_ANSWERED: &str = "start-vm:answered-before-status";
/// StopVM: before the cloud delete call (the record is marked deleted alongside it).
pub(crate) const STOP_BEFORE_DELETE: &str = "stop-vm:before-delete";
/// StopVM: the VM is gone and the record marked deleted, before the answer.
pub(crate) const STOP_VM_DELETED: &str = "stop-vm:vm-deleted";
/// StopVM answered; the background release of the record has not run.
pub const STOP_ANSWERED: &str = "stop-vm:answered-before-release";

#[cfg(feature = "dev")]
fn configured() -> Option<&'static str> {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    AT.get_or_init(|| std::env::var(ENV).ok().filter(|s| !s.is_empty()))
        .as_deref()
}

/// Pauses this call forever when `step` is the configured crash point.
#[cfg(feature = "dev")]
pub(crate) async fn reached(step: &'static str) {
    if configured() == Some(step) {
        tracing::warn!(step, "paused at crash point {step}");
        std::future::pending::<()>().await;
    }
}

/// Crash points are not built in: nothing to do.
#[cfg(not(feature = "dev"))]
pub(crate) async fn reached(_step: &'static str) {}

#[cfg(test)]
mod tests {
    #[test]
    fn step_names_are_unique() {
        let mut s = super::STEPS.to_vec();
        s.sort_unstable();
        s.dedup();
        assert_eq!(s.len(), super::STEPS.len());
    }
}
