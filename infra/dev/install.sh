#!/usr/bin/env bash
# Create ./.venv with everything the project, its tests and the reference comparison need.
# Idempotent: rerunning only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"
$PIP install -q --upgrade pip
# CPU build of torch, pinned: an unpinned torch pulls a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
# Installed without their declared dependencies: uss 0.0.4 pins old versions of everything
# (its real imports are in the `reference` extra); tinysoundfont declares pyaudio, which it
# does not need for offline rendering and which does not build without PortAudio.
# Before the project: the reference also installs a `uss` command, which ours must replace.
$PIP install -q --no-deps "uss==0.0.4" "tinysoundfont==0.3.7"
# --no-warn-conflicts: pip would report uss 0.0.4's deliberately missing pins as errors.
$PIP install -q --no-warn-conflicts -e ".[test,reference]"
