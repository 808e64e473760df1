//! `framecast-broker`: matches player sessions to GPU slots on the fleet's nodes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};

use framecast_broker::dev::{DevOptions, start_dev};
use framecast_broker::store::{ExportFormat, Store, export};
use framecast_shared::config::cli::{CheckConfigArgs, report};
use framecast_shared::config::{BrokerConfig, ConfigArgs};
use framecast_shared::time::Timestamp;
use framecast_shared::token::TokenSigner;
use framecast_shared::{ops, tls};

/// Framecast session broker: places cloud-gaming sessions on shared GPUs.
#[derive(Debug, Parser)]
#[command(name = "framecast-broker", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Load and validate broker.toml (defaults, then the file, then FRAMECAST_* variables,
    /// then --set flags) and report every broken rule with its field.
    CheckConfig(CheckConfigArgs),
    /// Run the broker: the HTTP API, the QUIC control plane for agents, and the store in
    /// data_dir. Needs [control.tls].
    Serve {
        #[command(flatten)]
        config: ConfigArgs,
        /// The Ed25519 key session tokens are signed with (created when absent); overrides
        /// `token_key` in broker.toml.
        #[arg(long, value_name = "FILE")]
        token_key: Option<PathBuf>,
    },
    /// Run a broker and simulated GPU nodes on loopback, with a throw-away PKI and the API key
    /// `dev-key`. For trying Framecast; not for production.
    Dev {
        /// Simulated nodes.
        #[arg(long, default_value_t = 4)]
        nodes: usize,
        /// NVIDIA L4s per node (or pass --gpus for another inventory).
        #[arg(long, default_value_t = 2)]
        gpus_per_node: u32,
        /// A gpus.toml describing each node's simulated GPUs.
        #[arg(long, value_name = "FILE", conflicts_with = "gpus_per_node")]
        gpus: Option<PathBuf>,
        /// Where the HTTP API (and the player page at /, the status page at /status) listens.
        #[arg(long, alias = "http", default_value = "127.0.0.1:8080")]
        listen: SocketAddr,
        /// Keep state here instead of a temp dir.
        #[arg(long, value_name = "DIR")]
        data_dir: Option<PathBuf>,
        /// The development API key.
        #[arg(long, default_value = "dev-key")]
        api_key: String,
    },
    /// Certificates for the control plane.
    Certs {
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// The audit log of ended sessions, for billing.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CertsCommand {
    /// Write a development CA, a broker certificate, agent certificates and the token key.
    Init {
        /// Where to write them.
        #[arg(long, value_name = "DIR")]
        dir: PathBuf,
        /// Names in the broker's certificate (default: localhost and 127.0.0.1).
        #[arg(long = "broker-name", value_name = "NAME")]
        broker_names: Vec<String>,
        /// An agent to issue a certificate for (repeatable); its node id.
        #[arg(long = "agent", value_name = "NAME")]
        agents: Vec<String>,
        /// Replace existing files (a new CA: every agent needs its new certificate).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
enum AuditCommand {
    /// Print audit records (ended sessions with GPU-seconds) as CSV or JSON.
    Export {
        /// The broker's data directory (the broker must not be running on it).
        #[arg(long, value_name = "DIR")]
        data_dir: PathBuf,
        /// csv or json.
        #[arg(long, default_value = "csv")]
        format: ExportFormat,
        /// Only sessions that ended at or after this time (Unix milliseconds).
        #[arg(long)]
        from_ms: Option<u64>,
        /// Only sessions that ended before this time (Unix milliseconds).
        #[arg(long)]
        to_ms: Option<u64>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::CheckConfig(args) => args.run::<BrokerConfig>(),
        Command::Serve { config, token_key } => {
            let cfg = match config.load::<BrokerConfig>() {
                Ok(cfg) => cfg,
                Err(e) => return report(Err(e)),
            };
            finish(runtime().and_then(|rt| rt.block_on(serve(cfg, token_key))))
        }
        Command::Dev {
            nodes,
            gpus_per_node,
            gpus,
            listen,
            data_dir,
            api_key,
        } => {
            let gpus_toml = match gpus {
                Some(path) => match std::fs::read_to_string(&path) {
                    Ok(t) => t,
                    Err(e) => return finish(Err(anyhow::anyhow!("{}: {e}", path.display()))),
                },
                None => format!("[[gpus]]\nmodel = \"l4\"\ncount = {gpus_per_node}\n"),
            };
            let options = DevOptions {
                nodes,
                gpus_toml,
                http: listen,
                data_dir,
                api_key,
                tune: None,
            };
            finish(runtime().and_then(|rt| rt.block_on(dev(options))))
        }
        Command::Certs {
            command:
                CertsCommand::Init {
                    dir,
                    broker_names,
                    agents,
                    force,
                },
        } => {
            let names: Vec<&str> = if broker_names.is_empty() {
                tls::DEFAULT_BROKER_NAMES.to_vec()
            } else {
                broker_names.iter().map(String::as_str).collect()
            };
            let agents: Vec<&str> = agents.iter().map(String::as_str).collect();
            finish(
                tls::init_dir(&dir, &names, &agents, force)
                    .map_err(anyhow::Error::from)
                    .map(|r| {
                        for f in r.files {
                            say(&format!("wrote {}", f.display()));
                        }
                    }),
            )
        }
        Command::Audit {
            command:
                AuditCommand::Export {
                    data_dir,
                    format,
                    from_ms,
                    to_ms,
                },
        } => finish(audit_export(&data_dir, format, from_ms, to_ms)),
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    ops::init_logging();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn serve(config: BrokerConfig, token_key: Option<PathBuf>) -> anyhow::Result<()> {
    let Some(tls_files) = &config.control.tls else {
        bail!(
            "control.tls is required: agents connect with mutual TLS. \
             `framecast-broker certs init --dir DIR` writes a development PKI"
        );
    };
    let (ca, cert, key) = tls::read_files(tls_files)?;
    let server = tls::server_config(&ca, &cert, &key)?;
    std::fs::create_dir_all(&config.data_dir)
        .with_context(|| format!("creating data_dir {}", config.data_dir.display()))?;
    let key_path = token_key
        .or_else(|| config.token_key.clone())
        .unwrap_or_else(|| config.data_dir.join("token.key"));
    let signer = TokenSigner::load_or_create(&key_path)
        .with_context(|| format!("the token key {}", key_path.display()))?;
    let running = framecast_broker::run::start(config, Arc::new(server), signer).await?;
    ops::terminated().await;
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}

async fn dev(options: DevOptions) -> anyhow::Result<()> {
    let dev = start_dev(options).await?;
    let http = dev.broker().http;
    say(&format!(
        "Framecast dev: a broker and simulated GPU nodes on loopback.\n\
         \n  play     http://{http}/   (the player page: pick a game, press Play)\n  \
         status   http://{http}/status\n  API      http://{http}/v1  (Authorization: Bearer {key})\n  \
         OpenAPI  http://{http}/openapi.json\n  metrics  http://{http}/metrics\n\n\
         Try:\n  curl -s -H 'Authorization: Bearer {key}' -H 'content-type: application/json' \\\n    \
         -d '{{\"game\":\"arena-shooter\",\"tier\":\"1080p\",\"player_id\":\"p1\"}}' http://{http}/v1/sessions\n\n\
         Ctrl-C stops it.",
        key = dev.api_key
    ));
    ops::terminated().await;
    dev.stop().await;
    Ok(())
}

fn audit_export(
    data_dir: &std::path::Path,
    format: ExportFormat,
    from_ms: Option<u64>,
    to_ms: Option<u64>,
) -> anyhow::Result<()> {
    let store = Store::open(data_dir)?;
    let records = store.audit(
        from_ms.map(Timestamp::from_millis),
        to_ms.map(Timestamp::from_millis),
    )?;
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    export(&records, format, &mut out).context("writing the export")?;
    Ok(())
}

#[allow(clippy::print_stdout)] // the command's output
fn say(text: &str) {
    println!("{text}");
}

#[allow(clippy::print_stderr)] // the process's last words
fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
