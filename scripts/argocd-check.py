"""Checks the Argo CD health checks and resource actions in charts/bulwark/argocd/ the way Argo CD
runs them: each test of every health_test.yaml and actions/action_test.yaml through a real Lua
5.1 in Argo CD's sandbox (scripts/argocd-sandbox.lua); then that the argocd-cm snippet in
docs/argocd.md is the one these scripts make. `--print-config` prints that snippet;
`--compare-notes FILE` checks the one in the chart's rendered notes."""

import json
import pathlib
import subprocess
import sys
import tempfile

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "charts/bulwark/argocd/bulwark.dev"
SANDBOX = ROOT / "scripts/argocd-sandbox.lua"
DOC = ROOT / "docs/argocd.md"
KINDS = ["LLMRoute", "ScannerPolicy", "ModelRollout", "ModelServer"]


def run(script: pathlib.Path, obj: dict):
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(obj, f)
        f.flush()
        p = subprocess.run(["lua5.1", str(SANDBOX), str(script), f.name], capture_output=True, text=True)
    if p.returncode != 0:
        raise AssertionError(f"{script.relative_to(ROOT)} failed: {p.stderr.strip()}")
    return json.loads(p.stdout)


def same(v):
    """Lua cannot tell an empty list from an empty map; neither can this comparison."""
    if isinstance(v, dict):
        return {k: same(x) for k, x in v.items()} if v else {}
    if isinstance(v, list):
        return [same(x) for x in v] if v else {}
    return v


def check() -> int:
    failures, passed = [], 0
    for kind in KINDS:
        d = SCRIPTS / kind
        source = (d / "health.lua").read_text()
        if "string." in source or ":sub(" in source or ":find(" in source:
            failures.append(f"{kind}/health.lua calls the string library, which Argo CD does not open")
        for t in yaml.safe_load((d / "health_test.yaml").read_text())["tests"]:
            got = run(d / "health.lua", yaml.safe_load((d / t["inputPath"]).read_text()))
            want = t["healthStatus"]
            if got != want:
                failures.append(f"{kind} {t['inputPath']}: got {got}, want {want}")
            else:
                passed += 1
        actions = d / "actions"
        if not actions.exists():
            continue
        tests = yaml.safe_load((actions / "action_test.yaml").read_text())
        for t in tests["discoveryTests"]:
            got = run(actions / "discovery.lua", yaml.safe_load((actions / t["inputPath"]).read_text()))
            for want in t["result"]:
                action = got.get(want["name"])
                if action is None or bool(action.get("disabled", False)) != want["disabled"]:
                    failures.append(f"{kind} discovery {t['inputPath']}: {want['name']} is {action}, want {want}")
                else:
                    passed += 1
        for t in tests["actionTests"]:
            got = run(actions / t["action"] / "action.lua", yaml.safe_load((actions / t["inputPath"]).read_text()))
            want = yaml.safe_load((actions / t["expectedOutputPath"]).read_text())
            if same(got) != same(want):
                failures.append(f"{kind} action {t['action']} on {t['inputPath']}: got {json.dumps(got)}")
            else:
                passed += 1
    snippet = config()
    data = yaml.safe_load(snippet)["data"]
    for kind in KINDS:
        if data[f"resource.customizations.health.bulwark.dev_{kind}"] != (SCRIPTS / kind / "health.lua").read_text():
            failures.append(f"the argocd-cm snippet does not carry {kind}/health.lua as it is")
    definitions = yaml.safe_load(data["resource.customizations.actions.bulwark.dev_ModelRollout"])["definitions"]
    for d in definitions:
        if d["action.lua"] != (SCRIPTS / "ModelRollout/actions" / d["name"] / "action.lua").read_text():
            failures.append(f"the argocd-cm snippet does not carry action {d['name']} as it is")
    if snippet not in DOC.read_text():
        failures.append(f"{DOC.relative_to(ROOT)} does not hold the current argocd-cm snippet: "
                        "paste the output of `python3 scripts/argocd-check.py --print-config`")
    for f in failures:
        print("FAIL", f, file=sys.stderr)
    print(f"argocd: {passed} health, discovery and action tests passed, {len(failures)} failed")
    return 1 if failures else 0


def indent(text: str, n: int) -> str:
    return "".join((" " * n + line) if line.strip() else line for line in text.splitlines(True))


def config() -> str:
    """The argocd-cm data that registers the health checks and actions."""
    out = ["data:\n"]
    for kind in KINDS:
        out.append(f"  resource.customizations.health.bulwark.dev_{kind}: |\n")
        out.append(indent((SCRIPTS / kind / "health.lua").read_text(), 4))
    actions = SCRIPTS / "ModelRollout/actions"
    out.append("  resource.customizations.actions.bulwark.dev_ModelRollout: |\n")
    out.append("    discovery.lua: |\n")
    out.append(indent((actions / "discovery.lua").read_text(), 6))
    out.append("    definitions:\n")
    for name in ["promote", "promote-full", "pause", "resume", "abort", "retry"]:
        out.append(f"      - name: {name}\n        action.lua: |\n")
        out.append(indent((actions / name / "action.lua").read_text(), 10))
    return "".join(out)


def compare_notes(path: str) -> int:
    """The snippet in the chart's notes must say what the scripts say."""
    notes = pathlib.Path(path).read_text()
    start = notes.find("\ndata:\n")
    if start < 0:
        print(f"FAIL {path}: no argocd-cm snippet in the chart's notes", file=sys.stderr)
        return 1
    if yaml.safe_load(notes[start:]) != yaml.safe_load(config()):
        print(f"FAIL {path}: the chart's argocd-cm snippet differs from the scripts", file=sys.stderr)
        return 1
    print("argocd: the chart's notes carry the current argocd-cm snippet")
    return 0


if __name__ == "__main__":
    if sys.argv[1:] == ["--print-config"]:
        sys.stdout.write(config())
        sys.exit(0)
    if sys.argv[1:2] == ["--compare-notes"]:
        sys.exit(compare_notes(sys.argv[2]))
    sys.exit(check())
