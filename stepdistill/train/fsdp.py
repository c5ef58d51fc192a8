"""`trainer=fsdp`: the roles' networks sharded over the processes with PyTorch FSDP2 (`fully_shard`).

Each backbone (teacher, fake score, generator, its EMA, the GAN head) is sharded on its own: first every block
whose class is named in `trainer.fsdp.wrap`, then the backbone itself, so a forward holds one block's full
weights at a time. Sharding changes where weights live, not what is computed: FSDP's reduce-scatter averages
the gradients over the processes, as `average_gradients` does for replicated weights (still used for any
parameter outside the backbones), and with batch_split the run computes what one process does.

Everything that needs whole weights gathers them: checkpoints (every process takes part, rank 0 writes the same
safetensors files as an unsharded run), and the export (rank 0 reloads the final checkpoint into plain modules).
Evaluation runs the sharded student on every process with the same fixed noise; rank 0 alone scores and writes.

accelerate launch starts the processes and the process group (`--multi_gpu`; gloo on CPU, NCCL on GPUs).
"""
from __future__ import annotations

import torch
from torch import nn

WRAP_DEFAULT = ("ResidualBlock", "ResnetBlock2D", "BasicTransformerBlock")


def _backbones(roles) -> dict[str, nn.Module]:
    """The networks to shard: each denoiser's backbone (the generator's through its denoiser) and head roles."""
    out = {}
    for name, role in roles.items():
        den = getattr(role, "denoiser", role)
        net = getattr(den, "net", None)
        if isinstance(net, nn.Module):
            out[name] = net
        elif name.endswith("_head"):
            out[name] = role
    return out


def check_fsdp_supported(cfg) -> None:
    model = cfg.get("model") or {}
    if model.get("shared_base"):
        raise ValueError("trainer=fsdp with model.shared_base=true: shared-base mode keeps one frozen network for "
                         "all roles already; use one of them")
    if int(cfg.generator.get("lora_rank", 0) or 0) > 0:
        raise ValueError("trainer=fsdp does not shard LoRA students (generator.lora_rank): set generator.lora_rank=0 "
                         "or use the default trainer")
    if str(cfg.trainer.get("mixed_precision", "no")) == "fp16":
        # each process would check only its own gradient shards for an fp16 overflow, and the loss scales,
        # which every process's backward must share, would drift apart
        raise ValueError("trainer=fsdp with trainer.mixed_precision=fp16: the loss scaler checks overflow per shard; "
                         "use trainer.mixed_precision=bf16 (no loss scaling) or the default trainer")
    if cfg.generator.get("step_experts"):
        raise ValueError("trainer=fsdp does not shard step experts (one network per step): set "
                         "generator.step_experts=false or use the default trainer")
    g = cfg.generator
    exits = g.get("train_steps") or range(int(g.get("steps", 1)))
    if g.get("per_sample_step", True) and len(exits) > 1:   # the generator's default
        # each process runs the forwards its own rows need: sharded forwards would then differ between processes,
        # and their all-gathers would wait for each other
        raise ValueError("trainer=fsdp with generator.per_sample_step=true: a process's forwards would depend on its "
                         "rows' exit steps; set generator.per_sample_step=false (one exit step per batch, as DMD2's "
                         "code) or use the default trainer")


def shard_roles(roles, device: torch.device, world: int, wrap=WRAP_DEFAULT,
                reshard_after_forward: bool = True) -> list[str]:
    """fully_shard every role's backbone over a 1-D mesh of all processes; returns the sharded role names."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    wrap = set(wrap)
    sharded = []
    for name, net in _backbones(roles).items():
        for sub in net.modules():
            if sub is not net and type(sub).__name__ in wrap:
                fully_shard(sub, mesh=mesh, reshard_after_forward=reshard_after_forward)
        fully_shard(net, mesh=mesh, reshard_after_forward=reshard_after_forward)
        sharded.append(name)
    return sharded


def full_state_dicts(modules: dict[str, nn.Module]) -> dict[str, dict]:
    """Each module's whole state dict on rank 0 (CPU), {} elsewhere; every process must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {name: get_model_state_dict(m, options=opts) for name, m in modules.items()}


def load_full_state_dicts(modules: dict[str, nn.Module], states: dict[str, dict]) -> None:
    """Load whole state dicts (read by every process) into the sharded modules."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    for name, m in modules.items():
        set_model_state_dict(m, states[name], options=StateDictOptions(full_state_dict=True))


def full_optimizer_state(roles: nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's whole state keyed by parameter names (rank 0; every process must call it)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(roles, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_optimizer_state(roles: nn.Module, opt: torch.optim.Optimizer, state: dict,
                              params: list[nn.Parameter]) -> None:
    """`state`: keyed by parameter names (saved under trainer=fsdp), or numbered as torch numbers them (saved by
    one process or the default trainer), its i-th entry then `params[i]`'s (the phase's parameters, in the order
    every trainer gives them to its optimizer)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    if not state.get("state"):
        # never stepped when saved (e.g. the generator during the critic warm-up): keep it fresh. torch would
        # initialise the state by a zero-lr step first, and the next real step would count as Adam's second.
        return
    if isinstance(next(iter(state["state"])), int):
        state = named_optimizer_state(roles, opt, state, params)
    set_optimizer_state_dict(roles, opt, state, options=StateDictOptions(full_state_dict=True))


def named_optimizer_state(roles: nn.Module, opt: torch.optim.Optimizer, state: dict,
                          params: list[nn.Parameter]) -> dict:
    """A torch-numbered optimizer state keyed by parameter names, in `opt`'s groups (which may split a phase's
    sharded networks from its plain extra roles: make_adamw); the groups' settings are the saved first group's
    (the trainer sets the configured ones after loading anyway). A checkpoint of one process resumed on several
    failed on its numbers ('state.0.step')."""
    names = {id(p): n for n, p in roles.named_parameters()}
    saved = sum(len(g["params"]) for g in state["param_groups"])
    if saved != len(params):
        raise ValueError(f"the checkpoint's optimizer holds {saved} parameters, this run's phase {len(params)}")
    name_of = [names[id(p)] for p in params]
    settings = {k: v for k, v in state["param_groups"][0].items() if k != "params"}
    return {"state": {name_of[i]: v for i, v in state["state"].items()},
            "param_groups": [{**settings, "params": [names[id(p)] for p in g["params"]]} for g in opt.param_groups]}
