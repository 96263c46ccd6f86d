"""The continuous-batching engine in process, on the tiny dummy model: batching changes no
result (decode and prompt passes bit for bit those of one sequence alone), the queue limit,
and a stop that leaves no request waiting forever."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

from bitnet_runtime.errors import UserError


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path, dict]:
    """The tiny dummy model, its artifact, and the environment with their conversion cache."""
    root = tmp_path_factory.mktemp("engine")
    env = dict(os.environ, BITNET_CACHE=str(root / "cache"))
    for args in (["dummy", "tiny", "-o", str(root / "model")], ["-m", str(root / "model"), "-o", str(root / "art")]):
        done = subprocess.run([sys.executable, "-m", "bitnet_compile", *args], capture_output=True, text=True, env=env, timeout=600)
        assert done.returncode == 0, done.stderr
    return root / "model", root / "art", env


@pytest.fixture(scope="module")
def llm(tiny):
    from bitnet_runtime.api import LLM

    model, art, env = tiny
    with mock.patch.dict(os.environ, {"BITNET_CACHE": env["BITNET_CACHE"]}):
        return LLM(model, art, echo=lambda line: None)


PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]]


def test_batched_decode_and_prompts_equal_one_sequence_alone(llm):
    """Bit for bit, whatever the sequences beside a row, their order, or a neighbour's slot
    being released (its pages given back) mid-way."""
    from bitnet_runtime.batch_step import BatchDecode

    m = llm.model
    tokens = (3, 7, 1, 500)
    alone = []
    for prompt in PROMPTS:
        seq = m.sequence()
        first = m.prefill(prompt, seq)
        alone.append([first] + [m.decode(t, seq) for t in tokens])
    seqs = m.sequences(len(PROMPTS))
    together = [dict(enumerate(m.forward_many(list(zip(seqs, PROMPTS)))))]
    batch = BatchDecode(m)
    together += [dict(enumerate(batch(seqs, [t] * len(seqs)))) for t in tokens[:2]]
    seqs[1].release()
    order = [3, 0, 2]
    together += [dict(zip(order, batch([seqs[i] for i in order], [t] * len(order)))) for t in tokens[2:]]
    for step, rows in enumerate(together):
        for i, row in rows.items():
            np.testing.assert_array_equal(row, alone[i][step], err_msg=f"sequence {i}, step {step}")


def test_batched_decode_with_the_int8_output_layer_equals_alone(tiny):
    """--output-layer i8: the batch's logits come from one i8_gemm call, each row exactly the
    int8 GEMV's of decoding that sequence alone; a whole block of 4 rows, then 3 (padded)."""
    from bitnet_runtime.api import LLM
    from bitnet_runtime.batch_step import BatchDecode

    model, art, env = tiny
    with mock.patch.dict(os.environ, {"BITNET_CACHE": env["BITNET_CACHE"]}):
        m = LLM(model, art, output="i8", echo=lambda line: None).model
    tokens = (3, 7, 1)
    alone = []
    for prompt in PROMPTS:
        seq = m.sequence()
        m.prefill(prompt, seq)
        alone.append([m.decode(t, seq) for t in tokens])
    seqs = m.sequences(len(PROMPTS))
    m.forward_many(list(zip(seqs, PROMPTS)))
    batch = BatchDecode(m)
    for step, t in enumerate(tokens):
        chosen = range(len(seqs)) if step < 2 else range(3)  # the last step: 3 of the 4 sequences
        rows = batch([seqs[i] for i in chosen], [t] * len(chosen))
        for i, row in zip(chosen, rows):
            np.testing.assert_array_equal(row, alone[i][step], err_msg=f"sequence {i}, step {step}")


def test_a_batch_takes_distinct_sequences_of_one_pool(llm):
    from bitnet_runtime.batch_step import BatchDecode

    batch, m = BatchDecode(llm.model), llm.model
    for seqs in ([m.sequence(), m.sequence()], [m.sequences(2)[0]] * 2):
        with pytest.raises(ValueError, match="one KVPool"):
            batch(seqs, [1, 2])


def test_the_batch_decode_benchmark_runs_and_bounds_the_step(tiny):
    """benchmarks/batch_decode.py on the tiny model: its ratio, its per-kernel table, its bound."""
    model, art, env = tiny
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "batch_decode.py"
    args = ["-m", str(model), "-a", str(art), "--rows", "3", "--rounds", "1", "--tokens", "3", "--steps", "2"]
    done = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "x one sequence" in done.stdout and "| ternary GEMM qkv |" in done.stdout and "| decode_attention |" in done.stdout
    assert "matmuls alone:" in done.stdout


def test_releasing_a_slot_zeroes_its_whole_pages_and_no_neighbours(llm):
    from bitnet_runtime.memory import lazy_zeros, release_pages

    pool = lazy_zeros((3, 1000), np.float32)  # 4000-byte slots: they share pages
    pool[...] = 1
    release_pages(pool[1])
    assert (pool[0] == 1).all() and (pool[2] == 1).all()
    big = lazy_zeros((3, 4096), np.float32)  # whole pages
    big[...] = 1
    release_pages(big[1])
    assert (big[1] == 0).all() and (big[0] == 1).all() and (big[2] == 1).all()


def _request(prompt, events, max_tokens=4):
    from bitnet_runtime.engine import Request
    from bitnet_runtime.sampling import SamplingParams

    return Request(prompt, max_tokens, SamplingParams(temperature=0), events.append, ignore_eos=True)


def test_the_queue_holds_free_slots_plus_max_queue(llm):
    from bitnet_runtime.engine import Engine, QueueFull

    engine = Engine(llm.model, llm.tokenizer, max_seqs=1, max_queue=1)  # not started: nothing is admitted
    events: list = []
    engine.submit(_request([1, 2], events))
    engine.submit(_request([1, 2], events))
    with pytest.raises(QueueFull):
        engine.submit(_request([1, 2], events))
    with pytest.raises(UserError, match="context holds"):
        engine.submit(_request([1] * llm.model.context_length, events))
    with pytest.raises(UserError, match="token ids"):
        engine.submit(_request([llm.model.config.vocab], events))


def test_a_stopped_engine_ends_every_request(llm):
    """Stopped while one request runs and two wait: all three get their Done, none hangs."""
    from bitnet_runtime.engine import Done, Engine

    engine = Engine(llm.model, llm.tokenizer, max_seqs=1, max_queue=4)
    events: list = []
    for _ in range(3):
        engine.submit(_request([1, 2, 3], events, max_tokens=200))
    engine.start()
    engine.stop()
    done = [e for e in events if isinstance(e, Done)]
    assert len(done) == 3 and done[-1].finish_reason == "error" and "shutting down" in done[-1].message
