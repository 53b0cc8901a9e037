#!/usr/bin/env bash
# Creates an isolated virtual environment that can run a reference ALBEF implementation on the CPU,
# for the parity tier (albef_fast/parity). Its pins conflict with the project's own venv, hence a
# separate one that is only ever driven as a subprocess.
#
#   install_reference_env.sh lavis    VENV   salesforce-lavis 1.0.2 (the wheel, --no-deps) + the few
#                                            modules its ALBEF pretraining model touches (REFERENCE §7.1)
#   install_reference_env.sh original VENV   the deps of github salesforce/ALBEF (REFERENCE §0); the
#                                            code itself comes from a checkout ($ALBEF_REFERENCE_DIR)
#
# torch 2.13.0 is the CPU wheel from the machine's local wheel store (small, fast); elsewhere pip
# downloads it. No torchvision: timm 0.4.x imports it at package import but uses nothing from it,
# so the driver (albef_fast/parity/reference_side.py) registers a stub module instead.
set -euo pipefail
flavour=${1:?usage: install_reference_env.sh lavis|original VENV}
venv=${2:?usage: install_reference_env.sh lavis|original VENV}
python=${PYTHON:-python3}

rm -rf "$venv"
"$python" -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q torch==2.13.0 'numpy==1.26.4' wheel
case "$flavour" in
  lavis)
    # transformers 4.26.1 is the newest release LAVIS 1.0.2 accepts (>=4.25,<4.27); tokenizers 0.13.x
    # has py3.11 wheels. fairscale 0.4.4 is an sdist whose setup.py imports torch.
    "$pip" install -q --no-deps salesforce-lavis==1.0.2 timm==0.4.12
    "$pip" install -q transformers==4.26.1 omegaconf==2.3.0 iopath==0.1.10 pandas==2.2.3 pillow
    "$pip" install -q --no-build-isolation --no-deps fairscale==0.4.4
    ;;
  original)
    # ALBEF's xbert.py needs transformers 4.8.1 (4.26 breaks its decorators); 4.8.1 declares
    # tokenizers<0.11 (no py3.11 wheel) but ALBEF uses only the slow tokenizer: --no-deps plus the
    # pure-python deps it imports.
    "$pip" install -q --no-deps transformers==4.8.1 huggingface-hub==0.0.12 timm==0.4.12
    "$pip" install -q filelock packaging pyyaml regex requests sacremoses tqdm pillow
    ;;
  *) echo "unknown flavour $flavour (lavis|original)" >&2; exit 2 ;;
esac
touch "$venv/.parity-$flavour-v1"
