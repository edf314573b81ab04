"""Tables, ratios and storage. Everything here reads the JSON-ready dicts the studies return
(raw median timings in ms per method), so a stored result can be re-rendered or its ratios
recomputed without a GPU."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
OURS = "ours"


def phases(with_bwd: bool) -> tuple[str, ...]:
    return ("fwd", "bwd") if with_bwd else ("fwd",)


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, rows)])


def fmt_num(x: float | None, digits: int = 0) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def fmt_err(x: float | None) -> str:
    return "—" if x is None else f"{x:.1e}"


def vs_best_peer(timings: dict[str, dict], phase: str) -> dict | None:
    """Ours against the fastest peer measured on the same case: {"ratio": best peer's time /
    ours (= our TF/s / theirs; > 1: ours is faster), "peer": its key}; None when ours or every
    peer lacks a time. phase: "fwd" or "bwd" (bwd = fwd+bwd - fwd of each method)."""
    key = f"{phase}_ms"
    ours = timings.get(OURS, {}).get(key)
    peers = {k: t[key] for k, t in timings.items() if k != OURS and t.get(key) is not None}
    if ours is None or not peers:
        return None
    best = min(peers, key=peers.get)
    return {"ratio": peers[best] / ours, "peer": best}


def cell(t: dict, with_bwd: bool) -> str:
    """"fwd / bwd" TF/s of one method, or its notes where a time is missing."""
    fwd = fmt_num(t["fwd_tflops"]) if t["fwd_ms"] is not None else t["fwd_note"]
    if not with_bwd:
        return fwd
    bwd = fmt_num(t["bwd_tflops"]) if t["bwd_ms"] is not None else t["bwd_note"]
    return f"{fwd} / {bwd}"


def ratio_cell(case: dict, phase: str, titles: dict[str, str]) -> str:
    best = vs_best_peer(case["timings"], phase)
    return "—" if best is None else f"{best['ratio']:.2f} ({titles[best['peer']]})"


def check_summary(case: dict) -> str:
    """Worst difference from ours over the peers that ran, flagged BAD past tolerance."""
    checks = case["check_vs_ours"].values()
    if not checks:
        return "—"
    worst = lambda key: max((c[key] for c in checks if key in c), default=None)
    return f"{fmt_err(worst('out_abs'))} / {fmt_err(worst('grads_abs'))}{'' if case['check_ok'] else ' BAD'}"


def main_row(case: dict, columns: list[list[str]], with_bwd: bool) -> list[str]:
    titles = dict(columns)
    return [case["case"], str(case["head_dim"]), str(case["heads"]),
            *(cell(case["timings"][key], with_bwd) for key, _ in columns),
            *(ratio_cell(case, phase, titles) for phase in phases(with_bwd)), check_summary(case)]


def progress_line(case: dict, columns: list[list[str]], with_bwd: bool) -> str:
    """One case as a line of the console log, while the run goes on."""
    titles = dict(columns)
    return " | ".join([f"{case['case']} D={case['head_dim']} H={case['heads']}",
                       *(f"{title} {cell(case['timings'][key], with_bwd)}" for key, title in columns),
                       *(f"ours/best {phase} {ratio_cell(case, phase, titles)}" for phase in phases(with_bwd)),
                       f"max abs diff {check_summary(case)}"])


def main_table(cases: list[dict], columns: list[list[str]], with_bwd: bool) -> str:
    """columns: [key, title] of ours and each peer measured, ours first."""
    unit = "fwd / bwd TF/s" if with_bwd else "fwd TF/s"
    headers = ["case", "D", "H", *(f"{title} {unit}" for _, title in columns),
               *(f"ours / best peer {phase}" for phase in phases(with_bwd)),
               "max abs diff vs ours (out / grads)"]
    return markdown_table(headers, [main_row(c, columns, with_bwd) for c in cases])


def prefixlm_step_table(cases: list[dict], columns: list[list[str]]) -> str | None:
    """PrefixLM batches: a training step's (fwd+bwd) time of each peer and its ratio to ours
    (> 1: ours is faster); None when no PrefixLM case has a fwd+bwd time of ours."""
    rows_of = [c for c in cases if c["kind"] == "prefixlm" and c["timings"][OURS]["fwd_bwd_ms"] is not None]
    peers = [(k, title) for k, title in columns[1:]
             if any(c["timings"][k]["fwd_bwd_ms"] is not None for c in rows_of)]
    if not rows_of or not peers:
        return None
    headers = ["case", "D", "prefixlm_fa3 fwd+bwd ms", *(f"{title} fwd+bwd ms (/ ours)" for _, title in peers)]
    rows = []
    for c in rows_of:
        ours = c["timings"][OURS]["fwd_bwd_ms"]
        cells = []
        for key, _ in peers:
            ms = c["timings"][key]["fwd_bwd_ms"]
            cells.append(f"{ms:.3f} ({ms / ours:.2f}x)" if ms is not None else c["timings"][key]["bwd_note"])
        rows.append([c["case"], str(c["head_dim"]), f"{ours:.3f}", *cells])
    return markdown_table(headers, rows)


def _pair(one: dict, two: dict, key: str, note: str) -> tuple[str, str]:
    """("a / b" ms, "b / a" speedup) of one timing key, or the notes when a time is missing."""
    a, b = one[key], two[key]
    if a is None or b is None:
        return f"{one[note]} / {two[note]}", "—"
    return f"{a:.3f} / {b:.3f}", f"{b / a:.2f}x"


def two_pass_table(results: list[dict]) -> str:
    headers = ["case", "D", "fwd ms single / two-pass", "fwd speedup",
               "fwd+bwd ms single / two-pass", "fwd+bwd speedup", "max abs diff out / grads"]
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["case"], str(r["head_dim"]), "err", "—", "err", "—", "—"])
            continue
        one, two = r["timings"]["single"], r["timings"]["two_pass"]
        rows.append([r["case"], str(r["head_dim"]), *_pair(one, two, "fwd_ms", "fwd_note"),
                     *_pair(one, two, "fwd_bwd_ms", "bwd_note"),
                     f"{fmt_err(r.get('out_diff_abs'))} / {fmt_err(r.get('grads_diff_abs'))}"])
    return markdown_table(headers, rows)


def zero_write_table(results: list[dict]) -> str:
    headers = ["case", "D", "fwd ms zero / no zero", "fwd cost", "bwd ms zero / no zero", "bwd cost"]
    rows = []
    for r in results:
        cells = []
        for key, error in (("fwd_ms", "error"), ("bwd_ms", "bwd_error")):
            m = r.get(key)
            failed = "error" in r or error in r
            cells += ([f"{m['zero']:.3f} / {m['no_zero']:.3f}", f"{m['cost_pct']:+.2f}%"] if m
                      else ["err" if failed else "n/a", "—"])
        rows.append([r["case"], str(r["head_dim"]), *cells])
    return markdown_table(headers, rows)


def git_commit() -> tuple[str | None, bool | None]:
    """Short commit of the checkout and whether tracked files differ from it; None, None
    without git (e.g. a copied working tree)."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True, timeout=10)
        head = run("rev-parse", "--short", "HEAD")
        if head.returncode != 0:
            return None, None
        return head.stdout.strip(), run("diff", "--quiet", "HEAD").returncode != 0
    except (OSError, subprocess.SubprocessError):
        return None, None


