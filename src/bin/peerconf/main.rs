//! The `peerconf` binary: the admin CLI (which talks to a node's API, never to its database), the
//! node commands (`init`, `join`, `run`), `demo` and `bench`. Built on the library's public API
//! only; none of this ships in an embedder's build.

mod auth;
mod bench;
mod cli;
mod client;
mod demo;

use clap::Parser;

/// mimalloc instead of glibc's malloc: Automerge allocates and frees many small objects per
/// change, and glibc's allocator took a quarter of the driver thread's time under write load
/// (ARCHITECTURE.md, "Performance"). Embedders pick their own allocator; this is the daemon's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cli = cli::Cli::parse();
    // A client command whose reader goes away (`peerconf history user bob | grep -q ops`) ends
    // quietly, as Unix tools do, instead of panicking in `println!` on EPIPE. Rust ignores
    // SIGPIPE so that writes to a closed socket return EPIPE; the commands that serve (run,
    // setup, demo, bench) keep that. Sockets are written with MSG_NOSIGNAL on Linux, so for the
    // others only stdout and stderr raise the signal.
    #[cfg(unix)]
    if !matches!(
        cli.command,
        cli::Command::Run { .. }
            | cli::Command::Setup { .. }
            | cli::Command::Demo { .. }
            | cli::Command::Bench { .. }
    ) {
        // SAFETY: called before any other thread exists; SIG_DFL is a valid disposition.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    // The demo's nodes start together and briefly miss each other: their logs would bury what a
    // newcomer needs (PEERCONF_LOG still shows them).
    let default_filter = if matches!(cli.command, cli::Command::Demo { .. }) {
        "error"
    } else {
        "warn,peerconf=info"
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PEERCONF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter)),
        )
        .init();
    std::process::exit(cli::main(cli));
}
