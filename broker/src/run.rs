//! Starting a broker: the store, the control plane, the driver, the fleet-recommendation
//! webhook (when configured) and the HTTP API, all stopped by one shutdown signal. `serve`,
//! `dev` and the tests start brokers through [`start`].

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use framecast_shared::config::BrokerConfig;
use framecast_shared::ops;
use framecast_shared::token::TokenSigner;

use crate::api::RouterOptions;
use crate::service::control::ControlPlane;
use crate::service::{Broker, driver};
use crate::store::Store;

/// A running broker.
#[derive(Debug)]
pub struct Running {
    /// The service.
    pub broker: Broker,
    /// Where the HTTP API listens.
    pub http: SocketAddr,
    /// Where agents connect (UDP).
    pub control: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Running {
    /// Stops every task and waits for them.
    pub async fn stop(mut self) {
        self.halt().await;
    }

    /// Stops every task and waits for them, leaving the value behind (its addresses stay
    /// readable, to start a broker there again).
    pub async fn halt(&mut self) {
        let _ = self.shutdown.send(true);
        for t in std::mem::take(&mut self.tasks) {
            // An open event stream may hold the HTTP server past the signal; do not wait for
            // ever.
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
    }

    /// A receiver that turns true when the broker stops.
    pub fn shutdown_signal(&self) -> watch::Receiver<bool> {
        self.shutdown.subscribe()
    }

    /// Asks the broker to stop (see [`Running::stop`] to wait for it).
    pub fn request_stop(&self) {
        let _ = self.shutdown.send(true);
    }
}

impl Broker {
    /// A broker to embed in the caller's tokio runtime: give it the configuration, the
    /// control plane's TLS and the token key, then [`BrokerBuilder::build`] starts it.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use framecast_broker::service::Broker;
    /// use framecast_shared::config::BrokerConfig;
    /// use framecast_shared::tls::{DevCa, Role, server_config};
    /// use framecast_shared::token::TokenSigner;
    ///
    /// # fn main() -> anyhow::Result<()> {
    /// # let dir = tempfile::tempdir()?;
    /// # let runtime = tokio::runtime::Runtime::new()?;
    /// # runtime.block_on(async {
    /// let mut config = BrokerConfig::default(); // or loaded from broker.toml
    /// config.data_dir = dir.path().join("broker");
    /// config.http.listen = "127.0.0.1:0".parse()?;
    /// config.control.listen = "127.0.0.1:0".parse()?;
    ///
    /// // Production reads PEM files (`tls::read_files`); a dev CA works the same way.
    /// let ca = DevCa::generate("example CA")?;
    /// let cert = ca.issue("broker", &["localhost"], Role::Broker)?;
    /// let tls = server_config(&ca.cert.cert_pem, &cert.cert_pem, &cert.key_pem)?;
    ///
    /// let running = Broker::builder(config)
    ///     .tls(Arc::new(tls))
    ///     .token_signer(TokenSigner::generate()?)
    ///     .build()
    ///     .await?;
    /// println!("API on http://{}/v1, agents on {}", running.http, running.control);
    /// // The platform may also call the service directly, e.g. for its pools:
    /// let pools = running.broker.with_engine(|engine| engine.pool_views());
    /// assert!(pools.is_empty(), "no agent has connected yet");
    /// running.stop().await;
    /// # Ok::<(), anyhow::Error>(())
    /// # })
    /// # }
    /// ```
    pub fn builder(config: BrokerConfig) -> BrokerBuilder {
        BrokerBuilder {
            config,
            tls: None,
            signer: None,
            options: RouterOptions::default(),
        }
    }
}

/// Builds a running broker; see [`Broker::builder`].
#[derive(Debug)]
pub struct BrokerBuilder {
    config: BrokerConfig,
    tls: Option<Arc<rustls::ServerConfig>>,
    signer: Option<TokenSigner>,
    options: RouterOptions,
}

impl BrokerBuilder {
    /// The control plane's TLS: a server configuration that requires client certificates
    /// (`framecast_shared::tls::server_config`).
    pub fn tls(mut self, tls: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(tls);
        self
    }

    /// The key session tokens are signed with; a fresh one when not given (tokens then do
    /// not survive a restart).
    pub fn token_signer(mut self, signer: TokenSigner) -> Self {
        self.signer = Some(signer);
        self
    }

    /// Serves the dev pages without a key: the player page at `/` and the status page at
    /// `/status` (see [`RouterOptions`]).
    pub fn dev_pages(mut self, on: bool) -> Self {
        self.options.dev_pages = on;
        self
    }

    /// The API key the player page is prefilled with (dev mode's; anyone who reaches the port
    /// gets it).
    pub fn dev_api_key(mut self, key: impl Into<String>) -> Self {
        self.options.dev_api_key = Some(key.into());
        self
    }

    /// Starts the broker's tasks on the current tokio runtime.
    pub async fn build(self) -> anyhow::Result<Running> {
        let tls = self
            .tls
            .context("the control plane needs TLS: BrokerBuilder::tls")?;
        let signer = match self.signer {
            Some(s) => s,
            None => TokenSigner::generate()?,
        };
        start_with(self.config, tls, signer, self.options).await
    }
}

/// Starts a broker for `config`: opens the store in `config.data_dir`, binds the control
/// plane with `tls` and the HTTP API, and signs session tokens with `signer`.
pub async fn start(
    config: BrokerConfig,
    tls: Arc<rustls::ServerConfig>,
    signer: TokenSigner,
) -> anyhow::Result<Running> {
    start_with(config, tls, signer, RouterOptions::default()).await
}

/// [`start`] with optional parts of the HTTP router (dev mode's player and status pages).
pub async fn start_with(
    config: BrokerConfig,
    tls: Arc<rustls::ServerConfig>,
    signer: TokenSigner,
    options: RouterOptions,
) -> anyhow::Result<Running> {
    // Before anything binds: a secret that cannot be read stops the start.
    let webhook_key = webhook_key(&config)?;
    let store = open_store(&config.data_dir).await?;
    let control = ControlPlane::bind(config.control.listen, tls)?;
    let control_addr = control.local_addr()?;
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("http.listen {}: cannot bind", config.http.listen))?;
    let http_addr = listener.local_addr()?;
    let broker = Broker::new(config, store, signer)?;
    let metrics = ops::recorder()?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let router = crate::api::router(broker.clone(), metrics, options);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(
        control.serve(broker.clone(), shutdown_rx.clone()),
    ));
    tasks.push(tokio::spawn(driver::run(
        broker.clone(),
        shutdown_rx.clone(),
    )));
    let planner = &broker.config().planner;
    match (&planner.webhook_url, planner.enabled) {
        (Some(url), true) => tasks.push(tokio::spawn(crate::service::webhook::run(
            url.clone(),
            webhook_key,
            planner.webhook_min_interval(),
            broker.recommendations(),
            shutdown_rx.clone(),
        ))),
        (Some(url), false) => {
            tracing::warn!(%url, "planner.webhook_url is set but the planner is off: nothing is posted");
        }
        (None, _) => {}
    }
    let http_shutdown = shutdown_rx.clone();
    tasks.push(tokio::spawn(async move {
        if let Err(e) = ops::serve(listener, router, http_shutdown).await {
            tracing::error!(error = %e, "the HTTP API failed");
        }
    }));
    tracing::info!(http = %http_addr, control = %control_addr, region = %broker.config().region, "broker started");
    Ok(Running {
        broker,
        http: http_addr,
        control: control_addr,
        shutdown,
        tasks,
    })
}

