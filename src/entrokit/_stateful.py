r"""One base for stateful training components (controllers, EMA priors, per-sample buffers).

The pattern is torchmetrics' ``Metric``: a subclass *declares* what it is made of, and the
base supplies the machinery once.

- **Options** are annotated class attributes :class:`Option` (a data descriptor holding a
  check, a default and its place in the constructor, which is generated from them as a
  dataclass's is). The check runs when the attribute is assigned, in ``__init__`` or later,
  never on every forward; relations between options (``low <= high``) live in
  ``_check_relations``, run after construction and after every later
  assignment (assign several at once with :meth:`StatefulModule.set_options`).
- **State** is declared with :meth:`StatefulModule.add_state` (in ``_setup``): a registered buffer (so
  ``state_dict``, ``.to(device)`` and checkpoint resume work), its initial value (for
  :meth:`StatefulModule.reset_state`) and its distributed policy: ``"mean"`` or ``"sum"``
  (the batch statistic that feeds it is all-reduced over the ranks), ``"gather"`` (a
  per-sample buffer; the ``(index, rows)`` pairs of every rank are gathered) or ``"none"``.
  A statistic that feeds a state without being one (the numerator and the count of an exact
  global mean) is declared with :meth:`StatefulModule.add_statistic`.
- **One step template**, :meth:`StatefulModule.update_state`: measure the batch
  (``_measure``, subclass), reduce it across ranks according to the
  policies, refuse it if any statistic is NaN or infinite on any rank, then write the new
  state (``_write``, subclass). A refused batch raises
  :class:`~entrokit.InputError` on every rank at once (the finiteness verdicts travel in
  the same collective as the statistics, so no rank is left waiting) and leaves the state
  exactly as it was. With ``check_inputs=False`` the batch is skipped silently instead.
  ``_measure`` may add the verdict on its raw inputs under the key ``"inputs_finite"`` (a
  0-dim bool tensor) when a statistic can be finite for a non-finite input (the softmax of
  a ``-inf`` logit); the guard then judges the batch by that verdict alone (so the
  statistics must be finite whenever the inputs are, as a softmax and its sums are). A subclass with
  ``skip_without_sync = True`` skips such a batch without any host sync when no collective
  runs: ``_write`` writes, and the template puts every declared state back where the
  verdict is ``False`` (for a ``"gather"`` state, only the rows of the batch).

``sync`` (an option of every subclass) decides when the collectives run: ``None``
all-reduces iff a process group with more than one rank is initialised, ``True`` always
(needs an initialised group), ``False`` never (each rank keeps its own state).

How the training losses sit on it: ``ELRLoss.targets`` and ``PSKDLoss.predictions`` are
``"gather"`` states (their ``_measure`` returns ``(index, detached rows)``, their ``_write``
writes the EMA or the copy); ``LocalEntropyRegularizer.prior`` is a ``"none"`` state fed by two
``"sum"`` statistics (the summed softmax and the row count), so the prior moves by the exact
global mean; ``lam``, ``beta``, ``reduction``, ``momentum``, ``tau_*`` and ``sync`` are
:class:`Option` attributes, checked once instead of on every forward.
"""

from __future__ import annotations

import functools
import inspect
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from typing import Any, ClassVar, Literal

import torch
import torch.distributed as dist
from torch import nn

if sys.version_info >= (3, 11):
    from typing import dataclass_transform
else:  # pragma: no cover - torch depends on typing_extensions
    from typing_extensions import dataclass_transform

from entrokit._errors import InputError
from entrokit._validation import check_count, optional

__all__ = [
    "Option",
    "OptionsModule",
    "StatefulModule",
    "all_gather_rows",
    "boolean",
    "choice",
    "integer",
    "non_finite_message",
    "optional",
    "real",
    "sync_flag",
]

SyncPolicy = Literal["mean", "sum", "gather", "none"]
_POLICIES = ("mean", "sum", "gather", "none")


# --------------------------------------------------------------------------------------
# Declared options
# --------------------------------------------------------------------------------------


