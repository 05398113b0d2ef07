//! A CAA crash, a rollout to a new image and a `peer-pods-cm` change that rolls CAA, each
//! with a pod streaming output and an open exec session on the one agent connection a kata
//! shim holds (it never reconnects), and a pod deleted while CAA is being rolled.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use protobuf::{Message, MessageField};
use sandboxd::protocol::agent::*;
use sandboxd::protocol::{frame, oci, podvminfo};
use tokio::sync::oneshot;

use super::*;
use crate::agent::host::busybox_rootfs;
use crate::agent::sequence::{self, Rootfs, Setup};
use crate::harness::ttrpc_wire;

const A: &str = "grpc.AgentService";

type Pending = Arc<Mutex<HashMap<u32, oneshot::Sender<Result<Vec<u8>, String>>>>>;

/// One connection to a pod's agent socket used as kata's shim uses it: every call of the
/// pod on it at once (one ttrpc stream each, names spelled on the wire by hand), and once it
/// closes it is dead: every call in flight and after fails, nothing reconnects.
struct ShimConn {
    writer: tokio::sync::Mutex<tokio::net::unix::OwnedWriteHalf>,
    pending: Pending,
    next: AtomicU32,
    closed: Arc<Mutex<Option<String>>>,
}

impl ShimConn {
    async fn connect(path: &Path) -> Result<Arc<Self>> {
        let s = tokio::net::UnixStream::connect(path).await?;
        let (r, w) = s.into_split();
        let pending: Pending = Arc::default();
        let closed: Arc<Mutex<Option<String>>> = Arc::default();
        let (p, c) = (pending.clone(), closed.clone());
        tokio::spawn(async move {
            let mut r = tokio::io::BufReader::new(r);
            let why = loop {
                match frame::read_frame(&mut r).await {
                    Ok(Some(f)) if f.kind == frame::TYPE_RESPONSE => {
                        let answer = ttrpc::proto::Response::parse_from_bytes(&f.payload)
                            .map_err(|e| e.to_string())
                            .and_then(|resp| {
                                let st = resp.status.clone().unwrap_or_default();
                                if st.code() == ttrpc::Code::OK {
                                    Ok(resp.payload)
                                } else {
                                    Err(format!("{:?}: {}", st.code(), st.message))
                                }
                            });
                        if let Some(tx) = p.lock().unwrap().remove(&f.stream_id) {
                            let _ = tx.send(answer);
                        }
                    }
                    Ok(Some(_)) => {}
                    Ok(None) => break "ttrpc: closed".to_string(),
                    Err(e) => break e.to_string(),
                }
            };
            *c.lock().unwrap() = Some(why.clone());
            for (_, tx) in p.lock().unwrap().drain() {
                let _ = tx.send(Err(why.clone()));
            }
        });
        Ok(Arc::new(Self {
            writer: tokio::sync::Mutex::new(w),
            pending,
            next: AtomicU32::new(1),
            closed,
        }))
    }

    async fn call<M: Message>(&self, service: &str, method: &str, req: &impl Message) -> Result<M> {
        if let Some(why) = self.closed.lock().unwrap().clone() {
            anyhow::bail!("{method}: the agent connection is closed ({why})");
        }
        let id = self.next.fetch_add(2, Ordering::SeqCst);
        let body = ttrpc_wire::request(service, method, &req.write_to_bytes()?, None);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap().insert(id, tx);
        let f = frame::Frame {
            stream_id: id,
            kind: frame::TYPE_REQUEST,
            flags: 0,
            payload: body,
        };
        frame::write_frame(&mut *self.writer.lock().await, &f).await?;
        let payload = rx
            .await
            .map_err(|_| anyhow::anyhow!("{method}: no answer"))?
            .map_err(|e| anyhow::anyhow!("{method}: {e}"))?;
        Ok(M::parse_from_bytes(&payload)?)
    }

