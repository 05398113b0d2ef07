//! The few parts of a submitted pod the webhook reads, borrowed from the request body.
//!
//! The usual path reads the whole review in one pass ([`PodFull`]): `spec.runtimeClassName`,
//! `metadata` namespace/generateName/labels/annotation keys, and containers' names, restart
//! policies and resources, as borrowed strings; every other field is skipped unstored. A body
//! that pass cannot read is read again keeping the pod as raw text ([`PodIn`]): a pod of
//! another runtime class is then admitted without reading further, and a peer pod's fields
//! are read one by one ([`Meta`], [`containers`], [`pod_resources`]) so that the refusal
//! names the field that is wrong.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::Deserialize;
use serde::de::value::MapAccessDeserializer;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Unexpected, Visitor};
use serde_json::value::RawValue;

use crate::api::names::annotations;

/// A JSON string, borrowed from the body unless it holds escapes.
#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Str<'a>(pub(crate) Cow<'a, str>);

impl Str<'_> {
    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Str<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Str<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Str(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// `T` read only from a JSON object, or `None` from `null`: serde's derived structs would
/// also take an array, which no Kubernetes object is.
pub(crate) struct Obj<T>(pub(crate) Option<T>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Option<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(None)
            }
            fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_map(self)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Some)
            }
        }
        d.deserialize_option(V(PhantomData)).map(Obj)
    }
}

fn object<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    Obj::deserialize(d).map(|o| o.0)
}

/// The pod object, scanned once: only `spec.runtimeClassName` is read; `metadata` and the
/// resource-bearing fields are kept as raw text for a peer pod.
#[derive(Deserialize, Default)]
pub(crate) struct PodIn<'a> {
    #[serde(default, borrow)]
    pub(crate) metadata: Option<&'a RawValue>,
    #[serde(default, borrow, deserialize_with = "object")]
    pub(crate) spec: Option<SpecIn<'a>>,
}

/// The parts of a peer pod the mutation reads, parsed from a [`PodIn`].
pub(crate) struct PeerPod<'a> {
    pub(crate) meta: Meta<'a>,
    pub(crate) containers: Vec<Container<'a>>,
    pub(crate) init_containers: Vec<Container<'a>>,
    pub(crate) resources: Option<Resources<'a>>,
}

impl<'a> PeerPod<'a> {
    /// Parses what the mutation needs; errors name the field.
    pub(crate) fn parse(pod: &PodIn<'a>) -> Result<Self, FieldError> {
        let spec = pod.spec.as_ref();
        Ok(Self {
            meta: Meta::parse(pod.metadata)?,
            containers: containers(spec.and_then(|s| s.containers), "containers")?,
            init_containers: containers(spec.and_then(|s| s.init_containers), "initContainers")?,
            resources: pod_resources(spec.and_then(|s| s.resources))?,
        })
    }
}

/// The whole pod read in one pass: what [`PodIn`] and then [`PeerPod`] read, typed at once.
/// Tried first; a body it cannot read goes through [`PodIn`] for a precise answer.
#[derive(Deserialize, Default)]
pub(crate) struct PodFull<'a> {
    #[serde(default, borrow, deserialize_with = "object")]
    pub(crate) metadata: Option<Meta<'a>>,
    #[serde(default, borrow, deserialize_with = "object")]
    pub(crate) spec: Option<SpecFull<'a>>,
}

/// `spec` of a [`PodFull`].
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SpecFull<'a> {
    #[serde(default, borrow)]
    pub(crate) runtime_class_name: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub(crate) containers: Option<Vec<Obj<Container<'a>>>>,
    #[serde(default, borrow)]
    pub(crate) init_containers: Option<Vec<Obj<Container<'a>>>>,
    #[serde(default, borrow, deserialize_with = "object")]
    pub(crate) resources: Option<Resources<'a>>,
}

