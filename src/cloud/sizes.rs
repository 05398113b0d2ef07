//! Instance size selection (DESIGN §6): the `machine_type` annotation if set (it must be an
//! allowed size); else, when vCPUs or memory are requested, the smallest allowed size that
//! fits what was given (an unset dimension counts as 0); else the default size.
//!
//! DESIGN §6 (and upstream) fall back to the default size unless *both* are set; a pod that
//! only asks for 4 vCPUs would then get the (possibly 2-vCPU) default. Treating the unset
//! dimension as 0 gives the user the smallest size that honours what they asked for.
//!
//! "Smallest" is decided over every allowed size that fits, ordered by GPUs, memory, then
//! vCPUs, then name: no sorted-list search that can skip a fitting size, and no GPU size for
//! a pod that asks for none while another fits.
//!
//! GPUs (`default_gpus`, `default_gpu_model` annotations) choose among the allowed sizes
//! with at least that many GPUs; a model keeps the sizes with that GPU ([`gpu_model`]):
//! newer Azure sizes carry it as a part of the name (`Standard_NC24ads_A100_v4`,
//! `Standard_NC4as_T4_v3`), older series only by family (NCv3 and NDv2: V100, ND A100 v4:
//! A100, NVv3: M60, NVv4: MI25).

use super::VmSize;

/// What a pod asks for, from the shim's annotations.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SizeRequest {
    /// `machine_type`, if set.
    pub machine_type: Option<String>,
    /// `default_vcpus`; 0 when unset.
    pub vcpus: u32,
    /// `default_memory` in MiB; 0 when unset.
    pub memory_mib: u64,
    /// GPUs (`default_gpus`); 0: none asked.
    pub gpus: u32,
    /// GPU model (`default_gpu_model`), matched in the size name.
    pub gpu_model: Option<String>,
}

/// Why no size could be chosen.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The requested `machine_type` is not an allowed size.
    #[error("instance size {requested:?} is not allowed; allowed sizes: {}", .allowed.join(", "))]
    NotAllowed {
        /// The requested size.
        requested: String,
        /// The allowed sizes.
        allowed: Vec<String>,
    },
    /// No allowed size has that many GPUs (of that model).
    #[error("no allowed instance size has {gpus} GPUs{}; allowed sizes: {}", .model.as_ref().map(|m| format!(" of model {m}")).unwrap_or_default(), .allowed.join(", "))]
    NoGpuFits {
        /// Requested GPUs.
        gpus: u32,
        /// Requested model.
        model: Option<String>,
        /// The allowed sizes with their GPUs.
        allowed: Vec<String>,
    },
    /// No allowed size has that many vCPUs and that much memory.
    #[error("no allowed instance size has {vcpus} vCPUs and {memory_mib} MiB; allowed sizes: {}", .allowed.join(", "))]
    NoneFits {
        /// Requested vCPUs.
        vcpus: u32,
        /// Requested memory in MiB.
        memory_mib: u64,
        /// The allowed sizes with their resources.
        allowed: Vec<String>,
    },
}

impl Error {
    /// Low-cardinality label for metrics.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::NotAllowed { .. } => "size_not_allowed",
            Error::NoneFits { .. } => "no_size_fits",
            Error::NoGpuFits { .. } => "no_gpu_size_fits",
        }
    }
}

impl SizeRequest {
    /// Reads the request from the shim's annotation values ("0" or missing = unset).
    pub fn from_annotations(
        machine_type: Option<&str>,
        vcpus: Option<&str>,
        memory_mib: Option<&str>,
    ) -> Self {
        let num = |v: Option<&str>| v.and_then(|s| s.trim().parse::<u64>().ok()).unwrap_or(0);
        Self {
            machine_type: machine_type
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string),
            vcpus: u32::try_from(num(vcpus)).unwrap_or(u32::MAX),
            memory_mib: num(memory_mib),
            ..Default::default()
        }
    }

    /// The same request with the `default_gpus` and `default_gpu_model` annotation values.
    pub fn with_gpus(mut self, gpus: Option<&str>, model: Option<&str>) -> Self {
        self.gpus = gpus.and_then(|s| s.trim().parse::<u32>().ok()).unwrap_or(0);
        self.gpu_model = model
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_string);
        self
    }
}

