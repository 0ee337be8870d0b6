#!/usr/bin/env bash
# Checks the Helm chart: `helm lint --strict`, then renders it with several value sets and
# validates every rendered resource, and the CRDs in charts/bulwark/crds/, against the
# Kubernetes API schemas of K8S_VERSION with kubernetes-validate --strict (unknown fields are
# errors). Any error, or a resource without a schema, fails the check. Works offline once helm
# (scripts/tools.sh) and kubernetes-validate (charts/requirements.txt, in .venv) are installed.
set -euo pipefail
cd "$(dirname "$0")/.."

K8S_VERSION=${K8S_VERSION:-1.32}
CHART=charts/bulwark
HELM=.tools/bin/helm
KV=.venv/bin/kubernetes-validate
RELEASE=bulwark
NAMESPACE=bulwark-system

[[ -x $HELM ]] || scripts/tools.sh

want=$(sed -n 's/^kubernetes-validate==//p' charts/requirements.txt)
if [[ ! -x $KV || "$("$KV" --version 2>/dev/null)" != "$want" ]]; then
  [[ -x .venv/bin/pip ]] || python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check --no-cache-dir -r charts/requirements.txt
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

# validate NAME FILE...: every resource in the files must pass.
validate() {
  local name=$1 out rc=0
  shift
  out=$("$KV" -k "$K8S_VERSION" --strict "$@" 2>&1) || rc=$?
  if (( rc != 0 )) || grep -qv '^INFO ' <<<"$out"; then
    grep -v '^INFO ' <<<"$out" >&2 || true
    echo "FAIL $name: not valid against Kubernetes $K8S_VERSION" >&2
    exit 1
  fi
  echo "ok   $name: $(grep -c ' passed for resource ' <<<"$out") resources valid against Kubernetes $K8S_VERSION"
}

# render NAME ARGS...: helm template with the given values into $tmp/NAME.yaml.
render() {
  local name=$1
  shift
  "$HELM" template "$RELEASE" "$CHART" --namespace "$NAMESPACE" "$@" >"$tmp/$name.yaml"
}

echo "== helm lint --strict"
"$HELM" lint --strict "$CHART"
"$HELM" lint --strict "$CHART" --namespace "$NAMESPACE" \
  --set watchNamespace=team-a --set replicas=1 --set serviceMonitor.enabled=false

