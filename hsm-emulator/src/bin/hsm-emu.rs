//! `hsm-emu`: the tax-server (cipher machine) emulator as its own process.
//!
//! Prints `listening <addr>` on stdout once it accepts connections (with `--pcie`, then
//! `pcie <path> queues <n>`: docs/hsm-pcie.md);
//! logs go to stderr (`RUST_LOG` filters them). See docs/hsm-emulator.md.

// mimalloc: the workers allocate one response buffer per frame from many threads, where
// glibc's malloc arenas contend.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    match hsm_emulator::run_from_args(std::env::args_os()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("hsm-emu: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
