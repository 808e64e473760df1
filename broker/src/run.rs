//! Starting a broker: the store, the control plane, the driver and the HTTP API, all stopped
//! by one shutdown signal. `serve`, `dev` and the tests start brokers through [`start`].

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use framecast_shared::config::BrokerConfig;
use framecast_shared::ops;
use framecast_shared::token::TokenSigner;

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
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
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

/// Starts a broker for `config`: opens the store in `config.data_dir`, binds the control
/// plane with `tls` and the HTTP API, and signs session tokens with `signer`.
pub async fn start(
    config: BrokerConfig,
    tls: Arc<rustls::ServerConfig>,
    signer: TokenSigner,
) -> anyhow::Result<Running> {
    let store = Store::open(&config.data_dir).with_context(|| {
        format!(
            "opening the store in data_dir {}",
            config.data_dir.display()
        )
    })?;
    let control = ControlPlane::bind(config.control.listen, tls)?;
    let control_addr = control.local_addr()?;
    let listener = tokio::net::TcpListener::bind(config.http.listen)
        .await
        .with_context(|| format!("http.listen {}: cannot bind", config.http.listen))?;
    let http_addr = listener.local_addr()?;
    let broker = Broker::new(config, store, signer)?;
    let metrics = ops::recorder()?;
    let (shutdown, shutdown_rx) = watch::channel(false);
    let router = crate::api::router(broker.clone(), metrics);
    let mut tasks = Vec::new();
    tasks.push(tokio::spawn(
        control.serve(broker.clone(), shutdown_rx.clone()),
    ));
    tasks.push(tokio::spawn(driver::run(
        broker.clone(),
        shutdown_rx.clone(),
    )));
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
