//! A kata-agent-protocol client that spells every method path literally
//! (`/grpc.AgentService/CreateContainer`), as the kata shim sends it, over any byte stream:
//! the agent's unix socket, or the forwarder's mTLS listener.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use protobuf::Message;
use sandboxd::protocol::frame::{self, Frame};
use tokio::io::{AsyncRead, AsyncWrite};

/// A ttrpc client, one call at a time, over `S`.
pub struct Wire<S> {
    stream: S,
    next: u32,
}

/// A non-OK answer: its code and message.
#[derive(Debug)]
pub struct Status {
    pub code: ttrpc::Code,
    pub message: String,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    pub fn new(stream: S) -> Self {
        Self { stream, next: 1 }
    }

    /// One call of `path` (`/service/method`) with `payload`; `Err(Status)` for a non-OK
    /// answer.
    pub async fn raw(
        &mut self,
        path: &str,
        payload: Vec<u8>,
        timeout: Duration,
    ) -> Result<std::result::Result<Vec<u8>, Status>> {
        let (service, method) = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .with_context(|| format!("{path} is not /service/method"))?;
        let mut req = ttrpc::proto::Request::new();
        req.service = service.into();
        req.method = method.into();
        req.payload = payload;
        req.timeout_nano = timeout.as_nanos() as i64;
        let id = self.next;
        self.next += 2;
        let f = Frame {
            stream_id: id,
            kind: frame::TYPE_REQUEST,
            flags: 0,
            payload: req.write_to_bytes()?,
        };
        frame::write_frame(&mut self.stream, &f).await?;
        let got = tokio::time::timeout(
            timeout + Duration::from_secs(5),
            frame::read_frame(&mut self.stream),
        )
        .await
        .with_context(|| format!("{path}: no answer in {timeout:?}"))??
        .with_context(|| format!("{path}: the connection closed"))?;
        if got.kind != frame::TYPE_RESPONSE || got.stream_id != id {
            bail!("{path}: unexpected frame {got:?}");
        }
        let resp = ttrpc::proto::Response::parse_from_bytes(&got.payload)?;
        let status = resp.status.clone().unwrap_or_default();
        if status.code() != ttrpc::Code::OK {
            return Ok(Err(Status {
                code: status.code(),
                message: status.message,
            }));
        }
        Ok(Ok(resp.payload))
    }

    /// A call that must succeed, decoded as `M`.
    pub async fn ok<M: Message>(&mut self, path: &str, req: &impl Message) -> Result<M> {
        self.ok_within(path, req, Duration::from_secs(60)).await
    }

    /// [`Self::ok`] with a deadline.
    pub async fn ok_within<M: Message>(
        &mut self,
        path: &str,
        req: &impl Message,
        timeout: Duration,
    ) -> Result<M> {
        match self.raw(path, req.write_to_bytes()?, timeout).await? {
            Ok(p) => Ok(M::parse_from_bytes(&p)?),
            Err(s) => bail!("{path}: {:?}: {}", s.code, s.message),
        }
    }

    /// A call that must fail: its status.
    pub async fn err(&mut self, path: &str, req: &impl Message) -> Result<Status> {
        match self
            .raw(path, req.write_to_bytes()?, Duration::from_secs(60))
            .await?
        {
            Ok(_) => bail!("{path} succeeded where it should fail"),
            Err(s) => Ok(s),
        }
    }
}