_REQUIRED = inspect.Parameter.empty


class Option:
    """A validated option of an :class:`OptionsModule` (a data descriptor and a constructor field).

    ``check(value, name)`` returns the value to store (e.g. a ``float``) or raises
    ``TypeError`` / :class:`~entrokit.InputError` with a message naming ``name``.

    A class that declares its options with type annotations (``lr: float = Option(...)``)
    and no ``__init__`` gets a constructor generated from them, as a dataclass does: the
    fields in declaration order, base classes first (a redeclared field keeps its place and
    takes the new default), positional fields before keyword-only ones.

    Args:
        check: the check run on every assignment.
        default: the constructor's default; none makes the parameter required.
        kw_only: keyword-only in the generated constructor.
        alias: the constructor parameter's name where it differs from the attribute's
            (``initial_coef`` is passed as ``coef``, the name of the state it starts).
        fixed: set when the module is built and read-only afterwards (it sizes a buffer).

    Examples:
        >>> class Gain(StatefulModule):
        ...     gain: float = Option(real(lo=0.0, lo_open=True, example="gain=0.5"), default=1.0)
        >>> Gain(2).gain
        2.0
        >>> Gain(-1.0)
        Traceback (most recent call last):
        ...
        entrokit._errors.InputError: gain must lie in (0, inf), got -1.0; use e.g. gain=0.5.
    """

    def __init__(
        self,
        check: Callable[[Any, str], Any],
        *,
        default: Any = _REQUIRED,
        kw_only: bool = False,
        alias: str | None = None,
        fixed: bool = False,
    ) -> None:
        self.check = check
        self.default = default
        self.kw_only = kw_only
        self.alias = alias
        self.fixed = fixed
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        try:
            return obj.__dict__[self.name]
        except KeyError:
            raise AttributeError(f"option {self.name!r} of {type(obj).__name__} is not set yet") from None

    def __set__(self, obj: Any, value: Any) -> None:
        if self.fixed and obj.__dict__.get("_options_built", False):
            raise InputError(
                f"{self.name} of a {type(obj).__name__} is fixed when it is built (it sizes its state); "
                f"build a new {type(obj).__name__} instead."
            )
        new = self.check(value, self.name)
        missing = object()
        old = obj.__dict__.get(self.name, missing)
        obj.__dict__[self.name] = new
        if obj.__dict__.get("_options_ready", False):
            try:
                obj._check_relations()
            except Exception:  # a refused assignment leaves the option as it was
                if old is missing:
                    del obj.__dict__[self.name]
                else:
                    obj.__dict__[self.name] = old
                raise


def _declared_options(cls: type) -> dict[str, Option]:
    """The options of ``cls`` in constructor order: the positional ones in dataclass field order
    (bases first; a redeclaration keeps its place and takes the new default), then the
    keyword-only ones, those of the most derived class first (``sync`` and ``check_inputs``
    last)."""
    fields: dict[str, Option] = {}
    home: dict[str, int] = {}  # where each option is first declared: 0 is the most basic class
    for depth, klass in enumerate(reversed(cls.__mro__)):
        for name, value in vars(klass).items():
            if isinstance(value, Option):
                fields[name] = value
                home.setdefault(name, depth)
    positional = [n for n, o in fields.items() if not o.kw_only]
    keyword = sorted((n for n, o in fields.items() if o.kw_only), key=lambda n: -home[n])
    return {n: fields[n] for n in positional + keyword}


