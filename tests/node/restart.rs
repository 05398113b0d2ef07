//! CAA restarts and rollouts on the real node, as a user of peer pods meets them: a
//! `kata-remote` pod (sandboxd's shim, a qemu pod VM) prints a numbered line every 100 ms
//! with `kubectl logs -f` following it and a `kubectl exec -i` session open in it, while
//! CAA is (a) SIGKILLed, (b) rolled to a new image by an operator upgrade, (c) rolled by a
//! `peer-pods-cm` change; a pod deleted while no CAA runs still loses its VM. What keeps
//! them is the node agent relay (`docs/caa.md`, "Restarts and upgrades").

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use k8s_openapi::api::apps::v1::DaemonSet;
use k8s_openapi::api::core::v1::{ConfigMap, Pod};
use kube::api::{Api, DeleteParams, ListParams, LogParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use sandboxd::api::names::{CAA_DAEMONSET, CAA_SOCKET, CONFIG_MAP, RELAY_DAEMONSET};
use sandboxd::api::peerpod::PeerPod;
use serde_json::json;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use super::peer_pods::{
    NodeFiles, World, bundles_of, ctl_install, install, kubectl, nothing_left, processes_with,
    with_world,
};
use super::{NS, image, phase};
use crate::harness::node::TestNode;
use crate::harness::{Env, eventually};

/// The streaming pod: a numbered line every 100 ms until SIGTERM, then exit 7.
const SURVIVOR: &str = "survivor";
/// What the log lines and the exec session say, and how the stream ends.
const COUNT: &str =
    "trap 'exit 7' TERM; i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.1; done";
const STREAM_EXIT: i32 = 7;

/// Lines a `kubectl` child printed, each with when the test read it.
#[derive(Clone, Default)]
struct Seen(Arc<Mutex<Vec<(Instant, String)>>>);

impl Seen {
    fn push(&self, line: String) {
        self.0.lock().unwrap().push((Instant::now(), line));
    }

    fn lines(&self) -> Vec<String> {
        self.0
            .lock()
            .unwrap()
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// The longest time inside `[from, to]` with no line (the window's edges count as
    /// lines): the longest the user waited.
    fn longest_gap(&self, from: Instant, to: Instant) -> Duration {
        let times: Vec<Instant> = self.0.lock().unwrap().iter().map(|(t, _)| *t).collect();
        crate::harness::longest_gap(times, from, to)
    }
}

/// `kubectl <args>` in the test's namespace, running until it ends or is dropped.
fn kubectl_child(env: &Env, node: &TestNode, args: &[&str]) -> Result<tokio::process::Child> {
    let kubeconfig = env.cp().kubeconfig_path.display().to_string();
    tokio::process::Command::new(node.bin.join("kubectl"))
        .args(["--kubeconfig", &kubeconfig, "-n", &env.ns])
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("kubectl")
}

/// `kubectl logs -f`: every line as it comes, until the container ends (EOF).
fn follow_logs(
    env: &Env,
    node: &TestNode,
    pod: &str,
    seen: Seen,
) -> Result<tokio::task::JoinHandle<Result<()>>> {
    let mut child = kubectl_child(env, node, &["logs", "-f", pod])?;
    let out = child.stdout.take().context("stdout")?;
    Ok(tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        while let Some(l) = lines.next_line().await? {
            seen.push(l);
        }
        let st = child.wait_with_output().await?;
        ensure!(
            st.status.success(),
            "kubectl logs -f ended with {}: {}",
            st.status,
            String::from_utf8_lossy(&st.stderr)
        );
        Ok(())
    }))
}

