//! What keeps credentials out of a support bundle. Every byte written into a bundle passes
//! through [`Redactor`]:
//!
//! - Secrets keep their keys and the size of each value, never a value (and no
//!   `last-applied-configuration`, which would repeat them);
//! - every value of a Secret the bundle could read is learnt and replaced wherever it shows
//!   up (plain, base64 or URL-encoded): in a ConfigMap, an annotation, a log line;
//! - ConfigMap values and environment variables whose name says credential (`*SECRET*`,
//!   `*PASSWORD*`, `*TOKEN*`, `*ACCOUNT_KEY*`, `*SAS*`, ...) are replaced whole;
//! - in every text (values, log lines, Events): PEM private keys (RSA, EC, PKCS#8,
//!   OpenSSH), `Bearer`/`Basic`/`SharedKey`/`SharedAccessSignature` authorisations, JWTs,
//!   `key=value` and `"key": "value"` pairs whose key says credential (`client_secret=`,
//!   `AccountKey=`, `"access_token":`), SAS signatures (`sig=`), and 88-character base64
//!   runs (a 512-bit storage account key).

use std::borrow::Cow;
use std::sync::LazyLock;

use base64::Engine;
use regex::{Captures, Regex};
use serde_json::Value;

/// What replaces a secret.
pub(crate) const REDACTED: &str = "[REDACTED]";

/// Values shorter than this are not learnt (they would blank out ordinary words).
const MIN_LEARNT: usize = 8;

static PEM_PRIVATE_KEY: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?s)-----BEGIN ([A-Z0-9 ]*)PRIVATE KEY-----.*?(?:-----END [A-Z0-9 ]*PRIVATE KEY-----|\z)",
    )
    .expect("PEM regex")
});
static AUTH_SCHEME: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)\b(bearer|basic|sharedkey|sharedkeylite|sharedaccesssignature)(\s+|%20)[A-Za-z0-9\-._~+/=%:]+")
        .expect("auth regex")
});
static JWT: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\beyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*").expect("JWT regex")
});
static SAS_SIG: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"(?i)\b(sig=)[A-Za-z0-9%+/=_-]+").expect("SAS regex"));
static STORAGE_KEY: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"[A-Za-z0-9+/]{86}==").expect("storage key regex"));
/// `name<sep>value` where the name says credential; the value quoted or bare.
static NAMED: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r#"(?i)(["']?)([A-Za-z0-9_.\-]*(?:secret|password|passwd|token|apikey|api_key|accountkey|account_key|access_key|accesskey|sharedaccesskey|private_key|privatekey|client_assertion|connectionstring|connection_string)[A-Za-z0-9_.\-]*)(["']?)(\s*[:=]\s*)(?:"([^"]*)"|'([^']*)'|([^\s"',;&}\]]+))"#,
    )
    .expect("named credential regex")
});

/// Whether a name (ConfigMap key, environment variable, header) says its value is a
/// credential.
pub(crate) fn credential_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let compact: String = lower
        .chars()
        .filter(|c| c.is_ascii_alphanumeric())
        .collect();
    const PARTS: [&str; 14] = [
        "secret",
        "password",
        "passwd",
        "token",
        "apikey",
        "accountkey",
        "accesskey",
        "sharedkey",
        "privatekey",
        "credential",
        "connectionstring",
        "clientassertion",
        "sshkey",
        "idrsa",
    ];
    if PARTS.iter().any(|p| compact.contains(p)) {
        // A public key is not a credential.
        return !(compact.contains("publickey") || compact.ends_with("pub"));
    }
    lower
        .split(|c: char| !c.is_ascii_alphanumeric())
        .any(|w| matches!(w, "sas" | "sig" | "pwd" | "pat"))
}

/// The redaction of one bundle: the patterns, and the Secret values it learnt.
#[derive(Debug, Default)]
pub(crate) struct Redactor {
    /// Learnt values and their encoded forms, longest first.
    known: Vec<String>,
}

impl Redactor {
    /// A redactor that knows no value yet.
    pub(crate) fn new() -> Self {
        Self::default()
    }

