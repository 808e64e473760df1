//! The operations endpoint both services serve: `/metrics` (Prometheus), `/livez` and
//! `/readyz`.
//!
//! Liveness says the process answers; readiness says it can do its job now (the agent: its
//! control link is up; the broker: its store is open). Metrics are recorded through the
//! `metrics` facade into one process-wide Prometheus recorder; a service that computes gauges
//! from its state sets them in a hook run just before each scrape.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusBuilder;
pub use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Sends the process's log to stderr, filtered by `FRAMECAST_LOG` (an `EnvFilter` directive;
/// `info` when unset or unusable). Call once, first thing.
pub fn init_logging() {
    init_logging_or("info");
}

/// [`init_logging`] with another filter than `info` when `FRAMECAST_LOG` is unset or unusable
/// (a tool that runs services in-process keeps their log down to `warn`).
pub fn init_logging_or(default: &str) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("FRAMECAST_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default)),
        )
        // Colours only on a terminal: journald, container logs and files get plain text.
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

/// How long a gauge nobody sets stays exported.
pub const GAUGE_IDLE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether the service is ready; `Err` says why not.
pub type Readiness = Arc<dyn Fn() -> Result<(), String> + Send + Sync>;

/// Run before each scrape, to set gauges from the service's state.
pub type ScrapeHook = Arc<dyn Fn() + Send + Sync>;

/// Why metrics could not be set up.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the Prometheus recorder: {0}")]
pub struct RecorderError(String);

/// The process's Prometheus recorder, installed on first use.
///
/// One per process: the `metrics` macros record into a global recorder. Tests that run
/// several services in one process share it.
pub fn recorder() -> Result<PrometheusHandle, RecorderError> {
    static HANDLE: Mutex<Option<PrometheusHandle>> = Mutex::new(None);
    // Held across the install, so two first callers cannot both try to install.
    let mut slot = HANDLE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some(h) = slot.as_ref() {
        return Ok(h.clone());
    }
    let handle = PrometheusBuilder::new()
        // Seconds, from sub-millisecond control-plane calls to queue waits of minutes.
        .set_buckets(&[
            0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            30.0, 60.0, 300.0,
        ])
        .map_err(|e| RecorderError(e.to_string()))?
        // Gauges are set before every scrape (or every second, per stream); one nobody set for
        // a while belongs to something gone — a stream that ended, a GPU that left — and is
        // dropped rather than exported for ever.
        .idle_timeout(
            metrics_util::MetricKindMask::GAUGE,
            Some(GAUGE_IDLE_TIMEOUT),
        )
        .install_recorder()
        .map_err(|e| RecorderError(e.to_string()))?;
    // Histograms keep raw samples until upkeep folds them in; without a scrape they would
    // grow for ever.
    let upkeep = handle.clone();
    // The recorder is installed whatever happens here; a failed thread only means histograms
    // are folded in at scrapes.
    *slot = Some(handle.clone());
    if let Err(e) = std::thread::Builder::new()
        .name("metrics-upkeep".into())
        .spawn(move || {
            loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            }
        })
    {
        tracing::warn!(error = %e, "no metrics upkeep thread; histograms are folded in at scrapes");
    }
    Ok(handle)
}

/// The three routes. `hook` runs before each scrape.
pub fn router(handle: PrometheusHandle, ready: Readiness, hook: Option<ScrapeHook>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                let hook = hook.clone();
                async move {
                    if let Some(hook) = hook {
                        hook();
                    }
                    handle.run_upkeep();
                    (
                        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                        handle.render(),
                    )
                }
            }),
        )
        .route("/livez", get(|| async { "ok\n" }))
        .route(
            "/readyz",
            get(move || {
                let ready = ready.clone();
                async move {
                    match ready() {
                        Ok(()) => (StatusCode::OK, "ready\n".to_owned()).into_response(),
                        Err(why) => (
                            StatusCode::SERVICE_UNAVAILABLE,
                            format!("not ready: {why}\n"),
                        )
                            .into_response(),
                    }
                }
            }),
        )
}

/// Serves `router` on `listener` until `shutdown` turns true.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .await
}

/// Resolves on SIGINT or SIGTERM (what systemd and Kubernetes send to stop a service).
pub async fn terminated() {
    use tokio::signal::unix::{SignalKind, signal};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot watch SIGTERM; only SIGINT stops the process");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// How often histograms are folded in between scrapes, so they do not grow without bound.
pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

#[cfg(test)]
mod tests {
    use super::*;

    async fn get_text(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        let status = out[9..12].parse().unwrap();
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_owned();
        (status, body)
    }

    #[tokio::test]
    async fn metrics_liveness_and_readiness_answer() {
        let handle = recorder().unwrap();
        let ready_flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = ready_flag.clone();
        let ready: Readiness = Arc::new(move || {
            if flag.load(std::sync::atomic::Ordering::Relaxed) {
                Ok(())
            } else {
                Err("link down".into())
            }
        });
        let hook: ScrapeHook = Arc::new(|| {
            metrics::gauge!("framecast_test_hook_runs").increment(1.0);
        });
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stop_rx) = watch::channel(false);
        let server = tokio::spawn(serve(listener, router(handle, ready, Some(hook)), stop_rx));

        assert_eq!(get_text(addr, "/livez").await, (200, "ok\n".into()));
        assert_eq!(
            get_text(addr, "/readyz").await,
            (503, "not ready: link down\n".into())
        );
        ready_flag.store(true, std::sync::atomic::Ordering::Relaxed);
        assert_eq!(get_text(addr, "/readyz").await.0, 200);
        let (status, body) = get_text(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("framecast_test_hook_runs 1"), "{body}");
        stop.send(true).unwrap();
        server.await.unwrap().unwrap();
    }
}
