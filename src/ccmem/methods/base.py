"""The contract every method follows, and the forward helpers they share.

A method is a dataclass whose fields are its options (the single place they are declared: the training
config, ``ccmem eval -O``, adapter files and ``ccmem methods`` all read them from here). The harness never
asks which method it holds; it reads capability flags (:attr:`Method.trainable`, :attr:`Method.needs_adapter`,
:attr:`Method.uses_positions`, ...) and calls the hooks below.

Life of a method on a model::

    method = get_method("ccm-concat", n_tok=4)
    with method.attached(lm):                        # adds its hooks/modules to the model for this scope only
        memory = method.add_sink(lm, method.new_memory(lm), system_ids)
        memory = method.add(lm, memory, context_ids) # the method cuts the context as it needs
    # the model is exactly as it was before

Trainable state (embeddings, LoRA, an encoder, a classifier head) is one ``nn.Module``, built for a model
by :meth:`Method.build` and reached through :meth:`Method.module_for`; the trainer and the adapter files
handle it without knowing what is inside.
"""

from __future__ import annotations

import dataclasses
import threading
import typing
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ccmem.data.samples import Sample
from ccmem.loading import LoadedModel
from ccmem.memory import Memory, RoomyLayer, concat_positions, positions_for
from ccmem.options import type_name

#: The model each method is attached to right now (weak: a dropped model is forgotten).
_ATTACHED: weakref.WeakKeyDictionary[nn.Module, Method] = weakref.WeakKeyDictionary()
#: One lock per model: threads take turns at it (a thread's forward must not run under another method's hooks).
_MODEL_LOCKS: weakref.WeakKeyDictionary[nn.Module, threading.RLock] = weakref.WeakKeyDictionary()
_MODEL_LOCKS_GUARD = threading.Lock()


class ContextTooLongError(ValueError):
    """The context cannot be read as asked: it would pass the model's maximum position (``positions``: that
    limit), or a method's own limit on what it compresses at once (``positions`` None; the message names the
    option that lifts it)."""

    def __init__(self, message: str, *, positions: int | None = None, fact: str | None = None) -> None:
        super().__init__(message)
        self.positions = positions
        #: What does not fit, without the remedy the message gives a Python caller (``ccmem eval`` gives its own).
        self.fact = fact or message
        self.row: int | None = None  # in a batch (fold_rows, score_batch): the index of the row that does not fit


def model_lock(model: nn.Module) -> threading.RLock:
    """The lock every :meth:`Method.attached` scope on ``model`` holds: re-entrant for the thread holding it, so
    nested scopes work, while another thread waits for the scope to end."""
    with _MODEL_LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


