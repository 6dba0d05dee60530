"""Helpers shared by the recipes: method options from the command line, model loading, reports."""

from __future__ import annotations

import argparse
import contextlib
import functools
import inspect
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from petune.dist import DEFAULT_COLLECTIVE_TIMEOUT
from petune.embed import encode_side  # noqa: F401 - the recipes import it from here

log = logging.getLogger("petune.jobs")
#: written in --output-dir; --resume continues only a run started with the same options
RUN_OPTIONS = "run_options.json"
#: options that do not change what a run computes, so they may differ on --resume
NOT_RUN_IDENTITY = {"output_dir", "resume", "cache_dir", "checkpoint_every", "collective_timeout", "keep_tuned_store",
                    "verbose"}

#: learning rates that work for each method on the offline recipe (AdamW); --lr overrides
DEFAULT_LR = {"prompt": 3e-2, "adapter": 2e-3, "ia3": 1e-2, "lora": 2e-3}


def add_sides_arg(parser: argparse.ArgumentParser) -> None:
    """``--sides both|query|separate``: one method for queries and passages, queries only over the
    frozen model's passages, or a module per side (``petune.attach(..., sides=...)``)."""
    parser.add_argument("--sides", default="both", choices=["both", "query", "separate"], help="both: queries and "
                        "passages share the method (DPR's shared encoder); query: the method tunes queries only and "
                        "passages stay the frozen model's, so the collection is encoded once for every tuned model; "
                        "separate: one module for queries and another for passages, on one backbone")


def sides_option(args) -> str | None:
    """``petune.attach``'s ``sides`` from ``--sides``."""
    return None if getattr(args, "sides", "both") == "both" else args.sides


def add_method_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("method (petune.attach)")
    g.add_argument("--method", default="adapter", choices=["prompt", "adapter", "ia3", "lora"])
    g.add_argument("--tasks-mode", default="multi", choices=["single", "multi"],
                   help="multi: one module per task (VL-Adapter 'multiple'); single: one shared module")
    g.add_argument("--d", type=int, help="bottleneck adapter width (exclusive with --reduction-factor)")
    g.add_argument("--reduction-factor", type=float, help="bottleneck adapter reduction factor (default 8)")
    g.add_argument("--placement", default="pfeiffer", choices=["pfeiffer", "houlsby"])
    g.add_argument("--r", type=int, default=8, help="LoRA rank")
    g.add_argument("--alpha", type=float, default=16, help="LoRA alpha")
    g.add_argument("--num-virtual-tokens", type=int, default=20, help="prompt length")
    g.add_argument("--lr", type=float, help=f"learning rate (default per method: {DEFAULT_LR})")


def add_mini_batch_arg(parser: argparse.ArgumentParser, rows: str = "examples") -> None:
    """``--mini-batch-size M``: the contrastive loss cached (GradCache, ``DPRLoss`` / ``PairLoss``
    ``mini_batch_size``), so ``--batch-size`` (the in-batch negatives) can grow past one forward."""
    parser.add_argument("--mini-batch-size", type=int, help=f"cached contrastive loss (GradCache): embed this many "
                        f"{rows} at a time, the same gradient as the whole batch at once in the memory of M; "
                        "--batch-size (the in-batch negatives) can then grow past what one forward holds")


def add_run_args(parser: argparse.ArgumentParser, checkpoint_every: int) -> None:
    g = parser.add_argument_group("resuming and caching")
    g.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output-dir "
                   "(the run must have been started with the same options); without it, a run starts afresh "
                   "and removes the checkpoints an earlier run left there")
    g.add_argument("--checkpoint-every", type=int, default=checkpoint_every, help="optimizer steps between checkpoints")
    g.add_argument("--cache-dir", help="where the frozen model's embeddings and the BM25 runs are cached, keyed by "
                   "model weights, data and options (default: OUTPUT_DIR/cache)")
    g.add_argument("--verbose", action="store_true", help="also show other libraries' INFO lines (faiss's loader, "
                   "Accelerate's per-file checkpoint lines, adapters' notices); by default the job shows its own "
                   "stages, progress bars, warnings and results")
    g.add_argument("--collective-timeout", type=float, help="minutes a process waits at a barrier for the others "
                   "(several processes: the main one works alone while building BM25, IVF indexes or Arrow files); "
                   f"default {DEFAULT_COLLECTIVE_TIMEOUT // 60} (or the environment's PETUNE_COLLECTIVE_TIMEOUT, "
                   "in seconds)")


