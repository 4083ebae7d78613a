"""The behaviour trainer's options: per-task defaults, the actor loss (other agents' actions, pre-tanh penalty)."""

import json

import pytest
import torch

from omsd_data.policies import StackedActor
from omsd_data.train_behaviour import FAMILY_DEFAULTS, TASK_DEFAULTS, Args, StackedTwinCritic, actor_loss
from omsd_data.train_behaviour import main as train
from omsd_utils.runs import RunError

TINY = dict(
    total_steps=480,
    learning_starts=160,
    eval_every=160,
    eval_episodes=2,
    batch_size=32,
    num_envs=4,
    actor_hidden=16,
    critic_hidden=16,
)


def _run(tmp_path, name, **kw):
    path = tmp_path / f"{name}.pt"
    train(Args(**{"task": "simple_spread", **TINY, **kw, "out": str(path)}))
    ckpt = torch.load(path, weights_only=True)
    return ckpt["policies"], json.loads(ckpt["info_json"])


def test_task_defaults_are_applied_and_recorded(tmp_path):
    _, info = _run(tmp_path, "spread")
    for k, v in TASK_DEFAULTS["simple_spread"].items():
        assert info["args"][k] == v  # so the checkpoint says how it was made
    _, info = _run(tmp_path, "spread4", update_every=4)
    assert info["args"]["update_every"] == 4  # an explicit value beats the task's default
    _, info = _run(tmp_path, "tag", task="simple_tag")
    assert (info["args"]["update_every"], info["args"]["preact_penalty"], info["args"]["others_in_actor_update"]) == (
        TASK_DEFAULTS["simple_tag"]["update_every"],
        TASK_DEFAULTS["simple_tag"]["preact_penalty"],
        "dataset",  # not in the task's defaults: the trainer's base value
    )
    assert info["args"]["batch_size"] == TINY["batch_size"] and info["args"]["gamma"] == FAMILY_DEFAULTS["mpe"]["gamma"]


def _loss_setup(heads):
    torch.manual_seed(0)
    n, B = 3, 64
    actor = StackedActor(n, 18, 2, 16)
    critic = StackedTwinCritic(heads, n * 18 + n * 2, 16)
    return actor, critic, torch.randn(B, n, 18), torch.rand(B, n, 2) * 2 - 1


@pytest.mark.parametrize("heads", [1, 3])
def test_actor_loss_penalty_and_other_agents_actions(heads):
    actor, critic, ob, ac = _loss_setup(heads)
    with torch.no_grad():
        pre = actor.pre_tanh(ob.transpose(0, 1))
        l0 = actor_loss(actor, critic, ob, ac, "dataset", 0.0, heads)
        l1 = actor_loss(actor, critic, ob, ac, "dataset", 0.5, heads)
        torch.testing.assert_close(l1 - l0, 0.5 * pre.pow(2).mean((1, 2)).sum())
        ac2 = torch.rand_like(ac) * 2 - 1
        # 'dataset': the other agents' replayed actions enter the loss; 'policy': they do not
        assert not torch.isclose(l0, actor_loss(actor, critic, ob, ac2, "dataset", 0.0, heads))
        torch.testing.assert_close(
            actor_loss(actor, critic, ob, ac, "policy", 0.0, heads),
            actor_loss(actor, critic, ob, ac2, "policy", 0.0, heads),
        )


def test_policy_mode_gradient_is_the_joint_policy_gradient():
    """With a team critic, 'policy' gives each actor the gradient of Q(o, pi_1(o_1), .., pi_n(o_n))."""
    actor, critic, ob, ac = _loss_setup(1)
    actor_loss(actor, critic, ob, ac, "policy", 0.0, 1).backward()
    g = [p.grad.clone() for p in actor.parameters()]
    actor.zero_grad()
    B = ob.shape[0]
    a = actor(ob.transpose(0, 1)).transpose(0, 1)
    x = torch.cat([ob.reshape(B, -1), a.reshape(B, -1)], 1)
    (-critic(x.expand(2, B, -1))[0].mean()).backward()
    for g1, p in zip(g, actor.parameters()):
        torch.testing.assert_close(g1, p.grad)


def test_bad_option_value(tmp_path):
    with pytest.raises(RunError, match="--others-in-actor-update must be 'dataset' or 'policy', got 'mine'"):
        train(Args(task="simple_spread", others_in_actor_update="mine", out=str(tmp_path / "x.pt")))
    assert not (tmp_path / "x.pt").exists()
