"""Hydra callback: at the end of a multirun, one table of all jobs (``sweep_summary.md`` / ``.csv``)
and a plot of mIoU per round per job (``sweep_miou.png``), in the sweep directory.

Each job's ``results.json`` (src/pipeline/results.py) provides baseline, conta, seed, the per-round
headline numbers and the columns to show them in (named after the job's data splits, so a COCO sweep
shows ``seg val2014``); jobs that failed (no results.json) are listed as such. Other swept settings (e.g.
``profile.cam.lr=0.02,0.05``) go into an ``overrides`` column, read from each job's ``.hydra/overrides.yaml``.

Below it, the jobs that differ only by ``seed`` are grouped (:func:`group_rows`): mean +- sample std over
the seeds per round, and each method's difference to the ``conta=off`` / ``debias=none`` group of the same
baseline and other settings, with a 95% Welch t interval of the difference of means
(:func:`welch_interval`; the t quantile from :func:`t_quantile`, computed here: scipy is not a dependency).
The groups also go to ``sweep_groups.csv``, one line per (group, round, metric).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from src.utils.io import write_bytes_atomic, write_text_atomic

log = logging.getLogger(__name__)

# Columns of a job's results.json shown in the sweep table (the classifier's mAP and the threshold stay in
# each run's own table).
SKIPPED_COLUMNS = {"cls mAP", "best thr"}


# Overrides that have their own column.
OWN_COLUMNS = {"baseline", "conta", "debias", "seed"}

# The round methods' "off" options: the reference group every method is compared with.
METHOD_DEFAULTS = {"conta": "off", "debias": "none"}


def job_overrides(job: Path) -> dict[str, str]:
    """The job's command-line overrides as key -> value (``+`` dropped); {} when Hydra wrote none."""
    path = job / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    pairs = (str(o).split("=", 1) for o in OmegaConf.load(path))
    return {key.lstrip("+~"): value for key, value in (p for p in pairs if len(p) == 2)}


