#!/usr/bin/env bash
# Pack nvidia-dali (CUDA 13) and its dependencies for the lent GPU machine (Python 3.12, x86-64, no
# network), which takes at most 64 MiB per device call: download the wheels, unpack them into one tree
# as `pip install --target` would, drop the extension modules built for other Pythons, strip the
# libraries, and split one tar.xz (~174 MB) into three pieces under .dpk1-3/ (git-ignored through
# .git/info/exclude). Then, one device call per piece, each within 30 s of the last (the machine stays
# warm that long): carry .dpkN, `mkdir -p /tmp/dk && cp .dpkN/* /tmp/dk/`; in the last call also
# `cat /tmp/dk/part0* > /tmp/dk/all.tar.xz && python3 -c "import tarfile; tarfile.open('/tmp/dk/all.tar.xz',
# 'r:xz').extractall('/tmp', filter='fully_trusted')" && export PYTHONPATH=/tmp/site`, then
# benchmarks/gpu_data.sh (carry .vocab and set ALBEF_FAST_VOCAB=$PWD/.vocab/vocab.txt).
#   run: bash benchmarks/pack_dali.sh        (~3 min on 2 cores; needs pip, unzip, strip, xz)
set -euo pipefail
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$WORK/wheels" \
    nvidia-dali-cuda130==2.4.0 nvidia-nvimgcodec-cu13==0.9.0.20 nvidia-nvjpeg==13.3.2.43 \
    nvidia-nvjpeg2k-cu13==0.11.0.51 nvidia-nvtiff-cu13==0.8.0.82 nvidia-libnvcomp-cu13==5.3.0.16 \
    astunparse==1.6.3 gast==0.7.0 six==1.17.0 packaging==26.3 optree==0.20.0 nvtx==0.2.17 makefun==1.16.0 \
    libcst==1.9.0 webdataset==1.0.2 braceexpand==0.1.7
mkdir -p "$WORK/site"
for w in "$WORK"/wheels/*.whl; do unzip -q -o "$w" -d "$WORK/site"; done
find "$WORK/site" -name "*cpython-3*" ! -name "*cpython-312-*" -delete
find "$WORK/site" -name "*.so*" -type f -exec strip --strip-unneeded {} +
tar cf - -C "$WORK" site | xz -T2 -7 > "$WORK/site.tar.xz"
split -n 3 -d "$WORK/site.tar.xz" "$WORK/part"
for i in 1 2 3; do
    rm -rf ".dpk$i" && mkdir ".dpk$i" && mv "$WORK/part0$((i - 1))" ".dpk$i/"
    grep -qx "/.dpk$i/" .git/info/exclude || echo "/.dpk$i/" >> .git/info/exclude
done
du -sh .dpk1 .dpk2 .dpk3
