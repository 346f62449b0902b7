//! `dozen`: the command line. The only crate that knows about terminals.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod build;
mod commands;
mod events;
mod exec;
mod identity;
mod inventory;
mod master_key;
mod node_flags;
mod oneoff;
mod output;
mod params;
mod proxy_flags;
mod routes;
mod serve;
mod stats;
mod up;
mod wait;

/// Run 12-factor services on a laptop, one server or a cluster.
///
/// Describe services in a stack file (dozen.toml), then:
///
///   dozen server &                  # control plane + a node agent, state in ./.dozen
///   dozen plan  -f dozen.toml       # what would change
///   dozen apply -f dozen.toml       # make it so: new releases, tasks placed and started
///   dozen ps                        # what runs where
///   dozen logs web -f               # follow a service's logs
///   dozen scale web=4               # change the live count
///   dozen rollback web              # back to the previous release
///   dozen run web -- ./migrate      # one-off admin task on the current release
#[derive(Parser, Debug)]
#[command(name = "dozen", version, about, long_about, verbatim_doc_comment)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct Global {
    /// URL of the dozen API server; several, comma-separated, for a cluster
    /// (https://a:7700,https://b:7700). Default: the current context's, else
    /// http://127.0.0.1:7700.
    #[arg(long, global = true, env = "DOZEN_SERVER")]
    pub server: Option<String>,
    /// The cluster CA certificate to trust for https:// servers (made by `dozen ca init`).
    #[arg(long, global = true, env = "DOZEN_CA")]
    pub ca: Option<PathBuf>,
    /// Use this saved context (server, CA, token file) instead of the current one.
    #[arg(long, global = true, env = "DOZEN_CONTEXT")]
    pub context: Option<String>,
    /// API token. Default: read from <data-dir>/token, where `dozen server` writes it.
    #[arg(long, global = true, env = "DOZEN_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Where dozen keeps its state (store, token, task files and logs).
    #[arg(long, global = true, env = "DOZEN_DATA_DIR", default_value = ".dozen")]
    pub data_dir: PathBuf,
    /// Output format of listings.
    #[arg(short = 'o', long, global = true, env = "DOZEN_OUTPUT", value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Format of dozen's own log lines (stderr).
    #[arg(long, global = true, env = "DOZEN_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    /// Log filter, e.g. `info` or `dozen_agent=debug`. Default: info (warn for `up`, whose
    /// screen is for the tasks' own logs).
    #[arg(long, global = true, env = "DOZEN_LOG")]
    pub log: Option<String>,
}

impl Global {
    /// The API server URL(s) to use.
    pub fn server(&self) -> &str {
        self.server.as_deref().unwrap_or("http://127.0.0.1:7700")
    }
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Table,
    Json,
}

#[derive(Subcommand, Debug)]
enum ApiCommand {
    /// Print the OpenAPI 3 document of the API this binary serves (the same as
    /// `GET /v1/openapi.json`): generate clients from it, or fuzz the API with it.
    Openapi,
}

