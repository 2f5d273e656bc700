"""The Gradio demo: attack a live input and see what every served defense says about it, over REST.

``Demo`` is the whole logic as plain methods (inputs in, results out, no Gradio): the gallery of
test images, turning uploads and drawings into the model's input, and ``attack``, which asks every
served endpoint about the clean image, attacks the chosen endpoint, asks them all again about the
adversarial PNG and renders the comparison. ``build_app`` lays Gradio components over it and turns
every refusal (bad input, TorchServe down) into a message in the page. ``robustserve demo`` runs it.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import torch
from PIL import Image

from serving.client import Client
from serving.served_models import SERVED_MODELS
from serving.server import ServerSettings, read_config, read_keys
from training.data import DEFAULT_DATASET, load_dataset
from training.errors import ConfigError, RobustServeError
from training.recipes import ServingMode
from training.runs import read_defense_json

from .attacks import (
    ATTACK_SPECS,
    MAX_EPS,
    MAX_STEPS,
    SQUARE_QUERIES,
    AttackError,
    RestScores,
    amplified,
    attack_surface,
    check_settings,
    grid_eps,
    perturbation_norms,
    square,
    to_png,
    white_box,
)
from .inputs import MAX_SIDE, MAX_UPLOAD_BYTES, InputError, ModelInput, convert_drawing, convert_file
from .rest import Answer, Endpoint, ask_all, comparison_html, neighbours, served_endpoints, verdict

GALLERY_SIZE = 12
DEFAULT_ATTACK = "PGD"
DEFAULT_TARGET = "dhat · both"
Progress = Callable[[int, int | None], None]  # (calls so far, expected calls or None)


def default_run_dirs(runs_root: Path, preset: str = "quick") -> dict[str, Path]:
    """Recipe -> its run folder as ``robustserve run`` names it (``runs/<recipe>-<preset>-fashion_mnist-smallcnn``)."""
    from training.runs import preset_run_dir

    return {model.recipe: preset_run_dir(model.recipe, preset, runs_root) for model in SERVED_MODELS.values()}


@dataclass(frozen=True)
class StateDirClient:
    """Clients of the TorchServe started from ``state_dir``: its inference address from config.properties and
    its inference key from key_file.json, read at every call because a restarted server has new keys."""

    state_dir: Path

    def __call__(self) -> Client:
        settings = ServerSettings(state_dir=self.state_dir)
        address = read_config(settings).get("inference_address", settings.inference_address)
        return Client(address, token=read_keys(settings)["inference"])


def state_dir_client(state_dir: Path) -> StateDirClient:
    """What ``Demo`` connects with to the TorchServe of ``state_dir`` (the demo then asks only what it serves)."""
    return StateDirClient(Path(state_dir))


def gallery_indices(labels: torch.Tensor, n: int) -> list[int]:
    """The first test image of every class, then the second of every class, ...: ``n`` images, all classes."""
    seen: Counter[int] = Counter()
    keys = []
    for index, label in enumerate(labels.tolist()):
        keys.append((seen[label], label, index))
        seen[label] += 1
    return [index for *_, index in sorted(keys)[:n]]


@dataclass
class AttackResult:
    clean_png: bytes  # exactly what was sent over REST, and what the page shows
    adversarial_png: bytes
    perturbation: np.ndarray  # uint8 [H, W], amplified
    summary: str  # Markdown
    table: str  # HTML
    neighbours_clean: list[tuple[np.ndarray, str]]
    neighbours_adversarial: list[tuple[np.ndarray, str]]
    clean: list[Answer]
    adversarial: list[Answer]


class Demo:
    """The demo's logic against one TorchServe (``connect``) and the runs it serves (``run_dirs``: recipe -> folder)."""

    def __init__(self, connect: Callable[[], Client], run_dirs: Mapping[str, Path], *,
                 data_root: str | Path | None = None, gallery_size: int = GALLERY_SIZE) -> None:
        self.connect = connect
        self.run_dirs = {recipe: Path(folder) for recipe, folder in run_dirs.items()}
        # What the server loaded, in the modes it serves: asking for anything else only fills its log with 404s.
        self.endpoints = served_endpoints(connect.state_dir if isinstance(connect, StateDirClient) else None)
        runs = [folder for folder in self.run_dirs.values() if (folder / "defense.json").is_file()]
        info = read_defense_json(runs[0]) if runs else {"dataset": DEFAULT_DATASET, "config": {}}
        self.dataset = info["dataset"]
        self.data_root = data_root or info["config"].get("data_root")
        test, spec = load_dataset(self.dataset, "test", root=self.data_root)
        if spec.input_shape[0] != 1:
            raise ConfigError(f"the demo converts inputs to gray; {self.dataset} has {spec.input_shape[0]} channels")
        self.class_names = spec.class_names
        self.size = (spec.input_shape[2], spec.input_shape[1])  # PIL's (width, height)
        picks = gallery_indices(test.labels, gallery_size)
        self.gallery = [(test.images[i, 0].numpy(), self.class_names[int(test.labels[i])]) for i in picks]
        self._modes: dict[str, dict[str, ServingMode]] = {}
        self.workdir = Path(tempfile.mkdtemp(prefix="robustserve-demo-"))  # the PNGs the page serves

    # -- inputs ---------------------------------------------------------------------------------

    def gallery_input(self, index: int) -> ModelInput:
        pixels, name = self.gallery[index]
        return ModelInput(pixels, [(Image.fromarray(pixels), f"test image: {name}, already the model's input")],
                          label=name)

    def upload_input(self, path: str | Path | None) -> ModelInput:
        if path is None:
            raise InputError("no file was uploaded")
        return convert_file(path, self.size)

    def drawing_input(self, sketch: dict[str, Any] | None) -> ModelInput:
        return convert_drawing(sketch, self.size)

    @cached_property
    def train_images(self) -> np.ndarray:
        """The training split's pixels [N, H, W]: a kNN reply's neighbour ids index it."""
        train, _ = load_dataset(self.dataset, "train", root=self.data_root)
        return train.images[:, 0].numpy()

    # -- attack ---------------------------------------------------------------------------------

    def endpoint(self, label: str) -> Endpoint:
        try:
            return next(e for e in self.endpoints if e.label == label)
        except StopIteration:
            raise AttackError(f"unknown target {label!r}") from None

    def mode(self, endpoint: Endpoint) -> ServingMode:
        """The endpoint's serving mode rebuilt from its run folder (loaded once per run)."""
        from training.runs import load_run

        if endpoint.recipe not in self._modes:
            folder = self.run_dirs.get(endpoint.recipe)
            if folder is None or not (folder / "defense.json").is_file():
                raise ConfigError(f"white-box attacks on {endpoint.model} need its run folder ({folder}); train it "
                                  f"(robustserve train {endpoint.recipe}) or point --runs at it, or pick Square")
            self._modes[endpoint.recipe] = load_run(folder).modes()
        return self._modes[endpoint.recipe][endpoint.mode]

    def attack(self, source: ModelInput, attack: str, target: str, eps: float, steps: int,
               progress: Progress = lambda calls, total: None) -> AttackResult:
        """Attack ``target`` (an endpoint label) on ``source`` and compare every endpoint's replies."""
        if attack not in ATTACK_SPECS:
            raise AttackError(f"unknown attack {attack!r}; pick one of {', '.join(ATTACK_SPECS)}")
        spec, endpoint = ATTACK_SPECS[attack], self.endpoint(target)
        check_settings(eps, steps)
        eps_grid = grid_eps(eps)
        client = self.connect()
        x = torch.from_numpy(source.unit)[None]
        clean_png = to_png(x[0])
        clean = ask_all(client, clean_png, self.endpoints)
        attacked = next((a for a in clean if a.endpoint == endpoint), None)
        if attacked is None or attacked.reply is None:
            raise RobustServeError(f"{endpoint.label} did not answer for the clean image: "
                                   f"{attacked.error if attacked else 'the model is not served'}")
        label = attacked.reply["prediction"]["index"]

        def track(calls: int) -> None:
            progress(calls, spec.expected_calls(steps))

        if spec.black_box:
            scores = RestScores(lambda png, top_k: client.predict(png, model=endpoint.model, top_k=top_k,
                                                                  **endpoint.options), label, on_call=track)
            x_adv = square(scores, x, eps=eps_grid)
            how = (f"black-box: {scores.queries} REST queries to {endpoint.label} (at most {SQUARE_QUERIES}), "
                   f"no weights, no gradient")
        else:
            surface = attack_surface(self.mode(endpoint))
            x_adv = white_box(spec, surface.module, x, torch.tensor([label]), eps=eps_grid, steps=steps, on_call=track)
            how = (f"white-box on the weights in `{self.run_dirs[endpoint.recipe]}`; attacked surface "
                   f"`{surface.name}`: {surface.description}")
        adversarial_png = to_png(x_adv[0])
        adversarial = ask_all(client, adversarial_png, self.endpoints)
        after = next(a for a in adversarial if a.endpoint == endpoint)
        perturbation, gain = amplified(x, x_adv)
        setting = (f"**{spec.label}** ({spec.about}) against **{endpoint.label}**, eps = {round(eps_grid * 255)}/255 "
                   f"= {eps_grid:.4f} (the {eps:g} asked for, on whole 8-bit levels)"
                   + (f", {steps} steps" if spec.takes_steps else "") + f"; {how}.")
        truth = self.class_names.index(source.label) if source.label in self.class_names else None
        summary = "\n\n".join([setting, _verdict(endpoint, attacked, after, truth, self.class_names),
                                _norms(perturbation_norms(x, x_adv), gain), self.measured(endpoint)])
        return AttackResult(clean_png, adversarial_png, perturbation, summary,
                            comparison_html(clean, adversarial, endpoint, truth), self._neighbours(clean),
                            self._neighbours(adversarial), clean, adversarial)

    def measured(self, endpoint: Endpoint) -> str:
        """What the evaluation of the endpoint's run measured, with intervals: one image says little."""
        from training.evaluate import measured_robustness
        from training.runs import REPORT_JSON

        report = self.run_dirs.get(endpoint.recipe, Path("-")) / REPORT_JSON
        if not report.is_file():
            return f"{endpoint.label} has no evaluation report (`robustserve eval` writes one)."
        return (f"Measured on the test set for {endpoint.label} (`{report}`): "
                f"{measured_robustness(json.loads(report.read_text()), endpoint.mode)}.")

    def _neighbours(self, answers: list[Answer]) -> list[tuple[np.ndarray, str]]:
        """The kNN endpoint's nearest training images, when it is served and answered."""
        knn = next((a.reply for a in answers if a.reply and "neighbours" in a.reply), None)
        return neighbours(knn, self.train_images) if knn else []

    def save_png(self, data: bytes) -> str:
        """A file the page serves byte for byte (a path makes Gradio copy the file, not re-encode pixels)."""
        path = self.workdir / f"{hashlib.sha256(data).hexdigest()[:20]}.png"
        path.write_bytes(data)
        return str(path)


