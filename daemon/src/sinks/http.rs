//! The HTTP sink: POSTs batches of result records as JSON to the central system.
//!
//! Body (`Content-Type: application/json`, documented in docs/sinks.md):
//! `{"schema_version":1,"batch_key":"<hex>","count":N,"results":[<record v1>, ...]}`.
//! Headers: `Idempotency-Key: pcrd-batch-<hex>` (the SHA-256 of the items'
//! `result_id:version` keys, so the same items give the same key after any number of
//! retries and restarts) and `Authorization: Bearer <token>` when a token is set. Each
//! record keeps its own key (`result_id:version`): a receiver that deduplicates per
//! record is safe even when a retried batch is cut differently.
//!
//! Answers:
//! - 2xx: every item delivered;
//! - 408, 429, 5xx, a timeout or a connection error: every item retried (a
//!   `Retry-After` in seconds or as an HTTP date is passed on to the outbox);
//! - 401, 403, 404, 405, 407, 421: retried too. These speak about the request (a wrong
//!   token, URL or proxy), not about the results; dead-lettering the whole backlog
//!   because a token expired would bury results the operator then has to find again;
//! - any other 4xx: the receiver refused the content. A batch of several items is cut
//!   in halves and each half sent again, down to the single item the receiver refuses,
//!   which is dead-lettered (`rejected`) with the response body (truncated) as detail;
//! - anything else (1xx/3xx after redirects): retried.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pcrd_protocol::upstream::RESULT_SCHEMA_VERSION;
use reqwest::StatusCode;
use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use super::{DeadReason, ItemOutcome, OutboxItem, all_retry};

/// Most of a refusal's body kept as the dead letter's detail.
const DETAIL_LIMIT: usize = 2048;

/// Longest wait a `Retry-After` may ask for (longer ones are cut to this).
const RETRY_AFTER_CAP: Duration = Duration::from_secs(6 * 3600);

/// `[sinks.http]` as written in the config file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHttpConfig {
    /// Where to POST (http:// or https://).
    pub url: Option<String>,
    /// The environment variable holding the bearer token (none: no Authorization).
    pub token_env: Option<String>,
    /// A PEM file of root certificates trusted besides the built-in ones.
    pub ca_file: Option<PathBuf>,
    /// Whole request, e.g. "30s".
    pub timeout: Option<String>,
    /// Most results per request; a larger outbox batch is sent as several requests.
    pub batch_size: Option<usize>,
}

/// A validated `[sinks.http]`.
#[derive(Clone)]
pub struct HttpConfig {
    pub url: reqwest::Url,
    token: Option<String>,
    /// The CA file's certificates (PEM), read when the config is loaded.
    ca_pem: Option<Vec<u8>>,
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub batch_size: usize,
}

impl std::fmt::Debug for HttpConfig {
    // The token stays out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpConfig")
            .field("url", &self.url.as_str())
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .field("batch_size", &self.batch_size)
            .finish()
    }
}

impl HttpConfig {
    /// Validates the raw config; relative paths resolve against `base`, `env` reads
    /// environment variables (secrets). Returns every problem at once.
    pub fn from_raw(
        raw: RawHttpConfig,
        base: &Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<HttpConfig, Vec<String>> {
        let mut problems = Vec::new();
        let url = match raw.url.as_deref() {
            None => {
                problems.push("sinks.http.url: missing (where to POST results)".to_owned());
                None
            }
            Some(text) => match reqwest::Url::parse(text) {
                Ok(url) if matches!(url.scheme(), "http" | "https") => Some(url),
                Ok(url) => {
                    problems.push(format!(
                        "sinks.http.url: {text:?} has scheme {:?}; use http or https",
                        url.scheme()
                    ));
                    None
                }
                Err(e) => {
                    problems.push(format!("sinks.http.url: {text:?} is not a URL: {e}"));
                    None
                }
            },
        };
        let token = match &raw.token_env {
            None => None,
            Some(var) => match env(var) {
                Some(value) if !value.trim().is_empty() => Some(value.trim().to_owned()),
                _ => {
                    problems.push(format!(
                        "sinks.http.token_env: the environment variable {var} is not set or empty"
                    ));
                    None
                }
            },
        };
        if let Some(token) = &token
            && HeaderValue::from_str(&format!("Bearer {token}")).is_err()
        {
            problems.push(format!(
                "sinks.http.token_env: the token in {} holds characters a header cannot carry",
                raw.token_env.as_deref().unwrap_or_default()
            ));
        }
        let ca_file = raw.ca_file.map(|p| base.join(p));
        let ca_pem = match &ca_file {
            None => None,
            Some(path) => match std::fs::read(path) {
                Ok(pem) => match reqwest::Certificate::from_pem_bundle(&pem) {
                    Ok(certs) if !certs.is_empty() => Some(pem),
                    Ok(_) => {
                        problems.push(format!(
                            "sinks.http.ca_file: {} holds no PEM certificate",
                            path.display()
                        ));
                        None
                    }
                    Err(e) => {
                        problems.push(format!(
                            "sinks.http.ca_file: {} is not a PEM certificate file: {e}",
                            path.display()
                        ));
                        None
                    }
                },
                Err(e) => {
                    problems.push(format!(
                        "sinks.http.ca_file: cannot read {}: {e}",
                        path.display()
                    ));
                    None
                }
            },
        };
        let timeout = match raw.timeout.as_deref() {
            None => Duration::from_secs(30),
            Some(text) => match humantime::parse_duration(text) {
                Ok(d) if !d.is_zero() => d,
                _ => {
                    problems.push(format!(
                        "sinks.http.timeout: {text:?} is not a duration above 0 like \"30s\""
                    ));
                    Duration::from_secs(30)
                }
            },
        };
        let batch_size = raw.batch_size.unwrap_or(1000);
        if batch_size == 0 {
            problems.push("sinks.http.batch_size: must be at least 1".to_owned());
        }
        match url {
            Some(url) if problems.is_empty() => Ok(HttpConfig {
                url,
                token,
                ca_pem,
                ca_file,
                timeout,
                batch_size,
            }),
            _ => Err(problems),
        }
    }
}

/// The HTTP sink: a connection-pooling client.
#[derive(Debug)]
pub struct HttpSink {
    config: HttpConfig,
    client: reqwest::Client,
}

/// What one request came to.
enum Answer {
    Delivered,
    Retry {
        reason: String,
        after: Option<Duration>,
    },
    /// The receiver refused the content: cut the batch down to the refused item.
    Refused {
        status: StatusCode,
        body: String,
    },
}

impl HttpSink {
    /// Builds the client (TLS roots included); connects at the first delivery.
    pub fn new(config: &HttpConfig) -> Result<HttpSink, String> {
        let mut builder = reqwest::Client::builder()
            .use_rustls_tls()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            .user_agent(concat!("pcrd/", env!("CARGO_PKG_VERSION")));
        if let Some(pem) = &config.ca_pem {
            let certs = reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| format!("sinks.http.ca_file: {e}"))?;
            for cert in certs {
                builder = builder.add_root_certificate(cert);
            }
        }
        let client = builder
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(HttpSink {
            config: config.clone(),
            client,
        })
    }

