//! The Azure provider. Compute calls go through `azure_mgmt_compute` (its models and its
//! request builders' `send()`, never its LRO loop, which re-sends the PUT and sleeps 30 s
//! by default); the NIC's private IP and the operations go through [`arm::Arm`], the one
//! ARM client, whose pipeline the SDK's client shares: one [`policy::ArmPolicy`] carries
//! sandboxd's retry and rate manners for both; the SDK's own retries are off.

pub mod arm;
pub mod body;
pub mod cloud;
pub mod http;
pub mod id;
pub mod identity;
pub mod permissions;
pub mod policy;
pub mod settings;
pub mod skus;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use azure_mgmt_compute::package_2024_07_01 as compute;
use futures::StreamExt;

use super::{Error, Provider, Vm, VmSize, VmSpec, VmState};
pub use arm::{Arm, ArmError, Polling};
pub use cloud::{AzureCloud, EndpointArgs, Endpoints};
pub use http::HttpSettings;
pub use id::ResourceId;
pub use policy::Manners;
pub use settings::{
    AzureConfig, AzureCredentials, OS_DISK_CACHING, OS_DISK_TYPES, TAG_NAME_FORBIDDEN,
};

/// The Azure provider.
pub struct AzureProvider {
    client: compute::Client,
    arm: Arm,
    subscription: String,
    config: AzureConfig,
    polling: Polling,
    /// How long recent creates took: the first poll of a new one waits that long.
    create_times: Learned,
    /// How long recent deletes took.
    delete_times: Learned,
    /// The SSH key of VMs when CAA was given none ([`body::throwaway_ssh_key`]).
    fallback_ssh_key: String,
    /// The zones each allowed size may be created in (from [`Provider::sizes`]).
    zones: std::sync::Mutex<std::collections::HashMap<String, Vec<String>>>,
    /// Creates so far, to spread VMs over the zones.
    creates: std::sync::atomic::AtomicUsize,
    /// What each image used so far declares (image definitions' features cannot change).
    image_security: std::sync::Mutex<std::collections::HashMap<String, body::ImageSecurity>>,
}

/// The gallery API version of the image definition read.
const GALLERY_API: &str = "2023-07-03";

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
    // A transport failure: its causes say what happened (refused, TLS, timeout).
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let cause = s.to_string();
        if !text.contains(&cause) {
            text = format!("{text}: {cause}");
        }
        source = s.source();
    }
    text
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

impl AzureProvider {
    /// Builds the provider: one ARM client, the compute SDK's client on its pipeline.
    pub fn new(
        subscription: &str,
        credentials: &AzureCredentials,
        config: AzureConfig,
        endpoints: Endpoints,
        manners: Manners,
        polling: Polling,
    ) -> Result<Self, Error> {
        Self::with_http(
            subscription,
            credentials,
            config,
            endpoints,
            manners,
            polling,
            &HttpSettings::from_env(),
        )
    }

    /// [`AzureProvider::new`] sending through `http` instead of the process's settings.
    pub fn with_http(
        subscription: &str,
        credentials: &AzureCredentials,
        config: AzureConfig,
        endpoints: Endpoints,
        manners: Manners,
        polling: Polling,
        http: &HttpSettings,
    ) -> Result<Self, Error> {
        let arm =
            Arm::with_http(credentials, &endpoints, manners, http)?.with_polling(polling.clone());
        Ok(Self {
            client: arm.compute(),
            arm,
            subscription: subscription.to_string(),
            config,
            polling,
            create_times: Learned::default(),
            delete_times: Learned::default(),
            fallback_ssh_key: body::throwaway_ssh_key(),
            image_security: Default::default(),
            zones: Default::default(),
            creates: Default::default(),
        })
    }

    /// What the retry policy did so far.
    pub fn counters(&self) -> Arc<policy::Counters> {
        self.arm.counters()
    }

    /// The serial console log of VM `name` (boot diagnostics).
    pub async fn serial_log(&self, name: &str) -> Result<String, Error> {
        let id = format!(
            "/subscriptions/{}/resourceGroups/{}/providers/Microsoft.Compute/virtualMachines/{name}",
            self.subscription, self.config.resource_group
        );
        Ok(self.arm.serial_log(&id).await?)
    }

    /// The settings this provider creates VMs with.
    pub fn config(&self) -> &AzureConfig {
        &self.config
    }

