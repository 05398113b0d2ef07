//! Names shared by the operator and the node installer: the contract between them.
//!
//! The operator tells a node what to do with [`LABEL_NODE_INSTALL`]; the installer on that
//! node reports with [`ANN_STATE`] (plus [`ANN_MESSAGE`] on failure and [`ANN_CONFIG`], the
//! hash of the configuration it applied). See `docs/operator.md`.

/// The node label that marks nodes with the runtime (RuntimeClass scheduling, CAA).
pub const LABEL_KATA: &str = "node-role.kubernetes.io/kata-oc";
/// The node label the operator sets: [`INSTALL`] or [`UNINSTALL`]. The node installer
/// DaemonSet runs on nodes that carry it.
pub const LABEL_NODE_INSTALL: &str = "kataconfiguration.openshift.io/node-install";
/// [`LABEL_NODE_INSTALL`] value: put the runtime on this node.
pub const INSTALL: &str = "install";
/// [`LABEL_NODE_INSTALL`] value: take the runtime off this node.
pub const UNINSTALL: &str = "uninstall";
/// The node annotation the installer writes: one of the `STATE_*` values.
pub const ANN_STATE: &str = "kataconfiguration.openshift.io/install-state";
/// The node annotation holding why the last install or uninstall failed.
pub const ANN_MESSAGE: &str = "kataconfiguration.openshift.io/install-message";
/// The node annotation holding the hash of the install configuration that was applied.
pub const ANN_CONFIG: &str = "kataconfiguration.openshift.io/install-config";
/// Installer state: applying the configuration.
pub const STATE_INSTALLING: &str = "installing";
/// Installer state: the runtime is configured (for the configuration in [`ANN_CONFIG`]).
pub const STATE_INSTALLED: &str = "installed";
/// Installer state: the install failed ([`ANN_MESSAGE`] says why); it retries.
pub const STATE_FAILED: &str = "failed";
/// Installer state: removing the configuration.
pub const STATE_UNINSTALLING: &str = "uninstalling";
/// Installer state: the runtime configuration is gone from the node.
pub const STATE_UNINSTALLED: &str = "uninstalled";
/// Installer state: the uninstall failed ([`ANN_MESSAGE`] says why); it retries.
pub const STATE_UNINSTALL_FAILED: &str = "uninstall-failed";
/// The field manager of the node installer's writes to its Node.
pub const INSTALLER_FIELD_MANAGER: &str = "sandboxd-node-install";

/// The runtime class (and CRI handler) name.
pub const RUNTIME_CLASS: &str = "kata-remote";
/// The label the webhook puts on peer pods.
pub const PEER_POD_LABEL: &str = "kata.peerpods.io/peer-pod";
/// Node Feature Discovery's label for nodes able to run Kata (`checkNodeEligibility`).
pub const LABEL_KATA_ELIGIBLE: &str = "feature.node.kubernetes.io/runtime.kata";
/// The node installer DaemonSet.
pub const INSTALLER_DAEMONSET: &str = "sandboxd-node-installer";
/// The ServiceAccount of the node installer.
pub const INSTALLER_SERVICE_ACCOUNT: &str = "sandboxd-node-installer";
/// The label on everything the operator creates for a KataConfig.
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The value of [`LABEL_MANAGED_BY`].
pub const MANAGED_BY: &str = "sandboxd";
/// The operator's leader-election Lease.
pub const LEASE_NAME: &str = "sandboxd-operator";
/// The default operator namespace.
pub const DEFAULT_NAMESPACE: &str = "openshift-sandboxed-containers-operator";
/// The remote hypervisor socket the CAA serves on every kata node.
pub const HYPERVISOR_SOCKET: &str = "/run/peerpod/hypervisor.sock";
