# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make serve   create .venv, install everything, start the daemon on config.yaml
#   make test    the same install, then stub check, lint, types and the test suite
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test lint protos bench bench-smoke clean deploy-tools check-install fuzz image-test

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned to the CPU build (see constraints.txt): nothing may pull a CUDA build.
	$(BIN)/pip install --quiet -c constraints.txt torch
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	# tritonclient (tests/test_kserve_v2.py, tests/test_kserve_http.py, bench v2) pins an older
	# protobuf than ours but works with it: installed without its pins; its other dependencies are
	# in the dev extras. So is kserve (tests/test_kserve_http.py: its InferenceRESTClient), whose
	# pins would bring its whole model server: the dev extras have what its REST client imports.
	$(BIN)/pip install --quiet --no-deps 'tritonclient[grpc,http]==2.73.0' 'kserve==0.21.0'
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/python scripts/export_seed.py packages/seed.pt  # the model config.yaml serves by name
	$(BIN)/deployd serve --config config.yaml

lint: install
	$(BIN)/python scripts/generate_protos.py --check
	$(BIN)/python scripts/generate_sync_client.py --check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: lint deploy-tools
	$(BIN)/pytest

# The live-daemon fuzz (tests/test_fuzz.py) for 5 minutes instead of make test's 20 s, and the
# property tests; DEPLOYD_FUZZ_SEED=N replays a failure's inputs.
fuzz: install
	DEPLOYD_FUZZ_SECONDS=$${DEPLOYD_FUZZ_SECONDS:-300} $(BIN)/pytest -p no:cacheprovider -o timeout=900 tests/test_fuzz.py tests/test_fuzz_v2.py tests/test_fuzz_sessions.py tests/test_fuzz_http.py tests/test_properties.py tests/test_properties_v2.py

# A plain install, as a user's or the image's: a fresh venv with torch and `pip install .`,
# no dev extras; the daemon from it answers the README's example. `make test` installs .[dev]
# and so cannot show a runtime dependency missing. About 2-3 minutes, most of it installing torch.
check-install:
	PYTHON=$(PYTHON) scripts/check_plain_install.sh

# prometheus (with promtool) and docker-compose from Debian, when missing: tests/test_deploy.py
# and tests/test_prometheus.py use them. Where an init system runs, Debian's prometheus package
# starts (and enables) its service on install; the tests start their own, so a prometheus the
# install started is stopped (and disabled under systemd). One that ran before is left alone.
deploy-tools:
	@missing=; \
	command -v promtool >/dev/null 2>&1 || missing="$$missing prometheus"; \
	command -v docker-compose >/dev/null 2>&1 || missing="$$missing docker-compose"; \
	if [ -n "$$missing" ]; then \
		sudo=; [ "$$(id -u)" = 0 ] || sudo=sudo; \
		before=" $$(echo $$(pgrep -x prometheus)) "; \
		echo "deploy-tools: installing$$missing with apt-get"; \
		$$sudo apt-get update -q && \
		$$sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing || exit 1; \
		started=; \
		for pid in $$(pgrep -x prometheus); do \
			case "$$before" in *" $$pid "*) ;; *) started="$$started $$pid" ;; esac; \
		done; \
		if [ -n "$$started" ]; then \
			echo "deploy-tools: stopping the prometheus service the install started (pid$$started)"; \
			if [ -d /run/systemd/system ]; then $$sudo systemctl disable --now prometheus; \
			else $$sudo service prometheus stop; fi || true; \
			$$sudo kill $$started 2>/dev/null || true; \
		fi; \
	fi

# The image built and run for real (scripts/image_test.sh): a local base image from debootstrap,
# a wheelhouse filled on the host, deploy/Dockerfile built from them, the container started,
# the seed model loaded and called, then stopped (drain, exit 0). Skips, saying why, where no
# Docker engine can start. First run about 4-5 minutes (debootstrap, torch into the image), then
# about 1 minute: the base image and the build's layers are cached.
image-test: install
	scripts/image_test.sh

protos: install
	$(BIN)/python scripts/generate_protos.py

# Benchmarks against baselines measured in the same run (bench/__init__.py); results in bench/results/.
bench: install
	$(BIN)/python -m bench

# Every benchmark in a tiny configuration: checks the suite works, not speed.
bench-smoke: install
	$(BIN)/python -m bench --smoke

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