/// Opens the store, waiting up to 5 s while a broker of this process that was just stopped
/// (its store writer still finishing) holds its lock.
async fn open_store(data_dir: &std::path::Path) -> anyhow::Result<Store> {
    let mut tries = 0;
    loop {
        match Store::open(data_dir) {
            Err(crate::store::StoreError::Locked { .. }) if tries < 50 => {
                tries += 1;
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            other => {
                return other.with_context(|| {
                    format!("opening the store in data_dir {}", data_dir.display())
                });
            }
        }
    }
}

/// The webhook's signing key, from `planner.webhook_secret_file` (its bytes, without a
/// trailing line break); none when unset.
fn webhook_key(config: &BrokerConfig) -> anyhow::Result<Option<ring::hmac::Key>> {
    let Some(path) = &config.planner.webhook_secret_file else {
        return Ok(None);
    };
    let secret = std::fs::read(path).with_context(|| {
        format!(
            "planner.webhook_secret_file {}: cannot read it",
            path.display()
        )
    })?;
    let secret = secret
        .strip_suffix(b"\n")
        .map(|s| s.strip_suffix(b"\r").unwrap_or(s))
        .unwrap_or(&secret);
    anyhow::ensure!(
        secret.len() >= 16,
        "planner.webhook_secret_file {}: the secret must be at least 16 bytes",
        path.display()
    );
    Ok(Some(crate::service::webhook::key_of(secret)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_webhook_secret_is_read_once_and_a_missing_or_short_one_names_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let mut config = BrokerConfig::default();
        assert!(webhook_key(&config).unwrap().is_none());
        let file = dir.path().join("secret");
        config.planner.webhook_secret_file = Some(file.clone());
        let e = webhook_key(&config).unwrap_err().to_string();
        assert!(
            e.starts_with("planner.webhook_secret_file") && e.contains("cannot read"),
            "{e}"
        );
        std::fs::write(&file, "short\n").unwrap();
        let e = webhook_key(&config).unwrap_err().to_string();
        assert!(e.contains("at least 16 bytes"), "{e}");
        // The line break is not part of the secret: both files sign alike.
        std::fs::write(&file, "sixteen bytes at least\r\n").unwrap();
        let with = webhook_key(&config).unwrap().unwrap();
        std::fs::write(&file, "sixteen bytes at least").unwrap();
        let without = webhook_key(&config).unwrap().unwrap();
        let at = framecast_shared::time::Timestamp::from_millis(1_800_000_000_123);
        assert_eq!(
            crate::service::webhook::signature(&with, at, b"[]"),
            crate::service::webhook::signature(&without, at, b"[]")
        );
        // What a receiver computes (Python's hmac.new(secret, b"1800000000." + body, sha256)).
        assert_eq!(
            crate::service::webhook::signature(&with, at, b"[]"),
            "t=1800000000,v1=18624c486c1139ddbde85f42e6515c1d03b64b4d6d23f98026cb849131805b89"
        );
    }
}
