//! `sandboxd ctl azure secret`: writes `peer-pods-secret` (the seed's step 1) from flags,
//! `AZURE_*` environment variables and, for the client secret, a prompt that does not echo.
//! The client secret is never printed, logged or put into an error.

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal, Write};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::api::{Api, ObjectMeta, Patch, PatchParams};

use super::Ctx;
use crate::api::names::CLOUD_SECRET;
use crate::config::CloudSecret;
use crate::k8s::FIELD_MANAGER;
use crate::k8s::apply::is_not_found;

/// The environment variable (and secret key) of the client secret.
pub(crate) const CLIENT_SECRET: &str = "AZURE_CLIENT_SECRET";

/// Errors of this command.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Required values are missing.
    #[error("missing {}", .0.join(", "))]
    Missing(Vec<String>),
    /// The values do not validate.
    #[error(transparent)]
    Invalid(#[from] crate::config::Error),
    /// Reading the prompt failed.
    #[error("reading {CLIENT_SECRET}: {0}")]
    Prompt(#[source] std::io::Error),
    /// The namespace does not exist.
    #[error(
        "namespace {0} does not exist: install sandboxd first (`sandboxd ctl install`) or pass -n"
    )]
    NoNamespace(String),
    /// The API server refused.
    #[error("writing Secret {CLOUD_SECRET}: {0}")]
    Api(#[source] kube::Error),
}

/// Flags of `ctl azure secret`. The client secret has no flag (a flag would land in shell
/// history and the process list): set `AZURE_CLIENT_SECRET` or type it at the prompt.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// The service principal's application (client) id.
    #[arg(long, env = "AZURE_CLIENT_ID")]
    pub(crate) client_id: Option<String>,
    /// The tenant id.
    #[arg(long, env = "AZURE_TENANT_ID")]
    pub(crate) tenant_id: Option<String>,
    /// The subscription id.
    #[arg(long, env = "AZURE_SUBSCRIPTION_ID")]
    pub(crate) subscription_id: Option<String>,
}

/// The secret's keys from the flags, before the client secret is asked for.
fn collect(args: &Args) -> Result<BTreeMap<String, String>, Error> {
    let mut map = BTreeMap::new();
    let mut missing = Vec::new();
    for (key, flag, value) in [
        ("AZURE_CLIENT_ID", "--client-id", &args.client_id),
        ("AZURE_TENANT_ID", "--tenant-id", &args.tenant_id),
        (
            "AZURE_SUBSCRIPTION_ID",
            "--subscription-id",
            &args.subscription_id,
        ),
    ] {
        match value.as_deref().map(str::trim) {
            Some(v) if !v.is_empty() => {
                map.insert(key.to_string(), v.to_string());
            }
            _ => missing.push(format!("{key} (pass {flag} or set {key})")),
        }
    }
    if missing.is_empty() {
        Ok(map)
    } else {
        Err(Error::Missing(missing))
    }
}

/// Reads the client secret: from the terminal without echo, or one line of stdin.
fn read_client_secret() -> Result<String, Error> {
    let stdin = std::io::stdin();
    let mut line = String::new();
    if stdin.is_terminal() {
        use nix::sys::termios::{LocalFlags, SetArg, tcgetattr, tcsetattr};
        // Echo goes off before the prompt shows, so nothing typed early is echoed.
        let saved = tcgetattr(&stdin).map_err(|e| Error::Prompt(e.into()))?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO);
        quiet.local_flags.insert(LocalFlags::ECHONL);
        tcsetattr(&stdin, SetArg::TCSANOW, &quiet).map_err(|e| Error::Prompt(e.into()))?;
        let mut stderr = std::io::stderr();
        let _ = write!(stderr, "{CLIENT_SECRET} (not echoed): ");
        let _ = stderr.flush();
        let read = stdin.lock().read_line(&mut line);
        let restored = tcsetattr(&stdin, SetArg::TCSANOW, &saved);
        read.map_err(Error::Prompt)?;
        restored.map_err(|e| Error::Prompt(e.into()))?;
    } else {
        stdin.lock().read_line(&mut line).map_err(Error::Prompt)?;
    }
    let secret = line.trim_end_matches(['\r', '\n']).to_string();
    if secret.is_empty() {
        return Err(Error::Missing(vec![format!(
            "{CLIENT_SECRET} (set {CLIENT_SECRET} or type it at the prompt)"
        )]));
    }
    Ok(secret)
}

/// The Secret object for `data` in `namespace`.
pub(crate) fn secret_object(namespace: &str, data: &BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(CLOUD_SECRET.to_string()),
            namespace: Some(namespace.to_string()),
            ..Default::default()
        },
        type_: Some("Opaque".to_string()),
        data: Some(
            data.iter()
                .map(|(k, v)| (k.clone(), ByteString(v.as_bytes().to_vec())))
                .collect(),
        ),
        ..Default::default()
    }
}

/// `sandboxd ctl azure secret`.
pub(crate) async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<()> {
    let mut data = collect(&args)?;
    let client = ctx.client().await?;
    let namespaces: Api<Namespace> = Api::all(client.clone());
    match namespaces.get_opt(&ctx.namespace).await {
        Ok(Some(_)) => {}
        Ok(None) => return Err(Error::NoNamespace(ctx.namespace.clone()).into()),
        Err(e) => return Err(Error::Api(e).into()),
    }
    let secret = match std::env::var(CLIENT_SECRET) {
        Ok(s) if !s.is_empty() => s,
        _ => read_client_secret()?,
    };
    data.insert(CLIENT_SECRET.to_string(), secret);
    CloudSecret::from_map(&data).map_err(Error::Invalid)?;
    let api: Api<Secret> = Api::namespaced(client, &ctx.namespace);
    let obj = secret_object(&ctx.namespace, &data);
    api.patch(
        CLOUD_SECRET,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await
    .map_err(|e| {
        if is_not_found(&e) {
            Error::NoNamespace(ctx.namespace.clone())
        } else {
            Error::Api(e)
        }
    })?;
    println!(
        "secret {}/{CLOUD_SECRET} written with keys {}",
        ctx.namespace,
        data.keys().cloned().collect::<Vec<_>>().join(", ")
    );
    println!(
        "if the cloud-api-adaptor already runs, restart it to use them: sandboxd ctl caa restart"
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_flags_are_all_named_with_their_flag() {
        let err = collect(&Args {
            client_id: Some("c".into()),
            tenant_id: None,
            subscription_id: Some("  ".into()),
        })
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("AZURE_TENANT_ID (pass --tenant-id"), "{msg}");
        assert!(msg.contains("AZURE_SUBSCRIPTION_ID"), "{msg}");
        assert!(!msg.contains("AZURE_CLIENT_ID"), "{msg}");
    }

    #[test]
    fn the_secret_object_holds_exactly_the_keys() {
        let data: BTreeMap<String, String> =
            [("A".to_string(), "1".to_string())].into_iter().collect();
        let s = secret_object("ns", &data);
        assert_eq!(s.data.unwrap()["A"].0, b"1");
        assert_eq!(s.metadata.name.as_deref(), Some(CLOUD_SECRET));
    }
}
