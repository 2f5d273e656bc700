# robustserve: `make run` (the main job) and `make test`, both from a fresh machine; `make test-unit`: the unit tests
# alone (tests/unit, seconds), which need only the Python environment.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Debian packages the product needs: Java for TorchServe, the default dataset, Chromium for the demo's browser test,
# nginx for the TLS proxy in front of TorchServe (`robustserve serve start --proxy`, tests/integration/test_proxy.py).
APT_PACKAGES := openjdk-17-jre-headless dataset-fashion-mnist chromium nginx
FASHION_MNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz

.PHONY: run test test-unit install system clean

# The main job: serve the committed model zoo (no training; `robustserve run --preset quick|standard` trains).
run: install
	$(BIN)/robustserve run --zoo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

# tests/unit only: no TorchServe, nginx, browser or training run, so no Debian packages (no `system`).
test-unit: $(STAMP)
	$(BIN)/python -m pytest -q tests/unit

install: system $(STAMP)

# Installs the Debian packages that are missing when run as root; otherwise names the command to run.
system:
	@missing=""; \
	if ! command -v java >/dev/null 2>&1 || \
	   [ "$$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -1)" -lt 11 ]; then \
	  missing="$$missing openjdk-17-jre-headless"; fi; \
	[ -f $(FASHION_MNIST) ] || missing="$$missing dataset-fashion-mnist"; \
	[ -x /usr/bin/chromium ] || missing="$$missing chromium"; \
	[ -x /usr/sbin/nginx ] || missing="$$missing nginx"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "installing:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing \
	      || exit 1; \
	    case "$$missing" in *nginx*) \
	      if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet nginx 2>/dev/null; then \
	        echo "robustserve runs nginx itself (serve start --proxy): disabling the service Debian's package started"; \
	        systemctl disable --now nginx; \
	      fi;; \
	    esac; \
	  else \
	    echo "robustserve needs Debian packages:$$missing. Run: sudo apt-get update && sudo apt-get install -y$$missing" >&2; \
	    exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# torchattacks is the peer that `robustserve bench attacks` measures against. Its pinned
	# requests~=2.25 would downgrade requests under everything else, hence --no-deps.
	$(BIN)/pip install -q --no-deps torchattacks==3.5.1
	touch $(STAMP)

clean:
	rm -rf $(VENV) runs model_store/*.mar
