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
    /// Add legate as a sidecar to every Pod template in Kubernetes YAML
    /// (Deployment, StatefulSet, DaemonSet, ReplicaSet, Job, CronJob, Pod, List);
    /// writes the result to stdout. Injecting twice changes nothing. Options
    /// left unset keep the values of deploy/kubernetes/base/deployment.yaml.
    Inject(InjectArgs),
}

#[derive(clap::Args, Debug)]
struct InjectArgs {
    /// Manifest files (multi-document YAML); `-` or none: stdin.
    #[arg(short = 'f', long = "filename")]
    files: Vec<PathBuf>,
    // Unset, each keeps deploy/kubernetes/base's value: read from it, not repeated here.
    /// The ConfigMap holding the route table, mounted at /etc/legate.
    #[arg(long)]
    configmap: Option<String>,
    /// legate's image.
    #[arg(long)]
    image: Option<String>,
    /// The admin port (probes, metrics, scrape annotations).
    #[arg(long)]
    admin_port: Option<u16>,
    /// resources.requests.cpu.
    #[arg(long)]
    cpu_request: Option<String>,
    /// resources.requests.memory.
    #[arg(long)]
    memory_request: Option<String>,
    /// resources.limits.cpu.
    #[arg(long)]
    cpu_limit: Option<String>,
    /// resources.limits.memory.
    #[arg(long)]
    memory_limit: Option<String>,
    /// A regular container, for Kubernetes < 1.29 (no native sidecars; see the caveat it prints).
    #[arg(long)]
    classic: bool,
    /// Replace an existing `legate` container or volume whose spec differs.
    #[arg(long)]
    force: bool,
}

/// `legate inject`: every input is read and injected before anything is
/// written, so an error leaves stdout empty (nothing half-injected reaches
/// `kubectl apply`).
fn inject(args: &InjectArgs) -> ExitCode {
    use std::io::{Read, Write};
    let opts = legate::inject::Options {
        configmap: args.configmap.clone(),
        image: args.image.clone(),
        admin_port: args.admin_port,
        cpu_request: args.cpu_request.clone(),
        memory_request: args.memory_request.clone(),
        cpu_limit: args.cpu_limit.clone(),
        memory_limit: args.memory_limit.clone(),
        classic: args.classic,
        force: args.force,
    };
    let sidecar = match legate::inject::Sidecar::new(&opts) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let stdin = [PathBuf::from("-")];
    let files = if args.files.is_empty() {
        &stdin[..]
    } else {
        &args.files[..]
    };
    let mut out = String::new();
    let mut warnings = Vec::new();
    for file in files {
        let (name, read) = if file.as_os_str() == "-" {
            let mut text = String::new();
            let read = std::io::stdin().read_to_string(&mut text).map(|_| text);
            ("<stdin>".to_string(), read)
        } else {
            (file.display().to_string(), std::fs::read_to_string(file))
        };
        let text = match read {
            Ok(t) => t,
            Err(e) => {
                eprintln!("error: {name}: {e}");
                return ExitCode::FAILURE;
            }
        };
        match sidecar.inject(&name, &text, &mut |w| warnings.push(w)) {
            Ok(injected) => {
                // Files are joined as documents of one stream.
                if !out.is_empty() {
                    if !out.ends_with('\n') {
                        out.push('\n');
                    }
                    if !injected.starts_with("---") {
                        out.push_str("---\n");
                    }
                }
                out.push_str(&injected);
            }
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    for w in &warnings {
        eprintln!("warning: {w}");
    }
    if args.classic {
        eprintln!("{}", legate::inject::CLASSIC_CAVEAT);
    }
    match std::io::stdout().write_all(out.as_bytes()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: writing the result: {e}");
            ExitCode::FAILURE
        }
    }
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

    if let Some(Command::Inject(args)) = &cli.command {
        return inject(args);
    }
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
