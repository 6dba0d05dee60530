"""A knowledge base at 10⁴, 10⁵ and 10⁶ passages: wall time and peak RSS of each stage of the
store path (encode to store, index train, index add, search, BM25 index, BM25 search) and of the
in-memory path it replaces, for docs/scaling.md.

    python benchmarks/kb_scale.py                          → benchmarks/kb_scale.json
    python benchmarks/kb_scale.py --sizes 10000 100000     (a shorter run)

Collection: the real BBC News passages first (100-word windows of every article, headline
prepended, as ViQuAE's are cut: 8,955 of them), then generated ones beyond: a two-word title and
100 words drawn independently from the BBC passages' word frequencies (a Zipfian law over their
~30k-word vocabulary; a real Wikipedia has millions of rare words, so its BM25 vocabulary grows
with n where this one saturates). Saved as a ``datasets`` Arrow dataset and read from its files.

Model: a random BERT2BERT of the MiniLM shape cut to one layer (d = 384, 6 heads, feed-forward
384, MiniLM's tokenizer), passages cut to 32 tokens, so that 10⁶ passages encode in about half
an hour on 2 cores; memory does not depend on the weights. Index: ``IVF1024,PQ32`` (trained on
FAISS's advice: 40 points per centroid), searched with nprobe 16, and exact search over the
store chunk by chunk; BM25: bm25s, Lucene, k1 0.5, b 0.3, searched on one thread, on every core, and
with bm25s's numba backend on every core. 1,000 queries for each search.

Each stage runs in a fresh process; its peak RSS is the kernel's high-water mark of the
process's resident pages (``VmHWM``, file-backed mapped pages included), reported over the
process's RSS once its imports and model are loaded and its runtimes warmed up (``base``).
``recall`` measures the compressed factories against exact search on the real BBC passages with
the real MiniLM (max 128 tokens).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REAL_WORDS = 100
MAX_LENGTH = 32
CHUNK = 16384
FACTORY, NPROBE = "IVF1024,PQ32", 16
QUERIES = 1000
RECALL_PASSAGES = None  # all the real ones
VIQUAE = 11_900_000


def rss() -> int:
    """Current resident set size in bytes."""
    import psutil

    return psutil.Process().memory_info().rss


def peak() -> int:
    """Peak resident set size of this process in bytes (``VmHWM``: the high-water mark of its own
    address space, which exec starts afresh; ``ru_maxrss`` would carry over the RSS of the parent
    that forked it)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def real_passages() -> list[str]:
    from petune.data.packaged import bbc_news

    out = []
    for article in bbc_news():
        words = article["body"].split()
        out += [f"{article['headline']}. " + " ".join(words[i:i + REAL_WORDS])
                for i in range(0, len(words), REAL_WORDS)]
    return out


def generated(real: list[str], n: int, seed: int = 0):
    """``n`` passages drawn from the word frequencies of ``real``, in batches of 10,000."""
    from collections import Counter

    counts = Counter(w for t in real for w in t.split())
    words = np.array(list(counts))
    p = np.array(list(counts.values()), dtype=np.float64)
    p /= p.sum()
    rng = np.random.default_rng(seed)
    for start in range(0, n, 10_000):
        size = min(10_000, n - start)
        draws = words[rng.choice(len(words), (size, REAL_WORDS + 2), p=p)]
        yield [f"{d[0].title()} {d[1].title()}. " + " ".join(d[2:]) for d in draws]


def collection(work: Path, n: int):
    """The saved collection of ``n`` passages (made once)."""
    import datasets

    path = work / f"collection-{n}"
    if not (path / "dataset_info.json").exists():
        real = real_passages()

        def rows():
            for t in real[:n]:
                yield {"passage": t}
            for batch in generated(real, max(0, n - len(real))):
                for t in batch:
                    yield {"passage": t}

        datasets.Dataset.from_generator(rows, cache_dir=str(work / "hf-cache")).save_to_disk(str(path))
    return datasets.load_from_disk(str(path))


