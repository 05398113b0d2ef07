//! The pod data path: CAA's agent relay → mTLS → `sandboxd forwarder` → kata-agent, with
//! the CreateSandbox/CreateContainer rewrites, and (as root) the local provider's pod VMs
//! with their VXLAN tunnel, driven through the hypervisor API of a real CAA process.

mod bench;
mod e2e;

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use protobuf::Message;
use sandboxd::caa::pki::Pki;
use sandboxd::caa::relay::{AgentSockets, handshake as dial};
use sandboxd::devenv::agent;
use sandboxd::forwarder::{relay as frelay, tls};
use sandboxd::pki::{Ca, Usage};
use sandboxd::protocol::agent::{CreateContainerRequest, CreateSandboxRequest};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::harness::Case;
use crate::harness::process::run_dir;

pub fn cases() -> Vec<Case> {
    let mut v = vec![
        Case::plain(
            "datapath::agent_calls_reach_the_agent_rewritten_only_where_specified",
            |_env| relay_rewrites(),
        ),
        Case::plain(
            "datapath::clients_without_the_caa_certificate_are_refused",
            |_env| refuses_foreign_and_expired_clients(),
        ),
        Case::plain(
            "datapath::malformed_frames_close_the_connection_with_nothing_forwarded",
            |_env| malformed_frames(),
        ),
        Case::plain(
            "datapath::bench_relay_latency_and_throughput_vs_direct_socket",
            |_env| bench::run(),
        )
        .skip_if(bench::skip()),
    ];
    v.extend(e2e::cases());
    v
}

/// A forwarder relay on loopback in process, the test agent behind it, and a CAA agent
/// socket in front: returns (agent socket path, agent log, keep-alives).
struct Rig {
    socket: std::path::PathBuf,
    log: agent::Log,
    _agent: ttrpc::r#async::Server,
    _stop: tokio_util::sync::DropGuard,
    _sockets: AgentSockets,
    addr: std::net::SocketAddr,
    pki: Pki,
    forwarder_ca: String,
}