def _constructor_signature(cls: type, fields: dict[str, Option]) -> inspect.Signature:
    annotations: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        annotations.update(vars(klass).get("__annotations__", {}))
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for name, opt in fields.items():
        if name not in annotations:
            raise TypeError(
                f"{cls.__qualname__}: option {name!r} has no type annotation; declare it as "
                f"`{name}: <type> = Option(...)` or give {cls.__qualname__} its own __init__."
            )
        kind = inspect.Parameter.KEYWORD_ONLY if opt.kw_only else inspect.Parameter.POSITIONAL_OR_KEYWORD
        params.append(inspect.Parameter(opt.alias or name, kind, default=opt.default, annotation=annotations[name]))
    last_default = None
    for p in params[1:]:
        if p.kind is p.KEYWORD_ONLY:
            break
        if p.default is not _REQUIRED:
            last_default = p.name
        elif last_default is not None:
            raise TypeError(
                f"{cls.__qualname__}: the required option {p.name!r} follows {last_default!r}, which has a "
                f"default; give {p.name!r} a default or make it keyword-only (kw_only=True)."
            )
    return inspect.Signature(params)


def _generated_init(cls: type) -> Callable[..., None]:
    """The constructor of ``cls`` from its declared options (see :class:`Option`)."""
    fields = _declared_options(cls)
    signature = _constructor_signature(cls, fields)
    attribute = {(opt.alias or name): name for name, opt in fields.items()}

    def __init__(self: OptionsModule, *args: Any, **kwargs: Any) -> None:
        try:
            bound = signature.bind(self, *args, **kwargs)
        except TypeError as err:
            raise TypeError(f"{cls.__name__}(): {err}") from None
        bound.apply_defaults()
        self._begin()
        for param, value in list(bound.arguments.items())[1:]:
            setattr(self, attribute[param], value)
        self._setup()
        if type(self).__init__ is __init__:  # a hand-written subclass __init__ ends with _ready itself
            self._ready()

    __init__.__signature__ = signature  # type: ignore[attr-defined]
    __init__._from_options = True  # type: ignore[attr-defined]
    __init__.__qualname__ = f"{cls.__qualname__}.__init__"
    __init__.__module__ = cls.__module__
    return __init__


def _plain(value: Any) -> Any:
    """A 1-element tensor or a NumPy scalar becomes a Python number."""
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    if type(value).__module__ == "numpy" and hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def real(
    *,
    lo: float = -math.inf,
    hi: float = math.inf,
    lo_open: bool = False,
    hi_open: bool = False,
    allow_inf: bool = False,
    example: str,
) -> Callable[[Any, str], float]:
    """Check for a real number in an interval (NumPy and 1-element tensors accepted).

    NaN is always refused; ``inf`` and ``-inf`` only with ``allow_inf=True``.
    """

    def check(value: Any, name: str) -> float:
        v = _plain(value)
        if isinstance(v, bool) or not isinstance(v, Real):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}; use e.g. {example}.")
        v = float(v)
        inside = (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
        if not ((math.isfinite(v) or (allow_inf and not math.isnan(v))) and inside):
            left = "(" if lo_open or lo == -math.inf else "["
            right = ")" if hi_open or hi == math.inf else "]"
            interval = f"{left}{_fmt(lo)}, {_fmt(hi)}{right}"
            raise InputError(f"{name} must lie in {interval}, got {value!r}; use e.g. {example}.")
        return v

    return check


def _fmt(x: float) -> str:
    return "inf" if x == math.inf else "-inf" if x == -math.inf else f"{x:g}"


def integer(*, minimum: int = 0, example: str) -> Callable[[Any, str], int]:
    """Check for an integer ``>= minimum`` (:func:`~entrokit._validation.check_count`); NumPy
    integers are accepted, floats and bools are not."""

    return functools.partial(check_count, minimum=minimum, example=example)


def choice(choices: Sequence[str]) -> Callable[[Any, str], str]:
    """Check for one of ``choices`` (strings)."""

    def check(value: Any, name: str) -> str:
        if not isinstance(value, str) or value not in choices:
            opts = ", ".join(repr(c) for c in choices)
            raise InputError(f"{name} must be one of {opts}; got {value!r}.")
        return value

    return check


def boolean(value: Any, name: str) -> bool:
    """Check for ``True`` or ``False`` (NumPy bools accepted)."""
    v = _plain(value)
    if not isinstance(v, bool):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}.")
    return v


