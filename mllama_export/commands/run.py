from __future__ import annotations

import json
import time
from pathlib import Path

import click

from mllama_export.errors import MllamaExportError


@click.command("run")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--prompt", help="Prompt text; with --chat it becomes one user message.")
@click.option("--token-ids", help="Prompt as comma-separated token ids, e.g. 500,12,13.")
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Image file; repeat for several images.",
)
@click.option("--chat", is_flag=True, help="Wrap --prompt and the images in the chat template.")
@click.option(
    "--max-new-tokens", type=int, default=32, show_default=True, help="Tokens to generate at most."
)
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 means greedy.")
@click.option(
    "--top-k", type=int, default=0, show_default=True, help="Sample among the k best (0: all)."
)
@click.option("--top-p", type=float, default=1.0, show_default=True, help="Nucleus sampling mass.")
@click.option("--seed", type=int, default=None, help="Seed for sampling.")
@click.option(
    "--backend",
    type=click.Choice(["onnxruntime", "tensorrt"]),
    default="onnxruntime",
    show_default=True,
    help="What runs the graphs.",
)
@click.option(
    "--device",
    type=click.Choice(["cpu", "cuda"]),
    default="cpu",
    show_default=True,
    help="ONNX Runtime provider.",
)
@click.option("--json", "as_json", is_flag=True, help="Print token_ids, text and timings as JSON.")
def command(
    folder,
    prompt,
    token_ids,
    images,
    chat,
    max_new_tokens,
    temperature,
    top_k,
    top_p,
    seed,
    backend,
    device,
    as_json,
):
    """Generate from an artifact folder: image(s) and prompt in, tokens out (streamed)."""
    from mllama_export.engines.runner import Runner
    from mllama_export.engines.sampling import Sampling

    if (prompt is None) == (token_ids is None):
        raise MllamaExportError("give exactly one of --prompt and --token-ids")
    sampling = Sampling(temperature, top_k, top_p, seed)
    runner = Runner.from_artifacts(folder, backend, device)
    start = time.perf_counter()
    if token_ids is not None:
        result = _run_ids(runner, token_ids, images, max_new_tokens, sampling)
    elif as_json:
        result = runner.generate(_prompt(prompt, images, chat), images, max_new_tokens, sampling)
    else:
        for piece in runner.stream(_prompt(prompt, images, chat), images, max_new_tokens, sampling):
            click.echo(piece, nl=False)
        click.echo()
        return
    result.timings["total_s"] = time.perf_counter() - start
    if as_json:
        click.echo(
            json.dumps(
                {"token_ids": result.token_ids, "text": result.text, "timings": result.timings}
            )
        )
    else:
        click.echo(" ".join(map(str, result.token_ids)))


def _prompt(prompt: str, images, chat: bool):
    if not chat:
        return prompt
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def _run_ids(runner, token_ids: str, images, max_new_tokens, sampling):
    from mllama_export.engines.pipeline import TextGeneration
    from mllama_export.engines.preprocess import preprocess

    try:
        ids = [int(t) for t in token_ids.split(",") if t.strip()]
    except ValueError as err:
        raise MllamaExportError(
            f"--token-ids {token_ids!r}: expected integers separated by commas"
        ) from err
    batch = None
    if images:
        if runner.image_config is None:
            raise MllamaExportError(
                "these artifacts have no preprocessor_config.json; images cannot be read"
            )
        batch = preprocess([list(images)], runner.image_config)
    gen = runner.generate_ids([ids], batch, max_new_tokens, sampling)
    text = runner.tokenizer.decode(gen.token_ids[0]) if runner.tokenizer else None
    return TextGeneration(text, gen.token_ids[0], ids, gen.timings)
