"""The classroom demo: an ipywidgets app around :class:`gres.predict.Predictor`.

Pick an image of a dataset split (or upload one), type an expression, and see what ReLA answers:
the mask over the image, the minimap (the probability that each of the R x R regions holds a
target), the region masks of the most probable regions (paper Fig. 7) and the no-target
probability. Both decision rules can be switched from the official argmax to a threshold.

Live in JupyterLab::

    from gres.widgets import make_demo
    demo = make_demo(predictor, dataset)     # dataset: a GRESDataset split (optional)
    demo                                      # last expression of a cell displays the app

Every callback is an ordinary method (``select_image``, ``load_upload``, ``predict``, ...), and the
widgets call them through ``observe``; tests drive the app headless by setting widget values.
Errors (an unreadable upload, an empty expression) are shown in the app's status line and kept in
``demo.state.error``; they never raise out of a callback.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import html
import io
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import numpy as np

from gres import viz
from gres.predict import Prediction, Predictor, load_image

EXPR_KINDS = ("single", "multi", "no-target")  # expr_type 0, 1, 2 (data contract)
ERROR_COLOR = "#D55E00"  # Okabe-Ito vermillion


@dataclass
class DemoState:
    """What the app currently shows.

    Attributes:
        image: ``(H, W, 3)`` uint8 image at its original resolution, or None.
        source: where it came from: ``"dataset:<image_id>"``, ``"upload:<file name>"``,
            ``"array"``.
        image_id: dataset image id (None for uploads).
        expression: the last segmented expression.
        prediction: the last :class:`Prediction` (None before the first one or after an error).
        gt_mask: ``(S, S)`` bool ground truth when the expression is one of the dataset's
            expressions for this image, else None.
        gt_no_target: its no-target label (None when unknown).
        error: the last error message (None when the last action succeeded).
        num_predictions: forward passes run so far (tests use it to see a callback ran).
    """

    image: np.ndarray | None = None
    source: str = ""
    image_id: int | None = None
    expression: str = ""
    prediction: Prediction | None = None
    gt_mask: np.ndarray | None = None
    gt_no_target: bool | None = None
    error: str | None = None
    num_predictions: int = 0


def decode_upload(content: bytes | memoryview, name: str = "upload") -> np.ndarray:
    """Decode uploaded file bytes into an ``(H, W, 3)`` uint8 RGB image.

    Raises:
        ValueError: the bytes are not an image PIL can read (the message names the file).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    data = bytes(content)
    if not data:
        raise ValueError(f"upload {name!r} is empty")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im)
            im.load()
            return load_image(im)
    except UnidentifiedImageError as exc:
        raise ValueError(f"upload {name!r} is not a readable image (unknown file format)") from exc
    except (OSError, SyntaxError) as exc:
        raise ValueError(f"upload {name!r} is not a readable image ({exc})") from exc


