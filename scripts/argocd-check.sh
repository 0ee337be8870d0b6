#!/usr/bin/env bash
# Checks what Bulwark ships for Argo CD: the health checks and actions in
# charts/bulwark/argocd/ run by a real Lua 5.1 in Argo CD's sandbox against their tests, the
# argocd-cm snippet in docs/argocd.md, and the Applications in examples/argocd/ against Argo
# CD's published schema. Needs lua5.1 and lua-cjson (Debian), and the npm packages scripts/tools.sh installs.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v lua5.1 >/dev/null || { echo "lua5.1 is missing: apt-get install lua5.1 lua-cjson" >&2; exit 1; }
lua5.1 -e 'require("cjson")' 2>/dev/null || { echo "lua-cjson is missing: apt-get install lua-cjson" >&2; exit 1; }
[[ -d .tools/npm/node_modules/@kubernetes-models/argo-cd ]] || scripts/tools.sh
.venv/bin/python scripts/argocd-check.py
NODE_PATH=.tools/npm/node_modules node scripts/validate-crs.js examples/argocd/*.yaml
