"""albef-fast: a performance-engineered ALBEF pretraining system.

`kernels/` installs under the import name `albef_kernels` (a bare `kernels` would clash with the
Hugging Face `kernels` distribution that transformers probes for).
"""

from setuptools import find_packages, setup

setup(
    name="albef-fast",
    version="0.1.0",
    description="ALBEF (Align before Fuse) pretraining: exact objectives, fast kernels, one training loop",
    python_requires=">=3.10",
    packages=find_packages(include=["albef_fast", "albef_fast.*"]) + ["albef_kernels"],
    package_dir={"albef_kernels": "kernels"},
    install_requires=[
        # torch/torchvision are pinned by the Makefile (torch 2.14.1 + torchvision 0.29.1 is the only
        # pairing timm can import on the development machines; see README).
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "transformers>=4.40",
        "tokenizers>=0.19",
        "numpy",
        "pillow",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "safetensors",
    ],
    extras_require={
        "train": ["deepspeed==0.19.8", "nvidia-dali-cuda130==2.4.0"],
        "gpu": ["flash-attn>=2.6"],
        "dev": ["pytest==9.2.0", "pytest-benchmark==5.3.1"],
    },
    entry_points={"console_scripts": ["albef-fast=albef_fast.cli:main"]},
)
