//! The `wsbeat` binary: command line, logging, configuration (exit 64 when it is bad),
//! then the library's `run`; and `wsbeat demo` (module `demo`), which is not part of the
//! library: the library is the proxy.
#![forbid(unsafe_code)]

mod demo;

use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use wsbeat::config::{Config, ConfigError, UpstreamUrl};
use wsbeat::reload::Source;

/// Exit code for a configuration error (EX_USAGE in sysexits.h).
const EXIT_CONFIG: u8 = 64;

/// A WebSocket reverse proxy that adds heartbeats and dead-peer detection.
#[derive(Parser)]
#[command(name = "wsbeat", version, about)]
struct Cli {
    /// Configuration file (YAML).
    #[arg(long, global = true, env = "WSBEAT_CONFIG")]
    config: Option<PathBuf>,
    /// Public listener address; overrides `listen`.
    #[arg(long)]
    listen: Option<String>,
    /// Upstream URL (ws://host:port); overrides `upstream.url`.
    #[arg(long)]
    upstream: Option<String>,
    /// Admin listener address, or `off`; overrides `admin.listen`.
    #[arg(long)]
    admin_listen: Option<String>,
    /// Log format: `text` for people, `json` for log pipelines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Validate the configuration and print the effective config as YAML.
    Check {
        /// Also show which route a request path maps to (repeatable), e.g.
        /// `--route /ws/chat/1`; printed as YAML comments after the config. Paths are
        /// matched on their canonical form, as requests are.
        #[arg(long = "route", value_name = "PATH")]
        routes: Vec<String>,
    },
    /// Run an echo backend with wsbeat in front of it, for a first look.
    Demo {
        /// Where the demo proxy listens.
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
    },
}

/// The command-line settings that override the file's, at start-up and at every reload.
#[derive(Clone)]
struct Overrides {
    listen: Option<String>,
    upstream: Option<String>,
    admin_listen: Option<String>,
}

/// Where the configuration comes from: the file and the overrides. Made before anything
/// listens: from then on SIGHUP reloads instead of ending the process.
fn source(cli: &Cli) -> Source {
    let overrides = Overrides {
        listen: cli.listen.clone(),
        upstream: cli.upstream.clone(),
        admin_listen: cli.admin_listen.clone(),
    };
    Source::new(cli.config.clone(), move |config| {
        apply_overrides(&overrides, config)
    })
}

fn apply_overrides(cli: &Overrides, mut config: Config) -> Result<Config, ConfigError> {
    if let Some(listen) = &cli.listen {
        config.listen = listen.parse().map_err(|e| ConfigError::Invalid {
            key: "--listen".into(),
            reason: format!("`{listen}` is not an address like 0.0.0.0:8080 ({e})"),
        })?;
    }
    if let Some(url) = &cli.upstream {
        config.upstream.url =
            url.parse::<UpstreamUrl>()
                .map_err(|reason| ConfigError::Invalid {
                    key: "--upstream".into(),
                    reason,
                })?;
    }
    if let Some(admin) = &cli.admin_listen {
        config.admin.listen = match admin.as_str() {
            "off" => None,
            addr => Some(addr.parse().map_err(|e| ConfigError::Invalid {
                key: "--admin-listen".into(),
                reason: format!("`{addr}` is not an address or `off` ({e})"),
            })?),
        };
    }
    config.validate()?;
    Ok(config)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match &cli.command {
        // The proxy's connections run on `runtime.workers` threads of their own, each
        // with its runtime (`wsbeat::run`); this one keeps the admin listener, the
        // reloads, the signals and the drain.
        None => tokio::runtime::Builder::new_current_thread()
            .thread_name("wsbeat-control")
            .enable_all()
            .build(),
        Some(_) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(wsbeat::config::RuntimeConfig::default().worker_threads())
            .thread_name("wsbeat-worker")
            .enable_all()
            .build(),
    };
    match runtime {
        Ok(runtime) => runtime.block_on(async_main(cli)),
        Err(e) => {
            eprintln!("wsbeat: cannot start the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn async_main(cli: Cli) -> ExitCode {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().flatten_event(true).init(),
    }

    // Before anything listens: SIGHUP must reload from the start, never end the process.
    let mut source = source(&cli);
    let result = match &cli.command {
        Some(Command::Demo { listen }) => demo::run(*listen, wsbeat::shutdown::signal()).await,
        Some(Command::Check { routes }) => {
            return match source.load() {
                Ok(config) => {
                    // The same step `run` takes: every certificate file read and checked.
                    if let Err(e) = wsbeat::tls::Setup::load(&config) {
                        eprintln!("wsbeat: {e}");
                        return ExitCode::from(EXIT_CONFIG);
                    }
                    print!("{}", config.to_yaml());
                    let resolved = config.routes();
                    for path in routes {
                        let without_query = path.split(['?', '#']).next().unwrap_or(path);
                        // Routed as a request would be: on the canonical path.
                        let canonical = match wsbeat::forwarding::canonical_path(without_query) {
                            Ok(canonical) => canonical,
                            Err(e) => {
                                println!("# {path} -> 400 ({e})");
                                continue;
                            }
                        };
                        let route = resolved.resolve(&canonical);
                        println!(
                            "# {path} -> route `{}` (prefix {}, upstream {})",
                            route.name, route.path, route.upstream.url
                        );
                    }
                    ExitCode::SUCCESS
                }
                Err(e) => config_error(e),
            };
        }
        None => match source.load() {
            Ok(config) => wsbeat::run(config, source, wsbeat::shutdown::signal()).await,
            Err(e) => return config_error(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("wsbeat: {e}");
            match e {
                // An unusable certificate file is a configuration problem.
                wsbeat::Error::Tls(_) => ExitCode::from(EXIT_CONFIG),
                wsbeat::Error::Bind { .. } => ExitCode::FAILURE,
            }
        }
    }
}

fn config_error(e: ConfigError) -> ExitCode {
    eprintln!("wsbeat: {e}");
    ExitCode::from(EXIT_CONFIG)
}
