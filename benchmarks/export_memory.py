"""Peak host memory of `velora export` on the embedded SmolLM2-135M, per stage.

Builds a run directory with a random-initialised (gaussian) LoRA r=16 adapter on all seven projections, exports
it, and samples /proc/self/status every 20 ms: RssAnon (memory the process owns) and RssFile (page cache of the
memory-mapped checkpoint, reclaimable). Linux only. Prints one JSON line; the claim it backs is in the
velora_cli/export/merge.py docstring: the anonymous peak stays near one copy of the exported model.

    python benchmarks/export_memory.py --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path


def _status() -> dict[str, int]:
    with open("/proc/self/status", encoding="ascii") as handle:
        rows = dict(line.split(":", 1) for line in handle if line.startswith(("RssAnon", "RssFile")))
    return {key: int(value.split()[0]) * 1024 for key, value in rows.items()}


def _make_run(run: Path) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from velora_cli.config.load import dump_recipe, validate_recipe
    from velora_cli.config.presets import DEFAULT_MODEL
    from velora_cli.models.load import resolve_model

    base = resolve_model(DEFAULT_MODEL).path
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    lora = LoraConfig(r=16, target_modules=targets, init_lora_weights="gaussian")
    get_peft_model(AutoModelForCausalLM.from_pretrained(base), lora).save_pretrained(run)
    AutoTokenizer.from_pretrained(base).save_pretrained(run)
    recipe = validate_recipe({"name": "export-memory", "model": {"name": DEFAULT_MODEL}, "data": {"path": "-"}})
    (run / "recipe.yaml").write_text(dump_recipe(recipe), encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16", "fp32"])
    parser.add_argument("--max-shard-size", default="5GB")
    args = parser.parse_args()

    import velora_cli.export.merge as export

    with tempfile.TemporaryDirectory(prefix="velora-export-mem-") as tmp:
        run = Path(tmp) / "run"
        _make_run(run)
        import gc

        gc.collect()
        peaks = {"RssAnon": 0, "RssFile": 0}
        stages: list[dict[str, object]] = []
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                for key, value in _status().items():
                    peaks[key] = max(peaks[key], value)
                time.sleep(0.02)

        # Record the anonymous peak reached before each stage starts, to say which stage holds the peak.
        start_stage = export._Steps.start

        def start(self, description: str) -> None:
            stages.append({"stage": description.split(" ")[0], "anon_peak_before_MiB": round(peaks["RssAnon"] / 2**20)})
            start_stage(self, description)

        export._Steps.start = start
        baseline = _status()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        began = time.perf_counter()
        out = export.export_run(run, Path(tmp) / "out", dtype=args.dtype, max_shard_size=args.max_shard_size)
        seconds = time.perf_counter() - began
        done.set()
        sampler.join()
        weights = sum(p.stat().st_size for p in out.glob("*.safetensors"))
        above = (peaks["RssAnon"] - baseline["RssAnon"]) / weights
        print(
            json.dumps(
                {
                    "dtype": args.dtype,
                    "exported_weights_MiB": round(weights / 2**20, 1),
                    "baseline_anon_MiB": round(baseline["RssAnon"] / 2**20),
                    "peak_anon_MiB": round(peaks["RssAnon"] / 2**20),
                    "peak_anon_above_baseline_over_weights": round(above, 2),
                    "peak_file_MiB": round(peaks["RssFile"] / 2**20),
                    "seconds_cpu_shared_machine": round(seconds, 1),
                    "stages": stages,
                }
            )
        )


if __name__ == "__main__":
    main()
