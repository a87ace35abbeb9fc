"""The web page's step rules and its reading of A1111's schedule types, in a real headless Chromium against a live
server with the emoji model at 64x64 (one page for the module; helpers from test_webui.py).

- DDIM and PLMS walk A1111's own grid under A1111's step rules, text to image too: the page sends its *Strength
  rule* with such a job (it once sent it only with a strength, so the page could not ask for that grid), and it
  offers A1111's img2img fix steps (``a1111_fix_steps``), which the native API has.
- A dropped infotext's ``Schedule type`` is read as ``sdengine.diffusion.sampling.resolve`` reads it: "Automatic"
  is what A1111 runs with that sampler (it was always the model's own spacing: DPM++ 2M ran without Karras), every
  schedule of the registry by its A1111 label (``Linear Quadratic`` was kept silently as it was), an unknown one
  is named; an A1111 DDIM image gets A1111's rule, as ``--from-png`` reads it.
"""

from __future__ import annotations

import base64

import httpx
import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from _live_server import live_server, server_config
from _webpage import chromium, tab
from test_webui import (
    UNLABELLED,
    api_image,
    drop_file,
    open_page,
    png_bytes,
    shown_image,
    wait_result,
)

STYLES = 'name,prompt,negative_prompt\ncartoon,"{prompt}, cartoon style",ugly\nbright,bright colours,"dark, blurry"\n'


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("webui_rules")
    (tmp / "styles.csv").write_text(STYLES)
    with live_server(server_config(tmp, styles_file=tmp / "styles.csv")) as s:
        yield s


@pytest.fixture(scope="module")
def page(server):
    with chromium() as browser, tab(browser, server.url) as pg:
        yield pg


@pytest.fixture()
def client(server):
    with httpx.Client(base_url=server.url, timeout=120) as c:
        yield c


def fresh_form(pg) -> None:
    """Every section open, text to image, and nothing an earlier test of the module set left on (a hires fix, a
    ControlNet, a style, a noise multiplier, a rule, ...)."""
    pg.evaluate("""() => { for (const d of document.querySelectorAll('details')) d.open = true;
        for (const id of ['hr-enabled', 'cn-enabled', 'tiling']) document.getElementById(id).checked = false;
        for (const b of document.querySelectorAll('#style-list input')) b.checked = false;
        const values = { mode: 'txt2img', noise_multiplier: '1', masked_content: 'original', strength_rule: 'diffusers',
            differential_diffusion: '0',
            'cn-rule': 'diffusers', 'cn-mode': 'balanced', 'hr-resize-x': '0', 'hr-resize-y': '0', 'hr-sampler': '',
            'hr-schedule': '', 'hr-prompt': '', 'hr-negative-prompt': '', seed_resize_w: '', seed_resize_h: '',
            negative_prompt: '' };
        for (const [id, v] of Object.entries(values)) {
            const el = document.getElementById(id);
            el.value = v;
            el.dispatchEvent(new Event('change', { bubbles: true }));
        } }""")


