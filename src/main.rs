//! The `legate` command line: flags (each also read from a `LEGATE_*` variable),
//! logging, the tokio runtime, then `legate::run` or `legate::check`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};
use tracing_subscriber::EnvFilter;

/// An ambassador sidecar: forwards localhost ports to clusters chosen from routing
/// tables in a config directory (a mounted ConfigMap).
#[derive(Parser, Debug)]
#[command(name = "legate", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    /// Directory whose *.yaml / *.yml files are the configuration.
    #[arg(
        long,
        env = "LEGATE_CONFIG",
        default_value = "/etc/legate",
        global = true
    )]
    config: PathBuf,

    /// Address of the admin server (/healthz /readyz /metrics /config /quitquitquit).
    #[arg(long, env = "LEGATE_ADMIN", default_value = "127.0.0.1:9901")]
    admin: SocketAddr,

    /// Worker threads; default: the CPUs this container may use (cgroup quota aware).
    #[arg(long, env = "LEGATE_THREADS")]
    threads: Option<usize>,

    /// After SIGTERM, keep accepting this long before closing the listeners.
    #[arg(long, env = "LEGATE_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_duration_or_zero)]
    shutdown_delay: Duration,

    /// After the listeners close, wait this long for open connections, then close them.
    #[arg(long, env = "LEGATE_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_duration)]
    drain_timeout: Duration,

    /// Re-read the config directory this often even without a change event (0 disables).
    #[arg(long, env = "LEGATE_POLL_INTERVAL", default_value = "30s", value_parser = parse_duration_or_zero)]
    poll_interval: Duration,

    /// Do not watch the config directory with inotify; rely on SIGHUP, POST /reload and polling.
    #[arg(long, env = "LEGATE_NO_WATCH")]
    no_watch: bool,

    /// Log line format.
    #[arg(long, env = "LEGATE_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    log_format: LogFormat,

    /// Log filter: a level (`debug` shows one line per connection) or tracing directives.
    #[arg(long, env = "LEGATE_LOG", default_value = "info")]
    log: String,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Validate the config directory and print the compiled table; exit 1 on error.
    Check,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Json,
    Text,
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    legate::config::parse_duration(s)
}

fn parse_duration_or_zero(s: &str) -> Result<Duration, String> {
    if s.trim() == "0" {
        return Ok(Duration::ZERO);
    }
    legate::config::parse_duration(s)
}

fn main() -> ExitCode {
    let cli = Cli::parse();

    if let Some(Command::Check) = cli.command {
        return match legate::check(&cli.config) {
            Ok(table) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&table).unwrap_or_default()
                );
                eprintln!("{}: configuration is valid", cli.config.display());
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("{e}");
                ExitCode::FAILURE
            }
        };
    }

    init_logging(cli.log_format, &cli.log);
    let threads = cli
        .threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let runtime = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    let runtime = match runtime {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the runtime");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        threads,
        "legate starting"
    );

    let opts = legate::Options {
        config_dir: cli.config,
        admin: cli.admin,
        timing: legate::shutdown::Timing {
            shutdown_delay: cli.shutdown_delay,
            drain_timeout: cli.drain_timeout,
        },
        reload: legate::reload::Settings {
            watch: !cli.no_watch,
            poll_interval: (!cli.poll_interval.is_zero()).then_some(cli.poll_interval),
        },
    };
    match runtime.block_on(legate::run(opts)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stdout);
    match format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
        LogFormat::Text => builder.init(),
    }
}
