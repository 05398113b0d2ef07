//! Which Azure cloud sandboxd talks to. One setting gives the ARM endpoint, the Entra ID
//! authority and the token audience together, from an allow-list of Azure's clouds
//! (public, US Government, China), all `https`. Nothing read from a ConfigMap or the
//! environment can point credentials anywhere else: an endpoint outside the allow-list
//! (the ARM test server over loopback) needs an explicit development flag on the command
//! line ([`EndpointArgs`]), never an environment variable.

use std::fmt;
use std::str::FromStr;

use azure_core::Url;

/// The `peer-pods-cm` key (and `--azure-cloud` environment variable) naming the cloud.
pub(crate) const CLOUD_KEY: &str = "AZURE_CLOUD";

/// Keys that once pointed ARM and Entra ID elsewhere. They are refused, never read: a
/// ConfigMap edit must not send the cloud credentials to another host.
pub(crate) const REFUSED_ENDPOINT_KEYS: [&str; 2] =
    ["AZURE_RESOURCE_MANAGER_ENDPOINT", "AZURE_AUTHORITY_HOST"];

/// The Azure clouds sandboxd may talk to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum AzureCloud {
    /// Azure (public).
    #[default]
    Public,
    /// Azure US Government.
    UsGovernment,
    /// Azure operated by 21Vianet (China).
    China,
}

impl AzureCloud {
    /// Every cloud, in the order documented.
    #[cfg(test)]
    pub(crate) const ALL: [AzureCloud; 3] = [Self::Public, Self::UsGovernment, Self::China];
    /// What [`CLOUD_KEY`] may hold.
    pub(crate) const EXPECTED: &'static str = "one of AzurePublicCloud, AzureUSGovernmentCloud, AzureChinaCloud (or public, usgov, china)";

    /// The canonical name (the Azure SDKs' and `az cloud list` names).
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Public => "AzurePublicCloud",
            Self::UsGovernment => "AzureUSGovernmentCloud",
            Self::China => "AzureChinaCloud",
        }
    }

    /// The ARM endpoint.
    pub(crate) fn arm_endpoint(self) -> &'static str {
        match self {
            Self::Public => "https://management.azure.com/",
            Self::UsGovernment => "https://management.usgovcloudapi.net/",
            Self::China => "https://management.chinacloudapi.cn/",
        }
    }

    /// The Entra ID authority host.
    pub(crate) fn authority_host(self) -> &'static str {
        match self {
            Self::Public => "https://login.microsoftonline.com/",
            Self::UsGovernment => "https://login.microsoftonline.us/",
            Self::China => "https://login.chinacloudapi.cn/",
        }
    }

    /// The ARM token audience (a token's scope is this plus `/.default`).
    pub(crate) fn arm_audience(self) -> &'static str {
        match self {
            Self::Public => "https://management.azure.com",
            Self::UsGovernment => "https://management.core.usgovcloudapi.net",
            Self::China => "https://management.core.chinacloudapi.cn",
        }
    }
}

impl fmt::Display for AzureCloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for AzureCloud {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "azurepubliccloud" | "azurecloud" | "public" => Ok(Self::Public),
            "azureusgovernmentcloud" | "azureusgovernment" | "usgov" | "usgovernment" => {
                Ok(Self::UsGovernment)
            }
            "azurechinacloud" | "china" => Ok(Self::China),
            _ => Err(format!("{s:?} is not {}", Self::EXPECTED)),
        }
    }
}

/// Where ARM and Entra ID are and which audience tokens carry: derived together from one
/// [`AzureCloud`], or, with an explicit development flag, from the flag's URLs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    arm: Url,
    authority: Url,
    cloud: AzureCloud,
    development: bool,
}

impl Default for Endpoints {
    fn default() -> Self {
        Self::cloud(AzureCloud::Public)
    }
}

impl Endpoints {
    /// The endpoints of `cloud` (all `https`).
    pub(crate) fn cloud(cloud: AzureCloud) -> Self {
        Self {
            arm: Url::parse(cloud.arm_endpoint()).expect("static URL"),
            authority: Url::parse(cloud.authority_host()).expect("static URL"),
            cloud,
            development: false,
        }
    }

    /// Development only: ARM and the authority at `arm` (and `authority`, default `arm`),
    /// tokens with `cloud`'s audience. Only a command-line flag may ask for this.
    pub fn development(cloud: AzureCloud, arm: Url, authority: Option<Url>) -> Self {
        Self {
            authority: authority.unwrap_or_else(|| arm.clone()),
            arm,
            cloud,
            development: true,
        }
    }

    /// The ARM endpoint.
    pub(crate) fn arm(&self) -> &Url {
        &self.arm
    }

    /// The Entra ID authority host.
    pub(crate) fn authority(&self) -> &Url {
        &self.authority
    }

    /// The cloud the audience comes from.
    pub(crate) fn azure_cloud(&self) -> AzureCloud {
        self.cloud
    }

    /// Whether a development flag replaced the cloud's endpoints.
    #[cfg(test)]
    pub(crate) fn is_development(&self) -> bool {
        self.development
    }

    /// The managed identity token endpoint: the VM's IMDS; with development endpoints,
    /// the same path on the development ARM endpoint (the ARM test server serves it).
    pub(crate) fn imds_token_url(&self) -> Url {
        if self.development {
            self.arm
                .join(super::identity::IMDS_TOKEN_PATH)
                .expect("a path joins any base")
        } else {
            Url::parse(super::identity::IMDS_TOKEN_URL).expect("static URL")
        }
    }

    /// The token scope of ARM calls: the cloud's ARM audience + `/.default`.
    pub(crate) fn arm_scope(&self) -> String {
        format!("{}/.default", self.cloud.arm_audience())
    }
}

