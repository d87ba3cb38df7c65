"""Token-level view of speculative rounds, like the figure in Leviathan et al. (2023).

One line per round: the text so far, then the draft tokens the target accepted (green), the rejected
draft tokens struck through (red), and the target's own token (blue: a correction after a rejection,
or the bonus token after a full acceptance). Rendered with ANSI colours for a terminal or as a
standalone HTML page (no scripts, no external assets).

Build the view from `speculative_generate(..., record_rounds=True).rounds`.
"""

from __future__ import annotations

import dataclasses
import html
from typing import Callable, Optional, Sequence

import numpy as np

from effjax.data.tokenizer import ByteTokenizer
from effjax.speculative.decode import RoundRecord

TokenStr = Callable[[int], str]

_ANSI = {"accepted": "\x1b[32m", "rejected": "\x1b[9;31m", "correction": "\x1b[1;34m",
         "bonus": "\x1b[1;36m", "context": "\x1b[2m", "reset": "\x1b[0m"}


@dataclasses.dataclass
class Round:
  """One row's round: accepted draft tokens, rejected ones, and the target's token (None when an EOS
  among the accepted drafts ended the row before it)."""

  accepted: list[int]
  rejected: list[int]
  target_token: Optional[int]
  bonus: bool


def row_rounds(record: RoundRecord, row: int) -> list[Round]:
  """The rounds of one batch row, in order (rounds where the row had finished are skipped).

  Args:
    record: `SpecOutput.rounds`.
    row: batch index.
  """
  r = {f.name: np.asarray(getattr(record, f.name)) for f in dataclasses.fields(record)}
  out = []
  for i in range(int(r["num_rounds"])):
    if not r["active"][i, row]:
      continue
    n, dl, ne = int(r["num_accepted"][i, row]), int(r["draft_len"][i, row]), int(
        r["num_emitted"][i, row])
    draft = r["draft"][i, row, :dl].tolist()
    emitted = r["emitted"][i, row, :ne].tolist()
    if ne <= n:  # An accepted EOS ended the row: later drafts are dropped, no target token.
      out.append(Round(accepted=emitted, rejected=draft[ne:], target_token=None, bonus=False))
    else:
      out.append(Round(accepted=draft[:n], rejected=draft[n:], target_token=emitted[n],
                       bonus=n == dl))
  return out


def _tail(text: str, width: int) -> str:
  return text if len(text) <= width else "…" + text[-(width - 1):]


def _visible(s: str) -> str:
  """Newlines and tabs as symbols, other control bytes as \\xNN, so one round stays one line."""
  special = {"\n": "⏎", "\t": "⇥"}
  return "".join(special.get(c, c if c.isprintable() else f"\\x{ord(c):02x}") for c in s)


def render_terminal(record: RoundRecord, row: int = 0, *, token_str: Optional[TokenStr] = None,
                    prompt: str = "", context_width: int = 40, color: bool = True) -> str:
  """Multi-line string: one line per round, coloured with ANSI codes (plain tags when not `color`).

  Args:
    record: `SpecOutput.rounds`.
    row: batch index.
    token_str: id -> printable text (default: the byte tokenizer's).
    prompt: text shown as the initial context.
    context_width: characters of preceding text shown on each line.
    color: ANSI colours; otherwise accepted tokens are plain, rejected ones ~~struck~~, the target's
      token [bracketed].
  """
  token_str = token_str or ByteTokenizer().token_str
  lines, text = [], prompt
  for rd in row_rounds(record, row):
    acc = _visible("".join(token_str(t) for t in rd.accepted))
    rej = _visible("".join(token_str(t) for t in rd.rejected))
    tgt = "" if rd.target_token is None else _visible(token_str(rd.target_token))
    ctx = _visible(_tail(text, context_width))
    if color:
      kind = "bonus" if rd.bonus else "correction"
      parts = [f"{_ANSI['context']}{ctx}{_ANSI['reset']}", f"{_ANSI['accepted']}{acc}{_ANSI['reset']}"]
      if rej:
        parts.append(f"{_ANSI['rejected']}{rej}{_ANSI['reset']}")
      if tgt:
        parts.append(f"{_ANSI[kind]}{tgt}{_ANSI['reset']}")
    else:
      parts = [ctx, acc] + ([f"~~{rej}~~"] if rej else []) + ([f"[{tgt}]"] if tgt else [])
    lines.append("".join(parts))
    text += "".join(token_str(t) for t in rd.accepted) + (
        "" if rd.target_token is None else token_str(rd.target_token))
  return "\n".join(lines)


