import numpy as np
from PIL import Image

from feddymem.benchmarks.frontier import frontier_points, frontier_table, knee, plot_frontier


def _results() -> dict:
    # (method, image AUROC, membership AUC) on two sets: "loose" leaks, "mid" is safe on one set only.
    rows = {
        "a": [("loose", 0.95, 0.90), ("mid", 0.94, 0.65), ("safe", 0.92, 0.60), ("safest", 0.85, 0.50)],
        "b": [("loose", 0.80, 0.88), ("mid", 0.79, 0.75), ("safe", 0.78, 0.69), ("safest", 0.70, 0.52)],
    }
    runs = [
        {"dataset": d, "method": m, "overrides": [f"x={m}"], "mean_image_auroc": auc, "bytes_up_per_client_round": 2e6}
        for d, r in rows.items()
        for m, auc, _ in r
    ]
    privacy = {
        d: {
            "rows": [{"upload": "per-image embeddings (a)", "membership_auc": None}]
            + [{"upload": m, "membership_auc": mia, "items": 100, "patches_per_item": 3.0} for m, _, mia in r]
        }
        for d, r in rows.items()
    }
    return {"runs": runs, "privacy": privacy}


def test_the_knee_is_the_most_accurate_setting_under_the_limit_on_every_set(tmp_path):
    points = frontier_points(_results())
    assert len(points) == 8  # the reference rows without a run are left out
    assert knee(points, 0.70) == "safe"  # "mid" is more accurate but leaks on set b
    assert knee(points, 0.95) == "loose" and knee(points, 0.40) is None
    table = frontier_table(points, 0.70)
    assert "| mid | `x=mid` | 0.7900 | 0.750 ✗ |" in table and "**safe**" in table
    png = plot_frontier(points, tmp_path / "frontier.png")
    pixels = np.asarray(Image.open(png).convert("L"), dtype=float)
    assert pixels.shape[1] > 800 and pixels.std() > 10