def _verdict(endpoint: Endpoint, before: Answer, after: Answer, truth: int | None, class_names: list[str]) -> str:
    was = before.reply["prediction"]["name"]  # type: ignore[index]
    now = after.reply["prediction"]["name"] if after.reply else f"(refused: {after.error})"
    said = verdict(before, after, truth)
    judged = (f"the image's true class is **{class_names[truth]}**" if truth is not None else
              "an upload or a drawing has no known true class, so only whether the answer changed is said")
    return (f"{endpoint.label} said **{was}** for the clean image (the attack pushes away from it) and says "
            f"**{now}** for the adversarial one" + (f": **{said}** ({judged})." if said else "."))


def _norms(norms: dict[str, float], gain: float) -> str:
    return (f"Perturbation: L∞ = {norms['linf']:.4f} ({round(norms['linf'] * 255)}/255), L2 = {norms['l2']:.3f}, "
            f"mean |δ| = {norms['mean_abs']:.4f}, {norms['changed']:.0%} of the pixels changed; shown ×{gain:.1f} "
            f"around mid-gray.")


# ---------------------------------------------------------------------------------------------- page

INTRO = """# robustserve: adversarial examples against the served defenses

An **adversarial example** is an input changed by a few gray levels per pixel, too little for a person
to see a difference, but chosen so that a classifier changes its answer. Pick an image (a test image,
an upload or a drawing), an attack and a budget **eps** (the largest change per pixel, on a 0-1 scale),
and the defense to attack. White-box attacks use the defense's own weights and its inference-time step;
**Square** only sends images to the REST API and reads the replies, like an outside attacker.

The table then shows what **every** served model and mode answers over REST for the clean and the
adversarial image. Adversarially trained models (pgd_at, trades, ...) have nothing at inference; the
defenses add a step there, and a signal: **DH-AT** `both` aggregates two heads and flags when they
disagree, **DUCAT** routes attacked inputs into dummy classes and maps them back (a *dummy-class hit*),
**THAT**'s kNN mode votes with the nearest training images (how many of them agree).
"""

