//! The ttrpc services: every `grpc.AgentService` and `grpc.Health` method, each delegating
//! to one `do_*` of [`Agent`]; [`answer`] is the one place errors become ttrpc statuses.
//! Methods sandboxd's agent does not implement answer `UNIMPLEMENTED` naming the method
//! (never a hang, never a crash).

use std::collections::HashMap;
use std::sync::Arc;

use protobuf::well_known_types::empty::Empty;
use ttrpc::r#async::TtrpcContext;

use super::{Agent, Error};
use crate::protocol::agent::*;
use crate::protocol::health::{CheckRequest, HealthCheckResponse, VersionCheckResponse};
use crate::protocol::{agent_ttrpc, csi, health_ttrpc, types};

/// The agent's ttrpc services, ready for `Server::register_service`.
pub(crate) fn services(agent: Arc<Agent>) -> HashMap<String, ttrpc::r#async::Service> {
    let rpc = Arc::new(Rpc(agent));
    let mut s = agent_ttrpc::create_agent_service(rpc.clone());
    s.extend(health_ttrpc::create_health(rpc));
    s
}

/// The ttrpc face of the agent.
pub(crate) struct Rpc(Arc<Agent>);

/// The one error→status mapping: logs the failure and answers its code and message.
fn answer<T>(method: &'static str, r: Result<T, Error>) -> ttrpc::Result<T> {
    r.map_err(|e| {
        match &e {
            Error::Unimplemented(_) => tracing::debug!(method, "not implemented"),
            e => tracing::warn!(method, code = ?e.code(), error = %e, "call failed"),
        }
        e.to_ttrpc()
    })
}

fn empty(r: Result<(), Error>) -> Result<Empty, Error> {
    r.map(|()| Empty::new())
}

fn unimplemented<T>(method: &'static str) -> ttrpc::Result<T> {
    answer(method, Err(Error::Unimplemented(method)))
}

#[async_trait::async_trait]
impl health_ttrpc::Health for Rpc {
    async fn check(
        &self,
        _ctx: &TtrpcContext,
        req: CheckRequest,
    ) -> ttrpc::Result<HealthCheckResponse> {
        answer("Check", self.0.do_check(req).await)
    }
    async fn version(
        &self,
        _ctx: &TtrpcContext,
        req: CheckRequest,
    ) -> ttrpc::Result<VersionCheckResponse> {
        answer("Version", self.0.do_version(req).await)
    }
}