def tiny_model():
    """(model, tokenizer): a random one-layer BERT2BERT of MiniLM's width, with MiniLM's tokenizer."""
    import torch
    import transformers as T
    from petune.data.packaged import minilm_path

    torch.manual_seed(0)
    tok = T.AutoTokenizer.from_pretrained(minilm_path())
    shape = dict(vocab_size=tok.vocab_size, hidden_size=384, num_hidden_layers=1, num_attention_heads=6,
                 intermediate_size=384)
    config = T.EncoderDecoderConfig.from_encoder_decoder_configs(
        T.BertConfig(**shape), T.BertConfig(**shape, is_decoder=True, add_cross_attention=True))
    config.decoder_start_token_id, config.pad_token_id = tok.cls_token_id, tok.pad_token_id
    return T.EncoderDecoderModel(config=config).eval(), tok


def queries(store, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(store), QUERIES, replace=False))
    return (store[rows] + rng.normal(0, 0.05, (QUERIES, store.dim))).astype(np.float32)


def query_texts(ds, seed: int = 1) -> dict[str, str]:
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(len(ds), QUERIES, replace=False))
    return {str(r): " ".join(ds[int(r)]["passage"].split()[:8]) for r in rows}


# -- stages: each runs in its own process and returns {"seconds", ...} ----------------------------
def warm_up(model=None, tok=None) -> None:
    """Pay the runtimes' one-time costs before measuring: ranx's numba compilation, and with a
    model one forward per input length (the CPU kernels' buffers and allocator arenas)."""
    from petune.score import make_run

    make_run({"q": {"d": 1.0}})
    if model is not None:
        import petune

        petune.encode(model, tok, ["word " * (3 * i) for i in range(1, MAX_LENGTH)], max_length=MAX_LENGTH,
                      batch_size=128, progress=False)


def fresh(path: Path) -> Path:
    import shutil

    if path.exists():
        shutil.rmtree(path)
    return path


def stage_encode(work: Path, n: int) -> dict:
    import petune

    ds = collection(work, n)
    model, tok = tiny_model()
    warm_up(model, tok)
    base = rss()
    start = time.perf_counter()
    store = petune.encode_to_store(model, tok, ds, fresh(work / f"store-{n}"), column="passage", chunk_size=CHUNK,
                                   max_length=MAX_LENGTH, batch_size=128, progress=False)
    return {"seconds": time.perf_counter() - start, "base": base, "store_bytes": store.n * store.dim * 4,
            "texts_per_second": n / (time.perf_counter() - start)}


def stage_index(work: Path, n: int) -> dict:
    import faiss
    import petune
    from petune.score.store_index import default_train_size

    store = petune.EmbeddingStore(work / f"store-{n}")
    base = rss()
    index = faiss.index_factory(store.dim, FACTORY, faiss.METRIC_INNER_PRODUCT)
    size = default_train_size(index, n)
    start = time.perf_counter()
    rows = np.sort(np.random.default_rng(0).choice(n, size, replace=False))
    index.train(store[rows])
    trained, peak_train = time.perf_counter() - start, peak()
    start = time.perf_counter()
    for _, block in store.chunks():
        index.add(block)
    added = time.perf_counter() - start
    faiss.write_index(index, str(work / f"index-{n}.faiss"))
    return {"seconds_train": trained, "seconds_add": added, "base": base, "peak_train": peak_train,
            "train_size": size, "codes_bytes": n * (32 + 8)}


def stage_search(work: Path, n: int) -> dict:
    import faiss
    import petune
    from petune.data.stream import RowIds
    from petune.score import DenseIndex

    store = petune.EmbeddingStore(work / f"store-{n}")
    q = queries(store)
    qids = [f"q{i}" for i in range(QUERIES)]
    warm_up()
    base = rss()
    index = DenseIndex.wrap(faiss.read_index(str(work / f"index-{n}.faiss")), RowIds(n), FACTORY)
    faiss.ParameterSpace().set_index_parameters(index.index, f"nprobe={NPROBE}")
    start = time.perf_counter()
    index.search(q, qids, k=100)
    return {"seconds": time.perf_counter() - start, "base": base}


def stage_exact_search(work: Path, n: int) -> dict:
    import petune
    from petune.score import ExactStoreIndex

    store = petune.EmbeddingStore(work / f"store-{n}")
    q = queries(store)
    warm_up()
    base = rss()
    start = time.perf_counter()
    ExactStoreIndex(store).search(q, [f"q{i}" for i in range(QUERIES)], k=100)
    return {"seconds": time.perf_counter() - start, "base": base}


