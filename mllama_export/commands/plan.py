from __future__ import annotations

import click

from mllama_export.engines.profiles import DEFAULT_TEXT_ENGINE, TEXT_ENGINES


@click.command("plan")
@click.option("--model", required=True, help="A preset (tiny, 11b, 90b) or a checkpoint folder.")
@click.option(
    "--precision",
    type=click.Choice(["fp8", "bf16", "fp16"]),
    default="bf16",
    show_default=True,
    help="fp8: the text decoder's linear layers in FP8, the rest in bf16.",
)
@click.option(
    "--max-batch", type=int, default=1, show_default=True, help="Batch at the profile maximum."
)
@click.option(
    "--max-seq-len", type=int, default=8192, show_default=True, help="Tokens per sequence at most."
)
@click.option(
    "--max-images", type=int, default=1, show_default=True, help="Images per prompt at most."
)
@click.option(
    "--gpu",
    type=click.Choice(["h100", "h200"]),
    default="h100",
    show_default=True,
    help="GPU whose memory and roofline to plan against.",
)
@click.option(
    "--prompt-len",
    type=int,
    default=None,
    help="Prompt length for the prefill estimate [default: max-seq-len].",
)
@click.option(
    "--tiles", type=int, default=None, help="Tiles per image for the estimates [default: max]."
)
@click.option(
    "--text-engine",
    type=click.Choice(TEXT_ENGINES),
    default=DEFAULT_TEXT_ENGINE,
    show_default=True,
    help="The text engines to plan (as build --text-engine): split, prefill and decode "
    "engines holding the text weights twice; shared, one engine holding them once.",
)
def command(
    model, precision, max_batch, max_seq_len, max_images, gpu, prompt_len, tiles, text_engine
):
    """Print memory per engine and roofline lower bounds for decode and prefill, then both
    text engines' totals and the largest batch and sequence each fits."""
    from mllama_export.exporter.plan import plan_command_text

    click.echo(
        plan_command_text(
            model,
            precision,
            max_batch,
            max_seq_len,
            max_images,
            gpu,
            prompt_len,
            tiles,
            text_engine,
        )
    )
