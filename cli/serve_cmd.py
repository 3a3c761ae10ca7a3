"""`superopt serve MODEL.yaml --port 8000`: an OpenAI-compatible HTTP server over the reference decoder, batched
in torch on the CPU (docs/serving.md): continuous batching, a paged KV cache, streaming.

Every option and the spec are checked, the weights and the tokenizer read and the port bound before the server
starts, so a bad one is one line and exit 2. The server needs the `serve` extra (starlette, uvicorn,
tokenizers), imported only here: the rest of the command line works without it.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import click

from superopt.cli.errors import Checked, reports_errors
from superopt.errors import SuperoptError
from superopt.model import MAX_CONTEXT, load_spec
from superopt.spec import check_seed

MEMORY_BYTES = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


@click.command("serve")
@click.argument("spec", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="0: any free port.")
@click.option(
    "--tokenizer",
    "tokenizer_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="A local tokenizer.json for text prompts (without it, prompts are token ids).",
)
@click.option(
    "--precision",
    type=click.Choice(["bfloat16", "float32"]),
    default="bfloat16",
    show_default=True,
    help="bfloat16 rounds as HF's bf16 model does; float32 computes everything in float32.",
)
@click.option("--max-batch", type=click.IntRange(1, 4096), default=8, show_default=True, help="Sequences a step.")
@click.option(
    "--max-queue", type=click.IntRange(1, 1 << 20), default=64, show_default=True, help="Waiting requests (then 429)."
)
@click.option(
    "--context",
    type=click.IntRange(2, MAX_CONTEXT),
    help="Positions a sequence may reach, prompt and output (default: the spec's max_seq).",
)
@click.option("--block-size", type=click.IntRange(1, 4096), default=16, show_default=True, help="KV positions a block.")
@click.option(
    "--kv-blocks",
    type=click.IntRange(1, 1 << 24),
    help="Blocks in the KV pool (default: --max-batch sequences of the whole context).",
)
@click.option(
    "--prefill-chunk",
    type=click.IntRange(1, 1 << 20),
    default=64,
    show_default=True,
    help="Prompt tokens prefilled a step, beside the decoding sequences.",
)
@click.option(
    "--seed", type=Checked("seed", int, check_seed), default=0, show_default=True, help="Seed of unseeded requests."
)
@reports_errors
def serve_command(
    spec: Path,
    host: str,
    port: int,
    tokenizer_path: Path | None,
    precision: str,
    max_batch: int,
    max_queue: int,
    context: int | None,
    block_size: int,
    kv_blocks: int | None,
    prefill_chunk: int,
    seed: int,
) -> None:
    """Serve MODEL.yaml over HTTP: /v1/completions, /v1/chat/completions, /health, /metrics."""
    try:  # the optional `serve` extra
        import uvicorn

        from superopt.serve.app import create_app
        from superopt.serve.kv import default_blocks
        from superopt.serve.scheduler import Scheduler
        from superopt.serve.text import TextTokenizer
    except ImportError as e:
        raise SuperoptError(
            f"superopt serve needs the serve extra ({e.name} is not installed): pip install 'superopt[serve]'"
        ) from None
    ms = load_spec(spec)
    cfg, context = ms.config, context or ms.max_seq
    blocks = kv_blocks or default_blocks(max_batch, context, block_size)
    if blocks * block_size < context:
        raise SuperoptError(
            f"--kv-blocks {blocks} of --block-size {block_size} hold {blocks * block_size} positions, fewer than "
            f"the context limit {context}: a long request could never run"
        )
    pool = 2 * cfg.layers * blocks * block_size * cfg.kv_heads * cfg.head_dim * (4 if precision == "float32" else 2)
    if pool > MEMORY_BYTES // 2:
        raise SuperoptError(
            f"the KV pool needs {pool / 2**30:.1f} GB, more than half of this machine's {MEMORY_BYTES / 2**30:.0f} GB "
            "(lower --kv-blocks, --max-batch or --context)"
        )
    tokenizer = TextTokenizer.from_file(tokenizer_path, cfg.vocab) if tokenizer_path else None
    try:
        sock = socket.create_server((host, port))
    except OSError as e:
        raise SuperoptError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    scheduler = Scheduler.for_model(
        ms.load(),
        precision=precision,
        context=context,
        block_size=block_size,
        kv_blocks=blocks,
        max_batch=max_batch,
        max_queue=max_queue,
        prefill_chunk=prefill_chunk,
        seed=seed,
    )
    address, bound_port = sock.getsockname()[:2]
    where = f"[{address}]" if ":" in address else address  # an IPv6 address, as a URL writes it
    click.echo(
        f"serving {ms.name} on http://{where}:{bound_port} ({precision}, the reference decoder batched in torch; "
        f"{max_batch} slots, context {context}, {blocks} KV blocks of {block_size}, "
        f"{'tokenizer ' + str(tokenizer_path) if tokenizer else 'token ids only'})",
        err=True,
    )
    # streams still open at Ctrl-C are cut after 5 s (uvicorn would wait for them forever)
    config = uvicorn.Config(
        create_app(scheduler, ms.name, tokenizer), log_level="info", access_log=False, timeout_graceful_shutdown=5
    )
    server = uvicorn.Server(config)
    server.run(sockets=[sock])
