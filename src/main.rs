//! The `shardwire` command line: `serve`, `check`, `route`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use shardwire::config::Config;
use shardwire::server::{start, ServeOptions};
use shardwire::topology::build;

#[derive(Parser)]
#[command(
    name = "shardwire",
    version,
    about = "A sharding router for PostgreSQL"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the router.
    Serve {
        #[arg(long, default_value = "shard-config.yaml")]
        config: PathBuf,
        /// Override `listen` from the config (host:port).
        #[arg(long)]
        listen: Option<String>,
        /// tracing filter, e.g. `info` or `shardwire=debug`.
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Worker threads (default: 1, an event loop like PgBouncer's; raise it on
        /// machines with cores to spare).
        #[arg(long, default_value_t = 1)]
        threads: usize,
    },
    /// Validate a config and print the topology it describes.
    Check {
        #[arg(long, default_value = "shard-config.yaml")]
        config: PathBuf,
        /// Print one tab-separated line per shard (name host port database user password)
        /// instead of the summary; used by scripts/shards.sh.
        #[arg(long)]
        list_shards: bool,
    },
    /// Explain where a statement would be routed, without connecting anywhere.
    Route {
        #[arg(long, default_value = "shard-config.yaml")]
        config: PathBuf,
        /// The SQL statement.
        sql: String,
        /// Values for $1, $2, … in text format.
        #[arg(long = "param")]
        params: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve {
            config,
            listen,
            log_level,
            threads,
        } => serve(&config, listen, &log_level, threads),
        Command::Check {
            config,
            list_shards,
        } => check(&config, list_shards),
        Command::Route {
            config,
            sql,
            params,
        } => route(&config, &sql, &params),
    }
}

/// `shardwire route`: explain where each statement of `sql` would go.
fn route(path: &std::path::Path, sql: &str, params: &[String]) -> ExitCode {
    let Some(cfg) = load_config(path) else {
        return ExitCode::FAILURE;
    };
    let topology = match build::build(&cfg) {
        Ok(t) => std::sync::Arc::new(t),
        Err(errs) => {
            for e in errs {
                eprintln!("error: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    let router = shardwire::router::Router::new(topology.clone());
    let plan = match router.plan(sql) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("ERROR {}: {}", e.sqlstate(), e.message());
            if let Some(h) = e.hint() {
                eprintln!("HINT: {h}");
            }
            return ExitCode::FAILURE;
        }
    };
    let bound: Vec<shardwire::router::Param<'_>> = params
        .iter()
        .map(|p| shardwire::router::Param {
            value: Some(p.as_bytes()),
            binary: false,
            type_oid: 0,
        })
        .collect();
    let mut status = ExitCode::SUCCESS;
    for stmt in &plan.statements {
        if plan.statements.len() > 1 {
            println!("{}", stmt.text(sql));
        }
        match stmt.route(&topology, &bound) {
            Ok(r) => {
                let target = match &r.route {
                    shardwire::router::Route::Shard(s) => {
                        format!("shard {}", topology.shards[*s].name)
                    }
                    shardwire::router::Route::Multi { shards, merge } => format!(
                        "shards {} ({merge:?})",
                        shards
                            .iter()
                            .map(|s| topology.shards[*s].name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                };
                println!("route: {target}");
                println!("reason: {}", r.reason);
            }
            Err(e) => {
                println!("ERROR {}: {}", e.sqlstate(), e.message());
                if let Some(h) = e.hint() {
                    println!("HINT: {h}");
                }
                status = ExitCode::FAILURE;
            }
        }
    }
    status
}

/// `shardwire serve`: run the router until SIGINT/SIGTERM.
fn serve(
    path: &std::path::Path,
    listen: Option<String>,
    log_level: &str,
    threads: usize,
) -> ExitCode {
    let filter = tracing_subscriber::EnvFilter::try_new(log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false)
        .init();
    let Some(cfg) = load_config(path) else {
        return ExitCode::FAILURE;
    };
    let mut opts = match ServeOptions::from_config(&cfg) {
        Ok(o) => o,
        Err(errs) => {
            for e in errs {
                eprintln!("error: {e}");
            }
            return ExitCode::FAILURE;
        }
    };
    if let Some(l) = listen {
        opts.listen = l;
    }
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
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        let listen = opts.listen.clone();
        let router = match start(opts).await {
            Ok(r) => r,
            Err(e) => {
                eprintln!("error: cannot listen on {listen}: {e}");
                return ExitCode::FAILURE;
            }
        };
        let stop = router.shutdown_handle();
        tokio::spawn(async move {
            wait_for_signal().await;
            tracing::info!("shutting down");
            let _ = stop.send(true);
        });
        router.wait().await;
        ExitCode::SUCCESS
    })
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// `shardwire check`: validate the config and print the topology (or, with
/// `--list-shards`, one tab-separated line per shard). Exit 1 with every problem listed.
fn check(path: &std::path::Path, list_shards: bool) -> ExitCode {
    let Some(cfg) = load_config(path) else {
        return ExitCode::FAILURE;
    };
    if list_shards {
        for s in &cfg.shards {
            println!(
                "{}\t{}\t{}\t{}\t{}\t{}",
                s.name, s.host, s.port, s.database, s.user, s.password
            );
        }
        return ExitCode::SUCCESS;
    }
    match build::build(&cfg) {
        Ok(topology) => {
            print!("{}", build::summary(&topology));
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in errors {
                eprintln!("error: {e}");
            }
            ExitCode::FAILURE
        }
    }
}

/// Load and validate a config, printing every problem (with its line) to stderr.
fn load_config(path: &std::path::Path) -> Option<Config> {
    match Config::load(path) {
        Ok(cfg) => Some(cfg),
        Err(err) => {
            for line in err.errors() {
                eprintln!("error: {line}");
            }
            eprintln!("{}: invalid configuration", path.display());
            None
        }
    }
}
