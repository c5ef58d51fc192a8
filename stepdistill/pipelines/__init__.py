"""diffusers pipelines for students that stock diffusers has no pipeline for (DESIGN §5).

Both run the few-step LCM sampler with diffusers' own ``LCMScheduler.step``, so they give the same samples as
``stepdistill-sample`` for the same noise (the scheduler draws between-step noise from the same generator).
"""
from ..networks.mlp import TimeMLP   # an MLP student's export names it: diffusers loads only imported modules
from .few_step import ClassConditionalFewStepPipeline, PointsFewStepPipeline
from .step_experts import StepExpertsModel

__all__ = ["ClassConditionalFewStepPipeline", "PointsFewStepPipeline", "StepExpertsModel", "TimeMLP"]
