"""Training plans that are predicted, not guessed: what a LoRA step holds on the GPU, and which switches fit a card.

predict (memory of one plan from shapes: meta-device model, fake-tensor activations) -> choose (the plans, their
order, the first that fits) -> config (a composed train.py config: its plan, `trainer=auto`, the refusal).
report (the `fusedit plan` JSON); `fusedit plan [--size full] [--gpu-gb N] [--json PATH] [train.py overrides]` (cli)
prints and writes it.
"""

# Imported at once, not on first use: `choose` and `predict` are also submodule names, and a lazy attribute would be
# shadowed by the submodule once it is imported.
from fusedit.plan.choose import MARGIN, Choice, TrainPlan, choose, evaluate, plan_order
from fusedit.plan.predict import Estimates, ModelFacts, Prediction, model_facts, predict
from fusedit.plan.report import plan_report

__all__ = [
    "MARGIN",
    "Choice",
    "Estimates",
    "ModelFacts",
    "Prediction",
    "TrainPlan",
    "choose",
    "evaluate",
    "model_facts",
    "plan_order",
    "plan_report",
    "predict",
]
