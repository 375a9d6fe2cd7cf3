#!/usr/bin/env bash
# Install personabot and run it on this machine (`personabot up`). Extra args go to `personabot up`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
exec personabot up "$@"