async fn rig(name: &str) -> Result<Rig> {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("info")
        .with_writer(std::io::stderr)
        .try_init();
    let dir = run_dir().join(format!("dp-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let agent_sock = dir.join("agent.sock");
    let (agent, log) = agent::start(&agent_sock).await?;
    let pki = Pki::generate()?;
    let vm = "podvm-web-0123abcd";
    let server = pki.server_cert(vm)?;
    let cfg = tls::server_config(&server.cert_pem, &server.key_pem, &pki.ca_pem())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(frelay::serve(
        listener,
        cfg,
        frelay::RelayOptions {
            agent_socket: agent_sock,
            netns: sandboxd::api::names::POD_NETNS.into(),
            agent_wait: Duration::from_secs(5),
        },
        stop.clone(),
    ));
    let sockets = AgentSockets::default();
    let socket = dir.join("pods").join("sb1").join("agent.ttrpc");
    sockets.serve(
        "sb1",
        &socket,
        pki.client_config(),
        addr,
        vm,
        Duration::from_secs(5),
    )?;
    Ok(Rig {
        socket,
        log,
        _agent: agent,
        _stop: stop.drop_guard(),
        _sockets: sockets,
        addr,
        forwarder_ca: pki.ca_pem(),
        pki,
    })
}

/// Sends a set of agent calls through `socket` and checks what the agent received.
pub async fn check_agent_calls(socket: &std::path::Path, log: &agent::Log) -> Result<()> {
    let client = ttrpc::r#async::Client::connect(&format!("unix://{}", socket.display()))
        .await
        .context("connecting to the agent socket")?;
    let mut sb = CreateSandboxRequest::new();
    sb.hostname = "web".into();
    sb.dns = vec!["nameserver 10.96.0.10".into(), "search default.svc".into()];
    sb.sandbox_id = "sb1".into();
    let mut sb_bytes = sb.write_to_bytes()?;
    sb_bytes.extend([0x90, 0x03, 1]); // field 50: no release of the protocol has it
    let mut cc = CreateContainerRequest::new();
    cc.container_id = "c1".into();
    cc.OCI.mut_or_insert_default().Version = "1.1.0".into();
    let mut cc_bytes = cc.write_to_bytes()?;
    cc_bytes.extend([0xa0, 0x06, 1]); // field 100: unknown to every release
    let start = vec![0x0a, 2, b'c', b'1'];
    let big: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let a = agent::call(&client, "CreateSandbox", sb_bytes.clone()).await?;
    ensure!(a == agent::answer("CreateSandbox"), "CreateSandbox answer");
    agent::call(&client, "CreateContainer", cc_bytes).await?;
    let a = agent::call(&client, "StartContainer", start.clone()).await?;
    ensure!(
        a == agent::answer("StartContainer"),
        "StartContainer answer"
    );
    let echoed = agent::call(&client, "ReadStdout", big.clone()).await?;
    ensure!(echoed == big, "a 1 MB payload came back changed");
    // Concurrent streams on one connection.
    let mut joins = Vec::new();
    for i in 0..8u8 {
        let c = client.clone();
        joins.push(tokio::spawn(async move {
            agent::call(&c, "ExecProcess", vec![0x0a, 1, i]).await
        }));
    }
    for j in joins {
        ensure!(j.await?? == agent::answer("ExecProcess"));
    }
    let got = log.lock().unwrap().clone();
    let of = |m: &str| -> Vec<Vec<u8>> {
        got.iter()
            .filter(|(x, _)| x == m)
            .map(|(_, p)| p.clone())
            .collect()
    };
    let sb_got = CreateSandboxRequest::parse_from_bytes(&of("CreateSandbox")[0])?;
    ensure!(
        sb_got.dns.is_empty(),
        "dns was not dropped: {:?}",
        sb_got.dns
    );
    ensure!(sb_got.hostname == "web" && sb_got.sandbox_id == "sb1");
    ensure!(
        of("CreateSandbox")[0].ends_with(&[0x90, 0x03, 1]),
        "unknown field lost"
    );
    let cc_raw = &of("CreateContainer")[0];
    let cc_got = CreateContainerRequest::parse_from_bytes(cc_raw)?;
    let ns = &cc_got.OCI.Linux.Namespaces;
    ensure!(
        ns.len() == 1 && ns[0].Type == "network" && ns[0].Path == "/run/netns/podns",
        "namespaces: {ns:?}"
    );
    ensure!(cc_got.OCI.Version == "1.1.0" && cc_raw.ends_with(&[0xa0, 0x06, 1]));
    ensure!(
        of("StartContainer") == vec![start],
        "StartContainer not byte-identical"
    );
    ensure!(
        of("ReadStdout") == vec![big],
        "ReadStdout not byte-identical"
    );
    let mut execs = of("ExecProcess");
    execs.sort();
    ensure!(execs == (0..8u8).map(|i| vec![0x0a, 1, i]).collect::<Vec<_>>());
    Ok(())
}

async fn relay_rewrites() -> Result<()> {
    let r = rig("rewrites").await?;
    check_agent_calls(&r.socket, &r.log).await
}

async fn refuses_foreign_and_expired_clients() -> Result<()> {
    let r = rig("certs").await?;
    let vm = "podvm-web-0123abcd";
    // The right client works.
    dial(&r.pki.client_config(), r.addr, vm, Duration::from_secs(5)).await?;
    // A client certificate from another CA.
    let other = Ca::new("intruder", time::Duration::days(1))?;
    let ck = other.issue("x", &[], &[], Usage::Client, time::Duration::days(1))?;
    let cfg = tls::client_config(&r.forwarder_ca, &ck.cert_pem, &ck.key_pem)?;
    let e = dial(&cfg, r.addr, vm, Duration::from_millis(800))
        .await
        .err()
        .context("a foreign client certificate was accepted")?;
    ensure!(
        e.to_string().contains("not reachable within"),
        "unexpected error: {e}"
    );
    // An expired certificate of the right CA: the CA's key is in the Pki; issue through a
    // CA rebuilt from the same PEM is not exposed, so use the Pki's own server path: a
    // client with an expired certificate from a CA the forwarder trusts.
    let ca = Ca::new("caa", time::Duration::days(1))?;
    let server = ca.issue(vm, &[], &[vm], Usage::Server, time::Duration::days(1))?;
    let expired = ca.issue("caa", &[], &[], Usage::Client, time::Duration::minutes(-1))?;
    let scfg = tls::server_config(&server.cert_pem, &server.key_pem, &ca.cert_pem())?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let stop = tokio_util::sync::CancellationToken::new();
    let _g = stop.clone().drop_guard();
    tokio::spawn(frelay::serve(
        listener,
        scfg,
        frelay::RelayOptions {
            agent_socket: run_dir().join("no-agent.sock"),
            netns: sandboxd::api::names::POD_NETNS.into(),
            agent_wait: Duration::from_secs(1),
        },
        stop,
    ));
    let cfg = tls::client_config(&ca.cert_pem(), &expired.cert_pem, &expired.key_pem)?;
    let e = dial(&cfg, addr, vm, Duration::from_millis(800))
        .await
        .err()
        .context("an expired client certificate was accepted")?;
    ensure!(e.to_string().contains("not reachable within"), "{e}");
    // A server whose certificate names another VM is refused by CAA.
    let e = dial(
        &r.pki.client_config(),
        r.addr,
        "podvm-other-1",
        Duration::from_millis(800),
    )
    .await
    .err()
    .context("a server certificate for another VM was accepted")?;
    ensure!(e.to_string().contains("not reachable within"), "{e}");
    Ok(())
}

async fn malformed_frames() -> Result<()> {
    let r = rig("malformed").await?;
    for bad in [
        // 5 MiB announced.
        {
            let mut h = vec![0u8; 10];
            h[0..4].copy_from_slice(&(5u32 << 20).to_be_bytes());
            h[4..8].copy_from_slice(&1u32.to_be_bytes());
            h[8] = 1;
            h
        },
        // Unknown frame type 7.
        vec![0, 0, 0, 1, 0, 0, 0, 1, 7, 0, 0],
    ] {
        let mut s = tokio::net::UnixStream::connect(&r.socket).await?;
        s.write_all(&bad).await?;
        let mut buf = Vec::new();
        // Closed: end of stream, or a reset because the relay dropped unread input.
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
            .await
            .context("the relay kept a connection with a malformed frame open")?
            .unwrap_or(0);
        ensure!(n == 0, "the relay answered a malformed frame");
    }
    ensure!(
        r.log.lock().unwrap().is_empty(),
        "a malformed frame reached the agent"
    );
    // The socket still serves well-formed calls afterwards.
    check_agent_calls(&r.socket, &r.log).await?;
    let _ = Arc::new(());
    Ok(())
}
