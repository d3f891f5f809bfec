"""`osediff ui` in a real browser: headless Chromium (Debian's, never a download) drives the page on the tiny
random model — upload, Upscale, the result's pixel size, the exact PNG download, edited tags reaching the
prompt, a broken file's message while the page keeps working, and a page that shows the queue.

Screenshots go to the test's tmp folder; with OSEDIFF_UI_SCREENSHOT=path the result page is also saved there
(README's picture: `OSEDIFF_UI_SCREENSHOT=docs/ui.png pytest tests/ui/test_ui_browser.py`).
"""

import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from osediff.core.pipeline import OSEDiffPipeline
from osediff.ui.app import build_app, find_examples
from osediff.ui.jobs import Runner

CHROMIUM, DRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
REALSR_LR = Path(__file__).resolve().parents[3] / "shared" / "benchmarks" / "realsr" / "LR"
NOTICE = "Tiny random weights (a test): the output is noise. It shows the page, not the model."


def _browser_or_fail():
    if not (Path(CHROMIUM).exists() and Path(DRIVER).exists()):
        msg = ("Chromium is missing: apt-get install -y --no-install-recommends chromium chromium-driver "
               "(.ci/run installs it)")
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for a in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500",
              "--disable-gpu"):
        opts.add_argument(a)
    return webdriver.Chrome(service=Service(DRIVER), options=opts)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def page(tiny_sd, tiny_ckpt, tmp_path_factory):
    """The app on the tiny model (a tag reader that says "dog, grass", prompts recorded), and a browser."""
    tmp = tmp_path_factory.mktemp("ui")
    os.environ["GRADIO_TEMP_DIR"] = str(tmp / "gradio")
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    base = OSEDiffPipeline.from_pretrained(str(tiny_sd), str(tiny_ckpt), device="cpu", dtype="fp32", use_dape=False)
    seen, slow = [], []
    original = base.model.encode_text
    base.model.encode_text = lambda prompts: (seen.extend(prompts), original(prompts))[1]

    def tags(x):  # DAPE's stand-in; takes its time while `slow` holds a number of seconds
        time.sleep(slow[-1] if slow else 0)
        return ["dog, grass"] * x.shape[0]

    pipe = OSEDiffPipeline(base.model, tags, base.options)
    runner = Runner(pipe, max_megapixels=1.0)
    examples = find_examples(REALSR_LR)
    app = build_app(runner, examples=examples, notice=NOTICE, max_file_mb=5)
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, max_file_size="5mb",
               allowed_paths=examples, quiet=True)
    driver = _browser_or_fail()
    try:
        yield driver, f"http://127.0.0.1:{port}/", seen, tmp, slow, runner
    finally:
        driver.quit()
        app.close()


def _wait(fn, timeout=120.0, what="the page"):
    end = time.time() + timeout
    while time.time() < end:
        try:
            v = fn()
            if v:
                return v
        except Exception:  # elements re-render while Gradio updates them
            pass
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def _upload(driver, path):
    from selenium.webdriver.common.by import By

    box = driver.find_element(By.CSS_SELECTOR, "#input-image input[type=file]")
    box.send_keys(str(path))


def _info(driver) -> str:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.ID, "result-info").text


def _result_size(driver):
    """(naturalWidth, naturalHeight) of the OSEDiff side of the slider: the second image in it."""
    return driver.execute_script(
        "const im = document.querySelectorAll('#result img');"
        "return im.length >= 2 && im[1].complete && im[1].naturalWidth ?"
        " [im[1].naturalWidth, im[1].naturalHeight] : null;")


def test_upload_upscale_compare_steer_download_and_survive_a_broken_file(page, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver, url, seen, tmp, _, _ = page
    src = tmp_path / "photo.png"
    if REALSR_LR.is_dir():
        Image.open(sorted(REALSR_LR.iterdir())[0]).convert("RGB").crop((0, 0, 40, 32)).save(src)
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 40, 3), np.uint8)).save(src)

    driver.get(url)
    _wait(lambda: driver.find_element(By.ID, "upscale").is_displayed(), what="the Upscale button")
    assert driver.find_element(By.ID, "upscale").text == "Upscale"
    assert "1 megapixels" in driver.page_source and NOTICE in driver.page_source

    # 1. upload, Upscale, result at 4× the input, DAPE's tags in the box
    _upload(driver, src)
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#input-image img"), what="the preview")
    driver.find_element(By.ID, "upscale").click()
    _wait(lambda: "Output" in _info(driver), what="the first result")
    assert _wait(lambda: _result_size(driver), what="the result image") == [160, 128]
    tags_box = driver.find_element(By.CSS_SELECTOR, "#tags textarea")
    assert tags_box.get_attribute("value") == "dog, grass" and seen[-1] == "dog, grass, ,"
    driver.save_screenshot(str(tmp / "result.png"))
    if os.environ.get("OSEDIFF_UI_SCREENSHOT"):
        shutil.copy(tmp / "result.png", os.environ["OSEDIFF_UI_SCREENSHOT"])

    # 2. the download is our PNG, byte for byte the pipeline's result
    link = _wait(lambda: driver.find_element(By.CSS_SELECTOR, "#download a").get_attribute("href"),
                 what="the download link")
    served = tmp / "served.png"
    served.write_bytes(urllib.request.urlopen(link, timeout=30).read())
    assert Image.open(served).format == "PNG" and Image.open(served).size == (160, 128)
    written = list((tmp / "gradio").rglob("photo_osediff.png"))  # what the job wrote (= the pipeline's result)
    assert len(written) == 1 and served.read_bytes() == written[0].read_bytes()

    # 3. edit the tags and run again: the edited tags reach the prompt
    tags_box.send_keys(Keys.CONTROL, "a")
    tags_box.send_keys(Keys.DELETE)
    tags_box.send_keys("brick wall, ivy")
    driver.find_element(By.ID, "upscale").click()
    _wait(lambda: "brick wall, ivy" in _info(driver), what="the rerun with edited tags")
    assert seen[-1] == "brick wall, ivy, ,"

    # 4. a broken file: a message on the page, and the page keeps working
    bad = tmp_path / "broken.png"
    bad.write_bytes(src.read_bytes()[:200])
    _upload(driver, bad)
    time.sleep(1.0)
    driver.find_element(By.ID, "upscale").click()
    _wait(lambda: "damaged" in driver.page_source or "cannot" in driver.page_source, what="the error message")
    driver.save_screenshot(str(tmp / "error.png"))
    n = len(seen)
    _upload(driver, src)
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#input-image img"), what="the preview again")
    driver.find_element(By.ID, "upscale").click()
    _wait(lambda: len(seen) > n and "Output" in _info(driver), what="a result after the error")
    assert seen[-1] == "dog, grass, ,"  # a new image: DAPE reads its tags again


