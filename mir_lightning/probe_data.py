"""The paper's probe protocol: unrelated image + text samples encoded as probe batches, for
``mir-lightning evaluate`` and every trainer adapter (:func:`paper_probe`). The built-in
offline set needs no download.

Images are generated procedurally with numpy (seeded, so every run and every rank sees
the same set): sky-and-ground scenes, geometric shapes, stripes, checkerboards, smooth
colour fields and noise textures. Texts are English paragraphs written for this project,
combined in a fixed order so that each sample gets its own text. As in the paper's
protocol (TextVQA images paired with unrelated CNN/DailyMail stories), images and texts
are unrelated: MIR measures the distance between the two token distributions, not
image-text agreement.

These samples are synthetic. MIR values computed on them are comparable with each other
(same probe, different checkpoints), not with the values reported in the paper.

:func:`probe_set` pairs images and texts: the built-in set or the user's files. Only paths
and texts are held; each image is decoded when its batch needs it (:meth:`ProbeSet.image`),
so memory does not grow with the number of samples. :class:`ProbeBatches` encodes them with
the model's processor and chat template; :func:`paper_probe` builds it.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_SAMPLES",
    "PARAGRAPHS",
    "NO_VALUE",
    "InputError",
    "ProbeBatches",
    "ProbeSet",
    "build_prompt",
    "encode_batch",
    "load_texts",
    "paper_probe",
    "processor_image_token_id",
    "probe_image_array",
    "probe_images",
    "probe_set",
    "probe_texts",
    "python_spelling",
    "readable_image_paths",
]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class InputError(ValueError):
    """A problem with the caller's input (paths, files, counts, model folder): the message
    says what to change. The command line prints it as one line and exits with code 2.

    The message names the caller's arguments, not one interface's spelling of them: in
    ``template``, ``{name}`` is the argument ``name`` and ``{name=key}`` that argument set to
    ``values[key]`` (value keys are never argument names). ``str()`` spells them for Python
    callers (``num_samples``, ``num_samples=5``); :meth:`worded` for another interface (the
    command line: ``--num-samples``, ``--num-samples 5``).

    Example:
        >>> str(InputError("{batch_size=n} must be at least 1", n=0))
        'batch_size=0 must be at least 1'
        >>> InputError("{batch_size=n} must be at least 1", n=0).worded(lambda name, value: f"--{name} {value}")
        '--batch_size 0 must be at least 1'
    """

    def __init__(self, template: str, /, **values: Any) -> None:
        self.template = template
        self.values = values
        super().__init__(self.worded(python_spelling))

    @classmethod
    def plain(cls, message: str) -> "InputError":
        """An error whose message names no argument (braces in it are kept as they are)."""
        return cls("{text}", text=message)

    def worded(self, spell: Callable[[str, Any], str]) -> str:
        """The message with each argument written as ``spell(name, value)`` (``value`` is
        :data:`NO_VALUE` where the message names the argument alone)."""
        return self.template.format_map(_Fields(self.values, spell))


class _NoValue:
    def __repr__(self) -> str:
        return "NO_VALUE"


NO_VALUE: Any = _NoValue()
"""The ``value`` :meth:`InputError.worded` passes where a message names an argument alone."""


class _Fields(dict):
    """``str.format_map`` fields of an :class:`InputError`: values by key, arguments spelt."""

    def __init__(self, values: dict[str, Any], spell: Callable[[str, Any], str]) -> None:
        super().__init__(values)
        self.spell = spell

    def __missing__(self, field_name: str) -> str:
        name, _, key = field_name.partition("=")
        return self.spell(name, self[key] if key else NO_VALUE)


def python_spelling(name: str, value: Any) -> str:
    """An argument as a Python caller writes it: ``num_samples`` or ``num_samples=5``
    (strings and paths quoted)."""
    if value is NO_VALUE:
        return name
    return f"{name}={str(value)!r}" if isinstance(value, (str, os.PathLike)) else f"{name}={value!r}"


MAX_SAMPLES = 500
"""Most samples the built-in probe set provides."""

IMAGE_SIZE = 256

PARAGRAPHS: tuple[str, ...] = (
    "The city council voted on Tuesday to extend the hours of the public library, which will now stay "
    "open until nine in the evening on weekdays. Supporters said students and shift workers had asked "
    "for the change for years.",
    "A small fishing boat that lost its engine off the northern coast was towed back to harbour late "
    "last night. The three crew members were tired and cold but unhurt, according to the coast guard.",
    "Researchers at a regional university have found that a common garden plant can remove some "
    "pollutants from indoor air. They caution that the effect is modest and that opening a window "
    "still works better.",
    "The local football club confirmed that its captain will miss the rest of the season with a knee "
    "injury. The coach said the team would miss his leadership more than his goals.",
    "Heavy rain flooded several streets in the old town on Sunday, and firefighters pumped water out "
    "of dozens of basements. Forecasters expect drier weather by the middle of the week.",
    "A bakery that has served the same neighbourhood for sixty years will close next month. The owner, "
    "who took over from her father, said rising costs and a lack of successors made the decision "
    "unavoidable.",
    "Engineers have begun repairing the old stone bridge over the river after inspectors found cracks "
    "in two of its arches. Traffic will be diverted for about four months while the work goes on.",
    "The museum opened an exhibition of maps drawn by sailors in the sixteenth century. Many of the "
    "coastlines are surprisingly accurate, while the interiors of the continents are filled with "
    "guesses and imaginary animals.",
    "Parents gathered outside the primary school to protest against plans to merge it with a larger "
    "school across town. The education department said no final decision has been made.",
    "A new study suggests that people who walk for twenty minutes a day sleep better than those who "
    "do not exercise at all. The authors say the timing of the walk matters less than its regularity.",
    "The orchestra announced its programme for the coming season, including two works by living "
    "composers and a complete cycle of the Beethoven symphonies spread over six concerts.",
    "Farmers in the valley say the late frost damaged much of this year's apple blossom. Some expect "
    "their harvest to be half of what it was last autumn, and prices in the shops may rise.",
    "Police are asking for witnesses after a van crashed into a shop window early on Saturday. No one "
    "was injured, and the driver stayed at the scene to speak with officers.",
    "The airport will add three new routes this summer, connecting the region with two coastal cities "
    "and a mountain resort. Airline officials said early bookings have been strong.",
    "A volunteer group has planted more than two thousand trees along the motorway to reduce noise "
    "for nearby houses. Residents say they already notice a difference on windy days.",
    "The technology company reported lower profits for the third quarter, blaming weaker demand for "
    "its tablets. Its shares fell sharply in early trading before recovering some of the loss.",
    "An elderly man who went missing while hiking in the forest was found safe the next morning by a "
    "search dog. He had sheltered under a rock overhang and kept warm with a foil blanket.",
    "The hospital has opened a new wing for children, with brightly painted rooms, a small garden and "
    "space for parents to stay overnight. Staff said it had been funded largely by donations.",
    "Astronomers observed a bright flash on the surface of the moon, probably caused by a small rock "
    "striking it at high speed. Such impacts are common but rarely seen from Earth.",
    "The bus company will replace half of its fleet with electric vehicles over the next three years. "
    "Charging points are being installed at the main depot this winter.",
    "Hundreds of runners took part in the charity race along the river, raising money for a local "
    "shelter. The winner finished the ten kilometre course in just over thirty-one minutes.",
    "A rare bird that usually lives much further south has been spotted in the wetlands near the "
    "estuary. Birdwatchers travelled from across the country hoping to photograph it.",
    "The government published a report on the state of the nation's roads, finding that one in five "
    "bridges needs major repairs within the next decade. Ministers promised additional funding.",
    "A chess club founded by two retired teachers now has more than eighty members, most of them "
    "under sixteen. The club meets every Thursday in the back room of a cafe.",
    "Scientists monitoring the glacier say it retreated by almost forty metres last year, faster than "
    "in any year since measurements began. Meltwater has formed a new lake at its foot.",
    "The theatre company is touring small villages with an open-air production of a classic comedy. "
    "Audiences are asked to bring their own chairs and, if the weather turns, an umbrella.",
    "A court ruled that the developer must restore a historic wall it demolished without permission. "
    "The company said it would appeal against the decision.",
    "Local shops reported a busy weekend as the annual street festival returned after a two-year "
    "break. Stalls sold food, crafts and second-hand books until late in the evening.",
    "The water company warned customers to use less water during the dry spell, asking them not to "
    "use garden hoses for the next few weeks. Reservoir levels are below average for the season.",
    "A team of students built a small satellite that will be launched next spring to measure the "
    "temperature of the upper atmosphere. It is about the size of a loaf of bread.",
    "After months of negotiations, the two unions and the rail operator reached an agreement on pay. "
    "Services are expected to return to their normal timetable from Monday.",
    "The zoo welcomed the birth of twin red panda cubs, which will stay with their mother out of "
    "public view for several weeks. Keepers say both cubs are feeding well.",
)


def probe_texts(n: int) -> list[str]:
    """``n`` distinct English texts (about 60-110 words each), deterministic.

    Text ``i`` joins three paragraphs chosen by a fixed rule; the first ``MAX_SAMPLES``
    texts are pairwise distinct.

    Raises:
        ValueError: when ``n`` is not in ``[1, MAX_SAMPLES]``.
    """
    _check_count(n, "texts")
    p = len(PARAGRAPHS)
    out = []
    for i in range(n):
        a = i % p
        b = (a + 1 + (i // p) % (p - 1)) % p
        c = (a + 1 + (3 * i + 7) % (p - 1)) % p
        if c == b:
            c = (c + 1) % p
        if c == a:
            c = (c + 1) % p
        out.append(" ".join((PARAGRAPHS[a], PARAGRAPHS[b], PARAGRAPHS[c])))
    return out


def _check_count(n: int, what: str) -> None:
    if not 1 <= int(n) <= MAX_SAMPLES:
        raise ValueError(f"the built-in probe set has {MAX_SAMPLES} {what}; asked for {n}")


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Bilinearly upsampled random grid in [0, 1], ``[size, size]`` float32."""
    grid = rng.random((cells + 1, cells + 1))
    t = np.linspace(0, cells, size, endpoint=False)
    i = t.astype(int)
    f = t - i
    g00 = grid[np.ix_(i, i)]
    g01 = grid[np.ix_(i, i + 1)]
    g10 = grid[np.ix_(i + 1, i)]
    g11 = grid[np.ix_(i + 1, i + 1)]
    fy, fx = f[:, None], f[None, :]
    top = g00 * (1 - fx) + g01 * fx
    bottom = g10 * (1 - fx) + g11 * fx
    return (top * (1 - fy) + bottom * fy).astype(np.float32)


