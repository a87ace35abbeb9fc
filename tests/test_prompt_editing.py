"""Prompt editing and alternation (A1111's ``[from:to:when]``, ``[to:when]``, ``[from::when]``, ``[a|b]``).

* the parser: its tree, A1111's schedule rules (hand-written expectations from A1111's rules, including the
  examples A1111 documents), errors that point at the column, a property test on random text;
* the pipeline: the text conditioning the U-Net receives at each sampler step (recorded by a wrapper around the
  U-Net) equals the encoding of the text A1111's rules pick for that step, for every grammar form, the negative
  prompt, img2img, batches of different schedules, BREAK, and the emoji model's pooled vector.
"""

from __future__ import annotations

import os
import time

import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import sdengine
from sdengine.errors import SdengineError
from sdengine.pipeline.prompt_editing import row_schedules
from sdengine.prompts import pad_to_length
from sdengine.text.schedule import (
    MAX_NESTING,
    Alternate,
    Emphasis,
    PromptEditingError,
    Scheduled,
    Text,
    parse_prompt_editing,
    prompt_schedule,
    text_at_step,
    when_step,
)

# ------------------------------------------------------------------------------------------------- parser


def sched(prompt: str, steps: int = 10, **kw) -> list[list]:
    return [[end, text] for end, text in prompt_schedule(prompt, steps, **kw)]


def test_tree_of_each_form():
    tree = parse_prompt_editing("a [b:c:3] [d:.5] [e::2] [f|g|] (h:1.2)")
    nodes = tree.nodes
    assert nodes[0] == Text("a ")
    assert nodes[1] == Scheduled((Text("b"),), (Text("c"),), "3", 3)
    assert nodes[3] == Scheduled(None, (Text("d"),), ".5", 11)
    assert nodes[5] == Scheduled((Text("e"),), (), "2", 18)
    assert nodes[7] == Alternate(((Text("f"),), (Text("g"),), ()), 25)
    assert nodes[9] == Emphasis("(", (Text("h:1.2"),), ")")
    assert tree.edits and not parse_prompt_editing("(a) [b] c").edits


def test_nesting_and_emphasis_inside():
    tree = parse_prompt_editing("[(a:1.3):[b|c]:2]")
    (node,) = tree.nodes
    assert isinstance(node, Scheduled)
    assert isinstance(node.before[0], Emphasis)
    assert isinstance(node.after[0], Alternate)


# A1111's documented examples (modules/prompt_parser.py, 10 steps) and a few more written from its rules.
A1111_EXAMPLES = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", [[i, "a" if i % 2 else "(b:1.1)"] for i in range(1, 11)]),
    ("[fe|]male", [[i, "female" if i % 2 else "male"] for i in range(1, 11)]),
    ("[fe|||]male", [[i, "female" if i % 4 == 1 else "male"] for i in range(1, 11)]),
    # a "." makes a fraction (1.0 = all steps: never switches), no "." a step number; int() truncates
    ("[a:b:1.0]", [[10, "a"]]),
    ("[a:b:1]", [[1, "a"], [10, "b"]]),
    ("[a:b:0.55]", [[5, "a"], [10, "b"]]),
    ("[a:b:0]", [[10, "b"]]),
    ("[a:b:-2]", [[10, "b"]]),
    ("[a:b:25]", [[10, "a"]]),
    ("[a:b:2e0]", [[2, "a"], [10, "b"]]),
    ("[a:b:0.25e1]", [[10, "a"]]),
    # escapes stay escapes (the emphasis parser reads them later); a "|" outside [...] = whole prompt literal
    ("\\[a:b:3\\]", [[10, "\\[a:b:3\\]"]]),
    ("[a\\]:b:3]", [[3, "a\\]"], [10, "b"]]),
    ("x | [a:b:3]", [[10, "x | [a:b:3]"]]),
    ("[a:b:3] \\", [[10, "[a:b:3] \\"]]),
    # BREAK and extra-network-free text pass through as text
    ("[a BREAK b:c:3]", [[3, "a BREAK b"], [10, "c"]]),
    ("(masterpiece, [cat:dog:0.5], best", [[5, "(masterpiece, cat, best"], [10, "(masterpiece, dog, best"]]),
]


