"""The `osediff ui` page (Gradio): upload, Upscale, compare before/after, steer with the tags, download.

The page is a thin layer over `Runner` (osediff.ui.jobs): each callback turns the page's values into a
`JobOptions`, runs the job and turns the result into what the components show. Gradio is imported inside
`build_app`, so importing this module stays light.

Tags: the box starts empty for a new image, and an empty box lets DAPE read the tags; after a run the box
shows the tags used, and whatever it holds then (edited or not) conditions the next run of that image.
"""


import logging
from pathlib import Path

from osediff.ui.jobs import Cancelled, JobError, JobOptions, JobResult, Runner

log = logging.getLogger(__name__)

INTRO = """# OSEDiff: one-step diffusion super-resolution
Drop, paste or upload a photo (JPEG, PNG, WebP, AVIF; HEIC, JPEG XL, camera RAW and 16-bit TIFF with
`osediff[formats]`) and press **Upscale**. The DAPE tags steer the model: edit them and press
**Upscale** again. The download is the exact lossless PNG (16-bit when the input was, alpha kept).
Inputs up to **{mp:g} megapixels** and **{mb:g} MB**."""


def job_options(scale, color_fix, prompt, tags, tile, tile_overlap, enc_tile, dec_tile, seed, sample) -> JobOptions:
    """The page's control values -> JobOptions (an empty tags box means: let DAPE read the tags)."""
    tags = (tags or "").strip()
    seed = None if seed in (None, "") or seed < 0 else int(seed)
    return JobOptions(scale=float(scale), color_fix=color_fix, prompt=prompt or "", tags=tags or None,
                      tile=int(tile), tile_overlap=int(tile_overlap), vae_encoder_tile=int(enc_tile),
                      vae_decoder_tile=int(dec_tile), seed=seed, sample_latent=bool(sample))


def describe(r: JobResult) -> str:
    """The line under the result: size, prompt, per-stage times and peak memory."""
    stages = ", ".join(f"{name} {s:.2f} s" for name, s in r.seconds.items() if name != "read")
    total = sum(r.seconds.values())
    return (f"**Output {r.size[0]}×{r.size[1]}** ({r.bits}-bit PNG) in {total:.2f} s — {stages}.  \n"
            f"Prompt: `{r.prompt}`  \nPeak memory: {r.peak_memory}")


class Callbacks:
    """What the page's buttons call, bound to one `Runner`; raise `gr.Error` for the page to show."""

    def __init__(self, runner: Runner):
        self.runner = runner

    def upscale(self, path, tags, scale, color_fix, prompt, tile, overlap, enc, dec, seed, sample,
                request=None, progress=None):
        """One image -> ((bicubic, OSEDiff) for the slider, the PNG to download, the tags used, the info line)."""
        import gradio as gr

        options = job_options(scale, color_fix, prompt, tags, tile, overlap, enc, dec, seed, sample)
        try:
            r = self.runner.run(upload_path(path), options, _reporter(progress), _session(request))
        except JobError as e:
            raise gr.Error(str(e)) from None
        except Cancelled:
            raise gr.Error("Cancelled.") from None
        return (str(r.before), str(r.output)), str(r.output), r.tags, describe(r)

    def upscale_many(self, paths, scale, color_fix, prompt, tile, overlap, enc, dec, seed, sample,
                     request=None, progress=None):
        """Several files -> (gallery items, the zip, a summary naming the files that failed)."""
        import gradio as gr

        if not paths:
            raise gr.Error("No files: upload one or more images first.")
        options = job_options(scale, color_fix, prompt, "", tile, overlap, enc, dec, seed, sample)
        try:
            results, errors, archive, ignored = self.runner.run_many(
                [upload_path(p) for p in paths], options, _reporter(progress), _session(request))
        except Cancelled:
            raise gr.Error("Cancelled.") from None
        skipped = ""
        if ignored:  # the words of `osediff sr`
            from osediff.core.batch import ignored_line

            line = ignored_line([Path(n) for n in ignored])
            skipped = line[0].upper() + line[1:] + "."
        if not results:
            raise gr.Error(" ".join(errors + [skipped]).strip() or "No images among the files.")
        lines = [f"{len(results)} of {len(paths) - len(ignored)} images upscaled." + (f" {skipped}" if skipped else "")]
        lines += [f"- {e}" for e in errors]
        gallery = [(str(r.output), f"{r.output.name}: {r.tags}") for r in results]
        return gallery, str(archive), "\n".join(lines)

    def cancel(self, request=None) -> None:
        import gradio as gr

        if self.runner.cancel(_session(request)):
            gr.Info("Cancelling: the job stops at its next step.")


