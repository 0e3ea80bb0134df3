"""Decode speed of the ONNX Runtime runner against transformers' generate, side by side; and
chunked prefill's memory and time against one-shot prefill.

One synthetic model of about 100M parameters (not the tiny preset), exported once: a Llama 3.2
Vision (``--family mllama``) or a LLaVA 1.5 of llava-1.5-7b's design (``--family llava``:
Vicuna's full multi-head attention and 32064-token vocabulary, CLIP's quick-gelu tower, 2-layer
projector), judged against MllamaForConditionalGeneration or LlavaForConditionalGeneration.

--case decode: both sides generate the same number of tokens greedily from the same prompts
in the same process. Decode time excludes prefill on both sides: ours from the runner's own
timing, transformers' as generate(N) minus generate(1), each the median of several runs.

--case chunked-prefill: one long prompt prefilled by the prefill graph at once, then through
the decode (step) graph in chunks of each size. Peak memory: each size in a fresh child
process (ONNX Runtime's arena keeps what a call grew it to), the resident set sampled every
millisecond during the prefill, less what it was just before. Time per prompt token: every
size side by side in this process, the median of several runs, with the ratio to one-shot.
Each size's last-position logits are checked against one-shot's (relative L2 below 1e-5).

    python benchmarks/decode.py [--family llava] [--new-tokens 64] [--repeats 3] [--threads 2]
    python benchmarks/decode.py --case chunked-prefill [--prompt-len 1536] [--chunks 512 128 32]
"""

from __future__ import annotations

import argparse
import copy
import multiprocessing
import os
import statistics
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from mllama_export.engines.runner import Runner
from mllama_export.exporter.build import build
from mllama_export.exporter.options import BuildOptions
from mllama_export.graphs.config import PRESETS, MllamaConfig
from mllama_export.graphs.llava_config import LlavaConfig
from mllama_export.graphs.llava_presets import llava_preset
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


def llava_bench_config() -> LlavaConfig:
    """llava-1.5-7b's design at ~100M parameters; tiles of 112 pixels (64 image tokens)."""
    base = llava_preset("llava-1.5-7b")
    text = replace(
        base.text, hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=12, head_dim=64,
        intermediate_size=2048,
    )  # fmt: skip
    vision = replace(
        base.vision, hidden_size=128, num_layers=3, num_heads=4, intermediate_size=256,
        image_size=112, projection_dim=64,
    )  # fmt: skip
    return replace(base, text=text, vision=vision, image_seq_length=64)


