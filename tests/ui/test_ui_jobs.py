"""The web page's jobs and callbacks without a browser: exact PNGs, tags that steer, bad input, cancel."""

import threading
import zipfile

import gradio as gr
import numpy as np
import pytest
from PIL import Image

from osediff.core.pipeline import OSEDiffPipeline
from osediff.files.images import Picture, read_image
from osediff.ui.app import Callbacks, describe, find_examples, job_options
from osediff.ui.jobs import Cancelled, JobError, JobOptions, Runner


@pytest.fixture(autouse=True)
def gradio_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    return tmp_path / "gradio"


@pytest.fixture
def spy_pipe(tiny_pipe, monkeypatch):
    """The tiny pipeline with a tag reader that says "dog, grass" and a record of the prompts the UNet got."""
    seen = []
    original = tiny_pipe.model.encode_text

    def encode_text(prompts):
        seen.extend(prompts)
        return original(prompts)

    monkeypatch.setattr(tiny_pipe.model, "encode_text", encode_text)
    pipe = OSEDiffPipeline(tiny_pipe.model, lambda x: ["dog, grass"] * x.shape[0], tiny_pipe.options)
    pipe.seen = seen
    return pipe


def _png(path, w=24, h=20, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    Image.fromarray(rng.integers(0, 256, (h, w, channels), dtype=np.uint8), mode).save(path)
    return path


def test_result_is_the_exact_png_of_the_pipeline(spy_pipe, tmp_path, gradio_tmp):
    src = _png(tmp_path / "in.png")
    r = Runner(spy_pipe).run(src)
    expected, prompt = spy_pipe.run_picture(read_image(src))
    got = read_image(r.output)
    assert r.output.suffix == ".png" and Image.open(r.output).format == "PNG"
    assert np.array_equal(got.rgb, expected.rgb) and r.prompt == prompt
    assert r.size == (96, 80) and Image.open(r.before).size == (96, 80)
    # written inside Gradio's temporary folder only
    assert r.output.resolve().is_relative_to(gradio_tmp.resolve())
    assert {"tags", "encode", "unet", "decode", "color_fix"} <= set(r.seconds)
    assert "96×80" in describe(r)


def test_16_bit_and_alpha_are_kept(spy_pipe, tmp_path):
    import png

    a = np.random.default_rng(1).integers(0, 65536, (12, 16, 3), dtype=np.uint16)
    src = tmp_path / "deep.png"
    with open(src, "wb") as f:
        png.Writer(16, 12, greyscale=False, bitdepth=16).write(f, a.reshape(12, -1).tolist())
    r = Runner(spy_pipe).run(src)
    out = read_image(r.output)
    assert r.bits == 16 and out.bits == 16 and out.size == (64, 48)
    r = Runner(spy_pipe).run(_png(tmp_path / "alpha.png", mode="RGBA"))
    assert read_image(r.output).alpha is not None


def test_dape_tags_then_edited_tags_reach_the_prompt(spy_pipe, tmp_path):
    src = _png(tmp_path / "in.png")
    runner = Runner(spy_pipe)
    r = runner.run(src)  # empty tags box: DAPE's
    assert r.tags == "dog, grass" and spy_pipe.seen[-1] == "dog, grass, ,"
    r = runner.run(src, JobOptions(tags="brick wall, ivy", prompt="sharp"))
    assert r.tags == "brick wall, ivy" and spy_pipe.seen[-1] == "brick wall, ivy, sharp,"


def test_page_values_map_to_job_options():
    o = job_options(2, "wavelet", "p", "  ", 64, 16, 512, 128, -1, True)
    assert o == JobOptions(scale=2, color_fix="wavelet", prompt="p", tags=None, tile=64, tile_overlap=16,
                           vae_encoder_tile=512, vae_decoder_tile=128, seed=None, sample_latent=True)
    assert job_options(4, "adain", None, "cat", 96, 32, 1024, 224, 7, False).tags == "cat"
    assert job_options(4, "adain", None, "cat", 96, 32, 1024, 224, 7, False).seed == 7


@pytest.mark.parametrize("kind", ["none", "empty", "text", "truncated", "huge"])
def test_bad_input_is_one_clear_line_and_nothing_is_written(spy_pipe, tmp_path, gradio_tmp, kind):
    path = tmp_path / "bad.png"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("not an image at all")
    elif kind == "truncated":
        _png(path, 64, 64)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "huge":
        Image.new("RGB", (1200, 1000)).save(path)  # 1.2 MP against a 1 MP cap
    with pytest.raises(JobError) as e:
        Runner(spy_pipe, max_megapixels=1.0).run(None if kind == "none" else path)
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 200
    if kind == "huge":
        assert "1.2 megapixels" in msg and "--max-megapixels" in msg
    assert not gradio_tmp.exists() or not any(gradio_tmp.rglob("*.png"))
    with pytest.raises(gr.Error):  # the page's callback turns it into a message on the page
        Callbacks(Runner(spy_pipe, max_megapixels=1.0)).upscale(
            None if kind == "none" else str(path), "", 4, "adain", "", 96, 32, 1024, 224, -1, False)


def test_cancel_stops_the_job_and_frees_the_device(spy_pipe, tmp_path):
    src = _png(tmp_path / "in.png")
    runner = Runner(spy_pipe)

    def progress(fraction, label):
        if label.startswith("UNet"):
            assert runner.cancel("me")
    with pytest.raises(Cancelled):
        runner.run(src, progress=progress, session="me")
    assert not runner.cancel("me")  # nothing is running any more
    assert runner._device.acquire(blocking=False)
    runner._device.release()
    assert runner.run(src).size == (96, 80)  # and the next job runs normally


def test_one_job_at_a_time_on_the_device(spy_pipe, tmp_path):
    src = _png(tmp_path / "in.png")
    runner = Runner(spy_pipe)
    order = []
    runner._device.acquire()  # a job is running
    t = threading.Thread(target=lambda: order.append(runner.run(src).size))
    t.start()
    t.join(timeout=1.0)
    assert t.is_alive() and order == []  # the second waits for the device
    runner._device.release()
    t.join(timeout=60)
    assert order == [(96, 80)]


def test_several_files_give_a_gallery_and_a_zip_and_a_bad_one_costs_only_itself(spy_pipe, tmp_path):
    a, b = _png(tmp_path / "a.png"), _png(tmp_path / "b.png", seed=2)
    bad = tmp_path / "bad.jpg"
    bad.write_text("junk")
    gallery, archive, summary = Callbacks(Runner(spy_pipe)).upscale_many(
        [str(a), str(bad), str(b)], 4, "adain", "", 96, 32, 1024, 224, -1, False)
    assert len(gallery) == 2 and "2 of 3" in summary and "bad.jpg" in summary and "Ignored" not in summary
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["a_osediff.png", "b_osediff.png"]
        with z.open("a_osediff.png") as f:
            assert Image.open(f).size == (96, 80)


def test_examples_and_exposure_warnings(tmp_path):
    from osediff.commands.ui import exposure_warnings

    for name in ("b.png", "a.jpg", "notes.txt"):
        (tmp_path / name).write_bytes(b"")
    assert [p.rsplit("/", 1)[1] for p in find_examples(tmp_path)] == ["a.jpg", "b.png"]
    assert find_examples(tmp_path / "missing") == []
    assert exposure_warnings("127.0.0.1", False) == []
    assert len(exposure_warnings("0.0.0.0", True)) == 2


def test_picture_helper_shapes():
    # guards the 16-bit 'before' conversion used for the slider
    from osediff.ui.jobs import _bicubic

    pic = Picture(np.full((4, 5, 3), 65535, np.uint16))
    im = _bicubic(pic, (10, 8))
    assert im.size == (10, 8) and im.mode == "RGB" and np.asarray(im).max() == 255


def test_osediff_ui_reports_missing_weights_before_any_server_starts(tmp_path, monkeypatch, caplog):
    from osediff.cli import main

    monkeypatch.setenv("OSEDIFF_MODELS", str(tmp_path / "models"))
    started = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda *a, **k: started.append(1))
    assert main(["ui", "--weights", str(tmp_path / "nope.pkl"), "--base", str(tmp_path / "nosd")]) == 2
    assert not started and ("nosd" in caplog.text or "nope.pkl" in caplog.text)


