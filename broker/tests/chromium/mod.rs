//! Drives the dev player page in a real headless Chromium: the page plays a session in its
//! test mode and POSTs a JSON report of what it measured to a small HTTP server of ours.
//! Shared by the browser test and the browser benchmark.

#![allow(dead_code, clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Where Chromium is, if it is installed: `FRAMECAST_CHROMIUM`, else Debian's `chromium`,
/// else `chromium-browser` or `google-chrome` on the path.
pub(crate) fn find() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FRAMECAST_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    let path = std::env::var_os("PATH")?;
    for dir in std::env::split_paths(&path) {
        for name in ["chromium", "chromium-browser", "google-chrome"] {
            let p = dir.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// A headless Chromium, killed when dropped.
pub(crate) struct Browser {
    child: Child,
    _profile: tempfile::TempDir,
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Browser {
    /// Opens `url` in a fresh profile. The flags let WebRTC work between processes of one
    /// host that may have nothing but loopback, as root, without a display or a GPU, and keep
    /// Chromium from reaching out to the network.
    pub(crate) fn open(chromium: &std::path::Path, url: &str) -> Self {
        let profile = tempfile::tempdir().unwrap();
        let child = Command::new(chromium)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-quic",
                "--autoplay-policy=no-user-gesture-required",
                "--allow-loopback-in-peer-connection",
                "--disable-features=WebRtcHideLocalIpsWithMdns",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg(url)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", chromium.display()));
        Self {
            child,
            _profile: profile,
        }
    }
}

/// Receives the page's report: one POST to `/report` with a JSON body.
pub(crate) struct ReportSink {
    listener: TcpListener,
}

impl ReportSink {
    /// Listens on a free loopback port.
    pub(crate) async fn bind() -> Self {
        Self {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
        }
    }

    /// The URL the page reports to.
    pub(crate) fn url(&self) -> String {
        format!("http://{}/report", self.listener.local_addr().unwrap())
    }

    /// The next report, within `limit`.
    pub(crate) async fn next(&self, limit: Duration) -> serde_json::Value {
        tokio::time::timeout(limit, async {
            loop {
                let (mut s, _) = self.listener.accept().await.unwrap();
                if let Some(report) = read_post(&mut s).await {
                    return report;
                }
            }
        })
        .await
        .expect("the page reports within the limit")
    }
}

/// Reads one request; the JSON body of a POST, else `None` (a preflight or a favicon).
async fn read_post(s: &mut tokio::net::TcpStream) -> Option<serde_json::Value> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    let (head_len, content_length) = loop {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buf.extend_from_slice(chunk.get(..n)?);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(buf.get(..end)?).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, length);
        }
    };
    while buf.len() < head_len + content_length {
        let n = s.read(&mut chunk).await.ok()?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(chunk.get(..n)?);
    }
    let _ = s
        .write_all(
            b"HTTP/1.1 204 No Content\r\naccess-control-allow-origin: *\r\nconnection: close\r\n\r\n",
        )
        .await;
    let is_post = buf.starts_with(b"POST");
    let body = buf.get(head_len..)?;
    if !is_post {
        return None;
    }
    serde_json::from_slice(body).ok()
}

/// The player page's URL in test mode: play `game` at `tier` for `seconds`, sending `inputs`
/// key presses, then stop and report to `report`.
pub(crate) fn page_url(
    broker: SocketAddr,
    game: &str,
    tier: &str,
    genre: &str,
    seconds: u32,
    inputs: u32,
    report: &str,
) -> String {
    format!(
        "http://{broker}/?autoplay=1&game={game}&tier={tier}&genre={genre}&seconds={seconds}&inputs={inputs}&report={report}"
    )
}
