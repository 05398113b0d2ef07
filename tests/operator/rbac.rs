//! Each component's effective permissions, as the real API server resolves them from the
//! deployed RBAC (`deploy/operator/rbac.yaml`, `deploy/caa/rbac.yaml`): a
//! SelfSubjectRulesReview made with each ServiceAccount's own token, compared with the
//! checked-in expectation `tests/fixtures/rbac/effective-permissions.txt`
//! (`SANDBOXD_UPDATE_GENERATED=1` rewrites it; review the diff), plus SubjectAccessReviews
//! of what each must not do.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result, ensure};
use k8s_openapi::api::authorization::v1::{
    ResourceAttributes, SelfSubjectRulesReview, SelfSubjectRulesReviewSpec, SubjectAccessReview,
    SubjectAccessReviewSpec,
};
use kube::Api;
use kube::api::PostParams;

use crate::harness::{self, Case, Env};

const EXPECTED: &str = "tests/fixtures/rbac/effective-permissions.txt";

/// The components and their ServiceAccounts.
const ACCOUNTS: [&str; 5] = [
    "sandboxd-operator",
    "sandboxd-node-installer",
    "sandboxd-podvm-image",
    "sandboxd-caa",
    "sandboxd-caa-relay",
];

pub fn cases() -> Vec<Case> {
    vec![Case::cluster(
        "operator::each_components_effective_permissions_match_the_checked_in_expectation",
        effective_permissions,
    )]
}

/// One line per (account, group/resource[/name], verb), the namespace written `NS`.
fn lines(account: &str, review: &SelfSubjectRulesReview, ns: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Some(status) = &review.status else {
        return out;
    };
    for rule in &status.resource_rules {
        let groups = rule.api_groups.clone().unwrap_or_default();
        let resources = rule.resources.clone().unwrap_or_default();
        let names = rule
            .resource_names
            .clone()
            .filter(|n| !n.is_empty())
            .unwrap_or_else(|| vec!["*".into()]);
        for g in &groups {
            for r in &resources {
                for n in &names {
                    for v in &rule.verbs {
                        let g = if g.is_empty() { "core" } else { g.as_str() };
                        // OpenShift grants every authenticated user restricted-v2; the SCC
                        // test installs that default binding into the shared control plane.
                        if g == "security.openshift.io" && n == "restricted-v2" {
                            continue;
                        }
                        out.insert(format!("{account} {g}/{r}/{n} {v}").replace(ns, "NS"));
                    }
                }
            }
        }
    }
    for rule in &status.non_resource_rules {
        for u in rule.non_resource_urls.clone().unwrap_or_default() {
            for v in &rule.verbs {
                out.insert(format!("{account} url:{u} {v}"));
            }
        }
    }
    out
}