def test_osediff_ui_loads_once_and_launches_on_localhost(tiny_sd, tiny_ckpt, monkeypatch):
    from osediff.cli import main

    launched = []
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **k: launched.append(k))
    assert main(["ui", "--base", str(tiny_sd), "--weights", str(tiny_ckpt), "--no-dape", "--device", "cpu",
                 "--dtype", "fp32", "--max-file-mb", "7"]) == 0
    assert launched == [dict(server_name="127.0.0.1", server_port=7860, share=False, max_file_size="7mb",
                             allowed_paths=launched[0]["allowed_paths"])]


def test_heic_and_raw_uploads_are_developed_and_upscaled(spy_pipe, tmp_path, gradio_tmp):
    from osediff.files.samples import photo_folder

    src = photo_folder(tmp_path / "photos")
    runner = Runner(spy_pipe)
    r = runner.run(src["phone.jpg"])  # an HEIC named .jpg, orientation 6
    assert r.size == (64, 96) and r.bits == 8 and Image.open(r.before).size == (64, 96)
    r = runner.run(src["camera.dng"])
    assert r.size == (192, 128) and r.bits == 16
    for name, size in (("phone.jpg", (16, 24)), ("camera.dng", (48, 32)), ("scan.tif", (24, 16))):
        shown = runner.preview(src[name])  # what the page shows, since the browser cannot
        assert shown.suffix == ".png" and Image.open(shown).size == size
    assert runner.preview(src["web.avif"]) is None  # browsers show AVIF themselves


def test_several_files_follow_the_ignore_and_fail_rules(spy_pipe, tmp_path):
    from osediff.files.samples import photo_folder

    src = photo_folder(tmp_path / "photos")
    bad = tmp_path / "bad.jpg"
    bad.write_text("junk")
    gallery, archive, summary = Callbacks(Runner(spy_pipe)).upscale_many(
        [str(src["phone.jpg"]), str(src["notes.txt"]), str(bad), str(src["camera.dng"])],
        4, "adain", "", 96, 32, 1024, 224, -1, False)
    assert "2 of 3 images upscaled" in summary and "Ignored 1 file that is not an image: notes.txt" in summary
    assert "bad.jpg" in summary
    with zipfile.ZipFile(archive) as z:
        assert sorted(z.namelist()) == ["camera_osediff.png", "phone_osediff.png"]
    with pytest.raises(gr.Error, match="notes.txt"):
        Callbacks(Runner(spy_pipe)).upscale_many([str(src["notes.txt"])], 4, "adain", "", 96, 32, 1024, 224, -1,
                                                 False)


def test_a_missing_reader_is_named_on_the_page(spy_pipe, tmp_path, monkeypatch):
    from osediff.files import formats
    from osediff.files.samples import sample_rgb, write_heic

    path = write_heic(tmp_path / "phone.heic", sample_rgb(16, 12))
    real = formats.has_module
    monkeypatch.setattr(formats, "has_module", lambda name: name != "pillow_heif" and real(name))
    with pytest.raises(JobError, match=r'^phone\.heic: reading HEIF needs pillow_heif: pip install "osediff\[heic\]"$'):
        Runner(spy_pipe).run(path)
