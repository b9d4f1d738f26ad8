//! `moe-run`: the command line (see [`moe::cli`]).

fn main() -> std::process::ExitCode {
    moe::cli::main()
}