/// `kubectl exec -i POD -- cat`, typed into every 100 ms until `stop`: each line typed
/// must come back before the next is typed. Then stdin is closed and `cat` ends; returns
/// the lines typed and kubectl's exit status.
fn exec_session(
    env: &Env,
    node: &TestNode,
    pod: &str,
    echoes: Seen,
    stop: tokio_util::sync::CancellationToken,
) -> Result<tokio::task::JoinHandle<Result<(usize, std::process::ExitStatus)>>> {
    let mut child = kubectl_child(env, node, &["exec", "-i", pod, "--", "cat"])?;
    let mut stdin = child.stdin.take().context("stdin")?;
    let out = child.stdout.take().context("stdout")?;
    Ok(tokio::spawn(async move {
        let mut lines = BufReader::new(out).lines();
        let mut k = 0usize;
        while !stop.is_cancelled() {
            let line = format!("ping-{k}");
            stdin.write_all(format!("{line}\n").as_bytes()).await?;
            stdin.flush().await?;
            let got = tokio::time::timeout(Duration::from_secs(300), lines.next_line())
                .await
                .with_context(|| format!("no echo of {line} in 300 s"))??;
            ensure!(
                got.as_deref() == Some(line.as_str()),
                "the exec session answered {got:?} to {line}"
            );
            echoes.push(line);
            k += 1;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        drop(stdin);
        let rest = tokio::time::timeout(Duration::from_secs(60), lines.next_line())
            .await
            .context("cat did not end with its stdin")??;
        ensure!(
            rest.is_none(),
            "the exec session printed {rest:?} after the end"
        );
        let st = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
            .await
            .context("kubectl exec did not end")??;
        if !st.status.success() {
            eprintln!("kubectl exec: {}", String::from_utf8_lossy(&st.stderr));
        }
        Ok((k, st.status))
    }))
}

/// What must not change in the surviving pod: the Pod, its container's start and restart
/// count, its PeerPod, its VM and that VM's qemu process.
#[derive(Debug, PartialEq)]
struct Survivor {
    pod_uid: Option<String>,
    started_at: Option<String>,
    restarts: i32,
    ready: bool,
    peerpod_uid: Option<String>,
    vm: String,
    qemu_pid: String,
}

async fn survivor(client: &Client, ns: &str, world: &World) -> Result<Survivor> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let p = pods.get(SURVIVOR).await?;
    let c = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first().cloned())
        .context("no container status")?;
    let (pp, vm) = peerpod_of(client, ns, &p).await?;
    Ok(Survivor {
        pod_uid: p.metadata.uid.clone(),
        started_at: c
            .state
            .and_then(|s| s.running)
            .and_then(|r| r.started_at)
            .map(|t| t.0.to_string()),
        restarts: c.restart_count,
        ready: c.ready,
        peerpod_uid: pp.metadata.uid,
        qemu_pid: qemu_pid(world, &vm)?,
        vm,
    })
}

/// The PeerPod of `pod` and its VM's name.
async fn peerpod_of(client: &Client, ns: &str, pod: &Pod) -> Result<(PeerPod, String)> {
    let peerpods: Api<PeerPod> = Api::namespaced(client.clone(), ns);
    let uid = pod.metadata.uid.clone().unwrap_or_default();
    let pp = peerpods
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .find(|pp| pp.spec.pod_uid == uid)
        .with_context(|| format!("no PeerPod for pod {}", pod.name_any()))?;
    let vm = pp.spec.vm_name.clone();
    Ok((pp, vm))
}

/// The pid of the qemu process of VM `vm` (its command line names the VM's directory).
fn qemu_pid(world: &World, vm: &str) -> Result<String> {
    let needle = format!("{}/{vm}/", world.arm.vms.display());
    let found = processes_with(&needle);
    match found.as_slice() {
        [one] => Ok(one.split(':').next().unwrap_or_default().to_string()),
        other => bail!("qemu processes of VM {vm}: {other:?}"),
    }
}

/// The CAA pod of the node that is not being deleted, and its one container's restart count.
async fn caa_pod(pods: &Api<Pod>) -> Result<Option<(Pod, i32)>> {
    let list = pods
        .list(&ListParams::default().labels(&format!("app={CAA_DAEMONSET}")))
        .await?;
    Ok(list
        .items
        .into_iter()
        .find(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| {
            let restarts = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .map(|c| c.restart_count)
                .unwrap_or_default();
            (p, restarts)
        }))
}

/// Whether a CAA accepts connections on its own socket (the relay's upstream).
fn caa_serving(node: &TestNode) -> bool {
    node.host_path(CAA_SOCKET)
        .is_ok_and(|p| std::os::unix::net::UnixStream::connect(p).is_ok())
}

