"""A step-aware fake score for multi-step students (an option, `method.step_aware_critic`; not in DMD2).

With backward simulation the fake score is trained on the outputs of all K steps at once, so it models their
mixture, and the distribution-matching gradient vanishes whenever that *mixture* matches the data, however
wrong each step is on its own. On digits, DMD2's 4-step student drifted into such a state: its step-1 outputs
alone collapsed onto class prototypes (FD 6.6, class accuracy 0.999) and its final FD rose with training.

Conditioning the critic on the exit step k makes it model each step's output distribution separately, so every
step is pulled towards the data by itself. The condition is a learned embedding of k added to the backbone's
timestep embedding, zero-initialised so the critic starts as the plain one (the teacher, for image benchmarks).
Calls outside `condition(ks)` (the GAN's, which also sees real data) get no step embedding.

`gain` multiplies the table's output. Adam moves every element by about the learning rate per update whatever
the gradient's scale, so the gain is the embedding's learning rate in units of the critic's. At gain 1 the
embedding stayed far too small to matter: after 1333 critic updates at lr 1e-4 on digits its rows had norms
0.14-0.38, less than the difference between the critic's time embeddings 10 timesteps apart (~0.8; the
embeddings themselves have norms 7-19), so the critic still modelled the mixture of all steps.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

TIME_EMBEDDING_MODULES = ("time_embedding", "time_mlp")  # diffusers UNets / our TimeMLP


def find_time_embedding(net: nn.Module) -> tuple[nn.Module, int]:
    """The module whose output is the timestep embedding, and that embedding's width. A text-to-image critic's
    UNet sits inside its wrapper (`TextConditionedUNet.unet`; in shared-base mode an adapter view of
    `.shared.unet`, whose hook then lives only while the fake score's own calls run: `StepEmbedding.condition`)."""
    inner = getattr(net, "unet", None)
    if isinstance(inner, nn.Module):
        return find_time_embedding(inner)
    shared = getattr(net, "shared", None)
    if isinstance(getattr(shared, "unet", None), nn.Module):
        return find_time_embedding(shared.unet)
    for name in TIME_EMBEDDING_MODULES:
        mod = getattr(net, name, None)
        if isinstance(mod, nn.Module):
            linears = [m for m in mod.modules() if isinstance(m, nn.Linear)]
            if linears:
                return mod, linears[-1].out_features
    raise ValueError(f"method.step_aware_critic needs a timestep-embedding module ({', '.join(TIME_EMBEDDING_MODULES)}) "
                     f"in the fake score's {type(net).__name__}: set method.step_aware_critic=false")


class StepEmbedding(nn.Module):
    def __init__(self, fake_net: nn.Module, num_steps: int, gain: float = 30.0):
        super().__init__()
        if not gain > 0:
            raise ValueError(f"method.step_embedding_gain must be > 0, got {gain}")
        module, width = find_time_embedding(fake_net)
        self._target = (module,)  # a tuple, so the critic's own parameters are not registered here a second time
        self.table = nn.Embedding(num_steps, width)
        nn.init.zeros_(self.table.weight)
        self.gain = float(gain)

    @contextmanager
    def condition(self, steps: torch.Tensor):
        """Inside the context, the fake score sees exit step `steps` (1-based, one per sample). A batch that is
        a multiple of len(steps) (CFG's cond + uncond) repeats them."""
        emb = self.gain * self.table(steps.long() - 1)

        def hook(_mod, _inp, out):
            return out + emb.to(out.dtype).repeat(out.shape[0] // emb.shape[0], 1)

        handle = self._target[0].register_forward_hook(hook)
        try:
            yield
        finally:
            handle.remove()
