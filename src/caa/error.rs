//! Errors of CAA and their one mapping to ttrpc status codes.

/// Errors of CAA.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// The request lacks something the shim always sends.
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// No sandbox of that id was created here.
    #[error("unknown sandbox {0}")]
    UnknownSandbox(String),
    /// The pod asks for a size that cannot be used.
    #[error(transparent)]
    Size(#[from] crate::cloud::sizes::Error),
    /// The cloud failed.
    #[error(transparent)]
    Cloud(#[from] crate::cloud::Error),
    /// The API server failed.
    #[error("{}", kube_sentence(.0))]
    Kube(#[from] kube::Error),
    /// The pod tunnel cannot work on this node (found at start).
    #[error("the pod tunnel cannot work: {0}")]
    Tunnel(String),
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// Serving the socket failed.
    #[error("hypervisor socket: {0}")]
    Socket(String),
    /// The pod data path (tunnel, forwarder, agent socket) failed.
    #[error("pod data path: {0}")]
    DataPath(String),
    /// Earlier writes of the PeerPod of that name are still pending.
    #[error("earlier writes of PeerPod {0} are still pending")]
    Pending(String),
}

impl Error {
    /// Low-cardinality label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            Error::InvalidRequest(_) => "invalid_request",
            Error::UnknownSandbox(_) => "unknown_sandbox",
            Error::Size(e) => e.metric_label(),
            Error::Cloud(e) => e.metric_label(),
            Error::Kube(_) => "kube",
            Error::Tunnel(_) => "tunnel",
            Error::Config(e) => e.metric_label(),
            Error::Socket(_) => "socket",
            Error::DataPath(_) => "data_path",
            Error::Pending(_) => "pending_write",
        }
    }

    /// The ttrpc status the shim sees.
    pub(crate) fn to_ttrpc(&self) -> ttrpc::Error {
        use ttrpc::Code;
        let code = match self {
            Error::InvalidRequest(_) | Error::Size(_) => Code::INVALID_ARGUMENT,
            Error::UnknownSandbox(_) => Code::NOT_FOUND,
            Error::Cloud(crate::cloud::Error::NotFound(_)) => Code::NOT_FOUND,
            Error::Cloud(crate::cloud::Error::Quota(_)) => Code::RESOURCE_EXHAUSTED,
            Error::Cloud(crate::cloud::Error::Throttled { .. }) => Code::UNAVAILABLE,
            Error::Cloud(crate::cloud::Error::Transient(_)) => Code::UNAVAILABLE,
            Error::Cloud(crate::cloud::Error::Permanent(_)) => Code::FAILED_PRECONDITION,
            Error::Kube(_) => Code::UNAVAILABLE,
            Error::Tunnel(_) => Code::FAILED_PRECONDITION,
            Error::Config(_) => Code::FAILED_PRECONDITION,
            Error::Socket(_) => Code::INTERNAL,
            Error::DataPath(_) => Code::UNAVAILABLE,
            Error::Pending(_) => Code::UNAVAILABLE,
        };
        ttrpc::Error::RpcStatus(ttrpc::get_status(code, self.to_string()))
    }
}

/// A Kubernetes client error as a sentence (kube's own text appends a debug dump of the API
/// server's Status).
pub(crate) fn kube_sentence(e: &kube::Error) -> String {
    match e {
        kube::Error::Api(s) => {
            let reason = if s.reason.is_empty() {
                String::new()
            } else {
                format!(" {}", s.reason)
            };
            format!(
                "the Kubernetes API server answered {}{reason}: {}",
                s.code,
                s.message.trim_end_matches('.')
            )
        }
        other => format!("talking to the Kubernetes API server failed: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubernetes_errors_read_as_sentences_without_debug_dumps() {
        let status =
            kube::core::Status::failure("pods \"web\" not found", "NotFound").with_code(404);
        let e = Error::Kube(kube::Error::Api(Box::new(status)));
        let text = e.to_string();
        assert_eq!(
            text,
            "the Kubernetes API server answered 404 NotFound: pods \"web\" not found"
        );
        let shown = match e.to_ttrpc() {
            ttrpc::Error::RpcStatus(s) => s.message,
            other => panic!("{other:?}"),
        };
        assert_eq!(shown, text);
        assert!(!shown.contains("Status {") && !shown.contains("ApiError"));
    }
}
