//! The webhook's serving TLS without cert-manager: the operator keeps a CA in Secret
//! [`CA_SECRET`] and the serving certificate in the `kubernetes.io/tls` Secret
//! [`SERVING_SECRET`] (with `ca.crt`, the caBundle); only the latter is mounted into the
//! webhook pods. The serving certificate is renewed at 2/3 of its life. The CA is renewed at
//! 2/3 of its life with overlap: the new CA joins the caBundle beside the old one, the
//! serving certificate moves to the new CA only after a propagation grace (so the API server
//! trusts it before it is served), and the old CA leaves the bundle when it expires. No
//! admission fails across a rotation.
//!
//! The decisions are pure functions of the observed certificates and `now` ([`ca_step`],
//! [`serving_due`], [`ca_bundle`], [`next_check`]); [`ensure_tls`] applies them.

use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::ResourceExt;
use kube::api::Api;
use rustls::client::danger::ServerCertVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use time::OffsetDateTime;

use super::objects::secret;
use super::{
    CA_SECRET, CA_SINCE_ANNOTATION, Configurations, Error, SERVING_SECRET, Settings, TLS_CRT,
    TLS_KEY, get, serving_names,
};
use crate::api::names::WEBHOOK_SERVICE;
use crate::k8s::apply;
use crate::pki::{Ca, Usage, Validity};

const CA_CERT_KEY: &str = "ca.crt";
const CA_KEY_KEY: &str = "ca.key";
const PREVIOUS_CA_KEY: &str = "previous-ca.crt";
const CA_COMMON_NAME: &str = "peer-pods-webhook-ca";

fn to_time(d: std::time::Duration) -> time::Duration {
    time::Duration::try_from(d).unwrap_or(time::Duration::MAX)
}

/// When a certificate with `validity`, issued for `configured`, is renewed
/// ([`Validity::renew_at`]).
pub(crate) fn renew_at(validity: &Validity, configured: std::time::Duration) -> OffsetDateTime {
    validity.renew_at(to_time(configured))
}

/// What to do with the CA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum CaStep {
    /// Keep it.
    Keep,
    /// Make a new CA (none usable, or the current one is due): the current certificate, if
    /// still valid, stays in the bundle as the previous CA.
    New,
    /// The previous CA expired: drop it from the bundle.
    DropPrevious,
}

/// The CA decision for the usable current CA (`None`: missing or unusable) and the previous
/// CA kept for overlap.
pub(crate) fn ca_step(
    current: Option<&Validity>,
    previous: Option<&Validity>,
    configured: std::time::Duration,
    now: OffsetDateTime,
) -> CaStep {
    match current {
        None => CaStep::New,
        Some(c) if now >= renew_at(c, configured) => CaStep::New,
        Some(_) if previous.is_some_and(|p| now >= p.not_after) => CaStep::DropPrevious,
        Some(_) => CaStep::Keep,
    }
}

/// The caBundle: the current CA, then the previous one while it is still valid.
pub(crate) fn ca_bundle(
    current: &str,
    previous: Option<(&str, &Validity)>,
    now: OffsetDateTime,
) -> String {
    let mut out = current.trim_end().to_string();
    out.push('\n');
    if let Some((pem, v)) = previous
        && now < v.not_after
    {
        out.push_str(pem.trim_end());
        out.push('\n');
    }
    out
}

/// Which CA of the bundle the serving certificate verifies against (for every name).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Signer {
    /// The current CA.
    Current,
    /// The previous CA (a CA rotation is under way).
    Previous,
}

/// How long after a new CA joined the bundle the serving certificate moves to it: time for
/// every API server to see the new caBundle. A twelfth of the CA's validity, 1 s to 60 s.
pub(crate) fn propagation_grace(ca_validity: std::time::Duration) -> std::time::Duration {
    (ca_validity / 12).clamp(
        std::time::Duration::from_secs(1),
        std::time::Duration::from_secs(60),
    )
}