def _upload_entries(value: Any) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of a FileUpload value (ipywidgets 8 tuple of dicts, or 7's dict)."""
    if not value:
        return []
    if isinstance(value, dict):  # ipywidgets 7: {name: {"metadata": {...}, "content": bytes}}
        return [(str(k), bytes(v["content"])) for k, v in value.items()]
    return [(str(v.get("name", "upload")), bytes(v["content"])) for v in value]


class GRESDemo:
    """The interactive demo (an ipywidgets ``VBox`` is ``demo.ui``; the demo displays as it).

    Args:
        predictor: a :class:`Predictor` (its ``nt_threshold`` / ``mask_threshold`` are set by the
            sliders).
        dataset: optional :class:`gres.data.dataset.GRESDataset` (one sample per expression); its
            images fill the image picker and its expressions the examples list.
        top_k: region masks shown (the most probable regions by minimap score).
        max_images: at most this many dataset images in the picker.
        autorun: segment the first dataset expression of the first image at construction.
    """

    def __init__(
        self,
        predictor: Predictor,
        dataset: Any = None,
        *,
        top_k: int = 4,
        max_images: int = 200,
        autorun: bool = True,
    ) -> None:
        import ipywidgets as w

        if not isinstance(predictor, Predictor):
            raise ValueError(
                f"GRESDemo needs a gres.predict.Predictor, got {type(predictor).__name__}")
        self.predictor = predictor
        self.dataset = dataset
        self.state = DemoState()
        self.figures: dict[str, Any] = {}
        self._quiet = False
        self._images = self._index_dataset(dataset, max_images)
        num_regions = predictor.cfg.decoder.region_grid ** 2

        image_options = [("(uploaded / none)", None)] + [
            (f"{meta['file_name']} ({len(idx)} expressions)", iid)
            for iid, (meta, idx) in self._images.items()
        ]
        self.image_picker = w.Dropdown(options=image_options, value=None, description="image",
                                       layout=w.Layout(width="420px"))
        self.upload = w.FileUpload(accept="image/*", multiple=False, description="upload image")
        self.examples = w.Dropdown(options=[("(expressions of this image)", None)], value=None,
                                   description="examples", layout=w.Layout(width="420px"))
        self.text = w.Text(value="", placeholder="type an expression and press Enter",
                           description="expression", continuous_update=False,
                           layout=w.Layout(width="420px"))
        self.run_button = w.Button(description="Segment", button_style="primary", icon="play")
        self.nt_official = w.Checkbox(value=predictor.nt_threshold is None,
                                      description="no-target: official argmax rule", indent=False)
        self.nt_threshold = w.FloatSlider(
            value=0.5 if predictor.nt_threshold is None else predictor.nt_threshold, min=0.0,
            max=1.0, step=0.01, description="P(no target) ≥", readout_format=".2f",
            disabled=predictor.nt_threshold is None, continuous_update=False,
            style={"description_width": "initial"})
        self.mask_official = w.Checkbox(value=predictor.mask_threshold is None,
                                        description="mask: official argmax rule", indent=False)
        self.mask_threshold = w.FloatSlider(
            value=0.5 if predictor.mask_threshold is None else predictor.mask_threshold, min=0.0,
            max=1.0, step=0.01, description="P(target) ≥", readout_format=".2f",
            disabled=predictor.mask_threshold is None, continuous_update=False,
            style={"description_width": "initial"})
        self.top_k = w.IntSlider(value=min(top_k, num_regions), min=1, max=min(16, num_regions),
                                 description="regions shown", continuous_update=False,
                                 style={"description_width": "initial"})
        self.nt_label = w.HTML(value="")
        self.status = w.HTML(value="")
        self.out_prediction = w.Output()
        self.out_regions = w.Output()

        self.image_picker.observe(self._on_image, names="value")
        self.upload.observe(self._on_upload, names="value")
        self.examples.observe(self._on_example, names="value")
        self.text.observe(self._on_text, names="value")
        self.run_button.on_click(self._on_run)
        for widget in (self.nt_official, self.nt_threshold, self.mask_official,
                       self.mask_threshold):
            widget.observe(self._on_rule, names="value")
        self.top_k.observe(self._on_top_k, names="value")

        controls = w.VBox([
            w.HBox([self.image_picker, self.upload]),
            self.examples,
            w.HBox([self.text, self.run_button]),
            w.HBox([self.nt_official, self.nt_threshold]),
            w.HBox([self.mask_official, self.mask_threshold]),
            self.top_k,
        ])
        self.ui = w.VBox([controls, self.status, self.nt_label, self.out_prediction,
                          self.out_regions])
        if autorun and self._images:
            first = next(iter(self._images))
            self.image_picker.value = first  # loads the image (observer)
            _, idx = self._images[first]
            self.examples.value = idx[0]  # fills the expression and segments it

    # ----------------------------------------------------------------------------- display --
    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.ui._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:
        return (f"GRESDemo(image={self.state.source or None!r}, "
                f"expression={self.state.expression!r}, images={len(self._images)})")

    # ----------------------------------------------------------------------------- dataset --
    @staticmethod
    def _index_dataset(dataset: Any, max_images: int) -> dict[int, tuple[dict, list[int]]]:
        """``image_id -> (meta of its first sample, sample indices)`` in dataset order."""
        out: dict[int, tuple[dict, list[int]]] = {}
        if dataset is None:
            return out
        if not hasattr(dataset, "meta"):
            raise ValueError("dataset must be a GRESDataset (needs .meta(index) and [index])")
        for i in range(len(dataset)):
            meta = dataset.meta(i)
            iid = int(meta["image_id"])
            if iid not in out:
                if len(out) >= max_images:
                    continue
                out[iid] = (meta, [])
            out[iid][1].append(i)
        return out

    def _dataset_image(self, image_id: int) -> np.ndarray:
        """The original image file of a dataset image (the resized sample image as fallback)."""
        meta, idx = self._images[image_id]
        root = getattr(self.dataset, "root", None)
        if root is not None:
            path = root / "images" / "train2014" / meta["file_name"]
            if path.is_file():
                return load_image(path)
        return load_image(self.dataset[idx[0]]["image"])

    def _ground_truth(self, expression: str) -> tuple[np.ndarray | None, bool | None]:
        """GT of ``expression`` if it is a dataset expression of the current image."""
        if self.state.image_id is None or self.dataset is None:
            return None, None
        key = " ".join(expression.lower().split())
        for i in self._images[self.state.image_id][1]:
            if " ".join(self.dataset.meta(i)["sentence"].lower().split()) == key:
                sample = self.dataset[i]
                return np.asarray(sample["gt_mask"], dtype=bool), bool(sample["no_target"])
        return None, None

    # ------------------------------------------------------------------------------ actions --
    def set_image(self, image: Any, source: str = "array", image_id: int | None = None) -> None:
        """Show a new image (path, PIL, array or tensor) and re-segment the current expression."""
        rgb = load_image(image)
        self.predictor.set_image(rgb)
        self.state.image, self.state.source, self.state.image_id = rgb, source, image_id
        self.state.prediction = None
        self._set_examples(image_id)
        if self.text.value.strip():
            self.predict(self.text.value)
        else:
            self._clear_outputs()
            self._ok(f"image: {html.escape(source)} — type an expression")

    def select_image(self, image_id: int) -> None:
        """Show a dataset image (by image id)."""
        if image_id not in self._images:
            raise ValueError(f"image id {image_id} is not in the demo's dataset")
        self.set_image(self._dataset_image(image_id), source=f"dataset:{image_id}",
                       image_id=image_id)

    def load_upload(self, value: Any) -> None:
        """Show an uploaded image (a ``FileUpload.value``)."""
        entries = _upload_entries(value)
        if not entries:
            return
        name, content = entries[-1]
        rgb = decode_upload(content, name)
        with self._silenced():
            self.image_picker.value = None
        self.set_image(rgb, source=f"upload:{name}")

    def use_sample(self, index: int) -> Prediction | None:
        """Select a dataset sample: its image and its expression, then segment it."""
        if self.dataset is None:
            raise ValueError("the demo has no dataset")
        if not 0 <= index < len(self.dataset):
            raise ValueError(f"sample index {index} out of range 0..{len(self.dataset) - 1}")
        iid = int(self.dataset.meta(index)["image_id"])
        if iid not in self._images:
            raise ValueError(f"sample {index} (image {iid}) is beyond the demo's max_images")
        with self._silenced():
            self.image_picker.value = iid
            self.text.value = self.dataset.meta(index)["sentence"]
        self.select_image(iid)
        with self._silenced():
            self.examples.value = index
        return self.state.prediction

    def predict(self, expression: str | None = None) -> Prediction | None:
        """Segment ``expression`` (default: the text box) on the current image and redraw."""
        expression = self.text.value if expression is None else expression
        if not expression or not expression.strip():
            raise ValueError("type an expression first")
        if self.state.image is None:
            raise ValueError("no image: pick a dataset image or upload one")
        self._apply_rules()
        pred = self.predictor.predict(expression.strip())
        self.state.expression = expression.strip()
        self.state.prediction = pred
        self.state.num_predictions += 1
        self.state.gt_mask, self.state.gt_no_target = self._ground_truth(expression)
        self.render()
        self._ok(f"image: {html.escape(self.state.source)}")
        return pred

    # ------------------------------------------------------------------------------ drawing --
    def figures_for_state(self) -> tuple[Any, Any]:
        """New figures for the current prediction: (overlay + minimap, top-k region masks)."""
        pred, s = self.state.prediction, self.state
        if pred is None or s.image is None:
            raise ValueError("nothing to draw yet: segment an expression first")
        main = viz.plot_prediction(
            s.image, pred.mask, pred.minimap, title=f"“{pred.expression}”", gt_mask=s.gt_mask,
            gt_no_target=s.gt_no_target, pred_no_target=pred.no_target, nt_prob=pred.nt_prob,
        )
        k = int(self.top_k.value)
        regions = viz.plot_region_masks(pred.region_masks, region_probs=pred.minimap.reshape(-1),
                                        k=k, logits=False, image=s.image, ncols=min(5, k + 1))
        return main, regions

    def render(self) -> None:
        """Redraw the outputs and the no-target label from ``state.prediction``."""
        import matplotlib.pyplot as plt

        main, regions = self.figures_for_state()
        self.figures = {"prediction": main, "regions": regions}
        for out, fig in ((self.out_prediction, main), (self.out_regions, regions)):
            out.outputs = ()
            out.append_display_data(fig)
            plt.close(fig)  # shown through the Output only, never again by the inline backend
        self.nt_label.value = self.nt_text()

    def nt_text(self) -> str:
        """The no-target line: decision, probability and the rule used (HTML)."""
        pred = self.state.prediction
        if pred is None:
            return ""
        rule = ("official argmax rule" if self.predictor.nt_threshold is None
                else f"threshold {self.predictor.nt_threshold:.2f}")
        verdict = "NO TARGET" if pred.no_target else "target found"
        color = viz.PRED_COLOR if not pred.no_target else ERROR_COLOR
        gt = ""
        if self.state.gt_no_target is not None:
            gt = f" · ground truth: {'no target' if self.state.gt_no_target else 'target'}"
        return (f"<b style='color:{color}'>{verdict}</b> · P(no target) = {pred.nt_prob:.3f} "
                f"({rule}){gt}")

    def _clear_outputs(self) -> None:
        self.out_prediction.outputs = ()
        self.out_regions.outputs = ()
        self.nt_label.value = ""
        self.figures = {}

    def _ok(self, message: str) -> None:
        self.state.error = None
        self.status.value = f"<span>{message}</span>"

    def _fail(self, exc: BaseException) -> None:
        self.state.error = str(exc)
        self.status.value = (f"<b style='color:{ERROR_COLOR}'>error:</b> "
                             f"<span style='color:{ERROR_COLOR}'>{html.escape(str(exc))}</span>")

    # ---------------------------------------------------------------------------- callbacks --
    def _safe(self, fn: Callable[[], Any]) -> None:
        """Run a callback; show any error in the status line instead of raising."""
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 -- a widget callback must not die silently
            self._fail(exc)

    @contextlib.contextmanager
    def _silenced(self) -> Iterator[None]:
        """Change widgets programmatically without running their observers."""
        old, self._quiet = self._quiet, True
        try:
            yield
        finally:
            self._quiet = old

    def _set_examples(self, image_id: int | None) -> None:
        options: list[tuple[str, int | None]] = [("(expressions of this image)", None)]
        if image_id is not None:
            for i in self._images[image_id][1]:
                meta = self.dataset.meta(i)
                options.append((f"{meta['sentence']}  [{EXPR_KINDS[int(meta['expr_type'])]}]", i))
        with self._silenced():
            self.examples.options = options
            self.examples.value = None

    def _apply_rules(self) -> None:
        self.nt_threshold.disabled = bool(self.nt_official.value)
        self.mask_threshold.disabled = bool(self.mask_official.value)
        self.predictor.nt_threshold = (None if self.nt_official.value
                                       else float(self.nt_threshold.value))
        self.predictor.mask_threshold = (None if self.mask_official.value
                                         else float(self.mask_threshold.value))

    def _on_image(self, change: dict) -> None:
        if self._quiet or change["new"] is None:
            return
        self._safe(lambda: self.select_image(change["new"]))

    def _on_upload(self, change: dict) -> None:
        if self._quiet or not change["new"]:
            return
        self._safe(lambda: self.load_upload(change["new"]))

    def _on_example(self, change: dict) -> None:
        if self._quiet or change["new"] is None:
            return
        sentence = self.dataset.meta(int(change["new"]))["sentence"]
        if self.text.value == sentence:
            self._safe(lambda: self.predict(sentence))
        else:
            self.text.value = sentence  # the text observer segments it

    def _on_text(self, change: dict) -> None:
        if self._quiet or not str(change["new"]).strip():
            return
        self._safe(lambda: self.predict(change["new"]))

    def _on_run(self, _button: Any) -> None:
        self._safe(lambda: self.predict(self.text.value))

    def _on_rule(self, change: dict) -> None:
        if self._quiet:
            return
        self._apply_rules()
        if self.state.image is not None and self.state.expression:
            self._safe(lambda: self.predict(self.state.expression))

    def _on_top_k(self, change: dict) -> None:
        if self._quiet or self.state.prediction is None:
            return
        self._safe(self.render)


def make_demo(predictor: Predictor, dataset: Any = None, **kwargs: Any) -> GRESDemo:
    """Build the classroom demo (see :class:`GRESDemo` for the keyword arguments)."""
    return GRESDemo(predictor, dataset, **kwargs)


def upload_value(content: bytes, name: str = "image.png",
                     mime: str = "image/png") -> tuple[dict[str, Any], ...]:
    """A ``FileUpload.value`` (ipywidgets 8 format) holding ``content``: lets code and tests
    feed the upload widget exactly as the browser does."""
    return ({"name": name, "type": mime, "size": len(content), "content": memoryview(content),
             "last_modified": _dt.datetime.now(_dt.timezone.utc)},)


def pick_examples(dataset: Any, per_kind: int = 1) -> list[int]:
    """Fixed demo examples: for each expression kind (single, multi, no-target) the first
    ``per_kind`` samples in dataset order, each on an image not used yet; the kinds are
    interleaved (single, multi, no-target, single, ...). Kinds the dataset lacks are skipped."""
    if per_kind < 1:
        raise ValueError(f"per_kind must be >= 1, got {per_kind}")
    chosen: dict[int, list[int]] = {k: [] for k in range(len(EXPR_KINDS))}
    used: set[int] = set()
    for i in range(len(dataset)):
        meta = dataset.meta(i)
        kind, iid = int(meta["expr_type"]), int(meta["image_id"])
        if len(chosen[kind]) < per_kind and iid not in used:
            chosen[kind].append(i)
            used.add(iid)
        if all(len(v) == per_kind for v in chosen.values()):
            break
    return [chosen[k][j] for j in range(per_kind) for k in chosen if j < len(chosen[k])]


def sample_expressions(dataset: Any, indices: Sequence[int]) -> list[tuple[int, str, str]]:
    """``(index, expression, kind)`` of dataset samples (for the book's static examples)."""
    return [(int(i), dataset.meta(i)["sentence"], EXPR_KINDS[int(dataset.meta(i)["expr_type"])])
            for i in indices]