CSS = """
#clean img, #adversarial img, #perturbation img, #steps img, .pixelated img { image-rendering: pixelated; }
/* 28x28 pictures: fill their frame instead of showing at their natural size */
#clean img, #adversarial img, #perturbation img {
  width: 100% !important; height: 100% !important; object-fit: contain; }
#comparison-table { border-collapse: collapse; width: 100%; font-size: 14px; }
#comparison-table th, #comparison-table td { padding: 4px 8px; border-bottom: 1px solid #ddd; vertical-align: top;
  text-align: left; }
#comparison-table .prediction { font-weight: 600; }
#comparison-table .bar { position: relative; height: 18px; background: #eee; margin: 2px 0; min-width: 200px; }
#comparison-table .bar span { position: absolute; left: 0; top: 0; bottom: 0; background: #9cc0ee; }
#comparison-table .bar label { position: relative; padding-left: 4px; font-size: 12px; }
#comparison-table .signal { font-size: 12px; color: #555; }
#comparison-table .refused { color: #b00; }
#comparison-table tr.attacked { background: #fff6e0; }
#comparison-table td.fooled, #comparison-table td.changed { color: #b00; font-weight: 600; }
#comparison-table td.held, #comparison-table td.unchanged { color: #070; font-weight: 600; }
"""


