//! Status conditions: merge a freshly computed condition into a list so that
//! `lastTransitionTime` only moves when the status flips, and tell whether anything a user
//! would see (status, reason, message, observedGeneration) changed.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;

/// The current time as a Kubernetes timestamp (whole seconds, as the API server keeps it).
pub(crate) fn now() -> Time {
    let ts = Timestamp::now();
    Time(ts.round(k8s_openapi::jiff::Unit::Second).unwrap_or(ts))
}

/// A condition with the current time as its transition time.
pub(crate) fn new(
    type_: &str,
    status: bool,
    reason: &str,
    message: impl Into<String>,
    observed_generation: Option<i64>,
) -> Condition {
    Condition {
        type_: type_.to_string(),
        status: if status { "True" } else { "False" }.to_string(),
        reason: reason.to_string(),
        message: message.into(),
        observed_generation,
        last_transition_time: now(),
    }
}

/// Whether two conditions say the same thing, timestamps aside.
pub(crate) fn same_ignoring_time(a: &Condition, b: &Condition) -> bool {
    a.type_ == b.type_
        && a.status == b.status
        && a.reason == b.reason
        && a.message == b.message
        && a.observed_generation == b.observed_generation
}

/// Puts `new` into `conditions` (replacing the condition of the same type). The old
/// `lastTransitionTime` is kept unless the status changed. Returns whether anything other
/// than timestamps changed.
pub(crate) fn merge(conditions: &mut Vec<Condition>, mut new: Condition) -> bool {
    match conditions.iter_mut().find(|c| c.type_ == new.type_) {
        Some(old) => {
            if old.status == new.status {
                new.last_transition_time = old.last_transition_time.clone();
            }
            let changed = !same_ignoring_time(old, &new);
            *old = new;
            changed
        }
        None => {
            conditions.push(new);
            true
        }
    }
}

/// The condition of `type_`, if present.
pub(crate) fn find<'a>(conditions: &'a [Condition], type_: &str) -> Option<&'a Condition> {
    conditions.iter().find(|c| c.type_ == type_)
}

/// Whether two condition lists say the same thing, timestamps aside (order ignored).
pub(crate) fn lists_equal_ignoring_time(a: &[Condition], b: &[Condition]) -> bool {
    a.len() == b.len()
        && a.iter().all(|x| {
            b.iter()
                .any(|y| y.type_ == x.type_ && same_ignoring_time(x, y))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(c: &mut Condition, secs: i64) {
        c.last_transition_time = Time(Timestamp::from_second(secs).unwrap());
    }

    #[test]
    fn same_status_keeps_transition_time_and_reports_message_change() {
        let mut old = new("InProgress", true, "Installing", "1 of 3", Some(1));
        at(&mut old, 1000);
        let mut list = vec![old];
        let changed = merge(
            &mut list,
            new("InProgress", true, "Installing", "2 of 3", Some(1)),
        );
        assert!(changed);
        assert_eq!(list.len(), 1);
        assert_eq!(list[0].message, "2 of 3");
        assert_eq!(list[0].last_transition_time.0.as_second(), 1000);
    }

    #[test]
    fn identical_condition_is_no_change() {
        let mut old = new("InProgress", false, "", "", Some(2));
        at(&mut old, 5);
        let mut list = vec![old];
        assert!(!merge(&mut list, new("InProgress", false, "", "", Some(2))));
        assert_eq!(list[0].last_transition_time.0.as_second(), 5);
    }

    #[test]
    fn status_flip_moves_transition_time() {
        let mut old = new("InProgress", true, "Installing", "", Some(1));
        at(&mut old, 5);
        let mut list = vec![old];
        assert!(merge(&mut list, new("InProgress", false, "", "", Some(1))));
        assert!(list[0].last_transition_time.0.as_second() > 5);
    }

    #[test]
    fn new_type_is_appended() {
        let mut list = vec![new("A", true, "R", "", None)];
        assert!(merge(&mut list, new("B", false, "R", "", None)));
        assert_eq!(list.len(), 2);
        assert!(find(&list, "B").is_some());
        let other = list.clone();
        assert!(lists_equal_ignoring_time(&list, &other));
    }
}