def probe_image_array(index: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """The ``index``-th procedural image, uint8 ``[size, size, 3]`` (RGB), deterministic."""
    rng = np.random.default_rng(1_000_003 + index)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    kind = index % 6
    c1, c2, c3 = rng.random(3), rng.random(3), rng.random(3)
    if kind == 0:  # scene: sky gradient, hills, a sun
        horizon = 0.5 + 0.15 * (rng.random() - 0.5)
        hills = horizon + 0.08 * np.sin(2 * math.pi * (xx * rng.uniform(1, 3) + rng.random()))
        sky = (1 - yy[..., None]) * np.array([0.4, 0.6, 1.0]) + yy[..., None] * np.array([0.9, 0.9, 1.0])
        ground = c1 * 0.6 + np.array([0.1, 0.35, 0.1]) * 0.4
        img = np.where((yy > hills)[..., None], ground * (0.7 + 0.3 * _smooth_noise(rng, size, 16))[..., None], sky)
        cx, cy, r = rng.uniform(0.2, 0.8), rng.uniform(0.1, 0.3), rng.uniform(0.05, 0.1)
        sun = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
        img = np.where(sun[..., None], np.array([1.0, 0.9, 0.3]), img)
    elif kind == 1:  # shapes on a background
        img = np.broadcast_to(c1 * 0.5 + 0.25, (size, size, 3)).copy()
        for _ in range(rng.integers(3, 8)):
            col = rng.random(3)
            cx, cy = rng.random(2)
            if rng.random() < 0.5:
                r = rng.uniform(0.05, 0.25)
                m = (xx - cx) ** 2 + (yy - cy) ** 2 < r**2
            else:
                w, h = rng.uniform(0.05, 0.4, 2)
                m = (abs(xx - cx) < w / 2) & (abs(yy - cy) < h / 2)
            img[m] = col
    elif kind == 2:  # stripes at an angle
        angle = rng.uniform(0, math.pi)
        freq = rng.uniform(3, 20)
        s = 0.5 + 0.5 * np.sin(2 * math.pi * freq * (xx * math.cos(angle) + yy * math.sin(angle)))
        img = s[..., None] * c1 + (1 - s[..., None]) * c2
    elif kind == 3:  # checkerboard with a colour gradient
        n = int(rng.integers(2, 12))
        board = ((np.floor(xx * n) + np.floor(yy * n)) % 2)[..., None]
        grad = xx[..., None] * c3 + (1 - xx[..., None]) * c2
        img = board * c1 + (1 - board) * grad
    elif kind == 4:  # smooth colour field
        img = np.stack([_smooth_noise(rng, size, int(rng.integers(2, 6))) for _ in range(3)], axis=-1)
    else:  # textured noise
        base = _smooth_noise(rng, size, int(rng.integers(8, 32)))
        fine = rng.random((size, size)).astype(np.float32)
        t = (0.7 * base + 0.3 * fine)[..., None]
        img = t * c1 + (1 - t) * c2
    return (np.clip(img, 0.0, 1.0) * 255).round().astype(np.uint8)


def probe_images(n: int, size: int = IMAGE_SIZE) -> list:
    """``n`` procedural RGB ``PIL.Image`` objects of ``size x size`` pixels, deterministic.

    Raises:
        ValueError: when ``n`` is not in ``[1, MAX_SAMPLES]``.
    """
    from PIL import Image

    _check_count(n, "images")
    return [Image.fromarray(probe_image_array(i, size)) for i in range(n)]


# --------------------------------------------------------------------------- evaluation set
@dataclass(frozen=True)
class ProbeSet:
    """``len(texts)`` image+text samples; sample ``i`` is ``(image(i), texts[i])``.

    Attributes:
        texts: one text per sample.
        image_paths: one readable image file per sample, or ``None`` for the built-in
            procedural images.
        image_source, text_source: where they came from (for reports).
        skipped_images: ``"path: reason"`` of image files skipped as unreadable.
        skipped_texts: empty text files skipped.
    """

    texts: list[str]
    image_paths: list[Path] | None
    image_source: str
    text_source: str
    skipped_images: list[str] = field(default_factory=list)
    skipped_texts: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.texts)

    def image(self, index: int) -> Any:
        """Sample ``index``'s image, decoded now, as an RGB ``PIL.Image``.

        Raises:
            InputError: when a file that passed the header check cannot be decoded.
        """
        from PIL import Image

        if self.image_paths is None:
            return Image.fromarray(probe_image_array(index))
        path = self.image_paths[index]
        try:
            with Image.open(path) as im:
                return im.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
            raise InputError(
                "{images}: {path} has a valid header but cannot be decoded ({error}); remove or replace it",
                path=str(path), error=f"{type(exc).__name__}: {exc}",
            ) from exc


