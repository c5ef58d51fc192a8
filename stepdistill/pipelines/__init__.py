"""diffusers pipelines for students that stock diffusers has no pipeline for (DESIGN §5).

On a discrete VP schedule they run the few-step LCM sampler with diffusers' own ``LCMScheduler.step``, so they give
the same samples as ``stepdistill-sample`` for the same noise (the scheduler draws between-step noise from the same
generator); ``PointsFewStepPipeline`` on an EDM or flow schedule steps as ``FewStepGenerator.sample`` does. Without
``timesteps``, no count or the trained count samples at the trained timesteps; another count K at the schedule's
K-step ones (LCMScheduler's on VP, as ``FewStepGenerator.sampling_timesteps``).
"""
from ..networks.mlp import TimeMLP   # an MLP student's export names it: diffusers loads only imported modules
from .few_step import ClassConditionalFewStepPipeline, PointsFewStepPipeline, UnconditionalFewStepPipeline
from .step_experts import StepExpertsModel

__all__ = ["ClassConditionalFewStepPipeline", "PointsFewStepPipeline", "StepExpertsModel", "TimeMLP",
           "UnconditionalFewStepPipeline"]