# family: (config, transformers' class, the family's own build options)
FAMILIES = {
    "mllama": (bench_config, "MllamaForConditionalGeneration", {"xattn_mask": "hf"}),
    "llava": (llava_bench_config, "LlavaForConditionalGeneration", {}),
}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", choices=["decode", "chunked-prefill"], default="decode")
    parser.add_argument("--family", choices=list(FAMILIES), default="mllama", help="decode only")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompt-len", type=int, default=None, help="32; chunked: 1536")
    parser.add_argument("--chunks", type=int, nargs="+", default=[1024, 512, 256, 128, 64, 32])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.case == "chunked-prefill":
        if args.family != "mllama":
            parser.error("--case chunked-prefill measures the mllama model only")
        args.prompt_len = args.prompt_len or 1536
        chunked_prefill(args)
        return
    args.prompt_len = args.prompt_len or 32
    import transformers

    make_config, hf_class, family_options = FAMILIES[args.family]
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(make_config(), Path(tmp) / "ckpt")
        out = Path(tmp) / "artifacts"
        build(BuildOptions(str(ckpt), out, max_batch=8, max_seq_len=256, **family_options))
        runners = {
            "ort run": Runner.from_artifacts(out),
            "ort io-binding": Runner.from_artifacts(out, io_binding=True),
        }
        hf_model = getattr(transformers, hf_class)
        hf = hf_model.from_pretrained(ckpt, dtype=torch.float32).eval()
        params = sum(p.numel() for p in hf.parameters())
        print(
            f"model: {args.family}, {params / 1e6:.0f}M parameters; prompt {args.prompt_len} tokens, "
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


# -- chunked prefill ---------------------------------------------------------------------------


ONE_SLOT = "one-slot"  # the whole prompt by the step graph against one masked past slot


def chunked_prefill(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(bench_config(), Path(tmp) / "ckpt")
        out = Path(tmp) / "artifacts"
        build(
            BuildOptions(str(ckpt), out, max_batch=1, max_seq_len=args.prompt_len + 8),
            progress=lambda m: None,
        )
        rng = np.random.default_rng(0)
        prompt = [[1, *rng.integers(3, 31000, args.prompt_len - 1).tolist()]]
        sizes = [None, ONE_SLOT, *args.chunks]
        context = multiprocessing.get_context("spawn")
        with context.Pool(1, maxtasksperchild=1) as pool:
            memory = [pool.apply(prefill_memory, (out, prompt, c, args.threads)) for c in sizes]
        runner = _LastLogits.wrap(Runner.from_artifacts(out))
        times, last = {}, {}
        for chunk in sizes:  # side by side in this process, warm
            prefill_once(runner, prompt, chunk)
        for _ in range(args.repeats):
            for chunk in sizes:
                start = time.perf_counter()
                last[chunk] = prefill_once(runner, prompt, chunk)
                times.setdefault(chunk, []).append(time.perf_counter() - start)
        print(
            f"model: {_params(runner)}M parameters; one prompt of "
            f"{args.prompt_len} tokens, batch 1, fp32, {args.threads} threads, ONNX Runtime "
            f"(CPU); time: median of {args.repeats}"
        )
        print(
            f"{'prefill':>16} {'calls':>6} {'peak MB':>8} {'vs one-shot':>11} "
            f"{'ms/token':>9} {'vs one-shot':>11} {'rel L2':>8}"
        )
        base_mem, base_time = memory[0], statistics.median(times[None])
        for chunk, mem in zip(sizes, memory, strict=True):
            t = statistics.median(times[chunk])
            err = _rel_l2(last[chunk], last[None])
            assert err < 1e-5, f"chunk {chunk}: logits differ from one-shot ({err:.1e})"
            name = {None: "prefill graph", ONE_SLOT: "step, one slot"}.get(
                chunk, f"chunks of {chunk}"
            )
            calls = 1 if chunk in (None, ONE_SLOT) else -(-args.prompt_len // chunk)
            print(
                f"{name:>16} {calls:>6} {mem / 1e6:>8.1f} {mem / base_mem:>10.2f}x "
                f"{t / args.prompt_len * 1e3:>9.3f} {t / base_time:>10.2f}x {err:>8.1e}"
            )


class _LastLogits:
    """A backend that keeps the last position's logits of its last call."""

    def __init__(self, backend):
        self.backend, self.logits = backend, None
        self.name, self.inputs, self.outputs = backend.name, backend.inputs, backend.outputs

    def infer(self, feed):
        out = self.backend.infer(feed)
        self.logits = np.asarray(out["logits"][:, -1])
        return out

    @classmethod
    def wrap(cls, runner):
        runner.prefill, runner.decode = cls(runner.prefill), cls(runner.decode)
        return runner


def prefill_once(runner, prompt, chunk) -> np.ndarray:
    """The prompt's prefill (one new token: no decode step); its last-position logits.
    ONE_SLOT: without the prefill graph, as a shared text engine prefills."""
    run = _without_prefill(runner) if chunk == ONE_SLOT else runner
    chunk = None if chunk == ONE_SLOT else chunk
    gen = run.generate_ids(prompt, None, 1, stop_tokens=set(), prefill_chunk=chunk)
    assert gen.timings["decode_steps"] == 0
    return (run.prefill if run.prefill is not None and chunk is None else run.decode).logits


def _without_prefill(runner):
    run = copy.copy(runner)
    run.prefill = None
    return run


def prefill_memory(folder, prompt, chunk, threads) -> int:
    """In a fresh process: the most the resident set grows during one prefill (bytes)."""
    torch.set_num_threads(threads)
    runner = Runner.from_artifacts(folder)
    if chunk == ONE_SLOT:
        runner, chunk = _without_prefill(runner), None
    page = os.sysconf("SC_PAGE_SIZE")
    peak, done = [0], threading.Event()

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss())
            time.sleep(0.001)

    before = rss()
    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        runner.generate_ids(prompt, None, 1, stop_tokens=set(), prefill_chunk=chunk)
    finally:
        done.set()
        sampler.join()
    return max(peak[0], rss()) - before


def _params(runner) -> int:
    from mllama_export.exporter.plan import count_params

    return round(count_params(runner.config).total / 1e6)


def _rel_l2(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


if __name__ == "__main__":
    main()
