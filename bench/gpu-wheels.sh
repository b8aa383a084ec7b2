#!/usr/bin/env bash
# Fetch the wheels bench/gpu.sh installs on a GPU machine without network (Python 3.12,
# x86-64 manylinux), into .whl/ (git-ignored; it travels with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
  --platform manylinux2014_x86_64 --dest .whl \
  pydantic pydantic-core annotated-types typing-inspection typing-extensions
ls .whl
