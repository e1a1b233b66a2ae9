"""`arceus sample`: prompt + N characters from the corpus alphabet, reproducible."""

import pytest

N = 50


def _sample(run_arceus, ckpt, *args, prompt="the ", tokens=N):
    p = run_arceus("sample", "--ckpt", ckpt, "--prompt", prompt, "--tokens", tokens, *args,
                   check=True)
    out = p.stdout
    assert out.startswith(prompt), out[:100]
    gen = out[len(prompt):]
    # the generated characters, then one final newline
    assert gen.endswith("\n") and len(gen) == tokens + 1, repr(out)
    return gen[:-1]


@pytest.fixture(scope="module")
def alphabet(corpus):
    return set(corpus.read_text())


def test_sample_prints_prompt_and_tokens(run_arceus, gpt_run, alphabet):
    gen = _sample(run_arceus, gpt_run["out"], "--seed", "1")
    assert set(gen) <= alphabet, set(gen) - alphabet


def test_same_seed_same_output(run_arceus, gpt_run):
    a = _sample(run_arceus, gpt_run["out"], "--seed", "1")
    b = _sample(run_arceus, gpt_run["out"], "--seed", "1")
    assert a == b


def test_other_seed_other_output(run_arceus, gpt_run):
    # an almost untrained model samples nearly uniformly: 50 characters from
    # two seeds are all but certain to differ
    a = _sample(run_arceus, gpt_run["out"], "--seed", "1")
    b = _sample(run_arceus, gpt_run["out"], "--seed", "2")
    assert a != b


def test_temperature_zero_is_deterministic(run_arceus, gpt_run, alphabet):
    a = _sample(run_arceus, gpt_run["out"], "--temperature", "0", "--seed", "1")
    b = _sample(run_arceus, gpt_run["out"], "--temperature", "0", "--seed", "2")
    assert a == b
    assert set(a) <= alphabet


def test_top_k_one_is_greedy(run_arceus, gpt_run):
    greedy = _sample(run_arceus, gpt_run["out"], "--temperature", "0")
    for seed in ("1", "2", "3"):
        top1 = _sample(run_arceus, gpt_run["out"], "--top-k", "1", "--temperature", "1",
                       "--seed", seed)
        assert top1 == greedy, (seed, top1, greedy)


def test_top_k_all_equals_unrestricted(run_arceus, gpt_run, corpus):
    """--top-k V (the whole vocabulary) changes nothing."""
    v = len(set(corpus.read_bytes()))
    a = _sample(run_arceus, gpt_run["out"], "--seed", "3")
    b = _sample(run_arceus, gpt_run["out"], "--seed", "3", "--top-k", str(v))
    assert a == b


def test_prompt_longer_than_block(run_arceus, gpt_run, corpus, alphabet):
    """A prompt longer than block_size (16) is cropped to its last window."""
    text = corpus.read_text()
    prompt = text[:100]
    gen = _sample(run_arceus, gpt_run["out"], "--seed", "1", prompt=prompt, tokens=30)
    assert set(gen) <= alphabet


def test_default_prompt_is_newline(run_arceus, gpt_run, alphabet):
    assert "\n" in alphabet
    p = run_arceus("sample", "--ckpt", gpt_run["out"], "--tokens", "20", "--seed", "1",
                   check=True)
    assert p.stdout.startswith("\n") and len(p.stdout) == 1 + 20 + 1, repr(p.stdout)
    assert set(p.stdout) <= alphabet


def test_zero_tokens(run_arceus, gpt_run):
    assert _sample(run_arceus, gpt_run["out"], tokens=0) == ""


def _torch_logits_along(ckpt, text):
    """Logits the reference model gives after each prefix of `text` (cropped to
    the last block_size tokens), for prefixes of length 1..len(text)-1."""
    import json

    import torch

    import refmodels
    spec = json.loads((ckpt / "spec.json").read_text())
    tensors, _ = refmodels.load_safetensors(ckpt / "model.safetensors")
    model = refmodels.build_model({k: v for k, v in spec.items() if k != "vocab"})
    model.load_state_dict(tensors, strict=True)
    model.eval()
    index = {b: i for i, b in enumerate(spec["vocab"])}
    ids = [index[b] for b in text.encode()]
    T = spec["block_size"]
    out = []
    with torch.no_grad():
        for n in range(1, len(ids)):
            ctx = ids[max(0, n - T):n]
            out.append((model(torch.tensor([ctx]))[0, -1], ids[n]))
    return out


def test_greedy_follows_torch_argmax(run_arceus, gpt_run):
    prompt = "the "
    gen = _sample(run_arceus, gpt_run["out"], "--temperature", "0", tokens=30)
    steps = _torch_logits_along(gpt_run["out"], prompt + gen)[len(prompt) - 1:]
    assert len(steps) == 30
    for i, (logits, chosen) in enumerate(steps):
        assert float(logits[chosen]) >= float(logits.max()) - 1e-4, (i, chosen, logits)


def test_top_k_samples_only_among_k_best(run_arceus, gpt_run):
    prompt, k = "the ", 3
    gen = _sample(run_arceus, gpt_run["out"], "--top-k", str(k), "--temperature", "2",
                  "--seed", "5", tokens=40)
    steps = _torch_logits_along(gpt_run["out"], prompt + gen)[len(prompt) - 1:]
    for i, (logits, chosen) in enumerate(steps):
        kth = float(logits.topk(k).values[-1])
        assert float(logits[chosen]) >= kth - 1e-4, (i, chosen, logits)