@pytest.mark.parametrize(("prompt", "expected"), A1111_EXAMPLES)
def test_a1111_schedules(prompt, expected):
    assert sched(prompt) == expected


def test_hires_pass_counts_as_a1111():
    # A1111's second pass of hires fix: fractions from 1.0, step numbers after the first pass's steps
    assert sched("a [b:.5] c", 10, hires_steps=10) == [[10, "a b c"]]
    assert sched("a [b:1.5] c", 10, hires_steps=10) == [[5, "a  c"], [10, "a b c"]]
    assert sched("a [b:13] c", 10, hires_steps=10) == [[3, "a  c"], [10, "a b c"]]
    assert when_step("0.5", 20) == 10 and when_step("7", 20) == 7 and when_step("1e999", 20) == 20


# Which text each sampler step (0-based) uses with 20 steps, written out from A1111's rules: an entry ends
# at its step and step i takes the first entry that has not ended (i <= end).
STEP_TABLE = [
    ("[cat:dog:0.5]", ["cat"] * 11 + ["dog"] * 9),
    ("[cat:dog:5]", ["cat"] * 6 + ["dog"] * 14),
    ("[dog:0.25]", [""] * 6 + ["dog"] * 14),
    ("[cat::3]", ["cat"] * 4 + [""] * 16),
    ("[cat|dog]", ["cat", "cat"] + ["dog", "cat"] * 9),
    ("[cat|dog|fox]", ["cat", "cat", "dog", "fox"] + ["cat", "dog", "fox"] * 5 + ["cat"]),
    ("[cat:[dog|fox]:2]", ["cat"] * 3 + ["dog", "fox"] * 8 + ["dog"]),
]


@pytest.mark.parametrize(("prompt", "per_step"), STEP_TABLE)
def test_a1111_step_table(prompt, per_step):
    schedule = prompt_schedule(prompt, 20)
    assert [text_at_step(schedule, i) for i in range(20)] == per_step


@pytest.mark.parametrize(
    ("prompt", "column", "fatal", "noted"),
    [
        ("cat | dog", 5, False, False),  # plain text either way: nothing to tell
        ("a [b|c] d|e", 10, False, True),  # the alternation is lost, as in A1111: said
        ("x\\", 2, False, False),
        ("[a:b:3] x\\", 10, False, True),
        ("[" * (MAX_NESTING + 5), MAX_NESTING + 1, True, True),
    ],
)
def test_errors_point_at_the_column(prompt, column, fatal, noted):
    with pytest.raises(PromptEditingError) as e:
        parse_prompt_editing(prompt)
    assert e.value.column == column and e.value.fatal is fatal
    assert f"column {column}" in str(e.value) and "\n" not in str(e.value)
    if fatal:
        with pytest.raises(PromptEditingError):
            prompt_schedule(prompt, 10)
    else:
        said: list[str] = []
        assert prompt_schedule(prompt, 10, on_literal=said.append) == [(10, prompt)]
        assert bool(said) == noted and (not said or f"column {column}" in said[0])


def test_unreadable_editing_is_text_with_a_diagnostic():
    tree = parse_prompt_editing("a [cat:dog:0.5 b")
    assert tree.nodes == (Text("a [cat:dog:0.5 b"),)
    assert len(tree.diagnostics) == 1 and "column 3" in tree.diagnostics[0]
    said: list[str] = []
    assert prompt_schedule("x [a:b:c] y", 10, on_literal=said.append) == [(10, "x [a:b:c] y")]
    assert "column 3" in said[0] and "not a number" in said[0]
    assert parse_prompt_editing("(masterpiece [x]").diagnostics == ()  # stray emphasis brackets: no note


PIECES = list("ab [](){}:|\\.0123 ,\n") + ["BREAK", "0.5", "[a:b:2]", "é"]