    /// The zone of the next VM of `size`: the configured zones it may use, in turn (one
    /// zone: pinned); none without `AZURE_ZONES`.
    fn zone_for(&self, size: &str) -> Option<String> {
        if self.config.zones.is_empty() {
            return None;
        }
        let zones = self
            .zones
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&size.to_ascii_lowercase())
            .cloned()
            .filter(|z| !z.is_empty())
            .unwrap_or_else(|| self.config.zones.clone());
        let n = self
            .creates
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Some(zones[n % zones.len()].clone())
    }

    /// What the image of a plain VM declares (one read of its gallery image definition per
    /// image, in the subscription's galleries or as a shared or community gallery image): a
    /// plain VM gets Trusted Launch only when its image declares it.
    async fn image_security(&self, image_id: &str) -> Result<body::ImageSecurity, Error> {
        if !self.config.disable_cvm {
            return Ok(body::ImageSecurity::default());
        }
        let known = self
            .image_security
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(image_id)
            .copied();
        if let Some(s) = known {
            return Ok(s);
        }
        let security =
            match body::gallery_definition(image_id, &self.subscription, &self.config.region) {
                Some(def) => match self
                    .arm
                    .get(&format!("{def}?api-version={GALLERY_API}"))
                    .await?
                {
                    Some(d) => body::ImageSecurity::of_definition(&d),
                    None => body::ImageSecurity::default(),
                },
                None => body::ImageSecurity::default(),
            };
        if self.config.secure_boot && !security.allows_trusted_launch() {
            tracing::warn!(
                image = image_id,
                "ENABLE_SECURE_BOOT is set but the image does not declare Trusted Launch (SecurityType TrustedLaunchSupported): its VMs are created without a security profile"
            );
        }
        self.image_security
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(image_id.to_string(), security);
        Ok(security)
    }

    /// `v` with the private IP of its NIC once it is provisioned (one more read).
    async fn vm_of(&self, v: compute::models::VirtualMachine) -> Result<Vm, Error> {
        let mut vm = vm_without_ip(&v);
        if vm.state == VmState::Succeeded
            && let Some(nic) = primary_nic(&v)
        {
            (vm.private_ip, vm.public_ip) = self
                .arm
                .nic_addresses(&nic, self.config.use_public_ip)
                .await?;
        }
        Ok(vm)
    }
}

/// The id of a VM's primary NIC, from its `networkProfile.networkInterfaces` (ARM does not
/// promise the name of a NIC it creates from a NIC configuration).
fn primary_nic(v: &compute::models::VirtualMachine) -> Option<String> {
    let nics = &v
        .properties
        .as_ref()?
        .network_profile
        .as_ref()?
        .network_interfaces;
    nics.iter()
        .find(|n| n.properties.as_ref().and_then(|p| p.primary) == Some(true))
        .or(nics.first())
        .and_then(|n| n.sub_resource.id.clone())
}

/// A VM as ARM describes it, without its private IP (its NIC's, another read).
fn vm_without_ip(v: &compute::models::VirtualMachine) -> Vm {
    let state = match v
        .properties
        .as_ref()
        .and_then(|p| p.provisioning_state.as_deref())
    {
        Some("Succeeded") => VmState::Succeeded,
        Some("Creating") | Some("Updating") => VmState::Creating,
        Some("Failed") => VmState::Failed,
        Some("Deleting") => VmState::Deleting,
        other => VmState::Other(other.unwrap_or_default().to_string()),
    };
    Vm {
        name: v.resource.name.clone().unwrap_or_default(),
        id: v.resource.id.clone().unwrap_or_default(),
        state,
        private_ip: None,
        public_ip: None,
        tags: tags_of(v),
    }
}

/// The tags of a VM.
fn tags_of(v: &compute::models::VirtualMachine) -> BTreeMap<String, String> {
    v.resource
        .tags
        .clone()
        .and_then(|t| serde_json::from_value(t).ok())
        .unwrap_or_default()
}

/// The status and headers of an SDK answer, for [`Arm::wait`].
fn answer_of(raw: &azure_core::Response) -> arm::Answer {
    arm::Answer {
        status: raw.status(),
        headers: raw.headers().clone(),
        body: serde_json::Value::Null,
    }
}

