"""`velora memory-estimate` for many configurations in one process, through the CLI's own entry point.

    python benchmarks/gpu/estimates.py REQUESTS.json OUT.json

REQUESTS.json maps a key to the argument list of one `velora ...` command line (which writes its breakdown with
--json). OUT.json maps each key to
{"argv", "rc", "json" (what the command wrote), "error", "output_tail"}. One process instead of one per
configuration: importing torch and transformers is most of a call's cost.
"""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path


def main() -> int:
    requests = json.loads(Path(sys.argv[1]).read_text(encoding="utf-8"))
    out_path = Path(sys.argv[2])
    from velora_cli.cli import main as velora  # the `velora` console script (pyproject [project.scripts])

    results: dict[str, object] = {}
    for key, argv in requests.items():
        buf = io.StringIO()
        began = time.perf_counter()
        rc: object = 0
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            try:
                velora(argv)
            except SystemExit as exc:
                rc = exc.code
            except Exception as exc:  # noqa: BLE001 - recorded per configuration
                rc = f"{type(exc).__name__}: {exc}"
        row: dict[str, object] = {"argv": argv, "rc": rc, "seconds": round(time.perf_counter() - began, 2)}
        row["output_tail"] = buf.getvalue()[-1500:]
        json_path = Path(argv[argv.index("--json") + 1]) if "--json" in argv else None
        if rc in (0, None) and json_path is not None and json_path.is_file():
            row["json"] = json.loads(json_path.read_text(encoding="utf-8"))
            row["error"] = None
        else:
            row["error"] = f"velora {argv[0]} exited {rc}: " + buf.getvalue().strip()[-300:]
        results[key] = row
        print(f"{key}: {'ok' if row['error'] is None else row['error']}", flush=True)
    out_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
