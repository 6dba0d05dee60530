"""Scoring on real offline data: frozen MiniLM and BM25 on a BBC News headline → article subset."""

import numpy as np
import pytest

from petune.data.packaged import bbc_news, bbc_retrieval
from petune.embed import encode
from petune.score import BM25, DenseIndex, compare, evaluate, knn_scores


@pytest.fixture(scope="module")
def bbc_subset():
    articles = bbc_news()
    rng = np.random.default_rng(0)
    picked = [articles[i] for i in rng.choice(len(articles), 150, replace=False)]  # random order: topics mixed
    return picked, bbc_retrieval(picked, max_chars=600)


def test_frozen_minilm_and_bm25_on_bbc(minilm_bert2bert, minilm_tokenizer, bbc_subset):
    articles, data = bbc_subset
    doc_ids, query_ids = list(data.docs), list(data.queries)
    docs = encode(minilm_bert2bert, minilm_tokenizer, [data.docs[d] for d in doc_ids], max_length=160)
    queries = encode(minilm_bert2bert, minilm_tokenizer, [data.queries[q] for q in query_ids])
    dense = DenseIndex(docs, doc_ids).search(queries, query_ids, k=100)
    bm25 = BM25(data.docs, k1=0.5, b=0.3).search(data.queries, k=100)
    dense_scores, bm25_scores = evaluate(data.qrels, dense), evaluate(data.qrels, bm25)
    # random ranking of 150 documents gives MRR@10 ~ 0.02
    assert dense_scores["mrr@10"] > 0.5, dense_scores
    assert bm25_scores["mrr@10"] > 0.5, bm25_scores
    report = compare(data.qrels, {"MiniLM": dense, "BM25": bm25}, metrics=["mrr@10", "precision@1"])
    p = report.comparisons["MiniLM", "BM25"]["mrr@10"]["p_value"]
    assert 0.0 <= p <= 1.0

    # kNN topic classification over the same article embeddings: 100 train, 50 test
    topics = [a["topic"] for a in articles]
    scores = knn_scores(docs[:100], topics[:100], docs[100:], topics[100:], k=10)
    assert scores["accuracy"] > 0.7, scores  # 5 topics: chance is ~0.2
