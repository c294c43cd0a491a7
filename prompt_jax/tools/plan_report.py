"""The plan as text: the per-device table `prompt-jax plan` prints (bytes, fit, FLOPs and time at
peak, compile seconds per program), the notes under it, and what to change when the train step
does not fit. Formatting only: it reads the plan dict `plan.build_plan` returns.
"""

from __future__ import annotations

from typing import Optional

MAX_BATCH_LIMIT = 1 << 16  # --max_batch stops doubling here (`plan.Planner.max_batch`)
TITLES = {"train": "train step", "eval": "eval step", "score": "score", "predict": "predict"}

# Remat policies from the least activation memory to the most (docs/scale.md's plan table:
# XXL on v5e-8 fits with the first two, not with the last two).
REMAT_BY_MEMORY = ("full", "dots_with_no_batch_dims_saveable", "dots_saveable", "none")

_WIDTH = 13  # of a program's column
_MEMORY_ROWS = (("arguments", "arguments"), ("outputs", "outputs"),
                ("aliased", "  of them donated"), ("temporaries", "temporaries"),
                ("generated_code", "generated code"), ("peak", "peak"))


def _duration(seconds: float) -> str:
  if seconds >= 1:
    return f"{seconds:.2f} s"
  if seconds >= 1e-3:
    return f"{seconds * 1e3:.1f} ms"
  return f"{seconds * 1e6:.0f} us"


def format_bytes(n: Optional[float]) -> str:
  """A byte count in KiB, MiB or GiB, 10 characters wide ('-' for None)."""
  if n is None:
    return f"{'-':>10}"
  if n >= 2 ** 30:
    return f"{n / 2 ** 30:6.2f} GiB"
  if n >= 2 ** 20:
    return f"{n / 2 ** 20:6.1f} MiB"
  return f"{n / 2 ** 10:6.1f} KiB"


def fit_hint(remat_policy: str) -> str:
  """What to change when the train step does not fit: remat policies that keep less than
  `remat_policy`, a smaller batch, a wider model axis or a bigger slice."""
  leaner = REMAT_BY_MEMORY[:REMAT_BY_MEMORY.index(remat_policy)]
  options = [f"--gin.REMAT_POLICY='{p}'" for p in leaner]
  options += ["a smaller --gin.BATCH_SIZE (--max_batch finds the largest that fits)",
              "a wider model axis (--mesh=DATAxMODEL)", "a slice with more HBM per chip"]
  return "to fit, try: " + "; ".join(options)


def _compiler(plan: dict) -> str:
  """Whose bytes a plan without a TPU topology shows."""
  return "GPU" if plan.get("gpu_target_config") else "CPU"


def _row(label: str, cells) -> str:
  return f"  {label:<20}" + "".join(f"{x:>{_WIDTH}}" for x in cells)


def _header_lines(plan: dict) -> list[str]:
  """What was compiled for, by which compiler, and the run's shapes and parameter counts."""
  c, p = plan["config"], plan["params"]
  mesh = plan["mesh"]
  topo = plan.get("topology")
  where = f"mesh {mesh['data']}x{mesh['model']} (data x model)"
  if topo:
    head = (f"TPU plan: {topo['name']} ({topo['accelerator_type']}: {topo['chips']} chips of "
            f"{topo['device_kind']}, {topo['hosts']} host{'s' if topo['hosts'] > 1 else ''}), "
            f"{where}; compiled by the TPU compiler (libtpu {topo['libtpu']}, jax {plan['jax']})")
  else:
    head = (f"{where} on {plan['compiled_for']} (planned for {plan['platform']}"
            f"{' ' + plan['chip'] if plan['chip'] else ''})")
  lines = [head]
  if plan.get("gpu_target_config"):
    lines.append(f"GPU plan: {plan['device_kind']} x {mesh['data'] * mesh['model']} (from "
                 f"{plan['gpu_target_config']}), compiled by the XLA GPU compiler without a GPU; "
                 f"fit against {plan['chip']}'s {plan['chip_memory_gib']} GiB; no speed is "
                 "measured")
  elif not plan["tpu_plan"]:
    lines.append("NOT a TPU plan: these are the XLA CPU compiler's buffers; for the TPU "
                 "compiler's, install libtpu (pip install -e \".[tpu]\") and pass "
                 "--topology=v5e:2x4 (or another slice)")
  lines += [
      f"batch {c['batch_size']}, inputs {c['inputs']} (+prompt -> encoder {c['encoder_length']}),"
      f" targets {c['targets']}; activations {c['activation_dtype']}, frozen weights "
      f"{c['frozen_dtype']}, remat {c['remat_policy']}"
      f"{', scanned layers' if c.get('scan_layers') else ''}",
      f"parameters: frozen {p['frozen']:,}  trainable {p['trainable']:,}",
  ]
  return lines


