"""Two threads sharing one loaded model: every pair of calls run at once gives bit-identical results to the same calls
run one after the other (the attention controller and kernel a call sets are its own: nets/layers.py)."""
import itertools
import threading

import pytest
import torch

import minledits
from minledits import ledits, leditspp, p2p, parity
from tests.helpers import SIZE, photo

pytestmark = pytest.mark.usefixtures("one_thread")
SRC, TARGET = "a cat sitting on a mat", "a dog sitting on a mat"
STEPS, SKIP, REPEATS = 8, 2, 2


def invert(sd, step, **kw):
    inv = minledits.invert(sd, photo(), steps=STEPS, skip=SKIP, size=SIZE, seed=1, source_prompt=SRC, batch_size=1,
                           callback=lambda done, total: step(), **kw)
    return inv.xts, inv.zs


def invert_explicit(sd, step):  # parity.pipeline_attention sets the attention kernel for this call
    with parity.pipeline_attention(sd):
        return invert(sd, step, sampler="dpmsolver++")


def calls(sd, inv) -> dict:
    """{name: call(step) -> tensors}; step() is called after each step of the call's UNet work."""
    return {
        "ledits": lambda step: ledits.edit(sd, inv, target_prompt=TARGET, concepts=["a hat"],
                                          callback=lambda st: step()),
        "leditspp": lambda step: leditspp.edit(sd, inv, concepts=["a hat"], callback=lambda st: step()),
        "p2p": lambda step: p2p.edit(sd, inv, TARGET, callback=lambda st: step()),
        "invert": lambda step: invert(sd, step),
        "invert_explicit": lambda step: invert_explicit(sd, step),
    }


@pytest.fixture(scope="module")
def model(sd1):
    inv = minledits.invert(sd1, photo(), steps=STEPS, skip=SKIP, size=SIZE, seed=1, source_prompt=SRC)
    run = calls(sd1, inv)
    alone = {name: call(lambda: None) for name, call in run.items()}  # one after the other
    return run, alone


def together(a, b) -> list:
    """The results of a() and b() run in two threads at once: both start together, and each waits for the other at
    the end of its first steps, so that their UNet calls interleave."""
    start, results, errors = threading.Barrier(2, timeout=60), [None, None], []

    def thread(n, call):
        steps = [0]

        def step():
            steps[0] += 1
            if steps[0] <= 3:
                start.wait()
        try:
            start.wait()
            results[n] = call(step)
        except Exception as e:  # the other thread must not wait for this one
            errors.append(e)
            start.abort()
    threads = [threading.Thread(target=thread, args=(n, c)) for n, c in enumerate((a, b))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


def same(x, y) -> bool:
    return all(map(torch.equal, x, y)) if isinstance(x, tuple) else torch.equal(x, y)


@pytest.mark.parametrize("a, b", list(itertools.combinations_with_replacement(
    ["ledits", "leditspp", "p2p", "invert", "invert_explicit"], 2)))
def test_two_threads_on_one_model_give_the_results_of_one(model, a, b):
    run, alone = model
    for _ in range(REPEATS):
        ra, rb = together(run[a], run[b])
        assert same(ra, alone[a]) and same(rb, alone[b]), f"{a} beside {b} differs from {a} and {b} run alone"
