"""Evaluates the prompt-injection head on data it was not trained on: the s-labs and
neuralchemy test splits, the yanismiraoui corpus (multilingual injections, recall only) and
hand-written benign prompts (data/benign_eval.txt, false-positive rate), at the head's
calibrated default threshold and at 0.5.

Usage: python eval_injection.py ENCODER_DIR HEAD_JSON
"""

import base64
import json
import sys

import numpy as np

from corpora import load_split, read_lines
from features import Encoder, features


def load_head(path):
    h = json.load(open(path))
    w = np.concatenate([np.frombuffer(base64.b64decode(h["embedding_weights"]), "<f4"),
                        np.frombuffer(base64.b64decode(h["ngram_weights"]), "<f4")])
    return h, w, h["bias"]


def main():
    enc = Encoder(sys.argv[1])
    head, w, b = load_head(sys.argv[2])
    t_default = head["threshold"]
    fast = head.get("fast")
    gated = []

    def score(texts):
        x = features(enc, texts)
        s = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        if fast:
            # As the sidecar scores: the n-gram gate passes clear cases without the encoder.
            gw = np.frombuffer(base64.b64decode(fast["weights"]), "<f4")
            g = 1.0 / (1.0 + np.exp(-(x[:, 384:] @ gw + fast["bias"])))
            s = np.where(g < fast["pass_below"], g, s)
            gated.append((g < fast["pass_below"]).mean())
        return s
    rows = []
    for corpus in ("s-labs", "neuralchemy"):
        texts, y = load_split(corpus, "test")
        s, y = score(texts), np.array(y)
        for t in (t_default, 0.5):
            pred = s >= t
            tp = (pred & (y == 1)).sum()
            p, r = tp / max(pred.sum(), 1), tp / max((y == 1).sum(), 1)
            fpr = (pred & (y == 0)).sum() / max((y == 0).sum(), 1)
            rows.append((f"{corpus} test", t, len(y), p, r, 2 * p * r / max(p + r, 1e-9), fpr))
    texts, _ = load_split("yanismiraoui", "all")
    s = score(texts)
    for t in (t_default, 0.5):
        rows.append(("yanismiraoui (injections only)", t, len(texts), float("nan"), (s >= t).mean(), float("nan"), float("nan")))
    benign = read_lines("data/benign_eval.txt")
    s = score(benign)
    for t in (t_default, 0.5):
        rows.append(("hand-written benign (eval)", t, len(benign), float("nan"), float("nan"), float("nan"), (s >= t).mean()))
    print(f"{'set':<32} {'threshold':>9} {'n':>6} {'precision':>9} {'recall':>7} {'F1':>7} {'benign blocked':>15}")
    for name, t, n, p, r, f1, fpr in rows:
        fmt = lambda x, w: f"{x:>{w}.3f}" if x == x else f"{'-':>{w}}"
        print(f"{name:<32} {t:>9.3f} {n:>6} {fmt(p, 9)} {fmt(r, 7)} {fmt(f1, 7)} {fmt(fpr, 15)}")
    if gated:
        print(f"\nthe n-gram gate decided {np.mean(gated):.1%} of the prompts above without the encoder")
    print("targets: F1 >= 0.93 on each test split; <= 3% of benign prompts blocked at the default threshold")


if __name__ == "__main__":
    main()
