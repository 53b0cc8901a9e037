"""Compile the ITC forward kernel's autotune configs for sm_90 (H100/H200) without a GPU and print each
config (kernels/itc_loss.py `_FWD_CONFIGS`) shared memory, registers and spill stack (cuobjdump), to
choose configs that fit before a device is lent. Shared memory above 232,448 bytes per block cannot launch on sm_90; a stack > 0 means
register spills.

    python benchmarks/kernels/sm90_resources.py          # ~1-2 min on 2 CPU cores

Needs the Triton wheel's bundled ptxas/cuobjdump (no CUDA driver). The printed table is what
`_FP32_D256_FITS` in kernels/itc_loss.py records (the fp32 configs that fit).
"""

import importlib
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
SM90_SHARED_LIMIT = 232_448


def resources(kernel) -> tuple[int, int]:
    """(registers, stack bytes) of a compiled kernel, read from its cubin."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        tool = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    return int(re.search(r"REG:(\d+)", out).group(1)), int(re.search(r"STACK:(\d+)", out).group(1))


def main() -> None:
    itc = importlib.import_module("albef_kernels.itc_loss")
    fwd = getattr(itc._itc_loss_fwd_kernel, "fn", itc._itc_loss_fwd_kernel)  # under the autotuner
    configs = [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in itc._FWD_CONFIGS]
    target = GPUTarget("cuda", 90, 32)
    print(f"triton {triton.__version__}, target sm_90, D = BLOCK_D = 256, features fp32")
    print(f"{'queue':6s} {'load':4s} {'BLOCK_M':>7s} {'BLOCK_N':>7s} {'warps':>5s} {'stages':>6s} {'shared B':>9s} "
          f"{'regs':>5s} {'stack B':>7s}  fits")
    for (qtype, lowp, precision), tma, (bm, bn, warps, stages) in itertools.product(
            (("bf16", True, "tf32"), ("fp32", False, "tf32x3")), (False, True), configs):
        signature = {n: ("*fp32" if n.endswith("_ptr") else "i32") for n in fwd.arg_names}
        signature["Count_ptr"] = "*i32"
        queue = f"tensordesc<{qtype}[{bn}, 256]>" if tma else f"*{qtype}"
        signature.update(QU0=queue, QU1=queue, PO=f"tensordesc<fp32[{bm}, 256]>" if tma else "*fp32")
        consts = dict(D=256, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=256, LOWP_DOT=lowp, PRECISION=precision,
                      QUEUE_DTYPE=tl.bfloat16 if lowp else tl.float32, USE_TMA=tma, INBATCH=False)
        signature.update({k: "constexpr" for k in consts})
        src = ASTSource(fn=fwd, signature=signature,
                        constexprs={(fwd.arg_names.index(k),): v for k, v in consts.items()})
        kernel = triton.compile(src, target=target, options=dict(num_warps=warps, num_stages=stages))
        regs, stack = resources(kernel)
        shared = kernel.metadata.shared
        print(f"{qtype:6s} {'tma' if tma else 'ptr':4s} {bm:7d} {bn:7d} {warps:5d} {stages:6d} {shared:9d} {regs:5d} {stack:7d}  "
              f"{'yes' if shared <= SM90_SHARED_LIMIT else 'NO (shared)'}", flush=True)


if __name__ == "__main__":
    main()
