"""The "Performance (make bench)" section of benchmarks/RESULTS.md, written from bench_perf's results.

Only that section is rewritten (from its heading to the next ``## `` heading); the rest of
the file, e.g. the "Quality" section, is kept as it is. After a ``--only`` run,
:func:`update_results_md` replaces only the table rows and notes of the sections that ran.
"""
from __future__ import annotations

import operator
from pathlib import Path
from typing import Any

HEADING = "## Performance (make bench)"

# figure -> (comparison, target), from issue 5's acceptance list.
TARGETS: dict[str, tuple[str, float]] = {
    "merge_speedup_vs_naive": (">=", 10.0),
    "merge_fraction_of_memcpy": (">=", 0.5),
    "trial_overhead_fraction": ("<=", 0.05),
    "fid_speedup_vs_recompute": (">=", 2.0),
    "streaming_peak_model_copies": ("<=", 3.0),
    "train_logging_slowdown_fraction": ("<=", 0.05),
}
_OPS = {">=": operator.ge, "<=": operator.le}


def met(key: str, value: float) -> bool:
    op, target = TARGETS[key]
    return bool(_OPS[op](value, target))


def _merge_how(big: dict, big16: dict | None) -> tuple[str, str]:
    speed = (f"K={big['k']}, DigitsUNet(channels={big['channels']}) = {big['params'] / 1e6:.1f}M params, default "
             f"float32 stack: naive {big['naive_ms']:.0f} ms vs engine {big['engine_ms']:.1f} ms per trial")
    copy = (f"float32 engine {big['engine_gb_s']:.1f} GB/s vs copy of the stack's {big['stack_bytes'] / 1e9:.2f} GB "
            f"{big['memcpy_gb_s']:.1f} GB/s (read + written)")
    if big16:
        speed += (f"; bf16 stack (`--search-precision bf16`): {big16['engine_ms']:.1f} ms, "
                  f"{big16['speedup_vs_naive']:.1f}x the same naive loop")
        copy += (f"; bf16 engine {big16['engine_gb_s']:.1f} GB/s vs copy of its {big16['stack_bytes'] / 1e9:.2f} GB "
                 f"{big16['memcpy_gb_s']:.1f} GB/s ({big16['fraction_of_memcpy']:.2f})")
    return speed, copy


def _merge_note(r: dict[str, Any]) -> str:
    merge = r["details"]["merge"]
    big, small = merge["large"], merge["digits"]
    big16, small16 = merge.get("large_bf16"), merge.get("digits_bf16")
    run = r.get("section_runs", {}).get("merge")
    where = ""
    if run:
        load = ", ".join(f"{x:.1f}" for x in run["machine"]["load_average_start"])
        where = (f"Measured by `{run['command']}` ({run['date']}, {run['seconds']:.0f} s, load average {load} at the "
                 "start), not by the run the machine line above describes. ")
    text = (
        f"- **Merge.** {where}The naive loop is `merged[k] += c * sd[k]` over `load_file`d float32 state dicts, then "
        f"`load_state_dict`. Written with a fused `acc.add_(sd[k], alpha=c)` it takes {big['naive_fused_ms']:.0f} ms "
        f"({big['speedup_vs_naive_fused']:.1f}x the float32 engine). On the digits model itself "
        f"({small['params'] / 1e6:.2f}M params, K={small['k']}) the float32 engine takes {small['engine_ms']:.2f} ms "
        f"and the naive loop {small['naive_ms']:.1f} ms ({small['speedup_vs_naive']:.0f}x; fused "
        f"{small['speedup_vs_naive_fused']:.0f}x; {small['fraction_of_memcpy']:.0%} of the copy's bandwidth). On a CPU "
        f"a large model's merge is bound by memory bandwidth on both sides: the float32 engine runs at "
        f"{big['fraction_of_memcpy']:.0%} of the copy's bandwidth, and `load_file` is a zero-copy memory map of files "
        "in the page cache, so the naive loop pays only its extra passes over memory (a temporary per weighted add) "
        "and page faults, not disk reads.")
    if big16 and small16:
        text += (
            f" With the bf16 stack of `--search-precision bf16` (half the bytes; deviations from the last checkpoint, "
            f"see `StackedMerger`) the engine takes {big16['engine_ms']:.1f} ms on the large model "
            f"({big16['speedup_vs_naive']:.1f}x the same naive loop, {big16['fraction_of_memcpy']:.0%} of a copy of "
            f"its bytes) and {small16['engine_ms']:.2f} ms on the digits model ({small16['speedup_vs_naive']:.0f}x, "
            f"{small16['fraction_of_memcpy']:.0%}).")
    kernel = merge.get("kernel")
    if kernel:
        n = kernel["threads"]
        text += (
            f" torch's bf16 matrix-vector product alone reads the large stack at "
            f"{kernel['bf16_mv_gb_s_1_threads']:.1f} GB/s on one thread and {kernel[f'bf16_mv_gb_s_{n}_threads']:.1f} "
            f"on {n} (float32: {kernel['fp32_mv_gb_s_1_threads']:.1f} and {kernel[f'fp32_mv_gb_s_{n}_threads']:.1f}); "
            f"at {kernel['bf16_2k_rows']} rows one product takes {kernel['bf16_2k_single_mv_ms']:.0f} ms "
            f"({kernel['bf16_2k_single_mv_gb_s']:.1f} GB/s) and groups of 32 rows plus adds "
            f"{kernel['bf16_2k_grouped_ms']:.0f} ms, which is why the engine multiplies a 16-bit stack in groups of 32 "
            "rows on the CPU. While choosing the kernel (torch 2.13, this machine), `addmv` with the reference was "
            "1.8x slower than `mv` plus an add, float16 slower than float32, and `matmul`, a batched product over "
            "column blocks, two Python threads over halves of the stack, a (P, K) layout and chunked float32 "
            "conversion driven from Python no faster or slower. The bf16 kernel is compute-bound: in reruns on a "
            "quieter machine (load average below 1) the float32 product read at up to 29 GB/s on two threads (engine "
            "32 ms, 7.2x the naive loop) while bf16 stayed at 12-14 GB/s (33 ms). So on this CPU the bf16 stack halves "
            "the memory and is faster than float32 only when other jobs leave the merge less bandwidth than that.")
    if big16:
        text += (
            " The headline `merge_speedup_vs_naive` is the default float32 stack: the same precision as the naive "
            "loop, and what `lcsc-ops optimize` does unless asked; the bf16 figure buys part of its speed by rounding "
            "the merged weights to 8 significant bits, for search evaluations only.")
    return text


