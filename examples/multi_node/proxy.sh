#!/usr/bin/env bash
# Proxy role: the OpenAI endpoint clients use; it sends each request to an encoder and to PD.
set -euo pipefail
usage() {
  cat <<'USAGE'
Usage: proxy.sh [--help]

Starts the EPD proxy: each chat/completions request goes to an encoder
(max_tokens 1, images spread over the encoders), then to PD with the
encoders' ec_transfer_params (with OVERLAP=1: to PD at the same time, which
pulls each image's embedding the moment an encoder announces it).
Configure with environment variables:

  ENCODER_URLS  encoder HTTP URLs, comma-separated (required)
  PD_URL        the PD instance's HTTP URL (required)
  HOST, PORT    where clients connect        [0.0.0.0, 8000]
  ENCODER_TIMEOUT_S  give up on a silent encoder after this, skip it
                a few seconds; PD encodes locally [30]
  OVERLAP       1: PD gets each request at once (its front end runs
                while the encoders encode; meant for E and PD on separate
                hosts, no gain measured on one small host); 0: only after
                the encoders answered, with where their outputs are [0]
  ENCODERS      id=HOST:PORT of each encoder's export service, comma-separated,
                as PD's ENCODERS: the proxy follows their events and does
                not send an encoder images an encoder still holds (a chat's
                earlier turns); PD pulls those. Token: $EC_NIXL_TOKEN  [unset]
  PYTHON        interpreter with ec_nixl     [repo .venv, else python3]
USAGE
}
[[ "${1:-}" == "--help" || "${1:-}" == "-h" ]] && { usage; exit 0; }
: "${ENCODER_URLS:?set ENCODER_URLS (see --help)}"
: "${PD_URL:?set PD_URL (see --help)}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "$here/common.sh"

args=()
for url in ${ENCODER_URLS//,/ }; do args+=(--encoder "$url"); done
for encoder in ${ENCODERS//,/ }; do args+=(--encoder-events "$encoder"); done
[[ "${OVERLAP:-0}" == 1 ]] && args+=(--overlap)
cd "$REPO"
exec "$PYTHON" -m ec_nixl.proxy.app "${args[@]}" --pd "$PD_URL" --host "${HOST:-0.0.0.0}" \
  --port "${PORT:-8000}" --encoder-timeout "${ENCODER_TIMEOUT_S:-30}"
