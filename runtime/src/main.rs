//! The `colony` binary: all of it lives in the `colony_runtime` library.

/// mimalloc rather than the system allocator: a node's hot paths (broker notices, collector
/// batches, bridge forwards) allocate on one thread and free on another, where glibc's malloc
/// contends on its arena locks. Measured by the collector ingest bench (README, Benchmarks).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    colony_runtime::cli::main()
}
