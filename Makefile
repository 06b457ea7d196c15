# devops-model — every target sets up .venv by itself when needed.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
EXTRAS := .[data,deepspeed,dev,docs,gguf,qlora,quantize,serve]
# requirements.lock: every Python package at the version the test suite passed on (written by
# `make lock`, never by hand), except torch. Without a GPU, torch is pinned to the CPU build
# (constraints.txt); with nvidia-smi on PATH pip picks the ordinary CUDA torch and its CUDA libraries.
# Both apply inside build isolation too (PIP_CONSTRAINT).
LOCK   := $(CURDIR)/requirements.lock
PIN    := $(if $(shell command -v nvidia-smi 2>/dev/null),,$(CURDIR)/constraints.txt)
# Two pytest-xdist workers, a test file each at a time (--dist loadfile keeps a file's module fixtures in one
# worker), one OpenMP thread each (tests/conftest.py); the trained kit is built once and shared under a file
# lock. --durations: CI's log shows the slowest tests. PYTEST="-q" runs it in one process; figures in
# docs/development/testing.md.
PYTEST ?= -q -n 2 --dist loadfile --durations=30

.PHONY: install test test-fast demo lint bench clean lock browser docs-corpus docs docs-site golang llama-cpp

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt requirements.lock
	test -x $(PY) || python3 -m venv $(VENV)
	PIP_CONSTRAINT="$(PIN) $(LOCK)" $(PY) -m pip install -q --upgrade pip setuptools wheel
	PIP_CONSTRAINT="$(PIN) $(LOCK)" DS_BUILD_OPS=0 $(PY) -m pip install -q -e '$(EXTRAS)'
	@$(MAKE) --no-print-directory llama-cpp VENV=$(VENV)
	touch $(STAMP)

# llama.cpp for `export --format gguf` (its checks, and the q4_0 / q4_k_m quantizer): llama-cpp-python
# built from its source distribution with Debian's cmake and g++ (PyPI has no wheel this platform can
# install); pip caches the built wheel, so only the first install on a machine compiles (~15 min on 2
# cores). A portable CPU build: GGML_NATIVE=OFF with x86-64-v3 (AVX2, FMA, F16C) named, not
# -march=native, so the cached wheel runs on any x86-64 CPU since 2015 and never dies of an illegal
# instruction on another machine sharing the cache (on an AVX2-only CPU, as here, that is what native
# gives anyway; AVX-512 machines give up a little matmul speed). A failed build does not stop the
# install: its one-line reason goes to $(VENV)/llama-cpp-python.failed, and export and the tests that
# need llama.cpp say or skip with it.
LLAMA_X86   := $(if $(filter x86_64 amd64,$(shell uname -m)),-DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON,)
LLAMA_CMAKE := -DGGML_NATIVE=OFF $(LLAMA_X86) -DGGML_BLAS=OFF -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF \
               -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF
llama-cpp:
	@command -v cmake >/dev/null && command -v g++ >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq cmake g++ >/dev/null) || true; }
	@rm -f $(VENV)/llama-cpp-python.failed; \
	$(PY) -c 'import llama_cpp' 2>/dev/null || echo "building llama-cpp-python from source (once per machine: pip caches the wheel) ..."; \
	if CMAKE_ARGS="$(LLAMA_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) PIP_CONSTRAINT="$(PIN) $(LOCK)" \
	   $(PY) -m pip install -q llama-cpp-python > $(VENV)/llama-cpp-build.log 2>&1; then \
	  rm -f $(VENV)/llama-cpp-build.log; \
	else \
	  { grep -m1 -iE "error|not found|No such" $(VENV)/llama-cpp-build.log || echo "pip install llama-cpp-python failed"; } \
	    | cut -c1-300 > $(VENV)/llama-cpp-python.failed; \
	  echo "llama-cpp-python did not build ($$(cat $(VENV)/llama-cpp-python.failed)); full log: $(VENV)/llama-cpp-build.log"; \
	  echo "the llama.cpp checks of export --format gguf and its q4_0/q4_k_m types are off until it builds"; \
	fi

