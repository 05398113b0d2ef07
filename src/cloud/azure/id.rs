//! ARM resource ids, `/subscriptions/<id>/resourceGroups/<group>/providers/<namespace>/
//! <type>/<name>[/<type>/<name>...]`, read the way ARM reads them: segment names compared
//! without case, the text of each segment kept as written.

/// A parsed resource id, borrowing the text it was read from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ResourceId<'a> {
    /// The id as given.
    id: &'a str,
    /// The segments after the leading `/`.
    segments: Vec<&'a str>,
}

/// Segments before the resource provider namespace.
const PREFIX: usize = 5;

impl<'a> ResourceId<'a> {
    /// Reads `id`. `None` unless it names a subscription, a resource group, a resource
    /// provider namespace and at least one resource type and name, with no empty segment.
    pub(crate) fn parse(id: &'a str) -> Option<Self> {
        let segments: Vec<&str> = id.strip_prefix('/')?.split('/').collect();
        let fixed = |i: usize, name: &str| segments[i].eq_ignore_ascii_case(name);
        (segments.len() >= PREFIX + 3
            && segments.iter().all(|s| !s.is_empty())
            && fixed(0, "subscriptions")
            && fixed(2, "resourceGroups")
            && fixed(4, "providers"))
        .then_some(Self { id, segments })
    }

    /// The subscription id.
    pub(crate) fn subscription(&self) -> &'a str {
        self.segments[1]
    }

    /// The resource group.
    pub(crate) fn resource_group(&self) -> &'a str {
        self.segments[3]
    }

    /// The types and names after the namespace: `[type, name, type, name, ...]`.
    pub(crate) fn path(&self) -> &[&'a str] {
        &self.segments[PREFIX + 1..]
    }

    /// The last segment: the resource's own name (or a trailing type).
    #[cfg(test)]
    pub(crate) fn name(&self) -> &'a str {
        self.segments[self.segments.len() - 1]
    }

    /// Whether the id is of `kind`, `<namespace>/<type>[/<type>...]` such as
    /// `Microsoft.Network/virtualNetworks` or `Microsoft.Compute/galleries/images/versions`:
    /// the namespace, then each type at its place with a name after it. An id of a child
    /// resource is also of its parent's kind (a subnet is of `.../virtualNetworks`).
    pub(crate) fn is(&self, kind: &str) -> bool {
        let mut parts = kind.split('/');
        let Some(namespace) = parts.next() else {
            return false;
        };
        let types: Vec<&str> = parts.collect();
        let path = self.path();
        self.segments[PREFIX].eq_ignore_ascii_case(namespace)
            && path.len() >= 2 * types.len()
            && types
                .iter()
                .enumerate()
                .all(|(i, t)| path[2 * i].eq_ignore_ascii_case(t))
    }

    /// Whether the id is exactly a resource of `kind` (no child resource, no trailing type).
    pub(crate) fn is_exactly(&self, kind: &str) -> bool {
        self.is(kind) && self.path().len() == 2 * (kind.split('/').count() - 1)
    }

    /// The id of the resource `levels` up the chain of types (0: this one), as written.
    pub(crate) fn ancestor(&self, levels: usize) -> Option<&'a str> {
        let keep = self.segments.len().checked_sub(2 * levels)?;
        if keep < PREFIX + 3 {
            return None;
        }
        let len: usize = self.segments[..keep].iter().map(|s| s.len() + 1).sum();
        Some(&self.id[..len])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_read_without_case_and_give_back_their_text() {
        let id = ResourceId::parse(
            "/subscriptions/S1/resourcegroups/RG-a/providers/microsoft.compute/galleries/g/images/d/versions/1.0.0",
        )
        .unwrap();
        assert_eq!(id.subscription(), "S1");
        assert_eq!(id.resource_group(), "RG-a");
        assert!(id.is("Microsoft.Compute/galleries"));
        assert!(id.is_exactly("Microsoft.Compute/galleries/images/versions"));
        assert!(!id.is_exactly("Microsoft.Compute/galleries/images"));
        assert!(!id.is("Microsoft.Compute/images"));
        assert_eq!(
            id.ancestor(1),
            Some(
                "/subscriptions/S1/resourcegroups/RG-a/providers/microsoft.compute/galleries/g/images/d"
            )
        );
        assert_eq!(
            id.ancestor(2),
            Some("/subscriptions/S1/resourcegroups/RG-a/providers/microsoft.compute/galleries/g")
        );
        assert_eq!(id.ancestor(3), None);
    }

    #[test]
    fn ids_missing_a_part_or_with_an_empty_segment_are_refused() {
        for bad in [
            "",
            "subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks",
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v/",
            "/subscriptions//resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v",
            "/subscriptions/s/groups/rg/providers/Microsoft.Network/virtualNetworks/v",
        ] {
            assert!(ResourceId::parse(bad).is_none(), "{bad}");
        }
        let subnet = ResourceId::parse(
            "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/virtualNetworks/v/subnets/worker",
        )
        .unwrap();
        assert!(subnet.is("Microsoft.Network/virtualNetworks"));
        assert!(subnet.is("microsoft.network/virtualnetworks/SUBNETS"));
        let provider_id = "azure:///subscriptions/S/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/w";
        assert!(ResourceId::parse(provider_id).is_none());
        assert_eq!(subnet.name(), "worker");
    }
}
