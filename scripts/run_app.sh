#!/usr/bin/env bash
# Run the Protoscope app: sets up .venv on first use, makes the demo data if missing, starts Streamlit.
# Extra arguments go to `streamlit run` (e.g. --server.port 8600).
# PROTOSCOPE_DATA_ROOT: folder whose stacks the app may open by path (default: the bundled assets/).
set -euo pipefail
PROJECT_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$PROJECT_ROOT"
source scripts/setup_env.sh requirements.txt
"$PROTOSCOPE_PYTHON" -m core demo --ensure
exec "$PROTOSCOPE_PYTHON" -m streamlit run app.py "$@"