_CSS = """
body { font-family: ui-monospace, Menlo, Consolas, monospace; margin: 2em; color: #222; }
h1 { font-size: 1.2em; } h2 { font-size: 1em; margin-top: 2em; }
.round { white-space: pre-wrap; margin: 0.15em 0; }
.ctx { color: #999; } .acc { color: #0a7a2a; background: #e6f6ea; }
.rej { color: #c0392b; background: #fbeaea; text-decoration: line-through; }
.fix { color: #1f4fbf; background: #e8eefc; font-weight: bold; }
.bonus { color: #0e7c86; background: #e3f6f7; font-weight: bold; }
.legend span { margin-right: 1.5em; } table { border-collapse: collapse; margin-top: 1em; }
td, th { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
"""


def _span(cls: str, text: str) -> str:
  return f'<span class="{cls}">{html.escape(_visible(text))}</span>' if text else ""


def _section_html(record: RoundRecord, rows, token_str: TokenStr, prompts, summary,
                  context_width: int) -> list[str]:
  parts = []
  if summary:
    cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(_fmt(v))}</td></tr>"
                    for k, v in summary.items())
    parts.append(f"<table>{cells}</table>")
  batch = np.asarray(record.active).shape[1]
  for row in (range(batch) if rows is None else rows):
    text = prompts[row] if prompts is not None else ""
    rounds = row_rounds(record, row)
    parts.append(f"<h3>row {row}: {len(rounds)} rounds</h3>")
    for rd in rounds:
      acc = "".join(token_str(t) for t in rd.accepted)
      tgt = "" if rd.target_token is None else token_str(rd.target_token)
      parts.append("<div class='round'>" + _span("ctx", _tail(text, context_width))
                   + _span("acc", acc) + _span("rej", "".join(token_str(t) for t in rd.rejected))
                   + _span("bonus" if rd.bonus else "fix", tgt) + "</div>")
      text += acc + tgt
  return parts


def render_html_sections(sections: Sequence[dict], *, title: str = "Speculative decoding, token "
                         "by token", token_str: Optional[TokenStr] = None,
                         context_width: int = 60) -> str:
  """A standalone HTML page with several runs (e.g. one per draft).

  Args:
    sections: dicts with `record` (a `RoundRecord`) and optionally `heading`, `rows`, `prompts`
      (text of each row's prompt) and `summary` (a flat dict shown as a table).
    title: page title.
    token_str: id -> printable text (default: the byte tokenizer's).
    context_width: characters of preceding text shown on each line.
  """
  token_str = token_str or ByteTokenizer().token_str
  parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
           f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
           "<p class='legend'><span class='acc'>accepted draft</span><span class='rej'>rejected "
           "draft</span><span class='fix'>target correction</span><span class='bonus'>bonus "
           "token (all drafts accepted)</span></p>"]
  for sec in sections:
    if sec.get("heading"):
      parts.append(f"<h2>{html.escape(sec['heading'])}</h2>")
    parts += _section_html(sec["record"], sec.get("rows"), token_str, sec.get("prompts"),
                           sec.get("summary"), context_width)
  parts.append("</body></html>")
  return "\n".join(parts)


def render_html(record: RoundRecord, rows: Optional[Sequence[int]] = None, *,
                token_str: Optional[TokenStr] = None, prompts: Optional[Sequence[str]] = None,
                title: str = "Speculative decoding, token by token",
                summary: Optional[dict] = None, context_width: int = 60) -> str:
  """A standalone HTML page with one block per row and one line per round.

  Args:
    record: `SpecOutput.rounds`.
    rows: batch rows to show (default all).
    token_str: id -> printable text (default: the byte tokenizer's).
    prompts: text of each row's prompt, shown as the initial context.
    title: page title.
    summary: optional flat dict (e.g. from `metrics.summarize`) shown as a table.
    context_width: characters of preceding text shown on each line.
  """
  return render_html_sections([dict(record=record, rows=rows, prompts=prompts, summary=summary)],
                              title=title, token_str=token_str, context_width=context_width)


def _fmt(v) -> str:
  if isinstance(v, float):
    return f"{v:.3f}"
  if isinstance(v, (list, tuple)):
    return " ".join(_fmt(x) for x in v)
  return str(v)


def write_html(path: str, record: RoundRecord, **kw) -> str:
  """Writes `render_html(record, **kw)` to `path` and returns the path."""
  with open(path, "w", encoding="utf-8") as f:
    f.write(render_html(record, **kw))
  return path
