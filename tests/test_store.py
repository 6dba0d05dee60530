"""Collections at scale: streamed texts, the on-disk embedding store (1 and 2 processes, resumed
after a SIGKILL), indexes built from it in bounded memory, and BM25 built from a stream."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import petune
from conftest import script, tiny
from petune.data.stream import RowIds, _arrow_files, text_batches
from petune.score import BM25, DenseIndex, ExactStoreIndex, build_index
from test_embed import CharTokenizer

HERE = Path(__file__).resolve().parent
CHUNK, TEXTS = script("tests/multiproc/store_check.py").CHUNK, script("tests/multiproc/store_check.py").TEXTS
#: the check script imports the tests' helpers (conftest, test_embed) from the tests folder
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE)}


def saved_dataset(tmp_path, n=50):
    import datasets

    texts = [f"document {i} " + "word " * (i % 7) for i in range(n)]
    datasets.Dataset.from_dict({"text": texts, "doc_id": [f"d{i}" for i in range(n)]}).save_to_disk(
        str(tmp_path / "ds"), num_shards=3)  # several Arrow files
    return datasets.load_from_disk(str(tmp_path / "ds")), texts


def test_text_batches_stream_a_dataset_from_its_arrow_files(tmp_path):
    ds, texts = saved_dataset(tmp_path)
    assert len(ds.cache_files) > 1 and _arrow_files(ds, "text") is not None
    assert [t for b in text_batches(ds, batch_size=7, column="text") for t in b] == texts
    assert [len(b) for b in text_batches(ds["text"], batch_size=20)] == [20, 20, 10]
    picked = ds.select([5, 1, 3])  # an indices mapping: read through datasets instead
    assert _arrow_files(picked, "text") is None
    assert next(text_batches(picked, column="text")) == [texts[5], texts[1], texts[3]]
    # tables that are not simply the files: read through datasets, the same rows
    added = ds.add_column("extra", texts)
    renamed = ds.rename_column("text", "body")
    assert _arrow_files(added, "extra") is None and _arrow_files(renamed, "body") is None
    assert next(text_batches(added, batch_size=3, column="extra")) == texts[:3]
    assert next(text_batches(renamed, batch_size=3, column="body")) == texts[:3]
    assert next(text_batches(ds.select(range(10, 20)), batch_size=3, column="text")) == texts[10:13]
    one = tmp_path / "one"
    ds.flatten_indices().save_to_disk(str(one), num_shards=1)
    import datasets

    assert _arrow_files(datasets.load_from_disk(str(one)), "text") is not None
    with pytest.raises(ValueError, match="name its text column"):
        next(text_batches(ds))
    with pytest.raises(ValueError, match="no column 'body'"):
        next(text_batches(ds, column="body"))
    with pytest.raises(TypeError, match="row 1 is int"):
        next(text_batches(["a", 3]))
    with pytest.raises(TypeError, match="not one string"):
        next(text_batches("abc"))
    assert list(RowIds(3)) == ["0", "1", "2"] and RowIds(3)[-1] == "2" and RowIds(5)[1:3] == ["1", "2"]


def test_encode_to_store_equals_encode_and_reads_by_chunk_and_row(tmp_path):
    model, tok = tiny("bart"), CharTokenizer()
    ds, texts = saved_dataset(tmp_path)
    store = petune.encode_to_store(model, tok, ds, tmp_path / "store", column="text", ids="doc_id", chunk_size=16,
                                   normalize=True)
    want = petune.encode(model, tok, texts, normalize=True)
    assert store.shape == want.shape and store.num_chunks == 4 and store.last_run == {"encoded": [0, 1, 2, 3],
                                                                                      "reused": 0}
    np.testing.assert_allclose(store.to_array(), want, atol=1e-6)
    np.testing.assert_allclose(store[[49, 0, 17]], want[[49, 0, 17]], atol=1e-6)
    np.testing.assert_allclose(store[3], want[3], atol=1e-6)
    assert [start for start, _ in store.chunks(part=(1, 2))] == [16, 48]
    assert store.ids[:2] == ["d0", "d1"] and len(store.ids) == 50
    assert store.options["normalize"] is True and store.options["max_length"] == 64
    # reopened and rerun: nothing encoded again
    again = petune.encode_to_store(model, tok, texts, tmp_path / "store", ids=[f"d{i}" for i in range(50)],
                                   chunk_size=16, normalize=True)
    assert again.last_run == {"encoded": [], "reused": 4}
    half = petune.encode_to_store(model, tok, texts, tmp_path / "half", chunk_size=16, dtype="float16")
    assert half.dtype == "float16" and isinstance(half.ids, RowIds)
    assert np.abs(half.to_array() - petune.encode(model, tok, texts)).max() < 1e-2


def test_encode_to_store_refuses_bad_input_and_mismatched_stores(tmp_path):
    model, tok = tiny("bart"), CharTokenizer()
    texts = TEXTS[:20]
    petune.encode_to_store(model, tok, texts, tmp_path / "s", chunk_size=8)
    with pytest.raises(ValueError, match="other settings .*chunk_size"):
        petune.encode_to_store(model, tok, texts, tmp_path / "s", chunk_size=4)
    with pytest.raises(ValueError, match="other settings .*key"):
        petune.encode_to_store(model, tok, texts, tmp_path / "s", chunk_size=8, prefix="query: ")
    with pytest.raises(ValueError, match="chunk 1 .* other texts"):
        petune.encode_to_store(model, tok, texts[:8] + ["changed"] + texts[9:], tmp_path / "s", chunk_size=8)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an embedding store"):
        petune.encode_to_store(model, tok, texts, tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="texts is empty"):
        petune.encode_to_store(model, tok, [], tmp_path / "e")
    with pytest.raises(ValueError, match="dtype"):
        petune.encode_to_store(model, tok, texts, tmp_path / "e", dtype="int8")
    with pytest.raises(ValueError, match="ids and texts differ in length"):
        petune.encode_to_store(model, tok, texts, tmp_path / "ids", ids=["a", "b"])
    with pytest.raises(ValueError, match="unfinished store"):
        petune.EmbeddingStore(tmp_path / "ids")
    with pytest.raises(FileNotFoundError, match="no embedding store"):
        petune.EmbeddingStore(tmp_path / "nowhere")


def _chunks(path):
    return {p.name: np.load(p) for p in sorted(Path(path).glob("chunk-*.npy"))}


@pytest.mark.multiproc
def test_store_two_processes_killed_and_resumed_equals_one_process(tmp_path):
    """2 processes write the 1-process store bit for bit; a SIGKILL mid-encode loses at most the
    chunk each process was encoding, and the rerun encodes exactly the unfinished chunks."""
    script = str(HERE / "multiproc" / "store_check.py")
    reference = tmp_path / "one"
    done = subprocess.run([sys.executable, script, str(reference)], env=ENV, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", script]
    store = tmp_path / "two"
    killed = subprocess.Popen([*torchrun, str(store), "--slow", "0.3"], env=ENV, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while len(list(store.glob("chunk-*.json"))) < 4 and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    for proc in [*psutil.Process(killed.pid).children(recursive=True), psutil.Process(killed.pid)]:
        proc.send_signal(signal.SIGKILL)  # the workers too: torchrun starts them in sessions of their own
    log = killed.communicate()[1]
    finished = {p.name[:12] for p in store.glob("chunk-*.json")}
    total = -(-len(TEXTS) // CHUNK)
    assert 4 <= len(finished) < total, log[-2000:]
    for rank in (0, 1):  # chunks a process had started and not finished when killed: at most one
        started = {int(line.split()[-1]) for line in log.splitlines() if f"process {rank}: encoding chunk" in line}
        assert len({c for c in started if f"chunk-{c:06d}" not in finished}) <= 1
    assert not (store / "manifest.json").exists() or not json.loads((store / "manifest.json").read_text())["complete"]

    rerun = subprocess.run([*torchrun, str(store)], env=ENV, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    encoded = {int(line.split()[-1]) for line in rerun.stderr.splitlines() if ": encoding chunk" in line}
    assert encoded == {c for c in range(total) if f"chunk-{c:06d}" not in finished}
    a, b = _chunks(reference), _chunks(store)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert petune.EmbeddingStore(store).shape == (len(TEXTS), 32)


def write_store(path, x, chunk):
    """A store of given vectors, written as encode_to_store lays one out (no model needed)."""
    from petune.store import FORMAT, MANIFEST, _chunk_name, _write_json

    path.mkdir()
    count = -(-len(x) // chunk)
    for c in range(count):
        block = x[c * chunk:(c + 1) * chunk]
        np.save(path / _chunk_name(c, ".npy"), block)
        _write_json(path / _chunk_name(c, ".json"), {"rows": len(block), "dim": x.shape[1], "texts": ""})
    _write_json(path / MANIFEST, {"format": FORMAT, "complete": True, "n": len(x), "dim": x.shape[1],
                                  "dtype": "float32", "chunk_size": chunk, "num_chunks": count, "options": {},
                                  "key": "", "has_ids": False})
    return petune.EmbeddingStore(path)


def test_exact_store_search_equals_flat_and_compressed_indexes_build_from_the_store(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3000, 16)).astype(np.float32)
    store = write_store(tmp_path / "s", x, chunk=700)
    q = rng.standard_normal((40, 16)).astype(np.float32)
    qids = [f"q{i}" for i in range(40)]
    flat = DenseIndex(x, RowIds(len(x))).search(q, qids, k=10).to_dict()
    exact = build_index(store).search(q, qids, k=10)
    assert isinstance(build_index(store), ExactStoreIndex)
    assert exact.to_dict() == flat  # same top-10, same scores
    l2 = ExactStoreIndex(store, metric="l2").search(q, qids, k=5).to_dict()
    assert l2 == DenseIndex(x, RowIds(len(x)), metric="l2").search(q, qids, k=5).to_dict()
    with pytest.warns(UserWarning, match="larger than the collection"):
        assert len(ExactStoreIndex(store).search(q[:1], ["a"], k=5000)["a"]) == 3000
    ivf = build_index(store, "IVF8,Flat", search_params="nprobe=8")  # every list visited: exact
    run = ivf.search(q, qids, k=10).to_dict()
    assert all(run[i].keys() == flat[i].keys() and run[i] == pytest.approx(flat[i]) for i in qids)
    assert isinstance(ivf.ids, RowIds)
    sq = build_index(store, "IVF8,SQ8", train_size=1000, search_params="nprobe=2")
    recall = np.mean([len(set(sq.search(q, qids, k=10)[i]) & set(flat[i])) / 10 for i in qids])
    assert 0.3 < recall <= 1.0
    sq.save(tmp_path / "idx")
    assert DenseIndex.load(tmp_path / "idx").search(q, qids, k=10).to_dict() == sq.search(q, qids, k=10).to_dict()
    with pytest.raises(ValueError, match="train_size"):
        build_index(store, "IVF8,Flat", train_size=10**6)
    with pytest.raises(ValueError, match="cannot build index"):
        build_index(store, "Nonsense7")


def bbc_passages(limit=3000):
    from petune.data.packaged import bbc_news

    out = []
    for article in bbc_news():
        words = article["body"].split()
        out += [f"{article['headline']}. " + " ".join(words[i:i + 100]) for i in range(0, len(words), 100)]
        if len(out) >= limit:
            return out[:limit]
    return out


@pytest.mark.parametrize("method", ["lucene", "bm25+"])
def test_streamed_bm25_equals_bm25s_own_index(method):
    import bm25s

    texts = bbc_passages()
    texts[5:5] = ["No.", "it", "h is to o as o is to v."]  # only stopwords: length 0 (ChatterBot has such answers)
    queries = {f"q{i}": texts[i * 37].split(".")[0] for i in range(60)}
    ref = bm25s.BM25(method=method, k1=0.5, b=0.3)
    ref.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
    idx, scores = ref.retrieve(bm25s.tokenize(list(queries.values()), stopwords="en", return_ids=False,
                                              show_progress=False), k=20, show_progress=False)
    run = BM25(iter(texts), k1=0.5, b=0.3, method=method).search(queries, k=20).to_dict()
    for qid, row_idx, row_scores in zip(queries, idx, scores):
        want = {str(j): float(s) for j, s in zip(row_idx, row_scores) if s > 0}
        assert run[qid].keys() == want.keys()
        assert [run[qid][d] for d in want] == pytest.approx(list(want.values()), rel=1e-6)


def test_bm25_over_a_dataset_streams_caches_its_index_and_names_ids(tmp_path):
    ds, texts = saved_dataset(tmp_path)
    queries = {"a": "document 7 word", "b": "document 12"}
    by_dict = BM25({f"d{i}": t for i, t in enumerate(texts)}).search(queries, k=5).to_dict()
    streamed = BM25(ds, column="text", ids="doc_id", cache_dir=tmp_path / "cache")
    assert streamed.search(queries, k=5).to_dict() == by_dict
    assert list((tmp_path / "cache").glob("bm25-index-*/petune_bm25.json"))
    again = BM25(ds, column="text", ids="doc_id", cache_dir=tmp_path / "cache")
    assert again.search(queries, k=4).to_dict() == BM25(ds, column="text", ids="doc_id").search(queries, k=4).to_dict()
    assert again._indexed  # a new depth: searched on the cached index, memory-mapped, not rebuilt
    assert not list((tmp_path / "cache").glob("petune-bm25-*"))  # the spill files are gone
    rows = BM25(ds["text"]).search(queries, k=1).to_dict()
    assert rows == {q: {d[1:]: s for d, s in docs.items()} for q, docs in
                    BM25(ds, column="text", ids="doc_id").search(queries, k=1).to_dict().items()}
    with pytest.raises(ValueError, match="read twice"):
        BM25(iter(texts), cache_dir=tmp_path / "c2")



def test_int8_encoding_is_close_keyed_apart_and_refused_where_it_cannot_apply(tmp_path):
    model, tok = tiny("bart"), CharTokenizer()
    texts = TEXTS[:12]
    fp32 = petune.encode(model, tok, texts, normalize=True, cache_dir=tmp_path)
    int8 = petune.encode(model, tok, texts, normalize=True, cache_dir=tmp_path, quantize="int8")
    assert not np.array_equal(fp32, int8) and (fp32 * int8).sum(1).min() > 0.9  # cached apart, and close
    assert any(type(m).__name__ == "Linear" for m in model.modules())  # the model itself is untouched
    store = petune.encode_to_store(model, tok, texts, tmp_path / "s", chunk_size=5, normalize=True, quantize="int8")
    # activations are quantised per batch, so a text's vector depends on its batch: the store's are
    # its chunks' (batches never cross a chunk)
    by_chunk = [petune.encode(model, tok, texts[i:i + 5], normalize=True, quantize="int8") for i in (0, 5, 10)]
    np.testing.assert_allclose(store.to_array(), np.concatenate(by_chunk), atol=1e-5)
    assert store.options["quantize"] == "int8"
    with pytest.raises(ValueError, match="quantize must be"):
        petune.encode(model, tok, texts, quantize="int4")
    lora = petune.attach(tiny("bart"), "lora")
    with pytest.raises(ValueError, match="frozen or merged"):
        petune.encode(lora, tok, texts, quantize="int8")
