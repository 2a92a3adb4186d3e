"""Tables and the routing plot of `ablation.py`.

Every difference is printed with the seed spread it must beat: the largest range (max - min over seeds) of the
same metric among the rows (or rules) measured with two or more seeds. A difference no larger than that, or one
where no row had two seeds, is reported as "not shown at this scale".
"""

from __future__ import annotations

import numpy as np

NOT_SHOWN = "not shown at this scale"


def noise(groups: list[list[float]]) -> float | None:
    """Largest seed range among value lists with at least two seeds; None when there is none."""
    ranges = [max(v) - min(v) for v in groups if len(v) >= 2]
    return max(ranges) if ranges else None


def fmt(values: list[float], digits: int = 3) -> str:
    """mean [min, max] over seeds (just the value for one seed)."""
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def diff(a: list[float], b: list[float], spread: float | None) -> str:
    """mean(a) - mean(b) with the seed spread, and the verdict when the spread covers it."""
    if not a or not b:
        return "-"
    d = float(np.mean(a) - np.mean(b))
    if spread is None:
        return f"{d:+.3f} (one seed only: {NOT_SHOWN})"
    verdict = f"; {NOT_SHOWN}" if abs(d) <= spread else ""
    return f"{d:+.3f} (seed spread {spread:.3f}{verdict})"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def ablation_table(rows: dict[str, dict], labels: dict[str, str], base: str = "plain", sup: str = "arm") -> list[str]:
    """One line per row: full subnet and dynamic Y-PSNR/SSIM/FLOPs over seeds, and differences against the plain
    network's full PSNR (`base`: the paper's claim) and the ARM-style supernet (`sup`: do HES/BDLoss help)."""
    def get(row: str, key: str, sub: str) -> list[float]:
        return [s[key][sub] for s in rows[row]["seeds"].values() if key in s] if row in rows else []

    n_full = noise([get(r, "full", "psnr_y") for r in rows])
    n_dyn = noise([get(r, "dynamic", "psnr_y") for r in rows])
    n_mixed = noise([get(r, "dynamic", "psnr_y") for r in rows] + [get(base, "full", "psnr_y")])
    base_full, sup_full = get(base, "full", "psnr_y"), get(sup, "full", "psnr_y")
    sup_dyn = get(sup, "dynamic", "psnr_y")
    out = []
    for r in rows:
        full, dyn = get(r, "full", "psnr_y"), get(r, "dynamic", "psnr_y")
        out.append([labels[r], ", ".join(map(str, rows[r]["seeds"])), fmt(full), fmt(get(r, "full", "ssim_y"), 4),
                    "-" if r == base else diff(full, base_full, n_full),
                    "-" if r in (base, sup) else diff(full, sup_full, n_full),
                    fmt(dyn), fmt(get(r, "dynamic", "ssim_y"), 4), fmt(get(r, "dynamic", "flops_pct"), 1),
                    diff(dyn, base_full, n_mixed) if dyn else "-",
                    diff(dyn, sup_dyn, n_dyn) if dyn and r != sup else "-"])
    return _table(["row", "seeds", "full Y-PSNR", "full SSIM", f"full - {base} full", f"full - {sup} full",
                   "dynamic Y-PSNR", "dynamic SSIM", "dynamic FLOPs %", f"dynamic - {base} full",
                   f"dynamic - {sup} dynamic"], out)


def per_class_table(rows: dict[str, dict], labels: dict[str, str], a: str = "wbsr", b: str = "plain") -> list[str]:
    """Fig. 4: the full subnet's Y-PSNR by descriptor class for every row, and `a` - `b` per class."""
    seeds = lambda row: list(rows[row]["seeds"].values())  # noqa: E731
    k_count = len(seeds(next(iter(rows)))[0]["per_class"])
    out = []
    for k in range(k_count):
        vals = {r: [s["per_class"][k]["psnr_y"] for s in seeds(r) if s["per_class"][k]["psnr_y"] is not None]
                for r in rows}
        patches = seeds(next(iter(rows)))[0]["per_class"][k]["patches"]
        d = diff(vals[a], vals[b], noise(list(vals.values()))) if a in rows and b in rows else "-"
        out.append([str(k + 1), str(patches), *[fmt(vals[r], 2) for r in rows], d])
    return _table(["class", "tiles", *[labels[r] for r in rows], f"{a} - {b}"], out)


def routing_table(matched: dict[str, dict[str, list[float]]], targets: dict[str, list[float]],
                  ref: str = "calibrated") -> list[str]:
    """PSNR of each rule at matched FLOPs (targets: the default map's and Eq. 15's), and its gap to `ref`.

    A rule whose curve does not reach a target's FLOPs is left out of that target's rows."""
    out = []
    for target, by_rule in matched.items():
        spread = noise(list(by_rule.values()))
        where = f"{target}: {fmt(targets[target], 1)}%"
        for rule, vals in by_rule.items():
            out.append([where, rule, fmt(vals), "-" if rule == ref else diff(vals, by_rule.get(ref, []), spread)])
    return _table(["matched FLOPs", "rule", "Y-PSNR", f"rule - {ref}"], out)


def plot_routing(path: str, curves_by_seed: dict[int, dict[str, list[dict]]], plain_full: list[float],
                 wbsr_full: list[float]) -> None:
    """PSNR vs average FLOPs (% of full), one colour per rule, one line per seed; plain and full as references."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"calibrated": "C0", "eq15": "C3", "arm": "C2", "random": "C7"}
    names = {"calibrated": "calibrated map (tolerance sweep)", "eq15": "Eq. 15 map", "arm": "ARM rule (lambda sweep)",
             "random": "random, same histogram"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, curves in enumerate(curves_by_seed.values()):
        for rule, pts in curves.items():
            x, y = [p["flops_pct"] for p in pts], [p["psnr_y"] for p in pts]
            style = dict(marker="*", markersize=12, linestyle="none") if rule == "eq15" else dict(marker="o", ms=3)
            ax.plot(x, y, color=colours.get(rule, "k"), alpha=1.0 if i == 0 else 0.45,
                    linestyle=style.pop("linestyle", "-" if i == 0 else "--"),
                    label=f"{names.get(rule, rule)}" if i == 0 else None, **style)
    if plain_full:
        ax.axhline(np.mean(plain_full), color="k", linestyle=":", label="plain network (100%)")
    if wbsr_full:
        ax.plot([100.0] * len(wbsr_full), wbsr_full, "kx", label="WBSR full subnet")
    ax.set_xlabel("average FLOPs, % of the full network (paper's convention)")
    ax.set_ylabel("Y-PSNR (dB), val set")
    ax.set_title("Routing rules on the WBSR weights (solid: first seed, dashed: others)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
