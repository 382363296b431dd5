#!/usr/bin/env bash
# The whole test suite against every ComfyUI host found, each in its own virtual environment.
#
#   bash tools/run_tests.sh [pytest arguments...]
#
# It sets up what it needs first: PyTorch where this Python has none (pip's choice of build, or the
# specifiers in $TORCH_PACKAGES), the pack's and the tests' requirements, and Debian's chromium for the browser
# test where apt-get can install it (else that test is skipped, loudly). Hosts: the folders in COMFYUI_PATHS (colon-separated), else COMFYUI_PATH, else ComfyUI
# itself when this pack sits in ComfyUI/custom_nodes/, plus ~/comfy/ComfyUI and ~/comfy/ComfyUI-0.14 where they
# exist. Each host gets a virtual environment at <host>/.venv (made on first use, seeing this Python's packages,
# torch included) with its own requirements (torch lines excluded) and `requests` (ComfyUI 0.8 imports it
# without listing it). With no host the suite runs once in this Python and every host test is skipped, loudly.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! python -c "import torch" 2>/dev/null; then
  # shellcheck disable=SC2086  # TORCH_PACKAGES is a list of requirement specifiers
  python -m pip install -q ${TORCH_PACKAGES:-torch torchvision}
fi
python -m pip install -q -r requirements.txt -r tests/requirements.txt

# The browser test drives Debian's chromium through playwright; never `playwright install`.
if ! command -v chromium >/dev/null; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
    || echo "COULD NOT INSTALL chromium (apt-get failed): the browser test will be SKIPPED."
fi

hosts=()
if [ -n "${COMFYUI_PATHS:-}" ]; then
  IFS=: read -r -a hosts <<< "$COMFYUI_PATHS"
elif [ -n "${COMFYUI_PATH:-}" ]; then
  hosts=("$COMFYUI_PATH")
else
  if [ "$(basename "$(dirname "$PWD")")" = custom_nodes ]; then hosts+=("$(dirname "$(dirname "$PWD")")"); fi
  for candidate in "$HOME/comfy/ComfyUI" "$HOME/comfy/ComfyUI-0.14"; do
    if [ -f "$candidate/main.py" ]; then hosts+=("$candidate"); fi
  done
fi

if [ ${#hosts[@]} -eq 0 ]; then
  echo "NO ComfyUI host found (set COMFYUI_PATHS or COMFYUI_PATH): host tests will be SKIPPED."
  exec python -m pytest tests -ra "$@"
fi

status=0
summary=()
for host in "${hosts[@]}"; do
  host="$(cd "$host" && pwd)"
  version="$(sed -n 's/^__version__ = "\(.*\)"/\1/p' "$host/comfyui_version.py" 2>/dev/null || true)"
  echo "=== ComfyUI ${version:-?} at $host"
  if [ ! -x "$host/.venv/bin/python" ]; then
    python -m venv --system-site-packages "$host/.venv"
  fi
  grep -v -E '^(torch|torchvision|torchaudio)\b' "$host/requirements.txt" > "$host/.venv/requirements-no-torch.txt"
  "$host/.venv/bin/python" -m pip install -q -r "$host/.venv/requirements-no-torch.txt" requests
  log="$(mktemp)"
  if ! COMFYUI_PATH="$host" "$host/.venv/bin/python" -m pytest tests -ra -p no:cacheprovider "$@" 2>&1 | tee "$log"; then
    status=1
  fi
  summary+=("ComfyUI ${version:-?}: $(grep -o 'ComfyUI host tests: [^;]*' "$log" | tail -1 || echo 'no summary line')")
  rm -f "$log"
done

echo "=================================================================="
for line in "${summary[@]}"; do echo "$line"; done
exit $status