/// A pod as read so far: whole ([`PodFull`]) or scanned ([`PodIn`]).
pub(crate) enum PodParts<'a> {
    Full(PodFull<'a>),
    Scanned(PodIn<'a>),
}

impl<'a> PodParts<'a> {
    /// `spec.runtimeClassName`.
    pub(crate) fn runtime_class(&self) -> Option<&str> {
        match self {
            PodParts::Full(p) => p.spec.as_ref()?.runtime_class_name.as_ref(),
            PodParts::Scanned(p) => p.spec.as_ref()?.runtime_class_name.as_ref(),
        }
        .map(Str::as_str)
    }

    /// The parts the mutation reads; errors name the field.
    pub(crate) fn peer(self) -> Result<PeerPod<'a>, FieldError> {
        let full = match self {
            PodParts::Scanned(p) => return PeerPod::parse(&p),
            PodParts::Full(full) => full,
        };
        let spec = full.spec.unwrap_or_default();
        let list = |items: Option<Vec<Obj<Container<'a>>>>, list: &str| {
            items
                .unwrap_or_default()
                .into_iter()
                .enumerate()
                .map(|(i, c)| c.0.ok_or_else(|| null_container(list, i)))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(PeerPod {
            meta: full.metadata.map_or_else(Meta::default, |meta| Meta {
                present: true,
                ..meta
            }),
            containers: list(spec.containers, "containers")?,
            init_containers: list(spec.init_containers, "initContainers")?,
            resources: spec.resources,
        })
    }
}

fn null_container(list: &str, i: usize) -> FieldError {
    FieldError {
        field: format!("spec.{list}[{i}]"),
        source: de::Error::invalid_type(Unexpected::Unit, &"a container"),
    }
}

/// `spec`, as far as the webhook reads it.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct SpecIn<'a> {
    #[serde(default, borrow)]
    pub(crate) runtime_class_name: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub(crate) containers: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub(crate) init_containers: Option<&'a RawValue>,
    #[serde(default, borrow)]
    pub(crate) resources: Option<&'a RawValue>,
}

/// Why a peer pod's fields could not be read; names the field.
#[derive(Debug)]
pub(crate) struct FieldError {
    pub(crate) field: String,
    pub(crate) source: serde_json::Error,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.source)
    }
}

fn parse<'a, T: Deserialize<'a>>(
    raw: &'a RawValue,
    field: impl Fn() -> String,
) -> Result<T, FieldError> {
    serde_json::from_str(raw.get()).map_err(|source| FieldError {
        field: field(),
        source,
    })
}

/// `metadata`: where the pod is, and which labels/annotations the mutation must respect.
#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Meta<'a> {
    /// Whether `metadata` is an object (not absent or `null`).
    #[serde(skip)]
    pub(crate) present: bool,
    #[serde(default, borrow)]
    pub(crate) namespace: Option<Str<'a>>,
    #[serde(default, borrow)]
    pub(crate) generate_name: Option<Str<'a>>,
    /// `Some` when `labels` is an object.
    #[serde(default)]
    pub(crate) labels: Option<AnyObject>,
    /// `Some` when `annotations` is an object.
    #[serde(default)]
    pub(crate) annotations: Option<SizeAnnotations>,
}

impl<'a> Meta<'a> {
    /// Reads `metadata` (absent or `null` is an empty one).
    pub(crate) fn parse(raw: Option<&'a RawValue>) -> Result<Self, FieldError> {
        match raw {
            Some(raw) => Ok(match parse::<Obj<Meta>>(raw, || "metadata".into())?.0 {
                Some(meta) => Self {
                    present: true,
                    ..meta
                },
                None => Self::default(),
            }),
            None => Ok(Self::default()),
        }
    }
}

/// A JSON object whose members are not read.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct AnyObject;

impl<'de> Deserialize<'de> for AnyObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = AnyObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnyObject, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(AnyObject)
            }
        }
        d.deserialize_map(V)
    }
}

/// Which of the VM size annotations an `annotations` object already holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct SizeAnnotations {
    pub(crate) vcpus: bool,
    pub(crate) memory: bool,
    pub(crate) gpus: bool,
}

impl SizeAnnotations {
    /// Whether the annotation `key` (one of the size annotations) is set.
    pub(crate) fn has(&self, key: &str) -> bool {
        match key {
            annotations::DEFAULT_VCPUS => self.vcpus,
            annotations::DEFAULT_MEMORY => self.memory,
            annotations::DEFAULT_GPUS => self.gpus,
            _ => false,
        }
    }
}

