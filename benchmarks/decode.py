"""Decode speed of the ONNX Runtime runner against transformers' generate, side by side.

One synthetic model of about 100M parameters (not the tiny preset), exported once; both
sides generate the same number of tokens greedily from the same prompts in the same
process. Decode time excludes prefill on both sides: ours from the runner's own timing,
transformers' as generate(N) minus generate(1), each the median of several runs.

    python benchmarks/decode.py [--new-tokens 64] [--repeats 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from mllama_export.engines.runner import Runner
from mllama_export.exporter.build import build
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.config import PRESETS, MllamaConfig
from mllama_export.graphs.synth import write_checkpoint


def bench_config() -> MllamaConfig:
    raw = copy.deepcopy(PRESETS["tiny"])
    raw["image_token_index"] = 32000
    raw["text_config"].update(
        vocab_size=32000,
        hidden_size=768,
        num_hidden_layers=12,
        num_attention_heads=12,
        num_key_value_heads=4,
        intermediate_size=2048,
        cross_attention_layers=[3, 8],
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    raw["vision_config"].update(
        hidden_size=128, attention_heads=4, intermediate_size=256, vision_output_dim=384
    )
    return MllamaConfig.from_hf_dict(raw)


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import MllamaForConditionalGeneration

    config = bench_config()
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(config, Path(tmp) / "ckpt")
        out = Path(tmp) / "artifacts"
        build(
            BuildOptions(str(ckpt), out, max_batch=8, max_seq_len=256, xattn_mask="hf"),
        )
        runners = {
            "ort run": Runner.from_artifacts(out),
            "ort io-binding": Runner.from_artifacts(out, io_binding=True),
        }
        hf = MllamaForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float32).eval()
        params = sum(p.numel() for p in hf.parameters())
        print(
            f"model: {params / 1e6:.0f}M parameters; prompt {args.prompt_len} tokens, "
            f"{args.new_tokens} new tokens, {args.threads} threads, median of {args.repeats}"
        )
        print(
            f"{'batch':>5} {'runner':>15} {'tok/s':>8} {'hf tok/s':>9} {'ratio':>6} {'bytes copied/step':>18}"
        )
        for batch in (1, 8):
            row(runners, hf, batch, args)


def row(runners, hf, batch, args) -> None:
    rng = np.random.default_rng(batch)
    prompts = [[1, *rng.integers(3, 31000, args.prompt_len - 1).tolist()] for _ in range(batch)]
    n, ids = args.new_tokens, torch.tensor(prompts)

    def hf_generate(k):
        with torch.inference_mode():
            return hf.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=k,
                min_new_tokens=k,
                do_sample=False,
                pad_token_id=0,
            )

    expected = hf_generate(n)[:, ids.shape[1] :].tolist()
    hf_decode = median_time(lambda: hf_generate(n), args.repeats) - median_time(
        lambda: hf_generate(1), args.repeats
    )
    for name, runner in runners.items():
        results = [
            runner.generate_ids(prompts, None, n, stop_tokens=set()) for _ in range(args.repeats)
        ]
        assert results[-1].token_ids == expected, f"{name}: outputs differ from transformers"
        decode = statistics.median(r.timings["decode_s"] for r in results)
        tokens = results[-1].timings["decode_steps"] * batch
        ours_tps, hf_tps = tokens / decode, tokens / hf_decode
        print(
            f"{batch:>5} {name:>15} {ours_tps:>8.1f} {hf_tps:>9.1f} {ours_tps / hf_tps:>5.2f}x "
            f"{results[-1].cache_bytes_per_step:>18,}"
        )


if __name__ == "__main__":
    main()