def drop_infotext(pg, params: str) -> tuple[str, str, str, str]:
    """Drop a PNG with this A1111 parameters line; (sampler, schedule, strength rule, what the page said)."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"a cat face\n{params}, Size: 64x64, Version: v1.10.1")
    pg.fill("#seed", "0")
    drop_file(pg, png_bytes(Image.new("RGB", (8, 8)), info), "a1111.png")
    pg.wait_for_function("document.querySelector('#seed').value === '6'")
    return (
        pg.input_value("#sampler"),
        pg.input_value("#schedule"),
        pg.input_value("#strength_rule"),
        pg.text_content("#err-general"),
    )


def test_a1111_schedule_types_are_read_as_sdengine_reads_them(page):
    from sdengine.diffusion.sampling import SAMPLERS, SCHEDULE_A1111, SCHEDULES, resolve

    fresh_form(page)
    page.select_option("#sampler", "euler")
    # Every schedule of the registry is offered under a label, not its bare name
    labels = page.eval_on_selector_all("#schedule option", "os => os.map((o) => [o.value, o.textContent])")
    assert [v for v, _ in labels] == list(SCHEDULES)
    assert all(label != value for value, label in labels), labels
    for schedule in SCHEDULES:
        label = SCHEDULE_A1111[schedule]
        got = drop_infotext(page, f"Steps: 20, Sampler: Euler, Schedule type: {label}, CFG scale: 7, Seed: 6")
        assert got == ("euler", resolve("Euler", label)[1], "diffusers", ""), (label, got)
    for spec in SAMPLERS.values():  # "Automatic": what A1111 runs with the sampler
        got = drop_infotext(page, f"Steps: 20, Sampler: {spec.a1111}, Schedule type: Automatic, CFG scale: 7, Seed: 6")
        expected = resolve(spec.a1111, "Automatic")
        rule = "a1111" if spec.name in ("ddim", "plms") else "diffusers"  # A1111 walked its own grid
        assert got == (*expected, rule, ""), (spec.a1111, got)
    # A combined name's own schedule stays its own under "Automatic"
    combined = "Steps: 20, Sampler: DPM++ 2M SDE Karras, Schedule type: Automatic, CFG scale: 7, Seed: 6"
    got = drop_infotext(page, combined)
    assert got[:2] == ("dpmpp_2m_sde", "karras")
    # A schedule type this server does not know is named, not silently left as it was
    got = drop_infotext(page, "Steps: 20, Sampler: Euler, Schedule type: Foo Bar, CFG scale: 7, Seed: 6")
    assert "schedule type Foo Bar" in got[3]


def test_ddim_under_a1111s_rule_and_a1111_fix_steps_equal_the_apis_jobs(page, client, tmp_path):
    fresh_form(page)
    page.fill("#prompt", "a smiling face")
    page.select_option("#sampler", "ddim")
    page.select_option("#schedule", "normal")
    page.fill("#steps", "4")
    page.fill("#cfg_scale", "7")
    page.fill("#seed", "11")
    page.select_option("#strength_rule", "a1111")  # DDIM: A1111's grid, text to image too
    page.click("#generate")
    params = wait_result(page)
    assert "Strength rule: a1111" in params
    body = {"prompt": "a smiling face", "sampler": "ddim", "schedule": "normal", "steps": 4, "cfg_scale": 7, "seed": 11}
    expected, info = api_image(client, {**body, "strength_rule": "a1111"})
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == info
    # img2img with A1111's img2img fix steps: 4 steps run of a longer schedule, as the API's job
    init = Image.new("RGB", (64, 64), (200, 120, 40))
    path = tmp_path / "init.png"
    init.save(path)
    page.select_option("#mode", "img2img")
    page.set_input_files("#init-file", str(path))
    page.fill("#strength", "0.5")
    page.select_option("#sampler", "euler")
    page.select_option("#schedule", "karras")
    page.select_option("#strength_rule", "a1111_fix_steps")
    page.click("#generate")
    params = wait_result(page)
    assert "Strength rule: a1111_fix_steps" in params
    init_b64 = base64.b64encode(png_bytes(init)).decode()
    img2img = {**body, "sampler": "euler", "schedule": "karras", "strength": 0.5, "strength_rule": "a1111_fix_steps"}
    img2img["init_image"] = init_b64
    expected, info = api_image(client, img2img)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == info
    # Send to img2img takes the image's size (A1111's send_size), as a hires result's (it kept the form's size)
    page.fill("#width", "128")
    page.fill("#height", "96")
    page.click("#results button:text('Send to img2img')")
    page.wait_for_function("document.querySelector('#width').value === '64'")
    assert page.input_value("#height") == "64"


def test_styles_are_merged_into_the_prompts_and_taken_out_on_reuse(page, client, server):
    from sdengine.prompts import apply_styles, read_styles

    fresh_form(page)
    # (the page had no styles: the server's --styles-file reached A1111's routes only)
    page.select_option("#mode", "txt2img")
    page.select_option("#strength_rule", "diffusers")
    page.fill("#prompt", "a cat face")
    page.fill("#negative_prompt", "")
    page.fill("#steps", "3")
    page.fill("#seed", "21")
    assert page.locator("#styles-box:not([hidden]) legend").count() == 1  # offered: the server has styles
    assert page.evaluate(UNLABELLED) == []  # every box labelled
    page.check("#style-list label:has-text('cartoon') input")
    page.check("#style-list label:has-text('bright') input")
    page.click("#generate")
    params = wait_result(page)
    styles = read_styles(server.services.config.styles_file)
    prompt, negative = apply_styles("a cat face", "", [styles["cartoon"], styles["bright"]])
    assert params.startswith(f"{prompt}\nNegative prompt: {negative}\n")  # A1111's merge, in the file's order
    body = {"prompt": prompt, "negative_prompt": negative, "steps": 3, "seed": 21}
    for field in ("sampler", "schedule"):
        body[field] = page.input_value(f"#{field}")
    body["cfg_scale"] = float(page.input_value("#cfg_scale"))
    expected, info = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == info
    # Reuse: the prompts without the styles, the styles ticked (as A1111's "Apply if any"), not merged twice
    page.uncheck("#style-list label:has-text('cartoon') input")
    page.fill("#prompt", "something else")
    page.click("#results button:text('Reuse parameters')")
    assert page.input_value("#prompt") == "a cat face" and page.input_value("#negative_prompt") == ""
    assert page.is_checked("#style-list label:has-text('cartoon') input")
    assert page.is_checked("#style-list label:has-text('bright') input")
    open_page(page, server.url)  # the ticked styles survive a reload
    assert page.locator("#style-list input:checked").count() == 2
    # An infotext without them unticks them (its prompt is the whole prompt)
    page.fill("#seed", "0")
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), _info("a dog\nSteps: 3, Seed: 6, Size: 64x64")), "dog.png")
    page.wait_for_function("document.querySelector('#seed').value === '6'")
    assert page.input_value("#prompt") == "a dog"
    assert page.locator("#style-list input:checked").count() == 0


def _info(text: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    return info


def watch_uploads(pg) -> None:
    """Record the bodies the page sends to /v1/uploads in ``window.uploaded`` (emptied; fetch wrapped once)."""
    pg.evaluate("""() => { window.uploaded = []; if (window.fetchWatched) return; window.fetchWatched = true;
        const f = window.fetch;
        window.fetch = (url, opts) => { if (String(url).endsWith('/v1/uploads')) window.uploaded.push(opts.body);
                                        return f(url, opts); }; }""")


def uploaded_b64(pg) -> list[str]:
    """The recorded uploads, base64."""
    return pg.evaluate("""() => Promise.all(window.uploaded.map(async (b) => {
        const buf = new Uint8Array(await b.arrayBuffer()); let s = '';
        for (const x of buf) s += String.fromCharCode(x); return btoa(s); }))""")


def paint_stroke(pg) -> None:
    """A 30-pixel brush stroke across the middle of the mask canvas."""
    pg.eval_on_selector("#brush", "el => { el.value = '30'; }")
    pg.locator("#mask-canvas").scroll_into_view_if_needed()
    box = pg.locator("#mask-canvas").bounding_box()
    pg.mouse.move(box["x"] + box["width"] * 0.3, box["y"] + box["height"] / 2)
    pg.mouse.down()
    pg.mouse.move(box["x"] + box["width"] * 0.7, box["y"] + box["height"] / 2, steps=5)
    pg.mouse.up()


def test_inpainting_with_masked_content_and_a_noise_multiplier(page, client, tmp_path):
    fresh_form(page)
    # (the page had neither of A1111's controls; the API has both)
    init = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[None, :, None], (64, 1, 3)))
    path = tmp_path / "init.png"
    init.save(path)
    watch_uploads(page)
    page.select_option("#strength_rule", "diffusers")
    page.select_option("#mode", "txt2img")  # neither is used there: not shown
    assert page.is_hidden("#masked_content") and page.is_hidden("#noise_multiplier")
    page.set_input_files("#init-file", str(path))
    assert page.is_hidden("#masked_content") and page.is_visible("#noise_multiplier")  # img2img: no mask
    page.select_option("#mode", "inpaint")
    page.wait_for_selector("#mask-canvas", state="visible")
    page.fill("#prompt", "a red apple")
    page.fill("#negative_prompt", "")
    page.fill("#steps", "4")
    page.fill("#seed", "5")
    page.fill("#strength", "0.8")
    page.fill("#mask_blur", "0")
    assert page.locator("#masked_content, #noise_multiplier").count() == 2
    page.select_option("#masked_content", "latent noise")
    page.fill("#noise_multiplier", "20")  # over A1111's 10: said at its own input, nothing lost
    paint_stroke(page)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-noise_multiplier').textContent.length > 0")
    assert page.input_value("#noise_multiplier") == "20"
    page.fill("#noise_multiplier", "1.1")
    page.evaluate("window.uploaded = []")
    page.click("#generate")
    params = wait_result(page)
    assert "Noise multiplier: 1.1" in params and "Masked content: latent noise" in params
    init_b64, mask_b64 = uploaded_b64(page)
    body = {"prompt": "a red apple", "steps": 4, "seed": 5, "strength": 0.8, "mask_blur": 0}
    for field in ("sampler", "schedule"):
        body[field] = page.input_value(f"#{field}")
    body["cfg_scale"] = float(page.input_value("#cfg_scale"))
    body.update(init_image=init_b64, mask=mask_b64, masked_content="latent noise", noise_multiplier=1.1)
    expected, info = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == info
    # An image without them sets the defaults again; reusing this one sets them
    page.fill("#seed", "0")
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), _info("a dog\nSteps: 3, Seed: 6, Size: 64x64")), "dog.png")
    page.wait_for_function("document.querySelector('#seed').value === '6'")
    assert (page.input_value("#noise_multiplier"), page.input_value("#masked_content")) == ("1", "original")
    page.click("#results button:text('Reuse parameters')")
    assert (page.input_value("#noise_multiplier"), page.input_value("#masked_content")) == ("1.1", "latent noise")


def test_soft_inpainting_differential_diffusion(page, client, tmp_path):
    """The page's "Soft inpainting (Differential Diffusion)" (inpaint only): sent as ``differential_diffusion``, the
    API's image for the same body, written to the parameters and set again by "Reuse parameters"; a value over 1 is
    said at its own input, nothing lost."""
    fresh_form(page)
    init = Image.fromarray(np.tile(np.linspace(0, 255, 64, dtype=np.uint8)[:, None, None], (1, 64, 3)))
    path = tmp_path / "init.png"
    init.save(path)
    watch_uploads(page)
    page.set_input_files("#init-file", str(path))
    assert page.is_hidden("#differential_diffusion")  # img2img: no mask
    page.select_option("#mode", "inpaint")
    page.wait_for_selector("#mask-canvas", state="visible")
    assert page.is_visible("#differential_diffusion")
    page.fill("#prompt", "a red apple")
    page.fill("#steps", "3")
    page.fill("#seed", "7")
    page.fill("#strength", "1")
    page.fill("#mask_blur", "6")  # a soft edge: grey levels for the rule to read
    page.fill("#differential_diffusion", "1.5")
    paint_stroke(page)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-differential_diffusion').textContent.length > 0")
    assert page.input_value("#differential_diffusion") == "1.5"
    page.fill("#differential_diffusion", "0.8")
    page.evaluate("window.uploaded = []")
    page.click("#generate")
    params = wait_result(page)
    assert "Differential diffusion: 0.8" in params, params
    init_b64, mask_b64 = uploaded_b64(page)
    body = {"prompt": "a red apple", "steps": 3, "seed": 7, "strength": 1.0, "mask_blur": 6}
    for field in ("sampler", "schedule"):
        body[field] = page.input_value(f"#{field}")
    body["cfg_scale"] = float(page.input_value("#cfg_scale"))
    body.update(init_image=init_b64, mask=mask_b64, differential_diffusion=0.8)
    expected, info = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == info
    plain, _ = api_image(client, {k: v for k, v in body.items() if k != "differential_diffusion"})
    assert not np.array_equal(expected, plain)  # the soft rule changed the image
    page.fill("#differential_diffusion", "0")
    page.click("#results button:text('Reuse parameters')")
    assert page.input_value("#differential_diffusion") == "0.8"


def test_a_controlnets_step_rule_and_its_infotext(page, client, tmp_path):
    fresh_form(page)
    # (the page had no step rule, and an infotext's ControlNet was not read: reuse ran without it, silently)
    src = Image.new("RGB", (64, 64), "white")
    src.paste((0, 0, 0), (20, 20, 44, 44))
    path = tmp_path / "control.png"
    src.save(path)
    assert page.locator("#cn-rule").count() == 1
    page.select_option("#mode", "txt2img")
    page.set_input_files("#cn-file", str(path))
    page.select_option("#cn-pre", "canny")
    page.fill("#prompt", "a smiling face")
    page.fill("#negative_prompt", "")
    page.fill("#steps", "4")
    page.fill("#seed", "3")
    page.fill("#cn-weight", "0.9")
    page.fill("#cn-start", "0.3")
    page.fill("#cn-end", "0.8")
    page.select_option("#cn-rule", "a1111")
    page.select_option("#cn-mode", "prompt")  # (the page had no control mode)
    page.click("#generate")
    params = wait_result(page)
    assert "ControlNet step rule: a1111" in params and "Control Mode: My prompt is more important" in params
    unit = {"model": "emoji-controlnet-canny", "image": base64.b64encode(png_bytes(src)).decode()}
    unit.update(preprocessor="canny", low=100, high=200, weight=0.9, start=0.3, end=0.8, rule="a1111", mode="prompt")
    body = {"prompt": "a smiling face", "steps": 4, "seed": 3, "controlnets": [unit]}
    for field in ("sampler", "schedule"):
        body[field] = page.input_value(f"#{field}")
    body["cfg_scale"] = float(page.input_value("#cfg_scale"))
    expected, info = api_image(client, body)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == info
    # An image without a ControlNet unticks it; reusing this one ticks it with its settings
    page.fill("#seed", "0")
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), _info("a dog\nSteps: 3, Seed: 6, Size: 64x64")), "dog.png")
    page.wait_for_function("document.querySelector('#seed').value === '6'")
    assert not page.is_checked("#cn-enabled")
    page.select_option("#cn-rule", "diffusers")
    page.select_option("#cn-mode", "balanced")
    page.click("#results button:text('Reuse parameters')")
    assert page.is_checked("#cn-enabled")
    got = [page.input_value(f"#cn-{k}") for k in ("model", "weight", "start", "end", "rule", "mode")]
    assert got == ["emoji-controlnet-canny", "0.9", "0.3", "0.8", "a1111", "prompt"]
    # An A1111 image's ControlNet this server lacks is named; its thresholds are set, and its steps counted by the
    # extension's rule (it has no sdengine step-rule field: A1111 made it)
    page.select_option("#cn-rule", "diffusers")
    a1111 = (
        'ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 0.5, Threshold A: 30, '
        'Threshold B: 60, Guidance Start: 0"'
    )
    text = f"a dog\nSteps: 3, Seed: 7, Size: 64x64, {a1111}"
    drop_file(page, png_bytes(Image.new("RGB", (8, 8)), _info(text)), "a.png")
    page.wait_for_function("document.querySelector('#seed').value === '7'")
    assert "ControlNet control_v11p_sd15_canny" in page.text_content("#err-general")
    assert page.input_value("#cn-weight") == "0.5" and page.input_value("#cn-pre") == "canny"
    assert [page.input_value(f"#cn-{k}") for k in ("low", "high", "rule")] == ["30", "60", "a1111"]


def test_the_hires_fixs_resize_sampler_schedule_and_prompts(page, client, server):
    from sdengine.prompts import apply_styles, read_styles

    fresh_form(page)
    # (the page had none of these: a PNG with them was named as not set, and the API has them all)
    assert page.locator("#hr-resize-x, #hr-resize-y, #hr-sampler, #hr-schedule, #hr-prompt").count() == 5
    page.select_option("#mode", "txt2img")
    page.check("#style-list label:has-text('cartoon') input")
    page.fill("#prompt", "a smiling face")
    page.fill("#negative_prompt", "")
    page.select_option("#sampler", "dpmpp_2m")
    page.select_option("#schedule", "karras")
    page.fill("#steps", "3")
    page.fill("#seed", "8")
    page.check("#hr-enabled")
    page.fill("#hr-steps", "2")
    page.fill("#hr-strength", "0.6")
    page.select_option("#hr-upscaler", "Latent")
    page.fill("#hr-resize-x", "96")
    page.fill("#hr-resize-y", "80")
    page.select_option("#hr-sampler", "euler")
    page.select_option("#hr-schedule", "exponential")
    page.fill("#hr-prompt", "a frowning face")
    page.fill("#hr-negative-prompt", "")
    page.fill("#hr-resize-x", "4000")  # over the server's --max-side: said, at its input (kept)
    page.click("#generate")
    page.wait_for_function("document.querySelector('#err-hires').textContent.includes('hr_resize_x')")
    assert page.get_attribute("#hr-resize-x", "aria-invalid") == "true" and page.input_value("#hr-resize-x") == "4000"
    page.fill("#hr-resize-x", "96")
    page.click("#generate")
    params = wait_result(page)
    assert "Hires resize: 96x80" in params and "Hires sampler: Euler" in params
    cartoon = read_styles(server.services.config.styles_file)["cartoon"]
    prompt, negative = apply_styles("a smiling face", "", [cartoon])
    hr_prompt = apply_styles("a frowning face", "", [cartoon])[0]
    hires = {"hr_second_pass_steps": 2, "hr_upscaler": "Latent", "hr_resize_x": 96, "hr_resize_y": 80}
    hires.update(hr_sampler="euler", hr_schedule="exponential", hr_prompt=hr_prompt)
    body = {"prompt": prompt, "negative_prompt": negative, "steps": 3, "seed": 8, "strength": 0.6, "hires": hires}
    for field in ("sampler", "schedule", "strength_rule"):
        body[field] = page.input_value(f"#{field}")
    body["cfg_scale"] = float(page.input_value("#cfg_scale"))
    expected, info = api_image(client, body)
    assert expected.shape == (80, 96, 3)
    np.testing.assert_array_equal(shown_image(page, "#results img"), expected)
    assert params == info
    # Reuse sets them again (the hires prompt without the style), and no setting is said to be missing
    for box, value in (("#hr-resize-x", "0"), ("#hr-resize-y", "0"), ("#hr-prompt", "x")):
        page.fill(box, value)
    page.select_option("#hr-sampler", "")
    page.select_option("#hr-schedule", "")
    page.uncheck("#style-list label:has-text('cartoon') input")
    page.click("#results button:text('Reuse parameters')")
    got = [page.input_value(f"#hr-{k}") for k in ("resize-x", "resize-y", "sampler", "schedule", "prompt")]
    assert got == ["96", "80", "euler", "exponential", "a frowning face"]
    assert page.input_value("#prompt") == "a smiling face"
    assert page.is_checked("#style-list label:has-text('cartoon') input")
    assert page.text_content("#err-general") == ""
    page.uncheck("#hr-enabled")
    page.uncheck("#style-list label:has-text('cartoon') input")
