#!/usr/bin/env bash
# The transformers versions at the ends of the pin read and write the same files: run the version-sensitive
# tests (text-encoder key layout, LoRA module names) under each VERSION given, default the lowest version
# requirements.txt allows. The highest allowed version is what `pip install -r requirements.txt` resolves, so
# the main test run covers it.
#
# Each version gets a throw-away venv that sees the installed packages (--system-site-packages) and adds only
# that transformers (plus what it needs); torch stays pinned to the installed build, so no other wheel is pulled.
set -euo pipefail
cd "$(dirname "$0")/.."
lowest=$(sed -n 's/^transformers>=\([0-9.]*\).*/\1/p' requirements.txt)
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=("$lowest")
torch_version=$(python3 -c "import torch; print(torch.__version__.split('+')[0])")
tests=(tests/test_text_encoder_layout.py tests/test_kohya_names.py)

for version in "${versions[@]}"; do
    venv=$(mktemp -d)
    trap 'rm -rf "$venv"' EXIT
    python3 -m venv --system-site-packages "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check "transformers==$version" "torch==$torch_version"
    "$venv/bin/python" -c "import sys, transformers; from packaging.version import Version as V
sys.exit(V(transformers.__version__) != V('$version') and f'got transformers {transformers.__version__}')"
    echo "transformers $version: ${tests[*]}"
    OMP_NUM_THREADS=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider "${tests[@]}"
    rm -rf "$venv"
done
