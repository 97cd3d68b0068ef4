//! The allocator of the lockstep binaries (`lockstep`, `lockstep-replica`): mimalloc, which
//! spends fewer instructions per allocation than glibc's malloc on the write path, with its
//! arena committed as it is used (docs/benchmarks.md, "Allocator").

pub use mimalloc::MiMalloc as Allocator;

/// `mi_option_arena_eager_commit` (entry 4 of mimalloc 2's `mi_option_t`; the sys crate names
/// no constant for it).
const ARENA_EAGER_COMMIT: libmimalloc_sys::mi_option_t = 4;

/// Commit mimalloc's arena page by page as it is used, not eagerly. With eager commit (its
/// default on Linux) freed memory stayed resident: a replica at rest was 10–15 MiB larger than
/// with glibc's malloc. Runs before `main` ([`global_allocator!`]): Rust's runtime allocates
/// before `main`, and the first allocation reserves the arena with the option as it is then.
pub extern "C" fn commit_on_demand() {
    // SAFETY: sets a process-wide integer option; mimalloc reads it when it reserves an arena.
    unsafe { libmimalloc_sys::mi_option_set(ARENA_EAGER_COMMIT, 0) }
}

/// Makes [`Allocator`] the binary's global allocator and, on Linux, has the dynamic loader
/// call [`commit_on_demand`] before the first allocation (an `.init_array` entry).
#[macro_export]
macro_rules! global_allocator {
    () => {
        #[global_allocator]
        static GLOBAL: $crate::allocator::Allocator = $crate::allocator::Allocator;

        #[cfg(target_os = "linux")]
        #[used]
        #[unsafe(link_section = ".init_array")]
        static COMMIT_ON_DEMAND: extern "C" fn() = $crate::allocator::commit_on_demand;
    };
}