def add_mining_args(parser: argparse.ArgumentParser) -> None:
    """``--mine-negatives`` and its window, margin and schedule (:mod:`petune.train.mining`)."""
    g = parser.add_argument_group("hard negatives mined while training (petune.train.mining)")
    g.add_argument("--mine-negatives", type=int, default=0, metavar="N", help="of each example's --hard-negatives, "
                   "N are mined from the collection with the model being trained before every --mine-every-th "
                   "epoch (the rest stay BM25's); 0: BM25's only. With --sides query the frozen passages are "
                   "searched (no re-encoding); with --sides both or separate every round re-encodes the collection")
    g.add_argument("--mine-ranks", type=int, nargs=2, default=[0, 30], metavar=("FIRST", "LAST"),
                   help="the window of ranks (0-based, LAST excluded; the query's relevant documents left out) the "
                   "mined negatives are drawn from at random")
    g.add_argument("--mine-margin", type=float, default=0.05, help="relative margin against false negatives: a "
                   "candidate scoring above (1 - margin) x the positive's score is not a negative (NV-Retriever's "
                   "TopK-PercPos); a negative value keeps every candidate")
    g.add_argument("--mine-every", type=int, default=1, help="epochs between mining rounds")


def add_distill_args(parser: argparse.ArgumentParser) -> None:
    """``--distill`` from ``--teacher`` (:mod:`petune.train.distill`, :mod:`petune.train.teacher`)."""
    g = parser.add_argument_group("distillation from a teacher (petune.train.distill)")
    g.add_argument("--distill", choices=["margin-mse", "kl"], help="add a distillation loss over each example's "
                   "passages: Margin-MSE or listwise KL against --teacher's scores (or the training file's)")
    g.add_argument("--teacher", help="a sentence-transformers model (name or path, e.g. all-mpnet-base-v2) that "
                   "scores the training pairs once, before training (cached in --cache-dir)")
    g.add_argument("--teacher-kind", default="bi-encoder", choices=["bi-encoder", "cross-encoder"])
    g.add_argument("--teacher-length", type=int, default=256, help="the teacher's max tokens per text")
    g.add_argument("--distill-weight", type=float, default=1.0)
    g.add_argument("--contrastive-weight", type=float, default=1.0, help="weight of the contrastive loss beside "
                   "the distillation one (0: the teacher alone)")
    g.add_argument("--student-temperature", type=float, help="kl: the student's temperature (default 1 / --scale)")
    g.add_argument("--teacher-temperature", type=float, help="kl: the teacher's temperature (default the "
                   "student's; a cross-encoder's logits want about 1)")


def check_distill_args(args) -> None:
    """Refuse option mixes that would train something other than asked, before anything is written."""
    if args.teacher and not args.distill:
        raise JobError("--teacher is only used with --distill margin-mse|kl")
    if args.distill and not args.teacher and not getattr(args, "train_file", None):
        raise JobError("--distill needs teacher scores: give --teacher (a sentence-transformers model), or a "
                       "--train-file whose lines carry pos_scores / neg_scores")
    if getattr(args, "mine_negatives", 0) and args.distill and not args.teacher:
        raise JobError("--mine-negatives with --distill needs --teacher: mined negatives have no file scores")


