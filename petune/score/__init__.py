"""Scoring: dense retrieval (FAISS + ranx), kNN classification, BM25 baseline and hard negatives."""

from .bm25 import BM25
from .knn import knn_predict, knn_scores
from .retrieval import (DEFAULT_METRICS, DenseIndex, compare, evaluate, make_qrels, make_run, p_values,
                        report_latex, report_markdown)
from .runs import load_qrels, load_run, save_qrels, save_run, save_runs
from .store_index import ExactStoreIndex, build_index

__all__ = ["BM25", "DenseIndex", "ExactStoreIndex", "build_index",
           "DEFAULT_METRICS", "compare", "evaluate", "make_qrels", "make_run", "p_values",
           "report_markdown", "report_latex", "knn_predict", "knn_scores",
           "save_run", "load_run", "save_qrels", "load_qrels", "save_runs"]
