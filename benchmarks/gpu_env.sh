# Sourced by the GPU scripts (run from the repository root on a lent GPU machine): output folder,
# and `albef_kernels` importable from the source tree without installing the package.
OUT=${OUT:-/tmp/albef_gpu_out}
mkdir -p "$OUT" /tmp/pp
ln -sfn "$PWD/kernels" /tmp/pp/albef_kernels   # the import name setup.py gives kernels/
export PYTHONPATH="$PWD:/tmp/pp${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1  # keeps carried wheels' paths
