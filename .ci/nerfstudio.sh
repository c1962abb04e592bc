#!/usr/bin/env bash
# The nerfstudio plugin (issue 23) in its own venv: nerfstudio pins numpy<2 and its own gsplat, so it never
# enters the main environment. Builds the venv with the documented install (pip install -e ".[nerfstudio,test]"),
# checks that ns-train lists the studio methods and runs tests/test_nerfstudio_plugin.py there.
# Measured times are in docs/notes/issue23.md. NS_VENV overrides where the venv lives.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
export STUDIO_EXT_DIR="${STUDIO_EXT_DIR:-$PWD/.ci-cache/ext}"
NS_VENV="${NS_VENV:-$PWD/.ci-cache/ns-venv}"
t0=$(date +%s)

rm -rf "$NS_VENV"
python3 -m venv "$NS_VENV"
echo "== pip install -e .[nerfstudio,test] into $NS_VENV"
"$NS_VENV/bin/pip" install -q -e ".[nerfstudio,test]"
t1=$(date +%s)
"$NS_VENV/bin/python" -c "import numpy, torch, gsplat, nerfstudio, importlib.metadata as m; print('numpy', numpy.__version__, 'torch', torch.__version__, 'gsplat', gsplat.__version__, 'nerfstudio', m.version('nerfstudio'))"

echo "== ns-train lists the studio methods"
"$NS_VENV/bin/ns-train" --help > "$NS_VENV/ns-train-help.txt" 2>&1
grep -q "studio-sds" "$NS_VENV/ns-train-help.txt"
grep -q "studio-vsd" "$NS_VENV/ns-train-help.txt"

echo "== tests/test_nerfstudio_plugin.py"
# -P: the repository root stays off sys.path, so entry points come from the venv's install, not a stale
# *.egg-info left in the checkout by another environment's editable install
"$NS_VENV/bin/python" -P -m pytest tests/test_nerfstudio_plugin.py -q -p no:cacheprovider
t2=$(date +%s)
echo "nerfstudio venv: install $((t1 - t0)) s, checks and tests $((t2 - t1)) s, total $((t2 - t0)) s"
