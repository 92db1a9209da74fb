"""``fedsim part-a``: the exam's worked examples, every number computed by torch (autograd for gradients).

1. the 2x2 inverse check ``A = [[1, 2], [0, 1]]``, ``B = [[1, -2], [0, 1]]``, ``AB = I``;
2. one SGD step of :class:`~fedsim.models.part_a.ExamNet` (forward values, loss, gradients,
   updated weights);
3. ``f(x) = x^2 (1 + sin pi x)`` and ``f'(x)`` at 0, 1/2, 1, 3/2, 2;
4. plain gradient descent vs ``torch.optim.Adagrad`` on the slow objective: iterations to a
   tolerance, and a PNG of both trajectories.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from fedsim.models.part_a import (
    SLOW_CURVATURE,
    SLOW_START,
    ExamNet,
    exam_function,
    exam_function_grad,
    exam_function_grad_formula,
    slow_objective,
)
from fedsim.results import save_figure

__all__ = ["part_a_report", "exam_net_step", "ExamNetStep", "optimise_slow_objective", "SlowRun",
           "compare_slow_objective", "plot_slow_objective", "inverse_check"]


def _fmt(t: torch.Tensor) -> str:
    """Compact rows like ``[0.625, 0.625]`` (no float noise)."""
    values = t.detach().double()
    if values.dim() == 0:
        return f"{float(values):.6g}"
    if values.dim() == 1:
        return "[" + ", ".join(f"{float(v):.6g}" for v in values) + "]"
    return "[" + ", ".join(_fmt(row) for row in values) + "]"


# ---- 1. inverse ---------------------------------------------------------------------------------
def inverse_check() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(A, B, AB)`` for the exam's 2x2 matrices."""
    a = torch.tensor([[1.0, 2.0], [0.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -2.0], [0.0, 1.0]], dtype=torch.float64)
    return a, b, a @ b


# ---- 2. ExamNet ---------------------------------------------------------------------------------
@dataclass
class ExamNetStep:
    """Everything one SGD step of ExamNet computes (weights are ``[out, in]`` as in ``nn.Linear``)."""

    x: torch.Tensor
    hidden_pre: torch.Tensor
    hidden: torch.Tensor
    output: torch.Tensor
    loss: float
    grad_output_layer: torch.Tensor
    grad_hidden_layer: torch.Tensor
    new_hidden_weight: torch.Tensor
    new_output_weight: torch.Tensor


