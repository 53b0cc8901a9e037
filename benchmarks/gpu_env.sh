# Sourced by the GPU scripts (run from the repository root on a lent GPU machine): output folder,
# and `albef_kernels` importable from the source tree without installing the package.
OUT=${OUT:-/tmp/albef_gpu_out}
mkdir -p "$OUT" /tmp/pp
ln -sfn "$PWD/kernels" /tmp/pp/albef_kernels   # the import name setup.py gives kernels/
export PYTHONPATH="$PWD:/tmp/pp${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1  # keeps carried wheels' paths
# device_info FILE: the GPU (name, memory, driver, max SM clock) and torch/triton versions, shown and
# saved as $OUT/FILE
device_info() {
    { nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
      python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    } 2>&1 | tee "$OUT/$1"
}
