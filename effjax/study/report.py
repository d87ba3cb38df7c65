"""The study's report: a terminal table, a JSON file with every figure, and an HTML page with plots.

The JSON is the source of truth; the table and the page are views of it, so the page names exactly
the figures the JSON holds (a test checks that).

Report schema (`results` dict):
  machine: {platform, cpu_count, jax, python}
  training: {name: {"curve": [{"step", "loss", "eval_loss"?}, ...], "final": {...}}}
  decoding: [{"method", "sampling", "gamma"?, "batch", "tokens_per_s", "speedup", "tar"?, "tau"?,
              "alpha"?, "passes_per_token", "predicted_speedup"?, "verify_cost"?,
              "predicted_speedup_verify"?, "per_position_acceptance"?}, ...]
  token_view_html: HTML fragment of speculative rounds (optional)
  notes: [str]
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
from typing import Any, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

TABLE_COLUMNS = ("method", "draft", "sampling", "gamma", "tree_size", "batch", "tokens_per_s",
                 "speedup", "tar", "tau",
                 "alpha", "passes_per_token", "predicted_speedup", "verify_cost",
                 "predicted_speedup_verify")


def _cell(v: Any) -> str:
  if v is None:
    return "-"
  if isinstance(v, float):
    return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
  return str(v)


def terminal_table(rows: Sequence[dict], columns: Sequence[str] = TABLE_COLUMNS) -> str:
  """A fixed-width table of the decoding rows."""
  cells = [[_cell(r.get(c)) for c in columns] for r in rows]
  widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
  line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))
  out = [line(columns), line(["-" * w for w in widths])]
  out += [line(row) for row in cells]
  return "\n".join(out)


def _png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
  plt.close(fig)
  return buf.getvalue()


def plot_speedup_vs_gamma(rows: Sequence[dict]) -> bytes | None:
  """One panel per draft: measured (solid) and predicted (dashed) speedup against gamma."""
  spec = [r for r in rows if r.get("method") == "speculative" and r.get("gamma")]
  if not spec:
    return None
  drafts = sorted({r.get("draft") or "-" for r in spec})
  fig, axes = plt.subplots(1, len(drafts), figsize=(6.2 * len(drafts), 4.0), squeeze=False,
                           sharey=True)
  for ax, draft in zip(axes[0], drafts):
    mine = [r for r in spec if (r.get("draft") or "-") == draft]
    for sampling, batch in sorted({(r["sampling"], r["batch"]) for r in mine}):
      pts = sorted((r["gamma"], r["speedup"], r.get("predicted_speedup"),
                    r.get("predicted_speedup_verify")) for r in mine
                   if r["sampling"] == sampling and r["batch"] == batch)
      line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-",
                      label=f"measured, {sampling}, batch {batch}")
      if all(p[2] is not None for p in pts):
        ax.plot([p[0] for p in pts], [p[2] for p in pts], "--", color=line.get_color(),
                alpha=0.5, label=f"predicted, {sampling}, batch {batch}")
      if all(p[3] is not None for p in pts):
        ax.plot([p[0] for p in pts], [p[3] for p in pts], ":", color=line.get_color(),
                alpha=0.9, label=f"predicted with measured verify cost, {sampling}, batch {batch}")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("gamma (draft tokens per round)")
    ax.set_title(f"draft: {draft}")
    ax.legend(fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
  axes[0][0].set_ylabel("speedup over autoregressive")
  fig.suptitle("Speculative decoding: speedup against gamma")
  return _png(fig)


def plot_per_position_acceptance(rows: Sequence[dict]) -> bytes | None:
  """Acceptance rate of each draft position, at the largest gamma and smallest batch measured."""
  spec = [r for r in rows if r.get("method") == "speculative" and r.get("per_position_acceptance")]
  if not spec:
    return None
  gamma = max(len(r["per_position_acceptance"]) for r in spec)
  batch = min(r["batch"] for r in spec if len(r["per_position_acceptance"]) == gamma)
  chosen = sorted((r for r in spec if len(r["per_position_acceptance"]) == gamma
                   and r["batch"] == batch), key=lambda r: (str(r.get("draft")), r["sampling"]))
  fig, ax = plt.subplots(figsize=(7, 3.4))
  width = 0.8 / max(1, len(chosen))
  for i, r in enumerate(chosen):
    acc = r["per_position_acceptance"]
    ax.bar([j + 1 + (i - (len(chosen) - 1) / 2) * width for j in range(len(acc))], acc,
           width=width, label=f"{r.get('draft')}, {r['sampling']}")
  ax.set_xlabel("draft position")
  ax.set_ylabel("acceptance rate")
  ax.set_ylim(0, 1)
  ax.set_title(f"Per-position acceptance (gamma {gamma}, batch {batch})")
  ax.legend(fontsize=7)
  return _png(fig)


def plot_training_curves(training: dict) -> bytes | None:
  curves = {k: v.get("curve") for k, v in training.items() if v.get("curve")}
  if not curves:
    return None
  fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
  for ax, (name, curve) in zip(axes[0], curves.items()):
    steps = [p["step"] for p in curve if "loss" in p]
    ax.plot(steps, [p["loss"] for p in curve if "loss" in p], label="train")
    ev = [p for p in curve if p.get("eval_loss") is not None]
    if ev:
      ax.plot([p["step"] for p in ev], [p["eval_loss"] for p in ev], "o-", label="validation")
    ax.set_title(name)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend(fontsize=7)
  return _png(fig)


FIGURES = {
    "speedup_vs_gamma": ("Speedup against gamma", plot_speedup_vs_gamma, "decoding"),
    "per_position_acceptance": ("Per-position acceptance", plot_per_position_acceptance,
                                "decoding"),
    "training_curves": ("Training curves", plot_training_curves, "training"),
}


def make_figures(results: dict, out_dir: str) -> dict[str, str]:
  """Renders every figure the results allow into PNG files; returns {figure name: path}."""
  paths = {}
  for name, (_, fn, key) in FIGURES.items():
    png = fn(results.get(key) or ([] if key == "decoding" else {}))
    if png is None:
      continue
    path = os.path.join(out_dir, f"{name}.png")
    with open(path, "wb") as f:
      f.write(png)
    paths[name] = path
  return paths


def render_html(results: dict, figures: dict[str, str]) -> str:
  """A standalone page (images inlined) naming every figure and table the JSON holds."""
  esc = html.escape
  parts = ["<!DOCTYPE html><html><head><meta charset='utf-8'><title>effjax inference-efficiency "
           "study</title><style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;}"
           "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #ccc;padding:3px "
           "6px;text-align:right}th{background:#eee}img{max-width:100%}"
           "</style></head><body>",
           "<h1>effjax: inference-efficiency study</h1>"]
  m = results.get("machine", {})
  parts.append("<p>" + esc(", ".join(f"{k}: {v}" for k, v in m.items())) + "</p>")
  for note in results.get("notes", []):
    parts.append(f"<p><em>{esc(note)}</em></p>")
  parts.append("<h2 id='decoding'>Decoding: speed and acceptance</h2><table><tr>")
  parts += [f"<th>{esc(c)}</th>" for c in TABLE_COLUMNS] + ["</tr>"]
  for r in results.get("decoding", []):
    parts.append("<tr>" + "".join(f"<td>{esc(_cell(r.get(c)))}</td>" for c in TABLE_COLUMNS)
                 + "</tr>")
  parts.append("</table>")
  for name, path in figures.items():
    title = FIGURES[name][0]
    with open(path, "rb") as f:
      data = base64.b64encode(f.read()).decode()
    parts.append(f"<h2 id='{name}'>{esc(title)}</h2><img alt='{esc(title)}' "
                 f"src='data:image/png;base64,{data}'>")
  training = results.get("training", {})
  if training:
    parts.append("<h2 id='training'>Training</h2><table><tr><th>model</th><th>figure</th>"
                 "<th>value</th></tr>")
    for name, info in training.items():
      for k, v in info.get("final", {}).items():
        parts.append(f"<tr><td>{esc(name)}</td><td>{esc(k)}</td><td>{esc(_cell(v))}</td></tr>")
    parts.append("</table>")
  if results.get("token_view_html"):
    parts.append("<h2 id='token_view'>Speculative rounds, token by token</h2>"
                 "<p>Green: draft tokens the target accepted; red, struck through: rejected draft "
                 "tokens; blue: the target's own token (correction or bonus).</p>")
    # The view is a standalone page; srcdoc keeps this page valid HTML.
    parts.append("<iframe style='width:100%;height:520px;border:1px solid #ccc' srcdoc=\""
                 + html.escape(results["token_view_html"], quote=True) + "\"></iframe>")
  parts.append("</body></html>")
  return "".join(parts)


def write_report(results: dict, out_dir: str) -> dict[str, str]:
  """Writes report.json, the PNG figures and report.html into `out_dir`; returns their paths."""
  os.makedirs(out_dir, exist_ok=True)
  figures = make_figures(results, out_dir)
  results = dict(results, figures=sorted(figures))
  json_path = os.path.join(out_dir, "report.json")
  with open(json_path, "w") as f:
    json.dump(results, f, indent=1, default=float)
  html_path = os.path.join(out_dir, "report.html")
  with open(html_path, "w") as f:
    f.write(render_html(results, figures))
  return {"json": json_path, "html": html_path, **figures}
