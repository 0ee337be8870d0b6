#!/usr/bin/env bash
# End-to-end check on a local kind cluster; not part of `make test`. Needs docker and kind.
# Builds the operator and sidecar images (Dockerfile), loads them into the cluster, installs the
# chart, applies examples/quickstart, waits until the operator has accepted the LLMRoute, then
# deploys a labelled workload and checks that its pod got the sidecar, which turns Ready once
# it has its config from the operator. See docs/kind.md.
#
#   KIND_CLUSTER=bulwark      cluster name; created when missing, reused otherwise
#   KIND_NODE_IMAGE=          node image for a new cluster (kind's default when empty)
#   NAMESPACE=bulwark-system  release namespace
#   APP_NAMESPACE=bulwark-quickstart  where examples/quickstart is applied
#   TAG=dev                   tag of the local images
#   SKIP_BUILD=1              use the images already built with TAG
#   TIMEOUT=180s              how long to wait for the rollout and the Accepted condition
#   DELETE_CLUSTER=1          delete the cluster at the end (also on failure)
set -euo pipefail
cd "$(dirname "$0")/.."

CLUSTER=${KIND_CLUSTER:-bulwark}
NAMESPACE=${NAMESPACE:-bulwark-system}
APP_NAMESPACE=${APP_NAMESPACE:-bulwark-quickstart}
TAG=${TAG:-dev}
TIMEOUT=${TIMEOUT:-180s}
RELEASE=bulwark
OPERATOR_IMAGE=bulwark-operator:$TAG
SIDECAR_IMAGE=bulwark-sidecar:$TAG
CONTEXT=kind-$CLUSTER

for tool in docker kind; do
  if ! command -v "$tool" >/dev/null; then
    echo "kind-e2e: $tool is not installed; see docs/kind.md" >&2
    exit 1
  fi
done
[[ -x .tools/bin/kubectl && -x .tools/bin/helm ]] || scripts/tools.sh
kubectl() { .tools/bin/kubectl --context "$CONTEXT" "$@"; }
helm() { .tools/bin/helm --kube-context "$CONTEXT" "$@"; }
step() { printf '\n== %s\n' "$*"; }

diagnose() {
  local rc=$?
  if (( rc != 0 )); then
    echo "kind-e2e: failed (exit $rc); the operator's state:" >&2
    kubectl -n "$NAMESPACE" get deployment,pods,lease -o wide >&2 || true
    kubectl -n "$NAMESPACE" logs -l app.kubernetes.io/component=operator --all-containers \
      --prefix --tail=100 >&2 || true
    kubectl -n "$APP_NAMESPACE" get llmroutes,scannerpolicies -o yaml >&2 || true
    kubectl -n "$APP_NAMESPACE" logs -l app=injected -c bulwark-sidecar --tail=50 >&2 || true
    kubectl -n "$APP_NAMESPACE" get events --sort-by=.lastTimestamp >&2 || true
  fi
  if [[ ${DELETE_CLUSTER:-} == 1 ]]; then
    kind delete cluster --name "$CLUSTER" || true
  fi
  exit "$rc"
}
trap diagnose EXIT

step "kind cluster $CLUSTER"
if kind get clusters 2>/dev/null | grep -qx "$CLUSTER"; then
  echo "reusing the existing cluster"
else
  kind create cluster --name "$CLUSTER" --wait 120s ${KIND_NODE_IMAGE:+--image "$KIND_NODE_IMAGE"}
fi
kubectl cluster-info

if [[ ${SKIP_BUILD:-} != 1 ]]; then
  step "build $OPERATOR_IMAGE and $SIDECAR_IMAGE"
  DOCKER_BUILDKIT=1 docker build --target operator -t "$OPERATOR_IMAGE" .
  DOCKER_BUILDKIT=1 docker build --target sidecar -t "$SIDECAR_IMAGE" .
fi

step "load the images into $CLUSTER"
kind load docker-image --name "$CLUSTER" "$OPERATOR_IMAGE" "$SIDECAR_IMAGE"

step "install the chart into $NAMESPACE"
helm upgrade --install "$RELEASE" charts/bulwark --namespace "$NAMESPACE" --create-namespace \
  --set image.repository=bulwark-operator --set image.tag="$TAG" --set image.pullPolicy=Never \
  --set sidecar.image.repository=bulwark-sidecar --set sidecar.image.tag="$TAG" \
  --wait=watcher --timeout "$TIMEOUT"
kubectl -n "$NAMESPACE" rollout status deployment/bulwark-operator --timeout "$TIMEOUT"

step "apply examples/quickstart in $APP_NAMESPACE"
kubectl create namespace "$APP_NAMESPACE" --dry-run=client -o yaml | kubectl apply -f -
kubectl -n "$APP_NAMESPACE" apply -f examples/quickstart/

step "wait for the LLMRoutes to be Accepted"
kubectl -n "$APP_NAMESPACE" wait llmroutes --all --for=condition=Accepted --timeout "$TIMEOUT"

step "deploy a labelled workload: the webhook injects the sidecar"
kubectl -n "$APP_NAMESPACE" apply -f - <<'YAML'
apiVersion: apps/v1
kind: Deployment
metadata: {name: injected}
spec:
  selector: {matchLabels: {app: injected}}
  template:
    metadata:
      labels: {app: injected, bulwark.dev/inject: "true"}
    spec:
      containers:
        # kind nodes carry the pause image; the sidecar is what is checked here.
        - {name: app, image: "registry.k8s.io/pause:3.10", imagePullPolicy: IfNotPresent}
YAML
kubectl -n "$APP_NAMESPACE" rollout status deployment/injected --timeout "$TIMEOUT"
injected=$(kubectl -n "$APP_NAMESPACE" get pods -l app=injected -o jsonpath='{.items[0].spec.initContainers[0].name}')
[[ $injected == bulwark-sidecar ]] || { echo "kind-e2e: the pod has no injected sidecar" >&2; exit 1; }
for _ in $(seq 30); do
  kubectl -n "$APP_NAMESPACE" get configmap bulwark-injected >/dev/null 2>&1 && break
  sleep 1
done
kubectl -n "$APP_NAMESPACE" get configmap bulwark-injected -o jsonpath='{.metadata.annotations}'
echo

step "status"
kubectl -n "$NAMESPACE" get deployment,pods,lease -o wide
kubectl -n "$APP_NAMESPACE" get llmroutes,scannerpolicies,modelrollouts -o wide
kubectl -n "$APP_NAMESPACE" get llmroutes -o \
  jsonpath='{range .items[*]}{.metadata.name}{"\n"}{range .status.conditions[*]}  {.type}={.status} {.reason}: {.message}{"\n"}{end}{end}'
echo
echo "kind-e2e: passed"