    /// Fails once the connection closed (kata's shim would now tear the sandbox down).
    fn alive(&self, during: &str) -> Result<()> {
        match self.closed.lock().unwrap().clone() {
            None => Ok(()),
            Some(why) => anyhow::bail!(
                "the pod's agent connection closed during {during} ({why}): kata's shim marks \
                 the sandbox exited and tears the pod down"
            ),
        }
    }

    async fn agent<M: Message>(&self, method: &str, req: &impl Message) -> Result<M> {
        self.call(A, method, req).await
    }
}

/// When each answer of the streaming calls arrived: the longest gap in a window is the
/// longest an agent call stalled then.
#[derive(Clone, Default)]
struct Answers(Arc<Mutex<Vec<(Instant, &'static str)>>>);

impl Answers {
    fn seen(&self, what: &'static str) {
        self.0.lock().unwrap().push((Instant::now(), what));
    }

    /// The longest time between two answers of `what` inside `[from, to]` (the window's
    /// edges count as answers).
    fn longest_gap(&self, what: &str, from: Instant, to: Instant) -> Duration {
        let times: Vec<Instant> = self
            .0
            .lock()
            .unwrap()
            .iter()
            .filter(|(_, w)| *w == what)
            .map(|(t, _)| *t)
            .collect();
        crate::harness::longest_gap(times, from, to)
    }
}

/// Reads a process's stdout until EOF, recording each answer.
fn reader(
    conn: Arc<ShimConn>,
    cid: &'static str,
    eid: &'static str,
    answers: Answers,
    tag: &'static str,
) -> tokio::task::JoinHandle<Result<Vec<u8>>> {
    tokio::spawn(async move {
        let mut out = Vec::new();
        loop {
            let r: ReadStreamResponse = conn
                .agent(
                    "ReadStdout",
                    &ReadStreamRequest {
                        container_id: cid.into(),
                        exec_id: eid.into(),
                        len: 32768,
                        ..Default::default()
                    },
                )
                .await?;
            answers.seen(tag);
            if r.data.is_empty() {
                return Ok(out);
            }
            out.extend(r.data);
        }
    })
}

fn waiter(
    conn: Arc<ShimConn>,
    cid: &'static str,
    eid: &'static str,
) -> tokio::task::JoinHandle<Result<i32>> {
    tokio::spawn(async move {
        let st: WaitProcessResponse = conn
            .agent(
                "WaitProcess",
                &WaitProcessRequest {
                    container_id: cid.into(),
                    exec_id: eid.into(),
                    ..Default::default()
                },
            )
            .await?;
        Ok(st.status)
    })
}

/// The stream's lines are `line-0`, `line-1`, ... with none missing or repeated.
fn check_lines(out: &[u8]) -> Result<usize> {
    let text = String::from_utf8_lossy(out);
    let mut n = 0;
    for (i, l) in text.lines().enumerate() {
        ensure!(
            l == format!("line-{i}"),
            "line {i} of the stream is {l:?}: output lost or repeated"
        );
        n += 1;
    }
    Ok(n)
}

pub(super) fn cases() -> Vec<Case> {
    vec![
        Case::cluster_exclusive(
            "datapath::kata_shims_one_agent_connection_streams_and_execs_through_caa_sigkill_image_rollout_and_configmap_rollout",
            survive,
        )
        .skip_if(root_skip().or_else(crate::agent::host::skip_reason)),
    ]
}

async fn survive(env: Env) -> Result<()> {
    let (caa, n) = CaaProc::deploy(&env, local_config(&[]), &[], 3, NODE_IP, true).await?;
    let mut caa = caa;
    let r = survive_on(&env, &mut caa).await;
    finish(caa, n, r).await
}

impl CaaProc {
    /// A rollout as the DaemonSet controller and the kubelet do it: once the controller
    /// deletes the CAA pod, its container gets SIGTERM and the pod goes; `between` runs
    /// while no CAA runs; then the pod the controller makes next runs. Returns how long no
    /// CAA served.
    async fn roll<F, Fut>(&mut self, env: &Env, between: F) -> Result<Duration>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<()>>,
    {
        let admin = env.admin().await?;
        let pods: Api<Pod> = Api::namespaced(admin.clone(), &env.ns);
        let old = self.pod.name_any();
        harness::eventually(
            "the DaemonSet controller deleting the CAA pod",
            Duration::from_secs(60),
            || {
                let (pods, old) = (pods.clone(), old.clone());
                async move {
                    Ok(match pods.get_opt(&old).await? {
                        None => Some(()),
                        Some(p) => p.metadata.deletion_timestamp.map(|_| ()),
                    })
                }
            },
        )
        .await?;
        let down = Instant::now();
        if let Some(mut c) = self.container.take() {
            c.process.stop(Duration::from_secs(10));
        }
        let _ = pods
            .delete(&old, &kube::api::DeleteParams::default().grace_period(0))
            .await;
        between().await?;
        let ds = Api::<DaemonSet>::namespaced(admin.clone(), &env.ns)
            .get(CAA_DAEMONSET)
            .await?;
        let (pod, launch) = run_daemonset_pod(env, &admin, &ds, &self.host).await?;
        ensure!(pod.metadata.uid != self.pod.metadata.uid, "no new CAA pod");
        self.pod = pod;
        self.launch = launch;
        self.restarts += 1;
        self.spawn().await?;
        Ok(down.elapsed())
    }

    /// The relay kept running, as the same pod.
    async fn relay_untouched(&mut self, env: &Env, uid: &Option<String>) -> Result<()> {
        self.relay
            .as_mut()
            .context("no relay")?
            .process
            .check_running()?;
        let pods: Api<Pod> = Api::namespaced(env.admin().await?, &env.ns);
        let p = pods.get(&self.relay_pod.name_any()).await?;
        ensure!(
            &p.metadata.uid == uid && p.metadata.deletion_timestamp.is_none(),
            "the relay pod was replaced"
        );
        Ok(())
    }
}

/// A VM whose pod the test deletes while CAA is rolled, with the StopVM kata's shim sends
/// then: `deadline` is the shim's (Go shim: 600 s; Rust shim: about 1 s).
async fn delete_pod_and_stop_vm(
    env: &Env,
    socket: PathBuf,
    vm: &PodVm,
    deadline: Duration,
) -> Result<tokio::task::JoinHandle<Result<ttrpc_wire::Answer>>> {
    let pods: Api<Pod> = Api::namespaced(env.admin().await?, &env.ns);
    pods.delete(
        &vm.name,
        &kube::api::DeleteParams::default().grace_period(0),
    )
    .await?;
    let mut req = hypervisor::StopVMRequest::new();
    req.id = vm.id.clone();
    let payload = req.write_to_bytes()?;
    Ok(tokio::spawn(async move {
        ttrpc_wire::call(
            &socket,
            "hypervisor.Hypervisor",
            "StopVM",
            &payload,
            Some(deadline),
            deadline,
        )
        .await
    }))
}

async fn survive_on(env: &Env, caa: &mut CaaProc) -> Result<()> {
    let hv = caa.hypervisor().await?;
    // The pod that streams and execs: sandboxd agent in its VM.
    let vm = create_vm(env, caa, &hv, "stream", "5eed5eed5eed5eed", &pod_netns(0)).await?;
    let agent = start_vm_with_agent(&hv, &vm, "dp-survive-agent").await?;
    let vm_pid = vm.pid()?;
    // Two pods deleted while CAA is rolled: the test agent answers in their VMs.
    let gone = [
        create_vm(env, caa, &hv, "gone-a", "90e0a0a090e0a0a0", &pod_netns(1)).await?,
        create_vm(env, caa, &hv, "gone-b", "90e0b0b090e0b0b0", &pod_netns(2)).await?,
    ];
    let mut gone_pids = Vec::new();
    let mut _gone_agents = Vec::new();
    for g in &gone {
        _gone_agents.push(start_with_agent(&hv, g).await?);
        gone_pids.push(g.pid()?);
    }
    let admin = env.admin().await?;
    let peerpods: Api<PeerPod> = Api::namespaced(admin.clone(), &env.ns);
    let record_uid = peerpods.get(&vm.vm_name).await?.metadata.uid;
    let relay_uid = caa.relay_pod.metadata.uid.clone();

    let rootfs = agent.root.join("busybox-rootfs");
    busybox_rootfs(&rootfs)?;
    let setup = Setup {
        base: agent.root.join("kata").display().to_string(),
        rootfs: Rootfs::Path(rootfs.display().to_string()),
        cgroup_prefix: agent.cgroup_prefix.clone(),
        oom: false,
        pause: false,
    };
    // kata's shim: one connection for the pod's life.
    let conn = ShimConn::connect(&vm.agent_socket).await?;
    let _: sandboxd::protocol::health::HealthCheckResponse = conn
        .call(
            "grpc.Health",
            "Check",
            &sandboxd::protocol::health::CheckRequest::new(),
        )
        .await?;
    let _: protobuf::well_known_types::empty::Empty = conn
        .agent(
            "CreateSandbox",
            &CreateSandboxRequest {
                sandbox_id: "survive".into(),
                hostname: "survive".into(),
                ..Default::default()
            },
        )
        .await?;
    // The streaming container: a numbered line every 50 ms until SIGTERM, then exit 7.
    let spec = sequence::spec(
        &setup,
        "out",
        &[
            "sh",
            "-c",
            "trap 'exit 7' TERM; i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.05; done",
        ],
        false,
    );
    let _: protobuf::well_known_types::empty::Empty = conn
        .agent(
            "CreateContainer",
            &sequence::create_request(&setup, "out", spec, false),
        )
        .await?;
    let _: protobuf::well_known_types::empty::Empty = conn
        .agent(
            "StartContainer",
            &StartContainerRequest {
                container_id: "out".into(),
                ..Default::default()
            },
        )
        .await?;
    let answers = Answers::default();
    let stream = reader(conn.clone(), "out", "out", answers.clone(), "stream");
    let stream_exit = waiter(conn.clone(), "out", "out");
    // The exec session: `cat` echoing what is typed.
    let mut p = oci::Process::new();
    p.Args = vec!["cat".into()];
    p.Env = vec!["PATH=/bin".into()];
    p.Cwd = "/".into();
    let _: protobuf::well_known_types::empty::Empty = conn
        .agent(
            "ExecProcess",
            &ExecProcessRequest {
                container_id: "out".into(),
                exec_id: "x1".into(),
                process: MessageField::some(p),
                ..Default::default()
            },
        )
        .await?;
    let exec_out = reader(conn.clone(), "out", "x1", answers.clone(), "exec");
    let exec_exit = waiter(conn.clone(), "out", "x1");
    // Typing into the exec session and the shim's periodic health check, all along.
    let stop = tokio_util::sync::CancellationToken::new();
    let typing = {
        let (conn, stop, answers) = (conn.clone(), stop.clone(), answers.clone());
        tokio::spawn(async move {
            let mut typed = Vec::new();
            let mut k = 0u32;
            while !stop.is_cancelled() {
                let line = format!("ping-{k}\n");
                let w: WriteStreamResponse = conn
                    .agent(
                        "WriteStdin",
                        &WriteStreamRequest {
                            container_id: "out".into(),
                            exec_id: "x1".into(),
                            data: line.clone().into_bytes(),
                            ..Default::default()
                        },
                    )
                    .await?;
                answers.seen("stdin");
                ensure!(w.len as usize == line.len(), "WriteStdin wrote {}", w.len);
                typed.extend(line.into_bytes());
                let _: sandboxd::protocol::health::HealthCheckResponse = conn
                    .call(
                        "grpc.Health",
                        "Check",
                        &sandboxd::protocol::health::CheckRequest::new(),
                    )
                    .await?;
                answers.seen("health");
                k += 1;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Ok::<_, anyhow::Error>(typed)
        })
    };
    let calm = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;

    // (a) SIGKILL of CAA, restarted as the kubelet restarts a crashed container (after a
    // back-off), with a hypervisor call made meanwhile.
    let mut report = vec![("nothing (baseline)", calm, Instant::now(), Duration::ZERO)];
    let t = Instant::now();
    if let Some(mut c) = caa.container.take() {
        c.process.signal(nix::sys::signal::Signal::SIGKILL);
        c.process.stop(Duration::from_secs(5));
    }
    let mut info = podvminfo::GetInfoRequest::new();
    info.PodName = vm.name.clone();
    info.PodNamespace = env.ns.clone();
    let (socket, payload) = (caa.socket.clone(), info.write_to_bytes()?);
    let held = tokio::spawn(async move {
        ttrpc_wire::call(
            &socket,
            "podvminfo.PodVMInfo",
            "GetInfo",
            &payload,
            Some(Duration::from_secs(60)),
            Duration::from_secs(60),
        )
        .await
    });
    tokio::time::sleep(Duration::from_secs(2)).await;
    caa.restarts += 1;
    caa.spawn().await?;
    let down = t.elapsed();
    let answer = held.await??;
    ensure!(
        answer.code == 0
            && !podvminfo::GetInfoResponse::parse_from_bytes(&answer.payload)?
                .VMID
                .is_empty(),
        "GetInfo sent while CAA was down: {} {}",
        answer.code,
        answer.message
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.push(("SIGKILL", t, Instant::now(), down));
    conn.alive("a SIGKILL of CAA")?;
    caa.relay_untouched(env, &relay_uid).await?;

    // (b) A rollout to a new image (the operator upgraded), with a pod deleted meanwhile
    // and the StopVM of kata's Go shim (600 s) waiting for the next CAA.
    let t = Instant::now();
    caa.fx
        .as_mut()
        .context("fixture")?
        .upgrade_operator("sandboxd:next")
        .await?;
    let mut stop_a = None;
    let (slot, socket, g) = (&mut stop_a, caa.socket.clone(), &gone[0]);
    let down = caa
        .roll(env, move || async move {
            *slot = Some(delete_pod_and_stop_vm(env, socket, g, Duration::from_secs(600)).await?);
            Ok(())
        })
        .await?;
    let image = caa
        .pod
        .spec
        .as_ref()
        .map(|s| s.containers[0].image.clone().unwrap_or_default());
    ensure!(
        image.as_deref() == Some("sandboxd:next"),
        "the new CAA pod runs {image:?}"
    );
    let answer = stop_a.context("no StopVM")?.await??;
    ensure!(
        answer.code == 0,
        "StopVM sent while CAA was rolled: {} {}",
        answer.code,
        answer.message
    );
    assert_vm_gone(env, &gone[0], Some(gone_pids[0])).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.push(("rollout to a new image", t, Instant::now(), down));
    conn.alive("a rollout of CAA to a new image")?;
    caa.relay_untouched(env, &relay_uid).await?;

    // (c) A peer-pods-cm change: the operator rolls CAA. A pod deleted meanwhile, with the
    // StopVM of kata's Rust shim (about 1 s: it gives up while no CAA runs).
    let t = Instant::now();
    let cms: Api<ConfigMap> = Api::namespaced(admin.clone(), &env.ns);
    cms.patch(
        "peer-pods-cm",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"PROXY_TIMEOUT": "45s"}})),
    )
    .await?;
    let mut stop_b = None;
    let (slot, socket, g) = (&mut stop_b, caa.socket.clone(), &gone[1]);
    let down = caa
        .roll(env, move || async move {
            *slot = Some(delete_pod_and_stop_vm(env, socket, g, Duration::from_secs(1)).await?);
            // The shim gives up before the next CAA runs.
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Ok(())
        })
        .await?;
    ensure!(
        caa.launch.var("PROXY_TIMEOUT") == Some("45s"),
        "the new CAA does not have the changed ConfigMap"
    );
    let short = stop_b.context("no StopVM")?.await?;
    eprintln!(
        "restarts: the 1 s StopVM sent while no CAA ran: {}",
        match &short {
            Ok(a) => format!("answered {} {}", a.code, a.message),
            Err(e) => format!("{e:#}"),
        }
    );
    // Its VM goes all the same: the held call reaches the new CAA, and the new CAA finds
    // the pod gone.
    harness::eventually(
        "the VM of the pod deleted during the ConfigMap rollout gone",
        Duration::from_secs(60),
        || {
            let dir = gone[1].vm_dir.clone();
            async move { Ok((!dir.exists()).then_some(())) }
        },
    )
    .await?;
    assert_vm_gone(env, &gone[1], Some(gone_pids[1])).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    report.push(("peer-pods-cm rollout", t, Instant::now(), down));
    conn.alive("a peer-pods-cm rollout of CAA")?;
    caa.relay_untouched(env, &relay_uid).await?;

    // The pod's VM and record are the ones it started with.
    ensure!(
        sandboxd::cloud::local::start_time(vm_pid).is_some(),
        "the streaming pod's VM died"
    );
    ensure!(
        peerpods.get(&vm.vm_name).await?.metadata.uid == record_uid,
        "the streaming pod's PeerPod was recreated"
    );

    // The end, as the shim does it: stdin closed, the container stopped.
    stop.cancel();
    let typed = typing.await??;
    let _: protobuf::well_known_types::empty::Empty = conn
        .agent(
            "CloseStdin",
            &CloseStdinRequest {
                container_id: "out".into(),
                exec_id: "x1".into(),
                ..Default::default()
            },
        )
        .await?;
    let echoed = exec_out.await??;
    ensure!(
        echoed == typed,
        "the exec session's output differs from what was typed ({} vs {} bytes): lost or repeated",
        echoed.len(),
        typed.len()
    );
    ensure!(exec_exit.await?? == 0, "the exec's exit code changed");
    let _: protobuf::well_known_types::empty::Empty = conn
        .agent(
            "SignalProcess",
            &SignalProcessRequest {
                container_id: "out".into(),
                exec_id: "out".into(),
                signal: 15,
                ..Default::default()
            },
        )
        .await?;
    let out = stream.await??;
    let lines = check_lines(&out)?;
    let code = stream_exit.await??;
    ensure!(code == 7, "the streaming container exited {code}, not 7");
    eprintln!(
        "restarts: {lines} lines streamed and {} bytes echoed, none lost or repeated, on one \
         agent connection; exit codes 7 and 0",
        typed.len()
    );
    for (what, from, to, down) in &report {
        eprintln!(
            "restarts: {what}: no CAA for {:.2} s; longest stall: stream {:.3} s, exec stdin {:.3} s, health {:.3} s, exec output {:.3} s",
            down.as_secs_f64(),
            answers.longest_gap("stream", *from, *to).as_secs_f64(),
            answers.longest_gap("stdin", *from, *to).as_secs_f64(),
            answers.longest_gap("health", *from, *to).as_secs_f64(),
            answers.longest_gap("exec", *from, *to).as_secs_f64(),
        );
    }
    let _: protobuf::well_known_types::empty::Empty = conn
        .agent("DestroySandbox", &DestroySandboxRequest::new())
        .await?;
    // What the design does not survive: the relay's own end (a crash, a drain) closes the
    // pod's agent connection, as any CAA restart did before.
    caa.relay
        .as_mut()
        .context("no relay")?
        .process
        .signal(nix::sys::signal::Signal::SIGKILL);
    harness::eventually(
        "the agent connection closing with the relay",
        Duration::from_secs(10),
        || {
            let conn = conn.clone();
            async move { Ok(conn.alive("").is_err().then_some(())) }
        },
    )
    .await?;
    eprintln!(
        "restarts: a SIGKILL of the node agent relay itself closes the pod's agent connection (not survived, as documented)"
    );
    if let Some(mut c) = caa.relay.take() {
        c.process.stop(Duration::from_secs(5));
    }
    caa.spawn_relay()?;
    drop(agent);
    // kata's shim dials the hypervisor socket anew for each call.
    let hv = caa.hypervisor().await?;
    stop_vm(&hv, &vm.id).await?;
    assert_vm_gone(env, &vm, Some(vm_pid)).await
}
