//! The ttrpc frame codec: a 10-byte header (u32 big-endian payload length, u32 big-endian
//! stream id, u8 type, u8 flags) followed by the payload, at most 4 MiB. Relays copy frames
//! without decoding them; [`pump`] moves frames from one stream to another and lets the
//! caller rewrite the few it must.

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Length of a frame header.
pub(crate) const HEADER_LEN: usize = 10;
/// Largest payload ttrpc allows.
pub(crate) const MAX_PAYLOAD: usize = 4 << 20;
/// Frame type of a request.
pub const TYPE_REQUEST: u8 = 1;
/// Frame type of a response.
pub const TYPE_RESPONSE: u8 = 2;
/// Frame type of a stream data frame.
pub(crate) const TYPE_DATA: u8 = 3;

/// One ttrpc frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    /// Stream id (odd: client-initiated).
    pub stream_id: u32,
    /// One of the `TYPE_*` constants.
    pub kind: u8,
    /// Frame flags (remote closed, remote open, no data).
    pub flags: u8,
    /// The payload (a protobuf `ttrpc.Request`/`Response`, or stream data).
    pub payload: Vec<u8>,
}

/// Errors of reading or writing frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The header announces a payload larger than ttrpc allows.
    #[error(
        "malformed ttrpc frame on stream {stream_id}: payload of {len} bytes exceeds the 4 MiB limit"
    )]
    TooLarge {
        /// The stream the frame claims.
        stream_id: u32,
        /// The announced length.
        len: usize,
    },
    /// The header has a type ttrpc does not define.
    #[error("malformed ttrpc frame on stream {stream_id}: unknown frame type {kind}")]
    UnknownType {
        /// The stream the frame claims.
        stream_id: u32,
        /// The type byte.
        kind: u8,
    },
    /// The connection ended inside a frame.
    #[error("truncated ttrpc frame: the connection ended after {got} of {want} bytes")]
    Truncated {
        /// Bytes received.
        got: usize,
        /// Bytes the frame needs.
        want: usize,
    },
    /// Reading or writing failed.
    #[error("ttrpc connection: {0}")]
    Io(#[from] std::io::Error),
}

impl FrameError {
    /// Low-cardinality label for metrics.
    pub(crate) fn metric_label(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "frame_too_large",
            FrameError::UnknownType { .. } => "frame_unknown_type",
            FrameError::Truncated { .. } => "frame_truncated",
            FrameError::Io(_) => "io",
        }
    }
}

/// Parses a header: (payload length, stream id, type, flags), checking length and type.
pub(crate) fn parse_header(h: &[u8; HEADER_LEN]) -> Result<(usize, u32, u8, u8), FrameError> {
    let len = u32::from_be_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let stream_id = u32::from_be_bytes([h[4], h[5], h[6], h[7]]);
    let (kind, flags) = (h[8], h[9]);
    if len > MAX_PAYLOAD {
        return Err(FrameError::TooLarge { stream_id, len });
    }
    if !(TYPE_REQUEST..=TYPE_DATA).contains(&kind) {
        return Err(FrameError::UnknownType { stream_id, kind });
    }
    Ok((len, stream_id, kind, flags))
}

impl Frame {
    /// The header of this frame.
    pub(crate) fn header(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..4].copy_from_slice(&(self.payload.len() as u32).to_be_bytes());
        h[4..8].copy_from_slice(&self.stream_id.to_be_bytes());
        h[8] = self.kind;
        h[9] = self.flags;
        h
    }

    /// Header and payload as one buffer.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HEADER_LEN + self.payload.len());
        v.extend_from_slice(&self.header());
        v.extend_from_slice(&self.payload);
        v
    }
}

/// Reads one frame; `Ok(None)` when the connection ends cleanly between frames.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> Result<Option<Frame>, FrameError> {
    let Some((len, stream_id, kind, flags, _)) = read_header(r).await? else {
        return Ok(None);
    };
    Ok(Some(Frame {
        stream_id,
        kind,
        flags,
        payload: read_payload(r, Vec::new(), len).await?,
    }))
}

/// Reads one frame header; `Ok(None)` when the connection ends cleanly between frames.
pub(crate) async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<(usize, u32, u8, u8, [u8; HEADER_LEN])>, FrameError> {
    let mut h = [0u8; HEADER_LEN];
    let mut got = 0;
    while got < HEADER_LEN {
        let n = r.read(&mut h[got..]).await?;
        if n == 0 {
            if got == 0 {
                return Ok(None);
            }
            return Err(FrameError::Truncated {
                got,
                want: HEADER_LEN,
            });
        }
        got += n;
    }
    let (len, stream_id, kind, flags) = parse_header(&h)?;
    Ok(Some((len, stream_id, kind, flags, h)))
}