#[derive(ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the control plane (API, store, controllers) and, unless --no-agent, a node agent.
    Server(serve::ServerArgs),
    /// Bring a stack up in the foreground: server, agent and the stack file applied; Ctrl-C
    /// stops it.
    Up(up::UpArgs),
    /// Run a proxy (the load balancer) that takes its routes from a server.
    Proxy(serve::ProxyArgs),
    /// Run a node agent that takes work from a server.
    Agent(serve::AgentArgs),
    /// Show what `apply` would change, changing nothing (scale drift included).
    Plan(commands::FileArgs),
    /// Apply a stack file: builds and pushes the images of services with `build`, then new
    /// releases for what changed, scale, removals; waits for tasks.
    Apply(commands::ApplyArgs),
    /// Build the images of services with `build` through this machine's Docker Engine and
    /// push them to dozen's registry (`apply` then runs them).
    Build(build::BuildArgs),
    /// List services and their tasks.
    Ps(commands::PsArgs),
    /// Run a command inside a running task of a service: `dozen exec web -- ls /`; its exit
    /// code is ours.
    Exec(exec::ExecArgs),
    /// What each task uses: CPU over a second, memory now (`-o json` for scripts).
    Stats(stats::StatsArgs),
    /// Show a service's logs (all its tasks, merged by time).
    Logs(commands::LogsArgs),
    /// Show what happened to services, tasks and nodes, and why (`-f` to follow).
    Events(events::EventsArgs),
    /// Set the live replica count: `dozen scale web=4 worker=2`.
    Scale(commands::ScaleArgs),
    /// Replace every task of a service, new before old (also starts a stopped service).
    Restart(commands::RestartArgs),
    /// Stop every task of a service, keeping its replica count for `restart`.
    Stop(commands::ServicesArg),
    /// Remove a stack: stop its tasks and delete its services.
    Down(commands::DownArgs),
    /// List a service's releases.
    Releases(commands::ServiceArg),
    /// Roll a service back: a new release repeating an earlier one.
    Rollback(commands::RollbackArgs),
    /// Run a one-off task on the service's current release: `dozen run web -- ./migrate`.
    /// Exits with the task's exit code.
    Run(commands::RunArgs),
    /// List nodes.
    Nodes,
    /// Which server answered, which one leads the controllers, and the store in use.
    Cluster,
    /// The cluster certificate authority.
    #[command(subcommand)]
    Ca(identity::CaCommand),
    /// Nodes joining and leaving the cluster: join tokens, joining, revoking.
    #[command(subcommand)]
    Node(identity::NodeCommand),
    /// Named connections to clusters (server URLs, CA, token file), like kubeconfig.
    #[command(subcommand)]
    Context(identity::ContextCommand),
    /// List proxies and the route revision each serves.
    Proxies,
    /// List the routing rules proxies serve, in the order they try them; `routes test URL`
    /// says which rule a request meets and why the ones before it did not.
    Routes(routes::RoutesArgs),
    /// The parameter store: config and secrets, versioned, labelled, encrypted at rest.
    #[command(subcommand)]
    Param(params::ParamCommand),
    /// The key-encryption keys that seal secret values: list, rotate, import, rewrap.
    #[command(subcommand)]
    Keys(params::KeysCommand),
    /// Operator tokens with policies (admin, read-only, read:/path/*, write:/path/*).
    #[command(subcommand)]
    Token(params::TokenCommand),
    /// The audit trail: every secret read, write, denial and key operation (`verify` checks
    /// its hash chain).
    Audit(params::AuditArgs),
    /// Print the JSON Schema of the stack file.
    Schema,
    /// The HTTP API itself.
    #[command(subcommand)]
    Api(ApiCommand),
    /// Internal: the per-task supervisor started by the agent.
    #[command(hide = true)]
    Shim { dir: PathBuf },
}

fn init_logging(global: &Global, default: &str) {
    let wanted = global.log.as_deref().unwrap_or(default);
    let filter = tracing_subscriber::EnvFilter::try_new(wanted)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colour only for a person at a terminal: files, journald and pipes get plain text.
    let colour = std::io::IsTerminal::is_terminal(&std::io::stderr())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    match global.log_format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.with_target(false).init(),
    }
}