def stage_bm25_index(work: Path, n: int) -> dict:
    from petune.score.bm25 import BM25, index_size

    ds = collection(work, n)
    base = rss()
    start = time.perf_counter()
    bm25 = BM25(ds, column="passage", k1=0.5, b=0.3, cache_dir=fresh(work / f"bm25-{n}"))
    bm25._index()
    return {"seconds": time.perf_counter() - start, "base": base, "index_bytes": index_size(bm25.retriever),
            "vocabulary": len(bm25.tokenizer.word_to_id)}


def stage_bm25_search(work: Path, n: int) -> dict:
    from petune.score.bm25 import BM25

    ds = collection(work, n)
    texts = query_texts(ds)
    warm_up()
    base = rss()
    start = time.perf_counter()
    bm25 = BM25(ds, column="passage", k1=0.5, b=0.3, cache_dir=work / f"bm25-{n}", n_threads=1)
    bm25._index()  # the cached index, memory-mapped
    loaded = time.perf_counter() - start
    out = {"seconds_load": loaded, "base": base, "cores": os.cpu_count()}
    for key, threads, backend in (("seconds", 1, "numpy"), ("seconds_threads", None, "numpy"),
                                  ("seconds_numba", None, "numba")):
        bm25.n_threads = threads or os.cpu_count()
        bm25.retriever.backend = backend
        if backend == "numba":
            bm25._search(dict(list(texts.items())[:2]), k=100)  # numba compiles on the first call
        start = time.perf_counter()
        bm25._search(texts, k=100)  # not the run cache: the search itself
        out[key] = time.perf_counter() - start
    return out


def stage_ram_encode(work: Path, n: int) -> dict:
    import petune

    texts = list(collection(work, n)["passage"])
    model, tok = tiny_model()
    warm_up(model, tok)
    base = rss()
    start = time.perf_counter()
    petune.encode(model, tok, texts, max_length=MAX_LENGTH, batch_size=128, progress=False)
    return {"seconds": time.perf_counter() - start, "base": base}


def stage_ram_index(work: Path, n: int) -> dict:
    import petune
    from petune.data.stream import RowIds
    from petune.score import DenseIndex

    store = petune.EmbeddingStore(work / f"store-{n}")
    warm_up()
    base = rss()
    start = time.perf_counter()
    x = store.to_array()  # what encode_sharded gathers on rank 0
    index = DenseIndex(x, RowIds(n))
    built = time.perf_counter() - start
    start = time.perf_counter()
    index.search(queries(store), [f"q{i}" for i in range(QUERIES)], k=100)
    return {"seconds_build": built, "seconds_search": time.perf_counter() - start, "base": base}


def stage_ram_bm25(work: Path, n: int) -> dict:
    import bm25s

    texts = list(collection(work, n)["passage"])
    base = rss()
    start = time.perf_counter()
    retriever = bm25s.BM25(method="lucene", k1=0.5, b=0.3)
    retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    return {"seconds": time.perf_counter() - start, "base": base}


def stage_recall(work: Path, n: int) -> dict:
    """Recall@10 and @100 of compressed factories against exact search, real BBC passages and MiniLM."""
    import petune
    from petune.data.packaged import minilm_encoder_decoder, minilm_path
    from petune.score import ExactStoreIndex, build_index
    from transformers import AutoTokenizer

    texts = real_passages()[:RECALL_PASSAGES]
    model, tok = minilm_encoder_decoder(), AutoTokenizer.from_pretrained(minilm_path())
    store = petune.encode_to_store(model, tok, texts, work / f"store-bbc-minilm-{len(texts)}", max_length=128,
                                   normalize=True, chunk_size=2048)
    headlines = list(dict.fromkeys(t.split(". ")[0] for t in texts))[:QUERIES]
    q = petune.encode(model, tok, headlines, max_length=64, normalize=True)
    qids = [f"q{i}" for i in range(len(q))]
    exact = ExactStoreIndex(store).search(q, qids, k=100)
    out = {"passages": len(texts), "queries": len(qids), "model": "all-MiniLM-L6-v2 (mean pooling, normalised)"}
    for factory, params in (("IVF64,Flat", "nprobe=8"), ("IVF64,SQ8", "nprobe=8"), ("IVF64,PQ32", "nprobe=8"),
                            ("OPQ32,IVF64,PQ32", "nprobe=8"), ("PQ32", None), ("HNSW32", "efSearch=64")):
        start = time.perf_counter()
        run = build_index(store, factory, search_params=params).search(q, qids, k=100)
        out[f"{factory} ({params or 'defaults'})"] = {
            f"recall@{k}": float(np.mean([len(set(list(run[i])[:k]) & set(list(exact[i])[:k])) / k for i in qids]))
            for k in (10, 100)} | {"seconds": round(time.perf_counter() - start, 2)}
    return out


