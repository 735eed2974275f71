use clap::Parser;

fn main() {
    let cli = peerconf::cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PEERCONF_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn,peerconf=info")),
        )
        .init();
    std::process::exit(peerconf::cli::main(cli));
}
