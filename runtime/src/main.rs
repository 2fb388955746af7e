//! The `colony` binary: all of it lives in the `colony_runtime` library.

fn main() -> std::process::ExitCode {
    colony_runtime::cli::main()
}
