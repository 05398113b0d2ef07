//! What the operator's controllers are made of: what they share ([`Shared`]), [`Watches`]
//! that keep stores of what a controller reads and wake it when they change, and one
//! [`reconcile_loop`] (a pass per burst of events, the wait each pass asks for, backoff
//! after a failure). Which controllers run is [`super::Controllers`].

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use kube::api::{Api, DynamicObject};
use kube::discovery::ApiResource;
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::store::WriterDropped;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::metrics::OperatorMetrics;
use crate::api::names::OPERATOR;

/// What every controller of the operator shares.
#[derive(Clone)]
pub(crate) struct Shared {
    /// The client of every read and write.
    pub(crate) client: Client,
    /// The operator namespace, where the controllers deploy what they run.
    pub(crate) namespace: String,
    /// The sandboxd image the node installer, CAA, the webhook and the image Jobs run.
    pub(crate) image: String,
    /// This replica, as the reporter of Events.
    pub(crate) instance: String,
    /// The operator's metrics.
    pub(crate) metrics: Arc<OperatorMetrics>,
}

impl Shared {
    /// Publishes Events as the operator (this replica).
    pub(crate) fn recorder(&self) -> Recorder {
        Recorder::new(
            self.client.clone(),
            Reporter {
                controller: OPERATOR.into(),
                instance: Some(self.instance.clone()),
            },
        )
    }
}

/// A burst of watch events settles this long into one pass.
const SETTLE: Duration = Duration::from_millis(100);
/// The first wait after a failed pass; it doubles with each failure in a row.
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
/// The longest wait after failed passes.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The watches of one controller: each keeps its store (or only wakes the controller) and
/// retries with backoff until `shutdown`.
pub(crate) struct Watches {
    notify: Arc<Notify>,
    shutdown: CancellationToken,
}

/// A store's first list, for [`Watches::ready`].
pub(crate) type Synced<'a> = (
    &'static str,
    Pin<Box<dyn Future<Output = Result<(), WriterDropped>> + Send + 'a>>,
);

/// The first list of `store` (named `what` in errors).
pub(crate) fn synced<'a, K>(what: &'static str, store: &'a Store<K>) -> Synced<'a>
where
    K: Resource + Clone + Send + Sync + 'static,
    K::DynamicType: Eq + std::hash::Hash + Clone + Send + Sync,
{
    (what, Box::pin(store.wait_until_ready()))
}

impl Watches {
    /// Watches that stop with `shutdown`.
    pub(crate) fn new(shutdown: &CancellationToken) -> Self {
        Self {
            notify: Arc::new(Notify::new()),
            shutdown: shutdown.clone(),
        }
    }

    /// The store of what `api` lists under `cfg`.
    pub(crate) fn store<K>(&self, api: Api<K>, cfg: watcher::Config) -> Store<K>
    where
        K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    {
        self.store_trimmed(api, cfg, |_| {})
    }

    /// The store of what `api` lists under `cfg`, each object trimmed before it is kept
    /// (what a controller never reads need not stay in memory).
    pub(crate) fn store_trimmed<K>(
        &self,
        api: Api<K>,
        cfg: watcher::Config,
        trim: impl FnMut(&mut K) + Send + 'static,
    ) -> Store<K>
    where
        K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
        K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
    {
        let (store, writer) = reflector::store();
        self.spawn(reflector::reflector(writer, watcher(api, cfg).modify(trim)).default_backoff());
        store
    }

    /// The store of the one object `name` of the dynamic resource `ar`.
    pub(crate) fn dynamic(
        &self,
        client: &Client,
        ar: &ApiResource,
        name: &str,
    ) -> Store<DynamicObject> {
        let writer = reflector::store::Writer::new(ar.clone());
        let store = writer.as_reader();
        let api = Api::<DynamicObject>::all_with(client.clone(), ar);
        let cfg = watcher::Config::default().fields(&format!("metadata.name={name}"));
        self.spawn(reflector::reflector(writer, watcher(api, cfg)).default_backoff());
        store
    }

    /// A watch that only wakes the controller: a trigger, never a cache.
    pub(crate) fn trigger<K>(&self, api: Api<K>, cfg: watcher::Config)
    where
        K: Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    {
        self.spawn(watcher(api, cfg).default_backoff());
    }

    /// Waits for the first list of every store: `Ok(false)` when shutdown came first,
    /// `Err(what)` when the watch of `what` stopped before its first list.
    pub(crate) async fn ready(&self, stores: Vec<Synced<'_>>) -> Result<bool, &'static str> {
        for (what, first_list) in stores {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(false),
                r = first_list => r.map_err(|_| what)?,
            }
        }
        Ok(true)
    }

    fn spawn<S, T>(&self, stream: S)
    where
        S: Stream<Item = Result<T, watcher::Error>> + Send + 'static,
        T: Send,
    {
        let (notify, shutdown) = (self.notify.clone(), self.shutdown.clone());
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    ev = stream.next() => match ev {
                        Some(Ok(_)) => notify.notify_one(),
                        Some(Err(e)) => tracing::debug!(error = %e, "watch error (retrying)"),
                        None => break,
                    },
                }
            }
        });
    }
}

/// A failed pass, logged before it is retried.
pub(crate) trait Failure: std::fmt::Display {
    /// Whether the pass only lost an optimistic-concurrency race (retried without a
    /// warning).
    fn is_conflict(&self) -> bool {
        false
    }
}

/// Runs `pass` whenever a watch of `watches` wakes it, when the wait the last pass asked
/// for runs out, or after a failure when the backoff runs out, until shutdown. A failure
/// backs off from 0.5 s, doubling to 30 s; a success resets it.
pub(crate) async fn reconcile_loop<F, Fut, E>(
    controller: &'static str,
    watches: &Watches,
    mut pass: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Duration, E>>,
    E: Failure,
{
    tracing::info!(controller, "controller started");
    let mut backoff = FIRST_BACKOFF;
    let mut wait = Duration::ZERO;
    loop {
        tokio::select! {
            _ = watches.shutdown.cancelled() => return,
            _ = watches.notify.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
        tokio::time::sleep(SETTLE).await;
        match pass().await {
            Ok(next) => {
                backoff = FIRST_BACKOFF;
                wait = next;
            }
            Err(e) => {
                if e.is_conflict() {
                    tracing::debug!(controller, error = %e, "reconcile raced another write; retrying");
                } else {
                    tracing::warn!(controller, error = %e, "reconcile failed; retrying");
                }
                wait = backoff;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}
