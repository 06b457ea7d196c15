# devops-model — every target sets up .venv by itself when needed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# Without a GPU, pin torch to the CPU build (also inside build isolation, via PIP_CONSTRAINT);
# with nvidia-smi on PATH pip picks the ordinary CUDA torch.
PIN    := $(if $(shell command -v nvidia-smi 2>/dev/null),,$(CURDIR)/constraints.txt)
PYTEST ?= -q

.PHONY: install test demo lint bench clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	PIP_CONSTRAINT=$(PIN) DS_BUILD_OPS=0 $(PY) -m pip install -q -e '.[deepspeed,dev]'
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST)

demo: $(STAMP)
	$(PY) -m devops_cli demo

lint: $(STAMP)
	$(VENV)/bin/ruff check devops_cli tests bench
	$(VENV)/bin/ruff format --check devops_cli tests bench

bench: $(STAMP)
	$(PY) bench/train.py

clean:
	rm -rf $(VENV) runs .pytest_cache
