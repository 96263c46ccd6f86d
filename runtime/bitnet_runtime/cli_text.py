"""``run``, ``chat`` and ``serve`` on the command line, shared by ``bitnet-compile`` (which compiles the
artifact when none is given) and ``bitnet-runtime`` (on the device, artifact given).

Like llama.cpp: the generated text streams to stdout; what the program is doing and how fast
goes to stderr, one line each; ``--json`` prints one JSON object instead, for scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import UserError
from .sampling import SamplingParams


def add_model_options(p: argparse.ArgumentParser, artifact_required: bool) -> None:
    p.add_argument("-m", "--model", required=True, help="model directory (config.json, safetensors, tokenizer.json) or Hugging Face hub id")
    p.add_argument(
        "-a",
        "--artifact",
        type=Path,
        required=artifact_required,
        help="compiled artifact directory" + ("" if artifact_required else " (default: compile one for this CPU, cached)"),
    )
    p.add_argument("-t", "--threads", type=int, default=None, help="kernel threads (default: all cores)")
    p.add_argument("-c", "--context", type=int, default=None, help="context length in tokens (default: the model's)")
    p.add_argument(
        "--output-layer",
        choices=("f16", "i8", "f32"),
        default="f16",
        help="output layer format: f16 (default), i8 (per-row int8, faster) or f32 (the checkpoint's exact values, by numpy: for checking)",
    )


def add_sampling_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-n", "--max-tokens", type=int, default=128, help="new tokens at most (default 128)")
    p.add_argument("--temp", type=float, default=0.0, help="temperature; 0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold (1 = off)")
    p.add_argument("-s", "--seed", type=int, default=None, help="random seed for sampling")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def add_run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("-p", "--prompt", required=True, help="the prompt text")
    p.add_argument("--chat-template", action="store_true", help="wrap the prompt as one user message in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object: prompt and generated token ids, text, speeds")


def add_chat_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--system", default=None, help="system prompt")


def add_serve_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8080, help="port (default 8080)")
    p.add_argument("--name", default=None, help="the model's name in the API (default: the model directory's name)")
    p.add_argument("-np", "--parallel", type=int, default=16, help="sequences decoded together at most (default 16)")
    p.add_argument("--queue", type=int, default=64, help="requests waiting beyond those, at most; more get HTTP 429 (default 64)")
    p.add_argument("--chunk", type=int, default=64, help="prompt tokens prefilled per step between decode steps (default 64)")


COMMANDS = {
    "run": ("generate text from a prompt", add_run_options, True),
    "chat": ("interactive chat with the model's chat template", add_chat_options, True),
    "serve": ("serve the model over an OpenAI-compatible HTTP API, with continuous batching", add_serve_options, False),
}


def add_command(sub, name: str, artifact_required: bool) -> argparse.ArgumentParser:
    """The ``run``, ``chat`` or ``serve`` subcommand with all its options (both command lines
    use this). ``serve`` takes its sampling settings per request."""
    help, add_options, sampled = COMMANDS[name]
    p = sub.add_parser(name, help=help)
    add_model_options(p, artifact_required)
    add_options(p)
    if sampled:
        add_sampling_options(p)
    return p


def sampling(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(temperature=args.temp, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def load(args: argparse.Namespace, artifact: Path):
    from .api import LLM

    return LLM(args.model, artifact, output=args.output_layer, context=args.context, threads=args.threads)


def _speeds(result) -> str:
    return (
        f"prompt {len(result.prompt_ids)} tokens in {result.prefill_seconds:.2f} s ({result.prefill_tokens_per_second:.1f} tok/s), "
        f"generated {len(result.token_ids)} tokens ({result.decode_tokens_per_second:.1f} tok/s), finish: {result.finish_reason}"
    )


def run(args: argparse.Namespace, artifact: Path) -> int:
    llm = load(args, artifact)
    prompt = args.prompt
    if args.chat_template:
        ids = llm.tokenizer.encode(llm.tokenizer.render_chat([{"role": "user", "content": prompt}]), add_bos=False)
    else:
        ids = llm.tokenizer.encode(prompt)
    stream = None if args.json else (lambda piece: print(piece, end="", flush=True))
    result = llm.generate(ids, args.max_tokens, sampling(args), args.stop, stream)
    if args.json:
        print(
            json.dumps(
                {
                    "prompt_ids": result.prompt_ids,
                    "ids": result.token_ids,
                    "text": result.text,
                    "finish_reason": result.finish_reason,
                    "prefill_tokens_per_second": result.prefill_tokens_per_second,
                    "decode_tokens_per_second": result.decode_tokens_per_second,
                }
            )
        )
    else:
        print()
    print(_speeds(result), file=sys.stderr)
    return 0


def chat(args: argparse.Namespace, artifact: Path) -> int:
    llm = load(args, artifact)
    session = llm.chat(sampling(args), args.system)
    interactive = sys.stdin.isatty()
    print("chat: type a message; /clear starts over, /exit (or Ctrl-D) quits", file=sys.stderr)
    while True:
        if interactive:
            print("> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/clear":
            session.clear()
            continue
        if not line.strip():
            continue
        try:
            result = session.send(line.rstrip("\n"), args.max_tokens, args.stop, lambda piece: print(piece, end="", flush=True))
        except UserError as err:  # e.g. the conversation outgrew the context: say so, keep chatting
            print(f"error: {err}", file=sys.stderr)
            continue
        print()
        print(_speeds(result), file=sys.stderr)


def serve(args: argparse.Namespace, artifact: Path) -> int:
    try:
        from . import server
    except ImportError as err:
        raise UserError(
            f"serve needs the web libraries ({err.name} is missing): pip install 'bitnet-compile[serve]' (on a device: 'bitnet-runtime[serve]')"
        ) from None
    from .engine import Engine

    for flag, value, least in (
        ("--parallel", args.parallel, 1),
        ("--chunk", args.chunk, 1),
        ("--queue", args.queue, 0),
        ("--port", args.port, 0),
    ):
        if value < least:  # before the model loads (seconds), not after
            raise UserError(f"{flag} must be at least {least}, not {value}")
    llm = load(args, artifact)
    engine = Engine(llm.model, llm.tokenizer, max_seqs=args.parallel, max_queue=args.queue, chunk=args.chunk)
    name = args.name or Path(str(args.model).rstrip("/")).name
    server.serve(engine, name, args.host, args.port)
    return 0


HANDLERS = {"run": run, "chat": chat, "serve": serve}
