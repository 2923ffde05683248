"""The web demo (`mmgen serve`): the generate callback in Python, the CLI's checks, and the page end to end in
headless Chromium (Debian `chromium` + `chromium-driver`, installed by .ci/run)."""

import io
import shutil
import urllib.request

import gradio as gr
import pytest
import torch
from PIL import Image
from tiny import free_port

from mmgen import cli, serve
from mmgen.pipelines import load_pipeline
from mmgen.pipelines.base import generators_from_seed
from mmgen.zoo import zoo_models

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def tiny_dir(tiny_pipe_dir):
    return tiny_pipe_dir  # conftest: the tiny next-token pipeline, saved


@pytest.fixture(scope="module")
def models(tiny_dir):
    # the tiny next-token model, and a shipped flow model that the tests never load (it has no SJD/watermark)
    return serve.DemoModels({"tiny": tiny_dir, "shapes-flowar": zoo_models()["shapes-flowar"]})


@pytest.fixture(scope="module")
def reference(tiny_dir):
    pipe = load_pipeline(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(images):
    return [im.tobytes() for im in images]


def test_generate_matches_the_pipeline(models, reference):
    """The callback is `pipe(...)` with generators_from_seed: the same pixels as a direct call, for AR and SJD."""
    gallery, status = models.generate("a red circle", "tiny", "ar", 3, 2.0, 2)
    images = [im for im, _ in gallery]
    assert [caption for _, caption in gallery] == ["seed 3", "seed 4"]
    want = reference(prompt="a red circle", num_images_per_prompt=2, guidance_scale=2.0,
                     generator=generators_from_seed(3, 2))
    assert pixels(images) == pixels(want.images) and images[0].size == (16, 16)
    assert status.startswith("2 images (16x16) in ") and "NextTokenPipeline, 64 decoder passes per image." in status

    gallery, status = models.generate("a red circle", "tiny", "sjd", 3, 2.0, 2)
    sjd = reference(prompt="a red circle", num_images_per_prompt=2, guidance_scale=2.0,
                    generator=generators_from_seed(3, 2), sampler="sjd")
    assert pixels(im for im, _ in gallery) == pixels(sjd.images)
    assert f"{sjd.nfe} decoder passes per image; SJD: {sjd.step_compression:.2f} tokens per pass." in status
    assert sjd.nfe < 64


def test_watermark_toggle_reaches_the_pipeline(models, reference):
    """The key goes to the sampler: the page's image is the direct watermarked call's, not the plain one.
    (Detection from pixels is not asserted: a tiny random VQGAN re-tokenizes ~3% of codes back; see README.)"""
    gallery, status = models.generate("two green stars", "tiny", "ar", 0, 3.0, 1, True, "secret")
    marked = reference(prompt="two green stars", generator=generators_from_seed(0, 1), watermark_key="secret")
    plain = reference(prompt="two green stars", generator=generators_from_seed(0, 1))
    assert pixels(im for im, _ in gallery) == pixels(marked.images) != pixels(plain.images)
    assert status.endswith("; watermarked.")
    # the switch off means off, whatever the key box holds
    gallery, status = models.generate("two green stars", "tiny", "ar", 0, 3.0, 1, False, "secret")
    assert pixels(im for im, _ in gallery) == pixels(plain.images) and "watermarked" not in status


@pytest.mark.parametrize("args, message", [
    # the page's values get the one check every call gets (`mmgen.options`), its message as it is
    (("", "tiny"), "prompt must be a non-empty string"),
    (("   ", "tiny"), "prompt must be a non-empty string"),
    (("a red circle", "nope"), "model must be one of tiny, shapes-flowar; got 'nope'"),
    (("a red circle", "tiny", "beam"), "sampler must be one of ar, sjd; got 'beam'"),
    (("a red circle", "tiny", "ar", -1), "seed must be an integer in [0, 2**63 - 1], got -1"),
    (("a red circle", "tiny", "ar", 1.5), "seed must be an integer in [0, 2**63 - 1], got 1.5"),
    (("a red circle", "tiny", "ar", None), "seed must be an integer in [0, 2**63 - 1], got None"),  # a cleared box
    (("a red circle", "tiny", "ar", 0, float("nan")), "guidance_scale must be a finite number >= 0"),
    (("a red circle", "tiny", "ar", 0, 3.0, 0), "num_images_per_prompt must be an integer >= 1 with at most 256"),
    (("a red circle", "tiny", "ar", 0, 3.0, 1, True, ""), "Enter a watermark key"),
    (("a red circle", "tiny", "ar", 0, -1.0), "guidance_scale"),
    (("a purple hexagon", "tiny"), "does not know"),
    (("a red circle", "shapes-flowar", "sjd"), "SJD (speculative Jacobi decoding) needs a next-token model; "
                                               "shapes-flowar is a FlowARPipeline. Pick AR."),
    (("a red circle", "shapes-flowar", "ar", 0, 3.0, 1, True, "k"), "The watermark needs a next-token model"),
])
def test_bad_input_is_a_gradio_error(models, args, message):
    with pytest.raises(gr.Error) as info:
        models.generate(*args)
    assert message in info.value.message


def test_options_follow_the_model(models):
    """Refusals above are checked against the class: the flow model was never loaded."""
    sampler, watermark, key, info, guidance = models.controls("shapes-flowar")
    assert sampler == {"__type__": "update", "interactive": False, "value": "ar"}
    assert watermark == {"__type__": "update", "interactive": False, "value": False}
    assert key == {"__type__": "update", "interactive": False}
    assert info.startswith("**shapes-flowar**: `FlowARPipeline`. SJD and the watermark are next-token stages")
    assert guidance == {"__type__": "update", "value": 3.0}  # saved without its own scale: the pipelines' 3
    sampler, watermark, key, info, guidance = models.controls("tiny")
    assert sampler["interactive"] and watermark["interactive"] and key["interactive"] and "value" not in sampler
    assert info == "**tiny**: `NextTokenPipeline`. Takes: SJD sampler, watermark."
    assert "shapes-flowar" not in models._pipes


def test_models_are_checked(tmp_path):
    with pytest.raises(ValueError, match="at least one"):
        serve.build_demo({})
    with pytest.raises(ValueError, match="has no model_index.json"):
        serve.build_demo({"empty": tmp_path})
    (tmp_path / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    with pytest.raises(ValueError, match="names pipeline 'StableDiffusionPipeline'; accepted: NextTokenPipeline"):
        serve.build_demo({"sd": tmp_path})


def test_cli_serve(tiny_dir, monkeypatch, capsys):
    """`mmgen serve` resolves --model names and directories, then hands them to `serve` (replaced here, so no
    server starts); bad input exits 2 with the argument named."""
    served = {}

    class Demo:
        local_url = "http://127.0.0.1:7999/"
        models = serve.DemoModels({"shapes-flowar": zoo_models()["shapes-flowar"], str(tiny_dir): tiny_dir})

    def fake_serve(models, host, port, share, device):
        served.update(models=models, host=host, port=port, share=share, device=device)
        return Demo

    monkeypatch.setattr(serve, "serve", fake_serve)
    assert cli.main(["serve", "--model", "shapes-flowar", "--model", str(tiny_dir), "--port", "7999", "--json"]) == 0
    assert served == {"models": {"shapes-flowar": zoo_models()["shapes-flowar"], str(tiny_dir): tiny_dir},
                      "host": "127.0.0.1", "port": 7999, "share": False, "device": "cpu"}
    assert '"shapes-flowar": "FlowARPipeline"' in capsys.readouterr().out
    assert cli.main(["serve"]) == 0 and served["models"] is None and served["port"] == 7860  # None: the zoo
    capsys.readouterr()
    for argv, needle in ((["--model", "no-such-model"], "--model: model 'no-such-model' does not exist"),
                         (["--model", "shapes-flowar", "--model", "shapes-flowar"], "names a model twice"),
                         (["--port", "70000"], "--port must be >= 1 and <= 65535, got 70000")):
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["serve", *argv])
        assert exit_info.value.code == 2 and needle in capsys.readouterr().err


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("needs Debian chromium + chromium-driver (apt-get install chromium chromium-driver; CI does)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1100,800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def test_page_in_headless_chromium(tiny_dir, reference, browser):
    """Type a prompt, press Generate, get the image; an empty prompt shows the error instead."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    demo = serve.serve({"tiny": tiny_dir}, port=free_port(), block=False)
    try:
        browser.get(demo.local_url)
        wait = WebDriverWait(browser, 30)
        # the page builds its components as it loads: wait for each one used, not only the first
        prompt = wait.until(EC.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))
        prompt.send_keys("a blue square above a red circle")
        wait.until(EC.element_to_be_clickable((By.ID, "generate"))).click()
        img = wait.until(EC.visibility_of_element_located((By.CSS_SELECTOR, "#output img")))
        no_proxy = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the server is local
        with no_proxy.open(img.get_attribute("src"), timeout=10) as response:
            image = Image.open(io.BytesIO(response.read()))
            image.load()
        assert image.format == "PNG" and image.size == (16, 16)
        want = reference(prompt="a blue square above a red circle", generator=generators_from_seed(0, 1))
        assert image.convert("RGB").tobytes() == want.images[0].tobytes()  # PNG is lossless: the very pixels
        wait.until(EC.text_to_be_present_in_element((By.ID, "status"), "64 decoder passes per image"))

        prompt.send_keys(Keys.CONTROL, "a")
        prompt.send_keys(Keys.BACKSPACE)  # as a user does: clear() skips the input event the page listens to
        wait.until(EC.element_to_be_clickable((By.ID, "generate"))).click()
        wait.until(EC.text_to_be_present_in_element((By.TAG_NAME, "body"), "prompt must be a non-empty string"))
    finally:
        demo.close()


def test_detect_tab_reports_what_the_pipeline_detects(models, reference, tmp_path):
    """The Detect callback gives, per uploaded file, the p-value `detect_watermark` gives, and the pooled test
    with `combine`; wrong inputs are refused by name."""
    out = reference(prompt="two green stars", num_images_per_prompt=2, watermark_key="s3",
                    generator=generators_from_seed(0, 2))
    paths = []
    for i, im in enumerate(out.images):
        im.save(tmp_path / f"m{i}.png")
        paths.append(str(tmp_path / f"m{i}.png"))
    want = reference.detect_watermark([Image.open(p) for p in paths], "s3")
    both = reference.detect_watermark([Image.open(p) for p in paths], "s3", combine=True)
    assert both["images"] == want  # the per-image tests come with the pooled one, from one re-encoding
    pooled = both["combined"]
    table = models.detect(paths, "tiny", "s3", combine=True)
    rows = table.splitlines()
    assert len(rows) == 2 + 2 + 1 and rows[0] == "| image | p-value | verdict at 0.01 |"
    for row, path, r in zip(rows[2:4], paths, want):
        assert row.startswith(f"| m{paths.index(path)}.png | {r['p_value']:.3g} |")
    assert rows[4].startswith(f"| all 2 together | {pooled['p_value']:.3g} |")
    (tmp_path / "notes.txt").write_text("not an image")
    for args, needle in [(([], "tiny", "s3"), "Upload at least one image"), ((paths, "tiny", ""), "Enter the"),
                         ((paths, "shapes-flowar", "s3"), "needs a next-token model"),
                         (([str(tmp_path / "notes.txt")], "tiny", "s3"), "notes.txt is not a readable image")]:
        with pytest.raises(gr.Error, match=needle):
            models.detect(*args)


def test_detect_tab_in_headless_chromium(tiny_dir, reference, browser, tmp_path):
    """Open the Detect tab, upload a watermarked image, type the key, press Detect: its p-value appears."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as EC
    from selenium.webdriver.support.ui import WebDriverWait

    out = reference(prompt="a red circle", watermark_key="s3", generator=generators_from_seed(1, 1))
    out.images[0].save(tmp_path / "marked.png")
    want = reference.detect_watermark([Image.open(tmp_path / "marked.png")], "s3")[0]
    demo = serve.serve({"tiny": tiny_dir}, port=free_port(), block=False)
    try:
        browser.get(demo.local_url)
        wait = WebDriverWait(browser, 30)
        tab = wait.until(EC.element_to_be_clickable((By.XPATH, "//button[@role='tab'][contains(., 'Detect')]")))
        tab.click()
        upload = wait.until(EC.presence_of_element_located((By.CSS_SELECTOR, "#detect-files input[type=file]")))
        upload.send_keys(str(tmp_path / "marked.png"))
        wait.until(EC.text_to_be_present_in_element((By.ID, "detect-files"), "marked"))  # the upload landed
        browser.find_element(By.CSS_SELECTOR, "#detect-key input").send_keys("s3")
        browser.find_element(By.ID, "detect").click()
        wait.until(EC.text_to_be_present_in_element((By.ID, "detect-result"), f"{want['p_value']:.3g}"))
        assert "marked.png" in browser.find_element(By.ID, "detect-result").text
    finally:
        demo.close()


def test_model_default_guidance(tiny_dir, tmp_path, monkeypatch):
    """A model saved with its own guidance scale samples at it when a call, the CLI or the page gives none, and
    the scale survives save/reload through model_index.json; models saved without one keep the pipelines' 3."""
    pipe = load_pipeline(tiny_dir)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.config.default_guidance_scale == 3.0
    pipe.register_to_config(default_guidance_scale=1.5)
    pipe.save_pretrained(tmp_path / "m")
    again = load_pipeline(tmp_path / "m")
    again.set_progress_bar_config(disable=True)
    assert again.config.default_guidance_scale == 1.5

    from mmgen.paradigms import next_token
    used = []
    real = next_token.generate

    def spy(model, layout, text_ids, cfg, *args, **kw):
        used.append(cfg.guidance_scale)
        return real(model, layout, text_ids, cfg, *args, **kw)

    def tokens(p, **kw):
        return p(prompt="a red circle", generator=generators_from_seed(5, 1), output_type="pt", **kw).tokens

    monkeypatch.setattr(next_token, "generate", spy)
    assert torch.equal(tokens(again), tokens(again, guidance_scale=1.5))
    tokens(again, guidance_scale=4.0)
    tokens(load_pipeline(tiny_dir))
    assert used == [1.5, 1.5, 4.0, 3.0]
    demo = serve.DemoModels({"tiny": tiny_dir, "own": tmp_path / "m"})
    assert demo.controls("own")[4] == {"__type__": "update", "value": 1.5}
    assert demo.default_guidance("tiny") == 3.0