def _table_lines(plan: dict) -> list[str]:
  """One column per program: bytes per device, fit, FLOPs, time at peak, compile seconds."""
  programs = plan["programs"]
  names = list(programs)
  lines = [f"  {'per device':<20}" + "".join(f"{TITLES[n]:>{_WIDTH}}" for n in names)]
  ok = {n: r for n, r in programs.items() if "memory" in r}
  for key, label in _MEMORY_ROWS:
    lines.append(_row(label, [format_bytes(ok[n]["memory"][key]).strip() if n in ok else "-"
                              for n in names]))
  if plan["chip"]:
    lines.append(_row(f"fits a {plan['chip']} chip", ["yes" if r.get("fits") else "NO"
                                                      for r in programs.values()]))
  lines.append(_row("FLOPs (whole mesh)", [
      f"{ok[n]['flops_total']:.3g}" if n in ok and ok[n]["flops_total"] == ok[n]["flops_total"]
      else "-" for n in names]))  # the deviceless GPU compiler gives no cost analysis: NaN
  if plan.get("chip_peak_flops"):
    lines.append(_row("at 100% of peak", [
        _duration(ok[n]["seconds_at_peak"]) if ok.get(n, {}).get("seconds_at_peak", 0) > 0
        else "-" for n in names]))
  if any(r.get("xla_flops_count_one_layer_per_stack") for r in ok.values()):
    lines.append("scanned layers: XLA's FLOPs count one layer per stack (a loop body once), so "
                 "they and the time at peak are left out; the analytic count below is whole")
  lines.append(_row("compile", [f"{r['compile_seconds']:.1f} s" for r in programs.values()]))
  lines.append(_row("  of it tracing+lowering", [
      f"{r['lower_seconds']:.1f} s" if "lower_seconds" in r else "-" for r in programs.values()]))
  return lines


def _chip_line(plan: dict) -> str:
  """How the fit was judged and what the time at peak means."""
  chip = plan["chip"]
  usable = plan.get("usable_hbm_bytes")
  peak = f"{plan['chip_peak_flops'] / 1e12:.0f} TFLOP/s bf16 per chip"
  if plan.get("topology"):
    of = f"{usable / 2 ** 30:.2f} GiB usable of " if usable else ""
    return (f"fit: the TPU compiler's own verdict ({of}{plan['chip_memory_gib']} GiB HBM "
            f"per {chip} chip); time at peak: XLA's FLOPs at {peak}, a bound, not a "
            "measurement")
  return (f"fit: the {_compiler(plan)} compiler's peak against {plan['chip_memory_gib']} GiB "
          f"per {chip} chip; time: XLA's FLOPs at {peak}")


def _train_flops_lines(plan: dict) -> list[str]:
  """The train step's analytic FLOPs and, without a topology, the fit verdict sentence."""
  f = plan["flops_per_step"]
  line = (f"train step analytic FLOPs: 4N matmul {f['analytic_matmul']:.4g} + attention "
          f"scores {f['analytic_attention']:.4g} = {f['analytic_total']:.4g}")
  if "ideal_step_seconds" in plan:
    line += f" -> {_duration(plan['ideal_step_seconds'])} at 100% of peak"
  lines = [line]
  chip = plan["chip"]
  if "fits" in plan and chip and not plan.get("topology"):  # the sentence tests, scripts read
    verdict = "fits" if plan["fits"] else "does NOT fit"
    lines.append(f"{verdict} in {plan['chip_memory_gib']} GiB per {chip} chip (by the "
                 f"{_compiler(plan)} compiler's bytes)")
  return lines


def _max_batch_line(m: dict) -> str:
  if m["max_batch"] == 0:
    return (f"largest batch that fits: none (not even {m['unit']}, one example per "
            "data shard)")
  more = (f"; {m['first_not_fitting']} does not" if m["first_not_fitting"] else
          f" (the search stops at {MAX_BATCH_LIMIT})")
  return (f"largest global batch whose train step fits: {m['max_batch']} (a multiple of "
          f"{m['unit']}, the data-parallel size){more}; {len(m['probes'])} compiles")


def _notes_lines(plan: dict) -> list[str]:
  """Under the table: how the fit was judged, the analytic FLOPs, what does not fit, the
  largest batch that does."""
  lines = [_chip_line(plan)] if plan["chip"] else []
  if "flops_per_step" in plan:
    lines += _train_flops_lines(plan)
  programs = plan["programs"]
  for name, r in programs.items():
    if "out_of_memory" in r:
      lines.append(f"{TITLES[name]} does NOT fit: {r['out_of_memory']}")
  if "out_of_memory" in programs.get("train", {}):
    lines.append(fit_hint(plan["config"]["remat_policy"]))
  if "max_batch" in plan:
    lines.append(_max_batch_line(plan["max_batch"]))
  return lines


def format_plan(plan: dict) -> str:
  """The plan (`plan.build_plan`'s dict) as the text `prompt-jax plan` prints."""
  return "\n".join(_header_lines(plan) + _table_lines(plan) + _notes_lines(plan))
