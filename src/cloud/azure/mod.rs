//! The Azure provider. Compute calls go through `azure_mgmt_compute` (its models and its
//! request builders' `send()`, never its LRO loop, which re-sends the PUT and sleeps 30 s
//! by default); the NIC's private IP and operation status documents go through a thin ARM
//! client on the same `azure_core` pipeline. One [`policy::ArmPolicy`] carries sandboxd's
//! retry and rate manners for both; the SDK's own retries are off.

pub mod arm;
pub mod body;
pub mod cloud;
pub mod permissions;
pub mod policy;
pub mod settings;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use azure_core::auth::TokenCredential;
use azure_core::{ClientOptions, RetryOptions};
use azure_mgmt_compute::package_2024_07_01 as compute;
use futures::StreamExt;

use super::{Error, Provider, Vm, VmSize, VmSpec, VmState};
pub use cloud::{AzureCloud, EndpointArgs, Endpoints};
pub use policy::Manners;
pub use settings::{AzureConfig, AzureCredentials, TAG_NAME_FORBIDDEN};

/// LRO polling settings.
#[derive(Clone, Debug)]
pub struct Polling {
    /// Never poll faster than this, whatever the headers say.
    pub min_interval: Duration,
    /// Interval when the headers give none.
    pub default_interval: Duration,
    /// Bound on one create or delete.
    pub timeout: Duration,
}

impl Default for Polling {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(1),
            default_interval: Duration::from_secs(5),
            timeout: Duration::from_secs(900),
        }
    }
}

/// The Azure provider.
pub struct AzureProvider {
    client: compute::Client,
    arm: arm::ArmClient,
    subscription: String,
    config: AzureConfig,
    polling: Polling,
    policy: Arc<policy::ArmPolicy>,
    /// How long recent creates took: the first poll of a new one waits that long.
    create_times: Learned,
    /// How long recent deletes took.
    delete_times: Learned,
}

/// The durations of the last few operations of one kind. Polling an operation before it
/// can have finished only spends the subscription's read budget (about 1 read per VM per
/// `Retry-After` otherwise), so the first poll of the next operation waits the median of
/// these; later polls follow `Retry-After` as before.
#[derive(Debug, Default)]
struct Learned(std::sync::Mutex<std::collections::VecDeque<Duration>>);

impl Learned {
    const KEEP: usize = 8;

    /// Records an operation that ended after `elapsed`, seen done by poll number `polls`
    /// whose first wait was `first_wait`. Done at the first poll says only "at most the
    /// first wait": a slightly shorter guess is kept, so the estimate drifts down until a
    /// first poll comes early, instead of only ever growing by each poll's round trip.
    fn observe(&self, elapsed: Duration, polls: u32, first_wait: Option<Duration>) {
        match (polls, first_wait) {
            (1, Some(w)) => self.record(w.min(elapsed).mul_f64(0.9)),
            _ => self.record(elapsed),
        }
    }

    fn record(&self, d: Duration) {
        let mut v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if v.len() == Self::KEEP {
            v.pop_front();
        }
        v.push_back(d);
    }

    /// Median of the recorded durations (none before the first operation finished).
    fn typical(&self) -> Option<Duration> {
        let v = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let mut sorted: Vec<Duration> = v.iter().copied().collect();
        sorted.sort_unstable();
        sorted.get(sorted.len().saturating_sub(1) / 2).copied()
    }

    /// The first wait for a new operation: what ARM asks for, or longer when recent
    /// operations of this kind took longer.
    fn first_wait(&self, retry_after: Option<Duration>) -> Option<Duration> {
        match (retry_after, self.typical()) {
            (Some(r), Some(t)) => Some(r.max(t)),
            (r, t) => r.or(t),
        }
    }
}

/// An `azure_core` error as a sentence: the SDK's own text of an HTTP error is a dump of
/// the status, body and headers, which the shim (and `kubectl describe pod`) would show.
pub(crate) fn sentence(e: &azure_core::Error) -> String {
    use azure_core::error::HttpError;
    fn http(h: &HttpError) -> String {
        let status = u16::from(h.status());
        let code = h.error_code().unwrap_or("no error code");
        match h.error_message().map(str::trim).filter(|m| !m.is_empty()) {
            Some(m) => format!("ARM answered {status} ({code}): {m}"),
            None => format!("ARM answered {status} ({code})"),
        }
    }
    if let Some(h) = e.as_http_error() {
        return http(h);
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<HttpError>() {
            let text = e.to_string();
            return if text.contains("HttpError {") {
                http(h)
            } else {
                format!("{text}: {}", http(h))
            };
        }
        source = s.source();
    }
    e.to_string()
}

