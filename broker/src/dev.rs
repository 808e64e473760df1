//! `framecast-broker dev`: a broker and simulated GPU nodes on loopback, in one process, with
//! a throw-away PKI and a development API key. For trying Framecast, demos and tests; never
//! for production (the key is printed, the CA lives in a temp dir).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use framecast_shared::config::agent::{AgentConfig, InventorySource, VgpuBackendKind};
use framecast_shared::config::broker::{GameConfig, TenantConfig};
use framecast_shared::config::{BrokerConfig, TlsConfig};
use framecast_shared::ids::{GameId, GenreName, NodeId, TenantId};
use framecast_shared::tls::{self, DevCa, Role};
use framecast_shared::token::TokenSigner;

use crate::api::RouterOptions;
use crate::run::{Running, start_with};
use crate::service::tenants::{hex, sha256};

/// What `dev` runs.
#[derive(Debug, Clone)]
pub struct DevOptions {
    /// Simulated nodes.
    pub nodes: usize,
    /// The simulated GPUs of each node, as a `gpus.toml` document.
    pub gpus_toml: String,
    /// Where the HTTP API listens.
    pub http: SocketAddr,
    /// Where state goes; a temp dir when absent.
    pub data_dir: Option<PathBuf>,
    /// The development API key.
    pub api_key: String,
    /// Changes to the broker's configuration (tests shorten timers with it; the load test
    /// scales them to its time compression).
    pub tune: Option<Tune>,
}

/// A change to the broker's configuration, applied before it starts (and kept for restarts):
/// a closure, so that it may carry values (a load test's speed factor).
#[derive(Clone)]
pub struct Tune(Arc<dyn Fn(&mut BrokerConfig) + Send + Sync>);

impl Tune {
    /// Wraps `f`.
    pub fn new(f: impl Fn(&mut BrokerConfig) + Send + Sync + 'static) -> Self {
        Self(Arc::new(f))
    }

    /// Applies the change to `config`.
    pub fn apply(&self, config: &mut BrokerConfig) {
        (self.0)(config);
    }
}

impl std::fmt::Debug for Tune {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tune(..)")
    }
}

impl Default for DevOptions {
    fn default() -> Self {
        Self {
            nodes: 4,
            gpus_toml: "[[gpus]]\nmodel = \"l4\"\ncount = 2\n".into(),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: None,
            api_key: "dev-key".into(),
            tune: None,
        }
    }
}

/// A running dev deployment.
#[derive(Debug)]
pub struct Dev {
    broker: Option<Running>,
    /// The development API key.
    pub api_key: String,
    agents: Vec<DevAgent>,
    /// What the broker was started with, to restart it.
    config: BrokerConfig,
    tls: Arc<rustls::ServerConfig>,
    token_key: PathBuf,
    /// Keeps the temp dir alive while the deployment runs.
    _temp: Option<tempfile::TempDir>,
}

/// One in-process agent.
#[derive(Debug)]
struct DevAgent {
    node: NodeId,
    /// What it was started with, to start it again.
    config: AgentConfig,
    stop: watch::Sender<bool>,
    task: JoinHandle<anyhow::Result<()>>,
}

impl DevAgent {
    /// Starts an agent with `config` as a task of its own.
    fn start(node: NodeId, config: AgentConfig) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let run = config.clone();
        Self {
            node,
            config,
            stop,
            task: tokio::spawn(
                async move { framecast_agent::run::run_until(run, None, stop_rx).await },
            ),
        }
    }

    /// Asks it to stop and waits (bounded) for it to end.
    async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(std::time::Duration::from_secs(5), self.task).await;
    }
}

impl Dev {
    /// The broker.
    ///
    /// # Panics
    ///
    /// After a [`Dev::restart_broker`] that returned an error (the deployment has no broker
    /// then; stop it).
    // A harness for dev mode and tests, where a deployment that lost its broker is a failed run.
    #[allow(clippy::panic)]
    pub fn broker(&self) -> &Running {
        self.broker
            .as_ref()
            .unwrap_or_else(|| panic!("the dev broker failed to restart; stop the deployment"))
    }

    /// Stops the agents, then the broker.
    pub async fn stop(self) {
        for a in self.agents {
            a.stop().await;
        }
        if let Some(b) = self.broker {
            b.stop().await;
        }
    }

    /// The simulated nodes.
    pub fn nodes(&self) -> Vec<NodeId> {
        self.agents.iter().map(|a| a.node.clone()).collect()
    }

    /// Stops the broker and starts it again on the same addresses, store and keys, while the
    /// agents keep running (they reconnect on their own).
    pub async fn restart_broker(&mut self) -> anyhow::Result<()> {
        let mut config = self.config.clone();
        let old = self
            .broker
            .take()
            .context("the broker is being restarted already")?;
        config.http.listen = old.http;
        config.control.listen = old.control;
        // The old service (and its lock on the store) must be gone before the new one opens it.
        old.stop().await;
        let signer = TokenSigner::load_or_create(&self.token_key)?;
        self.broker = Some(
            start_with(
                config,
                Arc::clone(&self.tls),
                signer,
                RouterOptions::dev(&self.api_key),
            )
            .await?,
        );
        Ok(())
    }

    /// Stops one agent as if its host went away, and waits for it to end.
    pub async fn stop_agent(&mut self, node: &NodeId) {
        if let Some(i) = self.agents.iter().position(|a| &a.node == node) {
            self.agents.remove(i).stop().await;
        }
    }