/// The host pid of the CAA container's process (`sandboxd caa`, in the CAA pod's cgroup).
fn caa_pid(pod_uid: &str) -> Result<i32> {
    let underscored = pod_uid.replace('-', "_");
    let mut found = Vec::new();
    for e in std::fs::read_dir("/proc")?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Ok(pid) = name.parse::<i32>() else {
            continue;
        };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else {
            continue;
        };
        let args: Vec<&[u8]> = cmd.split(|b| *b == 0).collect();
        if args.get(1) != Some(&b"caa".as_slice()) {
            continue;
        }
        let cgroup = std::fs::read_to_string(e.path().join("cgroup")).unwrap_or_default();
        if cgroup.contains(pod_uid) || cgroup.contains(&underscored) {
            found.push(pid);
        }
    }
    match found.as_slice() {
        [pid] => Ok(*pid),
        other => bail!("CAA processes of pod {pod_uid}: {other:?}"),
    }
}

/// The node agent relay pod: its uid and its container's restart count.
async fn relay(pods: &Api<Pod>) -> Result<(String, Option<String>, i32)> {
    let list = pods
        .list(&ListParams::default().labels(&format!("app={RELAY_DAEMONSET}")))
        .await?;
    let [p] = list.items.as_slice() else {
        bail!("{} relay pods", list.items.len());
    };
    let restarts = p
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map(|c| c.restart_count)
        .unwrap_or_default();
    Ok((p.name_any(), p.metadata.uid.clone(), restarts))
}

/// How long each hypervisor call the relay held while no CAA served waited (its log).
async fn held_calls(pods: &Api<Pod>, relay: &str) -> Result<Vec<u64>> {
    let log = pods.logs(relay, &LogParams::default()).await?;
    Ok(log
        .lines()
        .map(strip_ansi)
        .filter(|l| l.contains("passing the held hypervisor call on"))
        .filter_map(|l| {
            let rest = &l[l.find("waited_ms=")? + "waited_ms=".len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect())
}

/// `line` without terminal colour sequences (`ESC [ ... m`).
fn strip_ansi(line: &str) -> String {
    let mut out = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A `kata-remote` pod of `world`'s busybox running `command`.
fn peer_pod(world: &World, name: &str, command: &str, grace: i64) -> Result<Pod> {
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name},
        "spec": {
            "runtimeClassName": "kata-remote",
            "restartPolicy": "Never",
            "terminationGracePeriodSeconds": grace,
            "containers": [{"name": "c", "image": world.app_image,
                            "command": ["sh", "-c", command]}],
        },
    }))?)
}

/// One disruption's window and what it cost.
struct Window {
    what: &'static str,
    from: Instant,
    to: Instant,
    /// From the disruption to a CAA serving again.
    no_caa: Duration,
    /// How long the relay held the StopVM of the pod deleted meanwhile.
    held: Option<Vec<u64>>,
}

/// During a rollout: once the DaemonSet controller deleted CAA pod `old` and its CAA
/// stopped serving, pod `gone` is deleted, so its StopVM comes while no CAA runs. Then
/// waits for the next CAA pod to serve; returns it and how long no CAA served.
async fn gap_delete(
    node: &TestNode,
    caa_pods: &Api<Pod>,
    test_pods: &Api<Pod>,
    old: &Pod,
    gone: &str,
) -> Result<(Pod, Duration)> {
    let old_name = old.name_any();
    eventually(
        "the DaemonSet controller deleting the CAA pod",
        Duration::from_secs(180),
        || async {
            Ok(match caa_pods.get_opt(&old_name).await? {
                None => Some(()),
                Some(p) => p.metadata.deletion_timestamp.map(|_| ()),
            })
        },
    )
    .await?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while caa_serving(node) {
        ensure!(Instant::now() < deadline, "the old CAA kept serving");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let down = Instant::now();
    test_pods.delete(gone, &DeleteParams::default()).await?;
    let (pod, _) = eventually(
        "the next CAA pod serving",
        Duration::from_secs(180),
        || async {
            let next = caa_pod(caa_pods)
                .await?
                .filter(|(p, _)| p.metadata.uid != old.metadata.uid && phase(p) == "Running");
            Ok(next.filter(|_| caa_serving(node)))
        },
    )
    .await?;
    Ok((pod, down.elapsed()))
}

/// Pod `name` deleted: the Pod, its PeerPod, its VM in ARM and its qemu process gone.
async fn assert_gone(client: &Client, ns: &str, world: &World, name: &str, vm: &str) -> Result<()> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let peerpods: Api<PeerPod> = Api::namespaced(client.clone(), ns);
    let needle = format!("{}/{vm}/", world.arm.vms.display());
    eventually(
        &format!("pod {name}, its PeerPod, its VM and its qemu process gone"),
        Duration::from_secs(180),
        || async {
            let pod = pods.get_opt(name).await?.is_some();
            let pp = peerpods
                .list(&ListParams::default())
                .await?
                .items
                .iter()
                .any(|p| p.spec.vm_name == vm);
            let arm = world
                .arm
                .arm_vms()
                .await?
                .iter()
                .any(|v| v["name"].as_str() == Some(vm));
            let qemu =
                world.arm.qemu_vms().iter().any(|d| d == vm) || !processes_with(&needle).is_empty();
            if pod || pp || arm || qemu {
                Err(anyhow::anyhow!(
                    "left: pod {pod}, PeerPod {pp}, ARM VM {arm}, qemu {qemu}"
                ))
            } else {
                Ok(Some(()))
            }
        },
    )
    .await
}