KINDS = ("baseline", "learned", "training-free")


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A method option: a dataclass field with a default and the one-line help ``ccmem methods`` prints."""
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help}, **kwargs)
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


@dataclass(frozen=True)
class OptionSpec:
    """One option of a method, as ``ccmem methods``, ``--show-keys`` and the CLI present it."""

    name: str
    type: Any
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        return type_name(self.type)


@dataclass
class LoRAOptions:
    """The options of a method that trains a LoRA, declared once (CCM, gist and the stage-1 ``full`` share them)."""

    lora_rank: int = option(8, "rank of the LoRA")
    lora_alpha: float = option(16.0, "LoRA scale numerator (the update is scaled by alpha / rank)")
    lora_dropout: float = option(0.0, "dropout on the LoRA input during training")
    lora_targets: tuple[str, ...] | None = option(
        None, "linear layers the LoRA adapts (default: the model family's attention projections)"
    )

    def check_lora_options(self) -> None:
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1 (got {self.lora_rank})")
        if not 0 < self.lora_alpha < float("inf"):  # nan and inf passed `<= 0`, and every key and value was NaN
            raise ValueError(f"lora_alpha must be positive and finite (got {self.lora_alpha})")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if self.lora_targets is not None:
            self.lora_targets = tuple(self.lora_targets)
            if not self.lora_targets:  # it meant the default targets, while the run's config recorded []
                raise ValueError(
                    "lora_targets is empty: name the linear layers to adapt (e.g. [q_proj, v_proj]), or leave it "
                    "unset for the model family's attention projections"
                )


@dataclass
class DecodeState:
    """What the generation loop holds while it decodes; a method's :meth:`Method.decode_step` may change it.

    ``cache`` holds the memory's keys/values followed by those of the query and of the tokens generated so
    far; ``position`` is the position id the next token will get; ``tokens`` the ids generated so far.
    A method may evict entries from ``cache`` or replace it, but must keep ``position`` consistent.
    """

    cache: Any
    position: int
    memory: Memory
    tokens: list[int]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # a method's own bookkeeping while decoding
    #: ``[1, hidden]``: the last layer's output at the last token fed (what the next token is predicted from).
    hidden: torch.Tensor | None = None
    #: Tokens fed by the loop so far (the query, then each generated token but the newest); ``fed[-1]`` is the
    #: token ``hidden`` belongs to.
    fed: list[int] = dataclasses.field(default_factory=list)
    #: Batched loop only: ``[n, hidden]`` embeddings a method asks to feed this row next, with the gated LoRA on
    #: (<COMP> tokens). Set by :meth:`Method.decode_logits_batch`: instead of a token (the row gives none this
    #: step; the next is predicted after them); set from :meth:`Method.feed_after`: right after the row's token.
    feed: torch.Tensor | None = None


@dataclass
class DecodeRows:
    """What the batched loop (:func:`ccmem.generation.decode_batch`) holds: one padded cache for every active
    row, and each row's own :class:`DecodeState` (its ``position``, ``tokens``, ``fed``, ``hidden``, ``extra``;
    its ``cache`` is None, the rows share :attr:`cache`).

    ``attention_mask`` ``[rows, columns]`` is 1 on each row's real cache entries, 0 on padding; it always has as
    many columns as the cache, and a row's real entries are in the order they were written (its newest are its
    last real columns). A method's :meth:`Method.decode_logits_batch` may mark entries dropped in the mask, and
    ask for embeddings to be fed to a row in the next forward (``DecodeState.feed``), in one forward with the
    other rows' tokens.
    """

    cache: Any
    attention_mask: torch.Tensor
    rows: list[DecodeState]

    def compact(self, keep_rows: Sequence[int] | None = None) -> None:
        """Keep only ``keep_rows`` (all if None) and free the columns no kept row uses: every row's real entries
        move to the right, in order, and columns that are padding in every row leave the cache."""
        mask = self.attention_mask.bool()
        if keep_rows is not None:
            index = torch.tensor(list(keep_rows), dtype=torch.long, device=mask.device)
            mask = mask[index]
            self.rows = [self.rows[i] for i in keep_rows]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[index], layer.values[index]
        width = int(mask.sum(dim=1).max()) if mask.numel() else 0
        # A stable sort puts each row's padding first and its real entries after, both in their order.
        order = torch.sort(mask.to(torch.int8), dim=1, stable=True).indices[:, mask.shape[1] - width :]
        self.attention_mask = torch.gather(mask, 1, order).long()
        for layer in self.cache.layers:
            b, h, _, d = layer.keys.shape
            gather = order[:, None, :, None].expand(b, h, width, d)
            layer.keys, layer.values = layer.keys.gather(2, gather), layer.values.gather(2, gather)

    def joined(self, other: DecodeRows, room: int = 0) -> DecodeRows:
        """These rows and ``other``'s (after them) in one batch: each cache left-padded to the wider of the two, so
        every row keeps its entries in order, its newest in the last column. ``room``: entries each layer then
        takes without copying itself (:class:`~ccmem.memory.RoomyLayer`)."""
        ours, theirs = self.attention_mask.shape[1], other.attention_mask.shape[1]
        width, n = max(ours, theirs), len(self.rows)
        mask = self.attention_mask.new_zeros(n + len(other.rows), width)
        mask[:n, width - ours :] = self.attention_mask
        mask[n:, width - theirs :] = other.attention_mask
        cache = Memory().to_cache(room)
        if len(self.cache.layers) != len(other.cache.layers):
            raise ValueError("rows joined into one batch must come from the same model")
        for a, b in zip(self.cache.layers, other.cache.layers, strict=True):
            kv = []
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                # padding is masked out but must be finite (a weight of 0 times NaN is NaN): zeros
                t = x.new_zeros(len(mask), x.shape[1], width + room, x.shape[-1])
                t[:n, :, width - ours : width] = x
                t[n:, :, width - theirs : width] = y
                kv.append(t)
            cache.layers.append(RoomyLayer.holding(kv[0], kv[1], width, room))
        return DecodeRows(cache=cache, attention_mask=mask, rows=[*self.rows, *other.rows])


@dataclass
class Method(ABC):
    """A way to keep context: ``add`` folds new context tokens into a :class:`Memory`.

    Subclasses are dataclasses whose fields are their options (declared with :func:`option`), registered
    under :attr:`name` with :func:`ccmem.registry.register`.
    """

    name: ClassVar[str]
    #: ``baseline`` (full, none), ``learned`` (trained compression) or ``training-free`` (KV eviction).
    kind: ClassVar[str] = "baseline"
    #: The paper the method comes from (``ccmem methods`` prints it).
    paper: ClassVar[str] = ""
    #: The method has trainable state and a training loss (``ccmem train`` accepts it).
    trainable: ClassVar[bool] = False
    #: ``add`` uses trained parameters: without an adapter the method runs untrained, and the harness says so.
    needs_adapter: ClassVar[bool] = False
    #: False where added context does not use up positions (``none``), so no length limit applies to it.
    uses_positions: ClassVar[bool] = True
    #: False where ``add`` drops the context unread (``none``): there is no compression speed to report.
    reads_context: ClassVar[bool] = True
    #: The method reads attention scores (through :mod:`ccmem.patching`) to decide what to keep.
    needs_attention: ClassVar[bool] = False
    #: The method keeps a memory budget (``ratio`` of the context, or ``max_slots``).
    budgeted: ClassVar[bool] = False
    #: The memory holds every context token (``full``): an interaction longer than the model's positions cannot
    #: be re-based to fit, so the harness checks the examples' lengths before any method of a run starts.
    holds_every_token: ClassVar[bool] = False
    #: ``add_batch`` reads several interactions in padded forwards (equal to one at a time), not in a loop.
    batchable: ClassVar[bool] = False
    #: ``decode_batch`` may decode several sessions in one padded forward per step: the method has no per-session
    #: :meth:`decode_step`, and its :meth:`decode_logits_batch` does for a batch what :meth:`decode_logits` does
    #: for one session. False makes it decode them one by one.
    decode_batchable: ClassVar[bool] = True
    #: Options an adapter may have been trained with other values of, without its weights meaning something else.
    runtime_options: ClassVar[frozenset[str]] = frozenset()
    #: Options inherited from a parent class that this method refuses (its :meth:`check_options` says what to use
    #: instead): left out of :meth:`option_specs`, so ``ccmem methods`` and ``--show-keys`` do not offer them.
    unsupported_options: ClassVar[frozenset[str]] = frozenset()
    #: The method also runs on encoder-decoder models (T5): it compresses in the encoder, and the decoder reads
    #: :meth:`encoder_states`. False: decoder-only models only, an encoder-decoder one is refused (:meth:`check_model`).
    encoder_decoder: ClassVar[bool] = False

    def __post_init__(self) -> None:
        self.check_options()
        self._module: nn.Module | None = None
        self._built_for: str | None = None
        #: Hash of the adapter file loaded into :meth:`module_for` ("untrained" until one is).
        self.adapter_hash = "untrained"

    # ------------------------------------------------------------------ options

    def check_options(self) -> None:  # noqa: B027 - optional hook
        """Raise ``ValueError`` naming an option whose value cannot work (called on construction)."""

    def options(self) -> dict[str, Any]:
        """Every option and its value."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def option_specs(cls) -> list[OptionSpec]:
        """The options this method declares, with types, defaults and help."""
        hints = typing.get_type_hints(cls)
        specs = []
        for f in dataclasses.fields(cls):
            if f.name in cls.unsupported_options:
                continue
            factory: Any = f.default_factory
            default = f.default if f.default is not dataclasses.MISSING else factory()
            specs.append(OptionSpec(f.name, hints[f.name], default, f.metadata.get("help", "")))
        return specs

    @classmethod
    def budget_options(cls, keep: float) -> dict[str, Any]:
        """The options that make a :attr:`budgeted` method keep the share ``keep`` of the context
        (``ccmem compare --budgets``); eviction methods call it ``ratio``."""
        return {"ratio": keep}

    @classmethod
    def summary(cls) -> str:
        """The first line of the docstring."""
        return (cls.__doc__ or "").strip().splitlines()[0].replace("``", "")

    # ------------------------------------------------------------------ trainable state

    def build(self, lm: LoadedModel) -> nn.Module | None:
        """Create this method's trainable state for ``lm`` (``None``: nothing to train)."""
        return None

    def module_for(self, lm: LoadedModel) -> nn.Module | None:
        """The trainable state for ``lm``, built on first use; one method instance serves one model."""
        if self._built_for is None:
            self.check_model(lm)
            self._module = self.build(lm)
            if self._module is not None:
                self._module.requires_grad_(False)  # a training recipe turns gradients on for what it trains
                self._module.eval()  # no dropout outside training (the trainer switches it to train mode)
            self._built_for = lm.fingerprint
        elif self._built_for != lm.fingerprint:
            raise ValueError(
                f"this {self.name} method was set up for another model; create a new one with get_method({self.name!r})"
            )
        return self._module

    def warm_start(
        self,
        differing: dict[str, tuple[Any, Any]],
        tensors: dict[str, torch.Tensor],
        fresh: dict[str, torch.Tensor],
    ) -> dict[str, torch.Tensor] | None:
        """Map an adapter's tensors trained with other shape options to this method's shapes, to start a
        training run from (``init_from``). ``differing``: option name -> (the adapter's value, this method's);
        ``fresh``: the tensors of this method's newly built state (for parts the adapter lacks).
        ``None`` (the default): the state cannot be carried over, and the run is refused naming the first
        differing option; raise ``ValueError`` to name the reason yourself."""
        return None

    @classmethod
    def legacy_adapter(
        cls, state: dict[str, torch.Tensor], meta: dict[str, str]
    ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Options and tensors of an adapter file from before the generic format (methods that wrote one)."""
        raise NotImplementedError(f"{cls.name} adapters were never written in the old format")

    # ------------------------------------------------------------------ attach / detach

    def changes_reading(self, lm: LoadedModel) -> bool:
        """Whether reading tokens with a memory (scoring a query, decoding) needs the method attached. Methods
        whose hooks only act while writing memory (gated LoRA at <COMP> tokens, attention captures) say False,
        which spares every decoded token the cost of attaching."""
        return True

    @contextmanager
    def attached(self, lm: LoadedModel, *, reading: bool = False) -> Iterator[None]:
        """Attach to ``lm`` for the scope of the ``with`` block, then leave the model exactly as it was.

        ``reading=True``: the scope only reads with a memory; methods that do not change reading
        (:meth:`changes_reading`) then attach nothing. Re-entrant for the same method; another method attached
        to the same model at the same time in the same thread is refused. Threads sharing a model take turns:
        each scope holds the model's lock (:func:`model_lock`), so one thread's forward never runs under the
        hooks another thread installed.
        """
        self.check_model(lm)
        with model_lock(lm.model):
            if reading and not self.changes_reading(lm):
                yield
                return
            model = lm.model
            current = _ATTACHED.get(model)
            if current is self:
                yield
                return
            if current is not None:
                raise RuntimeError(
                    f"the model is in use by method {current.name!r}; finish that call before using {self.name!r} "
                    "(methods share a model one after another, not at the same time)"
                )
            with ExitStack() as stack:
                _ATTACHED[model] = self
                stack.callback(_ATTACHED.pop, model, None)
                self.install(lm, stack)
                yield

    def check_model(self, lm: LoadedModel) -> None:
        """Refuse a kind of model this method does not run on (an encoder-decoder model, unless
        :attr:`encoder_decoder`; a cache of keys and values of different shapes; logits that are not the LM
        head's), naming the method, the model and what runs on it instead."""
        if lm.is_encoder_decoder and not self.encoder_decoder:
            from ccmem.registry import method_classes

            able = [name for name, cls in method_classes().items() if cls.encoder_decoder]
            raise ValueError(
                f"method {self.name!r} works on decoder-only models, but {lm.name} is an encoder-decoder model "
                f"({lm.model.config.model_type}); on encoder-decoder models use {' or '.join(able)}"
            )
        if (lm.model.config._attn_implementation or "sdpa") in ("sdpa", "eager"):  # else at first use
            lm.kv_shape  # noqa: B018 - refuses keys and values of different shapes (measured once)
            head_scale(lm)  # measured once, before any hook is installed

    def install(self, lm: LoadedModel, stack: ExitStack) -> None:  # noqa: B027 - optional hook
        """Add hooks/attention functions to the model, registering their removal on ``stack``."""

    # ------------------------------------------------------------------ memory

    def new_memory(self, lm: LoadedModel) -> Memory:
        """An empty memory for this model."""
        return Memory(meta=self.memory_meta(lm))

    def check_memory(self, memory: Memory) -> None:
        """Refuse (:class:`ValueError` naming it) a memory whose method state this method cannot continue from: a
        damaged or hand-edited file. Called where a memory comes from outside (``load_memory``, a stored session);
        the keys/values themselves are checked by :meth:`Memory.check`. Default: no state to check."""
        return None

    def memory_meta(self, lm: LoadedModel) -> dict[str, str]:
        """Identity stamped into memories, checked when they are loaded again (a memory made on weights with a
        stage-1 LoRA merged in means something else to the plain model)."""
        meta = {
            "model": lm.fingerprint,
            "weights": lm.weights_digest or "",
            "stage1": lm.stage1 or "",
            "method": self.name,
        }
        meaning = {k: str(v) for k, v in self.options().items() if k not in self.runtime_options}
        if self.trainable:
            meaning["adapter"] = self.adapter_hash
        return meta | meaning

    def decode_positions(self, max_new_tokens: int) -> int:
        """Position ids that generating up to ``max_new_tokens`` may use up, at most: as many, unless the method
        feeds tokens of its own while it decodes (ccm-reason's <COMP>); room for them is made before decoding."""
        return max_new_tokens

    def positions_needed(self, memory: Memory, n_tokens: int) -> int:
        """Position ids that adding ``n_tokens`` of context to ``memory`` uses up (checked against the model's
        limit before any work is done)."""
        return n_tokens if self.uses_positions else 0

    def positions_fix(self) -> str:
        """What to change where the memory after an ``add`` would pass the model's positions however the text is
        added (a method that rebuilds its memory from the whole context each time, so adding it in parts or after
        a re-base cannot help); "" where the positions are the new text's own (the harness says what helps then)."""
        return ""

    def parts(self, ids: torch.Tensor) -> list[torch.Tensor]:
        """``ids`` (shape ``[1, n]``) cut where adding the pieces one after another gives the memory that adding
        them at once gives (a chunked method's chunks); between pieces the memory may be re-based
        (:func:`ccmem.api.make_room`), so a text longer than the model's positions can be added in one call.
        By default one piece: the method reads the whole context at once."""
        return [ids]

    def add_sink(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        """Keep ``ids`` (a system prompt, BOS) uncompressed at the front of the memory."""
        if memory.num_slots != memory.sink:
            raise ValueError("the attention sink must be added before any other context")
        layers, positions = read_raw(lm, memory, ids)
        return memory.with_layers(layers, positions, advance=ids.shape[-1], sink=memory.sink + ids.shape[-1])

    @abstractmethod
    def add(self, lm: LoadedModel, memory: Memory, ids: torch.Tensor) -> Memory:
        """Fold the context tokens ``ids`` (shape ``[1, n]``) into ``memory``; return the new memory.

        How the context is cut (chunks, spans, a budget) is the method's decision.
        """

    def add_batch(self, lm: LoadedModel, memories: list[Memory], ids: list[torch.Tensor]) -> list[Memory]:
        """``add`` for several interactions (each its own memory and ``[1, n_i]`` ids); the same memories as
        one at a time. Methods with :attr:`batchable` set do it in padded forwards; others one by one."""
        if len(memories) != len(ids):
            raise ValueError(f"{len(memories)} memories but {len(ids)} id sequences")
        return [self.add(lm, m, i) for m, i in zip(memories, ids, strict=True)]

    def encoder_states(self, lm: LoadedModel, memory: Memory, query: torch.Tensor) -> torch.Tensor:
        """Encoder-decoder models (:attr:`encoder_decoder`): ``[1, n, hidden]``, what the decoder cross-attends to when
        it answers ``query`` (``[1, n_query]``) from ``memory``. Called while attached."""
        raise NotImplementedError(f"method {self.name!r} does not run on encoder-decoder models")

    def decode_logits(self, lm: LoadedModel, state: DecodeState) -> torch.Tensor:
        """The ``[vocab]`` logits the next token is picked from, after the loop fed ``state.fed[-1]``: the LM head
        on ``state.hidden``. A method may first feed tokens of its own (compress the finished segment of a
        reasoning trace) and return the logits after them. A method that overrides it overrides
        :meth:`decode_logits_batch` to match, or sets :attr:`decode_batchable` to False."""
        assert state.hidden is not None
        return logits_for(lm, state.hidden)[0]

    def decode_logits_batch(self, lm: LoadedModel, batch: DecodeRows) -> torch.Tensor:
        """:meth:`decode_logits` for every row of a padded batch at once: ``[rows, vocab]``, row ``i`` equal to what
        :meth:`decode_logits` gives for ``batch.rows[i]`` decoded alone. Where :meth:`decode_logits` would feed
        tokens of its own first, this sets the row's ``feed`` instead (its logits row is then not used): the loop
        feeds them in its next forward, beside the other rows' tokens, and asks again."""
        hidden = torch.cat([row.hidden for row in batch.rows if row.hidden is not None])
        return logits_for(lm, hidden)

    def feed_after(self, lm: LoadedModel, state: DecodeState) -> torch.Tensor | None:
        """Called by both generation loops once a token is picked (``state.tokens[-1]``, not yet fed; ``state.hidden``
        is still what it was picked from): ``[n, hidden]`` embeddings to feed right after it, in the same forward,
        with the gated LoRA on (the <COMP> tokens of a reasoning step that ends with this token), or None. The
        next :meth:`decode_logits` / :meth:`decode_logits_batch` then sees ``state.hidden`` after them."""
        return None

    def decode_step(self, lm: LoadedModel, state: DecodeState) -> None:  # noqa: B027 - optional hook
        """Called by the generation loop after every generated token (evict, compress a finished segment...).
        A method that overrides it does the same to a padded batch in :meth:`decode_logits_batch` (masking out
        what it evicts), or sets :attr:`decode_batchable` to False."""

    # ------------------------------------------------------------------ training

    def fit_sample(self, sample: Sample) -> Sample:
        """``sample`` cut as this method's :meth:`add` would read its context (the trainer fits every sample
        before it measures or lays one out, so that training sees what inference does). As it is by default."""
        return sample

    def has_targets(self, sample: Sample) -> bool:
        """Whether training on ``sample`` has tokens to predict; the trainer skips samples that have none (a batch
        of them has no loss) and refuses data where none has, before training. Default: its answer, or its chunks
        where they are trained on too (methods that language-model the whole text override this)."""
        return sample.answer_start < len(sample.tail) or (sample.label_chunks and any(sample.chunks))

    def no_targets_hint(self) -> str:
        """What to change when no sample :meth:`has_targets` (said with the trainer's refusal); "" if nothing."""
        return ""

    def sample_length(self, sample: Sample) -> int:
        """Tokens the sample takes once laid out for training (``data.max_length`` is checked against it)."""
        return len(sample.sink) + sum(len(c) for c in sample.chunks) + len(sample.tail)

    def make_batch(self, samples: list[Sample], pad_id: int = 0) -> Any:
        """Lay a batch of samples out for :meth:`training_loss`.

        The trainer counts the tokens it trains on from the batch: give it ``lengths`` (real tokens per row) or
        an ``attention_mask``.
        """
        raise NotImplementedError(f"method {self.name!r} cannot be trained")

    def training_loss(self, lm: LoadedModel, batch: Any) -> torch.Tensor:
        """Mean loss of one batch from :meth:`make_batch` (called while attached)."""
        raise NotImplementedError(f"method {self.name!r} cannot be trained")

    def loss_count(self, batch: Any) -> int | None:
        """How many items :meth:`training_loss` averages over in ``batch`` (labelled tokens by default), known
        before the forward; the trainer weighs accumulated batches by it, so that gradient accumulation gives the
        gradient of one batch holding them all. ``None``: unknown (accumulated batches then count alike)."""
        labels = getattr(batch, "labels", None)
        return int((labels[:, 1:] != -100).sum()) if isinstance(labels, torch.Tensor) else None


# ---------------------------------------------------------------------------- helpers shared by methods


def answer_loss(lm: LoadedModel, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token loss where ``labels`` (aligned with ``hidden``) are set, with logits formed only there.

    The LM head over a large vocabulary dominates the cost of a small model; context and <COMP>
    positions have no label, so their logits are never computed.
    """
    labels = labels.to(hidden.device)[:, 1:]
    keep = labels != -100
    if not bool(keep.any()):
        raise ValueError("this batch has no answer tokens to train on (check answer_start)")
    return nn.functional.cross_entropy(logits_for(lm, hidden[:, :-1][keep]), labels[keep])


def logits_for(lm: LoadedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head's float logits for the given hidden states (with the model's final soft-capping, if any; a T5
    decoder's output is first scaled by ``d_model ** -0.5``, as its model does where the head is tied)."""
    if lm.is_encoder_decoder and getattr(lm.model.config, "scale_decoder_outputs", False):
        hidden = hidden * lm.model.config.d_model**-0.5
    logits = _softcapped(lm, lm.model.get_output_embeddings()(hidden).float())
    scale = head_scale(lm)
    return logits if scale == 1.0 else logits * scale


def _softcapped(lm: LoadedModel, logits: torch.Tensor) -> torch.Tensor:
    softcap = getattr(lm.model.config.get_text_config(), "final_logit_softcapping", None)
    return torch.tanh(logits / softcap) * softcap if softcap else logits


def head_scale(lm: LoadedModel) -> float:
    """The constant factor a model's own forward puts on its LM head's output (Cohere's ``logit_scale``,
    Granite's ``1 / logits_scaling``, Falcon-H1's ``lm_head_multiplier``; 1 for most families), measured once per
    model by comparing the model's logits with the head's on three tokens, so that scores computed from hidden
    states equal the model's. A model whose logits are no constant multiple of the head's is refused."""
    if lm._head_scale is not None:
        return lm._head_scale
    if lm.is_encoder_decoder:
        lm._head_scale = 1.0
        return 1.0
    model = lm.model
    ids = torch.arange(3, device=lm.device)[None]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hidden = model.base_model(input_ids=ids).last_hidden_state
            theirs = model(input_ids=ids).logits.float()
            raw = model.get_output_embeddings()(hidden).float()
    finally:
        model.train(was_training)
    mine = _softcapped(lm, raw)
    atol = 1e-3 * float(theirs.abs().max()) + 1e-6
    scale = 1.0
    if not torch.allclose(mine, theirs, rtol=2e-2, atol=atol):
        scale = float((raw * theirs).sum() / (raw * raw).sum().clamp_min(1e-30))
        if mine is not raw or not torch.allclose(raw * scale, theirs, rtol=2e-2, atol=atol):
            from ccmem.loading import UnsupportedModelError

            raise UnsupportedModelError(
                f"{lm.name} ({model.config.model_type}): the model's logits are not its LM head's output (times a "
                "constant), so ccmem cannot score answers from its hidden states; use a model family whose "
                "output layer is the LM head (LLaMA, Qwen2, Mistral, Gemma, Cohere, Granite ...)"
            )
    lm._head_scale = scale
    return scale


def positions(start: int, length: int, device: torch.device) -> torch.Tensor:
    """Position ids ``start .. start+length-1`` as a ``[1, length]`` tensor."""
    return torch.arange(start, start + length, device=device)[None]


def run_decoder(
    lm: LoadedModel,
    ids: torch.Tensor | None,
    cache: Any,
    start: int,
    *,
    inputs_embeds: torch.Tensor | None = None,
    **kwargs: Any,
) -> Any:
    """Run the decoder stack only (no LM head: memory writing needs no logits) and fill ``cache``."""
    length = (ids if ids is not None else inputs_embeds).shape[1]  # type: ignore[union-attr]
    return lm.model.base_model(
        input_ids=ids,
        inputs_embeds=inputs_embeds,
        cache=cache,
        position_ids=positions(start, length, lm.device),
        use_cache=True,
        **kwargs,
    )


def positions_after(memory: Memory, layers: list, n_new: int) -> list[torch.Tensor]:
    """Slot positions of ``layers`` that hold ``memory``'s slots followed by ``n_new`` tokens read after it."""
    new = [positions_for(memory.next_position, n_new, k) for k, _ in layers]
    return concat_positions([memory.positions, new])


def context_count(memory: Memory) -> int | None:
    """The context tokens a memory has seen (state ``context_tokens``, kept by eviction and sparse methods), or
    None where it holds none; a value that is no whole number >= 0 (a hand-edited file) is refused."""
    seen = memory.state.get("context_tokens")
    if seen is not None and (seen.numel() != 1 or seen.is_floating_point() or int(seen) < 0):
        raise ValueError(f"its context count (state context_tokens) must be a whole number >= 0, got {seen.tolist()}")
    return None if seen is None else int(seen)


def check_context_ids(memory: Memory, slots_for: Callable[[int], int]) -> None:
    """:meth:`Method.check_memory` of methods that re-read the whole context at every add (gist, icformer): the
    context they keep (state ``context_ids``, token ids of shape ``(1, n)``) must be there whenever slots follow
    the sink, and those slots must be what an ``n``-token context gives (``slots_for(n)``)."""
    after = memory.num_slots - memory.sink
    ids = memory.state.get("context_ids")
    if ids is None:
        if after:
            raise ValueError(f"its {after} slots after the sink have no context to extend (state context_ids)")
        return
    if ids.dim() != 2 or ids.shape[0] != 1 or ids.shape[1] < 1 or ids.is_floating_point() or ids.dtype == torch.bool:
        raise ValueError(
            f"its context (state context_ids) must be token ids of shape (1, n), got {tuple(ids.shape)} {ids.dtype}"
        )
    if int(ids.min()) < 0:
        raise ValueError("its context (state context_ids) holds negative token ids")
    if after != slots_for(int(ids.shape[1])):
        raise ValueError(
            f"it holds {after} slots after the sink, but its {ids.shape[1]}-token context (state context_ids) gives "
            f"{slots_for(int(ids.shape[1]))}"
        )


def read_raw(lm: LoadedModel, memory: Memory, ids: torch.Tensor, **kwargs: Any) -> tuple[list, list[torch.Tensor]]:
    """Read ``ids`` with ``memory``; every layer's keys/values and positions, the new tokens' appended."""
    cache = memory.to_cache()
    run_decoder(lm, ids, cache, memory.next_position, **kwargs)
    layers = Memory.layers_of(cache)
    return layers, positions_after(memory, layers, ids.shape[-1])


@dataclass
class BatchRead:
    """Per row of a padded forward: every layer's keys/values (the memory's, then the new tokens'), and where
    the row's real key columns and queries were in the padded forward (to cut a batched capture per row)."""

    layers: list[list[tuple[torch.Tensor, torch.Tensor]]]
    key_columns: list[torch.Tensor]
    n_new: list[int]
    hidden: torch.Tensor  # [batch, longest new, hidden]: the last layer's output, each row right-aligned


@dataclass
class PaddedRows:
    """Inputs of one padded forward in which each row reads its new tokens with its own memory."""

    cache: Any  # the memories' keys/values, each row left-padded to the longest
    inputs: torch.Tensor  # [batch, longest new] ids, or [batch, longest new, hidden] embeddings
    attention_mask: torch.Tensor  # [batch, longest memory + longest new]: 1 on real slots and tokens
    position_ids: torch.Tensor  # [batch, longest new]: each row's own positions (0 on padding)
    slots: list[int]
    n_new: list[int]


def pad_rows(lm: LoadedModel, memories: Sequence[Memory], inputs: Sequence[torch.Tensor], room: int = 0) -> PaddedRows:
    """Lay out rows of ``(memory, new tokens)`` for one forward where every row computes what it would alone.

    Memories are left-padded to the longest, new tokens right-aligned after them, so every row's last new
    token is in the last column (where the next token is predicted)::

        row 0   [ m0 m0 m0 m0 ][ n0 n0 n0 ]     m: a memory slot (already keys/values in the cache)
        row 1   [ .  .  m1 m1 ][ .  n1 n1 ]     n: a new token; .: padding, masked out
                 cache columns   input columns

    ``inputs`` are ``[1, n_i]`` ids, or ``[1, n_i, hidden]`` embeddings (all rows alike). ``room``: entries the
    cache takes per row without copying itself (:meth:`Memory.to_cache`), for a decoding loop.
    """
    device = lm.device
    batch = len(memories)
    slots = []
    for m in memories:
        counts = set(m.slots_per_layer)
        if len(counts) > 1:
            raise ValueError("batched reading needs memories with the same number of slots in every layer")
        slots.append(counts.pop() if counts else 0)
    n_new = [int(x.shape[1]) for x in inputs]
    s_max, n_max = max(slots), max(n_new)
    shape = lm.kv_shape
    cache = Memory().to_cache(room)
    if s_max:  # each layer's keys and values laid out once, in buffers with the room after them
        for layer in range(shape.layers):
            k = torch.empty(batch, shape.kv_heads, s_max + room, shape.head_dim, dtype=shape.dtype, device=device)
            v = torch.empty_like(k)
            for b, m in enumerate(memories):
                pad = s_max - slots[b]
                k[b, :, :pad] = 0  # padding is masked out, but must be finite: a weight of 0 times NaN is NaN
                v[b, :, :pad] = 0
                if slots[b]:
                    k[b, :, pad:s_max] = m.layers[layer][0][0]
                    v[b, :, pad:s_max] = m.layers[layer][1][0]
            cache.layers.append(RoomyLayer.holding(k, v, s_max, room))
    mask = torch.zeros(batch, s_max + n_max, dtype=torch.long, device=device)
    position_ids = torch.zeros(batch, n_max, dtype=torch.long, device=device)
    x = inputs[0].new_zeros(batch, n_max, *inputs[0].shape[2:])
    for b, (m, n) in enumerate(zip(memories, n_new, strict=True)):
        mask[b, s_max - slots[b] : s_max] = 1
        mask[b, s_max + n_max - n :] = 1
        position_ids[b, n_max - n :] = torch.arange(m.next_position, m.next_position + n, device=device)
        x[b, n_max - n :] = inputs[b][0]
    return PaddedRows(cache, x, mask, position_ids, slots, n_new)


def padding_is_exact(lm: LoadedModel, slots: Sequence[int], extents: Sequence[int]) -> bool:
    """Whether rows of ``slots`` memory slots, each reading ``extents`` more positions, give in one padded forward
    (:func:`pad_rows`) what each gives alone. A sliding-window layer counts its window in cache columns, so the
    padding that :func:`pad_rows` puts between a shorter row's memory and its new tokens would push memory out of
    the window: exact only while the longest padded row fits inside the window (or the model has none)."""
    window = lm.sliding_window
    return window is None or not slots or max(slots) + max(extents) <= window


def add_rows(method: Method, lm: LoadedModel, memories: list[Memory], ids: list[torch.Tensor]) -> list[Memory]:
    """``method.add_batch`` where one padded forward is exact (:func:`padding_is_exact`), else one row at a time:
    the same memories either way. Called while attached."""
    slots = [max(m.slots_per_layer, default=0) for m in memories]
    extents = [
        max(int(i.shape[-1]), method.positions_needed(m, int(i.shape[-1]))) for m, i in zip(memories, ids, strict=True)
    ]
    if padding_is_exact(lm, slots, extents):
        return method.add_batch(lm, memories, ids)
    return [method.add(lm, m, i) for m, i in zip(memories, ids, strict=True)]


def read_batch(
    lm: LoadedModel,
    memories: list[Memory],
    inputs: list[torch.Tensor],
    *,
    embeds: bool = False,
    gate_last: int = 0,
    **kwargs: Any,
) -> BatchRead:
    """Read each row's new tokens with its own memory in one padded forward (laid out by :func:`pad_rows`).

    ``inputs`` are ``[1, n_i]`` ids, or ``[1, n_i, hidden]`` embeddings with ``embeds=True``;
    ``gate_last`` turns the gated LoRA on for each row's last ``gate_last`` inputs (<COMP> tokens).
    """
    from ccmem.modules import GATE_KWARG

    rows = pad_rows(lm, memories, inputs)
    device, slots = lm.device, rows.slots
    s_max, n_max = max(slots), max(rows.n_new)
    extra = {}
    if gate_last:
        gate = torch.zeros(len(memories), n_max, dtype=torch.bool, device=device)
        gate[:, n_max - gate_last :] = True
        extra[GATE_KWARG] = gate
    out = lm.model.base_model(
        **({"inputs_embeds": rows.inputs} if embeds else {"input_ids": rows.inputs}),
        attention_mask=rows.attention_mask,
        position_ids=rows.position_ids,
        cache=rows.cache,
        use_cache=True,
        **extra,
        **kwargs,
    )
    filled = Memory.layers_of(rows.cache)
    layers, columns = [], []
    for b, n in enumerate(rows.n_new):
        keep = torch.cat([torch.arange(s_max - slots[b], s_max), torch.arange(s_max + n_max - n, s_max + n_max)]).to(
            device
        )
        columns.append(keep)
        layers.append([(k[b : b + 1].index_select(2, keep), v[b : b + 1].index_select(2, keep)) for k, v in filled])
    return BatchRead(layers, columns, rows.n_new, out.last_hidden_state)


__all__ = [
    "KINDS",
    "BatchRead",
    "DecodeRows",
    "DecodeState",
    "LoRAOptions",
    "Method",
    "OptionSpec",
    "PaddedRows",
    "add_rows",
    "answer_loss",
    "logits_for",
    "option",
    "pad_rows",
    "padding_is_exact",
    "positions",
    "positions_after",
    "read_batch",
    "read_raw",
    "run_decoder",
]
