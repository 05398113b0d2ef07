//! Kubernetes plumbing shared by every component: client construction, the cluster's
//! identity ([`cluster_id`]) and the field manager that owns everything sandboxd applies.

pub mod apply;
pub(crate) mod conditions;

use std::path::PathBuf;

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// The server-side apply field manager of every sandboxd write.
pub(crate) const FIELD_MANAGER: &str = "sandboxd";

/// Errors building a Kubernetes client.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The kubeconfig named by `--kubeconfig` could not be read.
    #[error("reading kubeconfig {path}: {source}")]
    ReadKubeconfig {
        /// The file.
        path: PathBuf,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// The kubeconfig was read but is unusable (unknown context, bad certificate, ...).
    #[error("using kubeconfig{}: {source}", context.as_ref().map(|c| format!(" context {c:?}")).unwrap_or_default())]
    Kubeconfig {
        /// The context asked for, if any.
        context: Option<String>,
        /// Why.
        source: kube::config::KubeconfigError,
    },
    /// Neither in-cluster configuration nor a kubeconfig was found.
    #[error(
        "no Kubernetes configuration: not running in a cluster and no kubeconfig found \
         (pass --kubeconfig or set KUBECONFIG): {0}"
    )]
    Infer(#[source] kube::config::InferConfigError),
    /// The client could not be built from a valid configuration.
    #[error("building the Kubernetes client: {0}")]
    Client(#[source] kube::Error),
}

/// The cluster's identity: the uid of the `kube-system` namespace, which lives as long as
/// the cluster. CAA tags every VM with it ([`crate::cloud::tags::CLUSTER`]); the operator's
/// collector finds this cluster's VMs by it.
pub(crate) async fn cluster_id(client: &Client) -> Result<String, kube::Error> {
    let ns: kube::Api<k8s_openapi::api::core::v1::Namespace> = kube::Api::all(client.clone());
    Ok(ns
        .get("kube-system")
        .await?
        .metadata
        .uid
        .unwrap_or_default())
}

/// How a component finds its API server; flattened into every subcommand that talks to one.
#[derive(Clone, Debug, Default, clap::Args)]
pub(crate) struct KubeArgs {
    /// Path to a kubeconfig. Without it: the in-cluster service account, then `KUBECONFIG`,
    /// then `~/.kube/config`.
    #[arg(long, global = true)]
    pub(crate) kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use instead of its current context.
    #[arg(long, global = true)]
    pub(crate) context: Option<String>,
}

impl KubeArgs {
    /// The client configuration these flags select.
    pub(crate) async fn config(&self) -> Result<Config, Error> {
        let options = KubeConfigOptions {
            context: self.context.clone(),
            ..Default::default()
        };
        let kubeconfig_error = |source| Error::Kubeconfig {
            context: self.context.clone(),
            source,
        };
        match (&self.kubeconfig, &self.context) {
            (Some(path), _) => {
                let kubeconfig =
                    Kubeconfig::read_from(path).map_err(|source| Error::ReadKubeconfig {
                        path: path.clone(),
                        source,
                    })?;
                Config::from_custom_kubeconfig(kubeconfig, &options)
                    .await
                    .map_err(kubeconfig_error)
            }
            (None, Some(_)) => Config::from_kubeconfig(&options)
                .await
                .map_err(kubeconfig_error),
            (None, None) => Config::infer().await.map_err(Error::Infer),
        }
    }

    /// A client for the configuration these flags select.
    pub(crate) async fn client(&self) -> Result<Client, Error> {
        let config = self.config().await?;
        Client::try_from(config).map_err(Error::Client)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn missing_kubeconfig_names_the_file() {
        let args = KubeArgs {
            kubeconfig: Some("/nonexistent/kubeconfig".into()),
            context: None,
        };
        let Err(err) = args.client().await else {
            panic!("expected an error")
        };
        assert!(matches!(err, Error::ReadKubeconfig { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/kubeconfig"), "{err}");
    }

    #[tokio::test]
    async fn unknown_context_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config");
        std::fs::write(
            &path,
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: https://127.0.0.1:1\n\
             contexts:\n- name: a\n  context:\n    cluster: c\n    user: u\ncurrent-context: a\n\
             users:\n- name: u\n  user:\n    token: t\n",
        )
        .unwrap();
        let args = KubeArgs {
            kubeconfig: Some(path),
            context: Some("nope".into()),
        };
        let Err(err) = args.client().await else {
            panic!("expected an error")
        };
        assert!(err.to_string().contains("\"nope\""), "{err}");
    }
}