def _image_files(source: Path) -> list[Path]:
    if not source.exists():
        raise InputError("{images}: {path} does not exist", path=str(source))
    if source.is_dir():
        paths = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise InputError("{images}: no image files ({kinds}) in {path}", kinds=", ".join(IMAGE_EXTENSIONS), path=str(source))
        return paths
    if source.suffix.lower() in (".txt", ".lst"):
        lines = [ln.strip() for ln in source.read_text(encoding="utf-8").splitlines()]
        paths = [Path(ln) if os.path.isabs(ln) else source.parent / ln for ln in lines if ln]
        if not paths:
            raise InputError("{images}: the list {path} names no image", path=str(source))
        return paths
    return [source]


def readable_image_paths(source: Path, n: int) -> tuple[list[Path], list[str]]:
    """The first ``n`` image files of ``source`` (a folder sorted by name, one image, or a
    ``.txt`` list of paths) whose header PIL can read; nothing is decoded.

    Unreadable files (missing, not an image) are skipped with a warning. A file whose
    header reads but whose pixels do not decode fails later, in :meth:`ProbeSet.image`.

    Returns:
        ``(paths, skipped)``, ``skipped`` as ``"path: reason"``.

    Raises:
        InputError: when ``source`` is missing or holds fewer than ``n`` readable images.
    """
    from PIL import Image

    paths: list[Path] = []
    skipped: list[str] = []
    for path in _image_files(source):
        if len(paths) == n:
            break
        try:
            with Image.open(path) as im:
                im.verify()  # checks structure and checksums where the format has them; no pixels kept
            paths.append(path)
        except FileNotFoundError:
            skipped.append(f"{path}: missing")
            warnings.warn(f"skipping image {path}: file not found", stacklevel=2)
        except Exception as exc:  # noqa: BLE001 - PIL raises many types for corrupt files
            skipped.append(f"{path}: {type(exc).__name__}: {exc}")
            warnings.warn(f"skipping unreadable image {path} ({type(exc).__name__}: {exc})", stacklevel=2)
    if len(paths) < n:
        if not paths:
            raise InputError("{images}: no readable image in {path} ({skipped} skipped)", path=str(source),
                             skipped=len(skipped))
        raise InputError(
            "{num_samples=n} asks for {n} samples but only {found} readable images exist in {path} ({skipped} "
            "skipped); pass {num_samples=found} or add images",
            n=n, found=len(paths), path=str(source), skipped=len(skipped),
        )
    return paths, skipped


