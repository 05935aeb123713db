"""The linear-network theory of the ANCRe paper, as a regression test of the connectivity math.

``experiments/linear_theory.py`` trains 3-layer linear networks (ConnectedStack of bias-free linear
blocks, ``fixed`` and ``ancre`` wiring) by full-batch gradient descent from a small initialisation
on whitened inputs. The shape of the loss curves depends only on the wiring: if ``fixed`` put an
edge in the wrong row, or ANCRe's coefficients stopped reaching the input, these rates change.
"""

from __future__ import annotations

import importlib.util
import math
import sys

import pytest

from conftest import ROOT


def load_experiment():
    spec = importlib.util.spec_from_file_location("linear_theory", ROOT / "experiments" / "linear_theory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def experiment():
    return load_experiment()


@pytest.fixture(scope="module")
def results(experiment):
    setup = experiment.Setup(steps=1000, layouts=["cascaded", "0:1", "0:2", "ancre"])
    return experiment.run(setup)


def test_networks_compute_the_layouts_end_to_end_map(experiment):
    """The stacks are the products the theory names: M = W3 W2 W1, W3 W2 (I + W1), W3 (I + W2 W1)."""
    import torch

    x = torch.eye(4, dtype=torch.float64)
    expected = {
        "cascaded": lambda w: w[2] @ w[1] @ w[0],
        "0:1": lambda w: w[2] @ w[1] @ (torch.eye(4, dtype=torch.float64) + w[0]),
        "0:2": lambda w: w[2] @ (w[1] @ w[0] + torch.eye(4, dtype=torch.float64)),
    }
    for layout, product in expected.items():
        stack = experiment.build_network(layout, dim=4, init_scale=1.0, seed=0)
        weights = [b.weight for b in stack.blocks]
        m = stack(x).T  # rows of x are the basis vectors: column i of M is f(e_i)
        torch.testing.assert_close(m, product(weights))


def test_late_slope_tells_linear_from_sublinear(experiment):
    linear = [10.0 * 0.99**t for t in range(2000)]
    sublinear = [1.0 / (1 + t) ** 2 for t in range(2000)]
    assert experiment.late_slope(linear, floor=1e-30) == pytest.approx(math.log10(0.99), rel=1e-6)
    late, early = experiment.late_slope(sublinear, floor=1e-30), experiment.late_slope(sublinear[:400], floor=1e-30)
    assert early < late < 0  # a power law: the slope decays towards 0 ...
    assert abs(late) < 0.2 * abs(math.log10(0.99))  # ... and is soon far below a linear rate's
    converged = [0.5**t for t in range(90)] + [1e-30] * 1000  # then flat at round-off
    assert experiment.late_slope(converged, floor=1e-24) == pytest.approx(math.log10(0.5), rel=0.05)


def test_shortcut_to_layer_two_and_ancre_converge_linearly(results):
    """0:2 and ANCRe converge at a steady rate: log-loss falls by a constant amount per iteration
    (slope bounded away from 0) down to 1e-12 of the initial loss within the budget."""
    for layout in ("0:2", "ancre"):
        e = results["layouts"][layout]
        assert e["late_slope_log10_per_iter"] < -0.01, (layout, e["late_slope_log10_per_iter"])
        assert e["iterations_to_relative_loss"]["1e-12"] is not None, layout


def test_shortcut_to_layer_one_is_much_slower(results):
    """0:1 first has to leave the saddle of the small initialisation (a plateau), then converges
    at a lower rate: several times the iterations of 0:2 to reach the same loss. (In this generic
    setting its late rate is still linear; see experiments/RESULTS.md.)"""
    e = results["layouts"]
    for level in ("0.01", "0.0001"):
        fast = e["0:2"]["iterations_to_relative_loss"][level]
        slow = e["0:1"]["iterations_to_relative_loss"][level]
        assert fast is not None and slow is not None
        assert slow >= 3 * fast, (level, fast, slow)
    assert abs(e["0:1"]["late_slope_log10_per_iter"]) < 0.75 * abs(e["0:2"]["late_slope_log10_per_iter"])


def test_cascaded_is_slowest(results):
    """Without shortcuts the small initialisation is a saddle of a cubic product: within the budget
    the loss does not even fall to a tenth, while every shortcut layout gets far below that."""
    e = results["layouts"]
    assert e["cascaded"]["iterations_to_relative_loss"]["0.1"] is None
    for layout in ("0:1", "0:2", "ancre"):
        assert e[layout]["iterations_to_relative_loss"]["0.1"] is not None, layout
