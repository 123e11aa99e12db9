//! Reading a device's channel (a `jmp_transport` pipe) in tests that drive drivers and bridges
//! in-process, without ptys: the channel counterpart of [`crate::Console::read_until`].

use jmp_transport::PipeRx;
use std::time::Duration;

/// Hang guard for a channel read: nothing a test waits for comes near it.
pub const GUARD: Duration = Duration::from_secs(30);

/// Reads from `rx` into `acc` until `pred` holds for everything read so far (as text). Panics,
/// showing what arrived, if the channel ends first or nothing satisfying comes within
/// [`GUARD`]; `what` names what was awaited.
pub async fn read_until(
    rx: &mut PipeRx,
    acc: &mut Vec<u8>,
    what: &str,
    pred: impl Fn(&str) -> bool,
) {
    let reading = async {
        while !pred(&String::from_utf8_lossy(acc)) {
            match rx.recv().await {
                Ok(Some(b)) => acc.extend_from_slice(&b),
                other => panic!(
                    "channel ended before {what}: {other:?}; got {:?}",
                    String::from_utf8_lossy(acc)
                ),
            }
        }
    };
    if tokio::time::timeout(GUARD, reading).await.is_err() {
        panic!(
            "no {what} within {GUARD:?} in {:?}",
            String::from_utf8_lossy(acc)
        );
    }
}

/// [`read_until`] the text contains `needle`.
pub async fn read_until_text(rx: &mut PipeRx, acc: &mut Vec<u8>, needle: &str) {
    read_until(rx, acc, &format!("{needle:?}"), |s| s.contains(needle)).await
}
