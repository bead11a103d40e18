//! Gives the heap's free pages back to the system once a burst of starts or deletes is over.
//!
//! glibc keeps what is freed in its arenas (two, `M_ARENA_MAX`) for reuse and returns to the
//! system only a free top of the heap above the trim threshold; the transient allocations of a
//! start (libnftables re-reading our tables, which grow with the endpoints, the request and
//! response buffers, the spec) leave the arenas fragmented, so RSS kept what the busiest
//! moment needed: at N=100, 7.9 MB more held by the arenas while 1.8 MB more was in use
//! (bench/density, malloc_stats). `malloc_trim(0)` releases every free page in every arena.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

/// How long without a start or delete before the trim.
const QUIET: Duration = Duration::from_millis(200);

static CHANGES: AtomicU64 = AtomicU64::new(0);
static PENDING: AtomicBool = AtomicBool::new(false);

/// One `malloc_trim(0)` once no start or delete has come for [`QUIET`]. Cheap to call often:
/// at most one waiting task exists.
pub(super) fn trim_when_quiet() {
    CHANGES.fetch_add(1, Ordering::AcqRel);
    if PENDING.swap(true, Ordering::AcqRel) {
        return;
    }
    tokio::spawn(async {
        loop {
            let seen = CHANGES.load(Ordering::Acquire);
            tokio::time::sleep(QUIET).await;
            if CHANGES.load(Ordering::Acquire) == seen {
                break;
            }
        }
        // A call from here on starts its own task; the trim below covers it anyway.
        PENDING.store(false, Ordering::Release);
        let _ = tokio::task::spawn_blocking(|| {
            // SAFETY: malloc_trim only walks the allocator's own free lists under its locks;
            // it may be called from any thread at any time.
            unsafe { libc::malloc_trim(0) };
        })
        .await;
    });
}
