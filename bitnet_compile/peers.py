"""The peers this project measures itself against, run beside ``bitnet-compile bench``.

bitnet.cpp (its I2_S kernels) and llama.cpp (TQ2_0) are built outside the repository, each
with its own ``llama-bench`` and dummy GGUF models of the 2B-4T and large shapes (float16
embedding tied as the output layer, as Microsoft's own 2B-4T GGUF), in one directory:

    DIR/bitnet/build/bin/llama-bench      DIR/models/{2b4t,large}-i2_s.gguf
    DIR/llama.cpp/build/bin/llama-bench   DIR/models/{2b4t,large}-tq2_0.gguf

``bench --peers DIR`` runs whichever of them exist for the model's shape, interleaved with
this project's own runs (A B A B: a machine whose speed drifts then slows every side alike),
and reports medians and ratios. Only ratios measured this way mean anything.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# peer -> (its llama-bench, its model file for a shape)
PEERS = {
    "bitnet.cpp I2_S": ("bitnet/build/bin/llama-bench", "models/{shape}-i2_s.gguf"),
    "llama.cpp TQ2_0": ("llama.cpp/build/bin/llama-bench", "models/{shape}-tq2_0.gguf"),
}
SHAPES = {2560: "2b4t", 1536: "large"}  # the peers' dummy models, by hidden size
TIMEOUT_S = 1800


@dataclass(frozen=True)
class Peer:
    name: str
    bench: Path
    model: Path


def available(peers_dir: Path, hidden: int) -> list[Peer]:
    """The peers built in ``peers_dir`` with a model of this hidden size's shape."""
    shape = SHAPES.get(hidden)
    if shape is None:
        raise UserError(f"the peers have dummy models of hidden size {', '.join(map(str, SHAPES))} only, not {hidden}")
    found = []
    for name, (bench, model) in PEERS.items():
        peer = Peer(name, peers_dir / bench, peers_dir / model.format(shape=shape))
        if peer.bench.is_file() and peer.model.is_file():
            found.append(peer)
    if not found:
        raise UserError(f"no peer is built in {peers_dir} for the {shape} shape (looked for {', '.join(b for b, _ in PEERS.values())})")
    return found


def _llama_bench(peer: Peer, threads: int, prompt: int, generate: int, repeat: int) -> float:
    """Tokens per second of one llama-bench test (its average over ``repeat`` runs)."""
    cmd = [
        str(peer.bench),
        "-m",
        str(peer.model),
        "-p",
        str(prompt),
        "-n",
        str(generate),
        "-r",
        str(repeat),
        "-t",
        str(threads),
        "-o",
        "json",
    ]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise UserError(f"{peer.name}: llama-bench did not run: {err}") from None
    if done.returncode != 0:
        raise UserError(f"{peer.name}: llama-bench failed: {(done.stderr.strip().splitlines() or ['(no output)'])[-1]}")
    try:
        results = json.loads(done.stdout[done.stdout.index("[") :])
        (result,) = [r for r in results if int(r["n_prompt"]) == prompt and int(r["n_gen"]) == generate]
        return float(result["avg_ts"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{peer.name}: unexpected llama-bench output ({err})") from None


def measure(peer: Peer, threads: int, tokens: int, repeat: int) -> dict:
    """Decode (tg: ``tokens`` generated) and prompt (pp: ``tokens`` at once) tokens/s."""
    return {
        "decode_tok_s": _llama_bench(peer, threads, 0, tokens, repeat),
        "prompt_tok_s": _llama_bench(peer, threads, tokens, 0, repeat),
    }