/// Chooses the instance size for `req` among `allowed` (which contains `default`).
pub fn select(req: &SizeRequest, default: &str, allowed: &[VmSize]) -> Result<String, Error> {
    if let Some(mt) = &req.machine_type {
        return allowed
            .iter()
            .find(|s| s.name.eq_ignore_ascii_case(mt))
            .map(|s| s.name.clone())
            .ok_or_else(|| Error::NotAllowed {
                requested: mt.clone(),
                allowed: allowed.iter().map(|s| s.name.clone()).collect(),
            });
    }
    let gpu = req.gpus > 0 || req.gpu_model.is_some();
    let gpu_fits = |s: &&VmSize| {
        s.gpus >= req.gpus.max(u32::from(gpu))
            && req.gpu_model.as_ref().is_none_or(|m| {
                gpu_model(&s.name).is_some_and(|g| g.eq_ignore_ascii_case(m.trim()))
            })
    };
    if gpu && !allowed.iter().any(|s| gpu_fits(&s)) {
        return Err(Error::NoGpuFits {
            gpus: req.gpus.max(1),
            model: req.gpu_model.clone(),
            allowed: allowed
                .iter()
                .map(|s| format!("{} ({} GPUs)", s.name, s.gpus))
                .collect(),
        });
    }
    if gpu || req.vcpus > 0 || req.memory_mib > 0 {
        return allowed
            .iter()
            .filter(|s| !gpu || gpu_fits(s))
            .filter(|s| s.vcpus >= req.vcpus && s.memory_mib >= req.memory_mib)
            .min_by(|a, b| {
                (a.gpus, a.memory_mib, a.vcpus, &a.name).cmp(&(
                    b.gpus,
                    b.memory_mib,
                    b.vcpus,
                    &b.name,
                ))
            })
            .map(|s| s.name.clone())
            .ok_or_else(|| Error::NoneFits {
                vcpus: req.vcpus,
                memory_mib: req.memory_mib,
                allowed: allowed
                    .iter()
                    .map(|s| format!("{} ({} vCPUs, {} MiB)", s.name, s.vcpus, s.memory_mib))
                    .collect(),
            });
    }
    Ok(default.to_string())
}

/// GPU models Azure writes into a size's name as a part of its own (`_A100_`, `_T4_`).
const MODELS_IN_NAMES: &[&str] = &[
    "A10", "A100", "H100", "H200", "GB200", "T4", "V100", "V620", "MI300X", "L4", "L40S",
];

