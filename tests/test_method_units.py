"""Unit tests of the algorithm's pieces: VP-SDE, losses, conditioning, the DDIM grid and the stage-2 gradient. Every
test runs against both scripts, whose copies of the algorithm must not drift apart."""

import importlib
import math

import pytest
import torch


@pytest.fixture(params=["oma_sd_mpe", "oma_sd_mamujoco"])
def om(request):
    return importlib.import_module(request.param)


def test_vp_sde_coefficients(om):
    t = torch.tensor([0.0, 0.5, 1.0])
    alpha_t, sigma_t = om.vp_sde(t)
    assert alpha_t[0] == pytest.approx(1.0) and sigma_t[0] == pytest.approx(0.0)
    # log alpha_t = -1/4 t^2 (20 - 0.1) - 1/2 t 0.1
    assert alpha_t[1].item() == pytest.approx(math.exp(-0.25 * 0.25 * 19.9 - 0.025), rel=1e-6)
    assert alpha_t[2].item() == pytest.approx(math.exp(-0.25 * 19.9 - 0.05), rel=1e-6)
    assert torch.allclose(alpha_t**2 + sigma_t**2, torch.ones(3))


class Echo(torch.nn.Module):
    """A 'network' that predicts eps_hat = 0.5 * x_t: makes the loss computable by hand."""

    def forward(self, x_t, t, cond):
        return 0.5 * x_t


def test_diffusion_loss_value(om):
    a0 = torch.randn(3, 64, 2)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    loss = om.diffusion_loss(Echo(), a0, None, g1)
    t = torch.rand(3, 64, 1, generator=g2) * (1 - 1e-3) + 1e-3
    z = torch.randn(a0.shape, generator=g2)
    alpha_t, sigma_t = om.vp_sde(t)
    expected = ((0.5 * (alpha_t * a0 + sigma_t * z) - z) ** 2).sum(-1).mean(-1)
    assert loss.shape == (3,)
    assert torch.allclose(loss, expected)
    assert t.min() >= 1e-3


def test_bf16_autocast_loss_and_gradient_agree_with_float32(om):
    """Stage 1a under bfloat16 autocast (the default where the CPU runs it natively): the same loss to 0.1 % and a
    gradient pointing the same way, on the default network of spread's shapes. (Run on any CPU; emulated if needed.)"""
    torch.manual_seed(0)
    net, mask = om.ScoreNet(3, 2, 18 + 2 * 2, 128), om.prefix_mask(3, "sequential")
    a0, obs = torch.rand(3, 256, 2) * 2 - 1, torch.randn(3, 256, 18)
    losses, grads = [], []
    for bf16 in (False, True):
        net.zero_grad()
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            loss = om.diffusion_loss(net, a0, om.condition(obs, a0, mask), torch.Generator().manual_seed(1))
        loss.sum().backward()
        losses.append(loss.detach())
        grads.append(torch.cat([p.grad.flatten() for p in net.parameters()]))
    assert losses[1].dtype == torch.float32  # the loss (and the weights) stay float32
    assert torch.allclose(losses[1], losses[0], rtol=1e-3)
    assert torch.nn.functional.cosine_similarity(grads[0], grads[1], 0) > 0.999
    assert not torch.equal(losses[0], losses[1])  # bfloat16 was used


def test_logsnr_grid_is_uniform_in_log_snr_between_its_ends(om):
    ts = om.logsnr_grid(1.0, 1e-3, 20).double()
    alpha_t, sigma_t = om.vp_sde(ts)
    lam = torch.log(alpha_t / sigma_t)
    assert ts[0].item() == pytest.approx(1.0, rel=1e-5) and ts[-1].item() == pytest.approx(1e-3, rel=1e-4)
    assert torch.allclose(lam.diff(), lam.diff().mean().expand(20), rtol=1e-3)  # equal steps in lambda
    assert (lam.diff() > 0).all()


def test_expectile_loss(om):
    assert om.expectile_loss(torch.tensor([1.0, -1.0]), 0.7).item() == pytest.approx(0.5)
    assert om.expectile_loss(torch.tensor([2.0]), 0.9).item() == pytest.approx(3.6)
    assert om.expectile_loss(torch.tensor([-2.0]), 0.9).item() == pytest.approx(0.4)


def test_q_scale_is_the_rewards_over_the_horizon_the_data_continue(om):
    """Rows that all continue: mean and std of the reward over 1 - gamma; one-step rows (the bandit): the reward's
    own; half of them ending: over 1 - gamma / 2."""
    r = torch.tensor([1.0, 2.0, 3.0, 6.0])
    mean, std = r.mean().item(), r.std().item()
    assert om.q_scale(r, torch.zeros(4), 0.95) == pytest.approx((20 * mean, 20 * std))
    assert om.q_scale(r, torch.ones(4), 0.95) == pytest.approx((mean, std))
    assert om.q_scale(r, torch.tensor([0.0, 1.0, 0.0, 1.0]), 0.9) == pytest.approx((mean / 0.55, std / 0.55))


