"""Nothing lost, nothing hung, nothing silently wrong (docs/reliability.md): stores keyed by their
collection, errors and long single-process work under 2 processes, atomic and durable writes,
duplicate ids, cache keys, users' files in odd encodings, labelled and BEIR edge cases, exports
with both prompts, BM25 threads, cached indexes and the disk a run leaves behind."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import petune
from conftest import script, tiny
from petune.data.beir import load_beir, write_beir
from petune.data.files import DataError
from petune.data.labelled import Labelled, check_splits, read_labelled, split_labelled
from petune.score import BM25, build_index
from petune.store import StoreError, StoreIds
from test_embed import CharTokenizer

HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(HERE)}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
TEXTS = [f"passage {i} " + "word " * (i % 5) for i in range(40)]


def store_args(**kw):
    return SimpleNamespace(passage_length=32, store_from=0, store_dtype="float32", store_chunk_size=8,
                           index_factory="Flat", index_train_size=None, index_params=None, seed=0, **kw)


# -- stores and jobs -------------------------------------------------------------------------------

def test_a_second_collection_gets_its_own_store_and_the_first_stays(tmp_path):
    """Item 1: same model, same cache, two collections: each its own store; before, the second hit
    the first's chunk digests and the message said to delete it."""
    import datasets

    from petune.jobs.common import dense_run

    model, tok = tiny("bart"), CharTokenizer()
    a = datasets.Dataset.from_dict({"passage": TEXTS})
    b = datasets.Dataset.from_dict({"passage": [t.upper() for t in TEXTS[:30]]})
    queries = {"q1": "passage 3", "q2": "WORD"}
    run_a = dense_run(model, tok, a, queries, store_args(), tmp_path, query_length=16).to_dict()
    run_b = dense_run(model, tok, b, queries, store_args(), tmp_path, query_length=16).to_dict()
    stores = sorted((tmp_path / "stores").iterdir())
    assert len(stores) == 2 and {len(petune.EmbeddingStore(s)) for s in stores} == {40, 30}
    assert run_a != run_b
    assert dense_run(model, tok, a, queries, store_args(), tmp_path, query_length=16).to_dict() == run_a