echo "== kubernetes-validate $("$KV" --version) --strict -k $K8S_VERSION"
validate crds "$CHART"/crds/*.yaml

# Defaults: all namespaces, 2 replicas with leader election, a PDB, a generated certificate.
render defaults
validate defaults "$tmp/defaults.yaml"

# One namespace, one replica.
render single-namespace --set watchNamespace=team-a --set replicas=1 --set serviceMonitor.enabled=false
validate single-namespace "$tmp/single-namespace.yaml"

# A certificate from cert-manager, hard anti-affinity, zone spread, extra args and env.
render custom --set tls.existingSecret=bulwark-operator-cert \
  --set webhook.certManagerCertificate=bulwark-system/bulwark-operator-cert --set podAntiAffinity=hard \
  --set replicas=3 --set 'extraArgs[0]=--example' --set 'extraEnv[0].name=BULWARK_LOG' \
  --set 'extraEnv[0].value=debug' --set 'imagePullSecrets[0].name=regcred' \
  --set 'topologySpreadConstraints[0].maxSkew=1' \
  --set 'topologySpreadConstraints[0].topologyKey=topology.kubernetes.io/zone' \
  --set 'topologySpreadConstraints[0].whenUnsatisfiable=ScheduleAnyway'
validate custom "$tmp/custom.yaml"

echo "== notes"
"$HELM" install "$RELEASE" "$CHART" --namespace "$NAMESPACE" --dry-run=client | sed -n '/^NOTES:$/,$p' >"$tmp/notes.txt"
.venv/bin/python scripts/argocd-check.py --compare-notes "$tmp/notes.txt"
"$HELM" install "$RELEASE" "$CHART" --namespace "$NAMESPACE" --dry-run=client --set argocd.notes=false \
  | grep -q 'resource.customizations' && { echo "FAIL argocd.notes=false still prints the snippet" >&2; exit 1; }

echo "== rendered content"
fail() { echo "FAIL $*" >&2; exit 1; }
kinds() { sed -n "s/^kind: //p" "$1" | sort | uniq -c | awk '{s = s (NR > 1 ? ", " : "") $1 " " $2} END {print s}'; }
echo "defaults:         $(kinds "$tmp/defaults.yaml")"
echo "single-namespace: $(kinds "$tmp/single-namespace.yaml")"
grep -q '^kind: ClusterRoleBinding$' "$tmp/defaults.yaml" || fail "defaults: no ClusterRoleBinding"
grep -q '^kind: PodDisruptionBudget$' "$tmp/defaults.yaml" || fail "defaults: no PodDisruptionBudget"
grep -q '^kind: Secret$' "$tmp/defaults.yaml" || fail "defaults: no generated TLS Secret"
grep -q '^kind: PodDisruptionBudget$' "$tmp/single-namespace.yaml" && fail "single-namespace: a PodDisruptionBudget with one replica"
grep -q -- '- --namespace=team-a$' "$tmp/single-namespace.yaml" || fail "single-namespace: no --namespace=team-a"
[[ $(grep -c '^kind: ClusterRole$' "$tmp/single-namespace.yaml") == 2 ]] \
  || fail "single-namespace: only the TokenReview and namespace-read ClusterRoles may be cluster-wide"
sed -n '/name: bulwark-operator-namespaces$/,/^---/p' "$tmp/single-namespace.yaml" \
  | tr -d '\n' | grep -q 'resources: \[namespaces\] *verbs: \[get\]' \
  || fail "single-namespace: the webhook cannot read namespaces' defaults, or reads them with more than get"
grep -q '^kind: Secret$' "$tmp/custom.yaml" && fail "custom: a Secret is generated although tls.existingSecret is set"
grep -q 'secretName: bulwark-operator-cert$' "$tmp/custom.yaml" || fail "custom: tls.existingSecret is not mounted"
# The injection webhook: registered with the generated CA, scoped to the watched namespace, and
# without a CA bundle it cannot know when the certificate comes from elsewhere.
grep -q '^kind: MutatingWebhookConfiguration$' "$tmp/defaults.yaml" || fail "defaults: no MutatingWebhookConfiguration"
grep -q '^      caBundle: ' "$tmp/defaults.yaml" || fail "defaults: the webhook has no caBundle"
grep -q -- '- --webhook-listen=0.0.0.0:9443$' "$tmp/defaults.yaml" || fail "defaults: the operator serves no webhook"
grep -q 'operator: In$' "$tmp/single-namespace.yaml" || fail "single-namespace: the webhook takes other namespaces"
grep -q '^      caBundle: ' "$tmp/custom.yaml" && fail "custom: a caBundle was made up for tls.existingSecret"
grep -q 'cert-manager.io/inject-ca-from: "bulwark-system/bulwark-operator-cert"' "$tmp/custom.yaml" \
  || fail "custom: cert-manager is not asked to inject the webhook's CA"
grep -q 'bulwark.dev/dns-names: "bulwark-operator,.*bulwark-operator-webhook.bulwark-system.svc' "$tmp/defaults.yaml" \
  || fail "defaults: the certificate does not name the webhook's Service"
# Pod Security "restricted" for the operator's pods, and a read-only root filesystem.
for f in "$tmp/defaults.yaml" "$tmp/single-namespace.yaml"; do
  .venv/bin/python - "$f" <<'PY' || fail "$f: a pod or container is not restricted"
import sys, yaml
bad = []
for doc in yaml.safe_load_all(open(sys.argv[1])):
    if not doc or doc.get("kind") != "Deployment":
        continue
    pod = doc["spec"]["template"]["spec"]
    psc = pod.get("securityContext", {})
    for c in pod.get("initContainers", []) + pod["containers"]:
        sc = c.get("securityContext", {})
        want = {
            "runAsNonRoot": sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True,
            "allowPrivilegeEscalation": sc.get("allowPrivilegeEscalation") is False,
            "capabilities.drop ALL": "ALL" in sc.get("capabilities", {}).get("drop", []),
            "no added capabilities": not sc.get("capabilities", {}).get("add"),
            "seccompProfile RuntimeDefault": (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault",
            "readOnlyRootFilesystem": sc.get("readOnlyRootFilesystem") is True,
        }
        bad += [f"{doc['metadata']['name']}/{c['name']}: {k}" for k, ok in want.items() if not ok]
    if pod.get("hostNetwork") or pod.get("hostPID") or any("hostPath" in v for v in pod.get("volumes", [])):
        bad.append(f"{doc['metadata']['name']}: host namespaces or paths")
print("\n".join(bad), file=sys.stderr)
sys.exit(1 if bad else 0)
PY
done
echo "ok   restricted: the operator's pods meet Pod Security restricted, root filesystem read-only"
# The Secret list/watch can be turned off, with the operator told so.
grep -q 'resources: \[secrets\]' "$tmp/defaults.yaml" || fail "defaults: no Secret list/watch for the missing-Secret condition"
render no-secret-watch --set rbac.watchSecrets=false
validate no-secret-watch "$tmp/no-secret-watch.yaml"
sed -n '/verbs: \[list, watch\]/{x;p;d;};x' "$tmp/no-secret-watch.yaml" | grep -q 'secrets' \
  && fail "no-secret-watch: Secrets are still listed or watched"
grep -q -- '- --watch-secrets=false$' "$tmp/no-secret-watch.yaml" || fail "no-secret-watch: the operator is not told"
# Credentials name only Secrets unless the value says otherwise.
grep -q -- '--allow-local-credentials' "$tmp/defaults.yaml" && fail "defaults: resources may name the sidecars' files"
render local-credentials --set allowLocalCredentials=true
grep -q -- '- --allow-local-credentials$' "$tmp/local-credentials.yaml" || fail "local-credentials: the operator is not told"
# ModelServers: what they run may be written; ScaledObjects only with KEDA.
grep -q 'resources: \[deployments\]' "$tmp/defaults.yaml" || fail "defaults: the operator cannot write Deployments"
grep -q 'keda.sh' "$tmp/defaults.yaml" && fail "defaults: ScaledObjects may be written without keda.enabled"
render keda --set keda.enabled=true --set keda.prometheusAddress=http://prometheus.monitoring:9090
grep -q 'resources: \[scaledobjects\]' "$tmp/keda.yaml" || fail "keda: the operator cannot write ScaledObjects"
grep -q -- '- --prometheus-address=http://prometheus.monitoring:9090$' "$tmp/keda.yaml" || fail "keda: no --prometheus-address"
validate keda "$tmp/keda.yaml"
# TLS interception: the CA Secret may be created, then written by name only; never by default.
grep -q 'bulwark-intercept-ca' "$tmp/defaults.yaml" && fail "defaults: Secrets may be written without tlsInterception.enabled"
render interception --set tlsInterception.enabled=true
grep -q 'resourceNames: \[bulwark-intercept-ca\]' "$tmp/interception.yaml" || fail "interception: the CA Secret cannot be written"
grep -q -- '- --tls-interception$' "$tmp/interception.yaml" || fail "interception: no --tls-interception"
validate interception "$tmp/interception.yaml"
# Signed models: the key reaches the operator, which hands it to the sidecars it injects.
grep -q 'BULWARK_MODEL_PUBLIC_KEY' "$tmp/defaults.yaml" && fail "defaults: a model key without models.publicKey"
render signed-models --set-string 'models.publicKey=-----BEGIN PUBLIC KEY-----
MCowBQYDK2VwAyEA+c4Nvy+oHXjLZihwBKPQt2Ey04wIun92XRksiNSXZ/E=
-----END PUBLIC KEY-----'
grep -q 'name: BULWARK_MODEL_PUBLIC_KEY' "$tmp/signed-models.yaml" || fail "signed-models: the operator gets no BULWARK_MODEL_PUBLIC_KEY"
validate signed-models "$tmp/signed-models.yaml"
render no-webhook --set webhook.enabled=false
grep -qE 'MutatingWebhookConfiguration|webhook-listen|9443' "$tmp/no-webhook.yaml" && fail "webhook.enabled=false still renders the webhook"
validate no-webhook "$tmp/no-webhook.yaml"

# The ServiceMonitor is a Prometheus Operator CRD without a schema here: only check it renders.
render monitor --set serviceMonitor.enabled=true --set serviceMonitor.labels.release=prometheus
grep -q '^kind: ServiceMonitor$' "$tmp/monitor.yaml" || fail "serviceMonitor.enabled=true renders no ServiceMonitor"
.venv/bin/python -c 'import sys, yaml; list(yaml.safe_load_all(open(sys.argv[1])))' "$tmp/monitor.yaml" \
  || fail "serviceMonitor.enabled=true renders invalid YAML"
echo "ok   monitor: the ServiceMonitor renders"

# Values that must be refused.
if out=$("$HELM" template "$RELEASE" "$CHART" --set tls.existingSecret=x 2>&1); then
  fail "tls.existingSecret without a CA for the webhook was accepted"
fi
grep -q 'webhook.caBundle' <<<"$out" || fail "tls.existingSecret without a CA: the error does not say what to set: $out"
if "$HELM" template "$RELEASE" "$CHART" --set leaderElection.enabled=false >/dev/null 2>&1; then
  fail "replicas=2 without leader election was accepted"
fi
"$HELM" template "$RELEASE" "$CHART" --set leaderElection.enabled=false --set replicas=1 >/dev/null \
  || fail "replicas=1 without leader election was refused"
echo "ok   refused: replicas > 1 without leader election"

echo "chart-check: all good"