def exam_net_step(x: list[float] | None = None, lr: float = 0.5) -> ExamNetStep:
    """One step of ``torch.optim.SGD`` on the exam's example; target = x, loss = sum of squared errors."""
    model = ExamNet().double()
    inputs = torch.tensor(x or [1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    hidden_pre = model.hidden(inputs)
    hidden = model.act(hidden_pre)
    output = model.output(hidden)
    loss = ((output - inputs) ** 2).sum()
    loss.backward()
    grads = model.hidden.weight.grad.clone(), model.output.weight.grad.clone()
    torch.optim.SGD(model.parameters(), lr=lr).step()
    return ExamNetStep(inputs, hidden_pre.detach(), hidden.detach(), output.detach(), float(loss.detach()), grads[1], grads[0],
                       model.hidden.weight.detach().clone(), model.output.weight.detach().clone())


# ---- 4. slow objective ----------------------------------------------------------------------------
@dataclass
class SlowRun:
    """One optimiser on the slow objective: iterations to tolerance (None = not within the cap), path."""

    name: str
    lr: float
    iterations: int | None
    path: torch.Tensor  # [steps + 1, 2]
    final_value: float


def optimise_slow_objective(
    name: str,
    make_optimizer: Callable[[list[torch.Tensor]], torch.optim.Optimizer],
    lr: float,
    tol: float = 1e-6,
    max_iter: int = 20000,
    start: tuple[float, float] = SLOW_START,
) -> SlowRun:
    """Minimise :func:`slow_objective` from ``start`` until ``f < tol`` (at most ``max_iter`` steps)."""
    w = torch.tensor(start, dtype=torch.float64, requires_grad=True)
    optimizer = make_optimizer([w])
    path = [w.detach().clone()]
    iterations = None
    for step in range(1, max_iter + 1):
        optimizer.zero_grad()
        slow_objective(w).backward()
        optimizer.step()
        path.append(w.detach().clone())
        if float(slow_objective(w.detach())) < tol:
            iterations = step
            break
    return SlowRun(name, lr, iterations, torch.stack(path), float(slow_objective(w.detach())))


def compare_slow_objective(
    tol: float = 1e-6, max_iter: int = 20000, gd_lr: float | None = None, adagrad_lr: float = 0.5
) -> tuple[SlowRun, SlowRun]:
    """Plain gradient descent (``torch.optim.SGD``, no momentum) vs ``torch.optim.Adagrad``.

    Gradient descent gets ``lr = 1/L`` with ``L`` the largest curvature, the textbook step that
    is stable across the valley (any step above ``2/L`` diverges).
    """
    gd_lr = gd_lr if gd_lr is not None else 1.0 / max(SLOW_CURVATURE)
    gd = optimise_slow_objective("gradient descent", lambda p: torch.optim.SGD(p, lr=gd_lr), gd_lr, tol, max_iter)
    ada = optimise_slow_objective("Adagrad", lambda p: torch.optim.Adagrad(p, lr=adagrad_lr), adagrad_lr, tol,
                                  max_iter)
    return gd, ada


def plot_slow_objective(runs: tuple[SlowRun, ...], path: Path, tol: float = 1e-6) -> Path:
    """Contours of the objective with each optimiser's trajectory; returns the PNG path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = torch.linspace(-1.2, 1.2, 200, dtype=torch.float64)
    ys = torch.linspace(-0.3, 1.8, 200, dtype=torch.float64)
    gx, gy = torch.meshgrid(xs, ys, indexing="xy")
    values = slow_objective(torch.stack([gx, gy], dim=-1))
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.contour(gx.numpy(), gy.numpy(), values.numpy(), levels=torch.logspace(-3, 2, 15).numpy(), cmap="Greys",
               linewidths=0.6)
    for run, style in zip(runs, ("o-", "s-"), strict=False):
        steps = "not converged" if run.iterations is None else f"{run.iterations} it."
        ax.plot(run.path[:, 0].numpy(), run.path[:, 1].numpy(), style, ms=2, lw=1,
                label=f"{run.name} (lr={run.lr:g}): {steps}", markevery=max(1, len(run.path) // 60))
    ax.plot([0], [0], "k*", ms=10)
    a, b = SLOW_CURVATURE
    ax.set_title(f"f(w) = ({a:g} w0^2 + {b:g} w1^2)/2, iterations to f < {tol:g}")
    ax.set_xlabel("w0 (steep)")
    ax.set_ylabel("w1 (flat)")
    ax.legend(fontsize=8)
    return save_figure(fig, path, bbox_inches="tight")


# ---- the printout ---------------------------------------------------------------------------------
def part_a_report(out_dir: str | Path = "results/part_a_report", tol: float = 1e-6) -> str:
    """The ``fedsim part-a`` text; writes ``slow_objective.png`` to ``out_dir``."""
    lines: list[str] = []
    add = lines.append

    add("== 1. 2x2 inverse check ==")
    a, b, ab = inverse_check()
    add(f"A  = {_fmt(a)}")
    add(f"B  = {_fmt(b)}")
    add(f"AB = {_fmt(ab)}   (= I: {bool(torch.equal(ab, torch.eye(2, dtype=ab.dtype)))})")
    add(f"BA = {_fmt(b @ a)}   torch.linalg.inv(A) = {_fmt(torch.linalg.inv(a))}")

    add("")
    add("== 2. ExamNet: 4 -> 2 -> 4, g(x) = x/4, no biases, all weights 1; one SGD step, lr 0.5 ==")
    s = exam_net_step()
    add(f"x = target            {_fmt(s.x)}")
    add(f"W1 x                  {_fmt(s.hidden_pre)}")
    add(f"h = g(W1 x)           {_fmt(s.hidden)}")
    add(f"y = W2 h              {_fmt(s.output)}")
    add(f"loss = sum (y - x)^2  {s.loss:.6g}")
    add(f"dL/dW1 (autograd)     {_fmt(s.grad_hidden_layer)}")
    add(f"dL/dW2 (autograd)     {_fmt(s.grad_output_layer)}")
    add(f"W1 after the step     {_fmt(s.new_hidden_weight)}   (rows = hidden units)")
    add(f"W2 after the step     {_fmt(s.new_output_weight)}   (rows = outputs)")

    add("")
    add("== 3. f(x) = x^2 (1 + sin(pi x)) ==")
    points = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64)
    values, grads, formula = exam_function(points), exam_function_grad(points), exam_function_grad_formula(points)
    add(f"{'x':>5} {'f(x)':>12} {'f_prime autograd':>18} {'2x(1+sin pi x)+pi x^2 cos pi x':>32}")
    for x, f, g, h in zip(points, values, grads, formula, strict=True):
        # Round away float noise such as sin(pi) = 1.2e-16 so exact zeros print as 0.
        f, g, h = (round(float(v), 12) + 0.0 for v in (f, g, h))  # + 0.0 turns -0.0 into 0.0
        add(f"{float(x):>5g} {f:>12.6g} {g:>18.6g} {h:>32.6g}")
    add("f'(x) = 0 at x = 0 and x = 2n - 1/2 (where f = 0: the global minima); f' also vanishes at the "
        "local maxima in between.")

    add("")
    add("== 4. Slow objective: plain gradient descent vs torch.optim.Adagrad ==")
    gd, ada = compare_slow_objective(tol=tol)
    ca, cb = SLOW_CURVATURE
    add(f"f(w) = ({ca:g} w0^2 + {cb:g} w1^2) / 2, condition number {ca / cb:g}, start {SLOW_START}, "
        f"tolerance f < {tol:g}")
    for run in (gd, ada):
        steps = f"{run.iterations} iterations" if run.iterations is not None else "did not reach the tolerance"
        add(f"{run.name:<17} lr={run.lr:<6g} {steps}  (final f = {run.final_value:.3g})")
    if gd.iterations and ada.iterations:
        add(f"gradient descent needs {gd.iterations / ada.iterations:.0f}x the iterations of Adagrad")
    png = plot_slow_objective((gd, ada), Path(out_dir) / "slow_objective.png", tol)
    add(f"trajectories: {png}")
    return "\n".join(lines)
