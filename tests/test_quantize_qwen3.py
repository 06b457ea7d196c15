"""`quantize` on the Qwen3 family's tiny models: Qwen3 (dense) quantizes every decoder linear and says
what share of the decoder that is; Qwen3-MoE (experts fused as 3-D parameters) and Qwen3.5 (linear- and
full-attention layers) are refused in one line before any weight loads; the share check refuses a
mostly-unquantizable decoder even where config.json did not say so."""

from __future__ import annotations

import importlib.util
import json

import pytest

from devops_cli.cli import main

torch = pytest.importorskip("torch")
GPTQ = importlib.util.find_spec("gptqmodel") is not None and importlib.util.find_spec("optimum") is not None
needs_gptq = pytest.mark.skipif(not GPTQ, reason="needs the quantize extra: pip install -e '.[quantize]'")


def cli(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as e:
        main(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("arch, says", [
    ("qwen3-moe", "qwen3_moe is a mixture-of-experts model (4 experts per layer"),
    ("qwen3.5", "qwen3_5_text mixes decoder layers of kinds full_attention, linear_attention"),
])  # fmt: skip
def test_refused_in_one_line_before_work(tiny_arch, tmp_path, capsys, arch, says):
    out, model = tmp_path / "int4", tiny_arch(arch)
    capsys.readouterr()  # the fixture's build output
    code, _, err = cli(["quantize", "--model", str(model), "--output", str(out)], capsys)
    assert code == 2 and says in err and "GPTQModel" in err and "keep it in bf16" in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not out.exists()  # refused before the output directory was made


def test_share_check_refuses_fused_experts_after_load(tiny_arch):
    """The run-time check behind the config check (a hub id has no local config.json): the decoder's
    quantizable share is counted on the loaded model; fused 3-D expert weights are named."""
    from devops_cli.errors import DevopsError
    from devops_cli.modeling import load_model
    from devops_cli.quantize import gptq

    moe = load_model(str(tiny_arch("qwen3-moe")), torch.float32)
    block_name, groups = gptq.find_blocks(moe, list(range(5, 21)), torch.device("cpu"))
    with pytest.raises(DevopsError) as e:
        gptq.coverage(moe, block_name, groups)
    message = str(e.value)
    assert "mlp.experts.gate_up_proj, mlp.experts.down_proj: fused 3-D weights" in message
    share = float(message.split("only ")[1].split("%")[0])
    assert 5 < share < 30  # the attention linears only
    dense = load_model(str(tiny_arch("qwen3")), torch.float32)
    block_name, groups = gptq.find_blocks(dense, list(range(5, 21)), torch.device("cpu"))
    quantized, total = gptq.coverage(dense, block_name, groups)
    assert 0.99 < quantized / total < 1  # all but the norms


@needs_gptq
@pytest.mark.slow
def test_qwen3_dense_int4_states_the_share_quantized(tiny_arch, tmp_path, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "int4"
    code, stdout, err = cli(["quantize", "--model", str(tiny_arch("qwen3")), "--output", str(out),
                             "--calib-seq-len", "128", "--calib-samples", "16", "--eval-samples", "2"], capsys)  # fmt: skip
    assert code in (0, None), err
    r = json.loads((out / "quantize.json").read_text(encoding="utf-8"))
    d = r["decoder_weights"]
    assert r["quantized_linears"] == 14 and 0.99 < d["fraction_quantized"] < 1 and d["quantized"] < d["total"]
    assert "decoder weights quantized" in stdout
    assert r["bytes"]["linear_ratio"] <= 0.3  # int4: ~0.27x the fp16 bytes of those linears
