//! Every log line passes through [`redact`] before it is written, at any level: the Azure
//! SDK's debug request log prints whole requests (the `Authorization` header, a token
//! request's form body), and a dependency's trace output is not ours to word. Redacted:
//!
//! - every value wrapped in a [`SecretString`](crate::cloud::SecretString) (client secrets,
//!   storage keys), verbatim or URL-encoded;
//! - bearer tokens (`Bearer …`), `SharedKey account:signature` and `SharedAccessSignature`
//!   authorisations;
//! - form and query fields that carry secrets (`client_secret=`, `client_assertion=`,
//!   `access_token=`, the SAS `sig=`), and JSON fields `access_token`, `refresh_token`,
//!   `client_secret`, `id_token`;
//! - base64 runs of 88 characters (a 512-bit Azure storage account key).

use std::borrow::Cow;
use std::io::Write;

use tracing_subscriber::fmt::MakeWriter;

/// What replaces a secret.
pub(crate) const REDACTED: &str = "[redacted]";

const FIELD_PREFIXES: [&str; 5] = [
    "client_secret=",
    "client_assertion=",
    "access_token=",
    "refresh_token=",
    "sig=",
];
const JSON_FIELDS: [&str; 4] = ["access_token", "refresh_token", "client_secret", "id_token"];
const AUTH_SCHEMES: [&str; 3] = ["bearer ", "sharedkey ", "sharedaccesssignature "];

fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.' | b'~' | b'+' | b'/' | b'=' | b'%')
}

/// `line` with every secret this module recognises replaced by [`REDACTED`].
pub(crate) fn redact(line: &str) -> Cow<'_, str> {
    let mut out = Cow::Borrowed(line);
    for secret in crate::cloud::secret::known_secrets() {
        if secret.len() < 4 {
            continue;
        }
        let encoded: String = url::form_urlencoded::byte_serialize(secret.as_bytes()).collect();
        for form in [secret.as_str(), encoded.as_str()] {
            if out.contains(form) {
                out = Cow::Owned(out.replace(form, REDACTED));
            }
        }
    }
    let lower = out.to_ascii_lowercase();
    let bytes = out.as_bytes();
    // (start, end) byte ranges to replace, in order.
    let mut cuts: Vec<(usize, usize)> = Vec::new();
    let value_after = |from: usize| -> usize {
        let mut end = from;
        while end < bytes.len() && is_token_char(bytes[end]) {
            end += 1;
        }
        end
    };
    for scheme in AUTH_SCHEMES {
        for (i, _) in lower.match_indices(scheme) {
            let start = i + scheme.len();
            let end = value_after(start);
            // `SharedKey account:signature`: the signature follows the colon.
            let end = if bytes.get(end) == Some(&b':') {
                value_after(end + 1)
            } else {
                end
            };
            if end > start {
                cuts.push((start, end));
            }
        }
    }
    for prefix in FIELD_PREFIXES {
        for (i, _) in lower.match_indices(prefix) {
            // A field name, not the tail of another word (`xsig=`).
            if i > 0 && bytes[i - 1].is_ascii_alphanumeric() {
                continue;
            }
            let start = i + prefix.len();
            let end = value_after(start);
            if end > start {
                cuts.push((start, end));
            }
        }
    }
    for field in JSON_FIELDS {
        for (i, _) in lower.match_indices(field) {
            // `"access_token": "value"` or `access_token: "value"` (Debug of a struct).
            let mut j = i + field.len();
            while j < bytes.len() && matches!(bytes[j], b'"' | b'\\' | b' ' | b':') {
                j += 1;
            }
            let end = value_after(j);
            if end > j && j > i + field.len() {
                cuts.push((j, end));
            }
        }
    }
    // Storage account keys: 64 random bytes, base64 (88 characters ending in `==`).
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'+' | b'/') {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_alphanumeric() || matches!(bytes[i], b'+' | b'/' | b'='))
            {
                i += 1;
            }
            if i - start == 88 && out[start..i].ends_with("==") {
                cuts.push((start, i));
            }
        } else {
            i += 1;
        }
    }
    if cuts.is_empty() {
        return out;
    }
    cuts.sort_unstable();
    let mut s = String::with_capacity(out.len());
    let mut at = 0;
    for (start, end) in cuts {
        if start < at {
            // Overlaps a range already cut.
            at = at.max(end);
            continue;
        }
        s.push_str(&out[at..start]);
        s.push_str(REDACTED);
        at = end;
    }
    s.push_str(&out[at.min(out.len())..]);
    Cow::Owned(s)
}

/// A [`MakeWriter`] whose writers redact each write (the formatter writes one whole event
/// per call) before it reaches `inner`.
#[derive(Clone, Debug)]
pub(crate) struct RedactingMakeWriter<M>(pub(crate) M);

impl<'a, M: MakeWriter<'a>> MakeWriter<'a> for RedactingMakeWriter<M> {
    type Writer = RedactingWriter<M::Writer>;

    fn make_writer(&'a self) -> Self::Writer {
        RedactingWriter(self.0.make_writer())
    }
}

/// See [`RedactingMakeWriter`].
#[derive(Debug)]
pub(crate) struct RedactingWriter<W>(W);

impl<W: Write> Write for RedactingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let text = String::from_utf8_lossy(buf);
        self.0.write_all(redact(&text).as_bytes())?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_secrets_signatures_and_keys_are_cut_from_a_line() {
        let key = "A".repeat(86) + "==";
        let canary = crate::cloud::SecretString::new("CanaryRedact-7f3e9a");
        let lines = [
            "headers: {\"authorization\": \"Bearer eyJ0eXAi.eyJhdWQi.c2lnbmF0dXJl\"}".to_string(),
            "HeaderValue(\"Bearer abc.def-ghi\")".to_string(),
            "body: b\"grant_type=client_credentials&client_id=x&client_secret=hunter2%21&scope=s\""
                .to_string(),
            "url: https://acct.blob.core.windows.net/c/b?sv=2021&sig=AbC%2Bd%3D&se=x".to_string(),
            "{\"token_type\":\"Bearer\",\"access_token\":\"eyJ.payload.sig\"}".to_string(),
            "Authorization: SharedKey acct:c2lnbmF0dXJlCg==".to_string(),
            format!("{{\"keys\":[{{\"keyName\":\"key1\",\"value\":\"{key}\"}}]}}"),
            format!(
                "secret is {} and {}",
                canary.expose(),
                "CanaryRedact-7f3e9a"
            ),
        ];
        for (line, gone) in lines.iter().zip([
            "eyJ0eXAi",
            "abc.def",
            "hunter2",
            "AbC%2Bd",
            "eyJ.payload",
            "c2lnbmF0dXJlCg",
            key.as_str(),
            "CanaryRedact",
        ]) {
            let r = redact(line);
            assert!(!r.contains(gone), "{line} -> {r}");
            assert!(r.contains(REDACTED), "{line} -> {r}");
        }
        // Ordinary lines are untouched.
        for line in [
            "VM podvm-web-1234abcd created in 3.2 s (Succeeded)",
            "GET /subscriptions/s/resourceGroups/rg?api-version=2024-07-01 200",
            "token_type=Bearer",
        ] {
            assert_eq!(redact(line), line);
        }
    }

    #[test]
    fn the_writer_redacts_what_the_formatter_writes() {
        let mut out = Vec::new();
        {
            let mut w = RedactingWriter(&mut out);
            w.write_all(b"authorization: Bearer sekrit-token-value\n")
                .unwrap();
        }
        let s = String::from_utf8(out).unwrap();
        assert_eq!(s, "authorization: Bearer [redacted]\n");
    }
}