/// Forwards one frame whose header was read: `head` (the header and any payload bytes
/// already read) goes out with the first chunk, then the rest of the payload is copied as it
/// arrives (`rest` bytes) — cut-through, so a large frame crosses a relay without waiting
/// for its last byte. `buf` is the reusable chunk buffer.
pub(crate) async fn forward_rest<R, W>(
    r: &mut R,
    w: &mut W,
    mut head: Vec<u8>,
    rest: usize,
    buf: &mut [u8],
) -> Result<(), FrameError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let total = head.len() + rest;
    let mut left = rest;
    // Small frames: one write of header and payload.
    while left > 0 && head.len() < buf.len() {
        let want = left.min(buf.len() - head.len());
        let n = read_available(r, &mut buf[..want]).await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                got: total - left,
                want: total,
            });
        }
        head.extend_from_slice(&buf[..n]);
        left -= n;
    }
    w.write_all(&head).await?;
    while left > 0 {
        let want = left.min(buf.len());
        let n = read_available(r, &mut buf[..want]).await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                got: total - left,
                want: total,
            });
        }
        w.write_all(&buf[..n]).await?;
        left -= n;
    }
    w.flush().await?;
    Ok(())
}

/// Reads at least one byte (waiting for it), then whatever else `r` has ready without
/// waiting, up to `buf.len()`; `Ok(0)` only at end of stream. A TLS stream yields one record
/// (at most 16 KiB) per read: gathering what is already there before writing it on makes one
/// write of up to a chunk instead of one per record, and wakes the reader behind the next
/// hop once instead of per record.
pub(crate) async fn read_available<R: AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> std::io::Result<usize> {
    use std::pin::Pin;
    use std::task::Poll;
    let mut filled = 0;
    std::future::poll_fn(|cx| {
        while filled < buf.len() {
            let mut rb = tokio::io::ReadBuf::new(&mut buf[filled..]);
            match Pin::new(&mut *r).poll_read(cx, &mut rb) {
                Poll::Ready(Ok(())) if rb.filled().is_empty() => break,
                Poll::Ready(Ok(())) => filled += rb.filled().len(),
                // Returned with the data before it; the next read reports it again.
                Poll::Ready(Err(_)) if filled > 0 => break,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending if filled > 0 => break,
                Poll::Pending => return Poll::Pending,
            }
        }
        Poll::Ready(Ok(filled))
    })
    .await
}

/// Reads exactly `len` payload bytes after a header; for the frames a relay must decode.
pub(crate) async fn read_payload<R: AsyncRead + Unpin>(
    r: &mut R,
    prefix: Vec<u8>,
    len: usize,
) -> Result<Vec<u8>, FrameError> {
    let mut payload = prefix;
    let mut got = payload.len();
    payload.resize(len, 0);
    while got < len {
        let n = r.read(&mut payload[got..]).await?;
        if n == 0 {
            return Err(FrameError::Truncated {
                got: HEADER_LEN + got,
                want: HEADER_LEN + len,
            });
        }
        got += n;
    }
    Ok(payload)
}

/// The `service` and `method` of a ttrpc `Request` from the first bytes of its payload
/// (fields 1 and 2, which encoders write first); `None` when the prefix does not show both.
pub(crate) fn request_route(prefix: &[u8]) -> Option<(&str, &str)> {
    fn varint(b: &[u8], i: &mut usize) -> Option<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *b.get(*i)?;
            *i += 1;
            v |= u64::from(byte & 0x7f) << shift;
            if byte & 0x80 == 0 {
                return Some(v);
            }
        }
        None
    }
    let (mut service, mut method) = (None, None);
    let mut i = 0;
    while service.is_none() || method.is_none() {
        let tag = varint(prefix, &mut i)?;
        if tag & 7 != 2 || !(1..=2).contains(&(tag >> 3)) {
            return None;
        }
        let len = usize::try_from(varint(prefix, &mut i)?).ok()?;
        let s = std::str::from_utf8(prefix.get(i..i.checked_add(len)?)?).ok()?;
        i += len;
        if tag >> 3 == 1 {
            service = Some(s);
        } else {
            method = Some(s);
        }
    }
    Some((service?, method?))
}

/// Writes one frame: header and payload in one write when small; a large payload is
/// written after its header without being copied.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, f: &Frame) -> Result<(), FrameError> {
    if f.payload.len() > MAX_PAYLOAD {
        return Err(FrameError::TooLarge {
            stream_id: f.stream_id,
            len: f.payload.len(),
        });
    }
    if f.payload.len() > 16 << 10 {
        w.write_all(&f.header()).await?;
        w.write_all(&f.payload).await?;
    } else {
        w.write_all(&f.encode()).await?;
    }
    w.flush().await?;
    Ok(())
}