    /// Delivers `items` in requests of at most `batch_size`, in order; after the
    /// first request that must be retried the rest are not sent.
    pub async fn deliver(&mut self, items: &[OutboxItem]) -> Vec<ItemOutcome> {
        let mut outcomes = Vec::with_capacity(items.len());
        let mut chunks = items.chunks(self.config.batch_size.max(1));
        for chunk in chunks.by_ref() {
            let before = outcomes.len();
            self.deliver_chunk(chunk, &mut outcomes).await;
            if let Some((reason, after)) = first_retry(&outcomes[before..]) {
                for rest in chunks.by_ref() {
                    outcomes.extend(all_retry(rest, &reason, after));
                }
                break;
            }
        }
        outcomes
    }

    /// Sends `chunk`; on a refusal, halves it until the refused items are alone.
    async fn deliver_chunk(&self, chunk: &[OutboxItem], outcomes: &mut Vec<ItemOutcome>) {
        // An explicit stack instead of recursion (async recursion needs boxing).
        let mut pending: Vec<&[OutboxItem]> = vec![chunk];
        while let Some(part) = pending.pop() {
            match self.post(part).await {
                Answer::Delivered => {
                    outcomes.extend(std::iter::repeat_n(ItemOutcome::Delivered, part.len()));
                }
                Answer::Retry { reason, after } => {
                    tracing::warn!(sink = "http", url = %self.config.url, %reason,
                        items = part.len(), "delivery will be retried");
                    outcomes.extend(all_retry(part, &reason, after));
                    for rest in pending.drain(..).rev() {
                        outcomes.extend(all_retry(rest, &reason, after));
                    }
                    return;
                }
                Answer::Refused { status, body } if part.len() == 1 => {
                    tracing::warn!(sink = "http", key = %part[0].record.idempotency_key(),
                        %status, "the receiver refused the result");
                    outcomes.push(ItemOutcome::Dead {
                        reason: DeadReason::Rejected,
                        detail: format!("HTTP {status}: {body}"),
                    });
                }
                Answer::Refused { .. } => {
                    let (left, right) = part.split_at(part.len() / 2);
                    pending.push(right);
                    pending.push(left);
                }
            }
        }
    }

