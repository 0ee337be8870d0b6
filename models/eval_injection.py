"""Evaluates the prompt-injection head, per source, on data it was not trained on, at the head's
calibrated default threshold and at 0.5:

* the s-labs and neuralchemy test splits (F1);
* tool results built from agentdojo's four tool environments, with and without injections (F1);
* bastioncorpus, written elsewhere: user input and tool output, with benign look-alikes (F1);
* agent-injection-bench's injected tool results and its benign controls;
* yanismiraoui (multilingual injections: recall only);
* hand-written benign prompts (data/benign_eval.txt) and benign look-alikes that discuss attacks,
  security and system prompts or carry tool-style text (data/lookalike_eval.txt): the share blocked.

Usage: python eval_injection.py ENCODER_DIR HEAD_JSON
"""

import base64
import json
import sys

import numpy as np

import agent_corpora
from corpora import load_split, read_lines
from features import Encoder, chunks, features

# The targets, printed with the table.
TARGETS = "targets: F1 >= 0.93 on each test split; <= 2% of benign look-alike prompts blocked at the default threshold"


def load_head(path):
    h = json.load(open(path))
    w = np.concatenate([np.frombuffer(base64.b64decode(h["embedding_weights"]), "<f4"),
                        np.frombuffer(base64.b64decode(h["ngram_weights"]), "<f4")])
    return h, w, h["bias"]


def sets():
    """(name, texts, labels) of every evaluation set."""
    out = []
    for corpus in ("s-labs", "neuralchemy"):
        texts, y = load_split(corpus, "test")
        out.append((f"{corpus} test", texts, y))
    texts, y = agent_corpora.agent_split()
    out.append(("agentdojo tool results", texts, y))
    rows = agent_corpora.bastion()
    for channel in ("user_input", "tool_output"):
        picked = [(t, y) for c, t, y in rows if c == channel]
        out.append((f"bastioncorpus {channel}", [t for t, _ in picked], [y for _, y in picked]))
    bench = agent_corpora.injection_bench()
    out.append(("agent-injection-bench", [t for t, _ in bench], [y for _, y in bench]))
    texts, y = load_split("yanismiraoui", "all")
    out.append(("yanismiraoui (injections only)", texts, y))
    for name, path in (("hand-written benign", "data/benign_eval.txt"), ("benign look-alikes", "data/lookalike_eval.txt")):
        texts = read_lines(path)
        out.append((name, texts, [0] * len(texts)))
    return out


def main():
    enc = Encoder(sys.argv[1])
    head, w, b = load_head(sys.argv[2])
    t_default = head["threshold"]
    fast = head.get("fast")
    gated = []

    def score(texts):
        # As the sidecar scores: the maximum over a long text's chunks.
        owner = [i for i, t in enumerate(texts) for _ in chunks(t)]
        pieces = [c for t in texts for c in chunks(t)]
        s = score_pieces(pieces)
        best = np.zeros(len(texts))
        np.maximum.at(best, owner, s)
        return best

    def score_pieces(texts):
        x = features(enc, texts)
        s = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        if fast:
            # As the sidecar scores: the n-gram gate passes clear cases without the encoder.
            gw = np.frombuffer(base64.b64decode(fast["weights"]), "<f4")
            g = 1.0 / (1.0 + np.exp(-(x[:, 384:] @ gw + fast["bias"])))
            s = np.where(g < fast["pass_below"], g, s)
            gated.append((g < fast["pass_below"]).mean())
        return s

    nan = float("nan")
    rows = []
    for name, texts, y in sets():
        s, y = score(texts), np.array(y)
        pos, neg = (y == 1).sum(), (y == 0).sum()
        for t in (t_default, 0.5):
            pred = s >= t
            tp = (pred & (y == 1)).sum()
            p = tp / max(pred.sum(), 1) if pos and neg else nan
            r = tp / pos if pos else nan
            f1 = 2 * p * r / max(p + r, 1e-9) if pos and neg else nan
            blocked = (pred & (y == 0)).sum() / neg if neg else nan
            rows.append((name, t, len(y), p, r, f1, blocked))
    print(f"{'source':<32} {'threshold':>9} {'n':>6} {'precision':>9} {'recall':>7} {'F1':>7} {'benign blocked':>15}")
    for name, t, n, p, r, f1, blocked in rows:
        fmt = lambda x, w: f"{x:>{w}.3f}" if x == x else f"{'-':>{w}}"
        print(f"{name:<32} {t:>9.3f} {n:>6} {fmt(p, 9)} {fmt(r, 7)} {fmt(f1, 7)} {fmt(blocked, 15)}")
    if gated:
        print(f"\nthe n-gram gate decided {np.mean(gated):.1%} of the prompts above without the encoder")
    print(TARGETS)


if __name__ == "__main__":
    main()
