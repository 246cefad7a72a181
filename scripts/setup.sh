#!/usr/bin/env bash
# Create .venv with the CPU build of torch and this project installed (editable).
#   scripts/setup.sh          runtime only
#   scripts/setup.sh test     plus the test tools (pytest, transformers, pexpect, hypothesis)
# Idempotent: a second run with an unchanged pyproject.toml does nothing.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
VENV="${FASTSERVE_VENV:-.venv}"
EXTRA="${1:-}"
TORCH_VERSION="2.13.0"

"$PYTHON" - <<'PY' || { echo "fastserve-edge needs Python 3.11 or newer (set PYTHON=...)" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 11) else 1)
PY

# The web page's browser test (tests/e2e/test_web_page.py) drives Debian's chromium through
# chromium-driver. Installed here when missing, as root with apt; elsewhere that test is skipped.
if [ "$EXTRA" = "test" ] && ! { command -v chromium && command -v chromedriver; } >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "installing chromium and chromium-driver (the web page's browser test)…" >&2
        { DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null 2>&1 \
            || { apt-get update -qq >/dev/null 2>&1 \
                 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; }; } \
            || echo "could not install chromium and chromium-driver: the web page's browser test will be skipped" >&2
    else
        echo "chromium and chromium-driver are not installed (and this is not root with apt): the web page's" \
             "browser test will be skipped; install them to run it" >&2
    fi
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --quiet --disable-pip-version-check)

stamp="$VENV/.fastserve-installed${EXTRA:+-$EXTRA}"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi

# torch first, pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$TORCH_VERSION') else 1)" 2>/dev/null; then
    echo "installing torch $TORCH_VERSION (CPU build)…" >&2
    "${PIP[@]}" install "torch==$TORCH_VERSION" 2>/dev/null \
        || "${PIP[@]}" install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
fi

echo "installing fastserve-edge${EXTRA:+ [$EXTRA]}…" >&2
"${PIP[@]}" install -e ".${EXTRA:+[$EXTRA]}" 2>&1 | grep -v "^WARNING: Location" >&2 || true
"$VENV/bin/python" -c "import fastserve_edge, torch; assert '+cu' not in torch.__version__" \
    || { echo "installation failed; see the messages above" >&2; exit 1; }
echo "$want" > "$stamp"
