//! `agent.toml`: the node agent's configuration.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::validate::Checker;
use super::{FieldError, TlsConfig, Validate};
use crate::ids::{GameId, NodeId, RegionName, TierName};
use crate::protocol::DEFAULT_MAX_FRAME;

/// The agent's whole configuration.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The node's id; the host name when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_id: Option<NodeId>,
    /// The region the node serves; must match its broker's.
    pub region: RegionName,
    /// Where the agent keeps its generation counter and vGPU records across restarts.
    pub data_dir: PathBuf,
    /// How to reach the broker.
    pub broker: BrokerLinkConfig,
    /// Where the GPU inventory comes from.
    pub inventory: InventoryConfig,
    /// How vGPUs are created.
    pub vgpu: VgpuConfig,
    /// The WHEP endpoint players connect to.
    pub whep: WhepConfig,
    /// How game instances are supervised and limited.
    #[serde(default)]
    pub instances: InstancesConfig,
    /// The operations endpoint: `/metrics`, `/livez`, `/readyz`.
    #[serde(default)]
    pub http: AgentHttpConfig,
    /// Games this node can run.
    #[serde(default)]
    pub games: Vec<AgentGameConfig>,
}

/// `[instances]`: supervision of game instances.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InstancesConfig {
    /// A cgroup v2 directory delegated to the agent (systemd `Delegate=yes`); each instance
    /// gets a child with CPU and memory limits. Absent: no limits, which the agent logs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cgroup_root: Option<PathBuf>,
    /// The user game processes run as: a user name (with its primary group), `user:group`, or
    /// numeric `uid:gid`. Absent: the agent's own user — root on a host with `mdev` or MIG
    /// vGPUs, which the agent warns about, since a game could then read the agent's keys and
    /// change its own limits.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// First restart delay of a crashed warm instance, ms; it doubles per crash in a row.
    pub restart_backoff_min_ms: u64,
    /// Longest restart delay, ms.
    pub restart_backoff_max_ms: u64,
    /// A warm instance that ran this long before crashing counts as healthy again, s.
    pub healthy_after_s: u64,
}

impl Default for InstancesConfig {
    fn default() -> Self {
        Self {
            cgroup_root: None,
            user: None,
            restart_backoff_min_ms: 1_000,
            restart_backoff_max_ms: 60_000,
            healthy_after_s: 30,
        }
    }
}

/// `[http]`: the agent's operations endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AgentHttpConfig {
    /// Address for `/metrics`, `/livez` and `/readyz`.
    pub listen: SocketAddr,
}

impl Default for AgentHttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9101)),
        }
    }
}

/// `[broker]`: the control-plane link.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BrokerLinkConfig {
    /// The broker's QUIC address, `host:port`.
    pub address: String,
    /// The name the broker's certificate is checked against.
    pub server_name: String,
    /// Certificates for mutual TLS.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsConfig>,
    /// Largest protocol frame accepted from the broker.
    pub max_frame_bytes: u32,
}

/// Where the agent learns what GPUs the node has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InventorySource {
    /// NVML if the driver loads, else the simulated inventory if one is configured.
    Auto,
    /// NVML only; the agent refuses to start without the driver.
    Nvml,
    /// The simulated inventory in `inventory.simulate`.
    Simulated,
}

/// `[inventory]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InventoryConfig {
    /// Where the inventory comes from.
    pub source: InventorySource,
    /// A TOML file describing simulated GPUs by model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub simulate: Option<PathBuf>,
}

/// How the agent creates vGPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VgpuBackendKind {
    /// Bookkeeping only, for simulated inventories.
    Simulated,
    /// Linux mediated devices through sysfs.
    Mdev,
    /// MIG instances through NVML.
    Mig,
}

/// `[vgpu]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VgpuConfig {
    /// The backend.
    pub backend: VgpuBackendKind,
    /// Root of the sysfs tree the mdev backend works in (`/sys`; a temp dir in tests).
    pub sysfs_root: PathBuf,
}

/// `[whep]`: where players connect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WhepConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// The URL players reach it at, when it differs from `http://<listen>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// Offer loopback ICE candidates. ICE forbids them between hosts; on for players on the
    /// same host (dev mode, tests, a sandbox with nothing but loopback).
    #[serde(default)]
    pub loopback_candidates: bool,
    /// Addresses players reach this host at when they differ from its interfaces' (1:1 NAT),
    /// offered as the host candidates.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub public_ips: Vec<std::net::IpAddr>,
    /// Lowest UDP port media may use; with `udp_port_max`, for firewalls. Any free port when
    /// unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_port_min: Option<u16>,
    /// Highest UDP port media may use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub udp_port_max: Option<u16>,
    /// The highest frame rate of a software-encoded stream (hosts without NVENC); a tier
    /// asking for more is streamed at this rate.
    #[serde(default = "default_software_max_fps")]
    pub software_max_fps: u16,
    /// Which video encoder streams use.
    #[serde(default)]
    pub encoder: StreamEncoder,
    /// Seconds a player may take from its offer to a connected stream before the agent gives
    /// the connection up (the session then waits for a new offer, as `reconnecting`).
    #[serde(default = "default_connect_timeout_s")]
    pub connect_timeout_s: u32,
}

fn default_connect_timeout_s() -> u32 {
    30
}

/// `whep.encoder`: which video encoder streams use.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StreamEncoder {
    /// NVENC on the session's GPU where the agent was built with it (feature `nvenc`) and it
    /// opens; the software encoder otherwise.
    #[default]
    Auto,
    /// The software H.264 encoder (OpenH264), always.
    Software,
    /// NVENC, or the stream fails.
    Nvenc,
}

fn default_software_max_fps() -> u16 {
    30
}