def _texts_from_file(path: Path) -> list[str]:
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise InputError("{texts}: {path} is not UTF-8 text ({error})", path=str(path), error=exc) from exc
    if not raw.strip():
        raise InputError("{texts}: the text file {path} is empty", path=str(path))
    if path.suffix.lower() == ".jsonl":
        texts = []
        for i, line in enumerate(raw.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError("{texts}: {path} line {line} is not valid JSON ({error})", path=str(path), line=i,
                                 error=exc.msg) from exc
            text = obj.get("text") if isinstance(obj, dict) else obj if isinstance(obj, str) else None
            if not isinstance(text, str):
                raise InputError("{texts}: {path} line {line} has no string field 'text'", path=str(path), line=i)
            if text.strip():
                texts.append(text.strip())
        return texts
    normalised = raw.replace("\r\n", "\n")
    blocks = [" ".join(b.strip().split("\n")).strip() for b in normalised.split("\n\n") if b.strip()]
    if len(blocks) > 1:
        return blocks
    return [ln.strip() for ln in normalised.splitlines() if ln.strip()]


def load_texts(source: Path, n: int) -> tuple[list[str], list[str]]:
    """The first ``n`` texts of ``source``: a folder of ``.txt`` files (one text each, empty
    ones skipped with a warning), a ``.jsonl`` file (one ``{"text": ...}`` per line), or a
    text file (blank-line separated paragraphs, else one text per line).

    Returns:
        ``(texts, skipped)``; ``skipped`` lists the empty files of a folder.

    Raises:
        InputError: for a missing source, an empty file, or fewer than ``n`` texts.
    """
    if not source.exists():
        raise InputError("{texts}: {path} does not exist", path=str(source))
    skipped: list[str] = []
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.is_file() and p.suffix.lower() == ".txt")
        if not files:
            raise InputError("{texts}: no .txt files in {path}", path=str(source))
        texts = []
        for p in files:
            if len(texts) == n:
                break
            body = p.read_text(encoding="utf-8", errors="replace").strip()
            if body:
                texts.append(" ".join(body.split()))
            else:
                skipped.append(str(p))
                warnings.warn(f"skipping empty text file {p}", stacklevel=2)
        if not texts:
            raise InputError("{texts}: every .txt file in {path} is empty", path=str(source))
    else:
        texts = _texts_from_file(source)
    if len(texts) < n:
        raise InputError(
            "{num_samples=n} asks for {n} samples but only {found} texts exist in {path}; pass {num_samples=found} "
            "or add texts",
            n=n, found=len(texts), path=str(source),
        )
    return texts[:n], skipped


