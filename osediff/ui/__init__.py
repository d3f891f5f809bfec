"""The web page front-end (`osediff ui`, Gradio): upload, Upscale, compare, steer with the tags, download.

`jobs`: one upscale job on the loaded pipeline (checks, tags, stages, the exact PNG), without Gradio; `app`: the
page, a thin layer of callbacks over `jobs`. Gradio is an optional dependency (`osediff[ui]`), imported only
when the page is built.
"""