@pytest.mark.multiproc
def test_collective_timeout_is_the_option_given(tmp_path):
    """Item 2: the process group waits as long as PETUNE_COLLECTIVE_TIMEOUT (the recipes'
    --collective-timeout) says: a 0.5 s wait passes a 4 s barrier timeout, a 6 s one fails it —
    in seconds, not after torch's 30 minutes."""
    start = time.time()
    done = subprocess.run([*TORCHRUN, str(HERE / "multiproc" / "dist_check.py"), "timeout", "0.5", "6"],
                          env={**ENV, "PETUNE_COLLECTIVE_TIMEOUT": "4"}, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert "rank 1: timeout 4 s" in out and "rank 1: barrier 1 passed" in out, out[-3000:]
    assert done.returncode != 0 and "rank 1: barrier 2 passed" not in out, out[-3000:]
    assert time.time() - start < 60


def test_collective_timeout_default_and_bad_values(monkeypatch):
    from petune.dist import DEFAULT_COLLECTIVE_TIMEOUT, collective_timeout

    monkeypatch.delenv("PETUNE_COLLECTIVE_TIMEOUT", raising=False)
    assert collective_timeout() == DEFAULT_COLLECTIVE_TIMEOUT >= 3600  # far above torch's 10 / 30 minutes
    monkeypatch.setenv("PETUNE_COLLECTIVE_TIMEOUT", "90")
    assert collective_timeout() == 90
    for bad in ("0", "-3", "soon"):
        monkeypatch.setenv("PETUNE_COLLECTIVE_TIMEOUT", bad)
        with pytest.raises(ValueError, match="positive number of seconds"):
            collective_timeout()


@pytest.mark.multiproc
def test_an_error_on_one_process_reaches_every_process(tmp_path):
    """Item 3: one corrupted chunk, owned by process 1: both processes exit 2 with the message at
    once (before, process 0 waited at the next barrier until the collective timeout)."""
    import torch

    check = str(HERE / "multiproc" / "store_check.py")
    store = tmp_path / "store"
    checked = script("tests/multiproc/store_check.py")
    with torch.no_grad():  # the store the check script writes, written here (no process to start)
        petune.encode_to_store(tiny("bart"), CharTokenizer(), iter(checked.TEXTS), store, chunk_size=checked.CHUNK,
                               progress=False)
    meta_file = store / "chunk-000001.json"  # chunk 1 belongs to process 1 of 2
    meta = json.loads(meta_file.read_text())
    meta_file.write_text(json.dumps({**meta, "texts": "0" * 24}))
    start = time.time()
    done = subprocess.run([*TORCHRUN, check, str(store)], env={**ENV, "PETUNE_COLLECTIVE_TIMEOUT": "300"},
                          capture_output=True, text=True, timeout=200)
    assert time.time() - start < 120
    assert "rank 1: error: chunk 1 of" in done.stderr and "encoded from other texts" in done.stderr, done.stderr[-3000:]
    assert "rank 0: error: process 1 failed: chunk 1 of" in done.stderr, done.stderr[-3000:]
    assert done.returncode != 0


@pytest.mark.multiproc
def test_an_error_inside_main_process_first_reaches_the_others():
    """Item 3: the recipes' main-first blocks (the main process converts the corpus, builds BM25,
    extracts features): its error reaches the others, which never run the block on a missing cache."""
    done = subprocess.run([*TORCHRUN, str(HERE / "multiproc" / "dist_check.py"), "first"],
                          env={**ENV, "PETUNE_COLLECTIVE_TIMEOUT": "300"}, capture_output=True, text=True, timeout=120)
    out = done.stdout + done.stderr
    assert "rank 0: error: corpus.jsonl:3: not valid JSON" in out, out[-3000:]
    assert "rank 1: error: process 0 failed: corpus.jsonl:3: not valid JSON" in out, out[-3000:]
    assert "read the main process's cache" not in out and done.returncode != 0


def test_hub_download_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """Item 4: a failure while the qrels are written leaves no directory a rerun would trust."""
    import datasets

    from petune.data.beir import beir_from_hub

    corpus = datasets.Dataset.from_dict({"_id": ["d1", "d2"], "title": ["", "T"], "text": ["one", "two"]})
    queries = datasets.Dataset.from_dict({"_id": ["q1"], "text": ["one?"]})

    class Broken:
        def __iter__(self):
            yield {"query-id": "q1", "corpus-id": "d1", "score": 1}
            raise ConnectionError("connection reset")

    qrels = {"train": [{"query-id": "q1", "corpus-id": "d1", "score": 1}], "test": Broken()}
    monkeypatch.setattr(datasets, "load_dataset",
                        lambda name, config=None, split=None: {"corpus": corpus, "queries": queries}.get(config, qrels))
    dest = tmp_path / "beir" / "BeIR--x"
    with pytest.raises(ConnectionError):
        beir_from_hub("BeIR/x", dest)
    assert not dest.exists() and list((tmp_path / "beir").iterdir()) == []
    qrels["test"] = [{"query-id": "q1", "corpus-id": "d2", "score": 1}]
    beir_from_hub("BeIR/x", dest)
    assert (dest / "qrels" / "test.tsv").read_text().splitlines()[1] == "q1\td2\t1"
    assert len((dest / "corpus.jsonl").read_text().splitlines()) == 2


def test_retrieval_job_checks_the_training_file_before_writing(tmp_path, capsys):
    """Item 5: a bad --train-file stops the job before the corpus's Arrow cache (or anything) is written."""
    root = write_beir(tmp_path / "beir", {"d1": "one", "d2": "two"}, {"q1": "one?", "q2": "two?"},
                      {"train": {"q1": {"d1": 1}}, "test": {"q2": {"d2": 1}}})
    (tmp_path / "train.jsonl").write_text('{"query": "q", "positive": "p"}\n{"query": \n')
    out = tmp_path / "out"
    rc = script("recipes/retrieval.py").main(["--beir", str(root), "--train-file", str(tmp_path / "train.jsonl"),
                                              "--output-dir", str(out)])
    assert rc == 2 and "train.jsonl:2: not valid JSON" in capsys.readouterr().err
    assert not out.exists()


def test_viquae_job_checks_its_data_before_touching_the_output_dir(tmp_path, capsys):
    """Item 5: missing data leaves an earlier run's checkpoints and options as they were."""
    out = tmp_path / "out"
    (out / "viquae" / "checkpoints" / "step-00000010").mkdir(parents=True)
    rc = script("recipes/viquae.py").main(["--dataset-path", str(tmp_path / "nowhere"), "--output-dir", str(out)])
    assert rc == 2 and "does not exist" in capsys.readouterr().err
    assert (out / "viquae" / "checkpoints" / "step-00000010").is_dir() and not (out / "run_options.json").exists()


def test_atomic_writes_are_flushed_to_disk(tmp_path, monkeypatch):
    """Item 6: the file's data and the directory's entry reach the disk before a write counts as done."""
    from petune import atomic

    synced = []
    real = os.fsync
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real(fd))
    atomic.atomic_write(tmp_path / "a.json", lambda f: f.write(b"{}"))
    assert any(p.endswith(atomic.TMP_MARK) for p in synced) and str(tmp_path) in synced
    synced.clear()
    with atomic.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "x.bin").write_bytes(b"1")
    assert any(p.endswith("x.bin") for p in synced) and str(tmp_path) in synced