def probe_set(images: str | os.PathLike | None, texts: str | os.PathLike | None, n: int) -> ProbeSet:
    """Pair ``n`` images with ``n`` texts; the built-in set fills in what is not given.

    Raises:
        InputError: ``n < 1``, more samples than the sources hold, Pillow missing.
    """
    if n < 1:
        raise InputError("{num_samples} must be at least 1, got {n}", n=n)
    if importlib.util.find_spec("PIL") is None:
        raise InputError("the probe set needs Pillow to read images: pip install pillow")
    if n < 20:
        warnings.warn(f"{n} samples: the paper reports MIR stable from about 20 samples on", stacklevel=2)
    if (images is None or texts is None) and n > MAX_SAMPLES:
        raise InputError(
            "{num_samples=n} asks for {n} samples but the built-in probe set has {most}; pass {images} and "
            "{texts} for more",
            n=n, most=MAX_SAMPLES,
        )
    if texts is not None:
        text_list, skipped_texts = load_texts(Path(texts), n)
        text_source = str(texts)
    else:
        text_list, skipped_texts, text_source = probe_texts(n), [], "built-in probe texts"
    if images is not None:
        paths, skipped = readable_image_paths(Path(images), n)
        image_source: str = str(images)
    else:
        paths, skipped, image_source = None, [], "built-in procedural images"
    return ProbeSet(text_list, paths, image_source, text_source, skipped, skipped_texts)


