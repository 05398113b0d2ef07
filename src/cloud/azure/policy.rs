//! sandboxd's ARM manners, as the one `azure_core` policy both clients use (the SDK's own
//! retries are off, so nothing is retried twice): a token bucket per subscription for reads
//! and writes, `retry-after-ms` / `Retry-After` on 429, jittered exponential backoff on 5xx,
//! timeouts and dropped connections, and a bound on the total time of one call.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use azure_core::{Context, Method, Policy, PolicyResult, Request, Response, StatusCode};

/// Retry and rate settings.
#[derive(Clone, Debug)]
pub struct Manners {
    /// Burst of reads per subscription (ARM: 250).
    pub(crate) read_burst: f64,
    /// Reads per second refilled (ARM: 25).
    pub(crate) reads_per_second: f64,
    /// Burst of writes/deletes per subscription (ARM: 200).
    pub(crate) write_burst: f64,
    /// Writes per second refilled (ARM: 10).
    pub(crate) writes_per_second: f64,
    /// First backoff on 5xx/timeouts; doubles per attempt, with full jitter.
    pub(crate) backoff: Duration,
    /// Largest single backoff.
    pub(crate) max_backoff: Duration,
    /// Timeout of one attempt.
    pub(crate) attempt_timeout: Duration,
    /// Bound on the total time of one call, retries included.
    pub(crate) max_total: Duration,
}

impl Default for Manners {
    fn default() -> Self {
        Self {
            read_burst: 250.0,
            reads_per_second: 25.0,
            write_burst: 200.0,
            writes_per_second: 10.0,
            backoff: Duration::from_millis(500),
            max_backoff: Duration::from_secs(30),
            attempt_timeout: Duration::from_secs(60),
            max_total: Duration::from_secs(300),
        }
    }
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    last: Instant,
}

/// Counters of what the policy did, for metrics and tests.
#[derive(Debug, Default)]
pub(crate) struct Counters {
    /// Requests sent (attempts).
    pub(crate) attempts: std::sync::atomic::AtomicU64,
    /// 429 answers received.
    pub(crate) throttled: std::sync::atomic::AtomicU64,
    /// Retries after 5xx, timeouts or transport errors.
    pub(crate) transient_retries: std::sync::atomic::AtomicU64,
}

/// The policy.
#[derive(Debug)]
pub(crate) struct ArmPolicy {
    manners: Manners,
    buckets: Mutex<HashMap<(String, bool), Bucket>>,
    /// What it did.
    pub(crate) counters: Arc<Counters>,
}

impl ArmPolicy {
    /// A policy with these settings.
    pub(crate) fn new(manners: Manners) -> Self {
        Self {
            manners,
            buckets: Mutex::new(HashMap::new()),
            counters: Arc::default(),
        }
    }

    /// Takes a token for (subscription, write), sleeping until one is available.
    async fn acquire(&self, subscription: &str, write: bool) {
        let (burst, rate) = if write {
            (self.manners.write_burst, self.manners.writes_per_second)
        } else {
            (self.manners.read_burst, self.manners.reads_per_second)
        };
        loop {
            let wait = {
                let mut buckets = self.buckets.lock().unwrap_or_else(|e| e.into_inner());
                let now = Instant::now();
                let b = buckets
                    .entry((subscription.to_string(), write))
                    .or_insert(Bucket {
                        tokens: burst,
                        last: now,
                    });
                b.tokens = (b.tokens + now.duration_since(b.last).as_secs_f64() * rate).min(burst);
                b.last = now;
                if b.tokens >= 1.0 {
                    b.tokens -= 1.0;
                    return;
                }
                Duration::from_secs_f64((1.0 - b.tokens) / rate)
            };
            tokio::time::sleep(wait).await;
        }
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let cap = self
            .manners
            .backoff
            .saturating_mul(1u32 << attempt.min(16))
            .min(self.manners.max_backoff);
        // Full jitter: uniform in [cap/2, cap].
        cap.mul_f64(0.5 + fastrand::f64() / 2.0)
    }
}

