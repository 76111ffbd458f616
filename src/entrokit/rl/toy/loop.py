"""A reference GRPO loop for the toy tasks: a tiny GRU policy, rollouts, the group-normalised
advantage, PPO epochs over each rollout, and the evaluation measures.

Readable in one sitting; the entropy interventions plug in as an *objective*: a callable
``objective(batch) -> (loss, stats)`` built from :mod:`entrokit.rl.losses` and
:mod:`entrokit.rl.controllers` (see :func:`grpo_objective` for the plain one). Randomness is
explicit: every draw takes the ``generator`` passed in.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from entrokit._errors import InputError
from entrokit._validation import check_positive, check_positive_int
from entrokit.rl.entropy import token_entropy
from entrokit.rl.losses import clipped_surrogate, entropy_bonus
from entrokit.rl.toy.tasks import KeyDoorGrid

__all__ = [
    "GRUPolicy", "Rollout", "Batch", "sample", "group_advantages", "token_logprobs", "grpo_objective",
    "bonus_objective",
    "train_grpo", "evaluate", "pass_at_k",
]


class GRUPolicy(nn.Module):
    """A one-layer GRU whose initial state is the prompt's embedding.

    At step t it reads ``inputs[:, t]`` (the previous token, or the observation in a multi-turn
    task) and outputs logits over ``vocab_size`` actions. Weights are drawn from ``seed``
    without touching the global generator.
    """

    def __init__(self, num_prompts: int, num_inputs: int, vocab_size: int, hidden: int = 128, *, seed: int = 0) -> None:
        super().__init__()
        for name, v in (("num_prompts", num_prompts), ("num_inputs", num_inputs), ("vocab_size", vocab_size),
                        ("hidden", hidden)):
            check_positive_int(v, name)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            self.prompt = nn.Embedding(num_prompts, hidden)
            self.inp = nn.Embedding(num_inputs, hidden)
            self.gru = nn.GRU(hidden, hidden, batch_first=True)
            self.head = nn.Linear(hidden, vocab_size)

    def forward(self, prompt_ids: torch.Tensor, inputs: torch.Tensor, h: torch.Tensor | None = None):
        """Logits ``[B, T, V]`` for ``inputs [B, T]`` (and the last hidden state)."""
        if h is None:
            h = torch.tanh(self.prompt(prompt_ids)).unsqueeze(0)
        out, h = self.gru(self.inp(inputs), h)
        return self.head(out), h


@dataclass
class Rollout:
    """One batch of episodes: ``inputs``/``actions``/``mask`` are ``[B, T]``, ``rewards`` ``[B]``."""

    prompt_ids: torch.Tensor
    inputs: torch.Tensor
    actions: torch.Tensor
    mask: torch.Tensor
    rewards: torch.Tensor


def _draw(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def sample(policy: GRUPolicy, task: Any, prompt_ids: torch.Tensor, *, temperature: float = 1.0,
           generator: torch.Generator | None = None) -> Rollout:
    """Sample one answer (single-turn task) or one episode (:class:`KeyDoorGrid`) per prompt."""
    temperature = check_positive(temperature, "temperature")
    b = prompt_ids.numel()
    if isinstance(task, KeyDoorGrid):
        state, h = task.reset(prompt_ids), None
        obs, acts, live, rewards = [], [], [], torch.zeros(b)
        for _ in range(task.max_turns):
            o = task.observe(state)
            logits, h = policy(prompt_ids, o[:, None], h)
            a = _draw(logits[:, 0], temperature, generator)
            obs.append(o), acts.append(a), live.append(~state["done"])
            state, r = task.step(state, a)
            rewards += r
        return Rollout(prompt_ids, torch.stack(obs, 1), torch.stack(acts, 1), torch.stack(live, 1), rewards)
    inp = torch.full((b, 1), task.bos, dtype=torch.long)
    h, acts = None, []
    for _ in range(task.length):
        logits, h = policy(prompt_ids, inp, h)
        a = _draw(logits[:, 0], temperature, generator)
        acts.append(a)
        inp = a[:, None]
    actions = torch.stack(acts, 1)
    inputs = torch.cat([torch.full((b, 1), task.bos, dtype=torch.long), actions[:, :-1]], 1)
    return Rollout(prompt_ids, inputs, actions, task.valid_mask(actions), task.reward(prompt_ids, actions))


def group_advantages(rewards: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    r"""GRPO's outcome advantage (DeepSeekMath, Eq. 3 with outcome supervision):
    :math:`\hat A_{i} = (r_i - \mathrm{mean}(r_{g})) / (\mathrm{std}(r_{g}) + \epsilon)` within
    each group ``g`` (a row of ``rewards [P, G]``; ``std`` unbiased, as in verl and TRL). A
    group whose rewards are all equal gets advantage 0.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 2 or rewards.shape[1] < 2:
        raise InputError(f"rewards must be a [prompts, group] tensor with group >= 2, got "
                         f"{getattr(rewards, 'shape', type(rewards).__name__)}.")
    mean = rewards.mean(dim=1, keepdim=True)
    std = rewards.std(dim=1, keepdim=True)
    return (rewards - mean) / (std + eps)