    /// Learns a secret value: it is replaced wherever it appears, as is its base64 and URL
    /// encoding. Multi-line values are learnt line by line too.
    pub(crate) fn learn(&mut self, value: &str) {
        let mut forms = vec![value.trim().to_string()];
        forms.extend(value.lines().map(|l| l.trim().to_string()));
        let mut all = Vec::new();
        for f in forms {
            if f.len() < MIN_LEARNT {
                continue;
            }
            all.push(base64::engine::general_purpose::STANDARD.encode(f.as_bytes()));
            all.push(url::form_urlencoded::byte_serialize(f.as_bytes()).collect());
            all.push(f);
        }
        for f in all {
            if f.len() >= MIN_LEARNT && !self.known.contains(&f) {
                self.known.push(f);
            }
        }
        self.known.sort_by_key(|k| std::cmp::Reverse(k.len()));
    }

    /// `text` with every secret this redactor recognises replaced.
    pub(crate) fn text<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for k in &self.known {
            if out.contains(k.as_str()) {
                out = Cow::Owned(out.replace(k.as_str(), REDACTED));
            }
        }
        let replace = |out: Cow<'a, str>, re: &Regex, with: &dyn Fn(&Captures) -> String| {
            if re.is_match(&out) {
                Cow::Owned(re.replace_all(&out, |c: &Captures| with(c)).into_owned())
            } else {
                out
            }
        };
        let out = replace(out, &PEM_PRIVATE_KEY, &|c| {
            format!(
                "-----BEGIN {0}PRIVATE KEY-----{REDACTED}-----END {0}PRIVATE KEY-----",
                &c[1]
            )
        });
        let out = replace(out, &AUTH_SCHEME, &|c| {
            format!("{}{}{REDACTED}", &c[1], &c[2])
        });
        let out = replace(out, &JWT, &|_| REDACTED.to_string());
        let out = replace(out, &SAS_SIG, &|c| format!("{}{REDACTED}", &c[1]));
        let out = replace(out, &NAMED, &|c| {
            let (q1, name, q2, sep) = (&c[1], &c[2], &c[3], &c[4]);
            let value = c
                .get(5)
                .or(c.get(6))
                .or(c.get(7))
                .map_or("", |m| m.as_str());
            let quote = if c.get(5).is_some() {
                "\""
            } else if c.get(6).is_some() {
                "'"
            } else {
                ""
            };
            // Names of credentials (`secretName: peer-pods-secret`), references and
            // already redacted values stay.
            let keep = value.is_empty()
                || value == REDACTED
                || value.starts_with('[')
                || name.to_ascii_lowercase().ends_with("name")
                || name.to_ascii_lowercase().ends_with("ref")
                || name.to_ascii_lowercase().ends_with("file")
                || name.to_ascii_lowercase().ends_with("path");
            let value = if keep { value } else { REDACTED };
            format!("{q1}{name}{q2}{sep}{quote}{value}{quote}")
        });
        replace(out, &STORAGE_KEY, &|_| REDACTED.to_string())
    }

    /// Redacts a Kubernetes object (as JSON) in place: Secret values, credential-named
    /// ConfigMap values and environment variables, `last-applied-configuration` of Secrets,
    /// managed fields, and every string through [`Redactor::text`].
    pub(crate) fn object(&self, obj: &mut Value) {
        let kind = obj
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if let Some(meta) = obj.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
            if kind == "Secret"
                && let Some(a) = meta.get_mut("annotations").and_then(Value::as_object_mut)
                && let Some(v) = a.get_mut("kubectl.kubernetes.io/last-applied-configuration")
            {
                *v = Value::String(REDACTED.into());
            }
        }
        match kind.as_str() {
            "Secret" => {
                for field in ["data", "stringData"] {
                    if let Some(m) = obj.get_mut(field).and_then(Value::as_object_mut) {
                        for v in m.values_mut() {
                            let n = v.as_str().map_or(0, |s| {
                                if field == "data" {
                                    base64::engine::general_purpose::STANDARD
                                        .decode(s)
                                        .map_or(s.len(), |b| b.len())
                                } else {
                                    s.len()
                                }
                            });
                            *v = Value::String(format!("{REDACTED} ({n} bytes)"));
                        }
                    }
                }
            }
            "ConfigMap" => {
                if let Some(m) = obj.get_mut("data").and_then(Value::as_object_mut) {
                    for (k, v) in m.iter_mut() {
                        if credential_name(k) && v.as_str().is_some_and(|s| !s.is_empty()) {
                            *v = Value::String(REDACTED.into());
                        }
                    }
                }
                if let Some(m) = obj.get_mut("binaryData").and_then(Value::as_object_mut) {
                    for v in m.values_mut() {
                        *v = Value::String(REDACTED.into());
                    }
                }
            }
            _ => {}
        }
        self.walk(obj);
    }

    fn walk(&self, v: &mut Value) {
        match v {
            Value::String(s) => {
                if let Cow::Owned(o) = self.text(s) {
                    *s = o;
                }
            }
            Value::Array(a) => a.iter_mut().for_each(|x| self.walk(x)),
            Value::Object(m) => {
                // An environment variable (`{name, value}`) named like a credential.
                let named_credential = m
                    .get("name")
                    .and_then(Value::as_str)
                    .is_some_and(credential_name);
                if named_credential
                    && let Some(val) = m.get_mut("value")
                    && val.as_str().is_some_and(|s| !s.is_empty())
                {
                    *val = Value::String(REDACTED.into());
                }
                m.values_mut().for_each(|x| self.walk(x));
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const CANARY: &str = "c4n4ry-S3cret-Value~42";

    fn r() -> Redactor {
        let mut r = Redactor::new();
        r.learn(CANARY);
        r
    }

    fn clean(r: &Redactor, text: &str) -> String {
        let out = r.text(text).into_owned();
        assert!(!out.contains(CANARY), "{out}");
        out
    }

    #[test]
    fn learnt_secret_values_are_replaced_in_any_encoding() {
        let r = r();
        let b64 = base64::engine::general_purpose::STANDARD.encode(CANARY);
        let url: String = url::form_urlencoded::byte_serialize(CANARY.as_bytes()).collect();
        for text in [
            format!("retrying with {CANARY} now"),
            format!("data: {b64}"),
            format!("client_secret={url}&grant_type=client_credentials"),
        ] {
            let out = clean(&r, &text);
            assert!(out.contains(REDACTED), "{out}");
            assert!(!out.contains(&b64) && !out.contains(&url), "{out}");
        }
        // Short values are not learnt (they would blank out words).
        let mut short = Redactor::new();
        short.learn("true");
        assert_eq!(short.text("true story"), "true story");
    }

    #[test]
    fn log_lines_lose_tokens_keys_signatures_and_private_keys() {
        let r = Redactor::new();
        let jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW0ifQ.c2lnbmF0dXJl";
        let storage_key = format!("{}==", "A".repeat(86));
        let cases: Vec<(String, &str)> = vec![
            (
                "GET /subscriptions/x Authorization: Bearer abc.def-ghi".into(),
                "abc.def-ghi",
            ),
            (format!("token {jwt} expired"), "c2lnbmF0dXJl"),
            (
                "PUT https://acct.blob.core.windows.net/c/d.vhd?sv=2021&se=2030&sig=Zm9vYmFy%2Bsig%3D".into(),
                "Zm9vYmFy",
            ),
            (format!("AccountKey={storage_key};EndpointSuffix=core"), "AAAAAAAA"),
            (format!("key {storage_key}"), "AAAAAAAA"),
            ("Authorization: SharedKey acct:c2lnbmF0dXJl".into(), "c2lnbmF0dXJl"),
            (r#"{"access_token":"tok-123456","expires_in":3599}"#.into(), "tok-123456"),
            ("AZURE_CLIENT_SECRET=hunter2hunter2 next".into(), "hunter2"),
            ("password: 'p a s s'".into(), "p a s s"),
            (
                "key:\n-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXk=\n-----END OPENSSH PRIVATE KEY-----\n".into(),
                "b3BlbnNzaC1rZXk",
            ),
            (
                "-----BEGIN RSA PRIVATE KEY-----\\nMIIEow\\n-----END RSA PRIVATE KEY-----".into(),
                "MIIEow",
            ),
            ("-----BEGIN PRIVATE KEY-----\nMIIEvQ truncated".into(), "MIIEvQ"),
        ];
        for (text, secret) in cases {
            let out = r.text(&text);
            assert!(!out.contains(secret), "{text:?} -> {out:?}");
            assert!(out.contains(REDACTED), "{text:?} -> {out:?}");
        }
        // Ordinary lines and references by name stay readable.
        for text in [
            "VM podvm-web-1a2b3c4d running (Standard_B2als_v2)",
            "secretName: peer-pods-secret",
            "reading secret peer-pods-secret",
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----",
        ] {
            assert_eq!(r.text(text), text);
        }
    }

    #[test]
    fn secrets_keep_keys_and_sizes_but_no_value() {
        let r = r();
        let b64 = base64::engine::general_purpose::STANDARD.encode(CANARY);
        let mut secret = json!({
            "kind": "Secret",
            "metadata": {"name": "peer-pods-secret", "annotations": {
                "kubectl.kubernetes.io/last-applied-configuration": format!("{{\"data\":{{\"k\":\"{b64}\"}}}}")
            }, "managedFields": [{"manager": "kubectl"}]},
            "data": {"AZURE_CLIENT_SECRET": b64, "AZURE_CLIENT_ID": "YWJj"},
        });
        r.object(&mut secret);
        let text = secret.to_string();
        assert!(!text.contains(CANARY) && !text.contains(&b64), "{text}");
        assert_eq!(
            secret["data"]["AZURE_CLIENT_SECRET"],
            format!("{REDACTED} ({} bytes)", CANARY.len())
        );
        assert_eq!(
            secret["data"]["AZURE_CLIENT_ID"],
            format!("{REDACTED} (3 bytes)")
        );
        assert!(secret["metadata"].get("managedFields").is_none());
    }

    #[test]
    fn configmaps_and_env_lose_credential_looking_values_and_keep_the_rest() {
        let r = Redactor::new();
        let mut cm = json!({
            "kind": "ConfigMap",
            "data": {
                "AZURE_CLIENT_SECRET": "plain-secret-in-a-configmap",
                "STORAGE_ACCOUNT_KEY": "k3y",
                "connection": "DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abcDEF123==;EndpointSuffix=x",
                "AZURE_REGION": "eastus",
                "ssh.pub": "ssh-ed25519 AAAAC3 user",
            },
            "binaryData": {"blob": "AAEC"},
        });
        r.object(&mut cm);
        assert_eq!(cm["data"]["AZURE_CLIENT_SECRET"], REDACTED);
        assert_eq!(cm["data"]["STORAGE_ACCOUNT_KEY"], REDACTED);
        assert!(
            !cm["data"]["connection"]
                .as_str()
                .unwrap()
                .contains("abcDEF123")
        );
        assert_eq!(cm["data"]["AZURE_REGION"], "eastus");
        assert_eq!(cm["data"]["ssh.pub"], "ssh-ed25519 AAAAC3 user");
        assert_eq!(cm["binaryData"]["blob"], REDACTED);

        let mut pod = json!({"kind": "Pod", "spec": {"containers": [{"env": [
            {"name": "DB_PASSWORD", "value": "pw-value"},
            {"name": "MODE", "value": "fast"},
            {"name": "API_TOKEN", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}},
        ]}]}});
        r.object(&mut pod);
        let env = &pod["spec"]["containers"][0]["env"];
        assert_eq!(env[0]["value"], REDACTED);
        assert_eq!(env[1]["value"], "fast");
        assert_eq!(env[2]["valueFrom"]["secretKeyRef"]["name"], "s");
    }

    #[test]
    fn credential_names_are_recognised_without_public_keys_and_sizes() {
        for n in [
            "AZURE_CLIENT_SECRET",
            "client_secret",
            "password",
            "STORAGE_ACCOUNT_KEY",
            "AccessKey",
            "sas",
            "BLOB_SAS",
            "id_rsa",
            "apiToken",
        ] {
            assert!(credential_name(n), "{n}");
        }
        for n in [
            "AZURE_INSTANCE_SIZES",
            "id_rsa.pub",
            "SSH_PUBLIC_KEY",
            "AZURE_REGION",
            "VXLAN_PORT",
            "design",
        ] {
            assert!(!credential_name(n), "{n}");
        }
    }
}
