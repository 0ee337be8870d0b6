"""`make demo-rollout`: a ModelRollout that advances and then rolls back by itself, standalone.

Two local backends (the mock provider, as `stable` and `canary`), the sidecar on a directory
holding a route and a ModelRollout, and a client sending requests. The canary starts failing
partway through; the terminal shows each step and weight change as the sidecar decides it, and
the time from the first failing canary request to the rollback. No cluster, no key, no network.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = pathlib.Path(__file__).resolve().parent.parent
BIN = ROOT / os.environ.get("BIN", "target/release")
FAIL_AFTER = int(os.environ.get("FAIL_AFTER", "14"))
PORTS = {"stable": 18181, "canary": 18182, "listen": 18180, "admin": 18190}

ROUTE = """apiVersion: bulwark.dev/v1alpha1
kind: LLMRoute
metadata: {{name: chat, namespace: demo}}
spec:
  backends: [{{name: canary, url: "http://127.0.0.1:{canary}/v1"}}]
  rules:
    - backends: [{{name: stable, url: "http://127.0.0.1:{stable}/v1"}}]
      fallback: [{{backend: stable}}]
"""

ROLLOUT = """apiVersion: bulwark.dev/v1alpha1
kind: ModelRollout
metadata: {name: new-model, namespace: demo}
spec:
  routeRef: {name: chat}
  stable: {backend: stable}
  canary: {backend: canary}
  steps: [{weight: 10, pause: 4s}, {weight: 25, pause: 4s}, {weight: 50, pause: 60s}, {weight: 100}]
  analysis: {interval: 2s, window: 6s, minRequests: 10, maxErrorRate: 0.05}
"""


def get(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read(), r.headers


def chat(seen: list, stop: threading.Event):
    body = json.dumps({"model": "demo", "messages": [{"role": "user", "content": "hello"}]}).encode()
    url = f"http://127.0.0.1:{PORTS['listen']}/v1/chat/completions"
    while not stop.is_set():
        req = urllib.request.Request(url, data=body, headers={"content-type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                seen.append((time.monotonic(), r.status, r.headers.get("x-bulwark-backend", "")))
        except urllib.error.HTTPError as e:
            seen.append((time.monotonic(), e.code, ""))
        except OSError:
            pass
        time.sleep(0.02)


def main() -> int:
    for name in ("bulwark-sidecar", "bulwark-mock-provider"):
        if not (BIN / name).exists():
            print(f"{BIN / name} is not built; run `make demo-rollout`", file=sys.stderr)
            return 1
    work = pathlib.Path(tempfile.mkdtemp(prefix="bulwark-demo-"))
    (work / "manifests").mkdir()
    (work / "manifests/route.yaml").write_text(ROUTE.format(**PORTS))
    (work / "manifests/rollout.yaml").write_text(ROLLOUT)
    log = open(work / "processes.log", "w")
    procs = []
    try:
        mock = str(BIN / "bulwark-mock-provider")
        procs.append(subprocess.Popen([mock, "--listen", f"127.0.0.1:{PORTS['stable']}", "--name", "stable",
                                       "--chunk-delay-ms", "0"], stdout=log, stderr=log))
        procs.append(subprocess.Popen([mock, "--listen", f"127.0.0.1:{PORTS['canary']}", "--name", "canary",
                                       "--chunk-delay-ms", "0", "--fail-after", str(FAIL_AFTER),
                                       "--fail-with", "status:500"], stdout=log, stderr=log))
        started = time.monotonic()
        fails_at = started + FAIL_AFTER
        procs.append(subprocess.Popen([str(BIN / "bulwark-sidecar"), "--manifests", str(work / "manifests"),
                                       "--listen", f"127.0.0.1:{PORTS['listen']}",
                                       "--admin", f"127.0.0.1:{PORTS['admin']}"], stdout=log, stderr=log))
        admin = f"http://127.0.0.1:{PORTS['admin']}"
        for _ in range(100):
            try:
                if get(f"{admin}/ready")[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        else:
            print(f"the sidecar did not start; see {work / 'processes.log'}", file=sys.stderr)
            return 1
        print("Rollout demo/new-model: steps 10% -> 25% -> 50% -> 100%, analysis every 2s over 6s")
        print(f"The canary starts answering 500 after {FAIL_AFTER}s; watch it get rolled back.\n")
        seen, stop = [], threading.Event()
        clients = [threading.Thread(target=chat, args=(seen, stop), daemon=True) for _ in range(3)]
        for c in clients:
            c.start()
        last, warned = None, False
        while time.monotonic() - started < 90:
            now = time.monotonic()
            if not warned and now >= fails_at:
                print(f"{now - started:6.1f}s  ** the canary starts failing (500 on every call)")
                warned = True
            r = json.loads(get(f"{admin}/rollouts")[1])[0]
            a = r.get("lastAnalysis") or {}
            view = (r["phase"], r.get("currentStep"), r.get("canaryWeight"))
            if view != last:
                recent = [s for s in seen if s[0] > now - 1.0]
                canary = sum(1 for s in recent if s[2] == "canary")
                print(f"{now - started:6.1f}s  {r['phase']:<12} step {r['currentStep'] + 1} of {r['steps']}  "
                      f"canary {r['canaryWeight']:>3}%  (last second: {canary} of {len(recent)} answers from the canary)")
                if a:
                    print(f"          last analysis: {a['verdict']}, {a['canaryRequests']} canary requests"
                          + (f": {a['message']}" if a.get("message") else ""))
                last = view
            if r["phase"] in ("RolledBack", "Failed", "Aborted", "Succeeded"):
                break
            time.sleep(0.1)
        stop.set()
        if last and last[0] == "RolledBack":
            took = time.monotonic() - fails_at
            print(f"\nRolled back {took:.1f}s after the canary began failing (bound: interval 2s + 5s).")
            print(f"Why: {r['message']}")
            errors = sum(1 for s in seen if s[1] != 200)
            print(f"Clients sent {len(seen)} requests; {errors} failed (the route falls back to the stable).")
            return 0
        print(f"\nThe rollout ended {last}; see {work / 'processes.log'}", file=sys.stderr)
        return 1
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
        log.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
