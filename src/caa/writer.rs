//! Background PeerPod writes: what only reports the VM's progress (instance id, VM IP, phase)
//! and the release of a record whose VM is gone, taken off the shim's calls.
//!
//! - Ordered per record: a record is written by at most one worker at a time, and what
//!   arrives meanwhile is merged into its one pending entry (later fields win, as successive
//!   merge patches would), so a stale status never overwrites a newer one; a release ends
//!   the record, dropping any status still pending for it.
//! - Bounded: a fixed number of workers serve one queue of records; a record holds at most
//!   one pending entry.
//! - Retried: a failed write goes back under whatever arrived since, after a backoff; a write
//!   that finds the record gone is done.
//!
//! None of these writes guards a VM: the record that references it was written before the
//! create call, and a record being deleted says "delete the VM, then release me" on its own.
//! A crash loses what was pending, and the start-up reconcile rebuilds it: the instance id
//! and IP from the cloud, the release from the record's deletion timestamp.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kube::Client;
use tokio::sync::Notify;

use super::crashpoint;
use super::state;
use crate::api::peerpod::{PeerPod, PeerPodStatus, phases};

/// Workers per CAA.
const WORKERS: usize = 4;
/// Attempts of one pending entry before it is dropped (the reconcile and sweep repair it).
const ATTEMPTS: u32 = 30;

/// A record: namespace and name.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    /// Namespace.
    pub(crate) ns: String,
    /// Name (the VM name).
    pub(crate) name: String,
}

impl Key {
    /// The key of a record.
    pub(crate) fn of(r: &state::Record) -> Self {
        Self {
            ns: r.namespace.clone(),
            name: r.vm_name.clone(),
        }
    }
}

/// What is still to be written to one record.
#[derive(Clone, Debug, Default, PartialEq)]
pub(crate) struct Pending {
    /// `spec.instanceID`.
    instance_id: Option<String>,
    /// Fields of the status (merged).
    status: Option<PeerPodStatus>,
    /// Remove the finalizer of the (deleted) record: `Some(None)` deletes it first.
    release: Option<Option<Box<PeerPod>>>,
}

impl Pending {
    /// The VM is running: its id, IP and phase.
    pub(crate) fn running(instance_id: String, ip: Option<String>) -> Self {
        Self {
            instance_id: Some(instance_id),
            status: Some(PeerPodStatus {
                phase: Some(phases::RUNNING.into()),
                vm_ip: ip,
                ..Default::default()
            }),
            release: None,
        }
    }

    /// Status fields.
    pub(crate) fn status(st: PeerPodStatus) -> Self {
        Self {
            status: Some(st),
            ..Default::default()
        }
    }

    /// Release the record once its VM is gone; `current` is the answer of its deletion
    /// (`None`: delete it first).
    pub(crate) fn release(current: Option<PeerPod>) -> Self {
        Self {
            release: Some(current.map(Box::new)),
            ..Default::default()
        }
    }

    /// Merges what arrived `later`: later fields win; a release ends the record.
    fn merge(&mut self, later: Pending) {
        if self.release.is_some() {
            // The record is being released: nothing written after that can matter.
            return;
        }
        if later.release.is_some() {
            *self = later;
            return;
        }
        if later.instance_id.is_some() {
            self.instance_id = later.instance_id;
        }
        self.status = match (self.status.take(), later.status) {
            (Some(a), Some(b)) => Some(PeerPodStatus {
                phase: b.phase.or(a.phase),
                vm_ip: b.vm_ip.or(a.vm_ip),
                vni: b.vni.or(a.vni),
                message: b.message.or(a.message),
            }),
            (a, b) => b.or(a),
        };
    }

    fn is_empty(&self) -> bool {
        self.instance_id.is_none() && self.status.is_none() && self.release.is_none()
    }
}

#[derive(Default)]
struct Queue {
    pending: HashMap<Key, Pending>,
    /// Records with a pending entry that no worker holds, oldest first.
    ready: VecDeque<Key>,
    /// Records a worker is writing now.
    busy: HashSet<Key>,
}