/// Maps an `azure_core` error to the typed cloud error.
pub(crate) fn map_error(e: azure_core::Error) -> Error {
    use azure_core::error::ErrorKind;
    let detail = sentence(&e);
    match e.kind() {
        ErrorKind::HttpResponse { status, error_code } => {
            let code = error_code.clone().unwrap_or_default();
            match u16::from(*status) {
                404 => Error::NotFound(detail),
                429 => Error::Throttled {
                    retry_after: None,
                    message: detail,
                },
                _ if arm::is_quota_code(&code, &detail) => Error::Quota(detail),
                408 | 409 | 500..=599 => Error::Transient(detail),
                _ => Error::Permanent(detail),
            }
        }
        ErrorKind::Credential => {
            Error::Permanent(format!("getting an Azure access token failed: {detail}"))
        }
        ErrorKind::DataConversion => Error::Permanent(detail),
        _ => Error::Transient(detail),
    }
}

/// The token credential `credentials` describe, asking `endpoints.authority` for tokens.
pub fn credential(
    credentials: &AzureCredentials,
    endpoints: &Endpoints,
) -> Result<Arc<dyn TokenCredential>, Error> {
    let http = azure_core::new_http_client();
    let credential: Arc<dyn TokenCredential> = match credentials {
        AzureCredentials::ClientSecret {
            tenant_id,
            client_id,
            client_secret,
        } => Arc::new(azure_identity::ClientSecretCredential::new(
            http.clone(),
            endpoints.authority().clone(),
            tenant_id.clone(),
            client_id.clone(),
            client_secret.expose().to_string(),
        )),
        AzureCredentials::WorkloadIdentity {
            tenant_id,
            client_id,
            token_file,
        } => {
            let token = std::fs::read_to_string(token_file).map_err(|e| {
                Error::Permanent(format!(
                    "reading AZURE_FEDERATED_TOKEN_FILE {}: {e}",
                    token_file.display()
                ))
            })?;
            Arc::new(azure_identity::WorkloadIdentityCredential::new(
                http.clone(),
                endpoints.authority().clone(),
                tenant_id.clone(),
                client_id.clone(),
                token.trim().to_string(),
            ))
        }
        AzureCredentials::ManagedIdentity { .. } => Arc::new(
            azure_identity::VirtualMachineManagedIdentityCredential::new(
                azure_identity::TokenCredentialOptions::default(),
            ),
        ),
    };
    Ok(credential)
}

/// A plain ARM client with sandboxd's retry and rate manners, for reads outside the
/// provider (`ctl` discovering the network layout and checking NSG rules).
pub fn arm_client(
    credentials: &AzureCredentials,
    endpoints: &Endpoints,
    manners: Manners,
) -> Result<arm::ArmClient, Error> {
    let credential = credential(credentials, endpoints)?;
    let policy = Arc::new(policy::ArmPolicy::new(manners));
    let mut options = ClientOptions::default().retry(RetryOptions::none());
    options
        .per_retry_policies_mut()
        .push(policy as Arc<dyn azure_core::Policy>);
    let pipeline = azure_core::Pipeline::new(
        Some("sandboxd"),
        Some(env!("CARGO_PKG_VERSION")),
        options,
        Vec::new(),
        Vec::new(),
    );
    Ok(arm::ArmClient::new(
        pipeline,
        endpoints.arm().clone(),
        credential,
        vec![endpoints.arm_scope()],
    ))
}

impl AzureProvider {
    /// Builds the provider: the credential, one pipeline policy, both clients.
    pub fn new(
        subscription: &str,
        credentials: &AzureCredentials,
        config: AzureConfig,
        endpoints: Endpoints,
        manners: Manners,
        polling: Polling,
    ) -> Result<Self, Error> {
        let credential = credential(credentials, &endpoints)?;
        let policy = Arc::new(policy::ArmPolicy::new(manners));
        let mut options = ClientOptions::default().retry(RetryOptions::none());
        options
            .per_retry_policies_mut()
            .push(policy.clone() as Arc<dyn azure_core::Policy>);
        // Tokens carry the cloud's ARM audience (a development endpoint keeps the cloud's).
        let scopes = vec![endpoints.arm_scope()];
        let client = compute::Client::new(
            endpoints.arm().clone(),
            credential.clone(),
            scopes.clone(),
            options.clone(),
        );
        let pipeline = azure_core::Pipeline::new(
            Some("sandboxd"),
            Some(env!("CARGO_PKG_VERSION")),
            options,
            Vec::new(),
            Vec::new(),
        );
        let arm = arm::ArmClient::new(pipeline, endpoints.arm().clone(), credential, scopes);
        Ok(Self {
            client,
            arm,
            subscription: subscription.to_string(),
            config,
            polling,
            policy,
            create_times: Learned::default(),
            delete_times: Learned::default(),
        })
    }

