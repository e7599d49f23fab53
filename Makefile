# Two entry points for a fresh machine (see README): `make serve` and `make test`.
# Both create the virtual environment at .venv, install the project into it, and build the
# embedded default model and the CPU decode kernel into ~/.cache/splitserve (outside git) once.
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp

.PHONY: install model test serve bench-engine gpu-check

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

# The kernel compiles (one g++, ~40 s) while the model is built from its GGUF (~35 s): side by
# side on two cores. compileall: every Ray replica and worker imports the project anew; compiled
# once here, not in each process (none writes bytecode where PYTHONDONTWRITEBYTECODE is set).
# linear_tuning: which Linear forward this host's decode steps run fastest, measured on the
# default model at one thread (a replica's) while nothing else runs (~4.5 s; kept in the cache).
model: install
	$(PY) -m kvkernels.cpu_ops & kernel=$$!; \
	$(PY) -m engine.model_store; built=$$?; \
	wait $$kernel && test $$built -eq 0
	$(PY) -m compileall -q app engine deployments kvkernels placement bench > /dev/null
	$(PY) -m engine.linear_tuning --threads 1

# The suite in two pytest processes side by side: the Ray and wall-clock tests, and beside them
# at the lowest priority every other test (tests/split_suite.py). PYTEST_ARGS go to both.
test: model
	$(PY) -m ruff check .
	$(PY) -m tests.split_suite -q $(PYTEST_ARGS)

bench-engine: model
	$(PY) -m bench.engine_throughput

# SERVE_MODE=throughput or haproxy: Ray Serve's high-throughput front end (README, "Serve's
# front-end modes"); the settings must be in place before Ray starts, so they go on the command.
SERVE_MODE ?= default
# CONFIG: another config, e.g. serve_config_ray_llm.yaml (Ray Serve LLM's schema, README)
CONFIG ?= serve_config.yaml
serve: model
	settings="$$($(PY) -m deployments.serve_env $(SERVE_MODE))" && \
	env RAY_AUTH_MODE=disabled $$settings $(VENV)/bin/serve run $(CONFIG)

# On a GPU machine: the GPU tests (engine on CUDA, CUDA IPC KV transport) and the KV transfer
# benchmark between two GPU actors; CuPy comes from the [gpu] extra.
gpu-check: model
	$(PY) -m pip install -q -e ".[dev,gpu]"
	$(PY) -m pytest -q -rs -m gpu tests/test_gpu.py
	$(PY) -m bench.kv_transfer --device cuda --transports cuda_ipc,object_store
	$(PY) -m bench.draw_cost --device cuda --threads 1 --rounds 5
