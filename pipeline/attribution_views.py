"""What `llmpipe explain` shows people: the HTML page (tokens shaded by attribution, chosen next to rejected, the
probe table), the aggregate plot, and the rich terminal view."""

from __future__ import annotations

import html
from pathlib import Path

from pipeline.formats import last_text


def _policy(p: dict) -> str:
    return f"{p['policy_changed']:.0%}" if "policy_changed" in p else "-"


def _shade(value: float, scale: float) -> str:
    """Green for attributions that raise the score, red for those that lower it; stronger for larger ones."""
    alpha = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    return f"rgba(0,160,60,{alpha:.2f})" if value >= 0 else f"rgba(220,40,40,{alpha:.2f})"


def _text_html(t: dict) -> str:
    scale = max((abs(a) for a in t["attributions"]), default=1.0)
    spans = []
    for token, a, region in zip(t["tokens"], t["attributions"], t["regions"], strict=True):
        shown = html.escape(token).replace("\n", "&#8629;<br>")
        spans.append(f'<span class="tok {region}" style="background:{_shade(a, scale)}" '
                     f'title="{a:+.4f} ({region})">{shown}</span>')  # fmt: skip
    return (f'<div class="score">score {t["score"]:+.3f} (baseline {t["baseline_score"]:+.3f}, gap '
            f'{t["gap"]:+.4f})</div><div class="text">{"".join(spans)}</div>')  # fmt: skip


def render_html(
    texts: list[dict], probes: list[dict], reward_model: str, data: str, n_steps: int, baseline: str
) -> str:
    """One self-contained page: the probe table, then per row its texts side by side (chosen next to rejected)
    with the margin."""
    by_row: dict[int, dict[str, dict]] = {}
    for t in texts:
        by_row.setdefault(t["row"], {})[t["side"]] = t
    probe_rows = "".join(
        f"<tr class='{'flag' if p['flagged'] else ''}'><td>{p['rule']}</td><td>{html.escape(p['what'])}</td>"
        f"<td>{p['rows']}</td><td>{p['mean_change']:+.3f}</td><td>{p['share_rose']:.0%}</td>"
        f"<td>{p['sound_model']}</td><td>{_policy(p)}</td><td>{'FLAGGED' if p['flagged'] else 'ok'}</td></tr>"
        for p in probes
    )
    blocks = []
    for i, sides in sorted(by_row.items()):
        first = next(iter(sides.values()))
        prompt = last_text(first["prompt"])
        margin = ""
        if {"chosen", "rejected"} <= sides.keys():
            margin = f" &mdash; margin {sides['chosen']['score'] - sides['rejected']['score']:+.3f}"
        cells = "".join(f"<td><h4>{side}</h4>{_text_html(t)}</td>" for side, t in sides.items())
        blocks.append(f"<h3>row {i}: {html.escape(prompt)}{margin}</h3><table class='pair'><tr>{cells}</tr></table>")
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>llmpipe explain: {html.escape(reward_model)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; max-width: 1200px; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; vertical-align: top; }}
table.pair {{ width: 100%; }} table.pair td {{ width: 50%; }}
.tok {{ font-family: ui-monospace, monospace; white-space: pre-wrap; border-radius: 3px; }}
.tok.prompt {{ border-bottom: 2px solid #99c; }} .tok.end {{ border-bottom: 2px solid #c9c; }}
.score {{ color: #555; font-size: 90%; margin-bottom: 4px; }} tr.flag {{ background: #fdd; }}
</style></head><body>
<h1>Why the reward model scored that</h1>
<p>Reward model <code>{html.escape(reward_model)}</code>, rows from <code>{html.escape(data)}
</code>. Integrated gradients over the input embeddings, {n_steps} steps from a {baseline} baseline: green
tokens raise the score, red ones lower it (hover for the value). Underlined blue: prompt; purple: end of turn.</p>
<h2>Counterfactual probe</h2>
<table><tr><th>rule</th><th>rewrite</th><th>rows</th><th>mean score change</th><th>share rose</th>
<th>a sound model's score</th><th>policy's answer changed</th><th></th></tr>{probe_rows}</table>
<h2>Rows</h2>
{"".join(blocks)}
</body></html>
"""


def plot_aggregates(summary: dict, path: Path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    shares = summary["region_share"]
    left.bar(list(shares), [shares[r] for r in shares], color=["#99c", "#4a4", "#c9c"])
    left.set_title("share of |attribution| by region")
    left.set_ylim(0, 1)
    top = summary["top_tokens"][:12][::-1]
    right.barh([repr(t["token"]) for t in top], [t["mean"] for t in top],
               color=["#2a2" if t["mean"] >= 0 else "#d33" for t in top])  # fmt: skip
    right.set_title("tokens with the most |attribution|: mean attribution")
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return True


def show_in_terminal(texts: list[dict], probes: list[dict]) -> None:
    """The first texts with their tokens shaded by attribution, and the probe table (rich, on stderr)."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(stderr=True)
    for t in texts:
        scale = max((abs(a) for a in t["attributions"]), default=1.0)
        line = Text(f"row {t['row']} {t['side']} (score {t['score']:+.3f}): ")
        for token, a in zip(t["tokens"], t["attributions"], strict=True):
            level = int(min(1.0, abs(a) / scale) * 4) if scale > 0 else 0
            colour = ["", "on #d9f2df", "on #9fdcaf", "on #5cc27a", "on #1f9e48"][level]
            if a < 0 and level:
                colour = ["", "on #f7dada", "on #eea3a3", "on #e06a6a", "on #c43030"][level]
            line.append(token.replace("\n", "\\n"), style=colour)
        console.print(line)
    table = Table(title="counterfactual probe")
    for column in ("rule", "rows", "mean change", "rose", "sound model", "policy changed", ""):
        table.add_column(column)
    for p in probes:
        table.add_row(p["rule"], str(p["rows"]), f"{p['mean_change']:+.3f}", f"{p['share_rose']:.0%}",
                      p["sound_model"], _policy(p), "[red]FLAGGED[/red]" if p["flagged"] else "ok")  # fmt: skip
    console.print(table)
