"""What a wiNAS search reports: the Pareto front, the architecture table, the plot.

Plain formatting of a search's results (no TensorFlow): which (cost, accuracy)
points no other beats, the derived architecture as a table of per-layer choices
and costs, and a grid of per-layer probability curves.
"""

from typing import List, Sequence, Tuple

from wa_tf.plotting import pyplot
from wa_tf.search import cost as cost_lib


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the (cost, accuracy) points that no other point beats, by increasing cost.

    A point is beaten when another costs no more and is no less accurate, and
    is cheaper or more accurate.  Equal points are all kept.
    """
    front = [i for i, (c, a) in enumerate(points)
             if not any(c2 <= c and a2 >= a and (c2 < c or a2 > a) for c2, a2 in points)]
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))



def architecture_table(architecture, costs_by_layer, normal_by_layer, layers, probs):
    header = ["layer", "input", "choice", "p", "cost", "normal cost", "x"]
    rows = []
    for layer in layers:
        choice = architecture[layer.name]
        key = cost_lib.Candidate.from_choice(choice).key
        c, n = costs_by_layer[layer.name], normal_by_layer[layer.name]
        rows.append([layer.name, f"{layer.height}x{layer.width}x{layer.in_channels}",
                     ("flex " if choice["conv"] == "flex" else "") + key,
                     f"{probs[layer.name][key]:.3f}", f"{c:.4g}", f"{n:.4g}", f"{n / c:.2f}"])
    widths = [max(len(str(v)) for v in col) for col in zip(header, *rows)]
    lines = ["  ".join(f"{v:<{w}}" for v, w in zip(row, widths)) for row in [header] + rows]
    return "\n".join(lines)


def plot_probabilities(path, history, layer_names, candidate_keys):
    """A grid of per-layer probability curves; returns False without matplotlib."""
    try:
        plt = pyplot()
    except ImportError:
        return False
    cols = 4
    rows = -(-len(layer_names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), sharex=True,
                             sharey=True, squeeze=False)
    epochs = [entry["epoch"] for entry in history]
    for ax, name in zip(axes.flat, layer_names):
        for key in candidate_keys[name]:
            ax.plot(epochs, [entry["probabilities"][name][key] for entry in history],
                    marker=".", label=key)
        ax.set_title(name, fontsize=9)
        ax.set_ylim(0, 1)
    for ax in list(axes.flat)[len(layer_names):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.supxlabel("epoch")
    fig.supylabel("probability")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True
