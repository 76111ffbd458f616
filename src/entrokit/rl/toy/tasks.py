"""Small verifiable-reward tasks generated in code (no download).

Every task is a fixed table of prompts built from a seed, an action vocabulary and a
verifier. Single-turn tasks (:class:`DigitSum`, :class:`Countdown`, :class:`Permutation`,
:class:`MixedArithmetic`) share one interface:

* ``num_prompts``, ``vocab_size``, ``length`` (tokens per answer) and ``bos`` (the id the
  policy reads before its first token, ``vocab_size``);
* ``reward(prompt_ids, actions) -> float tensor [B]`` in {0, 1}: the verifier;
* ``valid_mask(actions) -> bool [B, length]``: the tokens that count (all of them, except after
  Countdown's end token);
* ``num_solutions`` (``[num_prompts]``): how many distinct correct answers each prompt has, so
  that coverage = distinct correct answers found / answers that exist.

:class:`KeyDoorGrid` is the multi-turn task: a batched environment with ``reset`` / ``step``
and a sparse terminal reward (anchors note, section 4: the toy RLVR suites).
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from entrokit._errors import InputError
from entrokit._validation import check_positive_int

__all__ = ["DigitSum", "Countdown", "Permutation", "MixedArithmetic", "KeyDoorGrid", "TASKS"]


def _int_at_least(value: Any, name: str, minimum: int) -> int:
    v = check_positive_int(value, name) if minimum >= 1 else value
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise InputError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return v


def _check_batch(task: Any, prompt_ids: Any, actions: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes, dtypes and ranges of a (prompt_ids [B], actions [B, length]) pair."""
    for name, t in (("prompt_ids", prompt_ids), ("actions", actions)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}.")
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise TypeError(f"{name} must hold integer ids, got dtype {t.dtype}.")
    if prompt_ids.dim() != 1 or actions.dim() != 2 or actions.shape[0] != prompt_ids.shape[0]:
        raise InputError(
            f"expected prompt_ids [B] and actions [B, {task.length}], got {tuple(prompt_ids.shape)} and "
            f"{tuple(actions.shape)}.")
    if actions.shape[1] != task.length:
        raise InputError(f"actions must have {task.length} tokens per answer, got {actions.shape[1]}.")
    if prompt_ids.numel() and (int(prompt_ids.min()) < 0 or int(prompt_ids.max()) >= task.num_prompts):
        raise InputError(f"prompt_ids must lie in [0, {task.num_prompts}), got values outside.")
    if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= task.vocab_size):
        raise InputError(f"actions must lie in [0, {task.vocab_size}), got values outside.")
    return prompt_ids.long(), actions.long()


