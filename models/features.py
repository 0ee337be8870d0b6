"""Features of the prompt-injection head, shared by training and evaluation. The Rust scanner
(sidecar/src/scan/model.rs) computes the same ones: keep the two in step.

* the sentence embedding of the default encoder (mean-pooled, L2-normalised), and
* hashed character 3- to 5-grams of the lower-cased, whitespace-collapsed text
  (FNV-1a 32-bit, log(1 + count), L2-normalised).
"""

import os

import numpy as np

NGRAM_MIN, NGRAM_MAX, BUCKETS, MAX_CHARS, MAX_TOKENS = 3, 5, 16384, 4000, 256


def normalize(text: str) -> str:
    return " ".join(text.lower().split())[:MAX_CHARS]


def fnv1a(data: bytes) -> int:
    h = 0x811C9DC5
    for b in data:
        h ^= b
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h


def ngrams(text: str) -> np.ndarray:
    v = np.zeros(BUCKETS, dtype=np.float32)
    chars = " " + normalize(text) + " "
    for n in range(NGRAM_MIN, NGRAM_MAX + 1):
        for i in range(len(chars) - n + 1):
            v[fnv1a(chars[i:i + n].encode("utf-8")) % BUCKETS] += 1.0
    v = np.log1p(v)
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


class Encoder:
    def __init__(self, model_dir: str):
        import onnxruntime as ort
        from tokenizers import Tokenizer
        self.tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        self.tok.enable_truncation(MAX_TOKENS)
        self.tok.enable_padding(pad_id=0, pad_token="[PAD]")
        opts = ort.SessionOptions()
        with open(os.path.join(model_dir, "model.onnx"), "rb") as f:
            import hashlib
            self.identity = hashlib.sha256(f.read()).hexdigest()
        self.sess = ort.InferenceSession(os.path.join(model_dir, "model.onnx"), opts, providers=["CPUExecutionProvider"])

    def embed(self, texts, batch=64) -> np.ndarray:
        out = []
        for i in range(0, len(texts), batch):
            enc = self.tok.encode_batch(list(texts[i:i + batch]))
            ids = np.array([e.ids for e in enc], dtype=np.int64)
            mask = np.array([e.attention_mask for e in enc], dtype=np.int64)
            h = self.sess.run(None, {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)})[0]
            m = mask[..., None].astype(np.float32)
            v = (h * m).sum(1) / np.maximum(m.sum(1), 1e-9)
            out.append(v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12))
        return np.concatenate(out).astype(np.float32)


def features(encoder: Encoder, texts) -> np.ndarray:
    """The features of `texts`; with BULWARK_FEATURE_CACHE set, kept in that directory by the
    hash of the texts and the encoder, so that retraining does not encode them again."""
    cache = os.environ.get("BULWARK_FEATURE_CACHE")
    path = None
    if cache:
        import hashlib
        h = hashlib.sha256(encoder.identity.encode())
        for t in texts:
            h.update(t.encode("utf-8", "surrogatepass") + b"\0")
        path = os.path.join(cache, h.hexdigest()[:32] + ".npy")
        if os.path.exists(path):
            return np.load(path)
    emb = encoder.embed(texts)
    grams = np.stack([ngrams(t) for t in texts])
    x = np.concatenate([emb, grams], axis=1)
    if path:
        os.makedirs(cache, exist_ok=True)
        np.save(path, x)
    return x


CHUNK_CHARS = 400


def chunks(text: str):
    """As the sidecar cuts a long text before scoring it (scan/injection.rs): at sentence ends
    and line breaks, into chunks of up to CHUNK_CHARS characters; the score is their maximum."""
    if len(text) <= CHUNK_CHARS:
        return [text]
    out, current, sentence = [], "", ""
    for c in text:
        sentence += c
        if c in ".!?\n。":
            if len(current) + len(sentence) > CHUNK_CHARS and current.strip():
                out.append(current)
                current = ""
            current += sentence
            sentence = ""
    current += sentence
    if current.strip():
        out.append(current)
    return out
