//! Secret values of cloud credentials: [`SecretString`] never shows its value in `Debug` or
//! `Display`, so no log or error can quote it by accident.

use std::fmt;
use std::sync::{Mutex, OnceLock};

fn registry() -> &'static Mutex<Vec<String>> {
    static SECRETS: OnceLock<Mutex<Vec<String>>> = OnceLock::new();
    SECRETS.get_or_init(Mutex::default)
}

/// Every secret value wrapped in a [`SecretString`] so far in this process: the log writer
/// cuts them from every line, whatever printed them (a dependency's debug dump of a
/// request included).
pub(crate) fn known_secrets() -> Vec<String> {
    registry().lock().map(|v| v.clone()).unwrap_or_default()
}

/// A secret value. `Debug`/`Display` print `<redacted>`; read it with [`SecretString::expose`].
#[derive(Clone, PartialEq, Eq)]
pub struct SecretString(String);

impl SecretString {
    /// Wraps a secret (and remembers it for the log redaction, see [`known_secrets`]).
    pub fn new(s: impl Into<String>) -> Self {
        let s = s.into();
        if !s.trim().is_empty()
            && let Ok(mut v) = registry().lock()
            && !v.contains(&s)
        {
            v.push(s.clone());
        }
        Self(s)
    }

    /// The secret itself, for the one place that must send it.
    pub(crate) fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}

impl fmt::Display for SecretString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("<redacted>")
    }
}