    async fn post(&self, items: &[OutboxItem]) -> Answer {
        let (key, body) = batch_body(items);
        let mut request = self
            .client
            .post(self.config.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("Idempotency-Key", format!("pcrd-batch-{key}"))
            .body(body);
        if let Some(token) = &self.config.token {
            request = request.header(AUTHORIZATION, format!("Bearer {token}"));
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                let what = if e.is_timeout() {
                    "timed out"
                } else if e.is_connect() {
                    "cannot connect"
                } else {
                    "request failed"
                };
                return Answer::Retry {
                    reason: format!("{what}: POST {}: {}", self.config.url, error_chain(&e)),
                    after: None,
                };
            }
        };
        let status = response.status();
        if status.is_success() {
            // The body is not needed, but reading it lets the connection be reused.
            let _ = response.bytes().await;
            return Answer::Delivered;
        }
        let after = response
            .headers()
            .get(RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let body = match response.bytes().await {
            Ok(bytes) => truncate(&String::from_utf8_lossy(&bytes), DETAIL_LIMIT),
            Err(e) => format!("(body unreadable: {e})"),
        };
        let retry_status = matches!(
            status.as_u16(),
            408 | 429 | 401 | 403 | 404 | 405 | 407 | 421
        ) || !status.is_client_error();
        if retry_status {
            Answer::Retry {
                reason: format!("HTTP {status} from {}: {body}", self.config.url),
                after,
            }
        } else {
            Answer::Refused { status, body }
        }
    }
}

fn first_retry(outcomes: &[ItemOutcome]) -> Option<(String, Option<Duration>)> {
    outcomes.iter().find_map(|o| match o {
        ItemOutcome::Retry { reason, after } => Some((reason.clone(), *after)),
        _ => None,
    })
}

/// The batch key (hex SHA-256 of the items' keys, one per line) and the JSON body.
pub fn batch_body(items: &[OutboxItem]) -> (String, Vec<u8>) {
    let mut hasher = Sha256::new();
    for item in items {
        hasher.update(item.record.idempotency_key().as_bytes());
        hasher.update(b"\n");
    }
    let key = hex::encode(hasher.finalize());
    let mut body = Vec::with_capacity(items.len() * 700 + 128);
    body.extend_from_slice(
        format!(
            "{{\"schema_version\":{RESULT_SCHEMA_VERSION},\"batch_key\":\"{key}\",\"count\":{},\"results\":[",
            items.len()
        )
        .as_bytes(),
    );
    for (index, item) in items.iter().enumerate() {
        if index > 0 {
            body.push(b',');
        }
        // Serialising a plain struct of strings and numbers cannot fail; a Ct that is
        // not finite would, and is written as null by serde_json instead.
        let _ = serde_json::to_writer(&mut body, &item.record);
    }
    body.extend_from_slice(b"]}");
    (key, body)
}

/// `Retry-After` as seconds or an HTTP date, capped; `None` when unreadable.
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => {
            let at = httpdate::parse_http_date(value).ok()?;
            at.duration_since(now).unwrap_or(Duration::ZERO)
        }
    };
    Some(wait.min(RETRY_AFTER_CAP))
}

fn truncate(text: &str, limit: usize) -> String {
    if text.len() <= limit {
        return text.to_owned();
    }
    let mut end = limit;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes in all)", &text[..end], text.len())
}

/// reqwest's error with its causes (the TLS or socket error is in the chain).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_in_seconds_and_as_a_date() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_784_000_000);
        assert_eq!(parse_retry_after("7", now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(90));
        assert_eq!(
            parse_retry_after(&later, now),
            Some(Duration::from_secs(90))
        );
        let earlier = httpdate::fmt_http_date(now - Duration::from_secs(90));
        assert_eq!(parse_retry_after(&earlier, now), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("999999999", now), Some(RETRY_AFTER_CAP));
        assert_eq!(parse_retry_after("soon", now), None);
    }

    proptest::proptest! {
        #[test]
        fn retry_after_never_panics_and_never_exceeds_the_cap(value in ".{0,64}") {
            if let Some(wait) = parse_retry_after(&value, SystemTime::now()) {
                proptest::prop_assert!(wait <= RETRY_AFTER_CAP);
            }
        }

        #[test]
        fn truncation_never_panics_and_keeps_a_prefix(text in "\\PC{0,300}", limit in 0usize..400) {
            let cut = truncate(&text, limit);
            let kept = cut.split("... (").next().unwrap_or_default();
            proptest::prop_assert!(text.starts_with(kept));
            proptest::prop_assert!(kept.len() <= limit.max(text.len().min(limit)));
        }
    }

    #[test]
    fn truncation_keeps_char_boundaries() {
        let long = "é".repeat(2000);
        let cut = truncate(&long, 5);
        assert!(cut.starts_with("éé..."), "{cut}");
        assert_eq!(truncate("short", 10), "short");
    }

    #[test]
    fn config_reports_every_problem() {
        let raw = RawHttpConfig {
            url: Some("ftp://example.org/".into()),
            token_env: Some("PCRD_TEST_TOKEN".into()),
            ca_file: Some("no/such/ca.pem".into()),
            timeout: Some("0s".into()),
            batch_size: Some(0),
        };
        let problems =
            HttpConfig::from_raw(raw, Path::new("/nonexistent"), &|_| None).expect_err("bad");
        assert_eq!(problems.len(), 5, "{problems:?}");
        let ok = HttpConfig::from_raw(
            RawHttpConfig {
                url: Some("https://central.example/results".into()),
                token_env: Some("T".into()),
                ..Default::default()
            },
            Path::new("."),
            &|_| Some("s3cret".into()),
        )
        .expect("valid");
        assert!(!format!("{ok:?}").contains("s3cret"));
        assert!(HttpSink::new(&ok).is_ok());
    }
}