def _open_upload_and_upscale(driver, url, src):
    from selenium.webdriver.common.by import By

    driver.get(url)
    _wait(lambda: driver.find_element(By.ID, "upscale").is_displayed())
    _upload(driver, src)
    _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#input-image img"))
    driver.find_element(By.ID, "upscale").click()


def test_a_second_job_waits_in_the_queue_and_cancel_frees_the_device(page, tmp_path):
    """Two tabs: the second job shows its place in the queue while the first runs; Cancel stops the first
    (at its next stage) and the second then runs."""
    from selenium.webdriver.common.by import By

    driver, url, seen, tmp, slow, runner = page
    src = tmp_path / "q.png"
    Image.fromarray(np.random.default_rng(3).integers(0, 256, (24, 24, 3), np.uint8)).save(src)
    slow.append(4.0)
    try:
        first = driver.current_window_handle
        _open_upload_and_upscale(driver, url, src)
        _wait(lambda: runner.running_for is not None, 30, "the first job to start")
        driver.switch_to.new_window("tab")
        second = driver.current_window_handle
        _open_upload_and_upscale(driver, url, src)
        _wait(lambda: "queue" in driver.find_element(By.CSS_SELECTOR, ".wrap").text.lower()
              or "queue" in driver.page_source.lower(), 20, "the queue position")
        driver.save_screenshot(str(tmp / "queued.png"))
        if os.environ.get("OSEDIFF_UI_SCREENSHOT"):
            shutil.copy(tmp / "queued.png", Path(os.environ["OSEDIFF_UI_SCREENSHOT"]).with_suffix(".queued.png"))
        driver.switch_to.window(first)
        driver.save_screenshot(str(tmp / "running.png"))
        if os.environ.get("OSEDIFF_UI_SCREENSHOT"):
            shutil.copy(tmp / "running.png", Path(os.environ["OSEDIFF_UI_SCREENSHOT"]).with_suffix(".running.png"))
        slow[-1] = 0.0  # the second job may run quickly once the device is free
        driver.find_element(By.ID, "cancel").click()
        driver.switch_to.window(second)
        _wait(lambda: "Output" in _info(driver), 120, "the queued job's result after the cancel")
        assert len(list((tmp / "gradio").rglob("q_osediff.png"))) == 1  # the cancelled job wrote nothing
        assert runner.running_for is None and runner._device.acquire(blocking=False)
        runner._device.release()
        driver.close()
        driver.switch_to.window(first)
    finally:
        slow.clear()


def _developed_size(driver):
    """(naturalWidth, naturalHeight) of the developed picture the page shows beside an HEIC/RAW upload."""
    return driver.execute_script(
        "const im = document.querySelector('#developed img');"
        "return im && im.complete && im.naturalWidth ? [im.naturalWidth, im.naturalHeight] : null;")


def test_heic_and_raw_uploads_show_the_developed_picture_and_upscale(page, tmp_path):
    """Browsers show neither HEIC nor RAW: the page shows what the reader developed, and Upscale works."""
    from selenium.webdriver.common.by import By

    from osediff.files.samples import photo_folder

    driver, url, seen, tmp, _, _ = page
    src = photo_folder(tmp_path / "photos")
    for name, shown, out in (("phone.jpg", [16, 24], [64, 96]), ("camera.dng", [48, 32], [192, 128])):
        driver.get(url)
        _wait(lambda: driver.find_element(By.ID, "upscale").is_displayed(), what="the Upscale button")
        _upload(driver, src[name])
        assert _wait(lambda: _developed_size(driver), 60, f"the developed {name}") == shown
        n = len(seen)
        driver.find_element(By.ID, "upscale").click()
        _wait(lambda n=n: len(seen) > n and "Output" in _info(driver), what=f"the result of {name}")
        assert _wait(lambda: _result_size(driver), 30, "the result image") == out
        assert f"{'16' if name == 'camera.dng' else '8'}-bit PNG" in _info(driver)  # RAW: 16 bits kept
    driver.save_screenshot(str(tmp / "raw.png"))
