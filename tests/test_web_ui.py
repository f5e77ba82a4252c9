"""`ldmkit serve` in a real browser: headless Chromium (Debian's) driven by Playwright.

A tiny text-to-image model is trained on captioned shapes; the test starts the server as a user would, on a
free local port, then enters a prompt, generates, reads the picture back and compares it with the pipeline's
own output for the same seed; paints a mask for inpainting; submits an out-of-range value and sees the
error; and sends two requests at once, which the queue serves in turn.

CI installs Chromium and Playwright (Makefile), and sets LDMKIT_REQUIRE_BROWSER=1 so that a missing browser
fails the run instead of skipping it.
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldmkit.pipeline import LatentDiffusionPipeline

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def _need(what: str) -> None:
    if os.environ.get("LDMKIT_REQUIRE_BROWSER"):
        pytest.fail(f"{what} is required here (LDMKIT_REQUIRE_BROWSER is set)")
    pytest.skip(f"{what} is not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def gradio_dir(tmp_path_factory) -> Path:
    """The server's own folder for uploads and results (not a /tmp/gradio that earlier runs have filled)."""
    return tmp_path_factory.mktemp("gradio")


@pytest.fixture(scope="module")
def server(text_run, gradio_dir):
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        _need("gradio (pip install 'ldmkit[ui]')")
    port = _free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "GRADIO_TEMP_DIR": str(gradio_dir)}
    proc = subprocess.Popen([sys.executable, "-m", "ldmkit.cli.main", "serve", "--checkpoint", str(text_run),
                             "--port", str(port), "--max-steps", "20", "--max-images", "2",
                             "--low-cpu-memory"],  # the first test compares its pictures with a pipeline without it
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=5).read()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"ldmkit serve did not start: {proc.stdout.read() if proc.stdout else ''}")
            time.sleep(0.5)
    yield url
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        _need("Debian's chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ModuleNotFoundError:
        _need("playwright (pip)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        yield b
        b.close()


def _open(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url, wait_until="networkidle")
    return page


def _fill(page, task: str, **values: object) -> None:
    for name, value in values.items():
        page.locator(f"#{task}-{name} textarea, #{task}-{name} input").first.fill(str(value))


def _result(page, task: str, timeout: float = 120.0) -> list[np.ndarray]:
    """The gallery's pictures once they appear; an error message shown instead fails the test with its text."""
    deadline = time.time() + timeout
    while page.locator(f"#{task}-gallery img").count() == 0:
        errors = page.locator(".toast-body").all_inner_texts()
        if errors:
            pytest.fail(f"the page showed an error instead of a result: {errors}")
        if time.time() > deadline:
            pytest.fail(f"no result after {timeout} s")
        time.sleep(0.2)
    srcs = page.locator(f"#{task}-gallery img").evaluate_all("els => els.map(e => e.src)")
    return [np.asarray(Image.open(io.BytesIO(urllib.request.urlopen(s, timeout=30).read())).convert("RGB"))
            for s in srcs]


def test_prompt_to_image_in_the_browser_matches_the_pipeline(server, browser, text_run):
    page = _open(browser, server)
    _fill(page, "generate", prompt="a red circle", steps=6, seed=11, n=2, guidance=2)
    page.locator("#generate-run").click()
    got = _result(page, "generate")
    assert len(got) == 2 and got[0].shape == (32, 32, 3)
    assert "seeds 11..12" in page.locator("#generate-info textarea").input_value()
    pipe = LatentDiffusionPipeline.from_checkpoint(text_run)
    want = pipe("a red circle", n=2, seed=11, steps=6, guidance=2)
    for g, w in zip(got, want.images, strict=True):  # the page shows exactly what the library makes
        assert np.abs(g.astype(int) - np.asarray(w).astype(int)).max() <= 1
    page.screenshot(path=str(Path(text_run) / "page.png"))
    page.close()


def _share_of_colour(element, rgb: tuple[int, int, int]) -> float:
    """The share of the element's on-screen pixels that show `rgb`."""
    shot = np.asarray(Image.open(io.BytesIO(element.screenshot())).convert("RGB")).astype(int)
    return float((np.abs(shot - np.array(rgb)).sum(-1) < 12).mean())


def _wait_until(condition, what: str, timeout: float = 30.0) -> None:
    """Poll what a person would wait to see before going on."""
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"{what} never appeared on the page")
        time.sleep(0.3)


def _painted_layers(folder: Path) -> list[np.ndarray]:
    """The brush layers the page uploaded to the server: RGBA pictures, transparent except for the strokes."""
    layers = []
    for path in sorted(folder.rglob("*.png"), key=lambda p: p.stat().st_mtime_ns):
        im = Image.open(path)
        if im.mode == "RGBA":
            alpha = np.asarray(im.getchannel("A"))
            if (alpha == 0).any() and (alpha > 0).any():
                layers.append(alpha)
    return layers


def test_inpainting_with_a_mask_painted_in_the_browser(server, browser, tmp_path, text_run, gradio_dir):
    picture = tmp_path / "picture.png"
    Image.new("RGB", (32, 32), (30, 60, 200)).save(picture)
    page = _open(browser, server)
    page.get_by_role("tab", name="Inpaint").click()
    editor = page.locator("#inpaint-editor")
    editor.get_by_text("Upload an image").wait_for()  # the tab's editor is on screen
    canvas = editor.locator("canvas").first
    blue = (30, 60, 200)
    seen: list[str] = []  # what the page reported, for the failure message
    page.on("console", lambda m: seen.append(f"console error: {m.text}") if m.type == "error" else None)
    page.on("requestfailed", lambda r: seen.append(f"request failed: {r.url} {r.failure}"))
    for attempt in range(3):  # as a person does: click the editor and choose the file; a choice made while
        try:                  # the editor is still mounting can be dropped, so choose it again
            if attempt < 2:
                with page.expect_file_chooser(timeout=10_000) as chooser:
                    editor.get_by_text("Upload an image").click(timeout=10_000)
                chooser.value.set_files(str(picture))
            else:  # last try: a freshly loaded page, the file handed straight to the editor's file input
                page.reload(wait_until="networkidle")
                page.get_by_role("tab", name="Inpaint").click()
                editor.get_by_text("Upload an image").wait_for()
                editor.locator("input[type=file]").set_input_files(str(picture), timeout=10_000)
            _wait_until(lambda: canvas.is_visible() and _share_of_colour(canvas, blue) > 0.05, "the picture", 15)
            break
        except (Exception, pytest.fail.Exception):  # noqa: BLE001 - a missed chooser or a dropped file: again
            continue
    if not (canvas.is_visible() and _share_of_colour(canvas, blue) > 0.05):
        editor.screenshot(path=str(tmp_path / "editor.png"))
        pytest.fail(f"the uploaded picture never appeared in the editor (screenshot {tmp_path / 'editor.png'}); "
                    f"the page reported: {seen[-20:]}")
    time.sleep(0.5)
    before = _share_of_colour(canvas, blue)
    box = canvas.bounding_box()
    assert box is not None
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(cx - 60, cy)  # one stroke across the middle of the picture
    page.mouse.down()
    for k in range(13):
        page.mouse.move(cx - 60 + 10 * k, cy)
    page.mouse.up()
    _wait_until(lambda: _share_of_colour(canvas, blue) < 0.97 * before, "the brush stroke")  # paint covers blue
    time.sleep(1.0)  # the editor commits its layers to its value after drawing them
    _fill(page, "inpaint", prompt="a yellow square", steps=6, seed=3)
    page.locator("#inpaint-run").click()
    out = _result(page, "inpaint")[0].astype(int)
    # the painted region as the service reads it: every pixel a brush layer covers (alpha > 0), resized to the
    # picture by nearest neighbour (ui.service: no blur, no dilation of the mask)
    layers = _painted_layers(gradio_dir)
    assert layers, f"no brush layer among the uploads: {sorted(p.name for p in gradio_dir.rglob('*.png'))}"
    alpha = layers[-1]
    painted = np.asarray(Image.fromarray(alpha).resize(out.shape[1::-1], Image.Resampling.NEAREST)) > 0
    assert 0.02 < painted.mean() < 0.9, painted.mean()  # one stroke across the middle
    # every pixel outside the painted region is the uploaded picture's, exactly (pasted back); inside, new paint
    assert np.array_equal(out[~painted], np.broadcast_to(np.array(blue), out[~painted].shape))
    assert np.abs(out[painted] - np.array(blue)).sum(-1).mean() > 30
    page.close()


def test_out_of_range_values_show_a_clear_error(server, browser):
    page = _open(browser, server)
    _fill(page, "generate", prompt="a blue bar", steps=500)
    page.locator("#generate-run").click()
    page.locator(".toast-body", has_text="steps must be a whole number between 1 and 20").wait_for(timeout=30_000)
    page.reload(wait_until="networkidle")
    _fill(page, "generate", prompt="   ", steps=4)
    page.locator("#generate-run").click()
    page.locator(".toast-body", has_text="the prompt is empty").wait_for(timeout=30_000)
    assert page.locator("#generate-gallery img").count() == 0
    page.close()


def test_two_concurrent_requests_both_complete(server, browser):
    pages = [_open(browser, server) for _ in range(2)]
    for page, prompt in zip(pages, ("a green triangle", "a blue square"), strict=True):
        _fill(page, "generate", prompt=prompt, steps=8, seed=1)
    for page in pages:  # both submitted before either finishes: the queue serves them in turn
        page.locator("#generate-run").click()
    results = [_result(page, "generate") for page in pages]
    assert all(len(r) == 1 for r in results)
    assert np.abs(results[0][0].astype(int) - results[1][0].astype(int)).max() > 0  # two different prompts
    for page in pages:
        page.close()


# ------------------------------------------------------------------ the checks behind the page, no browser


@pytest.fixture(scope="module")
def service(tiny_run):
    from ldmkit.ui.service import Limits, Service

    return Service(LatentDiffusionPipeline.from_checkpoint(tiny_run), Limits(max_steps=10, max_size=64, max_images=3))


def test_service_offers_the_model_tasks_and_enforces_limits(service):
    from ldmkit.ui.service import PageRequest, RequestError

    assert service.tasks == ["generate", "img2img", "inpaint"] and service.multiple == 8
    out, info = service.run(PageRequest("generate", class_label="3", steps=3, seed=4, n=2))
    assert out.seeds == [4, 5] and "seeds 4..5" in info and [p["class_label"] for p in out.parameters] == [3, 3]
    out, _ = service.run(PageRequest("generate", steps=2, seed=-1))  # -1: a fresh random seed, reported
    assert 0 <= out.seeds[0] < 2**31 - 1
    cases = [
        (PageRequest("generate", steps=11), "steps must be a whole number between 1 and 10"),
        (PageRequest("generate", steps=2.5), "steps must be a whole number"),
        (PageRequest("generate", n=4), "number of images must be a whole number between 1 and 3"),
        (PageRequest("generate", size=72), "size must be a whole number between 8 and 64"),
        (PageRequest("generate", size=36), "size must be a multiple of 8"),
        (PageRequest("generate", guidance=31), "guidance must be between 0 and 30"),
        (PageRequest("generate", class_label="12", steps=2), "class must be a whole number between 0 and 9"),
        (PageRequest("generate", sampler="dpm9"), "unknown sampler"),
        (PageRequest("img2img", steps=2), "upload the image first"),
        (PageRequest("img2img", steps=2, image=Image.new("L", (128, 128))), "at most 64 px"),
        (PageRequest("img2img", steps=2, image=Image.new("L", (32, 32)), strength=1.5), "strength must be in"),
        (PageRequest("inpaint", steps=2), "upload an image, then paint"),
        (PageRequest("upscale"), "does not do 'Super-resolution'"),
    ]
    for req, needle in cases:
        with pytest.raises(RequestError, match=needle):
            service.run(req)


def test_service_inpaints_the_painted_strokes_and_resizes_odd_pictures(service):
    from ldmkit.ui.service import PageRequest, RequestError

    picture = Image.new("RGBA", (30, 30), (0, 0, 0, 255))  # resized down to 24 px, the model's multiple
    layer = Image.new("RGBA", (30, 30), (0, 0, 0, 0))
    with pytest.raises(RequestError, match="the mask is empty"):
        service.run(PageRequest("inpaint", steps=2, image={"background": picture, "layers": [layer]}))
    layer.paste((255, 255, 255, 255), (10, 10, 20, 20))
    out, _ = service.run(PageRequest("inpaint", steps=3, seed=0, image={"background": picture, "layers": [layer]}))
    got = np.asarray(out.images[0]).astype(int)
    assert got.shape == (24, 24)
    assert got[:6].max() == 0 and got[-6:].max() == 0  # outside the strokes the black picture is kept
    out, _ = service.run(PageRequest("img2img", steps=3, seed=0, image=Image.new("L", (41, 40)), strength=0.5))
    assert out.images[0].size == (40, 40)