class _SingleTurn:
    num_prompts: int
    vocab_size: int
    length: int

    @property
    def bos(self) -> int:
        return self.vocab_size

    def valid_mask(self, actions: torch.Tensor) -> torch.Tensor:
        return torch.ones(actions.shape, dtype=torch.bool, device=actions.device)

    def sample_prompts(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` prompt ids drawn uniformly with replacement."""
        n = check_positive_int(n, "n")
        return torch.randint(self.num_prompts, (n,), generator=generator)


class DigitSum(_SingleTurn):
    r"""Emit ``digits`` digits whose sum equals the prompted target :math:`t \in \{0..9d\}`.

    Reward 1 iff every token is a digit (< 10) and they sum to :math:`t`. With
    ``noise_tokens = n`` the vocabulary has :math:`10 + n` tokens, the last :math:`n` never
    correct: the regime where a naive entropy bonus spreads mass on irrelevant tokens (AEnt,
    SIREN). A random policy over the digits solves :math:`t = 9d/2` often and :math:`t = 0`
    almost never: mixed difficulty within one task. Every digit string is correct for exactly
    one target, so ``num_solutions.sum() == 10**digits``.
    """

    def __init__(self, digits: int = 4, noise_tokens: int = 0) -> None:
        self.length = _int_at_least(digits, "digits", 1)
        self.noise_tokens = _int_at_least(noise_tokens, "noise_tokens", 0)
        self.vocab_size = 10 + self.noise_tokens
        self.num_prompts = 9 * self.length + 1
        counts = torch.zeros(self.num_prompts, dtype=torch.long)
        poly = torch.ones(1, dtype=torch.long)
        for _ in range(self.length):  # number of digit strings per sum: coefficients of (1+x+..+x^9)^d
            nxt = torch.zeros(poly.numel() + 9, dtype=torch.long)
            for d in range(10):
                nxt[d:d + poly.numel()] += poly
            poly = nxt
        counts[:] = poly
        self.num_solutions = counts

    def reward(self, prompt_ids: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        p, a = _check_batch(self, prompt_ids, actions)
        ok = (a < 10).all(dim=1) & (a.sum(dim=1) == p)
        return ok.float()


class Countdown(_SingleTurn):
    r"""Countdown-lite: combine the prompt's numbers with + - * into the target, in RPN.

    Each prompt holds ``n_numbers`` numbers in [1, ``max_number``] and a target made by a random
    valid expression over them (so every prompt is solvable). Tokens: ``0..n-1`` push the
    prompt's i-th number, then ``+``, ``-``, ``*``, and ``end``. An answer of ``length`` tokens
    (default :math:`2n - 1`) is read up to its first ``end``; reward 1 iff it is a well-formed
    RPN expression that uses each number at most once and evaluates to the target. Tokens after
    ``end`` are masked (``valid_mask``).
    """

    OPS = ("+", "-", "*")

    def __init__(self, num_prompts: int = 64, n_numbers: int = 3, max_number: int = 9, *, seed: int = 0,
                 length: int | None = None) -> None:
        self.num_prompts = _int_at_least(num_prompts, "num_prompts", 1)
        self.n_numbers = _int_at_least(n_numbers, "n_numbers", 2)
        max_number = _int_at_least(max_number, "max_number", 1)
        self.length = 2 * self.n_numbers - 1 if length is None else _int_at_least(length, "length", 1)
        self.end = self.n_numbers + len(self.OPS)
        self.vocab_size = self.end + 1
        g = torch.Generator().manual_seed(int(seed))
        self.numbers = torch.randint(1, max_number + 1, (self.num_prompts, self.n_numbers), generator=g)
        targets = []
        for i in range(self.num_prompts):
            k = int(torch.randint(2, self.n_numbers + 1, (1,), generator=g))
            order = torch.randperm(self.n_numbers, generator=g)[:k].tolist()
            expr = [order[0]]
            for j in order[1:]:
                expr += [j, self.n_numbers + int(torch.randint(len(self.OPS), (1,), generator=g))]
            targets.append(self._evaluate(expr, self.numbers[i].tolist()))
        self.targets = torch.tensor(targets, dtype=torch.long)
        self._num_solutions: torch.Tensor | None = None

    @property
    def num_solutions(self) -> torch.Tensor:
        """Distinct correct answers per prompt, by enumeration (computed once, on first use)."""
        if self._num_solutions is None:
            self._num_solutions = torch.tensor([self._count(i) for i in range(self.num_prompts)], dtype=torch.long)
        return self._num_solutions

    def _evaluate(self, tokens: list[int], numbers: list[int]) -> int | None:
        stack: list[int] = []
        used: set[int] = set()
        for tok in tokens:
            if tok == self.end:
                break
            if tok < self.n_numbers:
                if tok in used:
                    return None
                used.add(tok)
                stack.append(numbers[tok])
            else:
                if len(stack) < 2:
                    return None
                b, a = stack.pop(), stack.pop()
                op = self.OPS[tok - self.n_numbers]
                stack.append(a + b if op == "+" else a - b if op == "-" else a * b)
        return stack[0] if len(stack) == 1 else None

    def _canonical(self, tokens: list[int]) -> tuple[int, ...]:
        out = []
        for tok in tokens:
            if tok == self.end:
                break
            out.append(tok)
        return tuple(out)

    def _count(self, i: int) -> int:
        numbers, target = self.numbers[i].tolist(), int(self.targets[i])
        seen = set()
        for seq in itertools.product(range(self.vocab_size), repeat=self.length):
            if self._evaluate(list(seq), numbers) == target:
                seen.add(self._canonical(list(seq)))
        return len(seen)

    def valid_mask(self, actions: torch.Tensor) -> torch.Tensor:
        ended = (actions == self.end).long().cumsum(dim=1)
        # the end token itself counts; what follows it does not
        return (ended - (actions == self.end).long()) == 0

    def answer_key(self, actions: torch.Tensor) -> list[tuple[int, ...]]:
        """The part of each answer before ``end`` (distinct answers are counted on it)."""
        return [self._canonical(row) for row in actions.tolist()]

    def reward(self, prompt_ids: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        p, a = _check_batch(self, prompt_ids, actions)
        out = [float(self._evaluate(row, self.numbers[i].tolist()) == int(self.targets[i]))
               for i, row in zip(p.tolist(), a.tolist())]
        return torch.tensor(out, dtype=torch.float32, device=actions.device)


class Permutation(_SingleTurn):
    r"""Order ``n`` items so that every precedence constraint of the prompt holds.

    Prompt i holds ``n_constraints`` pairs (a, b) meaning "a before b" (drawn acyclic from the
    seed). Reward 1 iff the answer is a permutation of ``0..n-1`` that satisfies them all. Many
    answers are valid (e.g. n = 5 with 2 constraints: 30 of the 120 orders), so a policy can
    be accurate with high or low diversity: the accuracy-diversity trade-off of AEPO.
    """

    def __init__(self, num_prompts: int = 32, n_items: int = 5, n_constraints: int = 2, *, seed: int = 0) -> None:
        self.num_prompts = _int_at_least(num_prompts, "num_prompts", 1)
        self.length = _int_at_least(n_items, "n_items", 2)
        self.vocab_size = self.length
        n_pairs = self.length * (self.length - 1) // 2
        self.n_constraints = _int_at_least(n_constraints, "n_constraints", 0)
        if self.n_constraints > n_pairs:
            raise InputError(f"n_constraints must be at most n_items*(n_items-1)/2 = {n_pairs}, got {n_constraints}.")
        g = torch.Generator().manual_seed(int(seed))
        cons = torch.empty(self.num_prompts, self.n_constraints, 2, dtype=torch.long)
        for i in range(self.num_prompts):
            order = torch.randperm(self.length, generator=g)  # a hidden order keeps constraints acyclic
            pairs = [(int(order[x]), int(order[y])) for x in range(self.length) for y in range(x + 1, self.length)]
            pick = torch.randperm(len(pairs), generator=g)[:self.n_constraints].tolist()
            for k, j in enumerate(pick):
                cons[i, k] = torch.tensor(pairs[j])
        self.constraints = cons
        perms = torch.tensor(list(itertools.permutations(range(self.length))), dtype=torch.long)
        self.num_solutions = torch.stack([self._satisfied(torch.full((perms.shape[0],), i), perms).sum()
                                          for i in range(self.num_prompts)])

    def _satisfied(self, p: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        n = self.length
        is_perm = (torch.nn.functional.one_hot(a, n).sum(dim=1) == 1).all(dim=1)
        pos = torch.argsort(a, dim=1)  # pos[b, item] = position of item (valid when a is a permutation)
        c = self.constraints[p]  # [B, k, 2]
        before = torch.gather(pos, 1, c[..., 0]) < torch.gather(pos, 1, c[..., 1])
        return is_perm & before.all(dim=1)

    def reward(self, prompt_ids: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        p, a = _check_batch(self, prompt_ids, actions)
        return self._satisfied(p.cpu(), a.cpu()).float().to(actions.device)


class MixedArithmetic(_SingleTurn):
    r"""Answer :math:`x \in \{0..99\}` (two digits) with :math:`x \equiv a + b \pmod m`.

    Prompt i holds (a, b, m) with its modulus drawn from ``moduli``: prompt i has
    :math:`\lceil (100 - r)/m \rceil` valid answers (r = (a+b) mod m), so a random policy passes with
    probability about :math:`1/m`: the pass rate is set per prompt (AER's difficulty-aware
    coefficients). ``pass_rate_at_init`` gives the exact random-policy rate.
    """

    def __init__(self, num_prompts: int = 40, moduli: tuple[int, ...] = (2, 5, 10, 25, 50), *, seed: int = 0) -> None:
        self.num_prompts = _int_at_least(num_prompts, "num_prompts", 1)
        if not moduli or any(isinstance(m, bool) or not isinstance(m, int) or not 1 <= m <= 100 for m in moduli):
            raise InputError(f"moduli must be a non-empty tuple of integers in [1, 100], got {moduli!r}.")
        self.length, self.vocab_size = 2, 10
        g = torch.Generator().manual_seed(int(seed))
        self.a = torch.randint(0, 100, (self.num_prompts,), generator=g)
        self.b = torch.randint(0, 100, (self.num_prompts,), generator=g)
        self.moduli = torch.tensor(moduli, dtype=torch.long)[torch.arange(self.num_prompts) % len(moduli)]
        r = (self.a + self.b) % self.moduli
        self.num_solutions = (99 - r) // self.moduli + 1
        self.pass_rate_at_init = self.num_solutions.float() / 100.0

    def reward(self, prompt_ids: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        p, a = _check_batch(self, prompt_ids, actions)
        x = a[:, 0] * 10 + a[:, 1]
        m = self.moduli.to(a.device)[p]
        return ((x - self.a.to(a.device)[p] - self.b.to(a.device)[p]) % m == 0).float()


class KeyDoorGrid:
    r"""Multi-turn key-door gridworld with text actions and a sparse terminal reward.

    A ``size`` x ``size`` room; the agent starts in a corner, must walk to the key, pick it up
    (``pick``), walk to the door and ``open`` it, within ``max_turns`` turns (10-30). Actions:
    ``up, down, left, right, pick, open`` (ids 0-5). Reward 1 only when the door opens (the
    episode then ends); 0 at every other turn and on time-out. Prompts: ``num_layouts`` key and
    door positions drawn from the seed. Observation id per turn:
    ``((layout * size + row) * size + col) * 2 + has_key`` (``num_observations`` in all).
    """

    ACTIONS = ("up", "down", "left", "right", "pick", "open")

    def __init__(self, size: int = 5, max_turns: int = 20, num_layouts: int = 8, *, seed: int = 0) -> None:
        self.size = _int_at_least(size, "size", 3)
        self.max_turns = _int_at_least(max_turns, "max_turns", 1)
        self.num_prompts = _int_at_least(num_layouts, "num_layouts", 1)
        self.vocab_size = len(self.ACTIONS)
        self.num_observations = self.num_prompts * self.size * self.size * 2
        g = torch.Generator().manual_seed(int(seed))
        cells = self.size * self.size
        layouts = []
        for _ in range(self.num_prompts):
            key, door = (torch.randperm(cells - 1, generator=g)[:2] + 1).tolist()  # never the start cell 0
            layouts.append((key, door))
        self.key = torch.tensor([k for k, _ in layouts])
        self.door = torch.tensor([d for _, d in layouts])
        # the shortest episode: walk to the key, pick, walk to the door, open
        dist = lambda a, b: abs(a // self.size - b // self.size) + abs(a % self.size - b % self.size)  # noqa: E731
        self.optimal_turns = torch.tensor([dist(0, k) + 1 + dist(k, d) + 1 for k, d in layouts])
        if int(self.optimal_turns.max()) > self.max_turns:
            raise InputError(f"max_turns={max_turns} is shorter than the longest optimal episode "
                             f"({int(self.optimal_turns.max())} turns); raise max_turns.")

    def sample_prompts(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` layout ids drawn uniformly with replacement (the prompts of a GRPO step)."""
        n = check_positive_int(n, "n")
        return torch.randint(self.num_prompts, (n,), generator=generator)

    def reset(self, prompt_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """State of a batch of episodes at turn 0 (agent at cell 0, no key)."""
        if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 1:
            raise InputError("prompt_ids must be a 1-d integer tensor of layout ids.")
        if prompt_ids.numel() and (int(prompt_ids.min()) < 0 or int(prompt_ids.max()) >= self.num_prompts):
            raise InputError(f"prompt_ids must lie in [0, {self.num_prompts}).")
        b = prompt_ids.numel()
        return {"layout": prompt_ids.long(), "pos": torch.zeros(b, dtype=torch.long),
                "has_key": torch.zeros(b, dtype=torch.bool), "done": torch.zeros(b, dtype=torch.bool)}

    def observe(self, state: dict[str, torch.Tensor]) -> torch.Tensor:
        return (state["layout"] * self.size * self.size + state["pos"]) * 2 + state["has_key"].long()

    def step(self, state: dict[str, torch.Tensor], actions: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Apply one action per episode; returns (new state, reward [B]). Finished episodes stay put."""
        if not isinstance(actions, torch.Tensor) or actions.shape != state["pos"].shape:
            raise InputError(f"actions must be a tensor of shape {tuple(state['pos'].shape)}.")
        if actions.numel() and (int(actions.min()) < 0 or int(actions.max()) >= self.vocab_size):
            raise InputError(f"actions must lie in [0, {self.vocab_size}).")
        s = self.size
        row, col = state["pos"] // s, state["pos"] % s
        live = ~state["done"]
        row = torch.where(live & (actions == 0), (row - 1).clamp(min=0), row)
        row = torch.where(live & (actions == 1), (row + 1).clamp(max=s - 1), row)
        col = torch.where(live & (actions == 2), (col - 1).clamp(min=0), col)
        col = torch.where(live & (actions == 3), (col + 1).clamp(max=s - 1), col)
        pos = row * s + col
        key, door = self.key[state["layout"]], self.door[state["layout"]]
        has_key = state["has_key"] | (live & (actions == 4) & (pos == key))
        opened = live & (actions == 5) & has_key & (pos == door)
        new = {"layout": state["layout"], "pos": pos, "has_key": has_key, "done": state["done"] | opened}
        return new, opened.float()


TASKS = {"digit_sum": DigitSum, "countdown": Countdown, "permutation": Permutation,
         "mixed_arithmetic": MixedArithmetic, "key_door": KeyDoorGrid}