def build_app(demo: Demo) -> gr.Blocks:
    """The page over ``demo``; every refusal becomes a message in ``#status``, never a stack trace."""
    def message(err: Exception) -> str:
        return f"**Could not do that:** {err}"

    def chosen(make: Callable[..., ModelInput], *args: Any) -> tuple[Any, ...]:
        try:
            model_input = make(*args)
        except RobustServeError as err:
            return gr.skip(), gr.skip(), message(err)
        label = f" (test image: {model_input.label})" if model_input.label else ""
        return model_input, model_input.steps, f"Input ready{label}. Pick an attack and press **Attack**."

    def on_gallery(event: gr.SelectData) -> tuple[Any, ...]:
        return chosen(demo.gallery_input, event.index)

    def on_attack(source: ModelInput, attack: str, target: str, eps: float, steps: float,
                  progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008 (Gradio's progress idiom)
        def report(calls: int, total: int | None) -> None:
            unit = "queries" if ATTACK_SPECS[attack].black_box else "gradient steps"
            progress((calls, total), desc=f"{attack} on {target}", unit=unit)

        try:
            result = demo.attack(source, attack, target, float(eps), int(steps), report)
        except RobustServeError as err:
            return None, None, None, "", "", [], [], message(err)
        return (demo.save_png(result.clean_png), demo.save_png(result.adversarial_png), result.perturbation,
                result.summary, result.table, result.neighbours_clean, result.neighbours_adversarial, "Done.")

    first = demo.gallery_input(0)
    with gr.Blocks(title="robustserve demo", analytics_enabled=False) as app:
        gr.Markdown(INTRO)
        source = gr.State(first)
        with gr.Row():
            with gr.Column(scale=3):
                with gr.Tab("Test images"):
                    gallery = gr.Gallery([(pixels, name) for pixels, name in demo.gallery], elem_id="gallery",
                                         columns=6, allow_preview=False, format="png", show_label=False,
                                         elem_classes="pixelated", height="auto")
                with gr.Tab("Upload"):
                    upload = gr.File(label=f"any image Pillow reads, up to {MAX_UPLOAD_BYTES // 2**20} MB and "
                                           f"{MAX_SIDE}x{MAX_SIDE}", file_types=["image"], type="filepath")
                with gr.Tab("Draw"):
                    sketch = gr.Sketchpad(label="pick the brush on the left, draw dark on white", elem_id="sketch",
                                          type="numpy", canvas_size=(280, 280), format="png", layers=False,
                                          brush=gr.Brush(default_size=18, colors=["#000000"], color_mode="fixed"))
                    use_sketch = gr.Button("Use the drawing")
            with gr.Column(scale=2):
                steps_view = gr.Gallery(first.steps, label="the model's input, step by step", elem_id="steps",
                                        columns=3, allow_preview=False, format="png", height="auto",
                                        object_fit="contain")
        with gr.Row():
            attack = gr.Dropdown(list(ATTACK_SPECS), value=DEFAULT_ATTACK, label="attack", elem_id="attack")
            target = gr.Dropdown([e.label for e in demo.endpoints], value=DEFAULT_TARGET,
                                 label="defense · mode to attack", elem_id="target")
            eps = gr.Slider(0, MAX_EPS, value=0.1, step=1 / 255, label="eps (largest change per pixel)")
            steps = gr.Slider(1, MAX_STEPS, value=10, step=1, label="steps (PGD, DRA)")
            run = gr.Button("Attack", variant="primary", elem_id="attack-button")
        status = gr.Markdown("Pick an input, or attack the first test image.", elem_id="status")
        with gr.Row():
            clean_view = gr.Image(label="clean (as sent over REST)", type="filepath", format="png",
                                  elem_id="clean", interactive=False, height=224)
            adversarial_view = gr.Image(label="adversarial (as sent over REST)", type="filepath", format="png",
                                        elem_id="adversarial", interactive=False, height=224)
            perturbation_view = gr.Image(label="perturbation, amplified", format="png", elem_id="perturbation",
                                         interactive=False, height=224)
        summary = gr.Markdown(elem_id="summary")
        table = gr.HTML(elem_id="comparison")
        with gr.Row():
            neighbours_clean = gr.Gallery(label="that_knn: nearest training images of the clean image", columns=4,
                                          format="png", allow_preview=False, elem_classes="pixelated", height=300)
            neighbours_adversarial = gr.Gallery(label="that_knn: nearest training images of the adversarial image",
                                                columns=4, format="png", allow_preview=False,
                                                elem_classes="pixelated", height=300)

        picked = [source, steps_view, status]
        gallery.select(on_gallery, None, picked)
        upload.upload(lambda path: chosen(demo.upload_input, path), upload, picked)
        use_sketch.click(lambda value: chosen(demo.drawing_input, value), sketch, picked)
        run.click(on_attack, [source, attack, target, eps, steps],
                  [clean_view, adversarial_view, perturbation_view, summary, table, neighbours_clean,
                   neighbours_adversarial, status])
    return app


def launch(demo: Demo, *, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> gr.Blocks:
    """Serve the page; ``block=False`` returns the running app (in a background thread) for ``close()``."""
    app = build_app(demo)
    # One attack at a time: each one is a burst of CPU work and a few hundred REST calls.
    app.queue(default_concurrency_limit=1)
    app.launch(server_name=host, server_port=port, prevent_thread_lock=not block, css=CSS,
               max_file_size=MAX_UPLOAD_BYTES, quiet=not block)
    return app
