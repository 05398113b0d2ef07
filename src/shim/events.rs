//! Task events to containerd, as its own shims send them: `Forward` of an envelope
//! (namespace, topic, the event as an `Any` named by its full protobuf name) on
//! containerd's ttrpc events service (`containerd.services.events.ttrpc.v1.Events`) at
//! `TTRPC_ADDRESS`. Events are queued and sent in order by one task; containerd's CRI
//! relies on `TaskExit` (and `TaskOOM`) to see containers end.

use std::time::Duration;

use containerd_shim_protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskStart,
};
use containerd_shim_protos::shim::event::Envelope;
use containerd_shim_protos::shim::events::ForwardRequest;
use containerd_shim_protos::shim_async::EventsClient;
use containerd_shim_protos::topics;
use protobuf::{Message, MessageDyn, MessageField};
use tokio::sync::mpsc;

/// One event to publish.
pub(crate) struct Event {
    /// Its topic (`/tasks/exit`, ...).
    pub(crate) topic: &'static str,
    /// The event.
    pub(crate) message: Box<dyn MessageDyn>,
}

/// The topic of each task event.
pub(crate) trait Topic: Message {
    /// `/tasks/...`.
    const TOPIC: &'static str;
}

impl Topic for TaskCreate {
    const TOPIC: &'static str = topics::TASK_CREATE_EVENT_TOPIC;
}
impl Topic for TaskStart {
    const TOPIC: &'static str = topics::TASK_START_EVENT_TOPIC;
}
impl Topic for TaskExit {
    const TOPIC: &'static str = topics::TASK_EXIT_EVENT_TOPIC;
}
impl Topic for TaskDelete {
    const TOPIC: &'static str = topics::TASK_DELETE_EVENT_TOPIC;
}
impl Topic for TaskOOM {
    const TOPIC: &'static str = topics::TASK_OOM_EVENT_TOPIC;
}
impl Topic for TaskExecAdded {
    const TOPIC: &'static str = topics::TASK_EXEC_ADDED_EVENT_TOPIC;
}
impl Topic for TaskExecStarted {
    const TOPIC: &'static str = topics::TASK_EXEC_STARTED_EVENT_TOPIC;
}

/// The publishing side the pod holds.
#[derive(Clone)]
pub(crate) struct Publisher {
    tx: mpsc::UnboundedSender<Event>,
}

impl Publisher {
    /// A publisher to containerd's ttrpc socket `address` for `namespace`; `None` drops
    /// events (tests without containerd).
    pub(crate) fn start(address: Option<String>, namespace: String) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(send_loop(address, namespace, rx));
        Self { tx }
    }

    /// Queues `event`.
    pub(crate) fn publish<E: Topic + MessageDyn>(&self, event: E) {
        tracing::debug!(topic = E::TOPIC, "event");
        let _ = self.tx.send(Event {
            topic: E::TOPIC,
            message: Box::new(event),
        });
    }
}

/// The envelope of `event` for `namespace`.
pub(crate) fn envelope(namespace: &str, event: &Event) -> Result<Envelope, protobuf::Error> {
    let mut any = protobuf::well_known_types::any::Any::new();
    any.type_url = event.message.descriptor_dyn().full_name().to_string();
    any.value = event.message.write_to_bytes_dyn()?;
    let mut env = Envelope::new();
    env.timestamp = MessageField::some(super::pod::now());
    env.namespace = namespace.to_string();
    env.topic = event.topic.to_string();
    env.event = MessageField::some(any);
    Ok(env)
}

async fn send_loop(
    address: Option<String>,
    namespace: String,
    mut rx: mpsc::UnboundedReceiver<Event>,
) {
    let mut client: Option<EventsClient> = None;
    while let Some(ev) = rx.recv().await {
        let Some(addr) = &address else { continue };
        let env = match envelope(&namespace, &ev) {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(topic = ev.topic, error = %e, "encoding an event");
                continue;
            }
        };
        let mut req = ForwardRequest::new();
        req.envelope = MessageField::some(env);
        // A few tries: containerd restarting (the node installer restarts it) must not lose
        // an exit.
        for attempt in 0..20u32 {
            if client.is_none() {
                match ttrpc::r#async::Client::connect(&format!("unix://{addr}")).await {
                    Ok(c) => client = Some(EventsClient::new(c)),
                    Err(e) => {
                        tracing::debug!(error = %e, "connecting to containerd's events service");
                    }
                }
            }
            if let Some(c) = &client {
                match c
                    .forward(super::vm::ctx(Duration::from_secs(5)), &req)
                    .await
                {
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(topic = ev.topic, attempt, error = %e, "publishing an event");
                        client = None;
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(250 * u64::from(attempt.min(8) + 1))).await;
        }
    }
}

/// containerd's ttrpc address: `TTRPC_ADDRESS`, which containerd sets for its shims, else
/// its gRPC address plus `.ttrpc`.
pub(crate) fn ttrpc_address(grpc_address: &str) -> Option<String> {
    match std::env::var("TTRPC_ADDRESS") {
        Ok(a) if !a.is_empty() => Some(a.trim_start_matches("unix://").to_string()),
        _ if !grpc_address.is_empty() => Some(format!("{grpc_address}.ttrpc")),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_is_enveloped_with_its_full_protobuf_name() {
        let mut exit = TaskExit::new();
        exit.container_id = "c1".into();
        exit.exit_status = 3;
        let ev = Event {
            topic: TaskExit::TOPIC,
            message: Box::new(exit),
        };
        let env = envelope("k8s.io", &ev).unwrap();
        assert_eq!(env.topic, "/tasks/exit");
        assert_eq!(env.namespace, "k8s.io");
        assert_eq!(env.event.type_url, "containerd.events.TaskExit");
        let back = TaskExit::parse_from_bytes(&env.event.value).unwrap();
        assert_eq!(back.container_id, "c1");
        assert_eq!(back.exit_status, 3);
        assert_eq!(TaskOOM::TOPIC, "/tasks/oom");
    }
}