/// Flags of every command that talks to Azure: the cloud, and the development overrides
/// that only the command line can give (they have no environment variable, so neither a
/// ConfigMap through `envFrom` nor anything else but the command line sets them).
#[derive(Clone, Debug, Default, PartialEq, Eq, clap::Args)]
pub struct EndpointArgs {
    /// Azure cloud (AzurePublicCloud, AzureUSGovernmentCloud, AzureChinaCloud); default:
    /// `AZURE_CLOUD` of `peer-pods-cm`, else the public cloud.
    #[arg(long = "azure-cloud", value_name = "CLOUD")]
    pub(crate) cloud: Option<AzureCloud>,
    /// Development only: send ARM calls (and the cloud credentials) to this URL instead of
    /// the cloud's ARM endpoint, e.g. the ARM test server over loopback. Command line only.
    #[arg(long = "dev-arm-endpoint", value_name = "URL")]
    pub(crate) dev_arm_endpoint: Option<Url>,
    /// Development only: the Entra ID authority host (default: `--dev-arm-endpoint`).
    #[arg(
        long = "dev-authority-host",
        value_name = "URL",
        requires = "dev_arm_endpoint"
    )]
    pub(crate) dev_authority_host: Option<Url>,
    /// The proxy variables (`HTTPS_PROXY`, `HTTP_PROXY`, `NO_PROXY`) to hand on as the
    /// environment of the processes that carry these flags (CAA, the image Jobs): the
    /// operator's own, which OLM sets from OpenShift's cluster-wide proxy. Not a flag.
    #[arg(skip)]
    pub(crate) proxy_env: Vec<(String, String)>,
}

impl EndpointArgs {
    /// Development endpoints at `base` (tests, demos).
    pub fn development(base: &str) -> Self {
        Self {
            cloud: None,
            dev_arm_endpoint: Some(Url::parse(base).expect("a URL")),
            dev_authority_host: None,
            proxy_env: Vec::new(),
        }
    }

    /// The same, handing on this process's proxy variables ([`EndpointArgs::proxy_env`]).
    pub(crate) fn with_proxy_env_of_this_process(mut self) -> Self {
        self.proxy_env = super::http::proxy_env();
        self
    }

    /// [`EndpointArgs::proxy_env`] as container `env` entries.
    pub(crate) fn proxy_env_entries(&self) -> Vec<serde_json::Value> {
        self.proxy_env
            .iter()
            .map(|(k, v)| serde_json::json!({"name": k, "value": v}))
            .collect()
    }

    /// The endpoints: the flag's cloud, else `configured` (from `peer-pods-cm`), else the
    /// public cloud; the development flags replace its URLs.
    pub(crate) fn resolve(&self, configured: Option<AzureCloud>) -> Endpoints {
        let cloud = self.cloud.or(configured).unwrap_or_default();
        match &self.dev_arm_endpoint {
            Some(arm) => {
                Endpoints::development(cloud, arm.clone(), self.dev_authority_host.clone())
            }
            None => Endpoints::cloud(cloud),
        }
    }

    /// The flags as command-line arguments (for a child process the caller starts).
    pub(crate) fn to_args(&self) -> Vec<String> {
        let mut out = Vec::new();
        if let Some(c) = self.cloud {
            out.extend(["--azure-cloud".to_string(), c.name().to_string()]);
        }
        if let Some(u) = &self.dev_arm_endpoint {
            out.extend(["--dev-arm-endpoint".to_string(), u.to_string()]);
        }
        if let Some(u) = &self.dev_authority_host {
            out.extend(["--dev-authority-host".to_string(), u.to_string()]);
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_cloud_gives_https_endpoints_and_its_own_audience() {
        for c in AzureCloud::ALL {
            let e = Endpoints::cloud(c);
            assert_eq!(e.arm().scheme(), "https", "{c}");
            assert_eq!(e.authority().scheme(), "https", "{c}");
            assert!(!e.is_development());
            assert_eq!(c.name().parse::<AzureCloud>().unwrap(), c);
        }
        assert_eq!(
            Endpoints::cloud(AzureCloud::Public).arm_scope(),
            "https://management.azure.com/.default"
        );
        assert_eq!(
            Endpoints::cloud(AzureCloud::UsGovernment).arm_scope(),
            "https://management.core.usgovcloudapi.net/.default"
        );
        assert_eq!(
            Endpoints::cloud(AzureCloud::China).arm_scope(),
            "https://management.core.chinacloudapi.cn/.default"
        );
        assert_eq!(
            Endpoints::cloud(AzureCloud::China).arm().as_str(),
            "https://management.chinacloudapi.cn/"
        );
        assert!("https://evil.example".parse::<AzureCloud>().is_err());
    }

    #[test]
    fn only_the_development_flags_move_the_endpoints_and_the_audience_stays_the_clouds() {
        let a = EndpointArgs::default();
        assert_eq!(a.resolve(None), Endpoints::cloud(AzureCloud::Public));
        assert_eq!(
            a.resolve(Some(AzureCloud::China)),
            Endpoints::cloud(AzureCloud::China)
        );
        let d = EndpointArgs::development("http://127.0.0.1:9/");
        let e = d.resolve(Some(AzureCloud::UsGovernment));
        assert!(e.is_development());
        assert_eq!(e.arm().as_str(), "http://127.0.0.1:9/");
        assert_eq!(e.authority().as_str(), "http://127.0.0.1:9/");
        assert_eq!(
            e.arm_scope(),
            "https://management.core.usgovcloudapi.net/.default"
        );
        assert_eq!(d.to_args(), ["--dev-arm-endpoint", "http://127.0.0.1:9/"]);
    }
}