# Re-resolve every dependency to its newest release in a new venv, run the whole suite there, and
# rewrite requirements.lock only if it passes (then `make install` moves .venv to the new lock).
NEW := .venv-lock
lock:
	rm -rf $(NEW) && python3 -m venv $(NEW)
	PIP_CONSTRAINT="$(PIN)" $(NEW)/bin/python -m pip install -q --upgrade pip setuptools wheel
	PIP_CONSTRAINT="$(PIN)" DS_BUILD_OPS=0 $(NEW)/bin/python -m pip install -q -e '$(EXTRAS)'
	@$(MAKE) --no-print-directory llama-cpp VENV=$(NEW) LOCK=
	$(NEW)/bin/python -m pytest $(PYTEST)
	{ echo "# The tested stack: written by 'make lock' (pip freeze of a new venv in which the whole suite passed)."; \
	  echo "# torch is pinned by constraints.txt on CPU machines and left to pip on GPU machines; tested with"; \
	  echo "# $$($(NEW)/bin/python -m pip freeze | grep '^torch==') on Python $$($(NEW)/bin/python -c 'import platform; print(platform.python_version())'), $$(date -u +%Y-%m-%d)."; \
	  $(NEW)/bin/python -m pip freeze --all --exclude-editable | grep -v -E '^(torch|nvidia-.*|triton)=='; \
	} > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf $(NEW)
	@echo "requirements.lock rewritten; 'git diff requirements.lock' shows what moved"

# the chat page's test drives Debian's chromium (Playwright cannot download a browser here)
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) || \
	  echo "no chromium: the chat page test will be skipped (apt-get install chromium)"; }

# the data tests read Debian's documentation packages (real documents nobody here wrote: HTML, text, PDF, .gz);
# without apt (or root) they are skipped with a reason
DEBIAN_DOCS := debian-reference-en debian-reference-zh-cn postgresql-doc-15 nginx-doc docker-doc
docs-corpus:
	@missing=$$(for p in $(DEBIAN_DOCS); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null) || \
	  echo "no Debian doc packages ($$missing): the data corpus tests on real documents will be skipped"; }


# the Modelfile test renders its TEMPLATEs with Go's own text/template too (the engine ollama uses)
golang:
	@command -v go >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq golang-go >/dev/null) || \
	  echo "no Go: the Go text/template cross-check of the Modelfile will be skipped (apt-get install golang-go)"; }

test: $(STAMP) browser docs-corpus golang
	$(PY) -m pytest $(PYTEST)

# everything but the tests marked slow (worker launches, GPTQ, the full exam, models loaded in fresh
# CLI processes): the quick loop while developing
test-fast: $(STAMP) docs-corpus
	$(PY) -m pytest $(PYTEST) -m "not slow"

DM   := $(PY) -m devops_cli
DEMO := runs/demo

