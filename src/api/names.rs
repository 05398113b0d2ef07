//! Every name that crosses a component boundary, defined once: the objects, labels,
//! annotations and extended resource the components and users meet in the API server, and
//! the paths and ports of the data path from the webhook to the kata agent in the pod VM.
//! "Find references" on one of these follows that contract through the whole crate.
//!
//! Names a CRD owns (its group, finalizer, condition types) stand with the type in
//! [`super::kataconfig`], [`super::peerpod`] and [`super::peerpodconfig`]. This module
//! imports nothing.

// ---- The operator and what it deploys -------------------------------------------------

/// The default operator namespace (`--namespace`, `-n`). Peer pods never run there.
pub const DEFAULT_NAMESPACE: &str = "openshift-sandboxed-containers-operator";
/// The operator: its Deployment, ServiceAccount, leader-election Lease and the reporter of
/// its Events.
pub const OPERATOR: &str = "sandboxd-operator";
/// The label on everything the operator creates.
pub(crate) const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The value of [`LABEL_MANAGED_BY`].
pub(crate) const MANAGED_BY: &str = "sandboxd";
/// The runtime class (and CRI handler) of peer pods.
pub const RUNTIME_CLASS: &str = "kata-remote";
/// The PeerPodConfig the operator creates in its namespace.
pub const PEER_POD_CONFIG: &str = "peerpodconfig-openshift";
/// The ConfigMap holding the peer-pods settings (`PeerPodConfig.spec.configMapName`).
pub const CONFIG_MAP: &str = "peer-pods-cm";
/// The Secret holding the cloud credentials (`PeerPodConfig.spec.cloudSecretName`).
pub(crate) const CLOUD_SECRET: &str = "peer-pods-secret";
/// The Secret holding the SSH public key given to the pod VMs.
pub(crate) const SSH_KEY_SECRET: &str = "ssh-key-secret";
/// The key of [`SSH_KEY_SECRET`] holding the public key (the seed's name, whatever the
/// algorithm).
pub(crate) const SSH_PUBLIC_KEY: &str = "id_rsa.pub";
/// The cloud-api-adaptor DaemonSet.
pub const CAA_DAEMONSET: &str = "peerpodconfig-ctrl-caa-daemon";
/// The node agent relay DaemonSet: serves the pods' agent sockets and holds the hypervisor
/// socket across CAA restarts and rollouts (`updateStrategy: OnDelete`).
pub const RELAY_DAEMONSET: &str = "peerpodconfig-ctrl-caa-relay";
/// The node agent relay pods' ServiceAccount: no API access (its pods mount no token); it
/// exists for OpenShift's SecurityContextConstraints.
pub(crate) const RELAY_SERVICE_ACCOUNT: &str = "sandboxd-caa-relay";
/// The CAA pods' ServiceAccount (RBAC in `deploy/caa/rbac.yaml`).
pub(crate) const CAA_SERVICE_ACCOUNT: &str = "sandboxd-caa";
/// The Secret holding CAA's CA and client certificate for the mTLS to the pod VMs.
pub(crate) const CAA_TLS_SECRET: &str = "peerpod-caa-tls";
/// The peer pods webhook: its Deployment, ServiceAccount, PodDisruptionBudget and
/// MutatingWebhookConfiguration.
pub const WEBHOOK: &str = "peer-pods-webhook";
/// The Service in front of the webhook Deployment.
pub const WEBHOOK_SERVICE: &str = "peer-pods-webhook-svc";
/// The one-KataConfig rule: the ValidatingAdmissionPolicy (and its binding), or the
/// ValidatingWebhookConfiguration where the API server has no such policy.
pub const KATACONFIG_SINGLETON: &str = "sandboxd-kataconfig-singleton";
/// The Job that builds and publishes the pod VM image.
pub const IMAGE_CREATION_JOB: &str = "osc-podvm-image-creation";
/// The Job that deletes an image sandboxd built, on uninstall.
pub const IMAGE_DELETION_JOB: &str = "osc-podvm-image-deletion";
/// Annotation on [`CONFIG_MAP`]: the image id sandboxd built and wrote as `AZURE_IMAGE_ID`.
/// When it equals `AZURE_IMAGE_ID`, uninstall may delete the image; otherwise the image is
/// the user's and stays.
pub const ANNOTATION_BUILT_IMAGE_ID: &str = "sandboxd.io/built-image-id";

// ---- Nodes ----------------------------------------------------------------------------

/// The node label that marks nodes with the runtime (RuntimeClass scheduling, CAA).
pub const LABEL_KATA: &str = "node-role.kubernetes.io/kata-oc";
/// Node Feature Discovery's label for nodes able to run Kata (`checkNodeEligibility`).
pub(crate) const LABEL_KATA_ELIGIBLE: &str = "feature.node.kubernetes.io/runtime.kata";
/// The extended resource every selected node advertises: one unit per peer-pod VM (also
/// the webhook's default `POD_VM_EXTENDED_RESOURCE`).
pub const VM_RESOURCE: &str = "kata.peerpods.io/vm";

