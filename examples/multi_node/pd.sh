#!/usr/bin/env bash
# Prefill/decode (PD) role: a vLLM instance that pulls encoder outputs with ECNixlConnector.
set -euo pipefail
usage() {
  cat <<'USAGE'
Usage: pd.sh [--help]

Starts the prefill/decode vLLM instance. For each request that carries
ec_transfer_params it pulls the encoder outputs from the named encoder over
NIXL before scheduling it; if that fails it encodes locally. Configure with
environment variables:

  MODEL          model path or name; the SAME string as the encoders' (required)
  ENCODERS       id=HOST:PORT of each encoder's export service, comma-separated,
                 e.g. enc0=10.0.0.1:7100,enc1=10.0.0.2:7100 (required)
  HOST, PORT     OpenAI HTTP server                          [0.0.0.0, 8200]
  RECEIVE_BYTES  registered receive arena per worker, bytes  [268435456]
  PULL_TIMEOUT_S deadline of one pull                        [10]
  PREFETCH       true: pull each item as its encoder exports it, before the
                 request arrives (only if this PD is its encoders' sole
                 consumer: a pull frees the encoder's copy)    [false]
  EC_NIXL_TOKEN  shared token for the control plane          [none]
  CPU_BIND       VLLM_CPU_OMP_THREADS_BIND on CPU hosts      [unset]
  PYTHON         interpreter with vllm and ec_nixl           [repo .venv, else python3]
  EXTRA_ARGS     more arguments for the vLLM server          [none]
UCX_* variables pass through to NIXL (e.g. UCX_TLS=tcp, UCX_NET_DEVICES=eth0).
USAGE
}
[[ "${1:-}" == "--help" || "${1:-}" == "-h" ]] && { usage; exit 0; }
: "${MODEL:?set MODEL (see --help)}"
: "${ENCODERS:?set ENCODERS, e.g. enc0=10.0.0.1:7100 (see --help)}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

encoders=$(json_object $(tr ',=' '  ' <<<"$ENCODERS"))
extra=$(json_object encoders:raw "$encoders" receive_bytes:int "${RECEIVE_BYTES:-268435456}" \
  pull_timeout_s:num "${PULL_TIMEOUT_S:-10}" prefetch:raw "${PREFETCH:-}" token "${EC_NIXL_TOKEN:-}")
exec_vllm --port "${PORT:-8200}" \
  --ec-transfer-config "{\"ec_connector\": \"ECNixlConnector\", \"ec_role\": \"ec_consumer\", \"ec_connector_extra_config\": $extra}"
