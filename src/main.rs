//! The `legate` command line: flags (each also read from a `LEGATE_*` variable),
//! logging, the tokio runtime, then `legate::run` or `legate::check`.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand, ValueEnum};

#[global_allocator]
static ALLOCATOR: legate::memory::Allocator = legate::memory::Allocator;
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

    /// After SIGTERM, keep accepting this long before closing the listeners (0 to 1h).
    #[arg(long, env = "LEGATE_SHUTDOWN_DELAY", default_value = "5s", value_parser = parse_shutdown_delay)]
    shutdown_delay: Duration,

    /// After the listeners close, wait this long for open connections, then close them (1ms to 1d).
    #[arg(long, env = "LEGATE_DRAIN_TIMEOUT", default_value = "30s", value_parser = parse_drain_timeout)]
    drain_timeout: Duration,

    /// Re-read the config directory this often even without a change event (0 disables; else 100ms to 1d).
    #[arg(long, env = "LEGATE_POLL_INTERVAL", default_value = "30s", value_parser = parse_poll_interval)]
    poll_interval: Duration,

    /// Quiet time after a change in the config directory before reloading (1ms to 10s).
    #[arg(long, env = "LEGATE_RELOAD_DEBOUNCE", default_value = "100ms", value_parser = parse_debounce)]
    reload_debounce: Duration,

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
    /// Show what a reload from OLD to NEW would do. Each is a config directory
    /// or a running legate's admin address (http://127.0.0.1:9901). Exit 0: no
    /// change, 1: errors (NEW would be rejected), 2: changes.
    Diff {
        old: String,
        new: String,
        /// Print the report as JSON (for CI gates).
        #[arg(long)]
        json: bool,
    },
}

#[derive(ValueEnum, Clone, Copy, Debug)]
enum LogFormat {
    Json,
    Text,
}

/// A duration within `min..=max`, or 0 when `zero` allows it: a flag outside
/// the range is refused at start, never scheduled (an interval of 1ns spins a
/// core, one of 2^64 s overflows the clock).
fn bounded(s: &str, zero: bool, min: Duration, max: Duration) -> Result<Duration, String> {
    let d = if s.trim() == "0" {
        Duration::ZERO
    } else {
        legate::config::parse_duration(s)?
    };
    if d.is_zero() && zero {
        return Ok(d);
    }
    if d < min || d > max {
        let show = legate::config::show_duration;
        return Err(format!(
            "{} is out of range ({}{} to {})",
            show(d),
            if zero { "0, or " } else { "" },
            show(min),
            show(max)
        ));
    }
    Ok(d)
}

const HOUR: Duration = Duration::from_secs(3600);
const DAY: Duration = Duration::from_secs(24 * 3600);

fn parse_shutdown_delay(s: &str) -> Result<Duration, String> {
    bounded(s, true, Duration::from_millis(1), HOUR)
}

fn parse_drain_timeout(s: &str) -> Result<Duration, String> {
    bounded(s, false, Duration::from_millis(1), DAY)
}

fn parse_poll_interval(s: &str) -> Result<Duration, String> {
    bounded(s, true, Duration::from_millis(100), DAY)
}

fn parse_debounce(s: &str) -> Result<Duration, String> {
    bounded(s, false, Duration::from_millis(1), Duration::from_secs(10))
}

fn main() -> ExitCode {
    let cli = Cli::parse();

    if let Some(Command::Diff { old, new, json }) = &cli.command {
        let report = legate::diff::Report::of(
            &legate::diff::Source::parse(old),
            &legate::diff::Source::parse(new),
        );
        if *json {
            println!(
                "{}",
                serde_json::to_string_pretty(&report).unwrap_or_default()
            );
        } else {
            print!("{}", report.text());
        }
        return ExitCode::from(report.exit_code());
    }
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
            debounce: cli.reload_debounce,
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