impl Queue {
    fn push(&mut self, key: Key, p: Pending) -> bool {
        match self.pending.get_mut(&key) {
            Some(e) => e.merge(p),
            None => {
                self.pending.insert(key.clone(), p);
            }
        }
        if !self.busy.contains(&key) && !self.ready.contains(&key) {
            self.ready.push_back(key);
            return true;
        }
        false
    }

    fn take(&mut self) -> Option<(Key, Pending)> {
        let key = self.ready.pop_front()?;
        let p = self.pending.remove(&key).unwrap_or_default();
        self.busy.insert(key.clone());
        Some((key, p))
    }

    /// A worker is done with `key`; `left` is what it could not write (merged under what
    /// arrived meanwhile). Answers whether the key is ready again.
    fn done(&mut self, key: &Key, left: Option<Pending>) -> bool {
        self.busy.remove(key);
        if let Some(mut left) = left.filter(|l| !l.is_empty()) {
            if let Some(newer) = self.pending.remove(key) {
                left.merge(newer);
            }
            self.pending.insert(key.clone(), left);
        }
        if self.pending.contains_key(key) && !self.ready.contains(key) {
            self.ready.push_back(key.clone());
            return true;
        }
        false
    }

    fn holds(&self, key: &Key) -> bool {
        self.pending.contains_key(key) || self.busy.contains(key)
    }
}

struct Inner {
    client: Client,
    queue: Mutex<Queue>,
    /// A key became ready.
    work: Notify,
    /// A worker finished a key.
    idle: Notify,
}

/// The background writer of one CAA.
#[derive(Clone)]
pub(crate) struct Writer(Arc<Inner>);

