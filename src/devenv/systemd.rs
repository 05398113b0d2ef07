//! A SYSTEMD STAND-IN for the development and test node, not systemd.
//!
//! The node installer restarts the container runtime with systemd's D-Bus API
//! (`org.freedesktop.systemd1.Manager.RestartUnit` on the system bus). The test node runs on
//! a host without systemd, so this service owns `org.freedesktop.systemd1` on the node's own
//! system bus (Debian's `dbus-daemon` listening on the node's `/run/dbus/system_bus_socket`)
//! and answers the Manager calls the installer makes for the units it knows, by asking the
//! node's supervisor to restart the process behind the unit. Like systemd it queues the job,
//! answers with the job's object path at once and restarts in the background.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::sync::mpsc::UnboundedSender;
use zbus::zvariant::OwnedObjectPath;

use super::Error;

/// The bus name systemd owns.
pub(crate) const BUS_NAME: &str = "org.freedesktop.systemd1";
/// The Manager object.
pub(crate) const OBJECT_PATH: &str = "/org/freedesktop/systemd1";

/// The Manager errors systemd returns, under systemd's error names.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "org.freedesktop.systemd1")]
pub(crate) enum ManagerError {
    /// A D-Bus failure.
    #[zbus(error)]
    ZBus(zbus::Error),
    /// The unit is not known.
    NoSuchUnit(String),
    /// The job mode is not one systemd knows.
    InvalidArgs(String),
}

/// `org.freedesktop.systemd1.Manager`, for the units in `units`.
pub(crate) struct Manager {
    units: BTreeSet<String>,
    restarts: UnboundedSender<String>,
    next_job: AtomicU32,
}

#[zbus::interface(name = "org.freedesktop.systemd1.Manager")]
impl Manager {
    /// `RestartUnit(s name, s mode) -> o job`: queues a restart of the unit.
    async fn restart_unit(&self, name: &str, mode: &str) -> Result<OwnedObjectPath, ManagerError> {
        const MODES: [&str; 7] = [
            "replace",
            "fail",
            "isolate",
            "ignore-dependencies",
            "ignore-requirements",
            "flush",
            "triggering",
        ];
        if !MODES.contains(&mode) {
            return Err(ManagerError::InvalidArgs(format!(
                "Job mode {mode} invalid."
            )));
        }
        if !self.units.contains(name) {
            return Err(ManagerError::NoSuchUnit(format!("Unit {name} not found.")));
        }
        let job = self.next_job.fetch_add(1, Ordering::Relaxed);
        tracing::info!(unit = name, mode, job, "systemd stand-in: restart queued");
        let _ = self.restarts.send(name.to_string());
        OwnedObjectPath::try_from(format!("{OBJECT_PATH}/job/{job}"))
            .map_err(|e| ManagerError::ZBus(zbus::Error::Variant(e)))
    }
}

/// Connects to the bus at `address`, owns [`BUS_NAME`] and serves the Manager for `units`;
/// each accepted restart is sent on `restarts`. Keep the connection to keep serving.
pub(crate) async fn serve(
    address: &str,
    units: &[&str],
    restarts: UnboundedSender<String>,
) -> Result<zbus::Connection, Error> {
    let err = |e: zbus::Error| Error::Io(format!("systemd stand-in on {address}: {e}"));
    let manager = Manager {
        units: units.iter().map(|u| u.to_string()).collect(),
        restarts,
        next_job: AtomicU32::new(1),
    };
    zbus::connection::Builder::address(address)
        .map_err(err)?
        .name(BUS_NAME)
        .map_err(err)?
        .serve_at(OBJECT_PATH, manager)
        .map_err(err)?
        .build()
        .await
        .map_err(err)
}

/// The configuration of the node's system bus (Debian's `dbus-daemon --config-file`):
/// listening on `socket`, EXTERNAL authentication, root may own and call anything.
pub(crate) fn bus_config(socket: &str) -> String {
    format!(
        r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<!-- The test node's system bus: only the systemd stand-in and the node installer use it. -->
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="root"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>
"#
    )
}
