#!/usr/bin/env bash
# One node: N encoders + 1 PD + the proxy, each a real process, using the multi-node role scripts.
set -euo pipefail
usage() {
  cat <<'USAGE'
Usage: run.sh [--encoders N] [--help]

Starts N encoder instances (default 1), one PD instance and the proxy on this
machine, waits until all answer /health, prints the proxy's URL and stays in
the foreground; Ctrl-C stops everything. Environment:

  MODEL        model path or name (required)
  PROXY_PORT   where clients connect          [8000]
  CPU_BINDS    on a CPU-only host, VLLM_CPU_OMP_THREADS_BIND for the encoders and
               PD, space-separated, e.g. "0 1" [unset]
  EXTRA_ARGS   more vLLM arguments for every instance
Logs go to ./epd-logs/.
Examples:
  MODEL=/models/llava ./run.sh                 # 1 encoder + 1 PD
  MODEL=/models/llava ./run.sh --encoders 2    # 2 encoders + 1 PD
USAGE
}
encoders=1
while (($#)); do
  case "$1" in
    --encoders) encoders=$2; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
: "${MODEL:?set MODEL (see --help)}"
roles="$(cd "$(dirname "${BASH_SOURCE[0]}")/../multi_node" && pwd)"
read -r -a binds <<<"${CPU_BINDS:-}"
mkdir -p epd-logs
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM

wait_healthy() {
  for _ in $(seq 600); do
    curl -sf "$1/health" >/dev/null && return 0
    sleep 1
  done
  echo "$1 not healthy after 10 minutes" >&2
  return 1
}

encoder_urls=() encoder_map=()
for i in $(seq 0 $((encoders - 1))); do
  ENCODER_ID="enc$i" HOST=127.0.0.1 PORT=$((8100 + i)) CONTROL_ADDRESS="127.0.0.1:$((7100 + i))" \
    CPU_BIND="${binds[0]:-}" "$roles/encoder.sh" >"epd-logs/enc$i.log" 2>&1 &
  pids+=($!)
  encoder_urls+=("http://127.0.0.1:$((8100 + i))")
  encoder_map+=("enc$i=127.0.0.1:$((7100 + i))")
done
# One PD, the only consumer of these encoders: it may pull each item as it is exported.
ENCODERS=$(IFS=,; echo "${encoder_map[*]}") HOST=127.0.0.1 PORT=8200 CPU_BIND="${binds[1]:-}" PREFETCH=true \
  "$roles/pd.sh" >epd-logs/pd.log 2>&1 &
pids+=($!)
for url in "${encoder_urls[@]}" http://127.0.0.1:8200; do wait_healthy "$url"; done
ENCODER_URLS=$(IFS=,; echo "${encoder_urls[*]}") PD_URL=http://127.0.0.1:8200 HOST=127.0.0.1 \
  ENCODERS=$(IFS=,; echo "${encoder_map[*]}") PORT="${PROXY_PORT:-8000}" \
  "$roles/proxy.sh" >epd-logs/proxy.log 2>&1 &
pids+=($!)
wait_healthy "http://127.0.0.1:${PROXY_PORT:-8000}"
echo "ready: http://127.0.0.1:${PROXY_PORT:-8000}/v1/chat/completions ($encoders encoder(s) + 1 PD); Ctrl-C stops"
wait
