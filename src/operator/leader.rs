//! Leader election on a `coordination.k8s.io/v1` Lease: only the holder runs controllers.
//! Updates carry the Lease's resourceVersion, so two candidates cannot both win.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio_util::sync::CancellationToken;

/// Errors of leader election.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the Lease failed.
    #[error("lease {name}: {source}")]
    Api {
        /// The Lease.
        name: String,
        /// Why.
        source: kube::Error,
    },
    /// The Lease could not be renewed in time; another replica may lead now.
    #[error("lost the lease {0}")]
    Lost(String),
}

/// Who competes for which Lease.
#[derive(Clone, Debug)]
pub struct LeaderConfig {
    /// Lease namespace.
    pub namespace: String,
    /// Lease name.
    pub name: String,
    /// This candidate (pod name).
    pub identity: String,
    /// How long a lease holds without renewal.
    pub lease_duration: Duration,
    /// How often the holder renews (and candidates retry).
    pub renew_every: Duration,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

enum Outcome {
    Held,
    Other,
}

async fn try_acquire(api: &Api<Lease>, cfg: &LeaderConfig) -> Result<Outcome, kube::Error> {
    let secs = cfg.lease_duration.as_secs().max(1) as i32;
    let Some(mut lease) = api.get_opt(&cfg.name).await? else {
        let lease = Lease {
            metadata: ObjectMeta {
                name: Some(cfg.name.clone()),
                ..Default::default()
            },
            spec: Some(LeaseSpec {
                holder_identity: Some(cfg.identity.clone()),
                lease_duration_seconds: Some(secs),
                acquire_time: Some(now()),
                renew_time: Some(now()),
                lease_transitions: Some(0),
                ..Default::default()
            }),
        };
        return match api.create(&PostParams::default(), &lease).await {
            Ok(_) => Ok(Outcome::Held),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::Other),
            Err(e) => Err(e),
        };
    };
    let spec = lease.spec.get_or_insert_with(Default::default);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    let ours = holder == cfg.identity;
    if !ours && !holder.is_empty() {
        let duration = spec.lease_duration_seconds.unwrap_or(secs) as i64;
        let expired = spec
            .renew_time
            .as_ref()
            .is_none_or(|t| t.0.as_second() + duration < Timestamp::now().as_second());
        if !expired {
            return Ok(Outcome::Other);
        }
    }
    if !ours {
        spec.holder_identity = Some(cfg.identity.clone());
        spec.acquire_time = Some(now());
        spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
    }
    spec.lease_duration_seconds = Some(secs);
    spec.renew_time = Some(now());
    match api.replace(&cfg.name, &PostParams::default(), &lease).await {
        Ok(_) => Ok(Outcome::Held),
        Err(kube::Error::Api(s)) if s.code == 409 => Ok(Outcome::Other),
        Err(e) => Err(e),
    }
}

async fn release(api: &Api<Lease>, cfg: &LeaderConfig) {
    if let Ok(Some(mut lease)) = api.get_opt(&cfg.name).await
        && let Some(spec) = lease.spec.as_mut()
        && spec.holder_identity.as_deref() == Some(cfg.identity.as_str())
    {
        spec.holder_identity = None;
        spec.renew_time = None;
        spec.acquire_time = None;
        let _ = api.replace(&cfg.name, &PostParams::default(), &lease).await;
    }
}

/// Waits for leadership, then runs `work` with a token that is cancelled when leadership is
/// lost or `shutdown` fires; renews meanwhile and releases the Lease on the way out.
pub(crate) async fn run_as_leader<F, Fut, E>(
    client: kube::Client,
    cfg: LeaderConfig,
    shutdown: CancellationToken,
    work: F,
) -> Result<Result<(), E>, Error>
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>> + Send + 'static,
    E: Send + 'static,
{
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let api_err = |source| Error::Api {
        name: cfg.name.clone(),
        source,
    };
    loop {
        match try_acquire(&api, &cfg).await {
            Ok(Outcome::Held) => break,
            Ok(Outcome::Other) => {}
            Err(e) => tracing::warn!(error = %api_err(e), "leader election"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(Ok(())),
            _ = tokio::time::sleep(cfg.renew_every) => {}
        }
    }
    tracing::info!(lease = %cfg.name, identity = %cfg.identity, "became leader");
    let token = shutdown.child_token();
    let mut task = tokio::spawn(work(token.clone()));
    let mut last_renew = tokio::time::Instant::now();
    let result = loop {
        tokio::select! {
            joined = &mut task => {
                break Ok(joined.unwrap_or_else(|e| panic!("controller task panicked: {e}")));
            }
            _ = tokio::time::sleep(cfg.renew_every) => {
                match try_acquire(&api, &cfg).await {
                    Ok(Outcome::Held) => last_renew = tokio::time::Instant::now(),
                    Ok(Outcome::Other) => {
                        token.cancel();
                        let _ = task.await;
                        break Err(Error::Lost(cfg.name.clone()));
                    }
                    Err(e) => {
                        tracing::warn!(error = %api_err(e), "renewing the lease");
                        if last_renew.elapsed() > cfg.lease_duration {
                            token.cancel();
                            let _ = task.await;
                            break Err(Error::Lost(cfg.name.clone()));
                        }
                    }
                }
            }
        }
    };
    release(&api, &cfg).await;
    result
}
