"""``attach`` and the tuned model it returns: frozen base, trainable method, task switching."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
from torch import nn

from .models import check_encoder_decoder
from .parts import SHARED, Part
from .methods.registry import get_method

#: the two sides of retrieval: queries and passages
NAMED_SIDES = ("query", "passage")
#: the sides an encode or a training group names: a query, a passage, or neither (symmetric use)
SIDES = (*NAMED_SIDES, None)
#: ``attach``'s ``sides``: None (symmetric), "query" (passages are the frozen base), "separate" (a module per side)
SIDE_SETTINGS = (None, "query", "separate")


def side_module(module: str, side: str) -> str:
    """The name of ``module``'s ``side`` module on a model with separate sides (``"news-query"``).
    Unique: the suffix is one of two fixed words, so two (module, side) pairs never share a name."""
    return f"{module}-{side}"


def is_task_list(task) -> bool:
    """``task`` names one task per row (a list or tuple) rather than one task for the batch."""
    return isinstance(task, (list, tuple))


@dataclass
class TrainableReport:
    """What is trainable: counts are numbers of scalar parameters; percent is of ``total``.

    ``total`` counts every parameter of the tuned model (base plus added), like peft's
    ``print_trainable_parameters``.
    """

    method: str
    trainable: int
    total: int
    per_module: dict[str, int] = field(default_factory=dict)
    per_task: dict[str, int] = field(default_factory=dict)
    #: trainable parts beside the method, e.g. ``{"visual embedding": n}`` (in ``trainable``)
    parts: dict[str, int] = field(default_factory=dict)

    @property
    def percent(self) -> float:
        return 100.0 * self.trainable / self.total if self.total else 0.0

    def as_dict(self) -> dict:
        return {"method": self.method, "trainable": self.trainable, "total": self.total,
                "percent": self.percent, "per_module": dict(self.per_module), "per_task": dict(self.per_task),
                "parts": dict(self.parts)}

    def __str__(self) -> str:
        rows = [("all", self.trainable)] + [(part, n) for part, n in self.parts.items()]
        rows += [(f"task {t}", n) for t, n in self.per_task.items()]
        width = max(len(r[0]) for r in rows)
        lines = [f"{self.method}: {self.trainable:,} trainable of {self.total:,} parameters ({self.percent:.4f} %)",
                 f"{'':{width}}  {'trainable':>12}  {'% of total':>10}"]
        lines += [f"{name:{width}}  {n:>12,}  {100.0 * n / self.total:>10.4f}" for name, n in rows]
        return "\n".join(lines)


class TunedModel(nn.Module):
    """A Hugging Face encoder-decoder with a tuning method attached; made by :func:`attach`.

    Attributes:
        model: what the method's library returned (a ``peft.PeftModel``, or the model itself with
            ``adapters`` mixed in). Use it for library-native calls (``save_pretrained``, ``generate``).
        method: the :class:`petune.Method` instance, with its resolved ``options``.
        tasks: task names, in order (``None`` when attached without tasks).
        shared: True when all tasks share one module.
        active_task: the task whose module the next forward uses.
        sides: ``None`` (symmetric), ``"query"`` or ``"separate"`` (:func:`attach`).
        active_side: on a model with separate sides, the side whose module the next forward uses
            (``"query"`` until :meth:`use_side` / :meth:`side` switch it); ``None`` otherwise.
    """

    def __init__(self, model, method, tasks, shared, tuned):
        super().__init__()
        self.model = model
        self.method = method
        self.tasks = tasks
        self.shared = shared
        self._tuned = tuned  # {module: {param name in self.model: Parameter}}
        self._tuned_list = [p for params in tuned.values() for p in params.values()]
        self.active_task = None
        self._active_module = None
        self.extra_parts: dict[str, Part] = {}  # kind → part (petune.parts), added by add_part
        self.sides: str | None = None  # "query": the method tunes queries only, passages are the frozen base
        self.active_side: str | None = None  # sides="separate": the side whose module the next forward uses
        self._side_held = 0  # depth of side() contexts: inside one, encode() may leave side= out
        self._parts = {}  # {part name: {module: {name relative to self: Parameter}}}

    # -- forward ---------------------------------------------------------------------------
    def forward(self, *args, task: str | list[str] | None = None, images: dict | None = None, **kwargs):
        """The base model's forward (with the method applied). ``task=`` switches first.

        With ``images`` (see :meth:`encoder_states`; needs :func:`petune.vision.add_visual`) the
        encoder reads text and visual tokens, and the base model runs on that encoder output with
        the extended mask (``labels`` / ``decoder_input_ids`` as usual): VL-T5's generative setting.
        ``input_ids`` and ``attention_mask`` must then be keywords.

        ``task`` may be a list, one task per row: each row goes through its own task's module
        (:meth:`routed`; keyword arguments only, no cache is returned). The loss is then the token
        mean over the whole batch, as without routing.
        """
        if is_task_list(task):
            if args:
                raise TypeError("with one task per row, pass the inputs as keyword arguments")
            kwargs["use_cache"] = False  # caches cannot be split into rows
            return self.routed(task, self._forward_on_encoder, images=images, **kwargs)
        if task is not None:
            self.use_task(task)
        if images is None:
            return self.model(*args, **kwargs)
        return self._forward_on_encoder(*args, images=images, **kwargs)

    def _forward_on_encoder(self, *args, images=None, **kwargs):
        """The base model on petune's encoder output (the method's, with visual tokens if any)."""
        out, mask = self._encode_with_images(args, kwargs, images)
        return self.base_model(encoder_outputs=out, attention_mask=mask, **kwargs)

    def generate(self, *args, task: str | None = None, images: dict | None = None, **kwargs):
        """``generate`` of the library's model, or, with ``images``, of the base model on the
        encoder output with visual tokens (``input_ids`` / ``attention_mask`` as keywords).

        Raises:
            TypeError: ``task`` is a list (generation takes one task per call).
        """
        if is_task_list(task):
            raise TypeError("generate takes one task per call; group the rows by task, or use "
                            "tuned(..., task=[...]) / encoder_states(..., task=[...]) for one task per row")
        if task is not None:
            self.use_task(task)
        if images is None:
            return self.model.generate(*args, **kwargs)
        out, mask = self._encode_with_images(args, kwargs, images)
        return self.base_model.generate(encoder_outputs=out, attention_mask=mask, **kwargs)

    def _encode_with_images(self, args, kwargs, images):
        if args or "input_ids" not in kwargs or "attention_mask" not in kwargs:
            raise TypeError("with images or one task per row, pass input_ids= and attention_mask= as keyword "
                            "arguments")
        return self.encoder_output(kwargs.pop("input_ids"), kwargs.pop("attention_mask"), images=images)

    def encoder_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, task: str | None = None,
                       images: dict | None = None):
        """Encoder output with the method applied.

        Args:
            input_ids, attention_mask: ``[batch, seq]``.
            task: switch to this task first (multi-task models); or a list, one task per row:
                each row through its own task's module (:meth:`routed`), rows in input order.
            images: visual input ``{"features": [batch, regions, feat_dim], "boxes": [batch,
                regions, 4], "mask": [batch, regions]}`` (from :func:`petune.regions.image_batch`);
                needs :func:`petune.vision.add_visual`. Each row's visual tokens follow its text.

        Returns:
            ``(states, mask)``: ``[batch, seq', d_model]`` and ``[batch, seq']``, where
            ``seq' = num_virtual_tokens + seq`` under prompt tuning (the mask covers the prompt),
            plus the visual tokens when ``images`` is given.

        Raises:
            ValueError: ``images`` on a model without a visual embedding.
        """
        out, mask = self.encoder_output(input_ids, attention_mask, task=task, images=images)
        return out.last_hidden_state, mask

    def encoder_output(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       task: str | list[str] | None = None, output_hidden_states: bool = False,
                       images: dict | None = None):
        """Like :meth:`encoder_states`, but returns the encoder's ``BaseModelOutput`` (with
        per-layer ``hidden_states`` when ``output_hidden_states``) and the mask."""
        if is_task_list(task):
            return self.routed(task, lambda ids, mask, imgs: self.encoder_output(
                ids, mask, output_hidden_states=output_hidden_states, images=imgs), input_ids, attention_mask, images)
        if task is not None:
            self.use_task(task)
        if images is None:
            return self.method.encoder_output(self.model, input_ids, attention_mask, output_hidden_states)
        part = self.part_for("images")
        extra = part.tokens(part.key(self.active_task), images, self.base_model)
        text_lengths = attention_mask.sum(1) + self.method.prefix_length()  # the part's tokens follow these
        with part.encoder_context(self.base_model, text_lengths):
            return self.method.encoder_output(self.model, input_ids, attention_mask, output_hidden_states,
                                              extra=extra)

    def after_pooling(self, pooled: torch.Tensor) -> torch.Tensor:
        """``pooled [batch, d]`` through each part's :meth:`~petune.parts.Part.after_pooling`
        (a projection head: ``[batch, dim]``), with the active task's modules."""
        for part in self.extra_parts.values():
            pooled = part.after_pooling(part.key(self.active_task), pooled)
        return pooled

    def part_for(self, input_key: str) -> Part:
        """The added part that reads ``input_key`` (``"images"``: the visual embedding).

        Raises:
            ValueError: no part reads it (says how to add one).
        """
        for part in self.extra_parts.values():
            if part.input_key and part.input_key == input_key:
                return part
        raise ValueError(f"{input_key} need a part that reads them (for images: a visual embedding, "
                         "petune.vision.add_visual(tuned, ...)); this model has "
                         f"{[p.label for p in self.extra_parts.values()] or 'none'}")

    @contextlib.contextmanager
    def frozen_base(self):
        """Context manager giving the base model with the method switched off
        (:meth:`petune.Method.disabled`): what the frozen passage side of a query-side model
        (``attach(..., sides="query")``) computes. Parts (a visual embedding, a projection head)
        are not applied through it."""
        base = self.base_model
        with self.method.disabled(self.model):
            # while off, the base's weights are the frozen model's: the cache keys it as that model
            base._petune_method_tensors = {id(p) for p in self._tuned_list}
            try:
                yield base
            finally:
                del base._petune_method_tensors

    def is_frozen_side(self, side: str | None) -> bool:
        """Whether encoding ``side`` (``"query"``, ``"passage"`` or ``None``) runs the frozen base:
        the passage side of a query-side model.

        Raises:
            ValueError: ``side`` is not one of those.
        """
        if side not in SIDES:
            raise ValueError(f"side must be 'query', 'passage' or None, got {side!r}")
        return self.sides == "query" and side == "passage"

    def switches_side(self, side: str | None) -> bool:
        """Whether encoding ``side`` needs a module other than the active one: a model with
        separate sides whose :attr:`active_side` is not ``side`` (``None``: the active side)."""
        return self.sides == "separate" and side not in (None, self.active_side)

    @property
    def base_model(self) -> nn.Module:
        """The underlying Hugging Face model (with the method's layers injected)."""
        return self.method.base_model(self.model)

    @property
    def config(self):
        return self.base_model.config

    # -- tasks -----------------------------------------------------------------------------
    def module_for(self, task: str | None, side: str | None = None) -> str:
        """The module ``task`` routes to; on a model with separate sides, its ``side``'s module
        (default :attr:`active_side`).

        Raises:
            ValueError: an unknown task, ``None`` on a model with one module per task, or a side
                other than ``"query"`` / ``"passage"`` on a model with separate sides.
        """
        if task is None:
            if self.tasks is not None and not self.shared:
                raise ValueError(f"this model has one module per task; name one of {self.tasks}")
            module = SHARED
        elif self.tasks is None or task not in self.tasks:
            known = self.tasks if self.tasks is not None else "none (attached without tasks=)"
            raise ValueError(f"unknown task {task!r}; tasks: {known}")
        else:
            module = SHARED if self.shared else task
        if self.sides != "separate":
            return module
        side = side or self.active_side
        if side not in NAMED_SIDES:
            raise ValueError(f"this model has a module per side: name the side, 'query' or 'passage' (got {side!r})")
        return side_module(module, side)

    def use_side(self, side: str) -> None:
        """On a model with separate sides (``attach(..., sides="separate")``), route the next
        forwards through ``side``'s module of the active task. A no-op on other models, whose
        sides share the method (or, for ``sides="query"``, whose passage side
        :meth:`frozen_base` gives).

        Raises:
            ValueError: ``side`` is not ``"query"`` or ``"passage"``.
        """
        if side not in NAMED_SIDES:
            raise ValueError(f"side must be 'query' or 'passage', got {side!r}")
        if self.switches_side(side):
            self.active_side = side
            self.use_task(self.active_task)

    @contextlib.contextmanager
    def side(self, side: str | None):
        """Context manager: ``with tuned.side("passage"): ...`` then switch back (:meth:`use_side`);
        ``None`` leaves the side as it is. Inside it, :func:`petune.encode` may leave ``side=`` out
        (the side is then this one), so code written for one model encodes either side."""
        previous = self.active_side
        if side is not None:
            self.use_side(side)
        self._side_held += 1
        try:
            yield self
        finally:
            self._side_held -= 1
            if previous is not None and previous != self.active_side:
                self.use_side(previous)

    def use_task(self, task: str | None) -> None:
        """Route the next forwards through ``task``'s module (a no-op switch when shared).

        Every task's parameters stay trainable (peft's ``set_adapter`` freezes the inactive ones;
        petune turns them back on so one optimizer holds all tasks).

        Raises:
            ValueError: unknown task, or ``None`` on a model with one module per task.
        """
        module = self.module_for(task)
        if module != self._active_module:
            self.method.activate(self.model, module)
            self._active_module = module
            for p in self._tuned_list:  # libraries only flip their own modules' flags
                p.requires_grad_(True)
        self.active_task = task

    @contextlib.contextmanager
    def task(self, task: str | None):
        """Context manager: ``with tuned.task("vqa"): ...`` then switch back."""
        previous = self.active_task
        self.use_task(task)
        try:
            yield self
        finally:
            if previous is not None:
                self.use_task(previous)

    def routed(self, tasks: list[str], fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` with each row of the batch through its own task's module.

        Args:
            tasks: one task name per row (``len(tasks)`` = the batch size of ``args`` / ``kwargs``).
            fn: the call to route; it must not switch tasks itself.
            args, kwargs: its inputs; every tensor whose first dimension is the batch is split by
                row (image dicts and other nestings included).

        Rows are grouped by module (stable), ``fn`` runs once under the method's mixed-batch
        mechanism (:meth:`petune.Method.route`: peft's ``adapter_names`` for LoRA, the adapters
        library's ``BatchSplit``, per-row prompts) or, where the method has none, once per
        module's rows; results return in input order. Equal, within float tolerance, to running
        each task's rows separately.

        Raises:
            ValueError: ``tasks`` not one per row, or an unknown task.
            NotImplementedError: the method does not support per-example routing
                (``Method.routing`` is ``None``) and the rows need several modules.
        """
        from .routing import concat_rows, group_rows, take_rows, tensors_in

        modules = [self.module_for(t) for t in tasks]
        batch = len(tasks)
        rows = {t.shape[0] for t in tensors_in((args, kwargs)) if t.dim()}
        if batch not in rows:
            raise ValueError(f"task lists one task per row: got {batch} tasks for a batch of {sorted(rows)} rows")
        if len(set(modules)) == 1:
            with self.task(tasks[0]):
                return fn(*args, **kwargs)
        if self.method.routing is None:
            raise NotImplementedError(f"method {self.method.name!r} does not support one task per row; call it "
                                      "once per task (or set routing = 'split' on the Method if activate() "
                                      "switches modules)")
        order, groups = group_rows(modules)
        index = torch.tensor(order)
        inputs = take_rows((args, kwargs), index, batch)
        previous = self.active_task
        row_modules = [m for m, n in groups for _ in range(n)]
        per_task_part = any(part.per_task for part in self.extra_parts.values())
        try:  # a part per task: the rows' extra tokens come from different modules, so split
            native = None if per_task_part else self.method.route(self.model, row_modules)
            if native is not None:
                with native:
                    out = fn(*inputs[0], **inputs[1])
            else:
                parts, sizes, start = [], [], 0
                labels = inputs[1].get("labels")
                for module, n in groups:
                    part = torch.arange(start, start + n)
                    self.use_task(next(t for t, m in zip(tasks, modules) if m == module))
                    sub_args, sub_kwargs = take_rows(inputs, part, batch)
                    parts.append(fn(*sub_args, **sub_kwargs))
                    sizes.append(int((labels[start:start + n] != -100).sum()) if torch.is_tensor(labels) else n)
                    start += n
                out = concat_rows(parts, sizes)
        finally:
            self.use_task(previous)
        return take_rows(out, torch.argsort(index), batch)

    # -- parameters ------------------------------------------------------------------------
    def tuned_parameters(self, module: str | None = None) -> dict[str, nn.Parameter]:
        """``{name: parameter}`` of everything trained: the method's (names relative to ``.model``)
        and added parts' (names starting ``petune_<kind>.``, e.g. the visual embedding's
        ``petune_visual.``); all modules, or one."""
        groups = [self._tuned, *self._parts.values()]
        if module is not None:
            return {n: p for g in groups for n, p in g.get(module, {}).items()}
        return {n: p for g in groups for params in g.values() for n, p in params.items()}

    def task_parameters(self, task: str) -> dict[str, nn.Parameter]:
        """The parameters ``task`` trains (all shared ones when ``shared``; both sides' modules
        on a model with separate sides)."""
        params = {}
        for side in (NAMED_SIDES if self.sides == "separate" else (None,)):
            params.update(self._tuned[self.module_for(task, side)])
        for part in self.extra_parts.values():
            params.update(self._parts[part.label][part.key(task)])
        return params

    def add_part(self, part: Part) -> None:
        """Add a trainable part beside the method (:mod:`petune.parts`): it becomes the submodule
        ``petune_<kind>`` (on the base model's device), trains with the method, has its row in
        :meth:`trainable_report`, and is saved and re-added by :func:`petune.save` / :func:`petune.load`.

        Raises:
            ValueError: the model has a part of that kind already, or a per-task part on a model
                without tasks.
        """
        if part.kind in self.extra_parts:
            raise ValueError(f"this model already has a {part.label}")
        if part.per_task and set(part) != set(self.tasks or []):
            raise ValueError(f"a per-task {part.label} needs one module per task of the model ({self.tasks})")
        part.to(next(self.base_model.parameters()).device)
        setattr(self, f"petune_{part.kind}", part)
        self.extra_parts[part.kind] = part
        params = {m: {f"petune_{part.kind}.{m}.{n}": p for n, p in part[m].named_parameters()} for m in part}
        self._parts[part.label] = params
        new = [p for ps in params.values() for p in ps.values()]
        for p in new:
            p.requires_grad_(True)
        self._tuned_list = self._tuned_list + new

    def _set_trainable(self) -> None:
        for p in self.model.parameters():
            p.requires_grad_(False)
        for p in self.tuned_parameters().values():
            p.requires_grad_(True)

    def trainable_report(self) -> TrainableReport:
        """Counts of trainable parameters, overall and per task; ``print()`` it for a table."""
        per_module = {m: sum(p.numel() for p in ps.values()) for m, ps in self._tuned.items()}
        parts = {name: sum(p.numel() for ps in g.values() for p in ps.values()) for name, g in self._parts.items()}
        per_task = {t: sum(p.numel() for p in self.task_parameters(t).values()) for t in (self.tasks or [])}
        total = sum(p.numel() for p in self.model.parameters()) + sum(parts.values())
        return TrainableReport(self.method.name, sum(per_module.values()) + sum(parts.values()), total,
                               per_module, per_task, parts)


def base_of(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a :class:`TunedModel`, or ``model`` itself."""
    return model.base_model if isinstance(model, TunedModel) else model


def _check_tasks(tasks) -> list[str] | None:
    if tasks is None:
        return None
    if isinstance(tasks, str) or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"tasks must be a list of task names, e.g. tasks=['vqa', 'gqa']; got {tasks!r}")
    tasks = list(tasks)
    if not tasks:
        raise ValueError("tasks is empty; pass at least one task name or leave tasks=None")
    if len(set(tasks)) != len(tasks):
        raise ValueError(f"task names must be unique, got {tasks}")
    for t in tasks:
        if not t or not t.replace("_", "").replace("-", "").isalnum() or t == SHARED:
            raise ValueError(f"task name {t!r} must be letters, digits, '_' or '-' (and not {SHARED!r})")
    return tasks


def attach(model: nn.Module, method: str, *, tasks=None, shared: bool | None = None, sides: str | None = None,
           **options) -> TunedModel:
    """Attach a registered tuning method to a Hugging Face encoder-decoder and freeze the rest.

    Args:
        model: any ``transformers`` encoder-decoder — every ``AutoModelForSeq2SeqLM`` architecture
            (T5, mT5, BART, Pegasus, Marian, M2M100, LED, ...; the README's support matrix) and
            ``EncoderDecoderModel``; the ``*ForConditionalGeneration`` class or the bare model.
            It is modified in place (layers injected, base parameters frozen).
        method: a name from :func:`petune.methods` (``"prompt"``, ``"adapter"``, ``"ia3"``, ``"lora"``
            or one registered with :func:`petune.register_method`).
        tasks: task names. With ``shared=False`` (the default when ``tasks`` is given) each task
            gets its own module — VL-Adapter's "multiple" setting; with ``shared=True`` one module
            serves all tasks ("single").
        sides: ``None`` (default): queries and passages share the method (symmetric, as DPR's
            shared encoder); ``"query"``: the method tunes the query side only and passages are
            encoded by the frozen base (:meth:`TunedModel.frozen_base`) — so a collection encoded
            once with the frozen model serves every query-side model (the same store and cache
            key), and training encodes passages without gradients; ``"separate"``: one backbone
            with a module per side (and per task), queries through the query module and passages
            through the passage module, both trained (Semi-Siamese bi-encoders, Jung et al.,
            WWW 2022; DPR's two encoders at the cost of a second module; sentence-transformers'
            asymmetric ``Router``). With either, encoding says its side:
            ``petune.encode(..., side="query" | "passage")``, and a plain forward uses the query
            module unless :meth:`TunedModel.side` switches it.
        **options: the method's options (see each method's docstring).

    Returns:
        :class:`TunedModel` whose only trainable parameters are the method's.

    Raises:
        ValueError: unknown method (lists the registered ones), bad options, bad task names,
            ``shared=False`` without tasks, per-task modules for a method that cannot have them,
            ``sides`` other than ``None`` / ``"query"`` / ``"separate"`` (``"query"`` for a method that
            cannot be switched off, ``"separate"`` for one that cannot have several modules), or
            a model that already has a method attached.
        TypeError: ``model`` is not a Hugging Face encoder-decoder.

    Options and the model are validated before the model is touched, so a bad call leaves it as it was.
    """
    cls = get_method(method)
    check_encoder_decoder(model)
    tasks = _check_tasks(tasks)
    if shared is None:
        shared = tasks is None
    if not shared and tasks is None:
        raise ValueError("shared=False needs tasks=[...]: one module per task")
    if not shared and not cls.per_task:
        raise ValueError(f"method {method!r} supports only one shared module; pass shared=True")
    if sides not in SIDE_SETTINGS:
        raise ValueError(f"sides must be None (queries and passages share the method), 'query' (the method "
                         f"tunes queries only; passages are the frozen base) or 'separate' (a module per side), "
                         f"got {sides!r}")
    if sides == "query" and not cls.can_disable:
        raise ValueError(f"method {method!r} cannot be switched off, so it cannot leave the passage side frozen; "
                         "attach it without sides=")
    if sides == "separate" and not cls.per_task:
        raise ValueError(f"method {method!r} supports only one module, so it cannot have one per side; attach it "
                         "without sides= (or sides='query' to tune queries only)")
    instance = cls(**options)
    instance.validate(model)
    modules = [SHARED] if shared else list(tasks)
    if sides == "separate":
        modules = [side_module(m, side) for m in modules for side in NAMED_SIDES]

    base_class = type(model).__name__  # adapters swaps in a "...WithAdapters" subclass
    for p in model.parameters():
        p.requires_grad_(False)
    wrapped = instance.attach(model, modules)
    tuned = {m: {} for m in modules}
    for name, param in wrapped.named_parameters():
        module = instance.module_of(name)
        if module is not None:
            tuned[module][name] = param
    empty = [m for m, ps in tuned.items() if not ps]
    if empty and cls.adds_parameters:
        raise RuntimeError(f"method {method!r} added no parameters for module(s) {empty}; check its module_of()")
    model._petune_attached = True
    model._petune_base_class = base_class
    out = TunedModel(wrapped, instance, tasks, shared, tuned)
    out.sides = sides
    out.active_side = "query" if sides == "separate" else None
    out.use_task(tasks[0] if tasks else None)
    out._set_trainable()  # everything frozen but the method, whatever the library left on
    return out
