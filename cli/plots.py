"""PNG figures (matplotlib, headless), written atomically like every other output."""

from __future__ import annotations

from typing import Any

from rechannel.ops.errors import UserError


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
    from rechannel.ops.atomic import atomic_path

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