/// Whether the serving certificate must be (re)issued now. `serving` is its validity and
/// signer (`None`: missing, unreadable, or not valid for the names under either CA);
/// `ca_since` is when the current CA joined the bundle.
pub(crate) fn serving_due(
    serving: Option<(&Validity, Signer)>,
    ca_since: Option<OffsetDateTime>,
    settings: &Settings,
    now: OffsetDateTime,
) -> bool {
    let Some((v, signer)) = serving else {
        return true;
    };
    if now >= v.not_after {
        return true;
    }
    match signer {
        Signer::Current => now >= renew_at(v, settings.cert_validity),
        // Move to the new CA once every API server trusts it.
        Signer::Previous => {
            ca_since.is_none_or(|s| now >= s + to_time(propagation_grace(settings.ca_validity)))
        }
    }
}

/// When the next decision is due: the earliest renewal, expiry or grace end still ahead.
pub(crate) fn next_check(
    ca: &Validity,
    previous: Option<&Validity>,
    serving: &Validity,
    signer: Signer,
    ca_since: Option<OffsetDateTime>,
    settings: &Settings,
    now: OffsetDateTime,
) -> std::time::Duration {
    let mut points = vec![
        renew_at(ca, settings.ca_validity),
        renew_at(serving, settings.cert_validity),
    ];
    if let Some(p) = previous {
        points.push(p.not_after);
    }
    if let (Signer::Previous, Some(s)) = (signer, ca_since) {
        points.push(s + to_time(propagation_grace(settings.ca_validity)));
    }
    let next = points.into_iter().filter(|t| *t > now).min();
    next.map_or(std::time::Duration::from_secs(1), |t| {
        std::time::Duration::try_from(t - now).unwrap_or_default()
            + std::time::Duration::from_millis(200)
    })
}

