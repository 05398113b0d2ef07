//! A ttrpc client that writes its frames by hand: the service and method names go on the
//! wire exactly as spelled by the caller (as kata's shims spell them), never through
//! sandboxd's generated code, whose names could differ from the protocol's.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use protobuf::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A ttrpc answer.
#[derive(Clone, Debug)]
pub struct Answer {
    /// `Status.code` (0 = OK).
    pub code: i32,
    /// `Status.message`.
    pub message: String,
    /// The response payload.
    pub payload: Vec<u8>,
}

fn varint(out: &mut Vec<u8>, mut v: u64) {
    loop {
        let b = (v & 0x7f) as u8;
        v >>= 7;
        if v == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

fn bytes_field(out: &mut Vec<u8>, field: u32, data: &[u8]) {
    varint(out, u64::from(field << 3 | 2));
    varint(out, data.len() as u64);
    out.extend_from_slice(data);
}

/// `ttrpc.Request{service = 1, method = 2, payload = 3, timeout_nano = 4}`, encoded by hand.
pub fn request(service: &str, method: &str, payload: &[u8], timeout: Option<Duration>) -> Vec<u8> {
    let mut out = Vec::new();
    bytes_field(&mut out, 1, service.as_bytes());
    bytes_field(&mut out, 2, method.as_bytes());
    bytes_field(&mut out, 3, payload);
    if let Some(t) = timeout {
        varint(&mut out, 4 << 3);
        varint(&mut out, t.as_nanos() as u64);
    }
    out
}

/// One call over a new connection to `socket` (the shim dials one per call): a request frame
/// on stream 1, the response frame read back. `timeout` goes into the request as the
/// client's deadline; the client itself waits up to `wait`.
pub async fn call(
    socket: &Path,
    service: &str,
    method: &str,
    payload: &[u8],
    timeout: Option<Duration>,
    wait: Duration,
) -> Result<Answer> {
    let mut s = tokio::net::UnixStream::connect(socket)
        .await
        .with_context(|| format!("connecting to {}", socket.display()))?;
    let body = request(service, method, payload, timeout);
    let mut frame = Vec::with_capacity(10 + body.len());
    frame.extend_from_slice(&(body.len() as u32).to_be_bytes());
    frame.extend_from_slice(&1u32.to_be_bytes()); // stream 1
    frame.push(1); // request
    frame.push(0); // flags
    frame.extend_from_slice(&body);
    s.write_all(&frame).await?;
    let read = async {
        loop {
            let mut h = [0u8; 10];
            s.read_exact(&mut h)
                .await
                .context("reading a frame header")?;
            let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
            let stream = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
            let mut p = vec![0u8; len];
            s.read_exact(&mut p).await.context("reading a frame")?;
            if stream == 1 && h[8] == 2 {
                return Ok::<_, anyhow::Error>(p);
            }
        }
    };
    let p = tokio::time::timeout(wait, read)
        .await
        .map_err(|_| anyhow::anyhow!("no answer within {wait:?}"))??;
    let resp = ttrpc::proto::Response::parse_from_bytes(&p)?;
    let code = resp.status.code() as i32;
    Ok(Answer {
        code,
        message: resp.status.message.clone(),
        payload: resp.payload,
    })
}

impl Answer {
    /// The payload of an OK answer, else an error with the status.
    pub fn ok(self) -> Result<Vec<u8>> {
        if self.code != 0 {
            bail!("status {}: {}", self.code, self.message);
        }
        Ok(self.payload)
    }
}
