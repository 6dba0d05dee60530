"""BM25 (bm25s) index memory per passage, measured on real 100-word passages, for docs/scaling.md.

    python benchmarks/bm25_memory.py    → benchmarks/bm25_memory.json

Passages are cut like ViQuAE's knowledge base: 100-word windows of every BBC News article (the
offline corpus), title prepended. Reports the index arrays (bm25s keeps a sparse matrix: float32
scores, int32 row indices, int64 column pointers), the vocabulary, the peak RSS growth while
tokenising and indexing, the indexing time, and what these give for ViQuAE's 11.9M passages.
"""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VIQUAE_PASSAGES = 11_900_000


def passages(words: int = 100) -> list[str]:
    from petune.data.packaged import bbc_news

    out = []
    for article in bbc_news():
        tokens = article["body"].split()
        out += [f"{article['headline']}. " + " ".join(tokens[i:i + words]) for i in range(0, len(tokens), words)]
    return out


def main():
    import bm25s

    texts = passages()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    retriever = bm25s.BM25(method="lucene", k1=0.5, b=0.3)
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    seconds = time.perf_counter() - start
    peak_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - peak_before
    arrays = sum(v.nbytes for v in retriever.scores.values() if hasattr(v, "nbytes"))
    per_passage = arrays / len(texts)
    result = {
        "command": "python benchmarks/bm25_memory.py", "passages": len(texts),
        "nonzeros_per_passage": round(len(retriever.scores["data"]) / len(texts), 1),
        "index_bytes": arrays, "index_bytes_per_passage": round(per_passage, 1),
        "vocabulary": len(retriever.vocab_dict), "peak_rss_growth_bytes": peak_growth,
        "peak_rss_growth_bytes_per_passage": round(peak_growth / len(texts), 1),
        "index_seconds": round(seconds, 2), "passages_per_second": round(len(texts) / seconds),
        "viquae_extrapolation": {"passages": VIQUAE_PASSAGES,
                                 "index_gib": round(per_passage * VIQUAE_PASSAGES / 2**30, 1),
                                 "index_hours_one_core": round(VIQUAE_PASSAGES / (len(texts) / seconds) / 3600, 2)},
    }
    (HERE / "bm25_memory.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