    /// What the retry policy did so far.
    pub fn counters(&self) -> Arc<policy::Counters> {
        self.policy.counters.clone()
    }

    /// The settings this provider creates VMs with.
    pub fn config(&self) -> &AzureConfig {
        &self.config
    }

    async fn vm_of(&self, v: compute::models::VirtualMachine) -> Result<Vm, Error> {
        let props = v.properties.clone().unwrap_or_default();
        let state = match props.provisioning_state.as_deref() {
            Some("Succeeded") => VmState::Succeeded,
            Some("Creating") | Some("Updating") => VmState::Creating,
            Some("Failed") => VmState::Failed,
            Some("Deleting") => VmState::Deleting,
            other => VmState::Other(other.unwrap_or_default().to_string()),
        };
        let private_ip = if state == VmState::Succeeded {
            match props
                .network_profile
                .as_ref()
                .and_then(|n| n.network_interfaces.first())
                .and_then(|n| n.sub_resource.id.clone())
            {
                Some(nic) => self.arm.nic_private_ip(&nic).await?,
                None => None,
            }
        } else {
            None
        };
        let tags: BTreeMap<String, String> = v
            .resource
            .tags
            .clone()
            .and_then(|t| serde_json::from_value(t).ok())
            .unwrap_or_default();
        Ok(Vm {
            name: v.resource.name.clone().unwrap_or_default(),
            id: v.resource.id.clone().unwrap_or_default(),
            state,
            private_ip,
            tags,
        })
    }

    fn async_operation(headers: &azure_core::headers::Headers) -> Option<String> {
        headers.get_optional_string(&azure_core::headers::HeaderName::from_static(
            "azure-asyncoperation",
        ))
    }
}