def teacher_from_args(args):
    """The :class:`petune.train.teacher.Teacher` of ``--teacher`` (loaded on first use), or ``None``."""
    if not args.teacher:
        return None
    from petune.train.teacher import cross_encoder_teacher, sentence_transformer_teacher

    if args.teacher_kind == "cross-encoder":
        return cross_encoder_teacher(args.teacher, max_length=args.teacher_length)
    return sentence_transformer_teacher(args.teacher, max_length=args.teacher_length)


def distill_options(args) -> dict:
    """:class:`petune.train.DPRLoss`'s distillation keywords from the command line."""
    if not args.distill:
        return {}
    return dict(distill=args.distill, distill_weight=args.distill_weight, contrastive_weight=args.contrastive_weight,
                student_temperature=args.student_temperature, teacher_temperature=args.teacher_temperature)


#: from this many passages on, the store path (disk, chunks) replaces the in-memory one: up to 10⁵
#: both take about the same time (benchmarks/kb_scale.py) and the in-memory one writes nothing
STORE_FROM = 100_000


def add_index_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("dense index (petune.encode_to_store, petune.score.build_index)")
    g.add_argument("--index-factory", default="Flat", help="faiss factory string: 'Flat' (exact) or e.g. "
                   "'IVF16384,PQ64'")
    g.add_argument("--index-params", help="faiss search parameters, e.g. 'nprobe=64' (IVF lists visited)")
    g.add_argument("--index-train-size", type=int, help="rows an IVF / PQ index is trained on (default: 40 per "
                   "centroid, FAISS's advice)")
    g.add_argument("--store-from", type=int, default=STORE_FROM, help="collections of at least this many passages "
                   "are encoded to an on-disk store in chunks (resumable, bounded memory); smaller ones in memory; "
                   "0: always the store")
    g.add_argument("--store-dtype", default="float32", choices=["float32", "float16"],
                   help="embedding store dtype (float16 halves the disk)")
    g.add_argument("--store-chunk-size", type=int, default=16384, help="passages per store chunk (the work a kill "
                   "loses per process)")
    g.add_argument("--keep-tuned-store", action="store_true", help="keep the tuned model's embedding store (and its "
                   "index) in --cache-dir after its test search; by default it is removed then (18-37 GB at 10⁷ "
                   "passages, and no later run can reuse it). The frozen model's store is always kept: every run "
                   "with the same model and collection reuses it")


#: stores this process searched with keep_store=True (the frozen model's): never removed by a later call
_KEPT_STORES: set = set()


def dense_run(model, tokenizer, passages, queries: dict, args, cache, *, query_length: int, images=None,
              column: str = "passage", query_prefix: str = "", passage_prefix: str = "", normalize: bool = False,
              keep_store: bool = True):
    """The run of a dense model over a collection: every process encodes its share of the passages
    (``passages[column]``, a ``datasets.Dataset``) and of the queries (``{id: text}``, with their
    image features ``images[id]`` when given), with their prefixes and ``normalize`` (cosine
    similarity); the main process gets the ``ranx.Run`` (the others ``None``). Documents are named
    by their row numbers.

    At least ``--store-from`` passages: each process encodes its chunks to an embedding store in
    ``cache``/stores (named by the encoder's key and the collection's fingerprint, so a rerun reuses
    or continues it, and another collection never meets it), the index is
    built from the store, and with ``"Flat"`` every process searches its own chunks. Fewer: the
    passages are encoded in memory, gathered on the main process and indexed there.

    ``keep_store=False``: the store (and its index) is removed once every process has searched it
    (a tuned model's: no later run has the same weights).

    A query-side model (``attach(..., sides="query")``) encodes only the queries: its passages
    are the frozen base's, so the frozen model's cached embeddings or store serve it (the log
    says how many store chunks were encoded now and how many were reused), and that store is kept."""
    from petune.embed import encode_sharded, side_model

    qids = list(queries)
    q = encode_sharded(model, tokenizer, [queries[i] for i in qids], max_length=query_length, cache_dir=cache,
                       images=None if images is None else [images[i] for i in qids], gather_to="all",
                       prefix=query_prefix, normalize=normalize, side=encode_side(model, "query"))
    with side_model(model, encode_side(model, "passage")) as encoder:  # query-side: the frozen base
        return _passage_search(encoder, tokenizer, passages, q, qids, args, cache, column, passage_prefix, normalize,
                               keep_store or encoder is not model)