def test_a_scaled_critic_fits_a_large_target_closer_at_the_same_budget(om):
    """Q = mu + sd * net: with targets of scale 100 the same net, optimiser and steps leave a smaller error than
    fitting Q as it is (why --critic-target-norm is spread's default)."""
    g = torch.Generator().manual_seed(0)
    s, a = torch.randn(512, 6, generator=g), torch.rand(512, 2, generator=g) * 2 - 1
    y = 150 + 60 * torch.sin(2 * s[:, 0]) + 10 * (s[:, 1:2] * a).sum(-1)  # a small action effect on a large value
    errors = []
    for mu, sd in ((0.0, 1.0), (y.mean().item(), y.std().item())):
        torch.manual_seed(0)
        q = om.Scaled(om.TwinQ(8, 64), mu, sd)
        opt = torch.optim.Adam(q.parameters(), lr=1e-3)
        for _ in range(300):
            loss = ((q(s, a) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        errors.append(loss.item())
    assert errors[1] < errors[0] / 10, errors


def test_condition_prefix_masks(om):
    n, B = 3, 4
    base = torch.zeros(n, B, 5)
    acts = torch.arange(1, n + 1, dtype=torch.float32).view(n, 1, 1).expand(n, B, 2)  # position k acts k+1
    seq = om.condition(base, acts, om.prefix_mask(n, "sequential"))
    assert seq.shape == (n, B, 5 + (n - 1) * 2)
    assert torch.equal(seq[0, 0, 5:], torch.zeros(4))  # first agent: marginal
    assert torch.equal(seq[1, 0, 5:], torch.tensor([1.0, 1.0, 0.0, 0.0]))  # second: a_1
    assert torch.equal(seq[2, 0, 5:], torch.tensor([1.0, 1.0, 2.0, 2.0]))  # third: a_1, a_2
    ind = om.condition(base, acts, om.prefix_mask(n, "independent"))
    assert torch.equal(ind[:, :, 5:], torch.zeros(n, B, 4))


def test_stacked_actors_equal_per_agent_networks(om):
    torch.manual_seed(0)
    actors = om.Actors(3, 7, 2, 16)
    obs = torch.randn(3, 10, 7)
    out = actors(obs)
    for k in range(3):
        assert torch.allclose(out[k], torch.tanh(actors.nets[k](obs[k])), atol=1e-6)
    assert out.abs().max() <= 1


def test_stacked_score_net_equals_separate_positions(om):
    # position k's output must not depend on the inputs of other positions
    torch.manual_seed(0)
    net = om.ScoreNet(3, 2, 9, 32)
    x, t, c = torch.randn(3, 5, 2), torch.rand(3, 5, 1), torch.randn(3, 5, 9)
    out = net(x, t, c)
    x2, c2 = x.clone(), c.clone()
    x2[1:], c2[1:] = torch.randn(2, 5, 2), torch.randn(2, 5, 9)
    assert torch.allclose(net(x2, t, c2)[0], out[0])


def test_stage2_gradient_is_weighted_score_minus_beta_gradq_times_jacobian(om):
    torch.manual_seed(1)
    n, B, obs_dim, act = 2, 8, 4, 3
    actors = om.Actors(n, obs_dim, act, 16)
    obs = torch.randn(n, B, obs_dim)
    eps_hat, g, w = torch.randn(n, B, act), torch.randn(n, B, act), torch.rand(n, B, 1)
    beta = 0.3
    loss = om.actor_surrogate(actors(obs), eps_hat, g, w, beta).sum()
    grads = torch.autograd.grad(loss, list(actors.parameters()))
    # expected: d/dtheta of sum_b <(w eps_hat - beta g)_b, a_b> / B with the vector held fixed
    direction = (w * eps_hat - beta * g) / B
    expected = torch.autograd.grad((actors(obs) * direction).sum(), list(actors.parameters()))
    for a, b in zip(grads, expected):
        assert torch.allclose(a, b, atol=1e-6)


def test_one_pass_equals_per_agent_loop(om):
    """The default stage-2 path (one critic backward, one batched diffusion forward) gives every agent the
    same gradient as computing each agent's loss on its own, with the prefix taken from the actions at the
    start of the iteration."""
    torch.manual_seed(2)
    n, B, obs_dim, act = 3, 16, 5, 2
    actors = om.Actors(n, obs_dim, act, 16)
    score_net = om.ScoreNet(n, act, obs_dim + (n - 1) * act, 32).eval()
    q = om.TwinQ(n * obs_dim + n * act, 32).eval()
    mask = om.prefix_mask(n, "sequential")
    obs = torch.randn(n, B, obs_dim)
    s = obs.transpose(0, 1).reshape(B, -1)
    t = torch.rand(n, B, 1) * 0.96 + 0.02
    z = torch.randn(n, B, act)
    alpha_t, sigma_t = om.vp_sde(t)
    beta = 0.1

    # batched, as in stage 2
    a = actors(obs)
    cur = a.detach()
    grad_q = om.q_grad(q, s, cur)
    eps_hat = score_net(alpha_t * cur + sigma_t * z, t, om.condition(obs, cur, mask)).detach()
    loss = om.actor_surrogate(a, eps_hat, grad_q, sigma_t**2, beta).sum()
    batched = torch.autograd.grad(loss, list(actors.parameters()))

    # explicit loop: agent k alone, its own conditioning vector and its own critic gradient
    per_agent = []
    for k in range(n):
        a_k = torch.tanh(actors.nets[k](obs[k]))
        slots = [cur[j] for j in range(n)]
        a_var = a_k.detach().requires_grad_(True)
        slots[k] = a_var
        q_val = q(s, torch.cat(slots, -1)).mean(0).sum()
        g_k = torch.autograd.grad(q_val, a_var)[0]
        prefix = [cur[j] for j in range(k)] + [torch.zeros(B, act)] * (n - 1 - k)
        cond_k = torch.cat([obs[k]] + prefix, -1)
        eps_k = score_net((alpha_t * cur + sigma_t * z), t, torch.stack([cond_k] * n))[
            k
        ].detach()  # the stacked net's slot k is position k's own model
        loss_k = ((sigma_t[k] ** 2).squeeze(-1) * (eps_k * a_k).sum(-1) - beta * (g_k * a_k).sum(-1)).mean()
        per_agent.append(torch.autograd.grad(loss_k, list(actors.nets[k].parameters())))
    # batched grads are ordered net0 params, net1 params, ...
    flat = [g for k in range(n) for g in per_agent[k]]
    assert len(flat) == len(batched)
    for a_, b_ in zip(batched, flat):
        assert torch.allclose(a_, b_, atol=1e-5)


class GaussianEps(torch.nn.Module):
    """The exact eps of behaviour data N(0, I): x_t ~ N(0, I) at every t, so eps(x_t, t) = sigma_t x_t."""

    def __init__(self, om):
        super().__init__()
        self.vp_sde = om.vp_sde

    def forward(self, x_t, t, cond):
        return self.vp_sde(t)[1] * x_t


def test_z_baseline_keeps_the_expected_score_term_and_cuts_its_noise(om):
    a = torch.rand(3, 1, 2).expand(3, 20000, 2) * 2 - 1  # the same action for every sample of each position
    terms = {}
    for z_baseline in (False, True):
        g = torch.Generator().manual_seed(0)
        eps_hat, w = om.noised_eps_hat(GaussianEps(om), a, None, "sigma2", z_baseline, g)
        terms[z_baseline] = w * eps_hat  # what multiplies the actor's Jacobian, sample by sample
    mean = {k: v.mean(1) for k, v in terms.items()}
    se = terms[False].std(1) / math.sqrt(a.shape[1])
    assert torch.all((mean[True] - mean[False]).abs() < 4 * se)  # same expectation
    assert torch.all(terms[True].var(1) < terms[False].var(1) / 3)  # much less noise
    assert mean[True].abs().min() > 0  # and the signal (a pull towards the data mean 0) is still there
    assert torch.all(torch.sign(mean[True]) == torch.sign(a[:, 0]))


# the method, repeated verbatim in both scripts (a script is read alone; CleanRL's rule); the rest differs by env
SHARED = ("StackedLinear", "vp_sde", "ScoreNet", "prefix_mask", "condition", "TwinQ", "Scaled", "mlp", "Actors",
          "diffusion_loss", "expectile_loss", "q_grad", "noised_eps_hat", "actor_surrogate", "logsnr_grid",
          "sample_actions", "init_from_samples", "q_scale", "stage1b_critic")  # fmt: skip


def test_the_two_scripts_repeat_the_method_verbatim():
    import ast
    import os

    def definitions(name):
        src = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), name)).read()
        return {n.name: ast.get_source_segment(src, n) for n in ast.parse(src).body if hasattr(n, "name")}

    mpe, mamujoco = definitions("oma_sd_mpe.py"), definitions("oma_sd_mamujoco.py")
    for name in SHARED:
        assert mpe[name] == mamujoco[name], f"{name} differs between the two scripts"