# `make fuzz` (SDENGINE_FUZZ_EXAMPLES) runs it longer; tests/test_fuzz_prompt_editing.py has the schedule's properties
@settings(
    max_examples=max(300, int(os.environ.get("SDENGINE_FUZZ_EXAMPLES", "0"))),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(st.lists(st.sampled_from(PIECES), max_size=60).map("".join) | st.text(max_size=60))
@example("[" * 3000)
@example("[a:" * 2000)
@example("(" * 99 + "[a|b]" + ")" * 99)
@example("[a|" * 1500 + "]")
def test_parser_never_raises_other_errors_and_is_fast(text):
    start = time.perf_counter()
    try:
        tree = parse_prompt_editing(text)
    except PromptEditingError as e:
        assert 1 <= e.column <= len(text) + 1 and "\n" not in str(e)
    else:
        schedule = prompt_schedule(text, 7)
        assert schedule[-1][0] == 7 and [e for e, _ in schedule] == sorted({e for e, _ in schedule})
        if not tree.edits:
            assert schedule == [(7, text)]
    assert time.perf_counter() - start < 2.0


def test_long_hostile_prompts_are_fast():
    for text in ("[" * 20000, "[a:" * 8000 + "]", "(a [b " * 4000, "[a|b]" * 4000):
        start = time.perf_counter()
        try:
            prompt_schedule(text, 30)
        except PromptEditingError:
            pass
        assert time.perf_counter() - start < 3.0, text[:20]


def test_non_string_prompt_is_refused():
    with pytest.raises(PromptEditingError):
        parse_prompt_editing(3)  # type: ignore[arg-type]
    with pytest.raises(PromptEditingError):
        prompt_schedule("a", 0)


# ----------------------------------------------------------------------------------------------- pipeline


class Recorder:
    """The U-Net with a tap: every call's step index, text states and pooled vector."""

    takes_step = True

    def __init__(self, unet):
        self.unet = unet
        self.calls: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []

    def __getattr__(self, name):
        if name == "unet":
            raise AttributeError(name)
        return getattr(self.unet, name)

    def __call__(self, x, t, *, encoder_hidden_states, step=None, class_labels=None, **kw):
        self.calls.append(
            (step.index, encoder_hidden_states.clone(), None if class_labels is None else class_labels.clone())
        )
        kw = {**kw, "class_labels": class_labels} if class_labels is not None else kw
        return self.unet(x, t, encoder_hidden_states=encoder_hidden_states, **kw)


@pytest.fixture(scope="module")
def sd1(tiny_sd1_folder):
    return sdengine.load_pipeline(tiny_sd1_folder, device="cpu")


@pytest.fixture
def recorded(sd1):
    unet = sd1.unet
    rec = Recorder(unet)
    sd1.unet = rec
    yield sd1, rec
    sd1.unet = unet


STEPS = 6
KW = dict(steps=STEPS, sampler="euler", width=32, height=32, seed=1, cfg_scale=5.0)


def _encode(pipe, text, length=None):
    z = pipe.conditioner.encode(text)["crossattn"]
    if length is not None and z.shape[1] != length:
        z = pad_to_length(z, length, pipe.conditioner.encode("")["crossattn"])
    return z


def _check_steps(pipe, rec, expected, uncond_expected=None):
    """Each recorded call's cond rows (and uncond rows) equal the encodings of the expected texts at its step."""
    assert rec.calls, "the U-Net was not called"
    for index, states, _ in rec.calls:
        b = states.shape[0] // 2
        for j in range(b):
            want = _encode(pipe, expected[j][index], states.shape[1])
            assert torch.equal(states[j : j + 1], want), (index, j, expected[j][index])
            if uncond_expected is not None:
                want_u = _encode(pipe, uncond_expected[j][index], states.shape[1])
                assert torch.equal(states[b + j : b + j + 1], want_u), (index, j, "uncond")


@pytest.mark.parametrize(
    ("prompt", "texts"),
    [
        ("a [red:blue:2] apple", ["a red apple"] * 3 + ["a blue apple"] * 3),  # [from:to:when], step number
        ("a [red:blue:0.5] apple", ["a red apple"] * 4 + ["a blue apple"] * 2),  # fraction: int(0.5 * 6) = 3
        ("a [blue:1] apple", ["a  apple"] * 2 + ["a blue apple"] * 4),  # [to:when]
        ("a [red::3] apple", ["a red apple"] * 4 + ["a  apple"] * 2),  # [from::when]
        ("a [red|blue] apple", ["a red apple"] * 2 + ["a blue apple", "a red apple"] * 2),  # alternation
        ("[(red:1.3):[blue|green]:1] x", ["(red:1.3) x"] * 2 + ["green x", "blue x", "green x", "blue x"]),
    ],
)
def test_conditioning_at_each_step(recorded, prompt, texts):
    pipe, rec = recorded
    pipe(prompt, "blurry", **KW)
    assert sorted({i for i, _, _ in rec.calls}) == list(range(STEPS))
    _check_steps(pipe, rec, [texts], [["blurry"] * STEPS])


def test_negative_prompt_editing_and_batches(recorded):
    pipe, rec = recorded
    prompts = ["a [cat:dog:2]", "a plain fox"]
    negatives = ["[dark|blurry]", "ugly"]
    pipe(prompts, negatives, **{**KW, "seed": [1, 2]})
    assert {s.shape[0] for _, s, _ in rec.calls} == {4}  # one batch: cond rows 0-1, uncond rows 2-3
    _check_steps(
        pipe,
        rec,
        [["a cat"] * 3 + ["a dog"] * 3, ["a plain fox"] * STEPS],
        [["dark", "dark", "blurry", "dark", "blurry", "dark"], ["ugly"] * STEPS],
    )


def test_rows_equal_the_same_rows_alone(sd1):
    both = sd1(["a [cat:dog:2]", "a fox"], ["", "[x|y]"], **{**KW, "seed": [1, 2]}).arrays
    one = sd1("a [cat:dog:2]", "", **KW).arrays
    two = sd1("a fox", "[x|y]", **{**KW, "seed": 2}).arrays
    assert abs(both[0] - one[0]).max() < 1e-5 and abs(both[1] - two[0]).max() < 1e-5


def test_editing_changes_the_image_only_when_the_text_changes(sd1):
    cat = sd1("a cat", **KW).arrays
    same = sd1("a [cat|cat]", **KW).arrays
    dog = sd1("a dog", **KW).arrays
    mixed = sd1("a [cat:dog:1]", **KW).arrays  # cat at steps 0-1, dog at 2-5
    assert (same == cat).all()  # the editing path with one text = the plain path, bit for bit
    apart = abs(cat - dog).mean()  # a random tiny model: the text moves the image only a little
    assert apart > 0 and abs(mixed - cat).mean() > 0.01 * apart and abs(mixed - dog).mean() > 0.01 * apart


def test_img2img_counts_from_its_first_step(recorded):
    # A1111 builds the schedule over all the steps and counts the steps that run from 0: with strength 0.5,
    # 6 steps, 3 run; "[a:b:1]" is "a" for run steps 0-1 and "b" for step 2.
    from _pipeline_models import picture

    pipe, rec = recorded
    pipe("[red:blue:1]", **KW, init_image=picture(32, 32), strength=0.5)
    assert sorted({i for i, _, _ in rec.calls}) == [0, 1, 2]
    _check_steps(pipe, rec, [["red", "red", "blue"]], [[""] * 3])


def test_break_pads_every_text_of_a_row_to_one_length(recorded):
    pipe, rec = recorded
    pipe("[a BREAK b:c:2]", **KW)
    assert {s.shape[1] for _, s, _ in rec.calls} == {154}  # two chunks at every step, cond and uncond
    _check_steps(pipe, rec, [["a BREAK b"] * 3 + ["c"] * 3], [[""] * STEPS])


def test_each_distinct_text_is_encoded_once(sd1):
    calls: list[str] = []
    real = sd1.conditioner

    class Counting:
        def __getattr__(self, name):
            return getattr(real, name)

        def encode(self, text, **kw):
            calls.append(text)
            return real.encode(text, **kw)

    rows = row_schedules(Counting(), ["[a|b] x", "[b|a] x", "a x"], ["a x", "", ""], 20, note=lambda _: None)
    assert rows is not None and sorted(calls) == ["", "a x", "b x"]
    assert row_schedules(real, ["plain"], [""], 20, note=lambda _: None) is None  # no editing: plain path


def test_lora_tags_are_taken_out_before_the_schedule(sd1):
    notes: list[str] = []
    rows = row_schedules(sd1.conditioner, ["[a:b:2] <lora:x:0.5>"], ["[x|y] | z"], 10, note=notes.append)
    assert rows is not None
    assert [t for _, t in rows[0].prompt] == ["a ", "b "]
    assert rows[0].negative == [(10, "[x|y] | z")] and "negative prompt:" in notes[0] and "column 7" in notes[0]


def test_literal_prompt_is_noted_in_the_result(sd1):
    result = sd1("a [cat:dog:0.5 b | c", **KW)
    assert any("column 18" in n for n in result.notes)


def test_emoji_model_vector_switches_too(tiny_emoji_folder):
    pipe = sdengine.load_pipeline(tiny_emoji_folder, device="cpu")
    rec = Recorder(pipe.unet)
    pipe.unet = rec
    pipe("a [red apple:green apple:2]", steps=4, sampler="euler", seed=1)
    assert rec.calls
    for index, states, vector in rec.calls:
        want = pipe.conditioner.encode("a red apple" if index <= 2 else "a green apple")
        assert torch.equal(states[:1], want["crossattn"]) and torch.equal(vector[:1], want["vector"])


def test_errors_are_sdengine_errors():
    assert issubclass(PromptEditingError, SdengineError) and issubclass(PromptEditingError, ValueError)


def test_cli_generates_the_same_edited_image_and_keeps_the_prompt(sd1, tiny_sd1_folder, tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from sdengine.cli import main

    prompt = "a [red:blue:2] apple, [x|y]"
    args = ["--steps", "4", "--sampler", "euler", "--seed", "5", "--width", "32", "--height", "32", "--cfg", "6"]
    rc = main(["generate", prompt, "--model", str(tiny_sd1_folder), *args, "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    (png,) = sorted(tmp_path.glob("*.png"))
    with Image.open(png) as im:
        assert im.info["parameters"].startswith(prompt + "\n")
        pixels = np.asarray(im.convert("RGB"))
    ours = sd1(prompt, steps=4, sampler="euler", seed=5, width=32, height=32, cfg_scale=6.0).images[0]
    assert (np.asarray(ours) == pixels).all()
    assert not (
        np.asarray(sd1("a red apple, x", **{**KW, "steps": 4, "seed": 5, "cfg_scale": 6.0}).images[0]) == pixels
    ).all()


def test_step_texts_keeps_other_inputs_and_needs_the_step():
    from sdengine.diffusion.samplers import SamplerStep
    from sdengine.errors import GenerationError
    from sdengine.pipeline.prompt_editing import RowSchedule, StepTexts

    enc = {t: {"crossattn": torch.full((1, 2, 3), float(i))} for i, t in enumerate(["a", "b", "n"])}
    row = RowSchedule(prompt_schedule("[a|b]", 4), [(4, "n")], enc, 2)
    seen = {}

    class Net:
        takes_step = True

        def __call__(self, x, t, **kw):
            seen.update(kw)
            return x

    model = StepTexts(Net(), [row])
    concat = torch.ones(2, 1, 2, 2)
    x = torch.zeros(2, 4, 2, 2)
    kinds = ("cond", "uncond")
    model(x, torch.zeros(2), step=SamplerStep(2), row_kinds=kinds, crossattn=torch.zeros(2, 2, 3), concat=concat)
    assert seen["concat"] is concat and seen["step"] == SamplerStep(2) and "row_kinds" not in seen
    assert seen["crossattn"][:, 0, 0].tolist() == [1.0, 2.0]  # step 2 of [a|b] is "b"; the uncond row "n"
    with pytest.raises(GenerationError, match="step"):
        model(x, torch.zeros(2), crossattn=torch.zeros(2, 2, 3))
    with pytest.raises(GenerationError, match="row kinds"):
        model(x, torch.zeros(2), step=SamplerStep(0), row_kinds=("cond",), crossattn=torch.zeros(2, 2, 3))


def test_second_order_calls_read_the_step_of_their_grid_point(recorded):
    # Heun evaluates each step at its start and at the next grid point (not on the last step, which lands on
    # sigma 0): each call reads the text of the grid point it is evaluated at.
    pipe, rec = recorded
    pipe("[red|blue]", "", **{**KW, "steps": 4, "sampler": "heun"})
    assert [i for i, _, _ in rec.calls] == [0, 1, 1, 2, 2, 3, 3]
    _check_steps(pipe, rec, [["red", "red", "blue", "red"]], [[""] * 4])