def test_a_chunk_whose_npy_is_short_is_encoded_again_and_temp_files_go(tmp_path):
    """Item 6: after a crash, a .json that vouches for a truncated .npy is not trusted: the rerun
    encodes that chunk again and the store equals an untouched one; kills' temp files are removed."""
    model, tok = tiny("bart"), CharTokenizer()
    path = tmp_path / "s"
    petune.encode_to_store(model, tok, TEXTS, path, chunk_size=8, progress=False)
    want = petune.EmbeddingStore(path).to_array()
    npy = path / "chunk-000002.npy"
    npy.write_bytes(npy.read_bytes()[:-100])
    (path / ".chunk-000003.npy.abc.petune-tmp").write_bytes(b"half")
    again = petune.encode_to_store(model, tok, TEXTS, path, chunk_size=8, progress=False)
    assert again.last_run == {"encoded": [2], "reused": 4}
    np.testing.assert_array_equal(again.to_array(), want)
    assert not list(path.glob(".*"))


def test_duplicate_ids_are_refused_before_encoding_and_ids_stay_on_disk(tmp_path):
    """Item 7: duplicate ids fail before any chunk is encoded (a list or a column) or before the store
    is complete (a one-pass iterator); a store's ids are read from ids.npy, never a list."""
    import datasets

    model, tok = tiny("bart"), CharTokenizer()
    ids = [f"doc-{i}" for i in range(len(TEXTS))]
    ids[30] = "doc-4"
    with pytest.raises(StoreError, match="rows 4 and 30 are both 'doc-4'"):
        petune.encode_to_store(model, tok, TEXTS, tmp_path / "a", ids=ids, chunk_size=8, progress=False)
    assert not list((tmp_path / "a").glob("chunk-*")) if (tmp_path / "a").exists() else True
    ds = datasets.Dataset.from_dict({"text": TEXTS, "id": ids})
    with pytest.raises(StoreError, match="both 'doc-4'"):
        petune.encode_to_store(model, tok, ds, tmp_path / "b", column="text", ids="id", chunk_size=8, progress=False)
    with pytest.raises(StoreError, match="rows 4 and 30 are both 'doc-4'"):
        petune.encode_to_store(model, tok, TEXTS, tmp_path / "c", ids=iter(ids), chunk_size=8, progress=False)
    with pytest.raises(ValueError, match="unfinished store"):
        petune.EmbeddingStore(tmp_path / "c")
    ids[30] = "doc-30 é"
    store = petune.encode_to_store(model, tok, TEXTS, tmp_path / "d", ids=iter(ids), chunk_size=8, progress=False)
    assert isinstance(store.ids, StoreIds) and store.ids[30] == "doc-30 é" and list(store.ids) == ids
    found = build_index(store).search(store[[30]], ["x"], k=len(TEXTS)).to_dict()["x"]
    assert set(found) == set(ids)  # every row's top-k entry named by its own id