# --------------------------------------------------------------------------- encoded batches
def build_prompt(processor: Any, text: str) -> str:
    """One user turn with the image then ``text``: the chat template when the processor has one
    (with the assistant prefix appended, as the official script does), else the image
    placeholder followed by the text."""
    template = getattr(processor, "chat_template", None) or getattr(
        getattr(processor, "tokenizer", None), "chat_template", None
    )
    if template:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
        # processors of transformers < 4.44 have no apply_chat_template: their tokenizer's
        templater = processor if hasattr(processor, "apply_chat_template") else getattr(processor, "tokenizer", None)
        try:
            return templater.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"chat template failed ({exc}); using an image placeholder + text", stacklevel=2)
    placeholder = getattr(processor, "image_token", None) or "<image>"
    return f"{placeholder}{text}"


def encode_batch(processor: Any, samples: ProbeSet, indices: Sequence[int]) -> dict[str, Any]:
    """Decode the images of ``indices`` and run the processor on them (padding on); returns
    its outputs without ``labels``."""
    images = [samples.image(i) for i in indices]
    prompts = [build_prompt(processor, samples.texts[i]) for i in indices]
    errors = []
    for layout in ([[im] for im in images], images):  # nested (Idefics3/Gemma 3) first
        try:
            enc = processor(images=layout, text=prompts, padding=True, return_tensors="pt")
            break
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}")
    else:
        raise InputError.plain(f"the processor failed on a batch: {' | '.join(errors)[:600]}")
    enc = dict(enc)
    enc.pop("labels", None)
    return enc


class _Batch(Mapping[str, Any]):
    """The processor's output for one batch of samples, computed when first read: a rank
    decodes only the images of the batches it runs (the probe skips the others unread)."""

    def __init__(self, encode: Callable[[], dict[str, Any]]) -> None:
        self._encode = encode
        self._data: dict[str, Any] | None = None

    def _get(self) -> dict[str, Any]:
        if self._data is None:
            self._data = self._encode()
        return self._data

    def __getitem__(self, key: str) -> Any:
        return self._get()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._get())

    def __len__(self) -> int:
        return len(self._get())


