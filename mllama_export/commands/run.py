from __future__ import annotations

import itertools
import json
import time
from pathlib import Path

import click

from mllama_export.errors import MllamaExportError

from ._shared import backend_option, device_option, prefill_chunk_option


@click.command("run")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option(
    "--prompt",
    help="Prompt text, tokenized as transformers' MllamaProcessor does. Put <|image|> where "
    "each image goes, or leave it out to place all images before the text. With --chat it "
    "becomes one user message.",
)
@click.option(
    "--token-ids",
    help="Prompt as comma-separated token ids, e.g. 500,512,12,13 (used as given; no "
    "tokenizer, no BOS added). Instead of --prompt.",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Image file (PNG, JPEG, ...); repeat for several images, in the order of their "
    "<|image|> tokens. At most the artifacts' max_images.",
)
@click.option(
    "--chat",
    is_flag=True,
    help="Render the images and --prompt as one user turn with the checkpoint's chat template "
    "(images first), adding the assistant header.",
)
@click.option(
    "--max-new-tokens", type=int, default=32, show_default=True, help="Tokens to generate at most."
)
@click.option(
    "--temperature",
    type=float,
    default=0.0,
    show_default=True,
    help="Sampling temperature; 0 picks the likeliest token (greedy).",
)
@click.option(
    "--top-k", type=int, default=0, show_default=True, help="Sample among the k best (0: all)."
)
@click.option(
    "--top-p",
    type=float,
    default=1.0,
    show_default=True,
    help="Sample among the likeliest tokens holding this probability mass.",
)
@click.option("--seed", type=int, default=None, help="Seed for sampling, for repeatable output.")
@prefill_chunk_option
@backend_option("What runs the graphs.")
@device_option
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print token_ids, text and timings as one JSON object instead of streaming the text.",
)
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
    prefill_chunk,
    backend,
    device,
    as_json,
):
    """Generate from an artifact FOLDER: image(s) and prompt in, text out.

    The answer goes to stdout, streamed as it is generated in whole characters; control
    characters and bytes that form no character are shown escaped (\\x18, \\x80). Its label
    and the log go to stderr. --json prints token ids, text and timings as one JSON object
    instead. Unreadable images, image counts that do not match the <|image|> tokens and
    requests beyond the artifacts' limits are one-line errors (exit status 2).

    \b
    Examples:
      mllama-export run out/tiny --prompt "What is in this picture?" --image a.jpg
      mllama-export run out/tiny --prompt "Describe it" --image a.jpg --chat --temperature 0.8 --seed 0
      mllama-export run out/tiny --token-ids 500,512,12,13 --image a.jpg --max-new-tokens 8 --json
    """
    from mllama_export import console
    from mllama_export.engines.runner import Runner, TextGeneration
    from mllama_export.engines.sampling import Sampling
    from mllama_export.engines.text import printable
    from mllama_export.graphs.progress import step

    if as_json:
        console.quiet()
    if (prompt is None) == (token_ids is None):
        raise MllamaExportError("give exactly one of --prompt and --token-ids")
    if chat and prompt is None:
        raise MllamaExportError("--chat needs --prompt (token ids are used as given)")
    sampling = Sampling(temperature, top_k, top_p, seed)
    with step(f"loading {folder} ({backend} on {device})"):
        runner = Runner.from_artifacts(folder, backend, device)
    start = time.perf_counter()
    if token_ids is not None:
        result = _run_ids(runner, token_ids, images, max_new_tokens, sampling, prefill_chunk)
    elif as_json:
        result = runner.generate(
            _prompt(prompt, images, chat), images, max_new_tokens, sampling, prefill_chunk
        )
    else:
        result = TextGeneration("", [], [])
        pieces = runner.stream(
            _prompt(prompt, images, chat), images, max_new_tokens, sampling,
            errors="backslashreplace", done=result, prefill_chunk=prefill_chunk,
        )  # fmt: skip
        first = next(pieces, "")  # the prompt and images are checked before the label shows
        click.echo("answer: ", err=True, nl=False)
        for piece in itertools.chain([first], pieces):
            click.echo(printable(piece), nl=False)
        click.echo()
        _report(runner, result, time.perf_counter() - start)
        return
    result.timings["total_s"] = time.perf_counter() - start
    if as_json:
        payload = {"token_ids": result.token_ids, "text": result.text, "timings": result.timings}
        click.echo(json.dumps(payload))
    else:
        click.echo("generated token ids: ", err=True, nl=False)
        click.echo(" ".join(map(str, result.token_ids)))
        _report(runner, result, time.perf_counter() - start)


def _report(runner, result, seconds: float) -> None:
    """The line after the answer, on stderr: how many tokens, how fast, why it stopped."""
    from mllama_export.graphs.progress import duration

    n = len(result.token_ids)
    stops = set(runner.config.eos_token_ids)
    if runner.tokenizer is not None:
        stops |= runner.tokenizer.eos_token_ids
    why = "an end token" if n and result.token_ids[-1] in stops else "--max-new-tokens"
    click.echo(f"  {n} token(s) in {duration(seconds)}; stopped at {why}", err=True)


def _prompt(prompt: str, images, chat: bool):
    if not chat:
        return prompt
    content = [{"type": "image"} for _ in images] + [{"type": "text", "text": prompt}]
    return [{"role": "user", "content": content}]


def _run_ids(runner, token_ids: str, images, max_new_tokens, sampling, prefill_chunk):
    from mllama_export.engines.runner import TextGeneration

    try:
        ids = [int(t) for t in token_ids.split(",") if t.strip()]
    except ValueError as err:
        raise MllamaExportError(
            f"--token-ids {token_ids!r}: expected integers separated by commas"
        ) from err
    ids, batch = runner.inputs.encode(
        images=images, token_ids=ids, ids_name="--token-ids", images_name="--image"
    )
    gen = runner.generate_ids([ids], batch, max_new_tokens, sampling, prefill_chunk=prefill_chunk)
    text = runner.tokenizer.decode(gen.token_ids[0]) if runner.tokenizer else None
    return TextGeneration(text, gen.token_ids[0], ids, gen.timings)