/// `dozen ps | head -1` and the like: when the reader of stdout goes away, printing fails
/// with a broken pipe, which Rust's `println!` turns into a panic. That is the reader's
/// choice, not an error: end at once, quietly, with success (as `ls | head` does).
fn quiet_when_the_reader_goes() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    // The shim must stay tiny: no runtime, no logging setup, nothing else parsed.
    let mut args = std::env::args_os();
    if args.nth(1).is_some_and(|a| a == "shim") {
        let Some(dir) = args.next() else {
            eprintln!("usage: dozen shim DIR");
            return ExitCode::from(2);
        };
        return ExitCode::from(dozen_agent::shim::main(std::path::Path::new(&dir)) as u8);
    }
    quiet_when_the_reader_goes();
    let cli = Cli::parse();
    if matches!(
        cli.command,
        Command::Server(_) | Command::Agent(_) | Command::Up(_) | Command::Proxy(_)
    ) {
        // Everything dozen writes is its user's alone; tasks keep the umask given here.
        dozen_agent::os::keep_files_private();
        // A descriptor per connection: a proxy under load needs more than a default 1,024.
        if let Err(e) = dozen_agent::os::raise_open_files_limit() {
            eprintln!("warning: cannot raise the open-files limit: {e}");
        }
    }
    // A proxy given one core runs every connection on one thread: no work stealing, no
    // cross-thread wakeups (about a tenth of its CPU per request, measured in bench/proxy.sh).
    let one_core = std::thread::available_parallelism().is_ok_and(|n| n.get() == 1);
    let one_thread = one_core && matches!(cli.command, Command::Proxy(_));
    let mut builder = if one_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut global = cli.global.clone();
    // A broken contexts file must not stop `dozen context` from fixing it.
    if !matches!(cli.command, Command::Context(_)) {
        if let Err(e) = identity::apply_context(&mut global) {
            eprintln!("error: {e:#}");
            return ExitCode::FAILURE;
        }
    }
    let daemon = matches!(
        cli.command,
        Command::Server(_) | Command::Agent(_) | Command::Up(_) | Command::Proxy(_)
    );
    if daemon {
        let default = if matches!(cli.command, Command::Up(_)) {
            "warn"
        } else {
            "info"
        };
        init_logging(&global, default);
        if one_thread {
            tracing::info!("one core: the proxy serves every connection on one thread");
        }
    }
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Server(a) => serve::server(&global, a).await.map(|_| 0),
            Command::Agent(a) => serve::agent(&global, a).await.map(|_| 0),
            Command::Up(a) => up::up(&global, a).await,
            Command::Proxy(a) => serve::proxy(&global, a).await.map(|_| 0),
            Command::Plan(a) => commands::plan(&global, a).await,
            Command::Apply(a) => commands::apply(&global, a).await,
            Command::Exec(a) => exec::exec(&global, a).await,
            Command::Stats(a) => stats::stats(&global, a).await,
            Command::Build(a) => build::build(&global, a).await,
            Command::Ps(a) => commands::ps(&global, a).await,
            Command::Logs(a) => commands::logs(&global, a).await,
            Command::Events(a) => events::events(&global, a).await,
            Command::Scale(a) => commands::scale(&global, a).await,
            Command::Restart(a) => commands::restart(&global, a).await,
            Command::Stop(a) => commands::stop(&global, a).await,
            Command::Down(a) => commands::down(&global, a).await,
            Command::Releases(a) => commands::releases(&global, a).await,
            Command::Rollback(a) => commands::rollback(&global, a).await,
            Command::Run(a) => oneoff::run(&global, a).await,
            Command::Nodes => inventory::nodes(&global).await,
            Command::Cluster => inventory::cluster(&global).await,
            Command::Ca(identity::CaCommand::Init { dir }) => identity::ca_init(&global, dir),
            Command::Node(identity::NodeCommand::Token { node, ttl, hosts }) => {
                identity::node_token(&global, node, ttl, hosts).await
            }
            Command::Node(identity::NodeCommand::Join(a)) => identity::node_join(&global, a).await,
            Command::Node(identity::NodeCommand::Revoke { node }) => {
                identity::node_revoke(&global, &node).await
            }
            Command::Context(c) => identity::context(&global, c),
            Command::Proxies => inventory::proxies(&global).await,
            Command::Routes(a) => routes::routes(&global, a).await,
            Command::Param(c) => params::param(&global, c).await,
            Command::Keys(c) => params::keys(&global, c).await,
            Command::Token(c) => params::token(&global, c).await,
            Command::Audit(a) => params::audit(&global, a).await,
            Command::Schema => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&dozen_spec::json_schema()).unwrap_or_default()
                );
                Ok(0)
            }
            Command::Api(ApiCommand::Openapi) => {
                output::json(&dozen_server::openapi());
                Ok(0)
            }
            Command::Shim { .. } => Ok(2),
        }
    });
    // Background tasks (watch streams) must not hold the process open after the answer.
    runtime.shutdown_timeout(std::time::Duration::from_millis(100));
    match result {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