def environment(commit_override: str | None, fa4_version: str | None) -> dict:
    import torch
    import triton

    commit, dirty = git_commit()
    props = torch.cuda.get_device_properties(0)
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit_override or commit,
        "dirty": None if commit_override else dirty,
        "gpu": torch.cuda.get_device_name(0),
        "sm_count": props.multi_processor_count,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "triton": triton.__version__,
        "flash_attn_4": fa4_version,
        "python": sys.version.split()[0],
    }


def report_markdown(env: dict, settings: dict, cases, two_pass, zero_write) -> str:
    columns, with_bwd = settings["columns"], settings["with_bwd"]
    commit = env["commit"] or "unknown"
    parts = [
        "# prefixlm_fa3 benchmark",
        "",
        f"{env['date']} · commit {commit}{' (dirty)' if env['dirty'] else ''} · {env['gpu']} · "
        f"torch {env['torch']} · CUDA {env['cuda']} · cuDNN {env['cudnn']} · triton {env['triton']} · "
        f"flash-attn-4 {env['flash_attn_4'] or '—'}",
        "",
        f"bf16, {settings['tokens']} tokens per batch, do_bench median (warmup {settings['warmup_ms']} ms, "
        f"rep {settings['rep_ms']} ms). TF/s over allowed pairs only: fwd 4·D·H·pairs, bwd 2.5x; "
        "bwd = (fwd+bwd) - fwd, through autograd for every method. "
        "Ours / best peer: the fastest peer of the same case and run, > 1 = ours faster. "
        "— = not applicable or skipped, n/a = not built, err = failed (see the log).",
        "",
        main_table(cases, columns, with_bwd),
    ]
    if any(key == "fa4" for key, _ in columns):
        parts += ["", "FA4 on PrefixLM batches: the two-pass recipe (bidirectional prefix pass + causal "
                  "response pass, merged with torch.where, each pass's gradients zeroed outside its rows "
                  "before they are summed)."]
    for key, reason in settings["not_measured"].items():
        parts += ["", f"Not measured: {key} ({reason})."]
    step = prefixlm_step_table(cases, columns) if with_bwd else None
    if step:
        parts += ["", "## PrefixLM training step (fwd+bwd), peers against ours (goal: >= 1.3x)", "", step]
    if two_pass:
        parts += ["", "## PrefixLM: one pass vs two passes (this kernel, HRM-Text style)", "",
                  two_pass_table(two_pass), "", "Speedup = two-pass time / single-pass time (goal: >= 1.3x)."]
    if zero_write:
        parts += ["", "## Cost of zero-writing padding rows (goal: < 1%)", "", zero_write_table(zero_write)]
    return "\n".join(parts) + "\n"


def save(out_dir: Path, env: dict, settings: dict, cases, two_pass, zero_write, markdown: str) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    stem = f"{stamp}_{env['commit'] or 'nogit'}{'_quick' if settings['quick'] else ''}"
    payload = {"environment": env, "settings": settings, "cases": cases,
               "two_pass": two_pass, "zero_write": zero_write}
    (out_dir / f"{stem}.json").write_text(json.dumps(payload, indent=1) + "\n")
    (out_dir / f"{stem}.md").write_text(markdown)
    return out_dir / stem
