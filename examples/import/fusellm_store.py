"""Writes a fusellm distribution store (format fusellm-store/1, see README.md) with the
Python standard library alone, so that distributions computed by any tool can be fused."""

import hashlib
import json
import os
import struct
import sys

FORMAT = "fusellm-store/1"


def _sha256_file(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _safetensors(tensors, metadata):
    """Serialises [(name, dtype, shape, bytes)] as safetensors (names sorted, as fusellm does)."""
    header, offset, body = {"__metadata__": metadata}, 0, []
    for name, dtype, shape, data in sorted(tensors, key=lambda t: t[0]):
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + len(data)]}
        offset += len(data)
        body.append(data)
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + b"".join(body)


def _pack(code, values):
    return struct.pack("<%d%s" % (len(values), code), *values)


class StoreWriter:
    def __init__(self, out, model, tokenizer_json, corpus, k=10, docs_per_shard=256, half=True, wide_ids=False):
        self.out, self.k, self.docs_per_shard, self.half, self.wide_ids = out, k, docs_per_shard, half, wide_ids
        self.identity = {
            "format": FORMAT,
            "model": model,
            "tokenizer_sha256": _sha256_file(tokenizer_json),
            "corpus": corpus,
            "corpus_sha256": _sha256_file(corpus),
            "documents": 0,
            "docs_per_shard": docs_per_shard,
            "layout": {"k": k, "wide_ids": wide_ids, "half": half, "residual": False},
        }
        self.pending, self.documents, self.shards = [], 0, []
        os.makedirs(out, exist_ok=True)

    def add(self, ids, topk_ids, topk_logprobs, ce):
        """One document: its token ids, per token the k best ids and their log-probs, and
        the cross-entropy of every prediction (len(ids) - 1 values)."""
        if len(topk_ids) != len(ids) or len(topk_logprobs) != len(ids) or len(ce) != len(ids) - 1:
            raise ValueError("document %d: %d ids, %d top-k rows, %d log-prob rows, %d CE values"
                             % (self.documents, len(ids), len(topk_ids), len(topk_logprobs), len(ce)))
        if any(len(r) != self.k for r in topk_ids) or any(len(r) != self.k for r in topk_logprobs):
            raise ValueError("document %d: every top-k row must have k = %d entries" % (self.documents, self.k))
        self.pending.append((self.documents, ids, topk_ids, topk_logprobs, ce))
        self.documents += 1
        if len(self.pending) == self.docs_per_shard:
            self._flush()

    def _flush(self):
        docs, offsets, flat_ids, flat_lp, missing_at, missing, mean_ce = [], [0], [], [], [], [], []
        for index, ids, topk_ids, topk_lp, ce in self.pending:
            base = offsets[-1]
            for t, value in enumerate(ce):
                if ids[t + 1] not in topk_ids[t]:
                    missing_at.append(base + t)
                    missing.append(value)
            for row_ids, row_lp in zip(topk_ids, topk_lp):
                flat_ids.extend(row_ids)
                flat_lp.extend(row_lp)
            docs.append(index)
            offsets.append(base + len(ids))
            mean_ce.append(sum(ce) / len(ce) if ce else float("nan"))
        tokens = offsets[-1]
        tensors = [
            ("docs", "U32", [len(docs)], _pack("I", docs)),
            ("offsets", "U32", [len(offsets)], _pack("I", offsets)),
            ("ce_missing_at", "U32", [len(missing_at)], _pack("I", missing_at)),
            ("ce_missing", "F16" if self.half else "F32", [len(missing)], _pack("e" if self.half else "f", missing)),
            ("mean_ce", "F32", [len(mean_ce)], _pack("f", mean_ce)),
            ("topk_ids", "U32" if self.wide_ids else "U16", [tokens, self.k], _pack("I" if self.wide_ids else "H", flat_ids)),
            ("topk_logprobs", "F16" if self.half else "F32", [tokens, self.k], _pack("e" if self.half else "f", flat_lp)),
        ]
        data = _safetensors(tensors, {"format": FORMAT})
        name = "shard-%05d.safetensors" % len(self.shards)
        tmp = os.path.join(self.out, name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, os.path.join(self.out, name))
        self.shards.append({"file": name, "sha256": hashlib.sha256(data).hexdigest(), "documents": len(docs),
                            "tokens": tokens, "bytes": len(data)})
        self.pending = []

    def close(self):
        if self.pending:
            self._flush()
        self.identity["documents"] = self.documents
        with open(os.path.join(self.out, "store.json"), "w") as f:
            json.dump(self.identity, f, indent=2)
        manifest = dict(self.identity, fusellm_version="imported", tokens=sum(s["tokens"] for s in self.shards),
                        bytes=sum(s.pop("bytes") for s in self.shards), shards=self.shards)
        with open(os.path.join(self.out, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=2)

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.close()


if __name__ == "__main__":
    # python3 fusellm_store.py DISTRIBUTIONS.json OUT_DIR TOKENIZER_JSON CORPUS
    # DISTRIBUTIONS.json: {"k": 10, "documents": [{"ids", "topk_ids", "topk_logprobs", "ce"}, ...]}
    source, out, tokenizer, corpus = sys.argv[1:5]
    with open(source) as f:
        spec = json.load(f)
    with StoreWriter(out, "imported", tokenizer, corpus, k=spec["k"], docs_per_shard=spec.get("docs_per_shard", 256)) as w:
        for d in spec["documents"]:
            w.add(d["ids"], d["topk_ids"], d["topk_logprobs"], d["ce"])