def stage_time_to_result(work: Path, n: int) -> dict:
    """From a trained model to its test run, both ways. Symmetric (the method on both sides): the
    collection encoded again with the tuned model, an IVF index trained and filled, the queries
    encoded and searched. Query-side (``attach(..., sides="query")``): only the queries encoded;
    the passage side finds the frozen model's store (``encode_to_store(..., side="passage")``
    checks each chunk's texts and encodes nothing) and its cached index (``build_index``), built
    once by the frozen model (untimed: every tuned model shares them). LoRA r=8 on the one-layer
    model, random (as if trained)."""
    import torch

    import petune
    from petune.score import build_index

    ds = collection(work, n)
    texts = query_texts(ds)
    model, tok = tiny_model()
    warm_up(model, tok)
    frozen_store = petune.encode_to_store(model, tok, ds, work / f"frozen-store-{n}", column="passage",
                                          chunk_size=CHUNK, max_length=MAX_LENGTH, batch_size=128, progress=False)
    build_index(frozen_store, FACTORY, search_params=f"nprobe={NPROBE}")  # the frozen model's, once
    rows = {}
    for sides in ("query", None):
        tuned = petune.attach(tiny_model()[0], "lora", r=8, sides=sides)
        for p in tuned.parameters():  # as if trained: the method changes the embeddings
            if p.requires_grad:
                p.data.normal_(0, 0.05)
        start = time.perf_counter()
        q = petune.encode(tuned, tok, list(texts.values()), max_length=MAX_LENGTH, batch_size=128, progress=False,
                          side="query" if sides else None)
        path = work / f"frozen-store-{n}" if sides else fresh(work / f"tuned-store-{n}")
        store = petune.encode_to_store(tuned, tok, ds, path, column="passage", chunk_size=CHUNK, max_length=MAX_LENGTH,
                                       batch_size=128, progress=False, side="passage" if sides else None)
        index = build_index(store, FACTORY, search_params=f"nprobe={NPROBE}")
        index.search(q, list(texts), k=100)
        rows["query_side" if sides else "symmetric"] = {
            "seconds": time.perf_counter() - start, "chunks_encoded": len(store.last_run["encoded"]),
            "index_from_cache": index.from_cache}
        torch.cuda.empty_cache()
    fresh(work / f"tuned-store-{n}")
    return {**rows, "ratio": rows["symmetric"]["seconds"] / rows["query_side"]["seconds"]}


STAGES = {"encode": stage_encode, "index": stage_index, "search": stage_search, "exact_search": stage_exact_search,
          "bm25_index": stage_bm25_index,
          "bm25_search": stage_bm25_search, "ram_encode": stage_ram_encode, "ram_index": stage_ram_index,
          "ram_bm25": stage_ram_bm25, "recall": stage_recall, "time_to_result": stage_time_to_result}
RAM_UP_TO = 100_000  # the in-memory path is measured up to here, and projected beyond
STORE_STAGES = ("encode", "index", "search", "exact_search", "bm25_index", "bm25_search")
EXTRA_STAGES = ("time_to_result",)  # after the store stages, which it does not need
RAM_STAGES = ("ram_encode", "ram_index", "ram_bm25")


