"""`ldmkit serve`: a Gradio page over one model. Wiring only; the checks live in `ui/service.py`.

One tab per task the model offers (generate, image to image, inpaint with a mask painted in the browser,
super-resolution, semantic maps), each with sampler, steps, guidance, seed and count controls. Gradio's queue
serves one request at a time, so concurrent users wait their turn instead of sharing the CPU; a refused
request shows its reason as an error message. The server listens on 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .service import TASKS, Limits, PageRequest, RequestError, Service


def _gradio() -> Any:
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # no calls home: these machines are offline
    try:
        import gradio as gr
    except ModuleNotFoundError:
        raise ModuleNotFoundError("the web UI needs Gradio: pip install 'ldmkit[ui]'") from None
    return gr


def build_app(service: Service, *, queue_size: int = 16) -> Any:
    """The gr.Blocks page for `service` (not yet launched)."""
    gr = _gradio()
    title = f"ldmkit: {service.pipe.name}"
    with gr.Blocks(title=title, analytics_enabled=False) as app:
        gr.Markdown(f"# {title}\n{_describe(service)}")
        with gr.Tabs():
            for task in service.tasks:
                with gr.Tab(TASKS[task], id=task, elem_id=f"tab-{task}"), gr.Row():
                    with gr.Column():
                        fields = _inputs(gr, service, task)
                        button = gr.Button("Generate", variant="primary", elem_id=f"{task}-run")
                    with gr.Column():
                        gallery = gr.Gallery(label="Result", format="png", columns=2, elem_id=f"{task}-gallery")
                        info = gr.Textbox(label="Parameters", interactive=False, elem_id=f"{task}-info")
                names = list(fields)
                button.click(_handler(service, task, names), inputs=[fields[k] for k in names],
                             outputs=[gallery, info], api_name=task)
    app.queue(default_concurrency_limit=1, max_size=queue_size)
    return app


def _inputs(gr: Any, service: Service, task: str) -> dict[str, Any]:
    """The widgets of one tab, named as `service.PageRequest`'s fields; element ids are "<task>-<field>"."""
    f: dict[str, Any] = {}
    lim, d = service.limits, service.defaults
    if service.text:
        f["prompt"] = gr.Textbox(label="Prompt", lines=2, elem_id=f"{task}-prompt")
        f["negative_prompt"] = gr.Textbox(label="Negative prompt", elem_id=f"{task}-negative")
    elif service.classes:
        f["class_label"] = gr.Textbox(label=f"Class (0..{service.classes - 1}; empty = unconditional)",
                                      placeholder="e.g. 3", elem_id=f"{task}-class")
    elif service.layout:
        f["layout"] = gr.Textbox(label="Layout: class:x0,y0,x1,y1;... (boxes in [0, 1])",
                                 value="3:0.1,0.1,0.5,0.5", elem_id=f"{task}-layout")
    if task == "img2img":
        f["image"] = gr.Image(label="Image", type="pil", format="png", elem_id=f"{task}-image")
        f["strength"] = gr.Number(label="Strength (0..1]", value=0.6, elem_id=f"{task}-strength")
    elif task == "inpaint":
        # RGBA keeps each brush layer's alpha: the painted pixels are the mask, whatever the brush colour
        brush = gr.Brush(colors=["#ffffff"], color_mode="fixed", default_size=max(2, service.pipe.resolution // 8))
        f["image"] = gr.ImageEditor(label="Image: paint the region to fill", type="pil", format="png",
                                    image_mode="RGBA", sources=["upload"], brush=brush, layers=False,
                                    transforms=(), elem_id=f"{task}-editor")
    elif task == "upscale":
        f["lowres"] = gr.Image(label="Low-resolution image", type="pil", format="png", elem_id=f"{task}-lowres")
    elif task == "segmap":
        f["segmap"] = gr.Image(label="Semantic map (PNG of class indices)", type="pil", image_mode=None,
                               format="png", elem_id=f"{task}-segmap")
    with gr.Row():
        f["sampler"] = gr.Dropdown(service.samplers, value=service.samplers[0], label="Sampler",
                                   elem_id=f"{task}-sampler")
        f["steps"] = gr.Number(label=f"Steps (1..{lim.max_steps})", value=d["steps"], precision=0,
                               elem_id=f"{task}-steps")
        f["guidance"] = gr.Number(label="Guidance", value=d["guidance"], elem_id=f"{task}-guidance")
    with gr.Row():
        # no minimum / maximum on the widgets: the server's checks answer out-of-range values in words
        f["seed"] = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, elem_id=f"{task}-seed")
        f["n"] = gr.Number(label=f"Images (1..{lim.max_images})", value=1, precision=0, elem_id=f"{task}-n")
        if task == "generate":
            f["size"] = gr.Number(label=f"Size (px, multiple of {service.multiple})", value=d["size"], precision=0,
                                  elem_id=f"{task}-size")
    return f


def _handler(service: Service, task: str, names: list[str]) -> Any:
    gr = _gradio()

    def run(*values: Any, progress: Any = gr.Progress()) -> tuple[list[Any], str]:  # noqa: B008 (Gradio's API)
        req = PageRequest(task=task, **dict(zip(names, values, strict=True)))
        try:
            out, info = service.run(req, progress=lambda i, total: progress((i, total), unit="steps"))
        except RequestError as e:
            raise gr.Error(str(e)) from None
        return [(im, f"seed {s}") for im, s in zip(out.images, out.seeds, strict=True)], info

    return run


def _describe(service: Service) -> str:
    p = service.pipe
    cond = {"class": f"class-conditional ({p.n_classes} classes)", "none": "unconditional"}.get(
        p.conditioning, f"conditioned on {p.conditioning!r}")
    return (f"A latent diffusion model, {cond}, {p.resolution} px. Limits per request: "
            f"{service.limits.max_steps} steps, {service.limits.max_size} px, {service.limits.max_images} images.")


def serve(checkpoint: str | Path, *, host: str = "127.0.0.1", port: int = 7860, limits: Limits | None = None,
          device: str | None = None, tokenizer: str | None = None, queue_size: int = 16) -> None:
    """Load `checkpoint` and serve its page until interrupted."""
    from ..pipeline import LatentDiffusionPipeline

    pipe = LatentDiffusionPipeline.from_checkpoint(checkpoint, device=device, tokenizer=tokenizer)
    app = build_app(Service(pipe, limits), queue_size=queue_size)
    print(f"ldmkit: serving {pipe.name} on http://{host}:{port} (Ctrl+C stops)", flush=True)
    app.launch(server_name=host, server_port=port, show_error=True, quiet=True, ssr_mode=False)