class ProbeBatches(Sequence[Mapping[str, Any]]):
    """A probe loader over ``samples``: batch ``b`` holds samples ``b * batch_size ...``,
    encoded by ``processor`` each time it is read (floating tensors cast to ``dtype`` unless
    ``None``). Holds no image and no tensor between reads: memory is flat in the number of
    samples, and a probe run re-encodes its batches (decoding + processor, no model).

    Raises (when a batch is read):
        InputError: the processor fails, or (with ``image_token_id``) inserts no such token.
    """

    def __init__(
        self,
        samples: ProbeSet,
        processor: Any,
        batch_size: int,
        dtype: torch.dtype | None = None,
        image_token_id: int | None = None,
    ) -> None:
        self.samples, self.processor, self.batch_size = samples, processor, batch_size
        self.dtype, self.image_token_id = dtype, image_token_id

    def __len__(self) -> int:
        return -(-len(self.samples) // self.batch_size)

    def __getitem__(self, index: int) -> Mapping[str, Any]:  # type: ignore[override]
        if not 0 <= index < len(self):
            raise IndexError(index)
        start = index * self.batch_size
        indices = range(start, min(start + self.batch_size, len(self.samples)))
        return _Batch(lambda: self._encode(indices))

    def _encode(self, indices: Sequence[int]) -> dict[str, Any]:
        enc = encode_batch(self.processor, self.samples, indices)
        if self.image_token_id is not None and not bool((enc["input_ids"] == self.image_token_id).any()):
            raise InputError.plain(
                f"no image token (id {self.image_token_id}) in the processed batch: the processor does not "
                "insert the model's image tokens"
            )
        if self.dtype is None:
            return enc
        return {k: v.to(self.dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v for k, v in enc.items()}


def processor_image_token_id(processor: Any) -> int | None:
    """The id of the image token ``processor`` inserts (its ``image_token_id``, else its
    tokenizer's id of ``image_token``); ``None`` when it names none."""
    token_id = getattr(processor, "image_token_id", None)
    if isinstance(token_id, int):
        return token_id
    token, tokenizer = getattr(processor, "image_token", None), getattr(processor, "tokenizer", None)
    if isinstance(token, str) and tokenizer is not None:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if isinstance(token_id, int) and token_id != getattr(tokenizer, "unk_token_id", None):
            return token_id
    return None


def paper_probe(
    processor: Any,
    num_samples: int = 100,
    batch_size: int = 8,
    *,
    images: str | os.PathLike | None = None,
    texts: str | os.PathLike | None = None,
    dtype: torch.dtype | None = None,
    image_token_id: int | None = None,
) -> ProbeBatches:
    """The paper's probe protocol as a loader: ``num_samples`` unrelated image + text samples,
    one image per sample, as a user turn of ``processor``'s chat template (else the image
    placeholder followed by the text), in batches of ``batch_size``.

    The same samples and encoding as ``mir-lightning evaluate`` (:func:`evaluate_checkpoint`
    builds its loader here): MIR from any adapter on this loader equals the command's on the
    same checkpoint. Pass it as ``probe_dataloader`` to :class:`~mir_lightning.MIRProbe`,
    :class:`~mir_lightning.MIRCallback` or ``MIRTrainerCallback``; every rank gets the same
    loader (the probe shards it). Batches are dicts of the processor's tensors (``input_ids``
    ``[B, T]``, ``attention_mask``, ``pixel_values``...), encoded when read.

    Args:
        processor: the model's multimodal processor (``AutoProcessor.from_pretrained``).
        num_samples: samples in all (the built-in set has up to :data:`MAX_SAMPLES`).
        batch_size: samples per forward.
        images: folder / single image / ``.txt`` list of paths; ``None``: built-in images.
        texts: folder of ``.txt`` / text file / ``.jsonl``; ``None``: built-in texts.
        dtype: cast floating tensors (``pixel_values``) to this dtype; ``None``: as the
            processor returns them.
        image_token_id: checked to be in every batch; ``None``: the processor's (no check
            when it names none).

    Raises:
        InputError: for a bad count, missing or short sources, a processor that fails or
            inserts no image token (the last two when a batch is read).
    """
    if isinstance(batch_size, bool) or int(batch_size) != batch_size or batch_size < 1:
        raise InputError("{batch_size=n} must be a positive integer", n=batch_size)
    samples = probe_set(images, texts, num_samples)
    if image_token_id is None:
        image_token_id = processor_image_token_id(processor)
    return ProbeBatches(samples, processor, int(batch_size), dtype, image_token_id)
