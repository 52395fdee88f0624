"""ec_nixl: move vision-encoder outputs between vLLM instances with NIXL."""
