//! A small Blob service client for page blobs, on `azure_core`'s HTTP client (reqwest with
//! rustls) and Shared Key signing with `ring`: create container, create page blob, Put Page,
//! Get Page Ranges, Get Blob Properties, Get Blob (a range), Delete Blob. Transient failures
//! (5xx, 408, 429, dropped connections, timeouts) are retried with backoff.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use azure_core::{HttpClient, Method, Request, StatusCode};
use bytes::Bytes;

use super::sharedkey::{SharedKey, Signed};

/// The service version sandboxd speaks.
pub(crate) const VERSION: &str = "2021-12-02";

/// Blob service failures.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The service answered with an error status.
    #[error("{op} {url}: HTTP {status} {code} {message}")]
    Status {
        /// What was being done.
        op: &'static str,
        /// The URL (no secrets: Shared Key travels in a header).
        url: String,
        /// HTTP status.
        status: u16,
        /// `x-ms-error-code`.
        code: String,
        /// The error document's `Message` (never the authentication detail).
        message: String,
    },
    /// The request never got an answer.
    #[error("{op} {url}: {message}")]
    Transport {
        /// What was being done.
        op: &'static str,
        /// The URL.
        url: String,
        /// Why.
        message: String,
    },
    /// The answer was not what the service sends.
    #[error("{op}: unexpected answer: {0}", op = .1)]
    Unexpected(String, &'static str),
}