#[async_trait::async_trait]
impl agent_ttrpc::AgentService for Rpc {
    async fn create_container(
        &self,
        _ctx: &TtrpcContext,
        req: CreateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        answer(
            "CreateContainer",
            empty(self.0.do_create_container(req).await),
        )
    }
    async fn start_container(
        &self,
        _ctx: &TtrpcContext,
        req: StartContainerRequest,
    ) -> ttrpc::Result<Empty> {
        answer(
            "StartContainer",
            empty(self.0.do_start_container(req).await),
        )
    }
    async fn remove_container(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveContainerRequest,
    ) -> ttrpc::Result<Empty> {
        answer(
            "RemoveContainer",
            empty(self.0.do_remove_container(req).await),
        )
    }
    async fn exec_process(
        &self,
        _ctx: &TtrpcContext,
        req: ExecProcessRequest,
    ) -> ttrpc::Result<Empty> {
        answer("ExecProcess", empty(self.0.do_exec_process(req).await))
    }
    async fn signal_process(
        &self,
        _ctx: &TtrpcContext,
        req: SignalProcessRequest,
    ) -> ttrpc::Result<Empty> {
        answer("SignalProcess", empty(self.0.do_signal_process(req).await))
    }
    async fn wait_process(
        &self,
        _ctx: &TtrpcContext,
        req: WaitProcessRequest,
    ) -> ttrpc::Result<WaitProcessResponse> {
        answer("WaitProcess", self.0.do_wait_process(req).await)
    }
    async fn update_container(
        &self,
        _ctx: &TtrpcContext,
        req: UpdateContainerRequest,
    ) -> ttrpc::Result<Empty> {
        answer(
            "UpdateContainer",
            empty(self.0.do_update_container(req).await),
        )
    }
    async fn update_ephemeral_mounts(
        &self,
        _ctx: &TtrpcContext,
        _req: UpdateEphemeralMountsRequest,
    ) -> ttrpc::Result<Empty> {
        unimplemented("UpdateEphemeralMounts")
    }
    async fn stats_container(
        &self,
        _ctx: &TtrpcContext,
        req: StatsContainerRequest,
    ) -> ttrpc::Result<StatsContainerResponse> {
        answer("StatsContainer", self.0.do_stats_container(req).await)
    }
    async fn pause_container(
        &self,
        _ctx: &TtrpcContext,
        _req: PauseContainerRequest,
    ) -> ttrpc::Result<Empty> {
        unimplemented("PauseContainer")
    }
    async fn resume_container(
        &self,
        _ctx: &TtrpcContext,
        _req: ResumeContainerRequest,
    ) -> ttrpc::Result<Empty> {
        unimplemented("ResumeContainer")
    }
    async fn remove_stale_virtiofs_share_mounts(
        &self,
        _ctx: &TtrpcContext,
        req: RemoveStaleVirtiofsShareMountsRequest,
    ) -> ttrpc::Result<Empty> {
        answer(
            "RemoveStaleVirtiofsShareMounts",
            empty(self.0.do_remove_stale_virtiofs_share_mounts(req).await),
        )
    }
    async fn get_diagnostic_data(
        &self,
        _ctx: &TtrpcContext,
        req: GetDiagnosticDataRequest,
    ) -> ttrpc::Result<GetDiagnosticDataResponse> {
        answer(
            "GetDiagnosticData",
            self.0.do_get_diagnostic_data(req).await,
        )
    }
    async fn write_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: WriteStreamRequest,
    ) -> ttrpc::Result<WriteStreamResponse> {
        answer("WriteStdin", self.0.do_write_stdin(req).await)
    }
    async fn read_stdout(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        answer("ReadStdout", self.0.do_read_stream(req, true).await)
    }
    async fn read_stderr(
        &self,
        _ctx: &TtrpcContext,
        req: ReadStreamRequest,
    ) -> ttrpc::Result<ReadStreamResponse> {
        answer("ReadStderr", self.0.do_read_stream(req, false).await)
    }
    async fn close_stdin(
        &self,
        _ctx: &TtrpcContext,
        req: CloseStdinRequest,
    ) -> ttrpc::Result<Empty> {
        answer("CloseStdin", empty(self.0.do_close_stdin(req).await))
    }
    async fn tty_win_resize(
        &self,
        _ctx: &TtrpcContext,
        req: TtyWinResizeRequest,
    ) -> ttrpc::Result<Empty> {
        answer("TtyWinResize", empty(self.0.do_tty_win_resize(req).await))
    }
    async fn update_interface(
        &self,
        _ctx: &TtrpcContext,
        _req: UpdateInterfaceRequest,
    ) -> ttrpc::Result<types::Interface> {
        unimplemented("UpdateInterface")
    }
    async fn update_routes(
        &self,
        _ctx: &TtrpcContext,
        _req: UpdateRoutesRequest,
    ) -> ttrpc::Result<Routes> {
        unimplemented("UpdateRoutes")
    }
    async fn list_interfaces(
        &self,
        _ctx: &TtrpcContext,
        _req: ListInterfacesRequest,
    ) -> ttrpc::Result<Interfaces> {
        unimplemented("ListInterfaces")
    }
    async fn list_routes(
        &self,
        _ctx: &TtrpcContext,
        _req: ListRoutesRequest,
    ) -> ttrpc::Result<Routes> {
        unimplemented("ListRoutes")
    }
    async fn add_arp_neighbors(
        &self,
        _ctx: &TtrpcContext,
        _req: AddARPNeighborsRequest,
    ) -> ttrpc::Result<Empty> {
        unimplemented("AddARPNeighbors")
    }
    async fn get_ip_tables(
        &self,
        _ctx: &TtrpcContext,
        _req: GetIPTablesRequest,
    ) -> ttrpc::Result<GetIPTablesResponse> {
        unimplemented("GetIPTables")
    }
    async fn set_ip_tables(
        &self,
        _ctx: &TtrpcContext,
        _req: SetIPTablesRequest,
    ) -> ttrpc::Result<SetIPTablesResponse> {
        unimplemented("SetIPTables")
    }
    async fn get_metrics(
        &self,
        _ctx: &TtrpcContext,
        req: GetMetricsRequest,
    ) -> ttrpc::Result<Metrics> {
        answer("GetMetrics", self.0.do_get_metrics(req).await)
    }
    async fn mem_agent_memcg_set(
        &self,
        _ctx: &TtrpcContext,
        _req: MemAgentMemcgConfig,
    ) -> ttrpc::Result<Empty> {
        unimplemented("MemAgentMemcgSet")
    }
    async fn mem_agent_compact_set(
        &self,
        _ctx: &TtrpcContext,
        _req: MemAgentCompactConfig,
    ) -> ttrpc::Result<Empty> {
        unimplemented("MemAgentCompactSet")
    }
    async fn create_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: CreateSandboxRequest,
    ) -> ttrpc::Result<Empty> {
        answer("CreateSandbox", empty(self.0.do_create_sandbox(req).await))
    }
    async fn destroy_sandbox(
        &self,
        _ctx: &TtrpcContext,
        req: DestroySandboxRequest,
    ) -> ttrpc::Result<Empty> {
        answer(
            "DestroySandbox",
            empty(self.0.do_destroy_sandbox(req).await),
        )
    }
    async fn online_cpu_mem(
        &self,
        _ctx: &TtrpcContext,
        _req: OnlineCPUMemRequest,
    ) -> ttrpc::Result<Empty> {
        unimplemented("OnlineCPUMem")
    }
    async fn reseed_random_dev(
        &self,
        _ctx: &TtrpcContext,
        _req: ReseedRandomDevRequest,
    ) -> ttrpc::Result<Empty> {
        unimplemented("ReseedRandomDev")
    }
    async fn get_guest_details(
        &self,
        _ctx: &TtrpcContext,
        req: GuestDetailsRequest,
    ) -> ttrpc::Result<GuestDetailsResponse> {
        answer("GetGuestDetails", self.0.do_get_guest_details(req).await)
    }
    async fn mem_hotplug_by_probe(
        &self,
        _ctx: &TtrpcContext,
        _req: MemHotplugByProbeRequest,
    ) -> ttrpc::Result<Empty> {
        unimplemented("MemHotplugByProbe")
    }
    async fn set_guest_date_time(
        &self,
        _ctx: &TtrpcContext,
        _req: SetGuestDateTimeRequest,
    ) -> ttrpc::Result<Empty> {
        unimplemented("SetGuestDateTime")
    }
    async fn copy_file(&self, _ctx: &TtrpcContext, req: CopyFileRequest) -> ttrpc::Result<Empty> {
        answer("CopyFile", empty(self.0.do_copy_file(req).await))
    }
    async fn get_oom_event(
        &self,
        _ctx: &TtrpcContext,
        req: GetOOMEventRequest,
    ) -> ttrpc::Result<OOMEvent> {
        answer("GetOOMEvent", self.0.do_get_oom_event(req).await)
    }
    async fn add_swap(&self, _ctx: &TtrpcContext, _req: AddSwapRequest) -> ttrpc::Result<Empty> {
        unimplemented("AddSwap")
    }
    async fn add_swap_path(
        &self,
        _ctx: &TtrpcContext,
        _req: AddSwapPathRequest,
    ) -> ttrpc::Result<Empty> {
        unimplemented("AddSwapPath")
    }
    async fn get_volume_stats(
        &self,
        _ctx: &TtrpcContext,
        _req: VolumeStatsRequest,
    ) -> ttrpc::Result<csi::VolumeStatsResponse> {
        unimplemented("GetVolumeStats")
    }
    async fn resize_volume(
        &self,
        _ctx: &TtrpcContext,
        _req: ResizeVolumeRequest,
    ) -> ttrpc::Result<Empty> {
        unimplemented("ResizeVolume")
    }
    async fn set_policy(&self, _ctx: &TtrpcContext, req: SetPolicyRequest) -> ttrpc::Result<Empty> {
        answer("SetPolicy", empty(self.0.do_set_policy(req).await))
    }
}