def render(r: dict[str, Any]) -> str:
    d, m = r["details"], r["machine"]
    big, mem, tr, fid, train = d["merge"]["large"], d["memory"], d["trial"], d["fid"], d["training"]
    merge_speed, merge_copy = _merge_how(big, d["merge"].get("large_bf16"))
    how = {
        "merge_speedup_vs_naive": merge_speed,
        "merge_fraction_of_memcpy": merge_copy,
        "trial_overhead_fraction": f"{tr['trials']} real trials, {tr['samples_per_trial']} samples, K={tr['k']}: "
                                   f"{tr['wall_ms']:.0f} ms/trial, of which sampling + features "
                                   f"{tr['sampling_ms'] + tr['features_ms']:.0f} ms",
        "fid_speedup_vs_recompute": f"{fid['samples']} samples vs {fid['reference_images']} reference images: "
                                    f"{fid['recompute_ms']:.0f} ms recomputed vs {fid['cached_ms']:.0f} ms cached",
        "streaming_peak_model_copies": f"fresh processes, K={mem['k']}, model {mem['model_bytes'] / 2**20:.1f} MiB: "
                                       f"stacked {mem['stacked_copies']:.1f} copies above baseline",
        "train_logging_slowdown_fraction": f"digits DDPM, batch {train['batch']}, two runs from one seed in "
                                           f"alternating 50-step blocks, {train['timed_steps']} timed steps each: "
                                           f"{train['step_ms_off']:.1f} vs {train['step_ms_on']:.1f} ms/step",
    }
    fmt = {"trial_overhead_fraction": "{:.1%}", "train_logging_slowdown_fraction": "{:+.1%}"}
    rows = "\n".join(
        f"| `{key}` | {fmt.get(key, '{:.2f}').format(r[key])} | {op} {target:g} | "
        f"{'yes' if met(key, r[key]) else '**no**'} | {how[key]} |" for key, (op, target) in TARGETS.items())
    load = ", ".join(f"{x:.1f}" for x in m["load_average_start"])
    notes = [
        _merge_note(r),
        f"- **Trial breakdown** (ms per trial): sampling {tr['sampling_ms']:.0f}, features {tr['features_ms']:.0f}, "
        f"merge {tr['merge_ms']:.1f}, FID statistics and distance {tr['fid_statistics_ms']:.1f}, MLflow child run "
        f"{tr['mlflow_child_run_ms']:.0f} (submitting it: the child runs are written by a background thread, "
        f"waited for before the timing stops), Optuna (ask + tell and the trial's bookkeeping on the default "
        f"journal file, sharing the GIL with the background MLflow writes) {tr['optuna_ms']:.0f}. The "
        f"same CMA-ES study with a constant objective, run by the same `run_trials`, costs "
        f"{tr['optuna_only_journal_ms']:.0f} ms per trial on the default journal file (Optuna's own "
        f"`JournalFileBackend`: a lock file and an fsync per write, e.g. per `suggest_float`), "
        f"{tr['optuna_only_sqlite_ms']:.0f} ms on a `sqlite:///` storage as `lcsc-ops` opens it (WAL mode, "
        f"`synchronous=NORMAL`, Optuna's heartbeat), "
        f"{tr['optuna_only_sqlite_plain_journal_mode_ms']:.0f} ms on a plain `RDBStorage` on sqlite (each "
        f"`suggest_float` its own fully synchronous commit) and {tr['optuna_only_memory_ms']:.1f} ms in memory. "
        "A shared machine slows sampling, which makes the fraction look smaller; on an idle one it is larger.",
        f"- **FID.** Both sides give the same value ({fid['fid_cached']:.4f} vs {fid['fid_recomputed']:.4f}). "
        f"Counting the {fid['sampling_ms']:.0f} ms of sampling that both share, the speed-up is "
        f"{fid['speedup_including_sampling']:.2f}x. The ratio grows with the reference set (50k images for CIFAR-10).",
        f"- **Memory.** Peak RSS (`VmHWM`, mapped file pages included) above a process with the same imports "
        f"and no model ({mem['baseline_peak_bytes'] / 2**20:.0f} MiB): streaming "
        f"+{(mem['streaming_peak_bytes'] - mem['baseline_peak_bytes']) / 2**20:.0f} MiB, stacked "
        f"+{(mem['stacked_peak_bytes'] - mem['baseline_peak_bytes']) / 2**20:.0f} MiB; model x K = "
        f"{mem['k'] * mem['model_bytes'] / 2**20:.0f} MiB. The stacked peak is the stack plus at most three "
        "files memory-mapped while it is built (one at a time since issue 24; all K before); streaming holds the model and "
        f"a one-slice read buffer (plain reads, nothing mapped). A streaming merge took {mem['streaming_merge_ms']:.0f} ms.",
        f"- **Training.** Each snapshot (raw + EMA safetensors written to a local spool by the logger's writer "
        "thread with their sha256, then the MLflow artifacts and the step's manifest fragment by its uploader "
        "thread) is waited for at the end of its 50-step block (`CheckpointLogger.wait`), so its whole wall time is "
        "charged to the logging run: an upper bound, as in training it overlaps the next steps. Per-block slowdowns "
        f"{', '.join(f'{p:+.0%}' for p in train['block_slowdowns'])}. Time inside `CheckpointLogger.step` on the "
        f"training thread (EMA update every step, a CPU copy of raw + EMA every 50): {train['logger_step_ms']:.2f} ms/step, "
        f"{train['logger_step_fraction']:.1%} of a step. {train['checkpoint_files']} files logged.",
    ]
    return "\n".join([
        HEADING, "",
        f"Machine: {m['cpu']}, {m['cores']} cores, shared (load average {load} at the start), torch "
        f"{m['torch']} (CPU, {m['torch_threads']} threads), Python {m['python']}. Date: {r['date']}. Command: "
        f"`{r['command']}` ({r['seconds']:.0f} s), `OMP_WAIT_POLICY={m['omp_wait_policy']}` (spinning OpenMP "
        "threads on a shared machine measure the neighbours: see `bench_perf.py`). Figures: "
        "`benchmarks/results/perf.json`; every ratio is measured side by side in the same run, the two sides "
        "interleaved, and microbenchmarks keep the fastest repetition of each side. Other jobs shared the cores "
        "and the disk, so repeated runs differ: rerun `make bench` on an idle machine for steadier figures.", "",
        "| figure | measured | target | met | how |", "|---|---|---|---|---|", rows, "", *notes, "",
    ])


