#!/usr/bin/env bash
# Wheels the lent GPU box lacks (it has torch 2.11, transformers, accelerate, ...; no internet), for
# bench/gpu_suite.sh. Run here, from the repository root; .whl/ is git-ignored locally and carried by the device
# tool (carry [".whl"]).
set -euo pipefail
grep -qx "/.whl/" .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo /.whl/ >> .git/info/exclude; }
python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    diffusers==0.42.1 torchao==0.18.0 cache-dit==1.5.3 calflops==0.3.2 importlib_metadata zipp
du -sh .whl
