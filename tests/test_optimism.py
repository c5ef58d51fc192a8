"""Optimistic AdamW (`optim.<role>.optimism`): the update against an independent float64 Adam, its effect on a
bilinear game, its state through a checkpoint, and the trainer's wiring."""
import pytest
import torch
from safetensors.torch import load_file

from stepdistill.cli.train import train
from stepdistill.train.optim import OptimisticAdamW, make_adamw


def _adamw_delta(theta, grad, m, v, t, lr, betas, eps, wd):
    """One AdamW step Δ = θ_before − θ_after, written out (decoupled decay, bias-corrected moments)."""
    m = betas[0] * m + (1 - betas[0]) * grad
    v = betas[1] * v + (1 - betas[1]) * grad ** 2
    m_hat, v_hat = m / (1 - betas[0] ** t), v / (1 - betas[1] ** t)
    return lr * wd * theta + lr * m_hat / (v_hat.sqrt() + eps), m, v


@pytest.mark.parametrize("fused", [False, True])   # True: the trainer's, through make_adamw
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_each_update_is_the_optimistic_combination_of_adamw_steps(eta, fused):
    """θ_{t+1} = θ_t − (1 + η)Δ_t + ηΔ_{t−1}, with Δ_t the AdamW step at θ_t (no previous step at t = 1)."""
    torch.manual_seed(0)
    lr, betas, eps, wd = 0.01, (0.5, 0.9), 1e-8, 0.1
    p = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.float64))
    if fused:
        opt = make_adamw([p], eta, lr=lr, betas=betas, eps=eps, weight_decay=wd)
        assert isinstance(opt, OptimisticAdamW) and opt.defaults["fused"]
    else:
        opt = OptimisticAdamW([p], eta, lr=lr, betas=betas, eps=eps, weight_decay=wd)
    theta, m, v, prev = p.detach().clone(), torch.zeros_like(p), torch.zeros_like(p), torch.zeros_like(p)
    for t in range(1, 6):
        grad = torch.randn_like(p)
        p.grad = grad.clone()
        opt.step()
        delta, m, v = _adamw_delta(theta, grad, m, v, t, lr, betas, eps, wd)
        theta = theta - (1 + eta) * delta + eta * prev
        prev = delta
        torch.testing.assert_close(p.detach(), theta, rtol=1e-12, atol=1e-12)


def test_zero_optimism_is_plain_adamw_and_a_negative_one_is_an_error():
    p = torch.nn.Parameter(torch.zeros(3))
    assert type(make_adamw([p], 0.0, lr=1e-3)) is torch.optim.AdamW
    assert isinstance(make_adamw([p], 1.0, lr=1e-3), OptimisticAdamW)
    with pytest.raises(ValueError, match="optimism must be >= 0"):
        make_adamw([p], -0.5, lr=1e-3)


def _bilinear_game(eta: float, steps: int) -> float:
    """min_x max_y x·y played simultaneously from (1, 1); returns the distance to the equilibrium (0, 0)."""
    x, y = torch.nn.Parameter(torch.ones(1)), torch.nn.Parameter(torch.ones(1))
    opts = [make_adamw([w], eta, lr=0.02, betas=(0.0, 0.99), weight_decay=0.0) for w in (x, y)]
    for _ in range(steps):
        for o in opts:
            o.zero_grad()
        (x * y).sum().backward()
        y.grad.neg_()                      # y ascends
        for o in opts:
            o.step()
    return float(torch.cat([x.detach(), y.detach()]).norm())


def test_optimism_damps_the_rotation_of_a_bilinear_game():
    """Simultaneous AdamW play circles the equilibrium of x·y at a fixed radius; Optimistic Adam spirals in."""
    plain, optimistic = _bilinear_game(0.0, 1500), _bilinear_game(1.0, 1500)
    assert plain > 0.5 and optimistic < 0.1, (plain, optimistic)


@pytest.mark.parametrize("fused", [False, True])
def test_state_dict_round_trip_continues_exactly(fused):
    torch.manual_seed(1)
    grads = [torch.randn(4, 2) for _ in range(6)]

    def run(split: bool):
        p = torch.nn.Parameter(torch.ones(4, 2))
        opt = OptimisticAdamW([p], 1.0, lr=0.05, weight_decay=0.01, fused=fused)
        for i, g in enumerate(grads):
            if split and i == 3:   # a fresh optimizer from the saved state, as on resume
                state = opt.state_dict()
                assert "optimism_prev" in state["state"][0]
                opt = OptimisticAdamW([p], 1.0, lr=0.05, weight_decay=0.01, fused=fused)
                opt.load_state_dict(state)
            p.grad = g.clone()
            opt.step()
        return p.detach()

    assert torch.equal(run(False), run(True))


def test_trainer_builds_optimistic_optimizers_and_resumes_exactly(gmm_cfg, tmp_path):
    common = ["method=dmd2", "optim.generator.optimism=1.0", "optim.critic.optimism=0.5",
              "trainer.checkpoint_every=10", "trainer.keep_checkpoints=5"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(gmm_cfg(*common, "trainer.max_steps=20"), straight)
    train(gmm_cfg(*common, "trainer.max_steps=10"), resumed)
    train(gmm_cfg(*common, "trainer.max_steps=20", "trainer.resume=true"), resumed)
    st = torch.load(resumed / "checkpoints/step_0000020/trainer_state.pt", weights_only=True)
    assert all("optimism_prev" in s for s in st["optimizers"]["generator"]["state"].values())
    for role in ("generator", "generator_ema", "fake_score", "gan_head"):   # the EMA: what sampling uses
        a, b = (load_file(str(d / f"checkpoints/step_0000020/{role}.safetensors")) for d in (straight, resumed))
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=f"{role}.{k}")