def run_stage(name: str, work: Path, n: int, quick: bool = False) -> dict:
    """Run a stage in a fresh process: its result with ``peak`` (bytes)."""
    done = subprocess.run([sys.executable, __file__, "--stage", name, "--n", str(n), "--work", str(work),
                           *(["--quick"] if quick else [])], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"stage {name} at n={n} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def slope(xs, ys) -> float:
    """Exponent b of y ∝ n^b, least squares on logs."""
    return float(np.polyfit(np.log(xs), np.log(np.maximum(ys, 1e-9)), 1)[0])


MIB = 2**20


def _has(value, row) -> bool:
    try:
        value(row)
    except KeyError:
        return False
    return True


def growth(result: dict) -> dict:
    """Per stage: wall time and peak RSS over base at each size, and how they grow with n."""
    sizes = result["sizes"]
    rows = {int(n): r for n, r in result["rows"].items()}

    def over(r, key="peak"):
        return (r[key] - r["base"]) / MIB

    stages = {
        "encode to store": (lambda r: r["encode"]["seconds"], lambda r: over(r["encode"])),
        "index train (IVF1024,PQ32)": (lambda r: r["index"]["seconds_train"], lambda r: over(r["index"], "peak_train")),
        "index add": (lambda r: r["index"]["seconds_add"], lambda r: over(r["index"])),
        "search, IVF-PQ (1,000 queries)": (lambda r: r["search"]["seconds"], lambda r: over(r["search"])),
        "search, exact over the store": (lambda r: r["exact_search"]["seconds"], lambda r: over(r["exact_search"])),
        "BM25 index (streamed)": (lambda r: r["bm25_index"]["seconds"], lambda r: over(r["bm25_index"])),
        "BM25 search (1,000 queries)": (lambda r: r["bm25_search"]["seconds"], lambda r: over(r["bm25_search"])),
        "BM25 search, every core": (lambda r: r["bm25_search"]["seconds_threads"], lambda r: over(r["bm25_search"])),
        "BM25 search, numba backend, every core": (lambda r: r["bm25_search"]["seconds_numba"],
                                                   lambda r: over(r["bm25_search"])),
        "in memory: encode, gathered": (lambda r: r["ram_encode"]["seconds"], lambda r: over(r["ram_encode"])),
        "in memory: Flat index + search": (lambda r: r["ram_index"]["seconds_build"] + r["ram_index"]["seconds_search"],
                                           lambda r: over(r["ram_index"])),
        "in memory: bm25s index in one call": (lambda r: r["ram_bm25"]["seconds"], lambda r: over(r["ram_bm25"])),
    }
    out = {}
    for name, (seconds, memory) in stages.items():
        have = [n for n in sizes if all(k in rows[n] for k in STORE_STAGES) and
                (not name.startswith("in memory") or "ram_encode" in rows[n])]
        have = [n for n in have if _has(seconds, rows[n])]  # rows measured before a column existed lack it
        out[name] = {"sizes": have, "seconds": [seconds(rows[n]) for n in have],
                     "peak_mib": [memory(rows[n]) for n in have]}
        if len(have) >= 2:
            out[name]["time_exponent"] = slope(have, out[name]["seconds"])
    return out


def section(result: dict) -> list[str]:
    """benchmarks/RESULTS.md's section for this benchmark."""
    sizes = result["sizes"]
    table = growth(result)
    head = " | ".join(f"n = {n:,}" for n in sizes)
    lines = ["## A knowledge base at 10⁴–10⁶ passages: time and memory per stage", "",
             f"`{result['command'].strip()}` ({result['machine']}; a random one-layer BERT2BERT of MiniLM's "
             f"width, d = 384, passages cut to {result['settings']['max_length']} tokens, store chunks of "
             f"{result['settings']['chunk_size']:,}; {result['settings']['factory']} with nprobe "
             f"{result['settings']['nprobe']}; {result['settings']['queries']:,} queries per search; the real BBC "
             "passages first, then passages drawn from their word frequencies). Peak: the stage's peak RSS "
             "over its process's RSS once the model is loaded and the runtimes warmed up (MiB). "
             "Exponent: time ∝ n^b, least squares on logs. The in-memory path is measured up to 10⁵. "
             "docs/scaling.md reads these numbers.", "",
             f"| stage | seconds: {head} | b | peak MiB: {head} |",
             "|---|" + "---|" * len(sizes) + "---|" + "---|" * len(sizes)]
    for name, t in table.items():
        cells = {n: (s, m) for n, s, m in zip(t["sizes"], t["seconds"], t["peak_mib"])}
        secs = " | ".join(f"{cells[n][0]:.2f}" if n in cells else "–" for n in sizes)
        mems = " | ".join(f"{cells[n][1]:.0f}" if n in cells else "–" for n in sizes)
        b = f"{t['time_exponent']:.2f}" if "time_exponent" in t else "–"
        lines.append(f"| {name} | {secs} | {b} | {mems} |")
    notes = [*(f"Rerun: `{r}`." for r in result.get("reruns", [])), *result.get("notes", [])]
    lines += ["", " ".join(notes)] if notes else []
    big = str(max(sizes))
    row = result["rows"][big]
    lines += ["", f"At n = {int(big):,}: BM25 index {row['bm25_index']['index_bytes'] / MIB:.0f} MiB (vocabulary "
              f"{row['bm25_index']['vocabulary']:,}), its build peak "
              f"{(row['bm25_index']['peak'] - row['bm25_index']['base']) / row['bm25_index']['index_bytes']:.2f}× "
              f"the index; IVF-PQ codes {row['index']['codes_bytes'] / MIB:.0f} MiB (n × 40 B); store "
              f"{row['encode']['store_bytes'] / MIB:.0f} MiB on disk (float32).", ""]
    rec = result["recall"]
    lines += [f"Compressed factories against exact search, real collection: {rec['passages']:,} BBC passages, "
              f"{rec['queries']:,} headlines, {rec['model']}.", "",
              "| factory (search parameters) | recall@10 | recall@100 | build + search s |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['recall@10']:.3f} | {v['recall@100']:.3f} | {v['seconds']:.1f} |"
              for k, v in rec.items() if isinstance(v, dict)]
    return lines + [""]


def main(argv=None):
    global QUERIES, CHUNK, RECALL_PASSAGES, FACTORY
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--stages", nargs="+", choices=sorted(STAGES), help="rerun only these stages and merge "
                        "them into --output (default: every stage)")
    parser.add_argument("--work", default=str(HERE / "runs" / "kb_scale"))
    parser.add_argument("--output", default=str(HERE / "kb_scale.json"))
    parser.add_argument("--quick", action="store_true", help="a smoke run: 2,000 passages, 200 queries, recall on "
                        "500 passages (seconds, not a measurement)")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        QUERIES, CHUNK, RECALL_PASSAGES, FACTORY = 200, 512, 500, "IVF16,PQ32"
        args.sizes = [2000] if args.sizes == parser.get_default("sizes") else args.sizes
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.stage:
        result = STAGES[args.stage](work, args.n)
        print(json.dumps({**result, "peak": peak()}))
        return 0
    import torch

    out = Path(args.output)
    result = json.loads(out.read_text()) if args.stages and out.exists() else {"rows": {}}
    wanted = set(args.stages or STAGES)
    for n in args.sizes:
        collection(work, n)
        row = result["rows"].setdefault(str(n), {})
        for name in [*STORE_STAGES, *(RAM_STAGES if n <= RAM_UP_TO else ()), *EXTRA_STAGES]:
            if name in wanted:
                row[name] = run_stage(name, work, n, args.quick)
                print(n, name, json.dumps(row[name]), flush=True)
    if "recall" in wanted:
        result["recall"] = run_stage("recall", work, 0, args.quick)
        print("recall", json.dumps(result["recall"]), flush=True)
    command = "python benchmarks/kb_scale.py" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    if args.stages:  # a partial rerun: the first command stays the table's
        result.setdefault("reruns", []).append(command)
    result.update({"command": result.get("command", command),
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                              f"Python {platform.python_version()}",
                   "sizes": sorted(int(n) for n in result["rows"]),
                   "settings": {"max_length": MAX_LENGTH, "chunk_size": CHUNK, "factory": FACTORY, "nprobe": NPROBE,
                                "queries": QUERIES}})
    out.write_text(json.dumps(result, indent=2))
    if "recall" in result and all(set(STORE_STAGES) <= set(r) for r in result["rows"].values()):
        print("\n".join(section(result)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
