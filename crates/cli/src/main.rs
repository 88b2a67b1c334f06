//! The `vfio-mig` command-line tool. Everything but the entry point lives in the library
//! (`src/lib.rs`), one module per command under `src/commands/`.
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    vfio_mig::main()
}
