#!/usr/bin/env bash
# One GPU: the one-process loop against DeepSpeed ZeRO-1/2/3 (one rank) at albef_base B=64 bf16, one run.
# DeepSpeed is not installed on the lent GPU machine: its wheels travel in gpu_wheels/ (carry it), built
# here with `pip wheel --no-deps deepspeed==0.19.8` and `pip download --only-binary=:all: --python-version 3.12`
# of its dependencies (hjson msgpack psutil py-cpuinfo einops pydantic pydantic-core annotated-types
# typing-inspection ninja).
source benchmarks/gpu_env.sh
python3 -m pip install -q --no-index --no-deps --target /tmp/dsdeps gpu_wheels/*.whl > "$OUT/ds_install.log" 2>&1 \
    || { echo "deepspeed wheels did not install"; tail -5 "$OUT/ds_install.log"; exit 1; }
export PYTHONPATH="$PYTHONPATH:/tmp/dsdeps"
python3 -c "import deepspeed; print('deepspeed', deepspeed.__version__)"
python3 benchmarks/bench_distributed.py gpu-step --csv "$OUT/distributed_gpu.csv" 2>&1 | grep -v -i warn | tee "$OUT/gpu_step.log"