def build_app(runner: Runner, *, examples: list[str] | None = None, notice: str = "", max_file_mb: float = 50):
    """The page as a `gr.Blocks`; `launch` it with `max_file_size` (see `osediff.commands.ui`)."""
    import gradio as gr

    cb = Callbacks(runner)

    # Gradio fills `request` and `progress` from these annotations and defaults (evaluated here, where `gr` is
    # imported: this module has no `from __future__ import annotations` for that reason)
    def upscale(path, tags, scale, color_fix, prompt, tile, overlap, enc, dec, seed, sample,
                request: gr.Request, progress=gr.Progress()):
        return cb.upscale(path, tags, scale, color_fix, prompt, tile, overlap, enc, dec, seed, sample,
                          request, progress)

    def upscale_many(paths, scale, color_fix, prompt, tile, overlap, enc, dec, seed, sample,
                     request: gr.Request, progress=gr.Progress()):
        return cb.upscale_many(paths, scale, color_fix, prompt, tile, overlap, enc, dec, seed, sample,
                               request, progress)

    def cancel(request: gr.Request):
        cb.cancel(request)

    def show_developed(value):
        developed = runner.preview(upload_path(value))
        return gr.update(value=None if developed is None else str(developed), visible=developed is not None)

    with gr.Blocks(title="osediff") as app:
        gr.Markdown(INTRO.format(mp=runner.max_megapixels, mb=max_file_mb))
        if notice:
            gr.Markdown(f"**{notice}**", elem_id="notice")
        with gr.Row():
            scale = gr.Slider(1, 8, value=4, step=0.5, label="Scale")
            color_fix = gr.Radio(["adain", "wavelet", "none"], value="adain", label="Colour fix")
            prompt = gr.Textbox(label="Prompt (added after the tags)", elem_id="prompt")
        with gr.Accordion("Advanced", open=False):
            with gr.Row():
                tile = gr.Number(96, label="Latent tile", precision=0, minimum=8)
                overlap = gr.Number(32, label="Latent tile overlap", precision=0, minimum=0)
                enc = gr.Number(1024, label="VAE encoder tile", precision=0, minimum=64)
                dec = gr.Number(224, label="VAE decoder tile", precision=0, minimum=16)
                seed = gr.Number(-1, label="Seed (-1: none)", precision=0)
                sample = gr.Checkbox(False, label="Sample the latent (the reference's behaviour)")
        controls = [scale, color_fix, prompt, tile, overlap, enc, dec, seed, sample]
        with gr.Tab("One image"):
            with gr.Row():
                with gr.Column():
                    image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                     label="Input", elem_id="input-image")
                    developed = gr.Image(label="Developed (your browser cannot show this format itself)",
                                         visible=False, interactive=False, elem_id="developed", format="png")
                    tags = gr.Textbox(label="Tags (empty: DAPE reads them; edit and Upscale again to steer)",
                                      elem_id="tags")
                    with gr.Row():
                        go = gr.Button("Upscale", variant="primary", elem_id="upscale")
                        stop = gr.Button("Cancel", elem_id="cancel")
                with gr.Column():
                    slider = gr.ImageSlider(label="Bicubic | OSEDiff", format="png", type="filepath",
                                            elem_id="result", buttons=["fullscreen"])
                    download = gr.File(label="Download (exact PNG)", elem_id="download")
                    info = gr.Markdown(elem_id="result-info")
            if examples:
                gr.Examples([[e] for e in examples], inputs=[image], label="Examples (RealSR)")
        with gr.Tab("Several images"):
            # any file: what is not a picture is named as ignored, as `osediff sr` does with a folder
            files = gr.File(file_count="multiple", label="Images (any format osediff reads: HEIC, RAW, TIFF...)",
                            elem_id="input-files")
            with gr.Row():
                go_many = gr.Button("Upscale all", variant="primary", elem_id="upscale-all")
                stop_many = gr.Button("Cancel", elem_id="cancel-all")
            gallery = gr.Gallery(label="Results", format="png", columns=4, elem_id="gallery")
            archive = gr.File(label="All results (zip)", elem_id="zip")
            many_info = gr.Markdown(elem_id="many-info")

        image.change(lambda _: "", inputs=[image], outputs=[tags], queue=False)  # a new image: its own tags
        image.change(show_developed, inputs=[image], outputs=[developed], queue=False, preprocess=False)
        # both buttons share one queue of one: a job at a time on the device, later ones see their place
        run = go.click(upscale, inputs=[image, tags, *controls], outputs=[slider, download, tags, info],
                       concurrency_id="device", concurrency_limit=1, preprocess=False)
        stop.click(cancel, None, None, cancels=[run], queue=False)
        run_many = go_many.click(upscale_many, inputs=[files, *controls], outputs=[gallery, archive, many_info],
                                 concurrency_id="device", concurrency_limit=1, preprocess=False)
        stop_many.click(cancel, None, None, cancels=[run_many], queue=False)
    app.queue()
    return app


def upload_path(value) -> str | None:
    """The uploaded file's path from a raw component value (the buttons run with `preprocess=False`, so Gradio
    never opens the upload itself: a broken file reaches our reader and gets our message, not a traceback)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return value.get("path")
    return getattr(value, "path", None)


def _session(request) -> str | None:
    return getattr(request, "session_hash", None)


def _reporter(progress):
    """Runner's `(fraction, label)` reports -> a `gr.Progress` (or nothing)."""
    if progress is None:
        return None
    return lambda fraction, label: progress(fraction, desc=label)


def find_examples(folder: str | Path | None) -> list[str]:
    """Up to six images of `folder` (the RealSR LR set by default, where it exists), sorted by name."""
    from osediff.files.images import is_image_file

    if folder is None:
        return []
    folder = Path(folder)
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if is_image_file(p)][:6]