def _passage_search(model, tokenizer, passages, q, qids, args, cache, column, passage_prefix, normalize, keep_store):
    from petune.data.stream import RowIds
    from petune.dist import process_state
    from petune.embed import encode_sharded
    from petune.score import DenseIndex, ExactStoreIndex, build_index

    k = min(100, len(passages))
    options = {"max_length": args.passage_length, "prefix": passage_prefix, "normalize": normalize}
    if len(passages) < args.store_from:
        vecs = encode_sharded(model, tokenizer, list(passages[column]), cache_dir=cache, **options)
        if vecs is None:
            return None
        return DenseIndex(vecs, RowIds(len(passages)), factory=args.index_factory).search(q, qids, k=k)
    store, where = _passage_store(model, tokenizer, passages, args, cache, column, options)
    state = process_state()
    if args.index_factory == "Flat":
        run = ExactStoreIndex(store).search(q, qids, k=k, sharded=True)
    elif state.is_main_process:
        index = build_index(store, args.index_factory, train_size=args.index_train_size, seed=args.seed,
                            search_params=args.index_params)
        run = index.search(q, qids, k=k)
    else:
        run = None
    if keep_store:
        _KEPT_STORES.add(where)
    elif where not in _KEPT_STORES:  # a tuned model with the frozen one's weights keeps the frozen store
        state.wait_for_everyone()  # every process has searched it
        if state.is_main_process:
            log.info("removing the tuned model's store %s (--keep-tuned-store keeps it)", where)
            shutil.rmtree(where)
    return run


def _passage_store(model, tokenizer, passages, args, cache, column, options):
    """The collection's embedding store by ``model`` (encoded now where it is not yet), named by the
    encoder and the collection: a second collection with the same model and cache gets its own."""
    import petune
    from petune.cache import collection_fingerprint
    from petune.dist import process_state
    from petune.embed import encoder_key

    where = (Path(cache) / "stores"
             / f"passages-{encoder_key(model, tokenizer, options)}-{collection_fingerprint(passages, column)}")
    store = petune.encode_to_store(model, tokenizer, passages, where, column=column, dtype=args.store_dtype,
                                   chunk_size=args.store_chunk_size, **options)
    log.info("passage store %s: %d chunk(s) encoded now by process %d, %d found encoded", where.name,
             len(store.last_run["encoded"]), process_state().process_index, store.last_run["reused"])
    return store, where


@contextlib.contextmanager
def mining_index(model, tokenizer, passages, args, cache, *, column: str = "passage", passage_prefix: str = "",
                 normalize: bool = False):
    """The index :class:`petune.train.mining.NegativeMiner` searches, on the main process (``None``
    on the others): the passages as :func:`dense_run` encodes them, by the model's passage side.
    A query-side model's passages are the frozen model's: its cached embeddings or store serve
    every round. A tuned passage side is encoded again each round (in memory, or to a store that is
    removed after the round)."""
    from petune.dist import process_state
    from petune.embed import side_model
    from petune.score import ExactStoreIndex
    from petune.train.mining import memory_index

    options = {"max_length": args.passage_length, "prefix": passage_prefix, "normalize": normalize}
    state = process_state()
    with side_model(model, encode_side(model, "passage")) as encoder:
        frozen = encoder is not model or not getattr(model, "tuned_parameters", dict)()
        if len(passages) < args.store_from:
            with memory_index(encoder, tokenizer, passages[column], cache_dir=cache if frozen else None,
                              **options) as index:
                yield index
            return
        store, where = _passage_store(encoder, tokenizer, passages, args, cache, column, options)
        try:
            yield ExactStoreIndex(store) if state.is_main_process else None
        finally:
            if not frozen and where not in _KEPT_STORES:
                state.wait_for_everyone()
                if state.is_main_process:
                    shutil.rmtree(where, ignore_errors=True)