// ---- The node installer (operator -> node) --------------------------------------------
//
// The operator tells a node what to do with [`LABEL_NODE_INSTALL`]; the installer on that
// node reports with [`ANN_STATE`] (plus [`ANN_MESSAGE`] on failure and [`ANN_CONFIG`], the
// hash of the configuration it applied). See `docs/operator.md`.

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
pub(crate) const STATE_UNINSTALLING: &str = "uninstalling";
/// Installer state: the runtime configuration is gone from the node.
pub const STATE_UNINSTALLED: &str = "uninstalled";
/// Installer state: the uninstall failed ([`ANN_MESSAGE`] says why); it retries.
pub(crate) const STATE_UNINSTALL_FAILED: &str = "uninstall-failed";
/// The field manager of the node installer's writes to its Node.
pub const INSTALLER_FIELD_MANAGER: &str = "sandboxd-node-install";
/// The node installer DaemonSet.
pub const INSTALLER_DAEMONSET: &str = "sandboxd-node-installer";
/// The ServiceAccount of the node installer.
pub const INSTALLER_SERVICE_ACCOUNT: &str = "sandboxd-node-installer";

// ---- The data path: webhook -> kata shim -> CAA -> forwarder -> kata agent -------------

/// The label the webhook puts on peer pods, so the operator finds them without watching
/// every pod.
pub const PEER_POD_LABEL: &str = "kata.peerpods.io/peer-pod";

/// Pod annotations: the webhook writes the VM size, the kata shim passes them (with the
/// sandbox's name) in `CreateVMRequest.annotations`, CAA reads them.
pub mod annotations {
    /// The pod's name.
    pub const SANDBOX_NAME: &str = "io.kubernetes.cri.sandbox-name";
    /// The pod's namespace.
    pub const SANDBOX_NAMESPACE: &str = "io.kubernetes.cri.sandbox-namespace";
    /// An explicit instance size chosen by the user (the webhook never touches it).
    pub const MACHINE_TYPE: &str = "io.katacontainers.config.hypervisor.machine_type";
    /// Requested image.
    pub(crate) const IMAGE: &str = "io.katacontainers.config.hypervisor.image";
    /// vCPUs of the pod VM, an integer ("0" when unset).
    pub const DEFAULT_VCPUS: &str = "io.katacontainers.config.hypervisor.default_vcpus";
    /// Memory of the pod VM in MiB, an integer ("0" when unset).
    pub const DEFAULT_MEMORY: &str = "io.katacontainers.config.hypervisor.default_memory";
    /// GPUs of the pod VM, an integer ("0" when unset).
    pub const DEFAULT_GPUS: &str = "io.katacontainers.config.hypervisor.default_gpus";
    /// Confidential-computing init data ("" when unset).
    pub(crate) const CC_INIT_DATA: &str = "io.katacontainers.config.hypervisor.cc_init_data";
    /// GPU model of the pod VM (matched in the instance size name, e.g. `A100`, `T4`).
    pub(crate) const DEFAULT_GPU_MODEL: &str =
        "io.katacontainers.config.hypervisor.default_gpu_model";
}

/// The node directory CAA shares with the kata shim (a hostPath of the CAA DaemonSet).
pub(crate) const PEERPOD_DIR: &str = "/run/peerpod";
/// The remote hypervisor socket CAA serves on every kata node (in [`PEERPOD_DIR`]).
pub(crate) const HYPERVISOR_SOCKET: &str = "/run/peerpod/hypervisor.sock";
/// Where CAA itself serves the hypervisor API when the node agent relay holds
/// [`HYPERVISOR_SOCKET`] in front of it (in [`PEERPOD_DIR`]).
pub const CAA_SOCKET: &str = "/run/peerpod/caa/hypervisor.sock";
/// The node agent relay's control socket: CAA tells it which agent sockets to serve and
/// gives it the mTLS client identity, in memory (in [`PEERPOD_DIR`], mode 0600).
pub(crate) const RELAY_CONTROL_SOCKET: &str = "/run/peerpod/relay/control.sock";
/// The directory of CAA's per-pod agent sockets (in [`PEERPOD_DIR`]):
/// `<PODS_DIR>/<sandbox id>/`[`AGENT_SOCKET_FILE`].
pub(crate) const PODS_DIR: &str = "/run/peerpod/pods";
/// The file name of a pod's agent socket, as `CreateVMResponse.agentSocketPath` names it.
pub(crate) const AGENT_SOCKET_FILE: &str = "agent.ttrpc";
/// The port the forwarder in each pod VM listens on (mTLS, from CAA).
pub(crate) const FORWARDER_PORT: u16 = 15150;
/// The kata agent's socket in the pod VM.
pub(crate) const AGENT_SOCKET: &str = "/run/kata-containers/agent.sock";
/// The pod network namespace in the pod VM.
pub const POD_NETNS: &str = "/run/netns/podns";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_paths_lie_in_the_directory_caa_shares_with_the_shim() {
        for path in [
            HYPERVISOR_SOCKET,
            PODS_DIR,
            CAA_SOCKET,
            RELAY_CONTROL_SOCKET,
        ] {
            let rest = path.strip_prefix(PEERPOD_DIR).unwrap_or_default();
            assert!(rest.starts_with('/') && rest.len() > 1, "{path}");
        }
    }
}