class Stem:
    """Stemmers with one qualified name and different behaviour, as PyStemmer's English and French
    ``stemWords`` are (both ``Stemmer.stemWords``)."""

    def __init__(self, keep: int):
        self.keep = keep

    def stemWords(self, words):  # noqa: N802 - PyStemmer's name
        return [w[:self.keep] for w in words]


def test_bm25_cache_tells_stemmers_with_one_name_apart(tmp_path):
    """Item 8: the cached index and runs of one stemmer are not reused for another of the same name."""
    docs = {"a": "connection connected", "b": "connecting universe", "c": "universities univers"}
    queries = {"q": "connections"}
    for keep in (4, 8):
        cached = BM25(docs, stemmer=Stem(keep).stemWords, cache_dir=tmp_path).search(queries, k=3).to_dict()
        assert cached == BM25(docs, stemmer=Stem(keep).stemWords).search(queries, k=3).to_dict()
    short = BM25(docs, stemmer=Stem(4).stemWords, cache_dir=tmp_path).search(queries, k=3).to_dict()
    long = BM25(docs, stemmer=Stem(8).stemWords, cache_dir=tmp_path).search(queries, k=3).to_dict()
    assert set(short["q"]) == {"a", "b"} and set(long["q"]) == {"a", "b"} and short != long
    assert len(list(tmp_path.glob("bm25-index-*"))) == 2


# -- data in, model out ----------------------------------------------------------------------------

