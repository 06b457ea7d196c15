"""Peak memory of converting a multi-shard checkpoint stays near one shard, not the whole model.

Measured in a fresh process: anonymous resident memory (RssAnon, /proc) sampled every 2 ms during
the conversion of the weights (the part that grows with the model; the tokenizer's rebuild is a fixed
cost, tested in test_convert_tokenizer), minus what the process held before it. tracemalloc does not see torch's tensor
allocations, so it is reported only for the Python-side objects. File pages of the memory-mapped
shards are page cache, which the kernel can drop, and are not counted. Run with -s for the figures.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_convert_kit import v1_config, v1_weights, write_v1

from conftest import ROOT

pytestmark = pytest.mark.slow  # models loaded in fresh CLI processes
MEASURE = r"""
import json, sys, threading, time, tracemalloc
from pathlib import Path
from devops_cli.convert import qwen_v1 as convert
import torch, safetensors, transformers, tokenizers  # imported before the baseline

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024

def anon():
    return status("RssAnon")

src, out = Path(sys.argv[1]), Path(sys.argv[2])
peak, done = [anon(), status("VmRSS")], threading.Event()
base, base_rss = peak
def sample():
    while not done.is_set():
        peak[0] = max(peak[0], anon())
        peak[1] = max(peak[1], status("VmRSS"))
        time.sleep(0.002)
t = threading.Thread(target=sample); t.start()
tracemalloc.start()
(out / "w").mkdir(parents=True)
c = convert.qwen2_config(json.loads((src / "config.json").read_text()), src)
convert.convert_weights(src, out / "w", c)
py_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
done.set(); t.join()
print(json.dumps({"weights": {"peak_extra": peak[0] - base, "peak_rss_extra": peak[1] - base_rss, "tracemalloc_peak": py_peak}}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RssAnon from /proc (Linux)")
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_peak_memory_is_about_one_shard(tmp_path, fmt):
    import torch

    cfg = v1_config("2023-12", hidden=128, heads=4, layers=16, ffn=2 * 2048, seq_length=256)
    src = write_v1(tmp_path / "v1", cfg, v1_weights(cfg, dtype=torch.float32), fmt, shards=6)
    shards = [p.stat().st_size for p in src.glob(f"*.{fmt}")]
    r = subprocess.run([sys.executable, "-c", MEASURE, str(src), str(tmp_path / "out")], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    m = json.loads(r.stdout.strip().splitlines()[-1])
    mb = 1024**2
    print(f"\n{fmt}: {len(shards)} shards, total {sum(shards) / mb:.0f} MB, largest {max(shards) / mb:.0f} MB; "
          f"peak extra anonymous RSS: weights {m['weights']['peak_extra'] / mb:.0f} MB (with mapped file pages "
          f"{m['weights']['peak_rss_extra'] / mb:.0f} MB; tracemalloc {m['weights']['tracemalloc_peak'] / mb:.0f} MB)")
    assert sum(shards) > 200 * mb and len(shards) == 6
    assert m["weights"]["peak_extra"] < 1.25 * max(shards)
    assert m["weights"]["peak_rss_extra"] < 1.25 * max(shards)  # mapped pages of one shard at a time, not all
    assert m["weights"]["peak_extra"] < 0.5 * sum(shards)