/// The guide's install in its own world, then the three disruptions ([`survive_on`]); the
/// relay's log is printed on a failure.
pub async fn survive(env: Env) -> Result<()> {
    with_world(env, |env, node, client, world| {
        Box::pin(async move {
            let t = Instant::now();
            install(env, node, &client, world).await?;
            eprintln!("installed in {:.0}s", t.elapsed().as_secs_f64());
            let t = Instant::now();
            let r = survive_on(env, node, &client, world).await;
            eprintln!("restarts: {:.0}s", t.elapsed().as_secs_f64());
            if r.is_err() {
                let pods: Api<Pod> = Api::namespaced(client.clone(), NS);
                if let Ok((relay, _, _)) = relay(&pods).await {
                    let log = pods
                        .logs(&relay, &LogParams::default())
                        .await
                        .unwrap_or_default();
                    let lines: Vec<&str> = log.lines().collect();
                    eprintln!(
                        "relay log:\n{}",
                        lines[lines.len().saturating_sub(40)..].join("\n")
                    );
                }
            }
            r
        })
    })
    .await
}

/// Three pods (one that streams and execs, two deleted during the rollouts), the user's
/// sessions opened, then (a), (b), (c), each checked and measured, and the end: every line
/// once, exit codes 7 and 0, nothing left.
async fn survive_on(
    env: &Env,
    node: &'static TestNode,
    client: &Client,
    world: &World,
) -> Result<()> {
    let before = NodeFiles::read(node);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &env.ns);
    let caa_pods: Api<Pod> = Api::namespaced(client.clone(), NS);
    // The pod that streams and execs, and two pods deleted during the rollouts.
    let gone = ["gone-b", "gone-c"];
    pods.create(
        &PostParams::default(),
        &peer_pod(world, SURVIVOR, COUNT, 2)?,
    )
    .await?;
    for g in gone {
        pods.create(
            &PostParams::default(),
            &peer_pod(world, g, "exec sleep 3600", 1)?,
        )
        .await?;
    }
    let t = Instant::now();
    eventually(
        "three kata-remote pods Running",
        Duration::from_secs(300),
        || async {
            let list = pods.list(&ListParams::default()).await?;
            Ok((list.items.iter().filter(|p| phase(p) == "Running").count() == 3).then_some(()))
        },
    )
    .await?;
    eprintln!(
        "restarts: three pods Running in {:.0}s",
        t.elapsed().as_secs_f64()
    );
    let mut gone_vms = Vec::new();
    for g in gone {
        gone_vms.push(peerpod_of(client, &env.ns, &pods.get(g).await?).await?.1);
    }
    let (_, netns) = bundles_of(node, &env.ns);
    let start = survivor(client, &env.ns, world).await?;
    ensure!(start.ready && start.restarts == 0, "the pod: {start:?}");
    let (relay_name, relay_uid, relay_restarts) = relay(&caa_pods).await?;

    // The user's sessions: `kubectl logs -f` and `kubectl exec -i` (cat), open all along.
    let logs = Seen::default();
    let follow = follow_logs(env, node, SURVIVOR, logs.clone())?;
    let echoes = Seen::default();
    let stop = tokio_util::sync::CancellationToken::new();
    let session = exec_session(env, node, SURVIVOR, echoes.clone(), stop.clone())?;
    eventually(
        "the first lines and echoes",
        Duration::from_secs(60),
        || async { Ok((!logs.lines().is_empty() && !echoes.lines().is_empty()).then_some(())) },
    )
    .await?;
    let calm = Instant::now();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut report = vec![Window {
        what: "nothing (baseline)",
        from: calm,
        to: Instant::now(),
        no_caa: Duration::ZERO,
        held: None,
    }];
    // After each disruption the sessions still answer, the pod, its VM and the relay are
    // the ones they were.
    let unchanged = |what: &'static str| {
        let start = &start;
        let (relay_uid, caa_pods, logs, echoes) = (&relay_uid, &caa_pods, &logs, &echoes);
        async move {
            let (l, e) = (logs.lines().len(), echoes.lines().len());
            eventually(
                &format!("logs -f and exec answering after {what}"),
                Duration::from_secs(30),
                || async {
                    Ok((logs.lines().len() > l + 5 && echoes.lines().len() > e + 5).then_some(()))
                },
            )
            .await?;
            let now = survivor(client, &env.ns, world).await?;
            ensure!(
                &now == start,
                "after {what} the pod is not the one it was:\nbefore {start:?}\nafter  {now:?}"
            );
            let (_, uid, restarts) = relay(caa_pods).await?;
            ensure!(
                &uid == relay_uid && restarts == relay_restarts,
                "after {what} the relay pod was replaced or restarted"
            );
            Ok::<_, anyhow::Error>(())
        }
    };

    // (a) SIGKILL of CAA's process; the kubelet restarts its container.
    let (caa, restarts) = caa_pod(&caa_pods).await?.context("no CAA pod")?;
    let pid = caa_pid(caa.metadata.uid.as_deref().unwrap_or_default())?;
    let t = Instant::now();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )?;
    eventually(
        "the kubelet restarting the killed CAA",
        Duration::from_secs(120),
        || async {
            let now = caa_pod(&caa_pods).await?;
            Ok(now
                .filter(|(p, r)| p.metadata.uid == caa.metadata.uid && *r == restarts + 1)
                .filter(|_| caa_serving(node))
                .map(|_| ()))
        },
    )
    .await?;
    let no_caa = t.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    unchanged("a SIGKILL of CAA").await?;
    report.push(Window {
        what: "SIGKILL of CAA",
        from: t,
        to: Instant::now(),
        no_caa,
        held: None,
    });

    // (b) An operator upgrade to a new image (the same archive under a second reference in
    // the node's containerd): the operator rolls the CAA DaemonSet to it, and pod gone-b is
    // deleted while no CAA runs.
    let (caa, _) = caa_pod(&caa_pods).await?.context("no CAA pod")?;
    let old_image = image(node)?;
    let next = format!("{old_image}-next");
    let sock = node.host_path("/run/containerd/containerd.sock")?;
    let out = std::process::Command::new(node.bin.join("ctr"))
        .arg("--address")
        .arg(&sock)
        .args([
            "-n", "k8s.io", "images", "tag", "--force", &old_image, &next,
        ])
        .output()?;
    ensure!(
        out.status.success(),
        "ctr images tag: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let held_before = held_calls(&caa_pods, &relay_name).await?.len();
    let t = Instant::now();
    ctl_install(env, world, &next)
        .await
        .context("upgrading the operator")?;
    let (caa, no_caa) = gap_delete(node, &caa_pods, &pods, &caa, gone[0]).await?;
    let running = caa
        .spec
        .as_ref()
        .and_then(|s| s.containers[0].image.clone());
    ensure!(
        running.as_deref() == Some(next.as_str()),
        "the new CAA pod runs {running:?}, not {next}"
    );
    assert_gone(client, &env.ns, world, gone[0], &gone_vms[0]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    unchanged("a rollout of CAA to a new image").await?;
    let held = held_calls(&caa_pods, &relay_name).await?;
    report.push(Window {
        what: "rollout to a new image",
        from: t,
        to: Instant::now(),
        no_caa,
        held: Some(held[held_before..].to_vec()),
    });

    // (c) A peer-pods-cm change: the operator rolls CAA; pod gone-c is deleted while no
    // CAA runs.
    let (caa, _) = caa_pod(&caa_pods).await?.context("no CAA pod")?;
    let hash = |p: &Pod| {
        p.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(sandboxd::operator::peerpods::caa::CONFIG_HASH_ANNOTATION))
            .cloned()
    };
    let held_before = held.len();
    let t = Instant::now();
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), NS);
    cms.patch(
        CONFIG_MAP,
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"PROXY_TIMEOUT": "45s"}})),
    )
    .await?;
    let (next_caa, no_caa) = gap_delete(node, &caa_pods, &pods, &caa, gone[1]).await?;
    ensure!(
        hash(&next_caa) != hash(&caa),
        "the CAA pod of the changed peer-pods-cm carries the old configuration hash"
    );
    assert_gone(client, &env.ns, world, gone[1], &gone_vms[1]).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    unchanged("a peer-pods-cm rollout of CAA").await?;
    let held = held_calls(&caa_pods, &relay_name).await?;
    report.push(Window {
        what: "peer-pods-cm rollout",
        from: t,
        to: Instant::now(),
        no_caa,
        held: Some(held[held_before..].to_vec()),
    });
    let ds: Api<DaemonSet> = Api::namespaced(client.clone(), NS);
    let relay_ds = ds.get(RELAY_DAEMONSET).await?;
    let relay_pod = caa_pods.get(&relay_name).await?;
    eprintln!(
        "restarts: the relay DaemonSet's template runs {:?}, its pod (never restarted) {:?}",
        relay_ds
            .spec
            .and_then(|s| s.template.spec)
            .and_then(|s| s.containers[0].image.clone()),
        relay_pod.spec.and_then(|s| s.containers[0].image.clone()),
    );

    // The end, as a user ends them: stdin closed (cat exits 0), the container stopped
    // (exit 7: the stream reaches its end).
    stop.cancel();
    let (typed, status) = session.await??;
    ensure!(status.success(), "kubectl exec ended with {status}");
    ensure!(
        echoes.lines().len() == typed,
        "{typed} lines typed, {} echoed",
        echoes.lines().len()
    );
    let (ok, _, err) = kubectl(
        env,
        node,
        &["exec", SURVIVOR, "--", "sh", "-c", "kill -TERM 1"],
        None,
    )
    .await?;
    // The exec may end with the container it stopped (its pid namespace goes): 137.
    ensure!(
        ok || err.contains("exit code 137"),
        "kubectl exec kill: {err}"
    );
    tokio::time::timeout(Duration::from_secs(60), follow)
        .await
        .context("kubectl logs -f did not end with the container")???;
    let lines = logs.lines();
    for (i, l) in lines.iter().enumerate() {
        ensure!(
            *l == format!("line-{i}"),
            "line {i} of kubectl logs -f is {l:?}: output lost or repeated"
        );
    }
    // The kubelet reports the end shortly after the output's.
    let (c, ended) = eventually(
        "the container's end in the pod's status",
        Duration::from_secs(60),
        || async {
            let p = pods.get(SURVIVOR).await?;
            let c = p
                .status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first().cloned())
                .context("no container status")?;
            let ended = c.state.clone().and_then(|s| s.terminated);
            Ok(ended.map(|e| (c, e)))
        },
    )
    .await?;
    ensure!(
        ended.exit_code == STREAM_EXIT && c.restart_count == 0,
        "the container ended with {} after {} restarts",
        ended.exit_code,
        c.restart_count
    );
    eprintln!(
        "restarts: {} lines followed and {typed} lines echoed, none lost or repeated; exit codes {STREAM_EXIT} and 0, no restart",
        lines.len()
    );
    println!(
        "\n| disruption (real node) | no CAA (s) | longest gap in `kubectl logs -f` (s) | longest gap in `kubectl exec` echoes (s) | StopVM held in the relay (s) |"
    );
    println!("|---|---|---|---|---|");
    for w in &report {
        println!(
            "| {} | {:.2} | {:.2} | {:.2} | {} |",
            w.what,
            w.no_caa.as_secs_f64(),
            logs.longest_gap(w.from, w.to).as_secs_f64(),
            echoes.longest_gap(w.from, w.to).as_secs_f64(),
            match &w.held {
                None => "—".to_string(),
                Some(v) if v.is_empty() => "none held".to_string(),
                Some(v) => v
                    .iter()
                    .map(|ms| format!("{:.2}", *ms as f64 / 1000.0))
                    .collect::<Vec<_>>()
                    .join(", "),
            }
        );
    }
    pods.delete(SURVIVOR, &DeleteParams::default()).await?;
    assert_gone(client, &env.ns, world, SURVIVOR, &start.vm).await?;
    nothing_left(client, env, node, world, &before, &netns).await
}
