"""The digits teacher's backbone: a small class-conditional diffusers UNet2DModel (classes 0..9 + null class 10)."""
from __future__ import annotations

from diffusers import UNet2DModel

DIGITS_UNET = dict(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64), layers_per_block=1,
                   down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                   norm_num_groups=8, num_class_embeds=11)


def build_digits_unet(**overrides) -> UNet2DModel:
    return UNet2DModel(**{**DIGITS_UNET, **overrides})


def check_resolution(net, height: int, width: int) -> None:
    """Refuse a resolution the UNet cannot take: each down block but the last halves the size, and the
    class-conditional teacher was trained at one size."""
    cfg = getattr(net, "config", None)
    if cfg is None or not hasattr(cfg, "down_block_types"):
        return
    factor = 2 ** (len(cfg.down_block_types) - 1)
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    if height % factor or width % factor or height < factor or width < factor:
        raise ValueError(f"resolution {height}x{width} cannot go through this UNet's {len(cfg.down_block_types)} "
                         f"down blocks: use a multiple of {factor} (the teacher was trained at {size}x{size}, "
                         f"set benchmark.resolution={size})")
    if (height, width) != (size, size):
        raise ValueError(f"resolution {height}x{width} differs from the teacher's {size}x{size}: "
                         f"set benchmark.resolution={size}")