#[async_trait::async_trait]
impl Provider for AzureProvider {
    fn name(&self) -> &'static str {
        "azure"
    }

    async fn sizes(&self, names: &[String]) -> Result<Vec<VmSize>, Error> {
        let region = &self.config.region;
        let path = format!(
            "/subscriptions/{}/providers/Microsoft.Compute/skus?api-version={}&$filter={}",
            self.subscription,
            skus::SKUS_API,
            url::form_urlencoded::byte_serialize(format!("location eq '{region}'").as_bytes())
                .collect::<String>()
        );
        let offered: Vec<skus::Sku> = self
            .arm
            .list(&path)
            .await?
            .iter()
            .filter_map(|v| skus::parse(v, region))
            .collect();
        let mut out = Vec::new();
        let mut refused = Vec::new();
        let mut zones = self.zones.lock().unwrap_or_else(|e| e.into_inner());
        for n in names {
            let Some(sku) = offered.iter().find(|s| s.name.eq_ignore_ascii_case(n)) else {
                refused.push(format!("size {n} is not offered in region {region}"));
                continue;
            };
            match sku.usable_zones(region, &self.config.zones, &self.config.os_disk_type) {
                Ok(z) => {
                    zones.insert(n.to_ascii_lowercase(), z);
                    out.push(VmSize {
                        name: n.clone(),
                        vcpus: sku.vcpus,
                        memory_mib: sku.memory_mib,
                        gpus: sku.gpus,
                    });
                }
                Err(e) => refused.push(e),
            }
        }
        if !refused.is_empty() {
            return Err(Error::Permanent(format!(
                "AZURE_INSTANCE_SIZES cannot be used: {}",
                refused.join("; ")
            )));
        }
        Ok(out)
    }

    async fn create(&self, spec: &VmSpec) -> Result<Vm, Error> {
        body::check_user_data(spec).map_err(Error::Permanent)?;
        let image_security = self.image_security(&spec.image_id).await?;
        let mut model = body::vm_model(spec, &self.config, &self.fallback_ssh_key, image_security);
        if let Some(zone) = self.zone_for(&spec.size) {
            model.zones = vec![zone];
        }
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
        let answer = answer_of(resp.as_raw_response());
        let vm = resp.into_body().await.map_err(map_error)?;
        let started = std::time::Instant::now();
        let state = vm
            .properties
            .as_ref()
            .and_then(|p| p.provisioning_state.clone());
        if state.as_deref() != Some("Succeeded") {
            let first = self
                .create_times
                .first_wait(policy::retry_after(&answer.headers));
            let what = format!("creating VM {}", spec.name);
            match self.arm.wait(&what, &answer, first).await? {
                Some(polls) => self.create_times.observe(started.elapsed(), polls, first),
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
        // The operation succeeded, so the VM is provisioned. Its NIC is named by ARM: the
        // create's answer names it; an answer that did not costs one read of the VM.
        let nic = match primary_nic(&vm) {
            Some(nic) => nic,
            None => {
                let v = self
                    .client
                    .virtual_machines_client()
                    .get(&self.config.resource_group, &spec.name, &self.subscription)
                    .await
                    .map_err(map_error)?;
                primary_nic(&v).ok_or_else(|| {
                    Error::Transient(format!("VM {} has no network interface yet", spec.name))
                })?
            }
        };
        let (private_ip, public_ip) = self
            .arm
            .nic_addresses(&nic, self.config.use_public_ip)
            .await?;
        if self.config.use_public_ip && public_ip.is_none() {
            return Err(Error::Transient(format!(
                "VM {} has no public IP address yet",
                spec.name
            )));
        }
        let Some(private_ip) = private_ip else {
            return Err(Error::Transient(format!(
                "VM {} has no private IP yet",
                spec.name
            )));
        };
        let tags = tags_of(&vm);
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
            public_ip,
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
        let answer = answer_of(resp.as_raw_response());
        let started = std::time::Instant::now();
        let first = self
            .delete_times
            .first_wait(policy::retry_after(&answer.headers));
        match self
            .arm
            .wait(&format!("deleting VM {name}"), &answer, first)
            .await
        {
            Ok(Some(polls)) => self.delete_times.observe(started.elapsed(), polls, first),
            // Nothing to follow, or the operation is already gone with the VM.
            Ok(None) => {}
            Err(e) if e.status() == Some(404) => {}
            Err(e) => return Err(e.into()),
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
            for v in &page.value {
                let vm = vm_without_ip(v);
                if tags.iter().all(|(k, val)| vm.tags.get(k) == Some(val)) {
                    out.push(vm);
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