def swept_overrides(jobs: list[Path]) -> dict[str, str]:
    """Per job, the overrides whose value differs between jobs (the swept ones), as ``k=v k2=v2``."""
    per_job = {job.name: job_overrides(job) for job in jobs}
    keys = sorted({k for o in per_job.values() for k in o} - OWN_COLUMNS)
    varying = [k for k in keys if len({o.get(k) for o in per_job.values()}) > 1]
    return {name: " ".join(f"{k}={o[k]}" for k in varying if k in o) for name, o in per_job.items()}


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The metric columns of the jobs, in first-seen order."""
    seen: dict[str, None] = {}
    for row in rows:
        for title in row.get("_columns", ()):
            seen.setdefault(title, None)
    return list(seen)


def collect(sweep_dir: Path) -> list[dict[str, Any]]:
    """One row per (job, round) from the job folders under ``sweep_dir``."""
    rows = []
    jobs = sorted(p for p in Path(sweep_dir).iterdir() if p.is_dir() and not p.name.startswith("."))
    overrides = swept_overrides(jobs)
    for job in jobs:
        results = job / "results.json"
        if not results.is_file():
            dry = (job / "plan.txt").is_file()  # written by dry_run=true instead of results
            rows.append({"job": job.name, "status": "dry run: plan.txt" if dry else
                         "no results.json (failed or still running)"})
            continue
        data = json.loads(results.read_text())
        columns = [(title, key) for title, key in data.get("columns", []) if title not in SKIPPED_COLUMNS]
        methods = {**METHOD_DEFAULTS, "conta": data.get("conta") or "off", **(data.get("methods") or {})}
        for entry in data["rounds"]:
            row = {"job": job.name, "status": "ok", "baseline": data.get("baseline"), **methods,
                   "seed": data.get("seed"), "overrides": overrides[job.name], "round": entry["round"],
                   "_methods": list(methods), "_columns": [title for title, _ in columns]}
            for title, key in columns:
                row[title] = entry["summary"].get(key)
            rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{100 * value:.1f}"
    return "-" if value is None else str(value)


def method_columns(rows: list[dict[str, Any]]) -> list[str]:
    """The round methods of the jobs (``conta``, ``debias``...), in first-seen order; ``debias`` only when a
    job ran with one other than ``none`` (older sweeps' tables keep their columns)."""
    seen: dict[str, None] = {"conta": None}
    for row in rows:
        for group in row.get("_methods", ()):
            if group == "conta" or any(r.get(group, METHOD_DEFAULTS.get(group)) != METHOD_DEFAULTS.get(group)
                                       for r in rows if r["status"] == "ok"):
                seen.setdefault(group, None)
    return list(seen)


def table_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Table columns; ``overrides`` only when the sweep varies more than baseline, the methods and seed."""
    swept = any(r.get("overrides") for r in rows)
    return ["job", "baseline", *method_columns(rows), "seed", *(["overrides"] if swept else []), "round",
            *metric_columns(rows)]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    header = table_columns(rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        if row["status"] != "ok":
            lines.append(f"| {row['job']} | {row['status']} |" + " |" * (len(header) - 2))
            continue
        lines.append("| " + " | ".join(_cell(row.get(h)) for h in header) + " |")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------ statistics
def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz's method)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def betainc(a: float, b: float, x: float) -> float:
    """The regularised incomplete beta function I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with ``df`` (real, > 0) degrees of freedom."""
    tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom, by bisection of
    :func:`t_cdf` (e.g. 0.975: 12.706 at df 1, 4.303 at df 2, 2.776 at df 4, 1.960 as df -> inf)."""
    if not 0.5 < p < 1.0 or not df > 0:
        raise ValueError(f"t_quantile needs 0.5 < p < 1 and df > 0, got p={p}, df={df}")
    low, high = 0.0, 1.0
    while t_cdf(high, df) < p:
        high *= 2.0
    for _ in range(200):
        mid = (low + high) / 2.0
        low, high = (mid, high) if t_cdf(mid, df) < p else (low, mid)
    return (low + high) / 2.0


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


def welch_interval(a: list[float], b: list[float], level: float = 0.95) -> dict[str, float | None]:
    """Difference of means mean(a) - mean(b) with Welch's t interval at ``level``: se = sqrt(s_a^2/n_a +
    s_b^2/n_b), Welch-Satterthwaite degrees of freedom. Both samples constant: a zero-width interval (df
    None); fewer than 2 values in either: no interval."""
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    out: dict[str, float | None] = {"diff": ma - mb, "low": None, "high": None, "df": None}
    if sa is None or sb is None:
        return out
    va, vb = sa * sa / len(a), sb * sb / len(b)
    se = math.sqrt(va + vb)
    if se == 0.0:
        out["low"] = out["high"] = ma - mb
        return out
    df = (va + vb) ** 2 / (va * va / (len(a) - 1) + vb * vb / (len(b) - 1))
    half = t_quantile(0.5 + level / 2.0, df) * se
    out.update(low=ma - mb - half, high=ma - mb + half, df=df)
    return out


# --------------------------------------------------------------------------------- grouping by seed
def group_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The finished rows grouped by everything but ``seed`` (baseline, methods, overrides, round): per metric
    the seeds' values, mean and sample std, and the difference to the reference group (every method at its
    off option, same baseline and overrides, its last round) with a 95% Welch interval."""
    done = [r for r in rows if r["status"] == "ok"]
    methods = method_columns(rows)
    metrics = metric_columns(done)
    groups: dict[tuple, dict[str, Any]] = {}
    for row in done:
        key = (row["baseline"], *(row.get(m) for m in methods), row["overrides"], row["round"])
        group = groups.setdefault(key, {"baseline": row["baseline"], **{m: row.get(m) for m in methods},
                                        "overrides": row["overrides"], "round": row["round"], "seeds": [],
                                        "values": {t: [] for t in metrics}})
        group["seeds"].append(row["seed"])
        for title in metrics:
            if row.get(title) is not None:
                group["values"][title].append(float(row[title]))
    out = sorted(groups.values(), key=lambda g: (str(g["baseline"]), str(g["overrides"]),  # off options first
                                                  [(g[m] != METHOD_DEFAULTS.get(m), str(g[m])) for m in methods],
                                                  g["round"]))
    for group in out:
        group["stats"] = {t: mean_std(v) for t, v in group["values"].items() if v}
        refs = [g for g in out if g["baseline"] == group["baseline"] and g["overrides"] == group["overrides"]
                and all(g[m] == METHOD_DEFAULTS.get(m, g[m]) for m in methods)]
        ref = max(refs, key=lambda g: g["round"]) if refs else None
        group["reference"] = ref
        group["diffs"] = {} if ref is None or ref is group else {
            t: welch_interval(v, ref["values"][t]) for t, v in group["values"].items() if v and ref["values"][t]}
    return out


def _pct(value: float | None, sign: bool = False) -> str:
    if value is None:
        return "-"
    value = round(100 * value, 1) + 0.0  # no "-0.0" from float noise
    return f"{value:+.1f}" if sign else f"{value:.1f}"


def groups_markdown(groups: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """The mean +- std table and the difference table (mIoU in %)."""
    methods = method_columns(rows)
    metrics = metric_columns([r for r in rows if r["status"] == "ok"])
    swept = any(g["overrides"] for g in groups)
    keys = ["baseline", *methods, *(["overrides"] if swept else []), "round"]

    def head(extra: list[str]) -> list[str]:
        cols = [*keys, *extra, *metrics]
        return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    lines = ["## Over seeds: mean ± sample std", "", *head(["seeds"])]
    for g in groups:
        cells = [str(g[k]) for k in keys] + [", ".join(str(s) for s in g["seeds"])]
        for t in metrics:
            mean, std = g["stats"].get(t, (None, None))
            cells.append("-" if mean is None else _pct(mean) + ("" if std is None else f" ± {_pct(std)}"))
        lines.append("| " + " | ".join(cells) + " |")
    off = ", ".join(f"{m}={METHOD_DEFAULTS[m]}" for m in methods if m in METHOD_DEFAULTS)
    lines += ["", f"## Difference to {off} (same baseline and settings): mean difference [95% Welch t interval]",
              "", *head([])]
    for g in groups:
        if not g["diffs"]:
            continue
        cells = [str(g[k]) for k in keys]
        for t in metrics:
            d = g["diffs"].get(t)
            if d is None:
                cells.append("-")
            else:
                interval = "" if d["low"] is None else f" [{_pct(d['low'], True)}, {_pct(d['high'], True)}]"
                cells.append(_pct(d["diff"], True) + interval)
        lines.append("| " + " | ".join(cells) + " |")
    if not any(g["diffs"] for g in groups):
        lines.append("(no group to compare: the sweep has no " + off + " job of the same settings)")
    return "\n".join(lines) + "\n"


def groups_csv(groups: list[dict[str, Any]], rows: list[dict[str, Any]]) -> str:
    """One line per (group, round, metric): n, mean, std, and the difference to the reference with its
    interval and degrees of freedom (fractions, not %)."""
    methods = method_columns(rows)
    fields = ["baseline", *methods, "overrides", "round", "metric", "seeds", "n", "mean", "std", "ref_n",
              "ref_mean", "diff", "ci95_low", "ci95_high", "welch_df"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields)
    writer.writeheader()
    for g in groups:
        for title, (mean, std) in g["stats"].items():
            ref, d = g["reference"], g["diffs"].get(title, {})
            writer.writerow({"baseline": g["baseline"], **{m: g[m] for m in methods}, "overrides": g["overrides"],
                             "round": g["round"], "metric": title, "seeds": " ".join(str(s) for s in g["seeds"]),
                             "n": len(g["values"][title]), "mean": mean, "std": std,
                             "ref_n": len(ref["values"][title]) if d else None,
                             "ref_mean": mean_std(ref["values"][title])[0] if d else None,
                             "diff": d.get("diff"), "ci95_low": d.get("low"), "ci95_high": d.get("high"),
                             "welch_df": d.get("df")})
    return buf.getvalue()


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.4))
    done = [r for r in rows if r["status"] == "ok"]
    # metrics some job reached (a stop_after=seeds sweep has no mask / segmentation numbers)
    seg = [t for t in metric_columns(done) if t.startswith("seg ")][:1]  # the first eval split
    metrics = [t for t in ("seed best", "mask mIoU", *seg) if any(r.get(t) is not None for r in done)]
    jobs = sorted({r["job"] for r in done})
    labels = {r["job"]: f"{r['job']} {r['overrides']}".strip() for r in done}
    rounds = sorted({r["round"] for r in done})
    for k, title in enumerate(metrics):
        ax = fig.add_subplot(1, len(metrics), k + 1)
        for job in jobs:
            pts = sorted((r["round"], r[title]) for r in done if r["job"] == job and r.get(title) is not None)
            if pts:
                ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], marker="o", label=labels[job])
        ax.set_title(title)
        ax.set_xticks(rounds)
        ax.set_xlabel("round")
        ax.set_ylabel("mIoU (%)")
    if fig.axes:
        fig.axes[-1].legend(fontsize=6, loc="best")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    write_bytes_atomic(path, buf.getvalue())


def write_summary(sweep_dir: Path) -> list[dict[str, Any]]:
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    groups = group_rows(rows)
    grouped = ("\n" + groups_markdown(groups, rows)) if groups else ""
    write_text_atomic(sweep_dir / "sweep_summary.md", "# Sweep summary\n\n" + to_markdown(rows) + grouped)
    if groups:
        write_text_atomic(sweep_dir / "sweep_groups.csv", groups_csv(groups, rows))
    buf = io.StringIO()
    fields = ["job", "status", *table_columns(rows)[1:]]
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(sweep_dir / "sweep_summary.csv", buf.getvalue())
    if any(r["status"] == "ok" for r in rows):
        plot(rows, sweep_dir / "sweep_miou.png")
    return rows


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not sweep_dir.is_dir():
            return
        rows = write_summary(sweep_dir)
        log.info(f"sweep summary ({sweep_dir / 'sweep_summary.md'}):\n" + to_markdown(rows))
