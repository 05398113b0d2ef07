//! The pods of this node, as one metadata watch sees them: CreateVM finds the uid of the pod
//! that will own the PeerPod here instead of reading the pod (a read less on the pod's
//! critical path). A pod the watch has not shown yet, or one being deleted, is read as before.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, PartialObjectMeta};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};

/// Metadata of the pods bound to this node.
pub(crate) struct NodePods(Store<PartialObjectMeta<Pod>>);

impl NodePods {
    /// Starts watching the pods whose `spec.nodeName` is `node`.
    pub(crate) fn watch(client: &Client, node: &str) -> Self {
        let api: Api<PartialObjectMeta<Pod>> = Api::all(client.clone());
        let cfg = watcher::Config::default().fields(&format!("spec.nodeName={node}"));
        let (store, writer) = reflector::store();
        let stream = reflector::reflector(writer, watcher(api, cfg)).default_backoff();
        tokio::spawn(async move {
            use futures::StreamExt;
            let mut stream = std::pin::pin!(stream);
            while let Some(ev) = stream.next().await {
                if let Err(e) = ev {
                    tracing::warn!(error = %e, "watching the pods of this node failed; CreateVM reads pods instead");
                }
            }
        });
        Self(store)
    }

    /// The uid of pod `ns/name` if the watch shows it and it is not being deleted.
    pub(crate) fn uid_of(&self, ns: &str, name: &str) -> Option<String> {
        let p = self.0.get(&ObjectRef::new(name).within(ns))?;
        if p.metadata.deletion_timestamp.is_some() {
            return None;
        }
        p.uid()
    }
}

/// The pod a sandbox belongs to, read from the shim's `io.kubernetes.cri.sandbox-name`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct SandboxOf {
    /// The pod's name.
    pub(crate) name: String,
    /// The pod's namespace, when the sandbox name carries it (CRI-O).
    pub(crate) namespace: Option<String>,
    /// The pod's uid, when the sandbox name carries it (CRI-O).
    pub(crate) uid: Option<String>,
}

/// Reads the sandbox name the shim sends: containerd's is the pod name; CRI-O's (kata copies
/// `io.kubernetes.cri-o.SandboxName` over the cri key) is `k8s_<pod>_<namespace>_<uid>_<attempt>`.
/// Pod names, namespaces and uids never contain `_`, so the two forms cannot be confused; a
/// name with `_` that is not CRI-O's form is refused (it names no pod).
pub(crate) fn parse_sandbox_name(s: &str) -> Result<SandboxOf, String> {
    let s = s.trim();
    if !s.contains('_') {
        return if s.is_empty() {
            Err("the sandbox name is empty".into())
        } else {
            Ok(SandboxOf {
                name: s.to_string(),
                namespace: None,
                uid: None,
            })
        };
    }
    let parts: Vec<&str> = s.split('_').collect();
    match parts.as_slice() {
        ["k8s", pod, ns, uid, attempt]
            if !pod.is_empty()
                && !ns.is_empty()
                && !uid.is_empty()
                && !attempt.is_empty()
                && attempt.chars().all(|c| c.is_ascii_digit()) =>
        {
            Ok(SandboxOf {
                name: pod.to_string(),
                namespace: Some(ns.to_string()),
                uid: Some(uid.to_string()),
            })
        }
        _ => Err(format!(
            "sandbox name {s:?} is neither a pod name (containerd) nor \
             k8s_<pod>_<namespace>_<uid>_<attempt> (CRI-O)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandbox_names_of_containerd_and_crio_name_the_pod() {
        let uid = "0f5e6c1a-2b3c-4d5e-8f90-a1b2c3d4e5f6";
        let ok = |name: &str, ns: Option<&str>, uid: Option<&str>| {
            Ok(SandboxOf {
                name: name.into(),
                namespace: ns.map(Into::into),
                uid: uid.map(Into::into),
            })
        };
        let cases: Vec<(String, Result<SandboxOf, ()>)> = vec![
            // containerd: the pod name as it is.
            ("web".into(), ok("web", None, None)),
            ("web-7d9f8-abcde".into(), ok("web-7d9f8-abcde", None, None)),
            ("api.v2".into(), ok("api.v2", None, None)),
            (" web ".into(), ok("web", None, None)),
            // CRI-O: k8s_<pod>_<namespace>_<uid>_<attempt>.
            (
                format!("k8s_web_default_{uid}_0"),
                ok("web", Some("default"), Some(uid)),
            ),
            (
                format!("k8s_web-7d9f8-abcde_team-a_{uid}_12"),
                ok("web-7d9f8-abcde", Some("team-a"), Some(uid)),
            ),
            // A pod named k8s (containerd) is just a pod name.
            ("k8s".into(), ok("k8s", None, None)),
            // Malformed.
            ("".into(), Err(())),
            (format!("k8s_web_default_{uid}"), Err(())),
            (format!("k8s_web_default_{uid}_x"), Err(())),
            (format!("k8s__default_{uid}_0"), Err(())),
            (format!("crio_web_default_{uid}_0"), Err(())),
            ("web_default".into(), Err(())),
        ];
        for (input, want) in cases {
            let got = parse_sandbox_name(&input).map_err(|_| ());
            assert_eq!(got, want, "{input:?}");
        }
        let e = parse_sandbox_name("web_default").unwrap_err();
        assert!(e.contains("CRI-O") && e.contains("web_default"), "{e}");
    }
}