impl<'de> Deserialize<'de> for SizeAnnotations {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = SizeAnnotations;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut seen = SizeAnnotations::default();
                while let Some(key) = map.next_key::<Str>()? {
                    map.next_value::<IgnoredAny>()?;
                    match key.as_str() {
                        annotations::DEFAULT_VCPUS => seen.vcpus = true,
                        annotations::DEFAULT_MEMORY => seen.memory = true,
                        annotations::DEFAULT_GPUS => seen.gpus = true,
                        _ => {}
                    }
                }
                Ok(seen)
            }
        }
        d.deserialize_map(V)
    }
}

/// A container or init container, as far as sizing reads it.
#[derive(Deserialize, Default, Debug)]
#[serde(rename_all = "camelCase")]
pub(crate) struct Container<'a> {
    #[serde(default, borrow)]
    pub(crate) name: Str<'a>,
    #[serde(default, borrow)]
    pub(crate) restart_policy: Option<Str<'a>>,
    #[serde(default, borrow, deserialize_with = "object")]
    pub(crate) resources: Option<Resources<'a>>,
}

/// Reads a container list (`spec.containers` or `spec.initContainers`); absent or `null` is
/// empty. Errors name the list and the index.
pub(crate) fn containers<'a>(
    raw: Option<&'a RawValue>,
    list: &'static str,
) -> Result<Vec<Container<'a>>, FieldError> {
    let Some(raw) = raw else {
        return Ok(Vec::new());
    };
    let items: Option<Vec<&RawValue>> = parse(raw, || format!("spec.{list}"))?;
    items
        .unwrap_or_default()
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let field = || format!("spec.{list}[{i}]");
            parse::<Obj<Container>>(item, field)?
                .0
                .ok_or_else(|| FieldError {
                    field: field(),
                    source: de::Error::invalid_type(Unexpected::Unit, &"a container"),
                })
        })
        .collect()
}

/// Reads pod-level `spec.resources` (absent or `null` is none).
pub(crate) fn pod_resources(raw: Option<&RawValue>) -> Result<Option<Resources<'_>>, FieldError> {
    raw.map_or(Ok(None), |raw| {
        parse::<Obj<Resources>>(raw, || "spec.resources".into()).map(|o| o.0)
    })
}

/// `resources` of a container or of the pod: quantities as text.
#[derive(Deserialize, Default, Debug)]
pub(crate) struct Resources<'a> {
    #[serde(default, borrow)]
    pub(crate) requests: Option<Amounts<'a>>,
    #[serde(default, borrow)]
    pub(crate) limits: Option<Amounts<'a>>,
    /// How many resource claims are listed.
    #[serde(default, deserialize_with = "count")]
    pub(crate) claims: usize,
}

impl Resources<'_> {
    /// Whether any request, limit or claim is set.
    pub(crate) fn has_amounts(&self) -> bool {
        self.requests.as_ref().is_some_and(|m| !m.0.is_empty())
            || self.limits.as_ref().is_some_and(|m| !m.0.is_empty())
            || self.claims > 0
    }
}

/// A resource list (`{"cpu": "500m", ...}`) in document order.
#[derive(Debug, Default)]
pub(crate) struct Amounts<'a>(pub(crate) Vec<(Str<'a>, Str<'a>)>);

impl<'de: 'a, 'a> Deserialize<'de> for Amounts<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Amounts<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of resource names to quantity strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::with_capacity(map.size_hint().unwrap_or(2));
                while let Some(entry) = map.next_entry::<Str, Str>()? {
                    out.push(entry);
                }
                Ok(Amounts(out))
            }
        }
        d.deserialize_map(V)
    }
}

/// The length of a list, `null` or absent counting as empty.
fn count<'de, D: Deserializer<'de>>(d: D) -> Result<usize, D::Error> {
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = usize;
        fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
            f.write_str("a list")
        }
        fn visit_unit<E: de::Error>(self) -> Result<usize, E> {
            Ok(0)
        }
        fn visit_none<E: de::Error>(self) -> Result<usize, E> {
            Ok(0)
        }
        fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<usize, D::Error> {
            d.deserialize_seq(self)
        }
        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<usize, A::Error> {
            let mut n = 0;
            while seq.next_element::<IgnoredAny>()?.is_some() {
                n += 1;
            }
            Ok(n)
        }
    }
    d.deserialize_option(V)
}