# The whole workflow on the tiny model, from scratch in runs/demo (that folder is the demo's own).
demo: $(STAMP)
	rm -rf $(DEMO)
	$(DM) tiny $(DEMO)/tiny
	$(DM) pt configs/tiny-pt.yaml nproc_per_node=2 model_name_or_path=$(DEMO)/tiny output_dir=$(DEMO)/pt
	$(DM) sft configs/tiny-sft.yaml finetuning_type=lora learning_rate=5e-3 model_name_or_path=$(DEMO)/pt output_dir=$(DEMO)/sft
	$(DM) export --adapter $(DEMO)/sft --output $(DEMO)/sft-merged
	$(DM) export --model $(DEMO)/sft-merged --format gguf --quant q8_0 --ollama --name devops-demo --output $(DEMO)/gguf
	$(DM) quantize --model $(DEMO)/sft-merged --output $(DEMO)/int4 --calib-seq-len 256
	@echo
	@echo "demo outputs:"
	@echo "  $(DEMO)/tiny        tiny Qwen2 base model + BPE tokenizer (built from the bundled corpus)"
	@echo "  $(DEMO)/pt          continued pretraining, 2 gloo workers: model, metrics.json, training_loss.png, logs/, runs/ (tensorboard)"
	@echo "  $(DEMO)/sft         LoRA adapter from ChatML sft on the bundled QA, with metrics.json and training_loss.png"
	@echo "  $(DEMO)/sft-merged  the adapter merged into full weights (AutoModelForCausalLM.from_pretrained loads it)"
	@echo "  $(DEMO)/gguf        sft-merged as GGUF q8_0 + ollama Modelfile, checked in transformers and llama.cpp (gguf.json);"
	@echo "                      run it in ollama: ollama create devops-demo -f $(DEMO)/gguf/Modelfile"
	@echo "  $(DEMO)/int4        GPTQ int4 of sft-merged, calibrated on the bundled corpus; quantize.json has sizes and perplexity"
	@# eval: the sft adapter (chat on: an sft output) if present, else the tiny model; the bundled sample
	@# exam always, the real 574-question DevOps exam when ../shared/data/devops-exam is there
	m="--model $(DEMO)/tiny"; [ -f $(DEMO)/sft/adapter_config.json ] && m="--model $(DEMO)/pt --adapter $(DEMO)/sft"; \
	$(DM) eval $$m --data-dir devops_cli/assets/exam --subjects all --shots 5 --output $(DEMO)/eval/sample-5shot.json && \
	if [ -d ../shared/data/devops-exam ]; then \
	  $(DM) eval $$m --data-dir ../shared/data/devops-exam --shots 5 --output $(DEMO)/eval/devops-exam-5shot.json; fi
	@echo; echo "chat, one-shot, with the sft model (a tiny model trained for seconds: expect rough text):"
	$(DM) chat --model $(DEMO)/sft-merged --prompt "How do I find out why a pod keeps restarting?" \
	  --max-new-tokens 64 --seed 0 --temperature 0.7 --top-p 0.9 --repetition-penalty 1.2
	@echo; echo "chat, one-shot, with the int4 GPTQ model of the same weights ($(DEMO)/int4):"
	$(DM) chat --model $(DEMO)/int4 --prompt "How do I find out why a pod keeps restarting?" \
	  --max-new-tokens 64 --seed 0 --temperature 0.7 --top-p 0.9 --repetition-penalty 1.2
	@echo; echo "serve: the sft model behind an OpenAI-compatible API, one question with curl, then stopped:"
	@port=$$($(PY) -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'); \
	$(DM) serve --model $(DEMO)/sft-merged --served-model-name demo --port $$port > $(DEMO)/serve.log 2>&1 & pid=$$!; \
	for i in $$(seq 180); do curl -sf http://127.0.0.1:$$port/health >/dev/null && break; kill -0 $$pid 2>/dev/null || break; sleep 1; done; \
	echo "$$ curl http://127.0.0.1:$$port/v1/chat/completions ..."; \
	curl -sS --fail-with-body http://127.0.0.1:$$port/v1/chat/completions -H 'Content-Type: application/json' \
	  -d '{"model": "demo", "messages": [{"role": "user", "content": "How do I find out why a pod keeps restarting?"}], "max_tokens": 48, "temperature": 0}'; \
	rc=$$?; echo; kill -TERM $$pid 2>/dev/null; wait $$pid; echo "serve stopped (exit $$?), log: $(DEMO)/serve.log"; exit $$rc

lint: $(STAMP)
	$(VENV)/bin/ruff check devops_cli tests bench

# docs/reference/cli.md and recipe-keys.md from the code (re-run after adding a command, option or recipe key;
# tests/test_docs.py fails while they are stale), then the docs' own checks (links, anchors, configs named)
docs: $(STAMP)
	$(PY) -m devops_cli.docsgen
	$(PY) -m devops_cli.docsgen --check

# the docs as a static site in site/ (mkdocs-material, the docs extra); --strict: a warning fails the build
docs-site: docs
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

bench: $(STAMP)
	set -e; for b in bench/*.py; do echo "== $$b"; $(PY) $$b; done

clean:
	rm -rf $(VENV) $(NEW) runs .pytest_cache site