impl BlobError {
    /// The HTTP status, when the service answered.
    pub(crate) fn status(&self) -> Option<u16> {
        match self {
            BlobError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// What Get Blob Properties says.
#[derive(Clone, Debug)]
pub struct BlobProperties {
    /// `x-ms-blob-type`.
    pub blob_type: String,
    /// `Content-Length`.
    pub length: u64,
    /// `x-ms-meta-*`, names lower-case without the prefix.
    pub(crate) metadata: BTreeMap<String, String>,
}

/// A client for the blobs of one account.
#[derive(Clone)]
pub struct BlobClient {
    http: Arc<dyn HttpClient>,
    endpoint: url::Url,
    key: SharedKey,
    attempts: u32,
    attempt_timeout: Duration,
}

impl std::fmt::Debug for BlobClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlobClient({})", self.endpoint)
    }
}

impl BlobClient {
    /// A client for the account's blob endpoint (e.g. `https://acct.blob.core.windows.net/`
    /// or the emulator's `http://127.0.0.1:10000/acct/`).
    pub fn new(endpoint: url::Url, key: SharedKey) -> Self {
        let mut endpoint = endpoint;
        if !endpoint.path().ends_with('/') {
            let p = format!("{}/", endpoint.path());
            endpoint.set_path(&p);
        }
        Self {
            // Behind a proxy and with the system's CA bundle, as ARM's calls.
            http: crate::cloud::azure::HttpSettings::from_env()
                .client()
                .unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "proxy settings not usable; connecting directly");
                    azure_core::new_http_client()
                }),
            endpoint,
            key,
            attempts: 6,
            attempt_timeout: Duration::from_secs(120),
        }
    }

    /// The URL of `container/blob`.
    pub(crate) fn blob_url(&self, container: &str, blob: &str) -> url::Url {
        self.endpoint
            .join(&format!("{container}/{blob}"))
            .expect("container and blob names are URL-safe")
    }

    async fn send(
        &self,
        op: &'static str,
        method: Method,
        url: url::Url,
        extra: &[(&str, String)],
        body: Option<Bytes>,
    ) -> Result<(StatusCode, azure_core::headers::Headers, Bytes), BlobError> {
        let mut attempt = 0u32;
        loop {
            let result = self.send_once(op, &method, &url, extra, body.clone()).await;
            let retry = match &result {
                Ok((s, _, _)) => matches!(u16::from(*s), 408 | 429 | 500 | 502 | 503 | 504),
                Err(BlobError::Transport { .. }) => true,
                Err(_) => false,
            };
            attempt += 1;
            if !retry || attempt >= self.attempts {
                let (s, h, b) = result?;
                if s.is_success() {
                    return Ok((s, h, b));
                }
                let text = String::from_utf8_lossy(&b);
                return Err(BlobError::Status {
                    op,
                    url: url.to_string(),
                    status: u16::from(s),
                    code: h
                        .get_optional_string(&azure_core::headers::HeaderName::from_static(
                            "x-ms-error-code",
                        ))
                        .or_else(|| between(&text, "<Code>", "</Code>").map(str::to_string))
                        .unwrap_or_default(),
                    message: between(&text, "<Message>", "</Message>")
                        .map(|m| m.lines().next().unwrap_or_default().to_string())
                        .unwrap_or_default(),
                });
            }
            let backoff = Duration::from_millis(200u64 << attempt.min(6));
            tracing::debug!(op, attempt, ?backoff, "retrying blob request");
            tokio::time::sleep(backoff.mul_f64(0.5 + fastrand::f64() / 2.0)).await;
        }
    }

    async fn send_once(
        &self,
        op: &'static str,
        method: &Method,
        url: &url::Url,
        extra: &[(&str, String)],
        body: Option<Bytes>,
    ) -> Result<(StatusCode, azure_core::headers::Headers, Bytes), BlobError> {
        let date = azure_core::date::to_rfc1123(&time::OffsetDateTime::now_utc());
        let len = body.as_ref().map(|b| b.len()).unwrap_or(0);
        let mut headers: Vec<(String, String)> = vec![
            ("x-ms-date".into(), date),
            ("x-ms-version".into(), VERSION.into()),
        ];
        if matches!(method, Method::Put | Method::Post) {
            headers.push(("content-length".into(), len.to_string()));
        }
        for (k, v) in extra {
            headers.push((k.to_string(), v.clone()));
        }
        let auth = self.key.authorization(&Signed {
            method: method.as_ref(),
            url,
            headers: &headers,
        });
        let mut req = Request::new(url.clone(), *method);
        for (k, v) in headers {
            // The HTTP client sets a non-zero length itself but sends none for an empty
            // body, which the service requires on PUT.
            if k != "content-length" || len == 0 {
                req.insert_header(k, v);
            }
        }
        req.insert_header("authorization", auth);
        req.set_body(body.unwrap_or_default());
        let transport = |message: String| BlobError::Transport {
            op,
            url: url.to_string(),
            message,
        };
        let resp = tokio::time::timeout(self.attempt_timeout, self.http.execute_request(&req))
            .await
            .map_err(|_| transport("timed out".into()))?
            .map_err(|e| transport(e.to_string()))?;
        let (status, headers, body) = resp.deconstruct();
        let bytes = tokio::time::timeout(self.attempt_timeout, body.collect())
            .await
            .map_err(|_| transport("timed out reading the answer".into()))?
            .map_err(|e| transport(e.to_string()))?;
        Ok((status, headers, bytes))
    }

    /// Creates the container; one that exists already is fine.
    pub(crate) async fn create_container(&self, container: &str) -> Result<(), BlobError> {
        let mut url = self.endpoint.join(container).expect("URL-safe name");
        url.query_pairs_mut().append_pair("restype", "container");
        match self
            .send("create container", Method::Put, url, &[], None)
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.status() == Some(409) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Creates (or replaces) an empty page blob of `size` bytes with `metadata`.
    pub(crate) async fn create_page_blob(
        &self,
        container: &str,
        blob: &str,
        size: u64,
        metadata: &BTreeMap<String, String>,
    ) -> Result<(), BlobError> {
        let mut extra = vec![
            ("x-ms-blob-type", "PageBlob".to_string()),
            ("x-ms-blob-content-length", size.to_string()),
            ("x-ms-blob-content-type", "application/octet-stream".into()),
        ];
        let metas: Vec<(String, String)> = metadata
            .iter()
            .map(|(k, v)| (format!("x-ms-meta-{k}"), v.clone()))
            .collect();
        for (k, v) in &metas {
            extra.push((k.as_str(), v.clone()));
        }
        self.send(
            "create page blob",
            Method::Put,
            self.blob_url(container, blob),
            &extra,
            None,
        )
        .await
        .map(|_| ())
    }

    /// Writes `data` at `offset` (both 512-aligned, at most 4 MiB).
    pub(crate) async fn put_page(
        &self,
        container: &str,
        blob: &str,
        offset: u64,
        data: Bytes,
    ) -> Result<(), BlobError> {
        let mut url = self.blob_url(container, blob);
        url.query_pairs_mut().append_pair("comp", "page");
        let end = offset + data.len() as u64 - 1;
        self.send(
            "put page",
            Method::Put,
            url,
            &[
                ("x-ms-page-write", "update".into()),
                ("x-ms-range", format!("bytes={offset}-{end}")),
            ],
            Some(data),
        )
        .await
        .map(|_| ())
    }

    /// The blob's valid page ranges, half-open, in order.
    pub async fn page_ranges(
        &self,
        container: &str,
        blob: &str,
    ) -> Result<Vec<Range<u64>>, BlobError> {
        let mut url = self.blob_url(container, blob);
        url.query_pairs_mut().append_pair("comp", "pagelist");
        let (_, _, body) = self
            .send("get page ranges", Method::Get, url, &[], None)
            .await?;
        let text = String::from_utf8_lossy(&body);
        parse_page_list(&text).ok_or_else(|| {
            BlobError::Unexpected(text.chars().take(200).collect(), "get page ranges")
        })
    }

    /// Properties and metadata; `None` when the blob does not exist.
    pub async fn properties(
        &self,
        container: &str,
        blob: &str,
    ) -> Result<Option<BlobProperties>, BlobError> {
        match self
            .send(
                "get blob properties",
                Method::Head,
                self.blob_url(container, blob),
                &[],
                None,
            )
            .await
        {
            Ok((_, h, _)) => {
                let mut metadata = BTreeMap::new();
                let mut blob_type = String::new();
                let mut length = 0;
                for (k, v) in h.iter() {
                    let k = k.as_str().to_ascii_lowercase();
                    if let Some(m) = k.strip_prefix("x-ms-meta-") {
                        metadata.insert(m.to_string(), v.as_str().to_string());
                    } else if k == "x-ms-blob-type" {
                        blob_type = v.as_str().to_string();
                    } else if k == "content-length" {
                        length = v.as_str().parse().unwrap_or(0);
                    }
                }
                Ok(Some(BlobProperties {
                    blob_type,
                    length,
                    metadata,
                }))
            }
            Err(e) if e.status() == Some(404) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Bytes `range` of the blob.
    pub async fn read(
        &self,
        container: &str,
        blob: &str,
        range: Range<u64>,
    ) -> Result<Bytes, BlobError> {
        let (_, _, body) = self
            .send(
                "get blob",
                Method::Get,
                self.blob_url(container, blob),
                &[(
                    "x-ms-range",
                    format!("bytes={}-{}", range.start, range.end - 1),
                )],
                None,
            )
            .await?;
        Ok(body)
    }

    /// Deletes the blob; a missing one is fine. Returns whether it existed.
    pub async fn delete(&self, container: &str, blob: &str) -> Result<bool, BlobError> {
        match self
            .send(
                "delete blob",
                Method::Delete,
                self.blob_url(container, blob),
                &[],
                None,
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(404) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

/// Parses a `PageList` document into half-open ranges (the service's `End` is inclusive).
pub(crate) fn parse_page_list(xml: &str) -> Option<Vec<Range<u64>>> {
    if !xml.contains("<PageList") {
        return None;
    }
    let mut out = Vec::new();
    let mut rest = xml;
    while let Some(i) = rest.find("<PageRange>") {
        rest = &rest[i + "<PageRange>".len()..];
        let end_tag = rest.find("</PageRange>")?;
        let item = &rest[..end_tag];
        let start: u64 = between(item, "<Start>", "</Start>")?.trim().parse().ok()?;
        let end: u64 = between(item, "<End>", "</End>")?.trim().parse().ok()?;
        out.push(start..end + 1);
        rest = &rest[end_tag..];
    }
    out.sort_by_key(|r| r.start);
    Some(out)
}

fn between<'a>(s: &'a str, open: &str, close: &str) -> Option<&'a str> {
    let a = s.find(open)? + open.len();
    let b = s[a..].find(close)? + a;
    Some(&s[a..b])
}

/// Splits a blob URL into (blob endpoint, container, blob name), for an account named
/// `account`: `https://acct.blob.../c/b` or the emulator's `http://host/acct/c/b`.
pub(crate) fn split_blob_url(url: &url::Url, account: &str) -> Option<(url::Url, String, String)> {
    let segs: Vec<&str> = url.path_segments()?.collect();
    let (prefix, rest) = if segs.first() == Some(&account) {
        (format!("/{account}/"), &segs[1..])
    } else {
        ("/".to_string(), &segs[..])
    };
    if rest.len() < 2 {
        return None;
    }
    let mut endpoint = url.clone();
    endpoint.set_path(&prefix);
    endpoint.set_query(None);
    Some((endpoint, rest[0].to_string(), rest[1..].join("/")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_lists_become_half_open_ranges() {
        let xml = "<?xml version=\"1.0\" encoding=\"utf-8\"?><PageList><PageRange><Start>512</Start><End>1023</End></PageRange><PageRange><Start>0</Start><End>511</End></PageRange></PageList>";
        assert_eq!(parse_page_list(xml), Some(vec![0..512, 512..1024]));
        assert_eq!(parse_page_list("<PageList />"), Some(vec![]));
        assert_eq!(parse_page_list("<Error/>"), None);
    }

    #[test]
    fn blob_urls_split_for_both_url_styles() {
        let u = url::Url::parse("https://acct.blob.core.windows.net/vhds/a/b.vhd").unwrap();
        let (e, c, b) = split_blob_url(&u, "acct").unwrap();
        assert_eq!(e.as_str(), "https://acct.blob.core.windows.net/");
        assert_eq!((c.as_str(), b.as_str()), ("vhds", "a/b.vhd"));
        let u = url::Url::parse("http://127.0.0.1:10000/acct/vhds/b.vhd").unwrap();
        let (e, c, b) = split_blob_url(&u, "acct").unwrap();
        assert_eq!(e.as_str(), "http://127.0.0.1:10000/acct/");
        assert_eq!((c.as_str(), b.as_str()), ("vhds", "b.vhd"));
    }
}