    /// Stops one agent and starts it again with the same configuration and data dir, as a
    /// restarted agent process would be: it reconnects with its stored generation and adopts
    /// what it still runs. False when there is no such agent.
    pub async fn restart_agent(&mut self, node: &NodeId) -> bool {
        self.restart_agent_with(node, |_| {}).await
    }

    /// [`Dev::restart_agent`] with `change` applied to the agent's configuration first (a
    /// known `/metrics` port, say); the change stays for later restarts.
    pub async fn restart_agent_with(
        &mut self,
        node: &NodeId,
        change: impl FnOnce(&mut AgentConfig),
    ) -> bool {
        let Some(i) = self.agents.iter().position(|a| &a.node == node) else {
            return false;
        };
        let old = self.agents.remove(i);
        let mut config = old.config.clone();
        change(&mut config);
        old.stop().await;
        self.agents.insert(i, DevAgent::start(node.clone(), config));
        true
    }
}

/// The configuration dev mode runs the broker with: the defaults, a development tenant (an
/// operator, so it may use the node endpoints) and three demo games, on loopback.
pub fn broker_config(options: &DevOptions, data_dir: &Path) -> anyhow::Result<BrokerConfig> {
    let mut config = BrokerConfig {
        data_dir: data_dir.join("broker"),
        ..BrokerConfig::default()
    };
    config.http.listen = options.http;
    config.control.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.tenants = vec![TenantConfig {
        id: TenantId::new("dev")?,
        api_key_sha256: hex(&sha256(options.api_key.as_bytes())),
        max_sessions: None,
        admin: true,
        max_session_s: None,
        requests_per_minute: None,
    }];
    config.games = [
        ("arena-shooter", "fps"),
        ("lane-battle", "moba"),
        ("open-world", "rpg"),
    ]
    .into_iter()
    .map(|(game, genre)| {
        Ok(GameConfig {
            id: GameId::new(game)?,
            genre: GenreName::new(genre)?,
            tiers: Vec::new(),
        })
    })
    .collect::<anyhow::Result<_>>()?;
    Ok(config)
}

/// Starts the broker and `options.nodes` agents on simulated GPUs.
pub async fn start_dev(options: DevOptions) -> anyhow::Result<Dev> {
    let (temp, root) = match &options.data_dir {
        Some(d) => (None, d.clone()),
        None => {
            let t = tempfile::Builder::new()
                .prefix("framecast-dev-")
                .tempdir()
                .context("creating a temp dir for dev mode")?;
            let p = t.path().to_owned();
            (Some(t), p)
        }
    };
    std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
    let ca = DevCa::generate("Framecast dev CA")?;
    let broker_cert = ca.issue("broker", &["localhost", "127.0.0.1"], Role::Broker)?;
    let server_tls = tls::server_config(
        &ca.cert.cert_pem,
        &broker_cert.cert_pem,
        &broker_cert.key_pem,
    )?;
    let token_key = root.join("token.key");
    let signer = TokenSigner::load_or_create(&token_key)?;
    let mut config = broker_config(&options, &root)?;
    if let Some(tune) = &options.tune {
        tune.apply(&mut config);
    }
    let tls = Arc::new(server_tls);
    let broker = start_with(
        config.clone(),
        Arc::clone(&tls),
        signer,
        RouterOptions::dev(&options.api_key),
    )
    .await?;

    let pki = root.join("pki");
    std::fs::create_dir_all(&pki)?;
    write(&pki.join("ca.pem"), &ca.cert.cert_pem)?;
    let gpus = root.join("gpus.toml");
    write(&gpus, &options.gpus_toml)?;
    let mut agents = Vec::new();
    for i in 1..=options.nodes {
        let name = format!("dev-node-{i}");
        let cert = ca.issue(&name, &[name.as_str()], Role::Agent)?;
        let cert_path = pki.join(format!("{name}.pem"));
        let key_path = pki.join(format!("{name}.key"));
        write(&cert_path, &cert.cert_pem)?;
        // A dev data dir given with --data-dir may hold the keys of an earlier run.
        framecast_shared::token::write_file(
            &key_path,
            cert.key_pem.as_bytes(),
            framecast_shared::token::PRIVATE_KEY_MODE,
            true,
        )
        .with_context(|| format!("writing {}", key_path.display()))?;
        let mut agent = AgentConfig {
            node_id: Some(NodeId::new(&name)?),
            region: broker.broker.config().region.clone(),
            data_dir: root.join(&name),
            ..AgentConfig::default()
        };
        agent.broker.address = broker.control.to_string();
        agent.broker.server_name = "localhost".into();
        agent.broker.tls = Some(TlsConfig {
            ca_cert: pki.join("ca.pem"),
            cert: cert_path,
            key: key_path,
        });
        agent.inventory.source = InventorySource::Simulated;
        agent.inventory.simulate = Some(gpus.clone());
        agent.vgpu.backend = VgpuBackendKind::Simulated;
        agent.http.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        agent.whep.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        // The player's browser runs on this host, possibly with nothing but loopback.
        agent.whep.loopback_candidates = true;
        agents.push(DevAgent::start(NodeId::new(&name)?, agent));
    }
    Ok(Dev {
        broker: Some(broker),
        api_key: options.api_key,
        agents,
        config,
        tls,
        token_key,
        _temp: temp,
    })
}

fn write(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))
}