class JobError(ValueError):
    """A mistake in a job's input or options that the user fixes; :func:`job_main` prints it and exits 2."""


class RunMismatch(JobError):
    """--resume on an output dir whose run was started with other options."""


class Job(NamedTuple):
    """What :func:`job_main` hands a recipe's body.

    ``args``: the parsed options; ``state``: the process state; ``out_dir``: ``args.output_dir``;
    ``started``: ``time.time()`` at the start; ``command``: the command line, for reports and cards.
    """

    args: Any
    state: Any
    out_dir: Path
    started: float
    command: str


def configure_logging(verbose: bool = False) -> None:
    """A job's log: petune's own lines (its stages, what it caches and reuses) at INFO, other
    libraries' at WARNING — faiss's loader attempts, Accelerate's line per checkpoint file,
    adapters' "Adding adapter" — unless ``verbose``, which shows every library's INFO lines."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger().setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("petune").setLevel(logging.INFO)


def job_main(parse):
    """Make a recipe's ``main(argv=None)`` from ``body(job: Job)``, parsing ``argv`` with ``parse``.

    Logs petune's lines at INFO (:func:`configure_logging`; ``--verbose``: every library's) and
    turns the user's mistakes into one line: :class:`JobError` (and
    :class:`RunMismatch`), :class:`petune.data.files.DataError`,
    :class:`petune.data.viquae.MissingDataError` and :class:`petune.store.StoreError` raised by
    ``body`` are printed as ``error: ...`` on stderr and ``main`` returns exit status 2; raise them
    before the job writes anything it could not finish. Any other exception propagates with its
    traceback. ``--collective-timeout`` (minutes), when the recipe has it, sets the process
    group's timeout before the group starts.
    """
    from petune.data.files import DataError
    from petune.data.viquae import MissingDataError
    from petune.dist import process_state
    from petune.store import StoreError

    def decorate(body):
        @functools.wraps(body)
        def main(argv=None):
            args = parse(argv)
            configure_logging(getattr(args, "verbose", False))
            if getattr(args, "collective_timeout", None) is not None:
                if not args.collective_timeout > 0:
                    print(f"error: --collective-timeout must be positive, got {args.collective_timeout}",
                          file=sys.stderr)
                    return 2
                os.environ["PETUNE_COLLECTIVE_TIMEOUT"] = str(args.collective_timeout * 60)
            try:
                command = " ".join([f"recipes/{Path(inspect.getfile(body)).name}",
                                    *(sys.argv[1:] if argv is None else argv)])
                return body(Job(args, process_state(), Path(args.output_dir), time.time(), command))
            except (JobError, DataError, MissingDataError, StoreError) as e:
                print(f"error: {e}", file=sys.stderr)
                return 2

        return main

    return decorate


def start_run(args, out_dir: Path, checkpoint_dirs: list[Path], state) -> str | None:
    """Prepare ``out_dir`` for a run on every process; returns the Trainer's ``resume_from``.

    With ``--resume``: checks that ``out_dir``'s run was started with the same options (those
    outside :data:`NOT_RUN_IDENTITY`) and returns ``"latest"`` (a run with no checkpoint yet
    starts from scratch, and says so). Without: removes ``checkpoint_dirs`` left by an earlier run
    (they would mix with this run's) and records this run's options.

    Raises:
        RunMismatch: ``--resume`` with options that differ from the recorded ones (names them).
    """
    options = json.loads(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in NOT_RUN_IDENTITY}))
    file = out_dir / RUN_OPTIONS
    if args.resume and file.exists():
        saved = json.loads(file.read_text())
        diff = {k: (saved.get(k), options.get(k)) for k in sorted(set(saved) | set(options))
                if saved.get(k) != options.get(k)}
        if diff:
            raise RunMismatch(f"--resume: {out_dir} holds a run started with other options, (then, now) = {diff}. "
                              "Rerun with the same options, or drop --resume to start afresh.")
    state.wait_for_everyone()  # everyone has read the file before the main process writes it
    if state.is_main_process:
        if not args.resume:
            for d in checkpoint_dirs:
                if d.exists():
                    log.info("starting afresh: removing %s from an earlier run (pass --resume to continue it)", d)
                    shutil.rmtree(d)
        out_dir.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(options, indent=1))
    state.wait_for_everyone()
    if not args.resume:
        return None
    if not any(d.glob("step-*") for d in checkpoint_dirs if d.exists()):
        log.info("--resume: no checkpoint in %s yet; starting from scratch", out_dir)
    return "latest"


def cache_dir(args) -> Path:
    return Path(args.cache_dir) if args.cache_dir else Path(args.output_dir) / "cache"


def method_options(args) -> dict:
    if args.method == "adapter":
        if args.d is None and args.reduction_factor is None:
            return {"reduction_factor": 8, "placement": args.placement}
        size = {"d": args.d} if args.d is not None else {"reduction_factor": args.reduction_factor}
        return {**size, "placement": args.placement}
    if args.method == "lora":
        return {"r": args.r, "alpha": args.alpha}
    if args.method == "prompt":
        return {"num_virtual_tokens": args.num_virtual_tokens}
    return {}


def load_model(name_or_path: str | None):
    """(model, tokenizer): the packaged offline MiniLM BERT2BERT when ``name_or_path`` is None,
    else any Hugging Face seq2seq model (hub id or local path)."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    if name_or_path is None:
        from petune.data.packaged import minilm_encoder_decoder, minilm_path

        return minilm_encoder_decoder(), AutoTokenizer.from_pretrained(minilm_path())
    return AutoModelForSeq2SeqLM.from_pretrained(name_or_path), AutoTokenizer.from_pretrained(name_or_path)


def write_report(output_dir: Path, markdown: str, data: dict) -> None:
    """``report.md`` and ``report.json`` in ``output_dir``, each written to a temp file and renamed;
    the markdown is printed too."""
    from petune.atomic import atomic_write

    for name, text in (("report.md", markdown), ("report.json", json.dumps(data, indent=2))):
        atomic_write(output_dir / name, lambda f, text=text: f.write(text.encode()))
    print(markdown)


def write_model_card(directory: Path, tuned, command: str, scores_markdown: str, *, base: str | None,
                     encodings: dict[str, dict], datasets: list[str] | None = None) -> None:
    """``README.md`` (a Hugging Face model card) beside the tuned parameters a recipe saved: base
    model, method, trainable parameters, the run's scores with its command, and a usage block that
    runs as written from that folder on another machine: the base built as the recipe built it
    (``base``: ``--model``, ``None`` for the packaged MiniLM), ``petune.load``, and
    ``petune.encode`` with the settings the scores were measured with (``encodings``:
    ``{"queries": {...}, "passages": {...}}``, see :func:`petune.card.usage_code`)."""
    from petune.card import model_card, usage_code, write_card

    usage = usage_code(base, encodings)
    write_card(directory, model_card(tuned, scores_markdown=scores_markdown, command=command, usage=usage, base=base,
                                     datasets=datasets))


def encode_settings(max_length: int, prefix: str = "", normalize: bool = False, pooling: str = "mean",
                    task: str | None = None, side: str | None = None) -> dict:
    """``petune.encode`` keyword options as a card shows them: those that differ from its defaults."""
    options = {"max_length": max_length, "prefix": prefix, "normalize": normalize, "pooling": pooling, "task": task,
               "side": side}
    defaults = {"prefix": "", "normalize": False, "pooling": "mean", "task": None, "side": None}
    return {k: v for k, v in options.items() if k not in defaults or v != defaults[k]}
