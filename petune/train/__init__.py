"""Multi-task training: tasks, round-robin sampling, losses, and the Accelerate loop."""

from .collate import ClassificationCollator, PairCollator, RetrievalCollator, Seq2SeqCollator, text_key
from .loop import Trainer, train
from .losses import (ClassificationLoss, ContrastiveLoss, DPRLoss, LogitScale, PairLoss, Seq2SeqLoss, dpr_loss,
                     false_negatives, gather_with_grad, info_nce)
from .roundrobin import MultiTaskLoader, task_order
from .tasks import Task

__all__ = ["Task", "Trainer", "train", "task_order", "MultiTaskLoader", "dpr_loss", "false_negatives", "info_nce",
           "gather_with_grad", "ContrastiveLoss", "DPRLoss", "PairLoss", "ClassificationLoss", "Seq2SeqLoss",
           "LogitScale", "RetrievalCollator", "PairCollator", "ClassificationCollator", "Seq2SeqCollator", "text_key"]
