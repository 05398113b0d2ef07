//! Integration tests of `sandboxd operator`.

use crate::harness::Case;

pub fn cases() -> Vec<Case> {
    vec![]
}
