//! Pure logic of the provider. Its behaviour against ARM is tested against the in-repo ARM
//! test server in `armtest` (this module imports nothing else of the crate).

use std::time::Duration;

use super::*;

#[test]
fn the_first_wait_follows_recent_operations_but_never_precedes_retry_after() {
    let l = Learned::default();
    let ra = Some(Duration::from_secs(1));
    assert_eq!(l.first_wait(ra), ra, "nothing learned yet: what ARM asks");
    // Seen running at the 1 s poll, done at the 2 s one.
    l.observe(Duration::from_millis(2000), 2, ra);
    assert_eq!(l.first_wait(ra), Some(Duration::from_millis(2000)));
    // Done at every first poll: the guess drifts down (it only knows "at most")...
    for _ in 0..12 {
        let w = l.first_wait(ra);
        l.observe(w.unwrap() + Duration::from_millis(5), 1, w);
    }
    let w = l.first_wait(ra).unwrap();
    assert!(w < Duration::from_millis(2000), "{w:?}");
    // ...but never below what ARM asks for.
    assert!(w >= Duration::from_secs(1), "{w:?}");
}