/// Which CA (current first) `cert_pem` verifies against for every one of `names` at `now`.
pub(crate) fn signer_of(
    cert_pem: &str,
    current_ca: &str,
    previous_ca: Option<&str>,
    names: &[String],
    now: OffsetDateTime,
) -> Option<Signer> {
    let leaf = CertificateDer::from_pem_slice(cert_pem.as_bytes()).ok()?;
    let when = UnixTime::since_unix_epoch(std::time::Duration::from_secs(
        u64::try_from(now.unix_timestamp()).ok()?,
    ));
    let verifies = |ca_pem: &str| -> bool {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
            let Ok(c) = c else { return false };
            if roots.add(c).is_err() {
                return false;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let Ok(verifier) =
            rustls::client::WebPkiServerVerifier::builder_with_provider(roots.into(), provider)
                .build()
        else {
            return false;
        };
        names.iter().all(|n| {
            ServerName::try_from(n.as_str()).is_ok_and(|name| {
                verifier
                    .verify_server_cert(&leaf, &[], &name, &[], when)
                    .is_ok()
            })
        })
    };
    if verifies(current_ca) {
        Some(Signer::Current)
    } else if previous_ca.is_some_and(verifies) {
        Some(Signer::Previous)
    } else {
        None
    }
}

fn secret_text(s: &Secret) -> BTreeMap<String, String> {
    s.data
        .as_ref()
        .map(|d| {
            d.iter()
                .map(|(k, v)| (k.clone(), String::from_utf8_lossy(&v.0).into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

/// The CA as observed: usable current CA, its validity and PEM, the previous CA.
struct CaState {
    ca: Ca,
    cert_pem: String,
    validity: Validity,
    previous: Option<(String, Validity)>,
    since: Option<OffsetDateTime>,
}

fn read_ca(s: Option<&Secret>) -> (Option<CaState>, Option<(String, Validity)>) {
    let Some(s) = s else { return (None, None) };
    let data = secret_text(s);
    let since = s.annotations().get(CA_SINCE_ANNOTATION).and_then(|t| {
        OffsetDateTime::parse(t, &time::format_description::well_known::Rfc3339).ok()
    });
    let previous = data
        .get(PREVIOUS_CA_KEY)
        .and_then(|p| Validity::of(p).map(|v| (p.clone(), v)));
    let current_cert = data
        .get(CA_CERT_KEY)
        .and_then(|p| Validity::of(p).map(|v| (p.clone(), v)));
    let usable = match (&current_cert, data.get(CA_KEY_KEY)) {
        (Some((pem, v)), Some(key)) => Ca::from_pem(pem, key).ok().map(|ca| CaState {
            ca,
            cert_pem: pem.clone(),
            validity: *v,
            previous: previous.clone(),
            since,
        }),
        _ => None,
    };
    // An unusable CA whose certificate is still valid may have signed the certificate being
    // served: it stays in the bundle as the previous CA.
    (usable, current_cert)
}

pub(super) async fn ensure_tls(
    client: &kube::Client,
    namespace: &str,
    settings: &Settings,
    owner: &OwnerReference,
    configs: &Configurations<'_>,
) -> Result<std::time::Duration, Error> {
    let now = OffsetDateTime::now_utc();
    let names = serving_names(namespace, settings.url.as_deref())?;
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);

    // 1. The CA (persisted before anything it signs is handed out).
    let observed_ca = get(&secrets, "Secret", CA_SECRET).await?;
    let (usable, current_cert) = read_ca(observed_ca.as_ref());
    let step = ca_step(
        usable.as_ref().map(|c| &c.validity),
        usable
            .as_ref()
            .and_then(|c| c.previous.as_ref().map(|p| &p.1)),
        settings.ca_validity,
        now,
    );
    let state = match (step, usable) {
        (CaStep::Keep, Some(state)) => state,
        (CaStep::DropPrevious, Some(state)) => {
            let state = CaState {
                previous: None,
                ..state
            };
            write_ca(&secrets, namespace, &state, owner).await?;
            tracing::info!("the previous webhook CA expired and left the caBundle");
            state
        }
        (_, _) => {
            let ca = Ca::new(CA_COMMON_NAME, to_time(settings.ca_validity))?;
            let cert_pem = ca.cert_pem();
            let validity = Validity::of(&cert_pem).expect("a CA we just made parses");
            let previous = current_cert.filter(|(_, v)| now < v.not_after);
            let state = CaState {
                ca,
                cert_pem,
                validity,
                previous,
                since: Some(now),
            };
            write_ca(&secrets, namespace, &state, owner).await?;
            tracing::info!(
                overlap = state.previous.is_some(),
                "new webhook CA in the caBundle"
            );
            state
        }
    };
    let previous = state.previous.as_ref().map(|(p, v)| (p.as_str(), v));
    let bundle = ca_bundle(&state.cert_pem, previous, now);

    // 2. The caBundle, before any certificate of a new CA is served.
    configs.ensure(Some(bundle.clone())).await?;

    // 3. The serving certificate.
    let observed = get(&secrets, "Secret", SERVING_SECRET).await?;
    let observed_data = observed.as_ref().map(secret_text).unwrap_or_default();
    let serving = observed_data.get(TLS_CRT).and_then(|crt| {
        let v = Validity::of(crt)?;
        let signer = signer_of(crt, &state.cert_pem, previous.map(|p| p.0), &names, now)?;
        observed_data.get(TLS_KEY)?;
        Some((v, signer))
    });
    let due = serving_due(
        serving.as_ref().map(|(v, s)| (v, *s)),
        state.since,
        settings,
        now,
    );
    let (cert, key, validity, signer) = if due {
        let left =
            std::time::Duration::try_from(state.validity.not_after - now).unwrap_or_default();
        let sans: Vec<&str> = names.iter().map(String::as_str).collect();
        let pair = state.ca.issue(
            &format!("{WEBHOOK_SERVICE}.{namespace}.svc"),
            &[],
            &sans,
            Usage::Server,
            to_time(settings.cert_validity.min(left)),
        )?;
        let v = Validity::of(&pair.cert_pem).expect("a certificate we just issued parses");
        tracing::info!(not_after = %v.not_after, "issued a new webhook serving certificate");
        (pair.cert_pem, pair.key_pem, v, Signer::Current)
    } else {
        let (v, s) = serving.expect("not due means present");
        (
            observed_data[TLS_CRT].clone(),
            observed_data[TLS_KEY].clone(),
            v,
            s,
        )
    };
    let data = BTreeMap::from([
        (TLS_CRT.to_string(), cert),
        (TLS_KEY.to_string(), key),
        (CA_CERT_KEY.to_string(), bundle),
    ]);
    let owned = observed
        .as_ref()
        .is_some_and(|s| s.owner_references().iter().any(|o| o.uid == owner.uid));
    if data != observed_data || !owned {
        let s = secret(
            namespace,
            SERVING_SECRET,
            "kubernetes.io/tls",
            &data,
            BTreeMap::new(),
            owner,
        );
        apply::apply(&secrets, &s).await?;
    }
    Ok(next_check(
        &state.validity,
        state.previous.as_ref().map(|p| &p.1),
        &validity,
        signer,
        state.since,
        settings,
        now,
    ))
}

async fn write_ca(
    secrets: &Api<Secret>,
    namespace: &str,
    state: &CaState,
    owner: &OwnerReference,
) -> Result<(), Error> {
    let key = state.ca.cert_key();
    let mut data = BTreeMap::from([
        (CA_CERT_KEY.to_string(), state.cert_pem.clone()),
        (CA_KEY_KEY.to_string(), key.key_pem),
    ]);
    if let Some((p, _)) = &state.previous {
        data.insert(PREVIOUS_CA_KEY.to_string(), p.clone());
    }
    let mut annotations = BTreeMap::new();
    if let Some(since) = state.since
        && let Ok(t) = since.format(&time::format_description::well_known::Rfc3339)
    {
        annotations.insert(CA_SINCE_ANNOTATION.to_string(), t);
    }
    let s = secret(namespace, CA_SECRET, "Opaque", &data, annotations, owner);
    // Server-side apply replaces `data` as a whole: `previous-ca.crt` goes when it is left
    // out (this manager owns every key).
    apply::apply(secrets, &s).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: std::time::Duration = std::time::Duration::from_secs(1);

    fn at(secs: i64) -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000 + secs).unwrap()
    }

    /// Issued at `issued` for `secs`, back-dated five minutes as [`pki`] does.
    fn window(issued: i64, secs: i64) -> Validity {
        Validity {
            not_before: at(issued - 300),
            not_after: at(issued + secs),
        }
    }

    fn settings(cert: u64, ca: u64) -> Settings {
        Settings {
            cert_validity: SEC * cert as u32,
            ca_validity: SEC * ca as u32,
            ..Default::default()
        }
    }

    #[test]
    fn a_certificate_renews_at_two_thirds_of_its_configured_life_despite_back_dating() {
        let v = window(0, 30);
        assert_eq!(renew_at(&v, SEC * 30), at(20));
        // A certificate shorter than configured (made elsewhere) renews at 2/3 of its own.
        let short = Validity {
            not_before: at(0),
            not_after: at(9),
        };
        assert_eq!(renew_at(&short, SEC * 3600), at(6));
    }

    #[test]
    fn the_ca_is_made_when_missing_renewed_when_due_and_the_old_one_dropped_when_expired() {
        let ca = window(0, 90);
        assert_eq!(ca_step(None, None, SEC * 90, at(0)), CaStep::New);
        assert_eq!(ca_step(Some(&ca), None, SEC * 90, at(59)), CaStep::Keep);
        assert_eq!(ca_step(Some(&ca), None, SEC * 90, at(60)), CaStep::New);
        let new = window(60, 90);
        assert_eq!(
            ca_step(Some(&new), Some(&ca), SEC * 90, at(89)),
            CaStep::Keep
        );
        assert_eq!(
            ca_step(Some(&new), Some(&ca), SEC * 90, at(90)),
            CaStep::DropPrevious
        );
    }

    #[test]
    fn the_bundle_holds_the_new_ca_first_and_the_old_one_only_while_it_is_valid() {
        let old = window(0, 90);
        let b = ca_bundle("NEW\n", Some(("OLD", &old)), at(70));
        assert_eq!(b, "NEW\nOLD\n");
        assert_eq!(ca_bundle("NEW", Some(("OLD", &old)), at(90)), "NEW\n");
        assert_eq!(ca_bundle("NEW", None, at(0)), "NEW\n");
    }

    #[test]
    fn the_serving_certificate_moves_to_a_new_ca_only_after_the_bundle_had_time_to_spread() {
        let s = settings(30, 120); // grace = 10 s
        assert_eq!(propagation_grace(s.ca_validity), SEC * 10);
        let cert = window(0, 30);
        assert!(serving_due(None, None, &s, at(0)), "missing → issue");
        assert!(!serving_due(
            Some((&cert, Signer::Current)),
            Some(at(-100)),
            &s,
            at(19)
        ));
        assert!(serving_due(
            Some((&cert, Signer::Current)),
            None,
            &s,
            at(20)
        ));
        // A CA rotation at t=5: the certificate signed by the old CA stays until t=15.
        assert!(!serving_due(
            Some((&cert, Signer::Previous)),
            Some(at(5)),
            &s,
            at(14)
        ));
        assert!(serving_due(
            Some((&cert, Signer::Previous)),
            Some(at(5)),
            &s,
            at(15)
        ));
        // Expired: always re-issued.
        assert!(serving_due(
            Some((&cert, Signer::Previous)),
            Some(at(25)),
            &s,
            at(30)
        ));
        // Grace bounds.
        assert_eq!(propagation_grace(SEC * 3), SEC);
        assert_eq!(propagation_grace(SEC * 3600 * 24 * 365), SEC * 60);
    }

    #[test]
    fn the_next_check_is_the_earliest_decision_ahead() {
        let s = settings(30, 120);
        let ca = window(0, 120); // renew at 80
        let cert = window(0, 30); // renew at 20
        let d = next_check(&ca, None, &cert, Signer::Current, None, &s, at(1));
        assert_eq!(d, SEC * 19 + std::time::Duration::from_millis(200));
        let old = window(-100, 120); // expires at 20, then…
        let d = next_check(
            &ca,
            Some(&old),
            &cert,
            Signer::Previous,
            Some(at(0)),
            &s,
            at(1),
        );
        // …the grace ends at 10.
        assert_eq!(d, SEC * 9 + std::time::Duration::from_millis(200));
    }

    #[test]
    fn a_real_rotation_keeps_the_served_certificate_trusted_at_every_step() {
        let names = serving_names("ns", Some("https://127.0.0.1:9443")).unwrap();
        assert_eq!(
            names,
            [
                "peer-pods-webhook-svc",
                "peer-pods-webhook-svc.ns",
                "peer-pods-webhook-svc.ns.svc",
                "peer-pods-webhook-svc.ns.svc.cluster.local",
                "127.0.0.1"
            ]
        );
        let sans: Vec<&str> = names.iter().map(String::as_str).collect();
        let now = OffsetDateTime::now_utc();
        let old = Ca::new("old", time::Duration::hours(1)).unwrap();
        let new = Ca::new("new", time::Duration::hours(1)).unwrap();
        let leaf = old
            .issue("x", &[], &sans, Usage::Server, time::Duration::minutes(10))
            .unwrap();
        let (o, n) = (old.cert_pem(), new.cert_pem());
        assert_eq!(
            signer_of(&leaf.cert_pem, &o, None, &names, now),
            Some(Signer::Current)
        );
        // After the CA rotation the old leaf is still trusted through the previous CA.
        assert_eq!(
            signer_of(&leaf.cert_pem, &n, Some(&o), &names, now),
            Some(Signer::Previous)
        );
        assert_eq!(signer_of(&leaf.cert_pem, &n, None, &names, now), None);
        // A certificate missing a name is not accepted.
        let partial = old
            .issue(
                "x",
                &[],
                &sans[..2],
                Usage::Server,
                time::Duration::minutes(10),
            )
            .unwrap();
        assert_eq!(signer_of(&partial.cert_pem, &o, None, &names, now), None);
        // Expired by `now`.
        assert_eq!(
            signer_of(
                &leaf.cert_pem,
                &o,
                None,
                &names,
                now + time::Duration::hours(2)
            ),
            None
        );
        let v = Validity::of(&leaf.cert_pem).unwrap();
        assert!(v.not_after > now + time::Duration::minutes(9));
    }
}