def sync_flag(value: Any, name: str) -> bool | None:
    """Check the ``sync`` option: ``None``, ``True`` or ``False``."""
    if value is not None and not isinstance(value, bool):
        raise TypeError(
            f"{name} must be None, True or False, got {type(value).__name__}; use sync=None to "
            "all-reduce whenever torch.distributed runs on more than one rank."
        )
    return value


# --------------------------------------------------------------------------------------
# The finite-batch message and the distributed gather of per-sample rows
# --------------------------------------------------------------------------------------


def non_finite_message(name: str, owner: str, state: str, ranks: Sequence[int] | None = None) -> str:
    where = "" if ranks is None else f" on rank(s) {list(ranks)}"
    return (
        f"{name} contain NaN or inf{where}; expected finite values. {owner} did not update "
        f"its {state} (on any rank), so the state is as before this batch. The model has "
        "probably diverged: lower the learning rate, clip gradients, or train in bfloat16 / "
        "with a GradScaler instead of plain float16; or skip this batch."
    )


def _distributed_world() -> int:
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def all_gather_rows(
    index: torch.Tensor,
    rows: torch.Tensor,
    *,
    sync: bool | None = None,
    local_ok: torch.Tensor | None = None,
    what: str = "rows",
    owner: str = "the loss",
    state: str = "per-sample buffer",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather ``(index, rows)`` from every rank, in rank order.

    Under ``torch.distributed`` each rank sees its own shard of the batch; to keep the
    per-sample buffers identical on every rank, all ranks must write all rows. Batches
    may have different sizes on different ranks (the last batch of an epoch); they are
    padded to the largest size for the collective and trimmed afterwards.

    Args:
        index: ``[b]`` integer indices seen on this rank.
        rows: ``[b, C]`` detached values to write for those indices.
        sync: ``True`` to gather (requires an initialised process group), ``False`` to
            return the inputs unchanged, ``None`` to gather iff a process group with more
            than one rank is initialised.
        local_ok: optional 0-dim bool tensor, this rank's verdict on its batch (e.g.
            ``torch.isfinite(logits).all()``). The verdicts travel with the batch sizes (no
            extra collective); if any rank says ``False``, every rank raises the same
            :class:`~entrokit.InputError` *before* the rows are gathered, so no rank writes
            its buffer and no rank is left waiting in a collective.
        what, owner, state: wording of that error.

    Returns:
        ``(index_all, rows_all)`` with ``sum_r b_r`` rows, rank 0's rows first.
    """
    world = _distributed_world()
    if sync is None:
        sync = world > 1
    if not sync:
        if local_ok is not None and not bool(local_ok):
            raise InputError(non_finite_message(what, owner, state))
        return index, rows
    if world == 1 and not (dist.is_available() and dist.is_initialized()):
        raise InputError(
            "sync=True needs an initialised torch.distributed process group; call "
            "torch.distributed.init_process_group(...) first or pass sync=None."
        )
    dev = index.device
    if local_ok is None:
        ok = torch.ones((), dtype=torch.long, device=dev)
    else:
        ok = local_ok.to(device=dev, dtype=torch.long).reshape(())
    b = torch.stack([torch.tensor(index.shape[0], device=dev, dtype=torch.long), ok])  # [size, ok]
    sizes = [torch.zeros_like(b) for _ in range(world)]
    dist.all_gather(sizes, b)
    bad = [r for r, s in enumerate(sizes) if int(s[1]) == 0]
    if bad:
        raise InputError(non_finite_message(what, owner, state, ranks=bad))
    sizes_i = [int(s[0].item()) for s in sizes]
    m = max(sizes_i)
    pad = m - index.shape[0]
    idx_p = torch.cat([index, index.new_zeros(pad)]) if pad else index
    rows_p = torch.cat([rows, rows.new_zeros(pad, rows.shape[1])]) if pad else rows
    idx_list = [torch.empty_like(idx_p) for _ in range(world)]
    rows_list = [torch.empty_like(rows_p) for _ in range(world)]
    dist.all_gather(idx_list, idx_p.contiguous())
    dist.all_gather(rows_list, rows_p.contiguous())
    idx_all = torch.cat([t[:s] for t, s in zip(idx_list, sizes_i)])
    rows_all = torch.cat([t[:s] for t, s in zip(rows_list, sizes_i)])
    return idx_all, rows_all


# --------------------------------------------------------------------------------------
# The base
# --------------------------------------------------------------------------------------


@dataclass_transform(eq_default=False, field_specifiers=(Option,))
class OptionsModule(nn.Module):
    """A module whose options are :class:`Option` class attributes: each is checked when it
    is assigned (in ``__init__`` or later), never on every forward.

    A subclass without an ``__init__`` of its own gets one generated from its annotated
    options (see :class:`Option`): it assigns them in field order, calls :meth:`_setup`
    (register the state the options size) and ends with :meth:`_ready` (run
    ``_check_relations`` once, and from then on after every option assignment). A
    hand-written ``__init__`` calls ``super().__init__(...)``, assigns the rest and ends with
    ``_ready`` itself.
    """

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        inherited = cls.__init__
        if "__init__" not in vars(cls) and (inherited is nn.Module.__init__ or getattr(inherited, "_from_options", False)):
            cls.__init__ = _generated_init(cls)  # type: ignore[method-assign]

    def _begin(self) -> None:
        """Start of construction, before the options are assigned."""
        nn.Module.__init__(self)

    def _setup(self) -> None:
        """Register the state the options size (override); runs after the options are assigned."""

    def _ready(self) -> None:
        """End of ``__init__``: check the relations between options, then keep checking them;
        ``fixed`` options become read-only."""
        self._check_relations()
        self.__dict__["_options_ready"] = True
        self.__dict__["_options_built"] = True

    def _check_relations(self) -> None:
        """Relations between options (override); raise :class:`~entrokit.InputError`."""

    def set_options(self, **options: Any) -> None:
        """Assign several options at once; relations are checked after the last one.

        On failure every option keeps its previous value.
        """
        old = {}
        for name in options:
            if not isinstance(getattr(type(self), name, None), Option):
                raise InputError(f"{type(self).__name__} has no option {name!r}.")
            old[name] = self.__dict__.get(name)
        self.__dict__["_options_ready"] = False
        try:
            for name, value in options.items():
                setattr(self, name, value)
            self._check_relations()
        except Exception:
            self.__dict__.update(old)
            raise
        finally:
            self.__dict__["_options_ready"] = True

    def options(self) -> dict[str, Any]:
        """The declared options and their current values."""
        names = [n for klass in type(self).__mro__ for n, v in vars(klass).items() if isinstance(v, Option)]
        return {n: getattr(self, n) for n in dict.fromkeys(names)}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options().items())


class StatefulModule(OptionsModule):
    """Base of the stateful training components (see the module docstring).

    A subclass declares its options as annotated :class:`Option` class attributes (its
    constructor is generated from them), registers its state with :meth:`add_state` in
    ``_setup`` and implements ``_measure`` and ``_write``. The state buffers carry no
    class-level annotation: type checkers read every annotated attribute of such a class as
    a constructor field (``typing.dataclass_transform``).

    Args (options of every subclass):
        sync: ``None`` (all-reduce iff torch.distributed runs on more than one rank),
            ``True`` or ``False``.
        check_inputs: ``True`` (default) raises :class:`~entrokit.InputError` on a batch
            with a non-finite statistic; ``False`` skips such a batch without a host sync.
            The state is unchanged either way.
    """

    sync: bool | None = Option(sync_flag, default=None, kw_only=True)
    check_inputs: bool = Option(boolean, default=True, kw_only=True)
    #: what the state is called in error messages ("coefficient", "class prior", ...)
    state_name: ClassVar[str] = "state"
    #: skip a non-finite batch without a host sync when ``check_inputs=False`` and no
    #: collective runs (``_write`` runs, then the declared states are put back)
    skip_without_sync: ClassVar[bool] = False
    #: the key under which ``_measure`` may return the verdict on its raw inputs
    INPUTS_FINITE: ClassVar[str] = "inputs_finite"

    def _begin(self) -> None:
        super()._begin()
        self._state_policy: dict[str, SyncPolicy] = {}  # statistic name -> DDP policy
        self._state_default: dict[str, torch.Tensor] = {}

    # -- declaration ---------------------------------------------------------------------

    def add_state(self, name: str, default: torch.Tensor, *, sync: SyncPolicy = "none") -> None:
        """Register ``default`` as the buffer ``name`` (in ``state_dict``) with a DDP policy.

        ``sync`` names how the batch statistic that updates this state is combined over
        ranks: ``"mean"``, ``"sum"``, ``"gather"`` (per-sample rows, with their indices) or
        ``"none"``.
        """
        default = torch.as_tensor(default)
        self.add_statistic(name, sync=sync)
        self.register_buffer(name, default.clone())
        # a constant default (a [num_samples, C] buffer of zeros) is kept as one element
        flat = default.detach().reshape(-1)
        uniform = flat.numel() > 1 and bool((flat == flat[0]).all())
        self._state_default[name] = (flat[0] if uniform else default.detach()).clone()

    def add_statistic(self, name: str, *, sync: SyncPolicy) -> None:
        """Declare a batch statistic that is not itself a state, with its DDP policy.

        For a state fed by several statistics: an exact global mean over ranks with unequal
        batch sizes declares its numerator and its count, both ``"sum"``, and divides in
        ``_write``. (A state declared with :meth:`add_state` is also a statistic of its name.)
        """
        if sync not in _POLICIES:
            raise InputError(f"sync policy of statistic {name!r} must be one of {_POLICIES}, got {sync!r}.")
        self._state_policy[name] = sync

    def reset_state(self) -> None:
        """Put every declared state back to its initial value."""
        for name, default in self._state_default.items():
            getattr(self, name).copy_(default)

    # -- the step template ---------------------------------------------------------------

    def _measure(self, *args: Any, **kwargs: Any) -> Mapping[str, Any]:
        """Batch statistics keyed by the state (or declared statistic) they feed (override).

        A ``"mean"``/``"sum"``/``"none"`` state gets a floating tensor; a ``"gather"``
        state gets ``(index [b], rows [b, k])``. Values are detached by the template.
        """
        raise NotImplementedError

    def _write(self, stats: Mapping[str, Any]) -> None:
        """Write the new state from the reduced statistics (override)."""
        raise NotImplementedError

    def syncing(self) -> bool:
        """Whether :meth:`update_state` runs collectives (see ``sync``)."""
        initialised = dist.is_available() and dist.is_initialized()
        if self.sync is None:
            return initialised and dist.get_world_size() > 1
        if self.sync and not initialised:
            raise InputError(
                "sync=True needs an initialised torch.distributed process group; call "
                "torch.distributed.init_process_group(...) first or pass sync=None."
            )
        return bool(self.sync)

    @torch.no_grad()
    def update_state(
        self, *args: Any, what: str = "the batch statistics", **kwargs: Any
    ) -> Mapping[str, Any] | None:
        """Measure, reduce over ranks, refuse non-finite batches, write the state.

        ``what`` names the batch in the error message (``"logits of this batch"``); the other
        arguments go to ``_measure``.

        Returns the reduced statistics, or ``None`` when a non-finite batch was skipped
        (``check_inputs=False``; with ``skip_without_sync`` and no collective the statistics
        are returned, since telling would need a host sync).

        Raises:
            InputError: a statistic (or the inputs' verdict) is NaN or infinite on some rank
                (``check_inputs=True``); the state is unchanged on every rank.
        """
        raw = dict(self._measure(*args, **kwargs))
        inputs_ok = raw.pop(self.INPUTS_FINITE, None)
        stats: dict[str, Any] = {}
        for name, value in raw.items():
            if name not in self._state_policy:
                raise KeyError(
                    f"{type(self).__name__}._measure returned {name!r}, which is not a declared state or statistic"
                )
            if isinstance(value, tuple):
                stats[name] = tuple(v.detach() for v in value)
            else:
                stats[name] = torch.as_tensor(value).detach()
        reduced = self._reduce(stats, inputs_ok, what)
        if reduced is None:
            return None
        if isinstance(reduced, tuple):  # no collective, no host sync: apply, then put back
            reduced, ok = reduced
            self._write_where(reduced, ok)
            return reduced
        self._write(reduced)
        return reduced

    def _write_where(self, stats: dict[str, Any], ok: torch.Tensor) -> None:
        """``_write``, then every declared state is put back where ``ok`` is ``False``."""
        saved = {}
        for name in self._state_default:
            buf, stat = getattr(self, name), stats.get(name)
            if self._state_policy[name] == "gather" and isinstance(stat, tuple):
                saved[name] = (stat[0], buf[stat[0]].clone())
            else:
                saved[name] = (None, buf.clone())
        self._write(stats)
        for name, (idx, old) in saved.items():
            buf = getattr(self, name)
            if idx is None:
                buf.copy_(torch.where(ok, buf, old))
            else:
                buf[idx] = torch.where(ok, buf[idx], old)

    def _refuse(self, what: str, ranks: Sequence[int] | None = None) -> None:
        if self.check_inputs:
            raise InputError(non_finite_message(what, type(self).__name__, self.state_name, ranks))

    def _reduce(
        self, stats: dict[str, Any], inputs_ok: torch.Tensor | None, what: str
    ) -> dict[str, Any] | tuple[dict[str, Any], torch.Tensor] | None:
        def finite(v: Any) -> torch.Tensor:
            if isinstance(v, tuple):
                return torch.isfinite(v[1]).all()
            return torch.isfinite(v).all()

        if inputs_ok is not None:  # the inputs' verdict stands for the statistics computed from them
            local_ok = inputs_ok
            if not (isinstance(local_ok, torch.Tensor) and local_ok.dtype == torch.bool and local_ok.dim() == 0):
                local_ok = torch.as_tensor(local_ok, dtype=torch.bool).reshape(())
        else:
            verdicts = [finite(v) for v in stats.values()]
            local_ok = torch.stack(verdicts).all() if verdicts else torch.tensor(True)
        if not self.syncing():
            if self.skip_without_sync and not self.check_inputs:
                return stats, local_ok
            if not bool(local_ok):
                self._refuse(what)
                return None
            return stats
        world, rank = dist.get_world_size(), dist.get_rank()
        out = dict(stats)
        for name, v in stats.items():  # per-sample rows: the gather carries the verdicts
            if self._state_policy[name] == "gather":
                try:
                    out[name] = all_gather_rows(
                        v[0], v[1], sync=True, local_ok=local_ok, owner=type(self).__name__,
                        state=self.state_name, what=what,
                    )
                except InputError:
                    if self.check_inputs:
                        raise
                    return None
                local_ok = torch.tensor(True)
        flat = [(n, v) for n, v in stats.items() if self._state_policy[n] in ("mean", "sum")]
        first = next(iter(stats.values()), None)  # the verdicts travel on the statistics' device
        dev = torch.device("cpu") if first is None else (first[1] if isinstance(first, tuple) else first).device
        bad = torch.zeros(world, dtype=torch.float64, device=dev)
        bad[rank] = (~local_ok).to(torch.float64)
        parts = [torch.where(local_ok, v, torch.zeros_like(v)).reshape(-1).to(torch.float64) for _, v in flat]
        buf = torch.cat([*parts, bad])  # one all-reduce: statistics and every rank's verdict
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)
        ranks = (buf[buf.numel() - world :] > 0).nonzero().flatten().tolist()
        if ranks:
            self._refuse(what, ranks)
            return None
        offset = 0
        for name, v in flat:
            k = v.numel()
            total = buf[offset : offset + k].reshape(v.shape).to(v.dtype)
            out[name] = total / world if self._state_policy[name] == "mean" else total
            offset += k
        return out