def token_logprobs(logits: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
    """log pi(a_t | ...) of the taken actions, ``[B, T]``."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, actions[..., None]).squeeze(-1)


@dataclass
class Batch:
    """What an objective sees at one PPO epoch: ``logits [B, T, V]`` (with grad), ``logp`` and
    ``old_logp`` ``[B, T]``, per-response ``advantages [B]``, ``mask [B, T]``, the exact
    ``entropy [B, T]`` (:func:`~entrokit.rl.entropy.token_entropy`, with grad), the rollout's
    ``prompt_ids`` and ``rewards``, the training ``step`` and the PPO ``epoch``; ``policy``
    and ``task`` for objectives that draw auxiliary rollouts (AEPO)."""

    logits: torch.Tensor
    logp: torch.Tensor
    old_logp: torch.Tensor
    advantages: torch.Tensor
    mask: torch.Tensor
    entropy: torch.Tensor
    prompt_ids: torch.Tensor
    rewards: torch.Tensor
    step: int
    epoch: int
    policy: Any = None
    task: Any = None


Objective = Callable[[Batch], "tuple[torch.Tensor, dict[str, Any]]"]


def grpo_objective(clip: float = 0.2, clip_high: float | None = None) -> Objective:
    """Plain GRPO: the token-mean clipped surrogate, no entropy term, no KL."""

    def objective(b: Batch):
        return clipped_surrogate(b.logp, b.old_logp, b.advantages, b.mask, clip_low=clip, clip_high=clip_high,
                                 check_inputs=False)

    return objective


def bonus_objective(coef: float, clip: float = 0.2) -> Objective:
    """GRPO with a fixed entropy bonus: the clipped surrogate minus ``coef`` times the token-mean
    entropy (:func:`entrokit.rl.entropy_bonus`), the baseline the entropy papers start from."""

    def objective(b: Batch):
        pg, stats = clipped_surrogate(b.logp, b.old_logp, b.advantages, b.mask, clip_low=clip, check_inputs=False)
        eb, _ = entropy_bonus(b.entropy, b.mask, coef, check_inputs=False)
        return pg + eb, stats

    return objective


def train_grpo(
    policy: GRUPolicy,
    task: Any,
    objective: Objective | None = None,
    *,
    steps: int = 200,
    prompts_per_step: int = 32,
    group_size: int = 8,
    ppo_epochs: int = 4,
    lr: float = 3e-3,
    temperature: float | Callable[[int], float] = 1.0,
    generator: torch.Generator | None = None,
    callback: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, list[float]]:
    """GRPO: per step, sample ``group_size`` answers for each of ``prompts_per_step`` prompts,
    normalise rewards within groups, then take ``ppo_epochs`` Adam steps on ``objective``
    against the frozen rollout log-probabilities (the off-policy reuse that drives collapse).

    ``temperature`` may be a function of the step (AEPO's scheduler). Returns the history:
    ``entropy`` (valid-token mean of the rollout's exact entropy, before the update),
    ``reward`` (rollout mean) and the objective's stats at the first epoch.
    """
    objective = objective or grpo_objective()
    steps, ppo_epochs = check_positive_int(steps, "steps"), check_positive_int(ppo_epochs, "ppo_epochs")
    check_positive_int(prompts_per_step, "prompts_per_step")
    if check_positive_int(group_size, "group_size") < 2:
        raise InputError("group_size must be >= 2: GRPO normalises rewards within a group.")
    opt = torch.optim.Adam(policy.parameters(), lr=check_positive(lr, "lr"))
    hist: dict[str, list[float]] = {"entropy": [], "reward": []}
    for step in range(steps):
        tau = temperature(step) if callable(temperature) else temperature
        prompts = task.sample_prompts(prompts_per_step, generator=generator).repeat_interleave(group_size)
        ro = sample(policy, task, prompts, temperature=tau, generator=generator)
        adv = group_advantages(ro.rewards.view(-1, group_size)).reshape(-1)
        with torch.no_grad():
            old_logp = token_logprobs(policy(ro.prompt_ids, ro.inputs)[0], ro.actions)
        for epoch in range(ppo_epochs):
            logits, _ = policy(ro.prompt_ids, ro.inputs)
            ent = token_entropy(logits, mask=ro.mask, check_inputs=False)
            batch = Batch(logits, token_logprobs(logits, ro.actions), old_logp, adv, ro.mask, ent, ro.prompt_ids,
                          ro.rewards, step, epoch, policy, task)
            loss, stats = objective(batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if epoch == 0:
                m = ro.mask.float()
                row = {"entropy": float((ent.detach() * m).sum() / m.sum()), "reward": float(ro.rewards.mean())}
                row.update({k: float(v) for k, v in stats.items() if torch.as_tensor(v).numel() == 1})
        for k, v in row.items():
            hist.setdefault(k, []).append(v)
        if callback is not None:
            callback(step, row)
    return hist


def pass_at_k(n: int, c: torch.Tensor, k: int) -> torch.Tensor:
    r"""Unbiased pass@k from ``n`` samples with ``c`` correct (Chen et al. 2021, Eq. 1):
    :math:`1 - \binom{n-c}{k} / \binom{n}{k}`, per prompt."""
    if k > n:
        raise InputError(f"pass@k needs k <= n samples, got k={k}, n={n}.")
    c = c.double()
    short = n - c < k  # fewer than k wrong samples: every k-subset holds a correct one
    rest = torch.where(short, torch.full_like(c, float(k)), n - c)  # keeps lgamma finite where unused
    log_ratio = torch.lgamma(rest + 1) - torch.lgamma(rest - k + 1) - math.lgamma(n + 1) + math.lgamma(n - k + 1)
    return torch.where(short, torch.ones_like(c), 1.0 - torch.exp(log_ratio))


@torch.no_grad()
def evaluate(policy: GRUPolicy, task: Any, *, samples: int = 128, k: int = 64, temperature: float = 1.0,
             generator: torch.Generator | None = None) -> dict[str, float]:
    """Sample ``samples`` answers per prompt (every prompt of the task) and measure:

    * ``pass@1``: mean reward; ``pass@k``: the unbiased estimate (:func:`pass_at_k`), mean over
      prompts;
    * ``distinct``: distinct correct answers summed over prompts (for the gridworld: distinct
      successful action sequences);
    * ``coverage``: ``distinct`` over the number of correct answers that exist
      (single-turn tasks with ``num_solutions``); for a task without an enumerable answer set
      (the gridworld, whose successful action sequences are too many to count usefully): the
      share of prompts solved at least once in ``samples`` attempts (the "coverage" of Brown et
      al., 2024, *Large Language Monkeys*);
    * ``entropy``: valid-token mean entropy of the sampled answers;
    * ``noise_mass`` (only for a :class:`~entrokit.rl.toy.DigitSum` with noise tokens): the
      valid-token mean probability of the noise tokens.
    """
    n = check_positive_int(samples, "samples")
    prompts = torch.arange(task.num_prompts).repeat_interleave(n)
    ro = sample(policy, task, prompts, temperature=temperature, generator=generator)
    logits, _ = policy(ro.prompt_ids, ro.inputs)
    ent = token_entropy(logits, mask=ro.mask, check_inputs=False)
    m = ro.mask.float()
    correct = ro.rewards.view(task.num_prompts, n)
    keys = task.answer_key(ro.actions) if hasattr(task, "answer_key") else None
    if keys is None:
        acts = (ro.actions * ro.mask).tolist()
        keys = [tuple(a) for a in acts]
    distinct = len({(int(p), keys[i]) for i, p in enumerate(ro.prompt_ids.tolist()) if ro.rewards[i] > 0})
    total = getattr(task, "num_solutions", None)
    out = {
        "pass@1": float(correct.mean()),
        f"pass@{k}": float(pass_at_k(n, correct.sum(1), k).mean()),
        "distinct": float(distinct),
        "coverage": float(distinct / int(total.sum())) if total is not None else float((correct.sum(1) > 0).double().mean()),
        "entropy": float((ent * m).sum() / m.sum()),
    }
    if getattr(task, "noise_tokens", 0):
        noise = torch.softmax(logits.float(), dim=-1)[..., 10:].sum(-1)
        out["noise_mass"] = float((noise * m).sum() / m.sum())
    return out