def write_results_md(path: Path, result: dict[str, Any]) -> None:
    """Replace (or append) the Performance section of ``path``, creating the file if needed."""
    from _results_md import replace_section

    replace_section(path, HEADING, render(result))


# The lines of the section each bench_perf section owns: table rows by figure, notes by their bold lead.
SECTION_LINES = {
    "merge": ("| `merge_speedup_vs_naive` |", "| `merge_fraction_of_memcpy` |", "- **Merge.**"),
    "memory": ("| `streaming_peak_model_copies` |", "- **Memory.**"),
    "trials": ("| `trial_overhead_fraction` |", "| `fid_speedup_vs_recompute` |", "- **Trial breakdown**",
               "- **FID.**"),
    "training": ("| `train_logging_slowdown_fraction` |", "- **Training.**"),
}


def update_results_md(path: Path, result: dict[str, Any], sections: list[str]) -> None:
    """Replace only the table rows and notes of ``sections`` in the Performance section of ``path``.

    Other lines (the machine line, other sections' rows and notes, hand edits) stay as they are.
    A line missing from the file goes after the last line of its kind (table row or note).
    """
    text = path.read_text() if path.exists() else ""
    start = text.find(HEADING)
    if start < 0:
        write_results_md(path, result)
        return
    end = text.find("\n## ", start + len(HEADING))
    end = len(text) if end < 0 else end + 1
    lines = text[start:end].split("\n")
    fresh = render(result).split("\n")
    for name in sections:
        for prefix in SECTION_LINES[name]:
            new = next(line for line in fresh if line.startswith(prefix))
            at = [i for i, line in enumerate(lines) if line.startswith(prefix)]
            if at:
                lines[at[0]] = new
            else:
                kind = prefix[:3]
                last = max((i for i, line in enumerate(lines) if line.startswith(kind)), default=len(lines) - 1)
                lines.insert(last + 1, new)
    path.write_text(text[:start] + "\n".join(lines) + text[end:])