/// Copies frames from `r` to `w` until `r` ends, passing each through `rewrite`; returns the
/// number of frames copied. The writer is shut down when the reader ends.
#[cfg(test)]
pub(crate) async fn pump<R, W, F>(r: &mut R, w: &mut W, mut rewrite: F) -> Result<u64, FrameError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
    F: FnMut(Frame) -> Frame,
{
    let mut n = 0u64;
    while let Some(f) = read_frame(r).await? {
        write_frame(w, &rewrite(f)).await?;
        n += 1;
    }
    let _ = w.shutdown().await;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_route_of_a_request_is_read_from_its_first_bytes() {
        let mut r = ttrpc::proto::Request::new();
        r.service = "grpc.AgentService".into();
        r.method = "WriteStdin".into();
        r.payload = vec![7; 100_000];
        let bytes = protobuf::Message::write_to_bytes(&r).unwrap();
        assert_eq!(
            request_route(&bytes[..64]),
            Some(("grpc.AgentService", "WriteStdin"))
        );
        // Too short to show both names, or not a request envelope: unknown.
        assert_eq!(request_route(&bytes[..20]), None);
        assert_eq!(request_route(&[0x18, 0x01]), None);
    }

    #[tokio::test]
    async fn a_forwarded_frame_arrives_byte_for_byte_in_any_chunking() {
        for len in [0usize, 5, 1000, 70_000, 300_000] {
            let f = frame(len);
            let wire = f.encode();
            let (mut a, mut b) = tokio::io::duplex(4096);
            let writer = tokio::spawn(async move {
                a.write_all(&wire).await.unwrap();
                a
            });
            let (hlen, _, _, _, h) = read_header(&mut b).await.unwrap().unwrap();
            let mut out = Vec::new();
            let mut buf = vec![0u8; 16 << 10];
            forward_rest(&mut b, &mut out, h.to_vec(), hlen, &mut buf)
                .await
                .unwrap();
            writer.await.unwrap();
            assert_eq!(out, f.encode(), "len {len}");
        }
    }

    #[tokio::test]
    async fn a_read_gathers_what_is_ready_and_does_not_wait_for_more() {
        // Three pieces ready (as a TLS stream yields one record per read), then a peer that
        // is still open but silent.
        let (_open, silent) = tokio::io::duplex(64);
        let mut r = (&[1u8; 100][..])
            .chain(&[2u8; 200][..])
            .chain(&[3u8; 300][..])
            .chain(silent);
        let mut buf = vec![0u8; 1000];
        let n = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            read_available(&mut r, &mut buf),
        )
        .await
        .expect("returned without waiting for the silent peer")
        .unwrap();
        assert_eq!(n, 600);
        assert_eq!(&buf[99..101], &[1, 2]);
        assert_eq!(&buf[299..301], &[2, 3]);
        // A full buffer returns at once; the rest stays for the next read.
        let mut r = &[7u8; 50][..];
        let mut small = [0u8; 20];
        assert_eq!(read_available(&mut r, &mut small).await.unwrap(), 20);
        assert_eq!(r.len(), 30);
    }

    fn frame(len: usize) -> Frame {
        Frame {
            stream_id: 7,
            kind: TYPE_REQUEST,
            flags: 0,
            payload: (0..len).map(|i| i as u8).collect(),
        }
    }

    #[tokio::test]
    async fn frames_round_trip_with_the_ttrpc_header_layout() {
        let f = frame(300);
        let bytes = f.encode();
        assert_eq!(&bytes[..10], &[0, 0, 1, 44, 0, 0, 0, 7, 1, 0]);
        let mut r = &bytes[..];
        assert_eq!(read_frame(&mut r).await.unwrap(), Some(f));
        assert_eq!(read_frame(&mut r).await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_oversized_frame_is_refused_before_its_payload_is_read() {
        let mut h = frame(0).header();
        h[0..4].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_be_bytes());
        let mut r = &h[..];
        let e = read_frame(&mut r).await.unwrap_err();
        assert!(matches!(e, FrameError::TooLarge { len, .. } if len == MAX_PAYLOAD + 1));
        assert!(e.to_string().contains("exceeds the 4 MiB limit"), "{e}");
    }

    #[tokio::test]
    async fn unknown_types_and_truncation_are_clear_errors() {
        let mut h = frame(0).header();
        h[8] = 9;
        let e = read_frame(&mut &h[..]).await.unwrap_err();
        assert!(e.to_string().contains("unknown frame type 9"), "{e}");
        let bytes = frame(100).encode();
        let e = read_frame(&mut &bytes[..50]).await.unwrap_err();
        assert!(
            matches!(e, FrameError::Truncated { got: 50, want: 110 }),
            "{e}"
        );
        let e = read_frame(&mut &bytes[..4]).await.unwrap_err();
        assert!(matches!(e, FrameError::Truncated { got: 4, want: 10 }));
    }

    #[tokio::test]
    async fn a_pump_copies_frames_byte_for_byte_and_applies_rewrites() {
        let mut input = Vec::new();
        for i in 0..5 {
            let mut f = frame(i * 1000);
            f.stream_id = i as u32 * 2 + 1;
            input.extend(f.encode());
        }
        let mut out = Vec::new();
        let n = pump(&mut &input[..], &mut out, |f| f).await.unwrap();
        assert_eq!(n, 5);
        assert_eq!(out, input);
        let mut out = Vec::new();
        pump(&mut &input[..], &mut out, |mut f| {
            if f.stream_id == 3 {
                f.payload = b"new".to_vec();
            }
            f
        })
        .await
        .unwrap();
        let mut r = &out[..];
        let _ = read_frame(&mut r).await.unwrap();
        assert_eq!(read_frame(&mut r).await.unwrap().unwrap().payload, b"new");
    }
}