def test_users_files_in_other_encodings_name_the_line(tmp_path):
    """Item 9: latin-1 names its line; a byte-order mark is dropped; csv errors name their line."""
    latin = tmp_path / "queries.jsonl"
    latin.write_bytes('{"_id": "q1", "text": "ok"}\n{"_id": "q2", "text": "caf\xe9"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match=r"queries.jsonl:2: not UTF-8 text \(byte 0xe9 at column 27\)"):
        list(petune.data.files.jsonl_rows(latin, {"_id": str}, ""))
    excel = tmp_path / "excel.csv"
    excel.write_bytes("text,label\nStocks fell.,business\nA goal.,sport\n".encode("utf-8-sig"))
    assert read_labelled(excel).labels == ["business", "sport"]
    huge = tmp_path / "huge.csv"
    huge.write_text('text,label\n"' + "x" * 200_000 + '",a\n')
    with pytest.raises(DataError, match=r"huge.csv:\d: not readable as CSV .*field larger than field limit"):
        read_labelled(huge)
    beir = write_beir(tmp_path / "b", {"d1": "one"}, {"q1": "one?"}, {"test": {"q1": {"d1": 1}}})
    (beir / "qrels" / "test.tsv").write_bytes("query-id\tcorpus-id\tscore\nq1\td1\t1\nq\xe9\td1\t1\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"test.tsv:3: not UTF-8"):
        load_beir(beir, cache_dir=tmp_path / "c")


def test_labelled_splits_unlabelled_rows_and_stratified_deduplicated_splits(tmp_path):
    """Item 10: NAME:split reads a split; ClassLabel -1 is an error; split_labelled is stratified,
    keeps each text once, and a rare label stays in training."""
    import datasets

    features = datasets.Features({"text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["neg", "pos"])})
    saved = tmp_path / "saved"
    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": ["good", "bad"], "label": [1, 0]}, features=features),
        "test": datasets.Dataset.from_dict({"text": ["fine", "awful"], "label": [-1, 0]}, features=features),
    }).save_to_disk(str(saved))
    assert read_labelled(f"{saved}:train").labels == ["pos", "neg"]
    with pytest.raises(DataError, match=r"several splits \['train', 'test'\].*:train"):
        read_labelled(saved)
    with pytest.raises(DataError, match="no split 'dev'"):
        read_labelled(f"{saved}:dev")
    with pytest.raises(DataError, match=r"saved:1: label -1 is not one of the 2 classes"):
        read_labelled(f"{saved}:test")

    texts = [f"common {i}" for i in range(50)] + [f"other {i}" for i in range(30)] + ["rare one", "rare two"]
    labels = ["a"] * 50 + ["b"] * 30 + ["rare"] * 2
    texts += texts[:5]  # repeated texts
    labels += labels[:5]
    data = Labelled(texts, labels, [f"f:{i + 2}" for i in range(len(texts))])
    with pytest.warns(UserWarning, match="5 rows repeat an earlier text"):
        train, dev, test = split_labelled(data, seed=3)
    assert len(train) + len(dev) + len(test) == 82
    assert not set(train.texts) & set(test.texts) and not set(dev.texts) & set(test.texts)
    assert test.labels.count("a") == 5 and test.labels.count("b") == 3 and "rare" not in test.labels
    assert train.labels.count("rare") == 2
    check_splits(train, test)


def test_beir_null_titles_conflicting_judgements_and_unjudged_test_queries(tmp_path):
    """Item 11."""
    root = write_beir(tmp_path / "b", {"d1": "one", "d2": "two"}, {"q1": "one?", "q2": "two?", "q3": "three?"},
                      {"train": {"q1": {"d1": 1}}, "test": {"q2": {"d2": 1}, "q3": {"d1": 0}}})
    (root / "corpus.jsonl").write_text('{"_id": "d1", "title": null, "text": "one"}\n'
                                       '{"_id": "d2", "title": "T", "text": "two"}\n')
    with pytest.warns(UserWarning, match=r"test.tsv: 1 queries have no positive judgement \(e.g. \['q3'\]\)"):
        data = load_beir(root, cache_dir=tmp_path / "c")
    assert data.qrels["test"] == {"q2": {"d2": 1}} and data.corpus["passage"] == ["one", "T two"]
    with open(root / "qrels" / "train.tsv", "a") as f:
        f.write("q1\td1\t2\n")
    with pytest.raises(DataError, match=r"train.tsv:3: query 'q1' and document 'd1' are judged 2 here and 1 on line 2"):
        load_beir(root, cache_dir=tmp_path / "c")


def test_sentence_transformers_export_holds_query_and_document_prompts(tmp_path, minilm_tokenizer):
    """Item 12: encode_query prepends the query prefix and encode_document the passage prefix."""
    st = pytest.importorskip("sentence_transformers", reason="pip install petune[serve]")
    from test_your_data import _tiny

    tuned = petune.attach(_tiny("t5", minilm_tokenizer.vocab_size), "lora", r=2)
    path = petune.export(tuned, tmp_path / "st", tokenizer=minilm_tokenizer, format="sentence-transformers",
                         query_prefix="query: ", passage_prefix="passage: ", max_length=64, normalize=True)
    served = st.SentenceTransformer(str(path), device="cpu")
    texts = ["what happened to markets?", "Markets fell sharply today."]
    for side, prefix in (("query", "query: "), ("document", "passage: ")):
        got = getattr(served, f"encode_{side}")(texts, convert_to_numpy=True)
        want = petune.encode(tuned, minilm_tokenizer, texts, prefix=prefix, max_length=64, normalize=True)
        np.testing.assert_allclose(got, want, atol=1e-5)
    assert "encode_query" in (path / "README.md").read_text()
    with pytest.raises(ValueError, match="not both"):
        petune.export(tuned, tmp_path / "x", prefix="q: ", query_prefix="q: ")


# -- what a 10⁷ user waits on ----------------------------------------------------------------------

def test_bm25_searches_on_every_core_with_the_same_results():
    """Item 13: threads (and the numba backend) change the speed, not the scores."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(300)]
    docs = [" ".join(rng.choice(vocab, 12)) for _ in range(500)]
    queries = {f"q{i}": " ".join(rng.choice(vocab, 4)) for i in range(60)}
    one = BM25(docs, n_threads=1, stopwords=None).search(queries, k=10).to_dict()
    assert BM25(docs, stopwords=None).n_threads == os.cpu_count()
    assert BM25(docs, n_threads=2, stopwords=None).search(queries, k=10).to_dict() == one
    with pytest.raises(ValueError, match="backend"):
        BM25(docs, backend="jax")


@pytest.mark.slow
def test_bm25_numba_backend_gives_the_same_scores():
    """Item 13: bm25s's compiled backend (its first call compiles for several seconds): the same
    top-k scores as numpy's; documents tied at the cut-off may be others."""
    rng = np.random.default_rng(0)
    vocab = [f"w{i}" for i in range(300)]
    docs = [" ".join(rng.choice(vocab, 12)) for _ in range(500)]
    queries = {f"q{i}": " ".join(rng.choice(vocab, 4)) for i in range(60)}
    one = BM25(docs, n_threads=1, stopwords=None).search(queries, k=10).to_dict()
    fast = BM25(docs, backend="numba", stopwords=None).search(queries, k=10).to_dict()
    assert {q: sorted(d.values()) for q, d in fast.items()} == {q: sorted(d.values()) for q, d in one.items()}


def test_compressed_indexes_are_cached_in_their_store(tmp_path, caplog):
    """Item 14: the second build of the same IVF index reads it back; another seed trains anew."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((600, 16)).astype("float32")
    from test_store import write_store

    write_store(tmp_path / "s", x, 100)
    first = build_index(tmp_path / "s", "IVF8,Flat", train_size=400, search_params="nprobe=8")
    again = build_index(tmp_path / "s", "IVF8,Flat", train_size=400, search_params="nprobe=8")
    other = build_index(tmp_path / "s", "IVF8,Flat", train_size=400, seed=1)
    assert (first.from_cache, again.from_cache, other.from_cache) == (False, True, False)
    q = x[:5] + 0.01
    assert again.search(q, list("abcde"), k=3).to_dict() == first.search(q, list("abcde"), k=3).to_dict()
    assert len(list((tmp_path / "s" / "indexes").glob("*.faiss"))) == 2


def test_the_tuned_store_is_removed_after_its_search_unless_kept(tmp_path):
    """Item 15: a tuned model's store goes after its test search (--keep-tuned-store keeps it); the
    frozen model's store stays, even when the tuned weights equal the frozen ones."""
    import datasets
    import torch

    from petune.jobs.common import dense_run

    model, tok = tiny("bart"), CharTokenizer()
    ds = datasets.Dataset.from_dict({"passage": TEXTS})
    queries = {"q": "passage 1"}
    dense_run(model, tok, ds, queries, store_args(), tmp_path, query_length=16)
    tuned = petune.attach(model, "lora", r=2)
    dense_run(tuned, tok, ds, queries, store_args(), tmp_path, query_length=16, keep_store=False)  # identity LoRA
    assert len(list((tmp_path / "stores").iterdir())) == 1
    for p in tuned.tuned_parameters().values():
        torch.nn.init.normal_(p, std=0.1)
    dense_run(tuned, tok, ds, queries, store_args(), tmp_path, query_length=16, keep_store=False)
    assert len(list((tmp_path / "stores").iterdir())) == 1
    dense_run(tuned, tok, ds, queries, store_args(), tmp_path, query_length=16, keep_store=True)
    assert len(list((tmp_path / "stores").iterdir())) == 2


def test_bm25_spills_of_killed_indexing_are_removed(tmp_path):
    """Item 15: a spill folder whose process is gone is removed before the next build; a live
    process's stays."""
    import socket

    from petune.score.bm25 import SPILL

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = socket.gethostname()
    gone = tmp_path / f"{SPILL}{host}-{int(dead.stdout)}-abc"
    live = tmp_path / f"{SPILL}{host}-{os.getpid()}-def"
    for d in (gone, live):
        d.mkdir()
        (d / "terms.i32").write_bytes(b"0" * 64)
    BM25(["one doc", "two docs"], cache_dir=tmp_path).search({"q": "doc"}, k=1)
    assert not gone.exists() and live.exists()
