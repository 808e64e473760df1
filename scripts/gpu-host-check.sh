#!/usr/bin/env bash
# Checks Framecast's NVML path on a GPU host: what the driver reports (nvidia-smi), what the
# agent's inventory reads, and a broker + agent pair on loopback with the NVML inventory and the
# simulated vGPU backend (MIG mode and vGPUs are left as they are), then one allocation.
#   scripts/gpu-host-check.sh [BIN_DIR]   # BIN_DIR holds framecast-broker and framecast-agent
#                                         # (target/release by default); OUT=dir keeps the logs
set -u
D=$(cd "${1:-target/release}" && pwd)
OUT=${OUT:-$(mktemp -d)}
echo "logs in $OUT"
exec > >(tee "$OUT/device.log") 2>&1
echo "== nvidia-smi"; nvidia-smi -L; nvidia-smi --query-gpu=name,driver_version,memory.total,mig.mode.current,encoder.stats.sessionCount,encoder.stats.averageFps --format=csv
nvidia-smi -q -d ENCODER_STATS,MEMORY | head -40
echo "== framecast-agent inventory (NVML)"; $D/framecast-agent inventory | tee "$OUT/inventory.toml"; echo "rc=$?"
W=$(mktemp -d); cd "$W"
$D/framecast-broker certs init --dir pki --agent gpu-host >/dev/null
KEY=device-key
cat > broker.toml <<EOT
region = "local"
data_dir = "bd"
token_key = "pki/token.key"
[http]
listen = "127.0.0.1:18080"
[control]
listen = "127.0.0.1:14433"
[control.tls]
ca_cert = "pki/ca.pem"
cert = "pki/broker.pem"
key = "pki/broker.key"
[[games]]
id = "arena-shooter"
genre = "fps"
[[tenants]]
id = "ops"
api_key_sha256 = "$(printf '%s' "$KEY" | sha256sum | cut -d' ' -f1)"
admin = true
EOT
cat > agent.toml <<EOT
node_id = "gpu-host"
region = "local"
data_dir = "ad"
[broker]
address = "127.0.0.1:14433"
server_name = "localhost"
[broker.tls]
ca_cert = "pki/ca.pem"
cert = "pki/agent-gpu-host.pem"
key = "pki/agent-gpu-host.key"
[inventory]
source = "nvml"
[vgpu]
backend = "simulated"
[whep]
listen = "127.0.0.1:18443"
[http]
listen = "127.0.0.1:19101"
[[games]]
id = "arena-shooter"
EOT
$D/framecast-broker serve -c broker.toml 2> broker.log & BP=$!
sleep 1
$D/framecast-agent run -c agent.toml 2> agent.log & AP=$!
for i in $(seq 1 40); do curl -sf http://127.0.0.1:19101/readyz >/dev/null && break; sleep 0.5; done
echo "== agent readyz: $(curl -s http://127.0.0.1:19101/readyz)"
echo "== GET /v1/nodes"; curl -s -H "Authorization: Bearer $KEY" http://127.0.0.1:18080/v1/nodes; echo
echo "== POST /v1/sessions 720p (refused where no GPU can stream, e.g. without NVENC)"; curl -s -H "Authorization: Bearer $KEY" -H 'content-type: application/json' -d '{"player_id":"p","game":"arena-shooter","tier":"720p","queue":false}' -w ' HTTP %{http_code}' http://127.0.0.1:18080/v1/sessions; echo
echo "== agent /metrics"; curl -s http://127.0.0.1:19101/metrics | grep -E '^framecast_agent_(framebuffer|encoder|link_up)'
kill $AP $BP; wait $AP $BP
echo "== agent log"; cat agent.log | head -30
echo "== broker log"; cat broker.log | head -20
cp agent.log broker.log "$OUT/"