#[cfg(test)]
mod tests {
    use protobuf::Message;

    use super::*;

    /// A ttrpc client that spells the method path literally, as the kata shim sends it.
    struct Wire(ttrpc::r#async::Client);

    impl Wire {
        async fn call(&self, path: &str, payload: Vec<u8>) -> ttrpc::proto::Response {
            let (service, method) = path
                .strip_prefix('/')
                .and_then(|p| p.split_once('/'))
                .expect("a /service/method path");
            let mut req = ttrpc::proto::Request::new();
            req.service = service.into();
            req.method = method.into();
            req.payload = payload;
            req.timeout_nano = 10_000_000_000;
            let r = tokio::time::timeout(std::time::Duration::from_secs(10), self.0.request(req))
                .await
                .unwrap_or_else(|_| panic!("{path}: no answer in 10s"));
            match r {
                Ok(r) => r,
                // The client turns a non-OK status into an error: back into the answer.
                Err(ttrpc::Error::RpcStatus(status)) => {
                    let mut r = ttrpc::proto::Response::new();
                    r.status = Some(status).into();
                    r
                }
                Err(e) => panic!("{path}: {e}"),
            }
        }

        async fn ok<M: Message>(&self, path: &str, req: &impl Message) -> M {
            let r = self.call(path, req.write_to_bytes().unwrap()).await;
            assert_eq!(r.status.code(), ttrpc::Code::OK, "{path}: {:?}", r.status);
            M::parse_from_bytes(&r.payload).unwrap()
        }
    }

    async fn agent() -> (tempfile::TempDir, ttrpc::r#async::Server, Wire) {
        let dir = tempfile::tempdir().unwrap();
        let agent = Agent::new(super::super::Paths::under(dir.path()), vec![]).unwrap();
        let socket = dir.path().join("agent.sock");
        let server = super::super::serve(&socket, agent).await.unwrap();
        let c = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
            .await
            .unwrap();
        (dir, server, Wire(c))
    }

    #[tokio::test]
    async fn health_check_answers_serving_on_the_literal_path() {
        let (_d, _s, c) = agent().await;
        let r: HealthCheckResponse = c.ok("/grpc.Health/Check", &CheckRequest::new()).await;
        assert_eq!(
            r.status.value(),
            crate::protocol::health::health_check_response::ServingStatus::SERVING as i32
        );
        // Field 1 = 1 on the wire, as the shim decodes it.
        let raw = c.call("/grpc.Health/Check", vec![]).await;
        assert_eq!(raw.payload, vec![0x08, 0x01]);
        let v: VersionCheckResponse = c.ok("/grpc.Health/Version", &CheckRequest::new()).await;
        assert!(v.agent_version.contains(crate::VERSION));
    }

    #[tokio::test]
    async fn every_method_not_implemented_answers_unimplemented_with_its_name() {
        let (_d, _s, c) = agent().await;
        for m in [
            "UpdateEphemeralMounts",
            "PauseContainer",
            "ResumeContainer",
            "UpdateInterface",
            "UpdateRoutes",
            "ListInterfaces",
            "ListRoutes",
            "AddARPNeighbors",
            "GetIPTables",
            "SetIPTables",
            "MemAgentMemcgSet",
            "MemAgentCompactSet",
            "OnlineCPUMem",
            "ReseedRandomDev",
            "MemHotplugByProbe",
            "SetGuestDateTime",
            "AddSwap",
            "AddSwapPath",
            "GetVolumeStats",
            "ResizeVolume",
        ] {
            let r = c.call(&format!("/grpc.AgentService/{m}"), vec![]).await;
            assert_eq!(
                r.status.code(),
                ttrpc::Code::UNIMPLEMENTED,
                "{m}: {:?}",
                r.status
            );
            assert!(r.status.message.contains(m), "{m}: {}", r.status.message);
        }
        // A method no release has: ttrpc's own answer, promptly.
        let r = c.call("/grpc.AgentService/PullImage", vec![]).await;
        assert_ne!(r.status.code(), ttrpc::Code::OK);
    }

    #[tokio::test]
    async fn a_sandbox_is_created_once_and_copied_files_stay_under_the_share_directory() {
        let (d, _s, c) = agent().await;
        let share = d.path().join("kata/shared/containers");
        let _: Empty = c
            .ok(
                "/grpc.AgentService/SetPolicy",
                &SetPolicyRequest {
                    policy: "package agent_policy\ndefault AllowRequestsFailingPolicy := true\n"
                        .into(),
                    ..Default::default()
                },
            )
            .await;
        // No sandbox yet: containers are refused with a precondition error.
        let mut cc = CreateContainerRequest::new();
        cc.container_id = "c1".into();
        let r = c
            .call(
                "/grpc.AgentService/CreateContainer",
                cc.write_to_bytes().unwrap(),
            )
            .await;
        assert_eq!(
            r.status.code(),
            ttrpc::Code::FAILED_PRECONDITION,
            "{:?}",
            r.status
        );
        let sb = CreateSandboxRequest {
            sandbox_id: "sb1".into(),
            ..Default::default()
        };
        let _: Empty = c.ok("/grpc.AgentService/CreateSandbox", &sb).await;
        let r = c
            .call(
                "/grpc.AgentService/CreateSandbox",
                sb.write_to_bytes().unwrap(),
            )
            .await;
        assert_eq!(r.status.code(), ttrpc::Code::ALREADY_EXISTS);
        let g: GuestDetailsResponse = c
            .ok(
                "/grpc.AgentService/GetGuestDetails",
                &GuestDetailsRequest {
                    mem_block_size: true,
                    ..Default::default()
                },
            )
            .await;
        let handlers = &g.agent_details.storage_handlers;
        for h in ["image_guest_pull", "local", "ephemeral"] {
            assert!(handlers.iter().any(|x| x == h), "{handlers:?}");
        }
        let path = format!("{}/c1-0011223344556677-hostname", share.display());
        let f = CopyFileRequest {
            path: path.clone(),
            file_size: 4,
            file_mode: 0o644,
            dir_mode: 0o750,
            data: b"web\n".to_vec(),
            ..Default::default()
        };
        let _: Empty = c.ok("/grpc.AgentService/CopyFile", &f).await;
        assert_eq!(std::fs::read(&path).unwrap(), b"web\n");
        let bad = CopyFileRequest {
            path: format!("{}/../../escape", share.display()),
            file_size: 1,
            data: b"x".to_vec(),
            ..Default::default()
        };
        let r = c
            .call("/grpc.AgentService/CopyFile", bad.write_to_bytes().unwrap())
            .await;
        assert_eq!(r.status.code(), ttrpc::Code::INVALID_ARGUMENT);
        assert!(!d.path().join("kata/escape").exists());
        let _: Empty = c
            .ok(
                "/grpc.AgentService/RemoveStaleVirtiofsShareMounts",
                &RemoveStaleVirtiofsShareMountsRequest::new(),
            )
            .await;
        let m: Metrics = c
            .ok("/grpc.AgentService/GetMetrics", &GetMetricsRequest::new())
            .await;
        assert!(
            m.metrics.contains("sandboxd_agent_containers 0"),
            "{}",
            m.metrics
        );
        // Unknown containers are NOT_FOUND, not a hang.
        for (p, body) in [
            (
                "/grpc.AgentService/WaitProcess",
                WaitProcessRequest {
                    container_id: "nope".into(),
                    ..Default::default()
                }
                .write_to_bytes()
                .unwrap(),
            ),
            (
                "/grpc.AgentService/ReadStdout",
                ReadStreamRequest {
                    container_id: "nope".into(),
                    len: 10,
                    ..Default::default()
                }
                .write_to_bytes()
                .unwrap(),
            ),
            (
                "/grpc.AgentService/StartContainer",
                StartContainerRequest {
                    container_id: "nope".into(),
                    ..Default::default()
                }
                .write_to_bytes()
                .unwrap(),
            ),
        ] {
            let r = c.call(p, body).await;
            assert_eq!(
                r.status.code(),
                ttrpc::Code::NOT_FOUND,
                "{p}: {:?}",
                r.status
            );
        }
        let _: Empty = c
            .ok(
                "/grpc.AgentService/DestroySandbox",
                &DestroySandboxRequest::new(),
            )
            .await;
        assert!(!Path::new(&path).exists(), "the share directory is emptied");
        // A new sandbox after the destroy.
        let _: Empty = c.ok("/grpc.AgentService/CreateSandbox", &sb).await;
    }

    use std::path::Path;
}
