"""The prefill/decode instance (PD): its scheduler side decides and leases (no NIXL in
that process), its workers (one per tensor-parallel rank) READ and lend to vLLM."""