/// The wait a 429 asks for: `retry-after-ms`, then `x-ms-retry-after-ms`, then `Retry-After`
/// seconds.
pub(crate) fn retry_after(headers: &azure_core::headers::Headers) -> Option<Duration> {
    for h in ["retry-after-ms", "x-ms-retry-after-ms"] {
        if let Some(ms) = headers
            .get_optional_str(&azure_core::headers::HeaderName::from_static(h))
            .and_then(|v| v.trim().parse::<u64>().ok())
        {
            return Some(Duration::from_millis(ms));
        }
    }
    headers
        .get_optional_str(&azure_core::headers::HeaderName::from_static("retry-after"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map(Duration::from_secs)
}

/// The subscription id in an ARM URL path, if any.
fn subscription_of(path: &str) -> String {
    let mut segs = path.split('/');
    while let Some(s) = segs.next() {
        if s.eq_ignore_ascii_case("subscriptions") {
            return segs.next().unwrap_or_default().to_ascii_lowercase();
        }
    }
    String::new()
}

#[async_trait::async_trait]
impl Policy for ArmPolicy {
    async fn send(
        &self,
        ctx: &Context,
        request: &mut Request,
        next: &[Arc<dyn Policy>],
    ) -> PolicyResult {
        let started = Instant::now();
        let write = !matches!(request.method(), Method::Get | Method::Head);
        let subscription = subscription_of(request.url().path());
        let mut attempt = 0u32;
        loop {
            self.acquire(&subscription, write).await;
            self.counters
                .attempts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let mut req = request.clone();
            let outcome = tokio::time::timeout(
                self.manners.attempt_timeout,
                next[0].send(ctx, &mut req, &next[1..]),
            )
            .await;
            // Collect the body here so a connection dropped mid-body is retried too.
            let (wait, last): (Duration, PolicyResult) = match outcome {
                Ok(Ok(resp)) => {
                    let (status, headers, body) = resp.deconstruct();
                    match body.collect().await {
                        Ok(bytes) => {
                            let rebuilt = Response::new(
                                status,
                                headers.clone(),
                                Box::pin(azure_core::BytesStream::new(bytes)),
                            );
                            if status == StatusCode::TooManyRequests {
                                self.counters
                                    .throttled
                                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                let wait =
                                    retry_after(&headers).unwrap_or_else(|| self.backoff(attempt));
                                (wait, Ok(rebuilt))
                            } else if matches!(u16::from(status), 408 | 500 | 502 | 503 | 504) {
                                (self.backoff(attempt), Ok(rebuilt))
                            } else {
                                return Ok(rebuilt);
                            }
                        }
                        Err(e) => (self.backoff(attempt), Err(e)),
                    }
                }
                Ok(Err(e)) => (self.backoff(attempt), Err(e)),
                Err(_) => (
                    self.backoff(attempt),
                    Err(azure_core::Error::message(
                        azure_core::error::ErrorKind::Io,
                        "ARM request timed out",
                    )),
                ),
            };
            if started.elapsed() + wait > self.manners.max_total {
                return last;
            }
            if last
                .as_ref()
                .is_ok_and(|r| r.status() != StatusCode::TooManyRequests)
                || last.is_err()
            {
                self.counters
                    .transient_retries
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            }
            tracing::debug!(attempt, ?wait, "retrying ARM request");
            tokio::time::sleep(wait).await;
            attempt += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_subscription_is_read_from_the_path_case_insensitively() {
        assert_eq!(
            subscription_of("/subscriptions/ABC/resourceGroups/rg"),
            "abc"
        );
        assert_eq!(subscription_of("/tenant/oauth2/v2.0/token"), "");
    }

    #[test]
    fn retry_after_prefers_milliseconds() {
        let mut h = azure_core::headers::Headers::new();
        h.insert("retry-after", "7");
        assert_eq!(retry_after(&h), Some(Duration::from_secs(7)));
        h.insert("retry-after-ms", "120");
        assert_eq!(retry_after(&h), Some(Duration::from_millis(120)));
    }

    #[test]
    fn backoff_grows_jittered_and_capped() {
        let p = ArmPolicy::new(Manners::default());
        for attempt in 0..20 {
            let b = p.backoff(attempt);
            let cap = Duration::from_millis(500)
                .saturating_mul(1 << attempt.min(16))
                .min(Duration::from_secs(30));
            assert!(b >= cap / 2 && b <= cap, "attempt {attempt}: {b:?}");
        }
    }

    #[tokio::test]
    async fn the_token_bucket_holds_the_rate_after_the_burst() {
        let p = ArmPolicy::new(Manners {
            write_burst: 2.0,
            writes_per_second: 20.0,
            ..Manners::default()
        });
        let start = Instant::now();
        for _ in 0..6 {
            p.acquire("s", true).await;
        }
        // 2 from the burst, 4 at 20/s = 200 ms.
        let took = start.elapsed();
        assert!(took >= Duration::from_millis(180), "{took:?}");
        // Reads have their own bucket.
        let start = Instant::now();
        p.acquire("s", false).await;
        assert!(start.elapsed() < Duration::from_millis(20));
    }
}
