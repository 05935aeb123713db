"""The model summary printed at the start of training, without columns nobody measured."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import ModelSummary
from lightning.pytorch.utilities.model_summary.model_summary import get_formatted_model_size, get_human_readable_count


class ParameterSummary(ModelSummary):
    """Lightning's :class:`~lightning.pytorch.callbacks.ModelSummary` (name, type, parameters and
    mode of each top-level module, and the totals) as a plain table, with the FLOPs column and the
    "Total FLOPs" line only when they were counted.

    Lightning counts FLOPs only for a module with an ``example_input_array``, which these modules
    do not set (a forward at start-up would compile the network for a shape training never uses),
    so its summary would say "0 FLOPs" for every network. ``ancre`` adds this callback to every
    trainer unless ``trainer.callbacks`` has a model summary or ``trainer.enable_model_summary`` is
    false.

    Args:
        max_depth: depth of nested modules listed (0 turns the summary off).
    """

    @staticmethod
    def summarize(
        summary_data: list[tuple[str, list[str]]],
        total_parameters: int,
        trainable_parameters: int,
        model_size: float,
        total_training_modes: dict[str, int],
        total_flops: int,
        **summarize_kwargs: Any,
    ) -> None:
        columns = [(name, [str(v) for v in values]) for name, values in summary_data if name != "FLOPs" or total_flops]
        print(format_table(columns), flush=True)
        totals = [
            (get_human_readable_count(trainable_parameters), "trainable parameters"),
            (get_human_readable_count(total_parameters - trainable_parameters), "non-trainable parameters"),
            (get_formatted_model_size(model_size), "MB of parameters"),
            (f"{total_training_modes['train']} / {total_training_modes['eval']}", "modules in train / eval mode"),
        ]
        if total_flops:
            totals.append((get_human_readable_count(total_flops), "FLOPs of the example input"))
        print("\n".join(f"{value.strip():>10}  {what}" for value, what in totals), flush=True)


def format_table(columns: list[tuple[str, list[str]]]) -> str:
    """Left-aligned columns under their headers, separated by two spaces, with a rule under the headers."""
    widths = [max([len(name), *map(len, values)]) for name, values in columns]
    rows = [[name for name, _ in columns], *zip(*[values for _, values in columns])]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * max(map(len, lines)))
    return "\n".join(lines)
