//! Azure's WireServer "Ready" report: a provisioned VM must tell the fabric it is ready, or
//! the VM create call does not finish. Fetch the goal state
//! (`GET /machine?comp=goalstate`), then post a health report naming its incarnation,
//! container and role instance with state `Ready` (`POST /machine?comp=health`), protocol
//! version `2012-11-30`.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// WireServer's fixed address.
pub(crate) const WIRESERVER: &str = "168.63.129.16:80";
const VERSION: &str = "2012-11-30";

/// The goal-state fields a health report repeats.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GoalState {
    /// `Incarnation`.
    pub(crate) incarnation: String,
    /// `Container/ContainerId`.
    pub(crate) container_id: String,
    /// `Container/RoleInstanceList/RoleInstance/InstanceId`.
    pub(crate) instance_id: String,
}

/// Errors of the report.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ReportError {
    /// HTTP exchange failed.
    #[error("WireServer {step}: {detail}")]
    Http {
        /// Goal state or health.
        step: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// The goal state lacks a field.
    #[error("WireServer goal state has no {0}")]
    GoalState(&'static str),
}

fn text_of<'a>(xml: &'a str, tag: &str) -> Option<&'a str> {
    let open = format!("<{tag}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&format!("</{tag}>"))? + start;
    Some(xml[start..end].trim())
}

/// Parses the goal-state document.
pub(crate) fn parse_goal_state(xml: &str) -> Result<GoalState, ReportError> {
    let container = text_of(xml, "Container").ok_or(ReportError::GoalState("Container"))?;
    let role = text_of(container, "RoleInstance").ok_or(ReportError::GoalState("RoleInstance"))?;
    Ok(GoalState {
        incarnation: text_of(xml, "Incarnation")
            .ok_or(ReportError::GoalState("Incarnation"))?
            .into(),
        container_id: text_of(container, "ContainerId")
            .ok_or(ReportError::GoalState("ContainerId"))?
            .into(),
        instance_id: text_of(role, "InstanceId")
            .ok_or(ReportError::GoalState("InstanceId"))?
            .into(),
    })
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The health report saying `Ready` for a goal state.
pub(crate) fn ready_report(g: &GoalState) -> String {
    format!(
        concat!(
            "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n",
            "<Health xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\" xmlns:xsd=\"http://www.w3.org/2001/XMLSchema\">",
            "<GoalStateIncarnation>{}</GoalStateIncarnation>",
            "<Container><ContainerId>{}</ContainerId><RoleInstanceList><Role>",
            "<InstanceId>{}</InstanceId><Health><State>Ready</State></Health>",
            "</Role></RoleInstanceList></Container></Health>"
        ),
        escape(&g.incarnation),
        escape(&g.container_id),
        escape(&g.instance_id)
    )
}

async fn http(
    addr: &str,
    step: &'static str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Result<String, ReportError> {
    let err = |d: String| ReportError::Http { step, detail: d };
    let mut s = tokio::time::timeout(
        Duration::from_secs(10),
        tokio::net::TcpStream::connect(addr),
    )
    .await
    .map_err(|_| err("connect timed out".into()))?
    .map_err(|e| err(e.to_string()))?;
    let host = addr.split(':').next().unwrap_or(addr);
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nx-ms-version: {VERSION}\r\nx-ms-agent-name: sandboxd\r\nConnection: close\r\n"
    );
    if let Some(b) = body {
        req.push_str(&format!(
            "Content-Type: text/xml;charset=utf-8\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body.unwrap_or_default());
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| err(e.to_string()))?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut buf))
        .await
        .map_err(|_| err("answer timed out".into()))?
        .map_err(|e| err(e.to_string()))?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text.lines().next().unwrap_or_default().to_string();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if !code.starts_with('2') {
        return Err(err(format!("answered {status}")));
    }
    Ok(text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default())
}

/// Reports Ready once: goal state, then health.
pub(crate) async fn report_ready_once(addr: &str) -> Result<GoalState, ReportError> {
    let xml = http(addr, "goal state", "GET", "/machine/?comp=goalstate", None).await?;
    let g = parse_goal_state(&xml)?;
    http(
        addr,
        "health report",
        "POST",
        "/machine/?comp=health",
        Some(&ready_report(&g)),
    )
    .await?;
    Ok(g)
}

/// Reports Ready, retrying until `total` passes.
pub(crate) async fn report_ready(addr: &str, total: Duration) -> Result<GoalState, ReportError> {
    let deadline = tokio::time::Instant::now() + total;
    loop {
        match report_ready_once(addr).await {
            Ok(g) => return Ok(g),
            Err(e) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(e) => {
                super::log(&format!("WireServer report not accepted yet: {e}"));
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOAL: &str = "<?xml version=\"1.0\" encoding=\"utf-8\"?>\n<GoalState><Version>2012-11-30</Version><Incarnation>3</Incarnation><Machine><ExpectedState>Started</ExpectedState></Machine><Container><ContainerId>c-1</ContainerId><RoleInstanceList><RoleInstance><InstanceId>i-1._podvm</InstanceId><State>Started</State></RoleInstance></RoleInstanceList></Container></GoalState>";

    #[test]
    fn the_report_repeats_the_goal_state_ids_with_state_ready() {
        let g = parse_goal_state(GOAL).unwrap();
        assert_eq!(
            g,
            GoalState {
                incarnation: "3".into(),
                container_id: "c-1".into(),
                instance_id: "i-1._podvm".into()
            }
        );
        let r = ready_report(&g);
        assert!(r.contains("<GoalStateIncarnation>3</GoalStateIncarnation>"));
        assert!(r.contains("<ContainerId>c-1</ContainerId>"));
        assert!(r.contains("<InstanceId>i-1._podvm</InstanceId><Health><State>Ready</State>"));
        assert!(parse_goal_state("<GoalState/>").is_err());
    }

    /// A loopback stand-in for WireServer that fails the first health post.
    #[tokio::test]
    async fn ready_is_reported_after_a_refused_attempt() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut health_posts = 0;
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 8192];
                let mut n = 0;
                // Read head and (for POSTs) the body.
                loop {
                    let m = s.read(&mut buf[n..]).await.unwrap();
                    n += m;
                    let t = String::from_utf8_lossy(&buf[..n]).to_string();
                    if m == 0
                        || (t.contains("\r\n\r\n")
                            && (t.starts_with("GET") || t.ends_with("</Health>")))
                    {
                        break;
                    }
                }
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                assert!(req.contains("x-ms-version: 2012-11-30"), "{req}");
                let answer = if req.starts_with("GET /machine/?comp=goalstate") {
                    format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{GOAL}",
                        GOAL.len()
                    )
                } else {
                    health_posts += 1;
                    seen.push(req.clone());
                    if health_posts == 1 {
                        "HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n".to_string()
                    } else {
                        "HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n".to_string()
                    }
                };
                s.write_all(answer.as_bytes()).await.unwrap();
                drop(s);
                if health_posts == 2 {
                    return seen;
                }
            }
        });
        let g = report_ready(&addr, Duration::from_secs(20)).await.unwrap();
        assert_eq!(g.container_id, "c-1");
        let posts = server.await.unwrap();
        assert!(posts[1].starts_with("POST /machine/?comp=health"));
        assert!(posts[1].contains("text/xml;charset=utf-8"));
        assert!(posts[1].contains("<State>Ready</State>"));
    }
}
