"""bench/lora_gpu.py runs end to end on the CPU with --tiny (eager part), so the GPU run cannot fail on a typo."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_lora_bench_runs_tiny_on_the_cpu(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLUX_")}
    env["OUT"] = str(tmp_path)
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "lora_gpu.py"), "--tiny", "--no-compile"],
                          env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "eager switch, set_adapters" in done.stdout
    results = json.loads((tmp_path / "lora_gpu.json").read_text())
    assert results["tiny"] and results["ranks"] == [4, 8]
    assert results["forward_eager_none_s"] > 0 and results["forward_eager_rank4_s"] > 0
    assert results["eager_switch_ms"]["median"] > 0
