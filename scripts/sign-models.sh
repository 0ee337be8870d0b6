#!/usr/bin/env bash
# Signs the model directories under MODELS_DIR for local use: an ed25519 key is generated once
# (MODELS_DIR/model-signing.key, private, and model-signing.pub), then each directory's
# manifest.json, which lists every file with its sha256, is signed into manifest.sig (base64).
# The sidecar checks it with --model-public-key MODELS_DIR/model-signing.pub (make run does).
#   scripts/sign-models.sh MODELS_DIR
set -euo pipefail
dir=${1:?the models directory}
key=$dir/model-signing.key
pub=$dir/model-signing.pub
if [[ ! -s $key ]]; then
  (umask 077 && openssl genpkey -algorithm ed25519 -out "$key")
fi
openssl pkey -in "$key" -pubout -out "$pub"
for model in "$dir"/*/; do
  manifest=$model/manifest.json
  [[ -f $manifest ]] || continue
  # Every file is listed, with the hash it has now.
  python3 - "$model" <<'PY'
import hashlib, json, os, sys
d = sys.argv[1]
path = os.path.join(d, "manifest.json")
m = json.load(open(path))
files = sorted(f for f in os.listdir(d) if f not in ("manifest.json", "manifest.sig") and os.path.isfile(os.path.join(d, f)))
m["sha256"] = {f: hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest() for f in files}
json.dump(m, open(path, "w"), indent=2)
PY
  openssl pkeyutl -sign -rawin -inkey "$key" -in "$manifest" | base64 -w0 > "$model/manifest.sig"
  echo "signed $manifest"
done