/// The GPU model of an Azure size, by its name: a model written as a part of the name
/// (`Standard_NC24ads_A100_v4` → A100; "A10" never matches "A100"), else the series the
/// name belongs to (`Standard_NC6s_v3` → V100). `None` for a size without a known GPU.
pub fn gpu_model(size: &str) -> Option<&'static str> {
    let upper = size.to_ascii_uppercase();
    let parts: Vec<&str> = upper.split('_').collect();
    if let Some(m) = MODELS_IN_NAMES.iter().find(|m| parts.contains(m)) {
        return Some(m);
    }
    // `Standard_<family><vcpus><features>[_<version>]`.
    let (Some(core), version) = (parts.get(1), parts.get(2).copied()) else {
        return None;
    };
    let family: String = core.chars().take_while(char::is_ascii_alphabetic).collect();
    let features: String = core
        .chars()
        .skip_while(char::is_ascii_alphabetic)
        .skip_while(char::is_ascii_digit)
        .collect();
    match (family.as_str(), features.as_str(), version) {
        // NCv3 (`NC6s_v3`…`NC24rs_v3`) and NDv2 (`ND40rs_v2`): Tesla V100.
        ("NC", "S" | "RS", Some("V3")) | ("ND", "RS", Some("V2")) => Some("V100"),
        // ND A100 v4 (`ND96asr_v4`).
        ("ND", "ASR", Some("V4")) => Some("A100"),
        // NVv3 (`NV12s_v3`): Tesla M60.
        ("NV", "S", Some("V3")) => Some("M60"),
        // NVv4 (`NV4as_v4`): Radeon Instinct MI25.
        ("NV", "AS", Some("V4")) => Some("MI25"),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(name: &str, vcpus: u32, memory_mib: u64) -> VmSize {
        VmSize {
            name: name.into(),
            vcpus,
            memory_mib,
            gpus: 0,
        }
    }

    fn allowed() -> Vec<VmSize> {
        vec![
            size("Standard_D8as_v5", 8, 32768),
            size("Standard_DC2as_v5", 2, 8192),
            size("Standard_B2als_v2", 2, 4096),
            // More memory than F4 but fewer cores: a memory-sorted binary search for
            // (4 vCPU, 4 GiB) lands here, sees too few cores and misses F4 and D4.
            size("Standard_E2as_v5", 2, 16384),
            size("Standard_F4s_v2", 4, 8192),
            size("Standard_D4as_v5", 4, 16384),
        ]
    }

    type Row = (
        &'static str,
        Option<&'static str>,
        u32,
        u64,
        Result<&'static str, &'static str>,
    );

    #[test]
    fn size_selection_table() {
        let cases: &[Row] = &[
            (
                "nothing requested: default",
                None,
                0,
                0,
                Ok("Standard_B2als_v2"),
            ),
            (
                "machine type wins over resources",
                Some("Standard_D8as_v5"),
                1,
                1,
                Ok("Standard_D8as_v5"),
            ),
            (
                "machine type is case-insensitive",
                Some("standard_f4s_v2"),
                0,
                0,
                Ok("Standard_F4s_v2"),
            ),
            (
                "machine type outside the list",
                Some("Standard_NC6"),
                0,
                0,
                Err("Standard_NC6"),
            ),
            ("exact fit", None, 2, 4096, Ok("Standard_B2als_v2")),
            (
                "smallest memory that fits",
                None,
                2,
                5000,
                Ok("Standard_DC2as_v5"),
            ),
            (
                "ties on memory break on vCPUs",
                None,
                1,
                8192,
                Ok("Standard_DC2as_v5"),
            ),
            (
                "cores force a bigger size than memory alone",
                None,
                4,
                4096,
                Ok("Standard_F4s_v2"),
            ),
            (
                "memory beyond every 4-core but D8",
                None,
                4,
                20000,
                Ok("Standard_D8as_v5"),
            ),
            ("nothing fits", None, 16, 1024, Err("16 vCPUs")),
            (
                "only vCPUs set: smallest size with that many cores",
                None,
                4,
                0,
                Ok("Standard_F4s_v2"),
            ),
            (
                "only memory set: smallest size with that much memory",
                None,
                0,
                9000,
                Ok("Standard_E2as_v5"),
            ),
            (
                "only vCPUs set, beyond every size",
                None,
                16,
                0,
                Err("16 vCPUs"),
            ),
        ];
        for (what, mt, vcpus, mem, want) in cases {
            let req = SizeRequest {
                machine_type: mt.map(str::to_string),
                vcpus: *vcpus,
                memory_mib: *mem,
                ..Default::default()
            };
            let got = select(&req, "Standard_B2als_v2", &allowed());
            match (want, got) {
                (Ok(w), Ok(g)) => assert_eq!(&g, w, "{what}"),
                (Err(fragment), Err(e)) => {
                    let text = e.to_string();
                    assert!(text.contains(fragment), "{what}: {text}");
                    assert!(
                        text.contains("Standard_D4as_v5"),
                        "{what}: names allowed sizes: {text}"
                    );
                }
                (w, g) => panic!("{what}: want {w:?}, got {g:?}"),
            }
        }
    }

    #[test]
    fn smallest_fit_is_found_whatever_the_input_order() {
        let mut sizes = allowed();
        for rotation in 0..sizes.len() {
            sizes.rotate_left(1);
            let req = SizeRequest {
                machine_type: None,
                vcpus: 4,
                memory_mib: 4096,
                ..Default::default()
            };
            assert_eq!(
                select(&req, "Standard_B2als_v2", &sizes).unwrap(),
                "Standard_F4s_v2",
                "rotation {rotation}"
            );
        }
    }

    #[test]
    fn annotation_values_of_zero_or_garbage_mean_unset() {
        let r = SizeRequest::from_annotations(Some(""), Some("0"), Some("x"));
        assert_eq!(r, SizeRequest::default());
        let r = SizeRequest::from_annotations(Some(" Standard_F4s_v2 "), Some("3"), Some("5120"));
        assert_eq!(r.machine_type.as_deref(), Some("Standard_F4s_v2"));
        assert_eq!((r.vcpus, r.memory_mib), (3, 5120));
    }

    #[test]
    fn gpu_models_come_from_the_name_or_the_series() {
        for (size, model) in [
            ("Standard_NC24ads_A100_v4", Some("A100")),
            ("Standard_NV36ads_A10_v5", Some("A10")),
            ("Standard_NC4as_T4_v3", Some("T4")),
            ("Standard_NCC40ads_H100_v5", Some("H100")),
            ("Standard_ND96isr_MI300X_v5", Some("MI300X")),
            ("Standard_NC6s_v3", Some("V100")),
            ("Standard_NC24rs_v3", Some("V100")),
            ("Standard_ND40rs_v2", Some("V100")),
            ("Standard_ND96asr_v4", Some("A100")),
            ("Standard_NV12s_v3", Some("M60")),
            ("Standard_NV4as_v4", Some("MI25")),
            ("Standard_DC2as_v5", None),
            ("Standard_NC4as_v3", None),
            ("Standard_D4as_v5", None),
            ("odd", None),
        ] {
            assert_eq!(gpu_model(size), model, "{size}");
        }
    }

    #[test]
    fn series_named_sizes_are_chosen_by_their_gpu_model() {
        let sizes = vec![
            VmSize {
                gpus: 1,
                ..size("Standard_NC6s_v3", 6, 114688)
            },
            VmSize {
                gpus: 1,
                ..size("Standard_NC4as_T4_v3", 4, 28672)
            },
        ];
        let req = SizeRequest::default().with_gpus(Some("1"), Some("v100"));
        assert_eq!(select(&req, "d", &sizes).unwrap(), "Standard_NC6s_v3");
    }

    #[test]
    fn gpus_choose_among_allowed_gpu_sizes_and_plain_pods_get_no_gpu_size() {
        let gpu = |name: &str, vcpus, mem, gpus| VmSize {
            gpus,
            ..size(name, vcpus, mem)
        };
        let mut sizes = allowed();
        sizes.extend([
            gpu("Standard_NC4as_T4_v3", 4, 28672, 1),
            gpu("Standard_NC24ads_A100_v4", 24, 225280, 1),
            gpu("Standard_NC48ads_A100_v4", 48, 450560, 2),
        ]);
        let req = |g: Option<&str>, m: Option<&str>| {
            SizeRequest::from_annotations(None, None, None).with_gpus(g, m)
        };
        assert_eq!(
            select(&req(Some("1"), None), "d", &sizes).unwrap(),
            "Standard_NC4as_T4_v3"
        );
        assert_eq!(
            select(&req(Some("1"), Some("a100")), "d", &sizes).unwrap(),
            "Standard_NC24ads_A100_v4"
        );
        assert_eq!(
            select(&req(Some("2"), None), "d", &sizes).unwrap(),
            "Standard_NC48ads_A100_v4"
        );
        assert_eq!(
            select(&req(None, Some("T4")), "d", &sizes).unwrap(),
            "Standard_NC4as_T4_v3",
            "a model alone asks for one GPU"
        );
        let err = select(&req(Some("4"), None), "d", &sizes)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("4 GPUs") && err.contains("Standard_NC48ads_A100_v4 (2 GPUs)"),
            "{err}"
        );
        // "A10" is a model of its own, not a prefix of A100.
        assert!(matches!(
            select(&req(Some("1"), Some("A10")), "d", &sizes),
            Err(Error::NoGpuFits { .. })
        ));
        let err = select(&req(Some("1"), Some("H100")), "d", &sizes)
            .unwrap_err()
            .to_string();
        assert!(err.contains("model H100"), "{err}");
        // 4 vCPUs and 20 GiB fit the T4 size too, but a pod without GPUs gets none.
        let plain = SizeRequest {
            vcpus: 4,
            memory_mib: 16384,
            ..Default::default()
        };
        assert_eq!(select(&plain, "d", &sizes).unwrap(), "Standard_D4as_v5");
        assert_eq!(select(&req(Some("0"), None), "d", &sizes).unwrap(), "d");
    }
}
