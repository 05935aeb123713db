"""Plugin callbacks for the wiring, for ``trainer.callbacks`` in a YAML config.

- :class:`GateTemperatureAnnealing`: anneal ANCRe's softmax temperature tau along a schedule.
- :class:`GateSparsity`: an L2 (or L1, entropy) penalty on the shortcuts of the wiring.
- :class:`GateVisualization`: the (K, K+1) wiring as heatmaps in TensorBoard and PNG files.
- :class:`EarlyExitEvaluation`: the metric of every early exit, the cutoff layer, and a
  confidence-based early exit (metric against depth and speed-up).
- :class:`FiniteGuard`: stop at the first NaN or inf in the loss, gate logits or gradients, keep
  the saved checkpoints and write the failing state to ``nonfinite-step<N>.ckpt`` (on by default
  in ``ancre fit``).
- :class:`StreamGrowth`: the RMS of the residual stream after every layer at each validation
  (on by default in ``ancre fit``).
- :class:`ThroughputMonitor`: Lightning's throughput monitor for these modules: samples, tokens
  and FLOPs per second, and MFU where the device's peak is known.
- :class:`LineProgressBar`: progress as a plain line every so many steps and after each
  validation (what ``ancre`` uses when its output is not a terminal).

They work with any :class:`~ancre_lightning.modules.ConnectivityModule` through its public
surface only (``connectivities()``, ``exit_states``, ``exit_predictions``, ``exit_metrics``, ``exit_task``,
``exit_primary_metric``) and the connectivities' ``coefficients()``, ``shortcut_mask()``,
``gate_parameters()`` and ``temperature``. With several connectivities (one stack per stage),
per-wiring tags carry the stack name: ``gates/<stack>/...``.

    trainer:
      callbacks:
        - class_path: ancre_lightning.callbacks.GateVisualization
          init_args: {every_n_steps: 100}
"""

from ._surface import row_entropy
from .early_exit import EarlyExitEvaluation, confidence_exit, cutoff_layer, predictive_entropy
from .finite_guard import FiniteGuard
from .progress import LineProgressBar
from .sparsity import GateSparsity, shortcut_penalty
from .stream import StreamGrowth, stream_mean_squares
from .summary import ParameterSummary
from .temperature import GateTemperatureAnnealing, annealed_temperature
from .throughput import ThroughputMonitor
from .visualization import GateVisualization

__all__ = [
    "EarlyExitEvaluation",
    "FiniteGuard",
    "GateSparsity",
    "GateTemperatureAnnealing",
    "GateVisualization",
    "ThroughputMonitor",
    "LineProgressBar",
    "ParameterSummary",
    "StreamGrowth",
    "annealed_temperature",
    "confidence_exit",
    "cutoff_layer",
    "predictive_entropy",
    "row_entropy",
    "shortcut_penalty",
    "stream_mean_squares",
]