impl Writer {
    /// Starts the workers.
    pub(crate) fn start(client: Client) -> Self {
        let w = Self(Arc::new(Inner {
            client,
            queue: Mutex::new(Queue::default()),
            work: Notify::new(),
            idle: Notify::new(),
        }));
        for _ in 0..WORKERS {
            tokio::spawn(w.clone().work());
        }
        w
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.0.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `p` for the record `key`.
    pub(crate) fn push(&self, key: Key, p: Pending) {
        if self.queue().push(key, p) {
            self.0.work.notify_one();
        }
    }

    /// Whether something is pending or being written for `key`.
    pub(crate) fn holds(&self, key: &Key) -> bool {
        self.queue().holds(key)
    }

    /// Waits until nothing is pending for `key` (at most `timeout`); answers whether so.
    pub(crate) async fn flush(&self, key: &Key, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.0.idle.notified();
                tokio::pin!(idle);
                idle.as_mut().enable();
                if !self.holds(key) {
                    return;
                }
                idle.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    async fn work(self) {
        loop {
            let job = {
                let work = self.0.work.notified();
                tokio::pin!(work);
                work.as_mut().enable();
                let job = self.queue().take();
                match job {
                    Some(j) => j,
                    None => {
                        work.await;
                        continue;
                    }
                }
            };
            let (key, p) = job;
            let left = self.write_with_retries(&key, p).await;
            if self.queue().done(&key, left) {
                self.0.work.notify_one();
            }
            self.0.idle.notify_waiters();
        }
    }

    /// Writes `p`, retrying failures while nothing newer arrived for the key; answers what
    /// is left when something newer did (it goes back to the queue merged under it).
    async fn write_with_retries(&self, key: &Key, mut p: Pending) -> Option<Pending> {
        let mut attempt = 0u32;
        loop {
            match write(&self.0.client, key, &mut p).await {
                Ok(()) => return None,
                Err(e) => {
                    attempt += 1;
                    if attempt >= ATTEMPTS {
                        tracing::warn!(peerpod = %format!("{}/{}", key.ns, key.name), error = %e, "giving up a background PeerPod write");
                        return None;
                    }
                    tracing::debug!(peerpod = %format!("{}/{}", key.ns, key.name), attempt, error = %e, "background PeerPod write failed; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(attempt.min(20))))
                        .await;
                    if self.queue().pending.contains_key(key) {
                        return Some(p);
                    }
                }
            }
        }
    }
}

/// Writes what `p` holds; on failure `p` keeps what is still to be written.
async fn write(client: &Client, key: &Key, p: &mut Pending) -> Result<(), kube::Error> {
    let gone = |e: &kube::Error| matches!(e, kube::Error::Api(s) if s.code == 404);
    if let Some(current) = p.release.take() {
        crashpoint::reached(crashpoint::STOP_ANSWERED).await;
        let r = match &current {
            Some(pp) => state::remove_finalizer(client, pp).await,
            None => state::release(client, &key.ns, &key.name).await,
        };
        return match r {
            Ok(()) => {
                *p = Pending::default();
                Ok(())
            }
            Err(e) => {
                p.release = Some(current);
                Err(e)
            }
        };
    }
    if p.status
        .as_ref()
        .is_some_and(|s| s.phase.as_deref() == Some(phases::RUNNING))
    {
        crashpoint::reached(crashpoint::START_ANSWERED).await;
    }
    let instance = async {
        match &p.instance_id {
            Some(id) => Some(state::set_instance_id(client, &key.ns, &key.name, id).await),
            None => None,
        }
    };
    let status = async {
        match &p.status {
            Some(st) => Some(
                state::set_status(client, &key.ns, &key.name, st)
                    .await
                    .map(|_| ()),
            ),
            None => None,
        }
    };
    let (a, b) = tokio::join!(instance, status);
    let mut failed = None;
    match a {
        Some(Err(e)) if !gone(&e) => failed = Some(e),
        _ => p.instance_id = None,
    }
    match b {
        Some(Err(e)) if !gone(&e) => failed = Some(e),
        _ => p.status = None,
    }
    match failed {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(n: &str) -> Key {
        Key {
            ns: "ns".into(),
            name: n.into(),
        }
    }

    fn phase(p: &str) -> Pending {
        Pending::status(PeerPodStatus {
            phase: Some(p.into()),
            ..Default::default()
        })
    }

    #[test]
    fn later_status_fields_win_and_earlier_ones_stay() {
        let mut p = Pending::status(PeerPodStatus {
            phase: Some(phases::CREATING.into()),
            vni: Some(7),
            ..Default::default()
        });
        p.merge(Pending::running("id-1".into(), Some("10.0.0.4".into())));
        assert_eq!(p.instance_id.as_deref(), Some("id-1"));
        let st = p.status.unwrap();
        assert_eq!(st.phase.as_deref(), Some(phases::RUNNING));
        assert_eq!(st.vm_ip.as_deref(), Some("10.0.0.4"));
        assert_eq!(st.vni, Some(7), "a field the later write leaves out stays");
    }

    #[test]
    fn a_release_drops_pending_status_and_nothing_follows_it() {
        let mut p = Pending::running("id".into(), None);
        p.merge(Pending::release(None));
        assert_eq!(p, Pending::release(None));
        p.merge(phase(phases::RUNNING));
        assert_eq!(
            p,
            Pending::release(None),
            "a status after the release is dropped"
        );
    }

    #[test]
    fn one_record_is_never_in_two_workers_and_what_arrives_meanwhile_waits() {
        let mut q = Queue::default();
        assert!(q.push(key("a"), phase(phases::CREATING)));
        assert!(q.push(key("b"), phase(phases::CREATING)));
        let (k, p) = q.take().unwrap();
        assert_eq!(k, key("a"));
        assert_eq!(p, phase(phases::CREATING));
        // While "a" is written, a newer status arrives: it is not handed to another worker.
        assert!(!q.push(key("a"), phase(phases::RUNNING)));
        let (k2, _) = q.take().unwrap();
        assert_eq!(k2, key("b"));
        assert!(q.take().is_none(), "a is busy");
        // The first write failed: it goes back under the newer one, which wins.
        assert!(q.done(&key("a"), Some(phase(phases::CREATING))));
        let (k, p) = q.take().unwrap();
        assert_eq!(k, key("a"));
        assert_eq!(p, phase(phases::RUNNING));
        assert!(!q.done(&key("a"), None));
        assert!(!q.done(&key("b"), None));
        assert!(!q.holds(&key("a")) && !q.holds(&key("b")));
    }

    #[test]
    fn pushes_for_one_record_coalesce_into_one_entry() {
        let mut q = Queue::default();
        for _ in 0..100 {
            q.push(key("a"), phase(phases::RUNNING));
        }
        assert_eq!(q.pending.len(), 1);
        assert_eq!(q.ready.len(), 1);
    }
}