#[async_trait::async_trait]
impl Provider for AzureProvider {
    fn name(&self) -> &'static str {
        "azure"
    }

    async fn sizes(&self, names: &[String]) -> Result<Vec<VmSize>, Error> {
        let offered = self
            .client
            .virtual_machine_sizes_client()
            .list(&self.config.region, &self.subscription)
            .send()
            .await
            .map_err(map_error)?
            .into_body()
            .await
            .map_err(map_error)?
            .value;
        let mut out = Vec::new();
        let mut missing = Vec::new();
        for n in names {
            match offered
                .iter()
                .find(|s| s.name.as_deref().is_some_and(|x| x.eq_ignore_ascii_case(n)))
            {
                Some(s) => out.push(VmSize {
                    name: n.clone(),
                    vcpus: s.number_of_cores.unwrap_or(0).max(0) as u32,
                    memory_mib: s.memory_in_mb.unwrap_or(0).max(0) as u64,
                }),
                None => missing.push(n.clone()),
            }
        }
        if !missing.is_empty() {
            return Err(Error::Permanent(format!(
                "instance sizes {} are not offered in region {}",
                missing.join(", "),
                self.config.region
            )));
        }
        Ok(out)
    }

    async fn create(&self, spec: &VmSpec) -> Result<Vm, Error> {
        let model = body::vm_model(spec, &self.config);
        let resp = self
            .client
            .virtual_machines_client()
            .create_or_update(
                &self.config.resource_group,
                &spec.name,
                model,
                &self.subscription,
            )
            .send()
            .await
            .map_err(map_error)?;
        let headers = resp.as_raw_response().headers().clone();
        let vm = resp.into_body().await.map_err(map_error)?;
        let started = std::time::Instant::now();
        let state = vm
            .properties
            .as_ref()
            .and_then(|p| p.provisioning_state.clone());
        if state.as_deref() != Some("Succeeded") {
            match Self::async_operation(&headers) {
                Some(url) => {
                    let first = self.create_times.first_wait(policy::retry_after(&headers));
                    let polls = self
                        .arm
                        .wait_operation(
                            &url,
                            first,
                            self.polling.min_interval,
                            self.polling.default_interval,
                            self.polling.timeout,
                        )
                        .await?;
                    self.create_times.observe(started.elapsed(), polls, first);
                }
                None => {
                    // No operation to follow: poll the VM itself.
                    let deadline = std::time::Instant::now() + self.polling.timeout;
                    loop {
                        tokio::time::sleep(
                            self.polling.default_interval.max(self.polling.min_interval),
                        )
                        .await;
                        match self.get(&spec.name).await? {
                            Some(v) if v.state == VmState::Succeeded => return Ok(v),
                            Some(v) if v.state == VmState::Failed => {
                                return Err(Error::Permanent(format!(
                                    "VM {} failed to provision",
                                    spec.name
                                )));
                            }
                            _ if std::time::Instant::now() > deadline => {
                                return Err(Error::Transient(format!(
                                    "VM {} still provisioning",
                                    spec.name
                                )));
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        // The operation succeeded, so the VM is provisioned; its NIC carries the name the
        // create gave it, so its IP is one read away (no GET of the VM first).
        let nic = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Network/networkInterfaces/{}",
            self.subscription,
            self.config.resource_group,
            body::nic_name(&spec.name)
        );
        let private_ip = self.arm.nic_private_ip(&nic).await?;
        let Some(private_ip) = private_ip else {
            return Err(Error::Transient(format!(
                "VM {} has no private IP yet",
                spec.name
            )));
        };
        let tags: BTreeMap<String, String> = vm
            .resource
            .tags
            .clone()
            .and_then(|t| serde_json::from_value(t).ok())
            .unwrap_or_default();
        Ok(Vm {
            name: spec.name.clone(),
            id: vm.resource.id.clone().unwrap_or_else(|| {
                format!(
                    "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{}",
                    self.subscription, self.config.resource_group, spec.name
                )
            }),
            state: VmState::Succeeded,
            private_ip: Some(private_ip),
            tags,
        })
    }

    async fn get(&self, name: &str) -> Result<Option<Vm>, Error> {
        match self
            .client
            .virtual_machines_client()
            .get(&self.config.resource_group, name, &self.subscription)
            .await
        {
            Ok(v) => Ok(Some(self.vm_of(v).await?)),
            Err(e) => match map_error(e) {
                Error::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn delete(&self, name: &str) -> Result<(), Error> {
        let resp = match self
            .client
            .virtual_machines_client()
            .delete(&self.config.resource_group, name, &self.subscription)
            .send()
            .await
        {
            Ok(r) => r,
            Err(e) => {
                return match map_error(e) {
                    Error::NotFound(_) => Ok(()),
                    other => Err(other),
                };
            }
        };
        let headers = resp.as_raw_response().headers().clone();
        let started = std::time::Instant::now();
        if let Some(url) = Self::async_operation(&headers) {
            let first = self.delete_times.first_wait(policy::retry_after(&headers));
            let polls = self
                .arm
                .wait_operation(
                    &url,
                    first,
                    self.polling.min_interval,
                    self.polling.default_interval,
                    self.polling.timeout,
                )
                .await
                .or_else(|e| match e {
                    Error::NotFound(_) => Ok(0),
                    e => Err(e),
                })?;
            if polls > 0 {
                self.delete_times.observe(started.elapsed(), polls, first);
            }
        }
        Ok(())
    }

    async fn list_owned(&self, tags: &BTreeMap<String, String>) -> Result<Vec<Vm>, Error> {
        let mut stream = self
            .client
            .virtual_machines_client()
            .list(&self.config.resource_group, &self.subscription)
            .into_stream();
        let mut out = Vec::new();
        while let Some(page) = stream.next().await {
            let page = page.map_err(map_error)?;
            for v in page.value {
                let vm_tags: BTreeMap<String, String> = v
                    .resource
                    .tags
                    .clone()
                    .and_then(|t| serde_json::from_value(t).ok())
                    .unwrap_or_default();
                if tags.iter().all(|(k, val)| vm_tags.get(k) == Some(val)) {
                    let state = match v
                        .properties
                        .as_ref()
                        .and_then(|p| p.provisioning_state.as_deref())
                    {
                        Some("Succeeded") => VmState::Succeeded,
                        Some("Creating") => VmState::Creating,
                        Some("Failed") => VmState::Failed,
                        Some("Deleting") => VmState::Deleting,
                        other => VmState::Other(other.unwrap_or_default().to_string()),
                    };
                    out.push(Vm {
                        name: v.resource.name.clone().unwrap_or_default(),
                        id: v.resource.id.clone().unwrap_or_default(),
                        state,
                        private_ip: None,
                        tags: vm_tags,
                    });
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
