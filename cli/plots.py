"""PNG figures (matplotlib, headless), written atomically like every other output."""

from __future__ import annotations

from typing import Any

from ..ops.core.errors import UserError


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        raise UserError("plots need matplotlib: pip install matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def attention_figure(path: str, curves: list[tuple[str, str, list[float]]]) -> None:
    """One line per run: (label, what the mass is on, per-layer mass) against the layer index."""
    from ..ops.core.atomic import atomic_path

    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, prefix, mass in curves:
        style = "-" if prefix == "prompt" else "--"
        ax.plot(range(len(mass)), mass, style, marker="o", markersize=3, label=f"{label} (on its {prefix})")
    ax.set_xlabel("layer")
    ax.set_ylabel("attention mass from the input's tokens")
    ax.set_title("Where attention goes: on the soft prompt (solid) or, without one, on the first token (dashed)",
                 fontsize=9)
    ax.set_ylim(0, 1)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


ALIGN_FIGURES = ("alignment-along-rollouts.png", "alignment-distributions.png")


def alignment_figures(directory: str, nodes: list[dict], teachers: list[str], gradient: str = "rkl") -> None:
    """alignment-along-rollouts.png: per teacher, the alignment at each node against its position (red:
    incorrect rollouts, green: correct ones); alignment-distributions.png: per teacher, histograms of the
    alignment on correct and on incorrect rollouts."""
    from pathlib import Path

    from ..ops.core.atomic import atomic_path

    plt = _pyplot()
    Path(directory).mkdir(parents=True, exist_ok=True)
    n = max(len(teachers), 1)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for ax, t in zip(axes[0], teachers, strict=True):
        runs: dict[tuple, list[tuple[int, float]]] = {}
        for node in nodes:
            value = node["teachers"][t]["align"][gradient]
            if value is not None:
                runs.setdefault((node["question"], node["rollout"], node["correct"]), []).append(
                    (node["position"], value))
        for (_, _, correct), pts in runs.items():
            pts.sort()
            ax.plot([p for p, _ in pts], [v for _, v in pts], "-o", markersize=3, alpha=0.6,
                    color="tab:green" if correct else "tab:red")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xscale("symlog", linthresh=1)  # the node windows double in depth
        ax.set_xlim(left=-0.5)
        ax.plot([], [], color="tab:red", label="incorrect rollouts")
        ax.plot([], [], color="tab:green", label="correct rollouts")
        ax.legend(fontsize=8)
        ax.set(title=f"{t}: {gradient} alignment along rollouts", xlabel="position in rollout (symlog)",
               ylabel="cosine with g_ideal", ylim=(-1.05, 1.05))
    _save(fig, plt, Path(directory) / ALIGN_FIGURES[0], atomic_path)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for ax, t in zip(axes[0], teachers, strict=True):
        for correct, color in ((False, "tab:red"), (True, "tab:green")):
            vals = [node["teachers"][t]["align"][gradient] for node in nodes if node["correct"] is correct]
            vals = [v for v in vals if v is not None]
            if vals:
                ax.hist(vals, bins=20, range=(-1, 1), alpha=0.5, color=color,
                        label=f"{'correct' if correct else 'incorrect'} (n={len(vals)})")
        ax.set(title=f"{t}: {gradient} alignment", xlabel="cosine with g_ideal", ylabel="nodes")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    _save(fig, plt, Path(directory) / ALIGN_FIGURES[1], atomic_path)


def _save(fig: Any, plt: Any, path: Any, atomic_path: Any) -> None:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
