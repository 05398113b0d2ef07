//! `sandboxd ctl ssh-key`: an Ed25519 key pair generated in memory; the OpenSSH public key
//! goes into `ssh-key-secret` (key `id_rsa.pub`, the name the seed uses). The private key
//! touches the disk only with `--out`, so the seed's generate-then-shred step is moot.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, ObjectMeta, Patch, PatchParams};
use ring::rand::{SecureRandom, SystemRandom};
use ring::signature::{Ed25519KeyPair, KeyPair};

use super::Ctx;
use crate::api::names::{SSH_KEY_SECRET, SSH_PUBLIC_KEY};
use crate::k8s::FIELD_MANAGER;
use crate::k8s::apply::is_not_found;

/// Errors of this command.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Error {
    /// Key generation failed.
    #[error("generating the key: {0}")]
    Generate(String),
    /// Writing `--out` failed.
    #[error("writing the private key to {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The namespace does not exist.
    #[error(
        "namespace {0} does not exist: install sandboxd first (`sandboxd ctl install`) or pass -n"
    )]
    NoNamespace(String),
    /// The API server refused.
    #[error("writing Secret {SSH_KEY_SECRET}: {0}")]
    Api(#[source] kube::Error),
}

/// Flags of `ctl ssh-key`.
#[derive(Debug, clap::Args)]
pub(crate) struct Args {
    /// Also write the private key (OpenSSH format, mode 0600) to this new file.
    #[arg(long)]
    pub(crate) out: Option<PathBuf>,
    /// The key's comment.
    #[arg(long, default_value = "sandboxd-peer-pods")]
    pub(crate) comment: String,
}

/// An Ed25519 key pair held in memory.
pub(crate) struct SshKey {
    seed: [u8; 32],
    public: [u8; 32],
}

impl SshKey {
    /// Generates a key pair.
    pub(crate) fn generate() -> Result<Self, Error> {
        let rng = SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| Error::Generate("no randomness".into()))?;
        let bytes = pkcs8.as_ref();
        // ring's PKCS#8 v2 document: the 32-byte seed follows a 16-byte header.
        let seed: [u8; 32] = bytes
            .get(16..48)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| Error::Generate("unexpected PKCS#8 layout".into()))?;
        let pair = Ed25519KeyPair::from_pkcs8(bytes).map_err(|e| Error::Generate(e.to_string()))?;
        let public: [u8; 32] = pair
            .public_key()
            .as_ref()
            .try_into()
            .map_err(|_| Error::Generate("public key length".into()))?;
        // The seed is right exactly when it derives the same public key.
        Ed25519KeyPair::from_seed_and_public_key(&seed, &public)
            .map_err(|_| Error::Generate("unexpected PKCS#8 layout".into()))?;
        Ok(Self { seed, public })
    }

    fn public_blob(&self) -> Vec<u8> {
        let mut b = Vec::new();
        put_string(&mut b, b"ssh-ed25519");
        put_string(&mut b, &self.public);
        b
    }

    /// The public key line: `ssh-ed25519 AAAA... comment`.
    pub(crate) fn public_openssh(&self, comment: &str) -> String {
        format!(
            "ssh-ed25519 {} {comment}",
            STANDARD.encode(self.public_blob())
        )
    }

    /// The private key in the OpenSSH format (unencrypted).
    pub(crate) fn private_openssh(&self, comment: &str) -> Result<String, Error> {
        let mut check = [0u8; 4];
        SystemRandom::new()
            .fill(&mut check)
            .map_err(|_| Error::Generate("no randomness".into()))?;
        let mut private = Vec::new();
        private.extend_from_slice(&check);
        private.extend_from_slice(&check);
        put_string(&mut private, b"ssh-ed25519");
        put_string(&mut private, &self.public);
        let mut secret = self.seed.to_vec();
        secret.extend_from_slice(&self.public);
        put_string(&mut private, &secret);
        put_string(&mut private, comment.as_bytes());
        let mut pad = 1u8;
        while private.len() % 8 != 0 {
            private.push(pad);
            pad += 1;
        }
        let mut b = b"openssh-key-v1\0".to_vec();
        put_string(&mut b, b"none");
        put_string(&mut b, b"none");
        put_string(&mut b, b"");
        b.extend_from_slice(&1u32.to_be_bytes());
        put_string(&mut b, &self.public_blob());
        put_string(&mut b, &private);
        let encoded = STANDARD.encode(&b);
        let mut pem = String::from("-----BEGIN OPENSSH PRIVATE KEY-----\n");
        for chunk in encoded.as_bytes().chunks(70) {
            pem.push_str(std::str::from_utf8(chunk).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END OPENSSH PRIVATE KEY-----\n");
        Ok(pem)
    }
}

fn put_string(b: &mut Vec<u8>, s: &[u8]) {
    b.extend_from_slice(&(s.len() as u32).to_be_bytes());
    b.extend_from_slice(s);
}

/// `sandboxd ctl ssh-key`.
pub(crate) async fn run(ctx: &Ctx, args: Args) -> anyhow::Result<()> {
    let key = SshKey::generate()?;
    let public = key.public_openssh(&args.comment);
    let client = ctx.client().await?;
    let api: Api<Secret> = Api::namespaced(client, &ctx.namespace);
    let data: BTreeMap<String, ByteString> = [(
        SSH_PUBLIC_KEY.to_string(),
        ByteString(format!("{public}\n").into_bytes()),
    )]
    .into_iter()
    .collect();
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(SSH_KEY_SECRET.into()),
            namespace: Some(ctx.namespace.clone()),
            ..Default::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Default::default()
    };
    // The private key is written before the Secret, so a failed write leaves nothing half done.
    if let Some(path) = &args.out {
        let pem = key.private_openssh(&args.comment)?;
        let write = || -> std::io::Result<()> {
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)?;
            f.write_all(pem.as_bytes())
        };
        write().map_err(|source| Error::Write {
            path: path.clone(),
            source,
        })?;
    }
    api.patch(
        SSH_KEY_SECRET,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&secret),
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
        "secret {}/{SSH_KEY_SECRET} written ({SSH_PUBLIC_KEY}):",
        ctx.namespace
    );
    println!("{public}");
    match &args.out {
        Some(p) => println!("private key written to {} (mode 0600)", p.display()),
        None => println!("the private key was not kept (pass --out PATH to keep it)"),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_key_is_an_openssh_ed25519_line() {
        let k = SshKey::generate().unwrap();
        let line = k.public_openssh("c");
        let mut parts = line.split(' ');
        assert_eq!(parts.next(), Some("ssh-ed25519"));
        let blob = STANDARD.decode(parts.next().unwrap()).unwrap();
        assert_eq!(&blob[..4], &11u32.to_be_bytes());
        assert_eq!(&blob[4..15], b"ssh-ed25519");
        assert_eq!(&blob[19..], &k.public);
        assert_eq!(parts.next(), Some("c"));
    }

    #[test]
    fn private_key_is_padded_and_armoured() {
        let k = SshKey::generate().unwrap();
        let pem = k.private_openssh("c").unwrap();
        assert!(pem.starts_with("-----BEGIN OPENSSH PRIVATE KEY-----\n"));
        let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let raw = STANDARD.decode(body).unwrap();
        assert!(raw.starts_with(b"openssh-key-v1\0"));
        assert!(pem.lines().all(|l| l.len() <= 70 || l.starts_with("-----")));
    }

    #[test]
    fn two_keys_differ() {
        assert_ne!(
            SshKey::generate().unwrap().public,
            SshKey::generate().unwrap().public
        );
    }
}
