#!/usr/bin/env bash
# Run the test suite: sets up .venv with the test tools on first use, installs Debian chromium for the
# browser test when it is missing and we may (root + apt-get), then runs pytest. Extra arguments go to pytest.
set -euo pipefail
PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PROJECT_ROOT"
source scripts/setup_env.sh requirements-dev.txt
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing Debian chromium for the browser tests" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >&2 \
    || echo "[setup] could not install chromium; browser tests will be skipped" >&2
fi
exec "$PROTOSCOPE_PYTHON" -m pytest "$@"
