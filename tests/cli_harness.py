"""Running `prompt-jax` in-process for bad-input tables: exit code, stderr, and whether a watched
directory changed.

Each case calls `cli.main(argv)` (after clearing gin's config) and gets back a `CliResult`.
`assert_one_line_error` is the contract of every bad input: a non-zero exit code, stderr's last
line starts with `error:` and names the bad value, no traceback anywhere, and (when given) the
watched directory is byte-identical afterwards.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import traceback
from pathlib import Path
from typing import Optional, Sequence

from tests.conftest import GIN_CONFIGS

DEMO_GIN = str(GIN_CONFIGS / "runs" / "demo.gin")


@dataclasses.dataclass
class CliResult:
  code: Optional[int]
  out: str
  err: str


def run_cli(argv: Sequence[str], capsys) -> CliResult:
  """`prompt-jax <argv>` in this process; an exception escaping `main` counts as a traceback."""
  import gin  # pylint: disable=g-import-not-at-top

  from prompt_jax import cli  # pylint: disable=g-import-not-at-top
  gin.clear_config()
  capsys.readouterr()
  try:
    code = cli.main(list(argv))
  except SystemExit as e:  # argparse's own exits
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  except BaseException:  # pylint: disable=broad-except
    captured = capsys.readouterr()
    return CliResult(code=None, out=captured.out,
                     err=captured.err + "\nTraceback (escaped cli.main):\n" +
                     traceback.format_exc())
  finally:
    gin.clear_config()
  captured = capsys.readouterr()
  return CliResult(code=code, out=captured.out, err=captured.err)


def snapshot(path) -> dict[str, str]:
  """Relative path -> sha256 of every file (and '<dir>' for every directory) under `path`."""
  path = Path(path)
  if not path.exists():
    return {}
  if path.is_file():
    return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
  result = {}
  for root, dirs, files in os.walk(path):
    for name in dirs:
      result[os.path.relpath(os.path.join(root, name), path)] = "<dir>"
    for name in files:
      full = os.path.join(root, name)
      with open(full, "rb") as f:
        result[os.path.relpath(full, path)] = hashlib.sha256(f.read()).hexdigest()
  return result


def assert_one_line_error(result: CliResult, names: Sequence[str] = (), *,
                          watched=None, before: Optional[dict] = None) -> str:
  """The bad-input contract; returns stderr's last line. `names`: substrings the last line must
  contain (the bad value, the file, ...). `watched`/`before`: a directory and its `snapshot`
  taken before the run, which must be unchanged."""
  assert "Traceback" not in result.err, result.err
  assert result.code not in (0, None), (result.code, result.err)
  lines = [line for line in result.err.strip().splitlines() if line.strip()]
  assert lines, f"nothing on stderr (exit {result.code}); stdout: {result.out[-2000:]}"
  last = lines[-1]
  assert last.startswith("error:"), result.err
  for name in names:
    assert name in last, f"{name!r} not in {last!r}"
  if watched is not None:
    assert snapshot(watched) == before, f"{watched} changed"
  return last
