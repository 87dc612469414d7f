#!/usr/bin/env bash
# Wheels the lent GPU box lacks (it has torch 2.11 for Python 3.12, transformers, accelerate, ...; no internet), for
# bench/gpu_suite.sh. Run here, from the repository root: they land in .whl/ (git-ignored, .gitignore), which the
# device tool carries (carry [".whl"], 64 MiB at most in all). The list and sizes: bench/README.md, "gpu".
#
# Not carried, and why (checked 2026-12-06):
# - sageattention: PyPI has 1.0.6 only (Triton, 20 kB); diffusers 0.42.1 dispatches to SageAttention >= 2.1.1
#   (its CUDA kernels, built from source), so 1.0.6 would give no backend.
# - flash-attn-4 (4.0.0b36, pure Python, 0.5 MB): diffusers 0.42.1 has no backend for the package (only
#   `flash_4_hub`, which downloads the kernel from the Hugging Face Hub at first use), and its CuTe-DSL dependency
#   nvidia-cutlass-dsl-libs-cu12 alone is 91.7 MB, over the carry limit.
set -euo pipefail
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    diffusers==0.42.1 torchao==0.18.0 cache-dit==1.5.3 calflops==0.3.2 importlib_metadata zipp
ls -l .whl | awk 'NR > 1 {printf "%8.2f MiB  %s\n", $5 / 1048576, $9}'
du -sh .whl
