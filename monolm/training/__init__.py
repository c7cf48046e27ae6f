"""The one training loop both arms use (stages 2 and 3), so the only difference between them is the
model handed in.

Why it looks like this:
- Precision: parameters and AdamW state are fp32, always; bf16 is only autocast compute. Pure-bf16
  AdamW drops updates smaller than bf16's spacing (updates of ~5e-5 vanish for V in [-9, -2]),
  which would freeze the constrained weights. A model handed in as bf16 is upcast.
- Gradient accumulation is token-weighted: every micro-batch's summed loss is divided by the
  number of predicted tokens in the *whole* optimizer batch, so k micro-batches of b sequences
  give the same update as one batch of k*b (up to float summation order).
- Data order is a permutation per epoch drawn from an explicit generator seeded with
  `derive_seed(seed, "data", epoch)`; the position is (epoch, index into the permutation). With
  model, optimizer, scheduler, RNG states and position checkpointed, a resumed run is bitwise
  identical to an uninterrupted one on CPU.
- The constrained arm computes each softplus(V) once per forward+backward
  (`parametrize.cached()`; it matters with gradient checkpointing, which re-runs the forward), and
  after every optimizer step checks the *materialized* constrained weights: negative or
  non-finite values abort the run, and the interval minimum is logged as evidence.

Modules, in the order a run uses them: `run` (input checks, model and optimizer set-up, the run's
fingerprint), `state` (start or resume, the loop state, checkpoints), `schedule` (step budget, lr
schedule, data order), `step` (one optimizer step), `loop` (`train()`: the loop, logging, evaluation
and best-model selection), `best` (the best model on disk).
"""

from monolm.training.best import BEST_DIR, BEST_MARKER, SaveModel
from monolm.training.loop import WALL_CLOCK_FIELDS, TrainResult, train
from monolm.training.run import CHECKPOINTS_DIR, HISTORY_FILE, Evaluate
from monolm.training.schedule import DataOrder, LRSchedule, total_steps_for
from monolm.training.step import ADAM_EPS, TrainingDiverged, accumulate_gradients, build_optimizer, training_step

__all__ = [
    "ADAM_EPS",
    "BEST_DIR",
    "BEST_MARKER",
    "CHECKPOINTS_DIR",
    "HISTORY_FILE",
    "WALL_CLOCK_FIELDS",
    "DataOrder",
    "Evaluate",
    "LRSchedule",
    "SaveModel",
    "TrainResult",
    "TrainingDiverged",
    "accumulate_gradients",
    "build_optimizer",
    "total_steps_for",
    "train",
    "training_step",
]
