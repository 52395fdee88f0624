#!/usr/bin/env bash
# Encoder (E) role: an encoder-only vLLM instance that exports its outputs with ECNixlConnector.
set -euo pipefail
usage() {
  cat <<'USAGE'
Usage: encoder.sh [--help]

Starts an encoder-only vLLM instance (--mm-encoder-only) whose worker exports
encoder outputs over NIXL; PD instances pull them. Configure with environment
variables:

  MODEL            model path or name; E and PD must use the SAME string (required)
  ENCODER_ID       the id PD knows this encoder by                  [enc0]
  HOST, PORT       OpenAI HTTP server (the proxy talks to it)       [0.0.0.0, 8100]
  CONTROL_ADDRESS  HOST:PORT the export service binds; PD's ENCODERS must name an
                   address that reaches it                          [0.0.0.0:7100]
  POOL_BYTES       registered export arena, bytes                   [268435456]
  LEASE_S          how long an export waits for its pull            [30]
  METRICS_ADDRESS  HOST:PORT for a Prometheus /metrics endpoint     [none]
  EC_NIXL_TOKEN    shared token for the control plane               [none]
  CPU_BIND         VLLM_CPU_OMP_THREADS_BIND on CPU hosts           [unset]
  PYTHON           interpreter with vllm and ec_nixl                [repo .venv, else python3]
  EXTRA_ARGS       more arguments for the vLLM server               [none]
UCX_* variables pass through to NIXL (e.g. UCX_TLS=tcp, UCX_NET_DEVICES=eth0).
USAGE
}
[[ "${1:-}" == "--help" || "${1:-}" == "-h" ]] && { usage; exit 0; }
: "${MODEL:?set MODEL (see --help)}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

extra=$(json_object encoder_id "${ENCODER_ID:-enc0}" control_address "${CONTROL_ADDRESS:-0.0.0.0:7100}" \
  pool_bytes:int "${POOL_BYTES:-268435456}" lease_s:num "${LEASE_S:-30}" \
  metrics_address "${METRICS_ADDRESS:-}" token "${EC_NIXL_TOKEN:-}")
exec_vllm --mm-encoder-only --port "${PORT:-8100}" \
  --ec-transfer-config "{\"ec_connector\": \"ECNixlConnector\", \"ec_role\": \"ec_producer\", \"ec_connector_extra_config\": $extra}"
