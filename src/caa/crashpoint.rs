//! Test-only crash points. With `SANDBOXD_CAA_PAUSE_AT=<step>` CAA logs
//! `paused at crash point <step>` when it reaches that step boundary and makes no further
//! progress on that call, so a test can SIGKILL the process exactly there. Compiled in,
//! inert unless the variable is set (one environment read per process).

use std::sync::OnceLock;

/// The environment variable naming the step to pause at.
pub const ENV: &str = "SANDBOXD_CAA_PAUSE_AT";

/// Every step boundary of create (CreateVM, StartVM) and delete (StopVM), in order.
pub const STEPS: &[&str] = &[
    CREATE_BEFORE_RECORD,
    CREATE_RECORDED,
    START_BEFORE_CREATE,
    START_CREATED,
    START_INSTANCE_RECORDED,
    START_RUNNING,
    STOP_BEFORE_DELETE,
    STOP_VM_DELETED,
    STOP_RELEASED,
];

/// CreateVM: size chosen, before the PeerPod is written.
pub const CREATE_BEFORE_RECORD: &str = "create-vm:before-record";
/// CreateVM: PeerPod written, before the answer.
pub const CREATE_RECORDED: &str = "create-vm:recorded";
/// StartVM: record re-asserted and phase Creating, before the cloud create call.
pub const START_BEFORE_CREATE: &str = "start-vm:before-create";
/// StartVM: the cloud says the VM is provisioned, before its id is recorded.
pub const START_CREATED: &str = "start-vm:created";
/// StartVM: instance id recorded, before phase Running.
pub const START_INSTANCE_RECORDED: &str = "start-vm:instance-recorded";
/// StartVM: phase Running, before the answer.
pub const START_RUNNING: &str = "start-vm:running";
/// StopVM: phase Deleting, before the cloud delete call.
pub const STOP_BEFORE_DELETE: &str = "stop-vm:before-delete";
/// StopVM: the VM is gone, before the record is released.
pub const STOP_VM_DELETED: &str = "stop-vm:vm-deleted";
/// StopVM: record released, before the answer.
pub const STOP_RELEASED: &str = "stop-vm:released";

fn configured() -> Option<&'static str> {
    static AT: OnceLock<Option<String>> = OnceLock::new();
    AT.get_or_init(|| std::env::var(ENV).ok().filter(|s| !s.is_empty()))
        .as_deref()
}

/// Pauses this call forever when `step` is the configured crash point.
pub async fn reached(step: &'static str) {
    if configured() == Some(step) {
        tracing::warn!(step, "paused at crash point {step}");
        std::future::pending::<()>().await;
    }
}

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
