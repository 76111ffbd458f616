"""TRL's GRPOTrainer with entrokit's entropy op, a controller and an intervention, end to end on CPU.

A tiny Qwen2 built from a config with random weights, a WordLevel tokenizer built in code and a
reward function in code: nothing is downloaded. The TRL tests are skipped only when the ``trl``
extra is missing; the module itself must import without it.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from entrokit import InputError
from entrokit.rl import FixedCoef, PIController, anchored_entropy_loss
from entrokit.rl.integrations.trl import CONTROL_FILE, EntropyControl

HAS_TRL = importlib.util.find_spec("trl") is not None
needs_trl = pytest.mark.skipif(not HAS_TRL, reason="needs the trl extra: pip install 'entrokit[trl]'")

if HAS_TRL:
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM
    from trl import GRPOConfig, GRPOTrainer

    from entrokit.rl.integrations.trl import EntropyControlGRPOTrainer

WORDS = ["<pad>", "<eos>", "<unk>"] + [f"w{i}" for i in range(29)]


def tokenizer():
    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def model(seed=0):
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                      tie_word_embeddings=False, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return Qwen2ForCausalLM(cfg)


def reward_w3(completions, **kwargs):
    return [float(c.split().count("w3")) for c in completions]


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                max_steps=3, learning_rate=1e-2, logging_steps=1, report_to="none", use_cpu=True, seed=0,
                save_strategy="steps", save_steps=2, beta=0.0, dataloader_num_workers=0, bf16=False)
    base.update(kw)
    return GRPOConfig(**base)


def data():
    return Dataset.from_dict({"prompt": ["w5 w6 w7", "w8 w9", "w10 w11 w12", "w13"] * 4})


def trainer(tmp_path, control=None, **kw):
    return EntropyControlGRPOTrainer(model=model(), reward_funcs=reward_w3, args=config(tmp_path, **kw),
                                     train_dataset=data(), processing_class=tokenizer(), entropy_control=control)


@needs_trl
def test_entropy_op_matches_trl_fused_head(tmp_path):
    tr = trainer(tmp_path)
    assert getattr(tr.model, "_entrokit_head", False)  # entrokit's head is installed, not the fallback
    ids = torch.randint(3, len(WORDS), (3, 9), generator=torch.Generator().manual_seed(1))
    am = torch.ones_like(ids)
    am[0, -2:] = 0
    ours = tr._get_per_token_logps_and_entropies(tr.model, ids, am, 5, compute_entropy=True)
    theirs = GRPOTrainer._get_per_token_logps_and_entropies(tr, tr.model, ids, am, 5, compute_entropy=True)
    valid = am[:, -5:].bool()
    torch.testing.assert_close(ours[0][valid], theirs[0][valid], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours[1][valid], theirs[1][valid], rtol=1e-5, atol=1e-5)
    # and the entropy is differentiable through entrokit's op
    ours[1][valid].sum().backward()
    assert tr.model.lm_head.weight.grad is not None and tr.model.lm_head.weight.grad.abs().sum() > 0


@needs_trl
def test_grpo_steps_with_controller_intervention_and_resume(tmp_path, monkeypatch):
    import entrokit.rl.integrations.trl as integration

    calls = []
    op = integration.token_logprob_entropy
    monkeypatch.setattr(integration, "token_logprob_entropy", lambda *a, **k: calls.append(1) or op(*a, **k))
    ctrl = PIController.tuned(target=3.6, gain=5.0, lam=0.5, coef=0.01, sync=False)
    tr = trainer(tmp_path, EntropyControl(controller=ctrl))
    tr.train()
    assert len(calls) >= 3  # the loss of every step went through entrokit's op
    assert int(ctrl.num_steps) == 3  # one measurement per optimizer step
    logs = [h for h in tr.state.log_history if "entrokit/coef" in h]
    assert len(logs) == 3
    coefs = [h["entrokit/coef"] for h in logs]
    entropies = [h["entrokit/entropy"] for h in logs]
    assert all(0 < e < torch.log(torch.tensor(float(len(WORDS)))) for e in entropies)
    assert coefs[-1] == pytest.approx(ctrl.value)
    assert len(set(coefs)) > 1  # the controller acted
    saved = torch.load(tmp_path / "checkpoint-2" / CONTROL_FILE, weights_only=True)
    assert int(saved["num_steps"]) == 2
    fresh = PIController.tuned(target=3.6, gain=5.0, lam=0.5, coef=0.01, sync=False)
    seen = []
    original_step = fresh.step

    def spy(measured):
        seen.append({k: v.clone() for k, v in fresh.state_dict().items()})
        return original_step(measured)

    fresh.step = spy
    tr2 = trainer(tmp_path, EntropyControl(controller=fresh))
    tr2.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert len(seen) == 1  # one step left after the checkpoint, taken from the saved state
    assert all(torch.equal(saved[k], v) for k, v in seen[0].items())
    assert int(fresh.num_steps) == 3


@needs_trl
def test_intervention_changes_the_update(tmp_path):
    """The same run with coefficient 0 and 0.5: the bonus moves the weights differently."""
    weights = []
    for c in (0.0, 0.5):
        tr = trainer(tmp_path / str(c), EntropyControl(controller=FixedCoef(c, sync=False)), max_steps=1,
                     save_strategy="no")
        tr.train()
        weights.append(tr.model.lm_head.weight.detach().clone())
    assert not torch.allclose(weights[0], weights[1])


@needs_trl
def test_custom_intervention_and_gradient_accumulation(tmp_path):
    anchored = functools.partial(anchored_entropy_loss, anchor=2.0)

    def siren(entropy, mask, coef, *, mode):
        return anchored(entropy, mask, coef=max(coef, 1e-3), mode=mode)

    ctrl = FixedCoef(0.01, sync=False)
    tr = trainer(tmp_path, EntropyControl(controller=ctrl, intervention=siren, mode="seq-mean-token-mean"),
                 max_steps=2, gradient_accumulation_steps=2, per_device_train_batch_size=2, save_strategy="no")
    tr.train()
    assert int(ctrl.num_steps) == 2  # once per optimizer step, not per micro-batch


@needs_trl
@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"entropy_coef": 0.1}, InputError, "TRL's own entropy bonus is on"),
        ({"use_adaptive_entropy": True}, InputError, "TRL's own entropy bonus is on"),
    ],
)
def test_double_bonus_is_refused(tmp_path, kwargs, error, match):
    with pytest.raises(error, match=match):
        trainer(tmp_path, EntropyControl(), **kwargs)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"controller": torch.nn.Linear(1, 1)}, TypeError, "controller must be an entrokit.rl controller"),
        ({"intervention": "penalty"}, InputError, "intervention must be 'bonus' or a callable"),
        ({"mode": "mean"}, InputError, "mode must be one of"),
    ],
)
def test_bad_entropy_control(kwargs, error, match):
    with pytest.raises(error, match=match):
        EntropyControl(**kwargs)


def test_module_imports_without_trl_and_names_the_extra():
    code = textwrap.dedent(
        """
        import importlib.abc, sys

        class _Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "trl":
                    raise ModuleNotFoundError("No module named 'trl' (blocked)", name=name)

        sys.meta_path.insert(0, _Block())
        import entrokit.rl.integrations.trl as m
        m.EntropyControl()
        try:
            m.EntropyControlGRPOTrainer
        except ImportError as err:
            assert "pip install 'entrokit[trl]'" in str(err), err
        else:
            raise AssertionError("no ImportError")
        """
    )
    src = str(Path(__file__).resolve().parents[3] / "src")
    env = {**os.environ, "PYTHONPATH": src + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
