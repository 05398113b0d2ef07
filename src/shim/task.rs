//! The ttrpc task service containerd calls, registered as `containerd.task.v2.Task` (what
//! containerd uses for a shim that prints a plain address, every version) and
//! `containerd.task.v3.Task` (same messages); each method delegates to one `do_*` of
//! [`Pod`], and [`answer`] is the one place errors become ttrpc statuses.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use containerd_shim_protos::api;
use containerd_shim_protos::shim_async::{Task, create_task};
use protobuf::well_known_types::empty::Empty;
use ttrpc::r#async::TtrpcContext;

use super::boot::Flags;
use super::events::{Publisher, ttrpc_address};
use super::pod::Pod;
use super::{Error, io};

/// The task service names containerd dials.
pub(crate) const SERVICES: [&str; 2] = ["containerd.task.v2.Task", "containerd.task.v3.Task"];

/// The task service over `pod`, under both names.
pub(crate) fn services(pod: Arc<Pod>) -> HashMap<String, ttrpc::r#async::Service> {
    let mut out = HashMap::new();
    for name in SERVICES {
        let svc = create_task(Arc::new(Shim(pod.clone())));
        for (_, s) in svc {
            out.insert(name.to_string(), s);
        }
    }
    out
}

/// The ttrpc face of the pod.
pub(crate) struct Shim(pub(crate) Arc<Pod>);

fn answer<T>(method: &'static str, r: Result<T, Error>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        match &e {
            Error::NotFound(_) | Error::Unimplemented(_) => {
                tracing::debug!(method, error = %e, "task call")
            }
            e => tracing::warn!(method, code = ?e.code(), error = %e, "task call failed"),
        }
        e.to_ttrpc()
    })
}

fn empty(r: Result<(), Error>) -> Result<Empty, Error> {
    r.map(|()| Empty::new())
}

#[async_trait::async_trait]
impl Task for Shim {
    async fn state(
        &self,
        _: &TtrpcContext,
        req: api::StateRequest,
    ) -> ttrpc::Result<api::StateResponse> {
        answer("State", self.0.do_state(req).await)
    }
    async fn create(
        &self,
        _: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> ttrpc::Result<api::CreateTaskResponse> {
        answer("Create", self.0.do_create(req).await)
    }
    async fn start(
        &self,
        _: &TtrpcContext,
        req: api::StartRequest,
    ) -> ttrpc::Result<api::StartResponse> {
        answer("Start", self.0.do_start(req).await)
    }
    async fn delete(
        &self,
        _: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> ttrpc::Result<api::DeleteResponse> {
        answer("Delete", self.0.do_delete(req).await)
    }
    async fn pids(
        &self,
        _: &TtrpcContext,
        req: api::PidsRequest,
    ) -> ttrpc::Result<api::PidsResponse> {
        answer("Pids", self.0.do_pids(req).await)
    }
    async fn pause(&self, _: &TtrpcContext, _: api::PauseRequest) -> ttrpc::Result<Empty> {
        answer("Pause", Err(Error::Unimplemented("Pause")))
    }
    async fn resume(&self, _: &TtrpcContext, _: api::ResumeRequest) -> ttrpc::Result<Empty> {
        answer("Resume", Err(Error::Unimplemented("Resume")))
    }
    async fn checkpoint(
        &self,
        _: &TtrpcContext,
        _: api::CheckpointTaskRequest,
    ) -> ttrpc::Result<Empty> {
        answer("Checkpoint", Err(Error::Unimplemented("Checkpoint")))
    }
    async fn kill(&self, _: &TtrpcContext, req: api::KillRequest) -> ttrpc::Result<Empty> {
        answer("Kill", empty(self.0.do_kill(req).await))
    }
    async fn exec(&self, _: &TtrpcContext, req: api::ExecProcessRequest) -> ttrpc::Result<Empty> {
        answer("Exec", empty(self.0.do_exec(req).await))
    }
    async fn resize_pty(
        &self,
        _: &TtrpcContext,
        req: api::ResizePtyRequest,
    ) -> ttrpc::Result<Empty> {
        answer("ResizePty", empty(self.0.do_resize_pty(req).await))
    }
    async fn close_io(&self, _: &TtrpcContext, req: api::CloseIORequest) -> ttrpc::Result<Empty> {
        answer("CloseIO", empty(self.0.do_close_io(req).await))
    }
    async fn update(&self, _: &TtrpcContext, req: api::UpdateTaskRequest) -> ttrpc::Result<Empty> {
        answer("Update", empty(self.0.do_update(req).await))
    }
    async fn wait(
        &self,
        _: &TtrpcContext,
        req: api::WaitRequest,
    ) -> ttrpc::Result<api::WaitResponse> {
        answer("Wait", self.0.do_wait(req).await)
    }
    async fn stats(
        &self,
        _: &TtrpcContext,
        req: api::StatsRequest,
    ) -> ttrpc::Result<api::StatsResponse> {
        answer("Stats", self.0.do_stats(req).await)
    }
    async fn connect(
        &self,
        _: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> ttrpc::Result<api::ConnectResponse> {
        answer("Connect", self.0.do_connect(req).await)
    }
    async fn shutdown(&self, _: &TtrpcContext, req: api::ShutdownRequest) -> ttrpc::Result<Empty> {
        answer("Shutdown", empty(self.0.do_shutdown(req).await))
    }
}

/// Serves the task API on `socket` until containerd's Shutdown (or SIGTERM), then removes
/// the socket; a sandbox still there is torn down (its VM deleted) first.
pub(crate) async fn serve(flags: Flags, socket: PathBuf) -> Result<(), Error> {
    let publisher = Publisher::start(ttrpc_address(&flags.address), flags.namespace.clone());
    let pod = Pod::new(publisher);
    if let Some(d) = socket.parent() {
        std::fs::create_dir_all(d).map_err(io(format!("creating {}", d.display())))?;
    }
    let _ = std::fs::remove_file(&socket);
    let serve_err = |e: ttrpc::Error| Error::Io {
        what: format!("serving {}", socket.display()),
        source: std::io::Error::other(e.to_string()),
    };
    let mut server = ttrpc::r#async::Server::new()
        .bind(&format!("unix://{}", socket.display()))
        .map_err(serve_err)?
        .register_service(services(pod.clone()));
    server.start().await.map_err(serve_err)?;
    tracing::info!(id = flags.id, socket = %socket.display(), "sandboxd shim serving containerd's task API");
    let signals = crate::shutdown::on_signals().map_err(|e| Error::Io {
        what: "installing signal handlers".into(),
        source: std::io::Error::other(e.to_string()),
    })?;
    tokio::select! {
        _ = pod.shutdown.cancelled() => {}
        _ = signals.cancelled() => {
            tracing::info!("signalled: deleting the pod VM before exiting");
            pod.teardown().await;
        }
    }
    let _ = server.shutdown().await;
    let _ = std::fs::remove_file(&socket);
    tracing::info!("sandboxd shim stopped");
    Ok(())
}