/// `[[games]]`: how to launch a game on this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentGameConfig {
    /// The game.
    pub id: GameId,
    /// The program to run; the built-in synthetic game when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<PathBuf>,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// Extra environment; the agent adds the assigned GPU, vGPU and limits.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Tiers it can run at; empty means all.
    #[serde(default)]
    pub tiers: Vec<TierName>,
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node_id: None,
            region: RegionName::new("local").unwrap_or_else(|_| unreachable!("valid literal")),
            data_dir: PathBuf::from("framecast-agent-data"),
            broker: BrokerLinkConfig {
                address: "127.0.0.1:4433".into(),
                server_name: "localhost".into(),
                tls: None,
                max_frame_bytes: DEFAULT_MAX_FRAME,
            },
            inventory: InventoryConfig {
                source: InventorySource::Auto,
                simulate: None,
            },
            vgpu: VgpuConfig {
                backend: VgpuBackendKind::Simulated,
                sysfs_root: PathBuf::from("/sys"),
            },
            whep: WhepConfig {
                listen: SocketAddr::from(([127, 0, 0, 1], 8443)),
                public_url: None,
                loopback_candidates: false,
                public_ips: Vec::new(),
                udp_port_min: None,
                udp_port_max: None,
                software_max_fps: default_software_max_fps(),
                encoder: StreamEncoder::Auto,
                connect_timeout_s: default_connect_timeout_s(),
            },
            instances: InstancesConfig::default(),
            http: AgentHttpConfig::default(),
            games: Vec::new(),
        }
    }
}

impl Validate for AgentConfig {
    fn validate(&self, errors: &mut Vec<FieldError>) {
        let mut c = Checker::new(errors);

        let mut broker = c.section("broker");
        let address_ok = self
            .broker
            .address
            .rsplit_once(':')
            .is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0)
            });
        broker.check(
            address_ok,
            "address",
            &self.broker.address,
            "must be host:port",
        );
        broker.check(
            !self.broker.server_name.is_empty(),
            "server_name",
            &self.broker.server_name,
            "must not be empty",
        );
        broker.range(
            "max_frame_bytes",
            self.broker.max_frame_bytes,
            4 * 1024,
            64 * 1024 * 1024,
        );
        if let Some(tls) = &self.broker.tls {
            tls.check(&mut broker.section("tls"));
        }

        let mut inventory = c.section("inventory");
        match (&self.inventory.source, &self.inventory.simulate) {
            (InventorySource::Simulated, None) => inventory.fail(
                "simulate",
                "",
                "must name a simulated inventory file when inventory.source = \"simulated\"",
            ),
            (_, Some(path)) => inventory.check(path.is_file(), "simulate", path, "file not found"),
            _ => {}
        }

        let mut vgpu = c.section("vgpu");
        vgpu.check(
            self.vgpu.sysfs_root.is_absolute(),
            "sysfs_root",
            &self.vgpu.sysfs_root,
            "must be an absolute path",
        );

        let mut instances = c.section("instances");
        if let Some(root) = &self.instances.cgroup_root {
            instances.check(
                root.is_absolute(),
                "cgroup_root",
                root,
                "must be an absolute path",
            );
        }
        if let Some(user) = &self.instances.user {
            let parts: Vec<&str> = user.split(':').collect();
            instances.check(
                matches!(parts.len(), 1 | 2) && parts.iter().all(|p| !p.trim().is_empty()),
                "user",
                user,
                "must be a user name, user:group, or uid:gid",
            );
        }
        instances.range(
            "restart_backoff_min_ms",
            self.instances.restart_backoff_min_ms,
            10,
            3_600_000,
        );
        instances.check(
            self.instances.restart_backoff_max_ms >= self.instances.restart_backoff_min_ms,
            "restart_backoff_max_ms",
            self.instances.restart_backoff_max_ms,
            "must be at least restart_backoff_min_ms",
        );
        instances.range("healthy_after_s", self.instances.healthy_after_s, 1, 86_400);

        let mut whep = c.section("whep");
        if let Some(url) = &self.whep.public_url {
            whep.check(
                url.starts_with("http://") || url.starts_with("https://"),
                "public_url",
                url,
                "must start with http:// or https://",
            );
        }
        whep.range("software_max_fps", self.whep.software_max_fps, 1, 240);
        whep.range("connect_timeout_s", self.whep.connect_timeout_s, 1, 600);
        match (self.whep.udp_port_min, self.whep.udp_port_max) {
            (None, None) => {}
            (Some(min), Some(max)) => {
                whep.check(min >= 1024, "udp_port_min", min, "must be at least 1024");
                whep.check(
                    max >= min,
                    "udp_port_max",
                    max,
                    "must be at least udp_port_min",
                );
            }
            (Some(min), None) => {
                whep.check(false, "udp_port_max", min, "must be set with udp_port_min");
            }
            (None, Some(max)) => {
                whep.check(false, "udp_port_min", max, "must be set with udp_port_max");
            }
        }

        let mut seen = BTreeSet::new();
        for (i, game) in self.games.iter().enumerate() {
            let mut g = c.section(&format!("games.{i}"));
            g.check(
                seen.insert(&game.id),
                "id",
                game.id.as_str(),
                "must be unique among games",
            );
            if let Some(cmd) = &game.command {
                g.check(
                    cmd.is_absolute(),
                    "command",
                    cmd,
                    "must be an absolute path",
                );
            }
            for key in game.env.keys() {
                g.check(
                    !key.is_empty() && !key.contains('=') && !key.starts_with("FRAMECAST_"),
                    "env",
                    key,
                    "names must be non-empty, hold no '=', and not start with FRAMECAST_ \
                     (the agent sets those)",
                );
            }
        }
    }
}
