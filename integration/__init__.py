"""End-to-end harness with real vLLM on the CPU: tiny model, launcher, EPD proxy."""
