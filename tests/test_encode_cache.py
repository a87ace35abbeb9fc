"""The text-encoder output cache (sdengine.text.encode_cache): a repeated prompt is not encoded again, and
nothing that changes the encoding (weights in place or replaced, hooks, textual-inversion vectors, autograd) is
answered from it."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import sdengine
from sdengine.errors import UsageError
from sdengine.models.clip_text import CLIPTextConfig, CLIPTextModel
from sdengine.prompts import encode_prompt
from sdengine.text import CLIPTokenizer
from sdengine.text.encode_cache import cache_info, cached_call, clear, max_entries


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("SDENGINE_TEXT_CACHE", raising=False)
    clear()
    yield
    clear()


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Linear(4, 4)


def _counting(net: nn.Module, x: torch.Tensor):
    calls = []

    def compute():
        calls.append(1)
        return net(x)

    return compute, calls


def test_a_repeated_key_is_computed_once_and_handed_out_as_a_copy():
    net, x = _net(), torch.randn(2, 4)
    compute, calls = _counting(net, x)
    with torch.inference_mode():
        a = cached_call(net, "k", compute)
        a.add_(100)  # the caller changes its copy in place
        b = cached_call(net, "k", compute)
        c = cached_call(net, "other", compute)
    assert len(calls) == 2  # "k" once, "other" once
    torch.testing.assert_close(b, net(x).detach(), rtol=0, atol=0)
    torch.testing.assert_close(c, b, rtol=0, atol=0)
    assert cache_info(net) == {"entries": 2, "hits": 1, "misses": 2}


def test_weights_changed_in_place_or_replaced_are_not_answered_from_the_cache():
    net, x = _net(), torch.randn(2, 4)
    compute, calls = _counting(net, x)
    with torch.inference_mode():
        before = cached_call(net, "k", compute)
    with torch.no_grad():
        net.weight.add_(1.0)  # in place: the version counter moves
    with torch.inference_mode():
        after = cached_call(net, "k", compute)
    assert len(calls) == 2 and not torch.equal(before, after)
    torch.testing.assert_close(after, net(x).detach(), rtol=0, atol=0)
    # New tensors (load_state_dict with assign=True): the same values, but other tensors -> computed again.
    net.load_state_dict({k: v.clone() for k, v in net.state_dict().items()}, assign=True)
    with torch.inference_mode():
        cached_call(net, "k", compute)
    assert len(calls) == 3
    net.to(torch.float64)  # a dtype move
    with torch.inference_mode():
        out = cached_call(net, "k", lambda: net(x.double()))
    assert out.dtype == torch.float64


def test_hooks_autograd_and_the_switch_bypass_the_cache(monkeypatch):
    net, x = _net(), torch.randn(2, 4)
    compute, calls = _counting(net, x)
    # autograd on: a trainer's encoding is never cached (its output must carry gradients)
    out = cached_call(net, "k", compute)
    assert out.requires_grad and cache_info(net)["entries"] == 0
    # a forward hook (an unfused LoRA): bypassed, and its effect is in the output
    handle = net.register_forward_hook(lambda m, a, o: o * 2)
    with torch.inference_mode():
        hooked = cached_call(net, "k", compute)
        cached_call(net, "k", compute)
    handle.remove()
    assert cache_info(net)["entries"] == 0 and len(calls) == 3
    torch.testing.assert_close(hooked, 2 * net(x).detach())
    monkeypatch.setenv("SDENGINE_TEXT_CACHE", "0")
    with torch.inference_mode():
        cached_call(net, "k", compute)
        cached_call(net, "k", compute)
    assert len(calls) == 5 and cache_info(net)["entries"] == 0


def test_the_table_is_bounded_least_recently_used_first(monkeypatch):
    monkeypatch.setenv("SDENGINE_TEXT_CACHE", "2")
    net, x = _net(), torch.randn(1, 4)
    compute, calls = _counting(net, x)
    with torch.inference_mode():
        for key in ("a", "b", "a", "c", "a", "b"):  # "c" pushes out "b" (used before the last "a")
            cached_call(net, key, compute)
    assert cache_info(net)["entries"] == 2
    assert len(calls) == 4  # a, b, c, then b again


@pytest.mark.parametrize("raw", ["many", "-1", "1.5"])
def test_a_bad_setting_is_one_clear_error(monkeypatch, raw):
    monkeypatch.setenv("SDENGINE_TEXT_CACHE", raw)
    with pytest.raises(UsageError, match="SDENGINE_TEXT_CACHE"):
        max_entries()


def _tiny_clip() -> CLIPTextModel:
    torch.manual_seed(0)
    cfg = CLIPTextConfig(
        vocab_size=49408, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4
    )
    return CLIPTextModel(cfg).eval()


def test_textual_inversion_vectors_are_part_of_the_key():
    te, tok = _tiny_clip(), CLIPTokenizer.load()
    ids = tok.encode("a photo of")
    # A prompt whose ids read the extra-token rows: append the first extra id by hand (what a loaded embedding's
    # name becomes, sdengine.text.embeddings).
    from sdengine.prompts import encode_chunks, prompt_chunks

    chunks = prompt_chunks(tok, "a photo of", pad_token_id=49407)
    extra_id = te.config.vocab_size
    chunk = chunks[0]
    chunk.ids[len(ids) + 1] = extra_id  # after [BOS] and the words
    with torch.inference_mode():
        te.set_extra_tokens(torch.ones(1, 32))
        one = encode_chunks(te, [chunk])
        te.set_extra_tokens(torch.full((1, 32), -1.0))  # another embedding at the same id (a new folder)
        other = encode_chunks(te, [chunk])
        te.set_extra_tokens(None)
    assert not torch.equal(one, other)
    with torch.inference_mode():
        te.set_extra_tokens(torch.full((1, 32), -1.0))
        fresh = te(torch.tensor([chunk.ids]), clip_skip=1).last_hidden_state
    torch.testing.assert_close(other, fresh, rtol=0, atol=0)


def test_a_plain_prompt_is_encoded_once_and_equals_the_uncached_encoding(monkeypatch):
    te, tok = _tiny_clip(), CLIPTokenizer.load()
    with torch.inference_mode():
        first = encode_prompt(te, tok, "a (red:1.2) cube", pad_token_id=49407)
        second = encode_prompt(te, tok, "a (red:1.2) cube", pad_token_id=49407)
        monkeypatch.setenv("SDENGINE_TEXT_CACHE", "0")
        uncached = encode_prompt(te, tok, "a (red:1.2) cube", pad_token_id=49407)
    assert cache_info(te) == {"entries": 1, "hits": 1, "misses": 1}
    torch.testing.assert_close(first, uncached, rtol=0, atol=0)
    torch.testing.assert_close(second, uncached, rtol=0, atol=0)


@pytest.mark.parametrize("folder", ["tiny_sd1_folder", "tiny_emoji_folder"])
def test_a_second_generation_of_the_same_prompt_hits_the_cache_and_is_identical(request, folder):
    pipe = sdengine.load_pipeline(request.getfixturevalue(folder), device="cpu", dtype="fp32", fast_path="none")
    args = {"steps": 2, "seed": 3, "width": 32, "height": 32, "progress": False}
    first = pipe("a red cube", "blurry", **args).arrays
    module = pipe.text_encoder if isinstance(pipe.text_encoder, nn.Module) else pipe.text_encoder.model
    misses = cache_info(module)["misses"]
    second = pipe("a red cube", "blurry", **args).arrays
    info = cache_info(module)
    assert info["misses"] == misses and info["hits"] >= 2  # prompt and negative prompt, both from the cache
    np.testing.assert_array_equal(first, second)
    third = pipe("a blue cube", "blurry", **args).arrays  # a new prompt is encoded
    assert cache_info(module)["misses"] > misses and not np.array_equal(third, first)


def test_new_weight_tensors_are_noticed_even_where_addresses_and_versions_would_match(monkeypatch):
    # A freed storage address can be reused by new weights with fresh version counters; the fingerprint alone
    # would then look unchanged. Simulate that with a fingerprint that never moves: the tensors' identity decides.
    import sdengine.text.encode_cache as encode_cache

    monkeypatch.setattr(encode_cache, "module_fingerprint", lambda m: ((), 0))
    net, x = _net(), torch.randn(2, 4)
    compute, calls = _counting(net, x)
    with torch.inference_mode():
        cached_call(net, "k", compute)
        cached_call(net, "k", compute)
    assert len(calls) == 1
    net.load_state_dict({k: v + 1 for k, v in net.state_dict().items()}, assign=True)
    with torch.inference_mode():
        out = cached_call(net, "k", compute)
    assert len(calls) == 2
    torch.testing.assert_close(out, net(x).detach(), rtol=0, atol=0)


def test_load_pipeline_refuses_a_bad_setting_before_loading(monkeypatch, tmp_path):
    monkeypatch.setenv("SDENGINE_TEXT_CACHE", "lots")
    # the folder does not even exist: the setting is checked first
    with pytest.raises(UsageError, match="SDENGINE_TEXT_CACHE must be a whole number"):
        sdengine.load_pipeline(tmp_path / "missing", device="cpu")


def test_weights_made_under_inference_mode_are_encoded_every_time():
    # Inference tensors have no version counter: an in-place change could not be seen, so no caching (and no
    # crash reading the counter).
    with torch.inference_mode():
        net = nn.Linear(4, 4)
        x = torch.randn(2, 4)
        compute, calls = _counting(net, x)
        cached_call(net, "k", compute)
        net.weight.add_(1.0)
        out = cached_call(net, "k", compute)
        torch.testing.assert_close(out, net(x), rtol=0, atol=0)
    assert len(calls) == 2 and cache_info(net)["entries"] == 0