async fn effective_permissions(env: Env) -> Result<()> {
    let admin = env.admin().await?;
    let suffix = env.unique("rbac").trim_start_matches("rbac-").to_string();
    crate::operator::support::apply_rbac_file(
        &admin,
        "deploy/operator/rbac.yaml",
        &env.ns,
        &suffix,
    )
    .await?;
    crate::operator::support::apply_rbac_file(&admin, "deploy/caa/rbac.yaml", &env.ns, &suffix)
        .await?;
    let mut all = BTreeSet::new();
    for account in ACCOUNTS {
        let client = harness::service_account_client(env.cp(), &env.ns, account).await?;
        let review = SelfSubjectRulesReview {
            spec: SelfSubjectRulesReviewSpec {
                namespace: Some(env.ns.clone()),
            },
            ..Default::default()
        };
        let api: Api<SelfSubjectRulesReview> = Api::all(client);
        let got = api
            .create(&PostParams::default(), &review)
            .await
            .with_context(|| format!("SelfSubjectRulesReview as {account}"))?;
        all.extend(lines(account, &got, &env.ns));
    }
    let text: String = std::iter::once(
        "# Effective permissions of each sandboxd ServiceAccount in its namespace (NS), as the\n\
         # API server resolves the deployed RBAC (tests/operator/rbac.rs). One line per\n\
         # account, group/resource/name (* = any) and verb.\n"
            .to_string(),
    )
    .chain(all.iter().map(|l| format!("{l}\n")))
    .collect();
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(EXPECTED);
    if std::env::var_os("SANDBOXD_UPDATE_GENERATED").is_some() {
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, &text)?;
    }
    let want = std::fs::read_to_string(&path).unwrap_or_default();
    if want != text {
        let want: BTreeSet<&str> = want.lines().filter(|l| !l.starts_with('#')).collect();
        let got: BTreeSet<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        let extra: Vec<_> = got.difference(&want).collect();
        let missing: Vec<_> = want.difference(&got).collect();
        anyhow::bail!(
            "effective permissions differ from {EXPECTED} (SANDBOXD_UPDATE_GENERATED=1 \
             rewrites it):\n granted but not expected: {extra:#?}\n expected but not \
             granted: {missing:#?}"
        );
    }

    // What each must not do, asked of the real authorizer.
    let sar =
        |account: &str, verb: &str, group: &str, resource: &str, name: &str, ns: Option<&str>| {
            SubjectAccessReview {
                spec: SubjectAccessReviewSpec {
                    user: Some(format!("system:serviceaccount:{}:{account}", env.ns)),
                    groups: Some(vec!["system:serviceaccounts".into()]),
                    resource_attributes: Some(ResourceAttributes {
                        verb: Some(verb.into()),
                        group: Some(group.into()),
                        resource: Some(resource.into()),
                        name: (!name.is_empty()).then(|| name.to_string()),
                        namespace: ns.map(str::to_string),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            }
        };
    let sars: Api<SubjectAccessReview> = Api::all(admin.clone());
    for (allowed, account, verb, group, resource, name, ns) in [
        (
            true,
            "sandboxd-operator",
            "patch",
            "node.k8s.io",
            "runtimeclasses",
            "kata-remote",
            None,
        ),
        (
            false,
            "sandboxd-operator",
            "patch",
            "node.k8s.io",
            "runtimeclasses",
            "runc",
            None,
        ),
        (
            false,
            "sandboxd-operator",
            "delete",
            "node.k8s.io",
            "runtimeclasses",
            "runc",
            None,
        ),
        (
            true,
            "sandboxd-operator",
            "patch",
            "admissionregistration.k8s.io",
            "validatingadmissionpolicies",
            "sandboxd-kataconfig-singleton",
            None,
        ),
        (
            false,
            "sandboxd-operator",
            "patch",
            "admissionregistration.k8s.io",
            "validatingadmissionpolicies",
            "other-policy",
            None,
        ),
        (
            false,
            "sandboxd-operator",
            "delete",
            "machineconfiguration.openshift.io",
            "machineconfigs",
            "99-worker-ssh",
            None,
        ),
        (
            true,
            "sandboxd-operator",
            "patch",
            "machineconfiguration.openshift.io",
            "machineconfigpools",
            "kata-oc",
            None,
        ),
        (
            false,
            "sandboxd-operator",
            "patch",
            "machineconfiguration.openshift.io",
            "machineconfigpools",
            "worker",
            None,
        ),
        (
            false,
            "sandboxd-operator",
            "list",
            "",
            "secrets",
            "",
            Some(env.ns.as_str()),
        ),
        (
            false,
            "sandboxd-caa",
            "list",
            "",
            "secrets",
            "",
            Some(env.ns.as_str()),
        ),
        (
            false,
            "sandboxd-caa",
            "get",
            "",
            "secrets",
            "peer-pods-secret",
            Some(env.ns.as_str()),
        ),
        (
            false,
            "sandboxd-node-installer",
            "delete",
            "",
            "nodes",
            "any",
            None,
        ),
        (
            false,
            "sandboxd-podvm-image",
            "patch",
            "",
            "configmaps",
            "kube-root-ca.crt",
            Some(env.ns.as_str()),
        ),
    ] {
        let r = sars
            .create(
                &PostParams::default(),
                &sar(account, verb, group, resource, name, ns),
            )
            .await?;
        let got = r.status.map(|s| s.allowed).unwrap_or(false);
        ensure!(
            got == allowed,
            "{account} {verb} {group}/{resource}/{name}: allowed={got}, expected {allowed}"
        );
    }
    Ok(())
}
