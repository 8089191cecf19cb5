#!/usr/bin/env bash
# Install densepipe (this checkout, not editable) with the tested, pinned set of constraints.txt
# into the environment of $PYTHON. The Dockerfile runs it; it runs the same on any machine.
#
#   docker/install.sh                       install
#   docker/install.sh --dry-run             resolve only: what pip would install, nothing changes
#   docker/install.sh --dry-run --ignore-installed   ... as into an empty environment (an image)
#
# Any arguments are passed on to pip install. Environment:
#   PYTHON       the interpreter to install into (default python3)
#   TORCH_INDEX  a package index for torch and torchvision alone, installed first without their
#                dependencies (the Dockerfile passes PyTorch's CPU wheel index). Unset or empty:
#                they come from the indexes pip is configured with (on Linux, PyPI's CUDA builds).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
pip=("$python" -m pip install --disable-pip-version-check -c "$root/constraints.txt")

if [[ -n "${TORCH_INDEX:-}" ]]; then
    # `torch==2.14.1` in constraints.txt also matches the index's local versions (2.14.1+cpu).
    "${pip[@]}" --no-deps --index-url "$TORCH_INDEX" "$@" torch torchvision
fi
"${pip[@]}" "$@" "$root"
